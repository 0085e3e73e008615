// Uses one kernel through the installed package: causal attention on a small random problem,
// checked against a direct softmax computed here.
#include <attnkit/attnkit.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const std::int64_t T = 37, H = 4, Hkv = 2, d = 32;
  std::mt19937 gen(1);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> q(T * H * d), k(T * Hkv * d), v(T * Hkv * d), o(T * H * d);
  for (auto* b : {&q, &k, &v})
    for (auto& x : *b) x = n(gen);
  attnkit::attention_prefill<float>(attnkit::ConstView3<float>(q.data(), {T, H, d}),
                                    attnkit::ConstView3<float>(k.data(), {T, Hkv, d}),
                                    attnkit::ConstView3<float>(v.data(), {T, Hkv, d}),
                                    attnkit::View3<float>(o.data(), {T, H, d}));
  double err = 0, ref = 0;
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t g = h / (H / Hkv);
      std::vector<double> s(t + 1);
      double m = -1e300, l = 0;
      for (std::int64_t j = 0; j <= t; ++j) {
        double dot = 0;
        for (std::int64_t i = 0; i < d; ++i) dot += double(q[(t * H + h) * d + i]) * k[(j * Hkv + g) * d + i];
        s[j] = dot / std::sqrt(double(d));
        m = std::max(m, s[j]);
      }
      for (auto& x : s) l += (x = std::exp(x - m));
      for (std::int64_t i = 0; i < d; ++i) {
        double acc = 0;
        for (std::int64_t j = 0; j <= t; ++j) acc += s[j] / l * v[(j * Hkv + g) * d + i];
        err += (acc - o[(t * H + h) * d + i]) * (acc - o[(t * H + h) * d + i]);
        ref += acc * acc;
      }
    }
  const double rel = std::sqrt(err / ref);
  std::printf("consumer: attnkit::attention_prefill relative L2 error %.2e\n", rel);
  return rel < 1e-5 ? 0 : 1;
}
