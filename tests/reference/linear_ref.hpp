// tests/reference/linear_ref.hpp — float64 oracle for PackedLinear: y = x W^T (+ y0).
#pragma once

#include <cstdint>
#include <vector>

namespace attnkit::ref {

// x [T, K] with row stride ldx, w [N, K] with row stride ldw (already the exact stored weight
// values), y0 [T, N] dense or nullptr. Returns y [T, N] dense, accumulated in double.
inline std::vector<double> linear(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, std::int64_t T,
                                  std::int64_t N, std::int64_t K, const float* y0 = nullptr) {
  std::vector<double> y(static_cast<std::size_t>(T * N));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < N; ++o) {
      double s = y0 ? static_cast<double>(y0[t * N + o]) : 0.0;
      for (std::int64_t k = 0; k < K; ++k)
        s += static_cast<double>(x[t * ldx + k]) * static_cast<double>(w[o * ldw + k]);
      y[static_cast<std::size_t>(t * N + o)] = s;
    }
  return y;
}

}  // namespace attnkit::ref
