// benchmarks/experiments/amx_prefill_phases.cpp — the AMX prefill kernel's phases timed alone on
// one core with every operand in cache (attention/detail/flash_prefill_amx.hpp): Q·K^T, the
// online softmax and P·V of one sub-tile against one 256-key tile, each repeated, then all three
// in sequence as the kernel runs them; against tdpbf16ps on register-resident tiles. Says which
// phase keeps the kernel from the AMX peak, and whether the phases cost more together than apart.
// The overlap report then runs two sub-tiles in a pipeline, P·V of one with the softmax of the
// next cut into slices of about one P·V step (4 tile products) and interleaved with its steps.
// Measured 2026-12-01 on an AMX host (Emerald Rapids VM, one core, TSC 2.1 GHz): tdpbf16ps 15
// cycles; 2 x 2 products over 4 steps 18-19 cycles each, over 64 steps 15; in the kernel's
// phases Q·K^T and P·V 0.56-0.63 of the tile peak, the softmax 4.7 cycles per 16 scores (32
// rows); the whole sequence 710-776 GFLOP/s per core, the sum of its parts. Interleaved at that
// grain, the pipeline costs the same as the sequence (11362-11573 cycles per 32-row sub-tile
// against 11445-11573; 64 rows likewise): the vector softmax does not run under the tile
// products on this CPU, so only making either one cheaper speeds the kernel up.
// The masked report times the softmax of a 64-row sub-tile over all the key tiles it sees, as
// the kernel calls it (window 512, or causal), averaged over the 8 alignments of its 32 queries
// in a key tile. 2026-12-04, one AMX host, three alternated pairs: with the mask applied inside
// the exp pass (RowCols) instead of a masking pass through S, window 512 11085-11304 ->
// 9692-9782 cycles (5.4-5.5 -> 4.7-4.8 per 16 visible scores), causal 34802-39802 -> 34097-35544.
// Not built by CMake (needs an AMX CPU):
//   g++ -std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude \
//       benchmarks/experiments/amx_prefill_phases.cpp
#include <x86intrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <random>
#include <vector>

#include "attnkit/attention/prefill.hpp"

#if !defined(ATTNKIT_AMX)
int main() { std::puts("no AMX in this build"); }
#else
using namespace attnkit;
using namespace attnkit::detail::flash::amx_tiles;
using attnkit::detail::flash::amx_tiles::u16;

