// R-GQA (spec §10) and Tuneable attention (spec §11) as Qwen3 layer types: random tiny models with
// odd sizes (hidden 48, 6 q / 2 kv heads of 10, so G = 3) against a float64 reference forward
// (tests/reference/model_variants_ref.hpp); prefill = uneven chunks = token-by-token decode; every
// weighting and scope; every head kept with weight 1 = plain Qwen3; Tuneable folded = unfolded and
// an orthogonal U = plain Qwen3; the router trace; the named shapes; configuration errors; a
// checkpoint without router.weight or U.
#include <catch2/catch.hpp>

#include <Eigen/QR>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "attnkit/model/qwen3.hpp"
#include "model_test_util.hpp"
#include "reference/model_variants_ref.hpp"
#include "test_util.hpp"

// One namespace per file: the model test files compile as one unit (tests/CMakeLists.txt).
namespace attnkit_test_model_variants {

using namespace attnkit;
using namespace attnkit::test;
using Catch::Contains;

namespace {

constexpr std::int64_t kT = 13;

// Hidden 48, 6 q / 2 kv heads of 10 (G = 3), intermediate 40, vocab 97, untied head.
nlohmann::json tiny(const std::vector<std::string>& types) {
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 97}, {"hidden_size", 48}, {"intermediate_size", 40},
                      {"num_hidden_layers", types.size()}, {"num_attention_heads", 6}, {"num_key_value_heads", 2},
                      {"head_dim", 10}, {"rope_parameters", {{"rope_theta", 1e4}, {"rope_type", "default"}}},
                      {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-6}};
  j["layer_types"] = types;
  return j;
}

bool ends_with(const std::string& s, const std::string& e) {
  return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
}

// RandomSource of stddev 0.08 (attention far from uniform, router logits of stddev ~0.5), except
// that every self_attn.U is the given [d, r] matrix when one is set; records what was read.
class TestSource final : public model::TensorSource {
 public:
  explicit TestSource(std::uint64_t seed = 11, model::WeightType type = model::WeightType::f32)
      : inner_(type, seed, 0.08f) {}
  std::vector<float> U;  // row-major [d, r]; empty: RandomSource's
  mutable std::map<std::string, std::vector<std::int64_t>> read;
  bool contains(const std::string& n) const override { return inner_.contains(n); }
  model::HostTensor get(const std::string& n, const std::vector<std::int64_t>& shape) const override {
    read[n] = shape;
    if (U.empty() || !ends_with(n, "self_attn.U")) return inner_.get(n, shape);
    REQUIRE(static_cast<std::int64_t>(U.size()) == shape.at(0) * shape.at(1));
    model::HostTensor h;
    h.shape = shape;
    h.type = model::WeightType::f32;
    h.owned_f32 = U;
    h.data = h.owned_f32.data();
    return h;
  }
  std::string describe() const override { return inner_.describe() + " (test)"; }

 private:
  model::RandomSource inner_;
};

model::Qwen3Model build(const nlohmann::json& j, const TestSource& src) {
  model::LoadOptions lo;
  lo.registry = &builtin_registry();
  return model::Qwen3Model::compose(builtin_registry().parse_config(j, "variants-test.json"), src, lo);
}

// U [d, r] with orthonormal rows (U Uᵀ = I): the first d rows of a random orthogonal r x r matrix,
// i.e. [I, 0] R.
std::vector<float> orthonormal_rows(std::int64_t d, std::int64_t r, std::uint64_t seed) {
  test::Rng rng(seed);
  Eigen::MatrixXd A(r, r);
  for (std::int64_t i = 0; i < r; ++i)
    for (std::int64_t c = 0; c < r; ++c) A(i, c) = rng.normal();
  const Eigen::MatrixXd Q = Eigen::HouseholderQR<Eigen::MatrixXd>(A).householderQ();
  std::vector<float> u(static_cast<std::size_t>(d * r));
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t c = 0; c < r; ++c) u[static_cast<std::size_t>(i * r + c)] = static_cast<float>(Q(i, c));
  return u;
}

