// tests/text_test_util.hpp — small byte-level BPE tokenizer.json files for the text tests, laid
// out as Qwen3's: the 256 byte symbols, one vocab entry per merge, added tokens, NFC, Qwen3's
// split pattern, ByteLevel everywhere.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/text/bpe.hpp"

namespace attnkit::test {

inline const char* kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

inline std::string byte_symbol(unsigned char b) { return text::detail::byte_level::tables().symbol[b]; }
// A string of raw bytes written in byte-level symbols (how vocab entries are written).
inline std::string byte_symbols(std::string_view raw) {
  std::string s;
  for (unsigned char c : raw) s += byte_symbol(c);
  return s;
}

// Ids of the 256 byte symbols: in byte order (id b = byte b), or in GPT-2's order (the printable
// bytes first, as Qwen's and GPT-2's vocabularies number them).
enum class ByteIds { raw, gpt2 };

// merges: pairs of raw byte strings in rank order; each merged string gets the next free id.
inline nlohmann::json byte_level_tokenizer_json(const std::vector<std::pair<std::string, std::string>>& merges,
                                                nlohmann::json added = nlohmann::json::array(),
                                                nlohmann::json normalizer = nlohmann::json{{"type", "NFC"}},
                                                nlohmann::json pre = nullptr, ByteIds ids = ByteIds::raw) {
  using nlohmann::json;
  json vocab = json::object();
  std::vector<int> order;
  auto printable = [](int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255); };
  for (int b = 0; b < 256; ++b)
    if (ids == ByteIds::raw || printable(b)) order.push_back(b);
  if (ids == ByteIds::gpt2)
    for (int b = 0; b < 256; ++b)
      if (!printable(b)) order.push_back(b);
  for (int b : order) vocab[byte_symbol(static_cast<unsigned char>(b))] = static_cast<int>(vocab.size());
  json m = json::array();
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(byte_symbols(a + b))) vocab[byte_symbols(a + b)] = static_cast<int>(vocab.size());
    m.push_back({byte_symbols(a), byte_symbols(b)});
  }
  if (pre.is_null())
    pre = {{"type", "Sequence"},
           {"pretokenizers",
            {{{"type", "Split"}, {"pattern", {{"Regex", kQwenPattern}}}, {"behavior", "Isolated"}, {"invert", false}},
             {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}}}};
  const json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", normalizer},
          {"pre_tokenizer", pre},
          {"post_processor", bl},
          {"decoder", bl},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", ""},
            {"end_of_word_suffix", ""},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", m}}}};
}

inline nlohmann::json added_token_json(int id, const std::string& content, bool special, bool lstrip = false,
                                       bool rstrip = false) {
  return {{"id", id},          {"content", content}, {"single_word", false}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", false}, {"special", special}};
}

}  // namespace attnkit::test
