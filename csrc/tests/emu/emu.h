// A small CUDA emulator: runs the kernels of csrc/*.cu as host C++, so CI without a GPU can
// execute the real kernel code (csrc/tests/kernels_emu_test.cpp checks every launcher).
//
// How it works
//  * The headers of this folder stand in for cuda_runtime.h, cuda_runtime_api.h, cuda_fp16.h and
//    cuda_bf16.h (put this folder first on the include path). __global__, __device__, __host__,
//    __forceinline__, __launch_bounds__(n), __grid_constant__ are no-ops (inline), __shared__ is
//    `static`: blocks run one after another, so one copy per instantiation is the block's shared
//    memory. "Device" memory is host memory; a launch is synchronous.
//  * Each thread of a block is a fiber (ucontext) with its own stack; the fibers of a block run on
//    the calling host thread, one at a time, each until it finishes or waits at a barrier. So
//    __syncthreads() is a real barrier over the block's threads, and __shfl_*_sync is a real
//    exchange: the 32 lanes of a warp write their value to a buffer, meet at a warp barrier, and
//    read their source lane's slot. A barrier that not every thread of the block (or of the warp)
//    reaches -- a divergent __syncthreads or shuffle -- is a deadlock: the emulator names it and
//    aborts. The order in which the fibers of a block are started and resumed can be ascending,
//    descending or shuffled (set_schedule): a kernel whose result depends on it has a race.
//  * The launch syntax `kernel<<<grid, block, smem, stream>>>(args)` is not C++. The test build
//    (csrc/tests/emu/build.sh) copies the sources and rewrites it textually, with sed:
//        `<<<`   ->  ` | ::emu::Launch(`
//        `>>>(`  ->  `) | ::emu::args(`
//    giving `kernel | ::emu::Launch(grid, block, smem, stream) | ::emu::args(args)`: the first `|`
//    binds the kernel (a function pointer) to its configuration, the second converts the arguments
//    to the kernel's parameter types once (as the runtime copies them into the parameter buffer)
//    and runs the grid. No other text of the sources changes.
//  * An invalid configuration (empty grid, more than 1024 threads, dynamic shared memory) is not
//    run and is reported by the next cudaGetLastError(), as cudaErrorInvalidConfiguration.
//  * Kernel parameters: up to 32764 bytes compile (CUDA >= 12.1); a launch of more than 4096 bytes
//    on an emulated driver or device that does not take them (emu::set_device: driver < 12.1 or
//    compute capability < 7) is not run and reported as cudaErrorInvalidValue.
//  * build.sh also rewrites a `const __grid_constant__ T name` parameter to `const T& name`: a
//    grid-constant parameter is read-only and one copy serves the whole grid (its address is the
//    same in every thread), which a reference to the launch's one copy is; it spares copying a
//    table of up to 32 KB into every emulated thread.
//
//  * The test build adds -fsanitize=alignment: a 16-byte Pack access at an address that is not
//    16-byte aligned (which faults on the GPU) stops the run with the source line.
//
// What it cannot check: real memory ordering and visibility between threads (fibers switch only
// at barriers, so a missing __syncthreads shows up only when the schedule exposes it), real 16-byte
// vector loads and stores (here plain host struct copies), uninitialized shared memory (it starts
// zeroed), nvcc's floating-point contraction (a*b+c becomes one fma on the GPU; the test build uses
// -ffp-contract=off, so each operation is rounded on its own), the device libm's last-ulp
// differences (pow in double), occupancy, register pressure and speed.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"
#include "emu_defs.h"

// CUDA's math functions are overloaded for float in the global namespace (fabs(float) is float).
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::log;
using std::pow;
using std::sqrt;

// Built-in variables. The scheduler sets threadIdx each time it switches to a thread.
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

enum class Schedule { kAscending, kDescending, kShuffled };
// Order in which the threads of each block are started and resumed (shuffled: a fresh random
// permutation per block from `seed`). Ascending by default.
void set_schedule(Schedule s, uint64_t seed = 0);

// The emulated device's driver version (CUDA's encoding: 12010 = 12.1) and compute capability
// major: whether kernels may take more than 4096 bytes of parameters. Default: 12080, 9.
void set_device(int driver_version, int cc_major);
bool large_params();  // driver >= 12.1 and compute capability >= 7

struct Stats {
  uint64_t launches = 0;  // grids run
  uint64_t blocks = 0;    // blocks run
  uint64_t barriers = 0;  // barrier completions (__syncthreads and warp barriers)
};
Stats stats();

// ---- device side (called from inside a kernel)
void syncthreads();
void syncwarp(unsigned mask);
enum class Shfl { kIdx, kUp, kDown, kXor };
void shfl(unsigned mask, const void* in, void* out, unsigned size, Shfl kind, int arg, int width);

template <typename T>
T shfl_t(unsigned mask, T var, Shfl kind, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  T r;
  shfl(mask, &var, &r, sizeof(T), kind, arg, width);
  return r;
}

// ---- launch
struct Launch {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// Runs thunk(ctx) in every thread of every block of cfg (or records a launch error).
void run_grid(const Launch& cfg, void (*thunk)(void*), void* ctx);
// Records a launch error for the next cudaGetLastError (the grid is not run).
void refuse_launch(cudaError_t err);

template <typename... P>
struct Kernel {
  void (*fn)(P...);
  Launch cfg;
};

template <typename... P>
Kernel<P...> operator|(void (*fn)(P...), const Launch& cfg) {
  return Kernel<P...>{fn, cfg};
}

template <typename... A>
struct Args {
  std::tuple<A...> t;
};

template <typename... A>
Args<A&&...> args(A&&... a) {
  return Args<A&&...>{std::tuple<A&&...>(std::forward<A>(a)...)};
}

template <typename... P, typename... A>
void operator|(const Kernel<P...>& k, Args<A...>&& a) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  constexpr std::size_t bytes = (std::size_t{0} + ... + sizeof(P));  // (of a reference: its referee's)
  static_assert(bytes <= 32764, "kernel parameters over the 32764-byte limit of CUDA >= 12.1");
  if (bytes > 4096 && !large_params()) {  // as a driver < r530 or a pre-Volta device refuses it
    refuse_launch(cudaErrorInvalidValue);
    return;
  }
  using Params = std::tuple<std::decay_t<P>...>;
  // converted to the parameter types once; each thread's call copies them (parameters are by value)
  Params params = std::apply([](auto&&... x) { return Params(std::forward<decltype(x)>(x)...); }, std::move(a.t));
  struct Ctx {
    void (*fn)(P...);
    const Params* params;
  } ctx{k.fn, &params};
  run_grid(
      k.cfg, [](void* p) {
        const Ctx* c = static_cast<const Ctx*>(p);
        std::apply(c->fn, *c->params);
      },
      &ctx);
}

}  // namespace emu

// ---- CUDA intrinsics
inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ::emu::shfl_t(mask, var, ::emu::Shfl::kIdx, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::emu::shfl_t(mask, var, ::emu::Shfl::kUp, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::emu::shfl_t(mask, var, ::emu::Shfl::kDown, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ::emu::shfl_t(mask, var, ::emu::Shfl::kXor, lane_mask, width);
}

// Round-to-nearest operations that the GPU never contracts into an fma.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}
