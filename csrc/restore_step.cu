// Restore fused with the base optimizer's update, evaluated at the restored weights w0 = backup.
//
// restore_sgd_ (torch.optim.SGD): g' = grad_coef*g; d = g' + wd*w0; buf = d (first step) or
//   momentum*buf + (1-dampening)*d; d = d + momentum*buf (nesterov) or buf; w = w0 - lr*d.
//   Bytes per element: read backup, g (+ buf): 2b (3b); write w (+ buf): 1b (2b).
// restore_adamw_ (torch.optim.AdamW, Decoupled): g' = grad_coef*g; m = lerp(m, g', 1-b1);
//   v = b2*v + (1-b2)*g'^2; w = w0*(1 - lr*wd) - lr/bc1 * m / (sqrt(v)/bc2_sqrt + eps).
//   torch.optim.Adam (L2 decay, not Decoupled): g' = grad_coef*g + wd*w0, w = w0 - lr/bc1 * ...
//   Bytes per element: read backup, g, m, v: 4b; write w, m, v: 3b.
// restore_rmsprop_ (torch.optim.RMSprop, not centered): g' = grad_coef*g + wd*w0;
//   v = alpha*v + (1-alpha)*g'^2; avg = sqrt(v) + eps; momentum > 0: buf = momentum*buf + g'/avg,
//   w = w0 - lr*buf; else w = w0 - lr*g'/avg.
//   Bytes per element: read backup, g, v (+ buf): 3b (4b); write w, v (+ buf): 2b (3b).
// The states are stored in the parameter dtype and, as torch does, the update uses the stored
// (rounded) values, so a low-precision run follows torch.optim's trajectory.
//
// Skipped step (found_inf set and nonzero, read by each block before any element): w <- backup
// as raw bits (signed zeros and NaN payloads kept), g and the states are not read, and nothing
// else is written -- except the momentum buffer on an SGD init step, which becomes +0.
//   Bytes per element then: read backup: 1b; write w: 1b (+ buf zeros: 2b).
// Device scalars: lr and grad_coef as one opmath value; found_inf and the AdamW step as one
// float32 (the bias corrections are then computed in double in each thread, as the host does).
#include "multi_tensor.cuh"

