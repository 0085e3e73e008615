// benchmarks/bench_decode.cpp — machine ceilings (roofline/*) and decode attention (decode/*).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/loop.hpp"
#include "attnkit/attention/routed.hpp"
#include "attnkit/attention/variant.hpp"
#include "attnkit/sparse/sparse_attention.hpp"
#include "bench_data.hpp"
#include "paged_sets.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit::bench;

// Each case re-runs one measurement kernel of roofline.hpp per iteration and reports its rate
// (`unit`: GFLOPS, or GOPS for the int8 dot products).
void BM_roofline_compute(benchmark::State& state, double (*per_thread)(std::int64_t), const char* unit) {
  if (per_thread == roofline_detail::amx_thread && !roofline_detail::amx_usable()) {
    state.SkipWithError("AMX tiles not usable here (not compiled for AMX, or the kernel refused the tile state)");
    return;
  }
  const int threads = attnkit::default_num_threads();
  const std::int64_t iters = roofline_detail::calibrate(per_thread, 0.1);
  double rate = 0;
  for (auto _ : state) rate = roofline_detail::parallel_rate(threads, iters, per_thread);
  state.counters[unit] = rate * 1e-9;
}
BENCHMARK_CAPTURE(BM_roofline_compute, fp32_fma, roofline_detail::fma_thread, "GFLOPS")
    ->Name("roofline/fp32_fma")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_roofline_compute, bf16_dot, roofline_detail::bf16_thread, "GFLOPS")
    ->Name("roofline/bf16_dot")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_roofline_compute, int8_dot, roofline_detail::int8_thread, "GOPS")
    ->Name("roofline/int8_dot")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_roofline_compute, amx_bf16, roofline_detail::amx_thread, "GFLOPS")
    ->Name("roofline/amx_bf16")->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_roofline_mem_read(benchmark::State& state) {
  const int threads = attnkit::default_num_threads();
  const auto buf = roofline_detail::make_read_buffer(roofline_detail::kReadBufferFloats, threads);
  double best = 0;
  for (auto _ : state)
    best = std::max(best, roofline_detail::read_pass(buf.get(), roofline_detail::kReadBufferFloats, threads));
  state.counters["GBps"] = best * 1e-9;
}
BENCHMARK(BM_roofline_mem_read)->Name("roofline/mem_read")->UseRealTime()->Unit(benchmark::kMillisecond);

// GBps of a decode that reads `bytes` per iteration, and bw_frac: that over the DRAM read
// bandwidth measured in the same run (roofline/mem_read).
void stream_counters(benchmark::State& state, std::int64_t bytes) {
  const double gb = static_cast<double>(bytes) * 1e-9;
  state.counters["GBps"] = benchmark::Counter(gb, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bw_frac"] =
      benchmark::Counter(gb / roofline().read_gbps, benchmark::Counter::kIsIterationInvariantRate);
}

// Decode of one token with Qwen3-0.6B attention shapes (H = 16, H_kv = 8, d = 128) against a
// head-major KVCache of T_kv tokens, 2 threads. To measure DRAM rather than cache, the
// iterations rotate over enough separate caches (>= 2 GiB in all) that each one is read again
// only after more than 1 GiB of other traffic. GBps counts the K and V bytes read (int8: the
// codes and the f32 scale of each row). decode/int8/fast: int8 keys scored against the query
// quantised per head on VNNI (DecodeOptions::precision).
template <class KV, attnkit::Precision P = attnkit::Precision::exact>
void BM_decode(benchmark::State& state) {
  constexpr std::int64_t H = 16, Hk = 8, d = 128;
  const std::int64_t T = state.range(0);
  constexpr std::int64_t scale_bytes = std::is_same_v<KV, std::int8_t> ? sizeof(float) : 0;
  const std::int64_t bytes = 2 * T * Hk * (d * static_cast<std::int64_t>(sizeof(KV)) + scale_bytes);
  const std::int64_t n_caches = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes);

  std::mt19937 gen(42);
  std::normal_distribution<float> nd;
  std::vector<float> src(static_cast<std::size_t>(T * Hk * d)), q(static_cast<std::size_t>(H * d)),
      out(static_cast<std::size_t>(H * d));
  for (auto& x : src) x = nd(gen);
  for (auto& x : q) x = nd(gen);
  std::vector<attnkit::KVCache<KV>> caches;
  caches.reserve(static_cast<std::size_t>(n_caches));
  for (std::int64_t c = 0; c < n_caches; ++c) {
    caches.emplace_back(Hk, d, d, T);
    const attnkit::ConstView3<float> kv(src.data(), {T, Hk, d});
    caches.back().append(kv, kv);
  }
  attnkit::DecodeOptions opt;
  opt.num_threads = 2;
  opt.precision = P;
  const auto call = [&](std::int64_t c) {
    attnkit::attention_decode<KV>(attnkit::ConstView2<float>(q.data(), {H, d}), caches[c].keys(), caches[c].values(),
                                  attnkit::View2<float>(out.data(), {H, d}), opt);
  };
  warm_rotation(n_caches, call);
  std::int64_t i = 0;
  for (auto _ : state) {
    call(i++ % n_caches);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  stream_counters(state, bytes);
  state.counters["caches"] = static_cast<double>(n_caches);
}
BENCHMARK_TEMPLATE(BM_decode, float)
    ->Name("decode/f32")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, attnkit::bf16)
    ->Name("decode/bf16")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
