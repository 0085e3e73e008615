// attnkit/core/amx.hpp — the AMX platform bits shared by the linear layers and attention:
// whether this build targets AMX (ATTNKIT_AMX), the process-wide switch, Linux's permission
// request for the tile state, and the one tile configuration every kernel uses (8 tiles of
// 16 rows x 64 bytes: f32 C tiles of 16 x 16, bf16 A tiles of 16 x 32, VNNI B tiles of
// 16 pairs x 16 columns).
#pragma once

#include <atomic>
#include <cstdint>

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

// Every tile 16 rows x 64 bytes.
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}
inline void amx_release() { _tile_release(); }

#else

inline bool amx_available() { return false; }

#endif

}  // namespace attnkit::detail::amx
