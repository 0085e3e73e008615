// attnkit/attention/paged_kv.hpp — a paged K/V cache for many sequences (vLLM's / FlashInfer's
// design): views of the caller's pages, page tables, a small page pool, and appends.
//
// Pages: K and V each live in pages of P tokens (P a power of two, e.g. 16):
//   k [num_pages, P, H_kv, d_k], v [num_pages, P, H_kv, d_v] of KV = float, bf16 or std::int8_t,
// passed as 4-D views with any strides (last dimension contiguous), so the caller chooses the
// layout: NHD ([page][token][head][d], vLLM) or HND ([page][head][token][d], FlashInfer's
// other layout, which PagePool uses: each KV head's rows of a page are one contiguous run).
// int8 pages (attention/quant.hpp: symmetric, a scale per token and KV head) also carry the
// scales k_scale, v_scale [num_pages, P, H_kv] f32 (any strides). PagedKV<KV> is those views;
// the kernels only read it, so an engine keeps its own allocator and passes views of its buffers.
// int8 pages are read by attention_decode_paged (dequantised in registers, DecodeOptions::
// precision as for a contiguous int8 cache) and attention_prefill_paged (in place, widened as
// the prefill kernel packs its key tiles);
// Loop Attention's and sparse attention's paged kernels take float or bf16 pages.
//
// Page tables: PageTable describes B sequences in CSR form, FlashInfer's paged_kv_indptr /
// paged_kv_indices:
//   indptr  [B + 1] int64, indptr[0] = 0, non-decreasing: sequence b owns the page table
//           indices[indptr[b] .. indptr[b + 1]);
//   indices [indptr[B]] int32: page ids in [0, num_pages); token position s of sequence b is
//           slot s mod P of page indices[indptr[b] + s / P];
//   lengths [B] int64: tokens of sequence b, 0 <= lengths[b] <= P · (pages listed for b).
// Pages may be shared between sequences (a common prompt prefix) and may appear in any order;
// a table may list more pages than its length needs (pages allocated ahead). check_page_table
// validates all of it (every listed index in range, every length covered by its pages) and
// names the argument, the sequence and the entry in its attnkit::Error.
//
// PagePool<KV>: owns num_pages pages of K and V (HND, 64-byte aligned), hands page ids out
// (allocate: the lowest free id, one reference; share: one more reference, for a page several
// sequences hold; free: drops a reference, the page returns to the pool with the last; all check
// their argument) and gives the views. grow() enlarges the pool keeping every page's contents
// and id (views taken before are invalid after it); copy_page() copies one page's K and V rows
// of every head into another (copy-on-write of a shared page). Nothing in the kernels depends
// on it. kv_head_range(cache, h0, h1) views heads [h0, h1) of a cache: one pool can hold the
// K/V of many layers side by side on its head axis (a batch session's pool: one page id covers
// the same positions in every layer).
//
// paged_append(cache, table, cu_seqlens, k, v): appends n_b = cu_seqlens[b + 1] - cu_seqlens[b]
// tokens to each sequence b at positions lengths[b] .. lengths[b] + n_b - 1, i.e. rows
// cu_seqlens[b] .. cu_seqlens[b + 1] of k [n, H_kv, d_k] and v [n, H_kv, d_v] (f32, any strides,
// last dimension contiguous; rounded to nearest even for bf16 pages, quantised per row with its
// scale for int8 pages, which refuse a NaN or infinite row before writing anything). A decode step is
// cu_seqlens = {0, 1, ..., B}. The table's pages must already cover lengths[b] + n_b tokens;
// lengths are NOT advanced (the caller owns them): attend with lengths[b] + n_b afterwards.
// Everything is checked before the first row is written, including that no two rows of the call
// land in the same slot (two sequences appending into a page they share); writing into a page
// that another sequence shares is otherwise the caller's business (copy-on-write is the
// engine's: PagePool::copy_page). num_threads (the last
// argument, default 1; 0 = default) spreads the rows over threads from 64 rows on.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

