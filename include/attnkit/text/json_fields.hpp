// attnkit/text/json_fields.hpp — strict reads of tokenizer.json objects: a field nothing reads
// is an error naming it (a tokenizer that silently ignored a setting would encode differently
// from its reference without a word).
#pragma once

#include <initializer_list>
#include <string>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"

namespace attnkit::text::detail::json {

inline const nlohmann::json& field(const nlohmann::json& j, const std::string& where, const char* key) {
  ATTNKIT_REQUIRE(j.is_object(), where, ": expected an object");
  const auto it = j.find(key);
  ATTNKIT_REQUIRE(it != j.end(), where, ": missing field '", key, "'");
  return *it;
}

inline std::string type_of(const nlohmann::json& j, const std::string& where) {
  const auto& t = field(j, where, "type");
  ATTNKIT_REQUIRE(t.is_string(), where, ".type: expected a string");
  return t.get<std::string>();
}

// Every field of j must be one of `known`.
inline void only_fields(const nlohmann::json& j, const std::string& where, std::initializer_list<const char*> known) {
  ATTNKIT_REQUIRE(j.is_object(), where, ": expected an object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool ok = false;
    for (const char* k : known) ok |= it.key() == k;
    ATTNKIT_REQUIRE(ok, where, ": field '", it.key(), "' is not supported");
  }
}

inline bool boolean(const nlohmann::json& j, const std::string& where, const char* key, bool fallback) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  ATTNKIT_REQUIRE(it->is_boolean(), where, ".", key, ": expected true or false");
  return it->get<bool>();
}

inline std::string string_or(const nlohmann::json& j, const std::string& where, const char* key, const std::string& fallback) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  ATTNKIT_REQUIRE(it->is_string(), where, ".", key, ": expected a string");
  return it->get<std::string>();
}

}  // namespace attnkit::text::detail::json
