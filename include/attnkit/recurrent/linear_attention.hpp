// attnkit/recurrent/linear_attention.hpp — causal linear attention with a feature map (fla
// `layers/linear_attn.py`, `ops/linear_attn`; spec §6).
//
// Per output head h, with feature map φ (identity, elu+1 or relu), c = opt.scale (default
// d_k^-1/2), the state S [d_k, d_v] and, when normalising, z [d_k]:
//
//     S_t = S_{t-1} + φ(k_t) v_t^T        o_t = S_t^T (c · φ(q_t))
//     normalised: z_t = z_{t-1} + φ(k_t);  o_t ← o_t / (c · φ(q_t)·z_t + 1e-10)
//
// opt.norm_q / opt.norm_k divide φ(q) / φ(k) by (Σφ + 1e-4) first (fla's norm_q / norm_k).
// fla's learned feature maps (hedgehog, t2r, the Hadamard default) are small layers: apply them
// to q and k yourself and pass LinearFeatureMap::identity.
//
// Heads: q [T, H_q, d_k], k [T, H_k, d_k], v [T, H_v, d_v]; out [T, H, d_v] with
// H = max(H_q, H_k, H_v), and each of H_q, H_k, H_v must divide H. Output head h reads head
// h / (H / H_x) of input x (contiguous groups: HF repeat_kv, fla's repeat '(h g)'). This covers
// fla's GQA layout (q on H heads, k and v on H_kv; the layer repeats k and v), GVA (q and k on
// fewer heads than v, as in Gated DeltaNet) and plain multi-head. The state is per output head.
// state [H, d_k, d_v] f32 is read as the initial state (zero it for a fresh sequence) and
// overwritten with the final one; z [H, d_k] likewise, only when opt.normalize (pass an empty
// view otherwise). So a sequence split over several calls gives the result of one call.
// Any strides with a contiguous last dimension; out must not overlap the inputs or the state.
//
// Two paths give the same numbers to about 1e-6 relative (tests bound them by 5e-6):
//  * recurrent: token by token, one pass over S per token (decode, short prompts);
//  * chunked: chunks of opt.chunk tokens, O_c = Q_c S + (Q_c K_c^T ⊙ causal incl. diagonal) V_c,
//    then S += K_c^T V_c (and z += Σ rows of K_c): dense matrix products (Eigen) for prefill.
// LinearAttentionMode::automatic takes the recurrent path for T <= opt.recurrent_max_tokens.
// Threads split the output heads; each head's arithmetic is the same on any number of threads
// (bit-identical results). Eigen's own GEMM threading stays off inside (see EigenSerialScope).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

enum class LinearFeatureMap { identity, elu, relu };  // elu: elu(x) + 1 (Katharopoulos et al.)
enum class LinearAttentionMode { automatic, recurrent, chunked };

struct LinearAttentionOptions {
  LinearAttentionMode mode = LinearAttentionMode::automatic;
  LinearFeatureMap feature_map = LinearFeatureMap::identity;
  bool normalize = false;                 // divide by c·φ(q)·z (fla do_feature_map_norm / normalize)
  bool norm_q = false;                    // φ(q) / (Σφ(q) + 1e-4)
  bool norm_k = false;                    // φ(k) / (Σφ(k) + 1e-4)
  float scale = 0.f;                      // 0 -> d_k^-1/2
  std::int64_t chunk = 64;                // chunk length of the chunked path
  std::int64_t recurrent_max_tokens = 16; // automatic: recurrent up to this many tokens
  int num_threads = 0;                    // 0: OpenMP default
};

