// benchmarks/experiments/amx_prefill_shapes.cpp — the AMX prefill kernel's tile shapes, measured
// against each other: build it once per shape (the ATTNKIT_AMX_* macros of
// attention/detail/flash_prefill_amx.hpp) and alternate the binaries. Each run prints GFLOP/s
// (median of the repetitions) for Qwen3-0.6B heads, bf16 K/V, Precision::fast, causal T 2048
// and sliding T 32768 / W 512, 2 threads; the relative L2 of the output against the FMA kernel
// (exact); and a hash of the output bits, so shapes that must agree bit for bit can be checked.
// Arguments: repetitions (9), then optionally cases T:W[:C[:f32]] instead of the two default ones
// (C: keys in all, a continuation of T queries after C - T cached ones; f32: f32 K/V, stored
// head-major as KVCache keeps them, the timed calls rotating through >= 1 GiB of copies).
// 2026-12-04, one AMX host, items of 512 / 1024 / 2048 rows (ATTNKIT_AMX_ITEM_ROWS: a
// continuation packs every cached key once per item, so bigger items pack less), three
// alternated rounds each, GFLOP/s: 512 queries after 8192 keys (the model's prefill-after-depth
// case) with f32 K/V 769 828 1076 / 886 639 977 / 662 656 874, bf16 K/V 906 678 736 / 689 958
// 928 / 956 917 973; causal T 2048 768 749 711 / 564 786 832 / 755 730 931. No order beyond the
// host's noise between processes; alternated call by call in one process (amx_prefill_ab.cpp)
// 1024-row items won in every case, so the kernel's items are 1024 rows since.
// AMX_THREADS=1 runs the calls on one thread.
// Not built by CMake (needs an AMX CPU):
//   g++ -std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude \
//       [-DATTNKIT_AMX_ROWS=32 -DATTNKIT_AMX_4X1=0 ...] benchmarks/experiments/amx_prefill_shapes.cpp
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "attnkit/attention/prefill.hpp"

using namespace attnkit;

