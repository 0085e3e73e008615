// attnkit/core/threading.hpp — a fixed work partition, run on attnkit's own spinning workers
// (OpenMP where those are taken).
//
// Why fixed: results must be bit-identical for any thread count. Kernels therefore split work
// into items whose arithmetic does not depend on who runs them (a head, a query tile, a fixed
// KV chunk) and only the assignment of items to threads varies. Engines with their own pool
// call kernels with num_threads = 1 and an explicit head/query range instead.
//
// Why our own workers: a decode step is a hundred or more short parallel regions (a Qwen3-0.6B
// token: 141, most of them 20-300 µs), and libgomp's fork and join make two futex system calls
// each, even while its threads spin: 3.4-3.7 µs an empty region on the 2-core Zen 5 VM, where a
// system call leaves the guest. WorkerPool's workers wait for a job by spinning on one counter
// (then sleep, after ATTNKIT_SPIN_US microseconds idle, default 200), and the caller waits for
// them the same way: 0.5 µs. It serves one caller thread at a time; a second caller thread, a
// call from inside a job or from inside an OpenMP region runs on OpenMP exactly as before (the
// partition, hence every bit, is the same either way).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "attnkit/core/fault.hpp"

#if defined(__linux__)
#include <sched.h>
#endif

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

namespace detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Workers that run one job at a time for one caller thread: job(t) for t in [1, nt) on workers
// 0 .. nt - 2 while the caller runs job(0). Each worker has its own slot: the caller writes the
// job into the slots of the workers it needs and bumps each one's generation; an idle worker
// spins on its generation for spin_us, then sleeps (a condition variable), and the caller
// wakes only a worker that sleeps, so back-to-back jobs make no system call. Workers
// are created on first need (up to kMaxWorkers) and joined at exit.
class WorkerPool {
 public:
  static constexpr int kMaxWorkers = 255;
  static WorkerPool& instance() {
    static WorkerPool pool;
    return pool;
  }
  // Runs job(t), t in [0, nt), nt >= 2, and returns true; or returns false at once, having run
  // nothing, when the pool is disabled, held by another caller, or nt is beyond kMaxWorkers + 1.
  // Not for a thread inside a job (inside_job: the callers run such loops on their own thread,
  // as OpenMP runs a nested region). job must not throw (the callers catch per item).
  template <class Job>
  bool try_run(int nt, Job& job) {
    // More threads than CPUs: spinning workers would hold the cores the descheduled ones need
    // (bf16 T 512 on 3 threads of 2 cores: 326 µs a call against OpenMP's 90), so OpenMP.
    if (!enabled_.load(std::memory_order_relaxed) || nt - 1 > kMaxWorkers || nt > cpus_) return false;
#if defined(_OPENMP)
    if (omp_in_parallel()) return false;
#endif
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    try {
      grow(nt - 1);
    } catch (...) {  // no thread to be had: OpenMP's turn
      busy_.store(false, std::memory_order_release);
      return false;
    }
    pending_.store(nt - 1, std::memory_order_relaxed);
    for (int w = 0; w + 1 < nt; ++w) {
      Slot& s = slots_[w];
      s.fn = [](void* ctx, int t) { (*static_cast<Job*>(ctx))(t); };
      s.ctx = &job;
      s.t = w + 1;
      s.generation.fetch_add(1, std::memory_order_seq_cst);
      if (s.sleeping.load(std::memory_order_seq_cst)) s.wake();
    }
    in_job() = true;
    job(0);
    in_job() = false;
    // The workers are running (or about to): spin, but yield after 100 µs, in case one of them
    // waits for this core (more runnable threads than cores).
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
    for (int i = 1; pending_.load(std::memory_order_acquire) != 0; ++i) {
      if (i % 256 == 0 && std::chrono::steady_clock::now() >= until) std::this_thread::yield();
      else cpu_relax();
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }
  static bool inside_job() { return in_job(); }
  void set_enabled(bool on) { enabled_.store(on, std::memory_order_relaxed); }
  void set_spin_us(int us) { spin_us_.store(std::max(us, 0), std::memory_order_relaxed); }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  ~WorkerPool() {
    quit_.store(true, std::memory_order_seq_cst);
    for (std::size_t w = 0; w < workers_.size(); ++w) {
      slots_[w].generation.fetch_add(1, std::memory_order_seq_cst);
      slots_[w].wake();
    }
    for (auto& w : workers_) w.join();
  }

 private:
  struct alignas(64) Slot {
    std::atomic<std::uint32_t> generation{0};
    std::atomic<bool> sleeping{false};
    void (*fn)(void*, int) = nullptr;
    void* ctx = nullptr;
    int t = 0;
    std::mutex mutex;  // sleeping and waking only
    std::condition_variable cv;
    void wake() {
      std::lock_guard<std::mutex> lock(mutex);
      cv.notify_one();
    }
    void sleep(std::uint32_t seen) {  // until the generation moves on from seen
      std::unique_lock<std::mutex> lock(mutex);
      sleeping.store(true, std::memory_order_seq_cst);
      while (generation.load(std::memory_order_seq_cst) == seen) cv.wait(lock);
      sleeping.store(false, std::memory_order_relaxed);
    }
  };
  WorkerPool() : slots_(new Slot[kMaxWorkers]), cpus_(static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))) {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) cpus_ = std::max(1, CPU_COUNT(&set));  // what this process may use
