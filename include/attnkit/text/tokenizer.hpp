// attnkit/text/tokenizer.hpp — a Hugging Face tokenizer.json, byte-level BPE (Qwen, GPT-2, Llama 3).
//
// Contract (target attnkit::text; PCRE2 and utf8proc):
// - Tokenizer::from_file / from_json read the file as checkpoints ship it: `added_tokens`, the
//   `normalizer` (normalizer.hpp), the `pre_tokenizer` (pretokenizer.hpp; its Split regex is the
//   one written in the file, compiled with PCRE2's JIT), the BPE `model` (bpe.hpp), a ByteLevel
//   `post_processor` (adds nothing) and the ByteLevel `decoder`. Every field is read or is an error
//   naming it, so a setting we do not implement never changes the ids silently.
// - encode(text) gives the ids Hugging Face's `tokenizer.encode(text, add_special_tokens=False)`
//   gives: added tokens are found first (leftmost, longest; those with normalized=false in the raw
//   text, the others after normalization), never split; the text between them is normalized,
//   pre-tokenized and merged. EncodeOptions::parse_special = false leaves special tokens in the
//   text as plain text (what a chat front end does with user input). Text that is not valid UTF-8
//   is an error naming the byte offset, or with lossy_utf8 its bad bytes read as U+FFFD.
// - decode(ids) is HF's decode: the tokens' bytes joined, read as UTF-8 with each ill-formed
//   part as U+FFFD; skip_special drops special tokens. An id outside the vocabulary is an error.
// - StreamDecoder turns ids into text one at a time, holding the bytes of a character a token
//   cut in half; its pieces joined equal decode() of all the ids.
// - A Tokenizer is immutable after loading and safe to use from several threads at once (the word
//   cache inside the BPE model locks).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"
#include "attnkit/io/json_file.hpp"
#include "attnkit/text/bpe.hpp"
#include "attnkit/text/json_fields.hpp"
#include "attnkit/text/normalizer.hpp"
#include "attnkit/text/pretokenizer.hpp"
#include "attnkit/text/utf8.hpp"

namespace attnkit::text {

struct EncodeOptions {
  bool parse_special = true;  // match special tokens written in the text
  bool lossy_utf8 = false;    // invalid UTF-8 reads as U+FFFD instead of an error
};

struct AddedToken {
  std::string content;
  TokenId id = -1;
  bool special = false, lstrip = false, rstrip = false, normalized = false;
};

class Tokenizer {
 public:
  static Tokenizer from_file(const std::filesystem::path& path) {
    const nlohmann::json j = io::read_json_file(path, "tokenizer file");
    return from_json(j, path.string());
  }

  static Tokenizer from_json(const nlohmann::json& j, const std::string& origin = "tokenizer.json") {
    namespace js = detail::json;
    ATTNKIT_REQUIRE(j.is_object(), origin, ": expected a JSON object");
    js::only_fields(j, origin,
                    {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor",
                     "decoder", "model"});
    for (const char* k : {"truncation", "padding"})
      ATTNKIT_REQUIRE(!j.contains(k) || j[k].is_null(), origin, ": '", k,
                      "' is not supported (an inference tokenizer encodes whole texts; set it to null)");
    Tokenizer t;
    t.origin_ = origin;
    auto s = std::make_shared<State>();
    s->model = BytePairModel::from_json(js::field(j, origin, "model"), origin + ": model");
    s->normalizer = Normalizer::from_json(j.value("normalizer", nlohmann::json()), origin + ": normalizer");
    s->pre = PreTokenizer::from_json(j.value("pre_tokenizer", nlohmann::json()), origin + ": pre_tokenizer");
    t.state_ = std::move(s);
    check_byte_level(j.value("post_processor", nlohmann::json()), origin + ": post_processor", true);
    check_byte_level(j.value("decoder", nlohmann::json()), origin + ": decoder", false);
    t.read_added(j.value("added_tokens", nlohmann::json::array()), origin + ": added_tokens");
    t.build_pieces();
    return t;
  }

  // ---- encoding
  std::vector<TokenId> encode(std::string_view text, const EncodeOptions& opt = {}) const {
    std::string fixed;
    if (const std::size_t bad = utf8_error(text); bad != utf8_npos) {
      ATTNKIT_REQUIRE(opt.lossy_utf8, "Tokenizer::encode: text is not valid UTF-8 at byte ", bad,
                      " (EncodeOptions::lossy_utf8 reads bad bytes as U+FFFD)");
      fixed = lossy_utf8(text);
      text = fixed;
    }
    std::vector<TokenId> ids;
    ids.reserve(text.size() / 3 + 4);
    PreTokenizer::State ps = state_->pre.new_state();
    // Added tokens matched in the raw text; the text between them goes on.
    split_added(text, /*normalized_pass=*/false, opt, ids, [&](std::string_view seg) {
      if (state_->normalizer.empty()) return encode_plain(ps, seg, ids);
      const std::string norm = state_->normalizer.apply(seg);
      if (!has_normalized_added_) return encode_plain(ps, norm, ids);
      split_added(norm, true, opt, ids, [&](std::string_view part) { encode_plain(ps, part, ids); });
    });
    return ids;
  }

