// benchmarks/experiments/decode_bw_frac.cpp — the decode cases of issues 12 and 14 with their
// bw_frac, in one small program that builds on any host without Google Benchmark (the AMX device
// host has none): contiguous decode (f32, bf16, bf16 `fast`, int8 `fast`) at T 512 and 8192 over
// >= 1 GiB of rotated caches, and paged bf16 decode of B 8 sequences (all 8192, or mixed
// 512-8192; pages of 16 shuffled through >= 2 GiB, benchmarks/paged_sets.hpp), Qwen3-0.6B heads,
// 2 threads, medians of 5 passes. Two fractions: bw_frac divides by the read roofline
// (benchmarks/roofline.hpp, as roofline/mem_read: best of 5 passes, measured before and after the
// cases, the higher figure), "per pass" is the median over the passes of each pass's GB/s over a
// read pass of the same 1 GiB buffer taken just before it (the host's bandwidth drifts within a run).
// "its pages, plain read" sums the paged case's pages in the same order without the kernel: what
// the access pattern allows; "K, V side by side" runs the kernel (and the read) on a copy of the
// pool whose pages hold K and V together (FlashInfer's [pages, 2, ...]). 2026-12-06: on the
// Intel VM the pages' plain read 0.87 per pass (8 x 8192 and mixed) against the kernel's 0.74 /
// 0.72; on one AMX host 0.88 / 0.88-0.89 against 0.78-0.79 / 0.68-0.71, on another (two passes)
// 0.92-0.96 against 0.82-0.83 / 0.76-0.83. K and V side by side: the plain read 0.97-0.99 per
// pass, the kernel 0.76 and 0.86 (8 x 8192), 0.80 and 0.84 (mixed): no steady gain, so the
// pool keeps K and V apart. Pages of 16 bf16 tokens are 32 KiB runs scattered through 2 GiB:
// alone they stream at 0.87-0.96 of one long sequential read, depending on the host.
// Not built by CMake:
//   F="-std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude -Ibenchmarks"
//   g++ $F benchmarks/experiments/decode_bw_frac.cpp -o decode_bw_frac && ./decode_bw_frac
// Used on 2026-12-02 on the Zen 5 VM and on the Intel AMX device host (docs/performance.md, "int8 KV cache").
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "paged_sets.hpp"
#include "roofline.hpp"

using namespace attnkit;
using clk = std::chrono::steady_clock;

