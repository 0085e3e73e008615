// benchmarks/bench_variants.cpp — attention variants (attention/variant.hpp) and routed
// attention (attention/routed.hpp) beside the plain kernel, at Qwen3-0.6B head shapes (H = 16,
// H_kv = 8, d = 128), f32 and bf16 K/V, 2 threads:
//
//  prefill/<kv>/T:2048/<v>   causal attention_prefill of 2048 tokens, v one of
//                            plain         the plain call (no variant argument)
//                            alibi         Alibi{alibi_slopes(16)}
//                            softcap       SoftCap{30}: every score far inside the cap, tanh's short path
//                            softcap_cap1  SoftCap{1}: scores beyond cap/4 in almost every vector,
//                                          tanh's full rational path (the worst case)
//                            sinks         Sinks{one random logit per head}
//                            tuneable      QueryMetric{a random M [128, 128]}
//                            rgqa          routed_attention_prefill, k_r = 1 of G = 2 (route_heads
//                                          on random router logits, outside the timed loop)
//                            output_scale  OutputScale{a random [T, H]}
//  decode/<kv>/T:32768/<v>   one token against a head-major KVCache of 32768 tokens,
//                            v one of plain, alibi, softcap, sinks, tuneable, rgqa (as above).
//
// Every case of one kind (prefill or decode, f32 or bf16) runs on the same inputs and the same
// layout: K/V head-major ([T, H_kv, d] with strides {d, T·d, 1}, as a KVCache holds them and as
// bench_sparse's prefill does; bench_prefill's prefill/* cases use a token-major [T, H_kv, d]
// buffer, so their times are not the plain case here). The decode cases rotate over caches of
// >= 2 GiB in all, as bench_decode does, so every call reads DRAM; the caches are built once per
// K/V type and shared by that type's cases.
//
// Counters: prefill GFLOPS (and peak_frac = GFLOPS / the measured fp32 FMA peak, roofline.hpp)
// and decode GBps (and bw_frac = GBps / the measured read bandwidth) count the DENSE work of
// the plain kernel for every case: 4·d flops per causal (query, key) pair and head; the bytes
// of all K and V rows. Google Benchmark cannot relate one case to another, so the variants'
// cost is read off as ratios within one run: time(variant) / time(plain) = GFLOPS(plain) /
// GFLOPS(variant) (and the same with GBps); more robustly, each variant case also reports
// vs_plain, the median of per-iteration time ratios to a plain call timed right before (see
// Interleaved). rgqa does k_r / G = 1/2 of the prefill arithmetic,
// so its dense-counted GFLOPS may exceed plain's; its decode still reads every K/V row.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/attention/routed.hpp"
#include "attnkit/attention/variant.hpp"
#include "bench_data.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;

using bench::attended_pairs;
using bench::fill;
using bench::kD;
using bench::kH;
using bench::kHkv;

constexpr int kThreads = 2;
constexpr std::int64_t kPrefillT = 2048, kDecodeT = 32768;

enum class Kind { plain, alibi, softcap, softcap_cap1, sinks, tuneable, rgqa, output_scale };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::plain: return "plain";
    case Kind::alibi: return "alibi";
    case Kind::softcap: return "softcap";
    case Kind::softcap_cap1: return "softcap_cap1";
    case Kind::sinks: return "sinks";
    case Kind::tuneable: return "tuneable";
    case Kind::rgqa: return "rgqa";
    case Kind::output_scale: return "output_scale";
  }
  return "?";
}

// The machine is shared and its speed drifts over seconds, so each iteration of a variant also
// times the plain call right before it: vs_plain = the median over iterations of
// time(variant) / time(plain). The reported time is the variant's alone (manual time).
class Interleaved {
 public:
  template <class F>
  double step(Kind kind, F&& f) {
    double t_plain = 0;
    if (kind != Kind::plain) t_plain = time(f, Kind::plain);
    const double t = time(f, kind);
    if (kind != Kind::plain) ratios_.push_back(t / t_plain);
    return t;
  }
  void report(benchmark::State& state, Kind kind) {
    if (kind == Kind::plain || ratios_.empty()) return;
    std::sort(ratios_.begin(), ratios_.end());
    const std::size_t n = ratios_.size();
    state.counters["vs_plain"] = n % 2 ? ratios_[n / 2] : 0.5 * (ratios_[n / 2 - 1] + ratios_[n / 2]);
  }

 private:
  template <class F>
  static double time(F& f, Kind k) {
    const auto t0 = std::chrono::steady_clock::now();
    f(k);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::vector<double> ratios_;
};

// The variants' parameters, the same for prefill and decode (rows: T of OutputScale and of the
// routes, 1 in decode).
struct Params {
  std::vector<float> slopes = alibi_slopes(kH);
  bench::Buffer<float> sinks = fill<float>(kH, 11);
  bench::Buffer<float> metric = fill<float>(kD * kD, 12, 1.f / std::sqrt(static_cast<float>(kD)));  // |q·M| ~ |q|
  bench::Buffer<float> scale;
  std::vector<std::int32_t> heads;  // [rows, H_kv, 1]
  std::vector<float> weights;       // [rows, H_kv, 1]
  std::int64_t rows;

