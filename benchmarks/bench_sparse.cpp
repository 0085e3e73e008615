// benchmarks/bench_sparse.cpp — DeepSeek-style sparse attention (sparse/) beside the dense
// kernel it replaces, timed alternately call for call (bench_data.hpp Paired), 2 threads.
// Shapes: 16 query / 8 KV heads of 128 (Qwen3-0.6B), indexer 16 heads × 64, top-k 2048.
//
//  sparse/decode/<kv>/T:<T>   one token: indexer_topk over T index keys + sparse_attention_decode,
//                             against attention_decode over all T keys. Iterations rotate over
//                             caches of >= 2 GiB in all, so both read DRAM, not the LLC.
//                             vs_dense = sparse time / dense time (median of pairs).
//                             GBps / bw_frac: bytes the sparse step must read (index keys, the
//                             selected K/V rows) per second, against the measured read bandwidth.
//                             int8 (KVCache<std::int8_t>, the selected codes and scales read in
//                             registers): vs_staged = its time / the route the model took before
//                             (the whole cache dequantised to f32, then the f32 kernel).
//  sparse/prefill/<kv>/T:<T>  T tokens: indexer_topk + sparse_attention_prefill, against causal
//                             attention_prefill. idx_GFLOPS counts 2·H_I·d_I flops per scored
//                             (query, key) pair; attn_GFLOPS 4·d per selected pair and head;
//                             K/V head-major (as KVCache) for both kernels;
//                             *_frac = of the measured FMA peak; idx_s / attn_s the two parts.
//  .../fast/...               the indexer under Precision::fast (int8 index vectors on VNNI):
//                             idx_GFLOPS then counts int8 ops and idx_frac is of the measured
//                             int8 dot-product peak (roofline/int8_dot); the attention is the same
//                             for f32 / bf16 K/V (fast only changes int8 keys' scores).
//  sparse/prefill/int8/...    K/V in a KVCache<std::int8_t> (codes and scales read in place by
//                             both kernels); under fast the sparse kernel scores the selected
//                             keys on VNNI against the query quantised per token and head, and
//                             the dense one runs attention_prefill under fast too (AMX tiles where
//                             the machine has them, the FMA kernel elsewhere).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/sparse/indexer.hpp"
#include "attnkit/sparse/sparse_attention.hpp"
#include "bench_data.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;
using bench::Buffer;
using bench::fill;
using bench::kD;
using bench::kH;
using bench::kHkv;

