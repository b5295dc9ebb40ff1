// Runs every launcher of sharpfused.h on the host under the CUDA emulator (csrc/tests/emu; built
// and run by .ci/compile_cuda.sh, no GPU needed) and checks the results against a reference
// computed here in long double (at least double) from the same inputs, low-precision inputs
// upcast exactly.
//
// Tolerances: an elementwise result computed from terms of total magnitude M (the same formula
// with every term made nonnegative) may be off by k u M, u the unit roundoff of the opmath type
// (2^-24 for fp32/bf16/fp16, 2^-53 for fp64) and k a bound on the roundings in the formula (4 to
// 12); a bf16/fp16 result is that opmath value rounded to nearest, so it may be off by half an
// ulp of its dtype plus 2 k u M (a truncating conversion fails). A reduction may be off by
// h u sum|terms|, h the height of the summation tree the kernels use (elements per thread, the
// block tree, the cleanup stages): the rigorous bound. The exact rules -- restore, the backup, a
// zero scale or coefficient dropping its term, a skipped step -- are checked bit for bit. Every
// call runs twice (the threads of each block started in ascending, then shuffled order) and must
// give the same bits both times.
//
// Inputs: fresh random data each run (the seed is printed; KERNELS_EMU_SEED=n replays a run); odd
// sizes (1, 3, 17, 1001, 40003, 65536, 65537 = kChunk + 1, 131079 = 2 kChunk + 7, and one tensor
// of 320 kChunk + 11, also with the grid capped at 7 blocks); empty tensors (null or not);
// pointers 16-byte aligned or shifted by one element (in every list, or in one list only), so
// both the 16-byte path and the scalar path run; byte masks shifted by 0, 1 or 3 bytes; lists of
// 410 and 1200 tensors, in every table format (small 4 KB, large with 8-byte addresses, large with
// 32-bit offsets: per-list arenas), on an emulated device with and without the large parameter
// space, and with a 5-block grid (blocks loop over chunks); the launch count of every call is
// checked (against the capacity rule, and as a written number for the 1200-tensor lists). Every
// buffer has guard bytes around it (0xff: NaN in every dtype, so a read past the end poisons a
// result), which must be intact after each call; read-only inputs must keep their bits.
#include <memory>  // first: the emulator's __noinline__ macro would break its attributes

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "multi_tensor.cuh"  // the table capacities and test hooks
#include "sharpfused.h"

using namespace sharpfused;
using R = long double;

