// attnkit/sparse/sparse_attention.hpp — softmax attention restricted to selected keys
// (DeepSeek Sparse Attention's main attention, spec §8.2, for GQA).
//
//   out[t, h] = Σ_{s ∈ S_t} softmax_s(scale · q[t, h]·k[s, h/G]) · v[s, h/G],   lse[t, h] likewise
//
// S_t = the valid entries of indices[t]: one selection per query token, shared by all its heads
// and KV groups (sparse/indexer.hpp makes it). Shapes: q [T, H, d_k] f32; k [T_k, H_kv, d_k] and
// v [T_k, H_kv, d_v] of KV = float or bf16 with any strides (last dimension contiguous), e.g. a
// KVCache's; indices [T, K] int32: valid entries strictly ascending, then only -1 (padding);
// out [T, H, d_v] f32; lse [T, H] optional. The causal mask is re-applied as a check: every
// entry must be <= p_t = q_offset + t (opt.q_offset -1 -> T_k - T) and < T_k; a violation is an
// Error naming the query and entry, never a read out of bounds. A query whose selection is empty
// gets out = 0, lse = -inf.
// Decode (one query): q [H, d_k], indices [K], out [H, d_v], lse [H]; the query sits at
// q_offset (-1 -> T_k - 1).
//
// Design: decode is the decode kernel (attention/decode.hpp) reading rows through the index
// list instead of consecutive positions, so the online softmax, the GQA sharing of each loaded
// K/V row by the G heads of its group, and bf16 widening are the same code. It splits the index
// list into fixed chunks merged in order (the rows come from DRAM, so the next block's rows are
// prefetched: a gather defeats the hardware prefetcher). Prefill, with AVX-512 and head
// dimensions up to 256, is the key-major kernel of sparse/key_major.hpp: a work item is 32
// queries × a group of KV heads (all of them when the tiles give each thread 4 items) walking the
// keys in blocks of 512; each selected K row is loaded and widened once for every query of the
// item that selected it, and the scores are then gathered
// into decode's P·V per query. Elsewhere (no AVX-512, wider heads) a work item is 64 queries ×
// one KV head walking the keys in blocks whose K/V rows fit in L2 (512 KiB), each query
// attending to its selected keys inside the block with decode's kernel and merging that partial
// state into its running one. Random selections leave little reuse (each key of a late block
// is wanted by about K/T_k of the queries), so prefill runs at a third of dense attention's
// rate per selected pair (docs/performance.md, "Sparse attention").
// A leading run of queries whose selections hold every key they see (the first K tokens of a
// prompt under top-K) is dense causal attention and runs as such: attention_prefill's flash
// kernel computes those rows (bit for bit its result), the sparse kernels the rest.
// Results are bit-identical for any thread count; decode over every key equals
// attention_decode bit for bit (same chunks, same arithmetic).
//
// Over a paged cache (attention/paged_kv.hpp; positions are those of each sequence's page table;
// f32, bf16 or int8 pages, int8 read in place with their scales as the QuantView3 overloads read
// a contiguous int8 cache, Precision::fast included):
//   sparse_attention_decode_paged(q [B, H, d_k], cache, table, indices [B, K], out [B, H, d_v],
//     opt, lse [B, H]): one query per sequence at its newest position lengths[b] - 1, each with
//     its own selection (checked as above against that sequence's length). The paged decode
//     kernel (attention/batched_decode.hpp) reads the selected rows through the page table: the
//     same chunks of the selection, the same arithmetic, so out equals sparse_attention_decode on
//     a contiguous copy of each sequence bit for bit (same opt.kv_chunk; it must be 0 or a
//     multiple of the page size here), for any thread count.
//   sparse_attention_prefill_paged(q [T, H, d_k], cache, table, cu_seqlens, indices [T, K], out,
//     opt, lse): the new tokens of B sequences packed along the token axis (cu_seqlens, as
//     attention_prefill_paged: they are each sequence's last tokens, already appended). Each
//     sequence runs as sparse_attention_prefill with q_offset = lengths[b] - n_b, bit for bit
//     the contiguous call: the key-major kernel (and the flash kernel for a leading run of full
//     selections) reads the pages in place; the query-major kernel (head dimensions above 256,
//     or no AVX-512) reads a staged contiguous copy of the sequence's pages (int8: dequantised).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/common.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"
#include "attnkit/sparse/key_major.hpp"

