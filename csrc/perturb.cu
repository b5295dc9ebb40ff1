// perturb_: backup <- w (optional); w <- w + scale * T^2 * g [* mask], T = |w| + eta (ASAM) or 1.
// The mask is in the parameter dtype, or one byte per element (uint8 / bool: SSAM's 0/1 mask as
// stored; a byte's value converts to opmath exactly, so both give the same bits).
// Bytes per element: read w, g: 2b (+ mask: 3b in the dtype, 2b + 1 byte as bytes); write w,
// backup: 2b (1b without backup).
// scale is read once per block from device memory when it is a tensor (no host sync); with norm_sq
// the block turns it into scale / (sqrt(norm_sq) + eps) itself (SAM's rho / ||g||, no scalar launches).
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1u)) == 0;
}

// K mask values at p in opmath: elements of T, or bytes (K bytes, one aligned access when K > 1).
template <int K, typename T>
__device__ __forceinline__ void load_mask(acc_t<T> (&r)[K], const T* p) {
  load<K>(r, p);
}
template <int K, typename T>
__device__ __forceinline__ void load_mask(acc_t<T> (&r)[K], const unsigned char* p) {
  Pack<unsigned char, K> pk = *reinterpret_cast<const Pack<unsigned char, K>*>(p);
#pragma unroll
  for (int k = 0; k < K; ++k) r[k] = static_cast<acc_t<T>>(pk.v[k]);
}

// M: the mask's element type, T or unsigned char.
template <typename T, typename M>
struct PerturbOp {
  DevScalar<acc_t<T>> scale;
  bool has_eta;
  DevScalar<acc_t<T>> eta;
  const acc_t<T>* norm_sq;  // nullptr: scale as given
  acc_t<T> norm_eps;

  __device__ void operator()(const Ptrs<4>& ptrs, int64_t start, int64_t len, int64_t) const {
    using A = acc_t<T>;
    constexpr unsigned kMaskVec = sizeof(M) * vec_width<T>();  // bytes of mask per 16 bytes of w
    T* w = static_cast<T*>(ptrs.ptr[0]) + start;
    const T* g = static_cast<const T*>(ptrs.ptr[1]) + start;
    T* backup = ptrs.ptr[2] ? static_cast<T*>(ptrs.ptr[2]) + start : nullptr;
    const M* mask = ptrs.ptr[3] ? static_cast<const M*>(ptrs.ptr[3]) + start : nullptr;
    const bool vec =
        aligned16(w) && aligned16(g) && (!backup || aligned16(backup)) && (!mask || aligned_to(mask, kMaskVec));
    A s = scale.get();
    if (norm_sq) {  // rho / (||g|| + eps) on the device; a non-finite norm gives 0 (the term dropped)
      const A inv = A(1) / (sqrt(*norm_sq) + norm_eps);
      s = (inv == inv ? inv : A(0)) * s;
    }
    const A et = has_eta ? eta.get() : A(0);
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
        load_mask<K, T>(m, mask + i);
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

cudaError_t perturb(DType dt, const Lists& lists, Scalar scale, bool has_eta, Scalar eta, bool byte_mask,
                    Scalar norm_sq, double norm_eps, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    const A* nsq = static_cast<const A*>(norm_sq.ptr);
    if (byte_mask && lists.ptr[3])
      return multi_tensor_apply<4>(
          lists,
          PerturbOp<T, unsigned char>{dev_scalar<A>(scale), has_eta, dev_scalar<A>(eta), nsq, static_cast<A>(norm_eps)},
          stream);
    return multi_tensor_apply<4>(
        lists, PerturbOp<T, T>{dev_scalar<A>(scale), has_eta, dev_scalar<A>(eta), nsq, static_cast<A>(norm_eps)},
        stream);
  });
}

}  // namespace sharpfused
