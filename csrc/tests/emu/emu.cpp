// The CUDA emulator's runtime: fibers for the threads of a block, barriers, warp shuffles,
// launch checks and the last-error state. See emu.h.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <numeric>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (plus one guard page)

enum class State { kReady, kWaiting, kDone };

struct Barrier {
  unsigned expected = 0, arrived = 0, gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // bottom of the usable stack (above the guard page)
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  State state = State::kDone;
  Barrier* wait = nullptr;  // the barrier it waits at, and its generation then
  unsigned wait_gen = 0;
  const char* wait_what = nullptr;
  unsigned shfl_calls = 0;  // parity picks one of the warp's two exchange buffers
};

struct Warp {
  Barrier bar;
  unsigned lanes = 0;
  alignas(8) unsigned char buf[2][32][8];
};

struct Runtime {
  std::deque<Fiber> fibers;  // grows to the largest block seen; stacks are reused. A deque: a
                             // ucontext_t points into itself and must not move
  std::vector<Warp> warps;
  Barrier block_bar;
  ucontext_t sched;
  int cur = -1;  // running fiber, -1 outside a kernel
  bool in_grid = false;
  void (*thunk)(void*) = nullptr;
  void* ctx = nullptr;
  cudaError_t last_error = cudaSuccess;
  Schedule schedule = Schedule::kAscending;
  std::mt19937_64 rng;
  std::vector<unsigned> order;  // schedule: thread numbers in the order they are started / resumed
  size_t pos = 0;                // position of the running thread in `order`
  unsigned left = 0;             // threads of the block not finished yet
  unsigned block_threads = 0;
  Stats stats;
  int driver_version = 12080, cc_major = 9;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

[[noreturn]] void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "emu: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::abort();
}

Fiber& current(const char* what) {
  Runtime& r = rt();
  if (r.cur < 0) fail("%s called outside a kernel", what);
  return r.fibers[r.cur];
}

void grow(unsigned n) {
  Runtime& r = rt();
  const long page = sysconf(_SC_PAGESIZE);
  while (r.fibers.size() < n) {
    r.fibers.emplace_back();
    Fiber& f = r.fibers.back();
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fail("cannot map a thread stack");
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    f.stack = static_cast<char*>(mem) + page;
    if (getcontext(&f.ctx) != 0) fail("getcontext failed");
  }
}

[[noreturn]] void deadlock(unsigned n) {
  Runtime& r = rt();
  unsigned at_block = 0, at_warp = 0, done = 0;
  const char* warp_what = "";
  for (unsigned i = 0; i < n; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == State::kDone) {
      ++done;
    } else if (f.wait == &r.block_bar) {
      ++at_block;
    } else {
      ++at_warp;
      warp_what = f.wait_what;
    }
  }
  fail("deadlock in block (%u,%u,%u) of %u threads: %u wait at __syncthreads, %u at %s, %u have exited "
       "(a barrier or warp shuffle that not every thread reaches)",
       blockIdx.x, blockIdx.y, blockIdx.z, n, at_block, at_warp, at_warp ? warp_what : "a warp barrier", done);
}

// The next thread to run after the current position of the schedule (cyclically), made current;
// nullptr when none can run.
Fiber* pick_next() {
  Runtime& r = rt();
  const size_t n = r.order.size();
  for (size_t k = 1; k <= n; ++k) {
    const size_t p = (r.pos + k) % n;
    Fiber& f = r.fibers[r.order[p]];
    if (f.state == State::kDone) continue;
    if (f.state == State::kWaiting) {
      if (f.wait->gen == f.wait_gen) continue;  // its barrier has not completed yet
      f.state = State::kReady;
      f.wait = nullptr;
    }
    r.pos = p;
    r.cur = static_cast<int>(r.order[p]);
    threadIdx = f.tid;
    return &f;
  }
  return nullptr;
}

void fiber_entry() {
  Runtime& r = rt();
  r.thunk(r.ctx);
  r.fibers[r.cur].state = State::kDone;
  if (--r.left == 0) return;  // the block is done: uc_link, the launcher
  Fiber* next = pick_next();
  if (next == nullptr) deadlock(r.block_threads);
  setcontext(&next->ctx);
}

void wait_at(Barrier& b, const char* what) {
  Runtime& r = rt();
  Fiber& f = current(what);
  if (++b.arrived == b.expected) {  // the last one in releases the others and goes on
    b.arrived = 0;
    ++b.gen;
    ++r.stats.barriers;
    return;
  }
  f.state = State::kWaiting;
  f.wait = &b;
  f.wait_gen = b.gen;
  f.wait_what = what;
  Fiber* next = pick_next();  // straight to the next thread, no detour through the launcher
  if (next == nullptr) deadlock(r.block_threads);
  swapcontext(&f.ctx, &next->ctx);
}

