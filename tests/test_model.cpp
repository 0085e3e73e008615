// Qwen3 composition layer against the fixtures in tests/data/fixtures (transformers' float64
// outputs for tiny checkpoints): prefill logits, per-layer hidden states, token-by-token decode,
// chunked prefill, greedy ids; plus thread determinism, bf16 caches, fast precision, bad input;
// and batch sessions (model/batch_session.hpp, at the end of the file).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "attnkit/attnkit.hpp"
#include "test_util.hpp"
#include "attnkit/model/batch_session.hpp"
#include "model_test_util.hpp"

// One namespace per file: the model test files compile as one unit (tests/CMakeLists.txt).
namespace attnkit_test_model {

using namespace attnkit;
namespace fs = std::filesystem;

namespace {

fs::path fixture(const std::string& name) { return fs::path(ATTNKIT_TEST_DATA) / "fixtures" / name; }

struct Reference {
  std::vector<std::int64_t> ids, greedy;
  std::vector<float> logits, hidden;  // hidden: [L+1, T, D]
};

Reference load_reference(const fs::path& dir) {
  auto f = io::SafetensorsFile::open(dir / "reference.safetensors");
  Reference r;
  r.ids = io::to_i64(f.tensor("input_ids"));
  r.greedy = io::to_i64(f.tensor("greedy_ids"));
  r.logits = io::to_f32(f.tensor("logits"));
  r.hidden = io::to_f32(f.tensor("hidden_states"));
  return r;
}

std::vector<float> prefill_logits(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids,
                                  model::ForwardOptions fo = {}, model::SessionOptions so = {}) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), V = m.config().vocab_size;
  std::vector<float> out(static_cast<std::size_t>(T * V));
  test::poison(out);
  auto s = m.new_session(so);
  m.forward(s, ids, View2<float>(out.data(), {T, V}), fo);
  return out;
}

std::vector<float> decode_logits(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids,
                                 model::SessionOptions so = {}, Precision precision = Precision::exact) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), V = m.config().vocab_size;
  std::vector<float> out(static_cast<std::size_t>(T * V));
  test::poison(out);
  auto s = m.new_session(so);
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  for (std::int64_t t = 0; t < T; ++t) {
    m.forward(s, std::span<const std::int64_t>(&ids[t], 1), View2<float>(out.data() + t * V, {1, V}), fo);
    REQUIRE(s.position() == t + 1);
  }
  return out;
}

std::vector<float> chunked_logits(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids,
                                  std::vector<std::int64_t> cuts) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), V = m.config().vocab_size;
  std::vector<float> out(static_cast<std::size_t>(T * V));
  test::poison(out);
  auto s = m.new_session();
  cuts.push_back(T);
  std::int64_t b = 0;
  for (auto e : cuts) {
    m.forward(s, std::span<const std::int64_t>(ids.data() + b, e - b), View2<float>(out.data() + b * V, {e - b, V}));
    b = e;
  }
  return out;
}

}  // namespace

TEST_CASE("qwen3 fixtures: prefill, hidden states, decode, chunked prefill, greedy", "[model][fixture]") {
  const std::string name = GENERATE("qwen3-tiny-f32", "qwen3-tiny-bf16", "qwen3-tiny-swa", "qwen3-tiny-oldconfig");
  CAPTURE(name);
  const fs::path dir = fixture(name);
  const Reference ref = load_reference(dir);
  const model::Qwen3Model m = model::Qwen3Model::load(dir);
  const auto& c = m.config();
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), D = c.hidden_size, L = c.num_hidden_layers;
  REQUIRE(ref.logits.size() == static_cast<std::size_t>(T * c.vocab_size));

  // Bound: 1e-4 relative L2 (issue 3); a float32 implementation lands near 1e-6.
  constexpr double kBound = 1e-4;

  SECTION("prefill logits and per-layer hidden states") {
    std::vector<float> hidden(static_cast<std::size_t>((L + 1) * T * D));
    test::poison(hidden);
    model::ForwardOptions fo;
    fo.on_hidden = [&](int i, ConstView2<float> h) {
      REQUIRE(h.shape[0] == T);
      for (std::int64_t t = 0; t < T; ++t) std::copy(h.ptr(t), h.ptr(t) + D, hidden.data() + (i * T + t) * D);
    };
    const auto logits = prefill_logits(m, ref.ids, fo);
    CHECK(test::rel_l2(logits, ref.logits) <= kBound);
    for (std::int64_t l = 0; l <= L; ++l) {
      CAPTURE(l);
      CHECK(test::rel_l2(hidden.data() + l * T * D, ref.hidden.data() + l * T * D, static_cast<std::size_t>(T * D)) <= kBound);
    }
  }
  SECTION("token-by-token decode reproduces the reference logits") {
    CHECK(test::rel_l2(decode_logits(m, ref.ids), ref.logits) <= kBound);
  }
  SECTION("chunked prefill (two chunks, and uneven three) equals one prefill") {
    const auto whole = prefill_logits(m, ref.ids);
    // Different chunkings change only which rows share a GEMM call: same math, so 1e-6.
    CHECK(test::rel_l2(chunked_logits(m, ref.ids, {T / 2}), whole) <= 1e-6);
    CHECK(test::rel_l2(chunked_logits(m, ref.ids, {1, T - 3}), whole) <= 1e-6);
    CHECK(test::rel_l2(chunked_logits(m, ref.ids, {T / 2}), ref.logits) <= kBound);
  }
  SECTION("greedy continuation through the caches") {
    auto s = m.new_session();
    const auto gen = model::generate_greedy(m, s, ref.ids, static_cast<std::int64_t>(ref.greedy.size()));
    CHECK(gen == ref.greedy);
    CHECK(s.position() == T + static_cast<std::int64_t>(ref.greedy.size()) - 1);
  }
  SECTION("bf16 KV cache stays close; decode equals prefill with it") {
    model::SessionOptions so;
    so.kv_type = model::CacheType::bf16;
    const auto pre = prefill_logits(m, ref.ids, {}, so);
    CHECK(test::rel_l2(pre, ref.logits) <= 1e-2);  // bf16 keys/values: ~2^-9 relative per element
    CHECK(test::rel_l2(decode_logits(m, ref.ids, so), pre) <= 1e-5);
  }
  SECTION("int8 KV cache stays close; decode and chunked prefill equal prefill with it") {
    model::SessionOptions so;
    so.kv_type = model::CacheType::int8;
    const auto pre = prefill_logits(m, ref.ids, {}, so);
    // int8 keys/values, a scale per token and KV head: each element off by <= max|row| / 254.
    // Measured on these fixtures (prefill): 5.5e-3 to 7.6e-3 (bf16 caches: ~3e-3); bound 2e-2.
    const double e = test::rel_l2(pre, ref.logits);
    if (std::getenv("ATTNKIT_PRINT_INT8")) std::printf("int8 cache, %s: logits rel L2 %.3g\n", name.c_str(), e);
    CHECK(e <= 2e-2);
    // Decode reads the int8 rows in registers, prefill an f32 copy of the same codes · scale:
    // the same values, summed in another order.
    CHECK(test::rel_l2(decode_logits(m, ref.ids, so), pre) <= 1e-5);
    // fast: decode scores the int8 keys against an int8 query (VNNI), so the logits move by the
    // query's rounding too (measured 6.5e-3 to 9.5e-3 on these fixtures); the int8 bound holds.
    const double e_fast = test::rel_l2(decode_logits(m, ref.ids, so, Precision::fast), ref.logits);
    if (std::getenv("ATTNKIT_PRINT_INT8")) std::printf("int8 cache, fast decode, %s: logits rel L2 %.3g\n", name.c_str(), e_fast);
    CHECK(e_fast <= 2e-2);
    auto s = m.new_session(so);
    const std::int64_t V = c.vocab_size, half = T / 2;
    std::vector<float> chunked(static_cast<std::size_t>(T * V));
    test::poison(chunked);
    m.forward(s, std::span<const std::int64_t>(ref.ids.data(), half), View2<float>(chunked.data(), {half, V}));
    m.forward(s, std::span<const std::int64_t>(ref.ids.data() + half, T - half),
              View2<float>(chunked.data() + half * V, {T - half, V}));
    CHECK(test::rel_l2(chunked, pre) <= 1e-5);
  }
  SECTION("fast precision (bf16-rounded activations) stays close") {
    model::ForwardOptions fo;
    fo.precision = Precision::fast;
    CHECK(test::rel_l2(prefill_logits(m, ref.ids, fo), ref.logits) <= 2e-2);
  }
}

