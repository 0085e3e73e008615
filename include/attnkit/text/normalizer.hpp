// attnkit/text/normalizer.hpp — the tokenizer.json `normalizer`: Unicode normal forms via utf8proc.
//
// Contract: Normalizer::from_json accepts null, {"type": "NFC" | "NFD" | "NFKC" | "NFKD"} and a
// "Sequence" of those; anything else is an error naming the type or field. apply(s) maps valid
// UTF-8 to valid UTF-8. ASCII text is returned unchanged without calling utf8proc (every normal
// form leaves ASCII alone), which is most of the input of a typical prompt.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>
#include <utf8proc.h>

#include "attnkit/core/error.hpp"
#include "attnkit/text/json_fields.hpp"

namespace attnkit::text {

class Normalizer {
 public:
  static Normalizer from_json(const nlohmann::json& j, const std::string& where) {
    Normalizer n;
    if (j.is_null()) return n;
    n.add(j, where);
    return n;
  }

  bool empty() const { return forms_.empty(); }

  // Names the forms applied, e.g. "NFC" (for summaries).
  std::string describe() const {
    std::string s;
    for (auto f : forms_) s += (s.empty() ? "" : "+") + std::string(name(f));
    return s.empty() ? "none" : s;
  }

  std::string apply(std::string_view s) const {
    std::string out(s);
    if (forms_.empty() || is_ascii(s)) return out;
    for (auto f : forms_) out = map(out, f);
    return out;
  }

 private:
  enum class Form { nfc, nfd, nfkc, nfkd };
  std::vector<Form> forms_;

  static const char* name(Form f) {
    switch (f) {
      case Form::nfc: return "NFC";
      case Form::nfd: return "NFD";
      case Form::nfkc: return "NFKC";
      case Form::nfkd: return "NFKD";
    }
    return "?";
  }

  void add(const nlohmann::json& j, const std::string& where) {
    const std::string type = detail::json::type_of(j, where);
    if (type == "Sequence") {
      detail::json::only_fields(j, where, {"type", "normalizers"});
      const auto& list = detail::json::field(j, where, "normalizers");
      ATTNKIT_REQUIRE(list.is_array(), where, ".normalizers: expected an array");
      for (std::size_t i = 0; i < list.size(); ++i) add(list[i], where + ".normalizers[" + std::to_string(i) + "]");
      return;
    }
    detail::json::only_fields(j, where, {"type"});
    if (type == "NFC") forms_.push_back(Form::nfc);
    else if (type == "NFD") forms_.push_back(Form::nfd);
    else if (type == "NFKC") forms_.push_back(Form::nfkc);
    else if (type == "NFKD") forms_.push_back(Form::nfkd);
    else
      attnkit::detail::throw_error(where, ": normalizer type '", type,
                          "' is not supported (supported: NFC, NFD, NFKC, NFKD, Sequence)");
  }

  static bool is_ascii(std::string_view s) {
    for (unsigned char c : s)
      if (c & 0x80) return false;
    return true;
  }

  static std::string map(const std::string& s, Form f) {
    int opts = UTF8PROC_STABLE;
    if (f == Form::nfc || f == Form::nfkc) opts |= UTF8PROC_COMPOSE;
    else opts |= UTF8PROC_DECOMPOSE;
    if (f == Form::nfkc || f == Form::nfkd) opts |= UTF8PROC_COMPAT;
    utf8proc_uint8_t* dst = nullptr;
    // Explicit length (not NULLTERM): text may hold NUL characters.
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                            static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                            static_cast<utf8proc_option_t>(opts));
    std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> hold(dst, &std::free);
    ATTNKIT_REQUIRE(n >= 0, "Normalizer: utf8proc: ", utf8proc_errmsg(n));
    return std::string(reinterpret_cast<const char*>(dst), static_cast<std::size_t>(n));
  }
};

}  // namespace attnkit::text
