// libFuzzer target: arbitrary JSON as a config.json through the recipe registry, every model type
// (qwen3, Loop Attention, Attention Residuals, Ouro, Qwen3.5 / Qwen3-Next, LT2, R-GQA, Tuneable,
// loop_count). parse_config must accept or throw attnkit::Error (never a nlohmann exception or a
// crash); an accepted config that is small enough is composed into a model with random weights
// (which validates the recipe's fields and the tensor shapes) and runs a prefill and a decode step
// under a session memory limit.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/model/builtin.hpp"
#include "attnkit/model/qwen3.hpp"

using namespace attnkit;

namespace {

const model::Registry& registry() {
  static const model::Registry r = model::default_registry();
  return r;
}

// Keys whose values may be large without making the model large.
bool unbounded(const std::string& key) {
  return key == "max_position_embeddings" || key == "sliding_window" || key == "loop_window_size" ||
         key == "rope_theta" || key == "bos_token_id" || key == "eos_token_id" || key == "pad_token_id" ||
         key == "max_window_layers" || key == "window_size";
}

// The largest value a key may have for the model to be built: the vocabulary and the MLP may be
// a few hundred wide, every other size (heads, dims, loops, blocks, top-k) small.
std::int64_t cap_of(const std::string& key) {
  if (key == "vocab_size" || key == "intermediate_size") return 512;
  if (key == "hidden_size") return 128;
  return 64;
}

// Every integer of the config (nested too) within its key's cap, except the keys above.
bool small(const nlohmann::json& j, const std::string& key = "") {
  if (j.is_number_unsigned()) return unbounded(key) || j.get<std::uint64_t>() <= static_cast<std::uint64_t>(cap_of(key));
  if (j.is_number_integer()) return unbounded(key) || (j.get<std::int64_t>() >= -64 && j.get<std::int64_t>() <= cap_of(key));
  if (j.is_array()) {
    if (j.size() > 64) return false;
    for (const auto& e : j)
      if (!small(e, key)) return false;
  }
  if (j.is_object())
    for (const auto& [k, v] : j.items())
      if (!small(v, k)) return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;  // not JSON: the file reader's business
  }
  try {
    const io::Qwen3Config c = registry().parse_config(j, "fuzz.json");
    // Build only what runs in milliseconds.
    if (!small(j) || c.num_hidden_layers > 6 || c.num_attention_heads * c.head_dim > 512) return 0;
    const auto m = model::Qwen3Model::random(c, model::WeightType::f32, 1, &registry());
    if (m.passes() > 4) return 0;
    model::SessionLimits lim;
    lim.max_memory_bytes = std::uint64_t{64} << 20;
    lim.allow_beyond_max_positions = true;
    auto s = m.new_session({}, lim);
    const std::int64_t V = m.config().vocab_size, T = 5;
    std::vector<std::int64_t> ids(T);
    for (std::int64_t t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = (t * 7 + 1) % V;
    std::vector<float> logits(static_cast<std::size_t>(V));
    model::ForwardOptions fo;
    fo.logits = model::LogitsRows::last;
    fo.num_threads = 1;
    m.forward(s, std::span<const std::int64_t>(ids.data(), 4), View2<float>(logits.data(), {1, V}), fo);
    m.forward(s, std::span<const std::int64_t>(ids.data() + 4, 1), View2<float>(logits.data(), {1, V}), fo);
  } catch (const attnkit::Error&) {
  }
  return 0;
}
