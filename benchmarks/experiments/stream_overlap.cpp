// benchmarks/experiments/stream_overlap.cpp — how much DRAM bandwidth a stream keeps when the core
// also computes on every line it reads: the question behind decode's bw_frac (attention/decode.hpp
// spends ~27 cycles per bf16 K+V row of 512 bytes, so its in-cache rate is only ~1.8x the DRAM
// rate on two cores). Each 64-byte line is widened bf16 -> f32 and multiply-added W times (W = 1:
// a GEMV's work; W = 3: about the decode kernel's per-byte work), with software prefetch D lines
// ahead (0: the hardware prefetcher alone) and hint H (0: T0, 2: T2). Two threads, 2 GiB,
// transparent huge pages. Not built by CMake:
//   g++ -O3 -march=native -fopenmp benchmarks/experiments/stream_overlap.cpp
// Measured 2026-11-29 (2 threads, DRAM read ~30 GB/s): W 3 (49 GB/s in L2) streams 14-16 GB/s
// with D 0 and 26-27 with D >= 64; W 1 reaches 28-29. The decode kernel, at 55 GB/s in L2, gets
// 21: its compute and its misses take turns although its rows are prefetched a block ahead.
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <vector>
#include <algorithm>
// Stream N bytes with W widen+FMA pairs of work per 64-byte line; software prefetch D lines ahead (0 = none), hint H.
template <int W, int H>
float run(const unsigned char* a, size_t bytes, int D) {
  __m512 acc[8];
  for (auto& x : acc) x = _mm512_setzero_ps();
  const __m512 q = _mm512_set1_ps(1.0001f);
  const size_t lines = bytes / 64;
  for (size_t i = 0; i < lines; ++i) {
    if (D) {
      if (H == 0) _mm_prefetch((const char*)a + (i + D) * 64, _MM_HINT_T0);
      else if (H == 1) _mm_prefetch((const char*)a + (i + D) * 64, _MM_HINT_T1);
      else _mm_prefetch((const char*)a + (i + D) * 64, _MM_HINT_T2);
    }
    __m512i x = _mm512_load_si512(a + i * 64);
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      __m512 o = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(0xffff0000)));
      acc[w % 8] = _mm512_fmadd_ps(q, e, acc[w % 8]);
      acc[(w + 4) % 8] = _mm512_fmadd_ps(q, o, acc[(w + 4) % 8]);
      x = _mm512_add_epi32(x, _mm512_set1_epi32(1));
    }
  }
  __m512 s = acc[0];
  for (int k = 1; k < 8; ++k) s = _mm512_add_ps(s, acc[k]);
  return _mm512_reduce_add_ps(s);
}
template <int W, int H>
double rate(const unsigned char* base, size_t total, size_t chunk, int D, int reps) {
  // each thread streams its own half, chunk by chunk, rotating over total
  std::vector<double> r;
  volatile float sink = 0;
  for (int rep = 0; rep < reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    size_t done = 0;
#pragma omp parallel num_threads(2) reduction(+:done)
    {
      int t = omp_get_thread_num();
      size_t half = total / 2;
      const unsigned char* p = base + t * half;
      float s = 0;
      for (size_t off = 0; off + chunk <= half; off += chunk) { s += run<W, H>(p + off, chunk, D); done += chunk; }
      sink = s;
    }
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.push_back(done / sec * 1e-9);
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}
int main() {
  size_t total = size_t(2) << 30;
  unsigned char* a = (unsigned char*)aligned_alloc(1 << 21, total);
  madvise(a, total, MADV_HUGEPAGE);
  memset(a, 1, total);
  size_t small = 1 << 20;  // per thread 512 KiB in L2
  auto row = [&](const char* name, auto f_small, auto f_big) {
    std::printf("%s: L2 %.1f GB/s | DRAM ", name, f_small());
    for (int D : {0, 16, 32, 64, 128, 256}) std::printf("D%d %.1f  ", D, f_big(D));
    std::printf("\n");
  };
#define ROW(W, H) row("W" #W " H" #H, [&] { return rate<W, H>(a, small, small / 2, 0, 200); }, \
                         [&](int D) { return rate<W, H>(a, total, total / 2, D, 3); });
  ROW(1, 2) ROW(2, 2) ROW(3, 2) ROW(4, 2) ROW(2, 0) ROW(3, 0)
}
