// attnkit/model/stacks/looped.hpp — looped stacks (spec §9): the same layers, with shared
// weights, run `steps` times per token. Every (step, layer) has its own KV cache or recurrent
// state at the same positions (mixers keep one state per pass): handing step τ's final state to
// step τ+1 would leak future tokens in a parallel prefill.
//
// What passes between steps (LoopedSettings::between): nothing (the next step starts from the
// previous step's output as it is), or the final norm (Ouro: h_τ = RMSNorm_final(x_τ) is both the
// step's read-out and the next step's input). Sliding layers may use another window in every step
// (LoopedSettings::windows; LT2's loop-level hybrid 128, 256, 512, then 0 = full attention).
// An optional exit gate (Ouro's model.early_exit_gate, Linear D -> 1 with bias) gives
// λ_τ = σ(w · h_τ + b) per token and step; ExitRule (residual.hpp) picks the output from it.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "attnkit/core/simd.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/residual.hpp"

namespace attnkit::model {

struct LoopedSettings {
  enum class Between { none, norm };
  int steps = 1;
  Between between = Between::none;
  std::vector<std::int64_t> windows;  // per step, for sliding layers (0: full); empty: the config's
  bool exit_gate = false;             // model.early_exit_gate.{weight [1, D], bias [1]}
  double exit_threshold = 1.0;        // default rule: the first step whose cumulative p reaches it (1: the last)
};

// Reads (and consumes) the generic loop fields any recipe's config may carry:
//   loop_count (>= 1), loop_between "none" | "norm" (default "none"), loop_windows [w_1, ..., w_N]
//   (one per loop; 0 = full attention in that loop). default_count: loop_count when absent (LT2: 4).
inline LoopedSettings read_looped_settings(io::ConfigFields& f, std::int64_t default_count = 1) {
  LoopedSettings s;
  const std::int64_t n = f.integer("loop_count", default_count);
  if (n < 1 || n > 64) f.fail("loop_count", "must be in [1, 64], got ", n);
  s.steps = static_cast<int>(n);
  const std::string b = f.string("loop_between", "none");
  if (b == "none") s.between = LoopedSettings::Between::none;
  else if (b == "norm") s.between = LoopedSettings::Between::norm;
  else f.fail("loop_between", "unknown value '", b, "' (expected \"none\" or \"norm\")");
  const nlohmann::json& w = f.json("loop_windows");
  if (!w.is_null()) {
    if (!w.is_array() || static_cast<std::int64_t>(w.size()) != n)
      f.fail("loop_windows", "must be a list of ", n, " windows (one per loop; 0 = full attention)");
    for (auto& x : w) {
      if (!x.is_number_integer() || x.get<std::int64_t>() < 0)
        f.fail("loop_windows", "entries must be integers >= 0 (0 = full attention), got ", x.dump());
      s.windows.push_back(x.get<std::int64_t>());
    }
  }
  return s;
}

class LoopedStack final : public StackPolicy {
 public:
  LoopedStack(const BuildContext& ctx, const LoopedSettings& s) : s_(s), eps_(static_cast<float>(ctx.config.rms_norm_eps)) {
    ATTNKIT_REQUIRE(s.steps >= 1, "LoopedStack: steps must be >= 1, got ", s.steps);
    ATTNKIT_REQUIRE(s.windows.empty() || static_cast<int>(s.windows.size()) == s.steps, "LoopedStack: ", s.windows.size(),
                    " windows for ", s.steps, " steps");
    ATTNKIT_REQUIRE(s.exit_threshold > 0.0 && s.exit_threshold <= 1.0, "LoopedStack: exit threshold must be in (0, 1], got ",
                    s.exit_threshold);
    const std::int64_t D = ctx.config.hidden_size;
    if (s.between == LoopedSettings::Between::norm) norm_ = ctx.norm_weight("model.norm.weight", D);
    if (s.exit_gate) {
      gate_w_ = ctx.source.get("model.early_exit_gate.weight", {1, D}).to_f32();
      gate_b_ = ctx.source.get("model.early_exit_gate.bias", {1}).to_f32().at(0);
    }
  }

  std::string kind() const override { return "looped"; }
  std::string describe() const override {
    std::string d = "looped stack, " + std::to_string(s_.steps) + " steps";
    if (s_.between == LoopedSettings::Between::norm) d += ", final norm between steps";
    if (!s_.windows.empty()) {
      d += ", windows";
      for (auto w : s_.windows) {  // (appended piecewise: GCC 12 warns falsely on " " + string)
        d += ' ';
        d += w ? std::to_string(w) : std::string("full");
      }
    }
    if (s_.exit_gate) d += ", exit gate";
    return d;
  }
  const LoopedSettings& settings() const { return s_; }
  int passes() const override { return s_.steps; }
  void between_passes(int, View2<float> x) const override {
    if (!norm_.empty()) ops::rms_norm(x, norm_.data(), eps_, x);
  }
  std::vector<std::int64_t> pass_windows() const override { return s_.windows; }
  bool has_exit_gate() const override { return s_.exit_gate; }
  void exit_gate(ConstView2<float> h, float* lambda) const override {
    const std::int64_t D = h.shape[1];
    for (std::int64_t t = 0; t < h.shape[0]; ++t) {
      const double z = static_cast<double>(simd::dot(gate_w_.data(), h.ptr(t), D)) + gate_b_;
      lambda[t] = static_cast<float>(1.0 / (1.0 + std::exp(-z)));
    }
  }
  ExitRule default_exit() const override {
    return s_.exit_gate && s_.exit_threshold < 1.0 ? ExitRule::at_threshold(s_.exit_threshold) : ExitRule::last();
  }

 private:
  LoopedSettings s_;
  float eps_;
  std::vector<float> norm_, gate_w_;
  float gate_b_ = 0.f;
};

}  // namespace attnkit::model
