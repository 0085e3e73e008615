// tests/reference/attnres_ref.hpp — float64 oracle for Attention Residuals' depth routing
// (depth/attnres.hpp, spec §5), written for reading rather than speed.
//
// Every source is a T x D double matrix (pass bf16-rounded values to check bf16 sources, and a
// broadcast source as its one row repeated T times). partial: T x D, or empty (0 x 0) for none.
// proj and gamma: [D] (gamma empty: proj already holds proj ⊙ γ). residual: T x D or empty.
// For every token t, with the partial appended as the last of the S routed sources:
//   logit_n = (proj ⊙ γ) · V_n[t] / sqrt(mean(V_n[t]²) + eps)     (no 1/sqrt(D) scale)
//   logit_{S-1} += bias                                          (only with a partial)
//   w = softmax(logit)        (+inf logits share all the weight; all -inf: uniform)
//   out[t] = residual[t] + Σ_n w_n V_n[t]
// Returns out [T, D], the weights [T, S], and mag[t] = |residual[t]| + Σ_n w_n |V_n[t]|: the
// scale of out's rounding errors, which a nearly cancelling out[t] does not show (tests measure
// errors against it where a case may have only a few outputs).
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <vector>

namespace attnkit::ref {

using MatrixXdR = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct AttnResResult {
  MatrixXdR out;      // [T, D]
  MatrixXdR weights;  // [T, S]
  MatrixXdR mag;      // [T, D]
};

// softmax(logits); with an infinite maximum the logits equal to it share the weight equally.
inline Eigen::VectorXd depth_softmax(const Eigen::VectorXd& logits) {
  const double m = logits.maxCoeff();
  if (std::isinf(m)) {
    const Eigen::VectorXd hit = (logits.array() == m).cast<double>().matrix();
    return hit / hit.sum();
  }
  // (std::exp per element: Eigen's AVX-512 exp trips GCC 12's -Wuninitialized under the sanitizers.)
  const Eigen::VectorXd e = (logits.array() - m).unaryExpr([](double x) { return std::exp(x); }).matrix();
  return e / e.sum();
}

inline AttnResResult reference_attnres(const std::vector<MatrixXdR>& sources, const MatrixXdR& partial,
                                       const Eigen::VectorXd& proj, const Eigen::VectorXd& gamma, double bias,
                                       double eps, const MatrixXdR& residual = MatrixXdR()) {
  std::vector<const MatrixXdR*> all;
  for (const auto& s : sources) all.push_back(&s);
  const bool has_partial = partial.size() > 0;
  if (has_partial) all.push_back(&partial);
  const auto S = static_cast<Eigen::Index>(all.size());
  const Eigen::Index T = all.front()->rows(), D = all.front()->cols();
  const Eigen::VectorXd q = gamma.size() > 0 ? Eigen::VectorXd(proj.cwiseProduct(gamma)) : proj;

  AttnResResult r;
  r.out = residual.size() > 0 ? residual : MatrixXdR::Zero(T, D);
  r.mag = r.out.cwiseAbs();
  r.weights.resize(T, S);
  for (Eigen::Index t = 0; t < T; ++t) {
    Eigen::VectorXd logits(S);
    for (Eigen::Index n = 0; n < S; ++n) {
      const Eigen::VectorXd v = all[static_cast<std::size_t>(n)]->row(t).transpose();
      const double rms = std::sqrt(v.squaredNorm() / static_cast<double>(D) + eps);
      logits[n] = q.dot(v) / rms;
    }
    if (has_partial) logits[S - 1] += bias;
    const Eigen::VectorXd w = depth_softmax(logits);
    for (Eigen::Index n = 0; n < S; ++n) {
      r.out.row(t) += w[n] * all[static_cast<std::size_t>(n)]->row(t);
      r.mag.row(t) += w[n] * all[static_cast<std::size_t>(n)]->row(t).cwiseAbs();
    }
    r.weights.row(t) = w.transpose();
  }
  return r;
}

}  // namespace attnkit::ref
