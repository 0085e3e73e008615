// attnkit/core/memory.hpp — aligned allocation, with transparent huge pages for big buffers.
//
// Why huge pages: decode streams every weight and every cached key once per token. With 4 KiB
// pages the hardware prefetchers stop at each page boundary and every 4 KiB costs a TLB miss;
// 2 MiB pages let a stream run at the DRAM bandwidth. Buffers of at least 4 MiB are 2 MiB
// aligned and marked MADV_HUGEPAGE (advisory: without THP they simply get small pages).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <memory>
#include <new>
#include <string>

#include "attnkit/core/error.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attnkit {

inline constexpr std::size_t kHugePageBytes = std::size_t{1} << 21;

// Uninitialised memory of at least `bytes`, 64-byte aligned (2 MiB aligned and huge-page
// advised when large). Free with std::free.
inline void* allocate_aligned(std::size_t bytes) {
  bytes = (bytes + 63) / 64 * 64;
  if (bytes == 0) bytes = 64;
  const bool huge = bytes >= 2 * kHugePageBytes;
  if (huge) bytes = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  void* p = std::aligned_alloc(huge ? kHugePageBytes : 64, bytes);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

inline std::shared_ptr<void> allocate_aligned_shared(std::size_t bytes) {
  return std::shared_ptr<void>(allocate_aligned(bytes), [](void* p) { std::free(p); });
}

// Prefetches the cache lines of [p, p + bytes): for reading (Write = false) or for writing
// (prefetchw where the target has it), into L1 (Locality 3) down to L3 (Locality 1).
template <bool Write = false, int Locality = 3>
inline void prefetch_bytes(const void* p, std::int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, Write ? 1 : 0, Locality);
}

// Prefetches the first `lines` cache lines from p (for reading, Locality as prefetch_bytes).
// Decode prefetches a row per row it reads, and there a loop's counter and branch per line cost
// more than the prefetches: rows of 1, 2 and 4 lines (int8 and bf16 at d 128) are unrolled
// (driver, T 8192, 2 threads: int8 fast 21.7 -> 23.2 GB/s, bf16 26.0 -> 27.4). Longer rows keep
// the loop: 8 unrolled prefetches back to back made f32 slower (28.4 -> 26.7). Always inlined:
// GCC 12 finds a function of prefetches alone free of side effects and deletes the calls it
// does not inline (every prefetch of decode vanished).
template <int Locality = 3>
[[gnu::always_inline]] inline void prefetch_lines(const void* p, int lines) {
  const char* c = static_cast<const char*>(p);
  switch (lines) {
    case 4:
      __builtin_prefetch(c + 192, 0, Locality);
      __builtin_prefetch(c + 128, 0, Locality);
      [[fallthrough]];
    case 2:
      __builtin_prefetch(c + 64, 0, Locality);
      [[fallthrough]];
    case 1:
      __builtin_prefetch(c, 0, Locality);
      [[fallthrough]];
    case 0:
      break;
    default:
      for (int l = 0; l < lines; ++l) __builtin_prefetch(c + 64 * l, 0, Locality);
  }
}

#if defined(ATTNKIT_POISON_SCRATCH)
// Tests only (define it for a whole program or not at all, as ATTNKIT_FAULT_INJECTION): every
// GrowScratch::get fills the n floats it hands out with finite values that change from call to
// call, all tiny (|v| < 2^-8) in some calls and of any magnitude up to 2^24 in others. A kernel
// whose bits depend on scratch it did not write in the same call then gives different bits from
// call to call, and the tests' bit-equality checks (paged against contiguous, 1 thread against
// 2) see it. Finite, because a NaN is what a read-before-write hides behind (vmaxps returns its
// second operand, a compare is false) while a value steers a branch or a maximum.
inline void poison_scratch(float* p, std::int64_t n) {
  thread_local std::uint64_t calls = 0;
  std::uint64_t x = ++calls * 0x9E3779B97F4A7C15ull + 1;
  const auto next = [&] {
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    return static_cast<std::uint32_t>((x * 0x2545F4914F6CDD1Dull) >> 32);
  };
  const bool tiny = next() & 1u;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t r = next(), e = tiny ? 100u + r % 20u : 103u + r % 48u;  // 2^-27..2^-8 or 2^-24..2^24
    const std::uint32_t bits = (r & 0x807fffffu) | (e << 23);
    std::memcpy(p + i, &bits, sizeof bits);
  }
}
#endif

