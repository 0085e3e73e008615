// libFuzzer target: arbitrary JSON as a tokenizer.json. from_json must either succeed or throw
// attnkit::Error (never a nlohmann exception, a crash or a huge allocation); an accepted
// tokenizer must encode a fixed text and decode its ids without failing.
#include <cstddef>
#include <cstdint>

#include "attnkit/text/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;  // not JSON: the file reader's business
  }
  try {
    const auto tok = attnkit::text::Tokenizer::from_json(j, "fuzz.json");
    const auto ids = tok.encode("Hello, w\xC3\xB6rld! 123  <|im_end|>\n\xE4\xBD\xA0\xE5\xA5\xBD");
    tok.decode(ids);
  } catch (const attnkit::Error&) {
  }
  return 0;
}
