// Loop Attention models (fixtures loop-stack-tiny, loop-layer-tiny: an independent float64
// implementation of spec §4.3/§4.4) and the composition layer's recipe seam: prefill, decode and
// chunked logits and the gates against the reference; registering a layer type, residual policy
// and recipe from outside the library; nothing of a checkpoint dropped in silence; and looped
// stacks (Ouro, the generic loop), at the end of the file.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>
#include <algorithm>
#include <cmath>

#include "attnkit/attnkit.hpp"
#include "model_test_util.hpp"
#include "test_util.hpp"
#include "attnkit/model/qwen3.hpp"
#include "reference/qwen3_ref.hpp"

// One namespace per file: the model test files compile as one unit (tests/CMakeLists.txt).
namespace attnkit_test_model_loop {

using namespace attnkit;
namespace fs = std::filesystem;
using Catch::Contains;
using namespace attnkit::test;

namespace {

struct LoopReference {
  std::vector<std::int64_t> ids;
  std::vector<float> logits, gates;  // gates [layers, T, heads]
};

LoopReference load_reference(const fs::path& dir) {
  auto f = io::SafetensorsFile::open(dir / "reference.safetensors");
  return {io::to_i64(f.tensor("input_ids")), io::to_f32(f.tensor("logits")), io::to_f32(f.tensor("gates"))};
}

}  // namespace

TEST_CASE("loop fixtures: prefill, decode, chunked logits and gates against the float64 reference", "[model][loop]") {
  const std::string name = GENERATE("loop-stack-tiny", "loop-layer-tiny");
  CAPTURE(name);
  const auto m = model::Qwen3Model::load(fixture(name));
  const LoopReference ref = load_reference(fixture(name));
  CHECK(m.recipe() == "qwen3-loop");
  CHECK(m.mixer(0).kind() == "loop_attention");
  CHECK(m.passes() == (name == "loop-stack-tiny" ? 2 : 1));
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), L = m.num_layers(), H = m.config().num_attention_heads;
  REQUIRE(T > 2 * 8);  // longer than the window (8): the local pass really slides

  const Run prefill = run(m, ref.ids);
  CHECK(test::rel_l2(prefill.logits, ref.logits) <= 1e-4);
  const auto gates = prefill.trace.tensor("gates");
  REQUIRE(gates.shape == std::vector<std::int64_t>{L, T, H});
  CHECK(test::rel_l2(gates.data, ref.gates) <= 1e-4);

  const Run decode = run(m, ref.ids, {1});
  CHECK(test::rel_l2(decode.logits, ref.logits) <= 1e-4);
  CHECK(test::rel_l2(decode.trace.tensor("gates").data, ref.gates) <= 1e-4);
  CHECK(test::rel_l2(decode.logits, prefill.logits) <= 1e-5);

  for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{5}, {11, 1, 7}, {3, 20}}) {
    CAPTURE(steps);
    const Run chunked = run(m, ref.ids, steps);
    CHECK(test::rel_l2(chunked.logits, prefill.logits) <= 1e-5);
    CHECK(test::rel_l2(chunked.trace.tensor("gates").data, gates.data) <= 1e-5);
  }

  // bf16 KV caches: looser, stated bound (keys and values rounded once to 8 bits of mantissa).
  model::SessionOptions bf;
  bf.kv_type = model::CacheType::bf16;
  CHECK(test::rel_l2(run(m, ref.ids, {}, bf).logits, ref.logits) <= 2e-2);
  // Decode computes k/v by a GEMV, prefill by a GEMM: sums in another order, 1 ulp apart, and a
  // 1-ulp difference can flip a bf16 rounding (2^-9 relative). Stack mode rounds twice (K1 and
  // the looping pass's keys) and feeds pass 0's output into pass 1, so it amplifies more than a
  // plain model (measured up to 1.3e-4 under -O2, 0 under -O3).
  CHECK(test::rel_l2(run(m, ref.ids, {1}, bf).logits, run(m, ref.ids, {}, bf).logits) <= 1e-3);

  // int8 KV caches (global cache and rings): the int8 bound of tests/test_model.cpp (2e-2).
  // Decode reads the int8 rows, prefill and chunks an f32 copy of the same codes · scale; a
  // 1-ulp difference in k/v (GEMV vs GEMM) can move a code by one step (1/127 of the row's max),
  // and stack mode feeds it on: bound as for bf16 above.
  model::SessionOptions i8;
  i8.kv_type = model::CacheType::int8;
  const auto int8_prefill = run(m, ref.ids, {}, i8).logits;
  CHECK(test::rel_l2(int8_prefill, ref.logits) <= 2e-2);
  CHECK(test::rel_l2(run(m, ref.ids, {1}, i8).logits, int8_prefill) <= 1e-3);
  CHECK(test::rel_l2(run(m, ref.ids, {3, 20}, i8).logits, int8_prefill) <= 1e-3);

  // Thread count never changes a bit.
  CHECK(test::bit_equal(run(m, ref.ids, {}, {}, 1).logits, run(m, ref.ids, {}, {}, 2).logits));
  CHECK(test::bit_equal(run(m, ref.ids, {1}, {}, 1).logits, run(m, ref.ids, {1}, {}, 2).logits));
}

