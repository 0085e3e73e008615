// tests/reference/model_variants_ref.hpp — float64 reference forward of a Qwen3 model whose layers
// are plain, R-GQA (spec §10) or Tuneable (spec §11) attention. Written for reading, the whole
// sequence at once, no caches; reuses ref::qwen3's helpers (RMSNorm, linear, RoPE, MLP).
//
//   model     : x = embed[ids]; per layer l: x ← x + Attn_l(RMSNorm_in(x)); x ← x + MLP_l(RMSNorm_post(x));
//               logits = RMSNorm_final(x) lm_headᵀ
//   attention : q = x W_qᵀ, k = x W_kᵀ, v = x W_vᵀ per head of d; q, k ← RMSNorm_{q_norm, k_norm}
//               per head, then RoPE (rotate_half) at the token's position; query head h reads KV
//               head h / G, G = H / H_kv; keys 0..t (causal)
//     full     : z_s = q·k_s / sqrt(d)
//     tuneable : z_s = (q U)·(k_s U) / sqrt(d)   (AGILLM's definition: U [d, r] after RoPE; the scale
//                uses d, not r)
//     routed   : r_t = x_t W_rᵀ [H]; p = softmax of r_t within each KV group (scope "group") or
//                over all H heads ("all"); in every group the top_k heads by r (ties to the lower
//                head) are kept with weight 1 (none), p_h (prob) or p_h / Σ_kept p (renorm); a
//                kept head outputs weight · Σ_s softmax(z)_s v_s, the others 0
//               out = concat_h(o) W_oᵀ
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "reference/qwen3_ref.hpp"

namespace attnkit::ref {

struct VariantRefSettings {
  std::vector<std::string> kinds;  // per layer: full, routed, tuneable
  std::int64_t top_k = 1;
  std::string scope = "group", weighting = "renorm";
  std::int64_t rank = 0;  // columns of U
};

struct VariantRefLayer {
  std::string kind;
  MatrixXdR q_proj, k_proj, v_proj, o_proj, router, U;
  Eigen::VectorXd q_norm, k_norm, input_layernorm, post_attention_layernorm;
  Qwen3RefLayer mlp;  // gate_proj, up_proj, down_proj
};

struct VariantRefWeights {
  VariantRefSettings s;
  std::int64_t D = 0, H = 0, Hkv = 0, d = 0, V = 0;
  double eps = 1e-6, theta = 10000.0;
  MatrixXdR embed, lm_head;
  Eigen::VectorXd norm;
  std::vector<VariantRefLayer> layers;
};

struct VariantRefOutput {
  MatrixXdR logits;                              // [T, V]
  std::vector<MatrixXdR> probs, weights;         // per layer [T, H] (routed layers; else empty): the
                                                 // router softmax, and each head's output factor (0: not kept)
  double min_margin = std::numeric_limits<double>::infinity();  // smallest gap between the last kept
                                                 // and the best dropped router logit of a group
};

inline VariantRefWeights load_variant_ref(const model::TensorSource& src, const io::Qwen3Config& c,
                                          const VariantRefSettings& s) {
  using qwen3::matrix, qwen3::vector;
  VariantRefWeights w;
  w.s = s;
  w.D = c.hidden_size;
  w.H = c.num_attention_heads;
  w.Hkv = c.num_key_value_heads;
  w.d = c.head_dim;
  w.V = c.vocab_size;
  w.eps = c.rms_norm_eps;
  w.theta = c.rope_theta;
  const std::int64_t D = w.D, d = w.d, I = c.intermediate_size;
  w.embed = matrix(src, "model.embed_tokens.weight", w.V, D);
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".", a = p + "self_attn.";
    VariantRefLayer l;
    l.kind = s.kinds.at(static_cast<std::size_t>(i));
    l.q_proj = matrix(src, a + "q_proj.weight", w.H * d, D);
    l.k_proj = matrix(src, a + "k_proj.weight", w.Hkv * d, D);
    l.v_proj = matrix(src, a + "v_proj.weight", w.Hkv * d, D);
    l.o_proj = matrix(src, a + "o_proj.weight", D, w.H * d);
    l.q_norm = vector(src, a + "q_norm.weight", d);
    l.k_norm = vector(src, a + "k_norm.weight", d);
    if (l.kind == "routed") l.router = matrix(src, a + "router.weight", w.H, D);
    if (l.kind == "tuneable") l.U = matrix(src, a + "U", d, s.rank);
    l.input_layernorm = vector(src, p + "input_layernorm.weight", D);
    l.post_attention_layernorm = vector(src, p + "post_attention_layernorm.weight", D);
    l.mlp.gate_proj = matrix(src, p + "mlp.gate_proj.weight", I, D);
    l.mlp.up_proj = matrix(src, p + "mlp.up_proj.weight", I, D);
    l.mlp.down_proj = matrix(src, p + "mlp.down_proj.weight", D, I);
    w.layers.push_back(std::move(l));
  }
  w.norm = vector(src, "model.norm.weight", D);
  w.lm_head = c.tie_word_embeddings ? w.embed : matrix(src, "lm_head.weight", w.V, D);
  return w;
}