TEST_CASE("a sharded checkpoint (index + two shards) gives the same model", "[model][io]") {
  const fs::path dir = fixture("qwen3-tiny-bf16");
  const fs::path tmp = fs::temp_directory_path() / ("attnkit-shards-" + std::to_string(test::fresh_seed()));
  fs::create_directories(tmp);
  fs::copy_file(dir / "config.json", tmp / "config.json");
  auto src = io::SafetensorsFile::open(dir / "model.safetensors");
  io::SafetensorsWriter a, b;
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  int i = 0;
  for (const auto& n : src.names()) {
    const auto& t = src.tensor(n);
    const bool first = (i++ % 2) == 0;
    (first ? a : b).add(n, t.dtype, t.shape, t.data, t.nbytes);
    index["weight_map"][n] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  a.write(tmp / "model-00001-of-00002.safetensors");
  b.write(tmp / "model-00002-of-00002.safetensors");
  std::ofstream(tmp / "model.safetensors.index.json") << index.dump();
  const Reference ref = load_reference(dir);
  const auto whole = prefill_logits(model::Qwen3Model::load(dir), ref.ids);
  CHECK(test::bit_equal(prefill_logits(model::Qwen3Model::load(tmp), ref.ids), whole));
  fs::remove_all(tmp);
}

TEST_CASE("tied embeddings: a stored lm_head.weight is ignored, as in transformers", "[model][io]") {
  const fs::path dir = fixture("qwen3-tiny-f32");  // tie_word_embeddings = true, no lm_head.weight
  const fs::path tmp = fs::temp_directory_path() / ("attnkit-tied-" + std::to_string(test::fresh_seed()));
  fs::create_directories(tmp);
  fs::copy_file(dir / "config.json", tmp / "config.json");
  auto src = io::SafetensorsFile::open(dir / "model.safetensors");
  REQUIRE_FALSE(src.contains("lm_head.weight"));
  io::SafetensorsWriter w;
  for (const auto& n : src.names()) {
    const auto& t = src.tensor(n);
    w.add(n, t.dtype, t.shape, t.data, t.nbytes);
  }
  const auto& e = src.tensor("model.embed_tokens.weight");
  std::vector<float> junk(static_cast<std::size_t>(e.numel()), 0.5f);
  w.add_f32("lm_head.weight", e.shape, junk.data());
  w.write(tmp / "model.safetensors");
  const Reference ref = load_reference(dir);
  CHECK(test::bit_equal(prefill_logits(model::Qwen3Model::load(tmp), ref.ids),
                        prefill_logits(model::Qwen3Model::load(dir), ref.ids)));
  fs::remove_all(tmp);
}

TEST_CASE("model results do not depend on the thread count", "[model]") {
  const model::Qwen3Model m = model::Qwen3Model::load(fixture("qwen3-tiny-swa"));
  const Reference ref = load_reference(fixture("qwen3-tiny-swa"));
  model::ForwardOptions one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  CHECK(test::bit_equal(prefill_logits(m, ref.ids, one), prefill_logits(m, ref.ids, two)));
}

TEST_CASE("a workspace reuses a slot's buffer, grows it when asked for more, and poisons what it hands out",
          "[model][workspace]") {
  model::Workspace ws;
  float* a = ws.get(model::ScratchSlot::qkv, 100);
  REQUIRE(a != nullptr);
  CHECK(reinterpret_cast<std::uintptr_t>(a) % 64 == 0);
  REQUIRE(model::poison_workspaces().load());  // model_test_util.hpp switched it on
  for (int i = 0; i < 100; ++i) CHECK(std::isnan(a[i]));
  std::fill_n(a, 100, 1.f);
  float* b = ws.get(model::ScratchSlot::attention, 50);
  CHECK(b != a);  // another purpose, another buffer
  CHECK(ws.get(model::ScratchSlot::qkv, 60) == a);  // the same slot, no bigger: the same memory, poisoned again
  CHECK(std::isnan(a[0]));
  CHECK(std::isnan(a[59]));
  float* c = ws.get(model::ScratchSlot::qkv, 1000);  // bigger: a new buffer, all of it poisoned
  for (int i = 0; i < 1000; i += 111) CHECK(std::isnan(c[i]));
  std::vector<float> own;
  float* d = model::scratch(nullptr, model::ScratchSlot::qkv, 7, own);  // no workspace: the caller's vector
  CHECK(d == own.data());
  CHECK(own.size() == 7);
  CHECK(model::scratch(&ws, model::ScratchSlot::qkv, 7, own) == c);
}

TEST_CASE("the stage profile times each stage of a forward, and records nothing while off", "[model][profile]") {
  const model::Qwen3Model m = model::Qwen3Model::load(fixture("qwen3-tiny-swa"));
  const Reference ref = load_reference(fixture("qwen3-tiny-swa"));
  const auto L = static_cast<std::int64_t>(m.num_layers());
  const auto totals = [] {
    std::map<std::string, profile::StageTotal> t;
    for (const auto& r : profile::stage_totals()) t[r.name] = r;
    return t;
  };
  profile::enable_stage_profile(false);
  profile::reset_stage_totals();
  const auto off = prefill_logits(m, ref.ids, {});
  CHECK(profile::stage_totals().empty());

  profile::enable_stage_profile(true);
  const auto on = prefill_logits(m, ref.ids, {});
  profile::enable_stage_profile(false);
  CHECK(test::bit_equal(on, off));  // timing changes no number
  const auto t = totals();
  for (const char* name : {"forward", "embed", "layer.norm", "mixer", "attn.qkv_proj", "attn.qk_norm", "attn.rope",
                           "attn.cache_append", "attn.kernel", "attn.o_proj", "layer.residual", "mlp", "mlp.gate_up",
                           "mlp.silu_mul", "mlp.down", "readout"}) {
    CAPTURE(name);
    REQUIRE(t.count(name) == 1);
    CHECK(t.at(name).seconds >= 0);
  }
  CHECK(t.at("forward").calls == 1);
  CHECK(t.at("readout").calls == 1);
  for (const char* name : {"mixer", "mlp", "attn.kernel", "attn.o_proj", "mlp.down"}) CHECK(t.at(name).calls == L);
  CHECK(t.at("layer.norm").calls == 2 * L);  // the block has no output norms
  // Nested stages lie inside their parents.
  CHECK(t.at("mixer").seconds + t.at("mlp").seconds <= t.at("forward").seconds);
  CHECK(t.at("attn.kernel").seconds + t.at("attn.o_proj").seconds <= t.at("mixer").seconds);
  CHECK(t.at("mlp.gate_up").seconds + t.at("mlp.silu_mul").seconds + t.at("mlp.down").seconds <= t.at("mlp").seconds);
  profile::reset_stage_totals();
  CHECK(profile::stage_totals().empty());
}

TEST_CASE("random models are deterministic and run every layer type", "[model]") {
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 200}, {"hidden_size", 40}, {"intermediate_size", 72},
                      {"num_hidden_layers", 3}, {"num_attention_heads", 6}, {"num_key_value_heads", 2}, {"head_dim", 24},
                      {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"max_position_embeddings", 512},
                      {"tie_word_embeddings", false}, {"hidden_act", "silu"}, {"use_sliding_window", true},
                      {"sliding_window", 5}, {"layer_types", {"sliding_attention", "full_attention", "sliding_attention"}}};
  const auto cfg = io::Qwen3Config::from_json(j, "test");
  const auto type = GENERATE(model::WeightType::f32, model::WeightType::bf16);
  const auto a = model::Qwen3Model::random(cfg, type, 7), b = model::Qwen3Model::random(cfg, type, 7);
  const auto c = model::Qwen3Model::random(cfg, type, 8);
  std::vector<std::int64_t> ids(29);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int64_t>((i * 37 + 11) % 200);
  const auto la = prefill_logits(a, ids);
  CHECK(test::bit_equal(la, prefill_logits(b, ids)));
  CHECK_FALSE(test::bit_equal(la, prefill_logits(c, ids)));
  CHECK(test::rel_l2(decode_logits(a, ids), la) <= 1e-5);
  CHECK(test::rel_l2(chunked_logits(a, ids, {3, 11, 12}), la) <= 1e-6);
}

