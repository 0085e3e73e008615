// Attention Residuals models (spec §5): the open-attention-residuals checkpoints (fixtures
// attnres-block-tiny, attnres-full-tiny: an independent float64 implementation) through prefill,
// decode and chunks; the Kimi and Delta forms against a float64 reference of the spec's formulas
// (tests/reference/attnres_model_ref.hpp) driving the residual stream with stand-in sublayers;
// the spec's invariants; configuration and checkpoint errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attnkit/model/qwen3.hpp"
#include "model_test_util.hpp"
#include "test_util.hpp"
#include "reference/attnres_forms_ref.hpp"

// One namespace per file: the model test files compile as one unit (tests/CMakeLists.txt).
namespace attnkit_test_model_attnres {

using namespace attnkit;
using namespace attnkit::test;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

struct Reference {
  std::vector<std::int64_t> ids;
  std::vector<float> logits;
};
Reference load_reference(const fs::path& dir) {
  auto f = io::SafetensorsFile::open(dir / "reference.safetensors");
  return {io::to_i64(f.tensor("input_ids")), io::to_f32(f.tensor("logits"))};
}

}  // namespace

TEST_CASE("attnres fixtures: prefill, decode and chunked logits against the float64 reference", "[model][attnres]") {
  const std::string name = GENERATE("attnres-block-tiny", "attnres-full-tiny");
  CAPTURE(name);
  const auto m = model::Qwen3Model::load(fixture(name));
  const Reference ref = load_reference(fixture(name));
  CHECK(m.recipe() == "qwen3-attnres");
  CHECK(m.residual_policy().kind() == "attnres");
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), L = m.num_layers();

  const Run prefill = run(m, ref.ids);
  CHECK(test::rel_l2(prefill.logits, ref.logits) <= 1e-4);
  const Run decode = run(m, ref.ids, {1});
  CHECK(test::rel_l2(decode.logits, ref.logits) <= 1e-4);
  CHECK(test::rel_l2(decode.logits, prefill.logits) <= 1e-5);
  for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{5}, {11, 1, 7}}) {
    CAPTURE(steps);
    CHECK(test::rel_l2(run(m, ref.ids, steps).logits, prefill.logits) <= 1e-5);
  }
  CHECK(test::bit_equal(run(m, ref.ids, {}, {}, 1).logits, run(m, ref.ids, {}, {}, 2).logits));

  // The routing weights: [layers, 2, T, S], each call's row a distribution over its sources.
  const auto& policy = dynamic_cast<const model::AttentionResiduals&>(m.residual_policy());
  const auto w = prefill.trace.tensor("attnres_weights");
  const std::int64_t S = policy.max_sources();
  REQUIRE(w.shape == std::vector<std::int64_t>{L, 2, T, S});
  CHECK(S == (name == "attnres-block-tiny" ? 3 : 2 * L + 1));
}

// ---------------------------------------------------------------------------------------------
// The residual policy alone, driven by stand-in sublayers, against the float64 forms reference.

