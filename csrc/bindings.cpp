// sharpfused._C: the torch binding of the CUDA launchers declared in sharpfused.h.
//
// Each function checks its tensors (CUDA, one device, one dtype, contiguous, parallel sizes),
// allocates outputs and reduction scratch with the caching allocator, and launches on the
// current stream of the tensors' device. Nothing here synchronizes with the host, so the
// calls can be captured in a CUDA graph. Per-step scalars come either as a 1-element opmath
// tensor on the device (read by the kernel) or as a Python number (passed by value).
#include <optional>
#include <string>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "sharpfused.h"

namespace {

using TensorList = std::vector<at::Tensor>;
using OptList = std::optional<TensorList>;
using OptTensor = std::optional<at::Tensor>;

sharpfused::DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return sharpfused::DType::kFloat32;
    case at::kHalf: return sharpfused::DType::kFloat16;
    case at::kBFloat16: return sharpfused::DType::kBFloat16;
    case at::kDouble: return sharpfused::DType::kFloat64;
    default: TORCH_CHECK(false, "sharpfused._C supports float32, float16, bfloat16 and float64, got ", st);
  }
}

at::ScalarType opmath(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Parallel lists, checked, as the raw view the launchers take.
struct Packed {
  std::vector<int64_t> numel;
  std::vector<void*> ptrs[5];
  sharpfused::Lists lists{};
  at::ScalarType dtype;
  at::Device device{at::kCUDA};

  bool byte_list = false;  // the list numbered `bytes` holds uint8/bool tensors (see the constructor)

  // `bytes`: the number of a list whose tensors may instead be uint8 or bool, all of them (one
  // byte per element; -1: none); byte_list tells whether it was.
  Packed(const char* op, std::initializer_list<const TensorList*> ls, int bytes = -1) {
    const TensorList& first = **ls.begin();
    TORCH_CHECK(!first.empty(), op, ": takes a non-empty list of tensors");
    TORCH_CHECK(ls.size() <= 5, op, ": at most 5 lists");
    dtype = first[0].scalar_type();
    device = first[0].device();
    TORCH_CHECK(device.is_cuda(), op, ": tensors must be on a CUDA device, got ", device);
    to_dtype(dtype);
    const int64_t n = static_cast<int64_t>(first.size());
    for (const at::Tensor& t : first) numel.push_back(t.numel());
    int d = 0;
    for (const TensorList* l : ls) {
      if (l != nullptr) {
        TORCH_CHECK(static_cast<int64_t>(l->size()) == n, op, ": list ", d, " has ", l->size(), " tensors, expected ", n);
        at::ScalarType want = dtype;
        if (d == bytes && n > 0 && ((*l)[0].scalar_type() == at::kByte || (*l)[0].scalar_type() == at::kBool)) {
          want = (*l)[0].scalar_type();
          byte_list = true;
        }
        for (int64_t i = 0; i < n; ++i) {
          const at::Tensor& t = (*l)[i];
          TORCH_CHECK(t.device() == device, op, ": list ", d, " tensor ", i, " is on ", t.device(), ", expected ",
                      device);
          TORCH_CHECK(t.scalar_type() == want, op, ": list ", d, " tensor ", i, " has dtype ", t.scalar_type(),
                      ", expected ", want);
          TORCH_CHECK(t.is_contiguous(), op, ": list ", d, " tensor ", i, " is not contiguous");
          TORCH_CHECK(t.numel() == numel[i], op, ": list ", d, " tensor ", i, " has ", t.numel(),
                      " elements, expected ", numel[i]);
          ptrs[d].push_back(t.data_ptr());
        }
        lists.ptr[d] = ptrs[d].data();
      }
      ++d;
    }
    lists.n = n;
    lists.numel = numel.data();
  }

  at::TensorOptions acc_options() const { return at::TensorOptions().dtype(opmath(dtype)).device(device); }

  sharpfused::Scalar scalar(const char* op, const OptTensor& t, double value) const {
    if (!t.has_value()) return {nullptr, value};
    TORCH_CHECK(t->numel() == 1 && t->device() == device && t->scalar_type() == opmath(dtype), op,
                ": a tensor scalar must have 1 element of dtype ", opmath(dtype), " on ", device, ", got ",
                t->numel(), " of ", t->scalar_type(), " on ", t->device());
    return {t->data_ptr(), value};
  }

  // A flag or count read by the kernel: one float32 on the tensors' device, or nullptr.
  const float* device_f32(const char* op, const char* what, const OptTensor& t) const {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->numel() == 1 && t->device() == device && t->scalar_type() == at::kFloat, op, ": ", what,
                " must be 1 float32 element on ", device, ", got ", t->numel(), " of ", t->scalar_type(), " on ",
                t->device());
    return t->data_ptr<float>();
  }
};

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "sharpfused._C.", op, ": CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::vector<at::Tensor> sq_norm(const TensorList& xs, const OptList& weights, const OptTensor& eta,
                                double eta_value) {
  Packed p("sq_norm", {&xs, weights ? &*weights : nullptr});
  const c10::cuda::CUDAGuard guard(p.device);
  at::Tensor partials = at::empty({std::max<int64_t>(1, sharpfused::num_chunks(p.lists.numel, p.lists.n))},
                                  p.acc_options());
  at::Tensor per = at::empty({p.lists.n}, p.acc_options());
  at::Tensor total = at::empty({}, p.acc_options());
  check(sharpfused::sq_norm(to_dtype(p.dtype), p.lists, p.scalar("sq_norm", eta, eta_value), partials.data_ptr(), per.data_ptr(), total.data_ptr(),
                            stream()),
        "sq_norm");
  return {total, per};
}

