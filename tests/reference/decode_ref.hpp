// tests/reference/decode_ref.hpp — float64 oracle for decode attention (one query token).
//
// q [H][d_k], k [T][H_kv][d_k], v [T][H_kv][d_v], all contiguous row-major floats (pass
// bf16-rounded values to check bf16 kernels). Query head h reads KV head h / (H / H_kv).
// Returns out [H][d_v] and lse [H] (natural log of Σ exp(scale · q·k)); T = 0 gives 0 / -inf.
// Keys listed in `keys` (indices into k/v) are the ones attended; by default all of them.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace attnkit::test {

struct DecodeRef {
  std::vector<double> out;  // [H][d_v]
  std::vector<double> lse;  // [H]
};

inline DecodeRef reference_decode(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                                  std::int64_t T, std::int64_t H, std::int64_t H_kv, std::int64_t dk, std::int64_t dv,
                                  double scale, std::int64_t first_key = 0) {
  DecodeRef r{std::vector<double>(static_cast<std::size_t>(H * dv), 0.0),
              std::vector<double>(static_cast<std::size_t>(H), -std::numeric_limits<double>::infinity())};
  const std::int64_t G = H / H_kv;
  for (std::int64_t h = 0; h < H; ++h) {
    const std::int64_t j = h / G;
    if (first_key >= T) continue;
    std::vector<double> s(static_cast<std::size_t>(T - first_key));
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t t = first_key; t < T; ++t) {
      double dot = 0;
      for (std::int64_t e = 0; e < dk; ++e)
        dot += static_cast<double>(q[h * dk + e]) * static_cast<double>(k[(t * H_kv + j) * dk + e]);
      s[t - first_key] = dot * scale;
      mx = std::max(mx, dot * scale);
    }
    double sum = 0;
    for (auto& x : s) sum += (x = std::exp(x - mx));
    for (std::int64_t t = first_key; t < T; ++t) {
      const double p = s[t - first_key] / sum;
      for (std::int64_t e = 0; e < dv; ++e) r.out[h * dv + e] += p * static_cast<double>(v[(t * H_kv + j) * dv + e]);
    }
    r.lse[h] = mx + std::log(sum);
  }
  return r;
}

}  // namespace attnkit::test