template <class T>
using View4 = View<T, 4>;
template <class T>
using ConstView4 = View<const T, 4>;

// K and V pages: k [num_pages, P, H_kv, d_k], v [num_pages, P, H_kv, d_v]; int8: and their
// scales [num_pages, P, H_kv] (unused otherwise).
template <class KV>
struct PagedKV {
  ConstView4<KV> k, v;
  ConstView3<float> k_scale{}, v_scale{};
  std::int64_t num_pages() const { return k.shape[0]; }
  std::int64_t page_size() const { return k.shape[1]; }
  std::int64_t kv_heads() const { return k.shape[2]; }
  std::int64_t head_dim_k() const { return k.shape[3]; }
  std::int64_t head_dim_v() const { return v.shape[3]; }
};
// The same, writable (appends).
template <class KV>
struct MutablePagedKV {
  View4<KV> k, v;
  View3<float> k_scale{}, v_scale{};
  operator PagedKV<KV>() const { return {k, v, k_scale, v_scale}; }  // NOLINT: a writable cache can always be read
};

// B sequences' page tables and lengths (see the top of the file).
struct PageTable {
  std::span<const std::int64_t> indptr;   // [B + 1]
  std::span<const std::int32_t> indices;  // [indptr[B]]
  std::span<const std::int64_t> lengths;  // [B]
  std::int64_t batch() const { return static_cast<std::int64_t>(lengths.size()); }
  // Page of token position s of sequence b (no checks).
  std::int32_t page(std::int64_t b, std::int64_t s, int page_shift) const { return indices[indptr[b] + (s >> page_shift)]; }
};