void perturb_(const TensorList& params, const TensorList& grads, const OptList& backup, const OptTensor& scale,
              double scale_value, bool has_eta, const OptTensor& eta, double eta_value, const OptList& mask,
              const OptTensor& norm_sq, double norm_eps) {
  // the mask: in the parameter dtype, or all uint8 / all bool (read as bytes)
  Packed p("perturb_", {&params, &grads, backup ? &*backup : nullptr, mask ? &*mask : nullptr}, 3);
  const c10::cuda::CUDAGuard guard(p.device);
  check(sharpfused::perturb(to_dtype(p.dtype), p.lists, p.scalar("perturb_", scale, scale_value), has_eta,
                            p.scalar("perturb_", eta, eta_value), p.byte_list,
                            p.scalar("perturb_", norm_sq, 0.0), norm_eps, stream()),
        "perturb_");
}

void restore_(const TensorList& params, const TensorList& backup) {
  Packed p("restore_", {&params, &backup});
  const c10::cuda::CUDAGuard guard(p.device);
  check(sharpfused::restore(to_dtype(p.dtype), p.lists, stream()), "restore_");
}

at::Tensor dot_norms(const TensorList& a, const TensorList& b) {
  Packed p("dot_norms", {&a, &b});
  const c10::cuda::CUDAGuard guard(p.device);
  at::Tensor partials =
      at::empty({3 * std::max<int64_t>(1, sharpfused::num_chunks(p.lists.numel, p.lists.n))}, p.acc_options());
  at::Tensor out = at::empty({3}, p.acc_options());
  check(sharpfused::dot_norms(to_dtype(p.dtype), p.lists, partials.data_ptr(), out.data_ptr(), stream()),
        "dot_norms");
  return out;
}

void combine_(const TensorList& g, const TensorList& saved, const OptTensor& c1, double c1_value, const OptTensor& c2,
              double c2_value) {
  Packed p("combine_", {&g, &saved});
  const c10::cuda::CUDAGuard guard(p.device);
  check(sharpfused::combine(to_dtype(p.dtype), p.lists, p.scalar("combine_", c1, c1_value),
                            p.scalar("combine_", c2, c2_value), stream()),
        "combine_");
}

void restore_sgd_(const TensorList& params, const TensorList& backup, const TensorList& grads,
                  const OptList& momentum_buffers, const OptTensor& lr, double lr_value, double momentum,
                  double dampening, double weight_decay, bool nesterov, bool init_momentum, const OptTensor& grad_coef,
                  double grad_coef_value, const OptTensor& found_inf) {
  TORCH_CHECK(momentum == 0.0 || momentum_buffers.has_value(), "restore_sgd_: momentum needs momentum_buffers");
  Packed p("restore_sgd_", {&params, &backup, &grads, momentum != 0.0 ? &*momentum_buffers : nullptr});
  const c10::cuda::CUDAGuard guard(p.device);
  check(sharpfused::restore_sgd(to_dtype(p.dtype), p.lists, p.scalar("restore_sgd_", lr, lr_value), momentum,
                                dampening, weight_decay, nesterov, init_momentum,
                                p.scalar("restore_sgd_", grad_coef, grad_coef_value),
                                p.device_f32("restore_sgd_", "found_inf", found_inf), stream()),
        "restore_sgd_");
}