namespace {

// ------------------------------------------------------------------ dtypes
template <typename T> struct Ty;
template <> struct Ty<float> {
  using A = float;
  using U = uint32_t;
  static constexpr DType dt = DType::kFloat32;
  static constexpr const char* name = "fp32";
  static constexpr int p = 24, emin = -126, emax = 127;
  static constexpr bool low = false;
  static R r(float x) { return x; }
  static float from(double d) { return static_cast<float>(d); }
};
template <> struct Ty<double> {
  using A = double;
  using U = uint64_t;
  static constexpr DType dt = DType::kFloat64;
  static constexpr const char* name = "fp64";
  static constexpr int p = 53, emin = -1022, emax = 1023;
  static constexpr bool low = false;
  static R r(double x) { return x; }
  static double from(double d) { return d; }
};
template <> struct Ty<__half> {
  using A = float;
  using U = uint16_t;
  static constexpr DType dt = DType::kFloat16;
  static constexpr const char* name = "fp16";
  static constexpr int p = 11, emin = -14, emax = 15;
  static constexpr bool low = true;
  static R r(__half x) { return __half2float(x); }
  static __half from(double d) { return __float2half_rn(static_cast<float>(d)); }
};
template <> struct Ty<__nv_bfloat16> {
  using A = float;
  using U = uint16_t;
  static constexpr DType dt = DType::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr int p = 8, emin = -126, emax = 127;
  static constexpr bool low = true;
  static R r(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __nv_bfloat16 from(double d) { return __float2bfloat16_rn(static_cast<float>(d)); }
};

template <typename T> using A_t = typename Ty<T>::A;
template <typename T> R unit_roundoff() { return std::ldexp(R(1), -std::numeric_limits<A_t<T>>::digits); }
// one ulp of dtype T at the magnitude of x (subnormals included)
template <typename T> R ulp(R x) {
  const int e = x == 0 || !std::isfinite(x) ? Ty<T>::emin : std::max(std::ilogb(x), Ty<T>::emin);
  return std::ldexp(R(1), e - (Ty<T>::p - 1));
}
// the smallest magnitude that rounds to infinity in dtype T: max finite + half an ulp
template <typename T> R overflow_threshold() { return (2 - std::ldexp(R(1), -Ty<T>::p)) * std::ldexp(R(1), Ty<T>::emax); }
// a host scalar as the kernel sees it: rounded to opmath
template <typename T> R opm(double v) { return static_cast<R>(static_cast<A_t<T>>(v)); }

// compensated (Neumaier) sum in long double: the reference's own error stays far below the tolerance
struct Sum {
  R s = 0, c = 0;
  void add(R x) {
    const R t = s + x;
    c += std::fabs(s) >= std::fabs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  R get() const { return s + c; }
};

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
uint64_t bits_of(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ guarded buffers
constexpr size_t kGuard = 64;

// `bytes` of data at a 16-byte aligned address plus `shift` bytes, with 0xff guard bytes around:
// a region of its own store, or of an arena shared by the tensors of one list (like a bucket's
// flat buffer: the kernels' tables then store the list's addresses as 32-bit offsets).
struct Mem {
  std::shared_ptr<std::vector<unsigned char>> store;
  size_t begin = 0, len = 0;  // the region of *store: guards, data, guards
  size_t off = 0, bytes = 0, shift = 0;  // data at region + off
  static size_t region(size_t nbytes, size_t sh) { return nbytes + 2 * kGuard + 16 + sh; }
  Mem() = default;
  Mem(std::shared_ptr<std::vector<unsigned char>> st, size_t b, size_t nbytes, size_t sh)
      : store(std::move(st)), begin(b), len(region(nbytes, sh)), bytes(nbytes), shift(sh) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(store->data() + begin) + kGuard;
    off = kGuard + (16 - a % 16) % 16 + sh;
  }
  Mem(size_t nbytes, size_t sh)
      : Mem(std::make_shared<std::vector<unsigned char>>(region(nbytes, sh), 0xff), 0, nbytes, sh) {}
  // a copy in its own store, or at `b` in `st` (an arena copy)
  Mem(const Mem& o, std::shared_ptr<std::vector<unsigned char>> st = nullptr)
      : Mem(st ? st : std::make_shared<std::vector<unsigned char>>(region(o.bytes, o.shift), 0xff), st ? o.begin : 0,
            o.bytes, o.shift) {
    if (bytes) std::memcpy(data(), o.data(), bytes);
  }
  Mem(Mem&&) = default;
  Mem& operator=(const Mem&) = delete;
  Mem& operator=(Mem&&) = default;
  unsigned char* raw() { return store->data() + begin; }
  const unsigned char* raw() const { return store->data() + begin; }
  unsigned char* data() { return raw() + off; }
  const unsigned char* data() const { return raw() + off; }
  bool guards_ok() const {
    const unsigned char* r = raw();
    for (size_t i = 0; i < len; ++i)
      if ((i < off || i >= off + bytes) && r[i] != 0xff) return false;
    return true;
  }
  bool same(const Mem& o) const { return len == o.len && off == o.off && std::memcmp(raw(), o.raw(), len) == 0; }
};

// One list of tensors of dtype T: tensor i has numel[i] elements.
template <typename T>
struct TList {
  std::vector<Mem> mem;
  std::vector<void*> ptr;
  std::vector<bool> null_ptr;  // an empty tensor passed as nullptr
  size_t arena = 0;            // bytes of the list's arena (0: every tensor in its own store)
  TList() = default;
  TList(const TList& o) : null_ptr(o.null_ptr), arena(o.arena) {
    auto st = arena ? std::make_shared<std::vector<unsigned char>>(arena, 0xff) : nullptr;
    for (const Mem& m : o.mem) mem.emplace_back(m, st);
    relink();
  }
  void relink() {
    ptr.resize(mem.size());
    for (size_t i = 0; i < mem.size(); ++i) ptr[i] = null_ptr[i] ? nullptr : mem[i].data();
  }
  int64_t n() const { return static_cast<int64_t>(mem.size()); }
  int64_t numel(int64_t i) const { return static_cast<int64_t>(mem[i].bytes / sizeof(T)); }
  T get(int64_t i, int64_t j) const {
    T x;
    std::memcpy(&x, mem[i].data() + j * sizeof(T), sizeof(T));
    return x;
  }
  R r(int64_t i, int64_t j) const { return Ty<T>::r(get(i, j)); }
  void set(int64_t i, int64_t j, T x) { std::memcpy(mem[i].data() + j * sizeof(T), &x, sizeof(T)); }
  typename Ty<T>::U bits(int64_t i, int64_t j) const {
    typename Ty<T>::U u;
    std::memcpy(&u, mem[i].data() + j * sizeof(T), sizeof(T));
    return u;
  }
};

// Everything one call reads or writes: up to 5 parallel lists, and scratch / scalar buffers.
template <typename T>
struct State {
  std::vector<int64_t> numel;
  TList<T> list[5];
  bool used[5] = {false, false, false, false, false};
  std::vector<Mem> scratch;
  Lists view() {
    Lists l{};
    l.n = static_cast<int64_t>(numel.size());
    l.numel = numel.data();
    for (int d = 0; d < 5; ++d) l.ptr[d] = used[d] ? list[d].ptr.data() : nullptr;
    return l;
  }
  void* s(int k) { return scratch[k].data(); }
  bool same(const State& o) const {
    for (int d = 0; d < 5; ++d)
      if (used[d])
        for (int64_t i = 0; i < list[d].n(); ++i)
          if (!list[d].mem[i].same(o.list[d].mem[i])) return false;
    for (size_t k = 0; k < scratch.size(); ++k)
      if (!scratch[k].same(o.scratch[k])) return false;
    return true;
  }
  bool guards_ok() const {
    for (int d = 0; d < 5; ++d)
      if (used[d])
        for (const Mem& m : list[d].mem)
          if (!m.guards_ok()) return false;
    for (const Mem& m : scratch)
      if (!m.guards_ok()) return false;
    return true;
  }
};

// ------------------------------------------------------------------ inputs
std::mt19937_64 rng;
std::normal_distribution<double> g_normal(0.0, 1.0);
double normal() { return g_normal(rng); }

int g_case = 0;  // rotates the alignment pattern from case to case

// Alignment of tensor i of list d: all lists aligned, all shifted by one element, or only list 1 shifted.
size_t shift_of(int64_t i, int d, size_t elem) {
  switch ((i + g_case) % 3) {
    case 0: return 0;
    case 1: return elem;
    default: return d == 1 ? elem : 0;
  }
}

bool g_arena = false;  // make_state: one arena per list (offset tables) instead of a store per tensor

template <typename T>
State<T> make_state(const std::vector<int64_t>& numel, int lists) {
  State<T> s;
  s.numel = numel;
  for (int d = 0; d < lists; ++d) {
    s.used[d] = true;
    TList<T>& l = s.list[d];
    std::shared_ptr<std::vector<unsigned char>> st;
    if (g_arena) {
      for (size_t i = 0; i < numel.size(); ++i)
        l.arena += Mem::region(numel[i] * sizeof(T), shift_of(static_cast<int64_t>(i), d, sizeof(T)));
      st = std::make_shared<std::vector<unsigned char>>(l.arena, 0xff);
    }
    size_t at = 0;
    for (size_t i = 0; i < numel.size(); ++i) {
      const size_t nb = numel[i] * sizeof(T), sh = shift_of(static_cast<int64_t>(i), d, sizeof(T));
      if (st) {
        l.mem.emplace_back(st, at, nb, sh);
        at += Mem::region(nb, sh);
      } else {
        l.mem.emplace_back(nb, sh);
      }
      l.null_ptr.push_back(numel[i] == 0 && (i + d + g_case) % 2 == 0);
    }
    l.relink();
  }
  return s;
}

template <typename T, typename F>
void fill(TList<T>& l, F&& gen) {
  for (int64_t i = 0; i < l.n(); ++i)
    for (int64_t j = 0; j < l.numel(i); ++j) l.set(i, j, Ty<T>::from(gen()));
}

// Random bit patterns (NaN payloads, infinities, signed zeros, subnormals included).
template <typename T>
void fill_bits(TList<T>& l) {
  for (int64_t i = 0; i < l.n(); ++i)
    for (int64_t j = 0; j < l.numel(i); ++j) {
      const typename Ty<T>::U u = static_cast<typename Ty<T>::U>(rng());
      std::memcpy(l.mem[i].data() + j * sizeof(T), &u, sizeof(T));
    }
}

// Puts inf, -inf, NaN and -0 at a few places of every non-empty tensor.
template <typename T>
void poison(TList<T>& l) {
  const double v[4] = {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                       std::numeric_limits<double>::quiet_NaN(), -0.0};
  for (int64_t i = 0; i < l.n(); ++i) {
    const int64_t n = l.numel(i);
    if (n == 0) continue;
    const int64_t at[4] = {0, n - 1, n / 2, n / 3};
    for (int k = 0; k < 4; ++k) l.set(i, at[k], Ty<T>::from(v[k]));
  }
}

// A scratch buffer of n opmath values (or float32 flags), filled with NaN (0xff) so unwritten
// outputs show; returns its index in s.scratch.
template <typename T, typename V = A_t<T>>
int scratch(State<T>& s, int64_t n) {
  s.scratch.emplace_back(n * sizeof(V), 0);
  return static_cast<int>(s.scratch.size()) - 1;
}
template <typename T, typename V = A_t<T>>
int scalar_buf(State<T>& s, double v) {
  const int k = scratch<T, V>(s, 1);
  const V x = static_cast<V>(v);
  std::memcpy(s.scratch[k].data(), &x, sizeof x);
  return k;
}

// ------------------------------------------------------------------ checks
struct Check {
  long bad = 0;
  double worst = 0;  // largest error / tolerance seen
  std::string msgs;
  void fail(const std::string& m) {
    if (bad++ < 6) msgs += "\n      " + m;
  }
  void ratio(R err, R tol) {
    if (tol > 0) worst = std::max(worst, static_cast<double>(err / tol));
  }
  // an elementwise result: |out - ref| <= k u M (bf16/fp16: + half an ulp of T)
  template <typename T>
  void close(const char* what, int64_t i, int64_t j, T out, R ref, R mag, int k) {
    const R o = Ty<T>::r(out);
    if (std::isinf(o) && std::isfinite(ref) && (o > 0) == (ref > 0) &&
        std::fabs(ref) + 2 * k * unit_roundoff<T>() * mag >= overflow_threshold<T>())
      return;  // a result beyond the dtype's range rounds to infinity
    if (!std::isfinite(ref) || !std::isfinite(o)) {
      if (!(std::isnan(ref) ? std::isnan(o) : o == ref)) fail(fmt(what, i, j, o, ref, 0));
      return;
    }
    // bf16/fp16: half an ulp of the final rounding of a value within k u M of ref (twice that
    // slack covers a value that crossed a power of two); fp32/fp64: the final rounding is in k
    const R tol = Ty<T>::low ? ulp<T>(ref) / 2 + 2 * k * unit_roundoff<T>() * mag
                             : k * unit_roundoff<T>() * mag + ulp<T>(0);
    const R err = std::fabs(o - ref);
    ratio(err, tol);
    if (!(err <= tol)) fail(fmt(what, i, j, o, ref, tol));
  }
  // a reduction: |out - ref| <= h u sum|terms|
  template <typename A>
  void close_sum(const char* what, int64_t i, A out, R ref, R abs_sum, int64_t height) {
    const R tol = R(1.01) * height * std::ldexp(R(1), -std::numeric_limits<A>::digits) * abs_sum;
    const R err = std::fabs(static_cast<R>(out) - ref);
    ratio(err, tol);
    if (!(err <= tol)) fail(fmt(what, i, -1, out, ref, tol));
  }
  template <typename U>
  void same_bits(const char* what, int64_t i, int64_t j, U got, U want) {
    if (got != want) {
      char b[200];
      std::snprintf(b, sizeof b, "%s[%lld][%lld]: bits %#llx, expected %#llx", what, (long long)i, (long long)j,
                    (unsigned long long)got, (unsigned long long)want);
      fail(b);
    }
  }
  template <typename T>
  void same_list(const char* what, const TList<T>& got, const TList<T>& want) {
    for (int64_t i = 0; i < got.n(); ++i)
      for (int64_t j = 0; j < got.numel(i); ++j) same_bits(what, i, j, got.bits(i, j), want.bits(i, j));
  }
  static std::string fmt(const char* what, int64_t i, int64_t j, R o, R ref, R tol) {
    char b[240];
    std::snprintf(b, sizeof b, "%s[%lld][%lld] = %.10Lg, reference %.10Lg (error %.3Lg, tolerance %.3Lg)", what,
                  (long long)i, (long long)j, o, ref, std::fabs(o - ref), tol);
    return b;
  }
};

int g_failed = 0, g_cases = 0;
uint64_t g_sched_seed = 1;
// when >= 0: the launch count a case must make, written as a number by the caller (besides the
// count the capacity rule gives): a packing regression fails both
int64_t g_expect_launches = -1;

// Runs `call` on a copy of s0 (ascending schedule), verifies, checks the guards, the launch count
// (when >= 0), and that a second run (shuffled schedule) gives the same bits.
template <typename T, typename Call, typename Verify>
void run_case(const std::string& label, const State<T>& s0, Call&& call, Verify&& verify, int64_t launches = -1) {
  const auto t0 = std::chrono::steady_clock::now();
  Check c;
  State<T> s1 = s0;
  emu::set_schedule(emu::Schedule::kAscending);
  const uint64_t l0 = emu::stats().launches;
  const cudaError_t err = call(s1);
  const int64_t nl = static_cast<int64_t>(emu::stats().launches - l0);
  if (err != cudaSuccess) c.fail(std::string("launcher returned ") + cudaGetErrorString(err));
  verify(s0, s1, c);
  if (!s1.guards_ok()) c.fail("a guard byte around a buffer was overwritten");
  if (launches >= 0 && nl != launches) c.fail("made " + std::to_string(nl) + " launches, expected " + std::to_string(launches));
  if (g_expect_launches >= 0 && nl != g_expect_launches)
    c.fail("made " + std::to_string(nl) + " launches, asserted " + std::to_string(g_expect_launches));
  State<T> s2 = s0;
  emu::set_schedule(emu::Schedule::kShuffled, g_sched_seed++);
  const cudaError_t err2 = call(s2);
  emu::set_schedule(emu::Schedule::kAscending);
  if (err2 != cudaSuccess || !s1.same(s2)) c.fail("not deterministic: a second run (threads in shuffled order) gave other bits");
  ++g_cases;
  if (c.bad) ++g_failed;
  int64_t elems = 0;
  for (int64_t n : s0.numel) elems += n;
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%-4s  %-4s  %-58s n=%-3zu elems=%-8lld launches=%-3lld worst=%.3f  %.2fs%s\n", c.bad ? "FAIL" : "ok",
              Ty<T>::name, label.c_str(), s0.numel.size(), (long long)elems, (long long)nl, c.worst, sec,
              c.msgs.c_str());
  std::fflush(stdout);
  ++g_case;
}

// ------------------------------------------------------------------ sizes
const std::vector<int64_t> kMix = {1001, 1, 0, 65537, 3, 131079, 17, 0, 65536, 40003};

std::vector<int64_t> many(int n, int max_size) {
  std::vector<int64_t> v;
  for (int i = 0; i < n; ++i) v.push_back(i % 9 == 4 ? 0 : 1 + static_cast<int64_t>(rng() % max_size));
  return v;
}

// Table capacities of multi_tensor.cuh (tensors per table for D = 1..5 lists; segments per cleanup
// table), written out: every launch count below follows from these numbers.
constexpr int kSmallCap[6] = {0, 269, 171, 125, 99, 82};        // 4 KB, 8-byte addresses
constexpr int kLargeCap[6] = {0, 2317, 1474, 1081, 853, 705};   // 32764 B, 8-byte addresses
constexpr int kLargeOffCap[6] = {0, 3244, 2317, 1802, 1474, 1247};  // 32764 B, 32-bit offsets
constexpr int kSmallSeg = 1007, kLargeSeg = 8174;
template <int D> constexpr bool caps_ok() {
  return SmallTable<D>::kMaxTensors == kSmallCap[D] && LargeTable<D>::kMaxTensors == kLargeCap[D] &&
         LargeOffsetTable<D>::kMaxTensors == kLargeOffCap[D];
}
static_assert(caps_ok<1>() && caps_ok<2>() && caps_ok<3>() && caps_ok<4>() && caps_ok<5>(), "table capacities changed");
static_assert(SmallSegTable::kMaxSegments == kSmallSeg && LargeSegTable::kMaxSegments == kLargeSeg, "segment tables changed");

// Launches of one multi-tensor apply over D lists on the emulated device: one small table when the
// non-empty tensors fit one, or when the device takes only 4 KB of parameters (then one per small
// table); else one per large table, offsets when the lists are arenas (g_arena) and the hook allows
// them. -1 when it depends on where the host allocator put separate buffers (offsets or not).
int64_t tables(const std::vector<int64_t>& numel, int D) {
  int64_t nonempty = 0;
  for (int64_t n : numel) nonempty += n > 0;
  if (!emu::large_params() || nonempty <= kSmallCap[D]) return cdiv(nonempty, kSmallCap[D]);
  const int64_t wide = cdiv(nonempty, kLargeCap[D]), off = cdiv(nonempty, kLargeOffCap[D]);
  if (!table_hooks().offsets) return wide;
  if (g_arena) return off;
  return wide == off ? wide : -1;
}
// launches of a segment_sum over nseg segments
int64_t seg_tables(int64_t nseg) {
  if (nseg > kSmallSeg && emu::large_params()) return cdiv(nseg, kLargeSeg);
  return cdiv(nseg, kSmallSeg);
}

// Height of the summation tree of a reduction over a tensor of n elements: elements per thread
// (+ the vector width and the tail), 5 shuffle levels per warp and 5 over the 16 warps' sums.
int64_t block_height(int64_t n) { return cdiv(std::min(n, kChunk), 512) + 9 + 10; }
// a cleanup (segment_sum) stage over `rows` rows
int64_t seg_height(int64_t rows) { return cdiv(rows, 512) + 10; }

// ------------------------------------------------------------------ sq_norm
template <typename T>
void test_sq_norm(const std::vector<int64_t>& numel, const char* set, bool weights, int eta_mode /*0 none,1 value,2 ptr*/,
                  double eta, int64_t launches = -1) {
  using A = A_t<T>;
  State<T> s0 = make_state<T>(numel, weights ? 2 : 1);
  fill(s0.list[0], normal);
  if (weights) fill(s0.list[1], normal);
  const int64_t nch = num_chunks(numel.data(), static_cast<int64_t>(numel.size()));
  const int kp = scratch<T>(s0, nch), kper = scratch<T>(s0, numel.size()), ktot = scratch<T>(s0, 1);
  const int keta = eta_mode == 2 ? scalar_buf<T>(s0, eta) : -1;
  auto call = [&](State<T>& s) {
    const Scalar e = keta >= 0 ? Scalar{s.s(keta), std::nan("")} : Scalar{nullptr, eta_mode == 1 ? eta : std::nan("")};
    return sq_norm(Ty<T>::dt, s.view(), e, s.s(kp), s.s(kper), s.s(ktot), nullptr);
  };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("x", a.list[0], b.list[0]);
    if (weights) c.same_list("w", a.list[1], b.list[1]);
    const R et = weights ? opm<T>(eta) : 0;
    Sum total;
    int64_t height = 0;
    for (size_t i = 0; i < numel.size(); ++i) {
      Sum si;
      for (int64_t j = 0; j < numel[i]; ++j) {
        R x = b.list[0].r(i, j);
        if (weights) x *= std::fabs(b.list[1].r(i, j)) + et;
        si.add(x * x);
      }
      A got;
      std::memcpy(&got, a.scratch[kper].data() + i * sizeof(A), sizeof(A));
      const int64_t h = block_height(numel[i]) + 5 + seg_height(cdiv(numel[i], kChunk));
      height = std::max(height, h);
      if (numel[i] == 0) {
        c.same_bits("per_tensor(empty)", i, 0, bits_of(got), bits_of(A(0)));
      } else {
        c.close_sum("per_tensor", i, got, si.get(), si.get(), h);
      }
      total.add(si.get());
    }
    A got;
    std::memcpy(&got, a.scratch[ktot].data(), sizeof(A));
    c.close_sum("total", 0, got, total.get(), total.get(), height + seg_height(numel.size()));
  };
  std::string label = std::string("sq_norm ") + (weights ? "(|w|+eta)*x " : "x ") +
                      (eta_mode == 0 ? "" : eta_mode == 1 ? "eta=value " : "eta=device ") + set;
  const int64_t t = tables(numel, 2);
  if (launches < 0 && t >= 0) launches = t + seg_tables(static_cast<int64_t>(numel.size())) + 1;
  run_case<T>(label, s0, call, verify, launches);
}

// ------------------------------------------------------------------ perturb
// mask: 0 none, 1 in dtype T, 2 one byte per element (SSAM's uint8 / a bool mask: the same bytes).
// A byte mask holds the 0/1 values of the dtype mask list, and the call must give the very bits of
// the same call with the dtype mask (run in verify), besides matching the reference.
template <typename T>
void test_perturb(const std::vector<int64_t>& numel, const char* set, double scale, bool scale_ptr, bool backup,
                  bool has_eta, double eta, bool eta_ptr, int mask, bool poison_g, double norm_sq = -1) {
  // norm_sq >= 0 (or NaN / inf): given on the device; the scale is then scale / (sqrt(norm_sq) + 1e-12)
  const bool has_nsq = !(norm_sq < 0);
  State<T> s0 = make_state<T>(numel, 4);
  s0.used[2] = backup;
  s0.used[3] = mask;
  fill(s0.list[0], normal);
  fill(s0.list[1], normal);
  if (poison_g) poison(s0.list[1]);
  if (backup) fill_bits(s0.list[2]);
  if (mask) fill(s0.list[3], [] { return static_cast<double>(rng() % 3 == 0 ? 0 : 1); });
  // the byte mask: tensor i shifted by 0, 1 or 3 bytes (the 4/8/2-byte mask vector is then unaligned)
  std::vector<Mem> bytes;
  std::vector<void*> bptr;
  if (mask == 2) {
    auto shift = [&](size_t i) -> size_t { return (i + g_case) % 3 == 0 ? 0 : (i + g_case) % 3 == 1 ? 1 : 3; };
    std::shared_ptr<std::vector<unsigned char>> arena;  // with g_arena, one store as the other lists
    size_t at = 0;
    if (g_arena) {
      for (size_t i = 0; i < numel.size(); ++i) at += Mem::region(numel[i], shift(i));
      arena = std::make_shared<std::vector<unsigned char>>(at, 0xff);
      at = 0;
    }
    for (size_t i = 0; i < numel.size(); ++i) {
      if (arena) {
        bytes.emplace_back(arena, at, numel[i], shift(i));
        at += Mem::region(numel[i], shift(i));
      } else {
        bytes.emplace_back(numel[i], shift(i));
      }
      for (int64_t j = 0; j < numel[i]; ++j) bytes[i].data()[j] = s0.list[3].r(i, j) != 0 ? 1 : 0;
    }
    for (size_t i = 0; i < numel.size(); ++i) bptr.push_back(s0.list[3].ptr[i] ? bytes[i].data() : nullptr);
  }
  std::vector<Mem> bytes0(bytes.begin(), bytes.end());
  const int ks = scale_ptr ? scalar_buf<T>(s0, scale) : -1, ke = eta_ptr ? scalar_buf<T>(s0, eta) : -1;
  const int kn = has_nsq ? scalar_buf<T>(s0, norm_sq) : -1;
  auto call_as = [&](State<T>& s, bool as_bytes) {
    const Scalar sc = ks >= 0 ? Scalar{s.s(ks), std::nan("")} : Scalar{nullptr, scale};
    const Scalar et = ke >= 0 ? Scalar{s.s(ke), std::nan("")} : Scalar{nullptr, has_eta ? eta : std::nan("")};
    Lists l = s.view();
    if (as_bytes) l.ptr[3] = bptr.data();
    const Scalar ns = kn >= 0 ? Scalar{s.s(kn), std::nan("")} : Scalar{nullptr, std::nan("")};
    return perturb(Ty<T>::dt, l, sc, has_eta, et, as_bytes, ns, 1e-12, nullptr);
  };
  auto call = [&](State<T>& s) { return call_as(s, mask == 2); };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    if (mask == 2) {  // the bits of the dtype-mask call; the bytes untouched
      State<T> d = b;
      if (call_as(d, false) != cudaSuccess) c.fail("the dtype-mask call failed");
      c.same_list("w (bytes vs dtype mask)", a.list[0], d.list[0]);
      if (backup) c.same_list("backup (bytes vs dtype mask)", a.list[2], d.list[2]);
      for (size_t i = 0; i < bytes.size(); ++i)
        if ((bytes[i].bytes && std::memcmp(bytes[i].data(), bytes0[i].data(), bytes[i].bytes) != 0) ||
            !bytes[i].guards_ok())
          c.fail("the byte mask was written");
    }
    c.same_list("g", a.list[1], b.list[1]);
    if (backup) c.same_list("backup", a.list[2], b.list[0]);  // the raw bits of w
    if (mask) c.same_list("mask", a.list[3], b.list[3]);
    // the scale the kernel uses, its inverse norm computed in opmath with each operation rounded once
    using A = A_t<T>;
    A inv = A(1);
    if (has_nsq) {
      inv = A(1) / (std::sqrt(static_cast<A>(norm_sq)) + static_cast<A>(1e-12));
      if (inv != inv) inv = A(0);
    }
    const A sa = inv * static_cast<A>(scale);
    if (sa == A(0)) {  // a zero scale drops the term: w keeps its bits whatever g holds
      c.same_list("w", a.list[0], b.list[0]);
      return;
    }
    const R s = sa, et = has_eta ? opm<T>(eta) : 0;
    for (size_t i = 0; i < numel.size(); ++i)
      for (int64_t j = 0; j < numel[i]; ++j) {
        const R w = b.list[0].r(i, j);
        R e = b.list[1].r(i, j);
        if (has_eta) e *= (std::fabs(w) + et) * (std::fabs(w) + et);
        if (mask) e *= b.list[3].r(i, j);
        c.close("w", i, j, a.list[0].get(i, j), w + s * e, std::fabs(w) + std::fabs(s * e), 8);
      }
  };
  char label[160];
  std::snprintf(label, sizeof label, "perturb scale=%g%s%s%s%s%s%s %s", scale, scale_ptr ? "(device)" : "",
                has_nsq ? (std::string(" /sqrt(norm_sq=") + std::to_string(norm_sq) + ")").c_str() : "",
                backup ? " backup" : "", has_eta ? (eta_ptr ? " eta(device)" : " eta") : "",
                mask == 2 ? " mask(uint8)" : mask ? " mask" : "",
                poison_g ? " g:inf/nan/-0" : "", set);
  run_case<T>(label, s0, call, verify, tables(numel, 4));
}