// max |got - want| over a [T, H] layer of a trace tensor [layers, T, H].
double trace_diff(const model::Trace::Tensor& t, std::int64_t layer, const ref::MatrixXdR& want) {
  const std::int64_t T = t.shape.at(1), H = t.shape.at(2);
  double worst = 0;
  for (std::int64_t i = 0; i < T; ++i)
    for (std::int64_t h = 0; h < H; ++h) {
      const double g = t.data[static_cast<std::size_t>((layer * T + i) * H + h)];
      if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
      if ((want(i, h) == 0) != (g == 0)) return std::numeric_limits<double>::infinity();  // kept = kept
      worst = std::max(worst, std::abs(g - want(i, h)));
    }
  return worst;
}

}  // namespace

TEST_CASE("routed and tuneable layers vs float64 reference; prefill = chunks = decode", "[model][variants]") {
  struct Case {
    std::int64_t top_k;
    std::string weighting, scope;
    std::int64_t rank;
    std::string form;
  };
  // The first case sets no rgqa_* / tuneable_form field: the defaults (top-1, renorm, group, folded).
  const Case cases[] = {{1, "renorm", "group", 7, "folded"}, {1, "none", "all", 7, "unfolded"},
                        {2, "prob", "group", 30, "unfolded"}, {2, "renorm", "all", 30, "folded"},
                        {3, "prob", "all", 13, "folded"}};
  const std::vector<std::string> types = {"routed_attention", "tuneable_attention", "full_attention", "routed_attention"};
  for (std::size_t ci = 0; ci < std::size(cases); ++ci) {
    const Case& c = cases[ci];
    CAPTURE(c.top_k, c.weighting, c.scope, c.rank, c.form);
    auto j = tiny(types);
    j["tuneable_rank"] = c.rank;
    if (ci > 0) {
      j["rgqa_top_k"] = c.top_k;
      j["rgqa_weighting"] = c.weighting;
      j["rgqa_scope"] = c.scope;
      j["tuneable_form"] = c.form;
    }
    const TestSource src;
    const auto m = build(j, src);
    REQUIRE(m.mixer(0).kind() == "routed_attention");
    REQUIRE(m.mixer(1).kind() == "tuneable_attention");
    REQUIRE(m.mixer(2).kind() == "full_attention");
    const auto ids = random_ids(kT, 97, 5 + ci);
    ref::VariantRefSettings s;
    s.kinds = {"routed", "tuneable", "full", "routed"};
    s.top_k = c.top_k;
    s.weighting = c.weighting;
    s.scope = c.scope;
    s.rank = c.rank;
    const ref::VariantRefOutput r = ref::variant_ref_forward(ref::load_variant_ref(src, m.config(), s), ids);
    const std::vector<double> want(r.logits.data(), r.logits.data() + r.logits.size());
    const Run pre = run(m, ids);
    const double err = test::rel_l2(pre.logits, want);
    std::printf("variants top-%lld %s %s, U rank %lld %s: prefill vs float64 reference %.3g (router margin %.3g)\n",
                static_cast<long long>(c.top_k), c.weighting.c_str(), c.scope.c_str(), static_cast<long long>(c.rank),
                c.form.c_str(), err, r.min_margin);
    CHECK(err <= 1e-5);
    // The selection is far from a tie (a float32 router could flip one closer than ~1e-6).
    CHECK(r.min_margin > 1e-4);
    // The router trace: probabilities and output factors (0 exactly where the reference keeps no
    // head) of the routed layers within 1e-5 of the reference; NaN for the other layers.
    const auto check_trace = [&](const model::Trace& tr) {
      const auto probs = tr.tensor("router_probs"), weights = tr.tensor("router_weight");
      REQUIRE(probs.shape == std::vector<std::int64_t>{4, kT, 6});
      REQUIRE(weights.shape == std::vector<std::int64_t>{4, kT, 6});
      for (std::int64_t layer : {0, 3}) {
        CHECK(trace_diff(probs, layer, r.probs[static_cast<std::size_t>(layer)]) <= 1e-5);
        CHECK(trace_diff(weights, layer, r.weights[static_cast<std::size_t>(layer)]) <= 1e-5);
      }
      CHECK(std::isnan(probs.data[static_cast<std::size_t>(1 * kT * 6)]));  // layer 1 is not routed
    };
    check_trace(pre.trace);
    for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{1}, {5}, {4, 1, 8}}) {
      CAPTURE(steps);
      const Run got = run(m, ids, steps);
      const double e = test::rel_l2(got.logits, want), agree = test::rel_l2(got.logits, pre.logits);
      CHECK(e <= 1e-5);
      CHECK(agree <= 1e-5);
      check_trace(got.trace);
    }
  }
}