TEST_CASE("loop: layer mode with W >= T is plain Qwen3 whatever the gates", "[model][loop]") {
  // Local = global when the window covers every key, so the blend is the plain model for any
  // gate value; the plain model loads from the same checkpoint without its loop fields (the
  // gates are then left over: a warning, as asked for).
  TempDir tmp;
  auto cfg = read_config(fixture("loop-layer-tiny"));
  cfg["loop_window_size"] = 4096;
  write_checkpoint(fixture("loop-layer-tiny"), tmp.path, cfg);
  const auto m = model::Qwen3Model::load(tmp.path);
  const auto plain_cfg = [&] {
    auto c = cfg;
    for (const char* f : {"loop_num", "loop_window_size", "loop_mode"}) c.erase(f);
    return c;
  }();
  // Layer mode, W >= T: local = global, so the model is plain Qwen3 whatever the gates.
  model::LoadOptions lenient;
  lenient.unused = model::Unused::warn;
  std::vector<std::string> warnings;
  lenient.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  TempDir plain_dir;
  write_checkpoint(fixture("loop-layer-tiny"), plain_dir.path, plain_cfg);
  const auto plain = model::Qwen3Model::load(plain_dir.path, lenient);
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], Contains("model.gate_projections.0.weight"));
  const LoopReference ref = load_reference(fixture("loop-layer-tiny"));
  CHECK(test::rel_l2(run(m, ref.ids).logits, run(plain, ref.ids).logits) <= 1e-5);
}

TEST_CASE("loop: configuration and checkpoint errors name the field or tensor", "[model][loop][errors]") {
  TempDir tmp;
  const fs::path fx = fixture("loop-stack-tiny");
  auto cfg = read_config(fx);
  SECTION("unknown loop_mode") {
    cfg["loop_mode"] = "spiral";
    write_checkpoint(fx, tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("field 'loop_mode': unknown loop mode 'spiral'"));
  }
  SECTION("window < 1") {
    cfg["loop_window_size"] = 0;
    write_checkpoint(fx, tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("field 'loop_window_size': must be >= 1, got 0"));
  }
  SECTION("loop_num of the wrong type") {
    cfg["loop_num"] = "two";
    write_checkpoint(fx, tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("field 'loop_num': expected an integer"));
  }
  SECTION("missing gate tensor") {
    write_checkpoint(fx, tmp.path, cfg, "model.gate_projections.1.bias");
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("model.gate_projections.1.bias"));
  }
  SECTION("gate of the wrong shape") {
    write_checkpoint(fx, tmp.path, cfg, "", "model.gate_projections.2.weight");
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("model.gate_projections.2.weight"));
  }
  SECTION("sliding layers") {
    cfg["use_sliding_window"] = true;
    cfg["sliding_window"] = 4;
    cfg["layer_types"] = {"full_attention", "sliding_attention", "full_attention"};
    write_checkpoint(fx, tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("Loop Attention runs on full-attention layers only"));
  }
}

