// Batch sessions (model/batch_session.hpp): many sequences in one step over the paged KV cache
// equal one Session per sequence; prefill chunks and decode tokens mix; forks share pages and
// copy on write; bad steps are refused before anything changes.
#include <catch2/catch.hpp>

#include "attnkit/model/batch_session.hpp"
#include "model_test_util.hpp"

using namespace attnkit;
using test::random_ids;
using Catch::Matchers::Contains;

namespace {

nlohmann::json tiny_json(bool sliding) {
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 211}, {"hidden_size", 40}, {"intermediate_size", 72},
                      {"num_hidden_layers", 3}, {"num_attention_heads", 6}, {"num_key_value_heads", 2}, {"head_dim", 24},
                      {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"max_position_embeddings", 512},
                      {"tie_word_embeddings", false}, {"hidden_act", "silu"}};
  if (sliding) {
    j["use_sliding_window"] = true;
    j["sliding_window"] = 6;
    j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention"};
  }
  return j;
}

// Every logits row of `ids` run through one Session (one prefill).
std::vector<float> session_logits(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids,
                                  const model::SessionOptions& so) {
  return test::run(m, ids, {}, so).logits;
}

// A plan of batch steps: per step, how many new tokens each sequence runs (0: not in the step).
using Plan = std::vector<std::vector<std::int64_t>>;

// Runs the sequences' ids through a batch session by `plan` (LogitsRows::all) and returns each
// sequence's logits rows in position order.
std::vector<std::vector<float>> batch_logits(const model::Qwen3Model& m, const std::vector<std::vector<std::int64_t>>& ids,
                                             const Plan& plan, const model::SessionOptions& so, std::int64_t page_size,
                                             int threads) {
  const std::int64_t V = m.config().vocab_size;
  model::BatchOptions bo;
  bo.page_size = page_size;
  bo.initial_pages = 2;  // the pool must grow
  auto bs = m.new_batch_session(so, bo);
  std::vector<std::int64_t> seq, done(ids.size(), 0);
  for (std::size_t i = 0; i < ids.size(); ++i) seq.push_back(bs.add());
  std::vector<std::vector<float>> out(ids.size());
  for (const auto& counts : plan) {
    std::vector<model::SequenceTokens> step;
    std::vector<std::size_t> who;
    std::int64_t N = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int64_t n = std::min<std::int64_t>(counts[i], static_cast<std::int64_t>(ids[i].size()) - done[i]);
      if (n <= 0) continue;
      step.push_back({seq[i], std::span<const std::int64_t>(ids[i].data() + done[i], static_cast<std::size_t>(n))});
      who.push_back(i);
      N += n;
    }
    if (step.empty()) continue;
    std::vector<float> all(static_cast<std::size_t>(N * V));
    test::poison(all);
    model::ForwardOptions fo;
    fo.num_threads = threads;
    m.forward_batch(bs, step, View2<float>(all.data(), {N, V}), fo);
    std::int64_t row = 0;
    for (std::size_t e = 0; e < step.size(); ++e) {
      const std::size_t i = who[e];
      const std::int64_t n = static_cast<std::int64_t>(step[e].ids.size());
      out[i].insert(out[i].end(), all.begin() + row * V, all.begin() + (row + n) * V);
      row += n;
      done[i] += n;
      CHECK(bs.position(seq[i]) == done[i]);
    }
  }
  for (std::size_t i = 0; i < ids.size(); ++i) REQUIRE(done[i] == static_cast<std::int64_t>(ids[i].size()));
  return out;
}

}  // namespace

TEST_CASE("a batch session equals one session per sequence: prefill, chunks and decode mixed", "[model][batch]") {
  const bool sliding = GENERATE(false, true);
  const auto kv = GENERATE(model::CacheType::f32, model::CacheType::bf16);
  const std::int64_t P = GENERATE(1, 4, 16);
  const auto cfg = io::Qwen3Config::from_json(tiny_json(sliding), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::f32, 5);
  const std::int64_t V = cfg.vocab_size;
  // Five sequences of odd lengths; the plan mixes whole prompts, chunks and decode tokens.
  const std::vector<std::int64_t> len = {1, 9, 17, 30, 45};
  std::vector<std::vector<std::int64_t>> ids;
  for (std::size_t i = 0; i < len.size(); ++i) ids.push_back(random_ids(len[i], V, 100 + i));
  const Plan plan = {{1, 7, 17, 10, 0}, {0, 1, 0, 13, 33}, {0, 1, 0, 1, 1}, {0, 0, 0, 6, 1},
                     {0, 0, 0, 1, 1},   {0, 0, 0, 0, 1},   {0, 0, 0, 0, 9}};
  model::SessionOptions so;
  so.kv_type = kv;
  const auto got = batch_logits(m, ids, plan, so, P, 0);
  CAPTURE(sliding, static_cast<int>(kv), P);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    CAPTURE(i);
    const auto want = session_logits(m, ids[i], so);
    // The attention kernels see the same rows; the linear layers block more rows together
    // (f32 sums in another order): a few ulp of the logits.
    CHECK(test::rel_l2(got[i], want) <= 2e-6);
  }
  if (P == 4 && kv == model::CacheType::bf16) {  // the thread count changes nothing
    CHECK(test::bit_equal(batch_logits(m, ids, plan, so, P, 1)[4], batch_logits(m, ids, plan, so, P, 2)[4]));
  }
}

