// Qwen3-0.6B-shaped model with random bf16 weights: prefill of a 512-token prompt and cached
// decode, tokens/s, 1 and 2 threads. model/q8/... is the same model with its linear layers
// quantised to q8 at load (8-bit weights), paired with bf16 step for step: vs_plain is q8's speed
// over bf16's; decode runs both kernels (q8-exact: weights widened to f32, q8-fast: VNNI on
// int8 activations) against bf16 decode. Decode also reports the weight bytes streamed per second
// against the measured DRAM read bandwidth (decode reads every weight once per token).
// Loop Attention variants of the same shape (qwen3-0.6b-loop: gates, loop_num 2, window 64)
// run beside the plain model in the same binary: model/loop-stack/... and model/loop-layer/....
// Stack mode makes two passes over the weights per token, so its ideal is 0.5x plain. The
// loop benchmarks alternate with the plain model step by step and report vs_plain (their speed
// as a fraction of plain's, median over the pairs).
// Attention Residuals variants (model/attnres-block/..., model/attnres-full/...) have the
// open-attention-residuals 0.6B shape (head_dim 64, 8 blocks) and pair with a plain model of that
// same shape ("attnres-base"): the routing is the only difference.
// Ouro-1.4B (model/ouro-1.4b/...: 24 layers, D 2048, MHA 16 x 128, 4 steps of the shared stack,
// random bf16 weights) pairs with a one-step model of the same shape ("ouro-1.4b-1step"):
// per_step_vs_base = vs_plain x steps, 1.0 when looping adds nothing beyond the layers' own
// cost; decode's GBps counts every weight once per step.
// The Qwen3.5-style hybrid (model/hybrid/...: Qwen3-0.6B dimensions, 21 Gated DeltaNet layers of
// 16 key / 16 value heads of 128 and 7 gated full-attention layers) pairs with plain Qwen3-0.6B.
// model/{plain,hybrid}/decode_context decodes after 512 and after 8192 tokens of context, step
// for step alternately, and reports ctx_ratio = median(step time at 512 / step time at 8192):
// a linear-time mixer keeps it near 1, full attention reads a KV cache 16x longer.
// LT2 (model/lt2-*): the 1.3B recipes of spec §9.2 (D 2048, 20 shared layers looped 4 times,
// "4:1"), Full+GDN ("lt2-hybrid-1.3b") and GDN+DSA ("lt2-gdn-dsa-1.3b", top-2048), each paired
// with the looped all-full-attention model of the same shape ("lt2-full-1.3b"). Their
// decode_context runs one "4:1" group of the same layers (5 layers x 4 loops: "lt2-*-5l"), whose
// per-layer weight and cache bytes are the 1.3B model's; the 20-layer models would need about
// 15 minutes to prefill 8192 tokens here.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <type_traits>
#include <map>
#include <memory>
#include <string>
#include <random>
#include <vector>

#include "attnkit/attnkit.hpp"
#include "bench_data.hpp"
#include "roofline.hpp"

using namespace attnkit;

