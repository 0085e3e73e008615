// tests/reference/linear_attention_ref.hpp — float64 oracles for the recurrent-family helpers:
// linear attention (spec §6), the causal depthwise short conv (§7.2) and the gated RMSNorm (§7.5).
// Written from the formulas, token by token, with no blocking or chunking, so they share no
// structure with the kernels. All arrays are contiguous row-major.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attnkit/recurrent/linear_attention.hpp"

namespace attnkit::test {

struct LinearAttentionRef {
  std::vector<double> out;    // [T][H][d_v]
  std::vector<double> state;  // [H][d_k][d_v], final
  std::vector<double> z;      // [H][d_k], final (normalising only)
};

inline double feature_ref(double x, LinearFeatureMap map) {
  switch (map) {
    case LinearFeatureMap::identity: return x;
    case LinearFeatureMap::elu: return x > 0 ? x + 1 : std::exp(x);  // elu(x) + 1
    case LinearFeatureMap::relu: return x > 0 ? x : 0;
  }
  return x;
}

// q [T][Hq][dk], k [T][Hk][dk], v [T][Hv][dv]; H = max(Hq, Hk, Hv); output head h reads head
// h / (H / Hx) of each input. state0 [H][dk][dv] and z0 [H][dk] may be empty (zeros).
inline LinearAttentionRef reference_linear_attention(const std::vector<float>& q, const std::vector<float>& k,
                                                     const std::vector<float>& v, std::int64_t T, std::int64_t Hq,
                                                     std::int64_t Hk, std::int64_t Hv, std::int64_t dk,
                                                     std::int64_t dv, const LinearAttentionOptions& opt,
                                                     const std::vector<float>& state0 = {},
                                                     const std::vector<float>& z0 = {}) {
  const std::int64_t H = std::max({Hq, Hk, Hv});
  const double c = opt.scale != 0.f ? static_cast<double>(opt.scale) : 1.0 / std::sqrt(static_cast<double>(dk));
  LinearAttentionRef r;
  r.out.assign(static_cast<std::size_t>(T * H * dv), 0.0);
  r.state.assign(static_cast<std::size_t>(H * dk * dv), 0.0);
  r.z.assign(static_cast<std::size_t>(H * dk), 0.0);
  for (std::size_t i = 0; i < state0.size(); ++i) r.state[i] = state0[i];
  for (std::size_t i = 0; i < z0.size(); ++i) r.z[i] = z0[i];
  auto features = [&](const float* x, bool norm) {
    std::vector<double> f(static_cast<std::size_t>(dk));
    double s = 0;
    for (std::int64_t i = 0; i < dk; ++i) s += (f[i] = feature_ref(x[i], opt.feature_map));
    if (norm)
      for (auto& e : f) e /= s + 1e-4;
    return f;
  };
  for (std::int64_t h = 0; h < H; ++h) {
    const std::int64_t hq = h / (H / Hq), hk = h / (H / Hk), hv = h / (H / Hv);
    double* S = r.state.data() + h * dk * dv;
    double* z = r.z.data() + h * dk;
    for (std::int64_t t = 0; t < T; ++t) {
      const auto fq = features(q.data() + (t * Hq + hq) * dk, opt.norm_q);
      const auto fk = features(k.data() + (t * Hk + hk) * dk, opt.norm_k);
      const float* vt = v.data() + (t * Hv + hv) * dv;
      for (std::int64_t i = 0; i < dk; ++i)
        for (std::int64_t e = 0; e < dv; ++e) S[i * dv + e] += fk[i] * vt[e];
      double den = 0;
      for (std::int64_t i = 0; i < dk; ++i) {
        z[i] += fk[i];
        den += c * fq[i] * z[i];
      }
      double* o = r.out.data() + (t * H + h) * dv;
      for (std::int64_t e = 0; e < dv; ++e) {
        double s = 0;
        for (std::int64_t i = 0; i < dk; ++i) s += S[i * dv + e] * c * fq[i];
        o[e] = opt.normalize ? s / (den + 1e-10) : s;
      }
    }
  }
  if (!opt.normalize) r.z.clear();
  return r;
}

// y[t][c] = act(Σ_j w[c][j] · x[t − K + 1 + j][c]), inputs before token 0 from state0 [K−1][C]
// (oldest first; empty = zeros). Returns y [T][C] and the final state [K−1][C].
struct ShortConvRef {
  std::vector<double> y, state;
};
inline ShortConvRef reference_short_conv(const std::vector<float>& x, const std::vector<float>& w,
                                         const std::vector<float>& state0, std::int64_t T, std::int64_t C,
                                         std::int64_t K, bool silu) {
  // The whole input stream: the K−1 earlier inputs, then x.
  std::vector<double> in(static_cast<std::size_t>((K - 1 + T) * C), 0.0);
  for (std::size_t i = 0; i < state0.size(); ++i) in[i] = state0[i];
  for (std::int64_t i = 0; i < T * C; ++i) in[static_cast<std::size_t>((K - 1) * C + i)] = x[i];
  ShortConvRef r;
  r.y.assign(static_cast<std::size_t>(T * C), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < C; ++c) {
      double a = 0;
      for (std::int64_t j = 0; j < K; ++j) a += static_cast<double>(w[c * K + j]) * in[(t + j) * C + c];
      r.y[t * C + c] = silu ? a / (1 + std::exp(-a)) : a;
    }
  r.state.assign(in.end() - (K - 1) * C, in.end());
  return r;
}

// y = w ⊙ x / sqrt(mean(x²) + eps) ⊙ SiLU(z) over the last dimension d; x, z [N][d].
inline std::vector<double> reference_gated_rms_norm(const std::vector<float>& x, const std::vector<float>& z,
                                                    const std::vector<float>& w, std::int64_t N, std::int64_t d,
                                                    double eps) {
  std::vector<double> y(static_cast<std::size_t>(N * d));
  for (std::int64_t n = 0; n < N; ++n) {
    double ss = 0;
    for (std::int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[n * d + i]) * x[n * d + i];
    const double inv = 1 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (std::int64_t i = 0; i < d; ++i) {
      const double zi = z[n * d + i];
      y[n * d + i] = w[i] * (x[n * d + i] * inv) * (zi / (1 + std::exp(-zi)));
    }
  }
  return y;
}

}  // namespace attnkit::test
