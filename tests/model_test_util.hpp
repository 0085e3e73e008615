// tests/model_test_util.hpp — what the model tests share: fixture paths, random ids, the built-in
// registry, running ids through a session in steps (prefill, decode, chunks) with a trace, or
// through a batch session by a plan of steps, temporary checkpoint directories.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "attnkit/io/safetensors.hpp"
#include "attnkit/model/batch_session.hpp"
#include "attnkit/model/builtin.hpp"
#include "attnkit/model/qwen3.hpp"
#include "test_util.hpp"

namespace attnkit::test {

namespace fs = std::filesystem;

// Every model test runs with the layers' scratch buffers poisoned (model/workspace.hpp): a layer
// reading scratch it did not write gives NaN, which no comparison passes.
inline const bool kWorkspacesPoisoned = (model::poison_workspaces() = true, true);

inline fs::path fixture(const std::string& name) { return fs::path(ATTNKIT_TEST_DATA) / "fixtures" / name; }

// T token ids drawn uniformly from [0, V) by a seeded generator.
inline std::vector<std::int64_t> random_ids(std::int64_t T, std::int64_t V, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
  for (auto& id : ids) id = rng.integer(0, V - 1);
  return ids;
}

// The built-in registry (every shipped mechanism), built once.
inline const model::Registry& builtin_registry() {
  static const model::Registry reg = model::default_registry();
  return reg;
}

// Runs ids through a fresh session in steps of the given sizes (empty: one prefill); returns the
struct Run {
  std::vector<float> logits;
  model::Trace trace;
};
// logits of every token and the trace. exit: a looped stack's output rule (unset: its default).
inline Run run(const model::Qwen3Model& m, const std::vector<std::int64_t>& ids, std::vector<std::int64_t> steps = {},
               model::SessionOptions so = {}, int threads = 0, std::optional<model::ExitRule> exit = std::nullopt,
               Precision precision = Precision::exact) {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), V = m.config().vocab_size;
  Run r;
  r.logits.resize(static_cast<std::size_t>(T * V));
  test::poison(r.logits);
  if (steps.empty()) steps = {T};
  auto s = m.new_session(so);
  model::ForwardOptions fo;
  fo.trace = &r.trace;
  fo.num_threads = threads;
  fo.exit = exit;
  fo.precision = precision;
  std::int64_t b = 0;
  for (std::size_t i = 0; b < T; ++i) {
    const std::int64_t n = std::min(steps[std::min(i, steps.size() - 1)], T - b);
    m.forward(s, std::span<const std::int64_t>(ids.data() + b, n), View2<float>(r.logits.data() + b * V, {n, V}), fo);
    b += n;
  }
  return r;
}

// Every series of `want` is in `got` with the same shape, NaN (never recorded) at the same
// places and the rest within `bound` (relative L2); got has no other series.
inline void check_same_trace(const model::Trace& got, const model::Trace& want, double bound) {
  CHECK(got.names() == want.names());
  for (const auto& name : want.names()) {
    CAPTURE(name);
    const auto names = got.names();
    if (std::find(names.begin(), names.end(), name) == names.end()) continue;
    const auto g = got.tensor(name), w = want.tensor(name);
    REQUIRE(g.shape == w.shape);
    CHECK(g.dims == w.dims);
    CHECK(g.marks.size() == w.marks.size());
    std::vector<float> gv, wv;
    std::size_t nan_mismatch = 0;
    for (std::size_t i = 0; i < w.data.size(); ++i) {
      if (std::isnan(w.data[i]) || std::isnan(g.data[i])) {
        nan_mismatch += std::isnan(w.data[i]) != std::isnan(g.data[i]);
        continue;
      }
      gv.push_back(g.data[i]);
      wv.push_back(w.data[i]);
    }
    CHECK(nan_mismatch == 0);
    REQUIRE_FALSE(wv.empty());
    CHECK(test::rel_l2(gv, wv) <= bound);
  }
}

