// tests/reference/qwen3_ref.hpp — float64 reference forward of a Qwen3-family decoder (spec §1),
// with looped stacks (Ouro / LT2, spec §9), written for reading rather than speed, llama2.c style:
// every step of the math is spelled out, the whole sequence at once, no caches.
//
// Weights are read by their Hugging Face names and held as double (bf16 checkpoints give their
// bf16 values exactly). Linear weights keep the checkpoint layout [out, in]: y = x Wᵀ. Rows of a
// [T, D] matrix are tokens at positions 0..T-1.
//
//   RMSNorm_w(x)  = w ⊙ x / sqrt(mean_i(x_i²) + eps)               (over the last axis)
//   RoPE at p     : for i < d/2, a = p · θ^(-2i/d);                    (rotate_half, not interleaved)
//                   x'_i = x_i cos a − x_{i+d/2} sin a,  x'_{i+d/2} = x_{i+d/2} cos a + x_i sin a
//   Attn(x)       : q = x W_qᵀ, k = x W_kᵀ, v = x W_vᵀ split into heads of d = head_dim;
//                   q, k ← RMSNorm_{q_norm / k_norm} per head (only when loaded), then RoPE at t;
//                   query head h reads kv head h / (H / H_kv);
//                   o_{t,h} = Σ_s softmax_s(q_{t,h}·k_{s,kv(h)} / sqrt(d)) v_{s,kv(h)} over keys
//                   s ∈ [lo(t), t], lo = 0 (full) or max(0, t − W + 1) (sliding, window W);
//                   Attn = concat_h(o) W_oᵀ
//   MLP(x)        = (SiLU(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ,  SiLU(z) = z σ(z)
//   layer(x)      : x ← x + N2_in(Attn(RMSNorm_in(x)));  x ← x + N2_post(MLP(RMSNorm_post(x)))
//                   N2 = RMSNorm_{input_layernorm_2 / post_attention_layernorm_2} (sandwich
//                   norms, Ouro) or the identity when not loaded.
//   model         : x_0 = embed[ids]; for step τ = 0..steps-1:
//                       x ← layer_{L-1}(… layer_0(x))      (same weights every step, positions
//                                                           0..T-1 every step, keys and values of
//                                                           step τ only: one cache per (τ, layer))
//                       h_τ = RMSNorm_final(x)
//                       between = final_norm:  x ← h_τ      (Ouro: the normalised state goes on)
//                       between = none:        x unchanged  (plain Qwen3 when steps = 1)
//                   logits_τ = h_τ lm_headᵀ;  logits = logits_{steps-1}
//                   λ_τ = σ(w_exit · h_τ + b_exit)         (when the early-exit gate is loaded)
//   window        : a sliding layer uses config.sliding_window, or window_per_step[τ] when given
//                   (0 = full attention in that step; LT2's loop-level "fine → coarse" hybrid).
//                   Full-attention layers are full in every step.
//   exit distribution (spec §9.1): p_τ = λ_τ Π_{j<τ}(1 − λ_j) for τ < steps−1,
//                   p_{steps−1} = Π_{j<steps−1}(1 − λ_j)   (Σ_τ p_τ = 1).
// Checked against transformers' float64 Qwen3 fixtures and ouro-tiny in
// tests/test_reference_qwen3.cpp (relative L2 of the logits <= 1e-6).
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/io/config.hpp"
#include "attnkit/model/tensor_source.hpp"

namespace attnkit::ref {

using MatrixXdR = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// What the stack does between two steps (spec §9.1).
enum class BetweenSteps {
  none,        // the stack output goes on unchanged; the final norm only feeds the head
  final_norm,  // Ouro: x ← RMSNorm_final(x) after every step, and that is the next step's input
};

// Which optional tensors to load, and how to run the stack.
struct RefOptions {
  // Loading.
  bool qk_norm = true;           // self_attn.{q,k}_norm.weight (Qwen3: yes; Ouro: no)
  bool sandwich_norm = false;    // {input,post_attention}_layernorm_2.weight (Ouro)
  bool early_exit_gate = false;  // model.early_exit_gate.{weight [1, D], bias [1]} (Ouro)
  bool allow_unconsumed = false;  // else a checkpoint tensor nothing read is an error
  // Forward.
  int steps = 1;                                // runs of the whole stack (Ouro: total_ut_steps)
  BetweenSteps between = BetweenSteps::none;
  std::vector<std::int64_t> window_per_step;    // empty, or one window per step for sliding layers (0 = full)

