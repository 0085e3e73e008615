// Core pieces: bf16 conversion, SIMD helpers, views, the model's small ops (RMSNorm, RoPE,
// SiLU) against float64 definitions.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <atomic>
#include <chrono>
#include <vector>

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"
#include "attnkit/model/ops.hpp"
#include "test_util.hpp"

using namespace attnkit;

TEST_CASE("bf16 rounds to nearest even and keeps NaN / inf", "[core]") {
  auto bits = [](float f) { return bf16(f).bits; };
  CHECK(bits(1.0f) == 0x3f80);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
  CHECK(bits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
  CHECK(bits(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  CHECK(bits(-2.0f) == 0xc000);
  CHECK(std::isnan(to_float(bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(to_float(bf16(std::numeric_limits<float>::infinity()))));
  CHECK(std::isinf(to_float(bf16(std::numeric_limits<float>::max()))));  // rounds past the largest bf16
  // Vector conversion equals the scalar one on random data (with tails).
  test::Rng rng(test::fresh_seed());
  for (std::int64_t n : {1, 15, 16, 17, 100, 1027}) {
    auto x = rng.normal_vec(static_cast<std::size_t>(n), 100.f);
    std::vector<bf16> a(x.size()), b(x.size());
    simd::to_bf16(x.data(), a.data(), n);
    for (std::int64_t i = 0; i < n; ++i) b[i] = bf16(x[i]);
    CHECK(test::bit_equal(a, b));
  }
}

TEST_CASE("SIMD dot products, exp2, SiLU and tanh against float64", "[core]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (std::int64_t n : {0, 1, 7, 16, 31, 32, 33, 64, 129, 1000}) {
    CAPTURE(n);
    auto a = rng.normal_vec(static_cast<std::size_t>(n)), b = rng.normal_vec(static_cast<std::size_t>(n));
    std::vector<bf16> ab(a.size()), bb(b.size());
    for (std::size_t i = 0; i < a.size(); ++i) ab[i] = bf16(a[i]), bb[i] = bf16(b[i]);
    double ref = 0, ref_b = 0, norm = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      ref += double(a[i]) * b[i];
      ref_b += double(to_float(ab[i])) * to_float(bb[i]);
      norm += std::abs(double(a[i]) * b[i]);
    }
    const double tol = 1e-6 * (norm + 1);
    CHECK(std::abs(simd::dot(a.data(), b.data(), n) - ref) <= tol);
    CHECK(std::abs(simd::dot(a.data(), bb.data(), n) - [&] {
            double r = 0;
            for (std::int64_t i = 0; i < n; ++i) r += double(a[i]) * to_float(bb[i]);
            return r;
          }()) <= tol);
    CHECK(std::abs(simd::dot_bf16(ab.data(), bb.data(), n) - ref_b) <= tol);
  }
  using B = simd::fbatch<>;
  constexpr std::size_t W = B::size;
  alignas(64) float in[W], out[W];
  double worst_exp = 0, worst_silu = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    for (auto& x : in) x = rng.uniform(-120.f, 0.f);
    simd::exp2_nonpositive<simd::default_arch>(B::load_aligned(in)).store_aligned(out);
    for (std::size_t i = 0; i < W; ++i) worst_exp = std::max(worst_exp, std::abs(out[i] / std::exp2(double(in[i])) - 1));
    for (auto& x : in) x = rng.uniform(-30.f, 30.f);
    simd::silu<simd::default_arch>(B::load_aligned(in)).store_aligned(out);
    for (std::size_t i = 0; i < W; ++i) {
      const double r = in[i] / (1 + std::exp(-double(in[i])));
      worst_silu = std::max(worst_silu, std::abs(out[i] - r) / std::max(1e-30, std::abs(r)));
    }
  }
  // tanh (the soft-cap variant): absolute error over the whole range, relative near 0.
  double worst_tanh = 0, worst_tanh_rel = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const float span = trial % 3 == 0 ? 12.f : trial % 3 == 1 ? 0.01f : 0.26f;  // 0.26: both tanh paths
    for (auto& x : in) x = rng.uniform(-span, span);
    if (trial == 0) in[0] = 0.f, in[1] = 40.f, in[2] = -1e5f;
    simd::tanh<simd::default_arch>(B::load_aligned(in)).store_aligned(out);
    for (std::size_t i = 0; i < W; ++i) {
      const double r = std::tanh(double(in[i]));
      worst_tanh = std::max(worst_tanh, std::abs(out[i] - r));
      if (r != 0) worst_tanh_rel = std::max(worst_tanh_rel, std::abs(out[i] - r) / std::abs(r));
      else CHECK(out[i] == 0.f);
    }
  }
  // A dense sweep of [-12, 12] measured 3.1e-7 (-O3) and 4.4e-7 (-O1, the ASan build), about
  // 7 ulp of values near 1: the rational fit plus the reciprocal's Newton step.
  CHECK(worst_tanh <= 6e-7);
  CHECK(worst_tanh_rel <= 8e-7);
  CHECK(worst_exp <= 4e-7);   // about 1 ulp
  // x * log2(e) is rounded to float: relative error ~|x| * 6e-8 in the exponent, ~2e-6 at |x| = 30.
  CHECK(worst_silu <= 4e-6);
  for (auto& x : in) x = -std::numeric_limits<float>::infinity();
  simd::exp2_nonpositive<simd::default_arch>(B::load_aligned(in)).store_aligned(out);
  for (float o : out) CHECK(o == 0.f);  // masked logits contribute exactly nothing
}

TEST_CASE("views: strides, slices, const conversion, checks", "[core]") {
  std::vector<float> buf(4 * 5 * 6);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  View3<float> v(buf.data(), {4, 5, 6});
  CHECK(v(2, 3, 4) == 2 * 30 + 3 * 6 + 4);
  CHECK(v.contiguous());
  ConstView3<float> c = v.slice(1, 1, 4);
  CHECK(c.shape[1] == 3);
  CHECK(c(0, 0, 0) == 6);
  CHECK_FALSE(c.contiguous());
  View3<float> bad(buf.data(), {4, 5, 3}, {30, 6, 2});
  REQUIRE_THROWS_WITH(check_view(bad, "f", "x"), Catch::Contains("f: argument 'x': the last dimension must be contiguous"));
  View3<float> null(nullptr, {1, 1, 1});
  REQUIRE_THROWS_WITH(check_view(null, "f", "x"), Catch::Contains("null data pointer"));
}

TEST_CASE("model ops against float64: RMSNorm, RoPE (rotate-half), SiLU*up", "[core][model]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::int64_t T = 13, H = 3, d = 24, D = 37, I = 45;
  // RMSNorm
  auto x = rng.normal_vec(T * D, 3.f), w = rng.normal_vec(D);
  std::vector<float> y(x.size());
  test::poison(y);
  ops::rms_norm(View2<float>(x.data(), {T, D}), w.data(), 1e-6f, View2<float>(y.data(), {T, D}), 2);
  std::vector<double> ref(x.size());
  for (std::int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (std::int64_t i = 0; i < D; ++i) ss += double(x[t * D + i]) * x[t * D + i];
    const double inv = 1 / std::sqrt(ss / D + 1e-6);
    for (std::int64_t i = 0; i < D; ++i) ref[t * D + i] = w[i] * x[t * D + i] * inv;
  }
  CHECK(test::rel_l2(y, ref) <= 1e-6);
  // RoPE at positions 100..112, theta 1e6, pairs (i, i + d/2)
  auto q = rng.normal_vec(T * H * d);
  auto qr = q;
  ops::Rope rope(d, 1e6);
  rope.apply(View3<float>(qr.data(), {T, H, d}), 100);
  std::vector<double> rr(q.size());
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < d / 2; ++i) {
        const double inv_freq = std::pow(1e6, -2.0 * i / d), a = (100 + t) * inv_freq;
        const double x0 = q[(t * H + h) * d + i], x1 = q[(t * H + h) * d + i + d / 2];
        rr[(t * H + h) * d + i] = x0 * std::cos(a) - x1 * std::sin(a);
        rr[(t * H + h) * d + i + d / 2] = x1 * std::cos(a) + x0 * std::sin(a);
      }
  CHECK(test::rel_l2(qr, rr) <= 1e-5);  // the angle is formed in float32, as transformers does
  REQUIRE_THROWS_WITH(ops::Rope(7, 1e6), Catch::Contains("must be positive and even"));
  // SiLU(gate) * up
  auto gu = rng.normal_vec(T * 2 * I, 4.f);
  std::vector<float> act(static_cast<std::size_t>(T * I));
  test::poison(act);
  ops::silu_mul(View2<float>(gu.data(), {T, 2 * I}), View2<float>(act.data(), {T, I}), 2);
  std::vector<double> ra(act.size());
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t i = 0; i < I; ++i) {
      const double g = gu[t * 2 * I + i], u = gu[t * 2 * I + I + i];
      ra[t * I + i] = g / (1 + std::exp(-g)) * u;
    }
  CHECK(test::rel_l2(act, ra) <= 1e-6);
  REQUIRE_THROWS_WITH(ops::silu_mul(View2<float>(gu.data(), {T, 2 * I}), View2<float>(act.data(), {T, I - 1})),
                      Catch::Contains("silu_mul: argument 'act'"));
}