namespace {

constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;

// Threads per call: AMX_THREADS (default 2, the setting; 1 compares a core alone).
int threads() {
  const char* e = std::getenv("AMX_THREADS");
  return e && std::atoi(e) > 0 ? std::atoi(e) : 2;
}

// (query, key) pairs attended by T queries continuing a context of C - T keys (C = T: plain prefill).
double attended(std::int64_t T, std::int64_t W, std::int64_t C) {
  double n = 0;
  for (std::int64_t t = C - T; t < C; ++t) n += W > 0 ? std::min<std::int64_t>(t + 1, W) : t + 1;
  return n;
}

// Buffers from attnkit's allocator (core/memory.hpp: 2 MiB aligned and MADV_HUGEPAGE from 4
// MiB on), as attnkit-bench's (bench_data.hpp) and the model's workspace are. On 4 KiB pages
// (std::vector's) every query and output row of a sub-tile, 8 KiB apart, is a TLB miss: the
// same kernel on both, alternated in one process (amx_prefill_ab.cpp, AB_HUGE), 2026-12-06 on
// one AMX host: sliding T 32768 / W 512 1.068-1.089x faster on huge pages, causal T 2048
// 1.015-1.024x, 512 after 8192 keys 1.001-1.012x. Before that day this program's figures were
// on 4 KiB pages.
template <class T>
struct HugeAlloc {
  using value_type = T;
  HugeAlloc() = default;
  template <class U>
  HugeAlloc(const HugeAlloc<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(allocate_aligned(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <class U>
  bool operator==(const HugeAlloc<U>&) const { return true; }
};
template <class T>
using Vec = std::vector<T, HugeAlloc<T>>;

// K/V of C keys stored head-major ([H_kv, C, d], as KVCache keeps them), element type KV.
template <class KV>
void run(std::int64_t T, std::int64_t W, std::int64_t C, int reps) {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  Vec<float> q(T * kH * kD), out(q.size()), ref(q.size());
  Vec<KV> k(C * kHkv * kD), v(k.size());
  for (auto& x : q) x = nd(gen);
  for (auto& x : k) x = KV(nd(gen));
  for (auto& x : v) x = KV(nd(gen));
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  // A continuation's K/V come from DRAM in a model (one layer's cache of many): timed calls
  // rotate through copies filling >= 1 GiB, so they are not served from L3.
  const std::size_t kv_bytes = 2 * k.size() * sizeof(KV);
  const std::size_t copies = C > T ? std::max<std::size_t>(1, (std::size_t(1) << 30) / kv_bytes + 1) : 1;
  std::vector<Vec<KV>> ks(copies, k), vs(copies, v);
  std::size_t which = 0;
  ConstView3<KV> kv(k.data(), {C, kHkv, kD}, {kD, C * kD, 1}), vv(v.data(), {C, kHkv, kD}, {kD, C * kD, 1});
  AttentionOptions opt;
  opt.num_threads = threads();
  const auto call = [&](Vec<float>& o, Precision p) {
    opt.precision = p;
    kv.data = ks[which].data();
    vv.data = vs[which].data();
    which = (which + 1) % copies;
    const View3<float> ov(o.data(), {T, kH, kD});
    const auto t0 = std::chrono::steady_clock::now();
    if (W > 0) attention_prefill(qv, kv, vv, ov, SlidingWindowMask{W}, opt);
    else attention_prefill(qv, kv, vv, ov, CausalMask{}, opt);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  call(ref, Precision::exact);
  std::fill(out.begin(), out.end(), std::nanf(""));
  call(out, Precision::fast);
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) ts.push_back(call(out, Precision::fast));
  std::sort(ts.begin(), ts.end());
  double num = 0, den = 0;
  std::uint64_t hash = 1469598103934665603ull;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double d = double(out[i]) - ref[i];
    num += d * d;
    den += double(ref[i]) * ref[i];
    std::uint32_t b;
    std::memcpy(&b, &out[i], 4);
    hash = (hash ^ b) * 1099511628211ull;
  }
  const double flops = attended(T, W, C) * kH * 4.0 * kD;
  std::printf("%dt T %6lld W %4lld C %6lld %s  fast %7.1f GFLOP/s (min %.4f s, median %.4f s)  rel %.2e  hash %016llx%s\n",
              threads(), (long long)T, (long long)W, (long long)C, std::is_same_v<KV, float> ? "f32 " : "bf16", flops / ts[ts.size() / 2] * 1e-9, ts.front(), ts[ts.size() / 2],
              std::sqrt(num / den), (unsigned long long)hash, std::isfinite(num) ? "" : "  NaN!");
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 9;
#if defined(ATTNKIT_AMX) && defined(ATTNKIT_AMX_ROWS)
  std::printf("keys %d rows %d item %d\n", ATTNKIT_AMX_KEYS, ATTNKIT_AMX_ROWS, ATTNKIT_AMX_ITEM_ROWS);
#else
  std::printf("no AMX in this build\n");
#endif
  if (argc <= 2) {
    run<bf16>(2048, 0, 2048, reps);
    run<bf16>(32768, 512, 32768, std::max(3, reps / 3));
  }
  // Further arguments: T:W[:C[:f32]] (W 0 = causal; C keys in all, the last T of them the
  // queries' own: a continuation after C - T cached keys; f32 K/V instead of bf16).
  for (int i = 2; i < argc; ++i) {
    long long f[3] = {0, 0, 0};
    const char* s = argv[i];
    for (int j = 0; j < 3 && s; ++j) {
      f[j] = std::atoll(s);
      s = std::strchr(s, ':');
      if (s) ++s;
    }
    const long long T = f[0], W = f[1], C = std::max(f[2], T);
    const int n = T * (W > 0 ? W : C) > 2048LL * 2048 * 4 ? std::max(3, reps / 3) : reps;
    if (std::strstr(argv[i], "f32")) run<float>(T, W, C, n);
    else run<bf16>(T, W, C, n);
  }
}