  // Ouro as in the fixture README: no q/k norm, sandwich norms, exit gate, final norm between steps.
  static RefOptions ouro(int steps) {
    RefOptions o;
    o.qk_norm = false;
    o.sandwich_norm = true;
    o.early_exit_gate = true;
    o.steps = steps;
    o.between = BetweenSteps::final_norm;
    return o;
  }
};

struct Qwen3RefLayer {
  MatrixXdR q_proj, k_proj, v_proj;  // [H·d, D], [H_kv·d, D], [H_kv·d, D]
  MatrixXdR o_proj;                  // [D, H·d]
  Eigen::VectorXd q_norm, k_norm;    // [d], or empty: no q/k norm
  Eigen::VectorXd input_layernorm, post_attention_layernorm;      // [D]
  Eigen::VectorXd input_layernorm_2, post_attention_layernorm_2;  // [D], or empty: no sandwich norm
  MatrixXdR gate_proj, up_proj;      // [I, D]
  MatrixXdR down_proj;               // [D, I]
  std::int64_t window = 0;           // sliding window of this layer (config), 0 = full attention
};

struct Qwen3RefWeights {
  std::int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  double eps = 1e-6, rope_theta = 10000.0;
  MatrixXdR embed;    // [V, D]
  MatrixXdR lm_head;  // [V, D] (a copy of embed when tied)
  Eigen::VectorXd norm;  // [D] model.norm
  std::vector<Qwen3RefLayer> layers;
  Eigen::VectorXd exit_gate_w;  // [D], or empty: no early-exit gate
  double exit_gate_b = 0;
  bool has_exit_gate() const { return exit_gate_w.size() > 0; }
};

struct RefOutput {
  MatrixXdR logits;                                // [T, V] of the last step
  std::vector<MatrixXdR> logits_per_step;          // [steps] of [T, V]: lm_head(h_τ)
  std::vector<Eigen::VectorXd> exit_gate;          // [steps] of [T]: λ_τ (empty without a gate)
  std::vector<MatrixXdR> hidden_per_step;          // [steps] of [T, D]: h_τ = RMSNorm_final(stack output)
  std::vector<std::vector<MatrixXdR>> layer_hidden;  // [steps][L + 1] of [T, D]: the step's input,
                                                     // then each layer's output (before h_τ's norm)
};

// ---------------------------------------------------------------------------------------------
// Loading.

// Helpers and the pieces of the forward live in ref::qwen3 (short names, no clashes with the
// other reference headers).
namespace qwen3 {

inline MatrixXdR matrix(const model::TensorSource& src, const std::string& name, std::int64_t rows,
                        std::int64_t cols) {
  const std::vector<float> f = src.get(name, {rows, cols}).to_f32();
  MatrixXdR m(rows, cols);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) m(r, c) = f[static_cast<std::size_t>(r * cols + c)];
  return m;
}

inline Eigen::VectorXd vector(const model::TensorSource& src, const std::string& name, std::int64_t n) {
  const std::vector<float> f = src.get(name, {n}).to_f32();
  Eigen::VectorXd v(n);
  for (std::int64_t i = 0; i < n; ++i) v[i] = f[static_cast<std::size_t>(i)];
  return v;
}

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

}  // namespace qwen3

