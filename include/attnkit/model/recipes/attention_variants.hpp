// attnkit/model/recipes/attention_variants.hpp — Qwen3 attention variants as layer types of a
// plain Qwen3 config (model_type "qwen3", recipe "qwen3"): config.json's layer_types may list
//   routed_attention    R-GQA (spec §10, mixers/routed_attention.hpp): a router keeps the best
//                       rgqa_top_k query heads of each KV group per token; tensor
//                       self_attn.router.weight [H, D]; fields rgqa_top_k, rgqa_weighting,
//                       rgqa_scope
//   tuneable_attention  Tuneable attention (spec §11, mixers/tuneable_attention.hpp): scores
//                       q U Uᵀ kᵀ / sqrt(d_k); tensor self_attn.U [d_k, r]; fields tuneable_rank
//                       (required), tuneable_form (folded | unfolded)
// beside full_attention and sliding_attention layers. A field of a mechanism no layer runs is
// reported as unused, like any other. The named shapes below give random models of Qwen3-0.6B's
// dimensions (and tiny ones) with every layer routed or tuneable.
#pragma once

#include <string>

#include "attnkit/io/config.hpp"
#include "attnkit/model/mixers/routed_attention.hpp"
#include "attnkit/model/mixers/tuneable_attention.hpp"
#include "attnkit/model/recipe.hpp"

namespace attnkit::model {

namespace detail_variants {
// Every layer of a Qwen3 config.json of type `type` (no sliding window).
inline nlohmann::json with_layer_type(nlohmann::json j, const std::string& type) {
  j["model_type"] = "qwen3";
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  j["layer_types"] = nlohmann::json::array();
  for (std::int64_t l = 0; l < j.at("num_hidden_layers").get<std::int64_t>(); ++l) j["layer_types"].push_back(type);
  return j;
}
}  // namespace detail_variants

// A Qwen3 config.json made R-GQA: every layer routed_attention, top_k heads per KV group,
// renormalised weights, softmax within the group.
inline nlohmann::json with_routed_attention(nlohmann::json j, std::int64_t top_k = 1) {
  j = detail_variants::with_layer_type(std::move(j), "routed_attention");
  j["rgqa_top_k"] = top_k;
  j["rgqa_weighting"] = "renorm";
  j["rgqa_scope"] = "group";
  return j;
}

// A Qwen3 config.json made Tuneable: every layer tuneable_attention with U [head_dim, rank]
// (rank 0: 3 · head_dim, AGILLM-3's "3x expansion").
inline nlohmann::json with_tuneable_attention(nlohmann::json j, std::int64_t rank = 0, const std::string& form = "folded") {
  const std::int64_t H = j.at("num_attention_heads").get<std::int64_t>();
  const std::int64_t d = j.contains("head_dim") ? j.at("head_dim").get<std::int64_t>()
                                                : j.at("hidden_size").get<std::int64_t>() / H;
  j = detail_variants::with_layer_type(std::move(j), "tuneable_attention");
  j["tuneable_rank"] = rank > 0 ? rank : 3 * d;
  j["tuneable_form"] = form;
  return j;
}

// Qwen3-0.6B's dimensions (28 layers, 16 q / 8 kv heads of 128: G = 2), every layer R-GQA with
// one head kept per KV group.
inline nlohmann::json qwen3_0_6b_rgqa_config() { return with_routed_attention(io::qwen3_0_6b_config().raw, 1); }
// Qwen3-0.6B's dimensions, every layer Tuneable attention with r = 3 · 128 = 384 (folded).
inline nlohmann::json qwen3_0_6b_tuneable_config() { return with_tuneable_attention(io::qwen3_0_6b_config().raw, 384); }

inline void register_attention_variants(Registry& r) {
  register_routed_attention(r.mixers);
  register_tuneable_attention(r.mixers);
}

}  // namespace attnkit::model
