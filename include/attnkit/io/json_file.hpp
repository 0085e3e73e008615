// attnkit/io/json_file.hpp — reads a JSON file (config.json, a sharded checkpoint's index) with
// errors that name the file: "<file>: cannot open <kind>", "<file>: <kind> is not valid JSON: ...".
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "attnkit/core/error.hpp"

namespace attnkit::io {

inline nlohmann::json read_json_file(const std::filesystem::path& file, const char* kind) {
  const std::string name = file.string();
  std::ifstream in(file, std::ios::binary);
  ATTNKIT_REQUIRE(in.good(), name, ": cannot open ", kind);
  std::ostringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    detail::throw_error(name, ": ", kind, " is not valid JSON: ", e.what());
  }
}

}  // namespace attnkit::io
