// attnkit/attention/batched_decode.hpp — attention of many sequences at once over a paged KV
// cache (attention/paged_kv.hpp): batched decode (one new token per sequence) and batched /
// chunked prefill (several new tokens per sequence, packed along the token axis).
//
// attention_decode_paged(q, cache, table, out, opt, lse, window):
//   q [B, H, d_k] f32 (one query token per sequence; any strides, last dimension contiguous),
//   cache: PagedKV<KV> pages k [num_pages, P, H_kv, d_k], v [num_pages, P, H_kv, d_v], KV = float,
//   bf16 or std::int8_t (with the pages' scales; dequantised in registers, and opt.precision =
//   fast scores the codes on VNNI, as attention_decode over a contiguous int8 cache), any strides; table: PageTable of B sequences (indptr, indices, lengths);
//   out [B, H, d_v] f32; lse [B, H] optional (natural log).
//   out[b, h] = Σ_{s < lengths[b]} softmax_s(scale · q[b, h]·k_b[s, h/G]) · v_b[s, h/G], where
//   k_b[s] is slot s mod P of page indices[indptr[b] + s / P]. lengths[b] = 0 gives out = 0 and
//   lse = -inf. Only the query heads in opt.heads are written (of every sequence).
//   window > 0 (a sliding-window layer): only the last `window` keys of each sequence are seen,
//   positions max(0, lengths[b] - window) .. lengths[b] - 1 (the query's own included, HF's
//   convention). Pages wholly below the window are never read, so an engine may free them and
//   point their table entries at any valid page. Chunks keep their positions (chunk c covers
//   keys c·kv_chunk .. (c+1)·kv_chunk, cut at the window's start).
//   Design: decode.hpp's kernel, unchanged. Each sequence's keys are split into chunks of
//   opt.kv_chunk keys (default max(512, P); it must be a multiple of P, so a chunk is a run of
//   whole pages), and a work item (chunk c of sequence b, a group of KV heads: all of them unless
//   there are too few chunks to keep the threads busy) streams the chunk block by block (32 keys),
//   each block's K and V rows of every head of the group in turn, each row once for all G query
//   heads sharing it. So the item reads whole pages whatever the page layout (NHD, [P, H_kv, d],
//   or the pool's HND). The row addresses come from the page table; each row access also
//   prefetches the same row of the next step (the next head of the block, or the next block)
//   into L1 and of the step after it into L2 (PrefetchingRows, decode.hpp): pages are
//   scattered, so the hardware prefetcher loses the stream at every page. Each thread takes a
//   contiguous run of the items (a sequence's chunks in order, then the next sequence's), steals
//   from the back of another's run when its own is done, and prefetches the first block of the
//   item it runs next during its last block; then each (sequence, head) merges
//   its chunk states in chunk order. So results are bit-identical for any thread count, and
//   bit-identical to attention_decode on a contiguous copy of each sequence's keys with the
//   same opt.kv_chunk (B single-sequence decodes).
//   Variants (attention/variant.hpp), the last argument, as attention_decode takes them: the
//   query metric, soft-cap, ALiBi (sequence b's query at position lengths[b] - 1, key s at s),
//   sinks and an output scale of [B, H] (one row per sequence); bit-identical to attention_decode
//   with the same variant on a contiguous copy. opt.q_position and opt.ring must keep their
//   defaults (the positions come from the table). The same kernel serves Loop Attention over
//   pages (attention/loop.hpp: a global and a windowed call), sparse attention over pages
//   (sparse/sparse_attention.hpp: the rows of each sequence's selection instead of its first
//   lengths[b], detail::paged::Selection) and routed attention over pages (attention/routed.hpp:
//   each token's kept heads as a GQA problem of k_r heads per group; its prefill packs them as
//   the contiguous kernel does, one segment per sequence and KV group).
//
// attention_prefill_paged(q, cache, table, cu_seqlens, out, mask, opt, lse):
//   q [T, H, d_k] f32 packs the new tokens of B sequences: rows cu_seqlens[b] .. cu_seqlens[b + 1]
//   (n_b of them) belong to sequence b and are its LAST n_b cached tokens (append them first,
//   paged_append, and count them in lengths[b]): query row t of sequence b sits at position
//   lengths[b] - n_b + t and sees its keys under `mask` (causal or sliding window), so a chunk
//   of a long prompt (chunked prefill) attends to everything cached before it. out [T, H, d_v],
//   lse [T, H] optional. opt.q_offset must stay -1; opt.queries counts packed rows, opt.heads,
//   opt.precision and opt.num_threads as in attention_prefill; a variant (the last argument) as
//   attention_prefill takes it, its output scale [T, H] by packed row. Results equal
//   attention_prefill of each sequence on its contiguous keys (q_offset = lengths[b] - n_b), bit
//   for bit.
//   Design: the flash prefill kernel (detail/flash_prefill.hpp) runs all sequences as the
//   segments of one varlen call, reading the pages in place: it reads K/V rows only through
//   KVRows::ptr(s, head), which resolves a sequence's position s through its page table (its key
//   tiles pack rows one by one anyway, so scattered pages cost nothing there). No copy of the
//   cache is made; int8 pages are widened to code · scale (their scales read through the same
//   table) as the tiles are packed, so the result equals the f32 kernel over dequantised pages.
//
// Errors (attnkit::Error naming the function and the argument): shapes that disagree, a page
// size that is not a power of two, a page index out of range, a length beyond its sequence's
// pages, a bad indptr or cu_seqlens, a chunk that is not a multiple of P. Exceptions inside the
// threads are rethrown on the caller's (core/threading.hpp). out must not overlap q or the pages.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "attnkit/attention/common.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/merge.hpp"
#include "attnkit/attention/paged_kv.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

