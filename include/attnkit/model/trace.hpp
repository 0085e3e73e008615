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
// (ForwardOptions::trace; in a batch step, SequenceTokens::trace per sequence); a null trace
// costs nothing.
//
// A batch step records through a routing trace (Trace::for_batch, made by the model): there a
// record's position is a row of the step's packed tokens, and each sequence's rows land in that
// sequence's own trace at its own positions, so a sequence's trace reads the same whether it ran
// alone or in a batch. Code that runs one sequence of the step at a time records into
// sequence(b) directly.
#pragma once

#include <algorithm>
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
    put(name, layer, -1, pos0, rows, false);
  }
  // One value per token: the series is [layers, tokens] (an exit gate per step, say).
  void record_values(const std::string& name, int layer, std::int64_t pos0, ConstView2<float> column) {
    ATTNKIT_REQUIRE(column.shape[1] == 1, "Trace::record_values: '", name, "': expected one value per token, got ",
                    column.shape[1]);
    put(name, layer, -1, pos0, column, true);
  }
  // The same for one slot of a layer: the series becomes [layers, slots, tokens, width].
  void record(const std::string& name, int layer, int slot, std::int64_t pos0, ConstView2<float> rows) {
    ATTNKIT_REQUIRE(slot >= 0, "Trace::record: '", name, "': negative slot ", slot);
    put(name, layer, slot, pos0, rows, false);
  }
  // Axis names (one per dimension of the tensor) and optional tick labels per dimension.
  void describe(const std::string& name, std::vector<std::string> dims, std::vector<std::vector<std::string>> labels = {}) {
    if (routing()) {
      for (Trace* t : routes_)
        if (t) t->describe(name, dims, labels);
      return;
    }
    Series& s = series_[name];
    s.dims = std::move(dims);
    s.labels = std::move(labels);
  }
  // Points out one cell (index along every dimension but the token axis); marking a cell again
  // replaces its label.
  void mark(const std::string& name, std::vector<std::int64_t> index, std::string label) {
    if (routing()) {
      for (Trace* t : routes_)
        if (t) t->mark(name, index, label);
      return;
    }
    series_[name].marks[std::move(index)] = std::move(label);
  }

  // The routing trace of a batch step (see the top): targets[b] receives sequence b's rows (null:
  // that sequence is not traced); cu_seqlens [B + 1] splits the packed rows, pos0 [B] gives each
  // sequence's first position. The targets must outlive it.
  static Trace for_batch(std::vector<Trace*> targets, std::vector<std::int64_t> cu_seqlens, std::vector<std::int64_t> pos0) {
    ATTNKIT_REQUIRE(cu_seqlens.size() == targets.size() + 1 && pos0.size() == targets.size(),
                    "Trace::for_batch: ", targets.size(), " targets, ", cu_seqlens.size(), " cu_seqlens and ", pos0.size(),
                    " positions (expected B, B + 1 and B)");
    Trace t;
    t.routes_ = std::move(targets);
    t.cu_ = std::move(cu_seqlens);
    t.pos0_ = std::move(pos0);
    return t;
  }
  // Where sequence b of a batch step records by itself (null: not traced); a plain trace: itself.
  Trace* sequence(std::int64_t b) {
    if (!routing()) return this;
    ATTNKIT_REQUIRE(b >= 0 && b < static_cast<std::int64_t>(routes_.size()), "Trace::sequence: ", b, " outside the step's ",
                    routes_.size(), " sequences");
    return routes_[static_cast<std::size_t>(b)];
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

  bool routing() const { return !cu_.empty(); }

  void put(const std::string& name, int layer, int slot, std::int64_t pos0, ConstView2<float> rows, bool scalar) {
    ATTNKIT_REQUIRE(layer >= 0 && pos0 >= 0, "Trace::record: '", name, "': negative layer or position");
    if (routing()) {  // pos0: a packed row of the step
      const std::int64_t end = pos0 + rows.shape[0];
      ATTNKIT_REQUIRE(end <= cu_.back(), "Trace::record: '", name, "': rows [", pos0, ", ", end,
                      ") beyond the batch step's ", cu_.back(), " tokens");
      for (std::size_t b = 0; b < routes_.size(); ++b) {
        const std::int64_t lo = std::max(pos0, cu_[b]), hi = std::min(end, cu_[b + 1]);
        if (lo < hi && routes_[b]) routes_[b]->put(name, layer, slot, pos0_[b] + lo - cu_[b], rows.slice(0, lo - pos0, hi - pos0), scalar);
      }
      return;
    }
    Series& s = series_[name];
    if (scalar) s.scalar = true;
    const bool slotted = slot >= 0;
    ATTNKIT_REQUIRE(s.width < 0 || s.slotted == slotted, "Trace::record: '", name,
                    "': recorded both with and without a slot");
    s.slotted = slotted;
    s.width = std::max(s.width, rows.shape[1]);
    auto& per = s.rows[{layer, slotted ? slot : -1}];
    for (std::int64_t t = 0; t < rows.shape[0]; ++t) per[pos0 + t].assign(rows.ptr(t), rows.ptr(t) + rows.shape[1]);
  }

  std::map<std::string, Series> series_;
  std::vector<Trace*> routes_;  // a batch step's routing trace: per sequence (else empty)
  std::vector<std::int64_t> cu_, pos0_;
};

}  // namespace attnkit::model
