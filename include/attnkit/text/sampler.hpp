// attnkit/text/sampler.hpp — picks the next token from a row of logits.
//
// Contract: Sampler applies, in this order (Hugging Face's warpers, llama.cpp's chain but with
// the temperature before top-p / min-p as in Hugging Face):
//   1. repeat penalty over the distinct ids among the last repeat_last_n tokens of the history
//      (CTRL / Hugging Face form: a positive logit is divided by the penalty, a negative one
//      multiplied; 1 = off),
//   2. top-k: the k largest logits (0 = off; ties at the boundary keep the lower id),
//   3. temperature: logits / T,
//   4. softmax,
//   5. top-p: the smallest set of most probable tokens whose probability sums to >= p (1 = off),
//   6. min-p: drop tokens with p < min_p * p_max (0 = off),
//   7. renormalise and draw.
// Greedy when temperature == 0 or top_k == 1: the argmax of the penalised logits, the lowest id
// on ties; no random number is drawn. probabilities() returns the final distribution over the
// whole row (one-hot when greedy) so tests can compare draws with it.
// Reproducible: the generator is std::mt19937_64 (its output is fixed by the C++ standard) and
// the uniform draw is made here from its 53 high bits (std::*_distribution's output differs
// between standard libraries); the same seed, options, logits and history give the same ids.
// Logits may hold -inf (masked ids) but not NaN or +inf; errors are attnkit::Error naming the
// function and the argument.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "attnkit/core/error.hpp"

namespace attnkit::text {

struct SamplerOptions {
  double temperature = 1.0;     // 0: greedy
  std::int64_t top_k = 0;       // 0: off; 1: greedy
  double top_p = 1.0;           // in (0, 1]; 1: off
  double min_p = 0.0;           // in [0, 1]; 0: off
  double repeat_penalty = 1.0;  // > 0; 1: off
  std::int64_t repeat_last_n = 64;  // tokens of the history the penalty looks at; -1: all, 0: off
  std::uint64_t seed = 0;

  // Throws attnkit::Error "<who>: <option>: <problem>" for values outside the ranges above.
  void validate(const char* who = "SamplerOptions") const {
    ATTNKIT_REQUIRE(std::isfinite(temperature) && temperature >= 0, who, ": temperature: must be >= 0, got ", temperature);
    ATTNKIT_REQUIRE(top_k >= 0, who, ": top_k: must be >= 0 (0 = off), got ", top_k);
    ATTNKIT_REQUIRE(top_p > 0 && top_p <= 1, who, ": top_p: must be in (0, 1], got ", top_p);
    ATTNKIT_REQUIRE(min_p >= 0 && min_p <= 1, who, ": min_p: must be in [0, 1], got ", min_p);
    ATTNKIT_REQUIRE(std::isfinite(repeat_penalty) && repeat_penalty > 0, who, ": repeat_penalty: must be > 0, got ",
                    repeat_penalty);
    ATTNKIT_REQUIRE(repeat_last_n >= -1, who, ": repeat_last_n: must be >= -1 (-1 = all, 0 = off), got ", repeat_last_n);
  }
  bool greedy() const { return temperature == 0 || top_k == 1; }
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& opt = {}) : opt_(opt), rng_(opt.seed) { opt_.validate("Sampler"); }

  const SamplerOptions& options() const { return opt_; }
  bool greedy() const { return opt_.greedy(); }
  // Restarts the random sequence (same seed: the same draws again).
  void reseed(std::uint64_t seed) {
    opt_.seed = seed;
    rng_.seed(seed);
  }

  // The next token for `logits` [V] given the tokens so far (prompt and generated; only the
  // last repeat_last_n matter).
  std::int64_t sample(std::span<const float> logits, std::span<const std::int64_t> history) {
    std::vector<double> z = penalised(logits, history, "Sampler::sample");
    if (greedy()) return argmax(z);
    std::vector<Candidate> c = distribution(z);
    const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;  // uniform in [0, 1)
    double total = 0;
    for (const auto& x : c) total += x.p;
    const double target = u * total;
    double cum = 0;
    for (const auto& x : c) {
      cum += x.p;
      if (cum > target) return x.id;
    }
    return c.back().id;  // target within rounding of the total
  }

  // The distribution sample() draws from, over the whole row [V] (zeros where filtered).
  std::vector<double> probabilities(std::span<const float> logits, std::span<const std::int64_t> history) const {
    std::vector<double> z = penalised(logits, history, "Sampler::probabilities");
    std::vector<double> p(z.size(), 0.0);
    if (greedy()) {
      p[static_cast<std::size_t>(argmax(z))] = 1.0;
      return p;
    }
    const std::vector<Candidate> c = distribution(z);
    double total = 0;
    for (const auto& x : c) total += x.p;
    for (const auto& x : c) p[static_cast<std::size_t>(x.id)] = x.p / total;
    return p;
  }