// Precision::fast over bf16: scores and P·V on vdpbf16ps (the query and the probabilities
// rounded to bf16), beside decode/bf16 above.
BENCHMARK_TEMPLATE(BM_decode, attnkit::bf16, attnkit::Precision::fast)
    ->Name("decode/bf16/fast")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, std::int8_t)
    ->Name("decode/int8")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, std::int8_t, attnkit::Precision::fast)
    ->Name("decode/int8/fast")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);

// The same decode against token-major K/V ([T, H_kv, d], a token's KV heads adjacent: the layout
// an engine's own cache usually has, and NHD pages), which attention_decode reads by items of
// all KV heads block by block instead of one head at a time (decode.hpp). One buffer of >= 2
// GiB holds the rotated caches back to back. Compare with decode/<type> (head-major KVCache)
// in the same run.
template <class KV, attnkit::Precision P = attnkit::Precision::exact>
void BM_decode_token_major(benchmark::State& state) {
  constexpr std::int64_t H = 16, Hk = 8, d = 128;
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  const std::int64_t T = state.range(0);
  const std::int64_t bytes = 2 * T * Hk * (d * static_cast<std::int64_t>(sizeof(KV)) + (quant ? 4 : 0));
  const std::int64_t n_caches = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes);
  const std::int64_t rows = n_caches * T * Hk;
  const auto k = fill<KV>(rows * d, 1, quant ? 100.f : 1.f), v = fill<KV>(rows * d, 2, quant ? 100.f : 1.f);
  const auto ks = fill<float>(quant ? rows : 1, 3, 0.02f), vs = fill<float>(quant ? rows : 1, 4, 0.02f);
  const auto q = fill<float>(H * d, 5);
  std::vector<float> out(static_cast<std::size_t>(H * d));
  attnkit::DecodeOptions opt;
  opt.num_threads = 2;
  opt.precision = P;
  const auto call = [&](std::int64_t c) {
    const attnkit::ConstView3<KV> kc(k.data() + c * T * Hk * d, {T, Hk, d}), vc(v.data() + c * T * Hk * d, {T, Hk, d});
    const attnkit::ConstView2<float> q2(q.data(), {H, d});
    const attnkit::View2<float> o2(out.data(), {H, d});
    if constexpr (quant)
      attnkit::attention_decode(q2, attnkit::QuantView3{kc, attnkit::ConstView2<float>(ks.data() + c * T * Hk, {T, Hk})},
                                attnkit::QuantView3{vc, attnkit::ConstView2<float>(vs.data() + c * T * Hk, {T, Hk})}, o2,
                                opt);
    else
      attnkit::attention_decode<KV>(q2, kc, vc, o2, opt);
  };
  warm_rotation(n_caches, call);
  std::int64_t i = 0;
  for (auto _ : state) {
    call(i++ % n_caches);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  stream_counters(state, bytes);
  state.counters["caches"] = static_cast<double>(n_caches);
}
BENCHMARK_TEMPLATE(BM_decode_token_major, float)
    ->Name("decode/f32/token_major")->ArgName("T")->Arg(512)->Arg(8192)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode_token_major, attnkit::bf16)
    ->Name("decode/bf16/token_major")->ArgName("T")->Arg(512)->Arg(8192)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode_token_major, std::int8_t, attnkit::Precision::fast)
    ->Name("decode/int8/fast/token_major")->ArgName("T")->Arg(512)->Arg(8192)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);

