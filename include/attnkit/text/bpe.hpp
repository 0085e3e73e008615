// attnkit/text/bpe.hpp — the tokenizer.json `model` of type BPE, byte-level.
//
// Contract: BytePairModel::from_json reads `vocab` (string -> id), `merges` (["a", "b"] pairs or
// "a b" strings; earlier merges rank first) and the flags; a vocab entry is a string of GPT-2's
// byte-level symbols (bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other
// 68 bytes for U+0100..U+0143). encode(piece, out) appends the ids of one pre-token given as raw
// bytes, exactly as Hugging Face's BPE: each byte starts as its symbol; repeatedly the adjacent
// pair of lowest merge rank is merged, the leftmost first among equal ranks (HF's heap ordered by
// (rank, position), stale entries skipped). With ignore_merges, a pre-token that is itself a vocab
// entry is that entry. Dropout, a continuing-subword prefix, an end-of-word suffix and byte
// fallback are errors (not byte-level BPE as Qwen, GPT-2 and Llama 3 ship it).
//
// Speed: results for pre-tokens up to 64 bytes are cached (shared by threads, read-mostly; a
// bounded table, as HF's); a merge lookup is one probe of an open-addressing table keyed by the
// pair of ids.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"
#include "attnkit/text/json_fields.hpp"

namespace attnkit::text {

using TokenId = std::int64_t;

namespace detail::byte_level {

// GPT-2's bytes_to_unicode: the code point that stands for byte b.
inline std::uint32_t byte_to_code(unsigned b) {
  if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return b;
  unsigned n = 0;  // the rank of b among the bytes that are not printable
  for (unsigned c = 0; c < b; ++c)
    if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255))) ++n;
  return 256 + n;
}

inline void append_utf8(std::string& s, std::uint32_t cp) {
  if (cp < 0x80) s += static_cast<char>(cp);
  else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The 256 symbols as UTF-8 strings, and code point -> byte (-1: not a byte-level symbol).
struct Tables {
  std::string symbol[256];
  int byte_of[324];
  Tables() {
    std::fill(std::begin(byte_of), std::end(byte_of), -1);
    for (unsigned b = 0; b < 256; ++b) {
      const auto cp = byte_to_code(b);
      append_utf8(symbol[b], cp);
      byte_of[cp] = static_cast<int>(b);
    }
  }
};
inline const Tables& tables() {
  static const Tables t;
  return t;
}

// The raw bytes a vocab string stands for; false if some character is not a byte-level symbol.
inline bool to_bytes(std::string_view s, std::string& out) {
  out.clear();
  const Tables& t = tables();
  for (std::size_t i = 0; i < s.size();) {
    const auto c0 = static_cast<unsigned char>(s[i]);
    std::uint32_t cp;
    std::size_t len;
    if (c0 < 0x80) cp = c0, len = 1;
    else if ((c0 & 0xE0) == 0xC0 && i + 1 < s.size()) cp = ((c0 & 0x1Fu) << 6) | (s[i + 1] & 0x3F), len = 2;
    else return false;
    if (cp >= 324 || t.byte_of[cp] < 0) return false;
    out += static_cast<char>(t.byte_of[cp]);
    i += len;
  }
  return true;
}

}  // namespace detail::byte_level

class BytePairModel {
 public:
  static BytePairModel from_json(const nlohmann::json& j, const std::string& where) {
    namespace js = detail::json;
    ATTNKIT_REQUIRE(js::type_of(j, where) == "BPE", where, ": model type '", js::type_of(j, where),
                    "' is not supported (supported: BPE)");
    js::only_fields(j, where,
                    {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                     "byte_fallback", "ignore_merges", "vocab", "merges"});
    const auto dropout = j.find("dropout");
    ATTNKIT_REQUIRE(dropout == j.end() || dropout->is_null() || (dropout->is_number() && dropout->get<double>() == 0.0),
                    where, ".dropout: BPE dropout is not supported (a tokenizer for inference has none)");
    ATTNKIT_REQUIRE(js::string_or(j, where, "continuing_subword_prefix", "").empty(), where,
                    ".continuing_subword_prefix: not supported by byte-level BPE");
    ATTNKIT_REQUIRE(js::string_or(j, where, "end_of_word_suffix", "").empty(), where,
                    ".end_of_word_suffix: not supported by byte-level BPE");
    ATTNKIT_REQUIRE(!js::boolean(j, where, "byte_fallback", false), where,
                    ".byte_fallback: not supported (byte-level BPE covers every byte already)");
    js::boolean(j, where, "fuse_unk", false);          // no unknown pieces in byte-level BPE
    js::string_or(j, where, "unk_token", "");          // likewise never produced
    BytePairModel m;
    m.ignore_merges_ = js::boolean(j, where, "ignore_merges", false);

    const auto& vocab = js::field(j, where, "vocab");
    ATTNKIT_REQUIRE(vocab.is_object(), where, ".vocab: expected an object of string -> id");
    m.vocab_.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      ATTNKIT_REQUIRE(it->is_number_integer() && it->get<std::int64_t>() >= 0 && it->get<std::int64_t>() < (1ll << 31),
                      where, ".vocab[\"", it.key(), "\"]: expected an id in [0, 2^31)");
      const TokenId id = it->get<TokenId>();
      ATTNKIT_REQUIRE(m.vocab_.emplace(it.key(), id).second, where, ".vocab: duplicate entry '", it.key(), "'");
      m.max_id_ = std::max(m.max_id_, id);
    }
    const auto& t = detail::byte_level::tables();
    for (int b = 0; b < 256; ++b) {
      const auto f = m.vocab_.find(t.symbol[b]);
      ATTNKIT_REQUIRE(f != m.vocab_.end(), where, ".vocab: byte-level BPE needs every byte's symbol; byte 0x", std::hex, b,
                      " ('", t.symbol[b], "') is missing");
      m.byte_id_[b] = static_cast<std::int32_t>(f->second);
    }
    if (m.ignore_merges_) {
      std::string raw;
      for (const auto& [s, id] : m.vocab_)
        if (detail::byte_level::to_bytes(s, raw)) m.raw_vocab_.emplace(raw, id);
    }

