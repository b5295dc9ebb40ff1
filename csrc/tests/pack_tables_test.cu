// Host-only test of the multi-tensor table packing (multi_tensor.cuh), run by .ci/compile_cuda.sh
// without a GPU: for every table format (small 4 KB with 8-byte addresses; large 32 KB with 8-byte
// addresses or 32-bit offsets), every chunk of every tensor lands in exactly one table entry,
// chunk numbers are consecutive over launches, each table's prefix sums, last-chunk lengths and
// addresses (decoded as the kernel decodes them) give back the tensor, empty tensors are left
// out, a table never exceeds its capacity; the choice of format follows the rule (small when it
// fits or the large parameter space is unavailable, offsets when the addresses allow); and the
// launch counts of model-shaped lists are the asserted numbers below.
#include <cstdio>
#include <random>
#include "../multi_tensor.cuh"
using namespace sharpfused;

namespace {

int g_bad = 0;

// capacities (tensors per table), written out: a change to the table layout must show here
constexpr int kSmall[6] = {0, 269, 171, 125, 99, 82};
constexpr int kLarge[6] = {0, 2317, 1474, 1081, 853, 705};
constexpr int kLargeOff[6] = {0, 3244, 2317, 1802, 1474, 1247};
template <int D> constexpr bool caps_ok() {
  return SmallTable<D>::kMaxTensors == kSmall[D] && LargeTable<D>::kMaxTensors == kLarge[D] &&
         LargeOffsetTable<D>::kMaxTensors == kLargeOff[D];
}
static_assert(caps_ok<1>() && caps_ok<2>() && caps_ok<3>() && caps_ok<4>() && caps_ok<5>(), "table capacities changed");
static_assert(SmallSegTable::kMaxSegments == 1007 && LargeSegTable::kMaxSegments == 8174, "segment capacities changed");

// Fake device addresses of tensor i in list d. spread: tensor i of list d at d << 44 + (i+1) << 40
// (no offsets possible); else packed like a flat buffer per list, 4-byte aligned (fp32), list d at d << 44.
struct Fake {
  std::vector<void*> ptr[5];
  Lists l{};
};
Fake fake(const std::vector<int64_t>& numel, int D, bool spread) {
  Fake f;
  const int64_t n = static_cast<int64_t>(numel.size());
  for (int d = 0; d < D; ++d) {
    uint64_t at = (uint64_t(d + 1) << 44) + 256 * d;
    for (int64_t i = 0; i < n; ++i) {
      f.ptr[d].push_back(reinterpret_cast<void*>(spread ? (uint64_t(d + 1) << 44) + (uint64_t(i + 1) << 40) : at));
      at += 4 * numel[i] + 4 * (i % 3);  // some tensors 4 bytes off 16-byte alignment
    }
  }
  f.l.n = n;
  f.l.numel = numel.data();
  for (int d = 0; d < D; ++d) f.l.ptr[d] = f.ptr[d].data();
  return f;
}

// Packs with table type Tab and checks everything; returns the launch count (-1 on a failure).
template <typename Tab>
int check_pack(const std::vector<int64_t>& numel, const Fake& f, const AddrCode<Tab::kLists>& code) {
  constexpr int D = Tab::kLists;
  const int64_t n = static_cast<int64_t>(numel.size());
  std::vector<std::vector<int64_t>> cover(n);
  for (int64_t i = 0; i < n; ++i) cover[i].assign((numel[i] + kChunk - 1) / kChunk, 0);
  // which tensor an address of list 0 belongs to
  int64_t next_chunk = 0, cursor = 0;
  int launches = 0, bad = 0;
  const cudaError_t err = pack_tables<Tab>(f.l, code, [&](const Tab& tab, int32_t nc) -> cudaError_t {
    ++launches;
    if (tab.first_chunk != next_chunk || nc <= 0 || tab.ntensors < 1 || tab.ntensors > Tab::kMaxTensors ||
        tab.chunk_begin[0] != 0 || tab.chunk_begin[tab.ntensors] != nc)
      ++bad;
    next_chunk += nc;
    for (int t = 0; t < tab.ntensors; ++t) {
      while (cursor < n && numel[cursor] == 0) ++cursor;  // tensors come in list order, empty ones left out
      if (cursor >= n) { ++bad; break; }
      const int64_t i = cursor++;
      for (int d = 0; d < D; ++d)
        if (tab.ptr(d, t) != f.ptr[d][i]) ++bad;
      const int64_t chunks = tab.chunk_begin[t + 1] - tab.chunk_begin[t];
      if (chunks <= 0 || (chunks - 1) * kChunk + tab.last_len_m1[t] + 1 != numel[i]) { ++bad; continue; }
      for (int64_t c = 0; c < chunks; ++c) cover[i].at(c) += 1;
    }
    return cudaSuccess;
  });
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i)
    for (auto c : cover[i]) {
      bad += c != 1;
      ++total;
    }
  if (err != cudaSuccess || next_chunk != num_chunks(numel.data(), n) || total != next_chunk) ++bad;
  g_bad += bad != 0;
  return bad ? -1 : launches;
}