TEST_CASE("a batch session runs a looped stack, each pass with its own pages", "[model][batch]") {
  const auto cfg = io::Qwen3Config::from_json(tiny_json(false), "test");
  model::RandomSource rnd(model::WeightType::f32, 9);
  const auto m = model::Qwen3Model::build(cfg, rnd, model::default_mixers(), std::make_shared<model::SumResidual>(),
                                          std::make_shared<model::RepeatStack>(3));
  std::vector<std::vector<std::int64_t>> ids = {random_ids(11, cfg.vocab_size, 1), random_ids(20, cfg.vocab_size, 2)};
  const auto got = batch_logits(m, ids, {{11, 5}, {0, 1}, {0, 14}}, {}, 8, 0);
  for (std::size_t i = 0; i < ids.size(); ++i) CHECK(test::rel_l2(got[i], session_logits(m, ids[i], {})) <= 2e-6);
}

TEST_CASE("forks share a prompt's pages and copy the last one on write", "[model][batch]") {
  const bool sliding = GENERATE(false, true);  // sliding layers: their rings are copied
  CAPTURE(sliding);
  const auto cfg = io::Qwen3Config::from_json(tiny_json(sliding), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::bf16, 3);
  const std::int64_t V = cfg.vocab_size;
  model::SessionOptions so;
  so.kv_type = model::CacheType::bf16;
  model::BatchOptions bo;
  bo.page_size = 8;
  auto bs = m.new_batch_session(so, bo);
  const auto prompt = random_ids(21, V, 4);  // 3 pages, the last one partly filled
  const std::int64_t a = bs.add();
  std::vector<float> lg(static_cast<std::size_t>(V) * 3);
  model::ForwardOptions last;
  last.logits = model::LogitsRows::last;
  const model::SequenceTokens pre[] = {{a, prompt}};
  m.forward_batch(bs, pre, View2<float>(lg.data(), {1, V}), last);
  const std::int64_t b = bs.fork(a), c = bs.fork(a);
  CHECK(bs.position(b) == 21);
  CHECK(bs.pages_in_use() == 3);  // stored once
  CHECK(bs.pages(b) == bs.pages(a));
  // Each continues with its own token: two of the three copy the shared last page first
  // (and, with sliding layers, each writes its own copy of the rings).
  const std::int64_t next[3] = {5, 17, 101};
  const model::SequenceTokens step[] = {{a, std::span(next + 0, 1)}, {b, std::span(next + 1, 1)}, {c, std::span(next + 2, 1)}};
  test::poison(lg);
  m.forward_batch(bs, step, View2<float>(lg.data(), {3, V}), last);
  CHECK(bs.pages_in_use() == 5);
  CHECK(bs.pages(a)[0] == bs.pages(c)[0]);  // full pages stay shared
  CHECK(bs.pages(a)[2] != bs.pages(b)[2]);
  for (int i = 0; i < 3; ++i) {
    auto ids = prompt;
    ids.push_back(next[i]);
    const auto want = session_logits(m, ids, so);
    CAPTURE(i);
    CHECK(test::rel_l2(lg.data() + i * V, want.data() + (ids.size() - 1) * V, static_cast<std::size_t>(V)) <= 2e-6);
  }
  bs.remove(a);
  bs.remove(b);
  CHECK(bs.pages_in_use() == 3);  // c's three pages
  bs.remove(c);
  CHECK(bs.pages_in_use() == 0);
}

