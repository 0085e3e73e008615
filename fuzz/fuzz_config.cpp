// libFuzzer target: arbitrary JSON as a Qwen3 config.json. from_json must either succeed or throw
// attnkit::Error (never a nlohmann exception), and an accepted config must survive
// to_json -> from_json unchanged.
#include <cstddef>
#include <cstdint>

#include "attnkit/io/config.hpp"

using namespace attnkit::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;  // not JSON: the file reader's business, not the config parser's
  }
  constexpr std::string_view types[] = {"qwen3", "qwen3_variant"};
  try {
    const auto c = Qwen3Config::from_json(j, "fuzz.json", types);
    const auto back = Qwen3Config::from_json(c.to_json(), "roundtrip.json", types);
    const bool same = back.model_type == c.model_type && back.vocab_size == c.vocab_size &&
                      back.hidden_size == c.hidden_size && back.intermediate_size == c.intermediate_size &&
                      back.num_hidden_layers == c.num_hidden_layers &&
                      back.num_attention_heads == c.num_attention_heads &&
                      back.num_key_value_heads == c.num_key_value_heads && back.head_dim == c.head_dim &&
                      back.rms_norm_eps == c.rms_norm_eps && back.rope_theta == c.rope_theta &&
                      back.max_position_embeddings == c.max_position_embeddings &&
                      back.tie_word_embeddings == c.tie_word_embeddings && back.sliding_window == c.sliding_window &&
                      back.layer_types == c.layer_types && back.dtype == c.dtype;
    if (!same) __builtin_trap();
  } catch (const attnkit::Error&) {
  }
  return 0;
}
