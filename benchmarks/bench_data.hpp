// benchmarks/bench_data.hpp — inputs shared by the kernel benchmarks: deterministic
// pseudo-random values in [-amplitude, amplitude) (a cheap LCG: the data only needs to be
// non-trivial), in memory from attnkit's allocator: huge pages for large buffers, as the KV
// caches and an engine's arena provide (4 KiB pages cost ~5% here: every K/V row of a
// [T, H_kv, d] layout sits in a different page).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/memory.hpp"

namespace attnkit::bench {

// Qwen3-0.6B attention heads: the shape every kernel benchmark uses.
inline constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;

// (query, key) pairs a causal (window 0) or sliding-window prefill of T tokens attends.
inline double attended_pairs(std::int64_t T, std::int64_t window) {
  double n = 0;
  for (std::int64_t t = 0; t < T; ++t) n += static_cast<double>(window > 0 ? std::min(t + 1, window) : t + 1);
  return n;
}

template <class T>
struct Buffer {
  std::shared_ptr<void> mem;
  T* data() const { return static_cast<T*>(mem.get()); }
};

template <class T>
Buffer<T> fill(std::int64_t n, std::uint32_t seed, float amplitude = 1.f) {
  Buffer<T> b{allocate_aligned_shared(static_cast<std::size_t>(n) * sizeof(T))};
  std::uint32_t s = seed;
  for (std::int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const float f = amplitude * (static_cast<float>(s >> 8) * (2.f / 16777216.f) - 1.f);
    if constexpr (std::is_same_v<T, bf16>) b.data()[i] = bf16(f);
    else b.data()[i] = f;
  }
  return b;
}

using clk = std::chrono::steady_clock;
inline double seconds(clk::time_point t0, clk::time_point t1) { return std::chrono::duration<double>(t1 - t0).count(); }

inline double median(std::vector<double> x) {
  if (x.empty()) return 0;
  std::sort(x.begin(), x.end());
  const std::size_t n = x.size();
  return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

// One untimed call for each of the n rotated data sets, before the timed loop rotates over
// them. The timed reads are then those of an engine that reads its cache every step, not the
// first reads of memory written seconds before in the setup: on the Zen 5 VM of 2026-12, whose
// host takes back memory its guest leaves untouched for a few seconds, such first reads ran at
// well under 1 GB/s (decode/int8/fast T 8192 rotates over 125 caches and google-benchmark ran it
// for 100 iterations, so every timed call was a first read: 3-12 ms a call instead of 0.45).
template <class Call>
void warm_rotation(std::int64_t n, Call&& call) {
  for (std::int64_t i = 0; i < n; ++i) call(i);
}

// A variant timed alternately with the plain kernel or model it varies, call for call: load
// from elsewhere on a shared machine skews one pair, not the medians of the pairs' ratios.
struct Paired {
  double variant_s = 0, plain_s = 0;       // totals
  std::vector<double> variant, plain;      // per pair
  void add(double variant_seconds, double plain_seconds) {
    variant_s += variant_seconds;
    plain_s += plain_seconds;
    variant.push_back(variant_seconds);
    plain.push_back(plain_seconds);
  }
  // Median of variant time / plain time (kernels: how much longer the variant takes).
  double time_ratio() const { return median(ratios(variant, plain)); }
  // Median of plain time / variant time (models: the variant's speed as a fraction of plain's).
  double speed_ratio() const { return median(ratios(plain, variant)); }

 private:
  static std::vector<double> ratios(const std::vector<double>& a, const std::vector<double>& b) {
    std::vector<double> r(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] / b[i];
    return r;
  }
};

}  // namespace attnkit::bench
