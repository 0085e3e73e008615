// benchmarks/experiments/quiet_cores.cpp — which CPUs of this process's affinity mask run at
// their full speed now. One thread pinned to each CPU in turn runs the AMX bf16 and fp32 FMA peak
// loops of roofline.hpp briefly (about 30 ms each, best of two); the rates go to stderr, and
// stdout gets the two CPUs with the highest AMX rate (FMA where AMX is not usable), as
// "a,b" for taskset -c.
// Why: the AMX device hosts are VMs of 16 vCPUs (one thread per core as the guest sees it),
// whose vCPUs share physical cores with other tenants' hyperthreads. On 2026-12-04 a scan
// found 3 to 6 of the 16 vCPUs at half the tile rate (908-1318 against 1941-2859 GFLOP/s for
// one thread), which ones changing from one scan to the next, seconds apart; two threads pinned
// to cores 2 and 3 got 2601 GFLOP/s, to 3 and 5 4484, to 2 and 4 1946 within one minute. That
// is the "2x from host to host and from process to process" of the AMX figures (docs/performance.md). The
// reference machine of the issues is a 2-core VM with its own cores, so benchmarks there are
// pinned to the quietest pair found just before each run:
//   taskset -c $(./quiet_cores 2>/dev/null) ./amx_prefill_shapes ...
// Not built by CMake:
//   g++ -std=c++20 -O3 -march=native -fopenmp -DNDEBUG -Iinclude -Ibenchmarks \
//       benchmarks/experiments/quiet_cores.cpp -o quiet_cores
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

#include "roofline.hpp"

int main() {
  using namespace attnkit::bench::roofline_detail;
  cpu_set_t all;
  if (sched_getaffinity(0, sizeof all, &all) != 0) {
    std::perror("sched_getaffinity");
    return 1;
  }
  const bool amx = amx_usable();
  const std::int64_t amx_iters = amx ? calibrate(amx_thread, 0.03) : 0, fma_iters = calibrate(fma_thread, 0.03);
  std::vector<std::pair<double, int>> rate;  // (AMX or FMA GFLOP/s, cpu)
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &all)) continue;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(c, &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) continue;
    double a = 0, f = 0;
    for (int k = 0; k < 2; ++k) {
      if (amx) {
        const auto t0 = clock::now();
        const double work = amx_thread(amx_iters);
        a = std::max(a, work / seconds_since(t0) * 1e-9);
      }
      const auto t0 = clock::now();
      const double work = fma_thread(fma_iters);
      f = std::max(f, work / seconds_since(t0) * 1e-9);
    }
    std::fprintf(stderr, "cpu %2d amx %5.0f fma %4.0f GFLOP/s\n", c, a, f);
    rate.push_back({amx ? a : f, c});
  }
  sched_setaffinity(0, sizeof all, &all);
  if (rate.empty()) return 1;
  std::sort(rate.rbegin(), rate.rend());
  if (rate.size() == 1) std::printf("%d\n", rate[0].second);
  else std::printf("%d,%d\n", rate[0].second, rate[1].second);
}
