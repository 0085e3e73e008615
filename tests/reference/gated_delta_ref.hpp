// tests/reference/gated_delta_ref.hpp — float64 oracle for the gated delta rule
// (recurrent/gated_delta.hpp, spec §7.3), written for reading rather than speed.
//
// Inputs as the kernel reads them (float values, row-major): q, k [T, H_k, d_k]; v [T, H_v, d_v];
// g, beta [T, H_v]; state [H_v, d_k, d_v] (the initial state). Value head h uses key head
// h / (H_v / H_k). Per head, in float64, token by token (the "reference layout" of §7.3):
//     q̂ = scale · q / sqrt(|q|² + eps),  k̂ = k / sqrt(|k|² + eps)   (or q̂ = scale · q, k̂ = k)
//     S ← e^g S;  u = S^T k̂;  δ = β (v − u);  S ← S + k̂ δ^T;  o = S^T q̂
// Returns out [T, H_v, d_v] and the final state [H_v, d_k, d_v].
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <vector>

namespace attnkit::ref {

struct GatedDeltaShape {
  std::int64_t T = 0, Hk = 1, Hv = 1, dk = 1, dv = 1;
};

struct GatedDeltaRefResult {
  std::vector<double> out;    // [T, H_v, d_v]
  std::vector<double> state;  // [H_v, d_k, d_v]
};

inline GatedDeltaRefResult reference_gated_delta(const GatedDeltaShape& sh, const std::vector<float>& q,
                                                 const std::vector<float>& k, const std::vector<float>& v,
                                                 const std::vector<float>& g, const std::vector<float>& beta,
                                                 const std::vector<float>& initial_state, bool l2norm = true,
                                                 double eps = 1e-6, double scale = 0) {
  using Eigen::MatrixXd;
  using Eigen::VectorXd;
  const std::int64_t T = sh.T, Hk = sh.Hk, Hv = sh.Hv, dk = sh.dk, dv = sh.dv, group = Hv / Hk;
  if (scale == 0) scale = 1.0 / std::sqrt(static_cast<double>(dk));
  const auto row = [](const std::vector<float>& x, std::int64_t offset, std::int64_t n) {
    VectorXd r(n);
    for (std::int64_t i = 0; i < n; ++i) r[i] = x[static_cast<std::size_t>(offset + i)];
    return r;
  };
  const auto normalised = [&](VectorXd x, double factor) {
    if (l2norm) x /= std::sqrt(x.squaredNorm() + eps);
    return VectorXd(x * factor);
  };

  GatedDeltaRefResult r;
  r.out.assign(static_cast<std::size_t>(T * Hv * dv), 0.0);
  r.state.assign(static_cast<std::size_t>(Hv * dk * dv), 0.0);
  for (std::int64_t h = 0; h < Hv; ++h) {
    const std::int64_t j = h / group;
    MatrixXd S(dk, dv);  // S[i, c] = state[h, i, c]
    for (std::int64_t i = 0; i < dk; ++i)
      for (std::int64_t c = 0; c < dv; ++c) S(i, c) = initial_state[static_cast<std::size_t>((h * dk + i) * dv + c)];
    for (std::int64_t t = 0; t < T; ++t) {
      const VectorXd qn = normalised(row(q, (t * Hk + j) * dk, dk), scale);
      const VectorXd kn = normalised(row(k, (t * Hk + j) * dk, dk), 1.0);
      const VectorXd vt = row(v, (t * Hv + h) * dv, dv);
      const double alpha = std::exp(static_cast<double>(g[static_cast<std::size_t>(t * Hv + h)]));
      const double b = beta[static_cast<std::size_t>(t * Hv + h)];
      S *= alpha;
      const VectorXd u = S.transpose() * kn;  // what the memory returns for k̂
      const VectorXd delta = b * (vt - u);
      S += kn * delta.transpose();
      const VectorXd o = S.transpose() * qn;
      for (std::int64_t c = 0; c < dv; ++c) r.out[static_cast<std::size_t>((t * Hv + h) * dv + c)] = o[c];
    }
    for (std::int64_t i = 0; i < dk; ++i)
      for (std::int64_t c = 0; c < dv; ++c) r.state[static_cast<std::size_t>((h * dk + i) * dv + c)] = S(i, c);
  }
  return r;
}

}  // namespace attnkit::ref
