// benchmarks/experiments/decode_int8_stages.cpp — where the int8 `fast` decode kernel's cycles go
// (attention/decode.hpp, the block stages of one work item), and whether the score dot products
// run faster on AMX-INT8 tiles than on vpdpbusd. Each stage timed alone over one L1/L2-resident
// chunk of one KV head (G = 2 query heads, d = 128, Qwen3-0.6B), in TSC cycles per key row:
//   scores (VNNI)   scores_block_vnni: the kernel's, 8 rows at a time, vpdpbusd + reduce16
//   scores (AMX)    tdpbssd with the key rows as the A tile (loaded in place, any row stride) and
//                   the int8 query codes of the G heads as the B tile: C[key][head] in int32,
//                   then de-interleaved per head and scaled (the same int32 sums, so the same
//                   floats: checked)
//   softmax         scale_rows (key scales), softmax_block per head, scale_rows (value scales);
//                   with exp2_ps and with exp2_short_ps (what `fast` runs)
//   P·V             accumulate_block_f16 (AVX512-FP16) or accumulate_block_vnni (elsewhere)
// Measured 2026-12-03 (docs/performance.md, "int8 KV cache"): on the Intel AMX host the AMX scores were no faster
// than vpdpbusd (6.8-10.1 against 6.7-9.1 cycles a row at a 128-byte stride, 11.2-12.3 at 1024),
// so the kernel keeps VNNI; the short exp2 took the softmax stage from 2.5 to 1.5.
// Not built by CMake (AMX needs an AMX host):
//   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -Iinclude benchmarks/experiments/decode_int8_stages.cpp
#include <x86intrin.h>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>
#include "attnkit/attention/decode.hpp"
#include "decode_stage_timer.hpp"
#include "attnkit/core/amx.hpp"
using namespace attnkit;
using namespace attnkit::detail::decode;

#if defined(ATTNKIT_AMX) && defined(__AMX_INT8__)
// Tiles: 0, 1 C [16 keys][G] int32; 2, 3 B (the query codes of d 0-63 and 64-127, [16 dwords][G]);
// 4-7 A (16 key rows x 64 codes: rows 0-15 and 16-31, each half of d).
static void amx_configure_scores(int G) {
  detail::amx::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16;
  for (int t = 0; t < 4; ++t) cfg.colsb[t] = static_cast<std::uint16_t>(4 * G);
  for (int t = 4; t < 8; ++t) cfg.colsb[t] = 64;
  detail::amx::load_tile_config(cfg);  // not _tile_loadconfig: core/amx.hpp says why
}
// B[k][4 g + i] = q_g[64 h + 4 k + i]
static void pack_query_b(const QuantQuery& qq, int G, std::int8_t* b /* [2][16][4G] */) {
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k)
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < 4; ++i) b[(h * 16 + k) * 4 * G + 4 * g + i] = qq.codes[g * qq.stride + 64 * h + 4 * k + i];
}
// G = 2: scores of 32 rows k0 .. k0 + 31 (stride ld bytes) into st.p[g * 32 + i].
static void scores_amx_g2(const std::int8_t* k0, std::int64_t ld, const ItemState& st, const QuantQuery& qq) {
  alignas(64) std::int32_t c[32 * 2];
  _tile_zero(0);
  _tile_zero(1);
  _tile_loadd(4, k0, ld);
  _tile_loadd(5, k0 + 64, ld);
  _tile_loadd(6, k0 + 16 * ld, ld);
  _tile_loadd(7, k0 + 16 * ld + 64, ld);
  _tile_dpbssd(0, 4, 2);
  _tile_dpbssd(0, 5, 3);
  _tile_dpbssd(1, 6, 2);
  _tile_dpbssd(1, 7, 3);
  _tile_stored(0, c, 8);
  _tile_stored(1, c + 32, 8);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 s0 = _mm512_set1_ps(qq.scale[0]), s1 = _mm512_set1_ps(qq.scale[1]);
  for (int h = 0; h < 2; ++h) {
    const __m512i lo = _mm512_load_si512(c + 32 * h), hi = _mm512_load_si512(c + 32 * h + 16);
    _mm512_storeu_ps(st.p + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, even, hi)), s0));
    _mm512_storeu_ps(st.p + kBlock + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, odd, hi)), s1));
  }
}
#endif