TEST_CASE("loading never drops part of a checkpoint in silence", "[model][errors]") {
  TempDir tmp;
  SECTION("a loop checkpoint without its loop fields: the gate tensors are left over") {
    auto cfg = read_config(fixture("loop-stack-tiny"));
    for (const char* f : {"loop_num", "loop_window_size", "loop_mode"}) cfg.erase(f);
    write_checkpoint(fixture("loop-stack-tiny"), tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path),
                        Contains("6 tensors that recipe 'qwen3' does not use: model.gate_projections.0.bias") &&
                            Contains("Unused::warn"));
  }
  SECTION("a stray tensor") {
    write_checkpoint(fixture("qwen3-tiny-f32"), tmp.path, read_config(fixture("qwen3-tiny-f32")), "", "", "model.extra.scale");
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("model.extra.scale"));
  }
  SECTION("a config field that selects a mechanism") {
    auto cfg = read_config(fixture("qwen3-tiny-f32"));
    cfg["attnres_num_blocks"] = 2;
    write_checkpoint(fixture("qwen3-tiny-f32"), tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path),
                        Contains("config fields that recipe 'qwen3' does not use: attnres_num_blocks"));
  }
  SECTION("an unknown layer type lists the known ones") {
    auto cfg = read_config(fixture("qwen3-tiny-f32"));
    cfg["layer_types"] = {"full_attention", "mamba_attention"};
    write_checkpoint(fixture("qwen3-tiny-f32"), tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path),
                        Contains("entry 1 is 'mamba_attention' (known layer types: full_attention, gated_attention, "
                                 "gated_sparse_attention, linear_attention, loop_attention, lt2_gated_window_attention, "
                                 "lt2_window_attention, ouro_attention, routed_attention, sliding_attention, sparse_attention, "
                                 "tuneable_attention)"));
  }
  SECTION("an unknown model type lists the recipes' types") {
    auto cfg = read_config(fixture("qwen3-tiny-f32"));
    cfg["model_type"] = "mamba";
    write_checkpoint(fixture("qwen3-tiny-f32"), tmp.path, cfg);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path),
                        Contains("unsupported model type 'mamba' (accepted: qwen3, qwen3_attnres, ouro, qwen3_5_text, qwen3_next, lt2)"));
  }
}

namespace {
// A mechanism written outside the library: attention whose output is scaled by a learned
// per-layer scalar (tensor model.layers.{i}.self_attn.out_scale [1]), a residual policy that
// scales every sublayer output by a config field, and a recipe for model_type "scaled_qwen3".
struct ScaledAttention final : model::TokenMixer {
  std::unique_ptr<model::TokenMixer> inner;
  float scale;
  ScaledAttention(const model::BuildContext& c, int layer)
      : inner(std::make_unique<model::Qwen3Attention>(c, layer, 0)),
        scale(c.source.get(c.prefix(layer) + "self_attn.out_scale", {1}).to_f32()[0]) {}
  std::string kind() const override { return "scaled_attention"; }
  std::unique_ptr<model::MixerState> new_state(const model::SessionOptions& o) const override { return inner->new_state(o); }
  void forward(ConstView2<float> x, View2<float> out, model::MixerState& s, const model::StepContext& ctx) const override {
    inner->forward(x, out, s, ctx);
    for (std::int64_t t = 0; t < out.shape[0]; ++t)
      for (std::int64_t i = 0; i < out.shape[1]; ++i) out(t, i) *= scale;
  }
  std::size_t weight_bytes() const override { return inner->weight_bytes(); }
};
struct ScaledSum final : model::ResidualPolicy {
  float k;
  explicit ScaledSum(float k) : k(k) {}
  std::string kind() const override { return "scaled_sum"; }
  std::unique_ptr<model::ResidualStream> begin(ConstView2<float> e, const model::StepContext&) const override {
    struct Stream final : model::ResidualStream {
      std::vector<float> x;
      std::int64_t T, D;
      float k;
      Stream(ConstView2<float> e, float k) : x(static_cast<std::size_t>(e.shape[0] * e.shape[1])), T(e.shape[0]), D(e.shape[1]), k(k) {
        for (std::int64_t t = 0; t < T; ++t) std::copy(e.ptr(t), e.ptr(t) + D, x.data() + t * D);
      }
      ConstView2<float> input(int, model::Sublayer) override { return ConstView2<float>(x.data(), {T, D}); }
      void add_output(int, model::Sublayer, ConstView2<float> o) override {
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t i = 0; i < D; ++i) x[t * D + i] += k * o(t, i);
      }
      ConstView2<float> output() override { return ConstView2<float>(x.data(), {T, D}); }
    };
    return std::make_unique<Stream>(e, k);
  }
};
}  // namespace