// Batched decode over a paged cache (attention/batched_decode.hpp): B = 8 sequences of
// Qwen3-0.6B attention (H = 16, H_kv = 8, d = 128), bf16 pages of P tokens in a PagePool
// (HND: each KV head's rows of a page contiguous), 2 threads. Lengths: all T, or with T = 0 a
// mix 512 .. 8192 (512, 768, 1024, 1536, 2048, 3072, 4096, 8192). The iterations rotate over
// sets of page tables whose pages are shuffled through >= 2 GiB of pool, so K/V come from DRAM
// in scattered pages as in a long-running engine. GBps counts the K and V bytes of all B
// sequences; bw_frac divides by the measured DRAM read bandwidth (roofline/mem_read).
// decode/paged_contig/bf16 is the same-run baseline: B single-sequence attention_decode calls on
// contiguous KVCaches of the same lengths (also >= 2 GiB rotated).
using PagedSets = PagedSetsT<attnkit::bf16>;

template <class KV, attnkit::Precision Prec = attnkit::Precision::exact>
void BM_decode_paged(benchmark::State& state) {
  using PagedSets = PagedSetsT<KV>;
  constexpr std::int64_t H = PagedSets::H, d = PagedSets::d;
  const PagedSets ps(paged_bench_lengths(state.range(0)), state.range(1));
  const std::int64_t B = ps.B;
  std::mt19937 gen(43);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(B * H * d)), out(static_cast<std::size_t>(B * H * d));
  for (auto& x : q) x = nd(gen);
  attnkit::DecodeOptions opt;
  opt.num_threads = 2;
  opt.precision = Prec;
  const attnkit::PagedKV<KV> cache = ps.pool.view();
  const auto call = [&](std::int64_t s) {
    attnkit::attention_decode_paged<KV>(attnkit::ConstView3<float>(q.data(), {B, H, d}), cache, ps.table(s),
                                        attnkit::View3<float>(out.data(), {B, H, d}), opt);
  };
  warm_rotation(ps.n_sets, call);
  std::int64_t i = 0;
  for (auto _ : state) {
    call(i++ % ps.n_sets);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  stream_counters(state, ps.bytes);
  state.counters["sets"] = static_cast<double>(ps.n_sets);
}
BENCHMARK_TEMPLATE(BM_decode_paged, attnkit::bf16)
    ->Name("decode/paged/bf16")->ArgNames({"T", "P"})
    ->Args({512, 16})->Args({2048, 16})->Args({8192, 16})->Args({0, 16})->Args({0, 64})
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode_paged, attnkit::bf16, attnkit::Precision::fast)
    ->Name("decode/paged/bf16/fast")->ArgNames({"T", "P"})->Args({8192, 16})->Args({0, 16})
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode_paged, std::int8_t)
    ->Name("decode/paged/int8")->ArgNames({"T", "P"})->Args({8192, 16})->Args({0, 16})
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode_paged, std::int8_t, attnkit::Precision::fast)
    ->Name("decode/paged/int8/fast")->ArgNames({"T", "P"})->Args({8192, 16})->Args({0, 16})
    ->UseRealTime()->Unit(benchmark::kMicrosecond);