namespace detail_la {

inline constexpr float kNormEps = 1e-10f;    // fla's normalize_output
inline constexpr float kFeatureEps = 1e-4f;  // fla's norm_q / norm_k

struct Heads {
  std::int64_t H, gq, gk, gv;  // output heads; group sizes H / H_x
};

inline Heads check(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> state, View2<float> z,
                   View3<float> out, const LinearAttentionOptions& opt) {
  const char* fn = "linear_attention";
  check_view(q, fn, "q");
  check_view(k, fn, "k");
  check_view(v, fn, "v");
  check_view(state, fn, "state");
  check_view(out, fn, "out");
  const std::int64_t T = q.shape[0], Hq = q.shape[1], dk = q.shape[2], Hk = k.shape[1], Hv = v.shape[1],
                     dv = v.shape[2];
  ATTNKIT_REQUIRE(k.shape[0] == T, fn, ": argument 'k': ", k.shape[0], " tokens, q has ", T);
  ATTNKIT_REQUIRE(v.shape[0] == T, fn, ": argument 'v': ", v.shape[0], " tokens, q has ", T);
  ATTNKIT_REQUIRE(dk > 0, fn, ": argument 'q': head dim d_k must be positive, got shape ", detail::shape_string(q));
  ATTNKIT_REQUIRE(k.shape[2] == dk, fn, ": argument 'k': head dim ", k.shape[2], " differs from q's d_k ", dk);
  ATTNKIT_REQUIRE(dv > 0, fn, ": argument 'v': head dim d_v must be positive, got shape ", detail::shape_string(v));
  ATTNKIT_REQUIRE(Hq > 0, fn, ": argument 'q': no heads, shape ", detail::shape_string(q));
  ATTNKIT_REQUIRE(Hk > 0, fn, ": argument 'k': no heads, shape ", detail::shape_string(k));
  ATTNKIT_REQUIRE(Hv > 0, fn, ": argument 'v': no heads, shape ", detail::shape_string(v));
  const std::int64_t H = std::max({Hq, Hk, Hv});
  ATTNKIT_REQUIRE(H % Hq == 0, fn, ": argument 'q': ", Hq, " heads do not divide the ", H, " output heads");
  ATTNKIT_REQUIRE(H % Hk == 0, fn, ": argument 'k': ", Hk, " heads do not divide the ", H, " output heads");
  ATTNKIT_REQUIRE(H % Hv == 0, fn, ": argument 'v': ", Hv, " heads do not divide the ", H, " output heads");
  ATTNKIT_REQUIRE(out.shape[0] == T && out.shape[1] == H && out.shape[2] == dv, fn, ": argument 'out': shape ",
                  detail::shape_string(out), ", expected [", T, ", ", H, ", ", dv, "]");
  ATTNKIT_REQUIRE(state.shape[0] == H && state.shape[1] == dk && state.shape[2] == dv, fn,
                  ": argument 'state': shape ", detail::shape_string(state), ", expected [", H, ", ", dk, ", ", dv,
                  "]");
  if (opt.normalize) {
    ATTNKIT_REQUIRE(!z.empty(), fn, ": argument 'z': opt.normalize needs the normaliser state z [", H, ", ", dk,
                    "], got an empty view");
    check_view(z, fn, "z");
    ATTNKIT_REQUIRE(z.shape[0] == H && z.shape[1] == dk, fn, ": argument 'z': shape ", detail::shape_string(z),
                    ", expected [", H, ", ", dk, "]");
  } else {
    ATTNKIT_REQUIRE(z.empty(), fn, ": argument 'z': given, but opt.normalize is off (pass an empty view)");
  }
  ATTNKIT_REQUIRE(opt.chunk >= 1 && opt.chunk <= 1024, fn, ": option 'chunk' must be in [1, 1024], got ", opt.chunk);
  ATTNKIT_REQUIRE(opt.recurrent_max_tokens >= 0, fn, ": option 'recurrent_max_tokens' must be non-negative, got ",
                  opt.recurrent_max_tokens);
  ATTNKIT_REQUIRE(std::isfinite(opt.scale), fn, ": option 'scale' must be finite, got ", opt.scale);
  return {H, H / Hq, H / Hk, H / Hv};
}

// dst = factor · φ(x), with φ(x) / (Σφ(x) + 1e-4) first when `norm`. Both paths use this, so
// their features are identical.
inline void feature(const float* x, float* dst, std::int64_t n, LinearFeatureMap map, bool norm, float factor) {
  switch (map) {
    case LinearFeatureMap::identity: std::copy(x, x + n, dst); break;
    case LinearFeatureMap::elu:  // elu(x) + 1; exp(x) is the exact value of expm1(x) + 1
      for (std::int64_t i = 0; i < n; ++i) dst[i] = x[i] > 0.f ? x[i] + 1.f : std::exp(x[i]);
      break;
    case LinearFeatureMap::relu:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = x[i] > 0.f ? x[i] : 0.f;
      break;
  }
  float f = factor;
  if (norm) {
    double s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += dst[i];
    f = static_cast<float>(factor / (s + kFeatureEps));
  }
  for (std::int64_t i = 0; i < n; ++i) dst[i] *= f;
}

// One output head, tokens [0, T), token by token: S += φ(k) v^T and o = S^T φ(q) in one pass.
inline void recurrent_head(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> state,
                           View2<float> z, View3<float> out, std::int64_t h, const Heads& hd,
                           const LinearAttentionOptions& opt, float scale) {
  using B = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(B::size);
  const std::int64_t T = q.shape[0], dk = q.shape[2], dv = v.shape[2];
  const std::int64_t hq = h / hd.gq, hk = h / hd.gk, hv = h / hd.gv;
  float* S = state.ptr(h);
  const std::int64_t ss = state.stride[1];
  float* zh = opt.normalize ? z.ptr(h) : nullptr;
  std::vector<float> qf(static_cast<std::size_t>(dk)), kf(qf.size());
  for (std::int64_t t = 0; t < T; ++t) {
    feature(q.ptr(t, hq), qf.data(), dk, opt.feature_map, opt.norm_q, scale);
    feature(k.ptr(t, hk), kf.data(), dk, opt.feature_map, opt.norm_k, 1.f);
    const float* vt = v.ptr(t, hv);
    float* o = out.ptr(t, h);
    std::fill(o, o + dv, 0.f);
    for (std::int64_t i = 0; i < dk; ++i) {
      float* row = S + i * ss;
      const B ki(kf[i]), qi(qf[i]);
      std::int64_t c = 0;
      for (; c + W <= dv; c += W) {
        const B s = simd::fma(ki, B::load_unaligned(vt + c), B::load_unaligned(row + c));
        s.store_unaligned(row + c);
        simd::fma(qi, s, B::load_unaligned(o + c)).store_unaligned(o + c);
      }
      for (; c < dv; ++c) {
        row[c] = std::fma(kf[i], vt[c], row[c]);
        o[c] = std::fma(qf[i], row[c], o[c]);
      }
    }
    if (zh) {
      float den = 0.f;
      for (std::int64_t i = 0; i < dk; ++i) {
        zh[i] += kf[i];
        den += qf[i] * zh[i];
      }
      den += kNormEps;
      for (std::int64_t c = 0; c < dv; ++c) o[c] /= den;
    }
  }
}

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstStridedMap = Eigen::Map<const RowMat, Eigen::Unaligned, Eigen::OuterStride<>>;

// Eigen runs a large enough GEMM on OpenMP threads of its own when called outside a parallel
// region (the kernel's one-thread path). That would ignore num_threads and change the GEMM's
// blocking, hence its rounding, with the thread count. Eigen takes its thread count from
// OpenMP's nthreads ICV, so the kernel sets that to 1 on the calling thread for the call (worker
// threads inherit it) and restores it after. If the program forced Eigen::setNbThreads(n > 1),
// the products fall back to Eigen's lazy (coefficient-wise, never threaded) evaluation.
struct EigenSerialScope {
#if defined(_OPENMP)
  int saved = omp_get_max_threads();
  EigenSerialScope() { omp_set_num_threads(1); }
  ~EigenSerialScope() { omp_set_num_threads(saved); }
  EigenSerialScope(const EigenSerialScope&) = delete;
  EigenSerialScope& operator=(const EigenSerialScope&) = delete;
#endif
};

// dst (+)= a · b, on the GEMM path or lazily (see EigenSerialScope).
template <class D, class A, class Bm>
void product(D&& dst, const A& a, const Bm& b, bool add, bool gemm) {
  if (gemm) {
    if (add) dst.noalias() += a * b;
    else dst.noalias() = a * b;
  } else {
    if (add) dst.noalias() += a.lazyProduct(b);
    else dst.noalias() = a.lazyProduct(b);
  }
}

// One output head, chunk by chunk (spec §6 chunked form). Every product writes into a buffer
// of its own (Eigen-aligned), never into the caller's memory: Eigen's small-product path peels
// by the destination's alignment, which would make the rounding depend on where out lives.
inline void chunked_head(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> state,
                         View2<float> z, View3<float> out, std::int64_t h, const Heads& hd,
                         const LinearAttentionOptions& opt, float scale, bool gemm) {
  const std::int64_t T = q.shape[0], dk = q.shape[2], dv = v.shape[2];
  const std::int64_t hq = h / hd.gq, hk = h / hd.gk, hv = h / hd.gv;
  const std::int64_t C = std::min(opt.chunk, T);
  RowMat Qc(C, dk), Kc(C, dk), A(C, C), Oc(C, dv), S(dk, dv);
  std::vector<float> den(static_cast<std::size_t>(C));
  for (std::int64_t i = 0; i < dk; ++i) std::copy(state.ptr(h, i), state.ptr(h, i) + dv, &S(i, 0));
  float* zh = opt.normalize ? z.ptr(h) : nullptr;
  for (std::int64_t t0 = 0; t0 < T; t0 += C) {
    const std::int64_t n = std::min(C, T - t0);
    for (std::int64_t r = 0; r < n; ++r) {
      feature(q.ptr(t0 + r, hq), &Qc(r, 0), dk, opt.feature_map, opt.norm_q, scale);
      feature(k.ptr(t0 + r, hk), &Kc(r, 0), dk, opt.feature_map, opt.norm_k, 1.f);
    }
    const auto Q = Qc.topRows(n);
    const auto K = Kc.topRows(n);
    auto An = A.topLeftCorner(n, n);
    auto On = Oc.topRows(n);
    const ConstStridedMap V(v.ptr(t0, hv), n, dv, Eigen::OuterStride<>(v.stride[0]));
    // Scores within the chunk, causal including the diagonal.
    product(An, Q, K.transpose(), false, gemm);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = r + 1; c < n; ++c) An(r, c) = 0.f;
    if (zh) {  // c·φ(q_t)·z_t = Q z_prev + the row sums of the masked scores
      for (std::int64_t r = 0; r < n; ++r) {
        float d = 0.f;
        for (std::int64_t i = 0; i < dk; ++i) d += Q(r, i) * zh[i];
        for (std::int64_t c = 0; c <= r; ++c) d += An(r, c);
        den[static_cast<std::size_t>(r)] = d + kNormEps;
      }
      for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t i = 0; i < dk; ++i) zh[i] += K(r, i);
    }
    product(On, Q, S, false, gemm);  // what the state before the chunk returns
    product(On, An, V, true, gemm);  // plus the chunk's own keys
    for (std::int64_t r = 0; r < n; ++r) {
      float* o = out.ptr(t0 + r, h);
      if (zh)
        for (std::int64_t c = 0; c < dv; ++c) o[c] = On(r, c) / den[static_cast<std::size_t>(r)];
      else
        std::copy(&On(r, 0), &On(r, 0) + dv, o);
    }
    product(S, K.transpose(), V, true, gemm);
  }
  for (std::int64_t i = 0; i < dk; ++i) std::copy(&S(i, 0), &S(i, 0) + dv, state.ptr(h, i));
}

}  // namespace detail_la

