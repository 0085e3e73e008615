// compare_tensors A.safetensors:NAME B.safetensors:NAME BOUND [ROWS]
// Prints the relative L2 error ||A - B|| / ||B|| of two float tensors of the same shape and
// exits 0 iff it is <= BOUND. With ROWS, only the first ROWS rows of B are compared (B may hold
// more rows, e.g. a reference that also covers generated tokens). Used by the example's tests.
#include <cstdio>
#include <string>

#include "attnkit/io/safetensors.hpp"
#include "test_util.hpp"

using namespace attnkit;

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: compare_tensors A.safetensors:NAME B.safetensors:NAME BOUND [ROWS]\n");
    return 2;
  }
  try {
    auto open = [](const std::string& spec) {
      const auto c = spec.rfind(':');
      if (c == std::string::npos) throw Error("expected FILE:TENSOR, got '" + spec + "'");
      return std::make_pair(io::SafetensorsFile::open(spec.substr(0, c)), spec.substr(c + 1));
    };
    auto [fa, na] = open(argv[1]);
    auto [fb, nb] = open(argv[2]);
    const auto a = io::to_f32(fa.tensor(na)), b = io::to_f32(fb.tensor(nb));
    const double bound = std::stod(argv[3]);
    std::size_t n = b.size();
    if (argc == 5) {
      const auto& tb = fb.tensor(nb);
      const std::size_t row = tb.shape.empty() ? 1 : b.size() / static_cast<std::size_t>(tb.shape[0]);
      n = static_cast<std::size_t>(std::stoll(argv[4])) * row;
    }
    if (a.size() != n || n > b.size()) {
      std::fprintf(stderr, "compare_tensors: sizes differ: %zu vs %zu\n", a.size(), n);
      return 1;
    }
    const double rel = test::rel_l2(a.data(), b.data(), n);  // +inf if anything is not finite
    std::printf("relative L2 error %.3e (bound %.1e)\n", rel, bound);
    return rel <= bound ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_tensors: %s\n", e.what());
    return 1;
  }
}
