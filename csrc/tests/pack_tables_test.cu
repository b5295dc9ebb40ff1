// Host-only test of pack_tables (the multi-tensor table packing), run by .ci/compile_cuda.sh without a GPU:
// every chunk of every tensor lands in exactly one block, block numbers are consecutive over launches,
// addresses and sizes of all D lists follow their tensor, empty tensors give no block.
#include <cstdio>
#include <random>
#include "../multi_tensor.cuh"
using namespace sharpfused;
template <int D> int run(std::vector<int64_t> numel) {
  int64_t n = numel.size();
  std::vector<void*> ptr[D];
  // fake addresses: tensor i starts at (i+1) << 40 (bytes of 1-byte elements)
  for (int d = 0; d < D; ++d) for (int64_t i = 0; i < n; ++i) ptr[d].push_back(reinterpret_cast<void*>(((i + 1) << 40) + (int64_t(d) << 36)));
  Lists l{}; l.n = n; l.numel = numel.data(); for (int d = 0; d < D; ++d) l.ptr[d] = ptr[d].data();
  std::vector<std::vector<int64_t>> cover(n);
  for (int64_t i = 0; i < n; ++i) cover[i].assign((numel[i] + kChunk - 1) / kChunk, 0);
  int64_t next_block = 0; int launches = 0; int bad = 0;
  pack_tables<D>(l, [&](const Table<D>& tab, int nb) -> cudaError_t {
    ++launches;
    if (tab.first_block != next_block || nb <= 0 || nb > kMaxBlocks) ++bad;
    next_block += nb;
    for (int b = 0; b < nb; ++b) {
      int t = tab.block_tensor[b];
      if (t >= Table<D>::kMaxTensors) { ++bad; continue; }
      int64_t i = (reinterpret_cast<int64_t>(tab.ptr[0][t]) >> 40) - 1;
      for (int d = 1; d < D; ++d) if (reinterpret_cast<int64_t>(tab.ptr[d][t]) != ((i + 1) << 40) + (int64_t(d) << 36)) ++bad;
      if (tab.numel[t] != numel[i]) ++bad;
      cover[i].at(tab.block_chunk[b]) += 1;
    }
    return cudaSuccess;
  });
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) for (auto c : cover[i]) { bad += c != 1; ++total; }
  if (next_block != num_chunks(numel.data(), n) || total != next_block) ++bad;
  printf("D=%d tensors=%lld chunks=%lld launches=%d %s\n", D, (long long)n, (long long)next_block, launches, bad ? "FAIL" : "ok");
  return bad;
}
int main() {
  std::mt19937_64 rng(1);
  int bad = 0;
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<int64_t> numel;
    int n = 1 + rng() % 400;
    for (int i = 0; i < n; ++i) {
      int kind = rng() % 5;
      numel.push_back(kind == 0 ? 0 : kind == 1 ? 1 + rng() % 100 : kind == 2 ? kChunk * (1 + rng() % 3) : kind == 3 ? 1 + rng() % (kChunk * 5) : 1 + rng() % (kChunk * 700));
    }
    bad += run<1>(numel) + run<2>(numel) + run<4>(numel) + run<5>(numel);
  }
  bad += run<5>({0, 0, 0}) + run<2>(std::vector<int64_t>(1000, 7)) + run<1>({kChunk * 320}) + run<1>({kChunk * 321 + 1, 3});
  printf(bad ? "FAILED\n" : "ALL OK\n");
  return bad != 0;
}
