// benchmarks/experiments/decode_ab.cpp — two versions of the decode headers in one process,
// alternated round by round over the same kind of data, so that a change of a few percent shows
// through this machine's noise (between processes the same binary's DRAM rate spreads 16-25
// GB/s; within one process, consecutive rounds see the same neighbours). Each version gets its
// own >= 2 GiB of rotated caches (contiguous KVCaches, or PagePool pages shuffled as in
// bench_decode.cpp's decode/paged); a round times one pass of each, in alternating order, and the
// program prints both medians, the median of the per-round ratios B/A, how many rounds B won,
// and a hash of each version's last output (equal hashes: the same bits). Not built by CMake:
// this file is compiled three times,
//   F="-std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG"
//   g++ $F -DAB_NS=ab_a -I<old>/include -c decode_ab.cpp -o a.o
//   g++ $F -DAB_NS=ab_b -I<new>/include -c decode_ab.cpp -o b.o
//   g++ $F -DAB_MAIN -c decode_ab.cpp -o main.o && g++ $F main.o a.o b.o -o decode_ab
//   ./decode_ab <f32|bf16|bf16f|int8|int8f> <T> <rounds>      contiguous, Qwen3-0.6B heads
//   ./decode_ab paged:<bf16|bf16f|int8|int8f> <T, 0: 512..8192 mixed> <P> <rounds>
// (bf16f, int8f: Precision::fast)
//   ./decode_ab linear:<N>:<K>[:<T>] 0 <rounds> T tokens (default 1) through bf16 PackedLinear weights
//   ./decode_ab model:<depth> 0 <rounds>       a Qwen3-0.6B decode step after depth tokens
// AB_ROTATED=<bytes> sets how much cache the contiguous and linear cases rotate over (2 GiB; 0:
// two copies, in cache for short T), AB_CALLS=<n> the calls per timed pass (at least 16).
// ab_a_KV_CHUNK=<keys> / ab_b_KV_CHUNK=<keys> set each side's opt.kv_chunk (the same headers on
// both sides then compare two chunk sizes; the hashes then differ, as the chunks change the bits).
// (the namespace macro renames attnkit in each version, so both link into one program). Used on
// 2026-12-01 for StridedPrefetchingRows (attention/decode.hpp): int8 fast T 8192 1.04-1.06x,
// faster in 116 of 140 rounds, where separate processes had shown nothing but noise.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if defined(AB_MAIN)
#define AB_DECLARE(N)                                                    \
  extern "C" {                                                           \
  void* N##_make(const char* kind, long long T, long long P);            \
  long long N##_bytes(void*);                                            \
  long long N##_sets(void*);                                             \
  void N##_run(void*, long long calls);                                  \
  unsigned long long N##_hash(void*);                                    \
  }
AB_DECLARE(ab_a)
AB_DECLARE(ab_b)
int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s <f32|bf16|bf16f|int8|int8f> T rounds | paged:<bf16|bf16f|int8|int8f> T P rounds\n", argv[0]);
    return 2;
  }
  const bool paged = std::strncmp(argv[1], "paged:", 6) == 0;
  const long long T = std::atoll(argv[2]), P = paged ? std::atoll(argv[3]) : 0;
  const int rounds = std::atoi(argv[paged ? 4 : 3]);
  void* a = ab_a_make(argv[1], T, P);
  void* b = ab_b_make(argv[1], T, P);
  ab_a_run(a, 1);
  ab_b_run(b, 1);
  const char* min_calls = std::getenv("AB_CALLS");  // calls per pass: at least 16, or AB_CALLS
  const long long bytes = ab_a_bytes(a), calls = std::max(ab_a_sets(a), min_calls ? std::atoll(min_calls) : 16ll);
  std::vector<double> ga, gb, ratio;
  for (int r = 0; r < rounds; ++r) {
    double g[2];
    for (int s = 0; s < 2; ++s) {
      const bool run_a = (r + s) % 2 == 0;  // A first in even rounds, B first in odd ones
      const auto t0 = std::chrono::steady_clock::now();
      run_a ? ab_a_run(a, calls) : ab_b_run(b, calls);
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      g[run_a ? 0 : 1] = static_cast<double>(bytes) * static_cast<double>(calls) / sec * 1e-9;
    }
    ga.push_back(g[0]);
    gb.push_back(g[1]);
    ratio.push_back(g[1] / g[0]);
  }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const long wins = std::count_if(ratio.begin(), ratio.end(), [](double x) { return x > 1; });
  std::printf("%s T %lld%s: A %.2f GB/s, B %.2f GB/s, B/A median %.3f, B faster in %ld of %d rounds; hashes %s\n",
              argv[1], T, paged ? (" P " + std::to_string(P)).c_str() : "", median(ga), median(gb), median(ratio),
              wins, rounds, ab_a_hash(a) == ab_b_hash(b) ? "equal" : "DIFFER");
}
#else
#define attnkit AB_NS  // this version's own namespace
#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/linalg/packed_linear.hpp"
#include "attnkit/model/builtin.hpp"
#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/qwen3.hpp"
#include "../paged_sets.hpp"
#define AB_CAT2(a, b) a##b
#define AB_CAT(a, b) AB_CAT2(a, b)
#define AB_FN(name) AB_CAT(AB_NS, name)
#define AB_STR2(a) #a
#define AB_STR(a) AB_STR2(a)