TEST_CASE("parallel_for runs every item once and carries worker exceptions to the caller", "[core]") {
  for (bool dynamic : {false, true}) {
    std::vector<int> hits(1000, 0);
    parallel_for(1000, 2, [&](std::int64_t i) { hits[i] += 1; }, dynamic);
    CHECK(std::count(hits.begin(), hits.end(), 1) == 1000);
    REQUIRE_THROWS_WITH(parallel_for(64, 2, [&](std::int64_t i) {
                          if (i == 37) throw Error("item 37 failed");
                        }, dynamic),
                        Catch::Contains("item 37 failed"));
  }
}

TEST_CASE("attnkit's workers: nested loops, several caller threads, sleeping workers, team barriers", "[core]") {
  // Every item once, whatever runs it: attnkit's workers (the default), OpenMP (pool off), a
  // loop inside a job (runs on its thread), callers racing for the pool (the losers on OpenMP).
  for (const bool pool : {true, false}) {
    set_worker_pool(pool);
    for (const int threads : {2, 3, 5}) {
      std::vector<std::atomic<int>> hits(300);
      parallel_for(30, threads, [&](std::int64_t i) {
        parallel_for(10, threads, [&](std::int64_t j) { hits[static_cast<std::size_t>(i * 10 + j)].fetch_add(1); });
      });
      for (auto& h : hits) REQUIRE(h.load() == 1);
    }
    std::atomic<std::int64_t> sum{0};
    std::vector<std::thread> callers;
    for (int c = 0; c < 4; ++c)
      callers.emplace_back([&] {
        for (int rep = 0; rep < 200; ++rep)
          parallel_for(64, 2, [&](std::int64_t i) { sum.fetch_add(i + 1); }, rep % 2 == 1);
      });
    for (auto& c : callers) c.join();
    CHECK(sum.load() == 4 * 200 * (64 * 65 / 2));
  }
  set_worker_pool(true);
  // Workers that sleep at once between jobs must still wake for each (a lost wake-up hangs here).
  set_worker_spin_us(0);
  std::int64_t total = 0;
  for (int rep = 0; rep < 500; ++rep) {
    std::atomic<int> n{0};
    parallel_for(2, 2, [&](std::int64_t) { n.fetch_add(1); });  // 2: within any CI machine's CPUs
    total += n.load();
    if (rep % 50 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  set_worker_spin_us(200);
  CHECK(total == 1000);
  // run_team: all members meet at barriers; a member that throws breaks them for the others and
  // its exception reaches the caller.
  for (const bool pool : {true, false}) {
    set_worker_pool(pool);
    std::vector<int> phase(3, 0);
    std::atomic<int> bad{0};
    run_team(2, [&](int t, int nt) {  // 2: on the workers wherever the machine has 2 CPUs
      phase[static_cast<std::size_t>(t)] = 1;
      team_barrier(nt);
      for (int u = 0; u < nt; ++u)
        if (phase[static_cast<std::size_t>(u)] != 1) bad.fetch_add(1);
    });
    CHECK(bad.load() == 0);
    REQUIRE_THROWS_WITH(run_team(2, [&](int t, int nt) {
                          if (t == 1) throw Error("member 1 failed");
                          team_barrier(nt);
                          team_barrier(nt);
                        }),
                        Catch::Contains("member 1 failed"));
  }
  set_worker_pool(true);
}

TEST_CASE("StealingRanges hands out every item once, own ranges first", "[core]") {
  // n items over `ranges` ranges, claimed by `team` threads (team <= ranges: the ranges of
  // threads that never come are stolen); grains 1..5, steal grains 1..3; hits counted atomically.
  for (const std::int64_t n : {0, 1, 7, 64, 1001})
    for (const int ranges : {1, 2, 3, 8})
      for (const int team : {1, 2, 3})
        for (const std::int64_t grain : {1, 5})
          for (const std::int64_t steal : {1, 3}) {
            if (team > ranges) continue;
            INFO("n " << n << " ranges " << ranges << " team " << team << " grain " << grain << " steal " << steal);
            StealingRanges sr(n, ranges);
            std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
            std::atomic<int> oversized{0};  // Catch's CHECK is not for worker threads
            std::vector<std::thread> workers;
            for (int t = 0; t < team; ++t)
              workers.emplace_back([&, t] {
                for (auto r = sr.next(t, grain, steal); r.first < r.second; r = sr.next(t, grain, steal)) {
                  if (r.second - r.first > std::max(grain, steal)) oversized.fetch_add(1);
                  for (std::int64_t i = r.first; i < r.second; ++i) hits[i].fetch_add(1);
                }
              });
            for (auto& w : workers) w.join();
            for (std::int64_t i = 0; i < n; ++i) REQUIRE(hits[i].load() == 1);
            CHECK(oversized.load() == 0);
          }
  // One thread alone: its own range front to back in grains, then the back of the fullest other
  // range (the first with most items on a tie), a steal grain at a time.
  StealingRanges sr(10, 2);  // ranges [0, 5) and [5, 10)
  using R = std::pair<std::int64_t, std::int64_t>;
  CHECK(sr.next(0, 2, 3) == R{0, 2});
  CHECK(sr.next(0, 2, 3) == R{2, 4});
  CHECK(sr.next(0, 2, 3) == R{4, 5});
  CHECK(sr.next(0, 2, 3) == R{7, 10});
  CHECK(sr.next(1, 2, 3) == R{5, 7});
  CHECK(sr.next(1, 2, 3) == R{0, 0});  // all claimed
  CHECK(sr.next(0, 2, 3) == R{0, 0});
}
