// attnkit/text/pretokenizer.hpp — the tokenizer.json `pre_tokenizer`: regex splits, then ByteLevel.
//
// Contract: PreTokenizer::from_json accepts
//   {"type": "Split", "pattern": {"Regex": R} | {"String": S}, "behavior": B, "invert": bool}
//     with B one of Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous (Hugging
//     Face's SplitDelimiterBehavior: what happens to the matched delimiters);
//   {"type": "ByteLevel", "add_prefix_space": bool, "trim_offsets": bool, "use_regex": bool}
//     (use_regex splits with GPT-2's pattern first; offsets are not computed, so trim_offsets has
//     no effect on ids);
//   a "Sequence" of those, ending in exactly one ByteLevel (a byte-level BPE needs it last).
// for_each_piece(text, f) calls f(piece) for each pre-token, in order, as raw UTF-8 bytes; the
// byte-to-symbol map of ByteLevel is applied by the BPE model (bpe.hpp), which sees bytes.
//
// Regexes: tokenizer.json patterns are written for Oniguruma (what Hugging Face compiles them
// with). They are compiled with PCRE2 (UTF, Unicode properties, JIT) after translating the escapes
// whose meaning differs between the two: Oniguruma's \s is Unicode's White_Space (PCRE2's also
// takes U+180E), and its \w is letters, marks, decimal digits and connector punctuation. Any pattern PCRE2 rejects is an error
// naming the pattern and PCRE2's message.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"
#include "attnkit/text/json_fields.hpp"

namespace attnkit::text {

namespace detail {

// Oniguruma escapes -> PCRE2 with the same meaning (see the top of the file).
inline std::string onig_to_pcre2(const std::string& p, const std::string& where) {
  static const char* kWord = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";
  // White_Space: PCRE2's \s also takes U+180E (no longer a space since Unicode 6.3).
  static const char* kSpace = "\\t\\n\\x0B\\f\\r\\x{85}\\p{Zs}\\x{2028}\\x{2029}";
  std::string out;
  bool in_class = false;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[++i];
      if (e == 's') out += in_class ? std::string(kSpace) : "[" + std::string(kSpace) + "]";
      else if (e == 'S') {
        ATTNKIT_REQUIRE(!in_class, where, ": \\S inside a character class is not supported in pattern '", p, "'");
        out += "[^" + std::string(kSpace) + "]";
      } else if (e == 'w') out += in_class ? std::string(kWord) : "[" + std::string(kWord) + "]";
      else if (e == 'W') {
        ATTNKIT_REQUIRE(!in_class, where, ": \\W inside a character class is not supported in pattern '", p, "'");
        out += "[^" + std::string(kWord) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

// A compiled pattern, shared read-only by every thread; find() takes per-call match state.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) : source_(pattern) {
    const std::string p = literal ? pattern : onig_to_pcre2(pattern, where);
    int err = 0;
    PCRE2_SIZE off = 0;
    const std::uint32_t opts = PCRE2_UTF | PCRE2_NO_UTF_CHECK | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(), opts, &err, &off, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      attnkit::detail::throw_error(where, ": cannot compile pattern '", pattern, "': ", reinterpret_cast<const char*>(msg),
                          " at offset ", off);
    }
    code_ = std::shared_ptr<pcre2_code>(code, CodeFree{});
    jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }

  const std::string& source() const { return source_; }

  // Per-call state: match data, and a JIT stack that can grow for long runs (a 1 MB run of spaces
  // backtracks through `\s+(?!\S)`).
  class State {
   public:
    explicit State(const Regex& re)
        : md_(pcre2_match_data_create_from_pattern(re.code_.get(), nullptr), &pcre2_match_data_free),
          ctx_(pcre2_match_context_create(nullptr), &pcre2_match_context_free),
          stack_(re.jit_ ? pcre2_jit_stack_create(32 * 1024, 256 * 1024 * 1024, nullptr) : nullptr, &pcre2_jit_stack_free) {
      ATTNKIT_REQUIRE(md_ && ctx_ && (!re.jit_ || stack_), "Regex: out of memory for PCRE2 match state");
      if (stack_) pcre2_jit_stack_assign(ctx_.get(), nullptr, stack_.get());
    }

   private:
    friend class Regex;
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md_;
    std::unique_ptr<pcre2_match_context, decltype(&pcre2_match_context_free)> ctx_;
    std::unique_ptr<pcre2_jit_stack, decltype(&pcre2_jit_stack_free)> stack_;
  };