namespace variants {

// The router of one token: probabilities [H] and output factors [H] (0 for heads not kept).
inline void route(const Eigen::VectorXd& r, const VariantRefWeights& w, Eigen::VectorXd& prob, Eigen::VectorXd& factor,
                  double& margin) {
  const std::int64_t H = w.H, G = H / w.Hkv, K = w.s.top_k;
  prob = Eigen::VectorXd::Zero(H);
  factor = Eigen::VectorXd::Zero(H);
  const auto softmax = [&](std::int64_t h0, std::int64_t h1) {
    const double mx = r.segment(h0, h1 - h0).maxCoeff();
    double sum = 0;
    for (std::int64_t h = h0; h < h1; ++h) sum += prob[h] = std::exp(r[h] - mx);
    for (std::int64_t h = h0; h < h1; ++h) prob[h] /= sum;
  };
  if (w.s.scope == "all") softmax(0, H);
  else
    for (std::int64_t j = 0; j < w.Hkv; ++j) softmax(j * G, (j + 1) * G);
  for (std::int64_t j = 0; j < w.Hkv; ++j) {
    std::vector<std::int64_t> order;
    for (std::int64_t h = j * G; h < (j + 1) * G; ++h) order.push_back(h);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return r[a] > r[b]; });
    if (K < G) margin = std::min(margin, r[order[K - 1]] - r[order[K]]);
    double kept = 0;
    for (std::int64_t i = 0; i < K; ++i) kept += prob[order[i]];
    for (std::int64_t i = 0; i < K; ++i) {
      const std::int64_t h = order[i];
      factor[h] = w.s.weighting == "none" ? 1.0 : w.s.weighting == "prob" ? prob[h] : prob[h] / kept;
    }
  }
}

inline MatrixXdR attention(const MatrixXdR& xn, const VariantRefLayer& l, const VariantRefWeights& w, VariantRefOutput& out,
                           std::size_t layer) {
  const std::int64_t T = xn.rows(), H = w.H, Hkv = w.Hkv, d = w.d, G = H / Hkv;
  const MatrixXdR qr = qwen3::linear(xn, l.q_proj), kr = qwen3::linear(xn, l.k_proj), v = qwen3::linear(xn, l.v_proj);
  // Post-norm, post-RoPE head vectors; Tuneable: times U.
  auto prepared = [&](const MatrixXdR& raw, std::int64_t t, std::int64_t head, const Eigen::VectorXd& nw) {
    MatrixXdR m = qwen3::head_of(raw, t, head, d).transpose();
    m = qwen3::rms_norm(m, nw, w.eps);
    Eigen::VectorXd x = qwen3::rope(m.row(0).transpose(), t, w.theta);
    if (l.kind == "tuneable") x = l.U.transpose() * x;  // (x U)ᵀ
    return x;
  };
  std::vector<Eigen::VectorXd> kn(static_cast<std::size_t>(T * Hkv));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < Hkv; ++j) kn[static_cast<std::size_t>(t * Hkv + j)] = prepared(kr, t, j, l.k_norm);
  Eigen::VectorXd factor = Eigen::VectorXd::Ones(H), prob;
  MatrixXdR r;
  if (l.kind == "routed") {
    r = qwen3::linear(xn, l.router);
    out.probs[layer] = MatrixXdR(T, H);
    out.weights[layer] = MatrixXdR(T, H);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  MatrixXdR o = MatrixXdR::Zero(T, H * d);
  for (std::int64_t t = 0; t < T; ++t) {
    if (l.kind == "routed") {
      route(r.row(t).transpose(), w, prob, factor, out.min_margin);
      out.probs[layer].row(t) = prob.transpose();
      out.weights[layer].row(t) = factor.transpose();
    }
    for (std::int64_t h = 0; h < H; ++h) {
      if (factor[h] == 0.0) continue;  // a head the router did not keep: output 0
      const std::int64_t j = h / G;
      const Eigen::VectorXd q = prepared(qr, t, h, l.q_norm);
      Eigen::VectorXd sc(t + 1);
      for (std::int64_t s = 0; s <= t; ++s) sc[s] = scale * q.dot(kn[static_cast<std::size_t>(s * Hkv + j)]);
      const Eigen::VectorXd e = (sc.array() - sc.maxCoeff()).exp().matrix();
      Eigen::VectorXd acc = Eigen::VectorXd::Zero(d);
      for (std::int64_t s = 0; s <= t; ++s) acc += e[s] / e.sum() * qwen3::head_of(v, s, j, d);
      o.row(t).segment(h * d, d) = factor[h] * acc.transpose();
    }
  }
  return qwen3::linear(o, l.o_proj);
}

}  // namespace variants

inline VariantRefOutput variant_ref_forward(const VariantRefWeights& w, const std::vector<std::int64_t>& ids) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size());
  MatrixXdR x(T, w.D);
  for (std::int64_t t = 0; t < T; ++t) x.row(t) = w.embed.row(ids[static_cast<std::size_t>(t)]);
  VariantRefOutput out;
  out.probs.resize(w.layers.size());
  out.weights.resize(w.layers.size());
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const VariantRefLayer& l = w.layers[li];
    x += variants::attention(qwen3::rms_norm(x, l.input_layernorm, w.eps), l, w, out, li);
    x += qwen3::mlp(qwen3::rms_norm(x, l.post_attention_layernorm, w.eps), l.mlp);
  }
  out.logits = qwen3::linear(qwen3::rms_norm(x, w.norm, w.eps), w.lm_head);
  return out;
}

}  // namespace attnkit::ref
