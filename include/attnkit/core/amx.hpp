// attnkit/core/amx.hpp — the AMX platform bits shared by the linear layers and attention:
// whether this build targets AMX (ATTNKIT_AMX), the process-wide switch, Linux's permission
// request for the tile state, and the one tile configuration every kernel uses (8 tiles of
// 16 rows x 64 bytes: f32 C tiles of 16 x 16, bf16 A tiles of 16 x 32, VNNI B tiles of
// 16 pairs x 16 columns).
#pragma once

#include <atomic>
#include <cstdint>

#include "attnkit/core/bf16.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define ATTNKIT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace attnkit::detail::amx {

// Process-wide switch (default on) so tests and comparisons can force the FMA paths.
inline std::atomic<bool>& amx_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

#if defined(ATTNKIT_AMX)

// Linux keeps AMX tile data disabled until the process asks for it (once, for all threads).
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}
inline bool amx_available() { return amx_enabled().load(std::memory_order_relaxed) && amx_permitted(); }

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// ldtilecfg / sttilecfg with the whole 64-byte configuration as the memory operand. GCC 12's
// _tile_loadconfig names only its first 8 bytes ("m" of a void*), so at -O2 (CMake's
// RelWithDebInfo) the compiler dropped the stores of the tiles' rows and columns as dead: every
// tile was left unconfigured and the first tile instruction raised SIGILL. -O3 merged the stores
// into one that the 8 bytes overlap, which hid it.
inline void load_tile_config(const TileConfig& cfg) { __asm__ volatile("ldtilecfg %0" : : "m"(cfg)); }
inline TileConfig stored_tile_config() {
  TileConfig cfg;
  __asm__ volatile("sttilecfg %0" : "=m"(cfg));
  return cfg;
}

// The configuration every kernel uses: 8 tiles of 16 rows x 64 bytes.
inline TileConfig kernel_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}
inline void amx_configure() { load_tile_config(kernel_tile_config()); }
inline void amx_release() { _tile_release(); }

inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// x[K] -> P planes of bf16 rows dst[p * plane + 0 .. ld), zero from K to ld. P = 1: bf16(x)
// (RNE). P = 3: hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid); hi + mid + lo == x
// for normal floats (3 x 8 significant bits), so the products with bf16 weights are exact.
template <int P>
void split_row_to_bf16(const float* x, std::int64_t K, std::uint16_t* dst, std::int64_t plane, std::int64_t ld) {
  std::int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    __m512 r = _mm512_loadu_ps(x + i);
#pragma GCC unroll 3
    for (int p = 0; p < P; ++p) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + p * plane + i), h);
      if (p + 1 < P) r = _mm512_sub_ps(r, widen_bf16(h));
    }
  }
  for (; i < K; ++i) {
    float r = x[i];
    for (int p = 0; p < P; ++p) {
      const std::uint16_t h = bf16::round(r);
      dst[p * plane + i] = h;
      r -= bf16::to_float(h);
    }
  }
  for (int p = 0; p < P; ++p)
    for (std::int64_t j = i; j < ld; ++j) dst[p * plane + j] = 0;
}

#else

inline bool amx_available() { return false; }

#endif

}  // namespace attnkit::detail::amx
