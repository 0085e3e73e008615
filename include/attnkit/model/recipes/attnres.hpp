// attnkit/model/recipes/attnres.hpp — Attention Residuals checkpoints (spec §5; fixtures
// attnres-*-tiny; open-attention-residuals' Qwen3AttnResForCausalLM): model_type
// "qwen3_attnres". The layers are plain Qwen3 (full / sliding attention per layer_types, SwiGLU);
// the residual policy is AttentionResiduals with the settings of read_attnres_settings.
#pragma once

#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/recipe.hpp"
#include "attnkit/model/residuals/attention_residuals.hpp"

namespace attnkit::model {

inline void register_attention_residuals(Registry& r) {
  r.add_residual("attnres", [](const BuildContext& c) {
    return std::make_shared<AttentionResiduals>(c, read_attnres_settings(c.fields));
  });
  r.add_recipe({"qwen3-attnres", {"qwen3_attnres"}, nullptr, [](io::ConfigFields& f) {
                  read_attnres_settings(f);  // validates the fields up front
                  Plan p;
                  p.residual = "attnres";
                  return p;
                }});
}

}  // namespace attnkit::model