// Loop Attention and sparse attention over the same pages (the mixed lengths 512 .. 8192, P 16),
// each step alternating with plain paged decode of another set of page tables of the same
// lengths: vs_plain = median of (variant time / plain time).
//  * decode/paged/loop/bf16: loop_attention_decode_paged, layer reading (global over all keys,
//    local over the last W = 64 of the same pages, gate and blend). Ideal: 1 + W / length.
//  * decode/paged/sparse/bf16: sparse_attention_decode_paged with each sequence's own random
//    selection of min(2048, length) keys (DSA's top-2048). GBps / bw_frac count the selected rows'
//    K and V bytes; vs_plain should approach the fraction of the rows read.
//  * decode/paged/<variant>/bf16: attention_decode_paged with a variant of attention/variant.hpp:
//    softcap (SoftCap{30}), alibi (alibi_slopes(16)), sinks (a logit per head), tuneable
//    (QueryMetric, a random M [128, 128]). Ideal: vs_plain 1 (the same rows, a few operations
//    more per block of 32 keys).
//  * decode/paged/rgqa/bf16: routed_attention_decode_paged, R-GQA as qwen3-0.6b-rgqa routes (the
//    top 1 of each KV group's G = 2 query heads, a random choice per sequence and group, renorm
//    weight 1). Every K/V row is still read once, for half the query heads: vs_plain <= 1.
//  * decode/paged/{loop,sparse}/int8/fast: the same over int8 pages, Precision::fast (scores on
//    VNNI), beside plain paged decode of the same int8 pages under fast.
enum class PagedVariant { loop, sparse, softcap, alibi, sinks, tuneable, rgqa };
template <class KV = attnkit::bf16, attnkit::Precision Prec = attnkit::Precision::exact>
void BM_decode_paged_variant(benchmark::State& state, PagedVariant kind) {
  using PagedSets = PagedSetsT<KV>;
  const bool sparse = kind == PagedVariant::sparse;
  constexpr std::int64_t H = PagedSets::H, d = PagedSets::d, W = 64, top_k = 2048;
  const PagedSets ps(paged_bench_lengths(0), 16);
  const std::int64_t B = ps.B;
  std::mt19937 gen(43);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(B * H * d)), out(q.size()), plain(q.size());
  for (auto& x : q) x = nd(gen);
  std::vector<float> gate_w(static_cast<std::size_t>(H * d)), gate_b(static_cast<std::size_t>(H));
  for (auto& x : gate_w) x = 0.05f * nd(gen);
  for (auto& x : gate_b) x = nd(gen);
  const std::vector<float> slopes = attnkit::alibi_slopes(H);
  std::vector<float> sinks(static_cast<std::size_t>(H)), metric(static_cast<std::size_t>(d * d));
  for (auto& x : sinks) x = nd(gen);
  for (auto& x : metric) x = nd(gen) / std::sqrt(static_cast<float>(d));  // |q M| ~ |q|
  std::vector<std::int32_t> idx(static_cast<std::size_t>(B * top_k), -1);
  std::int64_t selected = 0;
  for (std::int64_t b = 0; b < B; ++b) {  // a random ascending selection per sequence
    const std::int64_t L = ps.lengths[b], n = std::min(L, top_k);
    std::vector<std::int32_t> all(static_cast<std::size_t>(L));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), gen);
    std::sort(all.begin(), all.begin() + n);
    std::copy_n(all.begin(), n, idx.begin() + b * top_k);
    selected += n;
  }
  std::vector<std::int32_t> kept(static_cast<std::size_t>(B * PagedSets::Hk));  // R-GQA: one head of each group
  for (std::size_t i = 0; i < kept.size(); ++i)
    kept[i] = static_cast<std::int32_t>((i % PagedSets::Hk) * (H / PagedSets::Hk) + gen() % (H / PagedSets::Hk));
  const std::vector<float> kept_w(kept.size(), 1.f);
  attnkit::DecodeOptions opt;
  opt.num_threads = 2;
  opt.precision = Prec;
  attnkit::SparseAttentionOptions so;
  so.num_threads = 2;
  so.precision = Prec;
  const attnkit::PagedKV<KV> cache = ps.pool.view();
  Paired pairs;
  warm_rotation(ps.n_sets, [&](std::int64_t s) {  // the variants read the same pages
    attnkit::attention_decode_paged<KV>(attnkit::ConstView3<float>(q.data(), {B, H, d}), cache, ps.table(s),
                                        attnkit::View3<float>(plain.data(), {B, H, d}), opt);
  });
  std::size_t i = 0;
  for (auto _ : state) {
    // The plain call and the variant read different sets (same lengths, other pages), so neither
    // finds the other's rows still in cache (each set is read once per n_sets calls).
    const std::size_t n = static_cast<std::size_t>(ps.n_sets), sp = (2 * i) % n, s = (2 * i + 1) % n;
    ++i;
    const auto t0 = std::chrono::steady_clock::now();
    attnkit::attention_decode_paged<KV>(attnkit::ConstView3<float>(q.data(), {B, H, d}), cache, ps.table(sp),
                                        attnkit::View3<float>(plain.data(), {B, H, d}), opt);
    const auto t1 = std::chrono::steady_clock::now();
    const attnkit::ConstView3<float> qv(q.data(), {B, H, d});
    const attnkit::View3<float> ov(out.data(), {B, H, d});
    const auto with = [&](const auto& var) { attnkit::attention_decode_paged<KV>(qv, cache, ps.table(s), ov, opt, {}, 0, var); };
    switch (kind) {
      case PagedVariant::sparse:
        attnkit::sparse_attention_decode_paged<KV>(qv, cache, ps.table(s), attnkit::ConstView2<std::int32_t>(idx.data(), {B, top_k}),
                                                   ov, so);
        break;
      case PagedVariant::loop:
        attnkit::loop_attention_decode_paged<KV>(qv, cache, cache, ps.table(s), attnkit::ConstView2<float>(gate_w.data(), {H, d}),
                                                 gate_b, W, ov, opt);
        break;
      case PagedVariant::softcap: with(attnkit::make_variant(attnkit::SoftCap{30.f})); break;
      case PagedVariant::alibi: with(attnkit::make_variant(attnkit::Alibi{slopes.data()})); break;
      case PagedVariant::sinks: with(attnkit::make_variant(attnkit::Sinks{sinks.data()})); break;
      case PagedVariant::tuneable:
        with(attnkit::make_variant(attnkit::QueryMetric{attnkit::ConstView2<float>(metric.data(), {d, d})}));
        break;
      case PagedVariant::rgqa:
        attnkit::routed_attention_decode_paged<KV>(qv, cache, ps.table(s),
                                                   attnkit::ConstView3<std::int32_t>(kept.data(), {B, PagedSets::Hk, 1}),
                                                   attnkit::ConstView3<float>(kept_w.data(), {B, PagedSets::Hk, 1}), ov, opt);
        break;
    }
    const auto t2 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const double variant_s = std::chrono::duration<double>(t2 - t1).count();
    pairs.add(variant_s, std::chrono::duration<double>(t1 - t0).count());
    state.SetIterationTime(variant_s);
  }
  // A position's K and V bytes (int8: codes and scales) from the sets' total.
  const std::int64_t positions = std::accumulate(ps.lengths.begin(), ps.lengths.end(), std::int64_t{0});
  stream_counters(state, sparse ? selected * (ps.bytes / positions) : ps.bytes);
  state.counters["vs_plain"] = pairs.time_ratio();
  if (sparse) state.counters["rows_frac"] = static_cast<double>(selected) / static_cast<double>(positions);
}
BENCHMARK_CAPTURE(BM_decode_paged_variant, loop, PagedVariant::loop)
    ->Name("decode/paged/loop/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant, sparse, PagedVariant::sparse)
    ->Name("decode/paged/sparse/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant, softcap, PagedVariant::softcap)
    ->Name("decode/paged/softcap/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant, alibi, PagedVariant::alibi)
    ->Name("decode/paged/alibi/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant, sinks, PagedVariant::sinks)
    ->Name("decode/paged/sinks/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant, tuneable, PagedVariant::tuneable)
    ->Name("decode/paged/tuneable/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant, rgqa, PagedVariant::rgqa)
    ->Name("decode/paged/rgqa/bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
void BM_decode_paged_variant_int8_fast(benchmark::State& state, PagedVariant kind) {
  BM_decode_paged_variant<std::int8_t, attnkit::Precision::fast>(state, kind);
}
BENCHMARK_CAPTURE(BM_decode_paged_variant_int8_fast, loop, PagedVariant::loop)
    ->Name("decode/paged/loop/int8/fast")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_paged_variant_int8_fast, sparse, PagedVariant::sparse)
    ->Name("decode/paged/sparse/int8/fast")->UseManualTime()->Unit(benchmark::kMicrosecond);

// Chunked prefill over a paged cache (attention_prefill_paged): B = 4 sequences of 4096
// cached tokens each, the last 256 of each the new chunk (T = 1024 packed query rows), bf16
// pages of 16 shuffled through the pool, Qwen3-0.6B heads, 2 threads. Each step alternates with
// the same-run baseline: attention_prefill of each sequence on a contiguous copy of its keys
// (q_offset = 4096 - 256). vs_contig = median time ratio; GFLOPS counts 4·d flops per (query
// head, visible key).
// The timing loop of the chunked-prefill benchmarks below: attention_prefill_paged over `cache`
// (2 threads) alternated with baseline(copt) (copt: the same options with q_offset = L - n), the
// iteration time the paged call's; their outputs required equal bit for bit; then GFLOPS (4·d
// flops per query head and visible key of B sequences of L keys whose last n are the chunk),
// peak_frac and `ratio` = the median time ratio paged / baseline.
template <class KV, class Baseline>
void time_paged_prefill(benchmark::State& state, const attnkit::PagedKV<KV>& cache, const attnkit::PageTable& table,
                        const std::vector<std::int64_t>& cu, const std::vector<float>& q, std::vector<float>& out,
                        Baseline baseline, const std::vector<float>& ref, const char* ratio, std::int64_t L,
                        std::int64_t n, std::int64_t H, std::int64_t d) {
  const std::int64_t B = table.batch(), T = B * n;
  attnkit::AttentionOptions opt;
  opt.num_threads = 2;
  attnkit::AttentionOptions copt = opt;
  copt.q_offset = L - n;
  Paired pairs;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    attnkit::attention_prefill_paged<KV>(attnkit::ConstView3<float>(q.data(), {T, H, d}), cache, table, cu,
                                         attnkit::View3<float>(out.data(), {T, H, d}), attnkit::CausalMask{}, opt);
    const auto t1 = std::chrono::steady_clock::now();
    baseline(copt);
    const auto t2 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const double paged_s = std::chrono::duration<double>(t1 - t0).count();
    pairs.add(paged_s, std::chrono::duration<double>(t2 - t1).count());
    state.SetIterationTime(paged_s);
  }
  if (out != ref) state.SkipWithError("the paged prefill differs from its baseline");
  double flops = 0;
  for (std::int64_t t = 0; t < n; ++t) flops += static_cast<double>(B) * (L - n + t + 1) * H * 4.0 * d;
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] =
      benchmark::Counter(flops * 1e-9 / roofline().fma_gflops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters[ratio] = pairs.time_ratio();
}

void BM_prefill_paged(benchmark::State& state) {
  using KV = attnkit::bf16;
  constexpr std::int64_t H = PagedSets::H, Hk = PagedSets::Hk, d = PagedSets::d, L = 4096, n = 256, P = 16;
  const PagedSets ps(std::vector<std::int64_t>(4, L), P);
  const std::int64_t B = ps.B, T = B * n;
  std::mt19937 gen(44);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(T * H * d)), out(q.size()), ref(q.size());
  for (auto& x : q) x = nd(gen);
  std::vector<std::int64_t> cu;
  for (std::int64_t b = 0; b <= B; ++b) cu.push_back(b * n);
  const attnkit::PagedKV<KV> cache = ps.pool.view();
  const attnkit::PageTable table = ps.table(0);
  // Contiguous copies of each sequence's keys (the baseline's cache).
  std::vector<std::vector<KV>> kc(static_cast<std::size_t>(B)), vc(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    kc[b].resize(static_cast<std::size_t>(L * Hk * d));
    vc[b].resize(kc[b].size());
    for (std::int64_t s = 0; s < L; ++s)
      for (std::int64_t h = 0; h < Hk; ++h) {
        const std::int32_t page = table.page(b, s, attnkit::detail::paged::log2_exact(P));
        std::copy_n(cache.k.ptr(page, s % P, h), d, kc[b].data() + (s * Hk + h) * d);
        std::copy_n(cache.v.ptr(page, s % P, h), d, vc[b].data() + (s * Hk + h) * d);
      }
  }
  time_paged_prefill(
      state, cache, table, cu, q, out,
      [&](const attnkit::AttentionOptions& copt) {
        for (std::int64_t b = 0; b < B; ++b)
          attnkit::attention_prefill<KV>(attnkit::ConstView3<float>(q.data() + b * n * H * d, {n, H, d}),
                                         attnkit::ConstView3<KV>(kc[b].data(), {L, Hk, d}),
                                         attnkit::ConstView3<KV>(vc[b].data(), {L, Hk, d}),
                                         attnkit::View3<float>(ref.data() + b * n * H * d, {n, H, d}),
                                         attnkit::CausalMask{}, copt);
      },
      ref, "vs_contig", L, n, H, d);
}
BENCHMARK(BM_prefill_paged)->Name("prefill/paged/bf16/L:4096/chunk:256")->UseManualTime()->Iterations(10)
    ->Unit(benchmark::kMillisecond);

// The same chunked prefill over int8 pages (prefill/paged/int8/L:4096/chunk:256): the pages read
// in place (each row widened to code · scale as the kernel packs its key tiles), alternated with
// the route it replaced: the visible pages dequantised into an f32 staging copy
// (detail::paged::stage, staged_MB of it) and the f32 kernel run on that. vs_staged = median time
// ratio; the outputs must be equal bit for bit.
void BM_prefill_paged_int8(benchmark::State& state) {
  using KV = std::int8_t;
  using Sets = PagedSetsT<KV>;
  constexpr std::int64_t H = Sets::H, d = Sets::d, L = 4096, n = 256, P = 16;
  const Sets ps(std::vector<std::int64_t>(4, L), P);
  const std::int64_t B = ps.B, T = B * n;
  std::mt19937 gen(45);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(T * H * d)), out(q.size()), ref(q.size());
  for (auto& x : q) x = nd(gen);
  std::vector<std::int64_t> cu, seqs;
  for (std::int64_t b = 0; b <= B; ++b) cu.push_back(b * n);
  for (std::int64_t b = 0; b < B; ++b) seqs.push_back(b);
  const attnkit::PagedKV<KV> cache = ps.pool.view();
  const attnkit::PageTable table = ps.table(0);
  double staged_mb = 0;
  time_paged_prefill(
      state, cache, table, cu, q, out,
      [&](const attnkit::AttentionOptions& copt) {
        const auto st = attnkit::detail::paged::stage("bench", cache, table, seqs, copt.num_threads);
        staged_mb = static_cast<double>((st.k.size() + st.v.size()) * sizeof(float)) * 1e-6;
        for (std::int64_t b = 0; b < B; ++b)
          attnkit::attention_prefill<float>(attnkit::ConstView3<float>(q.data() + b * n * H * d, {n, H, d}),
                                            st.keys().slice(0, st.offset[b], st.offset[b] + L),
                                            st.values().slice(0, st.offset[b], st.offset[b] + L),
                                            attnkit::View3<float>(ref.data() + b * n * H * d, {n, H, d}),
                                            attnkit::CausalMask{}, copt);
      },
      ref, "vs_staged", L, n, H, d);
  state.counters["staged_MB"] = staged_mb;
}
BENCHMARK(BM_prefill_paged_int8)->Name("prefill/paged/int8/L:4096/chunk:256")->UseManualTime()->Iterations(10)
    ->Unit(benchmark::kMillisecond);

void BM_decode_paged_contig(benchmark::State& state) {
  using KV = attnkit::bf16;
  constexpr std::int64_t H = 16, Hk = 8, d = 128;
  const std::vector<std::int64_t> lengths = paged_bench_lengths(state.range(0));
  const std::int64_t B = static_cast<std::int64_t>(lengths.size());
  std::int64_t tokens = 0;
  for (auto L : lengths) tokens += L;
  const std::int64_t bytes = 2 * tokens * Hk * d * static_cast<std::int64_t>(sizeof(KV));
  const std::int64_t n_sets = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes);
  std::mt19937 gen(42);
  std::normal_distribution<float> nd;
  const std::int64_t T_max = *std::max_element(lengths.begin(), lengths.end());
  std::vector<float> src(static_cast<std::size_t>(T_max * Hk * d)), q(static_cast<std::size_t>(B * H * d)),
      out(static_cast<std::size_t>(B * H * d));
  for (auto& x : src) x = nd(gen);
  for (auto& x : q) x = nd(gen);
  std::vector<attnkit::KVCache<KV>> caches;
  caches.reserve(static_cast<std::size_t>(n_sets * B));
  for (std::int64_t s = 0; s < n_sets; ++s)
    for (auto L : lengths) {
      caches.emplace_back(Hk, d, d, L);
      const attnkit::ConstView3<float> kv(src.data(), {L, Hk, d});
      caches.back().append(kv, kv);
    }
  attnkit::DecodeOptions opt;
  opt.num_threads = 2;
  const auto call = [&](std::int64_t s) {
    for (std::int64_t b = 0; b < B; ++b) {
      const auto& c = caches[static_cast<std::size_t>(s * B + b)];
      attnkit::attention_decode<KV>(attnkit::ConstView2<float>(q.data() + b * H * d, {H, d}), c.keys(), c.values(),
                                    attnkit::View2<float>(out.data() + b * H * d, {H, d}), opt);
    }
  };
  warm_rotation(n_sets, call);
  std::int64_t i = 0;
  for (auto _ : state) {
    call(i++ % n_sets);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  stream_counters(state, bytes);
  state.counters["sets"] = static_cast<double>(n_sets);
}
BENCHMARK(BM_decode_paged_contig)
    ->Name("decode/paged_contig/bf16")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(0)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
