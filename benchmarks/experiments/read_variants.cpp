// benchmarks/experiments/read_variants.cpp — is the read roofline (benchmarks/roofline.hpp: a
// plain sequential sum over 1 GiB, best of 5 passes) what this host's cores can read? On one AMX
// device host (2026-12-06) the model's decode step read 1.03-1.07x and its weight GEMVs alone
// 1.29-1.36x of the read pass taken just before them, so that pass had fallen short there. This
// program times, alternated round by round on the same threads:
//   plain N      the roofline's sum over N MiB (256: partly in a large L3; 1024: the roofline; 4096)
//   pf<D>        the same sum with a software prefetch (T0) D bytes ahead of each 64-byte line
//   pf2<D>       the same with the prefetch into L2 (T1)
//   streams<S>   S sequential streams per thread (interleaved 4 KiB at a time), as decode's K and V
// and prints each variant's median and best GB/s over the rounds.
// Used on 2026-12-06 on a second AMX host (the first was gone): plain 29.2-30.0 GB/s (medians of
// 15), prefetching 24.5-29.4, streams 27.4-28.4, 256 MiB again no faster (no L3 reuse); the
// model's step there stayed below the plain read, so the roofline stays the plain read (README's
// "Where the open targets stand").
// Not built by CMake:
//   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -Iinclude -Ibenchmarks \
//       benchmarks/experiments/read_variants.cpp -o read_variants && ./read_variants 7
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "roofline.hpp"

using namespace attnkit;
namespace rl = bench::roofline_detail;
using clk = std::chrono::steady_clock;

namespace {

constexpr int kThreads = 2;

template <int Hint>
float sum_prefetch(const float* p, std::int64_t b, std::int64_t e, std::int64_t ahead_floats) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  const char* end = reinterpret_cast<const char*>(p + e);
  for (std::int64_t i = b; i + 64 <= e; i += 64) {
    const char* f = reinterpret_cast<const char*>(p + i + ahead_floats);
    if (f < end) {
      _mm_prefetch(f, Hint == 0 ? _MM_HINT_T0 : _MM_HINT_T1);
      _mm_prefetch(f + 64, Hint == 0 ? _MM_HINT_T0 : _MM_HINT_T1);
      _mm_prefetch(f + 128, Hint == 0 ? _MM_HINT_T0 : _MM_HINT_T1);
      _mm_prefetch(f + 192, Hint == 0 ? _MM_HINT_T0 : _MM_HINT_T1);
    }
    s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
    s1 = _mm512_add_ps(s1, _mm512_load_ps(p + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_load_ps(p + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_load_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// S streams over [b, e): stream j starts at b + j (e - b) / S; 4 KiB of each in turn.
float sum_streams(const float* p, std::int64_t b, std::int64_t e, int S) {
  const std::int64_t len = (e - b) / S / 1024 * 1024;
  float s = 0;
  for (std::int64_t o = 0; o < len; o += 1024)
    for (int j = 0; j < S; ++j) s += rl::sum_range(p, b + j * len + o, b + j * len + o + 1024);
  return s;
}

double pass(const float* p, std::int64_t n, const std::function<float(const float*, std::int64_t, std::int64_t)>& f) {
  std::vector<float> sums(kThreads);
  const auto t0 = clk::now();
  parallel_for(kThreads, kThreads, [&](std::int64_t t) {
    const std::int64_t b = (n / 1024) * t / kThreads * 1024, e = (n / 1024) * (t + 1) / kThreads * 1024;
    sums[t] = f(p, b, e);
  });
  const double s = std::chrono::duration<double>(clk::now() - t0).count();
  bench::roofline_detail::keep(sums[0]);
  return double(n) * 4 / s * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 7;
  const std::int64_t MiB = (1 << 20) / 4;
  const auto big = rl::make_read_buffer(4096 * MiB, kThreads);
  struct Case {
    std::string name;
    std::int64_t n;
    std::function<float(const float*, std::int64_t, std::int64_t)> f;
    std::vector<double> g;
  };
  std::vector<Case> cases;
  const auto plain = [](const float* p, std::int64_t b, std::int64_t e) { return rl::sum_range(p, b, e); };
  cases.push_back({"plain 256 MiB", 256 * MiB, plain, {}});
  cases.push_back({"plain 256 MiB, again", 256 * MiB, plain, {}});  // right after: what a large L3 keeps
  cases.push_back({"plain 1024 MiB", 1024 * MiB, plain, {}});
  cases.push_back({"plain 4096 MiB", 4096 * MiB, plain, {}});
  for (int d : {512, 1024, 2048, 4096})
    cases.push_back({"pf T0 +" + std::to_string(d) + " B, 1024 MiB", 1024 * MiB,
                     [d](const float* p, std::int64_t b, std::int64_t e) { return sum_prefetch<0>(p, b, e, d / 4); }, {}});
  for (int d : {2048, 8192})
    cases.push_back({"pf T1 +" + std::to_string(d) + " B, 1024 MiB", 1024 * MiB,
                     [d](const float* p, std::int64_t b, std::int64_t e) { return sum_prefetch<1>(p, b, e, d / 4); }, {}});
  for (int s : {2, 4})
    cases.push_back({"streams " + std::to_string(s) + ", 1024 MiB", 1024 * MiB,
                     [s](const float* p, std::int64_t b, std::int64_t e) { return sum_streams(p, b, e, s); }, {}});
  for (auto& c : cases) pass(big.get(), c.n, c.f);  // warm-up
  for (int r = 0; r < rounds; ++r)
    for (auto& c : cases) c.g.push_back(pass(big.get(), c.n, c.f));
  std::printf("%-28s %8s %8s  (GB/s, %d threads, %d rounds)\n", "read", "median", "best", kThreads, rounds);
  for (auto& c : cases) {
    std::sort(c.g.begin(), c.g.end());
    std::printf("%-28s %8.1f %8.1f\n", c.name.c_str(), c.g[c.g.size() / 2], c.g.back());
  }
}