inline Qwen3RefWeights load_qwen3_ref(const model::TensorSource& src, const io::Qwen3Config& c,
                                      const RefOptions& opt = {}) {
  using qwen3::matrix, qwen3::vector;
  const std::int64_t D = c.hidden_size, H = c.num_attention_heads, Hkv = c.num_key_value_heads, d = c.head_dim,
                     I = c.intermediate_size, V = c.vocab_size;
  Qwen3RefWeights w;
  w.hidden = D;
  w.heads = H;
  w.kv_heads = Hkv;
  w.head_dim = d;
  w.vocab = V;
  w.eps = c.rms_norm_eps;
  w.rope_theta = c.rope_theta;

  w.embed = matrix(src, "model.embed_tokens.weight", V, D);
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    Qwen3RefLayer l;
    l.q_proj = matrix(src, p + "self_attn.q_proj.weight", H * d, D);
    l.k_proj = matrix(src, p + "self_attn.k_proj.weight", Hkv * d, D);
    l.v_proj = matrix(src, p + "self_attn.v_proj.weight", Hkv * d, D);
    l.o_proj = matrix(src, p + "self_attn.o_proj.weight", D, H * d);
    if (opt.qk_norm) {
      l.q_norm = vector(src, p + "self_attn.q_norm.weight", d);
      l.k_norm = vector(src, p + "self_attn.k_norm.weight", d);
    }
    l.input_layernorm = vector(src, p + "input_layernorm.weight", D);
    l.post_attention_layernorm = vector(src, p + "post_attention_layernorm.weight", D);
    if (opt.sandwich_norm) {
      l.input_layernorm_2 = vector(src, p + "input_layernorm_2.weight", D);
      l.post_attention_layernorm_2 = vector(src, p + "post_attention_layernorm_2.weight", D);
    }
    l.gate_proj = matrix(src, p + "mlp.gate_proj.weight", I, D);
    l.up_proj = matrix(src, p + "mlp.up_proj.weight", I, D);
    l.down_proj = matrix(src, p + "mlp.down_proj.weight", D, I);
    if (c.layer_types[static_cast<std::size_t>(i)] == io::LayerType::sliding_attention) l.window = *c.sliding_window;
    else
      ATTNKIT_REQUIRE(c.layer_types[static_cast<std::size_t>(i)] == io::LayerType::full_attention,
                      "load_qwen3_ref: layer ", i, " has type '", c.layer_types[static_cast<std::size_t>(i)].name,
                      "' (the reference knows full_attention and sliding_attention)");
    w.layers.push_back(std::move(l));
  }
  w.norm = vector(src, "model.norm.weight", D);
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
    src.ignore("lm_head.weight");  // as transformers does with a tied checkpoint that stores it
  } else {
    w.lm_head = matrix(src, "lm_head.weight", V, D);
  }
  if (opt.early_exit_gate) {
    w.exit_gate_w = matrix(src, "model.early_exit_gate.weight", 1, D).row(0).transpose();
    w.exit_gate_b = vector(src, "model.early_exit_gate.bias", 1)[0];
  }
  if (!opt.allow_unconsumed) {
    std::string left;
    for (const auto& n : src.unconsumed()) left += (left.empty() ? "" : ", ") + n;
    ATTNKIT_REQUIRE(left.empty(), "load_qwen3_ref: ", src.describe(), ": tensors nothing read: ", left);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// The forward.

namespace qwen3 {

// RMSNorm of every row of x (a [T, n] matrix) with weight w [n].
inline MatrixXdR rms_norm(const MatrixXdR& x, const Eigen::VectorXd& w, double eps) {
  MatrixXdR y(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const double mean_sq = x.row(t).squaredNorm() / static_cast<double>(x.cols());
    const double inv_rms = 1.0 / std::sqrt(mean_sq + eps);
    for (Eigen::Index i = 0; i < x.cols(); ++i) y(t, i) = w[i] * (x(t, i) * inv_rms);
  }
  return y;
}

// x W^T for a checkpoint weight W [out, in].
inline MatrixXdR linear(const MatrixXdR& x, const MatrixXdR& W) { return x * W.transpose(); }

// One head's d values of row t of a [T, heads·d] matrix, as a vector.
inline Eigen::VectorXd head_of(const MatrixXdR& x, Eigen::Index t, std::int64_t head, std::int64_t d) {
  return x.row(t).segment(head * d, d).transpose();
}

// RoPE (rotate_half) of a head vector at position p.
inline Eigen::VectorXd rope(const Eigen::VectorXd& x, std::int64_t p, double theta) {
  const Eigen::Index d = x.size(), half = d / 2;
  Eigen::VectorXd y(d);
  for (Eigen::Index i = 0; i < half; ++i) {
    const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double a = static_cast<double>(p) * inv_freq;
    y[i] = x[i] * std::cos(a) - x[i + half] * std::sin(a);
    y[i + half] = x[i + half] * std::cos(a) + x[i] * std::sin(a);
  }
  return y;
}

// q, k or v of every token as [T, heads·d]: projection, then (q and k only) the per-head norm
// when given and RoPE at the token's position.
inline MatrixXdR project_heads(const MatrixXdR& xn, const MatrixXdR& W, std::int64_t heads, std::int64_t d,
                               const Eigen::VectorXd* head_norm, bool rotate, const Qwen3RefWeights& w) {
  MatrixXdR y = linear(xn, W);
  for (Eigen::Index t = 0; t < y.rows(); ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      MatrixXdR v = head_of(y, t, h, d).transpose();  // [1, d]
      if (head_norm && head_norm->size() > 0) v = rms_norm(v, *head_norm, w.eps);
      Eigen::VectorXd r = v.row(0).transpose();
      if (rotate) r = rope(r, t, w.rope_theta);
      y.row(t).segment(h * d, d) = r.transpose();
    }
  return y;
}

// The attention sublayer on the normalised input xn [T, D]; window 0 = full causal.
inline MatrixXdR attention(const MatrixXdR& xn, const Qwen3RefLayer& l, std::int64_t window, const Qwen3RefWeights& w) {
  const std::int64_t T = xn.rows(), H = w.heads, Hkv = w.kv_heads, d = w.head_dim, G = H / Hkv;
  const MatrixXdR q = project_heads(xn, l.q_proj, H, d, &l.q_norm, true, w);    // [T, H·d]
  const MatrixXdR k = project_heads(xn, l.k_proj, Hkv, d, &l.k_norm, true, w);  // [T, H_kv·d]
  const MatrixXdR v = project_heads(xn, l.v_proj, Hkv, d, nullptr, false, w);   // [T, H_kv·d]
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  MatrixXdR o = MatrixXdR::Zero(T, H * d);
  for (std::int64_t h = 0; h < H; ++h) {
    const std::int64_t j = h / G;  // the kv head this query head reads
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t lo = window > 0 ? std::max<std::int64_t>(0, t - window + 1) : 0;
      const Eigen::VectorXd qv = head_of(q, t, h, d);
      // Scores over keys lo..t, softmax (max subtracted), weighted sum of values.
      Eigen::VectorXd s(t - lo + 1);
      for (std::int64_t u = lo; u <= t; ++u) s[u - lo] = scale * qv.dot(head_of(k, u, j, d));
      const Eigen::VectorXd e = (s.array() - s.maxCoeff()).exp().matrix();
      const Eigen::VectorXd p = e / e.sum();
      Eigen::VectorXd out = Eigen::VectorXd::Zero(d);
      for (std::int64_t u = lo; u <= t; ++u) out += p[u - lo] * head_of(v, u, j, d);
      o.row(t).segment(h * d, d) = out.transpose();
    }
  }
  return linear(o, l.o_proj);
}

// The SwiGLU MLP on the normalised input xn [T, D].
inline MatrixXdR mlp(const MatrixXdR& xn, const Qwen3RefLayer& l) {
  const MatrixXdR g = linear(xn, l.gate_proj), u = linear(xn, l.up_proj);
  MatrixXdR a(g.rows(), g.cols());
  for (Eigen::Index t = 0; t < g.rows(); ++t)
    for (Eigen::Index i = 0; i < g.cols(); ++i) a(t, i) = g(t, i) * sigmoid(g(t, i)) * u(t, i);
  return linear(a, l.down_proj);
}

// One decoder layer: pre-norm sublayers, each output sandwich-normalised when that norm is loaded.
inline MatrixXdR decoder_layer(const MatrixXdR& x_in, const Qwen3RefLayer& l, std::int64_t window,
                               const Qwen3RefWeights& w) {
  MatrixXdR x = x_in;
  MatrixXdR a = attention(rms_norm(x, l.input_layernorm, w.eps), l, window, w);
  if (l.input_layernorm_2.size() > 0) a = rms_norm(a, l.input_layernorm_2, w.eps);
  x += a;
  MatrixXdR m = mlp(rms_norm(x, l.post_attention_layernorm, w.eps), l);
  if (l.post_attention_layernorm_2.size() > 0) m = rms_norm(m, l.post_attention_layernorm_2, w.eps);
  x += m;
  return x;
}

// The window of layer l in step `step`: the config's, or window_per_step's for sliding layers.
inline std::int64_t step_window(const Qwen3RefLayer& l, const RefOptions& opt, int step) {
  if (l.window == 0 || opt.window_per_step.empty()) return l.window;
  return opt.window_per_step[static_cast<std::size_t>(step)];
}

}  // namespace qwen3