// Launches of one call as multi_tensor_apply makes them, checked, with the format it picks.
template <int D>
int launches(const std::vector<int64_t>& numel, bool large, bool spread, TableKind* kind_out = nullptr) {
  const Fake f = fake(numel, D, spread);
  const AddrCode<D> code = addr_code<D>(f.l);
  const TableKind kind = table_kind<D>(f.l, large, code);
  if (kind_out) *kind_out = kind;
  switch (kind) {
    case TableKind::kSmall: return check_pack<SmallTable<D>>(numel, f, code);
    case TableKind::kLarge: return check_pack<LargeTable<D>>(numel, f, code);
    case TableKind::kLargeOffsets: return check_pack<LargeOffsetTable<D>>(numel, f, code);
  }
  return -1;
}

// every format, whatever the rule would pick
template <int D>
void all_formats(const std::vector<int64_t>& numel) {
  const Fake spread = fake(numel, D, true), flat = fake(numel, D, false);
  check_pack<SmallTable<D>>(numel, spread, addr_code<D>(spread.l));
  check_pack<LargeTable<D>>(numel, spread, addr_code<D>(spread.l));
  const AddrCode<D> code = addr_code<D>(flat.l);
  if (!code.offsets) ++g_bad;  // a flat layout must take offsets
  check_pack<LargeOffsetTable<D>>(numel, flat, code);
  int64_t nonempty = 0;
  for (int64_t x : numel) nonempty += x != 0;
  if (nonempty >= 2 && addr_code<D>(spread.l).offsets) ++g_bad;  // 2^40 apart: no offsets
}

void expect(const char* what, int got, int want) {
  const bool ok = got == want;
  g_bad += !ok;
  std::printf("%-64s launches=%d%s %s\n", what, got, ok ? "" : (" expected " + std::to_string(want)).c_str(),
              ok ? "ok" : "FAIL");
}

int64_t prod(std::initializer_list<int64_t> s) {
  int64_t p = 1;
  for (int64_t x : s) p *= x;
  return p;
}

// bench/shapes.py's resnet50() and gpt2_small(), as element counts
std::vector<int64_t> resnet50() {
  std::vector<int64_t> v = {prod({64, 3, 7, 7}), 64, 64};
  int64_t cin = 64;
  const int64_t stages[4][2] = {{64, 3}, {128, 4}, {256, 6}, {512, 3}};
  for (const auto& st : stages) {
    const int64_t w = st[0];
    for (int64_t i = 0; i < st[1]; ++i) {
      for (int64_t x : {w * cin, w, w, w * w * 9, w, w, w * 4 * w, w * 4, w * 4}) v.push_back(x);
      if (i == 0)
        for (int64_t x : {w * 4 * cin, w * 4, w * 4}) v.push_back(x);
      cin = w * 4;
    }
  }
  v.push_back(1000 * 2048);
  v.push_back(1000);
  return v;
}
std::vector<int64_t> gpt2_small() {
  const int64_t d = 768;
  std::vector<int64_t> v = {50257 * d, 1024 * d};
  for (int l = 0; l < 12; ++l)
    for (int64_t x : {d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d}) v.push_back(x);
  v.push_back(d);
  v.push_back(d);
  return v;
}
// 1200 tensors: mostly small (1-3000 elements), every 10th empty, every 97th of 1-3 chunks and a bit
std::vector<int64_t> many_small(int n) {
  std::vector<int64_t> v;
  for (int i = 0; i < n; ++i)
    v.push_back(i % 10 == 3 ? 0 : i % 97 == 5 ? (1 + i % 3) * kChunk + i % 7 : 1 + (i * 37) % 3000);
  return v;
}

}  // namespace

