// attnkit/attention/kv_cache.hpp — key/value caches for decode.
//
// KVCache<T>: a growable cache of every position appended so far. Storage is head-major,
// [H_kv][capacity][d], so each KV head's keys (and values) are one contiguous stream that
// attention_decode reads sequentially. keys()/values() are views [size, H_kv, d] with strides
// {d, capacity*d, 1}; they are invalidated by append (growth reallocates), reserve and
// destruction.
//
// RingKVCache<T>: the last W positions for a sliding-window layer (spec §1.6: a query at p sees
// keys p-W+1..p, so after appending the current token the ring holds exactly what it sees).
// Position p lives in slot p mod W. Keys are stored as given, i.e. already rotated by RoPE at
// their absolute position. keys()/values() list the valid slots in slot order, which is all a
// decode step needs (attention over a key set does not depend on its order); copy_recent()
// gives a position-ordered copy for chunked prefill.
//
// T = float or bf16; appends take f32 and round to bf16 to nearest even. Buffers are 64-byte
// aligned. Both classes are movable, not copyable.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>


#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

namespace detail::kv {

template <class T>
struct AlignedFree {
  void operator()(T* p) const { std::free(p); }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree<T>>;

// Large buffers get transparent huge pages (core/memory.hpp): decode streams the whole cache
// every step.
template <class T>
AlignedArray<T> aligned_array(std::int64_t n) {
  // Never null (an empty request still gets 64 bytes), so copies from it need no special case.
  return AlignedArray<T>(static_cast<T*>(allocate_aligned(static_cast<std::size_t>(std::max<std::int64_t>(n, 0)) * sizeof(T))));
}

// Stores n floats as T (bf16: round to nearest even).
template <class T>
inline void store_row(const float* src, T* dst, std::int64_t n) {
  if constexpr (std::is_same_v<T, bf16>) simd::to_bf16(src, dst, n);
  else std::copy(src, src + n, dst);
}

inline void check_dims(const char* fn, std::int64_t kv_heads, std::int64_t dk, std::int64_t dv) {
  ATTNKIT_REQUIRE(kv_heads >= 1, fn, ": argument 'kv_heads': must be >= 1, got ", kv_heads);
  ATTNKIT_REQUIRE(dk >= 1, fn, ": argument 'head_dim_k': must be >= 1, got ", dk);
  ATTNKIT_REQUIRE(dv >= 1, fn, ": argument 'head_dim_v': must be >= 1, got ", dv);
}

// Validates an append of k [n, H_kv, dk] and v [n, H_kv, dv].
inline void check_append(const char* fn, ConstView3<float> k, ConstView3<float> v, std::int64_t kv_heads,
                         std::int64_t dk, std::int64_t dv) {
  check_view(k, fn, "k");
  check_view(v, fn, "v");
  ATTNKIT_REQUIRE(k.shape[1] == kv_heads && k.shape[2] == dk, fn, ": argument 'k': shape ", shape_string(k),
                  " must be [n, H_kv, d_k] = [n, ", kv_heads, ", ", dk, "]");
  ATTNKIT_REQUIRE(v.shape[1] == kv_heads && v.shape[2] == dv, fn, ": argument 'v': shape ", shape_string(v),
                  " must be [n, H_kv, d_v] = [n, ", kv_heads, ", ", dv, "]");
  ATTNKIT_REQUIRE(v.shape[0] == k.shape[0], fn, ": argument 'v': has ", v.shape[0], " tokens but 'k' has ",
                  k.shape[0]);
}

}  // namespace detail::kv

template <class T>
class KVCache {
  static_assert(is_storage_type_v<T>, "KVCache: T must be float or bf16");

 public:
  KVCache(std::int64_t kv_heads, std::int64_t head_dim_k, std::int64_t head_dim_v, std::int64_t reserve_tokens = 0)
      : h_(kv_heads), dk_(head_dim_k), dv_(head_dim_v) {
    detail::kv::check_dims("KVCache", kv_heads, head_dim_k, head_dim_v);
    ATTNKIT_REQUIRE(reserve_tokens >= 0, "KVCache: argument 'reserve_tokens': must be >= 0, got ", reserve_tokens);
    reserve(reserve_tokens);
  }
  KVCache(KVCache&&) noexcept = default;
  KVCache& operator=(KVCache&&) noexcept = default;

