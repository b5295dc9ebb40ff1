// Compares the emulator's half / bfloat16 conversions (emu_fp.h) with the CUDA toolkit's own host
// implementations (the real cuda_fp16.h / cuda_bf16.h, compiled by g++): every 16-bit pattern
// to float, and float to half / bfloat16 on every float whose bits are a multiple of a stride
// plus the neighbourhoods of every rounding boundary (ties, overflow, subnormals). `fp_check all`
// checks all 2^32 floats (about a minute). NaN results only have to be NaN on both sides.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "emu_fp.h"

namespace {

uint16_t bits(__half h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
uint16_t bits(__nv_bfloat16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
bool is_nan16(uint16_t u, bool bf) { return bf ? (u & 0x7fff) > 0x7f80 : (u & 0x7fff) > 0x7c00; }

long bad = 0;

void check_float(uint32_t x) {
  const float f = emu::f32_from_bits(x);
  const uint16_t h_ref = bits(__float2half_rn(f)), h = emu::f32_to_f16_rn(f);
  const uint16_t b_ref = bits(__float2bfloat16_rn(f)), b = emu::f32_to_bf16_rn(f);
  const bool nan = std::isnan(f);
  if (nan ? !(is_nan16(h, false) && is_nan16(h_ref, false)) : h != h_ref) {
    if (bad++ < 10) std::printf("float %08x -> half: emu %04x, toolkit %04x\n", x, h, h_ref);
  }
  if (nan ? !(is_nan16(b, true) && is_nan16(b_ref, true)) : b != b_ref) {
    if (bad++ < 10) std::printf("float %08x -> bf16: emu %04x, toolkit %04x\n", x, b, b_ref);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool all = argc > 1 && std::strcmp(argv[1], "all") == 0;
  for (uint32_t u = 0; u < 65536; ++u) {
    __half h;
    __nv_bfloat16 b;
    std::memcpy(&h, &u, 2);
    std::memcpy(&b, &u, 2);
    const float fh = __half2float(h), fb = __bfloat162float(b);
    const float eh = emu::f16_to_f32(static_cast<uint16_t>(u)), eb = emu::bf16_to_f32(static_cast<uint16_t>(u));
    if (std::isnan(fh) ? !std::isnan(eh) : emu::f32_bits(fh) != emu::f32_bits(eh)) {
      if (bad++ < 10) std::printf("half %04x -> float: emu %a, toolkit %a\n", u, eh, fh);
    }
    if (std::isnan(fb) ? !std::isnan(eb) : emu::f32_bits(fb) != emu::f32_bits(eb)) {
      if (bad++ < 10) std::printf("bf16 %04x -> float: emu %a, toolkit %a\n", u, eb, fb);
    }
  }
  uint64_t n = 0;
  if (all) {
    for (uint64_t x = 0; x < (uint64_t(1) << 32); ++x, ++n) check_float(static_cast<uint32_t>(x));
  } else {
    for (uint64_t x = 0; x < (uint64_t(1) << 32); x += 257, ++n) check_float(static_cast<uint32_t>(x));
    // around every boundary of the half / bfloat16 grids: each 16-bit value and each midpoint, +-2 float ulps
    for (uint32_t s = 0; s < 2; ++s)
      for (uint32_t e = 0; e < 256; ++e)
        for (uint32_t hi = 0; hi < 1024; ++hi) {
          const uint32_t base = (s << 31) | (e << 23) | (hi << 13);  // half mantissa grid (10 bits)
          for (uint32_t low : {0x0000u, 0x1000u, 0x0800u}) {
            for (int d = -2; d <= 2; ++d, ++n) check_float(base + low + static_cast<uint32_t>(d));
          }
          const uint32_t bb = (s << 31) | (e << 23) | ((hi & 0x7f) << 16);  // bfloat16 grid (7 bits)
          for (int d = -2; d <= 2; ++d, ++n) check_float(bb + 0x8000u + static_cast<uint32_t>(d));
        }
  }
  std::printf("%llu floats and all 16-bit patterns: %s\n", static_cast<unsigned long long>(n), bad ? "FAILED" : "ALL OK");
  return bad != 0;
}