constexpr std::int64_t kHI = 16, kDI = 64, kTopK = 2048;
constexpr int kThreads = 2;

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <class KV>
void BM_sparse_decode(benchmark::State& state, std::int64_t T, Precision precision) {
  const std::int64_t kv_bytes = 2 * T * kHkv * kD * static_cast<std::int64_t>(sizeof(KV));
  const std::int64_t n_sets = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + kv_bytes - 1) / kv_bytes);
  struct Set {
    KVCache<KV> cache;
    Buffer<float> index_k;
  };
  std::vector<Set> sets;
  sets.reserve(static_cast<std::size_t>(n_sets));
  {
    const auto src = fill<float>(T * kHkv * kD, 11);
    const ConstView3<float> kv(src.data(), {T, kHkv, kD});
    for (std::int64_t c = 0; c < n_sets; ++c) {
      sets.push_back({KVCache<KV>(kHkv, kD, kD, T), fill<float>(T * kDI, 100 + static_cast<std::uint32_t>(c))});
      sets.back().cache.append(kv, kv);
    }
  }
  const auto q = fill<float>(kH * kD, 1), iq = fill<float>(kHI * kDI, 2), iw = fill<float>(kHI, 3, 0.5f);
  const auto out = fill<float>(kH * kD, 4);
  std::vector<std::int32_t> idx(static_cast<std::size_t>(kTopK));
  IndexerOptions io;
  io.num_threads = kThreads;
  io.precision = precision;
  SparseAttentionOptions so;
  so.num_threads = kThreads;
  DecodeOptions dopt;
  dopt.num_threads = kThreads;
  const ConstView2<float> qv(q.data(), {kH, kD});
  const View2<float> ov(out.data(), {kH, kD});
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  // int8: also the route the model took before (the whole cache dequantised to f32, then the f32
  // kernel over the selection), timed after each pair; vs_staged = sparse time / that time.
  std::vector<float> staged_k(quant ? static_cast<std::size_t>(T * kHkv * kD) : 0), staged_v(staged_k.size());
  bench::Paired pairs;
  double idx_s = 0, staged_s = 0;
  bench::warm_rotation(static_cast<std::int64_t>(sets.size()), [&](std::int64_t c) {
    if constexpr (quant) attention_decode(qv, sets[c].cache.keys(), sets[c].cache.values(), ov, dopt);
    else attention_decode<KV>(qv, sets[c].cache.keys(), sets[c].cache.values(), ov, dopt);
  });
  std::size_t i = 0;
  for (auto _ : state) {
    const Set& a = sets[i % sets.size()];
    const Set& b = sets[(i + sets.size() / 2) % sets.size()];
    ++i;
    const double t0 = now_s();
    indexer_topk(ConstView3<float>(iq.data(), {1, kHI, kDI}), ConstView2<float>(a.index_k.data(), {T, kDI}),
                 ConstView2<float>(iw.data(), {1, kHI}), View2<std::int32_t>(idx.data(), {1, kTopK}), io);
    const double t_idx = now_s() - t0;
    idx_s += t_idx;
    const ConstView1<std::int32_t> sel(idx.data(), {kTopK});
    if constexpr (quant) sparse_attention_decode(qv, a.cache.keys(), a.cache.values(), sel, ov, so);
    else sparse_attention_decode<KV>(qv, a.cache.keys(), a.cache.values(), sel, ov, so);
    benchmark::ClobberMemory();
    const double t1 = now_s();
    if constexpr (quant) attention_decode(qv, b.cache.keys(), b.cache.values(), ov, dopt);
    else attention_decode<KV>(qv, b.cache.keys(), b.cache.values(), ov, dopt);
    benchmark::ClobberMemory();
    const double t2 = now_s();
    pairs.add(t1 - t0, t2 - t1);
    if constexpr (quant) {
      const View3<float> sk(staged_k.data(), {T, kHkv, kD}), sv(staged_v.data(), {T, kHkv, kD});
      dequantize(a.cache.keys(), sk);
      dequantize(a.cache.values(), sv);
      sparse_attention_decode<float>(qv, sk, sv, sel, ov, so);
      benchmark::ClobberMemory();
      staged_s += now_s() - t2 + t_idx;  // the staged route, with the same indexer time
    }
  }
  const double n = static_cast<double>(state.iterations());
  const double sparse_s = pairs.variant_s / n;
  const double row_bytes = quant ? kD + 4.0 : kD * static_cast<double>(sizeof(KV));
  const double bytes = static_cast<double>(T * kDI * 4) + static_cast<double>(std::min(T, kTopK) * kHkv) * 2 * row_bytes;
  if constexpr (quant) state.counters["vs_staged"] = sparse_s / (staged_s / n);
  state.counters["vs_dense"] = pairs.time_ratio();
  state.counters["sparse_us"] = sparse_s * 1e6;
  state.counters["idx_us"] = idx_s / n * 1e6;
  state.counters["dense_us"] = pairs.plain_s / n * 1e6;
  state.counters["GBps"] = bytes / sparse_s * 1e-9;
  state.counters["bw_frac"] = bytes / sparse_s * 1e-9 / bench::roofline().read_gbps;
  state.counters["caches"] = static_cast<double>(n_sets);
}

// The K/V of a prefill benchmark: head-major, as a KVCache holds them (a [T, H_kv, d] buffer puts
// one head's rows 4 KiB apart, where they alias in L1/L2); int8 in a KVCache<std::int8_t>.
template <class KV>
struct PrefillKV {
  Buffer<KV> k, v;
  ConstView3<KV> keys, values;
  PrefillKV(std::int64_t T)
      : k(fill<KV>(T * kHkv * kD, 2)), v(fill<KV>(T * kHkv * kD, 3)),
        keys(k.data(), {T, kHkv, kD}, {kD, T * kD, 1}), values(v.data(), {T, kHkv, kD}, {kD, T * kD, 1}) {}
};
template <>
struct PrefillKV<std::int8_t> {
  KVCache<std::int8_t> cache;
  QuantView3 keys, values;
  PrefillKV(std::int64_t T) : cache(kHkv, kD, kD, T) {
    const auto k = fill<float>(T * kHkv * kD, 2), v = fill<float>(T * kHkv * kD, 3);
    cache.append(ConstView3<float>(k.data(), {T, kHkv, kD}), ConstView3<float>(v.data(), {T, kHkv, kD}));
    keys = cache.keys();
    values = cache.values();
  }
};

