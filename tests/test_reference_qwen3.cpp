// tests/test_reference_qwen3.cpp — the float64 Qwen3 reference forward with looped steps
// (tests/reference/qwen3_ref.hpp) proved right before anything is tested against it:
//  * plain Qwen3 against transformers' float64 logits and hidden states (qwen3-tiny-f32, -bf16,
//    -swa, -oldconfig);
//  * Ouro (ouro-tiny: 3 steps, sandwich norms, final norm between steps, untied head, exit gate)
//    against its fixture's logits, logits_per_step and exit_gate;
//  * invariants of the options: one step is plain Qwen3 whatever `between` says; window_per_step
//    {0, 0} is two steps with the windows removed, {W, W} the config's windows; a step never
//    depends on later steps nor a token on later tokens; the exit distribution sums to one;
//  * the loader rejects a checkpoint read with the wrong options (a missing or an unread tensor).
// Bound: relative L2 ‖ref − fixture‖ / ‖fixture‖ <= 1e-6 (the fixtures are float64 results
// stored as float32, so about 2.5e-8 is the floor). Measured: ouro-tiny (an independent float64
// implementation) 2.2e-8 .. 2.6e-8 for logits, every step's logits and the exit gate, i.e. the
// storage floor; transformers' Qwen3 1.2e-7 .. 1.6e-7 for logits and 1.0e-7 .. 1.4e-7 for the
// hidden states (about 5x the floor, growing with the position; transformers builds its RoPE
// angles in float32, which accounts for a small part of it).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnkit/io/config.hpp"
#include "attnkit/io/safetensors.hpp"
#include "attnkit/model/tensor_source.hpp"
#include "reference/qwen3_ref.hpp"

using namespace attnkit;
using Catch::Contains;
using ref::MatrixXdR;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-6;
constexpr std::string_view kOuroTypes[] = {"ouro"};

fs::path fixture(const std::string& name) { return fs::path(ATTNKIT_TEST_DATA) / "fixtures" / name; }

// ‖ours − ref‖ / ‖ref‖ over n values; +inf when anything is not finite (NaN never passes).
double rel_l2(const double* ours, const float* ref, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double a = ours[i], b = ref[i];
    if (!std::isfinite(a) || !std::isfinite(b)) return std::numeric_limits<double>::infinity();
    num += (a - b) * (a - b);
    den += b * b;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
// A row-major matrix against n = rows·cols values of ref from `offset` on.
double rel_l2(const MatrixXdR& ours, const std::vector<float>& ref, std::size_t offset = 0) {
  const auto n = static_cast<std::size_t>(ours.size());
  if (offset + n > ref.size()) return std::numeric_limits<double>::infinity();
  return rel_l2(ours.data(), ref.data() + offset, n);
}
double rel_l2(const Eigen::VectorXd& ours, const std::vector<float>& ref, std::size_t offset = 0) {
  const auto n = static_cast<std::size_t>(ours.size());
  if (offset + n > ref.size()) return std::numeric_limits<double>::infinity();
  return rel_l2(ours.data(), ref.data() + offset, n);
}
// ‖a − b‖ / ‖b‖ between two double matrices.
double rel_diff(const MatrixXdR& a, const MatrixXdR& b) { return (a - b).norm() / b.norm(); }

struct Fixture {
  io::Qwen3Config config;
  ref::Qwen3RefWeights weights;
  io::SafetensorsFile reference;
  std::vector<std::int64_t> ids;
};

Fixture load(const std::string& name, const ref::RefOptions& opt = {},
             std::span<const std::string_view> types = io::kQwen3ModelTypes) {
  const fs::path dir = fixture(name);
  io::Qwen3Config c = io::Qwen3Config::load(dir, types);
  const model::CheckpointSource src(dir);
  ref::Qwen3RefWeights w = ref::load_qwen3_ref(src, c, opt);
  auto f = io::SafetensorsFile::open(dir / "reference.safetensors");
  std::vector<std::int64_t> ids = io::to_i64(f.tensor("input_ids"));
  return {std::move(c), std::move(w), std::move(f), std::move(ids)};
}

ref::RefOptions steps_opt(int steps, ref::BetweenSteps between, std::vector<std::int64_t> windows = {}) {
  ref::RefOptions o;
  o.steps = steps;
  o.between = between;
  o.window_per_step = std::move(windows);
  return o;
}

}  // namespace

