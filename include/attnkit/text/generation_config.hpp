// attnkit/text/generation_config.hpp — a checkpoint's generation_config.json.
//
// Contract: reads the fields that decide how text is generated: eos_token_id (an integer or a
// list), bos_token_id, pad_token_id, do_sample, temperature, top_k, top_p, min_p,
// repetition_penalty, plus the inert transformers_version and _from_model_config. A null value
// counts as absent. Any other field is an attnkit::Error naming the file and the field (as
// config.json's unconsumed fields are): a setting such as num_beams or no_repeat_ngram_size
// would otherwise be dropped in silence; a caller may pass on_unknown to be warned instead.
// Values out of range are errors of the form "<file>: field '<name>': <problem>".
// sampler_options() maps the file to SamplerOptions as transformers would generate: do_sample
// false or absent is greedy (temperature 0; the repetition penalty still applies); absent
// sampling fields take transformers' GenerationConfig defaults (temperature 1, top_k 50,
// top_p 1, min_p off, repetition_penalty 1).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"
#include "attnkit/io/config.hpp"
#include "attnkit/io/json_file.hpp"
#include "attnkit/text/sampler.hpp"

namespace attnkit::text {

inline constexpr std::string_view kGenerationConfigFields[] = {
    "eos_token_id", "bos_token_id", "pad_token_id", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "transformers_version", "_from_model_config"};

struct GenerationConfig {
  std::vector<std::int64_t> eos_token_ids;
  std::optional<std::int64_t> bos_token_id, pad_token_id;
  std::optional<bool> do_sample;
  std::optional<double> temperature, top_p, min_p, repetition_penalty;
  std::optional<std::int64_t> top_k;
  std::string transformers_version;
  std::string source = "generation_config.json";

  // on_unknown: called with a message per field outside kGenerationConfigFields; null: error.
  static GenerationConfig from_json(const nlohmann::json& j, const std::string& source = "generation_config.json",
                                    const std::function<void(const std::string&)>& on_unknown = nullptr) {
    if (!j.is_object()) attnkit::detail::throw_error(source, ": generation config is not a JSON object (", j.type_name(), ")");
    const io::detail_config::Reader r(j, source);
    for (const auto& [k, v] : j.items()) {
      bool known = false;
      for (auto f : kGenerationConfigFields) known = known || f == k;
      if (known) continue;
      const std::string msg = source + ": field '" + k + "': not supported (attnkit reads eos_token_id, bos_token_id, "
                              "pad_token_id, do_sample, temperature, top_k, top_p, min_p, repetition_penalty)";
      if (!on_unknown) throw Error(msg);
      on_unknown(msg);
    }
    GenerationConfig g;
    g.source = source;
    if (r.present("eos_token_id")) {
      const auto& e = j.at("eos_token_id");
      if (e.is_array()) {
        for (const auto& v : e) g.eos_token_ids.push_back(r.as_integer(v, "eos_token_id"));
      } else {
        g.eos_token_ids.push_back(r.as_integer(e, "eos_token_id"));
      }
      for (auto id : g.eos_token_ids)
        if (id < 0) r.fail("eos_token_id", "token ids must be >= 0, got ", id);
    }
    auto id_field = [&](const char* f) -> std::optional<std::int64_t> {
      if (!r.present(f)) return std::nullopt;
      const std::int64_t id = r.integer(f);
      if (id < 0) r.fail(f, "must be >= 0, got ", id);
      return id;
    };
    g.bos_token_id = id_field("bos_token_id");
    g.pad_token_id = id_field("pad_token_id");
    if (r.present("do_sample")) g.do_sample = r.boolean("do_sample", false);
    auto number = [&](const char* f) -> std::optional<double> {
      if (!r.present(f)) return std::nullopt;
      return r.number(f, 0.0);
    };
    g.temperature = number("temperature");
    g.top_p = number("top_p");
    g.min_p = number("min_p");
    g.repetition_penalty = number("repetition_penalty");
    if (r.present("top_k")) g.top_k = r.integer("top_k");
    g.transformers_version = r.string("transformers_version", "");
    if (r.present("_from_model_config")) r.boolean("_from_model_config", false);  // type check only
    if (g.temperature && !(*g.temperature >= 0)) r.fail("temperature", "must be >= 0, got ", *g.temperature);
    if (g.top_k && *g.top_k < 0) r.fail("top_k", "must be >= 0, got ", *g.top_k);
    if (g.top_p && !(*g.top_p > 0 && *g.top_p <= 1)) r.fail("top_p", "must be in (0, 1], got ", *g.top_p);
    if (g.min_p && !(*g.min_p >= 0 && *g.min_p <= 1)) r.fail("min_p", "must be in [0, 1], got ", *g.min_p);
    if (g.repetition_penalty && !(*g.repetition_penalty > 0))
      r.fail("repetition_penalty", "must be > 0, got ", *g.repetition_penalty);
    return g;
  }

  // A generation_config.json file, or a directory holding one.
  static GenerationConfig load(const std::filesystem::path& file_or_dir,
                               const std::function<void(const std::string&)>& on_unknown = nullptr) {
    std::error_code ec;
    const auto file = std::filesystem::is_directory(file_or_dir, ec) ? file_or_dir / "generation_config.json" : file_or_dir;
    return from_json(io::read_json_file(file, "generation config"), file.string(), on_unknown);
  }

  // Sampling as transformers' generate() would do it with this file (see the contract).
  SamplerOptions sampler_options() const {
    SamplerOptions o;
    o.temperature = do_sample.value_or(false) ? temperature.value_or(1.0) : 0.0;
    o.top_k = top_k.value_or(50);
    o.top_p = top_p.value_or(1.0);
    o.min_p = min_p.value_or(0.0);
    o.repeat_penalty = repetition_penalty.value_or(1.0);
    return o;
  }
};

}  // namespace attnkit::text
