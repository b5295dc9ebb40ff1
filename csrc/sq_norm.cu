// sq_norm: sum_i sum((T_i * x_i)^2), T = |w| + eta (ASAM) or 1; per-tensor and total, fp32/fp64 accumulate.
// Bytes per element: read 1b (2b with the ASAM weight w). Two stages, no atomics: one partial
// per chunk, then per-tensor sums over each tensor's chunks, then the total over the tensors.
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

template <typename T>
struct SqNormOp {
  DevScalar<acc_t<T>> eta;
  acc_t<T>* partials;

  __device__ void operator()(const Ptrs<2>& ptrs, int64_t start, int64_t len, int64_t chunk) const {
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(ptrs.ptr[0]) + start;
    const T* w = ptrs.ptr[1] ? static_cast<const T*>(ptrs.ptr[1]) + start : nullptr;
    const bool vec = aligned16(x) && (w == nullptr || aligned16(w));
    const A e = w ? eta.get() : A(0);
    A s[1] = {A(0)};
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A xv[K];
      load<K>(xv, x + i);
      if (w) {
        A wv[K];
        load<K>(wv, w + i);
#pragma unroll
        for (int k = 0; k < K; ++k) xv[k] *= fabs(wv[k]) + e;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) s[0] += xv[k] * xv[k];
    });
    block_sum<1>(s);
    if (threadIdx.x == 0) partials[chunk] = s[0];
  }
};

}  // namespace

cudaError_t sq_norm(DType dt, const Lists& lists, Scalar eta, void* partials, void* per_tensor, void* total,
                    cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* part = static_cast<A*>(partials);
    cudaError_t err = multi_tensor_apply<2>(lists, SqNormOp<T>{dev_scalar<A>(eta), part}, stream);
    if (err != cudaSuccess) return err;
    std::vector<int64_t> begin(lists.n + 1, 0);
    for (int64_t i = 0; i < lists.n; ++i) begin[i + 1] = begin[i] + (lists.numel[i] + kChunk - 1) / kChunk;
    A* per = static_cast<A*>(per_tensor);
    err = segment_sum<A, 1>(part, begin.data(), lists.n, per, stream);
    if (err != cudaSuccess) return err;
    const int64_t all[2] = {0, lists.n};
    return segment_sum<A, 1>(per, all, 1, static_cast<A*>(total), stream);
  });
}

}  // namespace sharpfused
