// attnkit/model/recipes/lt2.hpp — LT2, linear-time looped transformers (spec §9.2): model_type
// "lt2" (recipe "lt2").
//
// Qwen3-style pre-norm blocks, x += Mixer_l(RMSNorm(x)); x += SwiGLU_l(RMSNorm(x)), whose n shared
// layers run loop_count times (default 4) with a state per (loop, layer) (stacks/looped.hpp; the
// generic loop_between / loop_windows fields apply too). The mixer of each layer is one of
//   gdn     Gated DeltaNet ("linear_attention", mixers/gated_deltanet.hpp; config fields
//           linear_num_key_heads, linear_num_value_heads, linear_key_head_dim,
//           linear_value_head_dim, linear_conv_kernel_dim as in Qwen3.5; tensors
//           model.layers.{i}.linear_attn.*)
//   full    full causal attention (Qwen3: q/k/v/o_proj, q_norm, k_norm)
//   window  sliding-window attention; window from default_sliding_window (or sliding_window)
//   sparse  DeepSeek sparse attention (mixers/sparse_attention.hpp; index_n_heads,
//           index_head_dim, index_topk, index_rope_dim; tensors self_attn.indexer.*)
// chosen by, in this order:
//   * layer_mixers: a list with one of gdn|sparse|window|full per layer, or
//   * layer_types: a list of linear_attention|sparse_attention|sliding_attention|full_attention, or
//   * mixer (default "full") and attention_pattern "a:b": in every group of a + b layers the first
//     a run `mixer` and the last b run attention_layer (full|sparse|window, default full), e.g.
//     "4:1" of 20 layers: 4, 9, 14, 19 are attention (LT2-hybrid Full+GDN; attention_layer
//     "sparse" gives LT2-hybrid GDN+DSA); without attention_pattern every layer runs `mixer`.
// gated_attn (default false): the Qwen-style output gate σ(g) ⊙ o on every softmax-attention layer
// (full, window, sparse); q_proj.weight is then [H·2d, D] with rows per head [q | gate].
// Fields of a mechanism no layer runs (index_* without a sparse layer, linear_* without a gdn
// layer, default_sliding_window without a window layer) are reported as unused, like any other.
#pragma once

#include <algorithm>
#include <cctype>
#include <string>
#include <tuple>
#include <vector>

#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/mixers/gated_deltanet.hpp"
#include "attnkit/model/mixers/sparse_attention.hpp"
#include "attnkit/model/recipe.hpp"
#include "attnkit/model/stacks/looped.hpp"