namespace {

// "plain", "loop-stack", "loop-layer", "attnres-base", "attnres-block" or "attnres-full"; built
// once, on first use.
const model::Qwen3Model& qwen3_0_6b(const std::string& variant = "plain") {
  static std::map<std::string, std::unique_ptr<model::Qwen3Model>> models;
  auto& m = models[variant];
  if (!m) {
    nlohmann::json j = io::qwen3_0_6b_config().raw;
    if (variant.rfind("loop-", 0) == 0) {
      j["loop_num"] = 2;
      j["loop_window_size"] = 64;
      j["loop_mode"] = variant == "loop-stack" ? "stack" : "layer";
    } else if (variant.rfind("attnres-", 0) == 0) {
      j = model::open_attnres_0_6b_config(variant != "attnres-base");
      if (variant == "attnres-full") j["attnres_mode"] = "full";
    } else if (variant == "hybrid") {
      j = model::hybrid_0_6b_config();
    } else if (variant.rfind("lt2-", 0) == 0) {
      j = model::lt2_1_3b_config(variant.find("dsa") != std::string::npos);
      if (variant.find("full") != std::string::npos) {
        j["mixer"] = "full";
        j.erase("attention_pattern");
        j.erase("attention_layer");
        for (const char* k : {"linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                              "linear_value_head_dim", "linear_conv_kernel_dim"})
          j.erase(k);
      }
      if (variant.size() > 3 && variant.compare(variant.size() - 3, 3, "-5l") == 0) j["num_hidden_layers"] = 5;
    } else if (variant.rfind("tuneable", 0) == 0) {
      j = model::qwen3_0_6b_tuneable_config();  // r = 384 = 3 d_k
      if (variant == "tuneable-unfolded") j["tuneable_form"] = "unfolded";
    } else if (variant == "swa") {  // every other layer a sliding window of 128 keys (Gemma / Qwen3 SWA style)
      j["use_sliding_window"] = true;
      j["sliding_window"] = 128;
      j["layer_types"] = nlohmann::json::array();
      for (int l = 0; l < 28; ++l) j["layer_types"].push_back(l % 2 ? "full_attention" : "sliding_attention");
    } else if (variant.rfind("ouro-1.4b", 0) == 0) {
      j = model::ouro_1_4b_config();
      if (variant == "ouro-1.4b-1step") j["total_ut_steps"] = 1;
    }
    const auto reg = model::default_registry();
    const auto type = variant == "q8" ? model::WeightType::q8 : model::WeightType::bf16;
    m = std::make_unique<model::Qwen3Model>(
        model::Qwen3Model::random(reg.parse_config(j, "qwen3-0.6b " + variant), type, 1, &reg));
  }
  return *m;
}

// The model a variant is measured against.
std::string base_of(const std::string& variant) {
  if (variant == "plain" || variant == "attnres-base" || variant == "ouro-1.4b-1step") return "";
  if (variant == "ouro-1.4b") return "ouro-1.4b-1step";
  if (variant.rfind("lt2-", 0) == 0) return variant.find("full") != std::string::npos ? "" : "lt2-full-1.3b";
  return variant.rfind("attnres-", 0) == 0 ? "attnres-base" : "plain";
}

std::vector<std::int64_t> prompt(std::int64_t n, std::int64_t vocab) {
  std::mt19937_64 g(5);
  std::uniform_int_distribution<std::int64_t> d(0, vocab - 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (auto& x : ids) x = d(g);
  return ids;
}

using bench::clk;
double seconds_since(clk::time_point t0) { return bench::seconds(t0, clk::now()); }

// A variant is timed alternately with the plain model, step for step, and vs_plain is the
// median over the pairs of (plain time / variant time), i.e. the variant's speed as a fraction
// of plain's. The reported time and tok_s are the variant's alone.
// passes: how many more passes over the layers the variant makes than its base (Ouro's 4 steps
// against one step; 1 when both loop alike, as LT2 and its looped full-attention base).
void report_pairs(benchmark::State& state, const bench::Paired& pairs, int passes = 1) {
  if (pairs.variant.empty()) return;
  state.counters["vs_plain"] = pairs.speed_ratio();
  if (passes > 1) state.counters["per_step_vs_base"] = pairs.speed_ratio() * passes;
}
int extra_passes(const model::Qwen3Model& m, const std::string& base) {
  return base.empty() ? 1 : m.passes() / qwen3_0_6b(base).passes();
}

// Prefill: the whole prompt in one step; logits of the last row only (what generation needs).
void BM_model_prefill(benchmark::State& state, Precision precision, std::string variant) {
  const auto& m = qwen3_0_6b(variant);
  const std::string base = base_of(variant);
  const bool paired = !base.empty();
  const std::int64_t T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const auto ids = prompt(T, m.config().vocab_size);
  std::vector<float> logits(static_cast<std::size_t>(m.config().vocab_size));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  fo.num_threads = threads;
  const auto step = [&](const model::Qwen3Model& mm) {
    auto s = mm.new_session({model::CacheType::f32, T});
    const auto t0 = clk::now();
    mm.forward(s, ids, View2<float>(logits.data(), {1, mm.config().vocab_size}), fo);
    benchmark::DoNotOptimize(logits.data());
    return seconds_since(t0);
  };
  bench::Paired pairs;
  double total = 0;
  for (auto _ : state) {
    const double plain_s = paired ? step(qwen3_0_6b(base)) : 0.0;
    const double s = step(m);
    if (paired) pairs.add(s, plain_s);
    state.SetIterationTime(s);
    total += s;
  }
  state.counters["tok_s"] = static_cast<double>(T) * static_cast<double>(state.iterations()) / total;
  report_pairs(state, pairs, extra_passes(m, base));
}

// A decoding session of one model: prefilled with `prompt_len` random ids (untimed, in chunks
// of 2048 so the activations stay small, Precision::fast: a one-token step is bandwidth bound
// either way), then one untimed decode step, since the first step after a long prefill can
// stall on the kernel faulting in and zeroing fresh cache pages (seen up to 7x a steady step at
// 1.4B x 4 steps); step() then times one greedy decode step.
struct DecodeStream {
  const model::Qwen3Model& m;
  model::Session s;
  model::ForwardOptions fo;
  std::vector<float> logits;
  std::int64_t next = 0;

  DecodeStream(const model::Qwen3Model& mm, model::CacheType kv, std::int64_t prompt_len, int threads,
               Precision decode_precision = Precision::exact)
      : m(mm), s(mm.new_session({kv, prompt_len + 4096})), logits(static_cast<std::size_t>(mm.config().vocab_size)) {
    const std::int64_t V = m.config().vocab_size;
    const auto ids = prompt(prompt_len, V);
    fo.logits = model::LogitsRows::last;
    fo.num_threads = threads;
    fo.precision = Precision::fast;
    for (std::int64_t p = 0; p < prompt_len; p += 2048) {
      const std::int64_t n = std::min<std::int64_t>(2048, prompt_len - p);
      m.forward(s, std::span<const std::int64_t>(ids.data() + p, static_cast<std::size_t>(n)), out(), fo);
    }
    fo.precision = decode_precision;
    next = ops::argmax(logits.data(), V);
    step();
  }
  View2<float> out() { return View2<float>(logits.data(), {1, m.config().vocab_size}); }
  double step() {
    const auto t0 = clk::now();
    m.forward(s, std::span<const std::int64_t>(&next, 1), out(), fo);
    const double sec = seconds_since(t0);
    next = ops::argmax(logits.data(), m.config().vocab_size);
    return sec;
  }
};

// Decode after a prompt of `T` tokens: each iteration decodes one token (and one of the plain
// model, for a variant).
void BM_model_decode_at(benchmark::State& state, model::CacheType kv, std::string variant, Precision precision) {
  const auto& m = qwen3_0_6b(variant);
  const std::string base_name = base_of(variant);
  const bool paired = !base_name.empty();
  const std::int64_t T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  DecodeStream mine(m, kv, T, threads, precision);
  std::unique_ptr<DecodeStream> base;
  if (paired) base = std::make_unique<DecodeStream>(qwen3_0_6b(base_name), kv, T, threads);
  bench::Paired pairs;
  double total = 0;
  for (auto _ : state) {
    const double plain_s = paired ? base->step() : 0.0;
    const double s = mine.step();
    if (paired) pairs.add(s, plain_s);
    state.SetIterationTime(s);
    total += s;
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["tok_s"] = iters / total;
  // Weight bytes only (the KV cache read adds 2 * T * layers * H_kv * d * sizeof(kv) per step);
  // a stack of several passes reads the layers' weights once per pass.
  const double gbps = static_cast<double>(m.streamed_bytes_per_token()) * iters / total / 1e9;
  state.counters["GBps"] = gbps;
  state.counters["bw_frac"] = gbps / bench::roofline().read_gbps;
  report_pairs(state, pairs, extra_passes(m, base_name));
}

void BM_model_decode(benchmark::State& state, model::CacheType kv, std::string variant) {
  BM_model_decode_at(state, kv, std::move(variant), Precision::exact);
}

// Batched decode (model/batch_session.hpp): B sequences continue one 512-token prompt
// (prefilled once, untimed, and forked B ways: the prompt's pages are shared, each sequence
// writes its own), one decode token each per step. Each iteration times one step of the B
// sequences and, alternately, one step of a single forked sequence in the same session and one
// step of a plain Session (DecodeStream, the same prompt length and cache type): tok_s is the
// aggregate B / step time, x_B1 = B x median(single step time / batch step time), the aggregate
// speed against B = 1 (the weights are read once per step for all B), x_session the same
// against the plain Session's decode (at B = 1: what batching costs one sequence). GBps counts the
// weight bytes once per step (the KV pages add 2 x context x layers x H_kv x d x 2 bytes per
// sequence); bw_frac = that / the measured DRAM read bandwidth.
// model/tuneable{,-unfolded}/batch: the same at B 8 for Tuneable attention (r = 384) in every layer,
// folded (d_k-wide keys, the metric on the query) and unfolded (384-wide keys in 3 pool slots per
// KV head), beside the plain model's figures of the same run. model/swa/batch: every other layer
// a sliding window of 128 keys (in the session's window pool, its pages below the window freed).
struct BatchDecode {
  const model::Qwen3Model& m;
  model::BatchSession bs;
  std::int64_t root = 0;
  std::vector<float> root_logits;
  BatchDecode(const model::Qwen3Model& mm, std::int64_t prompt_len, std::int64_t pages)
      : m(mm), bs(mm.new_batch_session({model::CacheType::bf16, 0}, {16, pages})) {
    const std::int64_t V = m.config().vocab_size;
    const auto ids = prompt(prompt_len, V);
    root = bs.add();
    root_logits.resize(static_cast<std::size_t>(V));
    model::ForwardOptions fo;
    fo.logits = model::LogitsRows::last;
    fo.precision = Precision::fast;
    const model::SequenceTokens st[] = {{root, ids}};
    m.forward_batch(bs, st, View2<float>(root_logits.data(), {1, V}), fo);
  }
};

void BM_model_batch_decode(benchmark::State& state, std::string variant) {
  static std::map<std::string, std::unique_ptr<BatchDecode>> built;
  auto& slot = built[variant];
  // The variants' pools start small: a 3-slot unfolded layer takes 3x plain's bytes per page.
  if (!slot) slot = std::make_unique<BatchDecode>(qwen3_0_6b(variant), 512, variant == "plain" ? 4096 : 256);
  BatchDecode& bd = *slot;
  const auto& m = bd.m;
  const std::int64_t B = state.range(0), V = m.config().vocab_size;
  const int threads = static_cast<int>(state.range(1));
  std::vector<std::int64_t> seqs, one = {bd.bs.fork(bd.root)};
  for (std::int64_t b = 0; b < B; ++b) seqs.push_back(bd.bs.fork(bd.root));
  const std::int64_t first = ops::argmax(bd.root_logits.data(), V);
  std::vector<std::int64_t> next(static_cast<std::size_t>(B), first), next1 = {first};
  std::vector<float> logits(static_cast<std::size_t>(B * V));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.num_threads = threads;
  const auto step = [&](const std::vector<std::int64_t>& ids, std::vector<std::int64_t>& toks) {
    std::vector<model::SequenceTokens> st;
    for (std::size_t b = 0; b < ids.size(); ++b) st.push_back({ids[b], std::span<const std::int64_t>(&toks[b], 1)});
    const auto t0 = clk::now();
    m.forward_batch(bd.bs, st, View2<float>(logits.data(), {static_cast<std::int64_t>(ids.size()), V}), fo);
    const double sec = seconds_since(t0);
    for (std::size_t b = 0; b < ids.size(); ++b) toks[b] = ops::argmax(logits.data() + b * V, V);
    return sec;
  };
  step(seqs, next);  // untimed: the first step copies the shared last page of every fork
  step(one, next1);
  static std::map<std::string, std::unique_ptr<DecodeStream>> sessions;
  auto& session_slot = sessions[variant];
  if (!session_slot) session_slot = std::make_unique<DecodeStream>(m, model::CacheType::bf16, 512, threads);
  DecodeStream& session = *session_slot;
  bench::Paired pairs, vs_session;
  double total = 0;
  for (auto _ : state) {
    const double single = step(one, next1);
    const double plain = session.step();
    const double s = step(seqs, next);
    pairs.add(s, single);
    vs_session.add(s, plain);
    state.SetIterationTime(s);
    total += s;
  }
  for (auto id : seqs) bd.bs.remove(id);
  bd.bs.remove(one[0]);
  const double iters = static_cast<double>(state.iterations());
  state.counters["tok_s"] = static_cast<double>(B) * iters / total;
  state.counters["x_B1"] = static_cast<double>(B) * pairs.speed_ratio();
  state.counters["x_session"] = static_cast<double>(B) * vs_session.speed_ratio();
  const double gbps = static_cast<double>(m.streamed_bytes_per_token()) * iters / total / 1e9;
  state.counters["GBps"] = gbps;
  state.counters["bw_frac"] = gbps / bench::roofline().read_gbps;
}

// Decode after a short (512) and a long (T) context, alternately step for step (same model, two
// sessions); ctx_ratio = median(step time at 512 / step time at T).
void BM_model_decode_context(benchmark::State& state, model::CacheType kv, std::string variant) {
  const auto& m = qwen3_0_6b(variant);
  const int threads = static_cast<int>(state.range(1));
  DecodeStream near(m, kv, 512, threads), far(m, kv, state.range(0), threads);
  bench::Paired pairs;  // "variant" = the long context, "plain" = the short one
  double total_long = 0, total_short = 0;
  for (auto _ : state) {
    const double s_short = near.step();
    const double s_long = far.step();
    pairs.add(s_long, s_short);
    state.SetIterationTime(s_long);
    total_long += s_long;
    total_short += s_short;
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["tok_s_512"] = iters / total_short;
  state.counters["tok_s_long"] = iters / total_long;
  state.counters["ctx_ratio"] = pairs.speed_ratio();
}

// ---- Long context, as llama-bench's -d: model/qwen3-0.6b/{decode,prefill:512}/.../depth:N -------
//
// Plain Qwen3-0.6B (bf16 weights) with `depth` tokens already in every layer's KV cache. The
// context is not prefilled (32768 tokens of causal prefill would take about 10 minutes here):
// each layer's cache gets `depth` rows of random K/V appended directly (Qwen3Attention::cache;
// decode and prefill cost do not depend on the cached values), once per process for each
// (cache type, depth); the cases run in registration order, so one context is alive at a time.
// After every timed step the caches are cut back to `depth` (KVCache::truncate,
// Session::set_position), so every decode step attends exactly depth + 1 keys and every prefill
// continues at exactly `depth`.
//  * decode: one greedy token (Precision::exact, as model/decode); tok_s; GBps = (weight bytes
//    + KV-cache bytes read per token) / time; bw_frac = that byte count / the measured DRAM read
//    bandwidth (the bound time per token) over the measured time; kv_MB = the cache bytes read.
//  * prefill:512 after depth: 512 tokens continuing the context, last row's logits, Precision
//    fast or exact; tok_s and GFLOPS (projections and MLP 2 x params x tokens, the head for one
//    row, attention 4 x heads x head_dim per attended (query, key) pair: causal within the 512
//    and all `depth` cached keys).

// One line per cache type: adding a type here registers its decode cases at every depth.
// elem_bytes: storage per K/V element (the memory check before a context is built).
struct DepthKv {
  model::CacheType type;
  const char* name;
  double elem_bytes;
};
const DepthKv kDepthKv[] = {
    {model::CacheType::bf16, "bf16", 2},
    {model::CacheType::f32, "f32", 4},
    {model::CacheType::int8, "int8", 1 + 4.0 / 128},  // + an f32 scale per row of 128
};
const std::int64_t kDecodeDepths[] = {512, 8192, 32768};
constexpr std::int64_t kPrefillDepth = 8192, kPrefillTokens = 512;
// Prefill-after-depth runs with this cache type (model/prefill's f32, so depth 0 is that case).
constexpr model::CacheType kPrefillKv = model::CacheType::f32;

std::int64_t mem_available_bytes() {
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (!f) return -1;
  char line[256];
  std::int64_t kb = -1;
  while (std::fgets(line, sizeof line, f))
    if (std::sscanf(line, "MemAvailable: %ld kB", &kb) == 1) break;
  std::fclose(f);
  return kb < 0 ? -1 : kb * 1024;
}

// Bytes a cache of storage type T holds per token and KV head (an int8 row also has its scale).
template <class Cache>
double cache_row_bytes(const Cache& c) {
  using T = std::remove_const_t<typename decltype(c.keys())::element_type>;
  const double scale = std::is_same_v<T, std::int8_t> ? 2.0 * sizeof(float) : 0.0;
  return static_cast<double>((c.head_dim_k() + c.head_dim_v()) * static_cast<std::int64_t>(sizeof(T))) + scale;
}

class DepthContext {
 public:
  // The context for (kv, depth), building it (and dropping any other) when it is not the one
  // held; nullptr with `why` set when it does not fit in memory.
  static DepthContext* get(const DepthKv& kv, std::int64_t depth, std::string& why) {
    static std::unique_ptr<DepthContext> held;
    if (held && held->kv_ == kv.type && held->depth_ == depth) return held.get();
    held.reset();
    const auto& m = qwen3_0_6b();
    const auto& c = m.config();
    const std::int64_t reserve = depth + kPrefillTokens + 64;
    const double need = static_cast<double>(reserve) * static_cast<double>(c.num_hidden_layers * c.num_key_value_heads) *
                        2.0 * static_cast<double>(c.head_dim) * kv.elem_bytes;
    const double avail = static_cast<double>(mem_available_bytes());
    if (avail >= 0 && need + 2e9 > avail) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "kv:%s at depth %ld needs %.1f GB of KV cache (+2 GB headroom); %.1f GB available",
                    kv.name, static_cast<long>(depth), need * 1e-9, avail * 1e-9);
      why = buf;
      return nullptr;
    }
    held.reset(new DepthContext(m, kv.type, depth, reserve));
    return held.get();
  }

  const model::Qwen3Model& m;
  model::Session s;

  // Every layer's cache back to `depth` rows, the session back to position `depth`.
  void rewind() {
    for_each_cache([&](auto& c) { c.truncate(depth_); });
    s.set_position(depth_);
  }
  // KV-cache bytes one decode step reads: depth + 1 rows in every layer.
  double kv_bytes_per_decode_step() {
    double b = 0;
    for_each_cache([&](auto& c) { b += static_cast<double>((depth_ + 1) * c.kv_heads()) * cache_row_bytes(c); });
    return b;
  }
  std::int64_t depth() const { return depth_; }

 private:
  DepthContext(const model::Qwen3Model& mm, model::CacheType kv, std::int64_t depth, std::int64_t reserve)
      : m(mm), s(mm.new_session({kv, reserve})), kv_(kv), depth_(depth) {
    const auto& c = m.config();
    const std::int64_t Hkv = c.num_key_value_heads, d = c.head_dim, chunk = 512;
    // One chunk of random rows, appended over and over (the values do not change the cost).
    std::vector<float> kv_rows(static_cast<std::size_t>(chunk * Hkv * d));
    std::mt19937 g(11);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& x : kv_rows) x = u(g);
    const ConstView3<float> rows(kv_rows.data(), {chunk, Hkv, d});
    for_each_cache([&](auto& cache) {
      for (std::int64_t t = 0; t < depth; t += chunk) {
        const auto part = rows.slice(0, 0, std::min(chunk, depth - t));
        cache.append(part, part);
      }
    });
    s.set_position(depth);
  }

  // f(KVCache<T>&) for every attention layer and pass; other layer types cannot hold a context.
  template <class F>
  void for_each_cache(F&& f) {
    for (int l = 0; l < m.num_layers(); ++l) {
      const auto* attn = dynamic_cast<const model::Qwen3Attention*>(&m.mixer(l));
      ATTNKIT_REQUIRE(attn != nullptr, "bench_model depth: layer ", l, " is ", m.mixer(l).kind(), ", not attention");
      for (int p = 0; p < m.passes(); ++p)
        attn->cache(s.state(l), p).visit([&](auto& c) {
          if constexpr (requires { c.total(); }) ATTNKIT_REQUIRE(false, "bench_model depth: layer ", l, " has a ring cache");
          else f(c);
        });
    }
  }

  model::CacheType kv_;
  std::int64_t depth_;
};

void BM_model_decode_depth(benchmark::State& state, DepthKv kv, std::int64_t depth, Precision precision) {
  const double read_gbps = bench::roofline().read_gbps;  // measured before anything is timed
  std::string why;
  DepthContext* ctx = DepthContext::get(kv, depth, why);
  if (!ctx) {
    state.SkipWithError(why.c_str());
    return;
  }
  const auto& m = ctx->m;
  const std::int64_t V = m.config().vocab_size;
  std::vector<float> logits(static_cast<std::size_t>(V));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  std::int64_t next = 1;
  const auto step = [&] {
    const auto t0 = clk::now();
    m.forward(ctx->s, std::span<const std::int64_t>(&next, 1), View2<float>(logits.data(), {1, V}), fo);
    const double sec = seconds_since(t0);
    next = ops::argmax(logits.data(), V);
    ctx->rewind();
    return sec;
  };
  step();  // untimed warm-up (thread scratch, first touch of the step's buffers)
  double total = 0;
  for (auto _ : state) {
    const double sec = step();
    state.SetIterationTime(sec);
    total += sec;
  }
  const double per_token = total / static_cast<double>(state.iterations());
  const double kv_bytes = ctx->kv_bytes_per_decode_step();
  const double bytes = static_cast<double>(m.streamed_bytes_per_token()) + kv_bytes;
  state.counters["tok_s"] = 1.0 / per_token;
  state.counters["kv_MB"] = kv_bytes * 1e-6;
  state.counters["GBps"] = bytes / per_token * 1e-9;
  state.counters["bw_frac"] = (bytes / (read_gbps * 1e9)) / per_token;
}

// Flops of a prefill of T tokens after `depth` cached ones (see the top of this section).
double prefill_flops(const model::Qwen3Model& m, std::int64_t T, std::int64_t depth) {
  const auto& c = m.config();
  const double D = static_cast<double>(c.hidden_size), H = static_cast<double>(c.num_attention_heads),
               Hkv = static_cast<double>(c.num_key_value_heads), d = static_cast<double>(c.head_dim),
               I = static_cast<double>(c.intermediate_size), L = static_cast<double>(c.num_hidden_layers);
  const double params = D * (H + 2 * Hkv) * d + H * d * D + 3 * D * I;
  const double pairs = static_cast<double>(T) * static_cast<double>(depth) + static_cast<double>(T) * static_cast<double>(T + 1) / 2;
  return L * (2 * params * static_cast<double>(T) + 4 * H * d * pairs) + 2 * D * static_cast<double>(c.vocab_size);
}

void BM_model_prefill_depth(benchmark::State& state, Precision precision, DepthKv kv, std::int64_t depth) {
  (void)bench::roofline();
  std::string why;
  DepthContext* ctx = DepthContext::get(kv, depth, why);
  if (!ctx) {
    state.SkipWithError(why.c_str());
    return;
  }
  const auto& m = ctx->m;
  const std::int64_t V = m.config().vocab_size;
  const auto ids = prompt(kPrefillTokens, V);
  std::vector<float> logits(static_cast<std::size_t>(V));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  double total = 0;
  for (auto _ : state) {
    const auto t0 = clk::now();
    m.forward(ctx->s, ids, View2<float>(logits.data(), {1, V}), fo);
    const double sec = seconds_since(t0);
    benchmark::DoNotOptimize(logits.data());
    ctx->rewind();
    state.SetIterationTime(sec);
    total += sec;
  }
  const double per_call = total / static_cast<double>(state.iterations());
  state.counters["tok_s"] = static_cast<double>(kPrefillTokens) / per_call;
  state.counters["GFLOPS"] = prefill_flops(m, kPrefillTokens, depth) / per_call * 1e-9;
}

const bool registered_depth = [] {
  const std::string base = "model/qwen3-0.6b/";
  for (const DepthKv& kv : kDepthKv)
    for (const std::int64_t depth : kDecodeDepths) {
      benchmark::RegisterBenchmark((base + "decode/bf16/kv:" + kv.name + "/depth:" + std::to_string(depth)).c_str(),
                                   BM_model_decode_depth, kv, depth, Precision::exact)
          ->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(depth >= 32768 ? 8 : 16);
      // int8 with Precision::fast: the keys scored on VNNI against an int8 query (the linear
      // layers' fast path costs the same as exact on FMA: bf16 weights are widened either way).
      // bf16 with Precision::fast: scores and P·V on vdpbf16ps where the build has AVX512-BF16.
      if (kv.type == model::CacheType::int8 || kv.type == model::CacheType::bf16)
        benchmark::RegisterBenchmark((base + "decode/bf16/kv:" + kv.name + "/fast/depth:" + std::to_string(depth)).c_str(),
                                     BM_model_decode_depth, kv, depth, Precision::fast)
            ->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(depth >= 32768 ? 8 : 16);
      // Prefill after depth right after the decode case of the same context (built once).
      if (kv.type == kPrefillKv && depth == kPrefillDepth)
        for (const Precision p : {Precision::fast, Precision::exact})
          benchmark::RegisterBenchmark((base + "prefill:" + std::to_string(kPrefillTokens) + "/bf16/" +
                                        (p == Precision::fast ? "fast" : "exact") + "/depth:" + std::to_string(depth)).c_str(),
                                       BM_model_prefill_depth, p, kv, depth)
              ->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(2);
    }
  return true;
}();

template <class F, class... A>
void add(const char* name, int iterations, F fn, A... args) {
  benchmark::RegisterBenchmark(name, fn, args...)
      ->ArgNames({"T", "threads"})
      ->Args({512, 1})
      ->Args({512, 2})
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(iterations);
}

const bool registered = [] {
  add("model/prefill/bf16/fast", 2, BM_model_prefill, Precision::fast, std::string("plain"));
  add("model/prefill/bf16/exact", 2, BM_model_prefill, Precision::exact, std::string("plain"));
  add("model/decode/bf16/kv:f32", 32, BM_model_decode, model::CacheType::f32, std::string("plain"));
  add("model/decode/bf16/kv:bf16", 32, BM_model_decode, model::CacheType::bf16, std::string("plain"));
  add("model/q8/prefill/q8/fast", 2, BM_model_prefill, Precision::fast, std::string("q8"));
  add("model/q8/decode/q8-exact/kv:bf16", 32, BM_model_decode_at, model::CacheType::bf16, std::string("q8"), Precision::exact);
  add("model/q8/decode/q8-fast/kv:bf16", 32, BM_model_decode_at, model::CacheType::bf16, std::string("q8"), Precision::fast);
  for (const char* v : {"loop-stack", "loop-layer"}) {
    const std::string n = std::string("model/") + v;
    add((n + "/prefill/bf16/fast").c_str(), 3, BM_model_prefill, Precision::fast, std::string(v));
    add((n + "/prefill/bf16/exact").c_str(), 3, BM_model_prefill, Precision::exact, std::string(v));
    add((n + "/decode/bf16/kv:f32").c_str(), 32, BM_model_decode, model::CacheType::f32, std::string(v));
    add((n + "/decode/bf16/kv:bf16").c_str(), 32, BM_model_decode, model::CacheType::bf16, std::string(v));
  }
  benchmark::RegisterBenchmark("model/ouro-1.4b/prefill/bf16/exact", BM_model_prefill, Precision::exact, std::string("ouro-1.4b"))
      ->ArgNames({"T", "threads"})->Args({512, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(2);
  for (const auto kv : {model::CacheType::f32, model::CacheType::bf16})
    benchmark::RegisterBenchmark(kv == model::CacheType::f32 ? "model/ouro-1.4b/decode/bf16/kv:f32" : "model/ouro-1.4b/decode/bf16/kv:bf16",
                                 BM_model_decode, kv, std::string("ouro-1.4b"))
        ->ArgNames({"T", "threads"})->Args({512, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(8);
  benchmark::RegisterBenchmark("model/batch/decode/bf16/kv:bf16", BM_model_batch_decode, std::string("plain"))
      ->ArgNames({"B", "threads"})->Args({1, 2})->Args({4, 2})->Args({8, 2})->Args({16, 2})
      ->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(16);
  for (const char* v : {"tuneable", "tuneable-unfolded", "swa"})
    benchmark::RegisterBenchmark((std::string("model/") + v + "/batch/decode/bf16/kv:bf16").c_str(), BM_model_batch_decode,
                                 std::string(v))
        ->ArgNames({"B", "threads"})->Args({8, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(16);
  add("model/hybrid/prefill/bf16/exact", 3, BM_model_prefill, Precision::exact, std::string("hybrid"));
  add("model/hybrid/decode/bf16/kv:f32", 32, BM_model_decode, model::CacheType::f32, std::string("hybrid"));
  for (const auto kv : {model::CacheType::f32, model::CacheType::bf16, model::CacheType::int8})
    for (const char* v : {"plain", "hybrid"})
      benchmark::RegisterBenchmark((std::string("model/") + v + "/decode_context/bf16/kv:" +
                                    (kv == model::CacheType::f32 ? "f32" : kv == model::CacheType::bf16 ? "bf16" : "int8")).c_str(),
                                   BM_model_decode_context, kv, std::string(v))
          ->ArgNames({"T", "threads"})->Args({8192, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(16);
  for (const char* v : {"lt2-hybrid-1.3b", "lt2-gdn-dsa-1.3b"}) {
    const std::string n = std::string("model/") + v;
    benchmark::RegisterBenchmark((n + "/prefill/bf16/exact").c_str(), BM_model_prefill, Precision::exact, std::string(v))
        ->ArgNames({"T", "threads"})->Args({512, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(2);
    benchmark::RegisterBenchmark((n + "/decode/bf16/kv:f32").c_str(), BM_model_decode, model::CacheType::f32, std::string(v))
        ->ArgNames({"T", "threads"})->Args({512, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(8);
  }
  for (const char* v : {"lt2-full-5l", "lt2-hybrid-5l", "lt2-gdn-dsa-5l"})
    benchmark::RegisterBenchmark((std::string("model/") + v + "/decode_context/bf16/kv:f32").c_str(), BM_model_decode_context,
                                 model::CacheType::f32, std::string(v))
        ->ArgNames({"T", "threads"})->Args({8192, 2})->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(8);
  for (const char* v : {"attnres-block", "attnres-full"}) {
    const std::string n = std::string("model/") + v;
    add((n + "/prefill/bf16/exact").c_str(), 3, BM_model_prefill, Precision::exact, std::string(v));
    add((n + "/decode/bf16/kv:f32").c_str(), 32, BM_model_decode, model::CacheType::f32, std::string(v));
  }
  return true;
}();

}  // namespace
