// benchmarks/roofline.hpp — measured machine ceilings that benchmarks divide by.
//
// roofline() measures, once per process and lazily, with the OpenMP default thread count:
//  * fma_gflops  — fp32 FMA peak: every thread runs 16 independent AVX-512 FMA chains held in
//                  registers (2 flops x 16 lanes per instruction);
//  * bf16_gflops — bf16 dot-product peak: 16 independent vdpbf16ps chains (2 flops x 32 products
//                  per instruction);
//  * int8_gops   — int8 dot-product peak: 16 independent vpdpbusd chains (2 ops x 64 products
//                  per instruction; AVX512-VNNI, else the fp32 FMA figure);
//  * amx_bf16_gflops — AMX bf16 peak: every thread asks for the tile state (amx_permitted(), once
//                  per process), configures its tiles as the linear kernels do (amx_configure():
//                  eight 16 x 64-byte tiles) and runs tdpbf16ps on four independent accumulator
//                  tiles from two activation and two weight tiles that stay in the tile registers
//                  (2 flops x 16 x 16 x 32 products per instruction); 0 where AMX is not usable;
//  * read_gbps   — DRAM read bandwidth: each thread sums a disjoint part of a 1 GiB buffer with
//                  AVX-512 loads (the buffer is far larger than any cache level, including the
//                  480 MiB host LLC a VM may report), best of several passes.
// The results are printed once to stderr. Benchmarks report achieved / roofline().x as a fraction.
// The bench_decode.cpp translation unit registers the Google Benchmark cases roofline/fp32_fma,
// roofline/bf16_dot, roofline/amx_bf16 and roofline/mem_read, which run the same measurement
// kernels.
//
// linear_peak() says which of these ceilings a PackedLinear call runs against (the one place
// that knows PackedLinear's code paths): AMX for bf16 weights with more than 8 tokens where AMX
// is usable (Precision fast and exact alike) and for q8 weights under fast, the fp32 FMA peak otherwise (bf16 weights are
// widened to f32; no linear path uses vdpbf16ps). attention_prefill_peak() does the same for
// attention_prefill (AMX under Precision::fast, FMA under exact). No kernel path of the library
// runs on vdpbf16ps today; bf16_gflops is the ceiling for one that would.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "attnkit/core/memory.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/linalg/detail/linear_kernels.hpp"
#include "attnkit/linalg/packed_linear.hpp"

