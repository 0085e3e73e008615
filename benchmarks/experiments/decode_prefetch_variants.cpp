// benchmarks/experiments/decode_prefetch_variants.cpp — the decode kernel's memory pattern
// (attention/decode.hpp, attention/batched_decode.hpp) without its arithmetic details: two
// streams, K and V, of rows of 256 bytes (bf16, d = 128) S bytes apart (S 256: one KV head's
// rows contiguous; S 2048: the rows of one head in HND pages of 8 heads), read in blocks of 32
// rows, K block then V block, with W widen+FMA pairs of work per 64-byte line (W 2-3: about the
// kernel's), under software prefetch variants PF:
//   0 none; 1 the kernel's: on each row read, the same row of the next block (4 lines, T0);
//   2 the same into L2 (T2); 3 two blocks ahead; 4 the next block of both streams in each phase;
//   6 half the lines of each row; 7 one line per row; 8 PF 1 plus an L2 prefetch two blocks ahead.
// Items of 512 rows (g_chunk; 0: one item per thread's whole region), 2 threads, 2 GiB, THP.
// Not built by CMake:  g++ -O3 -march=native -fopenmp benchmarks/experiments/decode_prefetch_variants.cpp
// Measured 2026-11-29 (DRAM read ~29-31 GB/s): S 256: PF 0 16-19 GB/s, PF 1 19-23, the others
// 16-21; S 2048: PF 0 8-9, PF 1 15-17, PF 8 15-17, PF 6/7 7-11. No variant beats the kernel's
// (PF 1), and the kernel itself (19.5-21 GB/s contiguous) matches this synthetic with its work
// per byte: the 0.80 bw_frac target needs less compute per byte, not another prefetch scheme.
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <vector>
#include <algorithm>
// Two streams K and V, rows of 256 B at stride S bytes; blocks of 32 rows: K block then V block.
// PF: 0 none, 1 same row of next block T0 (kernel), 2 next block T2, 3 two blocks ahead T0, 4 next block both streams during each phase
static inline void work(const unsigned char* p, __m512* acc, int W) {
  __m512i x = _mm512_load_si512(p);
  const __m512 q = _mm512_set1_ps(1.0001f);
#pragma GCC unroll 8
  for (int w = 0; w < W; ++w) {
    __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    __m512 o = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(0xffff0000)));
    acc[w % 8] = _mm512_fmadd_ps(q, e, acc[w % 8]);
    acc[(w + 4) % 8] = _mm512_fmadd_ps(q, o, acc[(w + 4) % 8]);
    x = _mm512_add_epi32(x, _mm512_set1_epi32(1));
  }
}
template <int PF, int W, bool ONE = false>
float run(const unsigned char* K, const unsigned char* V, size_t rows, size_t S) {
  __m512 a[8];
  for (auto& x : a) x = _mm512_setzero_ps();
  for (size_t b = 0; b < rows; b += ONE ? 64 : 32) {
    if (ONE) V = K + 32 * S;
    const bool more = b + (ONE ? 64 : 32) < rows;
    for (int ph = 0; ph < 2; ++ph) {
      const unsigned char* X = ONE ? K + ph * 32 * S : (ph ? V : K);
      const unsigned char* Y = ph ? K : V;
      for (int i = 0; i < 32; ++i) {
        const unsigned char* r = X + (b + i) * S;
        if (more) {
          if (PF == 1) for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)r + 32 * S + 64 * l, _MM_HINT_T0);
          if (PF == 2) for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)r + 32 * S + 64 * l, _MM_HINT_T2);
          if (PF == 3 && b + 64 < rows) for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)r + 64 * S + 64 * l, _MM_HINT_T0);
          if (PF == 6) { _mm_prefetch((const char*)r + 32 * S, _MM_HINT_T0); _mm_prefetch((const char*)r + 32 * S + 128, _MM_HINT_T0); }
          if (PF == 7) _mm_prefetch((const char*)r + 32 * S, _MM_HINT_T0);
          if (PF == 8) { _mm_prefetch((const char*)r + 64 * S, _MM_HINT_T2); _mm_prefetch((const char*)r + 64 * S + 128, _MM_HINT_T2); for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)r + 32 * S + 64 * l, _MM_HINT_T0); }
          if (PF == 4) { for (int l = 0; l < 2; ++l) { _mm_prefetch((const char*)r + 32 * S + 64 * (l + 2 * ph), _MM_HINT_T0);
                         _mm_prefetch((const char*)(Y + (b + i) * S) + 32 * S + 64 * (l + 2 * ph), _MM_HINT_T0);} }
        }
#pragma GCC unroll 4
        for (int l = 0; l < 4; ++l) { if (PF == 5 && more) _mm_prefetch((const char*)r + 32 * S + 64 * l, _MM_HINT_T0); work(r + 64 * l, a, W); }
      }
    }
  }
  __m512 s = a[0];
  for (int k = 1; k < 8; ++k) s = _mm512_add_ps(s, a[k]);
  return _mm512_reduce_add_ps(s);
}
static size_t g_chunk = 512;
template <int PF, int W, bool ONE = false>
double rate(unsigned char* base, size_t total, size_t S, int reps) {
  std::vector<double> r;
  volatile float sink = 0;
  for (int rep = 0; rep < reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    size_t done = 0;
#pragma omp parallel num_threads(2) reduction(+:done)
    {
      int t = omp_get_thread_num();
      size_t half = total / 2;
      unsigned char* p = base + t * half;
      // K region first half of p, V second; "heads" = S/256 interleaved rows
      size_t region = half / 2;
      size_t heads = S / 256;
      size_t rows = region / S;
      size_t chunk = g_chunk ? std::min(g_chunk, rows) : rows;
      float s = 0;
      for (size_t c = 0; c + chunk <= rows; c += chunk)
        for (size_t h = 0; h < heads; ++h) {
          s += run<PF, W, ONE>(p + c * S + h * 256, p + region + c * S + h * 256, chunk, S);
          done += (ONE ? 1 : 2) * chunk * 256;
        }
      sink = s;
    }
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.push_back(done / sec * 1e-9);
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}
int main(int argc, char** argv) {
  size_t total = size_t(2) << 30;
  unsigned char* a = (unsigned char*)aligned_alloc(1 << 21, total);
  madvise(a, total, MADV_HUGEPAGE);
  memset(a, 1, total);
  g_chunk = 512;
  for (int rep = 0; rep < 2; ++rep)
  for (size_t S : {256, 2048})
    std::printf("two streams S%zu W2: PF0 %.1f PF1 %.1f PF6 %.1f PF7 %.1f PF8 %.1f | W3: PF1 %.1f PF6 %.1f PF7 %.1f PF8 %.1f\n", S,
      rate<0,2>(a,total,S,3), rate<1,2>(a,total,S,3), rate<6,2>(a,total,S,3), rate<7,2>(a,total,S,3), rate<8,2>(a,total,S,3),
      rate<1,3>(a,total,S,3), rate<6,3>(a,total,S,3), rate<7,3>(a,total,S,3), rate<8,3>(a,total,S,3));
}