namespace {
// A stateless mixer that records the passes it sees: out = 0.5 * x.
struct HalfMixer final : model::TokenMixer {
  std::vector<int>* passes;
  explicit HalfMixer(std::vector<int>* p) : passes(p) {}
  std::string kind() const override { return "half"; }
  std::unique_ptr<model::MixerState> new_state(const model::SessionOptions&) const override {
    return std::make_unique<model::MixerState>();
  }
  void forward(ConstView2<float> x, View2<float> out, model::MixerState&, const model::StepContext& ctx) const override {
    passes->push_back(ctx.pass);
    for (std::int64_t t = 0; t < x.shape[0]; ++t)
      for (std::int64_t i = 0; i < x.shape[1]; ++i) out(t, i) = 0.5f * x(t, i);
  }
  std::size_t weight_bytes() const override { return 0; }
};
struct TwoPasses final : model::StackPolicy {
  mutable int calls = 0;
  std::string kind() const override { return "two"; }
  int passes() const override { return 2; }
  void between_passes(int pass, View2<float> x) const override {
    CHECK(pass == 0);
    ++calls;
    for (std::int64_t t = 0; t < x.shape[0]; ++t)
      for (std::int64_t i = 0; i < x.shape[1]; ++i) x(t, i) = 0.f;  // the second pass restarts from zero
  }
};
}  // namespace

TEST_CASE("composition seams: custom mixer registry and a two-pass stack policy", "[model]") {
  nlohmann::json j = nlohmann::json::parse(std::ifstream(fixture("qwen3-tiny-f32") / "config.json"));
  const auto cfg = io::Qwen3Config::from_json(j, "test");
  std::vector<int> seen;
  model::MixerRegistry reg;
  reg.add("full_attention", [&](const model::BuildContext&, int) { return std::make_unique<HalfMixer>(&seen); });
  model::RandomSource rnd(model::WeightType::f32, 3);
  auto two = std::make_shared<TwoPasses>();
  const auto m2 = model::Qwen3Model::build(cfg, rnd, reg, std::make_shared<model::SumResidual>(), two);
  const auto m1 = model::Qwen3Model::build(cfg, rnd, reg);
  std::vector<std::int64_t> ids = {3, 1, 4, 1, 5};
  seen.clear();
  const auto l2 = prefill_logits(m2, ids);
  CHECK(seen == std::vector<int>{0, 0, 1, 1});  // two layers, two passes
  CHECK(two->calls == 1);
  // The second pass restarts from zeros, whose embedding-free output does not depend on the ids:
  // every row of the logits is the same.
  const std::int64_t V = cfg.vocab_size;
  for (std::int64_t t = 1; t < 5; ++t) CHECK(std::equal(l2.begin(), l2.begin() + V, l2.begin() + t * V));
  const auto l1 = prefill_logits(m1, ids);
  CHECK_FALSE(std::equal(l1.begin(), l1.begin() + V, l1.begin() + V));
  // The stock attention mixer serves every pass with a cache of its own: prefill, decode and
  // chunked prefill of a twice-repeated stack agree, and differ from one pass.
  const auto m_att = model::Qwen3Model::build(cfg, rnd, model::default_mixers(), std::make_shared<model::SumResidual>(),
                                              std::make_shared<model::RepeatStack>(2));
  const auto m_one = model::Qwen3Model::build(cfg, rnd);
  REQUIRE(m_att.passes() == 2);
  const std::vector<std::int64_t> more = {3, 1, 4, 1, 5, 9, 2, 6, 5};
  const auto p2 = prefill_logits(m_att, more);
  CHECK(test::rel_l2(decode_logits(m_att, more), p2) <= 1e-5);
  CHECK(test::rel_l2(chunked_logits(m_att, more, {4}), p2) <= 1e-5);
  CHECK(test::rel_l2(prefill_logits(m_one, more), p2) > 1e-3);
  std::vector<int> visits;
  model::ForwardOptions fo;
  fo.on_pass_hidden = [&](int pass, int index, ConstView2<float>) { visits.push_back(pass * 100 + index); };
  prefill_logits(m_att, more, fo);
  CHECK(visits == std::vector<int>{0, 1, 2, 100, 101, 102});  // every pass reported: input, then each layer
}

