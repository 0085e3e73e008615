// Hardening for embedding (compiled with ATTNKIT_FAULT_INJECTION, see tests/CMakeLists.txt):
//  - a failure injected into a worker of each kernel family reaches the caller as an exception
//    (no std::terminate, no hang at a barrier), and the model works normally afterwards;
//  - sessions refuse, before allocating, what exceeds their memory limit or the model's
//    max_position_embeddings;
//  - one model shared by sessions on 4 caller threads gives the results of running them in turn.
#include <catch2/catch.hpp>

#include <thread>

#include "attnkit/attention/merge.hpp"
#include "attnkit/core/fault.hpp"
#include "attnkit/model/builtin.hpp"
#include "attnkit/model/qwen3.hpp"
#include "test_util.hpp"

#if !defined(ATTNKIT_FAULT_INJECTION)
#error "test_hardening needs ATTNKIT_FAULT_INJECTION (tests/CMakeLists.txt defines it)"
#endif

using namespace attnkit;

namespace {

// Logits of the last token only.
model::ForwardOptions last_row() {
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  return fo;
}

nlohmann::json tiny_config() {
  return {{"model_type", "qwen3"}, {"vocab_size", 320}, {"hidden_size", 64}, {"intermediate_size", 160},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 32},
          {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0}, {"max_position_embeddings", 256},
          {"tie_word_embeddings", true}, {"hidden_act", "silu"}, {"use_sliding_window", true},
          {"sliding_window", 16}, {"layer_types", {"full_attention", "sliding_attention"}}};
}

const model::Registry& registry() {
  static const model::Registry r = model::default_registry();
  return r;
}

model::Qwen3Model build(const nlohmann::json& j, model::WeightType type = model::WeightType::bf16) {
  return model::Qwen3Model::random(registry().parse_config(j, "test"), type, 5, &registry());
}

std::vector<std::int64_t> ids_of(std::int64_t T, std::int64_t V, std::uint64_t seed) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<std::int64_t>((seed * 131 + t * 37 + 7) % V);
  return ids;
}

// Prefill of `T` tokens, then `decode` single-token steps; every row's logits.
std::vector<float> run(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids, std::int64_t prefill,
                       int threads, Precision precision = Precision::exact) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), V = m.config().vocab_size;
  std::vector<float> logits(static_cast<std::size_t>(T * V));
  auto s = m.new_session();
  model::ForwardOptions fo;
  fo.num_threads = threads;
  fo.precision = precision;
  m.forward(s, std::span<const std::int64_t>(ids.data(), static_cast<std::size_t>(prefill)),
            View2<float>(logits.data(), {prefill, V}), fo);
  for (std::int64_t t = prefill; t < T; ++t)
    m.forward(s, std::span<const std::int64_t>(&ids[static_cast<std::size_t>(t)], 1), View2<float>(logits.data() + t * V, {1, V}), fo);
  return logits;
}

struct Disarm {
  ~Disarm() { fault::disarm(); }
};

// Arms the family's n-th point for n = 1, 2, ... (up to `tries`, or until a run passes no more
// points): each run must throw fault::Injected; afterwards the model runs as before.
void check_family(const char* family, const model::Qwen3Model& m, std::int64_t T, std::int64_t prefill,
                  Precision precision = Precision::exact, int tries = 6) {
  INFO("family " << family);
  const auto ids = ids_of(T, m.config().vocab_size, 1);
  const std::vector<float> want = run(m, ids, prefill, 2, precision);
  Disarm guard;
  fault::arm(family, 1000000000);  // count the family's points in one run
  run(m, ids, prefill, 2, precision);
  const long points = fault::hits();
  fault::disarm();
  REQUIRE(points > 0);  // the family is on this model's path
  for (long n = 1; n <= std::min<long>(points, tries); ++n) {
    INFO("fault at point " << n << " of " << points);
    fault::arm(family, n == tries ? points : n);  // the last try hits the last point
    CHECK_THROWS_AS(run(m, ids, prefill, 2, precision), fault::Injected);
    CHECK(fault::fired());
    fault::disarm();
  }
  CHECK(run(m, ids, prefill, 2, precision) == want);
}

}  // namespace

TEST_CASE("an exception in a worker of every kernel family reaches the caller", "[hardening][fault]") {
  const auto plain = build(tiny_config());
  // Prefill of 40 tokens (several tiles and token blocks), then 3 decode steps.
  check_family("prefill", plain, 43, 40);
  check_family("decode", plain, 43, 40);
  check_family("ops", plain, 43, 40);
  // The linear layers' own team with barriers: bf16 weights, fast (rounding rows, then a barrier).
  check_family("linear", plain, 43, 40, Precision::fast, 10);
  check_family("linear", plain, 43, 40, Precision::exact, 10);
  const auto f32 = build(tiny_config(), model::WeightType::f32);
  check_family("linear", f32, 43, 40, Precision::exact, 10);
  const auto hybrid = build(model::with_hybrid(tiny_config()));
  check_family("recurrent", hybrid, 43, 40);
  check_family("mixer", build(model::with_tuneable_attention(tiny_config(), 16, "unfolded")), 43, 40);
  check_family("attnres", build(model::with_attnres(tiny_config())), 43, 40);
  check_family("routed", build(model::with_routed_attention(tiny_config(), 1)), 80, 70);  // parallel from T 64
  nlohmann::json lt2 = model::lt2_tiny_config(true);
  check_family("sparse", build(lt2), 23, 20);
}