// A plan of batch steps: per step, how many new tokens each sequence runs (0: not in the step).
using Plan = std::vector<std::vector<std::int64_t>>;

// Runs the sequences' ids through a batch session by `plan` (LogitsRows::all) and returns each
// sequence's logits rows in position order. traces: one per sequence, recorded in the steps
// (and then rows: LogitsRows::last is allowed; the logits returned are empty).
inline std::vector<std::vector<float>> batch_logits(const model::Qwen3Model& m, const std::vector<std::vector<std::int64_t>>& ids,
                                                    const Plan& plan, const model::SessionOptions& so, std::int64_t page_size,
                                                    int threads, std::vector<model::Trace>* traces = nullptr,
                                                    model::LogitsRows rows = model::LogitsRows::all) {
  const std::int64_t V = m.config().vocab_size;
  model::BatchOptions bo;
  bo.page_size = page_size;
  bo.initial_pages = 2;  // the pool must grow
  auto bs = m.new_batch_session(so, bo);
  std::vector<std::int64_t> seq, done(ids.size(), 0);
  for (std::size_t i = 0; i < ids.size(); ++i) seq.push_back(bs.add());
  std::vector<std::vector<float>> out(ids.size());
  for (const auto& counts : plan) {
    std::vector<model::SequenceTokens> step;
    std::vector<std::size_t> who;
    std::int64_t N = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int64_t n = std::min<std::int64_t>(counts[i], static_cast<std::int64_t>(ids[i].size()) - done[i]);
      if (n <= 0) continue;
      step.push_back({seq[i], std::span<const std::int64_t>(ids[i].data() + done[i], static_cast<std::size_t>(n)),
                      traces ? &(*traces)[i] : nullptr});
      who.push_back(i);
      N += n;
    }
    if (step.empty()) continue;
    const std::int64_t R = rows == model::LogitsRows::all ? N : static_cast<std::int64_t>(step.size());
    std::vector<float> all(static_cast<std::size_t>(R * V));
    test::poison(all);
    model::ForwardOptions fo;
    fo.num_threads = threads;
    fo.logits = rows;
    m.forward_batch(bs, step, View2<float>(all.data(), {R, V}), fo);
    std::int64_t row = 0;
    for (std::size_t e = 0; e < step.size(); ++e) {
      const std::size_t i = who[e];
      const std::int64_t n = static_cast<std::int64_t>(step[e].ids.size());
      if (rows == model::LogitsRows::all) out[i].insert(out[i].end(), all.begin() + row * V, all.begin() + (row + n) * V);
      row += n;
      done[i] += n;
      CHECK(bs.position(seq[i]) == done[i]);
    }
  }
  for (std::size_t i = 0; i < ids.size(); ++i) REQUIRE(done[i] == static_cast<std::int64_t>(ids[i].size()));
  return out;
}

// A temporary directory removed on scope exit.
struct TempDir {
  fs::path path = fs::temp_directory_path() / ("attnkit-model-test-" + std::to_string(test::fresh_seed()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

// Copies a fixture's checkpoint into dir with a modified config and tensors (drop / reshape /
// add a name).
inline void write_checkpoint(const fs::path& from, const fs::path& dir, const nlohmann::json& config,
                      const std::string& drop = "", const std::string& reshape = "", const std::string& add = "") {
  std::ofstream(dir / "config.json") << config.dump(1);
  auto src = io::SafetensorsFile::open(from / "model.safetensors");
  io::SafetensorsWriter w;
  for (const auto& n : src.names()) {
    if (n == drop) continue;
    const auto& t = src.tensor(n);
    auto shape = t.shape;
    if (n == reshape) shape = {t.numel()};
    w.add(n, t.dtype, shape, t.data, t.nbytes);
  }
  if (!add.empty()) {
    const float one = 1.f;
    w.add_f32(add, {1}, &one);
  }
  w.write(dir / "model.safetensors");
}

inline nlohmann::json read_config(const fs::path& dir) { return nlohmann::json::parse(std::ifstream(dir / "config.json")); }

}  // namespace attnkit::test
