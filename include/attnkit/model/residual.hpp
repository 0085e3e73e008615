// attnkit/model/residual.hpp — the residual-policy seam of a decoder stack.
//
// A residual policy decides what each sublayer (token mixer, MLP) sees as input and what
// becomes of its output. The plain transformer sums outputs into one stream; Attention
// Residuals instead route over earlier layer outputs with a softmax. The stack asks a
// per-forward ResidualStream for each sublayer's input, hands it each sublayer's output, and
// takes the stream's final output to the final norm. Policies that need weights read them from
// the TensorSource at build time. A stream lives for one pass over the layers of one forward
// step; the step's context (threads, precision, trace, positions) is handed to begin().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/view.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/ops.hpp"

namespace attnkit::model {

enum class Sublayer { mixer, mlp };

class ResidualStream {
 public:
  virtual ~ResidualStream() = default;
  // Input of sublayer `s` of layer `layer`, before its pre-norm: [T, D], valid until the next call.
  virtual ConstView2<float> input(int layer, Sublayer s) = 0;
  // Output of sublayer `s` of layer `layer`: [T, D].
  virtual void add_output(int layer, Sublayer s, ConstView2<float> out) = 0;
  // The hidden state after the layers run so far (what the final norm sees at the end).
  virtual ConstView2<float> output() = 0;
};

class ResidualPolicy {
 public:
  virtual ~ResidualPolicy() = default;
  virtual std::string kind() const = 0;
  // One line on the policy and its settings, for summaries (default: kind()).
  virtual std::string describe() const { return kind(); }
  // A stream over the pass input [T, D] (the embeddings, for the first pass); `ctx` outlives it.
  virtual std::unique_ptr<ResidualStream> begin(ConstView2<float> input, const StepContext& ctx) const = 0;
};

// x_{l+1} = x_l + f(x_l): one stream, every sublayer output added to it.
class SumResidual final : public ResidualPolicy {
 public:
  std::string kind() const override { return "sum"; }
  std::unique_ptr<ResidualStream> begin(ConstView2<float> input, const StepContext& ctx) const override {
    return std::make_unique<Stream>(input, ctx.num_threads);
  }

 private:
  class Stream final : public ResidualStream {
   public:
    Stream(ConstView2<float> e, int threads)
        : rows_(e.shape[0]), cols_(e.shape[1]), threads_(threads), x_(static_cast<std::size_t>(rows_ * cols_)) {
      for (std::int64_t r = 0; r < rows_; ++r) std::copy(e.ptr(r), e.ptr(r) + cols_, x_.data() + r * cols_);
    }
    ConstView2<float> input(int, Sublayer) override { return view(); }
    void add_output(int, Sublayer, ConstView2<float> out) override { ops::add_inplace(view(), out, threads_); }
    ConstView2<float> output() override { return view(); }

   private:
    View2<float> view() { return View2<float>(x_.data(), {rows_, cols_}); }
    std::int64_t rows_, cols_;
    int threads_;
    std::vector<float> x_;
  };
};

// Which output a looped stack's forward returns (Ouro, spec §9.1). Every pass always runs (the
// deeper passes' caches must be filled); the rule only selects. With an exit gate, λ_τ is the
// probability of exiting after pass τ and p_τ = λ_τ Π_{j<τ}(1 − λ_j) (the last pass takes the
// rest), so Σ_τ p_τ = 1.
struct ExitRule {
  enum class Kind { last, step, threshold, expected };
  Kind kind = Kind::last;
  int step = 0;            // Kind::step: this pass's output (0-based)
  double threshold = 1.0;  // Kind::threshold: per token, the first pass whose cumulative p reaches it
  static ExitRule last() { return {}; }
  static ExitRule at_step(int s) { return {Kind::step, s, 1.0}; }
  static ExitRule at_threshold(double q) { return {Kind::threshold, 0, q}; }
  static ExitRule expected() { return {Kind::expected, 0, 1.0}; }
};

// The stack-policy seam: how many times the layer stack runs per step and what happens to the
// hidden state between runs. Looped stacks (LT2 / Ouro-style, Loop Attention's second pass)
// are a StackPolicy plus, where a layer must remember an earlier pass, a mixer that reads
// StepContext::pass; each pass starts a fresh residual stream from the previous pass's output.
// Every pass can be read out like the last one (the final norm of its output, then the head).
class StackPolicy {
 public:
  virtual ~StackPolicy() = default;
  virtual std::string kind() const = 0;
  virtual std::string describe() const { return kind(); }
  virtual int passes() const = 0;
  // Called after every pass but the last with that pass's output [T, D]; may transform it in
  // place into the next pass's input (Ouro normalises it, for instance).
  virtual void between_passes(int /*pass*/, View2<float> /*x*/) const {}
  // The sliding window of sliding layers in each pass (LT2's loop-level hybrid: 128, 256, 512,
  // then 0 = full attention); empty: the config's window in every pass.
  virtual std::vector<std::int64_t> pass_windows() const { return {}; }
  // An exit gate over a pass's read-out state h [T, D]: λ per token into lambda [T].
  virtual bool has_exit_gate() const { return false; }
  virtual void exit_gate(ConstView2<float> /*h*/, float* /*lambda*/) const {}
  // The output rule when the caller sets none (ForwardOptions::exit).
  virtual ExitRule default_exit() const { return ExitRule::last(); }
};

// The plain transformer: one pass.
class SinglePass final : public StackPolicy {
 public:
  std::string kind() const override { return "single"; }
  int passes() const override { return 1; }
};

// The same layers run `n` times per step, each pass from the previous pass's output as it is
// (Loop Attention's stack mode: no norm between passes).
class RepeatStack final : public StackPolicy {
 public:
  explicit RepeatStack(int n) : n_(n) { ATTNKIT_REQUIRE(n >= 1, "RepeatStack: argument 'n': must be >= 1, got ", n); }
  std::string kind() const override { return "repeat"; }
  int passes() const override { return n_; }

 private:
  int n_;
};

}  // namespace attnkit::model
