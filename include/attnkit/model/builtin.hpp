// attnkit/model/builtin.hpp — the registry of every mechanism attnkit ships: one line each.
#pragma once

#include "attnkit/model/recipe.hpp"
#include "attnkit/model/recipes/attention_variants.hpp"
#include "attnkit/model/recipes/attnres.hpp"
#include "attnkit/model/recipes/loop.hpp"
#include "attnkit/model/recipes/lt2.hpp"
#include "attnkit/model/recipes/ouro.hpp"
#include "attnkit/model/recipes/qwen3.hpp"
#include "attnkit/model/recipes/qwen3_5.hpp"

namespace attnkit::model {

// A fresh registry with the built-in mixers, policies and recipes; add your own to it and pass
// it in LoadOptions::registry.
inline Registry default_registry() {
  Registry r;
  register_qwen3(r);
  register_loop_attention(r);
  register_attention_residuals(r);
  register_looped_stacks(r);
  register_qwen3_5(r);
  register_lt2(r);
  register_attention_variants(r);
  return r;
}

}  // namespace attnkit::model