namespace detail::paged {

struct PartialScratch;

template <class KV>
void check_decode(const char* fn, ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table,
                  View3<float> out, const DecodeOptions& opt, View2<float> lse) {
  check_page_table(fn, cache, table);
  check_view(q, fn, "q");
  check_view(out, fn, "out");
  const std::int64_t B = table.batch(), H = q.shape[1], dk = q.shape[2], H_kv = cache.kv_heads(),
                     dv = cache.head_dim_v(), P = cache.page_size();
  ATTNKIT_REQUIRE(q.shape[0] == B, fn, ": argument 'q': has ", q.shape[0], " sequences (dimension 0 of [B, H, d_k])",
                  " but the table has B = ", B);
  ATTNKIT_REQUIRE(dk == cache.head_dim_k(), fn, ": argument 'q': head dimension d_k = ", dk,
                  " differs from the pages' d_k = ", cache.head_dim_k());
  ATTNKIT_REQUIRE(H >= 1 && H % H_kv == 0, fn, ": argument 'q': number of query heads H = ", H,
                  " is not a positive multiple of the number of KV heads H_kv = ", H_kv);
  ATTNKIT_REQUIRE(out.shape[0] == B && out.shape[1] == H && out.shape[2] == dv, fn, ": argument 'out': shape ",
                  shape_string(out), " must be [B, H, d_v] = [", B, ", ", H, ", ", dv, "]");
  if (!lse.empty()) {
    check_view(lse, fn, "lse");
    ATTNKIT_REQUIRE(lse.shape[0] == B && lse.shape[1] == H, fn, ": argument 'lse': shape ", shape_string(lse),
                    " must be [B, H] = [", B, ", ", H, "]");
  }
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  ATTNKIT_REQUIRE(hb >= 0 && hb <= he && he <= H, fn, ": argument 'opt.heads': range [", opt.heads.begin, ", ",
                  opt.heads.end, ") is not within [0, H = ", H, "]");
  ATTNKIT_REQUIRE(opt.kv_chunk >= 0 && opt.kv_chunk % P == 0, fn, ": argument 'opt.kv_chunk': must be 0 (default) ",
                  "or a positive multiple of the page size P = ", P, ", got ", opt.kv_chunk);
  ATTNKIT_REQUIRE(opt.num_threads >= 0, fn, ": argument 'opt.num_threads': must be >= 0 (0 = default), got ",
                  opt.num_threads);
  ATTNKIT_REQUIRE(opt.q_position == -1 && opt.ring == 0, fn,
                  ": arguments 'opt.q_position' / 'opt.ring': are not supported by the paged kernel (the positions "
                  "come from the page table); leave them at -1 / 0");
}

// With `sel` (a sparse selection, sparse/sparse_attention.hpp): sequence b's keys are the
// positions sel.idx[b * sel.stride + i], i < sel.count[b] (checked by the caller), instead of
// 0 .. lengths[b] - 1; chunks then split that list, as decode_keys splits it.
struct Selection {
  const std::int32_t* idx = nullptr;
  std::int64_t stride = 0;
  const std::int64_t* count = nullptr;
};

template <bool Vectorized, class KV, class Var = PlainAttention>
void decode(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table, View3<float> out,
            const DecodeOptions& opt, View2<float> lse, std::int64_t window, const Selection& sel = {},
            const Var& var = {}) {
  using namespace detail::decode;
  const std::int64_t B = table.batch(), H = q.shape[1], dk = q.shape[2], H_kv = cache.kv_heads(),
                     dv = cache.head_dim_v(), P = cache.page_size();
  const std::int64_t G = H / H_kv;
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  if (hb == he || B == 0) return;
  // Tuneable's metric: q̃ = q · M once per call, for every sequence's active heads.
  std::vector<float> q_metric;
  if constexpr (Var::has_query) {
    q_metric.assign(static_cast<std::size_t>(B * H * dk), 0.f);
    const std::int64_t nh = he - hb;  // heads [hb, he) of each sequence (the rest stay 0, unread)
    metric_rows(var, B * nh, [&](std::int64_t i) { return q.ptr(i / nh, hb + i % nh); },
                [&](std::int64_t i) { return q_metric.data() + (i / nh * H + hb + i % nh) * dk; }, dk, opt.num_threads);
    q = ConstView3<float>(q_metric.data(), {B, H, dk});
  }
  const std::vector<float> slopes2 = alibi_slopes2(var, H);
  const int shift = log2_exact(P);
  const std::int64_t slot_mask = P - 1;
  const Problem pb = make_problem<Vectorized, KV>(H, G, dk, dv, opt);
  const std::int64_t chunk = opt.kv_chunk > 0 ? opt.kv_chunk : std::max(kDefaultChunk, P);
  // Sequence b sees keys [start[b], lengths[b]); its chunks c0[b] .. are global indices
  // [first[b], first[b + 1]).
  std::vector<std::int64_t> first(static_cast<std::size_t>(B + 1), 0), start(static_cast<std::size_t>(B), 0),
      c0(static_cast<std::size_t>(B), 0);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = sel.idx ? sel.count[b] : table.lengths[b];
    start[b] = window > 0 ? std::max<std::int64_t>(0, len - window) : 0;
    c0[b] = start[b] / chunk;
    first[b + 1] = first[b] + (len > start[b] ? (len + chunk - 1) / chunk - c0[b] : 0);
  }
  const std::int64_t n_chunks = first[B];
  const std::int64_t j_begin = hb / G, j_end = (he - 1) / G + 1, n_heads = j_end - j_begin;
  // A work item is (chunk, group of KV heads): it reads its pages' rows of every head of its
  // group block by block, so the reads of a block cover whole pages. One head alone reads
  // 1/H_kv of each page, strided in an NHD page ([P, H_kv, d]), which the prefetchers follow
  // badly: bf16, B 8, T 8192, NHD pages: 18.7 -> 21.5 GB/s; the pool's HND pages (a head's
  // rows contiguous within a page) are unchanged at ~21. The heads are split into groups only
  // when there are too few chunks to keep the threads busy (heads_per_item, decode.hpp). Each
  // head keeps its own state, so the grouping never changes a bit.
  const std::int64_t heads_per_group =
      heads_per_item(std::max<std::int64_t>(n_chunks, 1), n_heads, resolve_threads(opt.num_threads));
  const std::int64_t n_groups = (n_heads + heads_per_group - 1) / heads_per_group;
  const std::int64_t n_items = n_groups * n_chunks;
  float* part = thread_scratch<PartialScratch>().get(std::max<std::int64_t>(n_chunks, 1) * H * (pb.dv_pad + 1));
  float* part_lse = part + n_chunks * H * pb.dv_pad;
  const std::int64_t k_head = cache.k.stride[2], v_head = cache.v.stride[2];

