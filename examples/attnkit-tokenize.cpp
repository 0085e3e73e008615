// attnkit-tokenize — a Hugging Face tokenizer.json on the command line (attnkit::text).
//
//   attnkit-tokenize --tokenizer tokenizer.json [FILE]           text (FILE or stdin) -> ids, one line
//   attnkit-tokenize --tokenizer tokenizer.json --json [FILE]    ids as a JSON array
//   attnkit-tokenize --tokenizer tokenizer.json --decode [FILE]  ids (spaces, commas or a JSON array) -> text
//   attnkit-tokenize --tokenizer tokenizer.json --bench N [FILE] encode N times on one thread: MB/s
//
// Scripts and tests compare tokenizers through it (tests/reference/tokenizer/compare.js). Exit
// code 2 for usage errors, 1 for bad input (a missing file, text that is not UTF-8, a bad id).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "attnkit/text/tokenizer.hpp"

using namespace attnkit;

namespace {

const char* kUsage = R"(usage: attnkit-tokenize --tokenizer tokenizer.json [options] [FILE]
  FILE                 text to encode, or ids to decode (default: stdin)
  --json               print the ids as a JSON array (default: one line, separated by spaces)
  --decode             read ids (separated by spaces, commas or newlines, or a JSON array) and print the text
  --skip-special       with --decode: leave special tokens out
  --no-special         encode special tokens written in the text as plain text
  --lossy              read bytes that are not UTF-8 as U+FFFD instead of failing
  --bench N            encode the input N times on one thread; print MB/s (median)
  --help
)";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "attnkit-tokenize: error: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "attnkit-tokenize: error: %s\n", msg.c_str());
  std::exit(1);
}

std::string read_input(const std::string& file) {
  if (file.empty() || file == "-") return std::string(std::istreambuf_iterator<char>(std::cin), {});
  std::ifstream in(file, std::ios::binary);
  if (!in) die("cannot open input file '" + file + "'");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<text::TokenId> parse_ids(const std::string& s) {
  std::vector<text::TokenId> ids;
  std::size_t i = 0, n = s.size();
  auto sep = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == ',' || c == '[' || c == ']'; };
  while (i < n) {
    if (sep(s[i])) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < n && !sep(s[j])) ++j;
    const std::string tok = s.substr(i, j - i);
    std::size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(tok, &used);
    } catch (...) {
      used = 0;
    }
    if (used != tok.size() || v < 0) die("--decode: not a token id: '" + tok + "'");
    ids.push_back(v);
    i = j;
  }
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  std::string tokenizer_path, file;
  bool json = false, decode = false, skip_special = false;
  text::EncodeOptions eo;
  long long bench = 0;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) usage_error(a + ": missing value");
      return args[++i];
    };
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--tokenizer") tokenizer_path = value();
    else if (a == "--json") json = true;
    else if (a == "--decode") decode = true;
    else if (a == "--skip-special") skip_special = true;
    else if (a == "--no-special") eo.parse_special = false;
    else if (a == "--lossy") eo.lossy_utf8 = true;
    else if (a == "--bench") {
      const std::string v = value();
      std::size_t used = 0;
      try {
        bench = std::stoll(v, &used);
      } catch (...) {
        used = 0;
      }
      if (used != v.size() || bench < 1) usage_error("--bench: expected a count >= 1, got '" + v + "'");
    } else if (!a.empty() && a[0] == '-' && a != "-") usage_error("unknown option '" + a + "'");
    else if (file.empty()) file = a;
    else usage_error("more than one input file ('" + file + "', '" + a + "')");
  }
  if (tokenizer_path.empty()) usage_error("--tokenizer FILE is required");
  if (decode && bench > 0) usage_error("--decode and --bench exclude each other");
  if (skip_special && !decode) usage_error("--skip-special needs --decode");

  try {
    const text::Tokenizer tok = text::Tokenizer::from_file(tokenizer_path);
    const std::string input = read_input(file);
    if (decode) {
      const std::string out = tok.decode(parse_ids(input), skip_special);
      std::fwrite(out.data(), 1, out.size(), stdout);
      return 0;
    }
    if (bench > 0) {
      std::vector<double> secs;
      std::size_t tokens = 0;
      for (long long r = 0; r < bench; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        tokens = tok.encode(input, eo).size();
        secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(secs.begin(), secs.end());
      const double med = secs[secs.size() / 2];
      std::printf("encode: %.2f MB/s (%zu bytes, %zu tokens, median of %lld)\n", input.size() / med / 1e6, input.size(),
                  tokens, bench);
      return 0;
    }
    const std::vector<text::TokenId> ids = tok.encode(input, eo);
    std::string out;
    out.reserve(ids.size() * 7 + 2);
    out += json ? "[" : "";
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (i) out += json ? "," : " ";
      out += std::to_string(ids[i]);
    }
    out += json ? "]\n" : "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
  } catch (const std::exception& e) {
    die(e.what());
  }
  return 0;
}