namespace attnkit {

struct SparseAttentionOptions {
  float scale = 0.f;           // 0 -> 1/sqrt(d_k)
  std::int64_t q_offset = -1;  // absolute position of query row 0; -1 -> T_k - T
  int num_threads = 0;         // 0 -> OpenMP default
  std::int64_t kv_chunk = 0;   // decode: selected keys per work item; 0 -> 512 (never from the thread count)
  // int8 K/V: fast scores the selected keys against the query quantised to int8 per (token, head)
  // on VNNI (attention_decode's Precision::fast); a prefill's leading run of full selections is
  // attention_prefill under the same precision (on AMX tiles where the machine has them).
  Precision precision = Precision::exact;
};

namespace detail::sparse {

// Number of valid entries of one selection row, after checking it (see the contract).
inline std::int64_t checked_count(const char* fn, const std::int32_t* idx, std::int64_t K, std::int64_t pos,
                                  std::int64_t T_k, std::int64_t t) {
  std::int64_t n = 0;
  while (n < K && idx[n] >= 0) {
    const std::int64_t s = idx[n];
    if (s > pos || s >= T_k || (n > 0 && s <= idx[n - 1]))
      detail::throw_error(fn, ": argument 'indices': query ", t, " (position ", pos, "), entry ", n, " = ", s,
                          s >= T_k ? " is past the last key (T_k = " + std::to_string(T_k) + ")"
                          : s > pos ? " is after the query's position (causal)"
                                    : " is not above the entry before it (" + std::to_string(idx[n - 1]) +
                                          "; entries must be strictly ascending)");
    ++n;
  }
  for (std::int64_t i = n; i < K; ++i)
    if (idx[i] != -1)
      detail::throw_error(fn, ": argument 'indices': query ", t, ", entry ", i, " = ", idx[i],
                          ": after the first -1 every entry must be -1 (padding)");
  return n;
}

template <class KV>
void check_kv(const char* fn, ConstView3<KV> k, ConstView3<KV> v, std::int64_t H, std::int64_t dk) {
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>,
                "sparse attention: K/V must be float or bf16 (int8 decode: QuantView3)");
  check_view(k, fn, "k");
  check_view(v, fn, "v");
  const std::int64_t H_kv = k.shape[1];
  ATTNKIT_REQUIRE(dk >= 1, fn, ": argument 'q': head dimension d_k must be >= 1");
  ATTNKIT_REQUIRE(H_kv >= 1, fn, ": argument 'k': number of KV heads H_kv must be >= 1, got shape ", detail::shape_string(k));
  ATTNKIT_REQUIRE(k.shape[2] == dk, fn, ": argument 'k': head dimension ", k.shape[2], " differs from q's d_k = ", dk);
  ATTNKIT_REQUIRE(v.shape[0] == k.shape[0] && v.shape[1] == H_kv, fn, ": argument 'v': shape ", detail::shape_string(v),
                  " must be [T_k, H_kv, d_v] with T_k = ", k.shape[0], ", H_kv = ", H_kv);
  ATTNKIT_REQUIRE(v.shape[2] >= 1, fn, ": argument 'v': head dimension d_v must be >= 1");
  ATTNKIT_REQUIRE(H % H_kv == 0, fn, ": argument 'q': number of query heads H = ", H,
                  " is not a multiple of the number of KV heads H_kv = ", H_kv);
  ATTNKIT_REQUIRE(k.shape[0] <= INT32_MAX, fn, ": argument 'k': ", k.shape[0], " keys exceed the int32 index range");
}

inline void check_options(const char* fn, const SparseAttentionOptions& opt) {
  ATTNKIT_REQUIRE(std::isfinite(opt.scale), fn, ": argument 'opt.scale': must be finite, got ", opt.scale);
  ATTNKIT_REQUIRE(opt.q_offset >= -1, fn, ": argument 'opt.q_offset': must be -1 (default) or >= 0, got ", opt.q_offset);
  ATTNKIT_REQUIRE(opt.num_threads >= 0, fn, ": argument 'opt.num_threads': must be >= 0 (0 = default), got ",
                  opt.num_threads);
  ATTNKIT_REQUIRE(opt.kv_chunk >= 0, fn, ": argument 'opt.kv_chunk': must be >= 0 (0 = default), got ", opt.kv_chunk);
}

// Prefill: queries per work item; they share each key block while it sits in L2.
inline constexpr std::int64_t kQueryTile = 64;

inline void prefetch_l2(const void* p, std::int64_t bytes) {
  for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 2);
}

