// attnkit/io/config.hpp — Qwen3 config.json parser (Hugging Face layout, old and new).
//
// Both layouts found in the wild are read (shared/spec/semantics.md §1.6, §1.7):
//  * older (transformers 4.x): top-level `rope_theta`, `rope_scaling`, `torch_dtype`; which layers
//    slide follows from `use_sliding_window`, `sliding_window`, `max_window_layers`: layer i
//    slides iff use_sliding_window && sliding_window != null && i >= max_window_layers.
//  * newer (transformers 5.x): `rope_parameters` {rope_theta, rope_type}, `dtype`, and
//    `layer_types`, which when present decides which layers slide.
// As in transformers, `sliding_window` counts only when `use_sliding_window` is true; a layer
// marked sliding without a positive window is an error (transformers would silently run it as
// full attention). Absent optional fields take the transformers Qwen3Config defaults; head_dim
// defaults to hidden_size / num_attention_heads and is otherwise independent of them.
// Partial rotary (`partial_rotary_factor`, top level and/or inside rope_parameters; they must
// agree) rotates the first int(head_dim · factor) dimensions of every head, as transformers'
// default RoPE does. Keys of rope_parameters the parser does not interpret (Qwen3.5's
// mrope_section, say) are not dropped: ConfigFields reports them as "rope_parameters.<key>"
// until a recipe consumes them.
//
// Anything unsupported is rejected with attnkit::Error "<source>: field '<name>': <problem>":
// unknown model_type, rope scaling other than "default", hidden_act other than silu,
// attention_bias, wrong JSON types, non-positive sizes, heads not divisible by kv heads.
// JSON type errors never escape as nlohmann exceptions.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"
#include "attnkit/io/json_file.hpp"

namespace attnkit::io {

// A layer type as config.json names it ("full_attention", "linear_attention", ...). The name
// travels unchanged to the model's mixer registry, which decides what runs; the constants are
// the two types plain Qwen3 knows.
struct LayerType {
  std::string name;
  static const LayerType full_attention, sliding_attention;
  friend bool operator==(const LayerType& a, const LayerType& b) { return a.name == b.name; }
};
inline const LayerType LayerType::full_attention{"full_attention"};
inline const LayerType LayerType::sliding_attention{"sliding_attention"};

inline const char* layer_type_name(const LayerType& t) { return t.name.c_str(); }

// model_type values from_json accepts by default; variants pass their own list.
inline constexpr std::string_view kQwen3ModelTypes[] = {"qwen3"};
// layer_types entries from_json accepts by default; a model loader passes its registry's names.
inline constexpr std::string_view kQwen3LayerTypes[] = {"full_attention", "sliding_attention"};

// Fields of config.json the Qwen3 parser interprets.
inline constexpr std::string_view kQwen3Fields[] = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "hidden_act", "attention_bias", "rope_parameters", "rope_theta", "rope_scaling", "dtype", "torch_dtype",
    "use_sliding_window", "sliding_window", "layer_types", "max_window_layers", "partial_rotary_factor"};
// Keys of rope_parameters the parser interprets; any other key is a field of its own for
// ConfigFields ("rope_parameters.<key>").
inline constexpr std::string_view kRopeParameterKeys[] = {"rope_theta", "rope_type", "partial_rotary_factor"};
// Fields that describe the file, training or generation, not the computation: never an error.
inline constexpr std::string_view kInertConfigFields[] = {
    "architectures", "auto_map", "_name_or_path", "attention_dropout", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "transformers_version", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "tokenizer_class", "_attn_implementation",
    "_attn_implementation_autoset", "keys_to_ignore_at_inference"};

struct Qwen3Config {
  std::string model_type = "qwen3";
  std::int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0,
               num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  double partial_rotary_factor = 1.0;          // share of each head's dimensions RoPE rotates
  std::int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  std::optional<std::int64_t> sliding_window;  // set only if any layer slides
  std::vector<LayerType> layer_types;          // resolved, one per layer
  std::string dtype = "float32";               // from "dtype" (new) or "torch_dtype" (old)
  nlohmann::json raw;                          // the whole file, for extensions (loop/attnres fields)
  std::string source = "config.json";          // where it came from (error messages)