TEST_CASE("a layer type, residual policy and recipe registered from outside the library", "[model][recipe]") {
  model::Registry reg = model::default_registry();
  reg.mixers.add("scaled_attention", [](const model::BuildContext& c, int layer) { return std::make_unique<ScaledAttention>(c, layer); });
  reg.add_residual("scaled_sum", [](const model::BuildContext& c) {
    return std::make_shared<ScaledSum>(static_cast<float>(c.fields.number("residual_scale", 1.0)));
  });
  reg.add_recipe({"scaled", {"scaled_qwen3"}, nullptr, [](io::ConfigFields&) {
                    model::Plan p;  // mixers: the config's layer_types
                    p.residual = "scaled_sum";
                    return p;
                  }});

  const fs::path fx = fixture("qwen3-tiny-f32");
  TempDir tmp;
  auto cfg = read_config(fx);
  cfg["model_type"] = "scaled_qwen3";
  cfg["residual_scale"] = 1.0;
  cfg["layer_types"] = {"scaled_attention", "scaled_attention"};
  // out_scale = 1 for both layers: the model is exactly plain Qwen3.
  {
    std::ofstream(tmp.path / "config.json") << cfg.dump();
    auto src = io::SafetensorsFile::open(fx / "model.safetensors");
    io::SafetensorsWriter w;
    for (const auto& n : src.names()) w.add(n, src.tensor(n).dtype, src.tensor(n).shape, src.tensor(n).data, src.tensor(n).nbytes);
    const float one = 1.f;
    for (int l = 0; l < 2; ++l) w.add_f32("model.layers." + std::to_string(l) + ".self_attn.out_scale", {1}, &one);
    w.write(tmp.path / "model.safetensors");
  }
  model::LoadOptions opt;
  opt.registry = &reg;
  const auto m = model::Qwen3Model::load(tmp.path, opt);
  CHECK(m.recipe() == "scaled");
  CHECK(m.mixer(1).kind() == "scaled_attention");
  CHECK(m.residual_policy().kind() == "scaled_sum");
  const std::vector<std::int64_t> ids = {5, 17, 3, 99, 42, 7, 7, 1};
  const auto plain = model::Qwen3Model::load(fx);
  CHECK(test::rel_l2(run(m, ids).logits, run(plain, ids).logits) <= 1e-6);
  // The default registry does not know the new model type.
  REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("unsupported model type 'scaled_qwen3'"));
  // Random weights through the same recipe (any config a recipe accepts).
  const auto r = model::Qwen3Model::random(reg.parse_config(cfg), model::WeightType::f32, 1, &reg);
  CHECK(r.recipe() == "scaled");
}

TEST_CASE("random loop models: decode and chunks match prefill in both modes", "[model][loop]") {
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 96}, {"hidden_size", 40}, {"intermediate_size", 56},
                      {"num_hidden_layers", 2}, {"num_attention_heads", 6}, {"num_key_value_heads", 2}, {"head_dim", 24},
                      {"rope_theta", 10000.0}, {"tie_word_embeddings", true}, {"loop_window_size", 5}};
  const std::string mode = GENERATE("stack", "layer");
  const int loops = GENERATE(2, 3);
  j["loop_mode"] = mode;
  j["loop_num"] = loops;
  CAPTURE(mode, loops);
  const auto reg = model::default_registry();
  const auto m = model::Qwen3Model::random(reg.parse_config(j), model::WeightType::f32, 11);
  CHECK(m.passes() == (mode == "stack" ? loops : 1));
  std::vector<std::int64_t> ids(23);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int64_t>((i * 31 + 7) % 96);
  const Run p = run(m, ids);
  CHECK(test::rel_l2(run(m, ids, {1}).logits, p.logits) <= 1e-5);
  CHECK(test::rel_l2(run(m, ids, {4, 9}).logits, p.logits) <= 1e-5);
  std::vector<std::string> names;  // the gate series (a looped stack also records per-pass read-outs)
  for (auto& n : p.trace.names())
    if (n.rfind("gates", 0) == 0) names.push_back(n);
  CHECK(names.front() == "gates");
  CHECK(names.size() == (mode == "stack" ? static_cast<std::size_t>(loops - 1) : 1u));
  for (float g : p.trace.tensor("gates").data) REQUIRE((g > 0.f && g < 1.f));
}

namespace {
// Writes the constant c to every output element: after an RMSNorm with unit weight that is
// sign(c) everywhere, whatever c is.
struct ConstantMixer final : model::TokenMixer {
  float c;
  explicit ConstantMixer(float c) : c(c) {}
  std::string kind() const override { return "constant"; }
  std::unique_ptr<model::MixerState> new_state(const model::SessionOptions&) const override {
    return std::make_unique<model::MixerState>();
  }
  void forward(ConstView2<float>, View2<float> out, model::MixerState&, const model::StepContext&) const override {
    for (std::int64_t t = 0; t < out.shape[0]; ++t)
      for (std::int64_t i = 0; i < out.shape[1]; ++i) out(t, i) = c;
  }
  std::size_t weight_bytes() const override { return 0; }
};
}  // namespace

