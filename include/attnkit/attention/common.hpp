// attnkit/attention/common.hpp — what every softmax-attention kernel shares: mask policies,
// options, and the GQA head mapping.
//
// Conventions (shared/spec/semantics.md §0, §2, §3):
//  * q [T_q, H, d_k], k [T_k, H_kv, d_k], v [T_k, H_kv, d_v], out [T_q, H, d_v]; any strides,
//    last dimension contiguous.
//  * Query head h reads KV head h / (H / H_kv) (contiguous groups, HF repeat_kv).
//  * Query row t sits at absolute position q_offset + t; key row s at position s.
//  * Scale defaults to 1/sqrt(d_k). Log-sum-exp outputs are natural-log, of the scaled logits;
//    a query row that sees no key gets output 0 and lse = -inf (never NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "attnkit/core/error.hpp"
#include "attnkit/core/precision.hpp"
#include "attnkit/core/threading.hpp"

namespace attnkit {

// Mask policies (FlashInfer style: the kernel is one template, the mask a small type).
// Both answer: which key positions [first, last] may a query at absolute position p see?
struct CausalMask {
  static constexpr const char* name = "causal";
  std::int64_t first_key(std::int64_t /*p*/) const { return 0; }
  std::int64_t last_key(std::int64_t p) const { return p; }
  void validate(const char* /*fn*/) const {}
};

// Sliding window of W keys including the query itself: keys p-W+1 .. p (Hugging Face
// masking_utils convention). W >= T_k is exactly causal attention.
struct SlidingWindowMask {
  static constexpr const char* name = "sliding_window";
  std::int64_t window = 0;
  std::int64_t first_key(std::int64_t p) const { return p - window + 1 > 0 ? p - window + 1 : 0; }
  std::int64_t last_key(std::int64_t p) const { return p; }
  void validate(const char* fn) const {
    ATTNKIT_REQUIRE(window > 0, fn, ": argument 'mask': sliding window must be >= 1, got ", window);
  }
};

struct AttentionOptions {
  float scale = 0.f;             // 0 -> 1/sqrt(d_k)
  std::int64_t q_offset = -1;    // absolute position of query row 0; -1 -> T_k - T_q (prefill/continuation)
  Range heads{};                 // query heads to compute; others are left untouched
  Range queries{};               // query rows to compute; others are left untouched
  int num_threads = 0;           // 0 -> OpenMP default; 1 -> run on the caller's thread
  // Prefill: exact = float32 arithmetic on the FMA units; fast = Q, K, V and the probabilities
  // rounded to bf16 for AMX tiles (where the CPU has them; else exact). Decode ignores it.
  Precision precision = Precision::exact;
};

inline float resolve_scale(float scale, std::int64_t d_k) {
  return scale != 0.f ? scale : 1.f / std::sqrt(static_cast<float>(d_k));
}

}  // namespace attnkit