  explicit Params(std::int64_t rows_) : scale(fill<float>(rows_ * kH, 13)), rows(rows_) {
    const auto router = fill<float>(rows * kH, 14, 4.f);
    heads.resize(static_cast<std::size_t>(rows * kHkv));
    weights.resize(heads.size());
    RouteOptions ro;
    ro.top_k = 1;
    ro.num_threads = kThreads;
    route_heads(ConstView2<float>(router.data(), {rows, kH}), kHkv, ro, View3<std::int32_t>(heads.data(), {rows, kHkv, 1}),
                View3<float>(weights.data(), {rows, kHkv, 1}));
  }
  ConstView3<std::int32_t> heads_view() const { return {heads.data(), {rows, kHkv, 1}}; }
  ConstView3<float> weights_view() const { return {weights.data(), {rows, kHkv, 1}}; }
  QueryMetric query_metric() const { return {ConstView2<float>(metric.data(), {kD, kD})}; }
};

template <class KV>
void BM_prefill_variant(benchmark::State& state, Kind kind) {
  constexpr std::int64_t T = kPrefillT;
  const auto q = fill<float>(T * kH * kD, 1);
  const auto k = fill<KV>(T * kHkv * kD, 2), v = fill<KV>(T * kHkv * kD, 3);
  const auto out = fill<float>(T * kH * kD, 4);
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const ConstView3<KV> kv(k.data(), {T, kHkv, kD}, {kD, T * kD, 1}), vv(v.data(), {T, kHkv, kD}, {kD, T * kD, 1});
  const View3<float> ov(out.data(), {T, kH, kD});
  const Params p(T);
  AttentionOptions opt;
  opt.num_threads = kThreads;
  const CausalMask mask{};
  const View2<float> no_lse{};
  const auto call = [&](Kind kind) {
    switch (kind) {
      case Kind::plain: return attention_prefill(qv, kv, vv, ov, mask, opt);
      case Kind::alibi: return attention_prefill(qv, kv, vv, ov, mask, opt, no_lse, make_variant(Alibi{p.slopes.data()}));
      case Kind::softcap: return attention_prefill(qv, kv, vv, ov, mask, opt, no_lse, make_variant(SoftCap{30.f}));
      case Kind::softcap_cap1: return attention_prefill(qv, kv, vv, ov, mask, opt, no_lse, make_variant(SoftCap{1.f}));
      case Kind::sinks: return attention_prefill(qv, kv, vv, ov, mask, opt, no_lse, make_variant(Sinks{p.sinks.data()}));
      case Kind::tuneable: return attention_prefill(qv, kv, vv, ov, mask, opt, no_lse, make_variant(p.query_metric()));
      case Kind::rgqa: return routed_attention_prefill(qv, kv, vv, p.heads_view(), p.weights_view(), ov, mask, opt);
      case Kind::output_scale:
        return attention_prefill(qv, kv, vv, ov, mask, opt, no_lse,
                                 make_variant(OutputScale{ConstView2<float>(p.scale.data(), {T, kH})}));
    }
  };
  const double peak = bench::roofline().fma_gflops;
  call(kind);  // untimed: page faults of fresh buffers, thread scratch, an idle second core waking up
  double seconds = 0;
  Interleaved il;
  for (auto _ : state) {
    const double t = il.step(kind, [&](Kind k) {
      call(k);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    });
    state.SetIterationTime(t);
    seconds += t;
  }
  il.report(state, kind);
  const double flops = attended_pairs(T, 0) * static_cast<double>(kH) * (2.0 * kD + 2.0 * kD);  // dense, every case
  const double gflops = flops / (seconds / static_cast<double>(state.iterations())) / 1e9;
  state.counters["GFLOPS"] = gflops;
  state.counters["peak_frac"] = gflops / peak;
}

// Decode caches of kDecodeT tokens, >= 2 GiB in all per K/V type, built on first use and shared
// by that type's cases; asking for the other type frees them (the f32 cases run first), so at
// most one set is held.
struct DecodeCaches {
  std::vector<KVCache<float>> f32;
  std::vector<KVCache<bf16>> b16;

  template <class KV>
  const std::vector<KVCache<KV>>& get() {
    auto& mine = pick<KV>();
    if constexpr (std::is_same_v<KV, float>) std::vector<KVCache<bf16>>().swap(b16);
    else std::vector<KVCache<float>>().swap(f32);
    if (mine.empty()) {
      const std::int64_t T = kDecodeT;
      const std::int64_t bytes = 2 * T * kHkv * kD * static_cast<std::int64_t>(sizeof(KV));
      const std::int64_t n = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes);
      const auto src = fill<float>(T * kHkv * kD, 21);
      const ConstView3<float> rows(src.data(), {T, kHkv, kD});
      mine.reserve(static_cast<std::size_t>(n));
      for (std::int64_t c = 0; c < n; ++c) {
        mine.emplace_back(kHkv, kD, kD, T);
        mine.back().append(rows, rows);
      }
      const auto q = fill<float>(kH * kD, 31);  // one read of each before any case times it
      std::vector<float> out(static_cast<std::size_t>(kH * kD));
      DecodeOptions opt;
      opt.num_threads = kThreads;
      bench::warm_rotation(n, [&](std::int64_t c) {
        attention_decode<KV>(ConstView2<float>(q.data(), {kH, kD}), mine[c].keys(), mine[c].values(),
                             View2<float>(out.data(), {kH, kD}), opt);
      });
    }
    return mine;
  }

