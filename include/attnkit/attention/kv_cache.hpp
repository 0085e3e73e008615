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
// T = float, bf16 or std::int8_t; appends take f32 and round to bf16 to nearest even, or
// quantise each (token, KV head) row to int8 with its own scale (attention/quant.hpp: symmetric,
// scale = max|x| / 127, round to nearest; a NaN or inf in the appended rows throws before
// anything is written). An int8 cache's keys()/values() are QuantView3 (codes [size, H_kv, d]
// with the same strides as above, scales [size, H_kv] with strides {1, capacity}, head-major
// too), and the ring's copy_recent() writes dequantised f32 rows. Buffers are 64-byte aligned
// (int8 capacities are multiples of 64 tokens). Both classes are movable, and copyable (a deep copy).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <type_traits>


#include "attnkit/attention/quant.hpp"
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

// A deep copy of the first n elements of a (a cache's copy: a batch session's fork).
template <class T>
AlignedArray<T> copy_array(const AlignedArray<T>& a, std::int64_t n) {
  AlignedArray<T> c = aligned_array<T>(n);
  if (n > 0) std::copy(a.get(), a.get() + n, c.get());
  return c;
}

template <class T>
inline constexpr bool is_cache_type_v = is_storage_type_v<T> || std::is_same_v<T, std::int8_t>;
template <class T>
inline constexpr bool is_quant_v = std::is_same_v<T, std::int8_t>;

// Token rows per capacity step: keeps every head's region 64-byte aligned.
template <class T>
inline constexpr std::int64_t kRowAlign = is_quant_v<T> ? 64 : 32;

// An int8 cache refuses rows it cannot quantise, before it writes anything.
inline void check_finite(const char* fn, const char* arg, ConstView3<float> x, std::int64_t first_token) {
  for (std::int64_t t = first_token; t < x.shape[0]; ++t)
    for (std::int64_t h = 0; h < x.shape[1]; ++h) {
      const float* r = x.ptr(t, h);
      for (std::int64_t i = 0; i < x.shape[2]; ++i)
        ATTNKIT_REQUIRE(std::abs(r[i]) <= std::numeric_limits<float>::max(), fn, ": argument '", arg,
                        "': non-finite value ", r[i], " at token ", t, ", KV head ", h, ", element ", i,
                        " (an int8 cache cannot quantise it)");
    }
}

// Stores one row as T; an int8 row also writes its scale.
template <class T>
inline void store_row(const float* src, T* dst, float* scale, std::int64_t n) {
  if constexpr (is_quant_v<T>) {
    [[maybe_unused]] const bool ok = quant::quantize_row(src, dst, *scale, n);  // finite: checked before
  } else {
    (void)scale;
    store_row(src, dst, n);
  }
}

