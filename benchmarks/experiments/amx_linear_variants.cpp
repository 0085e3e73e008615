// benchmarks/experiments/amx_linear_variants.cpp — where the AMX linear path's time goes at
// prefill sizes, and variants of its loop measured against it in one process.
// Part 1 (one thread, in cache): the 32 x 32 tile kernel alone, called on the same operands
// (K 1024), FLOP per TSC cycle: its ceiling with every operand in L1/L2.
// Part 2 (2 threads): the Qwen3-0.6B projections (qkv 1024->4096, o 2048->1024, gate_up
// 1024->6144, down 3072->1024) on M tokens, Precision::fast, bf16 weights: the library's
// PackedLinear::forward against replicas of forward_amx with one change each, alternated, medians.
// Part 3 (argument 3 = q8): the library's q8 weights (int8 strips widened into bf16 tiles)
// against its bf16 weights, alternated; built against two versions of the library, the q8 / bf16
// ratio compares their q8 paths.
// Arguments: M (512), rounds (5), q8.
// Measured 2026-12-04 on the AMX device hosts (2 threads, GFLOP/s, medians of 9 rounds; the
// hosts differ up to 2x, so compare within a line):
//   in cache, one thread: 586-599 FLOP per TSC cycle once warm (the tiles' peak is 1024): the
//     32 x 32 kernel's four tile loads per K step come from L2, which bounds it;
//   M 512, prefetching the next strip 8 lines per K step against none: 1569 / 1447, 688 / 648,
//     735 / 667, 1311 / 1216, 1473 / 1285, 755 / 605, 803 / 652 (1.06-1.25x); M 1024: 1340 / 1055;
//     M 2048: 1096 / 951.
//   Also measured, no better than 8 lines: 4 or 16 lines per step; 256- or 512-token chunks
//     (1464 / 1516 against 1447); loads placed next to their first use alone (1467 / 1447,
//     616 / 648, 673 / 667), kept since the prefetch was measured with it.
// So the library prefetches 8 lines per step (detail/linear_kernels.hpp, amx_kernel).
// q8 (part 3, M 512, three alternated pairs of processes on one host): the q8 path prefetching
// the int8 blocks of its next strip against not, q8 / bf16 speed 0.900, 0.847, 0.896 against
// 0.917, 0.785, 0.833 (q8 705, 658, 1114 against 693, 584, 707 GFLOP/s; the host drifted).
// Not built by CMake (needs an AMX CPU):
//   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -Iinclude benchmarks/experiments/amx_linear_variants.cpp
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>
#include <x86intrin.h>

#include <omp.h>

// The replicas read a layer's packed weights, which PackedLinear keeps private (experiment only).
#define private public
#include "attnkit/linalg/packed_linear.hpp"
#undef private

using namespace attnkit;
namespace L = attnkit::detail::linear;

#if !defined(ATTNKIT_LINEAR_AMX)
int main() {
  std::printf("no AMX in this build\n");
  return 0;
}
#else

namespace {

std::vector<float> random_floats(std::int64_t n, std::uint64_t s, float scale) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = scale * (static_cast<float>(static_cast<std::int64_t>(s >> 40)) / static_cast<float>(1 << 23) - 1.f);
  }
  return v;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Kernel variant: loads placed next to their first use, B1 after the first product.
template <int PF>
void kernel_interleaved(const std::uint16_t* a, std::int64_t lda_bytes, const std::uint32_t* w, std::int64_t ldw,
                        std::int64_t ksteps, float* c, const char* pf, std::int64_t pf_step) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const char* a0 = reinterpret_cast<const char*>(a);
  for (std::int64_t s = 0; s < ksteps; ++s) {
    const char* ap = a0 + s * 64;
    _tile_loadd(4, ap, lda_bytes);
    _tile_loadd(6, w + s * 16 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, w + ldw + s * 16 * 16, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, ap + 16 * lda_bytes, lda_bytes);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    if constexpr (PF > 0)
      if (pf)
        for (int i = 0; i < PF; ++i) {
          if constexpr (true) _mm_prefetch(pf + (s * PF + i) * pf_step, _MM_HINT_T1);
        }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
}