TEST_CASE("block shape: norms after the sublayers (sandwich norms)", "[model][recipe]") {
  model::Registry reg = model::default_registry();
  reg.mixers.add("constant", [](const model::BuildContext&, int) { return std::make_unique<ConstantMixer>(7.5f); });
  for (bool sandwich : {false, true})
    reg.add_recipe({sandwich ? "sandwich" : "open", {sandwich ? "sandwich_test" : "open_test"}, nullptr,
                    [sandwich](io::ConfigFields&) {
                      model::Plan p;
                      if (sandwich) p.block = {"input_layernorm_2", "post_attention_layernorm_2"};
                      return p;
                    }});
  nlohmann::json j = {{"model_type", "sandwich_test"}, {"vocab_size", 50}, {"hidden_size", 32}, {"intermediate_size", 40},
                      {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"head_dim", 16}, {"rms_norm_eps", 1e-12},
                      {"tie_word_embeddings", true}, {"layer_types", {"constant"}}};
  const auto m = model::Qwen3Model::random(reg.parse_config(j), model::WeightType::f32, 3, &reg);
  j["model_type"] = "open_test";
  const auto open = model::Qwen3Model::random(reg.parse_config(j), model::WeightType::f32, 3, &reg);
  const std::vector<std::int64_t> ids = {4, 8, 15, 16, 23};
  const auto hidden = [&](const model::Qwen3Model& mm) {
    std::vector<std::vector<float>> h;
    model::ForwardOptions fo;
    fo.on_pass_hidden = [&](int, int, ConstView2<float> x) { h.emplace_back(x.data, x.data + x.shape[0] * x.shape[1]); };
    auto s = mm.new_session();
    std::vector<float> logits(static_cast<std::size_t>(ids.size() * 50));
    mm.forward(s, ids, View2<float>(logits.data(), {5, 50}), fo);
    return h;
  };
  // Random norm weights are ones: layer output = x + 1 (the normalised constant) + an MLP
  // output normalised to RMS 1, per token.
  const auto h = hidden(m);
  REQUIRE(h.size() == 2);
  for (std::int64_t t = 0; t < 5; ++t) {
    double ss = 0;
    for (std::int64_t i = 0; i < 32; ++i) {
      const double r = h[1][t * 32 + i] - h[0][t * 32 + i] - 1.0;
      ss += r * r;
    }
    CHECK(std::sqrt(ss / 32) == Approx(1.0).epsilon(1e-4));
  }
  // Without the norms the constant goes in as it is, and the raw MLP output of small random
  // weights is far from RMS 1.
  const auto ho = hidden(open);
  for (std::int64_t t = 0; t < 5; ++t) {
    double ss = 0;
    for (std::int64_t i = 0; i < 32; ++i) {
      const double r = ho[1][t * 32 + i] - ho[0][t * 32 + i] - 7.5;
      ss += r * r;
    }
    CHECK(std::sqrt(ss / 32) < 0.5);
  }
}

TEST_CASE("QKVProjection: RoPE over its own rotary dimension (partial rotary)", "[model][parts]") {
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 50}, {"hidden_size", 32}, {"intermediate_size", 40},
                      {"num_hidden_layers", 1}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"head_dim", 16}, {"rope_theta", 10000.0}};
  const auto cfg = io::Qwen3Config::from_json(j, "test");
  io::ConfigFields fields(cfg);
  model::RandomSource rnd(model::WeightType::f32, 5, 0.3f);
  model::BuildContext ctx{cfg, rnd, std::make_shared<const ops::Rope>(16, 10000.0), fields, 1};
  const std::int64_t r = 8, T = 3, D = 32;
  const model::QKVProjection partial(ctx, {"model.layers.0.self_attn.", true, r});
  std::vector<float> x(static_cast<std::size_t>(T * D));
  test::Rng rng(test::fresh_seed());
  for (auto& v : x) v = rng.normal();
  const auto project = [&](std::int64_t pos0) {
    model::QKV out;
    model::StepContext sc;
    sc.pos0 = pos0;
    sc.num_threads = 1;
    partial.forward(ConstView2<float>(x.data(), {T, D}), out, sc);
    return out;
  };
  const model::QKV at0 = project(0), at7 = project(7);  // rows at positions t and 7 + t
  // Dimensions [r, d) are never rotated; [0, r) are rotate-half RoPE of width r, so moving a row
  // by 7 positions rotates its first r dimensions by RoPE(7) (rotations by angle compose).
  View3<float> expect_q = at0.q;
  std::vector<float> head(static_cast<std::size_t>(T * 4 * r));
  View3<float> hq(head.data(), {T, 4, r});
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < 4; ++h) std::copy(expect_q.ptr(t, h), expect_q.ptr(t, h) + r, hq.ptr(t, h));
  const ops::Rope rope_r(r, 10000.0);
  for (std::int64_t t = 0; t < T; ++t) rope_r.apply(hq.slice(0, t, t + 1), 7);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < 4; ++h) {
      for (std::int64_t i = r; i < 16; ++i) REQUIRE(at7.q(t, h, i) == at0.q(t, h, i));
      for (std::int64_t i = 0; i < r; ++i) REQUIRE(at7.q(t, h, i) == Approx(hq(t, h, i)).margin(1e-5));
    }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t i = r; i < 16; ++i) REQUIRE(at7.k(t, 1, i) == at0.k(t, 1, i));
  CHECK(at7.q(1, 0, 1) != at0.q(1, 0, 1));  // the rotary part really rotates
  REQUIRE_THROWS_WITH(model::QKVProjection(ctx, {"model.layers.0.self_attn.", true, 7}),
                      Contains("rotary_dim must be even"));
}