TEST_CASE("model errors name the problem", "[model][errors]") {
  const fs::path dir = fixture("qwen3-tiny-f32");
  const model::Qwen3Model m = model::Qwen3Model::load(dir);
  const std::int64_t V = m.config().vocab_size;
  std::vector<float> out(static_cast<std::size_t>(2 * V));
  auto s = m.new_session();
  std::vector<std::int64_t> bad = {1, V};
  REQUIRE_THROWS_WITH(m.forward(s, bad, View2<float>(out.data(), {2, V})), Catch::Contains("outside the vocabulary"));
  std::vector<std::int64_t> ok = {1, 2};
  REQUIRE_THROWS_WITH(m.forward(s, ok, View2<float>(out.data(), {1, V})), Catch::Contains("argument 'logits'"));
  REQUIRE_THROWS_WITH(m.forward(s, std::span<const std::int64_t>(), View2<float>(out.data(), {0, V})),
                      Catch::Contains("empty"));
  REQUIRE_THROWS_AS(model::Qwen3Model::load(fixture("does-not-exist")), Error);

  // A checkpoint with one tensor missing and one of the wrong shape.
  const fs::path tmp = fs::temp_directory_path() / ("attnkit-model-test-" + std::to_string(test::fresh_seed()));
  fs::create_directories(tmp);
  fs::copy_file(dir / "config.json", tmp / "config.json");
  auto src = io::SafetensorsFile::open(dir / "model.safetensors");
  auto write_without = [&](const std::string& drop, const std::string& reshape) {
    io::SafetensorsWriter w;
    for (const auto& n : src.names()) {
      if (n == drop) continue;
      const auto& t = src.tensor(n);
      auto shape = t.shape;
      if (n == reshape) shape = {t.numel()};  // same bytes, wrong shape
      w.add(n, t.dtype, shape, t.data, t.nbytes);
    }
    w.write(tmp / "model.safetensors");
  };
  write_without("model.layers.1.mlp.down_proj.weight", "");
  REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp), Catch::Contains("model.layers.1.mlp.down_proj.weight"));
  write_without("", "model.layers.0.self_attn.k_proj.weight");
  REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp), Catch::Contains("model.layers.0.self_attn.k_proj.weight"));

  // A layer type nobody registered.
  nlohmann::json j = nlohmann::json::parse(std::ifstream(dir / "config.json"));
  auto cfg = io::Qwen3Config::from_json(j, "test");
  model::MixerRegistry empty;
  model::RandomSource rnd(model::WeightType::f32, 1);
  REQUIRE_THROWS_WITH(model::Qwen3Model::build(cfg, rnd, empty), Catch::Contains("no token mixer registered"));
  fs::remove_all(tmp);
}

namespace {
// The tensors of another source, with one of them overwritten by +inf at one element.
struct PoisonOneSource final : model::TensorSource {
  const model::TensorSource& inner;
  std::string target;
  PoisonOneSource(const model::TensorSource& in, std::string t) : inner(in), target(std::move(t)) {}
  bool contains(const std::string& n) const override { return inner.contains(n); }
  model::HostTensor get(const std::string& n, const std::vector<std::int64_t>& shape) const override {
    model::HostTensor h = inner.get(n, shape);
    if (n == target) {
      h.owned_f32 = h.to_f32();
      h.owned_f32[7] = std::numeric_limits<float>::infinity();
      h.type = model::WeightType::f32;
      h.data = h.owned_f32.data();
    }
    return h;
  }
  std::string describe() const override { return "poisoned " + inner.describe(); }
};
}  // namespace

TEST_CASE("q8 weights: fixture logits within the 8-bit bound; decode and chunks agree", "[model][q8]") {
  // 8-bit weights (groups of 32) perturb each weight by up to half a step (amax / 254, RMS
  // ~0.6% of a normal group's σ): the logits of these tiny random-weight checkpoints move by
  // 1.6-1.9% (rel L2, measured), the bound is 3e-2; the Qwen3.5 hybrid's Gated DeltaNet gates
  // and decays amplify it (4.6% measured, bound 6e-2).
  for (const char* name : {"qwen3-tiny-f32", "qwen3-tiny-bf16", "qwen3-tiny-swa", "qwen35-hybrid-tiny"}) {
    INFO(name);
    const double bound = std::string(name) == "qwen35-hybrid-tiny" ? 6e-2 : 3e-2;
    auto f = io::SafetensorsFile::open(fixture(name) / "reference.safetensors");
    Reference ref;
    ref.ids = io::to_i64(f.tensor("input_ids"));
    ref.logits = io::to_f32(f.tensor("logits"));
    model::LoadOptions lo;
    lo.weights = model::WeightType::q8;
    const model::Qwen3Model m = model::Qwen3Model::load(fixture(name), lo);
    const model::Qwen3Model plain = model::Qwen3Model::load(fixture(name));
    CHECK(m.weight_type() == model::WeightType::q8);
    CHECK(m.source().find("linear layers packed as q8") != std::string::npos);
    CHECK(m.weight_bytes() < plain.weight_bytes());
    const auto logits = prefill_logits(m, ref.ids);
    const double err = test::rel_l2(logits, ref.logits);
    CHECK(err <= bound);
    CHECK(err > 1e-5);  // really quantised
    // Exact arithmetic on the same int8 weights: decode and chunks equal prefill to f32 rounding.
    CHECK(test::rel_l2(decode_logits(m, ref.ids), logits) <= 1e-5);
    CHECK(test::rel_l2(chunked_logits(m, ref.ids, {3, 4}), logits) <= 1e-5);
    // Precision::fast also quantises the activations in decode (VNNI dot products): a little
    // further from the reference, and no longer the exact product of the int8 weights.
    model::ForwardOptions fast;
    fast.precision = Precision::fast;
    fast.logits = model::LogitsRows::last;
    const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), V = m.config().vocab_size;
    std::vector<float> fast_decode(static_cast<std::size_t>(T * V));
    test::poison(fast_decode);
    auto s = m.new_session();
    for (std::int64_t t = 0; t < T; ++t)
      m.forward(s, std::span<const std::int64_t>(&ref.ids[t], 1), View2<float>(fast_decode.data() + t * V, {1, V}), fast);
    CHECK(test::rel_l2(fast_decode, ref.logits) <= 1.5 * bound);
    fast.logits = model::LogitsRows::all;
    CHECK(test::rel_l2(prefill_logits(m, ref.ids, fast), ref.logits) <= 1.5 * bound);
  }
  // A weight the format cannot hold is refused with the tensor's name.
  const model::RandomSource rnd(model::WeightType::bf16, 3);
  const PoisonOneSource poisoned(rnd, "model.layers.0.mlp.down_proj.weight");
  nlohmann::json j = nlohmann::json::parse(std::ifstream(fixture("qwen3-tiny-f32") / "config.json"));
  model::LoadOptions lo;
  lo.weights = model::WeightType::q8;
  REQUIRE_THROWS_WITH(model::Qwen3Model::compose(io::Qwen3Config::from_json(j, "test"), poisoned, lo),
                      Catch::Contains("model.layers.0.mlp.down_proj.weight: PackedLinear::pack_q8: weight [0, 7] is inf"));
  // Random q8 models are bf16 weights quantised at load.
  const auto cfg = io::Qwen3Config::from_json(j, "test");
  const auto q = model::Qwen3Model::random(cfg, model::WeightType::q8, 5);
  CHECK(q.weight_type() == model::WeightType::q8);
  const std::vector<std::int64_t> ids = {1, 5, 9, 2, 7};
  CHECK(test::rel_l2(prefill_logits(q, ids), prefill_logits(model::Qwen3Model::random(cfg, model::WeightType::bf16, 5), ids)) <= 3e-2);
}