namespace {
constexpr int kD = 128;
constexpr int kK = static_cast<int>(kKeys);

template <class T>
T* alloc(std::size_t n) {
  return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
}

struct Bufs {
  int rows;
  u16 *q, *k, *v, *p;
  float *s, *o, *m, *l, *alpha;
};

Bufs make(int rows) {
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  Bufs b{rows, alloc<u16>(rows * kD), alloc<u16>(kK * kD), alloc<u16>(kK * kD), alloc<u16>(rows * kPLd),
         alloc<float>(rows * kSLd), alloc<float>(rows * kD), alloc<float>(rows), alloc<float>(rows), alloc<float>(rows)};
  for (int i = 0; i < rows * kD; ++i) b.q[i] = bf16(nd(g) * 0.3f).bits;
  for (int i = 0; i < kK * kD; ++i) b.k[i] = bf16(nd(g)).bits, b.v[i] = bf16(nd(g)).bits;
  for (int i = 0; i < rows * kSLd; ++i) b.s[i] = nd(g) * 3.f;
  for (int i = 0; i < rows * kPLd; ++i) b.p[i] = bf16(0.01f).bits;
  for (int i = 0; i < rows * kD; ++i) b.o[i] = 0.f;
  for (int i = 0; i < rows; ++i) b.m[i] = 8.f, b.l[i] = 1.f;
  return b;
}

Operands qk_ops(const Bufs& b) {
  return {reinterpret_cast<const char*>(b.q), kD * 2, 16 * kD * 2, 64, 0, reinterpret_cast<const char*>(b.k),
          (kK / 16) * kTileElems * 2, kTileElems * 2, reinterpret_cast<char*>(b.s), kSLd * 4, 16 * kSLd * 4};
}
Operands pv_ops(const Bufs& b) {
  return {reinterpret_cast<const char*>(b.p), kPLd * 2, 16 * kPLd * 2, 64, 0, reinterpret_cast<const char*>(b.v),
          (kD / 16) * kTileElems * 2, kTileElems * 2, reinterpret_cast<char*>(b.o), kD * 4, 16 * kD * 4};
}

// The kernel's 2 x 2 groups.
template <bool Acc>
void products_2x2(Operands o, std::int64_t na, std::int64_t nb, std::int64_t steps) {
  for (std::int64_t a = 0; a < na; a += 2)
    for (std::int64_t bb = 0; bb < nb; bb += 2) {
      Operands t = o;
      t.a += a * o.a_block;
      t.b += bb * o.b_block;
      t.c += a * o.c_block + bb * 64;
      tile_product<2, 2, Acc, 1>(t, 0, steps);
    }
}
void softmax(const Bufs& b) {
  const auto info = [&](std::int64_t) {
    struct Row {
      std::int64_t lo, hi;
      float slope;
      std::int64_t dist0;
    };
    return Row{0, kK - 1, 0.f, 0};
  };
  const PlainAttention var{};
  for (int r0 = 0; r0 < b.rows; r0 += 16)
    softmax_rows16<false, 1>(b.s, b.p, 0, r0, b.rows, 0, kK, b.m, b.l, b.alpha, var, 1.f, info);
}
// The softmax of one sub-tile of 64 rows (2 heads x 32 queries at positions pos .. pos + 31)
// over every key tile it sees, as run_item_amx calls it: W > 0 a sliding window of W keys, else
// causal. S holds fixed scores; m starts finite, so no row takes the first-tile path.
void softmax_masked(const Bufs& b, std::int64_t pos, std::int64_t W) {
  const std::int64_t nq = b.rows / 2;
  const auto first_key = [&](std::int64_t p) { return W > 0 ? std::max<std::int64_t>(p - W + 1, 0) : 0; };
  const PlainAttention var{};
  for (std::int64_t k0 = first_key(pos) / kK * kK; k0 <= pos + nq - 1; k0 += kK) {
    const auto info = [&](std::int64_t r) {
      struct Row {
        std::int64_t lo, hi;
        float slope;
        std::int64_t dist0;
      };
      const std::int64_t p = pos + r % nq;
      return Row{first_key(p) - k0, p - k0, 0.f, 0};
    };
    const bool masked = first_key(pos + nq - 1) > k0 || k0 + kK - 1 > pos;
    std::int64_t cb = 0, ce = kK;
    if (masked) {
      cb = std::clamp<std::int64_t>(first_key(pos) - k0, 0, kK) / 32 * 32;
      ce = (std::clamp<std::int64_t>(pos + nq - 1 - k0 + 1, 0, kK) + 31) / 32 * 32;
    }
    for (int r0 = 0; r0 < b.rows; r0 += 16) {
      if (masked) softmax_rows16<true, 1>(b.s, b.p, 0, r0, b.rows, cb, ce, b.m, b.l, b.alpha, var, 1.f, info);
      else softmax_rows16<false, 1>(b.s, b.p, 0, r0, b.rows, cb, ce, b.m, b.l, b.alpha, var, 1.f, info);
    }
  }
}
void rescale(const Bufs& b) {
  for (int r = 0; r < b.rows; ++r) {
    const __m512 a = _mm512_set1_ps(b.alpha[r] * 0.999f);  // force the multiply, as a moved max does
    float* orow = b.o + r * kD;
    for (int d = 0; d < kD; d += 16) _mm512_store_ps(orow + d, _mm512_mul_ps(a, _mm512_load_ps(orow + d)));
  }
}

template <class F>
double cycles(F&& f, int iters) {
  for (int i = 0; i < iters / 10 + 1; ++i) f();
  std::vector<double> v;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = __rdtsc();
    for (int i = 0; i < iters; ++i) f();
    v.push_back(double(__rdtsc() - t0) / iters);
  }
  std::sort(v.begin(), v.end());
  return v[3];
}

double peak_cycles_per_dp() {
  alignas(64) static u16 a[512], bb[512];
  for (int i = 0; i < 512; ++i) a[i] = bb[i] = bf16(0.5f).bits;
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, bb, 64);
  _tile_loadd(7, bb, 64);
  const int n = 4096;
  return cycles([&] {
    for (int i = 0; i < n / 4; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }, 20) / n;
}
// 2 x 2 products accumulating over `len` steps per C load/store (operands cycling through 16 KiB
// of A and 16 KiB of B, in L1): how much a call's start and end cost against its tile products.
double chain_cycles_per_dp(const Bufs& b, int len) {
  const int calls = 256 / len;
  return cycles([&] {
    for (int c = 0; c < calls; ++c) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int s = 0; s < len; ++s) {
        const char* a = reinterpret_cast<const char*>(b.q) + (s % 4) * 64;
        const char* bb = reinterpret_cast<const char*>(b.k) + (s % 8) * 2048;
        _tile_loadd(6, bb, 64);
        _tile_loadd(7, bb + 1024, 64);
        _tile_loadd(4, a, kD * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a + 16 * kD * 2, kD * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, b.s, kSLd * 4);
      _tile_stored(1, b.s + 16, kSLd * 4);
      _tile_stored(2, b.s + 16 * kSLd, kSLd * 4);
      _tile_stored(3, b.s + 16 * kSLd + 16, kSLd * 4);
    }
  }, 500) / (calls * len * 4);
}