TEST_CASE("an exception in a merge worker reaches the caller", "[hardening][fault]") {
  const std::int64_t T = 512, H = 4, d = 32;  // parallel from 2^16 elements
  std::vector<float> oa(T * H * d, 0.5f), ob(T * H * d, 0.25f), la(T * H, 0.f), lb(T * H, 1.f), out(T * H * d);
  Disarm guard;
  fault::arm("merge", 3);
  CHECK_THROWS_AS(merge_states(ConstView3<float>(oa.data(), {T, H, d}), ConstView2<float>(la.data(), {T, H}),
                               ConstView3<float>(ob.data(), {T, H, d}), ConstView2<float>(lb.data(), {T, H}),
                               View3<float>(out.data(), {T, H, d})),
                  fault::Injected);
}

TEST_CASE("a session whose step failed refuses further steps until rewound", "[hardening][fault]") {
  const auto m = build(tiny_config());
  const std::int64_t V = m.config().vocab_size;
  const auto ids = ids_of(20, V, 3);
  std::vector<float> logits(static_cast<std::size_t>(20 * V));
  auto s = m.new_session();
  {
    Disarm guard;
    fault::arm("prefill", 1);
    CHECK_THROWS_AS(m.forward(s, ids, View2<float>(logits.data(), {20, V})), fault::Injected);
  }
  CHECK(s.broken());
  CHECK(s.position() == 0);
  CHECK_THROWS_WITH(m.forward(s, ids, View2<float>(logits.data(), {20, V})), Catch::Contains("broken"));
}

TEST_CASE("a batch step that fails breaks its own sequences only", "[hardening][fault][batch]") {
  const auto m = build(tiny_config());
  const std::int64_t V = m.config().vocab_size;
  const auto ids = ids_of(20, V, 3);
  std::vector<float> logits(static_cast<std::size_t>(3 * V));
  auto bs = m.new_batch_session({}, {});
  const std::int64_t a = bs.add(), b = bs.add(), c = bs.add();
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  const model::SequenceTokens first[] = {{c, ids}};
  m.forward_batch(bs, first, View2<float>(logits.data(), {1, V}), fo);
  const model::SequenceTokens step[] = {{a, ids}, {b, ids}};
  {
    Disarm guard;
    fault::arm("prefill", 1);
    CHECK_THROWS_AS(m.forward_batch(bs, step, View2<float>(logits.data(), {2, V}), fo), fault::Injected);
  }
  CHECK(bs.broken(a));
  CHECK(bs.broken(b));
  CHECK_FALSE(bs.broken(c));
  CHECK(bs.position(a) == 0);
  CHECK_THROWS_WITH(m.forward_batch(bs, step, View2<float>(logits.data(), {2, V}), fo), Catch::Contains("broken"));
  CHECK_THROWS_WITH(bs.fork(a), Catch::Contains("broken"));
  // The untouched sequence goes on; the broken ones are removed and their pages come back.
  const std::int64_t next = 5;
  const model::SequenceTokens go[] = {{c, std::span<const std::int64_t>(&next, 1)}};
  m.forward_batch(bs, go, View2<float>(logits.data(), {1, V}), fo);
  CHECK(bs.position(c) == 21);
  bs.remove(a);
  bs.remove(b);
  CHECK(bs.pages_in_use() == static_cast<std::int64_t>(bs.pages(c).size()));
}