// ================================================================================================
// Batch sessions (kept in this translation unit: each model test TU instantiates the whole
// library, about 70 s of compile time per TU in each CI build)
// ================================================================================================

// Batch sessions (model/batch_session.hpp): many sequences in one step over the paged KV cache
// equal one Session per sequence; prefill chunks and decode tokens mix; forks share pages and
// copy on write; bad steps are refused before anything changes.

using namespace attnkit;
using test::random_ids;
using Catch::Matchers::Contains;

namespace {

nlohmann::json tiny_json(bool sliding) {
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 211}, {"hidden_size", 40}, {"intermediate_size", 72},
                      {"num_hidden_layers", 3}, {"num_attention_heads", 6}, {"num_key_value_heads", 2}, {"head_dim", 24},
                      {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"max_position_embeddings", 512},
                      {"tie_word_embeddings", false}, {"hidden_act", "silu"}};
  if (sliding) {
    j["use_sliding_window"] = true;
    j["sliding_window"] = 6;
    j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention"};
  }
  return j;
}

// Every logits row of `ids` run through one Session (one prefill).
std::vector<float> session_logits(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids,
                                  const model::SessionOptions& so) {
  return test::run(m, ids, {}, so).logits;
}

using test::batch_logits;
using test::Plan;

}  // namespace

TEST_CASE("a batch session equals one session per sequence: prefill, chunks and decode mixed", "[model][batch]") {
  const bool sliding = GENERATE(false, true);
  const auto kv = GENERATE(model::CacheType::f32, model::CacheType::bf16, model::CacheType::int8);
  const std::int64_t P = GENERATE(1, 4, 16);
  const auto cfg = io::Qwen3Config::from_json(tiny_json(sliding), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::f32, 5);
  const std::int64_t V = cfg.vocab_size;
  // Five sequences of odd lengths; the plan mixes whole prompts, chunks and decode tokens.
  const std::vector<std::int64_t> len = {1, 9, 17, 30, 45};
  std::vector<std::vector<std::int64_t>> ids;
  for (std::size_t i = 0; i < len.size(); ++i) ids.push_back(random_ids(len[i], V, 100 + i));
  const Plan plan = {{1, 7, 17, 10, 0}, {0, 1, 0, 13, 33}, {0, 1, 0, 1, 1}, {0, 0, 0, 6, 1},
                     {0, 0, 0, 1, 1},   {0, 0, 0, 0, 1},   {0, 0, 0, 0, 9}};
  model::SessionOptions so;
  so.kv_type = kv;
  const auto got = batch_logits(m, ids, plan, so, P, 0);
  CAPTURE(sliding, static_cast<int>(kv), P);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    CAPTURE(i);
    const auto want = session_logits(m, ids[i], so);
    // The attention kernels see the same rows; the linear layers block more rows together
    // (f32 sums in another order): a few ulp of the logits. int8 pages (full-attention layers
    // and sliding layers in their pools): a last-bit difference upstream can round a K/V element
    // to the neighbouring code (a step of max|row| / 127); measured up to 1.5e-7 (no code moved).
    const double e = test::rel_l2(got[i], want);
    if (std::getenv("ATTNKIT_PRINT_INT8") && kv == model::CacheType::int8) std::printf("int8 batch: %.3g\n", e);
    CHECK(e <= (kv == model::CacheType::int8 ? 1e-4 : 2e-6));
  }
  if (P == 4 && kv == model::CacheType::bf16) {  // the thread count changes nothing
    CHECK(test::bit_equal(batch_logits(m, ids, plan, so, P, 1)[4], batch_logits(m, ids, plan, so, P, 2)[4]));
  }
}

TEST_CASE("a batch session runs a looped stack, each pass with its own pages", "[model][batch]") {
  const bool sliding = GENERATE(false, true);  // sliding layers: every pass's K/V in the window's pool
  CAPTURE(sliding);
  const auto cfg = io::Qwen3Config::from_json(tiny_json(sliding), "test");
  model::RandomSource rnd(model::WeightType::f32, 9);
  const auto m = model::Qwen3Model::build(cfg, rnd, model::default_mixers(), std::make_shared<model::SumResidual>(),
                                          std::make_shared<model::RepeatStack>(3));
  std::vector<std::vector<std::int64_t>> ids = {random_ids(11, cfg.vocab_size, 1), random_ids(20, cfg.vocab_size, 2)};
  const auto got = batch_logits(m, ids, {{11, 5}, {0, 1}, {0, 14}}, {}, 8, 0);
  for (std::size_t i = 0; i < ids.size(); ++i) CHECK(test::rel_l2(got[i], session_logits(m, ids[i], {})) <= 2e-6);
  const auto bs = m.new_batch_session({}, {});
  for (int l = 0; l < m.num_layers(); ++l) CHECK(bs.layer_paged(l));
}