template <class KV>
void BM_sparse_prefill(benchmark::State& state, std::int64_t T, Precision precision) {
  const auto q = fill<float>(T * kH * kD, 1);
  const PrefillKV<KV> kv_data(T);
  const auto& kv = kv_data.keys;
  const auto& vv = kv_data.values;
  const auto out = fill<float>(T * kH * kD, 4);
  const auto iq = fill<float>(T * kHI * kDI, 5), ik = fill<float>(T * kDI, 6), iw = fill<float>(T * kHI, 7, 0.5f);
  std::vector<std::int32_t> idx(static_cast<std::size_t>(T * kTopK));
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const View3<float> ov(out.data(), {T, kH, kD});
  IndexerOptions io;
  io.num_threads = kThreads;
  io.precision = precision;
  SparseAttentionOptions so;
  so.num_threads = kThreads;
  so.precision = precision;
  AttentionOptions ao;
  ao.num_threads = kThreads;
  ao.precision = precision;
  bench::Paired pairs;
  double idx_s = 0, attn_s = 0;
  for (auto _ : state) {
    const double t0 = now_s();
    indexer_topk(ConstView3<float>(iq.data(), {T, kHI, kDI}), ConstView2<float>(ik.data(), {T, kDI}),
                 ConstView2<float>(iw.data(), {T, kHI}), View2<std::int32_t>(idx.data(), {T, kTopK}), io);
    const double t1 = now_s();
    if constexpr (std::is_same_v<KV, std::int8_t>) {
      sparse_attention_prefill(qv, kv, vv, ConstView2<std::int32_t>(idx.data(), {T, kTopK}), ov, so);
    } else {
      sparse_attention_prefill<KV>(qv, kv, vv, ConstView2<std::int32_t>(idx.data(), {T, kTopK}), ov, so);
    }
    benchmark::ClobberMemory();
    const double t2 = now_s();
    if constexpr (std::is_same_v<KV, std::int8_t>) attention_prefill(qv, kv, vv, ov, CausalMask{}, ao);
    else attention_prefill<KV>(qv, kv, vv, ov, CausalMask{}, ao);
    benchmark::ClobberMemory();
    pairs.add(t2 - t0, now_s() - t2);
    idx_s += t1 - t0;
    attn_s += t2 - t1;
  }
  const double n = static_cast<double>(state.iterations());
  double scored = 0, selected = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    scored += t + 1 > kTopK ? static_cast<double>(t + 1) : 0.0;  // queries that see <= k keys are not scored
    selected += static_cast<double>(std::min(t + 1, kTopK));
  }
  const double peak = bench::roofline().fma_gflops;
  const double idx_peak = precision == Precision::fast ? bench::roofline().int8_gops : peak;
  const double idx_gflops = scored * 2.0 * kHI * kDI / (idx_s / n) * 1e-9;
  const double attn_gflops = selected * kH * 4.0 * kD / (attn_s / n) * 1e-9;
  state.counters["vs_dense"] = pairs.time_ratio();
  state.counters["sparse_s"] = pairs.variant_s / n;
  state.counters["dense_s"] = pairs.plain_s / n;
  state.counters["idx_s"] = idx_s / n;
  state.counters["attn_s"] = attn_s / n;
  state.counters["idx_GFLOPS"] = idx_gflops;
  state.counters["idx_frac"] = idx_gflops / idx_peak;
  state.counters["attn_GFLOPS"] = attn_gflops;
  state.counters["attn_frac"] = attn_gflops / peak;
}

const bool registered = [] {
  const auto reg = [](const std::string& name, auto fn, std::int64_t T, int iters,
                      Precision precision = Precision::exact) {
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { fn(s, T, precision); })
        ->UseRealTime()
        ->Iterations(iters)
        ->Unit(benchmark::kMillisecond);
  };
  reg("sparse/decode/f32/T:32768", BM_sparse_decode<float>, 32768, 200);
  reg("sparse/decode/bf16/T:32768", BM_sparse_decode<bf16>, 32768, 200);
  reg("sparse/decode/int8/T:32768", BM_sparse_decode<std::int8_t>, 32768, 100);
  reg("sparse/prefill/f32/T:4096", BM_sparse_prefill<float>, 4096, 3);
  reg("sparse/prefill/f32/T:16384", BM_sparse_prefill<float>, 16384, 2);
  reg("sparse/prefill/bf16/T:16384", BM_sparse_prefill<bf16>, 16384, 2);
  reg("sparse/prefill/bf16/fast/T:16384", BM_sparse_prefill<bf16>, 16384, 2, Precision::fast);
  reg("sparse/prefill/int8/T:16384", BM_sparse_prefill<std::int8_t>, 16384, 2);
  reg("sparse/prefill/int8/fast/T:16384", BM_sparse_prefill<std::int8_t>, 16384, 2, Precision::fast);
  return true;
}();

}  // namespace
