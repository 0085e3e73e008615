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

// A half-open index range; {0, -1} (the default) means "everything".
struct Range {
  std::int64_t begin = 0;
  std::int64_t end = -1;
  std::int64_t resolve_end(std::int64_t n) const { return end < 0 ? n : end; }
};

}  // namespace attnkit
