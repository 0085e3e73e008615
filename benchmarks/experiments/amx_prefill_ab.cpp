// benchmarks/experiments/amx_prefill_ab.cpp — two builds of the AMX prefill kernel in one
// process, alternated call by call over the same data, so that a change of a few percent shows
// through the device hosts' noise: there a vCPU's tile throughput halves whenever another
// tenant's thread runs on its physical core's sibling (quiet_cores.cpp), which comes and goes
// within seconds, so separate processes (amx_prefill_shapes.cpp) differ by more than most
// changes. Each round times one call of A and one of B (A first in even rounds), Qwen3-0.6B
// heads (16, 8 KV heads, d 128), bf16 K/V stored head-major as KVCache keeps them, `fast` (or
// AB_PRECISION=exact: the FMA kernel), 2 threads (AMX_THREADS); a continuation's K/V rotate
// through >= 1 GiB of copies so that they come from DRAM as a model's layers do. Prints both medians (GFLOP/s), the median of the per-round
// ratios B/A, how many rounds B won, and whether the outputs' bits agree. AB_HUGE=a, b or both
// puts that side's buffers on transparent huge pages (2 MiB aligned, MADV_HUGEPAGE, as
// attnkit's allocator does for large buffers); with one build on both sides the ratio is what
// 4 KiB pages cost the kernel. 2026-12-06, one AMX host, three runs (B on huge pages, then A,
// then B): sliding T 32768 / W 512 1.082, 1/0.918, 1.068x faster on huge pages (the huge side faster in 15
// of 15 rounds each time); causal T 2048 1.017, 1/0.977, 1.015x; 512 after 8192 keys 1.012,
// 1/0.999, 1.007x. A sub-tile's 64 query and 64 output rows lie 8 KiB apart: on 4 KiB pages
// each is a TLB miss, and a window's sub-tile has the fewest keys to spread them over.
// Not built by CMake (needs an AMX CPU). This file is compiled three times:
//   F="-std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG"
//   g++ $F -DAB_NS=ab_a [A's macros] -I<A>/include -c amx_prefill_ab.cpp -o a.o
//   g++ $F -DAB_NS=ab_b [B's macros] -I<B>/include -c amx_prefill_ab.cpp -o b.o
//   g++ $F -DAB_MAIN -I<A>/include -c amx_prefill_ab.cpp -o main.o && g++ $F main.o a.o b.o -o amx_prefill_ab
//   ./amx_prefill_ab <rounds> T:W[:C] ...   (W 0: causal; C keys in all, the last T of them the
//                                             queries' own; default 2048:0 512:0:8704)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(AB_MAIN)
#include "attnkit/core/memory.hpp"  // the huge side's buffers: attnkit's own allocator
extern "C" {
double ab_a_call(const float* q, const void* k, const void* v, float* out, long long T, long long W, long long C);
double ab_b_call(const float* q, const void* k, const void* v, float* out, long long T, long long W, long long C);
}