namespace attnkit::bench {

struct Roofline {
  double fma_gflops;
  double bf16_gflops;
  double amx_bf16_gflops;  // 0: AMX not usable here (not compiled for, or the kernel refused the tile state)
  double int8_gops;        // vpdpbusd (u8 x s8 -> int32); the fp32 FMA figure without AVX512-VNNI
  double read_gbps;
};

namespace roofline_detail {

using clock = std::chrono::steady_clock;

inline double seconds_since(clock::time_point t0) {
  return std::chrono::duration<double>(clock::now() - t0).count();
}

// Keeps a value alive so the compiler cannot drop the loop that produced it.
template <class T>
inline void keep(const T& v) {
  asm volatile("" : : "r,m"(v) : "memory");
}

// The three chain kernels below spell out their 16 accumulators as named variables on purpose:
// folded into one template over an array (c[j] = step(c[j]) in an unrolled loop), GCC 12 kept
// the array on the stack and measured 0.30 (FMA) to 0.49 (vpdpbusd) of these figures.
// One thread: `iters` rounds of 16 independent FMA chains; returns the flop count.
inline double fma_thread(std::int64_t iters) {
#if defined(__AVX512F__)
  // acc = acc * a + b converges towards 1 and never reaches inf or a denormal.
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
  __m512 c0 = _mm512_set1_ps(0.1f), c1 = _mm512_set1_ps(0.2f), c2 = _mm512_set1_ps(0.3f),
         c3 = _mm512_set1_ps(0.4f), c4 = _mm512_set1_ps(0.5f), c5 = _mm512_set1_ps(0.6f),
         c6 = _mm512_set1_ps(0.7f), c7 = _mm512_set1_ps(0.8f), c8 = _mm512_set1_ps(0.9f),
         c9 = _mm512_set1_ps(1.0f), c10 = _mm512_set1_ps(1.1f), c11 = _mm512_set1_ps(1.2f),
         c12 = _mm512_set1_ps(1.3f), c13 = _mm512_set1_ps(1.4f), c14 = _mm512_set1_ps(1.5f),
         c15 = _mm512_set1_ps(1.6f);
  for (std::int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_fmadd_ps(c0, a, b);
    c1 = _mm512_fmadd_ps(c1, a, b);
    c2 = _mm512_fmadd_ps(c2, a, b);
    c3 = _mm512_fmadd_ps(c3, a, b);
    c4 = _mm512_fmadd_ps(c4, a, b);
    c5 = _mm512_fmadd_ps(c5, a, b);
    c6 = _mm512_fmadd_ps(c6, a, b);
    c7 = _mm512_fmadd_ps(c7, a, b);
    c8 = _mm512_fmadd_ps(c8, a, b);
    c9 = _mm512_fmadd_ps(c9, a, b);
    c10 = _mm512_fmadd_ps(c10, a, b);
    c11 = _mm512_fmadd_ps(c11, a, b);
    c12 = _mm512_fmadd_ps(c12, a, b);
    c13 = _mm512_fmadd_ps(c13, a, b);
    c14 = _mm512_fmadd_ps(c14, a, b);
    c15 = _mm512_fmadd_ps(c15, a, b);
    // Forces the accumulators to stay in registers and the loop to stay a loop.
    asm volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7));
    asm volatile("" : "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11), "+v"(c12), "+v"(c13), "+v"(c14), "+v"(c15));
  }
  __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                           _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
  s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
                                     _mm512_add_ps(_mm512_add_ps(c12, c13), _mm512_add_ps(c14, c15))));
  keep(s);
  return static_cast<double>(iters) * 16 * 16 * 2;
#else
  float c[16];
  for (int j = 0; j < 16; ++j) c[j] = 0.1f * static_cast<float>(j + 1);
  for (std::int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < 16; ++j) c[j] = c[j] * 0.999999f + 1e-6f;
    asm volatile("" : : "r"(c) : "memory");
  }
  keep(c[0]);
  return static_cast<double>(iters) * 16 * 2;
#endif
}

// One thread: `iters` rounds of 16 independent vdpbf16ps chains; returns the flop count.
inline double bf16_thread(std::int64_t iters) {
#if defined(__AVX512BF16__)
  // bf16 pairs (1.0, 2^-20): products are tiny additions, so the sums stay finite.
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x35803f80), b = (__m512bh)_mm512_set1_epi32(0x35803580);
  __m512 c[16];
  for (int j = 0; j < 16; ++j) c[j] = _mm512_set1_ps(0.1f * static_cast<float>(j + 1));
  __m512 c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5], c6 = c[6], c7 = c[7], c8 = c[8],
         c9 = c[9], c10 = c[10], c11 = c[11], c12 = c[12], c13 = c[13], c14 = c[14], c15 = c[15];
  for (std::int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_dpbf16_ps(c0, a, b);
    c1 = _mm512_dpbf16_ps(c1, a, b);
    c2 = _mm512_dpbf16_ps(c2, a, b);
    c3 = _mm512_dpbf16_ps(c3, a, b);
    c4 = _mm512_dpbf16_ps(c4, a, b);
    c5 = _mm512_dpbf16_ps(c5, a, b);
    c6 = _mm512_dpbf16_ps(c6, a, b);
    c7 = _mm512_dpbf16_ps(c7, a, b);
    c8 = _mm512_dpbf16_ps(c8, a, b);
    c9 = _mm512_dpbf16_ps(c9, a, b);
    c10 = _mm512_dpbf16_ps(c10, a, b);
    c11 = _mm512_dpbf16_ps(c11, a, b);
    c12 = _mm512_dpbf16_ps(c12, a, b);
    c13 = _mm512_dpbf16_ps(c13, a, b);
    c14 = _mm512_dpbf16_ps(c14, a, b);
    c15 = _mm512_dpbf16_ps(c15, a, b);
    asm volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7));
    asm volatile("" : "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11), "+v"(c12), "+v"(c13), "+v"(c14), "+v"(c15));
  }
  __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                           _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
  s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
                                     _mm512_add_ps(_mm512_add_ps(c12, c13), _mm512_add_ps(c14, c15))));
  keep(s);
  return static_cast<double>(iters) * 16 * 32 * 2;