// ================================================================================================
// Looped stacks: Ouro and the generic loop (kept in this translation unit: each model test TU instantiates the whole
// library, about 70 s of compile time per TU in each CI build)
// ================================================================================================

// Looped stacks (spec §9): Ouro checkpoints (fixture ouro-tiny: an independent float64
// implementation) through prefill, decode and chunks with per-step logits and exit gates; the exit
// rules; the generic loop of any recipe (loop_count, loop_between, loop_windows) against the
// float64 reference forward (tests/reference/qwen3_ref.hpp); configuration and checkpoint errors.

using namespace attnkit;
using namespace attnkit::test;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

struct OuroReference {
  std::vector<std::int64_t> ids;
  std::vector<float> logits, logits_per_step, exit_gate;  // [T, V], [steps, T, V], [steps, T]
};
OuroReference load_ouro_reference() {
  auto f = io::SafetensorsFile::open(fixture("ouro-tiny") / "reference.safetensors");
  return {io::to_i64(f.tensor("input_ids")), io::to_f32(f.tensor("logits")), io::to_f32(f.tensor("logits_per_step")),
          io::to_f32(f.tensor("exit_gate"))};
}

Run run_with(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids, model::ExitRule rule,
             std::vector<std::int64_t> steps = {}) {
  return run(m, ids, std::move(steps), {}, 0, rule);
}

}  // namespace

TEST_CASE("ouro fixture: logits, per-step logits and exit gates in prefill, decode and chunks", "[model][ouro]") {
  const auto m = model::Qwen3Model::load(fixture("ouro-tiny"));
  const OuroReference ref = load_ouro_reference();
  CHECK(m.recipe() == "ouro");
  CHECK(m.passes() == 3);
  CHECK(m.stack_policy().has_exit_gate());
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), V = m.config().vocab_size;
  for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{}, {1}, {5}, {11, 1, 7}}) {
    CAPTURE(steps);
    const Run r = run(m, ref.ids, steps);
    CHECK(test::rel_l2(r.logits, ref.logits) <= 1e-4);
    const auto lps = r.trace.tensor("logits_per_step");
    REQUIRE(lps.shape == std::vector<std::int64_t>{3, T, V});
    CHECK(test::rel_l2(lps.data, ref.logits_per_step) <= 1e-4);
    const auto gate = r.trace.tensor("exit_gate");
    REQUIRE(gate.shape == std::vector<std::int64_t>{3, T});
    CHECK(test::rel_l2(gate.data, ref.exit_gate) <= 1e-4);
    // The exit distribution sums to 1 per token.
    const auto p = r.trace.tensor("exit_probability");
    for (std::int64_t t = 0; t < T; ++t)
      CHECK(std::abs(p.data[static_cast<std::size_t>(t)] + p.data[static_cast<std::size_t>(T + t)] +
                     p.data[static_cast<std::size_t>(2 * T + t)] - 1.f) <= 1e-6f);
    // Each step's next-token entropy, against float64 from the reference's per-step logits.
    const auto ent = r.trace.tensor("step_entropy");
    REQUIRE(ent.shape == std::vector<std::int64_t>{3, T});
    std::vector<double> want(static_cast<std::size_t>(3 * T));
    for (std::int64_t st = 0; st < 3 * T; ++st) {
      const auto row = ref.logits_per_step.begin() + st * V;
      const double mx = *std::max_element(row, row + V);
      double z = 0, zl = 0;
      for (std::int64_t v = 0; v < V; ++v) {
        const double e = std::exp(static_cast<double>(row[v]) - mx);
        z += e;
        zl += e * (static_cast<double>(row[v]) - mx);
      }
      want[static_cast<std::size_t>(st)] = std::log(z) - zl / z;
    }
    CHECK(test::rel_l2(ent.data, want) <= 1e-4);
  }
  CHECK(test::bit_equal(run(m, ref.ids, {}, {}, 1).logits, run(m, ref.ids, {}, {}, 2).logits));
  CHECK(test::bit_equal(run(m, ref.ids, {1}, {}, 1).logits, run(m, ref.ids, {1}, {}, 2).logits));
}

