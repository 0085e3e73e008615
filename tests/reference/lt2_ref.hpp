// tests/reference/lt2_ref.hpp — float64 reference forward of an LT2 model (spec §9.2) with its
// three kinds of token mixer: Gated DeltaNet (§7), softmax attention (full, sliding window, or
// DeepSeek sparse attention with a lightning indexer, §8), each optionally output-gated.
// Written for reading, the whole sequence at once, no caches; reuses ref::qwen3's helpers
// (RMSNorm, linear, MLP). Weights are read by name from a TensorSource and held as double.
//
//   model       : x = embed[ids]; loop τ = 0..loops-1: for each layer l (shared weights, a fresh
//                 state per (τ, l), positions 0..T-1 in every loop):
//                   x ← x + Mixer_l(RMSNorm_in(x));  x ← x + MLP_l(RMSNorm_post(x))
//                 logits = RMSNorm_final(x) lm_headᵀ
//   attention   : q = x W_qᵀ per head (gated: q_proj rows per head [q (d) | gate (d)]), k, v;
//                 q, k ← RMSNorm_{q_norm, k_norm} per head, then RoPE (rotate_half) on the first
//                 r = rotary_dim dims, inv_freq_i = θ^(-2i/r), at the token's position;
//                 keys of query t: full [0, t]; window [max(0, t−W+1), t]; sparse S_t (below);
//                 o_{t,h} = Σ_s softmax_s(q·k_s / sqrt(d)) v_s (kv head h / (H / H_kv));
//                 gated: o ← σ(gate) ⊙ o; out = concat_h(o) W_oᵀ
//   indexer     : iq_{t,j} = (x W_{wq}ᵀ)_{t, j·d_I ..}, ik_s = LayerNorm(x_s W_{wk}ᵀ; w, b, 1e-6),
//                 RoPE of the first index_rope_dim dims of both (inv_freq over index_rope_dim),
//                 iw_{t,j} = (x W_{weights_proj}ᵀ)_{t,j} / sqrt(H_I d_I),
//                 score_{t,s} = Σ_j iw_{t,j} ReLU(iq_{t,j} · ik_s) for s ≤ t;
//                 S_t = the top min(k, t+1) positions by score (ties to the lower position)
//   Gated DeltaNet (Qwen3.5 layout): [q | k | v] = causal depthwise conv (kernel K) + SiLU of
//                 x W_qkvᵀ; z = x W_zᵀ; β = σ(x W_bᵀ); g = −exp(A_log) softplus(x W_aᵀ + dt_bias);
//                 per value head h (key head h / (n_v / n_k)), S = 0:
//                   q̂ = q / sqrt(|q|² + 1e-6) / sqrt(d_k), k̂ = k / sqrt(|k|² + 1e-6)
//                   S ← e^g S;  S ← S + k̂ (β (v − Sᵀ k̂))ᵀ;  o = Sᵀ q̂
//                 o ← norm.weight ⊙ o / sqrt(mean(o²) + eps) ⊙ SiLU(z) per head; out = o W_outᵀ
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "reference/qwen3_ref.hpp"

