// benchmarks/experiments/paged_lengths_ab.cpp — paged bf16 decode of B 8 sequences of mixed
// lengths (512-8192) against 8 x 8192 in one process, the cases alternated round by round so
// that the host's drift falls on all of them: 2 threads and 1, and the mixed batch with chunks
// of 256 and 1024 keys beside the default 512. Pages of 16 shuffled through >= 2 GiB per batch
// (benchmarks/paged_sets.hpp), Qwen3-0.6B heads. Prints each case's median GB/s, its ratio to
// 8 x 8192 on 2 threads, and its fraction of the read roofline taken after the rounds.
// Used on 2026-12-04 (docs/performance.md, "Attention on AMX tiles", late that day). Not built by CMake:
//   g++ -std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude -Ibenchmarks \
//       benchmarks/experiments/paged_lengths_ab.cpp -o paged_lengths_ab && ./paged_lengths_ab 11
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "paged_sets.hpp"
#include "roofline.hpp"

using namespace attnkit;
using clk = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Case {
  const char* name;
  const bench::PagedSetsT<bf16>* sets;
  int threads;
  std::int64_t chunk;  // opt.kv_chunk (0: the default)
  std::vector<double> gbps;
};

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 7;
  const bench::PagedSetsT<bf16> mixed(bench::paged_bench_lengths(0), 16), full(bench::paged_bench_lengths(8192), 16);
  constexpr std::int64_t B = 8, H = bench::PagedSetsT<bf16>::H, d = bench::PagedSetsT<bf16>::d;
  std::vector<float> q(B * H * d), out(B * H * d);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(std::sin(double(i)));
  std::vector<Case> cases = {{"mixed, 2 threads", &mixed, 2, 0, {}},       {"8 x 8192, 2 threads", &full, 2, 0, {}},
                             {"mixed, 1 thread", &mixed, 1, 0, {}},        {"8 x 8192, 1 thread", &full, 1, 0, {}},
                             {"mixed, chunk 256", &mixed, 2, 256, {}},     {"8 x 8192, chunk 256", &full, 2, 256, {}},
                             {"mixed, chunk 1024", &mixed, 2, 1024, {}}};
  const auto pass = [&](const Case& c) {
    DecodeOptions opt;
    opt.num_threads = c.threads;
    opt.kv_chunk = c.chunk;
    const auto t0 = clk::now();
    for (std::int64_t s = 0; s < c.sets->n_sets; ++s)
      attention_decode_paged<bf16>(ConstView3<float>(q.data(), {B, H, d}), c.sets->pool.view(), c.sets->table(s),
                                   View3<float>(out.data(), {B, H, d}), opt);
    return double(c.sets->bytes) * c.sets->n_sets / std::chrono::duration<double>(clk::now() - t0).count() * 1e-9;
  };
  for (const auto& c : cases) pass(c);  // warm-up
  for (int r = 0; r < rounds; ++r)
    for (auto& c : cases) c.gbps.push_back(pass(c));
  const double read = bench::roofline_detail::read_bandwidth(2) * 1e-9;
  std::printf("read roofline (2 threads, after the rounds): %.1f GB/s; a call reads %.1f MB (mixed), %.1f MB (8 x 8192)\n",
              read, mixed.bytes / 1e6, full.bytes / 1e6);
  const double base = median(cases[1].gbps);
  for (const auto& c : cases)
    std::printf("%-22s %7.2f GB/s  %.3f of 8 x 8192 on 2 threads  bw_frac %.2f\n", c.name, median(c.gbps),
                median(c.gbps) / base, median(c.gbps) / read);
}
