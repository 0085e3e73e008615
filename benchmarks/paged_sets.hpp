// benchmarks/paged_sets.hpp — the paged caches of the decode/paged benchmarks
// (bench_decode.cpp) and of benchmarks/experiments/decode_ab.cpp: B = 8 sequences of Qwen3-0.6B
// attention (H 16, H_kv 8, d 128) in pages of P tokens shuffled through >= 2 GiB of PagePool,
// as sets of page tables that the iterations rotate over so that K/V come from DRAM.
// Lengths: all T, or with T = 0 a mix 512 .. 8192.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "attnkit/attention/paged_kv.hpp"

namespace attnkit::bench {

inline std::vector<std::int64_t> paged_bench_lengths(std::int64_t T) {
  if (T > 0) return std::vector<std::int64_t>(8, T);
  return {512, 768, 1024, 1536, 2048, 3072, 4096, 8192};
}

// The pool and the rotating sets of page tables. int8 pages: random codes and a scale per row
// (bytes counts the codes and the scales).
template <class KVT>
struct PagedSetsT {
  using KV = KVT;
  static constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  static constexpr std::int64_t H = 16, Hk = 8, d = 128;
  std::vector<std::int64_t> lengths;
  std::int64_t B = 0, bytes = 0, n_sets = 0;
  attnkit::PagePool<KV> pool;
  std::vector<std::vector<std::int64_t>> indptr;
  std::vector<std::vector<std::int32_t>> indices;
  attnkit::PageTable table(std::size_t s) const { return {indptr[s], indices[s], lengths}; }

  static std::int64_t pages_per_set(const std::vector<std::int64_t>& lengths, std::int64_t P) {
    std::int64_t n = 0;
    for (auto L : lengths) n += (L + P - 1) / P;
    return n;
  }
  static std::int64_t kv_bytes(const std::vector<std::int64_t>& lengths) {
    std::int64_t t = 0;
    for (auto L : lengths) t += L;
    return 2 * t * Hk * (d * static_cast<std::int64_t>(sizeof(KV)) + (quant ? 4 : 0));
  }
  PagedSetsT(std::vector<std::int64_t> lens, std::int64_t P)
      : lengths(std::move(lens)), B(static_cast<std::int64_t>(lengths.size())), bytes(kv_bytes(lengths)),
        n_sets(std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes)),
        pool(n_sets * pages_per_set(lengths, P), P, Hk, d, d) {
    {  // random values (int8: codes), written straight into the pool's storage
      std::mt19937 gen(42);
      std::normal_distribution<float> nd;
      std::vector<KV> pattern(std::size_t{1} << 20);
      for (auto& x : pattern)
        x = quant ? static_cast<KV>(std::clamp(std::lround(40.f * nd(gen)), -127l, 127l)) : KV(nd(gen));
      const auto view = pool.view();
      if constexpr (quant)
        for (float* sc : {view.k_scale.data, view.v_scale.data}) std::fill_n(sc, pool.num_pages() * P * Hk, 0.02f);
      for (KV* base : {view.k.data, view.v.data}) {
        const std::int64_t n = pool.num_pages() * P * Hk * d;
        const std::int64_t step = static_cast<std::int64_t>(pattern.size()) - 512;  // every element written
        for (std::int64_t i = 0; i < n; i += step)
          std::copy_n(pattern.begin() + (i / step) % 512, std::min(n - i, step), base + i);
      }
    }
    std::vector<std::int32_t> ids;
    for (std::int64_t i = 0; i < pool.num_pages(); ++i) ids.push_back(pool.allocate());
    std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
    indptr.resize(static_cast<std::size_t>(n_sets));
    indices.resize(static_cast<std::size_t>(n_sets));
    std::size_t next = 0;
    for (std::int64_t s = 0; s < n_sets; ++s) {
      indptr[s].push_back(0);
      for (auto L : lengths) {
        for (std::int64_t p = 0; p < (L + P - 1) / P; ++p) indices[s].push_back(ids[next++]);
        indptr[s].push_back(static_cast<std::int64_t>(indices[s].size()));
      }
    }
  }
};

}  // namespace attnkit::bench