namespace attnkit::ref {

struct Lt2RefSettings {
  int loops = 1;
  std::vector<std::string> kinds;  // per layer: gdn, full, window, sparse
  bool gated_attn = false;
  std::int64_t window = 0;
  std::int64_t rotary_dim = 0;  // 0: head_dim
  std::int64_t gdn_key_heads = 0, gdn_value_heads = 0, gdn_key_dim = 0, gdn_value_dim = 0, gdn_conv = 4;
  std::int64_t index_heads = 0, index_dim = 0, index_topk = 0, index_rope_dim = 0;
};

struct Lt2RefLayer {
  std::string kind;
  MatrixXdR q_proj, k_proj, v_proj, o_proj;
  Eigen::VectorXd q_norm, k_norm;
  MatrixXdR wq, wk, weights_proj;      // indexer
  Eigen::VectorXd ik_norm_w, ik_norm_b;
  MatrixXdR in_qkv, in_z, in_b, in_a, conv, out_proj;  // Gated DeltaNet (conv [C, K])
  Eigen::VectorXd a_log, dt_bias, gdn_norm;
  Eigen::VectorXd input_layernorm, post_attention_layernorm;
  Qwen3RefLayer mlp;  // gate_proj, up_proj, down_proj
};

struct Lt2RefWeights {
  Lt2RefSettings s;
  std::int64_t D = 0, H = 0, Hkv = 0, d = 0, V = 0;
  double eps = 1e-6, theta = 10000.0;
  MatrixXdR embed, lm_head;
  Eigen::VectorXd norm;
  std::vector<Lt2RefLayer> layers;
};

struct Lt2RefOutput {
  MatrixXdR logits;  // [T, V]
  // Per layer (empty for non-sparse layers), of the last loop: each query's selection, ascending.
  std::vector<std::vector<std::vector<std::int64_t>>> topk;
  // The smallest gap, over queries, layers and loops, between the last selected score and the best
  // unselected lower one: how far the selection is from a tie (a float32 run may pick otherwise
  // below ~1e-6).
  double min_margin = std::numeric_limits<double>::infinity();
};

inline Lt2RefWeights load_lt2_ref(const model::TensorSource& src, const io::Qwen3Config& c, const Lt2RefSettings& s) {
  using qwen3::matrix, qwen3::vector;
  Lt2RefWeights w;
  w.s = s;
  w.D = c.hidden_size;
  w.H = c.num_attention_heads;
  w.Hkv = c.num_key_value_heads;
  w.d = c.head_dim;
  w.V = c.vocab_size;
  w.eps = c.rms_norm_eps;
  w.theta = c.rope_theta;
  if (w.s.rotary_dim == 0) w.s.rotary_dim = w.d;
  const std::int64_t D = w.D, d = w.d, I = c.intermediate_size;
  w.embed = matrix(src, "model.embed_tokens.weight", w.V, D);
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    Lt2RefLayer l;
    l.kind = s.kinds.at(static_cast<std::size_t>(i));
    if (l.kind == "gdn") {
      const std::string g = p + "linear_attn.";
      const std::int64_t key = s.gdn_key_heads * s.gdn_key_dim, val = s.gdn_value_heads * s.gdn_value_dim,
                         C = 2 * key + val;
      l.in_qkv = matrix(src, g + "in_proj_qkv.weight", C, D);
      l.in_z = matrix(src, g + "in_proj_z.weight", val, D);
      l.in_b = matrix(src, g + "in_proj_b.weight", s.gdn_value_heads, D);
      l.in_a = matrix(src, g + "in_proj_a.weight", s.gdn_value_heads, D);
      const std::vector<float> cw = src.get(g + "conv1d.weight", {C, 1, s.gdn_conv}).to_f32();
      l.conv = MatrixXdR(C, s.gdn_conv);
      for (std::int64_t r = 0; r < C; ++r)
        for (std::int64_t j = 0; j < s.gdn_conv; ++j) l.conv(r, j) = cw[static_cast<std::size_t>(r * s.gdn_conv + j)];
      l.a_log = vector(src, g + "A_log", s.gdn_value_heads);
      l.dt_bias = vector(src, g + "dt_bias", s.gdn_value_heads);
      l.gdn_norm = vector(src, g + "norm.weight", s.gdn_value_dim);
      l.out_proj = matrix(src, g + "out_proj.weight", D, val);
    } else {
      const std::string a = p + "self_attn.";
      l.q_proj = matrix(src, a + "q_proj.weight", (s.gated_attn ? 2 : 1) * w.H * d, D);
      l.k_proj = matrix(src, a + "k_proj.weight", w.Hkv * d, D);
      l.v_proj = matrix(src, a + "v_proj.weight", w.Hkv * d, D);
      l.o_proj = matrix(src, a + "o_proj.weight", D, w.H * d);
      l.q_norm = vector(src, a + "q_norm.weight", d);
      l.k_norm = vector(src, a + "k_norm.weight", d);
      if (l.kind == "sparse") {
        l.wq = matrix(src, a + "indexer.wq.weight", s.index_heads * s.index_dim, D);
        l.wk = matrix(src, a + "indexer.wk.weight", s.index_dim, D);
        l.weights_proj = matrix(src, a + "indexer.weights_proj.weight", s.index_heads, D);
        l.ik_norm_w = vector(src, a + "indexer.k_norm.weight", s.index_dim);
        l.ik_norm_b = vector(src, a + "indexer.k_norm.bias", s.index_dim);
      }
    }
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

namespace lt2 {

// RoPE (rotate_half) of the first r dims of x at position p, inv_freq_i = θ^(-2i/r).
inline Eigen::VectorXd rope_partial(Eigen::VectorXd x, std::int64_t p, double theta, std::int64_t r) {
  if (r == 0) return x;
  const Eigen::VectorXd head = x.head(r);
  x.head(r) = qwen3::rope(head, p, theta);
  return x;
}

inline double silu(double z) { return z * qwen3::sigmoid(z); }
inline double softplus(double z) { return z > 20 ? z : std::log1p(std::exp(z)); }

// The indexer's selection for every query: S_t ascending. Updates the margin.
inline std::vector<std::vector<std::int64_t>> select(const MatrixXdR& xn, const Lt2RefLayer& l, const Lt2RefWeights& w,
                                                     double& margin) {
  const auto& s = w.s;
  const std::int64_t T = xn.rows(), HI = s.index_heads, dI = s.index_dim;
  const MatrixXdR iq_raw = qwen3::linear(xn, l.wq), ik_raw = qwen3::linear(xn, l.wk), iw_raw = qwen3::linear(xn, l.weights_proj);
  std::vector<Eigen::VectorXd> ik(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) {
    Eigen::VectorXd k = ik_raw.row(t).transpose();
    const double mean = k.mean();
    const double var = (k.array() - mean).square().mean();
    k = ((k.array() - mean) / std::sqrt(var + 1e-6)).matrix().cwiseProduct(l.ik_norm_w) + l.ik_norm_b;
    ik[static_cast<std::size_t>(t)] = rope_partial(k, t, w.theta, s.index_rope_dim);
  }
  const double wscale = 1.0 / std::sqrt(static_cast<double>(HI * dI));
  std::vector<std::vector<std::int64_t>> sel(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<Eigen::VectorXd> q;
    for (std::int64_t j = 0; j < HI; ++j)
      q.push_back(rope_partial(iq_raw.row(t).segment(j * dI, dI).transpose(), t, w.theta, s.index_rope_dim));
    std::vector<double> score(static_cast<std::size_t>(t + 1));
    for (std::int64_t u = 0; u <= t; ++u) {
      double acc = 0;
      for (std::int64_t j = 0; j < HI; ++j) acc += iw_raw(t, j) * wscale * std::max(0.0, q[j].dot(ik[u]));
      score[static_cast<std::size_t>(u)] = acc;
    }
    std::vector<std::int64_t> order(static_cast<std::size_t>(t + 1));
    for (std::int64_t u = 0; u <= t; ++u) order[u] = u;
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return score[a] > score[b]; });
    const std::int64_t n = std::min<std::int64_t>(s.index_topk, t + 1);
    // (Exact ties, such as keys every index head scores ≤ 0, go to the lower position in any
    // precision; the margin counts the nearest tie that is not exact.)
    for (std::int64_t a = n; a <= t && n < t + 1; ++a)
      if (score[order[n - 1]] > score[order[a]]) {
        margin = std::min(margin, score[order[n - 1]] - score[order[a]]);
        break;
      }
    std::vector<std::int64_t> chosen(order.begin(), order.begin() + n);
    std::sort(chosen.begin(), chosen.end());
    sel[static_cast<std::size_t>(t)] = chosen;
  }
  return sel;
}

inline MatrixXdR attention(const MatrixXdR& xn, const Lt2RefLayer& l, const Lt2RefWeights& w, Lt2RefOutput& out,
                           std::size_t layer) {
  const std::int64_t T = xn.rows(), H = w.H, Hkv = w.Hkv, d = w.d, G = H / Hkv;
  const bool gated = w.s.gated_attn;
  const MatrixXdR qr = qwen3::linear(xn, l.q_proj), kr = qwen3::linear(xn, l.k_proj), v = qwen3::linear(xn, l.v_proj);
  auto normed = [&](Eigen::VectorXd x, const Eigen::VectorXd& nw, std::int64_t t) {
    MatrixXdR m = x.transpose();
    m = qwen3::rms_norm(m, nw, w.eps);
    return rope_partial(m.row(0).transpose(), t, w.theta, w.s.rotary_dim);
  };
  std::vector<std::vector<std::int64_t>> sel;
  if (l.kind == "sparse") {
    sel = select(xn, l, w, out.min_margin);
    out.topk[layer] = sel;
  }
  std::vector<Eigen::VectorXd> kn(static_cast<std::size_t>(T * Hkv));  // post-norm, post-RoPE keys
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < Hkv; ++j) kn[static_cast<std::size_t>(t * Hkv + j)] = normed(kr.row(t).segment(j * d, d).transpose(), l.k_norm, t);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  MatrixXdR o = MatrixXdR::Zero(T, H * d);
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<std::int64_t> keys;
    if (l.kind == "sparse") keys = sel[static_cast<std::size_t>(t)];
    else
      for (std::int64_t u = l.kind == "window" ? std::max<std::int64_t>(0, t - w.s.window + 1) : 0; u <= t; ++u) keys.push_back(u);
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t j = h / G, qoff = h * (gated ? 2 * d : d);
      const Eigen::VectorXd q = normed(qr.row(t).segment(qoff, d).transpose(), l.q_norm, t);
      Eigen::VectorXd sc(static_cast<Eigen::Index>(keys.size()));
      for (std::size_t i = 0; i < keys.size(); ++i)
        sc[static_cast<Eigen::Index>(i)] = scale * q.dot(kn[static_cast<std::size_t>(keys[i] * Hkv + j)]);
      const Eigen::VectorXd e = (sc.array() - sc.maxCoeff()).exp().matrix();
      Eigen::VectorXd acc = Eigen::VectorXd::Zero(d);
      for (std::size_t i = 0; i < keys.size(); ++i) acc += e[static_cast<Eigen::Index>(i)] / e.sum() * v.row(keys[i]).segment(j * d, d).transpose();
      if (gated)
        for (std::int64_t i = 0; i < d; ++i) acc[i] *= qwen3::sigmoid(qr(t, qoff + d + i));
      o.row(t).segment(h * d, d) = acc.transpose();
    }
  }
  return qwen3::linear(o, l.o_proj);
}

