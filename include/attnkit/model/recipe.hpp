// attnkit/model/recipe.hpp — the recipe seam: from a config.json to the parts of a model.
//
// A Recipe looks at a config (its model_type and fields) and returns a Plan: which token mixer
// runs in each layer, which residual policy and stack policy wrap the layers, and the block
// shape (norms after the sublayers). Each named part is built by a factory from a Registry, with
// a BuildContext that holds the config and its extension fields, the weight source, and the
// number of passes the stack makes. Qwen3Model::load/compose pick the recipe whose model_types
// and matcher accept the config (recipes added later are tried first, so a user's recipe can
// override a built-in one).
//
// Adding a mechanism = one new file that registers its mixer / policy factories and, when it
// changes how a checkpoint is read, a recipe — nothing in the decoder changes. Users do the same
// from outside the library on their own Registry (start from default_registry()).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/io/config.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/residual.hpp"

namespace attnkit::model {

// Norms applied to a sublayer's output before the residual policy sees it, named by the suffix
// of the per-layer tensor ("input_layernorm_2" -> model.layers.{i}.input_layernorm_2.weight);
// empty: none. Ouro's sandwich norms use both.
struct BlockShape {
  std::string mixer_output_norm, mlp_output_norm;
};

struct Plan {
  std::vector<std::string> mixers;  // registry name per layer; empty: the config's layer_types
  std::string residual = "sum";
  std::string stack = "single";
  BlockShape block;
  // The model's RMSNorm weights (pre-norms, final norm, block output norms, q/k norms) are
  // stored as an offset from this value: 1 for Qwen3.5 / Qwen3-Next's y = norm(x) · (1 + w);
  // 0 (plain Qwen3) uses the weight as stored.
  float norm_weight_offset = 0.f;
};

using ResidualFactory = std::function<std::shared_ptr<const ResidualPolicy>(const BuildContext&)>;
using StackFactory = std::function<std::shared_ptr<const StackPolicy>(const BuildContext&)>;

struct Recipe {
  std::string name;
  std::vector<std::string> model_types;                 // config model_type values it serves
  std::function<bool(const io::Qwen3Config&)> matches;  // among those, whether it applies (null: always)
  std::function<Plan(io::ConfigFields&)> plan;          // reads (and so consumes) the fields it uses
};

class Registry {
 public:
  MixerRegistry mixers;

  void add_residual(std::string name, ResidualFactory f) { residuals_[std::move(name)] = std::move(f); }
  void add_stack(std::string name, StackFactory f) { stacks_[std::move(name)] = std::move(f); }
  void add_recipe(Recipe r) {
    ATTNKIT_REQUIRE(!r.name.empty() && r.plan && !r.model_types.empty(), "Registry::add_recipe: argument 'recipe': ",
                    "needs a name, a plan function and at least one model_type");
    recipes_.push_back(std::move(r));
  }

  const Recipe& recipe_for(const io::Qwen3Config& c) const {
    for (auto it = recipes_.rbegin(); it != recipes_.rend(); ++it) {
      bool serves = false;
      for (auto& t : it->model_types) serves = serves || t == c.model_type;
      if (serves && (!it->matches || it->matches(c))) return *it;
    }
    detail::throw_error(c.source, ": no recipe for model_type '", c.model_type, "' (recipes: ", list_recipes(), ")");
  }

  std::shared_ptr<const ResidualPolicy> residual(const std::string& name, const BuildContext& ctx) const {
    auto it = residuals_.find(name);
    ATTNKIT_REQUIRE(it != residuals_.end(), "Registry: no residual policy registered as '", name, "' (known: ",
                    keys(residuals_), ")");
    return it->second(ctx);
  }
  std::shared_ptr<const StackPolicy> stack(const std::string& name, const BuildContext& ctx) const {
    auto it = stacks_.find(name);
    ATTNKIT_REQUIRE(it != stacks_.end(), "Registry: no stack policy registered as '", name, "' (known: ", keys(stacks_),
                    ")");
    return it->second(ctx);
  }

  // Values config.json may carry: the model types the recipes serve, the layer types mixers serve.
  std::vector<std::string> model_types() const {
    std::vector<std::string> out;
    for (auto& r : recipes_)
      for (auto& t : r.model_types)
        if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
    return out;
  }
  std::vector<std::string> layer_types() const { return mixers.names(); }

  // Parses a config (JSON or file) accepting every model type and layer type registered here.
  io::Qwen3Config parse_config(const nlohmann::json& j, const std::string& source = "config.json") const {
    const auto mt = model_types(), lt = layer_types();
    const std::vector<std::string_view> mtv(mt.begin(), mt.end()), ltv(lt.begin(), lt.end());
    return io::Qwen3Config::from_json(j, source, mtv, ltv);
  }
  io::Qwen3Config load_config(const std::filesystem::path& file_or_dir) const {
    std::error_code ec;
    const auto file = std::filesystem::is_directory(file_or_dir, ec) ? file_or_dir / "config.json" : file_or_dir;
    return parse_config(io::read_json_file(file, "config file"), file.string());
  }

 private:
  template <class M>
  static std::string keys(const M& m) {
    std::string s;
    for (auto& [k, v] : m) s += (s.empty() ? "" : ", ") + k;
    return s.empty() ? "none" : s;
  }
  std::string list_recipes() const {
    std::string s;
    for (auto& r : recipes_) {
      s += (s.empty() ? "" : "; ") + r.name + " for";
      for (auto& t : r.model_types) s += " '" + t + "'";
    }
    return s.empty() ? "none" : s;
  }
  std::map<std::string, ResidualFactory> residuals_;
  std::map<std::string, StackFactory> stacks_;
  std::vector<Recipe> recipes_;
};

}  // namespace attnkit::model
