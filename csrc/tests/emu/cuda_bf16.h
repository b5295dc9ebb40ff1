// Emulator stand-in for the toolkit's cuda_bf16.h (host C++ only): __nv_bfloat16 as 16 raw bits
// with round-to-nearest-even conversions. See emu.h.
#pragma once

#include "emu_defs.h"
#include "emu_fp.h"

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __host__ __device__ __nv_bfloat16(float f) : __x(::emu::f32_to_bf16_rn(f)) {}
  __host__ __device__ operator float() const { return ::emu::bf16_to_f32(__x); }
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");

__host__ __device__ inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
__host__ __device__ inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
__host__ __device__ inline float __bfloat162float(__nv_bfloat16 b) { return ::emu::bf16_to_f32(b.__x); }
__host__ __device__ inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
__host__ __device__ inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 b;
  b.__x = u;
  return b;
}