// ------------------------------------------------------------------ restore
template <typename T>
void test_restore(const std::vector<int64_t>& numel, const char* set) {
  State<T> s0 = make_state<T>(numel, 2);
  fill(s0.list[0], normal);
  fill_bits(s0.list[1]);
  auto call = [&](State<T>& s) { return restore(Ty<T>::dt, s.view(), nullptr); };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("w", a.list[0], b.list[1]);
    c.same_list("backup", a.list[1], b.list[1]);
  };
  run_case<T>(std::string("restore (random bits: NaN payloads, -0, inf) ") + set, s0, call, verify, tables(numel, 2));
}

// ------------------------------------------------------------------ dot_norms
template <typename T>
void test_dot_norms(const std::vector<int64_t>& numel, const char* set) {
  using A = A_t<T>;
  State<T> s0 = make_state<T>(numel, 2);
  fill(s0.list[0], normal);
  fill(s0.list[1], [] { return 0.5 * normal() + 0.25; });
  const int64_t nch = num_chunks(numel.data(), static_cast<int64_t>(numel.size()));
  const int kp = scratch<T>(s0, 3 * nch), ko = scratch<T>(s0, 3);
  auto call = [&](State<T>& s) { return dot_norms(Ty<T>::dt, s.view(), s.s(kp), s.s(ko), nullptr); };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("a", a.list[0], b.list[0]);
    c.same_list("b", a.list[1], b.list[1]);
    Sum dot, dot_abs, na, nb;
    int64_t height = 0;
    for (size_t i = 0; i < numel.size(); ++i) {
      height = std::max(height, block_height(numel[i]) + 1);
      for (int64_t j = 0; j < numel[i]; ++j) {
        const R x = b.list[0].r(i, j), y = b.list[1].r(i, j);
        dot.add(x * y);
        dot_abs.add(std::fabs(x * y));
        na.add(x * x);
        nb.add(y * y);
      }
    }
    height += seg_height(nch);
    A out[3];
    std::memcpy(out, a.scratch[ko].data(), sizeof out);
    c.close_sum("<a,b>", 0, out[0], dot.get(), dot_abs.get(), height);
    c.close_sum("|a|^2", 0, out[1], na.get(), na.get(), height);
    c.close_sum("|b|^2", 0, out[2], nb.get(), nb.get(), height);
  };
  const int64_t t = tables(numel, 2);
  run_case<T>(std::string("dot_norms ") + set, s0, call, verify, t < 0 ? -1 : t + 1);
}