// Thread scratch use (core/memory.hpp thread_scratch): a prefill item's running states.
struct TileScratch;

}  // namespace detail::sparse

namespace detail::sparse {

// sparse_attention_decode on K/V of storage KV (int8: with qsc, their scales).
template <class KV>
void decode_selected(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, ConstView1<std::int32_t> indices,
                     View2<float> out, const SparseAttentionOptions& opt, View1<float> lse,
                     const detail::decode::QuantScales& qsc = {}) {
  constexpr const char* fn = "sparse_attention_decode";
  check_view(q, fn, "q");
  check_view(indices, fn, "indices");
  check_view(out, fn, "out");
  check_options(fn, opt);
  const std::int64_t H = q.shape[0], T_k = k.shape[0];
  check_kv(fn, k, v, H, q.shape[1]);
  ATTNKIT_REQUIRE(out.shape[0] == H && out.shape[1] == v.shape[2], fn, ": argument 'out': shape ",
                  detail::shape_string(out), " must be [H, d_v] = [", H, ", ", v.shape[2], "]");
  if (!lse.empty()) {
    check_view(lse, fn, "lse");
    ATTNKIT_REQUIRE(lse.shape[0] == H, fn, ": argument 'lse': shape ", detail::shape_string(lse), " must be [H] = [", H, "]");
  }
  ATTNKIT_REQUIRE(opt.q_offset < T_k, fn, ": argument 'opt.q_offset': ", opt.q_offset, " is past the last key (T_k = ", T_k, ")");
  ATTNKIT_REQUIRE(indices.stride[0] == 1 || indices.shape[0] <= 1, fn, ": argument 'indices': must be contiguous");
  const std::int64_t pos = opt.q_offset >= 0 ? opt.q_offset : T_k - 1;
  const std::int64_t n = checked_count(fn, indices.data, indices.shape[0], pos, T_k, 0);
  DecodeOptions dopt;
  dopt.scale = opt.scale;
  dopt.num_threads = opt.num_threads;
  dopt.kv_chunk = opt.kv_chunk;
  dopt.precision = opt.precision;
  detail::decode::decode_keys<true>(q, k, v, out, dopt, lse, n, indices.data, PlainAttention{}, qsc);
}

}  // namespace detail::sparse

// One query against a cache. See the contract at the top of this file.
template <class KV>
void sparse_attention_decode(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, ConstView1<std::int32_t> indices,
                             View2<float> out, const SparseAttentionOptions& opt = {}, View1<float> lse = {}) {
  static_assert(is_storage_type_v<KV>, "sparse_attention_decode: K/V must be float or bf16 (int8: QuantView3)");
  detail::sparse::decode_selected<KV>(q, k, v, indices, out, opt, lse);
}

// int8 K/V (QuantView3, e.g. KVCache<std::int8_t>::keys()): the selected rows read by the int8
// decode kernel (widened in registers, the scales applied per row, as attention_decode reads an
// int8 cache), so a step reads only its selection, never a dequantised copy of the cache.
// Selecting every key equals attention_decode on the QuantView3 bit for bit.
inline void sparse_attention_decode(ConstView2<float> q, const QuantView3& k, const QuantView3& v,
                                    ConstView1<std::int32_t> indices, View2<float> out,
                                    const SparseAttentionOptions& opt = {}, View1<float> lse = {}) {
  check_quant_view(k, "sparse_attention_decode", "k");
  check_quant_view(v, "sparse_attention_decode", "v");
  detail::sparse::decode_selected<std::int8_t>(q, k.codes, v.codes, indices, out, opt, lse,
                                               detail::decode::QuantScales{k.scales, v.scales});
}