  // Item i: chunk i / n_groups in sequence order (global chunk index gc), head group i % n_groups.
  struct Item {
    std::int64_t gc, b, ja, jb, t0, t1;
  };
  const auto item_at = [&](std::int64_t item) {
    const std::int64_t gc = item / n_groups, grp = item % n_groups;
    const std::int64_t b = std::upper_bound(first.begin(), first.end(), gc) - first.begin() - 1;
    const std::int64_t c = gc - first[b];
    const std::int64_t ja = j_begin + grp * heads_per_group, jb = std::min(j_end, ja + heads_per_group);
    const std::int64_t len = sel.idx ? sel.count[b] : table.lengths[b];
    return Item{gc, b, ja, jb, std::max((c0[b] + c) * chunk, start[b]), std::min(len, (c0[b] + c + 1) * chunk)};
  };
  const auto key_position = [&](std::int64_t b, std::int64_t i) { return sel.idx ? sel.idx[b * sel.stride + i] : i; };
  // Each thread takes a contiguous run of items (a sequence's chunks in order) and takes from the
  // back of the other's run when its own is done (parallel_stealing, as decode.hpp's items), so
  // it knows the item it runs next: the last block of an item prefetches the next item's first
  // block into L2, head by head, where a dynamic schedule left each item's start waiting on
  // memory. Old and new headers alternated in one process (decode_ab, B 8, 2 threads, bits
  // equal): bf16 mixed 512-8192 / P 16 1.08x (Zen 5) and 1.01x (AMX host), all 8192 1.09x and
  // 1.02x, mixed / P 64 1.05x and 1.04x; int8 fast mixed 1.05x (AMX host).
  parallel_stealing(n_items, opt.num_threads, [&](std::int64_t item_index, std::int64_t next_index) {
    const Item it = item_at(item_index);
    const std::int64_t gc = it.gc, b = it.b, ja = it.ja, jb = it.jb, t0 = it.t0, t1 = it.t1;
    const Item next = next_index >= 0 ? item_at(next_index) : Item{0, 0, 0, 0, 0, 0};
    // The rows of the next item's first block, head next.ja + jh, into L2 (K and V). Its rows of
    // head next.ja are looked up in the page table once; head j is at + (j - next.ja) · head stride.
    const int kl = row_lines<KV>(dk), vl = row_lines<KV>(dv);
    const KV* next_rows[2][kBlock];
    std::int64_t next_n = -1;  // -1: not listed yet
    const auto prefetch_next = [&](std::int64_t jh) {
      if (next.ja + jh >= next.jb) return;
      if (next_n < 0) {
        next_n = std::min<std::int64_t>(kBlock, next.t1 - next.t0);
        for (std::int64_t i = 0; i < next_n; ++i) {
          const std::int64_t p = key_position(next.b, next.t0 + i);
          const std::int32_t pg = table.page(next.b, p, shift);
          next_rows[0][i] = cache.k.ptr(pg, p & slot_mask, next.ja);
          next_rows[1][i] = cache.v.ptr(pg, p & slot_mask, next.ja);
        }
      }
      for (std::int64_t i = 0; i < next_n; ++i) {
        prefetch_lines<1>(next_rows[0][i] + jh * k_head, kl);
        prefetch_lines<1>(next_rows[1][i] + jh * v_head, vl);
      }
    };
    const ConstView2<float> qb(q.ptr(b), {H, dk}, {q.stride[1], 1});
    // ALiBi: the query sits at the sequence's last position, its keys at theirs.
    const auto transform =
        score_transform(var, slopes2, table.lengths[b] - 1, 0, sel.idx ? sel.idx + b * sel.stride : nullptr);
    // position(i): the key position of entry i (a selection's, or i itself: no branch per row
    // on the plain path).
    const auto run_item = [&](auto position) {
      // The rows of each key's first head ja, listed two blocks ahead (a one-head item's far
      // prefetch reads them); head j is at + (j - ja) · head stride. int8 pages: the addresses
      // of the rows' scales (head ja) too.
      constexpr bool quant = std::is_same_v<KV, std::int8_t>;
      const KV* rows[3][2][kBlock];                  // [block index mod 3][K, V][row]
      const float* scales[3][2][quant ? kBlock : 1];  // int8: the same, for the scales
      // What fill_scales reads (chunk_state_rows): entry r's scale of head j, from the listed addresses.
      struct ListedScales {
        const float* const (*sc)[2][quant ? kBlock : 1];
        std::int64_t t0, ja, ks, vs;
        float k(std::int64_t r, std::int64_t j) const {
          return sc[((r - t0) / kBlock) % 3][0][(r - t0) % kBlock][(j - ja) * ks];
        }
        float v(std::int64_t r, std::int64_t j) const {
          return sc[((r - t0) / kBlock) % 3][1][(r - t0) % kBlock][(j - ja) * vs];
        }
        // A block's scales through its listed addresses (the block's ring slot found once).
        bool fill_block(std::int64_t j, std::int64_t b, int n, float* kd, float* vd) const {
          const auto& s = sc[((b - t0) / kBlock) % 3];
          const std::int64_t ko = (j - ja) * ks, vo = (j - ja) * vs;
          for (int i = 0; i < kBlock; ++i) {
            const int r = std::min(i, n - 1);
            kd[i] = s[0][r][ko];
            vd[i] = s[1][r][vo];
          }
          return true;
        }
      };
      const std::int64_t ks_head = quant ? cache.k_scale.stride[2] : 0, vs_head = quant ? cache.v_scale.stride[2] : 0;
      chunk_state_rows<Vectorized, KV>(
          pb, qb, ja, jb, hb, he, part + (gc * H + ja * G) * pb.dv_pad, part_lse + gc * H + ja * G, nullptr,
          transform, ListedScales{scales, t0, ja, ks_head, vs_head}, [&](const auto& block) {
            // Each row access prefetches the same row of the next block into L1 and of the one
            // after into L2 (PrefetchingRows), spread over this block's compute; over all the
            // heads of a block, that is the next blocks' pages whole.
            const auto list = [&](int par, std::int64_t s) {
              const std::int64_t n = std::min<std::int64_t>(kBlock, t1 - s);
              for (int i = 0; i < n; ++i) {
                const std::int64_t p = position(s + i);
                const std::int32_t pg = table.page(b, p, shift);
                rows[par][0][i] = cache.k.ptr(pg, p & slot_mask, ja);
                rows[par][1][i] = cache.v.ptr(pg, p & slot_mask, ja);
                if constexpr (quant) {
                  scales[par][0][i] = &cache.k_scale(pg, p & slot_mask, ja);
                  scales[par][1][i] = &cache.v_scale(pg, p & slot_mask, ja);
                  // A page's scales of one head are one run that nothing else fetches ahead:
                  // its lines are prefetched with the rows (a miss in fill_scales otherwise).
                  if (i == 0 || scales[par][0][i] != scales[par][0][i - 1] + cache.k_scale.stride[1])  // a new run
                    for (std::int64_t j = 0; j < jb - ja; ++j) {
                      __builtin_prefetch(scales[par][0][i] + j * ks_head, 0, 3);
                      __builtin_prefetch(scales[par][1][i] + j * vs_head, 0, 3);
                    }
                }
              }
              // Entries past a shorter block's end repeat its last row: PrefetchingRows reads
              // entry i of the next blocks' lists for every row i of the block being read.
              for (std::int64_t i = n; i < kBlock; ++i) {
                rows[par][0][i] = rows[par][0][n - 1];
                rows[par][1][i] = rows[par][1][n - 1];
              }
            };
            list(0, t0);
            if (t0 + kBlock < t1) list(1, t0 + kBlock);
            const std::int64_t nh = jb - ja;
            int cur = 0;
            for (std::int64_t s = t0; s < t1; s += kBlock, cur = cur == 2 ? 0 : cur + 1) {
              const int n = static_cast<int>(std::min<std::int64_t>(kBlock, t1 - s));
              if (s + 2 * kBlock < t1) list(cur == 0 ? 2 : cur - 1, s + 2 * kBlock);
              // The item runs in steps (block, head), each block's heads ja .. jb - 1 in turn,
              // prefetching the next two steps' rows as it goes (interleaved_step_rows): the same
              // head's next block, 8 heads on, is 128 KiB of reads away and gone from L1 by then
              // (bf16, B 8, T 8192: 21.8 -> 25.3 GB/s).
              for (std::int64_t jj = 0; jj < nh; ++jj) {
                const auto [kr, vr] = interleaved_step_rows<KV>(s, t1, jj, nh, dk, dv, [&](std::int64_t bo, std::int64_t hj) {
                  const int slot = (cur + static_cast<int>(bo)) % 3;
                  return std::pair{PtrRows<KV>{rows[slot][0], hj * k_head}, PtrRows<KV>{rows[slot][1], hj * v_head}};
                });
                block(ja + jj, kr, vr, n, s);
                if (s + kBlock >= t1 && next_index >= 0) prefetch_next(jj);
              }
            }
          });
    };
    if (sel.idx) {
      const std::int32_t* pos = sel.idx + b * sel.stride;
      run_item([pos](std::int64_t i) -> std::int64_t { return pos[i]; });
    } else {
      run_item([](std::int64_t i) { return i; });
    }
  });

