// compare_tensors A.safetensors:NAME B.safetensors:NAME BOUND [ROWS]
// Prints the relative L2 error ||A - B|| / ||B|| of two float tensors of the same shape and
// exits 0 iff it is <= BOUND. With ROWS, only the first ROWS rows of B are compared (B may hold
// more rows, e.g. a reference that also covers generated tokens). Used by the example's tests.
// An infinity of B (e.g. a masked score) must be the same infinity in A; the finite rest is
// compared as above. Integer tensors (I64, I32; both must be) must be equal entry for entry,
// whatever BOUND says.
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

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
    const auto &ta = fa.tensor(na), &tb = fb.tensor(nb);
    const double bound = std::stod(argv[3]);
    // The number of entries compared; nullopt (after a message) if the sizes differ.
    auto compared = [&](std::size_t size_a, std::size_t size_b) -> std::optional<std::size_t> {
      std::size_t n = size_b;
      if (argc == 5) {
        const std::size_t row = tb.shape.empty() ? 1 : size_b / static_cast<std::size_t>(tb.shape[0]);
        n = static_cast<std::size_t>(std::stoll(argv[4])) * row;
      }
      if (size_a != n || n > size_b) {
        std::fprintf(stderr, "compare_tensors: sizes differ: %zu vs %zu\n", size_a, n);
        return std::nullopt;
      }
      return n;
    };
    const bool int_a = !io::is_float_dtype(ta.dtype), int_b = !io::is_float_dtype(tb.dtype);
    if (int_a || int_b) {
      if (!(int_a && int_b))
        throw Error(std::string("an integer tensor against a float one (") + io::dtype_name(ta.dtype) + " vs " +
                    io::dtype_name(tb.dtype) + ")");
      const auto a = io::to_i64(ta), b = io::to_i64(tb);
      const auto count = compared(a.size(), b.size());
      if (!count) return 1;
      const std::size_t n = *count;
      std::size_t bad = 0, first = 0;
      for (std::size_t i = 0; i < n; ++i)
        if (a[i] != b[i] && bad++ == 0) first = i;
      if (bad == 0) {
        std::printf("integer tensors identical (%zu entries)\n", n);
        return 0;
      }
      std::printf("integer tensors: %zu of %zu entries differ (first: entry %zu, %lld vs %lld)\n", bad, n, first,
                  static_cast<long long>(a[first]), static_cast<long long>(b[first]));
      return 1;
    }
    const auto a = io::to_f32(ta), b = io::to_f32(tb);
    const auto count = compared(a.size(), b.size());
    if (!count) return 1;
    const std::size_t n = *count;
    std::vector<float> fa_finite, fb_finite;  // where B is finite
    std::size_t infinities = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (std::isinf(b[i])) {
        if (a[i] != b[i]) {
          std::printf("entry %zu: %g where the reference has %g\n", i, static_cast<double>(a[i]), static_cast<double>(b[i]));
          return 1;
        }
        ++infinities;
        continue;
      }
      fa_finite.push_back(a[i]);
      fb_finite.push_back(b[i]);
    }
    if (infinities) std::printf("%zu infinities match; ", infinities);
    const double rel = test::rel_l2(fa_finite, fb_finite);  // +inf if anything else is not finite
    std::printf("relative L2 error %.3e (bound %.1e)\n", rel, bound);
    return rel <= bound ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_tensors: %s\n", e.what());
    return 1;
  }
}