TEST_CASE("Loop Attention and sparse attention keep their K/V in pages; both equal one session each",
          "[model][batch]") {
  const auto kv = GENERATE(model::CacheType::f32, model::CacheType::bf16, model::CacheType::int8);
  model::SessionOptions so;
  so.kv_type = kv;
  nlohmann::json layer = tiny_json(false), stack = tiny_json(false);
  layer["loop_num"] = stack["loop_num"] = 2;
  layer["loop_window_size"] = stack["loop_window_size"] = 5;
  layer["loop_mode"] = "layer";
  stack["loop_mode"] = "stack";
  // Loop Attention, layer and stack modes: every layer paged (stack mode: K1/V1 in pages, the
  // looping pass's ring of W per sequence). LT2 GDN+DSA (2 loops of 4 Gated DeltaNet + 1 sparse
  // layer; top-8): the sparse layer paged.
  const std::vector<std::pair<nlohmann::json, std::vector<bool>>> cases = {
      {layer, {true, true, true}}, {stack, {true, true, true}}, {model::lt2_tiny_config(true), {false, false, false, false, true}}};
  const Plan plan = {{1, 5, 23, 9}, {0, 1, 0, 14}, {0, 6, 0, 1}, {0, 1, 0, 16}, {0, 0, 0, 1}};
  for (std::size_t c = 0; c < cases.size(); ++c) {
    CAPTURE(c, static_cast<int>(kv));
    const auto reg = model::default_registry();
    const auto cfg = reg.parse_config(cases[c].first);
    const auto m = model::Qwen3Model::random(cfg, model::WeightType::f32, 7, &reg);
    auto bs = m.new_batch_session(so, {});
    bs.add();
    for (int l = 0; l < m.num_layers(); ++l) CHECK(bs.layer_paged(l) == cases[c].second.at(static_cast<std::size_t>(l)));
    std::vector<std::vector<std::int64_t>> ids;
    for (std::int64_t n : {1, 13, 23, 41}) ids.push_back(random_ids(n, cfg.vocab_size, 30 + n));
    const auto got = batch_logits(m, ids, plan, so, 4, 0);
    // Row blocking in the linear layers (f32 sums in another order) moves the logits by ulps,
    // more over LT2's 10 layer applications than over 3. With bf16 K/V a last-bit difference
    // upstream can round a K/V element to the neighbouring bf16 value (2^-8 relative): measured
    // up to 1.8e-5 (stack mode, sanitizer build). The sparse layers' selections come out the
    // same for these fixed inputs (a different selection would move the logits by far more).
    // int8 pages: a last-bit difference can move a K/V element to the neighbouring code (a step
    // of max|row| / 127), as in the plain batch test above.
    const double bound = kv == model::CacheType::f32 ? (c == 2 ? 1e-5 : 2e-6) : 1e-4;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      CAPTURE(i);
      CHECK(test::rel_l2(got[i], session_logits(m, ids[i], so)) <= bound);
    }
  }
}

TEST_CASE("forks share a prompt's pages and copy the last one on write", "[model][batch]") {
  const bool sliding = GENERATE(false, true);  // sliding layers: their window's pool too
  CAPTURE(sliding);
  const auto cfg = io::Qwen3Config::from_json(tiny_json(sliding), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::bf16, 3);
  const std::int64_t V = cfg.vocab_size;
  model::SessionOptions so;
  so.kv_type = model::CacheType::bf16;
  model::BatchOptions bo;
  bo.page_size = 8;
  auto bs = m.new_batch_session(so, bo);
  const auto prompt = random_ids(21, V, 4);  // 3 pages, the last one partly filled
  const std::int64_t a = bs.add();
  std::vector<float> lg(static_cast<std::size_t>(V) * 3);
  model::ForwardOptions last;
  last.logits = model::LogitsRows::last;
  const model::SequenceTokens pre[] = {{a, prompt}};
  m.forward_batch(bs, pre, View2<float>(lg.data(), {1, V}), last);
  const std::int64_t b = bs.fork(a), c = bs.fork(a);
  CHECK(bs.position(b) == 21);
  CHECK(bs.pages_in_use() == 3);  // stored once
  CHECK(bs.pages(b) == bs.pages(a));
  // The window (6) of position 21 starts at 16: pages 0 and 1 went back, page 2 is held.
  CHECK(bs.pages_in_use(6) == (sliding ? 1 : 0));
  CHECK(bs.pages(b, 6) == bs.pages(a, 6));
  CHECK(bs.first_page(a, 6) == (sliding ? 2 : 0));
  // Each continues with its own token: two of the three copy the shared last page first
  // (and, with sliding layers, each writes its own copy of the rings).
  const std::int64_t next[3] = {5, 17, 101};
  const model::SequenceTokens step[] = {{a, std::span(next + 0, 1)}, {b, std::span(next + 1, 1)}, {c, std::span(next + 2, 1)}};
  test::poison(lg);
  m.forward_batch(bs, step, View2<float>(lg.data(), {3, V}), last);
  CHECK(bs.pages_in_use() == 5);
  CHECK(bs.pages(a)[0] == bs.pages(c)[0]);  // full pages stay shared
  CHECK(bs.pages(a)[2] != bs.pages(b)[2]);
  CHECK(bs.pages_in_use(6) == (sliding ? 3 : 0));  // the windowed pool's shared last page, copied twice
  for (int i = 0; i < 3; ++i) {
    auto ids = prompt;
    ids.push_back(next[i]);
    const auto want = session_logits(m, ids, so);
    CAPTURE(i);
    CHECK(test::rel_l2(lg.data() + i * V, want.data() + (ids.size() - 1) * V, static_cast<std::size_t>(V)) <= 2e-6);
  }
  bs.remove(a);
  bs.remove(b);
  CHECK(bs.pages_in_use() == 3);  // c's three pages
  CHECK(bs.pages_in_use(6) == (sliding ? 1 : 0));
  bs.remove(c);
  CHECK(bs.pages_in_use() == 0);
  CHECK(bs.pages_in_use(6) == 0);
}

