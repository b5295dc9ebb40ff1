// Multi-tensor apply: one launch covers many tensors.
//
// The host packs, into a table passed BY VALUE as a `__grid_constant__` kernel argument, per
// tensor: its address in each of the D parallel lists, the number of its first chunk and the
// length of its last chunk (a chunk is kChunk elements). Block b of a launch handles chunks
// b, b + gridDim.x, ... of the launch; it finds a chunk's tensor by binary search over the
// first-chunk prefix sums, so a launch holds any number of chunks and the grid need not equal
// the chunk count. Only the number of tensors is bounded, by the kernel-parameter space:
//
//  * the classic 4 KB (every driver): the "small" table, 8-byte addresses;
//  * 32764 bytes, with CUDA >= 12.1 (toolkit at build time; driver r530+ and a Volta or newer
//    device, checked at run time on each call): the "large" tables, used when a list does not
//    fit one small table. Their addresses are 4-byte offsets from a per-list base (in units of
//    the largest power of two up to 16 bytes dividing every distance to the base) when all the
//    list's addresses lie within 2^32 such units of each other (a bucket's flat buffers, the
//    caching allocator's segments), else 8-byte addresses.
//
// When a table fills, the host launches it and starts the next one (the tensors are whole in
// every table). Per-tensor bytes: 8D + 6 (8-byte addresses) or 4D + 6 (offsets); capacities below.
//
// Inside a chunk, a thread moves 16 bytes per list per step (4 fp32, 8 bf16/fp16, 2 fp64)
// when every address of the tensor is 16-byte aligned; a scalar loop does the tail and the
// unaligned case. Reductions write one partial per chunk (indexed by the chunk's global number
// over all tensors of the call, whatever block or launch runs it) and a cleanup kernel sums
// them in a fixed order: no atomics, the same bits on every run, on every table format.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sharpfused.h"

namespace sharpfused {

constexpr int kThreads = 512;  // threads per block, every kernel

// Kernel-parameter space: the classic limit, and the CUDA >= 12.1 one (Volta+, driver r530+).
constexpr int kClassicParamBytes = 4096;
constexpr int kLargeParamBytes = 32764;
// The large tables are compiled with a CUDA >= 12.1 toolkit. Every device arch built must then be
// sm_70 or newer (nvcc refuses > 4 KB of parameters below Volta); a build for older archs passes
// -DSHARPFUSED_LARGE_PARAMS=0 and keeps the 4 KB tables only.
#ifndef SHARPFUSED_LARGE_PARAMS
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
#define SHARPFUSED_LARGE_PARAMS 1
#else
#define SHARPFUSED_LARGE_PARAMS 0
#endif
#endif
// Room left beside a table for the kernel's other argument, the op (checked per op).
constexpr int kOpBytes = 256;
// Chunks one launch may hold (a first-chunk number is an int32).
constexpr int32_t kMaxLaunchChunks = int32_t(1) << 30;
// Grid cap: a launch of more chunks grid-strides (blocks take several chunks each).
constexpr int kMaxGrid = 65535;

// Table of up to kMaxTensors tensors of D parallel lists, `Bytes` of parameter space with the op.
// Offsets: addresses as 32-bit offsets from base[d] in units of 2^shift[d] bytes.
template <int D, int Bytes, bool Offsets>
struct Table {
  static constexpr int kLists = D;
  static constexpr int kBytes = Bytes;
  static constexpr bool kOffsets = Offsets;
  using Addr = std::conditional_t<Offsets, uint32_t, uintptr_t>;
  static constexpr int kPerTensor = D * static_cast<int>(sizeof(Addr)) + 4 + 2;
  static constexpr int kHeader = 64;  // first_chunk, bases, shifts, ntensors, the extra prefix entry, padding
  static constexpr int kMaxTensors = (Bytes - kOpBytes - kHeader) / kPerTensor;

  Addr addr[D][kMaxTensors];
  int64_t first_chunk;                       // global number of this table's chunk 0
  char* base[Offsets ? D : 1];               // Offsets: per-list base (nullptr: list unused)
  int32_t ntensors;                          // >= 1
  int32_t chunk_begin[kMaxTensors + 1];      // tensor t: chunks [chunk_begin[t], chunk_begin[t + 1])
  uint16_t last_len_m1[kMaxTensors];         // elements in tensor t's last chunk, minus 1
  unsigned char shift[Offsets ? D : 1];

