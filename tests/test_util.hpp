// tests/test_util.hpp — helpers shared by the test executables: seeded random data, poisoning,
// relative L2 error with NaN detection.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "attnkit/core/bf16.hpp"

namespace attnkit::test {

// Randomised kernel tests run fewer and smaller cases under ASan/UBSan (about 10x slower).
#if defined(ATTNKIT_SANITIZED)
inline constexpr int kScale = 4;
#else
inline constexpr int kScale = 1;
#endif

// A fresh seed per call (so every case sees new inputs) that is printed on failure by the caller.
// ATTNKIT_TEST_SEED=<seed> replays a printed seed (every call returns it).
inline std::uint64_t fresh_seed() {
  if (const char* fixed = std::getenv("ATTNKIT_TEST_SEED")) return std::strtoull(fixed, nullptr, 0);
  static std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(std::uint64_t seed) : gen(seed) {}
  float uniform(float lo = -1.f, float hi = 1.f) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
  float normal(float stddev = 1.f) { return std::normal_distribution<float>(0.f, stddev)(gen); }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {  // inclusive
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(gen);
  }
  std::vector<float> normal_vec(std::size_t n, float stddev = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(stddev);
    return v;
  }
};

// Fills with NaN so any element a kernel forgets to write fails the comparison.
template <class T>
void poison(std::vector<T>& v) {
  for (auto& x : v) {
    if constexpr (std::is_same_v<T, bf16>) x = bf16(std::numeric_limits<float>::quiet_NaN());
    else x = std::numeric_limits<T>::quiet_NaN();
  }
}

// ||a - b|| / ||b|| over n elements; returns +inf if any element of a or b is not finite, so NaN
// never passes a bound. If ||b|| == 0 returns ||a - b||.
template <class A, class B>
double rel_l2(const A* a, const B* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(to_float(a[i])), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
template <class A, class B>
double rel_l2(const std::vector<A>& a, const std::vector<B>& b) {
  return a.size() == b.size() ? rel_l2(a.data(), b.data(), a.size()) : std::numeric_limits<double>::infinity();
}

inline double to_float(double x) { return x; }

template <class A>
double l2_norm(const std::vector<A>& a) {
  double s = 0;
  for (const auto& x : a) s += static_cast<double>(to_float(x)) * static_cast<double>(to_float(x));
  return std::sqrt(s);
}

// ||a - b|| / ||mag||: the error of an attention output against the scale of its sum. Rounding
// in Σ p·v scales with Σ p·|v| (attention over |v|: `mag`), not with the output, which a
// near-cancelling average (small d_v) can make arbitrarily small; a plain relative error is
// then flaky. mag must not be all zeros unless a == b.
template <class A, class B>
double err_vs_magnitude(const std::vector<A>& a, const std::vector<B>& b, const std::vector<B>& mag) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double num = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(to_float(a[i])), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    num += (x - y) * (x - y);
  }
  const double n = l2_norm(mag);
  return std::sqrt(num) / (n > 0 ? n : 1.0);
}

// n normal values stored as T in x, and as float in f exactly as the kernel will read them
// (bf16-rounded when T = bf16): what a float64 reference should be fed.
template <class T>
void rounded_normal(Rng& rng, std::size_t n, std::vector<float>& f, std::vector<T>& x) {
  f = rng.normal_vec(n);
  x.resize(n);
  convert(f.data(), x.data(), static_cast<long>(n));
  convert(x.data(), f.data(), static_cast<long>(n));
}

template <class T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace attnkit::test