// See the contract at the top of this file. z: an empty view unless opt.normalize.
inline void linear_attention(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> state,
                             View2<float> z, View3<float> out, const LinearAttentionOptions& opt = {}) {
  const detail_la::Heads hd = detail_la::check(q, k, v, state, z, out, opt);
  const std::int64_t T = q.shape[0];
  if (T == 0) return;
  const float scale = opt.scale != 0.f ? opt.scale : 1.f / std::sqrt(static_cast<float>(q.shape[2]));
  const bool recurrent = opt.mode == LinearAttentionMode::recurrent ||
                         (opt.mode == LinearAttentionMode::automatic && T <= opt.recurrent_max_tokens);
  const int threads = resolve_threads(opt.num_threads);  // before the scope below sets the ICV to 1
  if (recurrent) {
    parallel_for(hd.H, threads, [&](std::int64_t h) {
      ATTNKIT_FAULT_POINT("recurrent");
      detail_la::recurrent_head(q, k, v, state, z, out, h, hd, opt, scale);
    });
    return;
  }
  const detail_la::EigenSerialScope serial;
  const bool gemm = Eigen::nbThreads() == 1;
  parallel_for(hd.H, threads, [&](std::int64_t h) {
    ATTNKIT_FAULT_POINT("recurrent");
    detail_la::chunked_head(q, k, v, state, z, out, h, hd, opt, scale, gemm);
  });
}

}  // namespace attnkit