namespace {

constexpr int kThreads = 2, kPasses = 5;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Rate {
  double gbps;   // median of the passes
  double ratio;  // median over the passes of (the pass's GB/s) / (the read pass just before it)
};

// One read pass of a 1 GiB buffer (the roofline's), taken before each timed pass: the VM's
// bandwidth drifts by tens of percent within a run, so each pass is also set against the read
// bandwidth of its own moment.
double read_now() {
  static const auto buf = bench::roofline_detail::make_read_buffer(bench::roofline_detail::kReadBufferFloats, kThreads);
  return bench::roofline_detail::read_pass(buf.get(), bench::roofline_detail::kReadBufferFloats, kThreads) * 1e-9;
}

// GB/s of `pass` (which reads `bytes`), median of kPasses after one warm-up pass.
template <class Pass>
Rate rate(const Pass& pass, double bytes) {
  pass();
  std::vector<double> g, ratio;
  for (int r = 0; r < kPasses; ++r) {
    const double read = read_now();
    const auto t0 = clk::now();
    pass();
    g.push_back(bytes / std::chrono::duration<double>(clk::now() - t0).count() * 1e-9);
    ratio.push_back(g.back() / read);
  }
  return {median(g), median(ratio)};
}

template <class KV>
Rate contiguous(std::int64_t T, Precision precision) {
  constexpr std::int64_t H = 16, Hk = 8, d = 128;
  const double bytes = double(T) * Hk * 2 * (d * sizeof(KV) + (std::is_same_v<KV, std::int8_t> ? 4 : 0));
  const int n_caches = std::max(16, static_cast<int>((std::int64_t{1} << 30) / bytes));
  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  std::vector<float> k(T * Hk * d), v(T * Hk * d), q(H * d), o(H * d);
  for (auto* x : {&k, &v, &q})
    for (auto& e : *x) e = nd(gen);
  std::vector<KVCache<KV>> caches;
  for (int c = 0; c < n_caches; ++c) {
    caches.emplace_back(Hk, d, d, T);
    caches.back().append(ConstView3<float>(k.data(), {T, Hk, d}), ConstView3<float>(v.data(), {T, Hk, d}));
  }
  DecodeOptions opt;
  opt.num_threads = kThreads;
  opt.precision = precision;
  return rate([&] {
    for (const auto& c : caches)
      attention_decode<KV>(ConstView2<float>(q.data(), {H, d}), c.keys(), c.values(), View2<float>(o.data(), {H, d}), opt);
  }, bytes * n_caches);
}

// K and V of each page side by side (FlashInfer's [pages, 2, ...] layout): one 64 KiB run a
// page at P 16 instead of two 32 KiB runs in separate arrays. The kernels read any strides, so
// only the views change; a copy of the pool's pages, same ids.
struct JointPages {
  std::shared_ptr<void> buf;
  PagedKV<bf16> view;
  explicit JointPages(const PagePool<bf16>& pool) {
    const PagedKV<bf16> v = pool.view();
    const std::int64_t n = v.num_pages(), pe = v.k.stride[0];
    buf = allocate_aligned_shared(static_cast<std::size_t>(n * 2 * pe) * sizeof(bf16));
    bf16* j = static_cast<bf16*>(buf.get());
    for (std::int64_t i = 0; i < n; ++i) {
      std::copy(v.k.data + i * pe, v.k.data + (i + 1) * pe, j + 2 * i * pe);
      std::copy(v.v.data + i * pe, v.v.data + (i + 1) * pe, j + (2 * i + 1) * pe);
    }
    view.k = ConstView4<bf16>(j, {v.k.shape[0], v.k.shape[1], v.k.shape[2], v.k.shape[3]},
                              {2 * pe, v.k.stride[1], v.k.stride[2], 1});
    view.v = ConstView4<bf16>(j + pe, {v.v.shape[0], v.v.shape[1], v.v.shape[2], v.v.shape[3]},
                              {2 * pe, v.v.stride[1], v.v.stride[2], 1});
  }
};

Rate paged(const bench::PagedSetsT<bf16>& ps, const PagedKV<bf16>& cache) {
  const std::int64_t B = ps.B, H = bench::PagedSetsT<bf16>::H, d = bench::PagedSetsT<bf16>::d;
  std::vector<float> q(B * H * d), out(B * H * d);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(std::sin(double(i)));
  DecodeOptions opt;
  opt.num_threads = kThreads;
  return rate([&] {
    for (std::int64_t s = 0; s < ps.n_sets; ++s)
      attention_decode_paged<bf16>(ConstView3<float>(q.data(), {B, H, d}), cache, ps.table(s),
                                   View3<float>(out.data(), {B, H, d}), opt);
  }, double(ps.bytes) * ps.n_sets);
}

// The paged case's pages read in the same order with no kernel: each thread sums whole K and V
// pages (32 KiB each at P 16, bf16) of its half of each set's page list, as integers (bf16 bits
// read as floats would be denormals, whose adds take assists). What the access pattern allows
// (pages scattered at random through 2 GiB, each a short sequential run) against the roofline's
// one long sequential read.
Rate paged_read(const bench::PagedSetsT<bf16>& ps, const PagedKV<bf16>& cache) {
  const std::int64_t page_elems = 16 * ps.Hk * ps.d;
  return rate([&] {
    for (std::int64_t s = 0; s < ps.n_sets; ++s) {
      const std::vector<std::int32_t>& idx = ps.indices[static_cast<std::size_t>(s)];
      const auto n = static_cast<std::int64_t>(idx.size());
      std::int64_t sums[kThreads] = {};
      parallel_for(kThreads, kThreads, [&](std::int64_t t) {
        __m512i acc = _mm512_setzero_si512();
        for (std::int64_t i = n * t / kThreads; i < n * (t + 1) / kThreads; ++i)
          for (const auto* view : {&cache.k, &cache.v}) {
            const char* pg = reinterpret_cast<const char*>(view->data + idx[static_cast<std::size_t>(i)] * view->stride[0]);
            for (std::int64_t off = 0; off < page_elems * 2; off += 256)
              acc = _mm512_add_epi32(acc, _mm512_add_epi32(
                  _mm512_add_epi32(_mm512_load_si512(pg + off), _mm512_load_si512(pg + off + 64)),
                  _mm512_add_epi32(_mm512_load_si512(pg + off + 128), _mm512_load_si512(pg + off + 192))));
          }
        sums[t] = _mm512_reduce_add_epi32(acc);
      });
      bench::roofline_detail::keep(sums[0] + sums[kThreads - 1]);
    }
  }, double(ps.bytes) * ps.n_sets);
}

}  // namespace

int main() {
  const double read0 = bench::roofline_detail::read_bandwidth(kThreads) * 1e-9;
  struct Row {
    const char* name;
    Rate r;
  };
  std::vector<Row> rows;
  rows.push_back({"f32 T 512", contiguous<float>(512, Precision::exact)});
  rows.push_back({"bf16 T 512", contiguous<bf16>(512, Precision::exact)});
  rows.push_back({"bf16 fast T 512", contiguous<bf16>(512, Precision::fast)});
  rows.push_back({"int8 fast T 512", contiguous<std::int8_t>(512, Precision::fast)});
  rows.push_back({"f32 T 8192", contiguous<float>(8192, Precision::exact)});
  rows.push_back({"bf16 T 8192", contiguous<bf16>(8192, Precision::exact)});
  rows.push_back({"bf16 fast T 8192", contiguous<bf16>(8192, Precision::fast)});
  rows.push_back({"int8 fast T 8192", contiguous<std::int8_t>(8192, Precision::fast)});
  for (const std::int64_t T : {8192, 0}) {
    const bench::PagedSetsT<bf16> ps(bench::paged_bench_lengths(T), 16);
    const JointPages joint(ps.pool);
    const bool all = T > 0;
    rows.push_back({all ? "paged bf16 8 x 8192, P 16" : "paged bf16 mixed, P 16", paged(ps, ps.pool.view())});
    rows.push_back({"  its pages, plain read", paged_read(ps, ps.pool.view())});
    rows.push_back({"  K, V side by side", paged(ps, joint.view)});
    rows.push_back({"  side by side, plain read", paged_read(ps, joint.view)});
  }
  const double read1 = bench::roofline_detail::read_bandwidth(kThreads) * 1e-9;
  const double read = std::max(read0, read1);
  std::printf("read roofline (%d threads): %.1f GB/s before, %.1f after\n", kThreads, read0, read1);
  std::printf("%-28s %10s %8s %9s\n", "case", "GB/s", "bw_frac", "per pass");
  for (const auto& r : rows) std::printf("%-28s %10.2f %8.2f %9.2f\n", r.name, r.r.gbps, r.r.gbps / read, r.r.ratio);
}