// Part 1: the kernel alone on one thread.
void in_cache() {
  const std::int64_t K = 1024, kpairs = K / 2, lda = 2 * kpairs + 32, ksteps = kpairs / 16, ldw = kpairs * 16;
  std::vector<std::uint16_t> a(static_cast<std::size_t>(32 * lda), 0x3f80);
  std::vector<std::uint32_t> w(static_cast<std::size_t>(2 * ldw), 0x3f803f80u);
  alignas(64) static float c[1024];
  L::amx_configure();
  const double flop = 2.0 * 32 * 32 * K;
  for (int round = 0; round < 3; ++round) {
    for (int v = 0; v < 2; ++v) {
      const int n = 20000;
      const std::uint64_t t0 = __rdtsc();
      for (int i = 0; i < n; ++i) {
        if (v == 0) L::amx_kernel<2, 2, 1>(a.data(), lda * 2, 0, w.data(), ldw, ksteps, c, nullptr, nullptr);
        else kernel_interleaved<0>(a.data(), lda * 2, w.data(), ldw, ksteps, c, nullptr, 0);
      }
      const double cyc = static_cast<double>(__rdtsc() - t0);
      std::printf("in cache, one thread, %-12s %6.0f FLOP/TSC cycle\n", v == 0 ? "library" : "interleaved",
                  flop * n / cyc);
    }
  }
  L::amx_release();
}

struct Shape {
  const char* name;
  std::int64_t N, K;
};
constexpr Shape kShapes[] = {{"qkv", 4096, 1024}, {"o", 1024, 2048}, {"gate_up", 6144, 1024}, {"down", 1024, 3072}};

struct Knobs {
  std::int64_t mc = L::kMCAmx;
  int pf_lines = 0;  // lines of the next strip prefetched (T1) per K step of the first token tile
  bool interleaved = false;
};