  // Appends n tokens: k [n, H_kv, d_k], v [n, H_kv, d_v] (any strides, last dimension contiguous).
  void append(ConstView3<float> k, ConstView3<float> v) {
    detail::kv::check_append("KVCache::append", k, v, h_, dk_, dv_);
    const std::int64_t n = k.shape[0];
    if (size_ + n > cap_) reserve(std::max(size_ + n, cap_ * 2));
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t h = 0; h < h_; ++h) {
        detail::kv::store_row(k.ptr(t, h), k_.get() + (h * cap_ + size_ + t) * dk_, dk_);
        detail::kv::store_row(v.ptr(t, h), v_.get() + (h * cap_ + size_ + t) * dv_, dv_);
      }
    size_ += n;
  }

  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return cap_; }
  std::int64_t kv_heads() const { return h_; }
  std::int64_t head_dim_k() const { return dk_; }
  std::int64_t head_dim_v() const { return dv_; }

  ConstView3<T> keys() const { return ConstView3<T>(k_.get(), {size_, h_, dk_}, {dk_, cap_ * dk_, 1}); }
  ConstView3<T> values() const { return ConstView3<T>(v_.get(), {size_, h_, dv_}, {dv_, cap_ * dv_, 1}); }

  // Keeps the first n tokens (0 <= n <= size()).
  void truncate(std::int64_t n) {
    ATTNKIT_REQUIRE(n >= 0 && n <= size_, "KVCache::truncate: argument 'n': must be in [0, size = ", size_,
                    "], got ", n);
    size_ = n;
  }
  void clear() { size_ = 0; }

  // Ensures room for `tokens` tokens without reallocation (never shrinks).
  void reserve(std::int64_t tokens) {
    ATTNKIT_REQUIRE(tokens >= 0, "KVCache::reserve: argument 'tokens': must be >= 0, got ", tokens);
    if (tokens <= cap_) return;
    // A multiple of 32 tokens keeps every head's region 64-byte aligned for f32 and bf16.
    const std::int64_t cap = (tokens + 31) / 32 * 32;
    auto k = detail::kv::aligned_array<T>(h_ * cap * dk_);
    auto v = detail::kv::aligned_array<T>(h_ * cap * dv_);
    for (std::int64_t h = 0; h < h_; ++h) {
      std::copy(k_.get() + h * cap_ * dk_, k_.get() + (h * cap_ + size_) * dk_, k.get() + h * cap * dk_);
      std::copy(v_.get() + h * cap_ * dv_, v_.get() + (h * cap_ + size_) * dv_, v.get() + h * cap * dv_);
    }
    k_ = std::move(k);
    v_ = std::move(v);
    cap_ = cap;
  }

 private:
  std::int64_t h_, dk_, dv_;
  std::int64_t size_ = 0, cap_ = 0;
  detail::kv::AlignedArray<T> k_, v_;
};

template <class T>
class RingKVCache {
  static_assert(is_storage_type_v<T>, "RingKVCache: T must be float or bf16");

 public:
  RingKVCache(std::int64_t kv_heads, std::int64_t head_dim_k, std::int64_t head_dim_v, std::int64_t window)
      : h_(kv_heads), dk_(head_dim_k), dv_(head_dim_v), w_(window) {
    detail::kv::check_dims("RingKVCache", kv_heads, head_dim_k, head_dim_v);
    ATTNKIT_REQUIRE(window >= 1, "RingKVCache: argument 'window': must be >= 1, got ", window);
    // Slot rows padded so each head's region stays 64-byte aligned.
    ws_ = (w_ + 31) / 32 * 32;
    k_ = detail::kv::aligned_array<T>(h_ * ws_ * dk_);
    v_ = detail::kv::aligned_array<T>(h_ * ws_ * dv_);
  }
  RingKVCache(RingKVCache&&) noexcept = default;
  RingKVCache& operator=(RingKVCache&&) noexcept = default;

