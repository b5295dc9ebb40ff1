// Launchers of sharpfused's CUDA kernels: plain C++ (no torch types), one per primitive.
//
// The binding (bindings.cpp) validates tensors, allocates outputs and scratch, and calls these
// with raw device addresses on the current stream. Every launcher returns the first CUDA error
// it saw (cudaSuccess otherwise); it checks each launch with cudaGetLastError.
//
// Conventions:
//  * A "list" is n device addresses of contiguous tensors of one dtype, parallel to `numel`.
//    Lists of one call are parallel: tensor i of every list has numel[i] elements.
//  * Math is done in opmath: float for fp32/bf16/fp16, double for fp64. `acc` below means
//    a device buffer of that opmath type.
//  * A Scalar is read from device memory when `ptr` is set (a 1-element opmath buffer, so that
//    a step can be captured in a CUDA graph with per-step values), else `value` is used.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sharpfused {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct Scalar {
  const void* ptr;  // device address of one opmath value, or nullptr
  double value;     // used when ptr is nullptr
};

struct Lists {
  int64_t n;               // tensors per list
  const int64_t* numel;    // host array of n sizes
  void* const* ptr[5];     // up to 5 host arrays of n device addresses (unused lists: nullptr)
};

// Elements of one chunk (the work of one block at a time); a tensor is cut into ceil(numel / kChunk) chunks.
constexpr int64_t kChunk = 65536;

// Number of chunks of all tensors (= partial sums a reduction writes).
inline int64_t num_chunks(const int64_t* numel, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += (numel[i] + kChunk - 1) / kChunk;
  return c;
}

// sum_i sum((T_i * x_i)^2), T = |w| + eta when lists.ptr[1] (weights) is set, else 1.
// partials: acc[num_chunks]; per_tensor: acc[n]; total: acc[1]. lists: x, w (optional).
cudaError_t sq_norm(DType dt, const Lists& lists, Scalar eta, void* partials, void* per_tensor, void* total,
                    cudaStream_t stream);

// backup <- w (lists.ptr[2], optional); w <- w + scale * T^2 * g [* mask (lists.ptr[3], optional)],
// T = |w| + eta when has_eta, else 1. lists: w, g, backup, mask. The mask is in dtype `dt`, or
// one byte per element when byte_mask (uint8 or bool, a byte's value as the factor).
// norm_sq (ptr optional, a device opmath value): the scale becomes scale * inv with
// inv = 1 / (sqrt(norm_sq) + norm_eps), each operation correctly rounded, and 0 when inv is NaN.
cudaError_t perturb(DType dt, const Lists& lists, Scalar scale, bool has_eta, Scalar eta, bool byte_mask,
                    Scalar norm_sq, double norm_eps, cudaStream_t stream);

// w <- backup, bit-exact. lists: w, backup.
cudaError_t restore(DType dt, const Lists& lists, cudaStream_t stream);

// out = (<a,b>, |a|^2, |b|^2). partials: acc[3 * num_chunks]; out: acc[3]. lists: a, b.
cudaError_t dot_norms(DType dt, const Lists& lists, void* partials, void* out, cudaStream_t stream);

// g <- c1 * g + c2 * saved. lists: g, saved.
cudaError_t combine(DType dt, const Lists& lists, Scalar c1, Scalar c2, cudaStream_t stream);

// Fused base steps: the gradient is multiplied by grad_coef first (unscale, clipping; value 1
// when not given). found_inf is nullptr or the device address of one float32: nonzero skips the
// step on the device -- w <- backup bit for bit, nothing else read or written (except SGD's
// momentum buffer on an init step, which becomes zeros).

// torch.optim.SGD's step at the restored weights; lists: w, backup, g, momentum_buffer (optional).
cudaError_t restore_sgd(DType dt, const Lists& lists, Scalar lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool init_momentum, Scalar grad_coef,
                        const float* found_inf, cudaStream_t stream);

// torch.optim.AdamW's step (decoupled) or torch.optim.Adam's (L2 decay: g' = g + wd*w0) at the
// restored weights; lists: w, backup, g, exp_avg, exp_avg_sq.
// step: nullptr, and bc1 = 1 - beta1^t, bc2_sqrt = sqrt(1 - beta2^t) computed by the caller from
// the host step count; or the device address of one float32 step count t (this step included),
// and the kernel computes bc1, bc2_sqrt from it in double (bc1, bc2_sqrt unused).
cudaError_t restore_adamw(DType dt, const Lists& lists, Scalar lr, double beta1, double beta2, double eps,
                          double weight_decay, const float* step, double bc1, double bc2_sqrt, Scalar grad_coef,
                          const float* found_inf, bool decoupled, cudaStream_t stream);

// torch.optim.RMSprop's step (not centered) at the restored weights; lists: w, backup, g,
// square_avg, momentum_buffer (only with momentum > 0).
cudaError_t restore_rmsprop(DType dt, const Lists& lists, Scalar lr, double alpha, double eps, double weight_decay,
                            double momentum, Scalar grad_coef, const float* found_inf, cudaStream_t stream);

// Whether the current device takes the large (32 KB) multi-tensor tables: built with CUDA >= 12.1,
// driver >= 12.1 (r530), compute capability >= 7.0 (multi_tensor.cuh). Host queries only.
bool large_kernel_params();

}  // namespace sharpfused
