// attnkit/text/utf8.hpp — UTF-8 validation and the lossy read every text path shares.
//
// Contract:
// - utf8_error(s) returns the byte offset of the first byte that does not start or continue a
//   well-formed UTF-8 character (Unicode 15 table 3-7: no overlongs, no surrogates, <= U+10FFFF),
//   or npos when s is valid.
// - append_lossy(out, s, hold_incomplete) appends s to out with every maximal ill-formed subpart
//   replaced by one U+FFFD (Unicode's "substitution of maximal subparts", which Rust's
//   from_utf8_lossy and so Hugging Face's decoders follow). With hold_incomplete, a character cut
//   off by the end of s is not replaced: its bytes are returned (the caller prepends them to the next
//   chunk), so streaming output never shows half a character and equals the one-shot read.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace attnkit::text {

namespace detail::utf8 {

// Length of the well-formed prefix of a character starting at s[i] (1..4), and whether it is complete.
// A prefix of 0 means s[i] cannot start a character.
struct Prefix {
  std::size_t len;
  bool complete;
};

inline Prefix char_prefix(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {1, true};
  std::size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range (table 3-7)
  if (b0 >= 0xC2 && b0 <= 0xDF) need = 1;
  else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else
    return {0, false};
  std::size_t k = 1;
  for (; k <= need; ++k) {
    if (i + k >= s.size()) return {k, false};  // cut off by the end
    const auto b = static_cast<unsigned char>(s[i + k]);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {k, false};
  }
  return {k, true};
}

}  // namespace detail::utf8

inline constexpr std::size_t utf8_npos = static_cast<std::size_t>(-1);

inline std::size_t utf8_error(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    // ASCII runs eight bytes at a time: most text is mostly ASCII.
    while (i + 8 <= s.size()) {
      std::uint64_t w;
      __builtin_memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    const auto p = detail::utf8::char_prefix(s, i);
    if (!p.complete) return i;
    i += p.len;
  }
  return utf8_npos;
}

inline bool is_utf8(std::string_view s) { return utf8_error(s) == utf8_npos; }

// Appends s to out, ill-formed subparts as U+FFFD; returns the held tail (see the top of the file).
inline std::string append_lossy(std::string& out, std::string_view s, bool hold_incomplete = false) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  std::size_t i = 0, run = 0;  // [run, i): valid bytes not yet copied
  while (i < s.size()) {
    const auto p = detail::utf8::char_prefix(s, i);
    if (p.complete) {
      i += p.len;
      continue;
    }
    out.append(s.substr(run, i - run));
    if (hold_incomplete && p.len > 0 && i + p.len >= s.size()) return std::string(s.substr(i));
    out.append(kReplacement);
    i += p.len == 0 ? 1 : p.len;  // the maximal subpart: the valid prefix, or the lone bad byte
    run = i;
  }
  out.append(s.substr(run));
  return {};
}

inline std::string lossy_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  append_lossy(out, s);
  return out;
}

}  // namespace attnkit::text