  __host__ __device__ __forceinline__ void* ptr(int d, int t) const {
    if constexpr (Offsets) {
      return base[d] ? static_cast<void*>(base[d] + (static_cast<uint64_t>(addr[d][t]) << shift[d])) : nullptr;
    } else {
      return reinterpret_cast<void*>(addr[d][t]);
    }
  }
};

template <int D> using SmallTable = Table<D, kClassicParamBytes, false>;
template <int D> using LargeTable = Table<D, kLargeParamBytes, false>;
template <int D> using LargeOffsetTable = Table<D, kLargeParamBytes, true>;

#define SHARPFUSED_CHECK_TABLE(D)                                                                      \
  static_assert(sizeof(SmallTable<D>) + kOpBytes <= kClassicParamBytes, "small table over 4 KB");      \
  static_assert(sizeof(LargeTable<D>) + kOpBytes <= kLargeParamBytes, "large table over 32764 B");     \
  static_assert(sizeof(LargeOffsetTable<D>) + kOpBytes <= kLargeParamBytes, "large table over 32764 B");
SHARPFUSED_CHECK_TABLE(1)
SHARPFUSED_CHECK_TABLE(2)
SHARPFUSED_CHECK_TABLE(3)
SHARPFUSED_CHECK_TABLE(4)
SHARPFUSED_CHECK_TABLE(5)
#undef SHARPFUSED_CHECK_TABLE

// The addresses of one tensor in the D lists, as an op sees them.
template <int D>
struct Ptrs {
  void* ptr[D];
};

// Test hooks (csrc/tests): lower the grid cap to run the grid-stride loop, or refuse the offset
// format, so the emulator runs every table format and schedule. Not for production use.
struct TableHooks {
  int max_grid = kMaxGrid;
  bool offsets = true;
};
inline TableHooks& table_hooks() {
  static TableHooks h;
  return h;
}

// True when the current device takes kernel parameters up to kLargeParamBytes: built with CUDA
// >= 12.1, driver >= 12.1 (r530), compute capability >= 7.0. Host queries only (no sync, fine
// inside stream capture); asked on each call, so a call on another device gets its own answer.
inline bool large_params_available() {
#if SHARPFUSED_LARGE_PARAMS
  int dev = 0, driver = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDriverGetVersion(&driver) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query is not a launch error of ours
    return false;
  }
  return driver >= 12010 && major >= 7;
#else
  return false;
#endif
}

// ------------------------------------------------------------------ types
// opmath: float for fp32/bf16/fp16, double for fp64
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using acc_t = typename OpMath<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A per-step value: read from device memory when given there (graph capture), else by value.
template <typename A>
struct DevScalar {
  const A* ptr;
  A value;
  __device__ __forceinline__ A get() const { return ptr ? *ptr : value; }
};
template <typename A>
inline DevScalar<A> dev_scalar(Scalar s) {
  return DevScalar<A>{static_cast<const A*>(s.ptr), static_cast<A>(s.value)};
}

// ------------------------------------------------------------------ element access
template <typename T>
__host__ __device__ constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int K> struct Width { static constexpr int value = K; };

// K consecutive elements at p, converted to opmath (K == 1 or the 16-byte width).
template <int K, typename T>
__device__ __forceinline__ void load(acc_t<T> (&r)[K], const T* p) {
  Pack<T, K> pk = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
  for (int k = 0; k < K; ++k) r[k] = to_acc(pk.v[k]);
}

template <int K, typename T>
__device__ __forceinline__ void store(T* p, const acc_t<T> (&r)[K]) {
  Pack<T, K> pk;
#pragma unroll
  for (int k = 0; k < K; ++k) pk.v[k] = from_acc<T>(r[k]);
  *reinterpret_cast<Pack<T, K>*>(p) = pk;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Calls f(Width<K>{}, i) for the elements [i, i + K) of a chunk of `len` elements, split over
// the block: K = 16-byte width on the aligned body when `vec`, K = 1 for the rest.
template <typename T, typename F>
__device__ __forceinline__ void for_chunk(int64_t len, bool vec, F&& f) {
  constexpr int N = vec_width<T>();
  int64_t i0 = 0;
  if (vec) {
    const int64_t nvec = len / N;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) f(Width<N>{}, v * N);
    i0 = nvec * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < len; i += blockDim.x) f(Width<1>{}, i);
}