namespace detail::sparse {

// Leading queries that select every key they see (a prompt's first K tokens under top-K) are
// dense causal attention: the flash kernel runs them at its dense rate. count[t]: query t's
// selected keys; off: the position of query 0.
inline std::int64_t leading_full(const std::vector<std::int64_t>& count, std::int64_t off) {
  const auto T = static_cast<std::int64_t>(count.size());
  std::int64_t n = 0;
  while (n < T && count[static_cast<std::size_t>(n)] == off + n + 1) ++n;
  return n;
}

#if defined(ATTNKIT_SPARSE_KEY_MAJOR)
inline bool key_major_serves(std::int64_t dk, std::int64_t dv) { return key_major::slices(dk) > 0 && key_major::slices(dv) > 0; }

// Queries [n_full, T) on the key-major kernel; K/V rows contiguous or in pages.
template <class KV>
void key_major_prefill(ConstView3<float> q, const flash::KVRows<KV>& k, const flash::KVRows<KV>& v,
                       ConstView2<std::int32_t> indices, const std::vector<std::int64_t>& count, std::int64_t n_full,
                       View3<float> out, const SparseAttentionOptions& opt, View2<float> lse) {
  namespace km = key_major;
  const std::int64_t T = q.shape[0], H = q.shape[1], dk = q.shape[2], H_kv = k.shape[1], G = H / H_kv;
  const float scale_log2 = resolve_scale(opt.scale, dk) * decode::kLog2e;
  const bool vnni = std::is_same_v<KV, std::int8_t> && opt.precision == Precision::fast;
  const std::int64_t tile = km::tile_queries(vnni), n_tiles = (T - n_full + tile - 1) / tile;
  // An item is a tile against a group of KV heads, which share its bookkeeping: all heads when
  // the tiles alone give every thread several items, fewer when they do not.
  const std::int64_t want = 4 * resolve_threads(opt.num_threads);
  const std::int64_t groups = std::min(H_kv, (want + n_tiles - 1) / n_tiles);
  const std::int64_t per_group = (H_kv + groups - 1) / groups, n_groups = (H_kv + per_group - 1) / per_group;
  parallel_for(n_tiles * n_groups, opt.num_threads, [&](std::int64_t item) {
    ATTNKIT_FAULT_POINT("sparse");
    const std::int64_t jg = item % n_groups, t0 = n_full + item / n_groups * tile, t1 = std::min(T, t0 + tile);
    const std::int64_t j0 = jg * per_group, j1 = std::min(H_kv, j0 + per_group);
    const std::int32_t* rows[km::kTile];
    for (std::int64_t t = t0; t < t1; ++t) rows[t - t0] = indices.ptr(t);
    km::run_tile<KV>(q, k, v, rows, count.data() + t0, t0, t1, j0, j1, G, scale_log2, out, lse, vnni);
  }, /*dynamic=*/true);
}
#endif

}  // namespace detail::sparse

