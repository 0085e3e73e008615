// attnkit/core/trace_tensor.hpp — one named float32 tensor of a mechanism's internals, as a
// model run records it (model/trace.hpp), a file stores it, and a picture draws it
// (viz/trace_plot.hpp): the data plus what a reader needs to understand the axes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace attnkit {

// A cell to point out in pictures (e.g. which source of a routing row is the partial): its index
// along every dimension except the token axis (the next-to-last one; the last of a 2-D
// [row, token] tensor), and a short label.
struct TraceMark {
  std::vector<std::int64_t> index;
  std::string label;
};

struct TraceTensor {
  std::string name;
  std::vector<std::int64_t> shape;  // row-major
  std::vector<float> data;
  // Optional axis names, one per dimension (e.g. {"layer", "token", "source"}).
  std::vector<std::string> dims = {};
  // Optional tick labels per dimension (empty inner vector: indices), e.g. {"attn", "mlp"}.
  std::vector<std::vector<std::string>> labels = {};
  std::vector<TraceMark> marks = {};
};

}  // namespace attnkit