// ---- Overlap: can the tile products and the vector softmax run at once? ----
// The online softmax of 16 rows (the kernel's softmax_rows16, unmasked, plain, rows past their
// first key tile as in the steady state) cut into slices of about one PV step's length: one
// row's exp pass, then the 16-row bookkeeping. Same arithmetic as the kernel's.
struct SoftmaxSlices {
  const Bufs* b = nullptr;
  int g = 0, i = 0;  // group of 16 rows, row (16: the bookkeeping)
  alignas(64) __m512 sums[16];
  alignas(64) float ref[16], a[16];
  void start(const Bufs& bb) { b = &bb, g = 0, i = 0; }
  bool done() const { return g * 16 >= b->rows; }
  void slice() {
    if (done()) return;
    const int r0 = g * 16;
    if (i < 16) {
      const int r = r0 + i;
      ref[i] = b->m[r];
      a[i] = 1.f;
      sums[i] = exp_row_ref(b->s + r * kSLd, b->p + r * kPLd, 0, kK, ref[i]);
      ++i;
    } else {
      settle_rows16_ref(b->s, b->p, r0, 0, kK, sums, ref, a, b->m, b->l, b->alpha);
      ++g, i = 0;
    }
  }
};

// P·V of one sub-tile (2 x 2 groups, as the kernel) with `per_step` softmax slices of another
// sub-tile issued after every step of 4 tile products.
void pv_interleaved(const Bufs& b, SoftmaxSlices& sm, int per_step) {
  const Operands o = pv_ops(b);
  const int na = b.rows / 16;
  for (int a = 0; a < na; a += 2)
    for (int bb = 0; bb < kD / 16; bb += 2) {
      Operands t = o;
      t.a += a * o.a_block;
      t.b += bb * o.b_block;
      t.c += a * o.c_block + bb * 64;
      _tile_loadd(0, t.c, t.c_stride);
      _tile_loadd(1, t.c + 64, t.c_stride);
      _tile_loadd(2, t.c + t.c_block, t.c_stride);
      _tile_loadd(3, t.c + t.c_block + 64, t.c_stride);
      for (int s = 0; s < kK / 32; ++s) {
        _tile_loadd(6, t.b + s * t.b_step, 64);
        _tile_loadd(7, t.b + s * t.b_step + t.b_block, 64);
        _tile_loadd(4, t.a + s * t.a_step, t.a_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, t.a + s * t.a_step + t.a_block, t.a_stride);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        for (int k = 0; k < per_step; ++k) sm.slice();
      }
      _tile_stored(0, t.c, t.c_stride);
      _tile_stored(1, t.c + 64, t.c_stride);
      _tile_stored(2, t.c + t.c_block, t.c_stride);
      _tile_stored(3, t.c + t.c_block + 64, t.c_stride);
    }
  while (!sm.done()) sm.slice();
}

void softmax_sliced(const Bufs& b) {
  SoftmaxSlices sm;
  sm.start(b);
  while (!sm.done()) sm.slice();
}

// Two sub-tiles A and B sharing the K/V tiles, one sub-tile's work per iteration, steady state:
// QK(B), then P·V(A) with softmax(B) (interleaved, or after it), then rescale(B); swap.
void overlap_report(int rows) {
  {  // the sliced softmax computes the kernel's bits
    Bufs X = make(rows), Y = make(rows);
    softmax(X);
    softmax_sliced(Y);
    const bool same = !std::memcmp(X.p, Y.p, rows * kPLd * 2) && !std::memcmp(X.l, Y.l, rows * 4) &&
                      !std::memcmp(X.m, Y.m, rows * 4) && !std::memcmp(X.alpha, Y.alpha, rows * 4);
    std::printf("  rows %d: sliced softmax %s the kernel's\n", rows, same ? "matches" : "DIFFERS FROM");
  }
  Bufs A = make(rows), B = make(rows);
  B.k = A.k, B.v = A.v;
  const int na = rows / 16;
  const double dp = 2.0 * na * (kK / 16) * (kD / 32);
  for (int mode = 0; mode < 3; ++mode) {
    Bufs* x = &A;
    Bufs* y = &B;
    SoftmaxSlices sm;
    const double c = cycles([&] {
      products_2x2<false>(qk_ops(*y), na, kK / 16, kD / 32);
      if (mode == 0) {  // the kernel's order on one sub-tile's data
        softmax(*y);
        products_2x2<true>(pv_ops(*x), na, kD / 16, kK / 32);
      } else if (mode == 1) {  // the sliced softmax, after P·V
        products_2x2<true>(pv_ops(*x), na, kD / 16, kK / 32);
        softmax_sliced(*y);
      } else {  // interleaved
        sm.start(*y);
        const int slices = (rows / 16) * 17, steps = (na / 2) * (kD / 32) * (kK / 32);
        pv_interleaved(*x, sm, (slices + steps - 1) / steps);
      }
      rescale(*y);
      std::swap(x, y);
    }, 2000);
    static const char* names[] = {"sequential", "sequential, sliced softmax", "P·V interleaved with the next softmax"};
    std::printf("  rows %d, %s: %.0f cycles per sub-tile (%.1f per tile product)\n", rows, names[mode], c, c / dp);
  }
}
}  // namespace

