// Restore fused with the base optimizer's update, evaluated at the restored weights w0 = backup.
//
// restore_sgd_ (torch.optim.SGD): d = g + wd*w0; buf = d (first step) or momentum*buf + (1-dampening)*d;
//   d = d + momentum*buf (nesterov) or buf; w = w0 - lr*d.
//   Bytes per element: read backup, g (+ buf): 2b (3b); write w (+ buf): 1b (2b).
// restore_adamw_ (torch.optim.AdamW): m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g^2;
//   w = w0*(1 - lr*wd) - lr/bc1 * m / (sqrt(v)/bc2_sqrt + eps).
//   Bytes per element: read backup, g, m, v: 4b; write w, m, v: 3b.
// The states are stored in the parameter dtype and, as torch does, the update uses the stored
// (rounded) values, so a low-precision run follows torch.optim's trajectory.
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

template <typename T>
struct SgdOp {
  using A = acc_t<T>;
  DevScalar<A> lr;
  A momentum, dampening, weight_decay;
  bool nesterov, init;

  __device__ void operator()(const Table<4>& tab, int t, int64_t start, int64_t len, int64_t) const {
    T* w = static_cast<T*>(tab.ptr[0][t]) + start;
    const T* backup = static_cast<const T*>(tab.ptr[1][t]) + start;
    const T* g = static_cast<const T*>(tab.ptr[2][t]) + start;
    T* buf = tab.ptr[3][t] ? static_cast<T*>(tab.ptr[3][t]) + start : nullptr;
    const bool vec = aligned16(w) && aligned16(backup) && aligned16(g) && (!buf || aligned16(buf));
    const A step = lr.get();
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A w0[K], d[K];
      load<K>(w0, backup + i);
      load<K>(d, g + i);
#pragma unroll
      for (int k = 0; k < K; ++k) d[k] += weight_decay * w0[k];
      if (buf) {
        A b[K];
        if (init) {
#pragma unroll
          for (int k = 0; k < K; ++k) b[k] = d[k];
        } else {
          load<K>(b, buf + i);
#pragma unroll
          for (int k = 0; k < K; ++k) b[k] = momentum * b[k] + (A(1) - dampening) * d[k];
        }
        store<K>(buf + i, b);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const A br = to_acc(from_acc<T>(b[k]));  // the stored value, as torch uses it
          d[k] = nesterov ? d[k] + momentum * br : br;
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) w0[k] -= step * d[k];
      store<K>(w + i, w0);
    });
  }
};

template <typename T>
struct AdamWOp {
  using A = acc_t<T>;
  DevScalar<A> lr;
  A beta1, beta2, eps, weight_decay, bc1, bc2_sqrt;

  __device__ void operator()(const Table<5>& tab, int t, int64_t start, int64_t len, int64_t) const {
    T* w = static_cast<T*>(tab.ptr[0][t]) + start;
    const T* backup = static_cast<const T*>(tab.ptr[1][t]) + start;
    const T* g = static_cast<const T*>(tab.ptr[2][t]) + start;
    T* m = static_cast<T*>(tab.ptr[3][t]) + start;
    T* v = static_cast<T*>(tab.ptr[4][t]) + start;
    const bool vec = aligned16(w) && aligned16(backup) && aligned16(g) && aligned16(m) && aligned16(v);
    const A a = lr.get();
    const A decay = A(1) - a * weight_decay, step = a / bc1, wgt = A(1) - beta1;
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A w0[K], gv[K], mv[K], vv[K];
      load<K>(w0, backup + i);
      load<K>(gv, g + i);
      load<K>(mv, m + i);
      load<K>(vv, v + i);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        // torch's lerp: start + weight*(end - start) for weight < 0.5, else end - (end - start)*(1 - weight)
        mv[k] = wgt < A(0.5) ? mv[k] + wgt * (gv[k] - mv[k]) : gv[k] - (gv[k] - mv[k]) * beta1;
        vv[k] = beta2 * vv[k] + (A(1) - beta2) * gv[k] * gv[k];
      }
      store<K>(m + i, mv);
      store<K>(v + i, vv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const A mr = to_acc(from_acc<T>(mv[k])), vr = to_acc(from_acc<T>(vv[k]));
        w0[k] = w0[k] * decay - step * (mr / (sqrt(vr) / bc2_sqrt + eps));
      }
      store<K>(w + i, w0);
    });
  }
};

}  // namespace

cudaError_t restore_sgd(DType dt, const Lists& lists, Scalar lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool init_momentum, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    const SgdOp<T> op{dev_scalar<A>(lr), static_cast<A>(momentum), static_cast<A>(dampening),
                      static_cast<A>(weight_decay), nesterov, init_momentum};
    return multi_tensor_apply<4>(lists, op, stream);
  });
}

cudaError_t restore_adamw(DType dt, const Lists& lists, Scalar lr, double beta1, double beta2, double eps,
                          double weight_decay, double bc1, double bc2_sqrt, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    const AdamWOp<T> op{dev_scalar<A>(lr), static_cast<A>(beta1), static_cast<A>(beta2), static_cast<A>(eps),
                        static_cast<A>(weight_decay), static_cast<A>(bc1), static_cast<A>(bc2_sqrt)};
    return multi_tensor_apply<5>(lists, op, stream);
  });
}

}  // namespace sharpfused
