// attnkit/core/threading.hpp — OpenMP with a fixed work partition.
//
// Why fixed: results must be bit-identical for any thread count. Kernels therefore split work
// into items whose arithmetic does not depend on who runs them (a head, a query tile, a fixed
// KV chunk) and only the assignment of items to threads varies. Engines with their own pool
// call kernels with num_threads = 1 and an explicit head/query range instead.
#pragma once

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdint>
#include <thread>
#include <utility>

#include "attnkit/core/fault.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace attnkit {

// Default thread count: OpenMP's (OMP_NUM_THREADS), or 1 without OpenMP.
inline int default_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int resolve_threads(int requested) { return requested > 0 ? requested : default_num_threads(); }

// Runs fn(i) for i in [0, n) on `threads` threads (0 = default). Items are handed out
// dynamically when `dynamic` is set (uneven item costs, e.g. causal tiles) and in static
// contiguous blocks otherwise; either way each item's arithmetic is independent of the thread
// that runs it. An exception thrown by fn on any thread (std::bad_alloc, say) is rethrown on
// the calling thread after the loop; items not yet started are skipped.
template <class F>
void parallel_for(std::int64_t n, int threads, F&& fn, bool dynamic = false) {
  threads = static_cast<int>(std::min<std::int64_t>(resolve_threads(threads), std::max<std::int64_t>(n, 1)));
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    auto guarded = [&](std::int64_t i) {
      if (failed.load(std::memory_order_relaxed)) return;
      try {
        fn(i);
      } catch (...) {
#pragma omp critical(attnkit_parallel_for_error)
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
      }
    };
    if (dynamic) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
      for (std::int64_t i = 0; i < n; ++i) guarded(i);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
      for (std::int64_t i = 0; i < n; ++i) guarded(i);
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) fn(i);
}

// Runs fn(begin, end) on `threads` threads (0 = default), each over one contiguous range of
// [0, n) (balanced, in order), for loops whose consecutive items continue one memory stream so
// that a thread may prefetch its next item. Exceptions as parallel_for.
template <class F>
void parallel_ranges(std::int64_t n, int threads, F&& fn) {
  if (n <= 0) return;
  const std::int64_t nt = std::min<std::int64_t>(resolve_threads(threads), n);
  parallel_for(nt, static_cast<int>(nt), [&](std::int64_t t) { fn(n * t / nt, n * (t + 1) / nt); });
}

// Items [0, n) split into one contiguous range per thread (balanced, in order, as
// parallel_ranges), from which threads claim work as they go: a thread takes the front of its
// own range, so its reads stay one stream, and once that is empty it takes from the back of the
// fullest remaining range. On this shared 2-core VM the two cores' speeds differ from moment to
// moment, so a fixed split leaves one thread streaming alone at the end of every call (half the
// DRAM rate: 15 of 29 GB/s): the decode GEMVs of a Qwen3-0.6B layer spent 9-17% of their time
// so. Each range is one atomic word (front and back, 32 bits each), so a claim is one
// compare-and-swap. `threads` (1 to kMaxThreads) may exceed the team that runs: the ranges of
// threads that never come are taken by the others.
class StealingRanges {
 public:
  static constexpr int kMaxThreads = 64;
  StealingRanges(std::int64_t n, int threads) : threads_(threads) {
    for (int t = 0; t < threads; ++t)
      slot_[t].v.store(pack(n * t / threads, n * (t + 1) / threads), std::memory_order_relaxed);
  }
  // The item thread t's next claim of its own range would start at, or -1 (its range is empty).
  std::int64_t peek(int t) const {
    const std::uint64_t w = slot_[t].v.load(std::memory_order_relaxed);
    return front(w) < back(w) ? front(w) : -1;
  }
  // Thread t's next items [begin, end): up to `grain` from the front of its own range, else up to
  // `steal_grain` from the back of the fullest other range; begin == end when all are claimed.
  std::pair<std::int64_t, std::int64_t> next(int t, std::int64_t grain, std::int64_t steal_grain) {
    std::uint64_t cur = slot_[t].v.load(std::memory_order_relaxed);
    for (;;) {
      const std::int64_t lo = front(cur), hi = back(cur);
      if (lo >= hi) break;
      const std::int64_t take = std::min(grain, hi - lo);
      if (slot_[t].v.compare_exchange_weak(cur, pack(lo + take, hi), std::memory_order_relaxed)) return {lo, lo + take};
    }
    for (;;) {
      int victim = -1;
      std::int64_t most = 0;
      std::uint64_t seen = 0;
      for (int u = 0; u < threads_; ++u) {
        const std::uint64_t w = slot_[u].v.load(std::memory_order_relaxed);
        if (back(w) - front(w) > most) most = back(w) - front(w), victim = u, seen = w;
      }
      if (victim < 0) return {0, 0};
      const std::int64_t take = std::min(steal_grain, most), hi = back(seen);
      if (slot_[victim].v.compare_exchange_strong(seen, pack(front(seen), hi - take), std::memory_order_relaxed))
        return {hi - take, hi};
    }
  }

