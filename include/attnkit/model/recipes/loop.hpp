// attnkit/model/recipes/loop.hpp — Loop Attention checkpoints (spec §4; fixtures loop-*-tiny):
// a Qwen3 config.json with any of `loop_num`, `loop_window_size`, `loop_mode`. Every layer
// becomes a LoopAttention mixer; stack mode repeats the stack loop_num times (no norm between
// passes), layer mode runs it once.
#pragma once

#include "attnkit/model/mixers/loop_attention.hpp"
#include "attnkit/model/recipe.hpp"

namespace attnkit::model {

inline bool is_loop_config(const io::Qwen3Config& c) {
  return c.raw.is_object() && (c.raw.contains("loop_num") || c.raw.contains("loop_window_size") || c.raw.contains("loop_mode"));
}

inline void register_loop_attention(Registry& r) {
  r.mixers.add("loop_attention", [](const BuildContext& c, int layer) {
    return std::make_unique<LoopAttention>(c, layer, read_loop_settings(c.fields));
  });
  r.add_stack("loop", [](const BuildContext& c) { return std::make_shared<RepeatStack>(read_loop_settings(c.fields).passes()); });
  r.add_recipe({"qwen3-loop", {"qwen3"}, is_loop_config, [](io::ConfigFields& f) {
                  read_loop_settings(f);  // validates the fields up front
                  const auto& c = f.config();
                  for (std::size_t i = 0; i < c.layer_types.size(); ++i)
                    if (c.layer_types[i] != io::LayerType::full_attention)
                      f.fail("layer_types", "entry ", i, " is '", c.layer_types[i].name,
                             "': Loop Attention runs on full-attention layers only");
                  Plan p;
                  p.mixers.assign(c.layer_types.size(), "loop_attention");
                  p.stack = "loop";
                  return p;
                }});
}

}  // namespace attnkit::model