// Bytes of a cache of `tokens` rows (int8: plus a scale per row and head).
template <class T>
inline std::uint64_t bytes(std::int64_t heads, std::int64_t tokens, std::int64_t dk, std::int64_t dv) {
  return add_bytes(mul_bytes(heads, tokens, dk + dv, sizeof(T)), is_quant_v<T> ? mul_bytes(heads, tokens, 2, 4) : 0);
}
template <class T>
inline std::string what(const char* fn, std::int64_t tokens, std::int64_t heads, std::int64_t dk, std::int64_t dv) {
  return std::string(fn) + ": " + std::to_string(tokens) + " tokens x " + std::to_string(heads) + " KV heads x (d_k " +
         std::to_string(dk) + " + d_v " + std::to_string(dv) + ") x " + std::to_string(sizeof(T)) + " bytes" +
         (is_quant_v<T> ? " + scales" : "");
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
  static_assert(detail::kv::is_cache_type_v<T>, "KVCache: T must be float, bf16 or std::int8_t");
  static constexpr bool quant = detail::kv::is_quant_v<T>;

 public:
  KVCache(std::int64_t kv_heads, std::int64_t head_dim_k, std::int64_t head_dim_v, std::int64_t reserve_tokens = 0)
      : h_(kv_heads), dk_(head_dim_k), dv_(head_dim_v) {
    detail::kv::check_dims("KVCache", kv_heads, head_dim_k, head_dim_v);
    ATTNKIT_REQUIRE(reserve_tokens >= 0, "KVCache: argument 'reserve_tokens': must be >= 0, got ", reserve_tokens);
    reserve(reserve_tokens);
  }
  // A deep copy (the same tokens, capacity and layout; checked against the memory limit).
  KVCache(const KVCache& o) : h_(o.h_), dk_(o.dk_), dv_(o.dv_), size_(o.size_), cap_(o.cap_) {
    require_memory(detail::kv::bytes<T>(h_, cap_, dk_, dv_), detail::kv::what<T>("KVCache copy", cap_, h_, dk_, dv_));
    k_ = detail::kv::copy_array(o.k_, h_ * cap_ * dk_);
    v_ = detail::kv::copy_array(o.v_, h_ * cap_ * dv_);
    ks_ = detail::kv::copy_array(o.ks_, detail::kv::is_quant_v<T> ? h_ * cap_ : 0);
    vs_ = detail::kv::copy_array(o.vs_, detail::kv::is_quant_v<T> ? h_ * cap_ : 0);
  }
  KVCache(KVCache&&) noexcept = default;
  KVCache& operator=(KVCache&&) noexcept = default;

  // Appends n tokens: k [n, H_kv, d_k], v [n, H_kv, d_v] (any strides, last dimension contiguous).
  void append(ConstView3<float> k, ConstView3<float> v) {
    detail::kv::check_append("KVCache::append", k, v, h_, dk_, dv_);
    const std::int64_t n = k.shape[0];
    if constexpr (quant) {
      detail::kv::check_finite("KVCache::append", "k", k, 0);
      detail::kv::check_finite("KVCache::append", "v", v, 0);
    }
    if (size_ + n > cap_) reserve(std::max(size_ + n, cap_ * 2));
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t h = 0; h < h_; ++h) {
        const std::int64_t r = h * cap_ + size_ + t;
        detail::kv::store_row(k.ptr(t, h), k_.get() + r * dk_, ks_.get() + (quant ? r : 0), dk_);
        detail::kv::store_row(v.ptr(t, h), v_.get() + r * dv_, vs_.get() + (quant ? r : 0), dv_);
      }
    size_ += n;
  }

  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return cap_; }
  std::int64_t kv_heads() const { return h_; }
  std::int64_t head_dim_k() const { return dk_; }
  std::int64_t head_dim_v() const { return dv_; }

  // [size, H_kv, d] (int8: QuantView3, see the top of the file).
  auto keys() const {
    const ConstView3<T> c(k_.get(), {size_, h_, dk_}, {dk_, cap_ * dk_, 1});
    if constexpr (quant) return QuantView3{c, ConstView2<float>(ks_.get(), {size_, h_}, {1, cap_})};
    else return c;
  }
  auto values() const {
    const ConstView3<T> c(v_.get(), {size_, h_, dv_}, {dv_, cap_ * dv_, 1});
    if constexpr (quant) return QuantView3{c, ConstView2<float>(vs_.get(), {size_, h_}, {1, cap_})};
    else return c;
  }

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
    // A multiple of 32 tokens (int8: 64) keeps every head's region 64-byte aligned.
    constexpr std::int64_t a = detail::kv::kRowAlign<T>;
    const std::int64_t cap = (tokens + a - 1) / a * a;
    require_memory(add_bytes(detail::kv::bytes<T>(h_, cap, dk_, dv_), detail::kv::bytes<T>(h_, cap_, dk_, dv_)),
                   detail::kv::what<T>("KVCache::reserve", cap, h_, dk_, dv_) + " (and the " + std::to_string(cap_) +
                       " tokens held while copying)");
    auto k = detail::kv::aligned_array<T>(h_ * cap * dk_);
    auto v = detail::kv::aligned_array<T>(h_ * cap * dv_);
    auto ks = detail::kv::aligned_array<float>(quant ? h_ * cap : 0);
    auto vs = detail::kv::aligned_array<float>(quant ? h_ * cap : 0);
    for (std::int64_t h = 0; h < h_; ++h) {
      std::copy(k_.get() + h * cap_ * dk_, k_.get() + (h * cap_ + size_) * dk_, k.get() + h * cap * dk_);
      std::copy(v_.get() + h * cap_ * dv_, v_.get() + (h * cap_ + size_) * dv_, v.get() + h * cap * dv_);
      if constexpr (quant) {
        std::copy(ks_.get() + h * cap_, ks_.get() + h * cap_ + size_, ks.get() + h * cap);
        std::copy(vs_.get() + h * cap_, vs_.get() + h * cap_ + size_, vs.get() + h * cap);
      }
    }
    k_ = std::move(k);
    v_ = std::move(v);
    ks_ = std::move(ks);
    vs_ = std::move(vs);
    cap_ = cap;
  }

 private:
  std::int64_t h_, dk_, dv_;
  std::int64_t size_ = 0, cap_ = 0;
  detail::kv::AlignedArray<T> k_, v_;
  detail::kv::AlignedArray<float> ks_, vs_;  // int8: scales [H_kv][capacity]
};

template <class T>
class RingKVCache {
  static_assert(detail::kv::is_cache_type_v<T>, "RingKVCache: T must be float, bf16 or std::int8_t");
  static constexpr bool quant = detail::kv::is_quant_v<T>;