namespace {

constexpr long long kH = 16, kHkv = 8, kD = 128;

double attended(long long T, long long W, long long C) {
  double n = 0;
  for (long long t = C - T; t < C; ++t) n += W > 0 ? std::min(t + 1, W) : t + 1;
  return n;
}

std::uint16_t to_bf16(float x) {  // round to nearest even
  std::uint32_t b;
  std::memcpy(&b, &x, 4);
  return static_cast<std::uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

// One side's buffer: std::vector's pages, or (AB_HUGE names the side: a, b or both) 2 MiB
// aligned and marked MADV_HUGEPAGE, as attnkit's allocator gives large buffers (core/memory.hpp).
// With both sides running one build, the ratio is what 4 KiB pages' TLB misses cost the kernel.
template <class T>
struct SideBuf {
  std::vector<T> small;
  std::shared_ptr<void> huge;
  T* p = nullptr;
  SideBuf(const std::vector<T>& src, bool use_huge) {
    if (!use_huge) {
      small = src;
      p = small.data();
      return;
    }
    huge = attnkit::allocate_aligned_shared(src.size() * sizeof(T));
    p = static_cast<T*>(huge.get());
    std::memcpy(p, src.data(), src.size() * sizeof(T));
  }
};

bool side_huge(bool a) {
  const char* e = std::getenv("AB_HUGE");
  const std::string h = e ? e : "";
  return h == "both" || h == (a ? "a" : "b");
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run_case(long long T, long long W, long long C, int rounds) {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> q(T * kH * kD), oa(q.size());
  std::vector<std::uint16_t> k(C * kHkv * kD), v(k.size());
  for (auto& x : q) x = nd(gen);
  for (auto& x : k) x = to_bf16(nd(gen));
  for (auto& x : v) x = to_bf16(nd(gen));
  const std::size_t kv_bytes = 2 * k.size() * 2;
  const std::size_t copies = C > T ? std::max<std::size_t>(1, (std::size_t(1) << 30) / kv_bytes + 1) : 1;
  struct Side {
    SideBuf<float> q, o;
    std::vector<SideBuf<std::uint16_t>> ks, vs;
  };
  std::vector<Side> sides;
  for (const bool a : {true, false}) {
    const bool h = side_huge(a);
    Side sd{SideBuf<float>(q, h), SideBuf<float>(oa, h), {}, {}};
    for (std::size_t c = 0; c < copies; ++c) {
      sd.ks.emplace_back(k, h);
      sd.vs.emplace_back(v, h);
    }
    sides.push_back(std::move(sd));
  }
  std::size_t which = 0;
  const auto call = [&](bool a) {
    Side& sd = sides[a ? 0 : 1];
    std::fill(sd.o.p, sd.o.p + q.size(), std::nanf(""));
    const double s = (a ? ab_a_call : ab_b_call)(sd.q.p, sd.ks[which].p, sd.vs[which].p, sd.o.p, T, W, C);
    which = (which + 1) % copies;
    return s;
  };
  call(true);
  call(false);
  const bool same = std::memcmp(sides[0].o.p, sides[1].o.p, q.size() * 4) == 0;
  const double flops = attended(T, W, C) * kH * 4.0 * kD;
  std::vector<double> ga, gb, ratio;
  for (int r = 0; r < rounds; ++r) {
    double g[2];
    for (int s = 0; s < 2; ++s) {
      const bool a = (r + s) % 2 == 0;
      g[a ? 0 : 1] = flops / call(a) * 1e-9;
    }
    ga.push_back(g[0]);
    gb.push_back(g[1]);
    ratio.push_back(g[1] / g[0]);
  }
  const long wins = std::count_if(ratio.begin(), ratio.end(), [](double x) { return x > 1; });
  std::printf("T %6lld W %4lld C %6lld: A %7.1f GFLOP/s, B %7.1f, B/A median %.3f, B faster in %ld of %d rounds; bits %s\n",
              T, W, C, median(ga), median(gb), median(ratio), wins, rounds, same ? "equal" : "differ");
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  std::vector<const char*> cases(argv + std::min(argc, 2), argv + argc);
  if (cases.empty()) cases = {"2048:0", "512:0:8704"};
  for (const char* c : cases) {
    long long T = 0, W = 0, C = 0;
    if (std::sscanf(c, "%lld:%lld:%lld", &T, &W, &C) < 2) {
      std::fprintf(stderr, "bad case '%s' (T:W[:C])\n", c);
      return 2;
    }
    run_case(T, W, C > 0 ? C : T, rounds);
  }
}

#else  // one version of the kernel

#define attnkit AB_NS  // this version's own namespace
#include "attnkit/attention/prefill.hpp"

#define AB_CAT2(a, b) a##_##b
#define AB_CAT(a, b) AB_CAT2(a, b)

extern "C" double AB_CAT(AB_NS, call)(const float* q, const void* k, const void* v, float* out, long long T,
                                      long long W, long long C) {
  using namespace AB_NS;
  constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;
  const ConstView3<float> qv(q, {T, kH, kD});
  const ConstView3<bf16> kv(static_cast<const bf16*>(k), {C, kHkv, kD}, {kD, C * kD, 1});
  const ConstView3<bf16> vv(static_cast<const bf16*>(v), {C, kHkv, kD}, {kD, C * kD, 1});
  const View3<float> ov(out, {T, kH, kD});
  AttentionOptions opt;
  const char* e = std::getenv("AMX_THREADS");
  opt.num_threads = e && std::atoi(e) > 0 ? std::atoi(e) : 2;
  const char* p = std::getenv("AB_PRECISION");  // "exact": the FMA kernel (as on a CPU without AMX)
  opt.precision = p && std::string(p) == "exact" ? Precision::exact : Precision::fast;
  const auto t0 = std::chrono::steady_clock::now();
  if (W > 0) attention_prefill(qv, kv, vv, ov, SlidingWindowMask{W}, opt);
  else attention_prefill(qv, kv, vv, ov, CausalMask{}, opt);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#endif