namespace {

// Random weights with random (not unit) norm weights; zero queries and biases on request.
struct TestSource final : model::TensorSource {
  model::RandomSource base{model::WeightType::f32, 11, 0.5f}, norms{model::WeightType::f32, 12, 0.2f};
  bool zero_proj = false, zero_bias = false;
  model::HostTensor get(const std::string& name, const std::vector<std::int64_t>& shape) const override {
    model::HostTensor t = base.get(name, shape);
    const bool norm = name.find("_norm.weight") != std::string::npos, proj = name.find("_proj.weight") != std::string::npos &&
                                                                         name.find("gate_proj") == std::string::npos;
    if (norm || (proj && zero_proj)) {
      const model::HostTensor n = norms.get(name + ".noise", shape);
      for (std::int64_t i = 0; i < t.numel(); ++i) t.owned_f32[static_cast<std::size_t>(i)] = proj ? 0.f : 1.f + 3.f * n.f32()[i];
    }
    if (zero_bias && name.size() > 5 && name.compare(name.size() - 5, 5, "_bias") == 0) t.owned_f32[0] = 0.f;
    return t;
  }
  bool contains(const std::string&) const override { return true; }
  std::string describe() const override { return "test source"; }
};

Eigen::VectorXd vec(const std::vector<float>& v) {
  Eigen::VectorXd d(static_cast<Eigen::Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) d[static_cast<Eigen::Index>(i)] = v[i];
  return d;
}

struct FormCase {
  nlohmann::json fields;
  ref::AttnResFormSpec spec;
  std::string name;
};

struct Driven {
  std::vector<float> out, inputs;  // output [T, D]; every sublayer input [2L, T, D]
  model::Trace trace;
};

// Runs the policy over emb [T, D] with stand-in sublayers f(l, s, h) = 0.5 tanh(A_{l,s} h).
struct StandIn {
  std::int64_t D;
  std::vector<Eigen::MatrixXd> A;
  StandIn(int L, std::int64_t D, std::uint64_t seed) : D(D) {
    test::Rng rng(seed);
    for (int i = 0; i < 2 * L; ++i) {
      Eigen::MatrixXd a(D, D);
      for (auto& x : a.reshaped()) x = rng.normal(1.f / std::sqrt(static_cast<float>(D)));
      A.push_back(a);
    }
  }
  Eigen::VectorXd operator()(int l, int s, const Eigen::VectorXd& h) const {
    return 0.5 * (A[static_cast<std::size_t>(2 * l + s)] * h).array().tanh().matrix();
  }
};

Driven drive(const model::AttentionResiduals& p, const std::vector<float>& emb, std::int64_t T, std::int64_t D, int L,
             const StandIn& f, int threads = 0) {
  Driven d;
  model::StepContext ctx;
  ctx.trace = &d.trace;
  ctx.num_threads = threads;
  auto st = p.begin(ConstView2<float>(emb.data(), {T, D}), ctx);
  std::vector<float> y(static_cast<std::size_t>(T * D));
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < 2; ++s) {
      const auto sub = s == 0 ? model::Sublayer::mixer : model::Sublayer::mlp;
      const ConstView2<float> h = st->input(l, sub);
      for (std::int64_t t = 0; t < T; ++t) {
        Eigen::VectorXd hv(D);
        for (std::int64_t i = 0; i < D; ++i) hv[i] = h(t, i), d.inputs.push_back(h(t, i));
        const Eigen::VectorXd o = f(l, s, hv);
        for (std::int64_t i = 0; i < D; ++i) y[static_cast<std::size_t>(t * D + i)] = static_cast<float>(o[i]);
      }
      st->add_output(l, sub, ConstView2<float>(y.data(), {T, D}));
    }
  const ConstView2<float> o = st->output();
  for (std::int64_t t = 0; t < T; ++t) d.out.insert(d.out.end(), o.ptr(t), o.ptr(t) + D);
  return d;
}

io::Qwen3Config form_config(const nlohmann::json& fields, int L, std::int64_t D) {
  nlohmann::json j = {{"model_type", "qwen3_attnres"}, {"hidden_size", D}, {"intermediate_size", 8},
                      {"num_hidden_layers", L}, {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                      {"head_dim", 4}, {"vocab_size", 16}, {"rms_norm_eps", 1e-6}};
  j.update(fields);
  return model::default_registry().parse_config(j, "test config");
}

ref::AttnResRouteParams ref_params(const model::TensorSource& src, const std::string& stem, const std::string& null_name,
                                   const std::string& gate, bool null_source, std::int64_t D) {
  ref::AttnResRouteParams p;
  p.proj = vec(src.get(stem + "_proj.weight", {1, D}).to_f32());
  p.gamma = vec(src.get(stem + "_norm.weight", {D}).to_f32());
  p.bias = src.get(stem + "_bias", {}).to_f32()[0];
  if (gate == "sigmoid_scalar") p.gate = 1, p.g = 1.0 / (1.0 + std::exp(-double(src.get(stem + "_gate_logit", {}).to_f32()[0])));
  if (gate == "learnable_alpha") p.gate = 1, p.g = src.get(stem + "_alpha", {}).to_f32()[0];
  if (gate == "sigmoid_vector") {
    p.gate = 2;
    const auto w = src.get(stem + "_gate_proj.weight", {D, D}).to_f32();
    p.W = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(w.data(), D, D).cast<double>();
    p.b = vec(src.get(stem + "_gate_proj.bias", {D}).to_f32());
  }
  if (null_source) p.null_source = vec(src.get(null_name, {D}).to_f32());
  return p;
}

}  // namespace

