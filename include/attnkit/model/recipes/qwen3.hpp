// attnkit/model/recipes/qwen3.hpp — plain Qwen3 (spec §1): full and sliding attention layers
// as config.json's layer_types say, summed residuals, one pass over the layers.
#pragma once

#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/recipe.hpp"

namespace attnkit::model {

inline void register_qwen3(Registry& r) {
  register_qwen3_attention(r.mixers);
  r.add_residual("sum", [](const BuildContext&) { return std::make_shared<SumResidual>(); });
  r.add_stack("single", [](const BuildContext&) { return std::make_shared<SinglePass>(); });
  r.add_recipe({"qwen3", {"qwen3"}, nullptr, [](io::ConfigFields&) { return Plan{}; }});
}

}  // namespace attnkit::model
