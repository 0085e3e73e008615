// benchmarks/bench_attnres.cpp — Attention Residuals' depth routing (depth/attnres.hpp) alone, at
// width D = 1024, 2 threads, with the norm weight folded per call and a recency bias:
//   attnres/<src>/N:<N>/T:512/D:1024   512 tokens routed over N sources + the partial (N + 1 rows of
//                                       D per token): f32 sources at N = 8 and N = 57, bf16 at N = 8;
//   attnres/f32/scored/N:<N>/...       the same with the N sources' logits given (as the model does:
//                                       one read of each source, for the weighted sum);
//   attnres_decode/f32/N:57/D:1024     one token (T = 1, so one thread does the work) over 57
//                                       sources + the partial, each row in a different place.
// The cost is reading the sources (4·D flops per D values read), so every call must read them
// from DRAM: the iterations rotate over a pool of >= 1 GiB of [512, 1024] source buffers (the
// host LLC a VM may report is 480 MiB) and each call takes the next N + 1 of them (decode: N + 1
// rows scattered over the pool), so a buffer is read again only after more than 1 GiB of other
// traffic. The pools (one per source type) are filled once per process and shared by the cases.
// Counters: GBps = (bytes of every source read + bytes of out written) / time; bw_frac = GBps /
// the measured DRAM read bandwidth (roofline.hpp). The kernel reads each source once (its token
// tiles keep a tile's rows in L2 between the logit pass and the weighted sum), so bw_frac near 1
// means it runs at the speed of memory.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "attnkit/depth/attnres.hpp"
#include "bench_data.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;

constexpr std::int64_t kT = 512, kDim = 1024;
constexpr std::int64_t kPoolBytes = (std::int64_t{5} << 30) / 4;  // 1.25 GiB

// `count` [kT, kDim] source buffers in one huge-page allocation.
template <class S>
struct Pool {
  static constexpr std::int64_t slab = kT * kDim;  // elements per buffer
  std::int64_t count = 0;
  bench::Buffer<S> mem;
  const S* buffer(std::int64_t i) const { return mem.data() + (i % count) * slab; }
  const S* row(std::int64_t j) const { return mem.data() + (j % (count * kT)) * kDim; }  // over all rows
};

template <class S>
const Pool<S>& pool() {
  static const Pool<S> p = [] {
    Pool<S> r;
    r.count = kPoolBytes / (Pool<S>::slab * static_cast<std::int64_t>(sizeof(S)));
    r.mem = bench::fill<S>(r.count * Pool<S>::slab, 21);
    return r;
  }();
  return p;
}

struct Query {
  std::vector<float> proj, gamma;
  AttnResQuery q;
  Query() {
    const auto p = bench::fill<float>(kDim, 31, 0.1f), g = bench::fill<float>(kDim, 32, 0.5f);
    for (std::int64_t i = 0; i < kDim; ++i) {
      proj.push_back(p.data()[i]);
      gamma.push_back(1.f + g.data()[i]);
    }
    q.proj = proj.data();
    q.norm_weight = gamma.data();
    q.bias = 0.5f;
  }
};

template <class S>
DepthSource source(const S* data, std::int64_t rows) {
  return DepthSource(ConstView2<S>(data, {rows, kDim}));
}

void set_counters(benchmark::State& state, double bytes) {
  const double gb = bytes * 1e-9;
  state.counters["GBps"] = benchmark::Counter(gb, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bw_frac"] =
      benchmark::Counter(gb / bench::roofline().read_gbps, benchmark::Counter::kIsIterationInvariantRate);
}

// scored: the N sources come with their logits (DepthSource::logits), as the model passes them
// (it scores each source against every query once, when the source is made): the call reads them
// once, for the weighted sum; only the partial is scored.
template <class S>
void BM_attnres(benchmark::State& state, std::int64_t N, bool scored = false) {
  const Pool<S>& p = pool<S>();
  const auto logits = bench::fill<float>(N * kT, 9);
  bench::roofline();  // measured before the timed loop
  const Query query;
  const auto out = bench::fill<float>(kT * kDim, 4);
  const View2<float> ov(out.data(), {kT, kDim});
  AttnResOptions opt;
  opt.num_threads = 2;
  std::vector<DepthSource> srcs(static_cast<std::size_t>(N));
  std::int64_t next = 0;
  for (auto _ : state) {
    for (std::size_t n = 0; n < srcs.size(); ++n) {
      srcs[n] = source(p.buffer(next++), kT);
      if (scored) srcs[n].logits = logits.data() + static_cast<std::int64_t>(n) * kT;
    }
    const DepthSource partial = source(p.buffer(next++), kT);
    attnres_route(std::span<const DepthSource>(srcs), partial, query.q, ov, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, static_cast<double>((N + 1) * kT * kDim * static_cast<std::int64_t>(sizeof(S)) +
                                          kT * kDim * static_cast<std::int64_t>(sizeof(float))));
}

// One token: source n of call i is row (i·(N+1) + n)·7919 of the pool (a stride coprime to the
// pool's row count), so the rows of a call lie far apart and recur only after every row was read.
void BM_attnres_decode(benchmark::State& state, std::int64_t N) {
  const Pool<float>& p = pool<float>();
  bench::roofline();
  const Query query;
  std::vector<float> out(static_cast<std::size_t>(kDim));
  const View2<float> ov(out.data(), {1, kDim});
  AttnResOptions opt;
  opt.num_threads = 2;
  std::vector<DepthSource> srcs(static_cast<std::size_t>(N));
  std::int64_t next = 0;
  for (auto _ : state) {
    for (auto& s : srcs) s = source(p.row(7919 * next++), 1);
    const DepthSource partial = source(p.row(7919 * next++), 1);
    attnres_route(std::span<const DepthSource>(srcs), partial, query.q, ov, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, static_cast<double>((N + 1) * kDim * static_cast<std::int64_t>(sizeof(float)) +
                                          kDim * static_cast<std::int64_t>(sizeof(float))));
}

const bool registered = [] {
  const std::string shape = "/T:" + std::to_string(kT) + "/D:" + std::to_string(kDim);
  for (std::int64_t N : {8, 57})
    for (bool scored : {false, true})
      benchmark::RegisterBenchmark(("attnres/f32" + std::string(scored ? "/scored" : "") + "/N:" + std::to_string(N) + shape).c_str(),
                                   [=](benchmark::State& s) { BM_attnres<float>(s, N, scored); })
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("attnres/bf16/N:8" + shape).c_str(),
                               [](benchmark::State& s) { BM_attnres<bf16>(s, 8); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("attnres_decode/f32/N:57/D:" + std::to_string(kDim)).c_str(),
                               [](benchmark::State& s) { BM_attnres_decode(s, 57); })
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
