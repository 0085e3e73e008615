// attnkit/model/trace.hpp — what a mechanism computed inside, for researchers to look at.
//
// Mixers and policies record named per-layer rows while a session runs (Loop Attention's gates
// [T, heads] per layer; later: routing weights, exit probabilities). The trace lays them out as
// one tensor per name, [layers, tokens, width], over every token it has seen, whether the tokens
// came in one prefill, in chunks or one at a time. Recording is opt-in (ForwardOptions::trace);
// a null trace costs nothing.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit::model {

class Trace {
 public:
  struct Tensor {
    std::string name;
    std::vector<std::int64_t> shape;  // [layers, tokens, width]
    std::vector<float> data;
  };

  // Rows [T, width] of `name` for `layer`, for the tokens at positions pos0 .. pos0+T-1. A later
  // record of the same (name, layer, position) replaces the earlier one.
  void record(const std::string& name, int layer, std::int64_t pos0, ConstView2<float> rows) {
    ATTNKIT_REQUIRE(layer >= 0 && pos0 >= 0, "Trace::record: '", name, "': negative layer or position");
    Series& s = series_[name];
    const std::int64_t width = rows.shape[1];
    ATTNKIT_REQUIRE(s.width < 0 || s.width == width, "Trace::record: '", name, "': width ", width,
                    " differs from the earlier ", s.width);
    s.width = width;
    auto& per_layer = s.layers[layer];
    for (std::int64_t t = 0; t < rows.shape[0]; ++t) {
      std::vector<float>& row = per_layer[pos0 + t];
      row.assign(rows.ptr(t), rows.ptr(t) + width);
    }
  }

  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (auto& [k, s] : series_) n.push_back(k);
    return n;
  }
  bool empty() const { return series_.empty(); }

  // [layers, tokens, width]: layers 0 .. the highest recorded, tokens from position 0 to the
  // latest recorded; anything never recorded (a layer without the mechanism) is NaN.
  Tensor tensor(const std::string& name) const {
    auto it = series_.find(name);
    ATTNKIT_REQUIRE(it != series_.end(), "Trace::tensor: nothing recorded under '", name, "'");
    const Series& s = it->second;
    std::int64_t L = 0, T = 0;
    for (auto& [layer, rows] : s.layers) {
      L = std::max<std::int64_t>(L, layer + 1);
      if (!rows.empty()) T = std::max<std::int64_t>(T, rows.rbegin()->first + 1);
    }
    Tensor out{name, {L, T, s.width}, std::vector<float>(static_cast<std::size_t>(L * T * s.width),
                                                         std::numeric_limits<float>::quiet_NaN())};
    for (auto& [layer, rows] : s.layers)
      for (auto& [pos, row] : rows) std::copy(row.begin(), row.end(), out.data.begin() + (layer * T + pos) * s.width);
    return out;
  }

  void clear() { series_.clear(); }

 private:
  struct Series {
    std::int64_t width = -1;
    std::map<int, std::map<std::int64_t, std::vector<float>>> layers;
  };
  std::map<std::string, Series> series_;
};

}  // namespace attnkit::model