void run_block(unsigned n) {
  Runtime& r = rt();
  grow(n);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(f.stack, kStackBytes);  // a reused stack: forget the last block's frames
#endif
    makecontext(&f.ctx, fiber_entry, 0);
    f.linear = i;
    f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.state = State::kReady;
    f.wait = nullptr;
    f.shfl_calls = 0;
  }
  const unsigned nwarps = (n + 31) / 32;
  r.warps.resize(std::max<size_t>(r.warps.size(), nwarps));
  for (unsigned w = 0; w < nwarps; ++w) {
    r.warps[w].lanes = std::min(32u, n - 32 * w);
    r.warps[w].bar.expected = r.warps[w].lanes;
    r.warps[w].bar.arrived = 0;
  }
  r.block_bar.expected = n;
  r.block_bar.arrived = 0;

  r.order.resize(n);
  std::iota(r.order.begin(), r.order.end(), 0u);
  if (r.schedule == Schedule::kDescending) std::reverse(r.order.begin(), r.order.end());
  if (r.schedule == Schedule::kShuffled) std::shuffle(r.order.begin(), r.order.end(), r.rng);

  r.left = n;
  r.block_threads = n;
  r.pos = n - 1;  // pick_next starts at order[0]
  Fiber* first = pick_next();
  swapcontext(&r.sched, &first->ctx);  // back here when the last thread has finished
  r.cur = -1;
}

}  // namespace

void set_schedule(Schedule s, uint64_t seed) {
  rt().schedule = s;
  rt().rng.seed(seed);
}

Stats stats() { return rt().stats; }

void set_device(int driver_version, int cc_major) {
  rt().driver_version = driver_version;
  rt().cc_major = cc_major;
}

bool large_params() { return rt().driver_version >= 12010 && rt().cc_major >= 7; }

void refuse_launch(cudaError_t err) { rt().last_error = err; }

void syncthreads() { wait_at(rt().block_bar, "__syncthreads"); }

void syncwarp(unsigned mask) {
  Runtime& r = rt();
  Fiber& f = current("__syncwarp");
  Warp& w = r.warps[f.linear / 32];
  const unsigned full = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1u;
  if (mask != full) fail("__syncwarp with mask %#x: only the full warp (%#x) is emulated", mask, full);
  wait_at(w.bar, "__syncwarp");
}

void shfl(unsigned mask, const void* in, void* out, unsigned size, Shfl kind, int arg, int width) {
  Runtime& r = rt();
  Fiber& f = current("a warp shuffle");
  Warp& w = r.warps[f.linear / 32];
  const unsigned full = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1u;
  if (mask != full) fail("warp shuffle with mask %#x: only the full warp (%#x) is emulated", mask, full);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("warp shuffle with width %d", width);
  const int lane = static_cast<int>(f.linear % 32);
  const unsigned p = f.shfl_calls++ & 1u;  // two buffers: a lane may write the next one before all read this one
  std::memcpy(w.buf[p][lane], in, size);
  wait_at(w.bar, "a warp shuffle");
  const int seg = lane & ~(width - 1);  // first lane of this lane's width-segment
  int src = lane;
  switch (kind) {
    case Shfl::kIdx: src = seg + (arg & (width - 1)); break;
    case Shfl::kUp: src = lane - arg >= seg ? lane - arg : lane; break;
    case Shfl::kDown: src = lane + arg < seg + width ? lane + arg : lane; break;
    case Shfl::kXor: src = (lane ^ arg) < seg + width ? (lane ^ arg) : lane; break;
  }
  if (src < 0 || src >= static_cast<int>(w.lanes)) src = lane;  // no such lane (a partial warp)
  std::memcpy(out, w.buf[p][src], size);
}

void run_grid(const Launch& cfg, void (*thunk)(void*), void* ctx) {
  Runtime& r = rt();
  if (r.in_grid) fail("a kernel launch from inside a kernel is not emulated");
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 || b.x == 0 || b.y == 0 ||
      b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024 || cfg.smem != 0) {
    // (dynamic shared memory is not emulated: refused like an invalid configuration)
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  r.in_grid = true;
  r.thunk = thunk;
  r.ctx = ctx;
  gridDim = g;
  blockDim = b;
  ++r.stats.launches;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(static_cast<unsigned>(threads));
        ++r.stats.blocks;
      }
  r.in_grid = false;
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::rt().last_error;
  emu::rt().last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::rt().last_error; }

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = emu::rt().driver_version;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = emu::rt().cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
