// attnkit/model/recipes/qwen3_5.hpp — Qwen3.5 / Qwen3-Next hybrids (spec §7; fixture
// qwen35-hybrid-tiny; transformers' Qwen3_5ForCausalLM and Qwen3NextForCausalLM): model_types
// "qwen3_5_text" and "qwen3_next" (recipe "qwen3.5").
//
// Layers are Gated DeltaNet ("linear_attention", mixers/gated_deltanet.hpp) or gated full
// attention ("gated_attention": Qwen3Attention whose q_proj also makes an output gate, q/k norm,
// partial rotary), as layer_types says; without layer_types, every full_attention_interval-th
// layer is full attention (transformers' rule). MLPs are dense SwiGLU; every RMSNorm of the model
// (pre-norms, final norm, q/k norms) is y = norm(x) · (1 + w), while the gated norm inside Gated
// DeltaNet uses w as stored. Qwen3-Next's MLPs are mixtures of experts: a qwen3_next config is
// accepted only when every layer's MLP is dense (num_experts 0, or every layer in
// mlp_only_layers), otherwise an error names the fields. Qwen3.5's M-RoPE keys
// (rope_parameters.mrope_section / mrope_interleaved) are consumed: with text only, the three
// position streams are the token position and M-RoPE is plain RoPE.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/mixers/gated_deltanet.hpp"
#include "attnkit/model/recipe.hpp"

namespace attnkit::model {

namespace detail_qwen3_5 {

// Qwen3-Next's MoE fields (transformers' Qwen3NextConfig defaults): refuse any sparse layer.
inline void require_dense_mlps(io::ConfigFields& f) {
  const auto& c = f.config();
  const std::int64_t experts = f.integer("num_experts", 512);
  const std::int64_t step = f.integer("decoder_sparse_step", 1);
  std::vector<std::int64_t> dense_only;
  const nlohmann::json& mol = f.json("mlp_only_layers");
  if (!mol.is_null()) {
    if (!mol.is_array()) f.fail("mlp_only_layers", "expected a list of layer indices, got ", mol.type_name());
    for (const auto& v : mol) {
      if (!v.is_number_integer()) f.fail("mlp_only_layers", "expected integer layer indices, got ", v.type_name());
      dense_only.push_back(v.get<std::int64_t>());
    }
  }
  // Settings of the experts, moot when no layer has any.
  for (const char* moot : {"num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                           "norm_topk_prob", "router_aux_loss_coef", "output_router_logits"})
    f.consume(moot);
  if (experts <= 0) return;
  if (step <= 0) f.fail("decoder_sparse_step", "must be positive when num_experts > 0, got ", step);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const bool listed = std::find(dense_only.begin(), dense_only.end(), l) != dense_only.end();
    if (!listed && (l + 1) % step == 0) {
      std::string list;
      for (auto i : dense_only) {
        if (!list.empty()) list += ", ";
        list += std::to_string(i);
      }
      f.fail("num_experts", "layer ", l, "'s MLP is a mixture of experts (num_experts ", experts, ", decoder_sparse_step ",
             step, ", mlp_only_layers [", list, "]); attnkit runs dense MLPs only, so a qwen3_next config must make every "
             "layer dense (num_experts 0, or every layer in mlp_only_layers)");
    }
  }
}

}  // namespace detail_qwen3_5

inline Plan qwen3_5_plan(io::ConfigFields& f) {
  const auto& c = f.config();
  read_gated_deltanet_settings(f);  // validates the fields up front
  if (c.model_type == "qwen3_next") detail_qwen3_5::require_dense_mlps(f);
  const bool gate = f.boolean("attn_output_gate", true);
  const std::string ssm = f.string("mamba_ssm_dtype", "float32");
  if (ssm != "float32")
    f.fail("mamba_ssm_dtype", "'", ssm, "' is not supported (attnkit keeps the recurrent state in float32)");
  for (const char* key : {"rope_parameters.mrope_section", "rope_parameters.mrope_interleaved"}) f.json(key);
  const std::int64_t interval = f.integer("full_attention_interval", 4);
  if (interval <= 0) f.fail("full_attention_interval", "must be positive, got ", interval);
  const bool listed = f.has("layer_types");  // else transformers' rule from full_attention_interval
  if (!listed && c.num_sliding_layers() > 0)
    f.fail("use_sliding_window", "Qwen3.5 / Qwen3-Next layers are linear or full attention, not sliding");
  Plan p;
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string type = listed ? c.layer_types[static_cast<std::size_t>(l)].name
                                    : ((l + 1) % interval == 0 ? "full_attention" : "linear_attention");
    if (type == "full_attention") p.mixers.push_back(gate ? "gated_attention" : "full_attention");
    else if (type == "linear_attention") p.mixers.push_back("linear_attention");
    else f.fail("layer_types", "entry ", l, " is '", type, "': Qwen3.5 layers are linear_attention or full_attention");
  }
  p.norm_weight_offset = 1.f;
  return p;
}

// A plain Qwen3 config.json made a Qwen3.5 hybrid: every 4th layer (3, 7, ...) gated full
// attention, the others Gated DeltaNet with as many key and value heads as the attention has
// query heads, of head_dim; partial rotary 0.25 like Qwen3.5.
inline nlohmann::json with_hybrid(nlohmann::json j) {
  j["model_type"] = "qwen3_5_text";
  const std::int64_t L = j.at("num_hidden_layers").get<std::int64_t>();
  const std::int64_t H = j.at("num_attention_heads").get<std::int64_t>();
  const std::int64_t d = j.contains("head_dim") ? j.at("head_dim").get<std::int64_t>()
                                                : j.at("hidden_size").get<std::int64_t>() / H;
  nlohmann::json types = nlohmann::json::array();
  for (std::int64_t l = 0; l < L; ++l) types.push_back((l + 1) % 4 == 0 ? "full_attention" : "linear_attention");
  j["layer_types"] = std::move(types);
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  j["linear_num_key_heads"] = H;
  j["linear_num_value_heads"] = H;
  j["linear_key_head_dim"] = d;
  j["linear_value_head_dim"] = d;
  j["linear_conv_kernel_dim"] = 4;
  j["partial_rotary_factor"] = 0.25;
  if (j.contains("rope_parameters") && j.at("rope_parameters").is_object()) j["rope_parameters"]["partial_rotary_factor"] = 0.25;
  return j;
}

// Qwen3-0.6B's dimensions as a hybrid: 28 layers, hidden 1024, intermediate 3072, 16 q / 8 kv
// heads of 128 in the full-attention layers 3, 7, ..., 27; Gated DeltaNet with 16 key / 16 value
// heads of 128 and conv 4 elsewhere; partial rotary 0.25; tied embeddings.
inline nlohmann::json hybrid_0_6b_config() { return with_hybrid(io::qwen3_0_6b_config().raw); }

inline void register_qwen3_5(Registry& r) {
  register_gated_deltanet(r.mixers);
  r.mixers.add("gated_attention", [](const BuildContext& c, int layer) {
    QKVProjection::Options po;
    po.output_gate = true;
    return std::make_unique<Qwen3Attention>(c, layer, 0, po);
  });
  r.add_recipe({"qwen3.5", {"qwen3_5_text", "qwen3_next"}, nullptr, qwen3_5_plan});
}

}  // namespace attnkit::model