TEST_CASE("routed attention: every head kept with weight 1 is plain Qwen3 (the router is ignored)", "[model][variants][rgqa]") {
  const TestSource src;
  const auto plain = build(tiny({"full_attention", "full_attention"}), src);
  const auto ids = random_ids(kT, 97, 3);
  const Run want = run(plain, ids), want_dec = run(plain, ids, {1});
  for (const std::string scope : {"group", "all"}) {
    CAPTURE(scope);
    auto j = tiny({"routed_attention", "routed_attention"});
    j["rgqa_top_k"] = 3;
    j["rgqa_weighting"] = "none";
    j["rgqa_scope"] = scope;
    const auto m = build(j, src);
    const Run pre = run(m, ids), dec = run(m, ids, {1}), chunks = run(m, ids, {6, 7});
    const double e = test::rel_l2(pre.logits, want.logits), ed = test::rel_l2(dec.logits, want_dec.logits),
                 ec = test::rel_l2(chunks.logits, want.logits);
    std::printf("rgqa top-G, weight 1 (%s) vs plain: prefill %.3g, decode %.3g, chunks %.3g\n", scope.c_str(), e, ed, ec);
    CHECK(e <= 1e-6);
    CHECK(ed <= 1e-6);
    CHECK(ec <= 1e-6);
    for (float w : pre.trace.tensor("router_weight").data) REQUIRE(w == 1.f);
  }
}

TEST_CASE("tuneable attention: folded = unfolded; an orthogonal U is plain Qwen3", "[model][variants][tuneable]") {
  const std::vector<std::string> types = {"tuneable_attention", "full_attention", "tuneable_attention"};
  const auto ids = random_ids(kT, 97, 4);
  const auto form = [&](std::int64_t rank, const std::string& f) {
    auto j = tiny(types);
    j["tuneable_rank"] = rank;
    j["tuneable_form"] = f;
    return j;
  };
  SECTION("random U: the two forms agree (prefill, decode, chunks; f32 and bf16 KV caches)") {
    for (std::int64_t rank : {7, 30}) {
      CAPTURE(rank);
      const TestSource src;
      const auto folded = build(form(rank, "folded"), src), unfolded = build(form(rank, "unfolded"), src);
      for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{}, {1}, {3, 10}}) {
        CAPTURE(steps);
        const double e = test::rel_l2(run(unfolded, ids, steps).logits, run(folded, ids, steps).logits);
        std::printf("tuneable rank %lld: unfolded vs folded %.3g\n", static_cast<long long>(rank), e);
        CHECK(e <= 1e-5);
      }
      // bf16 KV caches (the unfolded K cache r wide): decode = prefill up to bf16 rounding flips.
      // Decode's k comes from a GEMV, prefill's from a GEMM; they differ in the last float bit,
      // and an element that close to a bf16 rounding boundary lands one bf16 ulp (2^-9) apart:
      // measured up to 1.2e-4 on a token for these shapes (plain attention alike), 3e-7 otherwise.
      model::SessionOptions bf;
      bf.kv_type = model::CacheType::bf16;
      for (const auto* m : {&folded, &unfolded}) {
        const Run pre = run(*m, ids, {}, bf), dec = run(*m, ids, {1}, bf), f32 = run(*m, ids);
        const double e = test::rel_l2(dec.logits, pre.logits), eb = test::rel_l2(pre.logits, f32.logits);
        std::printf("tuneable rank %lld, bf16 KV: decode vs prefill %.3g, vs f32 KV %.3g\n", static_cast<long long>(rank), e, eb);
        CHECK(e <= 5e-4);
        CHECK(eb <= 1e-2);
      }
    }
  }
  SECTION("orthonormal rows (U Uᵀ = I): plain attention, in both forms") {
    const TestSource plain_src;
    const auto plain = build(tiny({"full_attention", "full_attention", "full_attention"}), plain_src);
    const Run want = run(plain, ids), want_dec = run(plain, ids, {1});
    for (std::int64_t rank : {10, 30}) {  // r = d_k and AGILLM's r = 3 d_k
      CAPTURE(rank);
      TestSource src;
      src.U = orthonormal_rows(10, rank, 17 + static_cast<std::uint64_t>(rank));
      for (const std::string f : {"folded", "unfolded"}) {
        CAPTURE(f);
        const auto m = build(form(rank, f), src);
        if (f == "folded") {
          const auto* t = dynamic_cast<const model::TuneableAttention*>(&m.mixer(0));
          REQUIRE(t != nullptr);
          double off = 0;
          for (std::int64_t i = 0; i < 10; ++i)
            for (std::int64_t c = 0; c < 10; ++c)
              off = std::max(off, std::abs(t->metric()[static_cast<std::size_t>(i * 10 + c)] - (i == c ? 1.0 : 0.0)));
          CHECK(off <= 1e-6);
        }
        const double e = test::rel_l2(run(m, ids).logits, want.logits), ed = test::rel_l2(run(m, ids, {1}).logits, want_dec.logits);
        std::printf("tuneable orthogonal U (r %lld, %s) vs plain: prefill %.3g, decode %.3g\n", static_cast<long long>(rank),
                    f.c_str(), e, ed);
        CHECK(e <= 1e-5);
        CHECK(ed <= 1e-5);
      }
    }
  }
}

