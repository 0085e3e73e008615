// benchmarks/experiments/decode_bf16_ceiling.cpp — the compute ceiling of the bf16 decode kernel
// (attention/decode.hpp) against its DRAM figure: the same calls on data that stays in L2 and on
// data rotated through >= 1 GiB, and each block stage (scores, softmax, P·V) timed alone on one
// L1/L2-resident chunk, in cycles per key row (rdtsc; the TSC ticks at the nominal clock).
// Not built by CMake:
//   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -Iinclude benchmarks/experiments/decode_bf16_ceiling.cpp
// Qwen3-0.6B shapes: d = 128, G = 2 query heads per KV head.
#include <x86intrin.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/decode.hpp"
#include "decode_stage_timer.hpp"
#include "attnkit/attention/kv_cache.hpp"
using namespace attnkit;
using clk = std::chrono::steady_clock;

// GB/s of attention_decode over `n_caches` caches of T tokens (H_kv heads), threads threads.
static double run_decode(std::int64_t H, std::int64_t Hk, std::int64_t T, std::int64_t n_caches, int threads, int reps) {
  const std::int64_t d = 128;
  std::mt19937 gen(42);
  std::normal_distribution<float> nd;
  std::vector<float> src(static_cast<std::size_t>(T * Hk * d)), q(static_cast<std::size_t>(H * d)), out(q.size());
  for (auto& x : src) x = nd(gen);
  for (auto& x : q) x = nd(gen);
  std::vector<KVCache<bf16>> caches;
  caches.reserve(n_caches);
  for (std::int64_t c = 0; c < n_caches; ++c) {
    caches.emplace_back(Hk, d, d, T);
    const ConstView3<float> kv(src.data(), {T, Hk, d});
    caches.back().append(kv, kv);
  }
  DecodeOptions opt;
  opt.num_threads = threads;
  if (const char* c = std::getenv("KV_CHUNK")) opt.kv_chunk = std::atoi(c);
  const double bytes = 2.0 * T * Hk * d * 2;
  std::vector<double> rates;
  for (int r = 0; r < reps; ++r) {
    const int iters = static_cast<int>(std::max<std::int64_t>(n_caches, 200));
    const auto t0 = clk::now();
    for (int i = 0; i < iters; ++i) {
      const auto& c = caches[i % n_caches];
      attention_decode<bf16>(ConstView2<float>(q.data(), {H, d}), c.keys(), c.values(), View2<float>(out.data(), {H, d}), opt);
    }
    rates.push_back(bytes * iters / std::chrono::duration<double>(clk::now() - t0).count() * 1e-9);
  }
  return median_of(rates);
}

// Cycles (TSC) per key row of each stage on one chunk of 512 keys of one KV head, G = 2.
static void stages(std::int64_t T) {
  using namespace detail::decode;
  const std::int64_t d = 128, G = 2;
  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  std::vector<bf16> k(T * d), v(T * d);
  for (auto& x : k) x = bf16(nd(gen));
  for (auto& x : v) x = bf16(nd(gen));
  alignas(64) static float buf[G * d + G * kBlock + 3 * G + 64];
  alignas(64) static float o[G * d];
  const ItemState st{buf, buf + G * d, buf + G * (d + kBlock), buf + G * (d + kBlock) + G, buf + G * (d + kBlock) + 2 * G};
  for (int i = 0; i < G * d; ++i) buf[i] = nd(gen) * 0.1f;
  for (int g = 0; g < G; ++g) st.m[g] = kNegInf, st.l[g] = 0, st.alpha[g] = 1;
  const auto time = [&](auto&& f) { return stage_cycles_per_row(T, f); };
  const double sc = time([&](std::int64_t b) {
    scores_block_bf16(StridedRows<bf16>{k.data() + b * d, d}, kBlock, st, 0, G, d, d);
  });
  const double sm = time([&](std::int64_t) {
    for (int g = 0; g < G; ++g) {
      for (int i = 0; i < kBlock; ++i) st.p[g * kBlock + i] = 0.01f * i;
      st.m[g] = 0.f;
      softmax_block(kBlock, st, g);
    }
  });
  const double ac = time([&](std::int64_t b) {
    accumulate_block_bf16(StridedRows<bf16>{v.data() + b * d, d}, kBlock, st, o, 0, G, d, d);
  });
  std::printf("T %4ld stages, TSC cycles per key row (G=2, d=128): scores %.2f  softmax %.2f  accumulate %.2f  sum %.2f\n", (long)T, sc, sm,
              ac, sc + sm + ac);
}