  // ---- decoding
  std::string decode(std::span<const TokenId> ids, bool skip_special = false) const {
    std::string bytes;
    for (const TokenId id : ids) {
      check_id(id, "Tokenizer::decode");
      if (!(skip_special && is_special(id))) bytes += pieces_[static_cast<std::size_t>(id)];
    }
    return lossy_utf8(bytes);
  }

  // The bytes the token stands for (perhaps part of a UTF-8 character).
  const std::string& token_to_piece(TokenId id) const {
    check_id(id, "Tokenizer::token_to_piece");
    return pieces_[static_cast<std::size_t>(id)];
  }

  // The id of an added token's content or of a vocab entry as the file writes it (byte-level
  // symbols, e.g. "Ġthe").
  std::optional<TokenId> token_to_id(std::string_view token) const {
    for (const auto& a : added_)
      if (a.content == token) return a.id;
    const TokenId id = state_->model.find(token);
    if (id >= 0) return id;
    return std::nullopt;
  }

  TokenId vocab_size() const { return static_cast<TokenId>(pieces_.size()); }
  bool is_special(TokenId id) const {
    return id >= 0 && id < vocab_size() && special_[static_cast<std::size_t>(id)];
  }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  const std::string& origin() const { return origin_; }

  // One line for summaries: "<vocab> tokens (<merges> merges, <added> added), NFC, Split(...) ByteLevel".
  std::string describe() const {
    return std::to_string(vocab_size()) + " tokens (" + std::to_string(state_->model.merge_count()) + " merges, " +
           std::to_string(added_.size()) + " added), normalizer " + state_->normalizer.describe() + ", " +
           state_->pre.describe();
  }

 private:
  // What encode reads; shared so that copies of a Tokenizer share one BPE cache.
  struct State {
    BytePairModel model;
    Normalizer normalizer;
    PreTokenizer pre;
  };
  std::shared_ptr<const State> state_;
  std::string origin_;
  std::vector<AddedToken> added_;
  std::vector<std::string> pieces_;  // id -> bytes
  std::vector<bool> known_, special_;
  bool has_normalized_added_ = false;
  // Added tokens by first byte, longest first: the candidates where a match can start.
  std::array<std::vector<std::uint32_t>, 256> by_first_;