 private:
  template <class KV>
  std::vector<KVCache<KV>>& pick() {
    if constexpr (std::is_same_v<KV, float>) return f32;
    else return b16;
  }
};

DecodeCaches& decode_caches() {
  static DecodeCaches c;
  return c;
}

template <class KV>
void BM_decode_variant(benchmark::State& state, Kind kind) {
  const auto& caches = decode_caches().get<KV>();
  const auto q = fill<float>(kH * kD, 31);
  std::vector<float> out(static_cast<std::size_t>(kH * kD));
  const ConstView2<float> qv(q.data(), {kH, kD});
  const View2<float> ov(out.data(), {kH, kD});
  const Params p(1);
  DecodeOptions opt;  // q_position: the default, the newest key's (ALiBi)
  opt.num_threads = kThreads;
  const View1<float> no_lse{};
  std::size_t i = 0;
  const auto call = [&](Kind kind) {
    const auto& c = caches[i++ % caches.size()];  // the next cache, so every call reads DRAM
    const ConstView3<KV> kv = c.keys(), vv = c.values();
    switch (kind) {
      case Kind::plain: attention_decode<KV>(qv, kv, vv, ov, opt); break;
      case Kind::alibi: attention_decode<KV>(qv, kv, vv, ov, opt, no_lse, make_variant(Alibi{p.slopes.data()})); break;
      case Kind::softcap: attention_decode<KV>(qv, kv, vv, ov, opt, no_lse, make_variant(SoftCap{30.f})); break;
      case Kind::softcap_cap1: attention_decode<KV>(qv, kv, vv, ov, opt, no_lse, make_variant(SoftCap{1.f})); break;
      case Kind::sinks: attention_decode<KV>(qv, kv, vv, ov, opt, no_lse, make_variant(Sinks{p.sinks.data()})); break;
      case Kind::tuneable: attention_decode<KV>(qv, kv, vv, ov, opt, no_lse, make_variant(p.query_metric())); break;
      case Kind::rgqa: routed_attention_decode<KV>(qv, kv, vv, p.heads_view(), p.weights_view(), ov, opt); break;
      case Kind::output_scale:
        attention_decode<KV>(qv, kv, vv, ov, opt, no_lse, make_variant(OutputScale{ConstView2<float>(p.scale.data(), {1, kH})}));
        break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  };
  Interleaved il;
  for (auto _ : state) state.SetIterationTime(il.step(kind, call));
  il.report(state, kind);
  const double gb = 2.0 * static_cast<double>(kDecodeT * kHkv * kD) * sizeof(KV) * 1e-9;  // every K and V row, every case
  state.counters["GBps"] = benchmark::Counter(gb, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bw_frac"] = benchmark::Counter(gb / bench::roofline().read_gbps, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["caches"] = static_cast<double>(caches.size());
}

// Registered in one place so the names follow one pattern; each plain case first, next to its
// variants.
const bool registered = [] {
  const auto reg = [](const std::string& name, auto fn, Kind kind, benchmark::TimeUnit unit) {
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { fn(s, kind); })->UseManualTime()->Unit(unit);
  };
  const std::vector<Kind> prefill{Kind::plain, Kind::alibi,    Kind::softcap, Kind::softcap_cap1,
                                  Kind::sinks, Kind::tuneable, Kind::rgqa,    Kind::output_scale};
  const std::vector<Kind> decode{Kind::plain, Kind::alibi,    Kind::softcap, Kind::softcap_cap1,
                                 Kind::sinks, Kind::tuneable, Kind::rgqa};
  const std::string pt = "/T:" + std::to_string(kPrefillT) + "/", dt = "/T:" + std::to_string(kDecodeT) + "/";
  for (Kind k : prefill) reg("prefill/f32" + pt + kind_name(k), BM_prefill_variant<float>, k, benchmark::kMillisecond);
  for (Kind k : prefill) reg("prefill/bf16" + pt + kind_name(k), BM_prefill_variant<bf16>, k, benchmark::kMillisecond);
  for (Kind k : decode) reg("decode/f32" + dt + kind_name(k), BM_decode_variant<float>, k, benchmark::kMicrosecond);
  for (Kind k : decode) reg("decode/bf16" + dt + kind_name(k), BM_decode_variant<bf16>, k, benchmark::kMicrosecond);
  return true;
}();

}  // namespace
