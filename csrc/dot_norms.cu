// dot_norms: (<a,b>, |a|^2, |b|^2) over all tensors in one pass. Bytes per element: read 2b.
// Deterministic: three partials per chunk, then one fixed-order cleanup over all chunks.
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

template <typename T>
struct DotNormsOp {
  acc_t<T>* partials;  // 3 per chunk

  __device__ void operator()(const Ptrs<2>& ptrs, int64_t start, int64_t len, int64_t chunk) const {
    using A = acc_t<T>;
    const T* a = static_cast<const T*>(ptrs.ptr[0]) + start;
    const T* b = static_cast<const T*>(ptrs.ptr[1]) + start;
    A s[3] = {A(0), A(0), A(0)};
    for_chunk<T>(len, aligned16(a) && aligned16(b), [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A av[K], bv[K];
      load<K>(av, a + i);
      load<K>(bv, b + i);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s[0] += av[k] * bv[k];
        s[1] += av[k] * av[k];
        s[2] += bv[k] * bv[k];
      }
    });
    block_sum<3>(s);
    if (threadIdx.x == 0)
#pragma unroll
      for (int c = 0; c < 3; ++c) partials[chunk * 3 + c] = s[c];
  }
};

}  // namespace

cudaError_t dot_norms(DType dt, const Lists& lists, void* partials, void* out, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* part = static_cast<A*>(partials);
    cudaError_t err = multi_tensor_apply<2>(lists, DotNormsOp<T>{part}, stream);
    if (err != cudaSuccess) return err;
    const int64_t all[2] = {0, num_chunks(lists.numel, lists.n)};
    return segment_sum<A, 3>(part, all, 1, static_cast<A*>(out), stream);
  });
}

}  // namespace sharpfused
