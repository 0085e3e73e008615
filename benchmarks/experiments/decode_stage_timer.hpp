// benchmarks/experiments/decode_stage_timer.hpp — the stage timer of the decode experiments
// (decode_bf16_ceiling.cpp, decode_int8_stages.cpp): one block stage of attention/decode.hpp run
// over the blocks of a T-key chunk that stays in L1/L2, in TSC cycles per key row (the TSC ticks
// at the nominal clock), the median of 31 passes of 10240 rows.
#pragma once

#include <x86intrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "attnkit/attention/decode.hpp"

inline double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// f(b) runs the stage on the block of keys [b, b + kBlock).
template <class F>
double stage_cycles_per_row(std::int64_t T, F&& f) {
  using attnkit::detail::decode::kBlock;
  std::vector<double> c;
  for (int r = 0; r < 31; ++r) {
    const auto t0 = __rdtsc();
    for (std::int64_t it = 0; it < 10240 / T; ++it)
      for (std::int64_t b = 0; b < T; b += kBlock) f(b);
    c.push_back(double(__rdtsc() - t0) / 10240.0);
  }
  return median_of(std::move(c));
}