namespace detail::paged {

inline int log2_exact(std::int64_t p) {
  int s = 0;
  while ((std::int64_t{1} << s) < p) ++s;
  return s;
}

// The pages themselves: shapes agree, P a power of two, last dimensions contiguous.
template <class KV>
void check_pages(const char* fn, const PagedKV<KV>& c) {
  static_assert(kv::is_cache_type_v<KV>, "paged K/V must be float, bf16 or std::int8_t");
  check_view(c.k, fn, "cache.k");
  check_view(c.v, fn, "cache.v");
  const std::int64_t P = c.k.shape[1];
  ATTNKIT_REQUIRE(P >= 1 && (P & (P - 1)) == 0, fn, ": argument 'cache.k': page size P = ", P,
                  " (dimension 1 of [num_pages, P, H_kv, d_k]) must be a power of two");
  ATTNKIT_REQUIRE(c.k.shape[2] >= 1, fn, ": argument 'cache.k': number of KV heads must be >= 1, got shape ",
                  shape_string(c.k));
  ATTNKIT_REQUIRE(c.k.shape[3] >= 1, fn, ": argument 'cache.k': head dimension d_k must be >= 1, got shape ",
                  shape_string(c.k));
  ATTNKIT_REQUIRE(c.v.shape[0] == c.k.shape[0] && c.v.shape[1] == P && c.v.shape[2] == c.k.shape[2], fn,
                  ": argument 'cache.v': shape ", shape_string(c.v), " must be [num_pages, P, H_kv, d_v] = [",
                  c.k.shape[0], ", ", P, ", ", c.k.shape[2], ", d_v] like 'cache.k' ", shape_string(c.k));
  ATTNKIT_REQUIRE(c.v.shape[3] >= 1, fn, ": argument 'cache.v': head dimension d_v must be >= 1, got shape ",
                  shape_string(c.v));
  if constexpr (kv::is_quant_v<KV>)
    for (const auto& [sc, name] : {std::pair{c.k_scale, "cache.k_scale"}, std::pair{c.v_scale, "cache.v_scale"}}) {
      ATTNKIT_REQUIRE(sc.data != nullptr, fn, ": argument '", name, "': int8 pages need their scales [num_pages, P, H_kv]");
      ATTNKIT_REQUIRE(sc.shape[0] == c.k.shape[0] && sc.shape[1] == P && sc.shape[2] == c.k.shape[2], fn, ": argument '",
                      name, "': shape ", shape_string(sc), " must be [num_pages, P, H_kv] = [", c.k.shape[0], ", ", P,
                      ", ", c.k.shape[2], "]");
    }
}

// The table against pages of P tokens, num_pages of them; `extra[b]` tokens are added to each
// length (appends: the tokens about to be written) before the coverage check.
inline void check_table(const char* fn, const PageTable& t, std::int64_t num_pages, std::int64_t P,
                        std::span<const std::int64_t> extra = {}) {
  const std::int64_t B = t.batch();
  ATTNKIT_REQUIRE(static_cast<std::int64_t>(t.indptr.size()) == B + 1, fn, ": argument 'table.indptr': has ",
                  t.indptr.size(), " entries, must have batch + 1 = ", B + 1, " (batch = table.lengths.size())");
  ATTNKIT_REQUIRE(t.indptr[0] == 0, fn, ": argument 'table.indptr': must start with 0, got ", t.indptr[0]);
  for (std::int64_t b = 0; b < B; ++b)
    ATTNKIT_REQUIRE(t.indptr[b + 1] >= t.indptr[b], fn, ": argument 'table.indptr': must be non-decreasing, but [",
                    b + 1, "] = ", t.indptr[b + 1], " < [", b, "] = ", t.indptr[b]);
  ATTNKIT_REQUIRE(t.indptr[B] <= static_cast<std::int64_t>(t.indices.size()), fn,
                  ": argument 'table.indices': has ", t.indices.size(), " entries but table.indptr[", B,
                  "] = ", t.indptr[B], " pages are listed");
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t e = t.indptr[b]; e < t.indptr[b + 1]; ++e)
      ATTNKIT_REQUIRE(t.indices[e] >= 0 && t.indices[e] < num_pages, fn, ": argument 'table.indices': entry ", e,
                      " (page ", e - t.indptr[b], " of sequence ", b, ") = ", t.indices[e],
                      " is out of range [0, num_pages = ", num_pages, ")");
    const std::int64_t len = t.lengths[b], add = extra.empty() ? 0 : extra[b];
    ATTNKIT_REQUIRE(len >= 0, fn, ": argument 'table.lengths': length of sequence ", b, " is negative (", len, ")");
    const std::int64_t cover = (t.indptr[b + 1] - t.indptr[b]) * P;
    ATTNKIT_REQUIRE(len + add <= cover, fn, ": argument 'table.lengths': sequence ", b, " needs ", len + add,
                    " tokens", add ? std::string(" (length ") + std::to_string(len) + " + " + std::to_string(add) +
                                         " appended)" : std::string(),
                    " but its ", t.indptr[b + 1] - t.indptr[b], " pages of ", P, " hold only ", cover);
  }
}

inline void check_cu_seqlens(const char* fn, std::span<const std::int64_t> cu, std::int64_t B, std::int64_t T,
                             const char* what) {
  ATTNKIT_REQUIRE(static_cast<std::int64_t>(cu.size()) == B + 1, fn, ": argument 'cu_seqlens': has ", cu.size(),
                  " entries, must have batch + 1 = ", B + 1);
  ATTNKIT_REQUIRE(cu[0] == 0, fn, ": argument 'cu_seqlens': must start with 0, got ", cu[0]);
  for (std::int64_t b = 0; b < B; ++b)
    ATTNKIT_REQUIRE(cu[b + 1] >= cu[b], fn, ": argument 'cu_seqlens': must be non-decreasing, but [", b + 1, "] = ",
                    cu[b + 1], " < [", b, "] = ", cu[b]);
  ATTNKIT_REQUIRE(cu[B] == T, fn, ": argument 'cu_seqlens': last entry ", cu[B], " must equal the number of ", what,
                  " rows T = ", T);
}

}  // namespace detail::paged