 private:
  struct Candidate {
    std::int64_t id;
    double z;  // penalised logit
    double p;  // probability (unnormalised once filters drop candidates)
  };

  // Checked copy of the logits with the repeat penalty applied.
  std::vector<double> penalised(std::span<const float> logits, std::span<const std::int64_t> history,
                                const char* who) const {
    const auto V = static_cast<std::int64_t>(logits.size());
    ATTNKIT_REQUIRE(V > 0, who, ": argument 'logits': empty");
    std::vector<double> z(logits.begin(), logits.end());
    bool any = false;
    for (std::int64_t i = 0; i < V; ++i) {
      const double v = z[static_cast<std::size_t>(i)];
      ATTNKIT_REQUIRE(!std::isnan(v) && v != std::numeric_limits<double>::infinity(), who,
                      ": argument 'logits': entry ", i, " is ", v, " (NaN or +inf)");
      any = any || v != -std::numeric_limits<double>::infinity();
    }
    ATTNKIT_REQUIRE(any, who, ": argument 'logits': every entry is -inf");
    if (opt_.repeat_penalty != 1.0 && opt_.repeat_last_n != 0) {
      const std::size_t n = opt_.repeat_last_n < 0 ? history.size()
                                                   : std::min(history.size(), static_cast<std::size_t>(opt_.repeat_last_n));
      std::vector<char> seen(z.size(), 0);  // each distinct id is penalised once
      for (std::size_t i = history.size() - n; i < history.size(); ++i) {
        const std::int64_t id = history[i];
        ATTNKIT_REQUIRE(id >= 0 && id < V, who, ": argument 'history': token id ", id, " at index ", i,
                        " outside the logits row [0, ", V, ")");
        const auto k = static_cast<std::size_t>(id);
        if (seen[k]) continue;
        seen[k] = 1;
        z[k] = z[k] > 0 ? z[k] / opt_.repeat_penalty : z[k] * opt_.repeat_penalty;
      }
    }
    return z;
  }

  static std::int64_t argmax(const std::vector<double>& z) {
    std::size_t best = 0;
    for (std::size_t i = 1; i < z.size(); ++i)
      if (z[i] > z[best]) best = i;  // strict: ties keep the lower id
    return static_cast<std::int64_t>(best);
  }

  // Steps 2-6: the surviving candidates with unnormalised probabilities p (most probable first
  // when top-k or top-p sorted them, else in id order; either order is fixed).
  std::vector<Candidate> distribution(const std::vector<double>& z) const {
    std::vector<Candidate> c;
    c.reserve(z.size());
    for (std::size_t i = 0; i < z.size(); ++i)
      if (z[i] != -std::numeric_limits<double>::infinity()) c.push_back({static_cast<std::int64_t>(i), z[i], 0.0});
    // A total order (logit descending, then id ascending), so ties resolve the same everywhere.
    const auto before = [](const Candidate& a, const Candidate& b) { return a.z > b.z || (a.z == b.z && a.id < b.id); };
    bool sorted = false;
    if (opt_.top_k > 0 && opt_.top_k < static_cast<std::int64_t>(c.size())) {
      std::nth_element(c.begin(), c.begin() + opt_.top_k, c.end(), before);
      c.resize(static_cast<std::size_t>(opt_.top_k));
      std::sort(c.begin(), c.end(), before);
      sorted = true;
    }
    double zmax = -std::numeric_limits<double>::infinity();
    for (const auto& x : c) zmax = std::max(zmax, x.z);
    double sum = 0;
    for (auto& x : c) {
      x.p = std::exp((x.z - zmax) / opt_.temperature);
      sum += x.p;
    }
    for (auto& x : c) x.p /= sum;
    if (opt_.top_p < 1.0) {
      // The most probable first (by logit = by probability). Without top-k, sorting a whole
      // vocabulary costs ~15 ms a token: sort a growing head instead until it reaches top_p
      // (same order as a full sort, the comparator being total).
      std::size_t head = sorted ? c.size() : std::min<std::size_t>(c.size(), 64);
      for (;;) {
        if (!sorted) {
          if (head < c.size()) std::nth_element(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(head), c.end(), before);
          std::sort(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(head), before);
        }
        double cum = 0;
        std::size_t keep = 0;
        for (std::size_t i = 0; i < head && keep == 0; ++i) {
          cum += c[i].p;
          if (cum >= opt_.top_p) keep = i + 1;
        }
        if (keep > 0 || head == c.size()) {
          c.resize(keep > 0 ? keep : c.size());
          break;
        }
        head = std::min(c.size(), head * 8);
      }
    }
    if (opt_.min_p > 0.0) {
      double pmax = 0;
      for (const auto& x : c) pmax = std::max(pmax, x.p);
      const double floor = opt_.min_p * pmax;
      std::erase_if(c, [&](const Candidate& x) { return x.p < floor; });
    }
    return c;
  }

  SamplerOptions opt_;
  std::mt19937_64 rng_;
};

}  // namespace attnkit::text