  // Merge each (sequence, head) in chunk order: decode.hpp's merge, so the bits match it.
  const bool want_lse = !lse.empty();
  const std::int64_t nh = he - hb;
  const int merge_threads = n_chunks * nh * dv >= (std::int64_t{1} << 16) ? opt.num_threads : 1;
  parallel_for(B * nh, merge_threads, [&](std::int64_t i) {
    const std::int64_t b = i / nh, h = hb + i % nh;
    float* o = out.ptr(b, h);
    float l = kNegInf;
    if (first[b + 1] == first[b]) {
      std::fill(o, o + dv, 0.f);
    } else {
      const std::int64_t c0 = first[b];
      std::copy(part + (c0 * H + h) * pb.dv_pad, part + (c0 * H + h) * pb.dv_pad + dv, o);
      l = part_lse[c0 * H + h];
      for (std::int64_t c = c0 + 1; c < first[b + 1]; ++c)
        merge_state_inplace(o, l, part + (c * H + h) * pb.dv_pad, part_lse[c * H + h], dv);
    }
    finish_variant_head(var, o, l, dv, b, h);
    if (want_lse) lse(b, h) = l;
  });
}

// A paged prefill's sequences that have new tokens (rows cu_seqlens[b] .. cu_seqlens[b + 1] of
// q), after checking that each sequence's new tokens are among its cached ones (its last ones).
inline std::vector<std::int64_t> sequences_with_queries(const char* fn, const PageTable& table,
                                                        std::span<const std::int64_t> cu_seqlens) {
  std::vector<std::int64_t> seqs;
  for (std::int64_t b = 0; b < table.batch(); ++b) {
    const std::int64_t n = cu_seqlens[b + 1] - cu_seqlens[b];
    ATTNKIT_REQUIRE(n <= table.lengths[b], fn, ": argument 'table.lengths': sequence ", b, " has ", n,
                    " new tokens in q but only ", table.lengths[b],
                    " cached (append the new tokens first and count them in its length)");
    if (n > 0) seqs.push_back(b);
  }
  return seqs;
}