namespace sharpfused {
namespace {

// Unsigned integer of T's size: a skipped step copies bits, never values.
template <typename T> struct BitsOf { using type = uint32_t; };
template <> struct BitsOf<double> { using type = uint64_t; };
template <> struct BitsOf<__half> { using type = uint16_t; };
template <> struct BitsOf<__nv_bfloat16> { using type = uint16_t; };

// found_inf: nullptr (never skip) or one float32 on the device, read once by each thread of the
// block (one broadcast load per warp); nonzero (NaN included) skips the step.
__device__ __forceinline__ bool skipped(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// x * c rounded on its own (never fused into a following add), so that grad_coef*g is exactly the
// pre-scaled gradient and grad_coef = 1 changes no bit of the update.
__device__ __forceinline__ float mul_rn(float x, float c) { return __fmul_rn(x, c); }
__device__ __forceinline__ double mul_rn(double x, double c) { return __dmul_rn(x, c); }

// A skipped step's chunk: w <- backup bit for bit; zeros <- +0 when set (SGD's init step).
template <typename T>
__device__ __forceinline__ void skip_chunk(T* w_, const T* backup_, T* zeros_, int64_t len) {
  using U = typename BitsOf<T>::type;
  static_assert(sizeof(U) == sizeof(T), "bit type");
  U* w = reinterpret_cast<U*>(w_);
  const U* backup = reinterpret_cast<const U*>(backup_);
  U* zeros = reinterpret_cast<U*>(zeros_);
  const bool vec = aligned16(w) && aligned16(backup) && (!zeros || aligned16(zeros));
  for_chunk<U>(len, vec, [&](auto width, int64_t i) {
    constexpr int K = decltype(width)::value;
    *reinterpret_cast<Pack<U, K>*>(w + i) = *reinterpret_cast<const Pack<U, K>*>(backup + i);
    if (zeros) {
      Pack<U, K> z;
#pragma unroll
      for (int k = 0; k < K; ++k) z.v[k] = U(0);
      *reinterpret_cast<Pack<U, K>*>(zeros + i) = z;
    }
  });
}

template <typename T>
struct SgdOp {
  using A = acc_t<T>;
  DevScalar<A> lr, grad_coef;
  const float* found_inf;  // nullptr: never skip
  A momentum, dampening, weight_decay;
  bool nesterov, init;

  __device__ void operator()(const Ptrs<4>& ptrs, int64_t start, int64_t len, int64_t) const {
    T* w = static_cast<T*>(ptrs.ptr[0]) + start;
    const T* backup = static_cast<const T*>(ptrs.ptr[1]) + start;
    const T* g = static_cast<const T*>(ptrs.ptr[2]) + start;
    T* buf = ptrs.ptr[3] ? static_cast<T*>(ptrs.ptr[3]) + start : nullptr;
    if (skipped(found_inf)) {  // uniform over the grid: no divergence
      skip_chunk(w, backup, init ? buf : nullptr, len);
      return;
    }
    const bool vec = aligned16(w) && aligned16(backup) && aligned16(g) && (!buf || aligned16(buf));
    const A step = lr.get(), coef = grad_coef.get();
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A w0[K], d[K];
      load<K>(w0, backup + i);
      load<K>(d, g + i);
#pragma unroll
      for (int k = 0; k < K; ++k) d[k] = mul_rn(d[k], coef) + weight_decay * w0[k];
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

template <typename T, bool Decoupled>
struct AdamWOp {
  using A = acc_t<T>;
  DevScalar<A> lr, grad_coef;
  const float* found_inf;  // nullptr: never skip
  const float* step;       // device step count (this step included), or nullptr: bc1, bc2_sqrt given
  A beta1, beta2, eps, weight_decay, bc1, bc2_sqrt;
  double beta1_d, beta2_d;  // for the bias corrections from a device step

  __device__ void operator()(const Ptrs<5>& ptrs, int64_t start, int64_t len, int64_t) const {
    T* w = static_cast<T*>(ptrs.ptr[0]) + start;
    const T* backup = static_cast<const T*>(ptrs.ptr[1]) + start;
    const T* g = static_cast<const T*>(ptrs.ptr[2]) + start;
    T* m = static_cast<T*>(ptrs.ptr[3]) + start;
    T* v = static_cast<T*>(ptrs.ptr[4]) + start;
    if (skipped(found_inf)) {  // uniform over the grid: no divergence
      skip_chunk<T>(w, backup, nullptr, len);
      return;
    }
    const bool vec = aligned16(w) && aligned16(backup) && aligned16(g) && aligned16(m) && aligned16(v);
    A c1 = bc1, c2_sqrt = bc2_sqrt;
    if (step) {  // in double, then rounded to opmath: the same values as the host path
      const double t = static_cast<double>(*step);
      c1 = static_cast<A>(1.0 - pow(beta1_d, t));
      c2_sqrt = static_cast<A>(sqrt(1.0 - pow(beta2_d, t)));
    }
    const A a = lr.get(), coef = grad_coef.get();
    const A decay = A(1) - a * weight_decay, step_size = a / c1, wgt = A(1) - beta1;
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A w0[K], gv[K], mv[K], vv[K];
      load<K>(w0, backup + i);
      load<K>(gv, g + i);
      load<K>(mv, m + i);
      load<K>(vv, v + i);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        gv[k] = mul_rn(gv[k], coef);
        if (!Decoupled) gv[k] = gv[k] + weight_decay * w0[k];  // torch.optim.Adam's L2 decay
        // torch's lerp: start + weight*(end - start) for weight < 0.5, else end - (end - start)*(1 - weight)
        mv[k] = wgt < A(0.5) ? mv[k] + wgt * (gv[k] - mv[k]) : gv[k] - (gv[k] - mv[k]) * beta1;
        vv[k] = beta2 * vv[k] + (A(1) - beta2) * gv[k] * gv[k];
      }
      store<K>(m + i, mv);
      store<K>(v + i, vv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const A mr = to_acc(from_acc<T>(mv[k])), vr = to_acc(from_acc<T>(vv[k]));
        const A u = step_size * (mr / (sqrt(vr) / c2_sqrt + eps));
        w0[k] = Decoupled ? w0[k] * decay - u : w0[k] - u;
      }
      store<K>(w + i, w0);
    });
  }
};

template <typename T>
struct RmspropOp {
  using A = acc_t<T>;
  DevScalar<A> lr, grad_coef;
  const float* found_inf;  // nullptr: never skip
  A alpha, eps, weight_decay, momentum;