  // model_types / layer_types: the accepted values of those fields (a model loader passes the
  // names its recipes and mixers know; anything else is an error listing them).
  static Qwen3Config from_json(const nlohmann::json& j, const std::string& source = "config.json",
                               std::span<const std::string_view> model_types = kQwen3ModelTypes,
                               std::span<const std::string_view> layer_types = kQwen3LayerTypes);
  // A config.json file, or a directory holding one.
  static Qwen3Config load(const std::filesystem::path& config_json_or_dir,
                          std::span<const std::string_view> model_types = kQwen3ModelTypes,
                          std::span<const std::string_view> layer_types = kQwen3LayerTypes);
  // Newer layout (rope_parameters, dtype, layer_types); fields of `raw` that the parser does not
  // interpret are kept, so extensions survive a round trip.
  nlohmann::json to_json() const;
  // Throws attnkit::Error "<source>: field '<name>': <problem>" on inconsistent values.
  void validate(const std::string& source = "Qwen3Config") const;

  // Dimensions of each q/k head that RoPE rotates (the first ones; transformers' int(d · factor)).
  std::int64_t rotary_dim() const { return static_cast<std::int64_t>(static_cast<double>(head_dim) * partial_rotary_factor); }

  std::int64_t num_sliding_layers() const {
    std::int64_t n = 0;
    for (auto t : layer_types) n += t == LayerType::sliding_attention;
    return n;
  }
};

namespace detail_config {

class Reader {
 public:
  Reader(const nlohmann::json& j, const std::string& source) : j_(j), src_(source) {}

  [[noreturn]] void fail(std::string_view field, auto&&... problem) const {
    detail::throw_error(src_, ": field '", field, "': ", problem...);
  }
  bool has(const char* f) const { return j_.contains(f); }
  bool present(const char* f) const { return j_.contains(f) && !j_.at(f).is_null(); }
  const nlohmann::json& at(const char* f) const {
    if (!j_.contains(f)) fail(f, "missing required field");
    return j_.at(f);
  }

  std::int64_t integer(const char* f) const { return as_integer(at(f), f); }
  std::int64_t integer(const char* f, std::int64_t def) const { return present(f) ? integer(f) : def; }
  std::int64_t as_integer(const nlohmann::json& v, std::string_view f) const {
    if (v.is_number_unsigned()) {
      if (v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX)) fail(f, "integer out of range");
      return static_cast<std::int64_t>(v.get<std::uint64_t>());
    }
    if (!v.is_number_integer()) fail(f, "expected an integer, got ", v.type_name());
    return v.get<std::int64_t>();
  }
  double number(const char* f, double def) const { return present(f) ? as_number(j_.at(f), f) : def; }
  double as_number(const nlohmann::json& v, std::string_view f) const {
    if (!v.is_number()) fail(f, "expected a number, got ", v.type_name());
    return v.get<double>();
  }
  bool boolean(const char* f, bool def) const {
    if (!present(f)) return def;
    const auto& v = j_.at(f);
    if (!v.is_boolean()) fail(f, "expected true or false, got ", v.type_name());
    return v.get<bool>();
  }
  std::string string(const char* f) const { return as_string(at(f), f); }
  std::string string(const char* f, std::string def) const { return present(f) ? string(f) : def; }
  std::string as_string(const nlohmann::json& v, std::string_view f) const {
    if (!v.is_string()) fail(f, "expected a string, got ", v.type_name());
    return v.get<std::string>();
  }

 private:
  const nlohmann::json& j_;
  const std::string& src_;
};

// Accepts a rope_type / rope_scaling type of "default" only.
inline void check_rope_type(const Reader& r, const nlohmann::json& v, std::string_view field) {
  const std::string type = r.as_string(v, field);
  if (type != "default") r.fail(field, "unsupported rope scaling '", type, "' (only \"default\" RoPE is implemented)");
}

}  // namespace detail_config