TEST_CASE("tuneable attention in a batch session: both forms over pages, = one session each",
          "[model][variants][tuneable][batch]") {
  const std::vector<std::string> types = {"tuneable_attention", "full_attention", "tuneable_attention"};
  const std::vector<std::int64_t> len = {1, 9, 17, 30};
  std::vector<std::vector<std::int64_t>> ids;
  for (std::size_t i = 0; i < len.size(); ++i) ids.push_back(random_ids(len[i], 97, 40 + i));
  // Whole prompts, chunks and decode tokens mixed in one step.
  const test::Plan plan = {{1, 5, 17, 0}, {0, 1, 0, 12}, {0, 1, 0, 1}, {0, 1, 0, 9}, {0, 1, 0, 1}, {0, 0, 0, 7}};
  const TestSource src;
  // head_dim 10: the unfolded keys take 1, 2 and 3 pool slots per KV head (r 7, 13, 27).
  const std::pair<std::string, std::int64_t> forms[] = {{"folded", 7}, {"unfolded", 7}, {"unfolded", 13}, {"unfolded", 27}};
  for (const auto& [f, rank] : forms) {
    auto j = tiny(types);
    j["tuneable_rank"] = rank;
    j["tuneable_form"] = f;
    const auto m = build(j, src);
    for (const auto kv : {model::CacheType::f32, model::CacheType::bf16, model::CacheType::int8}) {
      CAPTURE(f, rank, static_cast<int>(kv));
      model::SessionOptions so;
      so.kv_type = kv;
      {  // Both forms keep their K/V in the page pool (folded: the metric rides on the query).
        const auto bs = m.new_batch_session(so, {});
        CHECK(bs.layer_paged(0));
        CHECK(bs.layer_paged(1));
        CHECK(bs.layer_paged(2));
      }
      const auto got = test::batch_logits(m, ids, plan, so, 4, 0);
      for (std::size_t i = 0; i < ids.size(); ++i) {
        CAPTURE(i);
        // As plain attention's batch test (test_model.cpp): the same kernels over the same rows, the
        // linear layers blocked over more rows (a few ulp); int8: a last-bit change upstream may move
        // a K/V element to the neighbouring code.
        const double e = test::rel_l2(got[i], run(m, ids[i], {}, so).logits);
        CHECK(e <= (kv == model::CacheType::int8 ? 1e-4 : 2e-6));
      }
    }
  }
}