// Validates a cache and a table together (kernels call it; engines may too, e.g. in debug builds).
template <class KV>
void check_page_table(const char* fn, const PagedKV<KV>& cache, const PageTable& table) {
  detail::paged::check_pages(fn, cache);
  detail::paged::check_table(fn, table, cache.num_pages(), cache.page_size());
}

// Pages of P tokens, owned; HND storage ([page][H_kv][P][d]) behind [num_pages, P, H_kv, d] views.
template <class KV>
class PagePool {
  static_assert(detail::kv::is_cache_type_v<KV>, "PagePool: KV must be float, bf16 or std::int8_t");
  static constexpr bool quant = detail::kv::is_quant_v<KV>;

 public:
  PagePool(std::int64_t num_pages, std::int64_t page_size, std::int64_t kv_heads, std::int64_t head_dim_k,
           std::int64_t head_dim_v)
      : n_(num_pages), p_(page_size), h_(kv_heads), dk_(head_dim_k), dv_(head_dim_v) {
    constexpr const char* fn = "PagePool";
    ATTNKIT_REQUIRE(num_pages >= 0 && num_pages <= (std::int64_t{1} << 31) - 1, fn,
                    ": argument 'num_pages': must be in [0, 2^31 - 1], got ", num_pages);
    ATTNKIT_REQUIRE(page_size >= 1 && (page_size & (page_size - 1)) == 0, fn,
                    ": argument 'page_size': must be a power of two, got ", page_size);
    ATTNKIT_REQUIRE(kv_heads >= 1, fn, ": argument 'kv_heads': must be >= 1, got ", kv_heads);
    ATTNKIT_REQUIRE(head_dim_k >= 1, fn, ": argument 'head_dim_k': must be >= 1, got ", head_dim_k);
    ATTNKIT_REQUIRE(head_dim_v >= 1, fn, ": argument 'head_dim_v': must be >= 1, got ", head_dim_v);
    const std::uint64_t bytes = page_bytes(p_, h_, dk_, dv_) * static_cast<std::uint64_t>(n_);
    require_memory(bytes, "PagePool: " + std::to_string(n_) + " pages of " + std::to_string(p_) + " tokens");
    k_.reset(static_cast<KV*>(allocate_aligned(static_cast<std::size_t>(n_ * p_ * h_ * dk_) * sizeof(KV))));
    v_.reset(static_cast<KV*>(allocate_aligned(static_cast<std::size_t>(n_ * p_ * h_ * dv_) * sizeof(KV))));
    if constexpr (quant) {
      ks_.reset(static_cast<float*>(allocate_aligned(static_cast<std::size_t>(n_ * p_ * h_) * sizeof(float))));
      vs_.reset(static_cast<float*>(allocate_aligned(static_cast<std::size_t>(n_ * p_ * h_) * sizeof(float))));
    }
    refs_.assign(static_cast<std::size_t>(n_), 0);
  }

  // Bytes of one page of P tokens, H_kv heads (int8: with a scale per token, head, K and V).
  static std::uint64_t page_bytes(std::int64_t P, std::int64_t H_kv, std::int64_t dk, std::int64_t dv) {
    return static_cast<std::uint64_t>(P * H_kv) * ((dk + dv) * sizeof(KV) + (quant ? 2 * sizeof(float) : 0));
  }

