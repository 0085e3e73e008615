// tests/reference/variant_ref.hpp — float64 oracle for the attention variants
// (include/attnkit/attention/variant.hpp) and R-GQA routing (attention/routed.hpp), written from
// the formulas in their contracts, one token and head at a time.
//
// q [T_q, H, d_k], k [T_k, H_kv, d_k], v [T_k, H_kv, d_v] contiguous. Query row t sits at
// position q_offset + t; key row s at key_pos[s] (default s). A key is visible if
// first <= pos <= p with first = p - window + 1 (window 0: 0).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace attnkit::ref {

struct VariantParams {
  std::vector<double> M;          // [d_k, d_k] query metric (empty: none)
  double cap = 0;                 // soft-cap (0: none)
  std::vector<double> slopes;     // [H] ALiBi (empty: none)
  std::vector<double> sinks;      // [H] (empty: none)
  std::vector<double> out_scale;  // [T_q, H] (empty: none)
};

struct VariantResult {
  std::vector<double> out;  // [T_q, H, d_v]
  std::vector<double> lse;  // [T_q, H]
};

template <class QT, class KT>
VariantResult variant_attention(const std::vector<QT>& q, const std::vector<KT>& k, const std::vector<KT>& v,
                                std::int64_t T_q, std::int64_t T_k, std::int64_t H, std::int64_t H_kv, std::int64_t d_k,
                                std::int64_t d_v, std::int64_t q_offset, std::int64_t window, double scale,
                                const VariantParams& vp, const std::vector<std::int64_t>& key_pos = {}) {
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  VariantResult r;
  r.out.assign(static_cast<std::size_t>(T_q * H * d_v), 0.0);
  r.lse.assign(static_cast<std::size_t>(T_q * H), neg_inf);
  const std::int64_t G = H / H_kv;
  std::vector<double> qt(static_cast<std::size_t>(d_k)), z(static_cast<std::size_t>(T_k));
  std::vector<char> vis(static_cast<std::size_t>(T_k));
  for (std::int64_t t = 0; t < T_q; ++t) {
    const std::int64_t p = q_offset + t, first = window > 0 ? p - window + 1 : std::numeric_limits<std::int64_t>::min();
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t j = h / G;
      for (std::int64_t e = 0; e < d_k; ++e) {
        if (vp.M.empty()) {
          qt[e] = static_cast<double>(q[(t * H + h) * d_k + e]);
          continue;
        }
        double s = 0;
        for (std::int64_t d = 0; d < d_k; ++d) s += static_cast<double>(q[(t * H + h) * d_k + d]) * vp.M[d * d_k + e];
        qt[e] = s;
      }
      double mx = vp.sinks.empty() ? neg_inf : vp.sinks[h];
      for (std::int64_t s = 0; s < T_k; ++s) {
        const std::int64_t ps = key_pos.empty() ? s : key_pos[s];
        vis[s] = ps >= first && ps <= p;
        if (!vis[s]) continue;
        double dot = 0;
        for (std::int64_t e = 0; e < d_k; ++e) dot += qt[e] * static_cast<double>(k[(s * H_kv + j) * d_k + e]);
        double zz = dot * scale;
        if (vp.cap > 0) zz = vp.cap * std::tanh(zz / vp.cap);
        if (!vp.slopes.empty()) zz += vp.slopes[h] * static_cast<double>(ps - p);
        z[s] = zz;
        mx = std::max(mx, zz);
      }
      if (mx == neg_inf) continue;  // no key and no sink
      double sum = vp.sinks.empty() ? 0.0 : std::exp(vp.sinks[h] - mx);
      for (std::int64_t s = 0; s < T_k; ++s)
        if (vis[s]) sum += std::exp(z[s] - mx);
      const double w_out = vp.out_scale.empty() ? 1.0 : vp.out_scale[t * H + h];
      double* o = &r.out[(t * H + h) * d_v];
      for (std::int64_t s = 0; s < T_k; ++s) {
        if (!vis[s]) continue;
        const double w = std::exp(z[s] - mx) / sum * w_out;
        for (std::int64_t d = 0; d < d_v; ++d) o[d] += w * static_cast<double>(v[(s * H_kv + j) * d_v + d]);
      }
      r.lse[t * H + h] = mx + std::log(sum);
    }
  }
  return r;
}

// R-GQA routing of one token's logits [H]: softmax per group (or over all), the top_k heads of
// each group by logit (ties to the lower head), ascending; weights by mode 0 none, 1 prob, 2 renorm.
struct RouteRef {
  std::vector<double> probs;   // [H]
  std::vector<int> heads;      // [H_kv * top_k]
  std::vector<double> weights; // [H_kv * top_k]
};
inline RouteRef route_ref(const float* logits, std::int64_t H, std::int64_t H_kv, int top_k, bool scope_all, int mode) {
  const std::int64_t G = H / H_kv;
  RouteRef r;
  r.probs.assign(static_cast<std::size_t>(H), 0.0);
  const auto softmax = [&](std::int64_t a, std::int64_t b) {
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (std::int64_t h = a; h < b; ++h) mx = std::max(mx, static_cast<double>(logits[h]));
    for (std::int64_t h = a; h < b; ++h) sum += std::exp(static_cast<double>(logits[h]) - mx);
    for (std::int64_t h = a; h < b; ++h) r.probs[h] = std::exp(static_cast<double>(logits[h]) - mx) / sum;
  };
  if (scope_all) softmax(0, H);
  else
    for (std::int64_t j = 0; j < H_kv; ++j) softmax(j * G, (j + 1) * G);
  for (std::int64_t j = 0; j < H_kv; ++j) {
    std::vector<int> idx(static_cast<std::size_t>(G));
    std::iota(idx.begin(), idx.end(), static_cast<int>(j * G));
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    idx.resize(static_cast<std::size_t>(top_k));
    std::sort(idx.begin(), idx.end());
    double kept = 0;
    for (int h : idx) kept += r.probs[h];
    for (int h : idx) {
      r.heads.push_back(h);
      r.weights.push_back(mode == 0 ? 1.0 : mode == 1 ? r.probs[h] : r.probs[h] / kept);
    }
  }
  return r;
}

}  // namespace attnkit::ref