void restore_adamw_(const TensorList& params, const TensorList& backup, const TensorList& grads,
                    const TensorList& exp_avgs, const TensorList& exp_avg_sqs, const OptTensor& lr, double lr_value,
                    double beta1, double beta2, double eps, double weight_decay, const OptTensor& step, double bc1,
                    double bc2_sqrt, const OptTensor& grad_coef, double grad_coef_value, const OptTensor& found_inf,
                    bool decoupled) {
  Packed p("restore_adamw_", {&params, &backup, &grads, &exp_avgs, &exp_avg_sqs});
  const c10::cuda::CUDAGuard guard(p.device);
  check(sharpfused::restore_adamw(to_dtype(p.dtype), p.lists, p.scalar("restore_adamw_", lr, lr_value), beta1,
                                  beta2, eps, weight_decay, p.device_f32("restore_adamw_", "step", step), bc1,
                                  bc2_sqrt, p.scalar("restore_adamw_", grad_coef, grad_coef_value),
                                  p.device_f32("restore_adamw_", "found_inf", found_inf), decoupled, stream()),
        "restore_adamw_");
}

void restore_rmsprop_(const TensorList& params, const TensorList& backup, const TensorList& grads,
                      const TensorList& square_avgs, const OptList& momentum_buffers, const OptTensor& lr,
                      double lr_value, double alpha, double eps, double weight_decay, double momentum,
                      const OptTensor& grad_coef, double grad_coef_value, const OptTensor& found_inf) {
  TORCH_CHECK(momentum <= 0.0 || momentum_buffers.has_value(), "restore_rmsprop_: momentum needs momentum_buffers");
  Packed p("restore_rmsprop_",
           {&params, &backup, &grads, &square_avgs, momentum > 0.0 ? &*momentum_buffers : nullptr});
  const c10::cuda::CUDAGuard guard(p.device);
  check(sharpfused::restore_rmsprop(to_dtype(p.dtype), p.lists, p.scalar("restore_rmsprop_", lr, lr_value), alpha, eps,
                                    weight_decay, momentum, p.scalar("restore_rmsprop_", grad_coef, grad_coef_value),
                                    p.device_f32("restore_rmsprop_", "found_inf", found_inf), stream()),
        "restore_rmsprop_");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sharpfused CUDA kernels (multi-tensor apply); use through sharpfused.ops with backend='cuda'";
  m.attr("CHUNK") = sharpfused::kChunk;
  m.def("large_kernel_params", &sharpfused::large_kernel_params,
        "whether the current device takes the 32 KB multi-tensor tables (CUDA >= 12.1 driver, Volta+)");
  m.def("sq_norm", &sq_norm, "(total, per_tensor) squared norms of (|w|+eta)*x or x", py::arg("xs"),
        py::arg("weights"), py::arg("eta"), py::arg("eta_value"));
  m.def("perturb_", &perturb_, "backup <- w; w <- w + scale*T^2*g[*mask]; mask in the dtype, uint8 or bool", py::arg("params"), py::arg("grads"),
        py::arg("backup"), py::arg("scale"), py::arg("scale_value"), py::arg("has_eta"), py::arg("eta"),
        py::arg("eta_value"), py::arg("mask"), py::arg("norm_sq"), py::arg("norm_eps"));
  m.def("restore_", &restore_, "w <- backup, bit-exact", py::arg("params"), py::arg("backup"));
  m.def("dot_norms", &dot_norms, "(<a,b>, |a|^2, |b|^2)", py::arg("a"), py::arg("b"));
  m.def("combine_", &combine_, "g <- c1*g + c2*saved", py::arg("g"), py::arg("saved"), py::arg("c1"),
        py::arg("c1_value"), py::arg("c2"), py::arg("c2_value"));
  m.def("restore_sgd_", &restore_sgd_,
        "w <- backup - lr*SGD(grad_coef*g); w <- backup bit-exactly when found_inf != 0", py::arg("params"),
        py::arg("backup"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("lr"), py::arg("lr_value"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("init_momentum"),
        py::arg("grad_coef"), py::arg("grad_coef_value"), py::arg("found_inf"));
  m.def("restore_adamw_", &restore_adamw_,
        "w <- AdamW(backup, grad_coef*g), moments updated; w <- backup bit-exactly when found_inf != 0",
        py::arg("params"), py::arg("backup"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("lr"),
        py::arg("lr_value"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("step"), py::arg("bc1"), py::arg("bc2_sqrt"), py::arg("grad_coef"), py::arg("grad_coef_value"),
        py::arg("found_inf"), py::arg("decoupled"));
  m.def("restore_rmsprop_", &restore_rmsprop_,
        "w <- RMSprop(backup, grad_coef*g), square_avg (and momentum buffer) updated; w <- backup bit-exactly when "
        "found_inf != 0",
        py::arg("params"), py::arg("backup"), py::arg("grads"), py::arg("square_avgs"), py::arg("momentum_buffers"),
        py::arg("lr"), py::arg("lr_value"), py::arg("alpha"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("momentum"), py::arg("grad_coef"), py::arg("grad_coef_value"), py::arg("found_inf"));
}