    const auto& merges = js::field(j, where, "merges");
    ATTNKIT_REQUIRE(merges.is_array(), where, ".merges: expected an array");
    m.merges_.reserve(merges.size());
    std::string a, b;
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const auto& e = merges[r];
      if (e.is_string()) {
        const std::string s = e.get<std::string>();
        const auto sp = s.find(' ');
        ATTNKIT_REQUIRE(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, where, ".merges[", r,
                        "]: expected \"a b\", got '", s, "'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        ATTNKIT_REQUIRE(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(), where, ".merges[", r,
                        "]: expected [\"a\", \"b\"] or \"a b\"");
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      }
      const auto ia = m.vocab_.find(a), ib = m.vocab_.find(b), ic = m.vocab_.find(a + b);
      ATTNKIT_REQUIRE(ia != m.vocab_.end() && ib != m.vocab_.end(), where, ".merges[", r, "]: '", ia == m.vocab_.end() ? a : b,
                      "' is not in the vocab");
      ATTNKIT_REQUIRE(ic != m.vocab_.end(), where, ".merges[", r, "]: the merged token '", a + b, "' is not in the vocab");
      m.merges_.insert(ia->second, ib->second, static_cast<std::int32_t>(r), static_cast<std::int32_t>(ic->second));
    }
    return m;
  }

  TokenId max_id() const { return max_id_; }
  std::size_t merge_count() const { return merges_.size(); }
  bool ignore_merges() const { return ignore_merges_; }
  // The id of a vocab entry written as in the file (byte-level symbols), or -1.
  TokenId find(std::string_view token) const {
    const auto f = vocab_.find(token);
    return f == vocab_.end() ? -1 : f->second;
  }
  template <class F>
  void for_each_entry(F&& f) const {
    for (const auto& [s, id] : vocab_) f(s, id);
  }

  // Appends the ids of one pre-token (raw bytes).
  void encode(std::string_view piece, std::vector<TokenId>& out) const {
    if (piece.empty()) return;
    if (piece.size() == 1) {
      out.push_back(byte_id_[static_cast<unsigned char>(piece[0])]);
      return;
    }
    if (ignore_merges_) {
      const auto f = raw_vocab_.find(piece);
      if (f != raw_vocab_.end()) {
        out.push_back(f->second);
        return;
      }
    }
    const bool cacheable = piece.size() <= kCacheMaxBytes;
    if (cacheable) {
      std::shared_lock lock(cache_mutex_);
      const auto f = cache_.find(piece);
      if (f != cache_.end()) {
        out.insert(out.end(), f->second.begin(), f->second.end());
        return;
      }
    }
    const std::size_t first = out.size();
    merge_word(piece, out);
    if (cacheable) {
      std::unique_lock lock(cache_mutex_);
      if (cache_.size() < kCacheCapacity) cache_.emplace(std::string(piece), std::vector<TokenId>(out.begin() + first, out.end()));
    }
  }

 private:
  static constexpr std::size_t kCacheMaxBytes = 64, kCacheCapacity = 1 << 16;

  // (left id, right id) -> (rank, merged id): open addressing, linear probing, power-of-two size.
  class MergeTable {
   public:
    void reserve(std::size_t n) {
      std::size_t cap = 16;
      while (cap < 2 * n + 16) cap <<= 1;
      slots_.assign(cap, Slot{});
      mask_ = cap - 1;
    }
    void insert(TokenId a, TokenId b, std::int32_t rank, std::int32_t merged) {
      const std::uint64_t key = pack(a, b);
      for (std::size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
        if (slots_[i].key == kEmpty) {
          slots_[i] = {key, rank, merged};
          ++size_;
          return;
        }
        if (slots_[i].key == key) {  // a repeated merge takes its later rank, as HF's map collects them
          slots_[i].rank = rank;
          slots_[i].merged = merged;
          return;
        }
      }
    }
    // {rank, merged id}, or rank -1.
    std::pair<std::int32_t, std::int32_t> find(std::int32_t a, std::int32_t b) const {
      const std::uint64_t key = pack(a, b);
      for (std::size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
        if (slots_[i].key == key) return {slots_[i].rank, slots_[i].merged};
        if (slots_[i].key == kEmpty) return {-1, -1};
      }
    }
    std::size_t size() const { return size_; }

   private:
    static constexpr std::uint64_t kEmpty = ~0ull;
    struct Slot {
      std::uint64_t key = kEmpty;
      std::int32_t rank = -1, merged = -1;
    };
    static std::uint64_t pack(TokenId a, TokenId b) {
      return (static_cast<std::uint64_t>(a) << 32) | static_cast<std::uint32_t>(b);
    }
    static std::size_t hash(std::uint64_t k) {
      k ^= k >> 33;
      k *= 0xff51afd7ed558ccdull;
      k ^= k >> 33;
      return static_cast<std::size_t>(k);
    }
    std::vector<Slot> slots_;
    std::size_t mask_ = 0, size_ = 0;
  };

  // HF's Word::merge_all: a doubly linked list of symbols and a min-heap of candidate merges
  // ordered by (rank, position); an entry whose pair changed since it was pushed is skipped.
  void merge_word(std::string_view piece, std::vector<TokenId>& out) const {
    struct Sym {
      std::int32_t id, prev, next;
      bool alive;
    };
    struct Cand {
      std::int32_t rank, pos, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    thread_local std::vector<Sym> sym;
    thread_local std::vector<Cand> heap;
    const auto n = static_cast<std::int32_t>(piece.size());
    sym.resize(static_cast<std::size_t>(n));
    heap.clear();
    for (std::int32_t i = 0; i < n; ++i) sym[i] = {byte_id_[static_cast<unsigned char>(piece[i])], i - 1, i + 1, true};
    auto cmp = [](const Cand& x, const Cand& y) { return x > y; };
    auto push = [&](std::int32_t pos, std::int32_t right) {
      const auto [rank, merged] = merges_.find(sym[pos].id, sym[right].id);
      if (rank < 0) return;
      heap.push_back({rank, pos, merged});
      std::push_heap(heap.begin(), heap.end(), cmp);
    };
    for (std::int32_t i = 0; i + 1 < n; ++i) push(i, i + 1);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      const Cand top = heap.back();
      heap.pop_back();
      Sym& cur = sym[top.pos];
      if (!cur.alive || cur.next >= n) continue;
      const std::int32_t right = cur.next;
      if (merges_.find(cur.id, sym[right].id).second != top.merged) continue;  // stale
      cur.id = top.merged;
      cur.next = sym[right].next;
      sym[right].alive = false;
      if (cur.next < n) sym[cur.next].prev = top.pos;
      if (cur.prev >= 0) push(cur.prev, top.pos);
      if (cur.next < n) push(top.pos, cur.next);
    }
    for (std::int32_t i = 0; i < n; i = sym[i].next) out.push_back(sym[i].id);
  }

  // Heterogeneous lookup: a string_view finds a std::string key without building one.
  struct Hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  template <class V>
  using StringMap = std::unordered_map<std::string, V, Hash, std::equal_to<>>;

  StringMap<TokenId> vocab_;      // byte-level strings, as in the file
  StringMap<TokenId> raw_vocab_;  // raw bytes (ignore_merges only)
  MergeTable merges_;
  std::int32_t byte_id_[256] = {};
  TokenId max_id_ = -1;
  bool ignore_merges_ = false;
  mutable std::shared_mutex cache_mutex_;
  mutable StringMap<std::vector<TokenId>> cache_;

 public:
  BytePairModel() = default;
  // The cache is not copied (the mutex cannot be); a moved model starts with an empty cache.
  BytePairModel(BytePairModel&& o) noexcept
      : vocab_(std::move(o.vocab_)), raw_vocab_(std::move(o.raw_vocab_)), merges_(std::move(o.merges_)),
        max_id_(o.max_id_), ignore_merges_(o.ignore_merges_) {
    std::copy(std::begin(o.byte_id_), std::end(o.byte_id_), std::begin(byte_id_));
  }
  BytePairModel& operator=(BytePairModel&& o) noexcept {
    vocab_ = std::move(o.vocab_);
    raw_vocab_ = std::move(o.raw_vocab_);
    merges_ = std::move(o.merges_);
    max_id_ = o.max_id_;
    ignore_merges_ = o.ignore_merges_;
    std::copy(std::begin(o.byte_id_), std::end(o.byte_id_), std::begin(byte_id_));
    cache_.clear();
    return *this;
  }
};

}  // namespace attnkit::text
