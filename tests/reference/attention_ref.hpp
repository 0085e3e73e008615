// tests/reference/attention_ref.hpp — float64 oracle for softmax attention (spec §2, §3).
//
// q [T_q, H, d_k], k [T_k, H_kv, d_k], v [T_k, H_kv, d_v], all contiguous row-major. Query row
// t sits at position q_offset + t and sees keys s with max(0, p - window + 1) <= s <= p
// (window = 0: causal, no lower bound). Query head h reads KV head h / (H / H_kv).
// Returns out [T_q, H, d_v] and lse [T_q, H] (natural log of the sum of exp of the scaled
// logits); a row that sees no key gets out = 0 and lse = -inf.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace attnkit::ref {

struct AttentionResult {
  std::vector<double> out;  // [T_q, H, d_v]
  std::vector<double> lse;  // [T_q, H]
};

template <class QT, class KT>
AttentionResult reference_attention(const std::vector<QT>& q, const std::vector<KT>& k, const std::vector<KT>& v,
                                    std::int64_t T_q, std::int64_t T_k, std::int64_t H, std::int64_t H_kv,
                                    std::int64_t d_k, std::int64_t d_v, std::int64_t q_offset, std::int64_t window,
                                    double scale) {
  AttentionResult r;
  r.out.assign(static_cast<std::size_t>(T_q * H * d_v), 0.0);
  r.lse.assign(static_cast<std::size_t>(T_q * H), -std::numeric_limits<double>::infinity());
  const std::int64_t G = H / H_kv;
  std::vector<double> logits(static_cast<std::size_t>(T_k));
  for (std::int64_t t = 0; t < T_q; ++t) {
    const std::int64_t p = q_offset + t;
    const std::int64_t first = window > 0 ? std::max<std::int64_t>(0, p - window + 1) : 0;
    const std::int64_t last = std::min(p, T_k - 1);
    if (last < first) continue;
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t j = h / G;
      double mx = -std::numeric_limits<double>::infinity();
      for (std::int64_t s = first; s <= last; ++s) {
        double dot = 0;
        for (std::int64_t d = 0; d < d_k; ++d)
          dot += static_cast<double>(q[(t * H + h) * d_k + d]) * static_cast<double>(k[(s * H_kv + j) * d_k + d]);
        logits[s] = dot * scale;
        mx = std::max(mx, logits[s]);
      }
      double sum = 0;
      for (std::int64_t s = first; s <= last; ++s) sum += std::exp(logits[s] - mx);
      double* o = &r.out[(t * H + h) * d_v];
      for (std::int64_t s = first; s <= last; ++s) {
        const double w = std::exp(logits[s] - mx) / sum;
        for (std::int64_t d = 0; d < d_v; ++d) o[d] += w * static_cast<double>(v[(s * H_kv + j) * d_v + d]);
      }
      r.lse[t * H + h] = mx + std::log(sum);
    }
  }
  return r;
}

}  // namespace attnkit::ref