// ------------------------------------------------------------------ combine
// Rule (torch_ops.combine_ with device coefficients, and the Triton kernel):
//   g <- where(c1 == 0, 0, c1*g) + where(c2 == 0, 0, c2*saved), in opmath, rounded once:
// a zero coefficient drops its term, so inf/NaN behind it never reaches g.
template <typename T>
void test_combine(const std::vector<int64_t>& numel, const char* set, double c1, double c2, bool ptrs, bool poison_dropped) {
  using A = A_t<T>;
  State<T> s0 = make_state<T>(numel, 2);
  fill(s0.list[0], normal);
  fill(s0.list[1], normal);
  if (poison_dropped) {  // in both lists: the kept term's specials go through, the dropped term's vanish
    poison(s0.list[0]);
    poison(s0.list[1]);
  }
  const int k1 = ptrs ? scalar_buf<T>(s0, c1) : -1, k2 = ptrs ? scalar_buf<T>(s0, c2) : -1;
  auto call = [&](State<T>& s) {
    const Scalar a = ptrs ? Scalar{s.s(k1), std::nan("")} : Scalar{nullptr, c1};
    const Scalar b = ptrs ? Scalar{s.s(k2), std::nan("")} : Scalar{nullptr, c2};
    return combine(Ty<T>::dt, s.view(), a, b, nullptr);
  };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("saved", a.list[1], b.list[1]);
    const A a1 = static_cast<A>(c1), a2 = static_cast<A>(c2);
    for (size_t i = 0; i < numel.size(); ++i)
      for (int64_t j = 0; j < numel[i]; ++j) {
        const T out = a.list[0].get(i, j);
        if (c1 == 0 || c2 == 0) {
          // one product (or none) and "+ 0": exactly computable in opmath, so checked bit for bit
          const A t1 = c1 == 0 ? A(0) : a1 * static_cast<A>(Ty<T>::r(b.list[0].get(i, j)));
          const A t2 = c2 == 0 ? A(0) : a2 * static_cast<A>(Ty<T>::r(b.list[1].get(i, j)));
          T want;
          if constexpr (Ty<T>::low) {
            want = T(static_cast<float>(t1 + t2));
          } else {
            want = static_cast<T>(t1 + t2);
          }
          typename Ty<T>::U gb, wb;
          std::memcpy(&gb, &out, sizeof gb);
          std::memcpy(&wb, &want, sizeof wb);
          c.same_bits("g", static_cast<int64_t>(i), j, gb, wb);
        } else {
          const R g = b.list[0].r(i, j), sv = b.list[1].r(i, j);
          const R r1 = opm<T>(c1), r2 = opm<T>(c2);
          c.close("g", i, j, out, r1 * g + r2 * sv, std::fabs(r1 * g) + std::fabs(r2 * sv), 4);
        }
      }
  };
  char label[160];
  std::snprintf(label, sizeof label, "combine c1=%g c2=%g%s%s %s", c1, c2, ptrs ? " (device)" : "",
                poison_dropped ? " dropped term inf/nan/-0" : "", set);
  run_case<T>(label, s0, call, verify, tables(numel, 2));
}

