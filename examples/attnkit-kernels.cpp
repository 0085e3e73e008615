// attnkit-kernels — runs causal prefill, sliding-window prefill, decode and Loop Attention on random data of
// Qwen3-0.6B's attention shape, prints each kernel's agreement with a float64 reference (on a
// short sequence) and its speed (on a long one).
//
//   attnkit-kernels [--threads N] [--T 2048] [--window 512]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attnkit/attnkit.hpp"

using namespace attnkit;

namespace {

// out[t, h, :] over keys [lo(t), t + off] — the plain float64 definition (spec §2, §3).
std::vector<double> reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                              std::int64_t Tq, std::int64_t Tk, std::int64_t H, std::int64_t Hkv, std::int64_t d,
                              std::int64_t window) {
  std::vector<double> out(static_cast<std::size_t>(Tq * H * d), 0.0);
  const std::int64_t off = Tk - Tq, G = H / Hkv;
  for (std::int64_t t = 0; t < Tq; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t p = off + t, g = h / G, lo = window ? std::max<std::int64_t>(0, p - window + 1) : 0;
      std::vector<double> s(static_cast<std::size_t>(p - lo + 1));
      double m = -INFINITY, l = 0;
      for (std::int64_t j = lo; j <= p; ++j) {
        double dot = 0;
        for (std::int64_t i = 0; i < d; ++i) dot += double(q[(t * H + h) * d + i]) * k[(j * Hkv + g) * d + i];
        s[j - lo] = dot / std::sqrt(double(d));
        m = std::max(m, s[j - lo]);
      }
      for (auto& x : s) l += (x = std::exp(x - m));
      for (std::int64_t j = lo; j <= p; ++j)
        for (std::int64_t i = 0; i < d; ++i) out[(t * H + h) * d + i] += s[j - lo] / l * v[(j * Hkv + g) * d + i];
    }
  return out;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double n = 0, r = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += (a[i] - b[i]) * (a[i] - b[i]);
    r += b[i] * b[i];
  }
  return std::sqrt(n / r);
}

std::vector<float> randn(std::size_t n, std::mt19937& g) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