  // The first match in s at or after `from`: {begin, end}, or {npos, npos}. s must be valid UTF-8.
  std::pair<std::size_t, std::size_t> find(State& st, std::string_view s, std::size_t from) const {
    const auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc = jit_ ? pcre2_jit_match(code_.get(), subject, s.size(), from, 0, st.md_.get(), st.ctx_.get())
                  : pcre2_match(code_.get(), subject, s.size(), from, PCRE2_NO_UTF_CHECK, st.md_.get(), st.ctx_.get());
    if (rc == PCRE2_ERROR_NOMATCH) return {std::string_view::npos, std::string_view::npos};
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      attnkit::detail::throw_error("Regex: matching pattern '", source_, "' failed: ", reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.md_.get());
    return {ov[0], ov[1]};
  }

 private:
  struct CodeFree {
    void operator()(pcre2_code* c) const { pcre2_code_free(c); }
  };
  std::string source_;
  std::shared_ptr<pcre2_code> code_;
  bool jit_ = false;
};

}  // namespace detail

// GPT-2's pre-tokenization pattern, which ByteLevel applies when use_regex is true.
inline constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class PreTokenizer {
 public:
  enum class Behavior { isolated, removed, merged_with_previous, merged_with_next, contiguous };

  static PreTokenizer from_json(const nlohmann::json& j, const std::string& where) {
    PreTokenizer p;
    ATTNKIT_REQUIRE(!j.is_null(), where, ": a byte-level BPE needs a pre_tokenizer ending in ByteLevel, got null");
    p.add(j, where);
    ATTNKIT_REQUIRE(p.byte_level_, where, ": a byte-level BPE needs a ByteLevel pre-tokenizer (only byte-level BPE is supported)");
    return p;
  }

  std::string describe() const {
    std::string s;
    for (const auto& st : splits_) s += "Split(" + st.re.source() + ") ";
    s += "ByteLevel";
    return s;
  }

  // Per-call regex state, one per split step.
  struct Part {
    std::size_t b, e;
    bool delim;
  };
  struct State {
    std::vector<detail::Regex::State> re;
    std::vector<std::vector<Part>> parts;  // per step, reused across calls
  };
  State new_state() const {
    State s;
    for (const auto& st : splits_) s.re.emplace_back(st.re);
    s.parts.resize(splits_.size());
    return s;
  }

  template <class F>
  void for_each_piece(State& st, std::string_view text, F&& f) const {
    if (add_prefix_space_) {
      // HF prepends to every split that does not start with a space, before any regex step
      // runs after it; with ByteLevel last, that is each piece the splits produced.
      split_from(st, 0, text, [&](std::string_view piece) {
        if (!piece.empty() && piece[0] == ' ') return emit_gpt2(st, piece, f);
        std::string spaced = " ";
        spaced += piece;
        emit_gpt2(st, spaced, f);
      });
    } else
      split_from(st, 0, text, [&](std::string_view piece) { emit_gpt2(st, piece, f); });
  }

 private:
  struct SplitStep {
    detail::Regex re;
    Behavior behavior;
    bool invert;
  };
  std::vector<SplitStep> splits_;  // the last one is GPT-2's when ByteLevel's use_regex is set
  bool byte_level_ = false, add_prefix_space_ = false, gpt2_regex_ = false;

  void add(const nlohmann::json& j, const std::string& where) {
    namespace js = detail::json;
    ATTNKIT_REQUIRE(!byte_level_, where, ": ByteLevel must be the last pre-tokenizer");
    const std::string type = js::type_of(j, where);
    if (type == "Sequence") {
      js::only_fields(j, where, {"type", "pretokenizers"});
      const auto& list = js::field(j, where, "pretokenizers");
      ATTNKIT_REQUIRE(list.is_array(), where, ".pretokenizers: expected an array");
      for (std::size_t i = 0; i < list.size(); ++i) add(list[i], where + ".pretokenizers[" + std::to_string(i) + "]");
    } else if (type == "Split") {
      js::only_fields(j, where, {"type", "pattern", "behavior", "invert"});
      const auto& pat = js::field(j, where, "pattern");
      ATTNKIT_REQUIRE(pat.is_object() && pat.size() == 1 && (pat.contains("Regex") || pat.contains("String")) &&
                          pat.begin()->is_string(),
                      where, ".pattern: expected {\"Regex\": string} or {\"String\": string}");
      const bool literal = pat.contains("String");
      ATTNKIT_REQUIRE(js::field(j, where, "behavior").is_string(), where, ".behavior: expected a string");
      const std::string b = j["behavior"].get<std::string>();
      Behavior beh;
      if (b == "Isolated") beh = Behavior::isolated;
      else if (b == "Removed") beh = Behavior::removed;
      else if (b == "MergedWithPrevious") beh = Behavior::merged_with_previous;
      else if (b == "MergedWithNext") beh = Behavior::merged_with_next;
      else if (b == "Contiguous") beh = Behavior::contiguous;
      else attnkit::detail::throw_error(where, ".behavior: '", b, "' is not a split behavior");
      splits_.push_back({detail::Regex(pat.begin()->get<std::string>(), literal, where + ".pattern"), beh,
                         js::boolean(j, where, "invert", false)});
    } else if (type == "ByteLevel") {
      js::only_fields(j, where, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
      byte_level_ = true;
      add_prefix_space_ = js::boolean(j, where, "add_prefix_space", true);
      js::boolean(j, where, "trim_offsets", true);  // offsets only; ids do not depend on it
      gpt2_regex_ = js::boolean(j, where, "use_regex", true);
      if (gpt2_regex_)
        splits_.push_back({detail::Regex(kGpt2Pattern, false, where), Behavior::isolated, false});
    } else
      attnkit::detail::throw_error(where, ": pre-tokenizer type '", type, "' is not supported (supported: Split, ByteLevel, Sequence)");
  }

  // Splits before the prefix space: every step but GPT-2's.
  std::size_t user_splits() const { return splits_.size() - (gpt2_regex_ ? 1 : 0); }

  template <class F>
  void split_from(State& st, std::size_t step, std::string_view s, F&& f) const {
    if (step == user_splits()) return f(s);
    split_one(st, step, s, [&](std::string_view piece) { split_from(st, step + 1, piece, f); });
  }

  template <class F>
  void emit_gpt2(State& st, std::string_view s, F& f) const {
    if (gpt2_regex_) split_one(st, splits_.size() - 1, s, f);
    else f(s);
  }

  // One Split step over s, as Hugging Face's NormalizedString::split: s is cut into parts, each a
  // match of the regex (a delimiter; with invert, the non-matches are) or a gap between matches;
  // the behavior then decides where the delimiters go; empty pieces are dropped. An empty match
  // right where the previous match ended is skipped (the Rust iterators' rule); other empty
  // matches cut the text there.
  template <class F>
  void split_one(State& st, std::size_t step, std::string_view s, F&& f) const {
    const SplitStep& sp = splits_[step];
    auto& rs = st.re[step];
    auto& parts = st.parts[step];
    parts.clear();
    std::size_t prev = 0, from = 0, last_end = std::string_view::npos;
    while (from <= s.size()) {
      auto [mb, me] = sp.re.find(rs, s, from);
      if (mb == std::string_view::npos) break;
      if (me == mb) {
        std::size_t next = mb + 1;
        while (next < s.size() && (static_cast<unsigned char>(s[next]) & 0xC0) == 0x80) ++next;
        from = next;
        if (mb == last_end) continue;
      } else
        from = me;
      if (prev != mb) parts.push_back({prev, mb, sp.invert});
      parts.push_back({mb, me, !sp.invert});
      prev = last_end = me;
    }
    if (prev != s.size()) parts.push_back({prev, s.size(), sp.invert});
    // Apply the behavior in place: `keep` marks parts that become pieces.
    std::size_t n = 0;
    auto push = [&](const Part& p) { parts[n++] = {p.b, p.e, false}; };
    switch (sp.behavior) {
      case Behavior::isolated:
        for (const auto& p : parts) push(p);
        break;
      case Behavior::removed:
        for (const auto& p : parts)
          if (!p.delim) push(p);
        break;
      case Behavior::contiguous: {
        bool prev_delim = false;
        for (std::size_t i = 0; i < parts.size(); ++i) {
          const Part p = parts[i];
          if (n > 0 && p.delim == prev_delim) parts[n - 1].e = p.e;
          else push(p);
          prev_delim = p.delim;
        }
        break;
      }
      case Behavior::merged_with_previous: {
        bool prev_delim = false;
        for (std::size_t i = 0; i < parts.size(); ++i) {
          const Part p = parts[i];
          if (p.delim && !prev_delim && n > 0) parts[n - 1].e = p.e;
          else push(p);
          prev_delim = p.delim;
        }
        break;
      }
      case Behavior::merged_with_next: {
        // Walk backwards: a delimiter not followed by another joins the part after it.
        std::size_t w = parts.size();
        bool next_delim = false;
        for (std::size_t i = parts.size(); i-- > 0;) {
          const Part p = parts[i];
          if (p.delim && !next_delim && w < parts.size()) parts[w].b = p.b;
          else parts[--w] = {p.b, p.e, false};
          next_delim = p.delim;
        }
        for (std::size_t i = w; i < parts.size(); ++i) parts[n++] = parts[i];
        break;
      }
    }
    for (std::size_t i = 0; i < n; ++i)
      if (parts[i].e > parts[i].b) f(s.substr(parts[i].b, parts[i].e - parts[i].b));
  }
};

}  // namespace attnkit::text