TEST_CASE("a sliding layer's pool gives back the pages below its window as sequences advance", "[model][batch]") {
  // Window 6, pages of 4: a sequence at position p (its next token's) holds the window pool's
  // pages of positions max(0, p - 5) .. p - 1, at most 2 however long it runs; the full-attention
  // pool keeps all. A step's own new tokens get pages first (a prompt's whole length).
  const auto kv = GENERATE(model::CacheType::f32, model::CacheType::int8);
  const auto cfg = io::Qwen3Config::from_json(tiny_json(true), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::f32, 8);
  const std::int64_t V = cfg.vocab_size, W = 6, P = 4;
  model::SessionOptions so;
  so.kv_type = kv;
  model::BatchOptions bo;
  bo.page_size = P;
  bo.initial_pages = 1;
  auto bs = m.new_batch_session(so, bo);
  const std::vector<std::vector<std::int64_t>> prompts = {random_ids(37, V, 61), random_ids(3, V, 62), random_ids(58, V, 63)};
  std::vector<std::int64_t> seq;
  for (std::size_t i = 0; i < prompts.size(); ++i) seq.push_back(bs.add());
  const auto held = [&](std::int64_t p) { return (p + P - 1) / P - std::max<std::int64_t>(0, p - W + 1) / P; };
  std::vector<std::vector<std::int64_t>> ids = prompts;
  std::vector<std::vector<float>> got(prompts.size());
  model::ForwardOptions last;
  last.logits = model::LogitsRows::last;
  std::vector<float> lg(static_cast<std::size_t>(3 * V));
  std::int64_t pool_after_prompts = 0;
  for (int step = 0; step < 12; ++step) {  // the prompts (the second one in two chunks), then decode
    std::vector<model::SequenceTokens> st;
    std::vector<std::vector<std::int64_t>> chunk(prompts.size());
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      const std::int64_t at = bs.position(seq[i]), n = static_cast<std::int64_t>(ids[i].size()) - at;
      chunk[i].assign(ids[i].begin() + at, ids[i].begin() + at + (i == 1 && step == 0 ? 2 : n));
      st.push_back({seq[i], chunk[i]});
    }
    test::poison(lg);
    m.forward_batch(bs, st, View2<float>(lg.data(), {3, V}), last);
    std::int64_t want_window = 0, want_full = 0;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      const std::int64_t p = bs.position(seq[i]);
      CAPTURE(step, i, p);
      CHECK(static_cast<std::int64_t>(bs.pages(seq[i], W).size()) == held(p));
      CHECK(bs.first_page(seq[i], W) == std::max<std::int64_t>(0, p - W + 1) / P);
      CHECK(static_cast<std::int64_t>(bs.pages(seq[i]).size()) == (p + P - 1) / P);
      want_window += held(p);
      want_full += (p + P - 1) / P;
      if (step > 0) {  // the next token: the argmax, as generation runs
        got[i].insert(got[i].end(), lg.begin() + static_cast<std::ptrdiff_t>(i) * V, lg.begin() + static_cast<std::ptrdiff_t>(i + 1) * V);
        ids[i].push_back(ops::argmax(lg.data() + i * V, V));
      } else if (i != 1) {
        ids[i].push_back(ops::argmax(lg.data() + i * V, V));
      }
    }
    CHECK(bs.pages_in_use(W) == want_window);
    CHECK(bs.pages_in_use() == want_full);
    if (step == 0) pool_after_prompts = bs.pool_pages(W);
  }
  CHECK(bs.pool_pages(W) == pool_after_prompts);  // decode reuses the freed pages: no growth
  // Each sequence's logits equal its own session's over the same tokens.
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    CAPTURE(i);
    const auto want = session_logits(m, ids[i], so);
    const std::size_t n = got[i].size() / static_cast<std::size_t>(V), T = ids[i].size() - 1;
    REQUIRE(n >= 10);
    // The last n generated positions: logits rows T - n .. T - 1 of the session (the last token of ids has none yet).
    CHECK(test::rel_l2(got[i].data(), want.data() + (T - n) * static_cast<std::size_t>(V), n * static_cast<std::size_t>(V)) <=
          (kv == model::CacheType::int8 ? 1e-4 : 2e-6));
  }
  for (auto s : seq) bs.remove(s);
  CHECK(bs.pages_in_use(W) == 0);
  CHECK(bs.pages_in_use() == 0);
}

TEST_CASE("batch sessions refuse bad steps before anything changes", "[model][batch][errors]") {
  const auto cfg = io::Qwen3Config::from_json(tiny_json(true), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::f32, 1);
  const std::int64_t V = cfg.vocab_size;
  model::BatchOptions bo;
  bo.page_size = 12;
  REQUIRE_THROWS_WITH(m.new_batch_session({}, bo), Contains("'batch.page_size': must be a power of two, got 12"));
  auto bs = m.new_batch_session({}, {});
  const std::int64_t s = bs.add(), t = bs.add();
  const std::vector<std::int64_t> ids = {1, 2, 3}, bad = {1, 211};
  std::vector<float> lg(static_cast<std::size_t>(4 * V));
  const View2<float> two(lg.data(), {2, V});
  model::ForwardOptions last;
  last.logits = model::LogitsRows::last;
  const model::SequenceTokens twice[] = {{s, ids}, {s, ids}};
  CHECK_THROWS_WITH(m.forward_batch(bs, twice, two, last), Contains("sequence 0 appears twice (entries 0 and 1)"));
  const model::SequenceTokens unknown[] = {{s, ids}, {7, ids}};
  CHECK_THROWS_WITH(m.forward_batch(bs, unknown, two, last), Contains("no sequence 7 in this batch session"));
  const model::SequenceTokens empty[] = {{s, ids}, {t, {}}};
  CHECK_THROWS_WITH(m.forward_batch(bs, empty, two, last), Contains("entry 1 (sequence 1) has no tokens"));
  const model::SequenceTokens oov[] = {{s, ids}, {t, bad}};
  CHECK_THROWS_WITH(m.forward_batch(bs, oov, two, last), Contains("token id 211 at index 1 outside the vocabulary"));
  const model::SequenceTokens ok[] = {{s, ids}, {t, ids}};
  CHECK_THROWS_WITH(m.forward_batch(bs, ok, View2<float>(lg.data(), {3, V}), last),
                    Contains("'logits': shape [3, 211], expected [2, 211] (the last token of each entry)"));
  model::Trace trace;
  model::ForwardOptions traced = last;
  traced.trace = &trace;
  CHECK_THROWS_WITH(m.forward_batch(bs, ok, two, traced), Contains("give each entry its own SequenceTokens::trace"));
  const model::SequenceTokens shared[] = {{s, ids, &trace}, {t, ids, &trace}};
  CHECK_THROWS_WITH(m.forward_batch(bs, shared, two, last), Contains("entries 0 and 1 share one Trace"));
  bs.limits().max_memory_bytes = 1000;
  CHECK_THROWS_WITH(m.forward_batch(bs, ok, two, last), Contains("but the memory limit is"));
  bs.limits().max_memory_bytes = 0;
  CHECK(bs.position(s) == 0);
  CHECK(bs.position(t) == 0);
  CHECK_FALSE(bs.broken(s));
  m.forward_batch(bs, ok, two, last);  // and the session still works
  CHECK(bs.position(t) == 3);
  // Sliding layers are paged in the pool of their window, full attention in the window-0 pool.
  CHECK(bs.layer_paged(0));
  CHECK(bs.layer_window(0) == 6);
  CHECK(bs.layer_paged(1));
  CHECK(bs.layer_window(1) == 0);
  CHECK(bs.pool_windows() == std::vector<std::int64_t>{6, 0});
  CHECK(bs.position(bs.fork(t)) == 3);
  CHECK_THROWS_WITH(bs.remove(9), Contains("BatchSession::remove: argument 'sequence': no sequence 9"));
  const auto other = model::Qwen3Model::random(cfg, model::WeightType::f32, 2);
  CHECK_THROWS_WITH(other.forward_batch(bs, ok, two, last), Contains("'session': made by another model"));
}