  __device__ void operator()(const Ptrs<5>& ptrs, int64_t start, int64_t len, int64_t) const {
    T* w = static_cast<T*>(ptrs.ptr[0]) + start;
    const T* backup = static_cast<const T*>(ptrs.ptr[1]) + start;
    const T* g = static_cast<const T*>(ptrs.ptr[2]) + start;
    T* v = static_cast<T*>(ptrs.ptr[3]) + start;
    T* buf = ptrs.ptr[4] ? static_cast<T*>(ptrs.ptr[4]) + start : nullptr;
    if (skipped(found_inf)) {  // uniform over the grid: no divergence
      skip_chunk<T>(w, backup, nullptr, len);
      return;
    }
    const bool vec = aligned16(w) && aligned16(backup) && aligned16(g) && aligned16(v) && (!buf || aligned16(buf));
    const A a = lr.get(), coef = grad_coef.get(), wv = A(1) - alpha;
    for_chunk<T>(len, vec, [&](auto width, int64_t i) {
      constexpr int K = decltype(width)::value;
      A w0[K], gv[K], vv[K];
      load<K>(w0, backup + i);
      load<K>(gv, g + i);
      load<K>(vv, v + i);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        gv[k] = mul_rn(gv[k], coef) + weight_decay * w0[k];
        vv[k] = vv[k] * alpha + wv * gv[k] * gv[k];  // torch's mul_(alpha).addcmul_(g, g, value=1-alpha)
      }
      store<K>(v + i, vv);
#pragma unroll
      for (int k = 0; k < K; ++k) gv[k] = gv[k] / (sqrt(to_acc(from_acc<T>(vv[k]))) + eps);  // the stored v
      if (buf) {
        A b[K];
        load<K>(b, buf + i);
#pragma unroll
        for (int k = 0; k < K; ++k) b[k] = momentum * b[k] + gv[k];
        store<K>(buf + i, b);
#pragma unroll
        for (int k = 0; k < K; ++k) gv[k] = to_acc(from_acc<T>(b[k]));  // the stored buffer, as torch uses it
      }
#pragma unroll
      for (int k = 0; k < K; ++k) w0[k] -= a * gv[k];
      store<K>(w + i, w0);
    });
  }
};

}  // namespace

cudaError_t restore_sgd(DType dt, const Lists& lists, Scalar lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool init_momentum, Scalar grad_coef,
                        const float* found_inf, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    const SgdOp<T> op{dev_scalar<A>(lr),         dev_scalar<A>(grad_coef),   found_inf,
                      static_cast<A>(momentum),  static_cast<A>(dampening),  static_cast<A>(weight_decay),
                      nesterov,                  init_momentum};
    return multi_tensor_apply<4>(lists, op, stream);
  });
}

cudaError_t restore_adamw(DType dt, const Lists& lists, Scalar lr, double beta1, double beta2, double eps,
                          double weight_decay, const float* step, double bc1, double bc2_sqrt, Scalar grad_coef,
                          const float* found_inf, bool decoupled, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    auto run = [&](auto op) { return multi_tensor_apply<5>(lists, op, stream); };
    if (decoupled)
      return run(AdamWOp<T, true>{dev_scalar<A>(lr), dev_scalar<A>(grad_coef), found_inf, step, static_cast<A>(beta1),
                                  static_cast<A>(beta2), static_cast<A>(eps), static_cast<A>(weight_decay),
                                  static_cast<A>(bc1), static_cast<A>(bc2_sqrt), beta1, beta2});
    return run(AdamWOp<T, false>{dev_scalar<A>(lr), dev_scalar<A>(grad_coef), found_inf, step, static_cast<A>(beta1),
                                 static_cast<A>(beta2), static_cast<A>(eps), static_cast<A>(weight_decay),
                                 static_cast<A>(bc1), static_cast<A>(bc2_sqrt), beta1, beta2});
  });
}

cudaError_t restore_rmsprop(DType dt, const Lists& lists, Scalar lr, double alpha, double eps, double weight_decay,
                            double momentum, Scalar grad_coef, const float* found_inf, cudaStream_t stream) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    const RmspropOp<T> op{dev_scalar<A>(lr),     dev_scalar<A>(grad_coef),     found_inf,
                          static_cast<A>(alpha), static_cast<A>(eps),          static_cast<A>(weight_decay),
                          static_cast<A>(momentum)};
    return multi_tensor_apply<5>(lists, op, stream);
  });
}

}  // namespace sharpfused
