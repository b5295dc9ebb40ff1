// combine_: g <- c1 * g + c2 * saved, in opmath, rounded once. Bytes per element: read 2b, write 1b.
// A coefficient equal to zero drops its term entirely (decided here, on the device value), so an
// inf/NaN behind it never reaches g: 0 * inf would be NaN.
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

template <typename T>
struct CombineOp {
  DevScalar<acc_t<T>> c1, c2;

  __device__ void operator()(const Ptrs<2>& ptrs, int64_t start, int64_t len, int64_t) const {
    using A = acc_t<T>;
    T* g = static_cast<T*>(ptrs.ptr[0]) + start;
    const T* saved = static_cast<const T*>(ptrs.ptr[1]) + start;
    const A a = c1.get(), b = c2.get();
    for_chunk<T>(len, aligned16(g) && aligned16(saved), [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A gv[K], sv[K];
      load<K>(gv, g + i);
      load<K>(sv, saved + i);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        // where(a == 0, 0, a*g) + where(b == 0, 0, b*s); "t2 + 0" is the +0 of "0 + t2" (t2 == -0)
        const A t2 = b == A(0) ? A(0) : b * sv[k];
        gv[k] = a == A(0) ? t2 + A(0) : a * gv[k] + t2;
      }
      store<K>(g + i, gv);
    });
  }
};

}  // namespace

cudaError_t combine(DType dt, const Lists& lists, Scalar c1, Scalar c2, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    return multi_tensor_apply<2>(lists, CombineOp<T>{dev_scalar<A>(c1), dev_scalar<A>(c2)}, stream);
  });
}

}  // namespace sharpfused
