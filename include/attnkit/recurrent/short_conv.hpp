// attnkit/recurrent/short_conv.hpp — the causal depthwise short convolution in front of linear-time
// mixers (Gated DeltaNet's q/k/v conv, spec §7.2), with its decode state.
//
//     y[t, c] = act( Σ_{j=0}^{K-1} w[c, j] · x[t − K + 1 + j, c] )
//
// where inputs before the first token of this call come from `state` [K−1, C]: the previous
// K−1 inputs of each channel, oldest first (zeros for a fresh sequence). After the call the state
// holds the last K−1 inputs seen, so prefill, chunked prefill and decode (T = 1) agree exactly.
// Shapes: x, y [T, C] (contiguous rows, any row stride; y may be x: the tokens are processed
// from the last to the first); weight [C, K] (a checkpoint's [C, 1, K] conv1d.weight, flattened);
// state [K−1, C] (rows contiguous; K = 1 needs no state and takes a [0, C] view).
// Threads split the channels; results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

enum class ConvActivation { none, silu };

struct ShortConvOptions {
  ConvActivation activation = ConvActivation::silu;
  int num_threads = 0;
};

inline void causal_conv1d(ConstView2<float> x, ConstView2<float> weight, View2<float> state, View2<float> y,
                          const ShortConvOptions& opt = {}) {
  const char* fn = "causal_conv1d";
  check_view(x, fn, "x");
  check_view(weight, fn, "weight");
  check_view(y, fn, "y");
  const std::int64_t T = x.shape[0], C = x.shape[1], K = weight.shape[1];
  ATTNKIT_REQUIRE(K >= 1, fn, ": argument 'weight': kernel size must be at least 1, got ", K);
  ATTNKIT_REQUIRE(weight.shape[0] == C, fn, ": argument 'weight': ", weight.shape[0], " channels, x has ", C);
  ATTNKIT_REQUIRE(y.shape == x.shape, fn, ": argument 'y': shape ", detail::shape_string(y), " differs from x ",
                  detail::shape_string(x));
  ATTNKIT_REQUIRE(state.shape[0] == K - 1 && state.shape[1] == C, fn, ": argument 'state': shape ",
                  detail::shape_string(state), ", expected [", K - 1, ", ", C, "] (the previous kernel-1 inputs)");
  if (K > 1) check_view(state, fn, "state");
  if (T == 0) return;
  // Channel blocks: each thread owns whole columns, so y may alias x.
  constexpr std::int64_t block = 64;
  const std::int64_t blocks = (C + block - 1) / block;
  parallel_for(blocks, T * C >= 16384 ? opt.num_threads : 1, [&](std::int64_t b) {
    ATTNKIT_FAULT_POINT("recurrent");
    const std::int64_t c0 = b * block, n = std::min(block, C - c0);
    std::vector<float> w(static_cast<std::size_t>(K * n));  // [K, n]: taps of a block side by side
    for (std::int64_t c = 0; c < n; ++c)
      for (std::int64_t j = 0; j < K; ++j) w[static_cast<std::size_t>(j * n + c)] = weight(c0 + c, j);
    // The inputs before this call and the inputs the next call needs, saved before y overwrites x.
    std::vector<float> prev(static_cast<std::size_t>((K - 1) * n));
    for (std::int64_t r = 0; r < K - 1; ++r) std::copy(state.ptr(r) + c0, state.ptr(r) + c0 + n, prev.data() + r * n);
    for (std::int64_t r = 0; r < K - 1; ++r) {  // the last K-1 of (previous inputs ++ x)
      const std::int64_t src = T - (K - 1) + r;
      if (src >= 0) std::copy(x.ptr(src) + c0, x.ptr(src) + c0 + n, state.ptr(r) + c0);
      else std::copy(prev.data() + (K - 1 + src) * n, prev.data() + (K - 1 + src) * n + n, state.ptr(r) + c0);
    }
    std::vector<float> acc(static_cast<std::size_t>(n));
    for (std::int64_t t = T - 1; t >= 0; --t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (std::int64_t j = 0; j < K; ++j) {
        const std::int64_t s = t - K + 1 + j;  // input position of tap j
        const float* in = s >= 0 ? x.ptr(s) + c0 : prev.data() + (K - 1 + s) * n;
        const float* wj = w.data() + j * n;
        for (std::int64_t c = 0; c < n; ++c) acc[c] += wj[c] * in[c];
      }
      float* out = y.ptr(t) + c0;
      if (opt.activation == ConvActivation::silu)
        for (std::int64_t c = 0; c < n; ++c) out[c] = acc[c] / (1.f + std::exp(-acc[c]));
      else
        std::copy(acc.begin(), acc.end(), out);
    }
  });
}

}  // namespace attnkit