int main() {
  std::mt19937_64 rng(1);
  // random lists, every format
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<int64_t> numel;
    const int n = 1 + rng() % 3000;
    for (int i = 0; i < n; ++i) {
      const int kind = rng() % 5;
      numel.push_back(kind == 0 ? 0 : kind == 1 ? 1 + rng() % 100 : kind == 2 ? kChunk * (1 + rng() % 3)
                      : kind == 3 ? 1 + rng() % (kChunk * 5) : 1 + rng() % 4000);
    }
    all_formats<1>(numel);
    all_formats<2>(numel);
    all_formats<4>(numel);
    all_formats<5>(numel);
  }
  all_formats<5>({0, 0, 0});
  all_formats<2>(std::vector<int64_t>(5000, 7));
  all_formats<1>({kChunk * 2000 + 1, 3});  // one tensor of more chunks than the grid holds at once
  std::printf("random lists (and all empty, 5000 tiny, one of 2000 chunks), every table format: %s\n",
              g_bad ? "FAIL" : "ok");

  // model-shaped lists. D: 1 sq_norm / restore-like reads; 2 sq_norm(w), dot_norms, combine, restore;
  // 4 perturb, restore_sgd; 5 restore_adamw. Old packing (110/64/36/30 tensors and 320 chunks a
  // table) took: ResNet-50 D=2 3, D=4 5, D=5 6; GPT-2 D=2 7, D=4 7, D=5 7; 1200 small D=2 17, D=5 37.
  const std::vector<int64_t> rn = resnet50(), gpt = gpt2_small(), ms = many_small(1200);
  int64_t rn_el = 0, gpt_el = 0;
  for (int64_t x : rn) rn_el += x;
  for (int64_t x : gpt) gpt_el += x;
  if (rn.size() != 161 || rn_el != 25557032 || gpt.size() != 148 || gpt_el != 124439808) {
    std::printf("model shapes differ from bench/shapes.py FAIL\n");
    ++g_bad;
  }
  TableKind k;
  // CUDA >= 12.1 driver and device (large parameters):
  //  ResNet-50 (161 tensors): D <= 2 fit a small table (269, 171); D = 4, 5 a large one (853 / 1474)
  expect("resnet50 D=1 large params (small table, 269)", launches<1>(rn, true, true), 1);
  expect("resnet50 D=2 large params (small table, 171)", launches<2>(rn, true, true), 1);
  expect("resnet50 D=4 large params, spread addresses (large, 853)", launches<4>(rn, true, true, &k), 1);
  g_bad += k != TableKind::kLarge;
  expect("resnet50 D=5 large params, flat buffers (offsets, 1247)", launches<5>(rn, true, false, &k), 1);
  g_bad += k != TableKind::kLargeOffsets;
  //  GPT-2 small (148 tensors, 1995 chunks): one launch whatever the chunk count
  expect("gpt2 D=1 large params (small table, 269)", launches<1>(gpt, true, true), 1);
  expect("gpt2 D=2 large params (small table, 171)", launches<2>(gpt, true, true), 1);
  expect("gpt2 D=4 large params (large, 853)", launches<4>(gpt, true, true), 1);
  expect("gpt2 D=5 large params (large, 705)", launches<5>(gpt, true, true), 1);
  //  1200 small tensors (1080 non-empty): offsets (3244..1247) one launch; 8-byte addresses: D <= 2
  //  one (2317, 1474), D = 4 two (853), D = 5 two (705)
  expect("1200 small D=1 large params, spread (large, 2317)", launches<1>(ms, true, true), 1);
  expect("1200 small D=2 large params, spread (large, 1474)", launches<2>(ms, true, true), 1);
  expect("1200 small D=4 large params, spread (large, 853)", launches<4>(ms, true, true), 2);
  expect("1200 small D=5 large params, spread (large, 705)", launches<5>(ms, true, true), 2);
  expect("1200 small D=4 large params, flat (offsets, 1474)", launches<4>(ms, true, false), 1);
  expect("1200 small D=5 large params, flat (offsets, 1247)", launches<5>(ms, true, false), 1);
  // the classic 4 KB only (older driver or device): ceil(non-empty / small capacity)
  expect("resnet50 D=1 4 KB only (269)", launches<1>(rn, false, false), 1);
  expect("resnet50 D=2 4 KB only (171)", launches<2>(rn, false, false), 1);
  expect("resnet50 D=4 4 KB only (99)", launches<4>(rn, false, false), 2);
  expect("resnet50 D=5 4 KB only (82)", launches<5>(rn, false, false), 2);
  expect("gpt2 D=1 4 KB only (269)", launches<1>(gpt, false, false), 1);
  expect("gpt2 D=2 4 KB only (171)", launches<2>(gpt, false, false), 1);
  expect("gpt2 D=4 4 KB only (99)", launches<4>(gpt, false, false), 2);
  expect("gpt2 D=5 4 KB only (82)", launches<5>(gpt, false, false), 2);
  expect("1200 small D=1 4 KB only (269: ceil(1080/269))", launches<1>(ms, false, false), 5);
  expect("1200 small D=2 4 KB only (171: ceil(1080/171))", launches<2>(ms, false, false), 7);
  expect("1200 small D=4 4 KB only (99: ceil(1080/99))", launches<4>(ms, false, false), 11);
  expect("1200 small D=5 4 KB only (82: ceil(1080/82))", launches<5>(ms, false, false), 14);
  std::printf(g_bad ? "FAILED\n" : "ALL OK\n");
  return g_bad != 0;
}