// The first lengths[b] keys of the sequences `seqs` (as stored, f32 or bf16) gathered page by
// page into one contiguous buffer: sequence seqs[i] at rows offset[i] .. offset[i] + lengths[b]
// of keys() / values() [rows, H_kv, d]. The paged prefill paths whose kernels do not read pages
// (sparse attention's query-major fallback, Loop Attention's int8 pages) run their contiguous
// kernels on it (a copy of the visible pages: cheap against prefill's T·L work, but not free).
// int8 pages are staged dequantised, as f32.
template <class KV>
using staged_t = std::conditional_t<std::is_same_v<KV, std::int8_t>, float, KV>;

template <class KV>
struct Staged {
  std::vector<KV> k, v;
  std::vector<std::int64_t> offset;
  std::int64_t rows = 0, H_kv = 0, dk = 0, dv = 0;
  ConstView3<KV> keys() const { return ConstView3<KV>(k.data(), {rows, H_kv, dk}); }
  ConstView3<KV> values() const { return ConstView3<KV>(v.data(), {rows, H_kv, dv}); }
};

// Sequence b's first L rows of a page pool [pages, P, H_kv, d], read in place through its page
// table (what the flash kernels take; see detail::flash::KVRows).
template <class KV>
flash::KVRows<KV> sequence_rows(const ConstView4<KV>& pool, const PageTable& table, std::int64_t b, std::int64_t L) {
  flash::KVRows<KV> r = ConstView3<KV>(pool.data, {L, pool.shape[2], pool.shape[3]}, {pool.stride[1], pool.stride[2], 1});
  r.pages = table.indices.data() + table.indptr[b];
  r.page_shift = log2_exact(pool.shape[1]);
  r.page_stride = pool.stride[0];
  return r;
}
// int8 pages: the codes as above, with their scales [pages, P, H_kv] through the same table.
inline flash::KVRows<std::int8_t> sequence_rows(const ConstView4<std::int8_t>& pool, const ConstView3<float>& scales,
                                                const PageTable& table, std::int64_t b, std::int64_t L) {
  flash::KVRows<std::int8_t> r = sequence_rows(pool, table, b, L);
  r.scales = scales.data;
  r.scale_stride[0] = scales.stride[1];
  r.scale_stride[1] = scales.stride[2];
  r.scale_page_stride = scales.stride[0];
  return r;
}
// A sequence's K and V rows of a paged cache (int8: with their scales).
template <class KV>
std::pair<flash::KVRows<KV>, flash::KVRows<KV>> sequence_kv(const PagedKV<KV>& cache, const PageTable& table,
                                                            std::int64_t b, std::int64_t L) {
  if constexpr (std::is_same_v<KV, std::int8_t>)
    return {sequence_rows(cache.k, cache.k_scale, table, b, L), sequence_rows(cache.v, cache.v_scale, table, b, L)};
  else
    return {sequence_rows(cache.k, table, b, L), sequence_rows(cache.v, table, b, L)};
}

