// attnkit/core/memory.hpp — aligned allocation, with transparent huge pages for big buffers.
//
// Why huge pages: decode streams every weight and every cached key once per token. With 4 KiB
// pages the hardware prefetchers stop at each page boundary and every 4 KiB costs a TLB miss;
// 2 MiB pages let a stream run at the DRAM bandwidth. Buffers of at least 4 MiB are 2 MiB
// aligned and marked MADV_HUGEPAGE (advisory: without THP they simply get small pages).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

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

}  // namespace attnkit