static void stages(std::int64_t T, std::int64_t ld) {
  const std::int64_t d = 128, G = 2;
  std::mt19937 gen(1);
  std::uniform_int_distribution<int> ud(-127, 127);
  std::normal_distribution<float> nd;
  std::vector<std::int8_t> k(T * ld), v(T * ld);
  for (auto& x : k) x = static_cast<std::int8_t>(ud(gen));
  for (auto& x : v) x = static_cast<std::int8_t>(ud(gen));
  std::vector<float> ks(T), vs(T);
  for (auto& x : ks) x = 0.01f;
  for (auto& x : vs) x = 0.01f;
  alignas(64) static float buf[G * d + G * kBlock + 3 * G + 64];
  alignas(64) static float o[G * d];
  alignas(64) static float qbase[G * 128 / 4 + 2 * G + 64];
  const ItemState st{buf, buf + G * d, buf + G * (d + kBlock), buf + G * (d + kBlock) + G, buf + G * (d + kBlock) + 2 * G};
  for (int i = 0; i < G * d; ++i) buf[i] = nd(gen) * 0.1f;
  for (int g = 0; g < G; ++g) st.m[g] = kNegInf, st.l[g] = 0, st.alpha[g] = 1;
  const QuantQuery qq = quantize_query(st, G, 0, G, d, d, qbase);
  const auto time = [&](auto&& f) { return stage_cycles_per_row(T, f); };
  const double sc = time([&](std::int64_t b) { scores_block_vnni(StridedRows<std::int8_t>{k.data() + b * ld, ld}, kBlock, st, 0, G, d, qq); });
  std::vector<float> want(G * kBlock);
  std::copy(st.p, st.p + G * kBlock, want.begin());  // the last block's scores
  double sa = 0;
  bool same = true;
#if defined(ATTNKIT_AMX) && defined(__AMX_INT8__)
  alignas(64) static std::int8_t qb[2 * 16 * 4 * G];
  if (detail::amx::amx_available()) {
    pack_query_b(qq, G, qb);
    amx_configure_scores(G);
    _tile_loadd(2, qb, 4 * G);
    _tile_loadd(3, qb + 16 * 4 * G, 4 * G);
    sa = time([&](std::int64_t b) { scores_amx_g2(k.data() + b * ld, ld, st, qq); });
    _tile_release();
    same = std::equal(want.begin(), want.end(), st.p);
  }
#endif
  // The scores as the kernel leaves them (the last block's), restored before each softmax.
  const auto softmax = [&](auto short_exp) {
    return time([&](std::int64_t b) {
      std::copy(want.begin(), want.end(), st.p);
      scale_rows(st, 0, G, ks.data() + b);
      for (int g = 0; g < G; ++g) {
        st.m[g] = 4.f;
        softmax_block<false, decltype(short_exp)::value>(kBlock, st, g);
      }
      scale_rows(st, 0, G, vs.data() + b);
    });
  };
  const double sm = softmax(std::false_type{}), sms = softmax(std::true_type{});
  const double ac = time([&](std::int64_t b) {
#if defined(ATTNKIT_DECODE_FP16_PV)
    accumulate_block_f16(StridedRows<std::int8_t>{v.data() + b * ld, ld}, kBlock, st, o, 0, G, d, d);
#else
    accumulate_block_vnni(StridedRows<std::int8_t>{v.data() + b * ld, ld}, kBlock, st, o, 0, G, d, d);
#endif
  });
  std::printf("T %4ld stride %4ld, TSC cycles per key row (G 2, d 128): scores VNNI %.2f AMX %.2f (%s)  softmax+scales %.2f (short exp2 %.2f)  P.V %.2f  sum %.2f\n",
              (long)T, (long)ld, sc, sa, same ? "same" : "DIFFERENT", sm, sms, ac, sc + sms + ac);
}

int main() {
  for (int rep = 0; rep < 2; ++rep) {
    stages(512, 128);
    stages(512, 1024);
    stages(64, 128);
  }
}