inline Qwen3Config Qwen3Config::from_json(const nlohmann::json& j, const std::string& source,
                                          std::span<const std::string_view> model_types,
                                          std::span<const std::string_view> layer_types) {
  if (!j.is_object()) detail::throw_error(source, ": config is not a JSON object (", j.type_name(), ")");
  try {
    const detail_config::Reader r(j, source);
    Qwen3Config c;
    c.raw = j;
    c.source = source;

    c.model_type = r.string("model_type");
    bool known = false;
    for (auto m : model_types) known = known || m == c.model_type;
    if (!known) {
      std::string list;
      for (auto m : model_types) list += (list.empty() ? "" : ", ") + std::string(m);
      r.fail("model_type", "unsupported model type '", c.model_type, "' (accepted: ", list, ")");
    }

    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.num_hidden_layers = r.integer("num_hidden_layers");
    if (c.num_hidden_layers <= 0) r.fail("num_hidden_layers", "must be positive, got ", c.num_hidden_layers);
    if (c.num_hidden_layers > 65536) r.fail("num_hidden_layers", "implausibly large (", c.num_hidden_layers, ")");
    c.num_attention_heads = r.integer("num_attention_heads");
    c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads);
    if (c.num_attention_heads <= 0) r.fail("num_attention_heads", "must be positive, got ", c.num_attention_heads);
    if (r.present("head_dim")) {
      c.head_dim = r.integer("head_dim");
    } else {
      if (c.hidden_size % c.num_attention_heads != 0)
        r.fail("head_dim", "absent and hidden_size ", c.hidden_size, " is not divisible by num_attention_heads ",
               c.num_attention_heads);
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
    c.max_position_embeddings = r.integer("max_position_embeddings", 32768);
    c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);

    const std::string act = r.string("hidden_act", "silu");
    if (act != "silu") r.fail("hidden_act", "unsupported activation '", act, "' (only silu)");
    if (r.boolean("attention_bias", false)) r.fail("attention_bias", "true is not supported (Qwen3 has no q/k/v bias)");

    // RoPE: newer rope_parameters wins over the older top-level fields.
    if (r.present("rope_parameters")) {
      const auto& rp = j.at("rope_parameters");
      if (!rp.is_object()) r.fail("rope_parameters", "expected an object, got ", rp.type_name());
      if (rp.contains("rope_type") && !rp.at("rope_type").is_null())
        detail_config::check_rope_type(r, rp.at("rope_type"), "rope_parameters.rope_type");
      c.rope_theta = rp.contains("rope_theta") ? r.as_number(rp.at("rope_theta"), "rope_parameters.rope_theta")
                                               : r.number("rope_theta", 10000.0);
    } else {
      c.rope_theta = r.number("rope_theta", 10000.0);
    }
    // Partial rotary: top level (older configs), inside rope_parameters (newer), or both alike.
    c.partial_rotary_factor = r.number("partial_rotary_factor", 1.0);
    if (r.present("rope_parameters") && j.at("rope_parameters").contains("partial_rotary_factor") &&
        !j.at("rope_parameters").at("partial_rotary_factor").is_null()) {
      const double inner =
          r.as_number(j.at("rope_parameters").at("partial_rotary_factor"), "rope_parameters.partial_rotary_factor");
      if (r.present("partial_rotary_factor") && inner != c.partial_rotary_factor)
        r.fail("partial_rotary_factor", c.partial_rotary_factor, " differs from rope_parameters.partial_rotary_factor ",
               inner);
      c.partial_rotary_factor = inner;
    }
    if (r.present("rope_scaling")) {
      const auto& rs = j.at("rope_scaling");
      if (!rs.is_object()) r.fail("rope_scaling", "expected an object or null, got ", rs.type_name());
      const char* key = rs.contains("rope_type") ? "rope_type" : rs.contains("type") ? "type" : nullptr;
      if (key == nullptr) r.fail("rope_scaling", "unsupported rope scaling without a type");
      detail_config::check_rope_type(r, rs.at(key), std::string("rope_scaling.") + key);
    }

    c.dtype = r.present("dtype") ? r.string("dtype") : r.string("torch_dtype", "float32");

    // Sliding window (transformers: sliding_window = None unless use_sliding_window).
    const bool use_sliding = r.boolean("use_sliding_window", false);
    std::optional<std::int64_t> window;
    if (!r.has("sliding_window")) window = 4096;  // transformers default
    else if (r.present("sliding_window")) window = r.integer("sliding_window");
    if (!use_sliding) window.reset();

    if (r.present("layer_types")) {
      const auto& lt = j.at("layer_types");
      if (!lt.is_array()) r.fail("layer_types", "expected an array, got ", lt.type_name());
      if (static_cast<std::int64_t>(lt.size()) != c.num_hidden_layers)
        r.fail("layer_types", "has ", lt.size(), " entries, num_hidden_layers is ", c.num_hidden_layers);
      for (std::size_t i = 0; i < lt.size(); ++i) {
        const std::string s = r.as_string(lt[i], "layer_types");
        bool ok = false;
        std::string known;
        for (auto name : layer_types) {
          ok = ok || name == s;
          known += (known.empty() ? "" : ", ") + std::string(name);
        }
        if (!ok) r.fail("layer_types", "entry ", i, " is '", s, "' (known layer types: ", known, ")");
        c.layer_types.push_back(LayerType{s});
      }
    } else {
      const std::int64_t max_window_layers = r.integer("max_window_layers", 28);
      for (std::int64_t i = 0; i < c.num_hidden_layers; ++i)
        c.layer_types.push_back(window && i >= max_window_layers ? LayerType::sliding_attention
                                                                  : LayerType::full_attention);
    }
    if (c.num_sliding_layers() > 0) {
      if (!window)
        r.fail("sliding_window", "layer_types has sliding layers but there is no window (use_sliding_window is ",
               use_sliding ? "true" : "false", ", sliding_window is ",
               r.present("sliding_window") ? "set" : "null", ")");
      c.sliding_window = window;
    }

    c.validate(source);
    return c;
  } catch (const nlohmann::json::exception& e) {
    // Defensive: every access above checks types first, so this path means a parser bug.
    detail::throw_error(source, ": malformed config: ", e.what());
  }
}