  // The lowest free page id, with one reference; throws when every page is in use.
  std::int32_t allocate() {
    for (; next_ < n_ && refs_[next_]; ++next_) {
    }
    ATTNKIT_REQUIRE(next_ < n_, "PagePool::allocate: all ", n_, " pages are in use");
    refs_[next_] = 1;
    ++in_use_;
    return static_cast<std::int32_t>(next_++);
  }
  // One more reference to an allocated page (another sequence holds it too).
  void share(std::int32_t page) {
    check_allocated("PagePool::share", page);
    ++refs_[page];
  }
  // Drops one reference; the page is free again when the last one goes.
  void free(std::int32_t page) {
    check_allocated("PagePool::free", page);
    if (--refs_[page] > 0) return;
    --in_use_;
    next_ = std::min<std::int64_t>(next_, page);
  }
  // References to a page (0: free).
  std::int32_t refs(std::int32_t page) const {
    ATTNKIT_REQUIRE(page >= 0 && page < n_, "PagePool::refs: argument 'page': ", page, " is out of range [0, num_pages = ", n_, ")");
    return refs_[page];
  }

  // Enlarges the pool to num_pages pages (no-op when it has that many), keeping every page's
  // contents, id and references. Views taken before are invalid afterwards.
  void grow(std::int64_t num_pages) {
    if (num_pages <= n_) return;
    PagePool bigger(num_pages, p_, h_, dk_, dv_);
    const auto copy = [&](const KV* from, KV* to, std::int64_t d) {
      std::copy(from, from + n_ * p_ * h_ * d, to);  // HND: the old pages are the new pool's first ones
    };
    copy(k_.get(), bigger.k_.get(), dk_);
    copy(v_.get(), bigger.v_.get(), dv_);
    if constexpr (quant) {
      std::copy(ks_.get(), ks_.get() + n_ * p_ * h_, bigger.ks_.get());
      std::copy(vs_.get(), vs_.get() + n_ * p_ * h_, bigger.vs_.get());
    }
    std::copy(refs_.begin(), refs_.end(), bigger.refs_.begin());
    bigger.in_use_ = in_use_;
    bigger.next_ = next_;
    *this = std::move(bigger);
  }

  // Copies page `from`'s K and V rows (all slots, all heads) into page `to`.
  void copy_page(std::int32_t from, std::int32_t to) {
    check_allocated("PagePool::copy_page", from);
    check_allocated("PagePool::copy_page", to);
    const std::int64_t nk = p_ * h_ * dk_, nv = p_ * h_ * dv_;
    std::copy(k_.get() + from * nk, k_.get() + (from + 1) * nk, k_.get() + to * nk);
    std::copy(v_.get() + from * nv, v_.get() + (from + 1) * nv, v_.get() + to * nv);
    if constexpr (quant) {
      const std::int64_t ns = p_ * h_;
      std::copy(ks_.get() + from * ns, ks_.get() + (from + 1) * ns, ks_.get() + to * ns);
      std::copy(vs_.get() + from * ns, vs_.get() + (from + 1) * ns, vs_.get() + to * ns);
    }
  }

  std::int64_t num_pages() const { return n_; }
  std::int64_t pages_in_use() const { return in_use_; }
  std::int64_t page_size() const { return p_; }

  MutablePagedKV<KV> view() {
    MutablePagedKV<KV> c{View4<KV>(k_.get(), {n_, p_, h_, dk_}, {h_ * p_ * dk_, dk_, p_ * dk_, 1}),
                         View4<KV>(v_.get(), {n_, p_, h_, dv_}, {h_ * p_ * dv_, dv_, p_ * dv_, 1})};
    if constexpr (quant) {  // HND like the codes: [page][head][slot]
      c.k_scale = View3<float>(ks_.get(), {n_, p_, h_}, {h_ * p_, 1, p_});
      c.v_scale = View3<float>(vs_.get(), {n_, p_, h_}, {h_ * p_, 1, p_});
    }
    return c;
  }
  PagedKV<KV> view() const { return const_cast<PagePool*>(this)->view(); }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::int64_t n_, p_, h_, dk_, dv_;
  std::unique_ptr<KV, Free> k_, v_;
  std::unique_ptr<float, Free> ks_, vs_;  // int8: scales [page][head][slot]
  std::vector<std::int32_t> refs_;
  std::int64_t next_ = 0, in_use_ = 0;

