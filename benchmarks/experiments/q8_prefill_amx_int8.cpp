// benchmarks/experiments/q8_prefill_amx_int8.cpp — the measurement behind the q8 prefill choice
// (issue 15): q8 prefill as AMX-INT8 tiles (activations quantised per row and group of 32, each
// group's 16x16 int32 tile rescaled by s_w · s_x and accumulated in f32) against the library's q8
// path (weights dequantised into bf16 tiles) and bf16 weights; same shapes, 2 threads, medians.
// Not built by CMake (it needs an AMX host):
//   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -Iinclude benchmarks/experiments/q8_prefill_amx_int8.cpp
// Result (Sapphire Rapids, 2 threads, M 512): AMX-INT8 302-370 GFLOP/s against 659-687 for the
// dequantised bf16 tiles (bf16 weights 622-685): the per-group rescale (a tile store and 16 vector
// FMAs per 16 x 16 x 32 product) costs more than the int8 tile op saves.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>
#include "attnkit/linalg/packed_linear.hpp"
using namespace attnkit;
static std::vector<float> rnd(std::int64_t n, unsigned s, float sc) {
  std::vector<float> v(n); unsigned long long x = s * 0x9E3779B97F4A7C15ull + 1;
  for (auto& f : v) { x = x * 6364136223846793005ull + 1442695040888963407ull; f = sc * ((float)(long long)(x >> 40) / (1 << 23) - 1.f); }
  return v;
}
struct alignas(64) Cfg { std::uint8_t palette = 1, start = 0, res[14] = {}; std::uint16_t colsb[16] = {}; std::uint8_t rows[16] = {}; };
int main() {
  std::printf("amx %d\n", (int)detail::linear::amx_available());
  struct S { const char* n; std::int64_t N, K; } shapes[] = {{"qkv", 4096, 1024}, {"gate_up", 6144, 1024}, {"down", 1024, 3072}};
  const std::int64_t M = 512;
  for (auto sh : shapes) {
    const std::int64_t N = sh.N, K = sh.K, kq = K / 32, nb = N / 16;
    auto w = rnd(N * K, 1, 0.05f); auto x = rnd(M * K, 2, 1.f);
    PackedLinear b16 = PackedLinear::pack_as_bf16(w.data(), N, K, K), q8 = PackedLinear::pack_q8(w.data(), N, K, K);
    // int8 weights in B-tile layout [block][group][8 quads][16][4] u8 = q + 128, scales [block][group][16]
    std::vector<std::uint8_t> B(nb * kq * 512); std::vector<float> SW(nb * kq * 16);
    for (std::int64_t o = 0; o < N; ++o) for (std::int64_t g = 0; g < kq; ++g) {
      float amax = 0; for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(w[o * K + g * 32 + i]));
      const float s = amax / 127; SW[((o / 16) * kq + g) * 16 + o % 16] = s;
      for (int i = 0; i < 32; ++i) B[((o / 16) * kq + g) * 512 + (i / 4) * 64 + (o % 16) * 4 + i % 4] = (std::uint8_t)(int(std::nearbyint(w[o * K + g * 32 + i] / s)) + 128);
    }
    std::vector<std::int8_t> XQ(M * K); std::vector<float> XS(M * kq); std::vector<std::int32_t> XC(M * kq);
    std::vector<float> y(M * N), yref(M * N);
    auto int8_gemm = [&] {
      // activations quantised per row and group (part of the cost)
#pragma omp parallel for num_threads(2)
      for (std::int64_t r = 0; r < M; ++r) for (std::int64_t g = 0; g < kq; ++g) {
        float amax = 0; for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[r * K + g * 32 + i]));
        const float inv = amax > 0 ? 127 / amax : 0; int sum = 0;
        for (int i = 0; i < 32; ++i) { int q = (int)std::nearbyint(x[r * K + g * 32 + i] * inv); XQ[r * K + g * 32 + i] = (std::int8_t)q; sum += q; }
        XS[r * kq + g] = amax / 127; XC[r * kq + g] = -128 * sum;
      }
#pragma omp parallel num_threads(2)
      {
        Cfg c; c.colsb[0] = 64; c.rows[0] = 16; c.colsb[1] = 32; c.rows[1] = 16; c.colsb[2] = 64; c.rows[2] = 8; __asm__ volatile("ldtilecfg %0" : : "m"(c));  // core/amx.hpp says why
        alignas(64) std::int32_t buf[256];
        const int t = omp_get_thread_num();
        for (std::int64_t bb = nb * t / 2; bb < nb * (t + 1) / 2; ++bb)
          for (std::int64_t r0 = 0; r0 < M; r0 += 16) {
            __m512 acc[16]; for (auto& a : acc) a = _mm512_setzero_ps();
            for (std::int64_t g = 0; g < kq; ++g) {
              _tile_zero(0);
              _tile_loadd(1, XQ.data() + r0 * K + g * 32, K);
              _tile_loadd(2, B.data() + (bb * kq + g) * 512, 64);
              _tile_dpbsud(0, 1, 2);
              _tile_stored(0, buf, 64);
              const __m512 sw = _mm512_loadu_ps(SW.data() + (bb * kq + g) * 16);
#pragma GCC unroll 16
              for (int r = 0; r < 16; ++r) {
                const __m512i v = _mm512_add_epi32(_mm512_load_si512(buf + 16 * r), _mm512_set1_epi32(XC[(r0 + r) * kq + g]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sw, _mm512_set1_ps(XS[(r0 + r) * kq + g])), acc[r]);
              }
            }
            for (int r = 0; r < 16; ++r) _mm512_storeu_ps(y.data() + (r0 + r) * N + bb * 16, acc[r]);
          }
        _tile_release();
      }
    };
    auto tm = [&](auto f) { auto t0 = std::chrono::steady_clock::now(); f(); return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
    auto lib = [&](const PackedLinear& l) { return [&] { l.forward(ConstView2<float>(x.data(), {M, K}), View2<float>(yref.data(), {M, N}), {Precision::fast, 2, false}); }; };
    int8_gemm(); q8.forward(ConstView2<float>(x.data(), {M, K}), View2<float>(yref.data(), {M, N}), {Precision::exact, 2, false});
    double num = 0, den = 0; for (std::int64_t i = 0; i < M * N; ++i) { num += (y[i] - yref[i]) * (y[i] - yref[i]); den += yref[i] * yref[i]; }
    std::vector<double> a, b, c;
    for (int r = 0; r < 9; ++r) { a.push_back(tm(lib(b16))); b.push_back(tm(lib(q8))); c.push_back(tm(int8_gemm)); }
    auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
    const double gf = 2.0 * M * N * K * 1e-9;
    std::printf("%-8s bf16 %7.1f GFLOP/s | q8 dequant->bf16 tiles %7.1f | q8 AMX-INT8 %7.1f (rel err vs q8 exact %.1e)\n", sh.n, gf / med(a), gf / med(b), gf / med(c), std::sqrt(num / den));
    std::fflush(stdout);
  }
}