namespace {
using namespace attnkit;
constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;
// Bytes of caches rotated over: 2 GiB, or AB_ROTATED=<bytes> (AB_ROTATED=0: two caches, so a
// short one stays in cache and the compute shows alone).
const std::int64_t kRotated = [] {
  const char* e = std::getenv("AB_ROTATED");
  return e ? std::atoll(e) : std::int64_t{2} << 30;
}();

struct Case {
  virtual ~Case() = default;
  std::int64_t bytes = 0, sets = 0;
  std::vector<float> q, out;
  virtual void call(std::int64_t i, const DecodeOptions& opt) = 0;
  Precision precision = Precision::exact;
  std::int64_t next = 0;
};

template <class KV>
std::int64_t row_bytes() {
  return kD * static_cast<std::int64_t>(sizeof(KV)) + (std::is_same_v<KV, std::int8_t> ? 4 : 0);
}

std::vector<float> normal(std::int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<std::size_t>(n));
  for (auto& v : x) v = nd(gen);
  return x;
}

template <class KV>
struct Contiguous : Case {
  std::vector<KVCache<KV>> caches;
  explicit Contiguous(std::int64_t T) {
    bytes = 2 * T * kHkv * row_bytes<KV>();
    sets = std::max<std::int64_t>(2, (kRotated + bytes - 1) / bytes);
    const auto src = normal(T * kHkv * kD, 42);
    const ConstView3<float> kv(src.data(), {T, kHkv, kD});
    caches.reserve(static_cast<std::size_t>(sets));
    for (std::int64_t c = 0; c < sets; ++c) {
      caches.emplace_back(kHkv, kD, kD, T);
      caches.back().append(kv, kv);
    }
    q = normal(kH * kD, 43);
    out.resize(q.size());
  }
  void call(std::int64_t i, const DecodeOptions& opt) override {
    const auto& c = caches[static_cast<std::size_t>(i % sets)];
    attention_decode<KV>(ConstView2<float>(q.data(), {kH, kD}), c.keys(), c.values(),
                         View2<float>(out.data(), {kH, kD}), opt);
  }
};