namespace detail::sparse {

// sparse_attention_prefill over rows of storage KV (int8: codes with their scales).
template <class KV>
void prefill_selected(ConstView3<float> q, const flash::KVRows<KV>& k_rows, const flash::KVRows<KV>& v_rows,
                      ConstView2<std::int32_t> indices, View3<float> out, const SparseAttentionOptions& opt,
                      View2<float> lse) {
  using namespace detail::decode;
  constexpr const char* fn = "sparse_attention_prefill";
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  const ConstView3<KV> k(k_rows), v(v_rows);
  check_view(q, fn, "q");
  check_view(indices, fn, "indices");
  check_view(out, fn, "out");
  detail::sparse::check_options(fn, opt);
  const std::int64_t T = q.shape[0], H = q.shape[1], dk = q.shape[2], T_k = k.shape[0], K = indices.shape[1];
  detail::sparse::check_kv(fn, k, v, H, dk);
  const std::int64_t H_kv = k.shape[1], G = H / H_kv, dv = v.shape[2];
  ATTNKIT_REQUIRE(indices.shape[0] == T, fn, ": argument 'indices': ", indices.shape[0], " rows, but q has T = ", T);
  ATTNKIT_REQUIRE(out.shape[0] == T && out.shape[1] == H && out.shape[2] == dv, fn, ": argument 'out': shape ",
                  detail::shape_string(out), " must be [T, H, d_v] = [", T, ", ", H, ", ", dv, "]");
  if (!lse.empty()) {
    check_view(lse, fn, "lse");
    ATTNKIT_REQUIRE(lse.shape[0] == T && lse.shape[1] == H, fn, ": argument 'lse': shape ", detail::shape_string(lse),
                    " must be [T, H] = [", T, ", ", H, "]");
  }
  const std::int64_t off = opt.q_offset >= 0 ? opt.q_offset : T_k - T;
  ATTNKIT_REQUIRE(off >= 0 && off + T <= T_k, fn, ": ", T, " queries at position ", off, " need ", off + T,
                  " keys, but k has ", T_k);
  std::vector<std::int64_t> count(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t)
    count[static_cast<std::size_t>(t)] = detail::sparse::checked_count(fn, indices.ptr(t), K, off + t, T_k, t);
  const std::int64_t n_full = detail::sparse::leading_full(count, off);
  if (n_full > 0) {
    AttentionOptions ao;
    ao.scale = opt.scale;
    ao.q_offset = off;
    ao.queries = {0, n_full};
    ao.num_threads = opt.num_threads;
    ao.precision = opt.precision;
    detail::attention_prefill_rows<simd::default_arch, KV>(q, k_rows, v_rows, out, CausalMask{}, ao, lse);
  }
  if (n_full == T) return;

#if defined(ATTNKIT_SPARSE_KEY_MAJOR)
  if (detail::sparse::key_major_serves(dk, dv)) {
    detail::sparse::key_major_prefill<KV>(q, k_rows, v_rows, indices, count, n_full, out, opt, lse);
    return;
  }
#endif
  if constexpr (quant) {  // the query-major kernel reads f32: a dequantised copy
    const QuantView3 kq{k, ConstView2<float>(k_rows.scales, {T_k, H_kv}, {k_rows.scale_stride[0], k_rows.scale_stride[1]})};
    const QuantView3 vq{v, ConstView2<float>(v_rows.scales, {T_k, H_kv}, {v_rows.scale_stride[0], v_rows.scale_stride[1]})};
    std::vector<float> kf(static_cast<std::size_t>(T_k * H_kv * dk)), vf(static_cast<std::size_t>(T_k * H_kv * dv));
    const View3<float> kd(kf.data(), {T_k, H_kv, dk}), vd(vf.data(), {T_k, H_kv, dv});
    dequantize(kq, kd);
    dequantize(vq, vd);
    prefill_selected<float>(q, ConstView3<float>(kd), ConstView3<float>(vd), indices, out, opt, lse);
    return;
  } else {
  constexpr bool pairs = uses_pairs_v<true, KV>;
  const Problem pb{H, G, dk, dv, pairs ? round_up32(dk) : round_up16(dk), pairs ? round_up32(dv) : round_up16(dv),
                   resolve_scale(opt.scale, dk) * kLog2e};
  // Keys per block: one head's K and V rows of a block take at most 512 KiB of L2.
  const std::int64_t row_bytes = (dk + dv) * static_cast<std::int64_t>(sizeof(KV));
  const std::int64_t block = std::max<std::int64_t>(kBlock, (std::int64_t{512} << 10) / row_bytes / kBlock * kBlock);
  const std::int64_t tile = detail::sparse::kQueryTile;
  const std::int64_t n_tiles = (T - n_full + tile - 1) / tile;
  parallel_for(n_tiles * H_kv, opt.num_threads, [&](std::int64_t item) {
    ATTNKIT_FAULT_POINT("sparse");
    const std::int64_t j = item % H_kv, t0 = n_full + item / H_kv * tile, t1 = std::min(T, t0 + tile), nt = t1 - t0;
    // The partial of one block and the running states [nt][G] (o rows of dv_pad: 64-byte
    // aligned, as chunk_state stores them), then their lse values.
    float* part = thread_scratch<detail::sparse::TileScratch>().get((nt + 1) * G * (pb.dv_pad + 1));
    float* run = part + G * pb.dv_pad;
    float* part_lse = run + nt * G * pb.dv_pad;
    float* run_lse = part_lse + G;
    std::int64_t cursor[detail::sparse::kQueryTile] = {};
    std::int64_t last = -1;  // the furthest selected key of the tile
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t c = count[static_cast<std::size_t>(t)];
      if (c > 0) last = std::max<std::int64_t>(last, indices(t, c - 1));
      std::fill(run_lse + (t - t0) * G, run_lse + (t - t0 + 1) * G, kNegInf);
    }
    for (std::int64_t s0 = 0; s0 <= last; s0 += block) {
      const std::int64_t s1 = s0 + block;
      // Rows of the next block into L2 while this one is used, a share per query.
      const std::int64_t pf0 = s1, pf1 = std::min(s1 + block, last + 1), per_q = (pf1 - pf0 + nt - 1) / nt;
      for (std::int64_t t = t0; t < t1; ++t) {
        const std::int64_t i = t - t0;
        for (std::int64_t r = pf0 + i * per_q; r < std::min(pf1, pf0 + (i + 1) * per_q); ++r) {
          detail::sparse::prefetch_l2(k.ptr(r, j), dk * static_cast<std::int64_t>(sizeof(KV)));
          detail::sparse::prefetch_l2(v.ptr(r, j), dv * static_cast<std::int64_t>(sizeof(KV)));
        }
        const std::int32_t* idx = indices.ptr(t);
        const std::int64_t c0 = cursor[i];
        std::int64_t c1 = c0;
        while (c1 < count[static_cast<std::size_t>(t)] && idx[c1] < s1) ++c1;
        if (c1 == c0) continue;
        cursor[i] = c1;
        const ConstView2<float> qt(q.ptr(t), {H, dk}, {q.stride[1], 1});
        chunk_state<true>(pb, qt, k, v, j, 0, G, c0, c1, part, part_lse, idx, /*prefetch_gather=*/false);
        for (std::int64_t g = 0; g < G; ++g) {
          float* o = run + (i * G + g) * pb.dv_pad;
          float& l = run_lse[i * G + g];
          if (l == kNegInf) {
            std::copy(part + g * pb.dv_pad, part + g * pb.dv_pad + dv, o);
            l = part_lse[g];
          } else {
            merge_state_inplace(o, l, part + g * pb.dv_pad, part_lse[g], dv);
          }
        }
      }
    }
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t i = t - t0;
      for (std::int64_t g = 0; g < G; ++g) {
        float* dst = out.ptr(t, j * G + g);
        if (run_lse[i * G + g] == kNegInf) std::fill(dst, dst + dv, 0.f);
        else std::copy(run + (i * G + g) * pb.dv_pad, run + (i * G + g) * pb.dv_pad + dv, dst);
        if (!lse.empty()) lse(t, j * G + g) = run_lse[i * G + g];
      }
    }
  }, /*dynamic=*/true);
  }
}

}  // namespace detail::sparse

