// Looped stacks (spec §9): Ouro checkpoints (fixture ouro-tiny: an independent float64
// implementation) through prefill, decode and chunks with per-step logits and exit gates; the exit
// rules; the generic loop of any recipe (loop_count, loop_between, loop_windows) against the
// float64 reference forward (tests/reference/qwen3_ref.hpp); configuration and checkpoint errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "attnkit/model/qwen3.hpp"
#include "model_test_util.hpp"
#include "test_util.hpp"

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

#include "reference/qwen3_ref.hpp"

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