  void check_allocated(const char* fn, std::int32_t page) const {
    ATTNKIT_REQUIRE(page >= 0 && page < n_, fn, ": argument 'page': ", page, " is out of range [0, num_pages = ", n_, ")");
    ATTNKIT_REQUIRE(refs_[page] > 0, fn, ": argument 'page': page ", page, " is not allocated");
  }
};

// Heads [h0, h1) of a cache's KV-head axis (one layer's share of a pool holding several, or
// one KV group of a read-only cache): Cache = MutablePagedKV<KV> or PagedKV<KV>.
template <class Cache>
  requires requires(const Cache& c) { c.k.slice(2, 0, 1); c.k_scale.slice(2, 0, 1); }
Cache kv_head_range(const Cache& c, std::int64_t h0, std::int64_t h1) {
  ATTNKIT_REQUIRE(h0 >= 0 && h0 < h1 && h1 <= c.k.shape[2], "kv_head_range: heads [", h0, ", ", h1,
                  ") are not within the cache's ", c.k.shape[2], " KV heads");
  Cache r{c.k.slice(2, h0, h1), c.v.slice(2, h0, h1)};
  if (c.k_scale.data) {
    r.k_scale = c.k_scale.slice(2, h0, h1);
    r.v_scale = c.v_scale.slice(2, h0, h1);
  }
  return r;
}

// Rows from which paged_append spreads over its threads.
inline constexpr std::int64_t kParallelAppendRows = 64;

namespace detail::paged {

// paged_append's rows must land in distinct slots. Two sequences that share a partly filled page
// (a prompt prefix not yet copied on write) and append in the same step would otherwise write
// the same slot: each overwrites the other's token in silence, and from 64 rows on (threads)
// the bits depend on which thread wins. Sorting the rows' (page, slot) keys costs O(n log n) on
// n rows, nothing beside the copy of n · H_kv rows that follows.
inline void check_distinct_slots(const char* fn, const PageTable& table, std::span<const std::int64_t> cu_seqlens,
                                 const std::vector<std::int64_t>& seq_of, int shift) {
  const std::int64_t n = static_cast<std::int64_t>(seq_of.size());
  if (n < 2) return;
  const auto position = [&](std::int64_t r) {
    const std::int64_t b = seq_of[static_cast<std::size_t>(r)];
    return table.lengths[b] + (r - cu_seqlens[b]);
  };
  std::vector<std::pair<std::int64_t, std::int64_t>> keys(static_cast<std::size_t>(n));  // (page · P + slot, row)
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int64_t b = seq_of[static_cast<std::size_t>(r)], s = position(r);
    keys[r] = {(static_cast<std::int64_t>(table.page(b, s, shift)) << shift) | (s & ((std::int64_t{1} << shift) - 1)), r};
  }
  std::sort(keys.begin(), keys.end());
  for (std::int64_t i = 1; i < n; ++i) {
    if (keys[i].first != keys[i - 1].first) continue;
    const std::int64_t r0 = keys[i - 1].second, r1 = keys[i].second;
    throw_error(fn, ": argument 'table': rows ", r0, " and ", r1, " (sequence ", seq_of[r0], " position ", position(r0),
                 ", sequence ", seq_of[r1], " position ", position(r1), ") would both be written to slot ",
                 keys[i].first & ((std::int64_t{1} << shift) - 1), " of page ", keys[i].first >> shift,
                 seq_of[r0] == seq_of[r1] ? ": the sequence's table lists that page twice"
                                          : ": the sequences share that page (copy it on write first, PagePool::copy_page)");
  }
}

}  // namespace detail::paged