TEST_CASE("qwen3 reference: plain Qwen3 logits and hidden states match transformers (float64)", "[reference][qwen3]") {
  const std::string name = GENERATE("qwen3-tiny-f32", "qwen3-tiny-bf16", "qwen3-tiny-swa", "qwen3-tiny-oldconfig");
  CAPTURE(name);
  const Fixture fx = load(name);
  const std::int64_t T = static_cast<std::int64_t>(fx.ids.size()), V = fx.config.vocab_size,
                     D = fx.config.hidden_size, L = fx.config.num_hidden_layers;
  const ref::RefOutput r = ref::qwen3_ref_forward(fx.weights, fx.ids);
  REQUIRE(r.logits.rows() == T);
  REQUIRE(r.logits.cols() == V);
  REQUIRE(r.logits_per_step.size() == 1);
  CHECK(r.exit_gate.empty());

  const double logits_err = rel_l2(r.logits, io::to_f32(fx.reference.tensor("logits")));
  CHECK(logits_err <= kTol);

  // hidden_states [L + 1, T, D]: the embeddings, each layer's output, the last after the final norm.
  const std::vector<float> hs = io::to_f32(fx.reference.tensor("hidden_states"));
  REQUIRE(hs.size() == static_cast<std::size_t>((L + 1) * T * D));
  REQUIRE(r.layer_hidden.size() == 1);
  REQUIRE(r.layer_hidden[0].size() == static_cast<std::size_t>(L + 1));
  for (std::int64_t l = 0; l < L; ++l) {
    CAPTURE(l);
    const double err = rel_l2(r.layer_hidden[0][static_cast<std::size_t>(l)], hs, static_cast<std::size_t>(l * T * D));
    CHECK(err <= kTol);
  }
  const double final_err = rel_l2(r.hidden_per_step[0], hs, static_cast<std::size_t>(L * T * D));
  CHECK(final_err <= kTol);
}

