// Multi-tensor apply: one launch covers many tensors.
//
// The host packs, into a table passed BY VALUE as a kernel argument, the addresses of up to
// Table<D>::kMaxTensors tensors (D parallel lists) and a block -> (tensor, chunk) map of up to
// kMaxBlocks entries; each block handles one chunk of kChunk elements of one tensor. When
// either part of the table fills, the host launches and starts a new table (a tensor cut at
// that point continues in slot 0 of the next one). The table stays under the classic 4 KB
// kernel-parameter limit, so it works with every driver.
//
// Inside a chunk, a thread moves 16 bytes per list per step (4 fp32, 8 bf16/fp16, 2 fp64)
// when every address of the tensor is 16-byte aligned; a scalar loop does the tail and the
// unaligned case. Reductions write one partial per block (indexed by the block's global
// number over all launches) and a cleanup kernel sums them in a fixed order: no atomics, the
// same bits on every run.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sharpfused.h"

namespace sharpfused {

constexpr int kThreads = 512;   // threads per block, every kernel
constexpr int kMaxBlocks = 320; // blocks per launch (entries of the block map)

template <int D>
struct Table {
  static constexpr int kMaxTensors = D == 1 ? 110 : D == 2 ? 64 : D == 3 ? 48 : D == 4 ? 36 : 30;
  void* ptr[D][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  int64_t first_block;  // global number of this launch's block 0
};
static_assert(sizeof(Table<5>) <= 3600 && sizeof(Table<1>) <= 3600, "kernel arguments must stay under 4 KB");

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
template <int D, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const __grid_constant__ Table<D> tab, Op op) {
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = tab.numel[t] - start;
  op(tab, t, start, rest < kChunk ? rest : kChunk, tab.first_block + blockIdx.x);
}

// Packs the chunks of every non-empty tensor of `lists` (D lists; an unused list has a null host
// array and gives null addresses) into tables, calling launch(table, nblocks) each time one
// fills and once at the end. Host-only, so it can be tested without a GPU.
template <int D, typename Launch>
cudaError_t pack_tables(const Lists& lists, Launch&& launch) {
  constexpr int kMaxT = Table<D>::kMaxTensors;
  Table<D> tab;
  tab.first_block = 0;
  int nt = 0, nb = 0;
  auto flush = [&]() -> cudaError_t {
    cudaError_t err = launch(static_cast<const Table<D>&>(tab), nb);
    tab.first_block += nb;
    nb = 0;
    return err;
  };
  for (int64_t i = 0; i < lists.n; ++i) {
    const int64_t n = lists.numel[i];
    if (n == 0) continue;
    for (int d = 0; d < D; ++d) tab.ptr[d][nt] = lists.ptr[d] ? lists.ptr[d][i] : nullptr;
    tab.numel[nt] = n;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    bool flushed_with_tensor = false;
    for (int64_t c = 0; c < chunks; ++c) {
      tab.block_tensor[nb] = static_cast<unsigned char>(nt);
      tab.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last = c == chunks - 1;
      if (nb == kMaxBlocks || (last && nt + 1 == kMaxT)) {
        cudaError_t err = flush();
        if (err != cudaSuccess) return err;
        if (last) {
          nt = 0;
          flushed_with_tensor = true;
        } else {  // the rest of this tensor continues in slot 0
          for (int d = 0; d < D; ++d) tab.ptr[d][0] = tab.ptr[d][nt];
          tab.numel[0] = n;
          nt = 0;
        }
      }
    }
    if (!flushed_with_tensor) ++nt;
  }
  return nb > 0 ? flush() : cudaSuccess;
}

// Runs op over every chunk of every non-empty tensor of `lists`, one launch per table. Op:
// __device__ void operator()(const Table<D>&, int tensor, int64_t chunk_start, int64_t chunk_len,
// int64_t global_block) const.
template <int D, typename Op>
cudaError_t multi_tensor_apply(const Lists& lists, const Op& op, cudaStream_t stream) {
  return pack_tables<D>(lists, [&](const Table<D>& tab, int nb) -> cudaError_t {
    multi_tensor_kernel<D, Op><<<nb, kThreads, 0, stream>>>(tab, op);
    return cudaGetLastError();
  });
}

// ------------------------------------------------------------------ cleanup of reductions
constexpr int kMaxSegments = 400;
struct SegTable {
  int64_t begin[kMaxSegments + 1];  // rows [begin[b], begin[b + 1]) go to output row first_out + b
  int64_t first_out;
};

template <typename A, int C>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(const A* in, const __grid_constant__ SegTable tab, A* out) {
  const int64_t b = tab.begin[blockIdx.x], e = tab.begin[blockIdx.x + 1];
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

// out[k] = sum of rows [begin[k], begin[k+1]) of `in` (C values per row), k < nseg; an empty
// segment gives 0. `begin` is a host array of nseg + 1 offsets.
template <typename A, int C>
cudaError_t segment_sum(const A* in, const int64_t* begin, int64_t nseg, A* out, cudaStream_t stream) {
  SegTable tab;
  for (int64_t s0 = 0; s0 < nseg; s0 += kMaxSegments) {
    const int64_t k = nseg - s0 < kMaxSegments ? nseg - s0 : kMaxSegments;
    for (int64_t j = 0; j <= k; ++j) tab.begin[j] = begin[s0 + j];
    tab.first_out = s0;
    segment_sum_kernel<A, C><<<static_cast<unsigned>(k), kThreads, 0, stream>>>(in, tab, out);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
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