#else
  return fma_thread(iters);  // no bf16 dot instruction: the fp32 FMA path is the ceiling
#endif
}

// One thread: `iters` rounds of 16 independent vpdpbusd chains; returns the op count (2 per
// u8 x s8 product). Integer sums wrap harmlessly.
inline double int8_thread(std::int64_t iters) {
#if defined(__AVX512VNNI__)
  const __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x05060708);
  __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2), c3 = _mm512_set1_epi32(3),
          c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5), c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7),
          c8 = _mm512_set1_epi32(8), c9 = _mm512_set1_epi32(9), c10 = _mm512_set1_epi32(10), c11 = _mm512_set1_epi32(11),
          c12 = _mm512_set1_epi32(12), c13 = _mm512_set1_epi32(13), c14 = _mm512_set1_epi32(14),
          c15 = _mm512_set1_epi32(15);
  for (std::int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_dpbusd_epi32(c0, a, b);
    c1 = _mm512_dpbusd_epi32(c1, a, b);
    c2 = _mm512_dpbusd_epi32(c2, a, b);
    c3 = _mm512_dpbusd_epi32(c3, a, b);
    c4 = _mm512_dpbusd_epi32(c4, a, b);
    c5 = _mm512_dpbusd_epi32(c5, a, b);
    c6 = _mm512_dpbusd_epi32(c6, a, b);
    c7 = _mm512_dpbusd_epi32(c7, a, b);
    c8 = _mm512_dpbusd_epi32(c8, a, b);
    c9 = _mm512_dpbusd_epi32(c9, a, b);
    c10 = _mm512_dpbusd_epi32(c10, a, b);
    c11 = _mm512_dpbusd_epi32(c11, a, b);
    c12 = _mm512_dpbusd_epi32(c12, a, b);
    c13 = _mm512_dpbusd_epi32(c13, a, b);
    c14 = _mm512_dpbusd_epi32(c14, a, b);
    c15 = _mm512_dpbusd_epi32(c15, a, b);
    asm volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7));
    asm volatile("" : "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11), "+v"(c12), "+v"(c13), "+v"(c14), "+v"(c15));
  }
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                               _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
  s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)),
                                           _mm512_add_epi32(_mm512_add_epi32(c12, c13), _mm512_add_epi32(c14, c15))));
  keep(s);
  return static_cast<double>(iters) * 16 * 64 * 2;
#else
  return fma_thread(iters);
#endif
}

// Whether this process may use AMX tiles (compiled for, and the kernel granted the tile state).
inline bool amx_usable() {
#if defined(ATTNKIT_LINEAR_AMX)
  return detail::linear::amx_permitted();
#else
  return false;
#endif
}