TEST_CASE("qwen3 reference: ouro-tiny logits, logits per step and exit gate match the fixture", "[reference][ouro]") {
  const io::Qwen3Config c = io::Qwen3Config::load(fixture("ouro-tiny"), kOuroTypes);
  REQUIRE(c.raw.contains("total_ut_steps"));
  const int steps = c.raw.at("total_ut_steps").get<int>();
  REQUIRE(steps == 3);
  CHECK_FALSE(c.tie_word_embeddings);
  const Fixture fx = load("ouro-tiny", ref::RefOptions::ouro(steps), kOuroTypes);
  const std::int64_t T = static_cast<std::int64_t>(fx.ids.size()), V = c.vocab_size;
  CHECK((fx.weights.lm_head - fx.weights.embed).norm() > 0);  // untied head really loaded
  REQUIRE(fx.weights.has_exit_gate());

  const ref::RefOutput r = ref::qwen3_ref_forward(fx.weights, fx.ids, ref::RefOptions::ouro(steps));
  REQUIRE(r.logits_per_step.size() == static_cast<std::size_t>(steps));
  REQUIRE(r.exit_gate.size() == static_cast<std::size_t>(steps));

  const double logits_err = rel_l2(r.logits, io::to_f32(fx.reference.tensor("logits")));
  CHECK(logits_err <= kTol);
  const std::vector<float> per_step = io::to_f32(fx.reference.tensor("logits_per_step"));
  const std::vector<float> gate = io::to_f32(fx.reference.tensor("exit_gate"));
  REQUIRE(per_step.size() == static_cast<std::size_t>(steps * T * V));
  REQUIRE(gate.size() == static_cast<std::size_t>(steps * T));
  for (int s = 0; s < steps; ++s) {
    CAPTURE(s);
    const double step_err = rel_l2(r.logits_per_step[static_cast<std::size_t>(s)], per_step,
                                   static_cast<std::size_t>(s * T * V));
    CHECK(step_err <= kTol);
    const double gate_err = rel_l2(r.exit_gate[static_cast<std::size_t>(s)], gate, static_cast<std::size_t>(s * T));
    CHECK(gate_err <= kTol);
    // The steps really differ (a looped stack that did nothing would pass the last-step check).
    if (s > 0) CHECK(rel_diff(r.logits_per_step[static_cast<std::size_t>(s)], r.logits_per_step[0]) > 1e-2);
  }
  // Ouro: the next step's input is the normalised state, and the head reads it.
  for (int s = 0; s + 1 < steps; ++s)
    CHECK(r.layer_hidden[static_cast<std::size_t>(s + 1)][0] == r.hidden_per_step[static_cast<std::size_t>(s)]);

  // Exit distribution (spec §9.1) for 3 steps, by hand, and Σ p = 1.
  const auto p = ref::exit_distribution(r.exit_gate);
  REQUIRE(p.size() == 3);
  const Eigen::VectorXd &l0 = r.exit_gate[0], &l1 = r.exit_gate[1];
  const Eigen::VectorXd one = Eigen::VectorXd::Ones(T);
  CHECK((p[0] - l0).norm() <= 1e-15);
  CHECK((p[1] - l1.cwiseProduct(one - l0)).norm() <= 1e-15);
  CHECK((p[2] - (one - l0).cwiseProduct(one - l1)).norm() <= 1e-15);
  CHECK((p[0] + p[1] + p[2] - one).norm() <= 1e-14);
  const MatrixXdR e = ref::expected_logits(r);
  for (std::int64_t t = 0; t < T; ++t) {
    const Eigen::RowVectorXd want = p[0][t] * r.logits_per_step[0].row(t) + p[1][t] * r.logits_per_step[1].row(t) +
                                    p[2][t] * r.logits_per_step[2].row(t);
    CHECK((e.row(t) - want).norm() <= 1e-12 * want.norm());
  }
}

TEST_CASE("qwen3 reference: a step never depends on later steps, a token never on later tokens", "[reference][ouro]") {
  const Fixture fx = load("ouro-tiny", ref::RefOptions::ouro(3), kOuroTypes);
  const std::vector<float> per_step = io::to_f32(fx.reference.tensor("logits_per_step"));
  const ref::RefOutput three = ref::qwen3_ref_forward(fx.weights, fx.ids, ref::RefOptions::ouro(3));
  for (int steps : {1, 2}) {
    CAPTURE(steps);
    const ref::RefOutput r = ref::qwen3_ref_forward(fx.weights, fx.ids, ref::RefOptions::ouro(steps));
    CHECK(r.logits == three.logits_per_step[static_cast<std::size_t>(steps - 1)]);
    CHECK(rel_l2(r.logits, per_step, static_cast<std::size_t>((steps - 1) * r.logits.size())) <= kTol);
  }
  // A prefix of the tokens gives the same rows in every step (no future token leaks across steps).
  const std::int64_t n = static_cast<std::int64_t>(fx.ids.size()) / 2;
  const std::vector<std::int64_t> prefix(fx.ids.begin(), fx.ids.begin() + n);
  const ref::RefOutput short_run = ref::qwen3_ref_forward(fx.weights, prefix, ref::RefOptions::ouro(3));
  for (std::size_t s = 0; s < 3; ++s) {
    CAPTURE(s);
    CHECK(rel_diff(short_run.logits_per_step[s], three.logits_per_step[s].topRows(n)) <= 1e-13);
    CHECK((short_run.exit_gate[s] - three.exit_gate[s].head(n)).norm() <= 1e-13);
  }
}

