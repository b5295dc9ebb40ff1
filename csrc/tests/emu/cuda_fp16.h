// Emulator stand-in for the toolkit's cuda_fp16.h (host C++ only): __half as 16 raw bits with
// round-to-nearest-even conversions. See emu.h.
#pragma once

#include "emu_defs.h"
#include "emu_fp.h"

struct __half {
  uint16_t __x;
  __half() = default;
  __host__ __device__ __half(float f) : __x(::emu::f32_to_f16_rn(f)) {}
  __host__ __device__ operator float() const { return ::emu::f16_to_f32(__x); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes");

__host__ __device__ inline __half __float2half_rn(float f) { return __half(f); }
__host__ __device__ inline __half __float2half(float f) { return __half(f); }
__host__ __device__ inline float __half2float(__half h) { return ::emu::f16_to_f32(h.__x); }
__host__ __device__ inline unsigned short __half_as_ushort(__half h) { return h.__x; }
__host__ __device__ inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.__x = u;
  return h;
}