// Many queries, each with its own selection. See the contract at the top of this file.
template <class KV>
void sparse_attention_prefill(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, ConstView2<std::int32_t> indices,
                              View3<float> out, const SparseAttentionOptions& opt = {}, View2<float> lse = {}) {
  static_assert(is_storage_type_v<KV>, "sparse_attention_prefill: K/V must be float or bf16 (int8: QuantView3)");
  detail::sparse::prefill_selected<KV>(q, k, v, indices, out, opt, lse);
}

// int8 K/V (QuantView3, e.g. KVCache<std::int8_t>::keys()): the kernels read the codes in place,
// each selected row widened in registers and scaled as attention_decode reads an int8 cache
// (opt.precision fast: scored on VNNI against the quantised query); the leading run of full
// selections is attention_prefill on the QuantView3. Equals the f32 call on the dequantised K/V
// to f32 rounding (exact). Without AVX-512, or for head dimensions above 256, the query-major
// kernel reads a dequantised copy.
inline void sparse_attention_prefill(ConstView3<float> q, const QuantView3& k, const QuantView3& v,
                                     ConstView2<std::int32_t> indices, View3<float> out,
                                     const SparseAttentionOptions& opt = {}, View2<float> lse = {}) {
  check_quant_view(k, "sparse_attention_prefill", "k");
  check_quant_view(v, "sparse_attention_prefill", "v");
  detail::sparse::prefill_selected<std::int8_t>(q, k, v, indices, out, opt, lse);
}