// ------------------------------------------------------------------ restore_sgd
struct SgdCfg {
  double lr = 0.1;
  bool lr_ptr = false;
  double momentum = 0, dampening = 0, wd = 0;
  bool nesterov = false, init = false;
  double coef = 1;
  bool coef_ptr = false;
  int found_inf = -1;  // -1: nullptr; else index into kFlags
};
const float kFlags[] = {0.0f, -0.0f, 1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
const char* kFlagNames[] = {"0", "-0", "1", "nan", "inf"};

template <typename T>
void test_sgd(const std::vector<int64_t>& numel, const char* set, SgdCfg f) {
  const bool buf = f.momentum != 0;  // as the binding: a buffer list only with momentum
  const bool skip = f.found_inf >= 0 && kFlags[f.found_inf] != 0.0f;
  State<T> s0 = make_state<T>(numel, 4);
  s0.used[3] = buf;
  fill_bits(s0.list[0]);  // w: whatever the perturbed weights were
  fill(s0.list[1], normal);
  fill(s0.list[2], normal);
  if (skip) poison(s0.list[2]);
  if (buf) fill(s0.list[3], [] { return 0.3 * normal(); });
  const int klr = f.lr_ptr ? scalar_buf<T>(s0, f.lr) : -1, kc = f.coef_ptr ? scalar_buf<T>(s0, f.coef) : -1;
  const int kf = f.found_inf >= 0 ? scalar_buf<T, float>(s0, kFlags[f.found_inf]) : -1;
  auto call = [&](State<T>& s) {
    const Scalar lr = klr >= 0 ? Scalar{s.s(klr), std::nan("")} : Scalar{nullptr, f.lr};
    const Scalar coef = kc >= 0 ? Scalar{s.s(kc), std::nan("")} : Scalar{nullptr, f.coef};
    return restore_sgd(Ty<T>::dt, s.view(), lr, f.momentum, f.dampening, f.wd, f.nesterov, f.init, coef,
                       kf >= 0 ? static_cast<const float*>(s.s(kf)) : nullptr, nullptr);
  };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("backup", a.list[1], b.list[1]);
    c.same_list("g", a.list[2], b.list[2]);
    if (skip) {  // w <- backup bit for bit; the buffer: zeros on an init step, else untouched
      c.same_list("w", a.list[0], b.list[1]);
      if (buf) {
        if (f.init) {
          for (size_t i = 0; i < numel.size(); ++i)
            for (int64_t j = 0; j < numel[i]; ++j) c.same_bits("buf", i, j, a.list[3].bits(i, j), typename Ty<T>::U(0));
        } else {
          c.same_list("buf", a.list[3], b.list[3]);
        }
      }
      return;
    }
    const R lr = opm<T>(f.lr), coef = opm<T>(f.coef), m = opm<T>(f.momentum), damp = opm<T>(f.dampening),
            wd = opm<T>(f.wd);
    for (size_t i = 0; i < numel.size(); ++i)
      for (int64_t j = 0; j < numel[i]; ++j) {
        const R w0 = b.list[1].r(i, j), g = coef * b.list[2].r(i, j);
        R d = g + wd * w0, dm = std::fabs(g) + std::fabs(wd * w0);
        if (buf) {
          const R b0 = b.list[3].r(i, j);
          const R nb = f.init ? d : m * b0 + (1 - damp) * d;
          const R nbm = f.init ? dm : std::fabs(m * b0) + (1 - damp) * dm;
          c.close("buf", i, j, a.list[3].get(i, j), nb, nbm, 6);
          const R br = a.list[3].r(i, j);  // the stored buffer, as torch uses it
          if (f.nesterov) {
            d = d + m * br;
            dm = dm + std::fabs(m * br);
          } else {
            d = br;
            dm = std::fabs(br);
          }
        }
        c.close("w", i, j, a.list[0].get(i, j), w0 - lr * d, std::fabs(w0) + std::fabs(lr) * dm, 8);
      }
  };
  char label[200];
  std::snprintf(label, sizeof label, "restore_sgd lr=%g%s m=%g damp=%g wd=%g%s%s coef=%g%s found_inf=%s %s", f.lr,
                f.lr_ptr ? "(dev)" : "", f.momentum, f.dampening, f.wd, f.nesterov ? " nesterov" : "",
                f.init ? " init" : "", f.coef, f.coef_ptr ? "(dev)" : "", f.found_inf < 0 ? "null" : kFlagNames[f.found_inf],
                set);
  run_case<T>(label, s0, call, verify, tables(numel, 4));
}

// ------------------------------------------------------------------ restore_adamw
struct AdamCfg {
  double lr = 1e-3;
  bool lr_ptr = false;
  double b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01;
  int t = 1;
  bool step_ptr = false;  // device step count; bc1, bc2_sqrt passed as NaN (unused)
  double coef = 1;
  bool coef_ptr = false;
  int found_inf = -1;
  bool decoupled = true;  // false: torch.optim.Adam's L2 decay (g' = g + wd*w0, no decay of w)
};