TEST_CASE("ouro exit rules select among the steps' outputs; every step still runs", "[model][ouro]") {
  const auto m = model::Qwen3Model::load(fixture("ouro-tiny"));
  const OuroReference ref = load_ouro_reference();
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), V = m.config().vocab_size;
  const Run base = run_with(m, ref.ids, model::ExitRule::last());
  const auto lps = base.trace.tensor("logits_per_step").data;
  const auto p = base.trace.tensor("exit_probability").data;
  auto step_row = [&](int s, std::int64_t t) { return lps.begin() + (s * T + t) * V; };
  for (int s = 0; s < 3; ++s) {  // a fixed step
    CAPTURE(s);
    const Run r = run_with(m, ref.ids, model::ExitRule::at_step(s));
    CHECK(test::bit_equal(r.logits, std::vector<float>(step_row(s, 0), step_row(s, 0) + T * V)));
    CHECK(test::rel_l2(r.logits, std::vector<float>(ref.logits_per_step.begin() + s * T * V,
                                                    ref.logits_per_step.begin() + (s + 1) * T * V)) <= 1e-4);
  }
  SECTION("expected logits: sum over steps of p_step * logits_step") {
    for (auto steps : {std::vector<std::int64_t>{}, std::vector<std::int64_t>{1}}) {
      const Run r = run_with(m, ref.ids, model::ExitRule::expected(), steps);
      std::vector<float> want(static_cast<std::size_t>(T * V), 0.f);
      for (std::int64_t t = 0; t < T; ++t)
        for (int s = 0; s < 3; ++s)
          for (std::int64_t v = 0; v < V; ++v)
            want[static_cast<std::size_t>(t * V + v)] += p[static_cast<std::size_t>(s * T + t)] * step_row(s, t)[v];
      CHECK(test::rel_l2(r.logits, want) <= 1e-6);
    }
  }
  SECTION("threshold: per token, the first step whose cumulative exit probability reaches it") {
    for (double q : {0.2, 0.5, 0.9, 1.0}) {
      CAPTURE(q);
      const Run r = run_with(m, ref.ids, model::ExitRule::at_threshold(q));
      for (std::int64_t t = 0; t < T; ++t) {
        int pick = 2;
        float cum = 0.f;
        for (int s = 0; s < 2; ++s) {
          cum += p[static_cast<std::size_t>(s * T + t)];
          if (cum >= q) {
            pick = s;
            break;
          }
        }
        CAPTURE(t, pick);
        CHECK(test::bit_equal(std::vector<float>(r.logits.begin() + t * V, r.logits.begin() + (t + 1) * V),
                              std::vector<float>(step_row(pick, t), step_row(pick, t) + V)));
      }
    }
  }
  SECTION("bad rules") {
    REQUIRE_THROWS_WITH(run_with(m, ref.ids, model::ExitRule::at_step(3)), Contains("step 3 outside the stack's 3 steps"));
    REQUIRE_THROWS_WITH(run_with(m, ref.ids, model::ExitRule::at_threshold(0.0)), Contains("threshold must be in (0, 1]"));
    REQUIRE_THROWS_WITH(run_with(m, ref.ids, model::ExitRule::at_threshold(1.5)), Contains("threshold must be in (0, 1]"));
    const auto plain = model::Qwen3Model::load(fixture("qwen3-tiny-f32"));
    REQUIRE_THROWS_WITH(run_with(plain, {1, 2, 3}, model::ExitRule::expected()), Contains("needs an exit gate"));
  }
}

TEST_CASE("ouro: configuration and checkpoint errors name the field or tensor", "[model][ouro][errors]") {
  TempDir tmp;
  const fs::path fx = fixture("ouro-tiny");
  auto cfg = read_config(fx);
  auto load_with = [&](const nlohmann::json& c, const std::string& drop = "") {
    write_checkpoint(fx, tmp.path, c, drop);
    return model::Qwen3Model::load(tmp.path);
  };
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.1.input_layernorm_2.weight"), Contains("model.layers.1.input_layernorm_2.weight"));
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.2.post_attention_layernorm_2.weight"),
                      Contains("model.layers.2.post_attention_layernorm_2.weight"));
  REQUIRE_THROWS_WITH(load_with(cfg, "model.early_exit_gate.weight"), Contains("model.early_exit_gate.weight"));
  auto c = cfg;
  c["total_ut_steps"] = 0;
  REQUIRE_THROWS_WITH(load_with(c), Contains("total_ut_steps") && Contains("got 0"));
  c = cfg;
  c["early_exit_threshold"] = 1.5;
  REQUIRE_THROWS_WITH(load_with(c), Contains("early_exit_threshold") && Contains("(0, 1]"));
  c = cfg;
  c["early_exit_threshold"] = 0.5;  // the default rule becomes a threshold of 0.5
  CHECK(load_with(c).stack_policy().default_exit().kind == model::ExitRule::Kind::threshold);
  c = cfg;
  c["loop_count"] = 2;  // Ouro already loops
  REQUIRE_THROWS_WITH(load_with(c), Contains("loop_count") && Contains("already runs stack policy 'ouro'"));
}