// A replica of PackedLinear::forward_amx<1> (bf16 weights, fast, y = x W^T) with the knobs.
void forward_replica(const PackedLinear& lin, const std::uint32_t* W, std::int64_t kpairs, const float* x,
                     std::int64_t T, float* y, const Knobs& kn) {
  const std::int64_t K = lin.in_features(), N = lin.out_features(), blocks = (N + 15) / 16;
  const std::int64_t ldw = kpairs * 16, lda = 2 * kpairs + 32, ksteps = kpairs / 16;
  const std::int64_t fit = L::kAmxChunkBytes / (lda * 2) / 32 * 32;
  const std::int64_t MC = std::min<std::int64_t>(std::clamp<std::int64_t>(fit, 32, kn.mc), (T + 31) / 32 * 32);
  const std::int64_t plane = MC * lda;
  std::uint16_t* xb = reinterpret_cast<std::uint16_t*>(L::activation_scratch(static_cast<std::size_t>(plane / 2 + 64)));
#pragma omp parallel num_threads(2)
  {
    const int t = omp_get_thread_num(), nthreads = omp_get_num_threads();
    const std::int64_t b0 = blocks * t / nthreads, b1 = blocks * (t + 1) / nthreads;
    alignas(64) float c[4 * 256];
    L::amx_configure();
    for (std::int64_t m0 = 0; m0 < T; m0 += MC) {
      const std::int64_t mc = std::min(MC, T - m0), mcr = (mc + 15) / 16 * 16;
      for (std::int64_t r = mcr * t / nthreads; r < mcr * (t + 1) / nthreads; ++r)
        L::split_row_to_bf16<1>(r < mc ? x + (m0 + r) * K : x, r < mc ? K : 0, xb + r * lda, plane, lda);
#pragma omp barrier
      for (std::int64_t bs = b0; bs < b1; bs += 2) {
        const int nw = static_cast<int>(std::min<std::int64_t>(2, b1 - bs));
        const std::uint32_t* w = W + bs * ldw;
        const char* next = bs + 2 < b1 ? reinterpret_cast<const char*>(W + (bs + 2) * ldw) : nullptr;
        for (std::int64_t t0 = 0; t0 < mc; t0 += 32) {
          const int na = mc - t0 > 16 ? 2 : 1;
          if (kn.interleaved && na == 2 && nw == 2) {
            // the next strip: 2 blocks of ldw uint32, pf_lines per K step over the first tile
            const std::int64_t lines = 2 * ldw * 4 / 64;
            const std::int64_t per = kn.pf_lines, steps_needed = per > 0 ? (lines + per - 1) / per : 0;
            const bool do_pf = t0 / 32 < (steps_needed + ksteps - 1) / std::max<std::int64_t>(ksteps, 1) && next;
            const char* base = do_pf ? next + (t0 / 32) * ksteps * per * 64 : nullptr;
            if (per == 0) kernel_interleaved<0>(xb + t0 * lda, lda * 2, w, ldw, ksteps, c, nullptr, 0);
            else if (per == 4) kernel_interleaved<4>(xb + t0 * lda, lda * 2, w, ldw, ksteps, c, base, 64);
            else if (per == 16) kernel_interleaved<16>(xb + t0 * lda, lda * 2, w, ldw, ksteps, c, base, 64);
            else kernel_interleaved<8>(xb + t0 * lda, lda * 2, w, ldw, ksteps, c, base, 64);
          } else {
            L::pick_amx<1>(na, nw)(xb + t0 * lda, lda * 2, plane * 2, w, ldw, ksteps, c, nullptr, nullptr);
          }
          for (int a = 0; a < na; ++a)
            for (int b = 0; b < nw; ++b) {
              const std::int64_t o0 = (bs + b) * 16;
              const int lanes = static_cast<int>(std::min<std::int64_t>(16, N - o0));
              const __mmask16 m = static_cast<__mmask16>((1u << lanes) - 1u);
              const float* ct = c + (a * nw + b) * 256;
              for (std::int64_t r = 0; r < 16 && t0 + a * 16 + r < mc; ++r)
                _mm512_mask_storeu_ps(y + (m0 + t0 + a * 16 + r) * N + o0, m, _mm512_load_ps(ct + r * 16));
            }
        }
      }
#pragma omp barrier
    }
    L::amx_release();
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t M = argc > 1 ? std::atoll(argv[1]) : 512;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 5;
  if (!L::amx_available()) {
    std::printf("AMX not available\n");
    return 0;
  }
  in_cache();
  // Several copies of each layer so the weights come from memory as in a model (> L3 share).
  const int copies = 8;
  std::vector<std::vector<PackedLinear>> layers(std::size(kShapes));
  std::vector<std::vector<std::uint32_t>> packed(std::size(kShapes));
  for (std::size_t i = 0; i < std::size(kShapes); ++i)
    for (int c = 0; c < copies; ++c) {
      const auto w = random_floats(kShapes[i].N * kShapes[i].K, 10 + i * 100 + c, 0.05f);
      layers[i].push_back(PackedLinear::pack_as_bf16(w.data(), kShapes[i].N, kShapes[i].K, kShapes[i].K));
    }
  const auto x = random_floats(M * 3072, 2, 1.f);
  std::vector<float> y(static_cast<std::size_t>(M * 6144)), y_ref(y.size());
  const LinearOptions opt{Precision::fast, 2, false};

  struct Variant {
    const char* name;
    bool library;
    Knobs kn;
  };
  const Variant variants[] = {
      {"library", true, {}},                           // prefetches the next strip, 8 lines per K step
      {"no prefetch", false, {L::kMCAmx, 0, false}},   // the library before 2026-12-04 (loads since moved, measured alike)
      {"prefetch 4", false, {L::kMCAmx, 4, true}},
      {"prefetch 16", false, {L::kMCAmx, 16, true}},
  };
  constexpr int NV = std::size(variants);
  std::vector<std::vector<double>> secs(NV);
  double max_diff = 0;
  for (int r = 0; r < rounds; ++r)
    for (int v = 0; v < NV; ++v) {
      const double t0 = now();
      for (int c = 0; c < copies; ++c)
        for (std::size_t i = 0; i < std::size(kShapes); ++i) {
          const PackedLinear& lin = layers[i][c];
          if (variants[v].library) {
            lin.forward(ConstView2<float>(x.data(), {M, kShapes[i].K}), View2<float>(y.data(), {M, kShapes[i].N}), opt);
          } else {
            // The packed weights: a PackedLinear keeps them private; the bf16 pack is the B-tile layout.
            forward_replica(lin, static_cast<const std::uint32_t*>(lin.data_.get()), lin.kpairs_, x.data(), M,
                            y.data(), variants[v].kn);
          }
        }
      secs[v].push_back(now() - t0);
      // check the last layer's output against the library's
      const PackedLinear& lin = layers[3][copies - 1];
      lin.forward(ConstView2<float>(x.data(), {M, 3072}), View2<float>(y_ref.data(), {M, 1024}), opt);
      if (!variants[v].library)
        for (std::int64_t j = 0; j < M * 1024; ++j) max_diff = std::max<double>(max_diff, std::abs(y[j] - y_ref[j]));
    }
  double flop = 0;
  for (const Shape& s : kShapes) flop += 2.0 * M * s.N * s.K * copies;
  for (int v = 0; v < NV; ++v) {
    auto s = secs[v];
    std::sort(s.begin(), s.end());
    std::printf("M %4lld  %-12s %7.0f GFLOP/s (median of %d; min %.0f max %.0f)\n", static_cast<long long>(M),
                variants[v].name, flop / s[s.size() / 2] * 1e-9, rounds, flop / s.back() * 1e-9, flop / s[0] * 1e-9);
  }
  std::printf("max |replica - library| %.3g (must be 0)\n", max_diff);
  // Part 3: the library's q8 path (int8 strips widened into bf16 tiles) beside its bf16 path,
  // alternated; build this file against two versions of the library to compare their q8 paths
  // through the q8 / bf16 ratio (the bf16 path the same in both).
  if (argc > 3 && std::string_view(argv[3]) == "q8") {
    std::vector<std::vector<PackedLinear>> q8(std::size(kShapes));
    for (std::size_t i = 0; i < std::size(kShapes); ++i)
      for (int c = 0; c < copies; ++c) {
        const auto w = random_floats(kShapes[i].N * kShapes[i].K, 10 + i * 100 + c, 0.05f);
        q8[i].push_back(PackedLinear::pack_q8(w.data(), kShapes[i].N, kShapes[i].K, kShapes[i].K));
      }
    std::vector<double> tq, tb, ratio;
    for (int r = 0; r < rounds; ++r)
      for (int v = 0; v < 2; ++v) {
        const double t0 = now();
        for (int c = 0; c < copies; ++c)
          for (std::size_t i = 0; i < std::size(kShapes); ++i)
            (v == 0 ? q8 : layers)[i][c].forward(ConstView2<float>(x.data(), {M, kShapes[i].K}),
                                                 View2<float>(y.data(), {M, kShapes[i].N}), opt);
        (v == 0 ? tq : tb).push_back(now() - t0);
        if (v == 1) ratio.push_back(tb.back() / tq.back());
      }
    const auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::printf("M %4lld  q8 %7.0f GFLOP/s, bf16 %7.0f (medians of %d); q8 / bf16 speed %.3f (median of rounds)\n",
                static_cast<long long>(M), flop / median(tq) * 1e-9, flop / median(tb) * 1e-9, rounds, median(ratio));
  }
  return max_diff == 0 ? 0 : 1;
}
#endif