// ------------------------------------------------------------------ deterministic block sum
// Sums C values per thread over the block; the result is valid in thread 0. Fixed tree.
template <int C, typename A>
__device__ __forceinline__ void block_sum(A (&v)[C]) {
  __shared__ A smem[C][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], o);
  if (lane == 0)
#pragma unroll
    for (int c = 0; c < C; ++c) smem[c][warp] = v[c];
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      v[c] = lane < nwarps ? smem[c][lane] : A(0);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], o);
    }
  }
}

// ------------------------------------------------------------------ apply
// Block b runs chunks b, b + gridDim.x, ... of the table; a chunk's tensor is the last t with
// chunk_begin[t] <= chunk (binary search; the same answer in every thread, so no divergence).
template <typename Tab, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const __grid_constant__ Tab tab, Op op) {
  constexpr int D = Tab::kLists;
  const int32_t nchunks = tab.chunk_begin[tab.ntensors];
  for (int32_t c = static_cast<int32_t>(blockIdx.x); c < nchunks; c += static_cast<int32_t>(gridDim.x)) {
    int lo = 0, hi = tab.ntensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tab.chunk_begin[mid] <= c) lo = mid; else hi = mid - 1;
    }
    const int t = lo;
    const bool last = c + 1 == tab.chunk_begin[t + 1];
    const int64_t len = last ? static_cast<int64_t>(tab.last_len_m1[t]) + 1 : kChunk;
    Ptrs<D> p;
#pragma unroll
    for (int d = 0; d < D; ++d) p.ptr[d] = tab.ptr(d, t);
    op(p, static_cast<int64_t>(c - tab.chunk_begin[t]) * kChunk, len, tab.first_chunk + c);
    // the op's shared memory (block_sum) is reused by this block's next chunk
    if (c + static_cast<int32_t>(gridDim.x) < nchunks) __syncthreads();
  }
}

// How the addresses of one call's lists are stored: 8-byte addresses, or 32-bit offsets from a
// per-list base (list d: base[d] + (offset << shift[d])) when every list fits.
template <int D>
struct AddrCode {
  bool offsets = false;
  char* base[D] = {};
  unsigned char shift[D] = {};
};

template <int D>
AddrCode<D> addr_code(const Lists& lists) {
  AddrCode<D> code;
  code.offsets = table_hooks().offsets;
  for (int d = 0; d < D && code.offsets; ++d) {
    if (!lists.ptr[d]) continue;  // an unused list: null addresses (base nullptr)
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    for (int64_t i = 0; i < lists.n; ++i) {
      if (lists.numel[i] == 0) continue;
      const uintptr_t a = reinterpret_cast<uintptr_t>(lists.ptr[d][i]);
      if (a == 0) code.offsets = false;  // a null address in a used list: stored as it is
      lo = a < lo ? a : lo;
      hi = a > hi ? a : hi;
    }
    if (!code.offsets || hi < lo) continue;  // (no non-empty tensor: nothing to store)
    int s = 4;  // the largest power of two up to 16 dividing every distance to lo
    for (int64_t i = 0; i < lists.n && s > 0; ++i)
      if (lists.numel[i] != 0)
        while (s > 0 && ((reinterpret_cast<uintptr_t>(lists.ptr[d][i]) - lo) & ((uintptr_t(1) << s) - 1)) != 0) --s;
    if (((hi - lo) >> s) > UINT32_MAX) code.offsets = false;
    code.base[d] = reinterpret_cast<char*>(lo);
    code.shift[d] = static_cast<unsigned char>(s);
  }
  return code;
}