TEST_CASE("qwen3 reference: one step is plain Qwen3 whatever `between` says; between = none passes the raw state",
          "[reference][qwen3]") {
  const Fixture fx = load("qwen3-tiny-swa");
  const ref::RefOutput plain = ref::qwen3_ref_forward(fx.weights, fx.ids);
  const ref::RefOutput none1 = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(1, ref::BetweenSteps::none));
  const ref::RefOutput norm1 = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(1, ref::BetweenSteps::final_norm));
  CHECK(none1.logits == plain.logits);
  CHECK(norm1.logits == plain.logits);
  CHECK(rel_l2(none1.logits, io::to_f32(fx.reference.tensor("logits"))) <= kTol);

  // Two steps: with `none` the next step starts from the raw stack output, with `final_norm`
  // from its norm; step 0 is the same either way, step 1 is not.
  const std::size_t L = fx.weights.layers.size();
  const ref::RefOutput none2 = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, ref::BetweenSteps::none));
  const ref::RefOutput norm2 = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, ref::BetweenSteps::final_norm));
  CHECK(none2.layer_hidden[1][0] == none2.layer_hidden[0][L]);
  CHECK(norm2.layer_hidden[1][0] == norm2.hidden_per_step[0]);
  CHECK(none2.logits_per_step[0] == plain.logits);
  CHECK(norm2.logits_per_step[0] == plain.logits);
  CHECK(rel_diff(none2.logits, norm2.logits) > 1e-3);
  CHECK(rel_diff(none2.logits, plain.logits) > 1e-3);
}

TEST_CASE("qwen3 reference: window_per_step {0, 0} is two steps without windows, {W, W} the config's windows",
          "[reference][qwen3]") {
  const Fixture fx = load("qwen3-tiny-swa");
  const std::int64_t W = *fx.config.sliding_window, T = static_cast<std::int64_t>(fx.ids.size());
  REQUIRE(T > 2 * W);  // the window really cuts keys off
  REQUIRE(fx.config.num_sliding_layers() > 0);
  for (auto between : {ref::BetweenSteps::none, ref::BetweenSteps::final_norm}) {
    CAPTURE(between == ref::BetweenSteps::none ? "none" : "final_norm");
    ref::Qwen3RefWeights no_windows = fx.weights;
    for (auto& l : no_windows.layers) l.window = 0;
    const ref::RefOutput full = ref::qwen3_ref_forward(no_windows, fx.ids, steps_opt(2, between));
    const ref::RefOutput windowed = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, between));

    const ref::RefOutput zero = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, between, {0, 0}));
    CHECK(zero.logits_per_step[0] == full.logits_per_step[0]);
    CHECK(zero.logits_per_step[1] == full.logits_per_step[1]);
    CHECK(rel_diff(zero.logits, windowed.logits) > 1e-3);  // the windows matter here

    const ref::RefOutput ww = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, between, {W, W}));
    CHECK(ww.logits_per_step[0] == windowed.logits_per_step[0]);
    CHECK(ww.logits_per_step[1] == windowed.logits_per_step[1]);

    // A window covering every token is full attention.
    const ref::RefOutput wide = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, between, {T, T + 5}));
    CHECK(wide.logits == full.logits);

    // Fine → coarse: step 0 windowed as the config says, step 1 full. Step 0 is untouched by
    // step 1's window; step 1 differs from both uniform runs.
    const ref::RefOutput mixed = ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, between, {W, 0}));
    CHECK(mixed.logits_per_step[0] == windowed.logits_per_step[0]);
    CHECK(rel_diff(mixed.logits, windowed.logits) > 1e-4);
    CHECK(rel_diff(mixed.logits, full.logits) > 1e-4);
  }
  // Full-attention layers ignore window_per_step: without sliding layers it changes nothing.
  const Fixture f32 = load("qwen3-tiny-f32");
  CHECK(ref::qwen3_ref_forward(f32.weights, f32.ids, steps_opt(2, ref::BetweenSteps::none, {3, 5})).logits ==
        ref::qwen3_ref_forward(f32.weights, f32.ids, steps_opt(2, ref::BetweenSteps::none)).logits);
}