TEST_CASE("attnres forms: the policy against the float64 reference of the spec's formulas", "[model][attnres]") {
  using Spec = ref::AttnResFormSpec;
  const int L = 5;  // 10 sublayers: blocks of 3 sublayers close mid-layer
  const std::int64_t D = 37, T = 6;
  std::vector<FormCase> cases = {
      {{{"attnres_mode", "block"}, {"attnres_num_blocks", 2}}, {Spec::open, false, false, 3}, "open block"},
      {{{"attnres_mode", "full"}}, {Spec::open, true}, "open full"},
      {{{"attnres_mode", "block"}, {"attnres_num_blocks", 5}, {"attnres_gate_type", "sigmoid_scalar"}},
       {Spec::open, false, false, 1}, "open block, sigmoid_scalar gate"},
      {{{"attnres_mode", "full"}, {"attnres_gate_type", "sigmoid_vector"}}, {Spec::open, true}, "open full, sigmoid_vector gate"},
      {{{"attnres_mode", "block"}, {"attnres_num_blocks", 3}, {"attnres_gate_type", "learnable_alpha"}},
       {Spec::open, false, false, 2}, "open block, learnable_alpha gate"},
      {{{"attnres_mode", "delta"}}, {Spec::delta}, "delta"},
      {{{"attnres_mode", "delta"}, {"attnres_use_null_source", true}}, {Spec::delta}, "delta, null source"},
      {{{"attnres_mode", "delta_block"}, {"attnres_num_blocks", 2}}, {Spec::delta, false, true, 3}, "delta_block"},
      {{{"attnres_form", "kimi"}, {"attnres_mode", "full"}}, {Spec::kimi, true}, "kimi full"},
      {{{"attnres_form", "kimi"}, {"attnres_mode", "block"}, {"attnres_block_sublayers", 3}},
       {Spec::kimi, false, false, 1, 3}, "kimi block of 3 sublayers"},
      {{{"attnres_form", "kimi"}, {"attnres_mode", "block"}, {"attnres_num_blocks", 3}, {"attnres_final", "sum"}},
       {Spec::kimi, false, false, 1, 4, false}, "kimi block (2 layers per block), final sum"},
  };
  const StandIn f(L, D, 5);
  test::Rng rng(test::fresh_seed());
  const std::vector<float> emb = rng.normal_vec(static_cast<std::size_t>(T * D));
  for (const auto& c : cases) {
    for (bool zero : {false, true}) {
      CAPTURE(c.name, zero);
      const io::Qwen3Config cfg = form_config(c.fields, L, D);
      io::ConfigFields fields(cfg);
      TestSource src;
      src.zero_proj = zero;
      const model::BuildContext ctx{cfg, src, nullptr, fields, 1};
      const auto settings = model::read_attnres_settings(fields);
      const model::AttentionResiduals policy(ctx, settings);
      REQUIRE(fields.unconsumed().empty());

      const std::string gate = c.fields.value("attnres_gate_type", "bias");
      const bool null_source = c.fields.value("attnres_use_null_source", false);
      std::vector<std::array<ref::AttnResRouteParams, 2>> params;
      for (int l = 0; l < L; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        params.push_back({ref_params(src, p + "attn_res", p + "attn_null_source", gate, null_source, D),
                          ref_params(src, p + "mlp_res", p + "mlp_null_source", gate, null_source, D)});
      }
      const auto final_params = c.spec.form == Spec::kimi && c.spec.final_route
                                    ? ref_params(src, "model.final_res", "", "bias", false, D)
                                    : ref::AttnResRouteParams{};

      const Driven got = drive(policy, emb, T, D, L, f);
      std::vector<float> want_out, want_w;
      const auto w = got.trace.tensor("attnres_weights");
      const std::int64_t S = w.shape[3];
      REQUIRE(w.shape == std::vector<std::int64_t>{L, 2, T, S});
      CHECK(S == policy.max_sources());
      std::vector<float> got_w;  // the weights of the calls, unpadded, in the reference's order
      for (std::int64_t t = 0; t < T; ++t) {
        Eigen::VectorXd e(D);
        for (std::int64_t i = 0; i < D; ++i) e[i] = emb[static_cast<std::size_t>(t * D + i)];
        std::vector<std::array<std::vector<double>, 2>> ws;
        const Eigen::VectorXd o = ref::attnres_forward_token(e, L, c.spec, params, final_params, f, &ws);
        for (std::int64_t i = 0; i < D; ++i) want_out.push_back(static_cast<float>(o[i]));
        for (int l = 0; l < L; ++l)
          for (int s = 0; s < 2; ++s) {
            const auto& rw = ws[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
            const float* row = w.data.data() + ((l * 2 + s) * T + t) * S;
            for (std::size_t n = 0; n < rw.size(); ++n) want_w.push_back(static_cast<float>(rw[n])), got_w.push_back(row[n]);
            for (std::int64_t n = static_cast<std::int64_t>(rw.size()); n < S; ++n) CHECK(row[n] == 0.f);  // padding
            if (zero) {  // all queries 0: uniform weights (before the recency bias)
              const bool biased = c.spec.form != Spec::delta;
              for (std::size_t n = 0; n + (biased ? 1 : 0) < rw.size(); ++n) CHECK(std::abs(row[n] - row[0]) <= 1e-6f);
            }
          }
      }
      CHECK(test::rel_l2(got.out, want_out) <= 1e-5);
      CHECK(test::rel_l2(got_w, want_w) <= 1e-5);
      // Thread count never changes a bit.
      CHECK(test::bit_equal(drive(policy, emb, T, D, L, f, 1).out, drive(policy, emb, T, D, L, f, 2).out));
    }
  }
}

TEST_CASE("attnres invariants: zero queries average uniformly; an infinite recency bias is plain Qwen3", "[model][attnres]") {
  SECTION("kimi full, all queries 0: the second sublayer sees (v_0 + v_1) / 2") {
    const int L = 2;
    const std::int64_t D = 16, T = 3;
    const io::Qwen3Config cfg = form_config({{"attnres_form", "kimi"}, {"attnres_mode", "full"}}, L, D);
    io::ConfigFields fields(cfg);
    TestSource src;
    src.zero_proj = true;
    src.zero_bias = true;  // RandomSource gives each bias a small random value
    const model::AttentionResiduals policy({cfg, src, nullptr, fields, 1}, model::read_attnres_settings(fields));
    const StandIn f(L, D, 3);
    test::Rng rng(test::fresh_seed());
    const std::vector<float> emb = rng.normal_vec(static_cast<std::size_t>(T * D));
    const Driven d = drive(policy, emb, T, D, L, f);
    for (std::int64_t t = 0; t < T; ++t) {
      Eigen::VectorXd v0(D);
      for (std::int64_t i = 0; i < D; ++i) v0[i] = emb[static_cast<std::size_t>(t * D + i)];
      const Eigen::VectorXd v1 = f(0, 0, v0);  // sublayer 0 sees the embedding alone
      for (std::int64_t i = 0; i < D; ++i) {
        CHECK(d.inputs[static_cast<std::size_t>(t * D + i)] == Approx(v0[i]).margin(1e-6));
        CHECK(d.inputs[static_cast<std::size_t>((T + t) * D + i)] == Approx((v0[i] + v1[i]) / 2).margin(1e-5));
      }
    }
  }
  SECTION("open form, recency bias +inf: exactly plain Qwen3 on the same weights") {
    TempDir tmp;
    const fs::path fx = fixture("attnres-block-tiny");
    auto cfg = read_config(fx);
    {
      std::ofstream(tmp.path / "config.json") << cfg.dump(1);
      auto src = io::SafetensorsFile::open(fx / "model.safetensors");
      io::SafetensorsWriter w;
      const float inf = std::numeric_limits<float>::infinity();
      for (const auto& n : src.names()) {
        const auto& t = src.tensor(n);
        if (n.size() > 5 && n.compare(n.size() - 5, 5, "_bias") == 0) w.add_f32(n, {}, &inf);
        else w.add(n, t.dtype, t.shape, t.data, t.nbytes);
      }
      w.write(tmp.path / "model.safetensors");
    }
    const auto m = model::Qwen3Model::load(tmp.path);
    cfg["model_type"] = "qwen3";  // the same weights as plain Qwen3 (the AttnRes parts left over)
    std::ofstream(tmp.path / "config.json") << cfg.dump(1);
    model::LoadOptions lo;
    lo.unused = model::Unused::warn;
    lo.on_warning = [](const std::string&) {};
    const auto plain = model::Qwen3Model::load(tmp.path, lo);
    const std::vector<std::int64_t> ids = load_reference(fx).ids;
    CHECK(test::bit_equal(run(m, ids).logits, run(plain, ids).logits));
    CHECK(test::bit_equal(run(m, ids, {1}).logits, run(plain, ids, {1}).logits));
  }
}

TEST_CASE("attnres: configuration and checkpoint errors name the field or tensor", "[model][attnres][errors]") {
  TempDir tmp;
  const fs::path fx = fixture("attnres-block-tiny");
  auto load_with = [&](const nlohmann::json& cfg, const std::string& drop = "", const std::string& reshape = "") {
    write_checkpoint(fx, tmp.path, cfg, drop, reshape);
    return model::Qwen3Model::load(tmp.path);
  };
  auto cfg = read_config(fx);
  SECTION("a missing routing tensor") {
    REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.1.attn_res_bias"), Contains("model.layers.1.attn_res_bias"));
    REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.3.mlp_res_proj.weight"), Contains("model.layers.3.mlp_res_proj.weight"));
  }
  SECTION("a bias that is not a scalar") {
    REQUIRE_THROWS_WITH(load_with(cfg, "", "model.layers.0.mlp_res_proj.weight"), Contains("model.layers.0.mlp_res_proj.weight"));
    // A [1] bias instead of a 0-dim one.
    write_checkpoint(fx, tmp.path, cfg, "model.layers.2.attn_res_bias", "", "model.layers.2.attn_res_bias");
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("model.layers.2.attn_res_bias") && Contains("[1]"));
  }
  SECTION("bad settings") {
    cfg["attnres_num_blocks"] = 0;
    REQUIRE_THROWS_WITH(load_with(cfg), Contains("attnres_num_blocks") && Contains("must be >= 1, got 0"));
    cfg["attnres_num_blocks"] = 2;
    cfg["attnres_mode"] = "spiral";
    REQUIRE_THROWS_WITH(load_with(cfg), Contains("attnres_mode") && Contains("unknown mode 'spiral'"));
    cfg["attnres_mode"] = "block";
    cfg["attnres_gate_type"] = "cosine";
    REQUIRE_THROWS_WITH(load_with(cfg), Contains("attnres_gate_type") && Contains("unknown gate type 'cosine'"));
    cfg["attnres_gate_type"] = "sigmoid_scalar";  // the checkpoint has no gate logits
    REQUIRE_THROWS_WITH(load_with(cfg), Contains("model.layers.0.attn_res_gate_logit"));
    cfg["attnres_gate_type"] = "bias";
    cfg["attnres_use_null_source"] = true;
    REQUIRE_THROWS_WITH(load_with(cfg), Contains("attnres_use_null_source") && Contains("delta modes"));
    cfg.erase("attnres_use_null_source");
    cfg["attnres_form"] = "kimi";
    cfg["attnres_mode"] = "delta";
    REQUIRE_THROWS_WITH(load_with(cfg), Contains("attnres_mode") && Contains("kimi form"));
  }
  SECTION("a prompt whose sources exceed memory fails up front with the sizes") {
    const io::Qwen3Config c = form_config({{"attnres_mode", "full"}}, 28, 1024);
    io::ConfigFields fields(c);
    TestSource src;
    const model::AttentionResiduals policy({c, src, nullptr, fields, 1}, model::read_attnres_settings(fields));
    const std::vector<float> row(1024, 1.f);
    const std::int64_t T = std::int64_t{1} << 30;  // one row seen 2^30 times (stride 0): 57 sources need 228 TiB
    model::StepContext ctx;
    REQUIRE_THROWS_WITH(policy.begin(ConstView2<float>(row.data(), {T, 1024}, {0, 1}), ctx),
                        Contains("Attention Residuals: 57 sources x 1073741824 tokens x 1024 floats") &&
                            Contains("MiB of memory are available"));
  }
}

