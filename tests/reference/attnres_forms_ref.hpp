// tests/reference/attnres_forms_ref.hpp — float64 oracle for the three forms of Attention
// Residuals (spec §5.1 Kimi, §5.2 open-attention-residuals, §5.3 Delta), written from the
// spec's formulas for reading, one token at a time (AttnRes mixes nothing across tokens).
//
// The sublayers are stand-ins given by the caller: sublayer(l, s, h) -> f_l(h) (s = 0 attention,
// 1 MLP), so the residual policy is checked alone, with outputs that depend on their inputs.
//   route(V, q) = Σ_n softmax_n(proj · RMSNorm_γ(V_n) [+ bias on the last]) V_n
//   gate(p, h):  bias -> h;  scalar g -> (1 - g) p + g h;  vector -> (1 - σ(W p + b)) ⊙ p + σ(W p + b) ⊙ h
// Kimi (sublayer index i = 2l + s, block size S sublayers, no kept stream):
//   b_0 = embedding; a block closes before sublayer i when i > 0 and i % S == 0;
//   V(i) = [b_0 .. b_{n-1}] + [b_n^{partial}] if the current block has outputs yet;
//   output = route([b_0 .. b_n], final query) or Σ b (final = sum).
// Open (kept stream x, snapshots): V = snapshots + [x]; x += f; full: snapshot x after each
//   sublayer; block: after the MLP of layers with (l + 1) % lpb == 0; output = x.
// Delta: x_in = x + Σ softmax(proj · RMSNorm(v)) v over [null] + [embedding, f outputs so far];
//   x += f; (delta_block: sources are the embedding and each finished block's Σ f); output = x.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <functional>
#include <vector>

namespace attnkit::ref {

struct AttnResRouteParams {
  Eigen::VectorXd proj, gamma;
  double bias = 0;
  int gate = 0;  // 0 bias, 1 scalar (g), 2 vector (W, b)
  double g = 1;
  Eigen::MatrixXd W;
  Eigen::VectorXd b;
  Eigen::VectorXd null_source;  // empty: none
};

struct AttnResFormSpec {
  enum Form { kimi, open, delta } form = open;
  bool full = false;          // open / kimi: full mode
  bool delta_block = false;   // delta: block-aggregated sources
  int layers_per_block = 1;   // open block mode, delta_block
  int block_sublayers = 2;    // kimi block mode
  bool final_route = true;    // kimi
  double eps = 1e-6;
};

using Sublayer = std::function<Eigen::VectorXd(int layer, int sub, const Eigen::VectorXd& h)>;

inline Eigen::VectorXd attnres_route_token(const std::vector<Eigen::VectorXd>& V, const AttnResRouteParams& p,
                                           bool bias_last, double eps, std::vector<double>* weights = nullptr) {
  const auto D = static_cast<double>(V.at(0).size());
  Eigen::VectorXd logits(static_cast<Eigen::Index>(V.size()));
  for (std::size_t n = 0; n < V.size(); ++n) {
    const Eigen::VectorXd key = p.gamma.cwiseProduct(V[n]) / std::sqrt(V[n].squaredNorm() / D + eps);
    logits[static_cast<Eigen::Index>(n)] = p.proj.dot(key);
  }
  if (bias_last) logits[logits.size() - 1] += p.bias;
  const Eigen::VectorXd e = (logits.array() - logits.maxCoeff()).exp().matrix();
  const Eigen::VectorXd w = e / e.sum();
  Eigen::VectorXd h = Eigen::VectorXd::Zero(V[0].size());
  for (std::size_t n = 0; n < V.size(); ++n) h += w[static_cast<Eigen::Index>(n)] * V[n];
  if (weights) weights->assign(w.data(), w.data() + w.size());
  return h;
}

inline Eigen::VectorXd attnres_gate(const Eigen::VectorXd& partial, const Eigen::VectorXd& h, const AttnResRouteParams& p) {
  if (p.gate == 1) return (1 - p.g) * partial + p.g * h;
  if (p.gate == 2) {
    const Eigen::ArrayXd s = 1.0 / (1.0 + (-(p.W * partial + p.b)).array().exp());
    return ((1 - s) * partial.array() + s * h.array()).matrix();
  }
  return h;
}

// One token through L layers. params[l][s]; final_params for Kimi's final route. Returns the
// output (what the final norm sees); weights[l][s] receives each call's softmax weights.
inline Eigen::VectorXd attnres_forward_token(const Eigen::VectorXd& emb, int L, const AttnResFormSpec& spec,
                                             const std::vector<std::array<AttnResRouteParams, 2>>& params,
                                             const AttnResRouteParams& final_params, const Sublayer& f,
                                             std::vector<std::array<std::vector<double>, 2>>* weights = nullptr) {
  if (weights) weights->assign(static_cast<std::size_t>(L), {});
  auto w_of = [&](int l, int s) { return weights ? &(*weights)[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] : nullptr; };
  if (spec.form == AttnResFormSpec::kimi) {
    const int S = spec.full ? 1 : spec.block_sublayers;
    std::vector<Eigen::VectorXd> blocks = {emb};
    Eigen::VectorXd partial;  // empty: the current block has no outputs yet
    for (int i = 0; i < 2 * L; ++i) {
      const int l = i / 2, s = i % 2;
      if (i > 0 && i % S == 0) {
        blocks.push_back(partial);
        partial.resize(0);
      }
      std::vector<Eigen::VectorXd> V = blocks;
      if (partial.size()) V.push_back(partial);
      const auto& p = params[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      const Eigen::VectorXd h = attnres_gate(V.back(), attnres_route_token(V, p, true, spec.eps, w_of(l, s)), p);
      const Eigen::VectorXd out = f(l, s, h);
      partial = partial.size() ? Eigen::VectorXd(partial + out) : out;
    }
    std::vector<Eigen::VectorXd> V = blocks;
    V.push_back(partial);
    if (spec.final_route) return attnres_route_token(V, final_params, true, spec.eps);
    Eigen::VectorXd sum = Eigen::VectorXd::Zero(emb.size());
    for (auto& v : V) sum += v;
    return sum;
  }
  Eigen::VectorXd x = emb, block_start = emb;
  std::vector<Eigen::VectorXd> sources = {emb};
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < 2; ++s) {
      const auto& p = params[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)];
      Eigen::VectorXd h;
      if (spec.form == AttnResFormSpec::open) {
        std::vector<Eigen::VectorXd> V = sources;
        V.push_back(x);
        h = attnres_gate(x, attnres_route_token(V, p, true, spec.eps, w_of(l, s)), p);
      } else {
        std::vector<Eigen::VectorXd> V;
        if (p.null_source.size()) V.push_back(p.null_source);
        V.insert(V.end(), sources.begin(), sources.end());
        h = attnres_gate(x, x + attnres_route_token(V, p, false, spec.eps, w_of(l, s)), p);
      }
      const Eigen::VectorXd out = f(l, s, h);
      x += out;
      const bool block_end = s == 1 && (l + 1) % spec.layers_per_block == 0;
      if (spec.form == AttnResFormSpec::open) {
        if (spec.full || block_end) sources.push_back(x);
      } else if (!spec.delta_block) {
        sources.push_back(out);
      } else if (block_end) {
        sources.push_back(x - block_start);
        block_start = x;
      }
    }
  return x;
}

}  // namespace attnkit::ref