TEST_CASE("routed attention in a batch session: over pages, = one session each, its trace too",
          "[model][variants][routed][batch]") {
  const std::vector<std::string> types = {"routed_attention", "full_attention", "routed_attention"};
  const std::vector<std::int64_t> len = {1, 9, 17, 30};
  std::vector<std::vector<std::int64_t>> ids;
  for (std::size_t i = 0; i < len.size(); ++i) ids.push_back(random_ids(len[i], 97, 60 + i));
  // Whole prompts, chunks and decode tokens mixed in one step.
  const test::Plan plan = {{1, 5, 17, 0}, {0, 1, 0, 12}, {0, 1, 0, 1}, {0, 1, 0, 9}, {0, 1, 0, 1}, {0, 0, 0, 7}};
  const TestSource src;
  for (const std::string w : {"renorm", "none"}) {
    auto j = tiny(types);
    j["rgqa_weighting"] = w;
    const auto m = build(j, src);
    for (const auto kv : {model::CacheType::f32, model::CacheType::bf16, model::CacheType::int8}) {
      CAPTURE(w, static_cast<int>(kv));
      model::SessionOptions so;
      so.kv_type = kv;
      {
        const auto bs = m.new_batch_session(so, {});
        CHECK(bs.layer_paged(0));
        CHECK(bs.layer_paged(2));
      }
      std::vector<model::Trace> traces(ids.size());
      const auto got = test::batch_logits(m, ids, plan, so, 4, 0);
      test::batch_logits(m, ids, plan, so, 4, 0, &traces);
      for (std::size_t i = 0; i < ids.size(); ++i) {
        CAPTURE(i);
        const auto want = run(m, ids[i], {}, so);
        // As Tuneable's batch test above; int8: the session stages the rows to f32 where the
        // pages are read as codes, the same values in another order of rounding.
        CHECK(test::rel_l2(got[i], want.logits) <= (kv == model::CacheType::int8 ? 1e-4 : 2e-6));
        REQUIRE_FALSE(want.trace.empty());
        test::check_same_trace(traces[i], want.trace, 1e-5);  // router_probs, router_weight
      }
    }
  }
}

TEST_CASE("variant layers: named shapes, tiny models and the random U", "[model][variants][config]") {
  const auto& reg = builtin_registry();
  struct Named {
    nlohmann::json j;
    std::string type;
  };
  for (const Named& n : {Named{model::qwen3_0_6b_rgqa_config(), "routed_attention"},
                         Named{model::qwen3_0_6b_tuneable_config(), "tuneable_attention"}}) {
    CAPTURE(n.type);
    const auto c = reg.parse_config(n.j);
    CHECK(c.num_hidden_layers == 28);
    CHECK(c.hidden_size == 1024);
    CHECK(c.num_attention_heads / c.num_key_value_heads == 2);
    for (const auto& t : c.layer_types) CHECK(t.name == n.type);
    io::ConfigFields f(c);
    CHECK(reg.recipe_for(c).name == "qwen3");
    if (n.type == "routed_attention") {
      const RouteOptions o = model::read_routed_attention_settings(f);
      CHECK(o.top_k == 1);
      CHECK(o.weighting == RouteWeighting::renorm);
      CHECK(o.scope == RouteScope::group);
    } else {
      const model::TuneableSettings s = model::read_tuneable_settings(f);
      CHECK(s.rank == 384);
      CHECK(!s.unfolded);
    }
    CHECK(f.unconsumed().empty());
  }
  // The tiny versions of any Qwen3 config build and run, prefill = decode; looped too (a cache per
  // pass and layer).
  auto looped = model::with_tuneable_attention(tiny({"full_attention", "full_attention"}), 0, "unfolded");
  looped["loop_count"] = 2;
  for (const auto& j : {model::with_routed_attention(tiny({"full_attention", "full_attention"}), 2),
                        model::with_tuneable_attention(tiny({"full_attention", "full_attention"})), looped}) {
    const auto m = model::Qwen3Model::random(reg.parse_config(j), model::WeightType::bf16, 1, &reg);
    CHECK(m.passes() == (j.contains("loop_count") ? 2 : 1));
    const auto ids = random_ids(kT, 97, 6);
    const Run r = run(m, ids);
    for (float v : r.logits) REQUIRE(std::isfinite(v));
    CHECK(test::rel_l2(run(m, ids, {1}).logits, r.logits) <= 1e-5);
  }
  // RandomSource's U [128, 384]: uniform of stddev 1/sqrt(r), so U Uᵀ is near I on average.
  const model::RandomSource rs(model::WeightType::f32, 3);
  const std::vector<float> u = rs.get("model.layers.0.self_attn.U", {128, 384}).to_f32();
  double diag = 0;
  for (std::int64_t i = 0; i < 128; ++i)
    for (std::int64_t c = 0; c < 384; ++c) diag += static_cast<double>(u[static_cast<std::size_t>(i * 384 + c)]) * u[static_cast<std::size_t>(i * 384 + c)];
  CHECK(std::abs(diag / 128 - 1.0) < 0.05);
}

