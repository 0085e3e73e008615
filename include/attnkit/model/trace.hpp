// attnkit/model/trace.hpp — what a mechanism computed inside, for researchers to look at.
//
// Mixers and policies record named per-layer rows while a session runs (Loop Attention's gates
// [T, heads] per layer; Attention Residuals' routing weights per layer and sublayer; later: exit
// probabilities). The trace lays them out as one tensor per name over every token it has seen,
// whether the tokens came in one prefill, in chunks or one at a time:
//   record(name, layer, pos0, rows)        -> [layers, tokens, width]
//   record(name, layer, slot, pos0, rows)  -> [layers, slots, tokens, width] (e.g. slot 0 = the
//                                             call before attention, 1 = before the MLP)
//   record_values(name, layer, pos0, col)  -> [layers, tokens] (one value per token)
// Rows may differ in width (a routing call over 3 sources, a later one over 9): the tensor is as
// wide as the widest, narrower rows are padded with 0. Anything never recorded (a layer without
// the mechanism) is NaN. Mechanisms may also describe a series (axis names, tick labels) and mark
// cells (which source is the partial) so pictures can say what they show. Recording is opt-in
// (ForwardOptions::trace); a null trace costs nothing.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/trace_tensor.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit::model {

class Trace {
 public:
  using Tensor = TraceTensor;

  // Rows [T, width] of `name` for `layer`, for the tokens at positions pos0 .. pos0+T-1. A later
  // record of the same (name, layer, position) replaces the earlier one.
  void record(const std::string& name, int layer, std::int64_t pos0, ConstView2<float> rows) {
    put(name, layer, -1, pos0, rows);
  }
  // One value per token: the series is [layers, tokens] (an exit gate per step, say).
  void record_values(const std::string& name, int layer, std::int64_t pos0, ConstView2<float> column) {
    ATTNKIT_REQUIRE(column.shape[1] == 1, "Trace::record_values: '", name, "': expected one value per token, got ",
                    column.shape[1]);
    put(name, layer, -1, pos0, column);
    series_[name].scalar = true;
  }
  // The same for one slot of a layer: the series becomes [layers, slots, tokens, width].
  void record(const std::string& name, int layer, int slot, std::int64_t pos0, ConstView2<float> rows) {
    ATTNKIT_REQUIRE(slot >= 0, "Trace::record: '", name, "': negative slot ", slot);
    put(name, layer, slot, pos0, rows);
  }
  // Axis names (one per dimension of the tensor) and optional tick labels per dimension.
  void describe(const std::string& name, std::vector<std::string> dims, std::vector<std::vector<std::string>> labels = {}) {
    Series& s = series_[name];
    s.dims = std::move(dims);
    s.labels = std::move(labels);
  }
  // Points out one cell (index along every dimension but the token axis); marking a cell again
  // replaces its label.
  void mark(const std::string& name, std::vector<std::int64_t> index, std::string label) {
    series_[name].marks[std::move(index)] = std::move(label);
  }

  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (auto& [k, s] : series_)
      if (s.width >= 0) n.push_back(k);
    return n;
  }
  bool empty() const { return names().empty(); }

  // The tensor of `name`: layers 0 .. the highest recorded, (slots,) tokens from position 0 to the
  // latest recorded, width the widest row.
  Tensor tensor(const std::string& name) const {
    auto it = series_.find(name);
    ATTNKIT_REQUIRE(it != series_.end() && it->second.width >= 0, "Trace::tensor: nothing recorded under '", name, "'");
    const Series& s = it->second;
    std::int64_t L = 0, K = 1, T = 0;
    for (auto& [key, rows] : s.rows) {
      L = std::max<std::int64_t>(L, key.first + 1);
      K = std::max<std::int64_t>(K, key.second + 1);
      if (!rows.empty()) T = std::max<std::int64_t>(T, rows.rbegin()->first + 1);
    }
    const std::int64_t W = s.width;
    Tensor out;
    out.name = name;
    out.shape = s.slotted ? std::vector<std::int64_t>{L, K, T, W} : std::vector<std::int64_t>{L, T, W};
    if (s.scalar) out.shape.pop_back();
    out.data.assign(static_cast<std::size_t>(L * K * T * W), std::numeric_limits<float>::quiet_NaN());
    for (auto& [key, rows] : s.rows)
      for (auto& [pos, row] : rows) {
        auto dst = out.data.begin() + ((key.first * K + std::max(key.second, 0)) * T + pos) * W;
        std::fill(std::copy(row.begin(), row.end(), dst), dst + W, 0.f);
      }
    if (s.dims.size() == out.shape.size()) out.dims = s.dims;
    if (s.labels.size() == out.shape.size()) {  // tick labels fitted to the extents seen
      out.labels = s.labels;
      for (std::size_t d = 0; d < out.labels.size(); ++d) {
        auto& l = out.labels[d];
        if (l.empty()) continue;
        const auto n = static_cast<std::size_t>(out.shape[d]);
        for (std::size_t i = l.size(); i < n; ++i) l.push_back(std::to_string(i));
        l.resize(n);
      }
    }
    for (auto& [index, label] : s.marks) out.marks.push_back({index, label});
    return out;
  }

  void clear() { series_.clear(); }

 private:
  struct Series {
    std::int64_t width = -1;  // widest row so far; -1: nothing recorded
    bool slotted = false;
    bool scalar = false;  // [layers, tokens]: one value per token
    std::map<std::pair<int, int>, std::map<std::int64_t, std::vector<float>>> rows;  // (layer, slot) -> position -> row
    std::vector<std::string> dims;
    std::vector<std::vector<std::string>> labels;
    std::map<std::vector<std::int64_t>, std::string> marks;
  };

  void put(const std::string& name, int layer, int slot, std::int64_t pos0, ConstView2<float> rows) {
    ATTNKIT_REQUIRE(layer >= 0 && pos0 >= 0, "Trace::record: '", name, "': negative layer or position");
    Series& s = series_[name];
    const bool slotted = slot >= 0;
    ATTNKIT_REQUIRE(s.width < 0 || s.slotted == slotted, "Trace::record: '", name,
                    "': recorded both with and without a slot");
    s.slotted = slotted;
    s.width = std::max(s.width, rows.shape[1]);
    auto& per = s.rows[{layer, slotted ? slot : -1}];
    for (std::int64_t t = 0; t < rows.shape[0]; ++t) per[pos0 + t].assign(rows.ptr(t), rows.ptr(t) + rows.shape[1]);
  }

  std::map<std::string, Series> series_;
};

}  // namespace attnkit::model