 private:
  static std::uint64_t pack(std::int64_t lo, std::int64_t hi) {
    return static_cast<std::uint64_t>(lo) << 32 | static_cast<std::uint64_t>(hi);
  }
  static std::int64_t front(std::uint64_t w) { return static_cast<std::int64_t>(w >> 32); }
  static std::int64_t back(std::uint64_t w) { return static_cast<std::int64_t>(w & 0xffffffffu); }
  struct alignas(64) Slot {
    std::atomic<std::uint64_t> v{0};
  };
  int threads_;
  Slot slot_[kMaxThreads];
};

// Runs fn(item, next) for items [0, n) on `threads` threads (0 = default) through StealingRanges,
// an item at a time: `next` is the item the thread expects to run next (its own range's next
// one, or -1), so that it can prefetch across the boundary. Exceptions as parallel_for.
template <class F>
void parallel_stealing(std::int64_t n, int threads, F&& fn) {
  if (n <= 0) return;
  const int nt = static_cast<int>(std::min<std::int64_t>(resolve_threads(threads), n));
  if (nt <= 1 || nt > StealingRanges::kMaxThreads) {
    parallel_ranges(n, nt, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) fn(i, i + 1 < i1 ? i + 1 : std::int64_t{-1});
    });
    return;
  }
  StealingRanges ranges(n, nt);
  parallel_for(nt, nt, [&](std::int64_t t) {  // one role per thread (a smaller team: roles in turn)
    const int role = static_cast<int>(t);
    for (auto r = ranges.next(role, 1, 1); r.first < r.second; r = ranges.next(role, 1, 1)) fn(r.first, ranges.peek(role));
  });
}

// A team whose body synchronises with barriers (run_team / team_barrier). The barrier can be
// broken: when one thread's body throws, the threads waiting in (or later reaching) a barrier
// leave their bodies too, so a failure before a barrier cannot leave the others waiting forever
// (which an `omp barrier` would). The first exception is rethrown on the caller.
namespace detail {
class Team {
 public:
  struct Aborted {};  // leaves the bodies of the other threads of a failed team
  void wait(int n) {
    const unsigned gen = generation_.load(std::memory_order_acquire);
    if (failed_.load(std::memory_order_acquire)) throw Aborted{};
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      // Spin briefly, then yield: callers may run several teams on few cores.
      for (int spin = 0; generation_.load(std::memory_order_acquire) == gen; ++spin) {
        if (failed_.load(std::memory_order_acquire)) throw Aborted{};
        if (spin > 2000) std::this_thread::yield();
      }
    }
    if (failed_.load(std::memory_order_acquire)) throw Aborted{};
  }
  void fail(std::exception_ptr e) {
#if defined(_OPENMP)
#pragma omp critical(attnkit_team_error)
#endif
    if (!error_) error_ = std::move(e);
    failed_.store(true, std::memory_order_release);
  }
  const std::exception_ptr& error() const { return error_; }
  static Team*& current() {
    thread_local Team* t = nullptr;
    return t;
  }

 private:
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};
}  // namespace detail

// Runs body(t, nt) on nt threads of one OpenMP team; body may call team_barrier(nt). An
// exception of any thread ends the team (the others leave at their next barrier or when their
// body returns) and is rethrown here; outputs the body writes are then partly written.
template <class Body>
void run_team(int nt, Body&& body) {
#if defined(_OPENMP)
  if (nt > 1) {
    detail::Team team;
#pragma omp parallel num_threads(nt)
    {
      detail::Team* outer = detail::Team::current();
      detail::Team::current() = &team;
      try {
        body(omp_get_thread_num(), omp_get_num_threads());
      } catch (const detail::Team::Aborted&) {
      } catch (...) {
        team.fail(std::current_exception());
      }
      detail::Team::current() = outer;
    }
    if (team.error()) std::rethrow_exception(team.error());
    return;
  }
#endif
  body(0, 1);
}

// The barrier of run_team's bodies (nthreads: the nt the body was given).
inline void team_barrier(int nthreads) {
  if (nthreads <= 1) return;
  detail::Team* team = detail::Team::current();
  if (team) team->wait(nthreads);
#if defined(_OPENMP)
  else {
#pragma omp barrier
  }
#endif
}

// A half-open index range; {0, -1} (the default) means "everything".
struct Range {
  std::int64_t begin = 0;
  std::int64_t end = -1;
  std::int64_t resolve_end(std::int64_t n) const { return end < 0 ? n : end; }
};

}  // namespace attnkit