  // Appends n tokens at positions total() .. total()+n-1; only the last W of them are written.
  void append(ConstView3<float> k, ConstView3<float> v) {
    detail::kv::check_append("RingKVCache::append", k, v, h_, dk_, dv_);
    const std::int64_t n = k.shape[0];
    for (std::int64_t t = std::max<std::int64_t>(0, n - w_); t < n; ++t) {
      const std::int64_t slot = (total_ + t) % w_;
      for (std::int64_t h = 0; h < h_; ++h) {
        detail::kv::store_row(k.ptr(t, h), k_.get() + (h * ws_ + slot) * dk_, dk_);
        detail::kv::store_row(v.ptr(t, h), v_.get() + (h * ws_ + slot) * dv_, dv_);
      }
    }
    total_ += n;
  }

  std::int64_t window() const { return w_; }
  std::int64_t size() const { return std::min(total_, w_); }
  std::int64_t total() const { return total_; }
  std::int64_t kv_heads() const { return h_; }
  std::int64_t head_dim_k() const { return dk_; }
  std::int64_t head_dim_v() const { return dv_; }

  // The valid slots [0, size()) in slot order: [size, H_kv, d].
  ConstView3<T> keys() const { return ConstView3<T>(k_.get(), {size(), h_, dk_}, {dk_, ws_ * dk_, 1}); }
  ConstView3<T> values() const { return ConstView3<T>(v_.get(), {size(), h_, dv_}, {dv_, ws_ * dv_, 1}); }

  // Absolute position held by a valid slot: the latest p < total() with p mod W == slot.
  std::int64_t position_of_slot(std::int64_t slot) const {
    ATTNKIT_REQUIRE(slot >= 0 && slot < size(), "RingKVCache::position_of_slot: argument 'slot': must be in [0, size = ",
                    size(), "), got ", slot);
    return slot + (total_ - 1 - slot) / w_ * w_;
  }

  // Copies the most recent n <= size() tokens, oldest first, into k_out [n, H_kv, d_k] and
  // v_out [n, H_kv, d_v]: row r holds position total() - n + r.
  void copy_recent(std::int64_t n, View3<T> k_out, View3<T> v_out) const {
    constexpr const char* fn = "RingKVCache::copy_recent";
    ATTNKIT_REQUIRE(n >= 0 && n <= size(), fn, ": argument 'n': must be in [0, size = ", size(), "], got ", n);
    check_view(k_out, fn, "k_out");
    check_view(v_out, fn, "v_out");
    ATTNKIT_REQUIRE(k_out.shape[0] == n && k_out.shape[1] == h_ && k_out.shape[2] == dk_, fn,
                    ": argument 'k_out': shape ", detail::shape_string(k_out), " must be [n, H_kv, d_k] = [", n, ", ",
                    h_, ", ", dk_, "]");
    ATTNKIT_REQUIRE(v_out.shape[0] == n && v_out.shape[1] == h_ && v_out.shape[2] == dv_, fn,
                    ": argument 'v_out': shape ", detail::shape_string(v_out), " must be [n, H_kv, d_v] = [", n, ", ",
                    h_, ", ", dv_, "]");
    for (std::int64_t r = 0; r < n; ++r) {
      const std::int64_t slot = (total_ - n + r) % w_;
      for (std::int64_t h = 0; h < h_; ++h) {
        const T* ks = k_.get() + (h * ws_ + slot) * dk_;
        const T* vs = v_.get() + (h * ws_ + slot) * dv_;
        std::copy(ks, ks + dk_, k_out.ptr(r, h));
        std::copy(vs, vs + dv_, v_out.ptr(r, h));
      }
    }
  }

  void clear() { total_ = 0; }

 private:
  std::int64_t h_, dk_, dv_, w_, ws_ = 0;
  std::int64_t total_ = 0;
  detail::kv::AlignedArray<T> k_, v_;
};

}  // namespace attnkit
