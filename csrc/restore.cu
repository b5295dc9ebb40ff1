// restore_: w <- backup, a copy of the raw bits (bit-exact for every dtype, NaN payloads included).
// Bytes per element: read 1b, write 1b.
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

template <typename T>
struct RestoreOp {
  __device__ void operator()(const Ptrs<2>& ptrs, int64_t start, int64_t len, int64_t) const {
    T* w = static_cast<T*>(ptrs.ptr[0]) + start;
    const T* b = static_cast<const T*>(ptrs.ptr[1]) + start;
    for_chunk<T>(len, aligned16(w) && aligned16(b), [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      *reinterpret_cast<Pack<T, K>*>(w + i) = *reinterpret_cast<const Pack<T, K>*>(b + i);
    });
  }
};

}  // namespace

cudaError_t restore(DType dt, const Lists& lists, cudaStream_t stream) {
  // only the element size matters for a bit copy
  switch (dt) {
    case DType::kFloat32: return multi_tensor_apply<2>(lists, RestoreOp<uint32_t>{}, stream);
    case DType::kFloat16:
    case DType::kBFloat16: return multi_tensor_apply<2>(lists, RestoreOp<uint16_t>{}, stream);
    case DType::kFloat64: return multi_tensor_apply<2>(lists, RestoreOp<uint64_t>{}, stream);
  }
  return cudaErrorInvalidValue;
}

bool large_kernel_params() { return large_params_available(); }

}  // namespace sharpfused
