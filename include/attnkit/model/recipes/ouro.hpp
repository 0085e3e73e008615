// attnkit/model/recipes/ouro.hpp — Ouro checkpoints (spec §9.1; fixture ouro-tiny; ByteDance's
// OuroForCausalLM): model_type "ouro". Every layer is Qwen-style attention without q/k norm plus
// SwiGLU, with sandwich norms (input_layernorm_2 / post_attention_layernorm_2 on each sublayer's
// output); the stack runs total_ut_steps times with the final norm between steps and an exit
// gate (early_exit_threshold sets the default output rule). Also the generic loop of any recipe:
// config fields loop_count / loop_between / loop_windows (stacks/looped.hpp) make its stack a
// LoopedStack.
#pragma once

#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/recipe.hpp"
#include "attnkit/model/stacks/looped.hpp"

namespace attnkit::model {

inline LoopedSettings read_ouro_settings(io::ConfigFields& f) {
  LoopedSettings s;
  const std::int64_t n = f.integer("total_ut_steps", 4);
  if (n < 1 || n > 64) f.fail("total_ut_steps", "must be in [1, 64], got ", n);
  s.steps = static_cast<int>(n);
  s.between = LoopedSettings::Between::norm;
  s.exit_gate = true;
  s.exit_threshold = f.number("early_exit_threshold", 1.0);
  if (!(s.exit_threshold > 0.0 && s.exit_threshold <= 1.0))
    f.fail("early_exit_threshold", "must be in (0, 1], got ", s.exit_threshold);
  return s;
}

// A plain Qwen3 config.json made an Ouro one (4 steps, threshold 1: the last step).
inline nlohmann::json with_ouro(nlohmann::json j) {
  j["model_type"] = "ouro";
  j["total_ut_steps"] = 4;
  j["early_exit_threshold"] = 1.0;
  j["tie_word_embeddings"] = false;
  j.erase("layer_types");
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  return j;
}

// The published Ouro-1.4B shape (spec §9.1): 24 layers, hidden 2048, 16 heads MHA of 128,
// intermediate 5632, vocab 49152, 4 steps, untied head.
inline nlohmann::json ouro_1_4b_config() {
  nlohmann::json j = io::qwen3_0_6b_config().raw;
  j["hidden_size"] = 2048;
  j["num_hidden_layers"] = 24;
  j["num_attention_heads"] = 16;
  j["num_key_value_heads"] = 16;
  j["head_dim"] = 128;
  j["intermediate_size"] = 5632;
  j["vocab_size"] = 49152;
  j["max_position_embeddings"] = 65536;
  j["max_window_layers"] = 24;
  return with_ouro(std::move(j));
}

inline void register_looped_stacks(Registry& r) {
  r.mixers.add("ouro_attention", [](const BuildContext& c, int layer) {
    QKVProjection::Options po;
    po.qk_norm = false;
    return std::make_unique<Qwen3Attention>(c, layer, 0, po);
  });
  r.add_stack("looped", [](const BuildContext& c) { return std::make_shared<LoopedStack>(c, read_looped_settings(c.fields)); });
  r.add_stack("ouro", [](const BuildContext& c) { return std::make_shared<LoopedStack>(c, read_ouro_settings(c.fields)); });
  r.add_recipe({"ouro", {"ouro"}, nullptr, [](io::ConfigFields& f) {
                  read_ouro_settings(f);  // validates the fields up front
                  const auto& c = f.config();
                  for (std::size_t i = 0; i < c.layer_types.size(); ++i)
                    if (c.layer_types[i] != io::LayerType::full_attention)
                      f.fail("layer_types", "entry ", i, " is '", c.layer_types[i].name, "': Ouro layers are full attention");
                  Plan p;
                  p.mixers.assign(c.layer_types.size(), "ouro_attention");
                  p.stack = "ouro";
                  p.block = {"input_layernorm_2", "post_attention_layernorm_2"};
                  return p;
                }});
}

}  // namespace attnkit::model