TEST_CASE("qwen3 reference: the loader rejects options that do not fit the checkpoint; bad forward options",
          "[reference][qwen3]") {
  const io::Qwen3Config ouro = io::Qwen3Config::load(fixture("ouro-tiny"), kOuroTypes);
  {
    const model::CheckpointSource src(fixture("ouro-tiny"));
    ref::RefOptions o = ref::RefOptions::ouro(3);
    o.qk_norm = true;  // Ouro has no q/k norm
    REQUIRE_THROWS_WITH(ref::load_qwen3_ref(src, ouro, o), Contains("q_norm.weight"));
  }
  {
    const model::CheckpointSource src(fixture("ouro-tiny"));
    ref::RefOptions o = ref::RefOptions::ouro(3);
    o.sandwich_norm = false;  // the _2 norms would be dropped in silence
    REQUIRE_THROWS_WITH(ref::load_qwen3_ref(src, ouro, o), Contains("input_layernorm_2.weight"));
    o.early_exit_gate = false;
    o.allow_unconsumed = true;
    const model::CheckpointSource src2(fixture("ouro-tiny"));
    CHECK_NOTHROW(ref::load_qwen3_ref(src2, ouro, o));
  }
  const Fixture fx = load("qwen3-tiny-f32");
  CHECK_THROWS_WITH(ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(0, ref::BetweenSteps::none)),
                    Contains("steps must be >= 1"));
  CHECK_THROWS_WITH(ref::qwen3_ref_forward(fx.weights, fx.ids, steps_opt(2, ref::BetweenSteps::none, {0})),
                    Contains("window_per_step has 1 entries for 2 steps"));
  CHECK_THROWS_WITH(ref::qwen3_ref_forward(fx.weights, {1, 99999}), Contains("outside the vocabulary"));
}

TEST_CASE("qwen3 reference: random weights of every optional part load and run", "[reference][qwen3]") {
  // A RandomSource hands out any name, so every option's tensors come back with the right shapes.
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 64},         {"hidden_size", 32},
                      {"intermediate_size", 48}, {"num_hidden_layers", 2},  {"num_attention_heads", 4},
                      {"num_key_value_heads", 1}, {"head_dim", 8},          {"tie_word_embeddings", true},
                      {"use_sliding_window", true}, {"sliding_window", 4},
                      {"layer_types", nlohmann::json::array({"sliding_attention", "full_attention"})}};
  const io::Qwen3Config c = io::Qwen3Config::from_json(j, "random config");
  const model::RandomSource src(model::WeightType::bf16, 7, 0.2f);
  ref::RefOptions o = ref::RefOptions::ouro(4);
  o.qk_norm = true;
  o.window_per_step = {2, 4, 8, 0};
  const ref::Qwen3RefWeights w = ref::load_qwen3_ref(src, c, o);
  CHECK(w.lm_head == w.embed);
  CHECK(w.layers[0].window == 4);
  CHECK(w.layers[1].window == 0);
  CHECK(w.layers[0].input_layernorm_2.size() == 32);
  CHECK(w.layers[0].q_norm.size() == 8);
  const ref::RefOutput r = ref::qwen3_ref_forward(w, {1, 5, 9, 2, 63, 0, 7, 7, 3, 11}, o);
  REQUIRE(r.exit_gate.size() == 4);
  CHECK(r.logits.allFinite());
  Eigen::VectorXd sum = Eigen::VectorXd::Zero(10);
  for (const auto& p : ref::exit_distribution(r.exit_gate)) {
    CHECK(p.minCoeff() >= 0);
    sum += p;
  }
  CHECK((sum - Eigen::VectorXd::Ones(10)).norm() <= 1e-14);
}