// One query per sequence over a paged cache. See the contract at the top of this file.
template <class KV>
void sparse_attention_decode_paged(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table,
                                   ConstView2<std::int32_t> indices, View3<float> out,
                                   const SparseAttentionOptions& opt = {}, View2<float> lse = {}) {
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>, "sparse_attention_decode_paged: pages must be float, bf16 or int8");
  constexpr const char* fn = "sparse_attention_decode_paged";
  detail::sparse::check_options(fn, opt);
  DecodeOptions dopt;
  dopt.scale = opt.scale;
  dopt.num_threads = opt.num_threads;
  dopt.kv_chunk = opt.kv_chunk;
  dopt.precision = opt.precision;
  detail::paged::check_decode(fn, q, cache, table, out, dopt, lse);
  ATTNKIT_REQUIRE(opt.q_offset == -1, fn, ": argument 'opt.q_offset': must be -1 (each query sits at its sequence's ",
                  "newest position), got ", opt.q_offset);
  check_view(indices, fn, "indices");
  const std::int64_t B = table.batch(), K = indices.shape[1];
  ATTNKIT_REQUIRE(indices.shape[0] == B, fn, ": argument 'indices': ", indices.shape[0],
                  " rows, but the table has B = ", B, " sequences");
  ATTNKIT_REQUIRE(indices.stride[1] == 1 || K <= 1, fn, ": argument 'indices': rows must be contiguous");
  std::vector<std::int64_t> count(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t L = table.lengths[b];
    count[static_cast<std::size_t>(b)] = detail::sparse::checked_count(fn, indices.ptr(b), K, L - 1, L, b);
  }
  detail::paged::decode<true>(q, cache, table, out, dopt, lse, 0,
                              detail::paged::Selection{indices.data, indices.stride[0], count.data()});
}

// The new tokens of several sequences over a paged cache. See the contract at the top of this file.
template <class KV>
void sparse_attention_prefill_paged(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table,
                                    std::span<const std::int64_t> cu_seqlens, ConstView2<std::int32_t> indices,
                                    View3<float> out, const SparseAttentionOptions& opt = {}, View2<float> lse = {}) {
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>, "sparse_attention_prefill_paged: pages must be float, bf16 or int8");
  constexpr const char* fn = "sparse_attention_prefill_paged";
  check_page_table(fn, cache, table);
  check_view(q, fn, "q");
  check_view(indices, fn, "indices");
  check_view(out, fn, "out");
  detail::sparse::check_options(fn, opt);
  const std::int64_t B = table.batch(), T = q.shape[0];
  detail::paged::check_cu_seqlens(fn, cu_seqlens, B, T, "q");
  ATTNKIT_REQUIRE(opt.q_offset == -1, fn, ": argument 'opt.q_offset': must be -1 (each sequence's queries are its "
                  "last tokens), got ", opt.q_offset);
  ATTNKIT_REQUIRE(indices.shape[0] == T, fn, ": argument 'indices': ", indices.shape[0], " rows, but q has T = ", T);
  ATTNKIT_REQUIRE(out.shape[0] == T, fn, ": argument 'out': ", out.shape[0], " rows, but q has T = ", T);
  ATTNKIT_REQUIRE(lse.empty() || lse.shape[0] == T, fn, ": argument 'lse': ", lse.shape[0], " rows, but q has T = ", T);
  const std::vector<std::int64_t> seqs = detail::paged::sequences_with_queries(fn, table, cu_seqlens);