// Grow-only aligned float scratch (kernels keep one per thread in a thread_local and reuse it
// across calls, so a steady stream of calls allocates nothing). Grows by at least half its size.
class GrowScratch {
 public:
  float* get(std::int64_t n) {
    if (n > capacity_) {
      const std::int64_t cap = std::max<std::int64_t>(n, capacity_ + capacity_ / 2);
      data_.reset(static_cast<float*>(allocate_aligned(static_cast<std::size_t>(cap) * sizeof(float))));
      capacity_ = cap;
    }
#if defined(ATTNKIT_POISON_SCRATCH)
    poison_scratch(data_.get(), n);
#endif
    return data_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  std::int64_t capacity_ = 0;
};

// The calling thread's GrowScratch for one use, named by a tag type (a kernel's distinct buffers
// that are live at the same time need distinct tags).
template <class Use>
inline GrowScratch& thread_scratch() {
  thread_local GrowScratch s;
  return s;
}

// Bytes of memory the system can still hand out without swapping (Linux: MemAvailable of
// /proc/meminfo); 0 when unknown (then nothing is checked).
inline std::uint64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return 0;
}

inline std::string mib_string(std::uint64_t bytes) {
  char buf[48];
  if (bytes == UINT64_MAX) return "more than 16 EiB (overflow)";
  if (bytes < (std::uint64_t{1} << 20)) return std::to_string(bytes) + " bytes";
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

// a * b * ... in bytes, saturating at UINT64_MAX (a huge request must fail the check, not wrap).
template <class... Ts>
inline std::uint64_t mul_bytes(Ts... factors) {
  std::uint64_t r = 1;
  for (std::uint64_t f : {static_cast<std::uint64_t>(factors < 0 ? 0 : factors)...})
    if (__builtin_mul_overflow(r, f, &r)) return UINT64_MAX;
  return r;
}
inline std::uint64_t add_bytes(std::uint64_t a, std::uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

// The memory limit of the calling thread's allocations (0: none set; then the system's
// available memory counts). Session::forward and Qwen3Model::new_session set it from
// SessionLimits::max_memory_bytes for the caches they grow.
inline std::uint64_t& thread_memory_limit() {
  thread_local std::uint64_t limit = 0;
  return limit;
}

// Sets thread_memory_limit() for a scope (0 keeps the enclosing one).
class MemoryLimitScope {
 public:
  explicit MemoryLimitScope(std::uint64_t bytes) : prev_(thread_memory_limit()) {
    if (bytes) thread_memory_limit() = bytes;
  }
  ~MemoryLimitScope() { thread_memory_limit() = prev_; }
  MemoryLimitScope(const MemoryLimitScope&) = delete;
  MemoryLimitScope& operator=(const MemoryLimitScope&) = delete;

 private:
  std::uint64_t prev_;
};

// Fails up front, naming the sizes, when a request needs more memory than the limit allows:
// thread_memory_limit() when set, else what the machine has available (instead of
// std::bad_alloc half-way, or the OOM killer). `what` says who asks and for what, e.g.
// "Attention Residuals: 57 sources x 32768 tokens x 1024 floats". Without a set limit, requests
// under 64 MiB are not checked (reading /proc/meminfo would cost more than a decode step's
// buffers).
inline void require_memory(std::uint64_t bytes, const std::string& what) {
  if (const std::uint64_t limit = thread_memory_limit()) {
    ATTNKIT_REQUIRE(bytes <= limit, what, " needs ", mib_string(bytes), " but the memory limit is ", mib_string(limit));
    return;
  }
  if (bytes < (std::uint64_t{64} << 20)) return;
  const std::uint64_t avail = available_memory_bytes();
  ATTNKIT_REQUIRE(avail == 0 || bytes <= avail, what, " needs ", mib_string(bytes), " but only ", mib_string(avail),
                  " of memory are available");
}

}  // namespace attnkit