inline void Qwen3Config::validate(const std::string& source) const {
  auto fail = [&](std::string_view field, auto&&... problem) {
    detail::throw_error(source, ": field '", field, "': ", problem...);
  };
  const std::pair<const char*, std::int64_t> sizes[] = {
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"max_position_embeddings", max_position_embeddings}};
  for (const auto& [name, v] : sizes)
    if (v <= 0) fail(name, "must be positive, got ", v);
  if (num_attention_heads % num_key_value_heads != 0)
    fail("num_key_value_heads", "num_attention_heads ", num_attention_heads, " is not divisible by num_key_value_heads ",
         num_key_value_heads);
  if (!(rms_norm_eps > 0) || !std::isfinite(rms_norm_eps)) fail("rms_norm_eps", "must be positive, got ", rms_norm_eps);
  if (!(rope_theta > 0) || !std::isfinite(rope_theta)) fail("rope_theta", "must be positive, got ", rope_theta);
  if (!(partial_rotary_factor > 0 && partial_rotary_factor <= 1))
    fail("partial_rotary_factor", "must be in (0, 1], got ", partial_rotary_factor);
  if (rotary_dim() < 2 || rotary_dim() % 2 != 0)
    fail("partial_rotary_factor", partial_rotary_factor, " of head_dim ", head_dim, " gives ", rotary_dim(),
         " rotary dimensions; RoPE needs a positive even number");
  if (static_cast<std::int64_t>(layer_types.size()) != num_hidden_layers)
    fail("layer_types", "has ", layer_types.size(), " entries, num_hidden_layers is ", num_hidden_layers);
  if (sliding_window && *sliding_window <= 0) fail("sliding_window", "must be positive, got ", *sliding_window);
  if (num_sliding_layers() > 0 && !sliding_window) fail("sliding_window", "sliding layers need a window");
  if (num_sliding_layers() == 0 && sliding_window)
    fail("sliding_window", "is set but no layer slides (set only if some layer_types entry is sliding_attention)");
}

inline nlohmann::json Qwen3Config::to_json() const {
  nlohmann::json j = raw.is_object() ? raw : nlohmann::json::object();
  nlohmann::json rope = j.contains("rope_parameters") && j.at("rope_parameters").is_object() ? j.at("rope_parameters")
                                                                                           : nlohmann::json::object();
  for (const char* old_key : {"rope_theta", "rope_scaling", "torch_dtype", "partial_rotary_factor"}) j.erase(old_key);
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["rms_norm_eps"] = rms_norm_eps;
  rope["rope_theta"] = rope_theta;  // keys the parser does not interpret (mrope_section, ...) are kept
  rope["rope_type"] = "default";
  if (partial_rotary_factor != 1.0) rope["partial_rotary_factor"] = partial_rotary_factor;
  else rope.erase("partial_rotary_factor");
  j["rope_parameters"] = std::move(rope);
  j["max_position_embeddings"] = max_position_embeddings;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["use_sliding_window"] = sliding_window.has_value();
  j["sliding_window"] = sliding_window ? nlohmann::json(*sliding_window) : nlohmann::json(nullptr);
  nlohmann::json types = nlohmann::json::array();
  for (auto t : layer_types) types.push_back(layer_type_name(t));
  j["layer_types"] = std::move(types);
  j["dtype"] = dtype;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  return j;
}

inline Qwen3Config Qwen3Config::load(const std::filesystem::path& config_json_or_dir,
                                     std::span<const std::string_view> model_types,
                                     std::span<const std::string_view> layer_types) {
  std::error_code ec;
  const auto file = std::filesystem::is_directory(config_json_or_dir, ec) ? config_json_or_dir / "config.json"
                                                                          : config_json_or_dir;
  return from_json(read_json_file(file, "config file"), file.string(), model_types, layer_types);
}