template <class KV>
Staged<staged_t<KV>> stage(const char* fn, const PagedKV<KV>& cache, const PageTable& table,
                           std::span<const std::int64_t> seqs, int num_threads) {
  using S = staged_t<KV>;
  Staged<S> st;
  st.H_kv = cache.kv_heads();
  st.dk = cache.head_dim_k();
  st.dv = cache.head_dim_v();
  const std::int64_t P = cache.page_size(), H_kv = st.H_kv, dk = st.dk, dv = st.dv;
  for (const std::int64_t b : seqs) {
    st.offset.push_back(st.rows);
    st.rows += table.lengths[b];
  }
  require_memory(static_cast<std::uint64_t>(st.rows * H_kv * (dk + dv)) * sizeof(S),
                 std::string(fn) + ": staging copy of " + std::to_string(st.rows) + " cached tokens");
  st.k.resize(static_cast<std::size_t>(st.rows * H_kv * dk));
  st.v.resize(static_cast<std::size_t>(st.rows * H_kv * dv));
  // Page by page (a page's rows of one sequence are slots [0, min(P, left))).
  std::vector<std::pair<std::int64_t, std::int64_t>> jobs;  // (index into seqs, page number)
  for (std::size_t i = 0; i < seqs.size(); ++i)
    for (std::int64_t p = 0; p * P < table.lengths[seqs[i]]; ++p) jobs.emplace_back(static_cast<std::int64_t>(i), p);
  const int threads = st.rows * H_kv * (dk + dv) >= (std::int64_t{1} << 18) ? num_threads : 1;
  parallel_for(static_cast<std::int64_t>(jobs.size()), threads, [&](std::int64_t job) {
    const auto [i, p] = jobs[job];
    const std::int64_t b = seqs[i], page = table.indices[table.indptr[b] + p];
    const std::int64_t n = std::min(P, table.lengths[b] - p * P);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t h = 0; h < H_kv; ++h) {
        const KV* k = cache.k.ptr(page, r, h);
        const KV* v = cache.v.ptr(page, r, h);
        S* kd = st.k.data() + ((st.offset[i] + p * P + r) * H_kv + h) * dk;
        S* vd = st.v.data() + ((st.offset[i] + p * P + r) * H_kv + h) * dv;
        if constexpr (std::is_same_v<KV, std::int8_t>) {
          detail::quant::dequantize_row(k, cache.k_scale(page, r, h), kd, dk);
          detail::quant::dequantize_row(v, cache.v_scale(page, r, h), vd, dv);
        } else {
          std::copy(k, k + dk, kd);
          std::copy(v, v + dv, vd);
        }
      }
  });
  return st;
}

}  // namespace detail::paged