#if defined(ATTNKIT_SPARSE_KEY_MAJOR)
  // The key-major kernel reads the pages in place (rows through each sequence's page table), as
  // does the flash kernel for a leading run of full selections; the query-major kernel (head
  // dimensions above key_major::kMaxDim, or no AVX-512) reads a staged copy.
  const std::int64_t H = q.shape[1], dk = q.shape[2], dv = cache.v.shape[3];
  if (detail::sparse::key_major_serves(dk, dv)) {
    ATTNKIT_REQUIRE(H % cache.k.shape[2] == 0, fn, ": argument 'q': number of query heads H = ", H,
                    " is not a multiple of the number of KV heads H_kv = ", cache.k.shape[2]);
    ATTNKIT_REQUIRE(cache.k.shape[3] == dk, fn, ": argument 'cache': head_dim ", cache.k.shape[3],
                    " does not match q's head_dim ", dk);
    ATTNKIT_REQUIRE(out.shape[1] == H && out.shape[2] == dv, fn, ": argument 'out': shape ", detail::shape_string(out),
                    " must be [T, H, d_v] = [", T, ", ", H, ", ", dv, "]");
    const std::int64_t H_kv = cache.k.shape[2], K = indices.shape[1];
    const detail::flash::Shape sh{H, H_kv, H / H_kv, dk, dv, resolve_scale(opt.scale, dk) * detail::flash::kLog2e};
    for (const std::int64_t b : seqs) {
      const std::int64_t s0 = cu_seqlens[b], s1 = cu_seqlens[b + 1], L = table.lengths[b], off = L - (s1 - s0);
      const auto [kr, vr] = detail::paged::sequence_kv(cache, table, b, L);  // int8: with the scales, read in place
      const ConstView3<float> qb = q.slice(0, s0, s1);
      const View3<float> ob = out.slice(0, s0, s1);
      const View2<float> lb = lse.empty() ? View2<float>{} : lse.slice(0, s0, s1);
      const ConstView2<std::int32_t> ib = indices.slice(0, s0, s1);
      std::vector<std::int64_t> count(static_cast<std::size_t>(s1 - s0));
      for (std::int64_t t = 0; t < s1 - s0; ++t)
        count[static_cast<std::size_t>(t)] = detail::sparse::checked_count(fn, ib.ptr(t), K, off + t, L, s0 + t);
      const std::int64_t n_full = detail::sparse::leading_full(count, off);
      if (n_full > 0) {  // as sparse_attention_prefill: the flash kernel, here over the pages
        const std::vector<detail::flash::Segment<KV>> segs{{qb, kr, vr, ob, lb, off}};
        const std::vector<std::pair<std::int64_t, std::int64_t>> ranges{{0, n_full}};
        detail::flash::run_prefill_at<simd::default_arch>(opt.precision, segs, sh, CausalMask{}, 0, H, ranges,
                                                          opt.num_threads);
      }
      if (n_full < s1 - s0) detail::sparse::key_major_prefill<KV>(qb, kr, vr, ib, count, n_full, ob, opt, lb);
    }
    return;
  }
#endif
  const auto st = detail::paged::stage(fn, cache, table, seqs, opt.num_threads);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const std::int64_t b = seqs[i], s0 = cu_seqlens[b], s1 = cu_seqlens[b + 1], L = table.lengths[b];
    SparseAttentionOptions o = opt;
    o.q_offset = L - (s1 - s0);
    sparse_attention_prefill<detail::paged::staged_t<KV>>(q.slice(0, s0, s1), st.keys().slice(0, st.offset[i], st.offset[i] + L),
                                 st.values().slice(0, st.offset[i], st.offset[i] + L), indices.slice(0, s0, s1),
                                 out.slice(0, s0, s1), o, lse.empty() ? View2<float>{} : lse.slice(0, s0, s1));
  }
}

}  // namespace attnkit