// The fields of a config.json beyond what the Qwen3 parser interprets, read by the parts of a
// model that need them (a recipe, a mixer, a residual policy). Every read marks the field
// consumed; unconsumed() lists the fields nothing read, which a loader rejects: a field such as
// `loop_num` or `attnres_num_blocks` selects a mechanism, and running the checkpoint without it
// would give wrong numbers in silence. Errors name the file and the field. Keys of rope_parameters
// that the parser does not interpret are fields named "rope_parameters.<key>" (has() and json()
// take such names).
class ConfigFields {
 public:
  explicit ConfigFields(const Qwen3Config& c) : c_(c) {
    for (auto f : kQwen3Fields) used_.insert(std::string(f));
    for (auto f : kInertConfigFields) used_.insert(std::string(f));
  }
  const Qwen3Config& config() const { return c_; }
  // Present and not null ("parent.key" names a key of an object field).
  bool has(const std::string& f) const {
    const nlohmann::json* v = find(f);
    return v != nullptr && !v->is_null();
  }
  void consume(const std::string& f) { used_.insert(f); }
  std::int64_t integer(const std::string& f, std::int64_t def) { return consume(f), reader().integer(f.c_str(), def); }
  double number(const std::string& f, double def) { return consume(f), reader().number(f.c_str(), def); }
  bool boolean(const std::string& f, bool def) { return consume(f), reader().boolean(f.c_str(), def); }
  std::string string(const std::string& f, std::string def) { return consume(f), reader().string(f.c_str(), std::move(def)); }
  // The raw value (null when absent), for structured fields.
  const nlohmann::json& json(const std::string& f) {
    static const nlohmann::json null;
    consume(f);
    return has(f) ? *find(f) : null;
  }
  [[noreturn]] void fail(std::string_view field, auto&&... problem) const { reader().fail(field, problem...); }
  std::vector<std::string> unconsumed() const {
    std::vector<std::string> out;
    if (c_.raw.is_object())
      for (const auto& [k, v] : c_.raw.items())
        if (!used_.count(k)) out.push_back(k);
    if (c_.raw.is_object() && c_.raw.contains("rope_parameters") && c_.raw.at("rope_parameters").is_object())
      for (const auto& [k, v] : c_.raw.at("rope_parameters").items()) {
        bool interpreted = false;
        for (auto known : kRopeParameterKeys) interpreted = interpreted || known == k;
        std::string name = "rope_parameters.";
        name += k;
        if (!interpreted && !used_.count(name)) out.push_back(name);
      }
    return out;
  }

 private:
  const nlohmann::json* find(const std::string& f) const {
    if (!c_.raw.is_object()) return nullptr;
    if (c_.raw.contains(f)) return &c_.raw.at(f);
    const auto dot = f.find('.');
    if (dot == std::string::npos) return nullptr;
    const std::string parent = f.substr(0, dot), key = f.substr(dot + 1);
    if (!c_.raw.contains(parent) || !c_.raw.at(parent).is_object() || !c_.raw.at(parent).contains(key)) return nullptr;
    return &c_.raw.at(parent).at(key);
  }
  detail_config::Reader reader() const { return detail_config::Reader(c_.raw, c_.source); }
  const Qwen3Config& c_;
  std::set<std::string> used_;
};

// The published Qwen/Qwen3-0.6B config.json (older layout, as released).
inline Qwen3Config qwen3_0_6b_config() {
  const nlohmann::json j = {
      {"architectures", nlohmann::json::array({"Qwen3ForCausalLM"})},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"bos_token_id", 151643},
      {"eos_token_id", 151645},
      {"head_dim", 128},
      {"hidden_act", "silu"},
      {"hidden_size", 1024},
      {"initializer_range", 0.02},
      {"intermediate_size", 3072},
      {"max_position_embeddings", 40960},
      {"max_window_layers", 28},
      {"model_type", "qwen3"},
      {"num_attention_heads", 16},
      {"num_hidden_layers", 28},
      {"num_key_value_heads", 8},
      {"rms_norm_eps", 1e-06},
      {"rope_scaling", nullptr},
      {"rope_theta", 1000000},
      {"sliding_window", nullptr},
      {"tie_word_embeddings", true},
      {"torch_dtype", "bfloat16"},
      {"transformers_version", "4.51.0"},
      {"use_cache", true},
      {"use_sliding_window", false},
      {"vocab_size", 151936}};
  return Qwen3Config::from_json(j, "Qwen/Qwen3-0.6B config.json");
}

}  // namespace attnkit::io