TEST_CASE("a batch step records each sequence's trace as that sequence's own session does", "[model][batch][trace]") {
  // Loop Attention (layer and stack modes: gates, the looping passes'), LT2 GDN+DSA with the
  // output gate (GDN per sequence: beta, decay; sparse paged: top-k; attn_gate), Ouro (exit
  // gates and probabilities, per-step logits and entropies over the batched head) and
  // Attention Residuals (routing weights and their marks, over the packed rows).
  nlohmann::json layer = tiny_json(false), stack = tiny_json(false), lt2 = model::lt2_tiny_config(true);
  layer["loop_num"] = stack["loop_num"] = 2;
  layer["loop_window_size"] = stack["loop_window_size"] = 5;
  layer["loop_mode"] = "layer";
  stack["loop_mode"] = "stack";
  lt2["gated_attn"] = true;
  const auto reg = model::default_registry();
  std::vector<std::pair<std::string, model::Qwen3Model>> models;
  models.emplace_back("loop layer", model::Qwen3Model::random(reg.parse_config(layer), model::WeightType::f32, 7, &reg));
  models.emplace_back("loop stack", model::Qwen3Model::random(reg.parse_config(stack), model::WeightType::f32, 7, &reg));
  models.emplace_back("lt2 gdn+dsa", model::Qwen3Model::random(reg.parse_config(lt2), model::WeightType::f32, 7, &reg));
  models.emplace_back("ouro", model::Qwen3Model::load(test::fixture("ouro-tiny")));
  models.emplace_back("attnres", model::Qwen3Model::load(test::fixture("attnres-block-tiny")));
  const Plan plan = {{1, 5, 23, 9}, {0, 1, 0, 14}, {0, 6, 0, 1}, {0, 1, 0, 16}, {0, 0, 0, 1}};
  for (auto& [what, m] : models) {
    CAPTURE(what);
    std::vector<std::vector<std::int64_t>> ids;
    for (std::int64_t n : {1, 13, 23, 41}) ids.push_back(random_ids(n, m.config().vocab_size, 30 + n));
    std::vector<model::Trace> traces(ids.size());
    batch_logits(m, ids, plan, {}, 4, 0, &traces);
    for (std::size_t i = 0; i < ids.size(); ++i) {
      CAPTURE(i);
      const auto want = test::run(m, ids[i]);
      REQUIRE_FALSE(want.trace.empty());
      // As the logits (batch test above): the linear layers' row blocking moves values by ulps;
      // the selections of the sparse layer come out the same.
      test::check_same_trace(traces[i], want.trace, 1e-5);
    }
    if (what == "ouro") {  // last rows only: each step records its sequences' last tokens
      std::vector<model::Trace> last(ids.size());
      batch_logits(m, ids, plan, {}, 4, 0, &last, model::LogitsRows::last);
      const auto t = last[3].tensor("logits_per_step"), w = traces[3].tensor("logits_per_step");
      REQUIRE(t.shape == w.shape);
      const std::int64_t V = t.shape[2], T = t.shape[1];
      std::vector<std::int64_t> ends;  // sequence 3's last token in each step
      for (std::int64_t done = 0; const auto& counts : plan)
        if (counts[3] > 0) ends.push_back((done += counts[3]) - 1);
      for (std::int64_t p = 0; p < t.shape[0]; ++p)
        for (std::int64_t pos = 0; pos < T; ++pos) {
          const float* a = t.data.data() + (p * T + pos) * V;
          const float* b = w.data.data() + (p * T + pos) * V;
          const bool end = std::find(ends.begin(), ends.end(), pos) != ends.end();
          CHECK(std::isnan(a[0]) != end);
          if (end) CHECK(test::rel_l2(a, b, static_cast<std::size_t>(V)) <= 1e-5);
        }
    }
  }
}

TEST_CASE("a routing trace splits a batch step's rows by sequence and refuses rows beyond the step", "[model][trace]") {
  model::Trace a, c;
  auto router = model::Trace::for_batch({&a, nullptr, &c}, {0, 2, 3, 6}, {5, 0, 1});
  std::vector<float> rows = {0, 1, 2, 3, 4, 5};
  router.describe("x", {"layer", "token", "value"});
  router.record("x", 1, 1, ConstView2<float>(rows.data() + 1, {5, 1}));  // packed rows 1 .. 5
  router.mark("x", {1, 0}, "m");
  const auto ta = a.tensor("x"), tc = c.tensor("x");
  CHECK(ta.shape == std::vector<std::int64_t>{2, 7, 1});  // sequence 0: row 1 at position 6
  CHECK(ta.data[static_cast<std::size_t>(7 + 6)] == 1.f);
  CHECK(std::isnan(ta.data[static_cast<std::size_t>(7 + 5)]));
  CHECK(tc.shape == std::vector<std::int64_t>{2, 4, 1});  // sequence 2: rows 3 .. 5 at positions 1 .. 3
  CHECK(tc.data[static_cast<std::size_t>(4 + 1)] == 3.f);
  CHECK(tc.data[static_cast<std::size_t>(4 + 3)] == 5.f);
  CHECK(ta.dims == std::vector<std::string>{"layer", "token", "value"});
  CHECK(tc.marks.size() == 1);
  CHECK(router.sequence(0) == &a);
  CHECK(router.sequence(1) == nullptr);
  CHECK(a.sequence(0) == &a);
  CHECK_THROWS_WITH(router.record("x", 0, 4, ConstView2<float>(rows.data(), {3, 1})),
                    Contains("rows [4, 7) beyond the batch step's 6 tokens"));
  CHECK_THROWS_WITH(model::Trace::for_batch({&a}, {0, 1}, {}), Contains("1 targets, 2 cu_seqlens and 0 positions"));
}

namespace {
// A mixer whose state cannot be copied (MixerState's default clone): out = x.
struct CopyMixer final : model::TokenMixer {
  std::string kind() const override { return "copy"; }
  std::unique_ptr<model::MixerState> new_state(const model::SessionOptions&) const override {
    return std::make_unique<model::MixerState>();
  }
  void forward(ConstView2<float> x, View2<float> out, model::MixerState&, const model::StepContext&) const override {
    for (std::int64_t t = 0; t < x.shape[0]; ++t)
      for (std::int64_t i = 0; i < x.shape[1]; ++i) out(t, i) = x(t, i);
  }
  std::size_t weight_bytes() const override { return 0; }
};
}  // namespace

TEST_CASE("a custom mixer runs per sequence in a batch step; a state that cannot be copied refuses a fork",
          "[model][batch][errors]") {
  const auto cfg = io::Qwen3Config::from_json(tiny_json(false), "test");
  model::MixerRegistry reg;
  reg.add("full_attention", [](const model::BuildContext&, int) { return std::make_unique<CopyMixer>(); });
  model::RandomSource rnd(model::WeightType::f32, 3);
  const auto m = model::Qwen3Model::build(cfg, rnd, reg);
  std::vector<std::vector<std::int64_t>> ids = {random_ids(7, cfg.vocab_size, 1), random_ids(4, cfg.vocab_size, 2)};
  const auto got = batch_logits(m, ids, {{3, 4}, {4, 0}}, {}, 16, 0);
  for (std::size_t i = 0; i < ids.size(); ++i) CHECK(test::rel_l2(got[i], session_logits(m, ids[i], {})) <= 2e-6);
  auto bs = m.new_batch_session({}, {});
  const std::int64_t s = bs.add();
  CHECK_FALSE(bs.layer_paged(0));
  CHECK_THROWS_WITH(bs.fork(s), Contains("token mixer 'copy': its per-sequence state cannot be copied"));
}

}  // namespace attnkit_test_model