template <typename T>
void test_adamw(const std::vector<int64_t>& numel, const char* set, AdamCfg f) {
  using A = A_t<T>;
  const bool skip = f.found_inf >= 0 && kFlags[f.found_inf] != 0.0f;
  State<T> s0 = make_state<T>(numel, 5);
  fill_bits(s0.list[0]);
  fill(s0.list[1], normal);
  fill(s0.list[2], normal);
  if (skip) poison(s0.list[2]);
  fill(s0.list[3], [] { return 0.1 * normal(); });
  fill(s0.list[4], [] { return 0.01 * std::fabs(normal()); });
  const int klr = f.lr_ptr ? scalar_buf<T>(s0, f.lr) : -1, kc = f.coef_ptr ? scalar_buf<T>(s0, f.coef) : -1;
  const int kf = f.found_inf >= 0 ? scalar_buf<T, float>(s0, kFlags[f.found_inf]) : -1;
  const int kt = f.step_ptr ? scalar_buf<T, float>(s0, f.t) : -1;
  const double bc1 = 1.0 - std::pow(f.b1, f.t), bc2_sqrt = std::sqrt(1.0 - std::pow(f.b2, f.t));
  auto call = [&](State<T>& s) {
    const Scalar lr = klr >= 0 ? Scalar{s.s(klr), std::nan("")} : Scalar{nullptr, f.lr};
    const Scalar coef = kc >= 0 ? Scalar{s.s(kc), std::nan("")} : Scalar{nullptr, f.coef};
    return restore_adamw(Ty<T>::dt, s.view(), lr, f.b1, f.b2, f.eps, f.wd,
                         kt >= 0 ? static_cast<const float*>(s.s(kt)) : nullptr, kt >= 0 ? std::nan("") : bc1,
                         kt >= 0 ? std::nan("") : bc2_sqrt, coef, kf >= 0 ? static_cast<const float*>(s.s(kf)) : nullptr,
                         f.decoupled, nullptr);
  };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("backup", a.list[1], b.list[1]);
    c.same_list("g", a.list[2], b.list[2]);
    if (skip) {  // w <- backup bit for bit, moments untouched
      c.same_list("w", a.list[0], b.list[1]);
      c.same_list("exp_avg", a.list[3], b.list[3]);
      c.same_list("exp_avg_sq", a.list[4], b.list[4]);
      return;
    }
    const R lr = opm<T>(f.lr), coef = opm<T>(f.coef), b1 = opm<T>(f.b1), b2 = opm<T>(f.b2), eps = opm<T>(f.eps),
            wd = opm<T>(f.wd);
    // bias corrections: double, rounded to opmath (from the device step: computed in the kernel the same way)
    const R c1 = static_cast<R>(static_cast<A>(bc1)), c2s = static_cast<R>(static_cast<A>(bc2_sqrt));
    const R decay = f.decoupled ? 1 - lr * wd : 1, step = lr / c1;
    for (size_t i = 0; i < numel.size(); ++i)
      for (int64_t j = 0; j < numel[i]; ++j) {
        const R w0 = b.list[1].r(i, j), m0 = b.list[3].r(i, j), v0 = b.list[4].r(i, j);
        const R gc = coef * b.list[2].r(i, j), g = f.decoupled ? gc : gc + wd * w0;
        const R gm = f.decoupled ? std::fabs(g) : std::fabs(gc) + std::fabs(wd * w0);  // magnitude of the terms
        c.close("exp_avg", i, j, a.list[3].get(i, j), b1 * m0 + (1 - b1) * g, std::fabs(m0) + gm, 6);
        // g' is rounded relative to the magnitude of its terms (L2: |g| + |wd w0|), and g'^2 with it
        c.close("exp_avg_sq", i, j, a.list[4].get(i, j), b2 * v0 + (1 - b2) * g * g, b2 * v0 + (1 - b2) * gm * gm, 6);
        const R mr = a.list[3].r(i, j), vr = a.list[4].r(i, j);  // the stored moments, as torch uses them
        const R u = step * mr / (std::sqrt(vr) / c2s + eps);
        c.close("w", i, j, a.list[0].get(i, j), w0 * decay - u, std::fabs(w0 * decay) + std::fabs(u), 12);
      }
  };
  char label[200];
  std::snprintf(label, sizeof label, "restore_adamw%s lr=%g%s b1=%g b2=%g wd=%g t=%d%s coef=%g%s found_inf=%s %s",
                f.decoupled ? "" : " (Adam, L2)", f.lr, f.lr_ptr ? "(dev)" : "", f.b1, f.b2, f.wd, f.t,
                f.step_ptr ? "(dev)" : "", f.coef, f.coef_ptr ? "(dev)" : "",
                f.found_inf < 0 ? "null" : kFlagNames[f.found_inf], set);
  run_case<T>(label, s0, call, verify, tables(numel, 5));
}

// ------------------------------------------------------------------ restore_rmsprop
struct RmspropCfg {
  double lr = 1e-2;
  bool lr_ptr = false;
  double alpha = 0.99, eps = 1e-8, wd = 0, momentum = 0;
  double coef = 1;
  bool coef_ptr = false;
  int found_inf = -1;
};

template <typename T>
void test_rmsprop(const std::vector<int64_t>& numel, const char* set, RmspropCfg f) {
  const bool buf = f.momentum > 0;  // as the binding: a buffer list only with momentum
  const bool skip = f.found_inf >= 0 && kFlags[f.found_inf] != 0.0f;
  State<T> s0 = make_state<T>(numel, 5);
  s0.used[4] = buf;
  fill_bits(s0.list[0]);
  fill(s0.list[1], normal);
  fill(s0.list[2], normal);
  if (skip) poison(s0.list[2]);
  fill(s0.list[3], [] { return 0.01 * std::fabs(normal()); });
  if (buf) fill(s0.list[4], [] { return 0.3 * normal(); });
  const int klr = f.lr_ptr ? scalar_buf<T>(s0, f.lr) : -1, kc = f.coef_ptr ? scalar_buf<T>(s0, f.coef) : -1;
  const int kf = f.found_inf >= 0 ? scalar_buf<T, float>(s0, kFlags[f.found_inf]) : -1;
  auto call = [&](State<T>& s) {
    const Scalar lr = klr >= 0 ? Scalar{s.s(klr), std::nan("")} : Scalar{nullptr, f.lr};
    const Scalar coef = kc >= 0 ? Scalar{s.s(kc), std::nan("")} : Scalar{nullptr, f.coef};
    return restore_rmsprop(Ty<T>::dt, s.view(), lr, f.alpha, f.eps, f.wd, f.momentum, coef,
                           kf >= 0 ? static_cast<const float*>(s.s(kf)) : nullptr, nullptr);
  };
  auto verify = [&](const State<T>& b, const State<T>& a, Check& c) {
    c.same_list("backup", a.list[1], b.list[1]);
    c.same_list("g", a.list[2], b.list[2]);
    if (skip) {  // w <- backup bit for bit, square_avg and the buffer untouched
      c.same_list("w", a.list[0], b.list[1]);
      c.same_list("square_avg", a.list[3], b.list[3]);
      if (buf) c.same_list("buf", a.list[4], b.list[4]);
      return;
    }
    const R lr = opm<T>(f.lr), coef = opm<T>(f.coef), al = opm<T>(f.alpha), eps = opm<T>(f.eps), wd = opm<T>(f.wd),
            mom = opm<T>(f.momentum);
    for (size_t i = 0; i < numel.size(); ++i)
      for (int64_t j = 0; j < numel[i]; ++j) {
        const R w0 = b.list[1].r(i, j), gc = coef * b.list[2].r(i, j), g = gc + wd * w0, v0 = b.list[3].r(i, j);
        const R gm = std::fabs(gc) + std::fabs(wd * w0);
        const R nv = al * v0 + (1 - al) * g * g;
        c.close("square_avg", i, j, a.list[3].get(i, j), nv, al * v0 + (1 - al) * gm * gm, 6);
        const R avg = std::sqrt(a.list[3].r(i, j)) + eps;  // the stored square_avg, as torch uses it
        R d = g / avg, dm = gm / avg;
        if (buf) {
          const R b0 = b.list[4].r(i, j);
          c.close("buf", i, j, a.list[4].get(i, j), mom * b0 + d, std::fabs(mom * b0) + dm, 8);
          d = a.list[4].r(i, j);  // the stored buffer
          dm = std::fabs(d);
        }
        c.close("w", i, j, a.list[0].get(i, j), w0 - lr * d, std::fabs(w0) + std::fabs(lr) * dm, 8);
      }
  };
  char label[200];
  std::snprintf(label, sizeof label, "restore_rmsprop lr=%g%s alpha=%g eps=%g wd=%g m=%g coef=%g%s found_inf=%s %s",
                f.lr, f.lr_ptr ? "(dev)" : "", f.alpha, f.eps, f.wd, f.momentum, f.coef, f.coef_ptr ? "(dev)" : "",
                f.found_inf < 0 ? "null" : kFlagNames[f.found_inf], set);
  run_case<T>(label, s0, call, verify, tables(numel, 5));
}