inline RefOutput qwen3_ref_forward(const Qwen3RefWeights& w, const std::vector<std::int64_t>& ids,
                                   const RefOptions& opt = {}) {
  ATTNKIT_REQUIRE(opt.steps >= 1, "qwen3_ref_forward: steps must be >= 1, got ", opt.steps);
  ATTNKIT_REQUIRE(opt.window_per_step.empty() || opt.window_per_step.size() == static_cast<std::size_t>(opt.steps),
                  "qwen3_ref_forward: window_per_step has ", opt.window_per_step.size(), " entries for ", opt.steps,
                  " steps");
  for (auto win : opt.window_per_step) ATTNKIT_REQUIRE(win >= 0, "qwen3_ref_forward: negative window ", win);
  const std::int64_t T = static_cast<std::int64_t>(ids.size());
  MatrixXdR x(T, w.hidden);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int64_t id = ids[static_cast<std::size_t>(t)];
    ATTNKIT_REQUIRE(id >= 0 && id < w.vocab, "qwen3_ref_forward: token ", id, " outside the vocabulary of ", w.vocab);
    x.row(t) = w.embed.row(id);
  }
  RefOutput out;
  for (int step = 0; step < opt.steps; ++step) {
    std::vector<MatrixXdR> hs{x};
    for (const Qwen3RefLayer& l : w.layers) {
      x = qwen3::decoder_layer(x, l, qwen3::step_window(l, opt, step), w);
      hs.push_back(x);
    }
    const MatrixXdR h = qwen3::rms_norm(x, w.norm, w.eps);
    if (opt.between == BetweenSteps::final_norm) x = h;
    out.logits_per_step.push_back(qwen3::linear(h, w.lm_head));
    if (w.has_exit_gate()) {
      Eigen::VectorXd lambda(T);
      for (std::int64_t t = 0; t < T; ++t)
        lambda[t] = qwen3::sigmoid(h.row(t).dot(w.exit_gate_w.transpose()) + w.exit_gate_b);
      out.exit_gate.push_back(lambda);
    }
    out.hidden_per_step.push_back(h);
    out.layer_hidden.push_back(std::move(hs));
  }
  out.logits = out.logits_per_step.back();
  return out;
}