// One thread: `iters` rounds of four tdpbf16ps on independent accumulator tiles (tmm0-3) from
// two activation tiles (tmm4-5) and two weight tiles (tmm6-7), all loaded once and kept in the
// tile registers; returns the flop count. The tile setup is the linear kernels' own
// (amx_configure / amx_release). Call only where amx_usable().
inline double amx_thread(std::int64_t iters) {
#if defined(ATTNKIT_LINEAR_AMX)
  // bf16 pairs (1.0, 2^-20) x (2^-20, 2^-20): each instruction adds at most 32 * 2^-20 to an
  // accumulator element, so the sums stay finite and normal for any realistic iteration count.
  alignas(64) std::uint32_t a[256], b[256];
  for (int i = 0; i < 256; ++i) {
    a[i] = 0x35803f80u;
    b[i] = 0x35803580u;
  }
  alignas(64) float c[4 * 256];
  detail::linear::amx_configure();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
  for (std::int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
  detail::linear::amx_release();
  keep(c[0] + c[256] + c[512] + c[768]);
  return static_cast<double>(iters) * 4 * (16 * 16 * 32) * 2;
#else
  (void)iters;
  return 0;
#endif
}

// Runs per_thread(iters) on every thread at once; returns total work / wall seconds.
template <class F>
double parallel_rate(int threads, std::int64_t iters, F&& per_thread) {
  std::vector<double> work(static_cast<std::size_t>(threads), 0.0);
  const auto t0 = clock::now();
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  work[static_cast<std::size_t>(omp_get_thread_num())] = per_thread(iters);
#else
  work[0] = per_thread(iters);
#endif
  const double secs = seconds_since(t0);
  double total = 0;
  for (double w : work) total += w;
  return total / secs;
}

// Picks an iteration count that takes about `target_s` seconds on one thread.
template <class F>
std::int64_t calibrate(F&& per_thread, double target_s) {
  std::int64_t iters = 1 << 14;
  for (;;) {
    const auto t0 = clock::now();
    per_thread(iters);
    const double s = seconds_since(t0);
    if (s > 0.02) return static_cast<std::int64_t>(static_cast<double>(iters) * target_s / s) + 1;
    iters *= 4;
  }
}

// Compute peak (flop/s): best of `reps` runs of about `target_s` seconds each.
template <class F>
double compute_peak(int threads, F&& per_thread, double target_s = 0.2, int reps = 3) {
  const std::int64_t iters = calibrate(per_thread, target_s);
  double best = 0;
  for (int r = 0; r < reps; ++r) best = std::max(best, parallel_rate(threads, iters, per_thread));
  return best;
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, FreeDeleter>;

// A buffer of n floats (n a multiple of 2^19) written by the threads that will read it (first
// touch), so the pages are really allocated before any timing. It comes from attnkit's own
// allocator (2 MiB aligned, transparent huge pages), as the KV caches and packed weights do, so
// the ceiling is the best the machine can stream.
inline Buffer make_read_buffer(std::int64_t n, int threads) {
  Buffer buf(static_cast<float*>(allocate_aligned(static_cast<std::size_t>(n) * sizeof(float))));
  float* p = buf.get();
  parallel_for(threads, threads, [&](std::int64_t t) {
    const std::int64_t b = n * t / threads, e = n * (t + 1) / threads;
    for (std::int64_t i = b; i < e; ++i) p[i] = static_cast<float>(i & 1023) * 1e-3f;
  });
  return buf;
}

// Sums p[b, e) (64-byte aligned, e - b a multiple of 16 in the vector path).
inline float sum_range(const float* p, std::int64_t b, std::int64_t e) {
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
  std::int64_t i = b;
  for (; i + 128 <= e; i += 128) {
    s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
    s1 = _mm512_add_ps(s1, _mm512_load_ps(p + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_load_ps(p + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_load_ps(p + i + 48));
    s4 = _mm512_add_ps(s4, _mm512_load_ps(p + i + 64));
    s5 = _mm512_add_ps(s5, _mm512_load_ps(p + i + 80));
    s6 = _mm512_add_ps(s6, _mm512_load_ps(p + i + 96));
    s7 = _mm512_add_ps(s7, _mm512_load_ps(p + i + 112));
  }
  for (; i + 16 <= e; i += 16) s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)),
                                 _mm512_add_ps(_mm512_add_ps(s4, s5), _mm512_add_ps(s6, s7)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  float r = 0;
  for (float x : lanes) r += x;
  for (; i < e; ++i) r += p[i];
  return r;
#else
  float r = 0;
  for (std::int64_t i = b; i < e; ++i) r += p[i];
  return r;
#endif
}

// One read pass over all n floats by `threads` threads, each a disjoint contiguous part;
// returns bytes / second.
inline double read_pass(const float* p, std::int64_t n, int threads) {
  std::vector<float> sums(static_cast<std::size_t>(threads), 0.f);
  const auto t0 = clock::now();
  parallel_for(threads, threads, [&](std::int64_t t) {
    const std::int64_t b = (n / 16) * t / threads * 16, e = (n / 16) * (t + 1) / threads * 16;
    sums[static_cast<std::size_t>(t)] = sum_range(p, b, e);
  });
  const double secs = seconds_since(t0);
  keep(sums[0]);
  keep(sums.back());
  return static_cast<double>(n) * sizeof(float) / secs;
}

inline constexpr std::int64_t kReadBufferFloats = (std::int64_t{1} << 30) / sizeof(float);  // 1 GiB

inline double read_bandwidth(int threads, int passes = 5) {
  const Buffer buf = make_read_buffer(kReadBufferFloats, threads);
  double best = 0;
  for (int r = 0; r < passes; ++r) best = std::max(best, read_pass(buf.get(), kReadBufferFloats, threads));
  return best;
}

inline Roofline measure(int threads) {
  Roofline r{};
  r.fma_gflops = compute_peak(threads, fma_thread) * 1e-9;
  r.bf16_gflops = compute_peak(threads, bf16_thread) * 1e-9;
  r.amx_bf16_gflops = amx_usable() ? compute_peak(threads, amx_thread) * 1e-9 : 0.0;
  r.int8_gops = compute_peak(threads, int8_thread) * 1e-9;
  r.read_gbps = read_bandwidth(threads) * 1e-9;
  std::fprintf(stderr,
               "roofline (%d threads): fp32 FMA %.1f GFLOP/s, bf16 dot %.1f GFLOP/s, AMX bf16 %.1f GFLOP/s%s, "
               "int8 dot %.1f GOP/s, DRAM read %.1f GB/s\n",
               threads, r.fma_gflops, r.bf16_gflops, r.amx_bf16_gflops, amx_usable() ? "" : " (not usable)",
               r.int8_gops, r.read_gbps);
  return r;
}

}  // namespace roofline_detail

// Measured once per process on first use (thread-safe static initialisation), then cached.
inline const Roofline& roofline() {
  static const Roofline r = roofline_detail::measure(default_num_threads());
  return r;
}

// The compute ceiling a kernel call runs against, and on which units.
struct Peak {
  const char* unit;  // "amx" or "fma"
  double gflops;     // that unit's measured peak (roofline())
  int products;      // unit products per counted product: 3 for exact on AMX (x = hi + mid + lo
                     // bf16 planes), so that path's ceiling in counted flops is gflops / 3
};

// The units PackedLinear runs `tokens` rows on (see linalg/packed_linear.hpp, forward_bf16):
// bf16 weights and more than 8 tokens go to AMX tiles where AMX is usable, Precision fast (one
// bf16 plane) or exact (three); everything else (decode-sized calls, f32 weights, no AMX) runs
// on float32 FMAs (bf16 weights widened to f32).
inline Peak linear_peak(LinearFormat format, Precision precision, std::int64_t tokens) {
  const Roofline& r = roofline();
  const bool amx = tokens > detail::linear::kMR && detail::linear::amx_available() && r.amx_bf16_gflops > 0;
  // q8 prefill: dequantised bf16 tiles under fast, f32 FMA panels under exact.
  if (amx && format == LinearFormat::bf16) return {"amx", r.amx_bf16_gflops, precision == Precision::exact ? 3 : 1};
  if (amx && format == LinearFormat::q8 && precision == Precision::fast) return {"amx", r.amx_bf16_gflops, 1};
  return {"fma", r.fma_gflops, 1};
}

// The units attention_prefill runs on with opt.precision = `precision` (the library's own
// predicate, detail::flash::use_amx_prefill): AMX tiles for fast where AMX is usable, the fp32
// FMA units otherwise (exact; bf16 K/V are widened to f32).
inline Peak attention_prefill_peak(Precision precision) {
  const Roofline& r = roofline();
  if (detail::flash::use_amx_prefill<simd::default_arch>(precision) && r.amx_bf16_gflops > 0)
    return {"amx", r.amx_bf16_gflops, 1};
  return {"fma", r.fma_gflops, 1};
}

}  // namespace attnkit::bench