int main() {
  if (!detail::amx::amx_available()) return std::puts("AMX not usable"), 1;
  detail::amx::amx_configure();
  const double pk = peak_cycles_per_dp();
  const auto t0 = std::chrono::steady_clock::now();
  const auto c0 = __rdtsc();
  while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(200)) {}
  const double ghz = double(__rdtsc() - c0) / 0.2e9;
  std::printf("TSC %.2f GHz; register-resident tdpbf16ps: %.1f TSC cycles each (%.0f GFLOP/s per core at the TSC)\n", ghz, pk,
              16 * 16 * 32 * 2 / pk * ghz);
  for (int rows : {32, 64}) {
    Bufs b = make(rows);
    if (rows == 32) {
      std::printf("2x2 chains in L1, cycles per dp (peak %.1f):", pk);
      for (int len : {4, 8, 16, 64}) std::printf("  len %d: %.1f", len, chain_cycles_per_dp(b, len));
      std::printf("\n");
    }
    const int na = rows / 16;
    const double dqk = na * (kK / 16) * (kD / 32), dpv = na * (kD / 16) * (kK / 32);
    const int it = 2000;
    const double qk22 = cycles([&] { products_2x2<false>(qk_ops(b), na, kK / 16, kD / 32); }, it);
    const double pv22 = cycles([&] { products_2x2<true>(pv_ops(b), na, kD / 16, kK / 32); }, it);
    const double qkl1 = cycles([&] { for (int r = 0; r < 4; ++r) products_2x2<false>(qk_ops(b), na, 4, kD / 32); }, it);
    std::printf("  QK 2x2 on 64 keys' K^T (16 KiB, L1) x4: %.0f (%.2f of peak)\n", qkl1, dqk * pk / qkl1);
    const double sm = cycles([&] { softmax(b); }, it);
    const double rs = cycles([&] { rescale(b); }, it);
    const double all22 = cycles([&] {
      products_2x2<false>(qk_ops(b), na, kK / 16, kD / 32);
      softmax(b);
      rescale(b);
      products_2x2<true>(pv_ops(b), na, kD / 16, kK / 32);
    }, it);
    const double ideal = (dqk + dpv) * pk;
    std::printf("rows %d x keys %d: dp QK %.0f PV %.0f; ideal tiles %.0f cycles\n", rows, kK, dqk, dpv, ideal);
    std::printf("  QK 2x2 %.0f (%.2f of peak)  PV 2x2 %.0f (%.2f)  softmax %.0f (%.1f per 16 scores)  rescale %.0f\n", qk22,
                dqk * pk / qk22, pv22, dpv * pk / pv22, sm, sm / (rows * kK / 16.0), rs);
    std::printf("  all 2x2 %.0f (sum of parts %.0f; %.2f of peak, %.0f GFLOP/s per core)\n", all22, qk22 + sm + rs + pv22,
                ideal / all22, (dqk + dpv) * 16384 / all22 * ghz);
  }
  {  // masked sub-tiles, 64 rows, over the 8 alignments of 32 queries in a 256-key tile
    Bufs b = make(64);
    for (std::int64_t W : {512, 0}) {
      double c = 0, vis = 0;
      for (std::int64_t off = 0; off < kK; off += 32) {
        const std::int64_t pos = 2048 + off;
        c += cycles([&] { softmax_masked(b, pos, W); }, 500);
        for (std::int64_t q = pos; q < pos + 32; ++q) vis += 2.0 * (W > 0 ? W : q + 1);
      }
      std::printf("softmax of a 64-row sub-tile, %s at query 2048-2335: %.0f cycles (%.2f per 16 visible scores)\n",
                  W > 0 ? "window 512" : "causal", c / 8, c / (vis / 16));
    }
  }
  for (int rows : {32, 64}) overlap_report(rows);
  detail::amx::amx_release();
}
#endif