// See the top of the file.
template <class KV>
void paged_append(const MutablePagedKV<KV>& cache, const PageTable& table, std::span<const std::int64_t> cu_seqlens,
                  ConstView3<float> k, ConstView3<float> v, int num_threads = 1) {
  constexpr const char* fn = "paged_append";
  const PagedKV<KV> c = cache;
  detail::paged::check_pages(fn, c);
  check_view(k, fn, "k");
  check_view(v, fn, "v");
  const std::int64_t H_kv = c.kv_heads(), dk = c.head_dim_k(), dv = c.head_dim_v(), n = k.shape[0];
  ATTNKIT_REQUIRE(k.shape[1] == H_kv && k.shape[2] == dk, fn, ": argument 'k': shape ", detail::shape_string(k),
                  " must be [n, H_kv, d_k] = [n, ", H_kv, ", ", dk, "]");
  ATTNKIT_REQUIRE(v.shape[0] == n && v.shape[1] == H_kv && v.shape[2] == dv, fn, ": argument 'v': shape ",
                  detail::shape_string(v), " must be [n, H_kv, d_v] = [", n, ", ", H_kv, ", ", dv, "]");
  const std::int64_t B = table.batch();
  detail::paged::check_cu_seqlens(fn, cu_seqlens, B, n, "k/v");
  std::vector<std::int64_t> add(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) add[b] = cu_seqlens[b + 1] - cu_seqlens[b];
  detail::paged::check_table(fn, table, c.num_pages(), c.page_size(), add);
  if constexpr (detail::kv::is_quant_v<KV>) {
    detail::kv::check_finite(fn, "k", k, 0);
    detail::kv::check_finite(fn, "v", v, 0);
  }
  const int shift = detail::paged::log2_exact(c.page_size());
  const std::int64_t mask = c.page_size() - 1;
  std::vector<std::int64_t> seq_of(static_cast<std::size_t>(n));  // row -> its sequence
  for (std::int64_t b = 0; b < B; ++b) std::fill(seq_of.begin() + cu_seqlens[b], seq_of.begin() + cu_seqlens[b + 1], b);
  detail::paged::check_distinct_slots(fn, table, cu_seqlens, seq_of, shift);
  // Rows in parallel only where there are enough of them (a prefill: the first touch of fresh
  // pages costs as much as the copy); a decode step's B rows stay on the caller's thread.
  parallel_for(n, n >= kParallelAppendRows ? num_threads : 1, [&](std::int64_t r) {
      const std::int64_t b = seq_of[static_cast<std::size_t>(r)];
      const std::int64_t s = table.lengths[b] + (r - cu_seqlens[b]);
      const std::int64_t page = table.page(b, s, shift), slot = s & mask;
      for (std::int64_t h = 0; h < H_kv; ++h) {
        KV* kd = cache.k.ptr(page, slot, h);
        KV* vd = cache.v.ptr(page, slot, h);
        if constexpr (detail::kv::is_quant_v<KV>) {
          detail::kv::store_row(k.ptr(r, h), kd, &cache.k_scale(page, slot, h), dk);
          detail::kv::store_row(v.ptr(r, h), vd, &cache.v_scale(page, slot, h), dv);
        } else if constexpr (std::is_same_v<KV, bf16>) {
          simd::to_bf16(k.ptr(r, h), kd, dk);
          simd::to_bf16(v.ptr(r, h), vd, dv);
        } else {
          std::copy(k.ptr(r, h), k.ptr(r, h) + dk, kd);
          std::copy(v.ptr(r, h), v.ptr(r, h) + dv, vd);
        }
      }
  });
}

// One sequence: its page ids and current length; k/v [n, H_kv, d] go to positions length ...
template <class KV>
void paged_append(const MutablePagedKV<KV>& cache, std::span<const std::int32_t> pages, std::int64_t length,
                  ConstView3<float> k, ConstView3<float> v) {
  const std::int64_t indptr[2] = {0, static_cast<std::int64_t>(pages.size())}, cu[2] = {0, k.shape[0]};
  const PageTable t{indptr, pages, std::span<const std::int64_t>(&length, 1)};
  paged_append(cache, t, cu, k, v);
}

}  // namespace attnkit
