// attnkit/core/bf16.hpp — bfloat16 storage type.
//
// bf16 is the upper half of an IEEE float32. Conversion from float rounds to nearest, ties to
// even; NaN stays NaN (quiet). Conversion to float is exact. All arithmetic in attnkit is done
// in float32; bf16 is a storage format only.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace attnkit {

struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  static constexpr bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }
  explicit bf16(float f) : bits(round(f)) {}
  explicit operator float() const { return to_float(bits); }

  static std::uint16_t round(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // NaN
    const std::uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest even; overflow to inf is the correct result
    return static_cast<std::uint16_t>(u >> 16);
  }
  static float to_float(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(bf16) == 2);

inline float to_float(bf16 x) { return bf16::to_float(x.bits); }
inline float to_float(float x) { return x; }
inline bf16 to_bf16(float x) { return bf16(x); }
// Rounds x to the nearest bf16 value and returns it as float (reference computations use this).
inline float round_to_bf16(float x) { return bf16::to_float(bf16::round(x)); }

// Converts n elements between storage types (float <-> bf16, or same-type copy).
template <class To, class From>
inline void convert(const From* src, To* dst, long n) {
  for (long i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<To, bf16>) dst[i] = bf16(to_float(src[i]));
    else dst[i] = to_float(src[i]);
  }
}

template <class T>
inline constexpr bool is_storage_type_v = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

template <class T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else return "?";
}

}  // namespace attnkit