#endif
    if (const char* e = std::getenv("ATTNKIT_SPIN_US")) set_spin_us(std::atoi(e));
    if (const char* e = std::getenv("ATTNKIT_WORKERS")) set_enabled(std::atoi(e) != 0);
  }
  static bool& in_job() {
    thread_local bool inside = false;
    return inside;
  }
  void grow(int n) {  // under busy_
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { work(slots_[id]); });
    }
  }
  void work(Slot& s) {
#if defined(_OPENMP)
    // OpenMP code inside a job (Eigen's GEMM) stays on this thread, as in a nested region.
    omp_set_num_threads(1);
#endif
    in_job() = true;  // a parallel_for inside a job runs its items here
    std::uint32_t seen = 0;  // the generation a slot starts at (its first job may come before this line)
    for (;;) {
      std::uint32_t g = s.generation.load(std::memory_order_acquire);
      if (g == seen) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_.load());
        for (int i = 1; (g = s.generation.load(std::memory_order_acquire)) == seen; ++i) {
          if (i % 256 == 0 && std::chrono::steady_clock::now() >= until) {
            s.sleep(seen);
          } else {
            cpu_relax();
          }
        }
      }
      seen = g;
      if (quit_.load(std::memory_order_acquire)) return;
      s.fn(s.ctx, s.t);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }
  std::unique_ptr<Slot[]> slots_;
  int cpus_;
  std::vector<std::thread> workers_;
  std::atomic<bool> enabled_{true};
  std::atomic<int> spin_us_{200};
  std::atomic<bool> quit_{false};
  alignas(64) std::atomic<bool> busy_{false};
  alignas(64) std::atomic<int> pending_{0};
};

// First exception of a parallel loop's items: kept, the rest skipped, rethrown by the caller.
class LoopErrors {
 public:
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  template <class F>
  void run(F& fn, std::int64_t i) {
    if (failed()) return;
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace detail

// attnkit's workers (core/threading.hpp's top): on by default; off, every parallel call runs
// on OpenMP. The spin is how long an idle worker polls for the next job before it sleeps (its
// core is busy meanwhile: an engine with work of its own between calls may want it short).
// Also set by the environment: ATTNKIT_WORKERS=0, ATTNKIT_SPIN_US=<microseconds>.
inline void set_worker_pool(bool enabled) { detail::WorkerPool::instance().set_enabled(enabled); }
inline void set_worker_spin_us(int microseconds) { detail::WorkerPool::instance().set_spin_us(microseconds); }

// Runs fn(i) for i in [0, n) on `threads` threads (0 = default). Items are handed out
// dynamically when `dynamic` is set (uneven item costs, e.g. causal tiles) and in static
// contiguous blocks otherwise; either way each item's arithmetic is independent of the thread
// that runs it. An exception thrown by fn on any thread (std::bad_alloc, say) is rethrown on
// the calling thread after the loop; items not yet started are skipped.
template <class F>
void parallel_for(std::int64_t n, int threads, F&& fn, bool dynamic = false) {
  threads = static_cast<int>(std::min<std::int64_t>(resolve_threads(threads), std::max<std::int64_t>(n, 1)));
  if (threads > 1 && n > 1 && !detail::WorkerPool::inside_job()) {
    detail::LoopErrors errors;
    std::atomic<std::int64_t> next{0};
    auto job = [&](int t) {
      if (dynamic) {
        for (std::int64_t i; !errors.failed() && (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) errors.run(fn, i);
      } else {
        for (std::int64_t i = n * t / threads, e = n * (t + 1) / threads; i < e; ++i) errors.run(fn, i);
      }
    };
    if (detail::WorkerPool::instance().try_run(threads, job)) {
      errors.rethrow();
      return;
    }
#if defined(_OPENMP)
    if (dynamic) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
      for (std::int64_t i = 0; i < n; ++i) errors.run(fn, i);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
      for (std::int64_t i = 0; i < n; ++i) errors.run(fn, i);
    }
    errors.rethrow();
    return;
#endif
  }
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
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::move(e);
    }
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
  std::mutex mutex_;
  std::exception_ptr error_;
};
}  // namespace detail

// Runs body(t, nt) on nt threads at once (attnkit's workers, or one OpenMP team); body may call
// team_barrier(nt). An exception of any thread ends the team (the others leave at their next
// barrier or when their body returns) and is rethrown here; outputs the body writes are then
// partly written.
template <class Body>
void run_team(int nt, Body&& body) {
  if (nt > 1 && !detail::WorkerPool::inside_job()) {
    detail::Team team;
    const auto member = [&](int t, int size) {
      detail::Team* outer = detail::Team::current();
      detail::Team::current() = &team;
      try {
        body(t, size);
      } catch (const detail::Team::Aborted&) {
      } catch (...) {
        team.fail(std::current_exception());
      }
      detail::Team::current() = outer;
    };
    auto job = [&](int t) { member(t, nt); };
    bool ran = detail::WorkerPool::instance().try_run(nt, job);
#if defined(_OPENMP)
    if (!ran) {
#pragma omp parallel num_threads(nt)
      member(omp_get_thread_num(), omp_get_num_threads());
      ran = true;
    }
#endif
    if (ran) {
      if (team.error()) std::rethrow_exception(team.error());
      return;
    }
  }
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