// Packs every non-empty tensor of `lists` (D lists; an unused list has a null host array and
// gives null addresses) into tables of type Tab, calling launch(table, nchunks) each time one
// fills and once at the end. Host-only, so it can be tested without a GPU.
template <typename Tab, typename Launch>
cudaError_t pack_tables(const Lists& lists, const AddrCode<Tab::kLists>& code, Launch&& launch) {
  constexpr int D = Tab::kLists, kMaxT = Tab::kMaxTensors;
  Tab tab;
  tab.first_chunk = 0;
  if constexpr (Tab::kOffsets) {
    for (int d = 0; d < D; ++d) {
      tab.base[d] = lists.ptr[d] ? code.base[d] : nullptr;
      tab.shift[d] = code.shift[d];
    }
  }
  int nt = 0;
  int32_t nc = 0;
  auto flush = [&]() -> cudaError_t {
    tab.ntensors = nt;
    tab.chunk_begin[nt] = nc;
    const cudaError_t err = launch(static_cast<const Tab&>(tab), nc);
    tab.first_chunk += nc;
    nt = 0;
    nc = 0;
    return err;
  };
  for (int64_t i = 0; i < lists.n; ++i) {
    const int64_t n = lists.numel[i];
    if (n == 0) continue;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    if (chunks > kMaxLaunchChunks) return cudaErrorInvalidValue;
    if (nt == kMaxT || nc + chunks > kMaxLaunchChunks) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    for (int d = 0; d < D; ++d) {
      char* a = lists.ptr[d] ? static_cast<char*>(lists.ptr[d][i]) : nullptr;
      if constexpr (Tab::kOffsets) {
        tab.addr[d][nt] = a ? static_cast<uint32_t>(static_cast<uintptr_t>(a - code.base[d]) >> code.shift[d]) : 0u;
      } else {
        tab.addr[d][nt] = reinterpret_cast<uintptr_t>(a);
      }
    }
    tab.chunk_begin[nt] = nc;
    tab.last_len_m1[nt] = static_cast<uint16_t>(n - (chunks - 1) * kChunk - 1);
    nc += static_cast<int32_t>(chunks);
    ++nt;
  }
  return nt > 0 ? flush() : cudaSuccess;
}

// Which table a call uses: the small one when the list fits one (the cheapest launch) or when
// the large parameter space is unavailable; else a large one, offsets when they fit.
enum class TableKind { kSmall, kLarge, kLargeOffsets };

template <int D>
TableKind table_kind(const Lists& lists, bool large, const AddrCode<D>& code) {
  int64_t nonempty = 0;
  for (int64_t i = 0; i < lists.n; ++i) nonempty += lists.numel[i] != 0;
  if (!large || nonempty <= SmallTable<D>::kMaxTensors) return TableKind::kSmall;
  return code.offsets ? TableKind::kLargeOffsets : TableKind::kLarge;
}

// Calls pack_tables with the table type `kind` names (host-only, as pack_tables).
template <int D, typename Launch>
cudaError_t pack_tables_as(TableKind kind, const Lists& lists, const AddrCode<D>& code, Launch&& launch) {
  switch (kind) {
    case TableKind::kSmall: return pack_tables<SmallTable<D>>(lists, code, launch);
#if SHARPFUSED_LARGE_PARAMS
    case TableKind::kLarge: return pack_tables<LargeTable<D>>(lists, code, launch);
    case TableKind::kLargeOffsets: return pack_tables<LargeOffsetTable<D>>(lists, code, launch);
#else
    default: break;
#endif
  }
  return cudaErrorInvalidValue;
}

template <typename Tab, typename Op>
cudaError_t launch_table(const Tab& tab, int32_t nchunks, const Op& op, cudaStream_t stream) {
  static_assert(sizeof(Op) <= kOpBytes, "the op's parameters must fit beside the table");
  const int cap = table_hooks().max_grid;
  const unsigned grid = static_cast<unsigned>(nchunks < cap ? nchunks : cap);
  multi_tensor_kernel<Tab, Op><<<grid, kThreads, 0, stream>>>(tab, op);
  return cudaGetLastError();
}