// ------------------------------------------------------------------ all launchers, one dtype
template <typename T>
void run_dtype() {
  // 80 tensors, 71 of them non-empty: more than one table holds for every launcher (64, 36 or 30 tensors)
  const std::vector<int64_t> m80 = many(80, 300), empty = {0, 0, 0};
  // sq_norm
  test_sq_norm<T>(kMix, "[mix]", false, 0, 0);
  test_sq_norm<T>(kMix, "[mix]", true, 1, 0.01);
  test_sq_norm<T>(kMix, "[mix]", true, 2, 0.05);
  test_sq_norm<T>(m80, "[80 tensors]", true, 1, 0.0);
  test_sq_norm<T>(m80, "[80 tensors]", false, 0, 0);
  test_sq_norm<T>(empty, "[all empty]", false, 0, 0);
  // perturb
  test_perturb<T>(kMix, "[mix]", 0.05, false, false, false, 0, false, false, false);
  test_perturb<T>(kMix, "[mix]", -0.07, true, true, true, 0.01, false, true, false);
  test_perturb<T>(kMix, "[mix]", 0.3, false, true, true, 0.0, true, false, false);
  test_perturb<T>(kMix, "[mix]", 0.0, false, true, true, 0.01, false, true, true);
  test_perturb<T>(kMix, "[mix]", 0.0, true, false, false, 0, false, false, true);
  test_perturb<T>(m80, "[80 tensors]", 0.02, true, true, false, 0, false, false, false);
  // the byte mask (SSAM's uint8, a bool mask): the bits of the dtype mask, on both paths
  test_perturb<T>(kMix, "[mix]", 0.05, false, true, false, 0, false, 2, false);
  test_perturb<T>(kMix, "[mix]", -0.07, true, true, true, 0.01, false, 2, false);
  test_perturb<T>(kMix, "[mix]", 0.0, false, true, true, 0.01, false, 2, true);
  test_perturb<T>(m80, "[80 tensors]", 0.02, true, false, false, 0, false, 2, true);
  // the scale from a squared norm on the device: finite, zero, inf (scale 0) and NaN (scale 0)
  test_perturb<T>(kMix, "[mix]", 0.05, false, true, false, 0, false, 0, false, 3.7);
  test_perturb<T>(kMix, "[mix]", 0.05, true, true, true, 0.01, false, 1, false, 0.0);
  test_perturb<T>(kMix, "[mix]", 0.05, false, true, false, 0, false, 0, true, INFINITY);
  test_perturb<T>(kMix, "[mix]", 0.05, false, true, false, 0, false, 2, true, NAN);
  // restore
  test_restore<T>(kMix, "[mix]");
  test_restore<T>(m80, "[80 tensors]");
  // dot_norms
  test_dot_norms<T>(kMix, "[mix]");
  test_dot_norms<T>(m80, "[80 tensors]");
  test_dot_norms<T>(empty, "[all empty]");
  // combine
  test_combine<T>(kMix, "[mix]", 0.7, -1.3, false, false);
  test_combine<T>(kMix, "[mix]", 1.1, 0.25, true, false);
  test_combine<T>(kMix, "[mix]", 1.0, 0.0, false, true);
  test_combine<T>(kMix, "[mix]", 0.0, 1.0, true, true);
  test_combine<T>(kMix, "[mix]", 0.0, -0.5, false, true);
  test_combine<T>(kMix, "[mix]", 0.7, 0.0, true, true);
  test_combine<T>(m80, "[80 tensors]", -0.4, 2.0, false, false);
  // restore_sgd
  SgdCfg s;
  test_sgd<T>(kMix, "[mix]", s);  // plain SGD, no buffer
  s = {};
  s.wd = 1e-2, s.lr_ptr = true, s.coef = 0.5, s.coef_ptr = true, s.found_inf = 0;
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.9, s.init = true, s.wd = 5e-4, s.found_inf = 1;
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.9, s.dampening = 0.1, s.nesterov = true, s.wd = 1e-3, s.coef = 0.25, s.lr_ptr = true;
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.8, s.lr = 0.05, s.coef = 2.0, s.coef_ptr = true;
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.9, s.init = true, s.nesterov = true, s.dampening = 0.5, s.wd = 1e-3;  // init ignores dampening
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.9, s.init = true, s.nesterov = true, s.found_inf = 2;  // skipped init step: buffer zeros
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.9, s.dampening = 0.5, s.found_inf = 3;  // skipped (NaN flag): buffer untouched
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.found_inf = 4;  // skipped, no buffer
  test_sgd<T>(kMix, "[mix]", s);
  s = {};
  s.momentum = 0.9, s.nesterov = true, s.wd = 1e-4;
  test_sgd<T>(m80, "[80 tensors]", s);
  // restore_adamw
  AdamCfg a;
  test_adamw<T>(kMix, "[mix]", a);  // host bias corrections, t = 1
  a = {};
  a.step_ptr = true, a.t = 7, a.lr_ptr = true, a.coef = 0.5, a.coef_ptr = true, a.wd = 0.1, a.found_inf = 0;
  test_adamw<T>(kMix, "[mix]", a);
  a = {};
  a.b1 = 0.3, a.b2 = 0.5, a.t = 3, a.wd = 0, a.coef = 0.125;  // lerp weight >= 0.5: torch's other branch
  test_adamw<T>(kMix, "[mix]", a);
  a = {};
  a.step_ptr = true, a.t = 100, a.found_inf = 4;  // skipped
  test_adamw<T>(kMix, "[mix]", a);
  a = {};
  a.t = 12, a.found_inf = 3;  // skipped (NaN flag)
  test_adamw<T>(kMix, "[mix]", a);
  a = {};
  a.step_ptr = true, a.t = 2, a.found_inf = 1;  // -0: not skipped
  test_adamw<T>(m80, "[80 tensors]", a);
  // restore_adamw, torch.optim.Adam's L2 decay
  a = {};
  a.decoupled = false, a.wd = 0.1, a.t = 4;
  test_adamw<T>(kMix, "[mix]", a);
  a = {};
  a.decoupled = false, a.wd = 0.05, a.step_ptr = true, a.t = 9, a.lr_ptr = true, a.coef = 0.5, a.coef_ptr = true,
  a.found_inf = 0;
  test_adamw<T>(kMix, "[mix]", a);
  a = {};
  a.decoupled = false, a.wd = 0.1, a.step_ptr = true, a.t = 3, a.found_inf = 2;  // skipped
  test_adamw<T>(kMix, "[mix]", a);
  // restore_rmsprop
  RmspropCfg r;
  test_rmsprop<T>(kMix, "[mix]", r);  // plain, no buffer
  r = {};
  r.wd = 1e-2, r.lr_ptr = true, r.coef = 0.5, r.coef_ptr = true, r.found_inf = 0;
  test_rmsprop<T>(kMix, "[mix]", r);
  r = {};
  r.momentum = 0.9, r.wd = 1e-3, r.alpha = 0.9, r.coef = 0.25;
  test_rmsprop<T>(kMix, "[mix]", r);
  r = {};
  r.momentum = 0.5, r.lr_ptr = true, r.found_inf = 1;  // -0: not skipped
  test_rmsprop<T>(kMix, "[mix]", r);
  r = {};
  r.momentum = 0.9, r.found_inf = 3;  // skipped (NaN flag): v and buffer untouched
  test_rmsprop<T>(kMix, "[mix]", r);
  r = {};
  r.found_inf = 4;  // skipped, no buffer
  test_rmsprop<T>(kMix, "[mix]", r);
  r = {};
  r.momentum = 0.9, r.wd = 1e-4;
  test_rmsprop<T>(m80, "[80 tensors]", r);
}

// ------------------------------------------------------------------ a list of 1200 tensors
// 1200 tensors: every 10th empty, every 97th of 1-3 chunks and a few elements, the others of
// 1-700 elements; alignment rotating over tensors and lists (make_state). 1080 non-empty, 1104
// chunks. The launchers run on it (sq_norm and dot_norms not in every mode: see run_many),
// results against the reference, launch counts asserted as numbers (from the capacities
// kSmallCap / kLargeCap / kLargeOffCap / kSmallSeg / kLargeSeg):
//  * "large, offsets": arenas (a bucket's flat buffers), a CUDA >= 12.1 device: one launch per
//    table of 2317 (D=2), 1474 (D=4), 1247 (D=5) tensors: 1 each; sq_norm's per-tensor cleanup
//    (1200 segments > 1007) one large segment table: 1 + 1 + 1 = 3; dot_norms 1 + 1 = 2.
//  * "large, 8-byte addresses" (offsets refused by the hook), grid capped at 5 blocks (each block
//    runs ~220 chunks: the grid-stride loop): D=2 1 (1474), D=4 2 (853), D=5 2 (705).
//  * "4 KB only" (driver 11.8, or compute capability 6): ceil(1080 / 171) = 7 for D=2, / 99 = 11
//    for D=4, / 82 = 14 for D=5; sq_norm 7 + ceil(1200 / 1007) + 1 = 10; dot_norms 7 + 1 = 8.
std::vector<int64_t> many_tensors() {
  std::vector<int64_t> v;
  for (int i = 0; i < 1200; ++i)
    v.push_back(i % 10 == 3 ? 0 : i % 97 == 5 ? (1 + i % 3) * kChunk + i % 7 : 1 + (i * 37) % 700);
  return v;
}

struct ManyCounts {
  int sq_norm, perturb, restore, dot_norms, combine, sgd, adamw;
};

// reductions: 0 none, 1 sq_norm, 2 sq_norm and dot_norms (the slow ones to emulate: barriers and
// shuffles in every chunk, ~5 s each here)
template <typename T>
void test_many(const char* mode, const ManyCounts& n, int reductions) {
  const std::vector<int64_t> v = many_tensors();
  char set[120];
  std::snprintf(set, sizeof set, "[1200 tensors, %s]", mode);
  g_expect_launches = n.sq_norm;
  if (reductions >= 1) test_sq_norm<T>(v, set, true, 1, 0.01);
  g_expect_launches = n.perturb;
  test_perturb<T>(v, set, -0.07, true, true, true, 0.01, false, 2, false);
  g_expect_launches = n.restore;
  test_restore<T>(v, set);
  g_expect_launches = n.dot_norms;
  if (reductions >= 2) test_dot_norms<T>(v, set);
  g_expect_launches = n.combine;
  test_combine<T>(v, set, 0.7, -1.3, false, false);
  SgdCfg s;
  s.momentum = 0.9, s.nesterov = true, s.wd = 1e-4;
  g_expect_launches = n.sgd;
  test_sgd<T>(v, set, s);
  AdamCfg a;
  a.step_ptr = true, a.t = 3;
  g_expect_launches = n.adamw;
  test_adamw<T>(v, set, a);
  g_expect_launches = -1;
}