// Ouro's exit distribution over steps from the gates λ [steps] of [T] (spec §9.1):
// p_τ = λ_τ Π_{j<τ}(1 − λ_j) for τ < last, p_last = Π_{j<last}(1 − λ_j).
inline std::vector<Eigen::VectorXd> exit_distribution(const std::vector<Eigen::VectorXd>& lambda) {
  std::vector<Eigen::VectorXd> p;
  if (lambda.empty()) return p;
  Eigen::VectorXd survive = Eigen::VectorXd::Ones(lambda[0].size());  // Π_{j<τ}(1 − λ_j)
  for (std::size_t tau = 0; tau < lambda.size(); ++tau) {
    if (tau + 1 < lambda.size()) {
      p.push_back(lambda[tau].cwiseProduct(survive));
      survive = survive.cwiseProduct((1.0 - lambda[tau].array()).matrix());
    } else {
      p.push_back(survive);
    }
  }
  return p;
}

// Σ_τ p_τ · logits_τ per token (Ouro's expected-logits readout), [T, V].
inline MatrixXdR expected_logits(const RefOutput& r) {
  const std::vector<Eigen::VectorXd> p = exit_distribution(r.exit_gate);
  ATTNKIT_REQUIRE(p.size() == r.logits_per_step.size(), "expected_logits: the output has no exit gate");
  MatrixXdR e = MatrixXdR::Zero(r.logits.rows(), r.logits.cols());
  for (std::size_t tau = 0; tau < p.size(); ++tau) e += p[tau].asDiagonal() * r.logits_per_step[tau];
  return e;
}

}  // namespace attnkit::ref