TEST_CASE("variant layers: configuration errors name the field", "[model][variants][config][errors]") {
  const TestSource src;
  auto fails = [&](const nlohmann::json& j, const std::string& what) {
    CAPTURE(what);
    REQUIRE_THROWS_WITH(build(j, src), Contains(what));
  };
  auto base = tiny({"routed_attention", "tuneable_attention", "full_attention"});
  base["tuneable_rank"] = 7;
  REQUIRE_NOTHROW(build(base, src));
  auto j = base;
  j["rgqa_top_k"] = 0;
  fails(j, "field 'rgqa_top_k': must be in [1, G = 3] (query heads per KV group: 6 / 2), got 0");
  j["rgqa_top_k"] = 4;
  fails(j, "field 'rgqa_top_k': must be in [1, G = 3]");
  j["rgqa_top_k"] = "2";
  fails(j, "field 'rgqa_top_k': expected an integer, got string");
  j = base;
  j["rgqa_weighting"] = "softmax";
  fails(j, "field 'rgqa_weighting': unknown weighting 'softmax' (expected none, prob or renorm)");
  j = base;
  j["rgqa_scope"] = "global";
  fails(j, "field 'rgqa_scope': unknown scope 'global' (expected group or all)");
  j = base;
  j.erase("tuneable_rank");
  fails(j, "field 'tuneable_rank': missing");
  j["tuneable_rank"] = 0;
  fails(j, "field 'tuneable_rank': must be in [1, 65536], got 0");
  j = base;
  j["tuneable_form"] = "half";
  fails(j, "field 'tuneable_form': unknown form 'half' (expected folded or unfolded)");
  // Unknown fields are still refused, and so are the fields of a mechanism no layer runs.
  j = base;
  j["rgqa_balance_loss_coef"] = 0.01;
  fails(j, "config fields that recipe 'qwen3' does not use: rgqa_balance_loss_coef");
  j = tiny({"full_attention", "full_attention"});
  j["rgqa_top_k"] = 1;
  j["tuneable_rank"] = 7;
  fails(j, "config fields that recipe 'qwen3' does not use: rgqa_top_k tuneable_rank");
  j = base;
  j["layer_types"] = {"routed_attention", "routed_sliding_attention", "full_attention"};
  REQUIRE_THROWS_WITH(builtin_registry().parse_config(j), Contains("entry 1 is 'routed_sliding_attention'") &&
                                                      Contains("routed_attention") && Contains("tuneable_attention"));
}

TEST_CASE("variant layers: a checkpoint without router.weight or U is refused; a complete one loads", "[model][variants][io]") {
  auto j = tiny({"routed_attention", "tuneable_attention"});
  j["tuneable_rank"] = 7;
  const TestSource src;
  const auto m = build(j, src);
  const auto ids = random_ids(kT, 97, 8);
  const Run want = run(m, ids);
  CHECK(src.read.count("model.layers.0.self_attn.router.weight") == 1);
  CHECK(src.read.count("model.layers.1.self_attn.U") == 1);
  // Writes what the model read, less `drop`, as a checkpoint directory.
  const auto write = [&](const fs::path& dir, const std::string& drop) {
    std::ofstream(dir / "config.json") << j.dump(1);
    io::SafetensorsWriter w;
    for (const auto& [name, shape] : src.read) {
      if (name == drop) continue;
      const std::vector<float> v = src.get(name, shape).to_f32();
      w.add_f32(name, shape, v.data());
    }
    w.write(dir / "model.safetensors");
  };
  {
    TempDir tmp;
    write(tmp.path, "");
    const auto loaded = model::Qwen3Model::load(tmp.path);
    CHECK(test::bit_equal(run(loaded, ids).logits, want.logits));
  }
  for (const std::string drop : {"model.layers.0.self_attn.router.weight", "model.layers.1.self_attn.U"}) {
    CAPTURE(drop);
    TempDir tmp;
    write(tmp.path, drop);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path), Contains("missing tensor '" + drop + "'"));
  }
}

}  // namespace attnkit_test_model_variants