TEST_CASE("sessions refuse more memory than their limit, naming the sizes, before allocating", "[hardening][memory]") {
  const auto m = build(tiny_config());
  const std::int64_t V = m.config().vocab_size;
  model::SessionLimits lim;
  lim.max_memory_bytes = 64 * 1024;  // 64 KiB
  // 200 reserved tokens: 2 layers x 200 x 2 KV heads x 64 floats = 200 KiB of caches.
  model::SessionOptions so;
  so.reserve_tokens = 200;
  CHECK_THROWS_WITH(m.new_session(so, lim), Catch::Contains("new_session") && Catch::Contains("memory limit is 65536 bytes") &&
                                                Catch::Contains("states for 200 positions"));
  // Growing: the check runs at each step on the states the step leaves.
  auto s = m.new_session({}, lim);
  const auto ids = ids_of(200, V, 4);
  std::vector<float> logits(static_cast<std::size_t>(V));
  CHECK_THROWS_WITH(m.forward(s, ids, View2<float>(logits.data(), {1, V}), last_row()),
                    Catch::Contains("200 tokens at position 0") && Catch::Contains("memory limit"));
  CHECK_FALSE(s.broken());  // refused before any state changed
  CHECK(s.position() == 0);
  m.forward(s, std::span<const std::int64_t>(ids.data(), 8), View2<float>(logits.data(), {1, V}), last_row());
  CHECK(s.position() == 8);
  // The caches check their own allocations against the limit too.
  {
    const MemoryLimitScope scope(4096);
    CHECK_THROWS_WITH(KVCache<float>(2, 32, 32, 100), Catch::Contains("KVCache::reserve: 128 tokens x 2 KV heads x (d_k 32 + d_v 32) x 4 bytes") &&
                                                          Catch::Contains("memory limit is 4096 bytes"));
    CHECK_THROWS_WITH(RingKVCache<bf16>(2, 32, 32, 100), Catch::Contains("RingKVCache: 128 tokens"));
  }
  // Without a limit: the system's available memory (a petabyte-sized request fails up front).
  so.reserve_tokens = std::int64_t{1} << 40;
  CHECK_THROWS_WITH(m.new_session(so), Catch::Contains("of memory are available"));
  CHECK_THROWS_WITH(KVCache<float>(8, 128, 128, std::int64_t{1} << 40), Catch::Contains("of memory are available"));
}

TEST_CASE("positions beyond max_position_embeddings need an explicit limit", "[hardening][memory]") {
  const auto m = build(tiny_config());  // max_position_embeddings 256
  const std::int64_t V = m.config().vocab_size;
  const auto ids = ids_of(300, V, 5);
  std::vector<float> logits(static_cast<std::size_t>(V));
  auto s = m.new_session();
  CHECK_THROWS_WITH(m.forward(s, ids, View2<float>(logits.data(), {1, V}), last_row()),
                    Catch::Contains("300 positions exceed the model's max_position_embeddings 256"));
  model::SessionLimits lim;
  lim.allow_beyond_max_positions = true;
  auto t = m.new_session({}, lim);
  m.forward(t, ids, View2<float>(logits.data(), {1, V}), last_row());
  CHECK(t.position() == 300);
}

TEST_CASE("one model shared by sessions on 4 threads gives the sequential results", "[hardening][threads]") {
  struct Case {
    const char* name;
    model::Qwen3Model m;
  };
  std::vector<Case> models;
  models.push_back({"plain", build(tiny_config())});
  models.push_back({"hybrid", build(model::with_hybrid(tiny_config()))});
  for (const auto& c : models) {
    INFO(c.name);
    const std::int64_t V = c.m.config().vocab_size;
    constexpr int kThreads = 4, kSessions = 3;
    std::vector<std::vector<std::int64_t>> inputs;
    std::vector<std::vector<float>> want;
    for (int i = 0; i < kThreads * kSessions; ++i) {
      inputs.push_back(ids_of(24 + i, V, 10 + static_cast<std::uint64_t>(i)));
      want.push_back(run(c.m, inputs.back(), 17, 1));
    }
    std::vector<std::vector<float>> got(inputs.size());
    std::vector<std::thread> pool;
    for (int w = 0; w < kThreads; ++w)
      pool.emplace_back([&, w] {
        // Each caller thread interleaves its sessions step by step, with its own team size.
        const int team = 1 + w % 2;
        std::vector<model::Session> ss;
        for (int k = 0; k < kSessions; ++k) ss.push_back(c.m.new_session());
        std::vector<std::vector<float>> out(kSessions);
        for (int k = 0; k < kSessions; ++k) out[static_cast<std::size_t>(k)].resize(inputs[static_cast<std::size_t>(w * kSessions + k)].size() * V);
        model::ForwardOptions fo;
        fo.num_threads = team;
        for (std::int64_t t = 0;; ++t) {
          bool any = false;
          for (int k = 0; k < kSessions; ++k) {
            const auto& in = inputs[static_cast<std::size_t>(w * kSessions + k)];
            auto& o = out[static_cast<std::size_t>(k)];
            auto& s = ss[static_cast<std::size_t>(k)];
            const std::int64_t T = static_cast<std::int64_t>(in.size());
            if (t == 0) {
              c.m.forward(s, std::span<const std::int64_t>(in.data(), 17), View2<float>(o.data(), {17, V}), fo);
              any = true;
            } else if (16 + t < T) {
              const std::int64_t p = 16 + t;
              c.m.forward(s, std::span<const std::int64_t>(&in[static_cast<std::size_t>(p)], 1), View2<float>(o.data() + p * V, {1, V}), fo);
              any = true;
            }
          }
          if (!any) break;
        }
        for (int k = 0; k < kSessions; ++k) got[static_cast<std::size_t>(w * kSessions + k)] = std::move(out[static_cast<std::size_t>(k)]);
      });
    for (auto& t : pool) t.join();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      INFO("session " << i);
      CHECK(got[i] == want[i]);
    }
  }
}