template <class F>
double best_seconds(F&& f, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t T = 2048, W = 512;
  int threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::stoi(argv[i + 1]);
    else if (a == "--T") T = std::stoll(argv[i + 1]);
    else if (a == "--window") W = std::stoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: attnkit-kernels [--threads N] [--T N] [--window W]\n");
      return 1;
    }
  }
  const std::int64_t H = 16, Hkv = 8, d = 128;
  std::mt19937 gen(42);
  std::printf("attention shape: H=%lld, H_kv=%lld, d=%lld, threads=%d\n", (long long)H, (long long)Hkv, (long long)d,
              resolve_threads(threads));

  // Agreement on a short sequence with a ragged length.
  {
    const std::int64_t t = 181, w = 37;
    auto q = randn(t * H * d, gen), k = randn(t * Hkv * d, gen), v = randn(t * Hkv * d, gen);
    std::vector<float> o(q.size());
    ConstView3<float> qv(q.data(), {t, H, d}), kv(k.data(), {t, Hkv, d}), vv(v.data(), {t, Hkv, d});
    AttentionOptions opt;
    opt.num_threads = threads;
    attention_prefill<float>(qv, kv, vv, View3<float>(o.data(), {t, H, d}), CausalMask{}, opt);
    std::printf("causal prefill   T=%lld: relative L2 error vs float64 reference %.2e\n", (long long)t,
                rel_err(o, reference(q, k, v, t, t, H, Hkv, d, 0)));
    attention_prefill<float>(qv, kv, vv, View3<float>(o.data(), {t, H, d}), SlidingWindowMask{w}, opt);
    std::printf("sliding prefill  T=%lld W=%lld: relative L2 error %.2e\n", (long long)t, (long long)w,
                rel_err(o, reference(q, k, v, t, t, H, Hkv, d, w)));
    std::vector<float> o1(H * d);
    DecodeOptions dopt;
    dopt.num_threads = threads;
    attention_decode<float>(ConstView2<float>(q.data() + (t - 1) * H * d, {H, d}), kv, vv, View2<float>(o1.data(), {H, d}),
                            dopt);
    std::vector<float> qlast(q.end() - H * d, q.end());
    std::printf("decode           T_kv=%lld: relative L2 error %.2e\n", (long long)t,
                rel_err(o1, reference(qlast, k, v, 1, t, H, Hkv, d, 0)));

    // Loop Attention (layer reading: local keys = global keys): g·global + (1 - g)·local with
    // g = sigmoid(gate_w[h]·q + gate_b[h]), the reference blended in float64.
    auto gw = randn(H * d, gen);
    for (auto& x : gw) x /= std::sqrt(float(d));
    std::vector<float> gb(H, 0.25f);
    LoopOptions lopt;
    lopt.num_threads = threads;
    loop_attention<float>(qv, kv, vv, kv, vv, ConstView2<float>(gw.data(), {H, d}), gb, w,
                          View3<float>(o.data(), {t, H, d}), lopt);
    const auto glob = reference(q, k, v, t, t, H, Hkv, d, 0), loc = reference(q, k, v, t, t, H, Hkv, d, w);
    std::vector<double> blend(glob.size());
    for (std::int64_t r = 0; r < t * H; ++r) {
      double z = gb[r % H];
      for (std::int64_t i = 0; i < d; ++i) z += double(gw[(r % H) * d + i]) * q[r * d + i];
      const double g = 1 / (1 + std::exp(-z));
      for (std::int64_t i = 0; i < d; ++i) blend[r * d + i] = g * glob[r * d + i] + (1 - g) * loc[r * d + i];
    }
    std::printf("loop attention   T=%lld W=%lld: relative L2 error %.2e\n", (long long)t, (long long)w, rel_err(o, blend));
  }

  // Speed on Qwen3-0.6B-shaped attention.
  auto q = randn(T * H * d, gen), k = randn(T * Hkv * d, gen), v = randn(T * Hkv * d, gen);
  std::vector<float> o(q.size());
  ConstView3<float> qv(q.data(), {T, H, d}), kv(k.data(), {T, Hkv, d}), vv(v.data(), {T, Hkv, d});
  AttentionOptions opt;
  opt.num_threads = threads;
  const double pairs_causal = double(T) * (T + 1) / 2;
  const double tc = best_seconds([&] { attention_prefill<float>(qv, kv, vv, View3<float>(o.data(), {T, H, d}), CausalMask{}, opt); }, 3);
  std::printf("causal prefill   T=%lld: %.1f ms, %.1f GFLOP/s\n", (long long)T, tc * 1e3, 4.0 * d * H * pairs_causal / tc / 1e9);
  double pairs_w = 0;
  for (std::int64_t t = 0; t < T; ++t) pairs_w += std::min<std::int64_t>(t + 1, W);
  const double ts = best_seconds([&] { attention_prefill<float>(qv, kv, vv, View3<float>(o.data(), {T, H, d}), SlidingWindowMask{W}, opt); }, 3);
  std::printf("sliding prefill  T=%lld W=%lld: %.1f ms, %.1f GFLOP/s\n", (long long)T, (long long)W, ts * 1e3,
              4.0 * d * H * pairs_w / ts / 1e9);
  {
    std::vector<float> gw(H * d, 0.01f), gb(H, 0.f);
    LoopOptions lopt;
    lopt.num_threads = threads;
    const std::int64_t lw = 64;
    const double tl = best_seconds([&] {
      loop_attention<float>(qv, kv, vv, kv, vv, ConstView2<float>(gw.data(), {H, d}), gb, lw,
                            View3<float>(o.data(), {T, H, d}), lopt);
    }, 3);
    std::printf("loop attention   T=%lld W=%lld (fused): %.1f ms, %.2fx causal prefill\n", (long long)T, (long long)lw,
                tl * 1e3, tl / tc);
  }
  DecodeOptions dopt;
  dopt.num_threads = threads;
  std::vector<float> o1(H * d);
  const double td = best_seconds([&] {
    attention_decode<float>(ConstView2<float>(q.data(), {H, d}), kv, vv, View2<float>(o1.data(), {H, d}), dopt);
  }, 5);
  std::printf("decode           T_kv=%lld: %.3f ms, %.1f GB/s of K/V (cache-warm; see attnkit-bench for DRAM)\n",
              (long long)T, td * 1e3, 2.0 * T * Hkv * d * 4 / td / 1e9);
  return 0;
}