// See the contract at the top of this file.
// var: an AttentionVariant (make_variant(...)); lse then includes the sink, if any.
template <class KV, class Var = PlainAttention>
void attention_decode_paged(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table, View3<float> out,
                            const DecodeOptions& opt = {}, View2<float> lse = {}, std::int64_t window = 0,
                            const Var& var = {}) {
  detail::paged::check_decode("attention_decode_paged", q, cache, table, out, opt, lse);
  ATTNKIT_REQUIRE(window >= 0, "attention_decode_paged: argument 'window': must be >= 0 (0: every key), got ", window);
  detail::check_variant("attention_decode_paged", var, q.shape[1], q.shape[2], q.shape[0]);
  detail::paged::decode<true>(q, cache, table, out, opt, lse, window, {}, var);
}

// See the contract at the top of this file.
// var: an AttentionVariant (make_variant(...)); lse then includes the sink, if any.
template <class KV, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill_paged(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table,
                             std::span<const std::int64_t> cu_seqlens, View3<float> out, const Mask& mask = {},
                             const AttentionOptions& opt = {}, View2<float> lse = {}, const Var& var = {}) {
  constexpr const char* fn = "attention_prefill_paged";
  check_page_table(fn, cache, table);
  check_view(q, fn, "q");
  const std::int64_t B = table.batch(), T = q.shape[0], H_kv = cache.kv_heads(), dk = cache.head_dim_k(),
                     dv = cache.head_dim_v();
  detail::paged::check_cu_seqlens(fn, cu_seqlens, B, T, "q");
  detail::paged::sequences_with_queries(fn, table, cu_seqlens);
  ATTNKIT_REQUIRE(opt.q_offset == -1, fn, ": argument 'opt.q_offset': must be -1 (each sequence's queries are its "
                  "last tokens), got ", opt.q_offset);
  // Shapes, mask and options as attention_prefill checks them.
  static const KV dummy{};
  const ConstView3<KV> k0(&dummy, {0, H_kv, dk}), v0(&dummy, {0, H_kv, dv});
  const detail::flash::Shape sh = detail::check_prefill(fn, q, k0, v0, out, mask, opt, lse, "cache.k", "cache.v");
  detail::check_variant(fn, var, sh.H, sh.d_k, T);

  // Sequences with queries in opt.queries, their pages read in place (int8: widened to code ·
  // scale as the kernel packs its key tiles).
  const std::int64_t qb = opt.queries.begin, qe = opt.queries.resolve_end(T);
  std::vector<detail::flash::Segment<KV>> segs;
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t s0 = cu_seqlens[b], s1 = cu_seqlens[b + 1], L = table.lengths[b];
    if (s1 == s0 || s1 <= qb || s0 >= qe) continue;
    View2<float> seg_lse = lse.data ? lse.slice(0, s0, s1) : View2<float>{};
    const auto [kr, vr] = detail::paged::sequence_kv(cache, table, b, L);
    segs.push_back({q.slice(0, s0, s1), kr, vr, out.slice(0, s0, s1), seg_lse, L - (s1 - s0), nullptr, s0});
    ranges.emplace_back(std::max(qb, s0) - s0, std::min(qe, s1) - s0);
  }
  detail::flash::run_prefill_at<simd::default_arch>(opt.precision, segs, sh, mask, opt.heads.begin,
                                                    opt.heads.resolve_end(sh.H), ranges, opt.num_threads, var);
}

}  // namespace attnkit
