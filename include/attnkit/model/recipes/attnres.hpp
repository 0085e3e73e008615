// attnkit/model/recipes/attnres.hpp — Attention Residuals checkpoints (spec §5; fixtures
// attnres-*-tiny; open-attention-residuals' Qwen3AttnResForCausalLM): model_type
// "qwen3_attnres". The layers are plain Qwen3 (full / sliding attention per layer_types, SwiGLU);
// the residual policy is AttentionResiduals with the settings of read_attnres_settings.
#pragma once

#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/recipe.hpp"
#include "attnkit/model/residuals/attention_residuals.hpp"

namespace attnkit::model {

// A plain Qwen3 config.json made an AttnRes one with open-attention-residuals' defaults (8 blocks,
// block mode, bias gate; the recency-bias init of their from-scratch runs, 0).
inline nlohmann::json with_attnres(nlohmann::json j) {
  j["model_type"] = "qwen3_attnres";
  j["attnres_num_blocks"] = 8;
  j["attnres_mode"] = "block";
  j["attnres_gate_type"] = "bias";
  j["attnres_recency_bias_init"] = 0.0;
  return j;
}

// The shape of open-attention-residuals' "0.6B" models (wdlctc/open-attnres-0.6b-block, trained
// from scratch): Qwen3-0.6B's but with head_dim = D / H = 64; 8 blocks of 4 layers, block mode.
// with_attnres = false: the same shape as plain Qwen3 (the baseline AttnRes is measured against).
inline nlohmann::json open_attnres_0_6b_config(bool with_attnres_fields = true) {
  nlohmann::json j = io::qwen3_0_6b_config().raw;
  j["head_dim"] = 64;
  return with_attnres_fields ? with_attnres(std::move(j)) : j;
}

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