  static void check_byte_level(const nlohmann::json& j, const std::string& where, bool optional) {
    namespace js = detail::json;
    if (j.is_null()) {
      ATTNKIT_REQUIRE(optional, where, ": a byte-level BPE needs the ByteLevel decoder, got null");
      return;
    }
    const std::string type = js::type_of(j, where);
    ATTNKIT_REQUIRE(type == "ByteLevel", where, ": type '", type, "' is not supported (supported: ByteLevel)");
    js::only_fields(j, where, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
    // Offsets and pre-tokenization flags: they change neither the ids nor the decoded bytes here.
    js::boolean(j, where, "add_prefix_space", false);
    js::boolean(j, where, "trim_offsets", false);
    js::boolean(j, where, "use_regex", false);
  }

  void read_added(const nlohmann::json& list, const std::string& where) {
    namespace js = detail::json;
    ATTNKIT_REQUIRE(list.is_array(), where, ": expected an array");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string w = where + "[" + std::to_string(i) + "]";
      const auto& e = list[i];
      js::only_fields(e, w, {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"});
      AddedToken a;
      const auto& id = js::field(e, w, "id");
      ATTNKIT_REQUIRE(id.is_number_integer() && id.get<std::int64_t>() >= 0 && id.get<std::int64_t>() < (1ll << 31), w,
                      ".id: expected an id in [0, 2^31)");
      a.id = id.get<TokenId>();
      const auto& content = js::field(e, w, "content");
      ATTNKIT_REQUIRE(content.is_string() && !content.get<std::string>().empty(), w, ".content: expected a non-empty string");
      a.content = content.get<std::string>();
      ATTNKIT_REQUIRE(is_utf8(a.content), w, ".content: not valid UTF-8");
      ATTNKIT_REQUIRE(!js::boolean(e, w, "single_word", false), w, ".single_word: true is not supported");
      a.lstrip = js::boolean(e, w, "lstrip", false);
      a.rstrip = js::boolean(e, w, "rstrip", false);
      a.special = js::boolean(e, w, "special", false);
      // HF's default: special tokens are matched in the raw text, others after normalization.
      a.normalized = js::boolean(e, w, "normalized", !a.special);
      for (const auto& b : added_)
        ATTNKIT_REQUIRE(b.content != a.content, w, ": duplicate added token '", a.content, "'");
      added_.push_back(std::move(a));
    }
    // An added token without normalization needs no second pass; with a normalizer that leaves
    // the content unchanged it matches the same either way, but HF looks for it after normalizing.
    has_normalized_added_ = std::any_of(added_.begin(), added_.end(), [&](const AddedToken& a) { return a.normalized; }) &&
                            !state_->normalizer.empty();
    for (std::uint32_t i = 0; i < added_.size(); ++i) by_first_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
    for (auto& v : by_first_)
      std::stable_sort(v.begin(), v.end(), [&](std::uint32_t x, std::uint32_t y) {
        return added_[x].content.size() > added_[y].content.size();
      });
  }

  void build_pieces() {
    TokenId n = state_->model.max_id() + 1;
    for (const auto& a : added_) n = std::max(n, a.id + 1);
    // Ids index a table: holes are fine, a sparse giant (one id near 2^31) is not a vocabulary.
    std::int64_t count = static_cast<std::int64_t>(added_.size());
    state_->model.for_each_entry([&](const std::string&, TokenId) { ++count; });
    ATTNKIT_REQUIRE(n <= 2 * count + 256, origin_, ": the largest id is ", n - 1, " for ", count,
                    " tokens; ids must be dense (below 2 x tokens + 256)");
    pieces_.assign(static_cast<std::size_t>(n), {});
    known_.assign(static_cast<std::size_t>(n), false);
    special_.assign(static_cast<std::size_t>(n), false);
    // HF's ByteLevel decoder: a token whose characters are all byte-level symbols stands for
    // those bytes; any other token for its own UTF-8.
    auto bytes_of = [](const std::string& token) {
      std::string raw;
      return detail::byte_level::to_bytes(token, raw) ? raw : token;
    };
    state_->model.for_each_entry([&](const std::string& token, TokenId id) {
      pieces_[static_cast<std::size_t>(id)] = bytes_of(token);
      known_[static_cast<std::size_t>(id)] = true;
    });
    for (const auto& a : added_) {  // an added token shadows a vocab entry of the same id
      pieces_[static_cast<std::size_t>(a.id)] = bytes_of(a.content);
      known_[static_cast<std::size_t>(a.id)] = true;
      special_[static_cast<std::size_t>(a.id)] = a.special;
    }
  }

  void check_id(TokenId id, const char* fn) const {
    ATTNKIT_REQUIRE(id >= 0 && id < vocab_size() && known_[static_cast<std::size_t>(id)], fn, ": token id ", id,
                    " is not in the vocabulary (", vocab_size(), " ids)");
  }

  static bool is_space(std::uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
  }
  // The code point starting at s[i] and its length (s is valid UTF-8).
  static std::pair<std::uint32_t, std::size_t> decode_at(std::string_view s, std::size_t i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) return {c, 1};
    const std::size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    std::uint32_t cp = c & (0x7F >> len);
    for (std::size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    return {cp, len};
  }

  // Finds the added tokens of one pass in s (leftmost, then longest, as HF's Aho-Corasick with
  // LeftmostLongest), appends their ids and calls plain(segment) for the text between them.
  template <class F>
  void split_added(std::string_view s, bool normalized_pass, const EncodeOptions& opt, std::vector<TokenId>& ids,
                   F&& plain) const {
    std::size_t seg = 0, i = 0;
    while (i < s.size()) {
      const auto& cands = by_first_[static_cast<unsigned char>(s[i])];
      const AddedToken* hit = nullptr;
      for (std::uint32_t c : cands) {
        const AddedToken& a = added_[c];
        if ((a.normalized && has_normalized_added_) != normalized_pass) continue;
        if (a.special && !opt.parse_special) continue;
        if (s.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      std::size_t start = i, end = i + hit->content.size();
      if (hit->lstrip)  // whitespace before it belongs to it (not before the previous match's end)
        while (start > seg) {
          std::size_t k = start - 1;
          while (k > seg && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
          if (!is_space(decode_at(s, k).first)) break;
          start = k;
        }
      if (hit->rstrip)
        while (end < s.size()) {
          const auto [cp, len] = decode_at(s, end);
          if (!is_space(cp)) break;
          end += len;
        }
      if (start > seg) plain(s.substr(seg, start - seg));
      ids.push_back(hit->id);
      seg = i = end;
    }
    if (seg < s.size()) plain(s.substr(seg));
  }

  void encode_plain(PreTokenizer::State& ps, std::string_view s, std::vector<TokenId>& ids) const {
    state_->pre.for_each_piece(ps, s, [&](std::string_view piece) { state_->model.encode(piece, ids); });
  }
};

// Incremental decoding for streamed output (see the top of the file).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false) : tok_(&tok), skip_special_(skip_special) {}

  std::string push(TokenId id) {
    const std::string& piece = tok_->token_to_piece(id);
    if (skip_special_ && tok_->is_special(id)) return {};
    held_ += piece;
    std::string out;
    held_ = append_lossy(out, held_, /*hold_incomplete=*/true);
    return out;
  }

  std::string flush() {
    std::string out;
    append_lossy(out, held_);
    held_.clear();
    return out;
  }

  bool holding() const { return !held_.empty(); }

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string held_;
};

}  // namespace attnkit::text