TEST_CASE("batch sessions refuse bad steps before anything changes", "[model][batch][errors]") {
  const auto cfg = io::Qwen3Config::from_json(tiny_json(true), "test");
  const auto m = model::Qwen3Model::random(cfg, model::WeightType::f32, 1);
  const std::int64_t V = cfg.vocab_size;
  model::BatchOptions bo;
  bo.page_size = 12;
  REQUIRE_THROWS_WITH(m.new_batch_session({}, bo), Contains("'batch.page_size': must be a power of two, got 12"));
  auto bs = m.new_batch_session({}, {});
  const std::int64_t s = bs.add(), t = bs.add();
  const std::vector<std::int64_t> ids = {1, 2, 3}, bad = {1, 211};
  std::vector<float> lg(static_cast<std::size_t>(4 * V));
  const View2<float> two(lg.data(), {2, V});
  model::ForwardOptions last;
  last.logits = model::LogitsRows::last;
  const model::SequenceTokens twice[] = {{s, ids}, {s, ids}};
  CHECK_THROWS_WITH(m.forward_batch(bs, twice, two, last), Contains("sequence 0 appears twice (entries 0 and 1)"));
  const model::SequenceTokens unknown[] = {{s, ids}, {7, ids}};
  CHECK_THROWS_WITH(m.forward_batch(bs, unknown, two, last), Contains("no sequence 7 in this batch session"));
  const model::SequenceTokens empty[] = {{s, ids}, {t, {}}};
  CHECK_THROWS_WITH(m.forward_batch(bs, empty, two, last), Contains("entry 1 (sequence 1) has no tokens"));
  const model::SequenceTokens oov[] = {{s, ids}, {t, bad}};
  CHECK_THROWS_WITH(m.forward_batch(bs, oov, two, last), Contains("token id 211 at index 1 outside the vocabulary"));
  const model::SequenceTokens ok[] = {{s, ids}, {t, ids}};
  CHECK_THROWS_WITH(m.forward_batch(bs, ok, View2<float>(lg.data(), {3, V}), last),
                    Contains("'logits': shape [3, 211], expected [2, 211] (the last token of each entry)"));
  model::Trace trace;
  model::ForwardOptions traced = last;
  traced.trace = &trace;
  CHECK_THROWS_WITH(m.forward_batch(bs, ok, two, traced), Contains("trace is not supported in a batch step"));
  bs.limits().max_memory_bytes = 1000;
  CHECK_THROWS_WITH(m.forward_batch(bs, ok, two, last), Contains("but the memory limit is"));
  bs.limits().max_memory_bytes = 0;
  CHECK(bs.position(s) == 0);
  CHECK(bs.position(t) == 0);
  CHECK_FALSE(bs.broken(s));
  m.forward_batch(bs, ok, two, last);  // and the session still works
  CHECK(bs.position(t) == 3);
  // Sliding layers keep a ring per sequence (copied by a fork); full attention is paged.
  CHECK_FALSE(bs.layer_paged(0));
  CHECK(bs.layer_paged(1));
  CHECK(bs.position(bs.fork(t)) == 3);
  CHECK_THROWS_WITH(bs.remove(9), Contains("BatchSession::remove: argument 'sequence': no sequence 9"));
  const auto other = model::Qwen3Model::random(cfg, model::WeightType::f32, 2);
  CHECK_THROWS_WITH(other.forward_batch(bs, ok, two, last), Contains("'session': made by another model"));
}

namespace {
// A mixer whose state cannot be copied (MixerState's default clone): out = x.
struct CopyMixer final : model::TokenMixer {
  std::string kind() const override { return "copy"; }
  std::unique_ptr<model::MixerState> new_state(const model::SessionOptions&) const override {
    return std::make_unique<model::MixerState>();
  }
  void forward(ConstView2<float> x, View2<float> out, model::MixerState&, const model::StepContext&) const override {
    for (std::int64_t t = 0; t < x.shape[0]; ++t)
      for (std::int64_t i = 0; i < x.shape[1]; ++i) out(t, i) = x(t, i);
  }
  std::size_t weight_bytes() const override { return 0; }
};
}  // namespace

TEST_CASE("a custom mixer runs per sequence in a batch step; a state that cannot be copied refuses a fork",
          "[model][batch][errors]") {
  const auto cfg = io::Qwen3Config::from_json(tiny_json(false), "test");
  model::MixerRegistry reg;
  reg.add("full_attention", [](const model::BuildContext&, int) { return std::make_unique<CopyMixer>(); });
  model::RandomSource rnd(model::WeightType::f32, 3);
  const auto m = model::Qwen3Model::build(cfg, rnd, reg);
  std::vector<std::vector<std::int64_t>> ids = {random_ids(7, cfg.vocab_size, 1), random_ids(4, cfg.vocab_size, 2)};
  const auto got = batch_logits(m, ids, {{3, 4}, {4, 0}}, {}, 16, 0);
  for (std::size_t i = 0; i < ids.size(); ++i) CHECK(test::rel_l2(got[i], session_logits(m, ids[i], {})) <= 2e-6);
  auto bs = m.new_batch_session({}, {});
  const std::int64_t s = bs.add();
  CHECK_FALSE(bs.layer_paged(0));
  CHECK_THROWS_WITH(bs.fork(s), Contains("token mixer 'copy': its per-sequence state cannot be copied"));
}
