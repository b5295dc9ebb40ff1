// Bit-level float <-> half / bfloat16 conversions of the CUDA emulator (round to nearest even,
// like __float2half_rn / __float2bfloat16_rn; NaN becomes the canonical 0x7fff, as on the GPU).
// Pure functions on bit patterns, so fp_check.cpp can compare them with the toolkit's own host
// implementations in the same program.
#pragma once

#include <cstdint>
#include <cstring>

namespace emu {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> IEEE binary16, round to nearest even; overflow gives inf.
inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(a == 0x7f800000u ? (sign | 0x7c00u) : 0x7fffu);
  const int e = static_cast<int>(a >> 23) - 127;  // unbiased exponent (finite, a > 0 or zero)
  if (e >= -14) {  // normal half range (or overflow, which the carry turns into inf)
    if (e > 15) return static_cast<uint16_t>(sign | 0x7c00u);
    uint32_t r = (static_cast<uint32_t>(e + 15) << 10) | ((a >> 13) & 0x3ffu);
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // carries into the exponent; 0x7c00 = inf
    return static_cast<uint16_t>(sign | r);
  }
  // subnormal half (or zero): value = m * 2^(e - 23), half subnormal unit 2^-24
  const uint32_t m = (a & 0x7fffffu) | (a >= 0x00800000u ? 0x800000u : 0u);
  const int shift = -1 - e;  // m >> shift = value / 2^-24 (float subnormals: e = -127, shift 126)
  if (shift > 24) return static_cast<uint16_t>(sign);
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (r & 1u))) ++r;  // 0x3ff + 1 = 0x400: the smallest normal
  return static_cast<uint16_t>(sign | r);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (m << 13));  // inf / NaN (payload kept)
  if (e != 0) return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return f32_from_bits(sign);
  // subnormal: m * 2^-24, exact in float
  float v = static_cast<float>(m) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

// float -> bfloat16, round to nearest even; overflow gives inf.
inline uint16_t f32_to_bf16_rn(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

}  // namespace emu