// ---------------------------------------------------------------------------------------------
// The generic loop of any recipe against the float64 reference forward.

namespace {
std::vector<float> to_vec(const ref::MatrixXdR& m) {
  std::vector<float> v(static_cast<std::size_t>(m.size()));
  for (Eigen::Index i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(m.data()[i]);
  return v;
}
}  // namespace

TEST_CASE("looped stacks of any recipe: loop counts, what passes between loops, per-loop windows", "[model][looped]") {
  // qwen3-tiny-swa's shape: sliding (window 8) and full layers, one kv head, untied head.
  auto base = read_config(fixture("qwen3-tiny-swa"));
  const model::Registry reg = model::default_registry();
  const model::RandomSource src(model::WeightType::f32, 17, 0.15f);
  test::Rng rng(test::fresh_seed());
  std::vector<std::int64_t> ids(29);  // more than 3 windows of 8
  for (auto& id : ids) id = rng.integer(0, base["vocab_size"].get<std::int64_t>() - 1);

  struct Case {
    int loops;
    std::string between;
    std::vector<std::int64_t> windows;
  };
  const std::vector<Case> cases = {{1, "none", {}}, {2, "none", {}}, {3, "norm", {}}, {4, "none", {4, 8, 16, 0}},
                                   {3, "norm", {3, 0, 5}}};
  const auto plain = model::Qwen3Model::compose(reg.parse_config(base), src);
  for (const auto& c : cases) {
    CAPTURE(c.loops, c.between, c.windows);
    auto j = base;
    j["loop_count"] = c.loops;
    j["loop_between"] = c.between;
    if (!c.windows.empty()) j["loop_windows"] = c.windows;
    const auto m = model::Qwen3Model::compose(reg.parse_config(j), src);
    CHECK(m.passes() == c.loops);
    ref::RefOptions ro;
    ro.steps = c.loops;
    ro.between = c.between == "norm" ? ref::BetweenSteps::final_norm : ref::BetweenSteps::none;
    ro.window_per_step = c.windows;
    const auto want = ref::qwen3_ref_forward(ref::load_qwen3_ref(src, reg.parse_config(base), ro), ids, ro);
    const Run prefill = run(m, ids);
    CHECK(test::rel_l2(prefill.logits, to_vec(want.logits)) <= 1e-5);
    if (c.loops > 1) {  // every loop's read-out
      std::vector<float> steps;
      for (auto& l : want.logits_per_step) {
        const auto v = to_vec(l);
        steps.insert(steps.end(), v.begin(), v.end());
      }
      CHECK(test::rel_l2(prefill.trace.tensor("logits_per_step").data, steps) <= 1e-5);
    }
    CHECK(test::rel_l2(run(m, ids, {1}).logits, prefill.logits) <= 1e-5);
    CHECK(test::rel_l2(run(m, ids, {7, 3}).logits, prefill.logits) <= 1e-5);
    if (c.loops == 1) CHECK(test::bit_equal(prefill.logits, run(plain, ids).logits));  // one loop is the plain stack
  }
  auto bad = base;
  bad["loop_count"] = 2;
  bad["loop_windows"] = {8};
  REQUIRE_THROWS_WITH(model::Qwen3Model::compose(reg.parse_config(bad), src), Contains("loop_windows") && Contains("list of 2"));
  bad["loop_windows"] = {8, -1};
  REQUIRE_THROWS_WITH(model::Qwen3Model::compose(reg.parse_config(bad), src), Contains("loop_windows") && Contains(">= 0"));
  bad.erase("loop_windows");
  bad["loop_between"] = "sideways";
  REQUIRE_THROWS_WITH(model::Qwen3Model::compose(reg.parse_config(bad), src), Contains("loop_between"));
  bad["loop_between"] = "none";
  bad["loop_count"] = 0;
  REQUIRE_THROWS_WITH(model::Qwen3Model::compose(reg.parse_config(bad), src), Contains("loop_count") && Contains("got 0"));
}

}  // namespace attnkit_test_model_loop
