// Attention Residuals models (spec §5): the open-attention-residuals checkpoints (fixtures
// attnres-block-tiny, attnres-full-tiny: an independent float64 implementation) through prefill,
// decode and chunks; the Kimi and Delta forms against a float64 reference of the spec's formulas
// (tests/reference/attnres_model_ref.hpp) driving the residual stream with stand-in sublayers;
// the spec's invariants; configuration and checkpoint errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attnkit/model/qwen3.hpp"
#include "model_test_util.hpp"
#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

struct Reference {
  std::vector<std::int64_t> ids;
  std::vector<float> logits;
};
Reference load_reference(const fs::path& dir) {
  auto f = io::SafetensorsFile::open(dir / "reference.safetensors");
  return {io::to_i64(f.tensor("input_ids")), io::to_f32(f.tensor("logits"))};
}

}  // namespace

TEST_CASE("attnres fixtures: prefill, decode and chunked logits against the float64 reference", "[model][attnres]") {
  const std::string name = GENERATE("attnres-block-tiny", "attnres-full-tiny");
  CAPTURE(name);
  const auto m = model::Qwen3Model::load(fixture(name));
  const Reference ref = load_reference(fixture(name));
  CHECK(m.recipe() == "qwen3-attnres");
  CHECK(m.residual_policy().kind() == "attnres");
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), L = m.num_layers();

  const Run prefill = run(m, ref.ids);
  CHECK(test::rel_l2(prefill.logits, ref.logits) <= 1e-4);
  const Run decode = run(m, ref.ids, {1});
  CHECK(test::rel_l2(decode.logits, ref.logits) <= 1e-4);
  CHECK(test::rel_l2(decode.logits, prefill.logits) <= 1e-5);
  for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{5}, {11, 1, 7}}) {
    CAPTURE(steps);
    CHECK(test::rel_l2(run(m, ref.ids, steps).logits, prefill.logits) <= 1e-5);
  }
  CHECK(test::bit_equal(run(m, ref.ids, {}, {}, 1).logits, run(m, ref.ids, {}, {}, 2).logits));

  // The routing weights: [layers, 2, T, S], each call's row a distribution over its sources.
  const auto& policy = dynamic_cast<const model::AttentionResiduals&>(m.residual_policy());
  const auto w = prefill.trace.tensor("attnres_weights");
  const std::int64_t S = policy.max_sources();
  REQUIRE(w.shape == std::vector<std::int64_t>{L, 2, T, S});
  CHECK(S == (name == "attnres-block-tiny" ? 3 : 2 * L + 1));
}