void run_many() {
  g_arena = true;
  test_many<float>("large, offsets", {3, 1, 1, 2, 1, 1, 1}, 2);
  test_many<__nv_bfloat16>("large, offsets", {3, 1, 1, 2, 1, 1, 1}, 0);  // 8 elements per 16 bytes
  table_hooks().offsets = false;
  table_hooks().max_grid = 5;
  test_many<float>("large, 8-byte addresses, grid 5", {3, 2, 1, 2, 1, 2, 2}, 1);
  table_hooks() = TableHooks{};
  emu::set_device(11080, 9);
  test_many<float>("4 KB only: driver 11.8", {10, 11, 7, 8, 7, 11, 14}, 1);
  emu::set_device(12080, 6);
  g_expect_launches = 11;
  test_perturb<__half>(many_tensors(), "[1200 tensors, 4 KB only: compute capability 6]", 0.3, false, true, false, 0,
                       false, 2, false);
  g_expect_launches = -1;
  emu::set_device(12080, 9);
  g_arena = false;
}

// ------------------------------------------------------------------ formats change no bit
// sq_norm (per-tensor and total, with partials) and dot_norms over 300 tensors (some of several
// chunks, some unaligned) give the same bits in every table format and grid: large tables with
// offsets (arenas), with 8-byte addresses, with a 3-block grid, and the 4 KB tables (2 launches).
void test_formats_same_bits() {
  using T = float;
  std::vector<int64_t> numel = many(300, 2000);
  numel[7] = 3 * kChunk + 5;
  numel[250] = kChunk + 1;
  g_arena = true;
  State<T> s0 = make_state<T>(numel, 2);
  g_arena = false;
  fill(s0.list[0], normal);
  fill(s0.list[1], normal);
  const int64_t nch = num_chunks(numel.data(), static_cast<int64_t>(numel.size()));
  const int kp = scratch<T>(s0, nch), kper = scratch<T>(s0, numel.size()), ktot = scratch<T>(s0, 1);
  const int kdp = scratch<T>(s0, 3 * nch), kdo = scratch<T>(s0, 3);
  struct Mode {
    const char* name;
    int driver;
    bool offsets;
    int grid;
  } modes[] = {{"large, offsets", 12080, true, kMaxGrid},
               {"large, 8-byte addresses", 12080, false, kMaxGrid},
               {"large, 8-byte addresses, grid 3", 12080, false, 3},
               {"4 KB only", 11080, true, kMaxGrid}};
  std::vector<State<T>> out;
  Check c;
  std::string counts;
  for (const Mode& m : modes) {
    const uint64_t l0 = emu::stats().launches;
    emu::set_device(m.driver, 9);
    table_hooks().offsets = m.offsets;
    table_hooks().max_grid = m.grid;
    State<T> s = s0;
    if (sq_norm(DType::kFloat32, s.view(), Scalar{nullptr, 0.01}, s.s(kp), s.s(kper), s.s(ktot), nullptr) != cudaSuccess ||
        dot_norms(DType::kFloat32, s.view(), s.s(kdp), s.s(kdo), nullptr) != cudaSuccess)
      c.fail(std::string(m.name) + ": a launcher failed");
    if (!s.guards_ok()) c.fail(std::string(m.name) + ": a guard byte was overwritten");
    if (!out.empty() && !s.same(out[0])) c.fail(std::string(m.name) + ": other bits than " + modes[0].name);
    counts += (counts.empty() ? "" : "/") + std::to_string(emu::stats().launches - l0);
    out.push_back(std::move(s));
  }
  emu::set_device(12080, 9);
  table_hooks() = TableHooks{};
  ++g_cases;
  if (c.bad) ++g_failed;
  // launches (sq_norm + dot_norms): 3 + 2 in the large tables, 2 + 1 + 1 + 2 + 1 in the 4 KB ones
  if (counts != "5/5/5/7") c.fail("launches " + counts + ", expected 5/5/5/7");
  std::printf("%-4s  fp32  sq_norm, dot_norms: the same bits in every table format and grid [300 tensors] launches=%s%s\n",
              c.bad ? "FAIL" : "ok", counts.c_str(), c.msgs.c_str());
  std::fflush(stdout);
}

// ------------------------------------------------------------------ the emulator itself
// Shuffle and barrier semantics on a tiny kernel, and a divergent __syncthreads caught as a deadlock.
void shfl_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  __shared__ int smem[64];
  smem[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
  __syncthreads();
  const int v = smem[(threadIdx.x + 1) % blockDim.x];  // written by another thread before the barrier
  const int d = __shfl_down_sync(0xffffffffu, v, 5);
  const int u = __shfl_up_sync(0xffffffffu, v, 3);
  const int x = __shfl_xor_sync(0xffffffffu, v, 1, 8);
  const int i = __shfl_sync(0xffffffffu, v, 2, 16);
  out[threadIdx.x * 4 + 0] = d;
  out[threadIdx.x * 4 + 1] = u;
  out[threadIdx.x * 4 + 2] = x;
  out[threadIdx.x * 4 + 3] = i;
  (void)lane;
}

void divergent_kernel(int*) {
  if (threadIdx.x < 16) __syncthreads();
}

int emulator_self_test() {
  int bad = 0;
  for (int sched = 0; sched < 3; ++sched) {
    emu::set_schedule(static_cast<emu::Schedule>(sched), 7);
    std::vector<int> out(64 * 4, -1);
    shfl_kernel | emu::Launch(1, 64) | emu::args(out.data());
    for (int t = 0; t < 64; ++t) {
      const int lane = t & 31, w = t & ~31;
      auto v = [&](int l) { return ((w + l + 1) % 64) * 3; };
      const int d = lane + 5 < 32 ? v(lane + 5) : v(lane);
      const int u = lane - 3 >= 0 ? v(lane - 3) : v(lane);
      const int x = v((lane ^ 1));
      const int i = v((lane & ~15) + 2);
      bad += out[t * 4] != d || out[t * 4 + 1] != u || out[t * 4 + 2] != x || out[t * 4 + 3] != i;
    }
  }
  emu::set_schedule(emu::Schedule::kAscending);
  shfl_kernel | emu::Launch(0, 64) | emu::args(static_cast<int*>(nullptr));
  bad += cudaGetLastError() != cudaErrorInvalidConfiguration;
  bad += cudaGetLastError() != cudaSuccess;
  // a divergent barrier must abort (in a child process)
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    if (!std::freopen("/dev/null", "w", stderr)) _exit(1);
    divergent_kernel | emu::Launch(1, 32) | emu::args(static_cast<int*>(nullptr));
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  bad += !(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
  std::printf("%-4s  emu   shuffles (down, up, xor, idx; widths 32/8/16), __syncthreads, launch errors, divergent-barrier abort\n",
              bad ? "FAIL" : "ok");
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("KERNELS_EMU_SEED")) seed = std::strtoull(s, nullptr, 10);
  if (argc > 1) seed = std::strtoull(argv[1], nullptr, 10);
  rng.seed(seed);
  std::printf("kernels_emu_test: seed %llu (KERNELS_EMU_SEED=%llu replays this run)\n", (unsigned long long)seed,
              (unsigned long long)seed);
  g_failed += emulator_self_test();
  run_dtype<float>();
  run_dtype<__half>();
  run_dtype<__nv_bfloat16>();
  run_dtype<double>();
  // more tensors than a small table holds (171 for D = 2): one large table (1 + 1 + 1 launches)
  test_sq_norm<float>(many(410, 40), "[410 tensors]", true, 2, 0.02);
  test_sq_norm<__nv_bfloat16>(many(410, 40), "[410 tensors]", false, 0, 0);
  // one tensor of 321 chunks (the old block map held 320): one launch whatever the chunk count, and
  // with the grid capped at 7 blocks, each block runs ~46 chunks (1 + 1 + 1 launches either way)
  test_sq_norm<__half>({5, 320 * kChunk + 11, 7}, "[321-chunk tensor]", true, 1, 0.01, 3);
  table_hooks().max_grid = 7;
  test_sq_norm<__half>({5, 320 * kChunk + 11, 7}, "[321-chunk tensor, grid 7]", true, 1, 0.01, 3);
  table_hooks() = TableHooks{};
  // lists of 1200 tensors, every table format
  run_many();
  test_formats_same_bits();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const emu::Stats st = emu::stats();
  std::printf("%d cases, %d failed; %llu launches, %llu blocks emulated in %.1f s\n%s\n", g_cases, g_failed,
              (unsigned long long)st.launches, (unsigned long long)st.blocks, s, g_failed ? "FAILED" : "ALL OK");
  return g_failed != 0;
}