// GB/s of attention_decode_paged: B = 8 sequences of T tokens, pages of P tokens shuffled
// through a pool of >= 1 GiB, 2 threads (as the benchmark decode/paged/bf16).
static double run_paged(std::int64_t T, std::int64_t P, int reps, std::int64_t sets = 0, bool shuffle = true) {
  constexpr std::int64_t H = 16, Hk = 8, d = 128, B = 8;
  const std::int64_t pages_per_set = B * ((T + P - 1) / P);
  const std::int64_t bytes = 2 * B * T * Hk * d * 2;
  const std::int64_t n_sets = sets ? sets : std::max<std::int64_t>(2, ((std::int64_t{1} << 30) + bytes - 1) / bytes);
  PagePool<bf16> pool(n_sets * pages_per_set, P, Hk, d, d);
  {
    const auto view = pool.view();
    const std::int64_t n = pool.num_pages() * P * Hk * d;
    for (bf16* base : {view.k.data, view.v.data})
      for (std::int64_t i = 0; i < n; ++i) base[i] = bf16(float((i * 2654435761u) % 1000) * 1e-3f - 0.5f);
  }
  std::vector<std::int32_t> ids;
  for (std::int64_t i = 0; i < pool.num_pages(); ++i) ids.push_back(pool.allocate());
  if (shuffle) std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
  std::vector<std::vector<std::int64_t>> indptr(n_sets);
  std::vector<std::vector<std::int32_t>> indices(n_sets);
  std::vector<std::int64_t> lengths(B, T);
  std::size_t next = 0;
  for (std::int64_t s = 0; s < n_sets; ++s) {
    indptr[s].push_back(0);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t p = 0; p < (T + P - 1) / P; ++p) indices[s].push_back(ids[next++]);
      indptr[s].push_back(static_cast<std::int64_t>(indices[s].size()));
    }
  }
  std::vector<float> q(B * H * d, 0.05f), out(B * H * d);
  DecodeOptions opt;
  opt.num_threads = 2;
  const PagedKV<bf16> cache = pool.view();
  std::vector<double> rates;
  for (int r = 0; r < reps; ++r) {
    const int iters = static_cast<int>(std::max<std::int64_t>(n_sets * 2, 32));
    const auto t0 = clk::now();
    for (int i = 0; i < iters; ++i) {
      const std::size_t s = i % n_sets;
      attention_decode_paged<bf16>(ConstView3<float>(q.data(), {B, H, d}), cache, PageTable{indptr[s], indices[s], lengths},
                                   View3<float>(out.data(), {B, H, d}), opt);
    }
    rates.push_back(double(bytes) * iters / std::chrono::duration<double>(clk::now() - t0).count() * 1e-9);
  }
  return median_of(rates);
}

int main(int argc, char** argv) {
  if (argc > 1 && argv[1][0] == 'c') {  // contiguous from DRAM only (>= 1 GiB rotated)
    std::printf("decode bf16 DRAM GB/s: T 512 %.1f | T 2048 %.1f | T 8192 %.1f\n", run_decode(16, 8, 512, 512, 2, 5),
                run_decode(16, 8, 2048, 128, 2, 5), run_decode(16, 8, 8192, 32, 2, 5));
    return 0;
  }
  if (argc > 1 && argv[1][0] == 'h') {  // the same bytes with one KV head (rows contiguous) vs 8 (256-byte slices)
    std::printf("decode bf16 DRAM GB/s, 32 MiB caches: 8 KV heads T 8192 %.1f | 1 KV head T 65536 %.1f | 2 KV heads T 32768 %.1f\n",
                run_decode(16, 8, 8192, 40, 2, 5), run_decode(2, 1, 65536, 40, 2, 5), run_decode(4, 2, 32768, 40, 2, 5));
    return 0;
  }
  if (argc > 1) {  // paged only
    std::printf("paged bf16 GB/s (B 8, P 16): T 512 %.1f | T 2048 %.1f | T 8192 %.1f\n", run_paged(512, 16, 5),
                run_paged(2048, 16, 5), run_paged(8192, 16, 5));
    std::printf("paged T 2048: not shuffled %.1f | cache-resident (1 set, 8 MiB) %.1f | contiguous decode B x (T 2048) %.1f\n",
                run_paged(2048, 16, 5, 0, false), run_paged(256, 16, 5, 1), run_decode(16, 8, 2048, 64, 2, 5));
    return 0;
  }
  stages(64);
  stages(512);
  const double l2 = run_decode(2, 1, 2048, 1, 1, 7);      // 1 MiB, one thread: L2
  const double l2b = run_decode(16, 8, 512, 1, 2, 7);     // 2 MiB over two threads: L2
  const double big = run_decode(16, 8, 8192, 40, 2, 5);   // 32 MiB x 40 rotated: DRAM
  std::printf("decode bf16 GB/s: L2 1 thread (T 2048, 1 KV head) %.1f | L2 2 threads (T 512) %.1f | DRAM 2 threads (T 8192) %.1f\n",
              l2, l2b, big);
}