namespace attnkit::model {

namespace detail_lt2 {

// The window of LT2's window layers: default_sliding_window, or sliding_window (which LT2 configs
// may set without use_sliding_window); both set must agree.
inline std::int64_t window(io::ConfigFields& f) {
  const std::int64_t d = f.integer("default_sliding_window", 0);
  const std::int64_t s = f.integer("sliding_window", 0);
  if (f.has("default_sliding_window") && d <= 0) f.fail("default_sliding_window", "must be positive, got ", d);
  if (f.has("sliding_window") && s <= 0) f.fail("sliding_window", "must be positive, got ", s);
  if (d > 0 && s > 0 && d != s) f.fail("default_sliding_window", d, " differs from sliding_window ", s);
  if (d <= 0 && s <= 0)
    f.fail("default_sliding_window", "window layers need a window: set default_sliding_window (or sliding_window)");
  return d > 0 ? d : s;
}

// "a:b" -> {a, b}.
inline std::pair<std::int64_t, std::int64_t> pattern(io::ConfigFields& f, const std::string& p) {
  const auto colon = p.find(':');
  auto number = [&](const std::string& part) -> std::int64_t {
    if (part.empty() || part.size() > 6) f.fail("attention_pattern", "expected \"a:b\" (e.g. \"4:1\"), got '", p, "'");
    for (char ch : part)
      if (!std::isdigit(static_cast<unsigned char>(ch))) f.fail("attention_pattern", "expected \"a:b\" (e.g. \"4:1\"), got '", p, "'");
    return std::stoll(part);
  };
  if (colon == std::string::npos) f.fail("attention_pattern", "expected \"a:b\" (e.g. \"4:1\"), got '", p, "'");
  const std::int64_t a = number(p.substr(0, colon)), b = number(p.substr(colon + 1));
  if (a + b == 0) f.fail("attention_pattern", "'", p, "' has no layers: a + b must be at least 1");
  return {a, b};
}

inline bool valid_kind(const std::string& k) { return k == "gdn" || k == "sparse" || k == "window" || k == "full"; }

}  // namespace detail_lt2

// The mixer kind (gdn|sparse|window|full) of every layer, from the config's fields (see above).
inline std::vector<std::string> lt2_layer_kinds(io::ConfigFields& f) {
  const auto& c = f.config();
  const std::int64_t L = c.num_hidden_layers;
  std::vector<std::string> kinds;
  const bool by_list = f.has("layer_mixers"), by_types = f.has("layer_types");
  if (by_list && by_types) f.fail("layer_mixers", "give either layer_mixers or layer_types, not both");
  if (by_list || by_types) {
    const char* given = by_list ? "layer_mixers" : "layer_types";
    for (const char* k : {"mixer", "attention_pattern", "attention_layer"})
      if (f.has(k)) f.fail(k, "is set but ", given, " already lists every layer's mixer");
  }
  if (by_list) {
    const nlohmann::json& j = f.json("layer_mixers");
    if (!j.is_array() || static_cast<std::int64_t>(j.size()) != L)
      f.fail("layer_mixers", "must be a list of ", L, " entries (one per layer) of gdn, sparse, window or full");
    for (std::size_t i = 0; i < j.size(); ++i) {
      if (!j[i].is_string() || !detail_lt2::valid_kind(j[i].get<std::string>()))
        f.fail("layer_mixers", "entry ", i, " is ", j[i].dump(), " (expected gdn, sparse, window or full)");
      kinds.push_back(j[i].get<std::string>());
    }
  } else if (by_types) {
    for (std::size_t i = 0; i < c.layer_types.size(); ++i) {
      const std::string& t = c.layer_types[i].name;
      if (t == "linear_attention") kinds.push_back("gdn");
      else if (t == "sparse_attention") kinds.push_back("sparse");
      else if (t == "sliding_attention") kinds.push_back("window");
      else if (t == "full_attention") kinds.push_back("full");
      else
        f.fail("layer_types", "entry ", i, " is '", t,
               "': LT2 layers are linear_attention, sparse_attention, sliding_attention or full_attention");
    }
  } else {
    const std::string mixer = f.string("mixer", "full");
    if (!detail_lt2::valid_kind(mixer))
      f.fail("mixer", "unknown mixer '", mixer, "' (expected gdn, sparse, window or full; attnkit implements no other LT2 mixer)");
    const std::string attn = f.string("attention_layer", "full");
    if (attn != "full" && attn != "sparse" && attn != "window")
      f.fail("attention_layer", "unknown attention layer '", attn, "' (expected full, sparse or window)");
    std::int64_t a = 1, b = 0;  // every layer runs `mixer`
    if (f.has("attention_pattern")) std::tie(a, b) = detail_lt2::pattern(f, f.string("attention_pattern", ""));
    else if (f.has("attention_layer")) f.fail("attention_layer", "is set but there is no attention_pattern placing it");
    for (std::int64_t l = 0; l < L; ++l) kinds.push_back(l % (a + b) < a ? mixer : attn);
  }
  return kinds;
}

inline Plan lt2_plan(io::ConfigFields& f) {
  const std::vector<std::string> kinds = lt2_layer_kinds(f);
  const bool gated = f.boolean("gated_attn", false);
  auto any = [&](const char* k) { return std::find(kinds.begin(), kinds.end(), k) != kinds.end(); };
  // The settings of the mechanisms that run are validated up front (the mixers read them again).
  if (any("gdn")) read_gated_deltanet_settings(f);
  if (any("sparse")) read_sparse_indexer_settings(f);
  if (any("window")) detail_lt2::window(f);
  if (f.config().num_sliding_layers() > 0 && !f.has("layer_types"))
    f.fail("use_sliding_window", "LT2 places window layers by mixer / attention_pattern / layer_mixers, not by "
                                 "use_sliding_window");
  Plan p;
  for (const auto& k : kinds) {
    if (k == "gdn") p.mixers.push_back("linear_attention");
    else if (k == "full") p.mixers.push_back(gated ? "gated_attention" : "full_attention");
    else if (k == "window") p.mixers.push_back(gated ? "lt2_gated_window_attention" : "lt2_window_attention");
    else p.mixers.push_back(gated ? "gated_sparse_attention" : "sparse_attention");
  }
  // loop_count present: the model's generic loop (Qwen3Model::compose makes the stack "looped");
  // absent: LT2's default of 4 loops.
  p.stack = f.has("loop_count") ? "single" : "lt2";
  return p;
}

// LT2-hybrid (Full+GDN) 1.3B (spec §9.2, the flagship recipe): dim 2048, 20 shared layers looped 4
// times, "4:1" (layers 4, 9, 14, 19 full attention with 16 q / 8 kv heads of 128, the others Gated
// DeltaNet with 16 key / 16 value heads of 128, conv 4), intermediate 5632, Qwen3's vocabulary
// (151936, tied embeddings), rope theta 1e6. sparse = true: LT2-hybrid (GDN+DSA), the attention
// layers DeepSeek sparse attention with 16 index heads of 64 (all rotary), top-2048.
inline nlohmann::json lt2_1_3b_config(bool sparse) {
  nlohmann::json j = io::qwen3_0_6b_config().raw;
  j["model_type"] = "lt2";
  j["hidden_size"] = 2048;
  j["num_hidden_layers"] = 20;
  j["num_attention_heads"] = 16;
  j["num_key_value_heads"] = 8;
  j["head_dim"] = 128;
  j["intermediate_size"] = 5632;
  j["vocab_size"] = 151936;
  j["tie_word_embeddings"] = true;
  j["max_window_layers"] = 20;
  j.erase("layer_types");
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  j["loop_count"] = 4;
  j["mixer"] = "gdn";
  j["attention_pattern"] = "4:1";
  j["attention_layer"] = sparse ? "sparse" : "full";
  j["gated_attn"] = false;
  j["linear_num_key_heads"] = 16;
  j["linear_num_value_heads"] = 16;
  j["linear_key_head_dim"] = 128;
  j["linear_value_head_dim"] = 128;
  j["linear_conv_kernel_dim"] = 4;
  if (sparse) {
    j["index_n_heads"] = 16;
    j["index_head_dim"] = 64;
    j["index_topk"] = 2048;
    j["index_rope_dim"] = 64;
  }
  return j;
}
inline nlohmann::json lt2_hybrid_1_3b_config() { return lt2_1_3b_config(false); }
inline nlohmann::json lt2_gdn_dsa_1_3b_config() { return lt2_1_3b_config(true); }

// A tiny LT2 hybrid for tests and CI: hidden 64, 5 layers "4:1" (layer 4 attention: 4 q / 2 kv
// heads of 16), 2 loops, Gated DeltaNet 2 key / 4 value heads of 16, vocab 256. sparse = true:
// layer 4 sparse attention (2 index heads of 16, rotary 8, top-8).
inline nlohmann::json lt2_tiny_config(bool sparse) {
  nlohmann::json j = lt2_1_3b_config(sparse);
  j["hidden_size"] = 64;
  j["num_hidden_layers"] = 5;
  j["max_window_layers"] = 5;
  j["num_attention_heads"] = 4;
  j["num_key_value_heads"] = 2;
  j["head_dim"] = 16;
  j["intermediate_size"] = 96;
  j["vocab_size"] = 256;
  j["max_position_embeddings"] = 4096;
  j["loop_count"] = 2;
  j["linear_num_key_heads"] = 2;
  j["linear_num_value_heads"] = 4;
  j["linear_key_head_dim"] = 16;
  j["linear_value_head_dim"] = 16;
  if (sparse) {
    j["index_n_heads"] = 2;
    j["index_head_dim"] = 16;
    j["index_topk"] = 8;
    j["index_rope_dim"] = 8;
  }
  return j;
}

inline void register_lt2(Registry& r) {
  register_sparse_attention(r.mixers);
  if (!r.mixers.has("linear_attention")) register_gated_deltanet(r.mixers);
  if (!r.mixers.has("gated_attention"))
    r.mixers.add("gated_attention", [](const BuildContext& c, int layer) {
      QKVProjection::Options po;
      po.output_gate = true;
      return std::make_unique<Qwen3Attention>(c, layer, 0, po);
    });
  for (const bool gated : {false, true})
    r.mixers.add(gated ? "lt2_gated_window_attention" : "lt2_window_attention", [gated](const BuildContext& c, int layer) {
      QKVProjection::Options po;
      po.output_gate = gated;
      return std::make_unique<Qwen3Attention>(c, layer, detail_lt2::window(c.fields), po);
    });
  r.add_stack("lt2", [](const BuildContext& c) { return std::make_shared<LoopedStack>(c, read_looped_settings(c.fields, 4)); });
  r.add_recipe({"lt2", {"lt2"}, nullptr, lt2_plan});
}

}  // namespace attnkit::model