inline MatrixXdR gated_deltanet(const MatrixXdR& xn, const Lt2RefLayer& l, const Lt2RefWeights& w) {
  const auto& s = w.s;
  const std::int64_t T = xn.rows(), nk = s.gdn_key_heads, nv = s.gdn_value_heads, dk = s.gdn_key_dim,
                     dv = s.gdn_value_dim, K = s.gdn_conv, key = nk * dk, C = l.in_qkv.rows(), r = nv / nk;
  const MatrixXdR pre = qwen3::linear(xn, l.in_qkv), z = qwen3::linear(xn, l.in_z), b = qwen3::linear(xn, l.in_b),
                  a = qwen3::linear(xn, l.in_a);
  MatrixXdR y(T, C);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < C; ++c) {
      double acc = 0;
      for (std::int64_t j = 0; j < K; ++j) {
        const std::int64_t u = t - K + 1 + j;
        if (u >= 0) acc += l.conv(c, j) * pre(u, c);
      }
      y(t, c) = silu(acc);
    }
  MatrixXdR o(T, nv * dv);
  for (std::int64_t h = 0; h < nv; ++h) {
    const std::int64_t j = h / r;
    Eigen::MatrixXd S = Eigen::MatrixXd::Zero(dk, dv);
    for (std::int64_t t = 0; t < T; ++t) {
      Eigen::VectorXd q = y.row(t).segment(j * dk, dk).transpose(), k = y.row(t).segment(key + j * dk, dk).transpose();
      const Eigen::VectorXd vt = y.row(t).segment(2 * key + h * dv, dv).transpose();
      q = q / std::sqrt(q.squaredNorm() + 1e-6) / std::sqrt(static_cast<double>(dk));
      k = k / std::sqrt(k.squaredNorm() + 1e-6);
      const double beta = qwen3::sigmoid(b(t, h));
      const double g = -std::exp(l.a_log[h]) * softplus(a(t, h) + l.dt_bias[h]);
      S *= std::exp(g);
      const Eigen::VectorXd delta = beta * (vt - S.transpose() * k);
      S += k * delta.transpose();
      Eigen::VectorXd ot = S.transpose() * q;
      const double inv = 1.0 / std::sqrt(ot.squaredNorm() / static_cast<double>(dv) + w.eps);
      for (std::int64_t i = 0; i < dv; ++i) ot[i] = l.gdn_norm[i] * ot[i] * inv * silu(z(t, h * dv + i));
      o.row(t).segment(h * dv, dv) = ot.transpose();
    }
  }
  return qwen3::linear(o, l.out_proj);
}

}  // namespace lt2

inline Lt2RefOutput lt2_ref_forward(const Lt2RefWeights& w, const std::vector<std::int64_t>& ids) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size());
  MatrixXdR x(T, w.D);
  for (std::int64_t t = 0; t < T; ++t) x.row(t) = w.embed.row(ids[static_cast<std::size_t>(t)]);
  Lt2RefOutput out;
  out.topk.resize(w.layers.size());
  for (int loop = 0; loop < w.s.loops; ++loop)
    for (std::size_t li = 0; li < w.layers.size(); ++li) {
      const Lt2RefLayer& l = w.layers[li];
      const MatrixXdR xn = qwen3::rms_norm(x, l.input_layernorm, w.eps);
      x += l.kind == "gdn" ? lt2::gated_deltanet(xn, l, w) : lt2::attention(xn, l, w, out, li);
      x += qwen3::mlp(qwen3::rms_norm(x, l.post_attention_layernorm, w.eps), l.mlp);
    }
  out.logits = qwen3::linear(qwen3::rms_norm(x, w.norm, w.eps), w.lm_head);
  return out;
}

}  // namespace attnkit::ref
