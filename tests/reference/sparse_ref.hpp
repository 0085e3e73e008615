// tests/reference/sparse_ref.hpp — float64 oracle of DeepSeek-style sparse attention (spec §8):
// lightning-indexer scores, top-k selection, and softmax attention over the selected keys.
//
// index_q [T, H_I, d_I], index_k [T_k, d_I], index_w [T, H_I]; query t sits at position
// q_offset + t and sees keys s <= q_offset + t. q [T, H, d_k], k/v [T_k, H_kv, d], indices [T, K]
// (-1 = padding). All contiguous row-major.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace attnkit::ref {

// score [T, T_k]; -inf above each query's position. F: float inputs, or double (dequantised ones).
template <class F>
std::vector<double> indexer_scores(const std::vector<F>& iq, const std::vector<F>& ik, const std::vector<F>& iw,
                                   std::int64_t T, std::int64_t T_k, std::int64_t H_I, std::int64_t d_I,
                                   std::int64_t q_offset) {
  std::vector<double> s(static_cast<std::size_t>(T * T_k), -std::numeric_limits<double>::infinity());
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t k = 0; k <= q_offset + t; ++k) {
      double sum = 0;
      for (std::int64_t j = 0; j < H_I; ++j) {
        double dot = 0;
        for (std::int64_t e = 0; e < d_I; ++e)
          dot += static_cast<double>(iq[static_cast<std::size_t>((t * H_I + j) * d_I + e)]) *
                 static_cast<double>(ik[static_cast<std::size_t>(k * d_I + e)]);
        sum += static_cast<double>(iw[static_cast<std::size_t>(t * H_I + j)]) * std::max(dot, 0.0);
      }
      s[static_cast<std::size_t>(t * T_k + k)] = sum;
    }
  return s;
}

// The top min(K, n) of row[0, n) (ties: lower index), ascending, -1 padded to K: by a full sort.
template <class S>
std::vector<std::int32_t> topk_row(const S* row, std::int64_t n, std::int64_t K) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return row[a] > row[b]; });
  order.resize(static_cast<std::size_t>(std::min(n, K)));
  std::sort(order.begin(), order.end());
  order.resize(static_cast<std::size_t>(K), -1);
  return order;
}

// out [T, H, d_v] (and lse [T, H]) of attention restricted to each query's listed keys.
template <class QT, class KT>
void sparse_attention(const std::vector<QT>& q, const std::vector<KT>& k, const std::vector<KT>& v,
                      const std::vector<std::int32_t>& idx, std::int64_t T, std::int64_t K, std::int64_t H,
                      std::int64_t H_kv, std::int64_t d_k, std::int64_t d_v, double scale, std::vector<double>& out,
                      std::vector<double>& lse) {
  out.assign(static_cast<std::size_t>(T * H * d_v), 0.0);
  lse.assign(static_cast<std::size_t>(T * H), -std::numeric_limits<double>::infinity());
  const std::int64_t G = H / H_kv;
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t j = h / G;
      std::vector<double> logit;
      std::vector<std::int64_t> keys;
      for (std::int64_t i = 0; i < K; ++i) {
        const std::int64_t s = idx[static_cast<std::size_t>(t * K + i)];
        if (s < 0) continue;
        double dot = 0;
        for (std::int64_t e = 0; e < d_k; ++e)
          dot += static_cast<double>(q[static_cast<std::size_t>((t * H + h) * d_k + e)]) *
                 static_cast<double>(k[static_cast<std::size_t>((s * H_kv + j) * d_k + e)]);
        logit.push_back(dot * scale);
        keys.push_back(s);
      }
      if (keys.empty()) continue;
      const double mx = *std::max_element(logit.begin(), logit.end());
      double sum = 0;
      for (double l : logit) sum += std::exp(l - mx);
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const double w = std::exp(logit[i] - mx) / sum;
        for (std::int64_t e = 0; e < d_v; ++e)
          out[static_cast<std::size_t>((t * H + h) * d_v + e)] +=
              w * static_cast<double>(v[static_cast<std::size_t>((keys[i] * H_kv + j) * d_v + e)]);
      }
      lse[static_cast<std::size_t>(t * H + h)] = mx + std::log(sum);
    }
}

}  // namespace attnkit::ref