TEST_CASE("random attnres models: every form decodes and chunks like its prefill", "[model][attnres]") {
  const std::vector<nlohmann::json> variants = {
      {{"attnres_mode", "block"}, {"attnres_num_blocks", 2}},
      {{"attnres_mode", "full"}},
      {{"attnres_mode", "delta"}, {"attnres_use_null_source", true}},
      {{"attnres_mode", "delta_block"}, {"attnres_gate_type", "sigmoid_vector"}},
      {{"attnres_form", "kimi"}, {"attnres_mode", "block"}, {"attnres_block_sublayers", 3}},
  };
  auto base = read_config(fixture("attnres-block-tiny"));
  for (auto k : {"attnres_num_blocks", "attnres_mode", "attnres_gate_type", "attnres_recency_bias_init"}) base.erase(k);
  const model::Registry reg = model::default_registry();
  test::Rng rng(test::fresh_seed());
  std::vector<std::int64_t> ids(23);
  for (auto& id : ids) id = rng.integer(0, 319);
  for (const auto& v : variants) {
    auto j = base;
    j.update(v);
    CAPTURE(j.dump());
    const auto m = model::Qwen3Model::random(reg.parse_config(j), model::WeightType::f32, 3);
    CHECK(m.recipe() == "qwen3-attnres");
    const Run prefill = run(m, ids);
    CHECK(test::rel_l2(run(m, ids, {1}).logits, prefill.logits) <= 1e-5);
    CHECK(test::rel_l2(run(m, ids, {4, 9}).logits, prefill.logits) <= 1e-5);
    CHECK(test::bit_equal(run(m, ids, {}, {}, 1).logits, run(m, ids, {}, {}, 2).logits));
  }
}

}  // namespace attnkit_test_model_attnres
