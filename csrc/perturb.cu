// perturb_: backup <- w (optional); w <- w + scale * T^2 * g [* mask], T = |w| + eta (ASAM) or 1.
// Bytes per element: read w, g (+ mask): 2b (3b); write w, backup: 2b (1b without backup).
// scale is read once per block from device memory when it is a tensor (no host sync).
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

template <typename T>
struct PerturbOp {
  DevScalar<acc_t<T>> scale;
  bool has_eta;
  DevScalar<acc_t<T>> eta;

  __device__ void operator()(const Table<4>& tab, int t, int64_t start, int64_t len, int64_t) const {
    using A = acc_t<T>;
    T* w = static_cast<T*>(tab.ptr[0][t]) + start;
    const T* g = static_cast<const T*>(tab.ptr[1][t]) + start;
    T* backup = tab.ptr[2][t] ? static_cast<T*>(tab.ptr[2][t]) + start : nullptr;
    const T* mask = tab.ptr[3][t] ? static_cast<const T*>(tab.ptr[3][t]) + start : nullptr;
    const bool vec = aligned16(w) && aligned16(g) && (!backup || aligned16(backup)) && (!mask || aligned16(mask));
    const A s = scale.get(), et = has_eta ? eta.get() : A(0);
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      // the backup is the raw bits of w: exact restore
      Pack<T, K> raw = *reinterpret_cast<const Pack<T, K>*>(w + i);
      if (backup) *reinterpret_cast<Pack<T, K>*>(backup + i) = raw;
      A wv[K], e[K];
      load<K>(e, g + i);
#pragma unroll
      for (int k = 0; k < K; ++k) wv[k] = to_acc(raw.v[k]);
      if (has_eta) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const A tk = fabs(wv[k]) + et;
          e[k] *= tk * tk;
        }
      }
      if (mask) {
        A m[K];
        load<K>(m, mask + i);
#pragma unroll
        for (int k = 0; k < K; ++k) e[k] *= m[k];
      }
      if (s != A(0)) {  // a zero scale drops the term: w keeps its bits whatever g holds
#pragma unroll
        for (int k = 0; k < K; ++k) wv[k] += s * e[k];
      }
      store<K>(w + i, wv);
    });
  }
};

}  // namespace

cudaError_t perturb(DType dt, const Lists& lists, Scalar scale, bool has_eta, Scalar eta, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    return multi_tensor_apply<4>(lists, PerturbOp<T>{dev_scalar<A>(scale), has_eta, dev_scalar<A>(eta)}, stream);
  });
}

}  // namespace sharpfused