 public:
  RingKVCache(std::int64_t kv_heads, std::int64_t head_dim_k, std::int64_t head_dim_v, std::int64_t window)
      : h_(kv_heads), dk_(head_dim_k), dv_(head_dim_v), w_(window) {
    detail::kv::check_dims("RingKVCache", kv_heads, head_dim_k, head_dim_v);
    ATTNKIT_REQUIRE(window >= 1, "RingKVCache: argument 'window': must be >= 1, got ", window);
    // Slot rows padded so each head's region stays 64-byte aligned.
    constexpr std::int64_t a = detail::kv::kRowAlign<T>;
    ws_ = (w_ + a - 1) / a * a;
    require_memory(detail::kv::bytes<T>(h_, ws_, dk_, dv_), detail::kv::what<T>("RingKVCache", ws_, h_, dk_, dv_));
    k_ = detail::kv::aligned_array<T>(h_ * ws_ * dk_);
    v_ = detail::kv::aligned_array<T>(h_ * ws_ * dv_);
    ks_ = detail::kv::aligned_array<float>(quant ? h_ * ws_ : 0);
    vs_ = detail::kv::aligned_array<float>(quant ? h_ * ws_ : 0);
  }
  // A deep copy (the same slots and positions; checked against the memory limit).
  RingKVCache(const RingKVCache& o) : h_(o.h_), dk_(o.dk_), dv_(o.dv_), w_(o.w_), ws_(o.ws_), total_(o.total_) {
    require_memory(detail::kv::bytes<T>(h_, ws_, dk_, dv_), detail::kv::what<T>("RingKVCache copy", ws_, h_, dk_, dv_));
    k_ = detail::kv::copy_array(o.k_, h_ * ws_ * dk_);
    v_ = detail::kv::copy_array(o.v_, h_ * ws_ * dv_);
    ks_ = detail::kv::copy_array(o.ks_, detail::kv::is_quant_v<T> ? h_ * ws_ : 0);
    vs_ = detail::kv::copy_array(o.vs_, detail::kv::is_quant_v<T> ? h_ * ws_ : 0);
  }
  RingKVCache(RingKVCache&&) noexcept = default;
  RingKVCache& operator=(RingKVCache&&) noexcept = default;

  // Appends n tokens at positions total() .. total()+n-1; only the last W of them are written.
  void append(ConstView3<float> k, ConstView3<float> v) {
    detail::kv::check_append("RingKVCache::append", k, v, h_, dk_, dv_);
    const std::int64_t n = k.shape[0];
    if constexpr (quant) {  // before any slot is overwritten
      detail::kv::check_finite("RingKVCache::append", "k", k, 0);
      detail::kv::check_finite("RingKVCache::append", "v", v, 0);
    }
    for (std::int64_t t = std::max<std::int64_t>(0, n - w_); t < n; ++t) {
      const std::int64_t slot = (total_ + t) % w_;
      for (std::int64_t h = 0; h < h_; ++h) {
        const std::int64_t r = h * ws_ + slot;
        detail::kv::store_row(k.ptr(t, h), k_.get() + r * dk_, ks_.get() + (quant ? r : 0), dk_);
        detail::kv::store_row(v.ptr(t, h), v_.get() + r * dv_, vs_.get() + (quant ? r : 0), dv_);
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

  // The valid slots [0, size()) in slot order: [size, H_kv, d] (int8: QuantView3).
  auto keys() const {
    const ConstView3<T> c(k_.get(), {size(), h_, dk_}, {dk_, ws_ * dk_, 1});
    if constexpr (quant) return QuantView3{c, ConstView2<float>(ks_.get(), {size(), h_}, {1, ws_})};
    else return c;
  }
  auto values() const {
    const ConstView3<T> c(v_.get(), {size(), h_, dv_}, {dv_, ws_ * dv_, 1});
    if constexpr (quant) return QuantView3{c, ConstView2<float>(vs_.get(), {size(), h_}, {1, ws_})};
    else return c;
  }

  // Absolute position held by a valid slot: the latest p < total() with p mod W == slot.
  std::int64_t position_of_slot(std::int64_t slot) const {
    ATTNKIT_REQUIRE(slot >= 0 && slot < size(), "RingKVCache::position_of_slot: argument 'slot': must be in [0, size = ",
                    size(), "), got ", slot);
    return slot + (total_ - 1 - slot) / w_ * w_;
  }

  // Copies the most recent n <= size() tokens, oldest first, into k_out [n, H_kv, d_k] and
  // v_out [n, H_kv, d_v]: row r holds position total() - n + r. An int8 ring writes f32 rows
  // (dequantised).
  using CopyType = std::conditional_t<quant, float, T>;
  void copy_recent(std::int64_t n, View3<CopyType> k_out, View3<CopyType> v_out) const {
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
        if constexpr (quant) {
          detail::quant::dequantize_row(ks, ks_[h * ws_ + slot], k_out.ptr(r, h), dk_);
          detail::quant::dequantize_row(vs, vs_[h * ws_ + slot], v_out.ptr(r, h), dv_);
        } else {
          std::copy(ks, ks + dk_, k_out.ptr(r, h));
          std::copy(vs, vs + dv_, v_out.ptr(r, h));
        }
      }
    }
  }

  void clear() { total_ = 0; }

 private:
  std::int64_t h_, dk_, dv_, w_, ws_ = 0;
  std::int64_t total_ = 0;
  detail::kv::AlignedArray<T> k_, v_;
  detail::kv::AlignedArray<float> ks_, vs_;  // int8: scales [H_kv][slots]
};

}  // namespace attnkit
