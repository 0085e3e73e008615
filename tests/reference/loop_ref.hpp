// tests/reference/loop_ref.hpp — float64 oracle for Loop Attention (spec §4), written for
// reading rather than speed.
//
// All tensors are contiguous row-major float vectors (pass bf16-rounded values to check bf16
// kernels): q [T_q, H, d_k], k_glob [T_g, H_kv, d_k], v_glob [T_g, H_kv, d_v], k_loc
// [T_l, H_kv, d_k], v_loc [T_l, H_kv, d_v], gate_w [H, d_k], gate_b [H]. Query head h reads KV
// head h / (H / H_kv). Query row t sits at absolute position p = q_offset + t; global key row s
// at position s; local key row j at position local_offset + j.
//   global = softmax over global keys 0..p;  local = softmax over the local keys at positions
//   max(0, p - window + 1) .. p;  g = sigmoid(gate_w[h]·q + gate_b[h]);  out = g·global + (1-g)·local.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace attnkit::ref {

using MatrixXdR = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The rows of KV head j of a [T, H_kv, d] tensor as a T x d double matrix.
inline MatrixXdR head_rows(const std::vector<float>& x, std::int64_t T, std::int64_t H_kv, std::int64_t d,
                           std::int64_t j) {
  using MapF = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                          Eigen::OuterStride<>>;
  return MapF(x.data() + j * d, T, d, Eigen::OuterStride<>(H_kv * d)).cast<double>();
}

// softmax(scale · K q) · V for one query over every row of K and V.
inline Eigen::VectorXd attend(const Eigen::VectorXd& q, const MatrixXdR& K, const MatrixXdR& V, double scale) {
  const Eigen::VectorXd logits = scale * (K * q);
  const Eigen::VectorXd w = (logits.array() - logits.maxCoeff()).exp().matrix();
  return V.transpose() * (w / w.sum());
}

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

struct LoopDims {
  std::int64_t T_q, T_g, T_l, H, H_kv, d_k, d_v;
};

struct LoopResult {
  std::vector<double> out;     // [T_q, H, d_v]
  std::vector<double> gates;   // [T_q, H]
  std::vector<double> global;  // [T_q, H, d_v]
  std::vector<double> local;   // [T_q, H, d_v]
};

inline LoopResult reference_loop(const std::vector<float>& q, const std::vector<float>& k_glob,
                                 const std::vector<float>& v_glob, const std::vector<float>& k_loc,
                                 const std::vector<float>& v_loc, const std::vector<float>& gate_w,
                                 const std::vector<float>& gate_b, const LoopDims& d, std::int64_t q_offset,
                                 std::int64_t local_offset, std::int64_t window, double scale) {
  const std::int64_t G = d.H / d.H_kv;
  LoopResult r;
  r.out.resize(static_cast<std::size_t>(d.T_q * d.H * d.d_v));
  r.global.resize(r.out.size());
  r.local.resize(r.out.size());
  r.gates.resize(static_cast<std::size_t>(d.T_q * d.H));
  for (std::int64_t h = 0; h < d.H; ++h) {
    const std::int64_t j = h / G;
    const MatrixXdR Kg = head_rows(k_glob, d.T_g, d.H_kv, d.d_k, j), Vg = head_rows(v_glob, d.T_g, d.H_kv, d.d_v, j);
    const MatrixXdR Kl = head_rows(k_loc, d.T_l, d.H_kv, d.d_k, j), Vl = head_rows(v_loc, d.T_l, d.H_kv, d.d_v, j);
    const Eigen::VectorXd w = head_rows(gate_w, d.H, 1, d.d_k, 0).row(h).transpose();
    for (std::int64_t t = 0; t < d.T_q; ++t) {
      const std::int64_t p = q_offset + t;
      const Eigen::VectorXd qv = head_rows(q, d.T_q, d.H, d.d_k, h).row(t).transpose();
      // Global: keys 0 .. p.
      const Eigen::VectorXd glob = attend(qv, Kg.topRows(p + 1), Vg.topRows(p + 1), scale);
      // Local: positions first .. p, i.e. local rows first - local_offset .. p - local_offset.
      const std::int64_t first = std::max<std::int64_t>(0, p - window + 1), n = p - first + 1;
      const Eigen::VectorXd loc =
          attend(qv, Kl.middleRows(first - local_offset, n), Vl.middleRows(first - local_offset, n), scale);
      const double g = sigmoid(w.dot(qv) + static_cast<double>(gate_b[h]));
      const Eigen::VectorXd mixed = g * glob + (1 - g) * loc;
      r.gates[t * d.H + h] = g;
      for (std::int64_t c = 0; c < d.d_v; ++c) {
        const auto i = static_cast<std::size_t>((t * d.H + h) * d.d_v + c);
        r.out[i] = mixed[c];
        r.global[i] = glob[c];
        r.local[i] = loc[c];
      }
    }
  }
  return r;
}

// Decode: one query q [H, d_k]; every global and every local key is visible.
inline LoopResult reference_loop_decode(const std::vector<float>& q, const std::vector<float>& k_glob,
                                        const std::vector<float>& v_glob, const std::vector<float>& k_loc,
                                        const std::vector<float>& v_loc, const std::vector<float>& gate_w,
                                        const std::vector<float>& gate_b, const LoopDims& d, double scale) {
  // Every key visible = a single query at the last global position, window covering all local keys.
  LoopDims d1 = d;
  d1.T_q = 1;
  return reference_loop(q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, d1, d.T_g - 1, d.T_g - d.T_l, d.T_l, scale);
}

}  // namespace attnkit::ref
