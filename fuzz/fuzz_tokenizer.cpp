// libFuzzer target: arbitrary bytes as text for a byte-level BPE tokenizer with Qwen's split
// pattern, NFC and a few merges. Valid UTF-8 must round-trip to its NFC form
// (decode(encode(x)) == NFC(x)); anything else must throw attnkit::Error, and must round-trip to
// NFC(lossy(x)) when read lossily. The stream decoder must give decode()'s text.
#include <cstddef>
#include <cstdint>

#include "attnkit/text/tokenizer.hpp"

using namespace attnkit::text;
using nlohmann::json;

namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer tok = [] {
    const auto& t = detail::byte_level::tables();
    json vocab = json::object();
    for (int b = 0; b < 256; ++b) vocab[t.symbol[b]] = b;
    json merges = json::array();
    int id = 256;
    // Merges over common bytes, chained, so the heap and the cache both see work.
    const char* pairs[][2] = {{" ", "t"}, {"h", "e"}, {" t", "he"}, {"a", "a"}, {"aa", "aa"}, {" ", " "}, {"  ", "  "},
                              {"\xC3", "\xA9"}, {"e", "\xCC"}, {"1", "2"}};
    for (auto& p : pairs) {
      std::string a, b;
      for (unsigned char c : std::string(p[0])) a += t.symbol[c];
      for (unsigned char c : std::string(p[1])) b += t.symbol[c];
      if (!vocab.contains(a + b)) vocab[a + b] = id++;
      merges.push_back({a, b});
    }
    const json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
    const char* pattern =
        R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
    const json j = {
        {"version", "1.0"},
        {"added_tokens", json::array()},
        {"normalizer", {{"type", "NFC"}}},
        {"pre_tokenizer",
         {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}, {"invert", false}}, bl}}}},
        {"post_processor", bl},
        {"decoder", bl},
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
    return Tokenizer::from_json(j, "fuzz tokenizer");
  }();
  return tok;
}

std::string nfc(std::string_view s) {
  static const Normalizer n = Normalizer::from_json({{"type", "NFC"}}, "nfc");
  return n.apply(s);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const Tokenizer& tok = tokenizer();
  std::string expect;
  std::vector<TokenId> ids;
  if (is_utf8(text)) {
    ids = tok.encode(text);
    expect = nfc(text);
  } else {
    bool threw = false;
    try {
      tok.encode(text);
    } catch (const attnkit::Error&) {
      threw = true;
    }
    if (!threw) __builtin_trap();
    ids = tok.encode(text, {.lossy_utf8 = true});
    expect = nfc(lossy_utf8(text));
  }
  if (tok.decode(ids) != expect) __builtin_trap();
  StreamDecoder sd(tok);
  std::string streamed;
  for (TokenId id : ids) streamed += sd.push(id);
  streamed += sd.flush();
  if (streamed != expect) __builtin_trap();
  return 0;
}