// Runs op over every chunk of every non-empty tensor of `lists`, one launch per table. Op:
// __device__ void operator()(const Ptrs<D>& tensor, int64_t chunk_start, int64_t chunk_len,
// int64_t global_chunk) const.
template <int D, typename Op>
cudaError_t multi_tensor_apply(const Lists& lists, const Op& op, cudaStream_t stream) {
  const AddrCode<D> code = addr_code<D>(lists);
  const TableKind kind = table_kind<D>(lists, large_params_available(), code);
  switch (kind) {
    case TableKind::kSmall:
      return pack_tables<SmallTable<D>>(lists, code, [&](const SmallTable<D>& tab, int32_t nc) {
        return launch_table(tab, nc, op, stream);
      });
#if SHARPFUSED_LARGE_PARAMS
    case TableKind::kLarge:
      return pack_tables<LargeTable<D>>(lists, code, [&](const LargeTable<D>& tab, int32_t nc) {
        return launch_table(tab, nc, op, stream);
      });
    case TableKind::kLargeOffsets:
      return pack_tables<LargeOffsetTable<D>>(lists, code, [&](const LargeOffsetTable<D>& tab, int32_t nc) {
        return launch_table(tab, nc, op, stream);
      });
#else
    default: break;
#endif
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------ cleanup of reductions
// Segment b of a table: rows [first_row + begin[b], first_row + begin[b + 1]) -> output row first_out + b.
template <int Bytes>
struct SegTable {
  static constexpr int kBytes = Bytes;
  static constexpr int kMaxSegments = (Bytes - 64) / 4 - 1;
  int64_t first_row, first_out;
  int32_t begin[kMaxSegments + 1];
};
using SmallSegTable = SegTable<kClassicParamBytes>;
using LargeSegTable = SegTable<kLargeParamBytes>;
static_assert(sizeof(SmallSegTable) + 16 <= kClassicParamBytes, "segment table over 4 KB");
static_assert(sizeof(LargeSegTable) + 16 <= kLargeParamBytes, "segment table over 32764 B");

template <typename A, int C, typename Seg>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(const A* in, const __grid_constant__ Seg tab, A* out) {
  const int64_t b = tab.first_row + tab.begin[blockIdx.x], e = tab.first_row + tab.begin[blockIdx.x + 1];
  A s[C];
#pragma unroll
  for (int c = 0; c < C; ++c) s[c] = A(0);
  for (int64_t r = b + threadIdx.x; r < e; r += blockDim.x)
#pragma unroll
    for (int c = 0; c < C; ++c) s[c] += in[r * C + c];
  block_sum<C>(s);
  if (threadIdx.x == 0)
#pragma unroll
    for (int c = 0; c < C; ++c) out[(tab.first_out + blockIdx.x) * C + c] = s[c];
}

template <typename A, int C, typename Seg>
cudaError_t segment_sum_as(const A* in, const int64_t* begin, int64_t nseg, A* out, cudaStream_t stream) {
  Seg tab;
  for (int64_t s0 = 0; s0 < nseg; s0 += Seg::kMaxSegments) {
    const int64_t k = nseg - s0 < Seg::kMaxSegments ? nseg - s0 : Seg::kMaxSegments;
    if (begin[s0 + k] - begin[s0] > INT32_MAX) return cudaErrorInvalidValue;
    tab.first_row = begin[s0];
    for (int64_t j = 0; j <= k; ++j) tab.begin[j] = static_cast<int32_t>(begin[s0 + j] - begin[s0]);
    tab.first_out = s0;
    segment_sum_kernel<A, C, Seg><<<static_cast<unsigned>(k), kThreads, 0, stream>>>(in, tab, out);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// out[k] = sum of rows [begin[k], begin[k+1]) of `in` (C values per row), k < nseg; an empty
// segment gives 0. `begin` is a host array of nseg + 1 offsets. One launch per SmallSegTable
// (1007 segments) or, when more and the large parameter space is there, per LargeSegTable (8174).
template <typename A, int C>
cudaError_t segment_sum(const A* in, const int64_t* begin, int64_t nseg, A* out, cudaStream_t stream) {
#if SHARPFUSED_LARGE_PARAMS
  if (nseg > SmallSegTable::kMaxSegments && large_params_available())
    return segment_sum_as<A, C, LargeSegTable>(in, begin, nseg, out, stream);
#endif
  return segment_sum_as<A, C, SmallSegTable>(in, begin, nseg, out, stream);
}

// ------------------------------------------------------------------ dtype dispatch
// Calls fn(T{}) with T the element type of dt.
template <typename Fn>
cudaError_t dispatch(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat64: return fn(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace sharpfused