// bench_decode.cpp's decode/paged caches (benchmarks/paged_sets.hpp).
template <class KV>
struct Paged : Case {
  bench::PagedSetsT<KV> ps;
  Paged(std::int64_t T, std::int64_t P) : ps(bench::paged_bench_lengths(T), P) {
    bytes = ps.bytes;
    sets = ps.n_sets;
    q = normal(ps.B * kH * kD, 43);
    out.resize(q.size());
  }
  void call(std::int64_t i, const DecodeOptions& opt) override {
    const auto s = static_cast<std::size_t>(i % sets);
    attention_decode_paged<KV>(ConstView3<float>(q.data(), {ps.B, kH, kD}), ps.pool.view(), ps.table(s),
                               View3<float>(out.data(), {ps.B, kH, kD}), opt);
  }
};
// T tokens (1: a decode GEMV; 2-8: a batch decode step) through bf16 PackedLinear weights [N, K],
// rotated over >= 2 GiB of separately packed copies; bytes counts the weights only. The precision
// does not change the single-token bf16 path; with more tokens `fast` rounds the activations.
struct Linear : Case {
  std::int64_t N, K, T;
  std::vector<PackedLinear> layers;
  Linear(std::int64_t n, std::int64_t k, std::int64_t t) : N(n), K(k), T(t) {
    bytes = N * K * 2;
    sets = std::max<std::int64_t>(2, (kRotated + bytes - 1) / bytes);
    std::vector<float> w = normal(N * K, 42);
    for (auto& x : w) x *= 0.05f;
    for (std::int64_t c = 0; c < sets; ++c) layers.push_back(PackedLinear::pack_as_bf16(w.data(), N, K, K));
    q = normal(K * T, 43);
    out.resize(static_cast<std::size_t>(N * T));
  }
  void call(std::int64_t i, const DecodeOptions& opt) override {
    layers[static_cast<std::size_t>(i % sets)].forward(ConstView2<float>(q.data(), {T, K}),
                                                        View2<float>(out.data(), {T, N}),
                                                        LinearOptions{opt.precision, opt.num_threads, false});
  }
};
// One decode step of a random Qwen3-0.6B (bf16 weights, bf16 cache) after `depth` prompt
// tokens, the caches cut back to depth after each step; bytes: the weights a token streams.
struct ModelStep : Case {
  model::Qwen3Model m;
  model::Session s;
  std::int64_t depth;
  explicit ModelStep(std::int64_t d)
      : m(model::Qwen3Model::random(model::default_registry().parse_config(io::qwen3_0_6b_config().raw, "qwen3-0.6b"),
                                    model::WeightType::bf16, 1)),
        s(m.new_session({model::CacheType::bf16, d + 8})),
        depth(d) {
    bytes = m.streamed_bytes_per_token();
    sets = 16;
    std::vector<std::int64_t> ids(static_cast<std::size_t>(depth));
    for (std::int64_t i = 0; i < depth; ++i) ids[static_cast<std::size_t>(i)] = (i * 7919) % m.config().vocab_size;
    out.resize(static_cast<std::size_t>(m.config().vocab_size));
    model::ForwardOptions fo;
    fo.logits = model::LogitsRows::last;
    m.forward(s, ids, View2<float>(out.data(), {1, m.config().vocab_size}), fo);
  }
  void call(std::int64_t, const DecodeOptions& opt) override {
    model::ForwardOptions fo;
    fo.logits = model::LogitsRows::last;
    fo.num_threads = opt.num_threads;
    const std::int64_t next = 1;
    m.forward(s, std::span<const std::int64_t>(&next, 1), View2<float>(out.data(), {1, m.config().vocab_size}), fo);
    for (int l = 0; l < m.num_layers(); ++l)
      if (const auto* attn = dynamic_cast<const model::Qwen3Attention*>(&m.mixer(l)))
        for (int p = 0; p < m.passes(); ++p)
          attn->cache(s.state(l), p).visit([&](auto& c) {
            if constexpr (!requires { c.total(); }) c.truncate(depth);
          });
    s.set_position(depth);
  }
};
}  // namespace

extern "C" void* AB_FN(_make)(const char* kind, long long T, long long P) {
  std::string k = kind;
  const bool paged = k.rfind("paged:", 0) == 0;
  if (paged) k = k.substr(6);
  Case* c = nullptr;
  if (k.rfind("model:", 0) == 0) {  // model:depth
    c = new ModelStep(std::stoll(k.substr(6)));
  } else if (k.rfind("linear:", 0) == 0) {  // linear:N:K[:T]
    const std::size_t colon = k.find(':', 7), colon2 = k.find(':', colon + 1);
    c = new Linear(std::stoll(k.substr(7, colon - 7)), std::stoll(k.substr(colon + 1, colon2 - colon - 1)),
                   colon2 == std::string::npos ? 1 : std::stoll(k.substr(colon2 + 1)));
  } else if (k == "f32" && !paged) c = new Contiguous<float>(T);
  else if (k == "bf16" || k == "bf16f") c = paged ? static_cast<Case*>(new Paged<bf16>(T, P)) : new Contiguous<bf16>(T);
  else if (k == "int8" || k == "int8f")
    c = paged ? static_cast<Case*>(new Paged<std::int8_t>(T, P)) : new Contiguous<std::int8_t>(T);
  if (c == nullptr) {
    std::fprintf(stderr, "unknown kind %s\n", kind);
    std::exit(2);
  }
  c->precision = k == "int8f" || k == "bf16f" ? Precision::fast : Precision::exact;
  return c;
}
extern "C" long long AB_FN(_bytes)(void* c) { return static_cast<Case*>(c)->bytes; }
extern "C" long long AB_FN(_sets)(void* c) { return static_cast<Case*>(c)->sets; }
extern "C" void AB_FN(_run)(void* p, long long calls) {
  auto* c = static_cast<Case*>(p);
  DecodeOptions opt;
  opt.num_threads = 2;
  opt.precision = c->precision;
  // <namespace>_KV_CHUNK=<keys> (ab_a_KV_CHUNK, ab_b_KV_CHUNK): this version's opt.kv_chunk, so
  // two chunk sizes of the same headers can be alternated.
  static const long long chunk = [] {
    const char* e = std::getenv(AB_STR(AB_NS) "_KV_CHUNK");
    return e ? std::atoll(e) : 0ll;
  }();
  opt.kv_chunk = chunk;
  for (long long i = 0; i < calls; ++i) c->call(c->next++, opt);
}
extern "C" unsigned long long AB_FN(_hash)(void* p) {
  unsigned long long h = 1469598103934665603ull;
  for (float x : static_cast<Case*>(p)->out) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    h = (h ^ u) * 1099511628211ull;
  }
  return h;
}
#endif
