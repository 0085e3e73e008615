// attnkit/core/stage_profile.hpp — wall time per named stage of a model's forward: where the
// time goes, on any host (the AMX device hosts have no perf) and without a profiler.
//
// Off by default. enable_stage_profile(true) switches it on for the process; from then on each
// ATTNKIT_STAGE("mlp.down") adds the wall time from there to the end of its scope to that
// stage's total and counts the call (stages nest: "mlp" includes "mlp.down"). Stages are timed on
// the thread that calls the model (parallel regions run inside them), so a total is wall time of
// the call, not thread time. stage_totals() lists them in the order they first started (a parent
// before its children); reset_stage_totals() clears them. The totals are one table per process:
// sessions profiled on several threads at once add into the same rows.
//
// Cost: switched off, a stage is one relaxed atomic load; on, two clock reads and two short
// locked table lookups. A Qwen3 layer has 15 stages.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace attnkit::profile {

struct StageTotal {
  std::string name;
  double seconds = 0;
  std::int64_t calls = 0;
};

namespace detail {
struct StageTable {
  std::atomic<bool> on{false};
  std::mutex mu;
  std::vector<StageTotal> rows;
};
inline StageTable& stage_table() {
  static StageTable t;
  return t;
}
}  // namespace detail

inline void enable_stage_profile(bool on) { detail::stage_table().on.store(on, std::memory_order_relaxed); }
inline bool stage_profile_enabled() { return detail::stage_table().on.load(std::memory_order_relaxed); }

inline std::vector<StageTotal> stage_totals() {
  auto& t = detail::stage_table();
  const std::lock_guard<std::mutex> lock(t.mu);
  return t.rows;
}

inline void reset_stage_totals() {
  auto& t = detail::stage_table();
  const std::lock_guard<std::mutex> lock(t.mu);
  t.rows.clear();
}

class ScopedStage {
 public:
  // The row is made when the stage starts, so the table lists a parent before its children.
  explicit ScopedStage(const char* name) {
    if (!stage_profile_enabled()) return;
    auto& t = detail::stage_table();
    {
      const std::lock_guard<std::mutex> lock(t.mu);
      row_ = 0;
      while (row_ < t.rows.size() && t.rows[row_].name != name) ++row_;
      if (row_ == t.rows.size()) t.rows.push_back({name, 0, 0});
    }
    name_ = name;
    t0_ = std::chrono::steady_clock::now();
  }
  ScopedStage(const ScopedStage&) = delete;
  ScopedStage& operator=(const ScopedStage&) = delete;
  ~ScopedStage() {
    if (!name_) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    auto& t = detail::stage_table();
    const std::lock_guard<std::mutex> lock(t.mu);
    if (row_ < t.rows.size() && t.rows[row_].name == name_) {  // not reset meanwhile
      t.rows[row_].seconds += s;
      ++t.rows[row_].calls;
    }
  }

 private:
  const char* name_ = nullptr;
  std::size_t row_ = 0;
  std::chrono::steady_clock::time_point t0_{};
};

}  // namespace attnkit::profile

#define ATTNKIT_STAGE_CAT2(a, b) a##b
#define ATTNKIT_STAGE_CAT(a, b) ATTNKIT_STAGE_CAT2(a, b)
// Times the rest of the enclosing scope as stage `name` (a string literal) while profiling is on.
#define ATTNKIT_STAGE(name) const ::attnkit::profile::ScopedStage ATTNKIT_STAGE_CAT(attnkit_stage_, __LINE__)(name)
