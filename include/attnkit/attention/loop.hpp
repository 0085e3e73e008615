// attnkit/attention/loop.hpp — Loop Attention (shared/spec/semantics.md §4): a gated blend of
// global causal attention and sliding-window attention.
//
// For query head h (reading KV head h / G, G = H / H_kv) and query row t at absolute position
// p = q_offset + t:
//   global[t, h] = causal attention of q[t, h] over (k_glob, v_glob): keys s <= p, key row s at
//                  absolute position s;
//   local[t, h]  = attention of q[t, h] over (k_loc, v_loc) restricted to the window of
//                  `window` keys that ends at the query: positions p - window + 1 .. p (clipped
//                  at 0); local key row j sits at absolute position local_offset + j;
//   g[t, h]      = sigmoid(gate_w[h, :] · q[t, h, :] + gate_b[h])   (raw, unscaled query;
//                  float32 dot, sigmoid in double rounded to float);
//   out[t, h, :] = g · global + (1 - g) · local      (as fma(g, global, (1 - g) · local)).
// Both attentions use the same scale (default 1/sqrt(d_k)). g -> 1 is global, g -> 0 local.
// Which K/V to pass (spec §4.3 / §4.4):
//   * "layer" reading (one pass per layer): k_loc / v_loc are the same views as k_glob / v_glob;
//   * IQuest two-loop reading ("stack"): k_glob / v_glob are loop 1's K/V, k_loc / v_loc loop
//     2's own (the whole sequence, or only the rows that cover the windows: set local_offset).
//
// Shapes: q [T_q, H, d_k] f32; k_glob [T_g, H_kv, d_k], v_glob [T_g, H_kv, d_v], k_loc
// [T_l, H_kv, d_k], v_loc [T_l, H_kv, d_v] of KV = float or bf16; gate_w [H, d_k] f32; gate_b
// [H]; out [T_q, H, d_v] f32; gates [T_q, H] f32 (optional output of g; empty view: skipped).
// Any strides, last dimension contiguous. opt (LoopOptions): scale, q_offset (-1: T_g - T_q;
// explicit: q_offset + T_q <= T_g), heads / queries (only those rows of out and gates are
// written; the values are bit-identical to those of the full call), num_threads (results are
// bit-identical for any thread count), local_offset (-1: T_g - T_l, the local keys end where the
// global keys end), fuse. The local keys must cover every window: local_offset <=
// max(0, p_first - window + 1) and local_offset + T_l > p_last for the first and last query
// positions p_first, p_last. out must not overlap the inputs.
//
// Paths (all built on the flash prefill kernel, detail/flash_prefill.hpp):
//   * two-pass (fuse = never): the causal kernel writes global into out, then the kernel runs
//     again with SlidingWindowMask{window} over (k_loc, v_loc), the query positions shifted by
//     -local_offset, and its finalize step blends into out (BlendIntoOut): no temporary buffer
//     and no extra pass over out. The plainest composition; the reference for the others.
//   * fused (fuse = automatic, k_loc / v_loc with the data pointers, shapes and strides of
//     k_glob / v_glob, local_offset 0 — the "layer" reading): one kernel run keeps two
//     online-softmax states per row (FusedWindow). Why: both attentions score the same
//     (query, key) pairs inside the window, and a window of W = 64 keys meets only the last one
//     or two key tiles of each query sub-tile, so computing S once and running a second
//     softmax + P·V on those tiles costs a few percent on top of causal prefill, where a second
//     run would compute those scores again and re-pack Q and K/V.
//   * two-source (fuse = automatic, other local K/V — the "stack" reading): one kernel run in
//     which each work item sweeps the global key tiles and then the local key tiles of its
//     windows into the second state (WindowSource). Why: at W = 64 a separate sliding-window
//     run spends about a third of its time packing Q, initialising and finalising rather than
//     computing; here Q is packed and the gate computed once, and one finalize writes out.
//   All paths perform the same float32 operations per row (same scores, same online-softmax
//   sequence, same blend), so they agree to rounding (in practice bit for bit).
//
// loop_attention_decode: one query token q [H, d_k] at the newest position; every key passed is
// visible: k_glob / v_glob the whole global cache (e.g. KVCache), k_loc / v_loc the window's
// keys in any order (RingKVCache slots, or the last W rows of the global cache). out [H, d_v],
// gates [H] optional. global and local are two attention_decode calls (fixed chunking and
// merge order, so bit-identical for any thread count), then the same blend; the window's K/V
// add only W rows to the bytes read, so decode stays bound by streaming the global cache. An
// overload takes int8 K/V (QuantView3, attention/quant.hpp) and runs the int8 decode kernel.
//
// Over a paged cache (attention/paged_kv.hpp), for many sequences at once: k_glob / k_loc become
// two PagedKV read through one page table (the "layer" reading passes the same pages twice; the
// "stack" reading loop 1's and loop 2's pages, which hold the same positions under the same page
// ids, as a batch session's pool lays them out; f32, bf16 or int8 pages, int8 read in place as
// the contiguous int8 kernels read it):
//   loop_attention_decode_paged(q [B, H, d_k], glob, loc, table, gate_w, gate_b, window,
//     out [B, H, d_v], opt, gates [B, H] optional): global = attention_decode_paged over glob,
//     local = attention_decode_paged over loc's last `window` keys (pages below the window are
//     never read), then the same gate and blend as above. Bit-identical for any thread count.
//   loop_attention_prefill_paged(q [T, H, d_k], glob, loc, table, cu_seqlens, gate_w, gate_b,
//     window, out, opt, gates [T, H] optional): the new tokens of B sequences packed along the
//     token axis (cu_seqlens; each sequence's last tokens, already appended). Each sequence runs
//     loop_attention's kernels on its pages in place (the flash kernel reads rows through the
//     page table; q_offset = lengths[b] - n_b, local_offset 0; glob and loc the same pages: the
//     fused path): bit for bit the contiguous call. opt.q_offset and
//     opt.local_offset must stay -1.
//
// Arguments are validated up front; violations throw attnkit::Error naming the function and
// the argument.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/common.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/detail/flash_prefill.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

struct LoopOptions : AttentionOptions {  // scale, q_offset, heads, queries, num_threads as in prefill
  std::int64_t local_offset = -1;        // absolute position of k_loc row 0; -1 -> T_glob - T_loc
  // automatic: one kernel run — the fused path when the local K/V are the global K/V (same data
  // pointers, shapes and strides, local_offset 0), else the two-source run; never: always the
  // two-pass path (causal run, then a sliding-window run blending into out).
  enum class Fuse { automatic, never } fuse = Fuse::automatic;
};

namespace detail {

enum class LoopPath { fused, two_source, two_pass };

struct LoopPlan {
  flash::Shape sh;
  std::int64_t q_offset, local_offset;
  LoopPath path;
};

// The gate's weights [H, d_k] and biases [H].
inline void check_gate(const char* fn, const ConstView2<float>& gate_w, std::span<const float> gate_b, std::int64_t H,
                       std::int64_t d_k) {
  check_view(gate_w, fn, "gate_w");
  ATTNKIT_REQUIRE(gate_w.shape[0] == H && gate_w.shape[1] == d_k, fn, ": argument 'gate_w': shape ",
                  shape_string(gate_w), " must be [H, d_k] = [", H, ", ", d_k, "]");
  ATTNKIT_REQUIRE(static_cast<std::int64_t>(gate_b.size()) == H, fn, ": argument 'gate_b': size ", gate_b.size(),
                  " must be H = ", H);
  ATTNKIT_REQUIRE(gate_b.data() != nullptr || H == 0, fn, ": argument 'gate_b': null data pointer");
}

template <class KV>
bool same_view(const flash::KVRows<KV>& a, const flash::KVRows<KV>& b) {
  return a.data == b.data && a.shape == b.shape && a.stride == b.stride && a.pages == b.pages &&
         a.page_shift == b.page_shift && a.page_stride == b.page_stride && a.scales == b.scales &&
         a.scale_stride[0] == b.scale_stride[0] && a.scale_stride[1] == b.scale_stride[1] &&
         a.scale_page_stride == b.scale_page_stride;
}

template <class KV, class LKV>
LoopPlan check_loop(const char* fn, const ConstView3<float>& q, const flash::KVRows<KV>& k_glob,
                    const flash::KVRows<KV>& v_glob, const flash::KVRows<LKV>& k_loc, const flash::KVRows<LKV>& v_loc,
                    const ConstView2<float>& gate_w, std::span<const float> gate_b, std::int64_t window,
                    const View3<float>& out, const LoopOptions& opt, const View2<float>& gates) {
  const flash::Shape sh = check_prefill(fn, q, k_glob, v_glob, out, CausalMask{}, opt, View2<float>{}, "k_glob", "v_glob");
  const std::int64_t T_q = q.shape[0], H = sh.H, H_kv = sh.H_kv, d_k = sh.d_k, d_v = sh.d_v;
  const std::int64_t T_g = k_glob.shape[0], T_l = k_loc.shape[0];
  ATTNKIT_REQUIRE(window >= 1, fn, ": argument 'window': must be >= 1, got ", window);
  check_view(k_loc, fn, "k_loc");
  check_view(v_loc, fn, "v_loc");
  ATTNKIT_REQUIRE(k_loc.shape[2] == d_k, fn, ": argument 'k_loc': head_dim ", k_loc.shape[2],
                  " does not match q's head_dim ", d_k);
  ATTNKIT_REQUIRE(k_loc.shape[1] == H_kv, fn, ": argument 'k_loc': ", k_loc.shape[1],
                  " KV heads, but k_glob has H_kv = ", H_kv);
  ATTNKIT_REQUIRE(v_loc.shape[0] == T_l, fn, ": argument 'v_loc': ", v_loc.shape[0], " rows, but k_loc has ", T_l);
  ATTNKIT_REQUIRE(v_loc.shape[1] == H_kv, fn, ": argument 'v_loc': ", v_loc.shape[1],
                  " KV heads, but k_glob has H_kv = ", H_kv);
  ATTNKIT_REQUIRE(v_loc.shape[2] == d_v, fn, ": argument 'v_loc': head_dim ", v_loc.shape[2],
                  " does not match v_glob's head_dim d_v = ", d_v);
  check_gate(fn, gate_w, gate_b, H, d_k);
  if (gates.data != nullptr) {
    check_view(gates, fn, "gates");
    ATTNKIT_REQUIRE(gates.shape[0] == T_q && gates.shape[1] == H, fn, ": argument 'gates': shape ",
                    shape_string(gates), " must be [T_q, H] = [", T_q, ", ", H, "]");
  }
  const std::int64_t q_offset = opt.q_offset >= 0 ? opt.q_offset : T_g - T_q;
  ATTNKIT_REQUIRE(q_offset >= 0, fn, ": argument 'q': T_q = ", T_q, " queries, but k_glob has only T_k = ", T_g,
                  " keys (every query must see its own key)");
  ATTNKIT_REQUIRE(opt.local_offset >= -1, fn, ": argument 'opt.local_offset': must be -1 (default) or >= 0, got ",
                  opt.local_offset);
  const std::int64_t local_offset = opt.local_offset >= 0 ? opt.local_offset : T_g - T_l;
  ATTNKIT_REQUIRE(local_offset >= 0, fn, ": argument 'k_loc': ", T_l, " rows, more than k_glob's T_k = ", T_g,
                  " (the default opt.local_offset = T_k - T_loc would be negative; set it explicitly)");
  if (T_q > 0) {
    const std::int64_t p_first = q_offset, p_last = q_offset + T_q - 1;
    const std::int64_t need = std::max<std::int64_t>(0, p_first - window + 1);
    ATTNKIT_REQUIRE(local_offset <= need, fn, ": argument 'opt.local_offset': local keys start at position ",
                    local_offset, ", after the start ", need, " of the first query's window (query position ", p_first,
                    ", window ", window, ")");
    ATTNKIT_REQUIRE(local_offset + T_l > p_last, fn, ": argument 'k_loc': local keys cover positions [", local_offset,
                    ", ", local_offset + T_l, "), which end before the last query's position ", p_last);
  }
  const bool one_run = opt.fuse == LoopOptions::Fuse::automatic;
  bool shared = false;
  if constexpr (std::is_same_v<KV, LKV>) shared = local_offset == 0 && same_view(k_loc, k_glob) && same_view(v_loc, v_glob);
  return {sh, q_offset, local_offset, one_run ? (shared ? LoopPath::fused : LoopPath::two_source) : LoopPath::two_pass};
}

// loop_attention on an explicit xsimd instruction set (the public function uses the best one
// the compiler targets); tests use it to exercise the portable code path. The local K/V may be of
// another storage type LKV than the global ones (the stack reading's window staged in f32 from a
// ring beside an int8 or paged global cache read in place): the two-source or two-pass path.
template <class Arch, class KV, class LKV = KV>  // LKV named, never deduced (views convert to KVRows)
void loop_attention_arch(ConstView3<float> q, flash::KVRows<KV> k_glob, flash::KVRows<KV> v_glob,
                         std::type_identity_t<flash::KVRows<LKV>> k_loc, std::type_identity_t<flash::KVRows<LKV>> v_loc,
                         ConstView2<float> gate_w, std::span<const float> gate_b,
                         std::int64_t window, View3<float> out, const LoopOptions& opt = {}, View2<float> gates = {}) {
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>,
                "loop_attention: K/V must be float or bf16 (int8: QuantView3)");
  const LoopPlan plan =
      check_loop("loop_attention", q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, window, out, opt, gates);
  const std::int64_t T_q = q.shape[0];
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(plan.sh.H);
  const std::vector<std::pair<std::int64_t, std::int64_t>> ranges{{opt.queries.begin, opt.queries.resolve_end(T_q)}};
  const flash::LoopGate gate{gate_w, gate_b.data(), gates};
  const std::vector<flash::Segment<KV>> glob{{q, k_glob, v_glob, out, View2<float>{}, plan.q_offset}};
  const std::int64_t local_q_offset = plan.q_offset - plan.local_offset;  // query row 0 among the local rows
  switch (plan.path) {
    case LoopPath::fused:
      if constexpr (std::is_same_v<KV, LKV>)  // (shared views: one storage type)
        flash::run_prefill<Arch>(glob, plan.sh, CausalMask{}, hb, he, ranges, opt.num_threads,
                                 flash::FusedWindow{gate, window});
      return;
    case LoopPath::two_source:
      flash::run_prefill<Arch>(glob, plan.sh, CausalMask{}, hb, he, ranges, opt.num_threads,
                               flash::WindowSource<LKV>{gate, window, k_loc, v_loc, local_q_offset});
      return;
    case LoopPath::two_pass: break;
  }
  flash::run_prefill<Arch>(glob, plan.sh, CausalMask{}, hb, he, ranges, opt.num_threads);
  const std::vector<flash::Segment<LKV>> loc{{q, k_loc, v_loc, out, View2<float>{}, local_q_offset}};
  flash::run_prefill<Arch>(loc, plan.sh, SlidingWindowMask{window}, hb, he, ranges, opt.num_threads,
                           flash::BlendIntoOut{gate});
}

template <class KV>
void check_loop_decode(const char* fn, const ConstView2<float>& q, const ConstView3<KV>& k_glob,
                       const ConstView3<KV>& v_glob, const ConstView3<KV>& k_loc, const ConstView3<KV>& v_loc,
                       const ConstView2<float>& gate_w, std::span<const float> gate_b, const View2<float>& out,
                       const DecodeOptions& opt, std::span<float> gates) {
  check_view(q, fn, "q");
  check_view(k_glob, fn, "k_glob");
  check_view(v_glob, fn, "v_glob");
  check_view(k_loc, fn, "k_loc");
  check_view(v_loc, fn, "v_loc");
  check_view(out, fn, "out");
  check_view(gate_w, fn, "gate_w");
  const std::int64_t H = q.shape[0], d_k = q.shape[1], H_kv = k_glob.shape[1], d_v = v_glob.shape[2];
  ATTNKIT_REQUIRE(d_k >= 1, fn, ": argument 'q': head_dim d_k must be >= 1, got shape ", shape_string(q));
  ATTNKIT_REQUIRE(H_kv >= 1, fn, ": argument 'k_glob': number of KV heads H_kv must be >= 1, got shape ",
                  shape_string(k_glob));
  ATTNKIT_REQUIRE(H % H_kv == 0, fn, ": argument 'q': number of query heads H = ", H,
                  " is not a multiple of the number of KV heads H_kv = ", H_kv);
  ATTNKIT_REQUIRE(d_v >= 1, fn, ": argument 'v_glob': head_dim d_v must be >= 1, got shape ", shape_string(v_glob));
  const auto check_kv = [&](const ConstView3<KV>& k, const ConstView3<KV>& v, const char* kn, const char* vn) {
    ATTNKIT_REQUIRE(k.shape[2] == d_k, fn, ": argument '", kn, "': head_dim ", k.shape[2],
                    " does not match q's head_dim ", d_k);
    ATTNKIT_REQUIRE(k.shape[1] == H_kv, fn, ": argument '", kn, "': ", k.shape[1], " KV heads, but k_glob has H_kv = ",
                    H_kv);
    ATTNKIT_REQUIRE(k.shape[0] >= 1, fn, ": argument '", kn,
                    "': no keys (it must hold at least the current token's key)");
    ATTNKIT_REQUIRE(v.shape[0] == k.shape[0], fn, ": argument '", vn, "': ", v.shape[0], " rows, but ", kn, " has ",
                    k.shape[0]);
    ATTNKIT_REQUIRE(v.shape[1] == H_kv, fn, ": argument '", vn, "': ", v.shape[1], " KV heads, but k_glob has H_kv = ",
                    H_kv);
    ATTNKIT_REQUIRE(v.shape[2] == d_v, fn, ": argument '", vn, "': head_dim ", v.shape[2],
                    " does not match v_glob's head_dim d_v = ", d_v);
  };
  check_kv(k_glob, v_glob, "k_glob", "v_glob");
  check_kv(k_loc, v_loc, "k_loc", "v_loc");
  ATTNKIT_REQUIRE(out.shape[0] == H && out.shape[1] == d_v, fn, ": argument 'out': shape ", shape_string(out),
                  " must be [H, d_v] = [", H, ", ", d_v, "]");
  check_gate(fn, gate_w, gate_b, H, d_k);
  ATTNKIT_REQUIRE(gates.empty() || static_cast<std::int64_t>(gates.size()) == H, fn, ": argument 'gates': size ",
                  gates.size(), " must be H = ", H, " (or empty)");
  ATTNKIT_REQUIRE(std::isfinite(opt.scale), fn, ": argument 'opt.scale': must be finite, got ", opt.scale);
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  ATTNKIT_REQUIRE(hb >= 0 && hb <= he && he <= H, fn, ": argument 'opt.heads': range [", opt.heads.begin, ", ",
                  opt.heads.end, ") is out of bounds for H = ", H);
  ATTNKIT_REQUIRE(opt.kv_chunk >= 0, fn, ": argument 'opt.kv_chunk': must be >= 0 (0 = default), got ", opt.kv_chunk);
  ATTNKIT_REQUIRE(opt.num_threads >= 0, fn, ": argument 'opt.num_threads': must be >= 0 (0 = default), got ",
                  opt.num_threads);
}

}  // namespace detail

// See the contract at the top of this file.
template <class KV>
void loop_attention(ConstView3<float> q, ConstView3<KV> k_glob, ConstView3<KV> v_glob, ConstView3<KV> k_loc,
                    ConstView3<KV> v_loc, ConstView2<float> gate_w /*[H, d_k]*/, std::span<const float> gate_b /*[H]*/,
                    std::int64_t window, View3<float> out, const LoopOptions& opt = {},
                    View2<float> gates = {} /*optional [T_q, H] output of g*/) {
  detail::loop_attention_arch<simd::default_arch, KV>(q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, window, out,
                                                      opt, gates);
}

// int8 K/V (QuantView3, e.g. KVCache<std::int8_t>::keys()): read in place, each row widened to
// code · scale as the flash kernel packs its key tiles (attention_prefill's QuantView3
// overload): bit for bit loop_attention<float> over the dequantised rows, with no copy. Passing
// the same views as global and local keys takes the fused path, as above.
inline void loop_attention(ConstView3<float> q, const QuantView3& k_glob, const QuantView3& v_glob,
                           const QuantView3& k_loc, const QuantView3& v_loc, ConstView2<float> gate_w,
                           std::span<const float> gate_b, std::int64_t window, View3<float> out,
                           const LoopOptions& opt = {}, View2<float> gates = {}) {
  constexpr const char* fn = "loop_attention";
  check_quant_view(k_glob, fn, "k_glob");
  check_quant_view(v_glob, fn, "v_glob");
  check_quant_view(k_loc, fn, "k_loc");
  check_quant_view(v_loc, fn, "v_loc");
  detail::loop_attention_arch<simd::default_arch, std::int8_t>(q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, window,
                                                               out, opt, gates);
}

namespace detail {
template <class KV, class K>
void loop_decode_run(ConstView2<float> q, const K& k_glob, const K& v_glob, const K& k_loc, const K& v_loc,
                     ConstView2<float> gate_w, std::span<const float> gate_b, View2<float> out, const DecodeOptions& opt,
                     std::span<float> gates);
}  // namespace detail

// One query token q [H, d_k]; every key passed is visible (k_loc: the window's keys in any slot
// order). out [H, d_v]; gates [H] optional.
template <class KV>
void loop_attention_decode(ConstView2<float> q, ConstView3<KV> k_glob, ConstView3<KV> v_glob, ConstView3<KV> k_loc,
                           ConstView3<KV> v_loc, ConstView2<float> gate_w, std::span<const float> gate_b,
                           View2<float> out /*[H, d_v]*/, const DecodeOptions& opt = {},
                           std::span<float> gates = {} /*optional [H]*/) {
  static_assert(is_storage_type_v<KV>, "loop_attention_decode: K/V must be float or bf16");
  detail::check_loop_decode("loop_attention_decode", q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, out, opt, gates);
  detail::loop_decode_run<KV>(q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, out, opt, gates);
}

// int8 K/V (QuantView3, e.g. KVCache<std::int8_t>::keys()): the same two attention_decode calls
// on the int8 rows (dequantised in registers), then the same blend.
template <class KV = std::int8_t>
  requires std::is_same_v<KV, std::int8_t>
void loop_attention_decode(ConstView2<float> q, const QuantView3& k_glob, const QuantView3& v_glob,
                           const QuantView3& k_loc, const QuantView3& v_loc, ConstView2<float> gate_w,
                           std::span<const float> gate_b, View2<float> out /*[H, d_v]*/, const DecodeOptions& opt = {},
                           std::span<float> gates = {} /*optional [H]*/) {
  constexpr const char* fn = "loop_attention_decode";
  check_quant_view(k_glob, fn, "k_glob");
  check_quant_view(v_glob, fn, "v_glob");
  check_quant_view(k_loc, fn, "k_loc");
  check_quant_view(v_loc, fn, "v_loc");
  detail::check_loop_decode(fn, q, k_glob.codes, v_glob.codes, k_loc.codes, v_loc.codes, gate_w, gate_b, out, opt, gates);
  detail::loop_decode_run<KV>(q, k_glob, v_glob, k_loc, v_loc, gate_w, gate_b, out, opt, gates);
}

namespace detail {

// loop_attention_decode after validation; K: ConstView3<KV> or QuantView3.
template <class KV, class K>
void loop_decode_run(ConstView2<float> q, const K& k_glob, const K& v_glob, const K& k_loc, const K& v_loc,
                     ConstView2<float> gate_w, std::span<const float> gate_b, View2<float> out, const DecodeOptions& opt,
                     std::span<float> gates) {
  const std::int64_t H = q.shape[0], d_k = q.shape[1], d_v = out.shape[1];
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  if (hb == he) return;
  // The local result goes to a per-thread scratch [H, d_v] (rows hb .. he), then blends into out.
  thread_local std::vector<float> local_buf;
  local_buf.resize(static_cast<std::size_t>(H * d_v));
  const View2<float> local(local_buf.data(), {H, d_v});
  attention_decode<KV>(q, k_glob, v_glob, out, opt);
  attention_decode<KV>(q, k_loc, v_loc, local, opt);
  for (std::int64_t h = hb; h < he; ++h) {
    const float g = detail::flash::gate_sigmoid(simd::dot(gate_w.ptr(h), q.ptr(h), d_k) + gate_b[h]);
    detail::flash::blend_finalize<simd::default_arch>(out.ptr(h), out.ptr(h), 1.f, local.ptr(h), 1.f, g, d_v);
    if (!gates.empty()) gates[h] = g;
  }
}

}  // namespace detail

namespace detail {

template <class KV>
void check_loop_paged(const char* fn, const PagedKV<KV>& glob, const PagedKV<KV>& loc, const PageTable& table,
                      std::int64_t H, std::int64_t d_k, ConstView2<float> gate_w, std::span<const float> gate_b,
                      std::int64_t window) {
  check_page_table(fn, glob, table);
  check_page_table(fn, loc, table);
  ATTNKIT_REQUIRE(loc.kv_heads() == glob.kv_heads() && loc.head_dim_k() == glob.head_dim_k() &&
                      loc.head_dim_v() == glob.head_dim_v() && loc.page_size() == glob.page_size(),
                  fn, ": argument 'loc': pages [", loc.num_pages(), ", ", loc.page_size(), ", ", loc.kv_heads(), ", ",
                  loc.head_dim_k(), " | ", loc.head_dim_v(), "] do not match glob's [", glob.num_pages(), ", ",
                  glob.page_size(), ", ", glob.kv_heads(), ", ", glob.head_dim_k(), " | ", glob.head_dim_v(), "]");
  ATTNKIT_REQUIRE(window >= 1, fn, ": argument 'window': must be >= 1, got ", window);
  check_gate(fn, gate_w, gate_b, H, d_k);
}

}  // namespace detail

// See the contract at the top of this file.
template <class KV>
void loop_attention_decode_paged(ConstView3<float> q, const PagedKV<KV>& glob, const PagedKV<KV>& loc,
                                 const PageTable& table, ConstView2<float> gate_w, std::span<const float> gate_b,
                                 std::int64_t window, View3<float> out /*[B, H, d_v]*/, const DecodeOptions& opt = {},
                                 View2<float> gates = {} /*optional [B, H]*/) {
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>,
                "loop_attention_decode_paged: pages must be float, bf16 or int8");
  constexpr const char* fn = "loop_attention_decode_paged";
  detail::paged::check_decode(fn, q, glob, table, out, opt, {});
  const std::int64_t B = table.batch(), H = q.shape[1], d_k = q.shape[2], d_v = out.shape[2];
  detail::check_loop_paged(fn, glob, loc, table, H, d_k, gate_w, gate_b, window);
  if (gates.data != nullptr) {
    check_view(gates, fn, "gates");
    ATTNKIT_REQUIRE(gates.shape[0] == B && gates.shape[1] == H, fn, ": argument 'gates': shape ",
                    detail::shape_string(gates), " must be [B, H] = [", B, ", ", H, "]");
  }
  for (std::int64_t b = 0; b < B; ++b)
    ATTNKIT_REQUIRE(table.lengths[b] >= 1, fn, ": argument 'table.lengths': sequence ", b,
                    " has no cached token (it must hold at least the current token's key)");
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  if (hb == he || B == 0) return;
  std::vector<float> local(static_cast<std::size_t>(B * H * d_v));
  const View3<float> lv(local.data(), {B, H, d_v});
  detail::paged::decode<true>(q, glob, table, out, opt, {}, 0);
  detail::paged::decode<true>(q, loc, table, lv, opt, {}, window);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = hb; h < he; ++h) {
      const float g = detail::flash::gate_sigmoid(simd::dot(gate_w.ptr(h), q.ptr(b, h), d_k) + gate_b[h]);
      detail::flash::blend_finalize<simd::default_arch>(out.ptr(b, h), out.ptr(b, h), 1.f, lv.ptr(b, h), 1.f, g, d_v);
      if (gates.data != nullptr) gates(b, h) = g;
    }
}

// See the contract at the top of this file.
template <class KV>
void loop_attention_prefill_paged(ConstView3<float> q, const PagedKV<KV>& glob, const PagedKV<KV>& loc,
                                  const PageTable& table, std::span<const std::int64_t> cu_seqlens,
                                  ConstView2<float> gate_w, std::span<const float> gate_b, std::int64_t window,
                                  View3<float> out /*[T, H, d_v]*/, const LoopOptions& opt = {},
                                  View2<float> gates = {} /*optional [T, H]*/) {
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>,
                "loop_attention_prefill_paged: pages must be float, bf16 or int8");
  constexpr const char* fn = "loop_attention_prefill_paged";
  check_view(q, fn, "q");
  const std::int64_t B = table.batch(), T = q.shape[0];
  detail::check_loop_paged(fn, glob, loc, table, q.shape[1], q.shape[2], gate_w, gate_b, window);
  detail::paged::check_cu_seqlens(fn, cu_seqlens, B, T, "q");
  ATTNKIT_REQUIRE(opt.q_offset == -1 && opt.local_offset == -1, fn, ": arguments 'opt.q_offset' / 'opt.local_offset': ",
                  "must be -1 (each sequence's queries are its last tokens, its local keys its own pages)");
  ATTNKIT_REQUIRE(out.shape[0] == T, fn, ": argument 'out': ", out.shape[0], " rows, but q has T = ", T);
  ATTNKIT_REQUIRE(gates.data == nullptr || gates.shape[0] == T, fn, ": argument 'gates': ", gates.shape[0],
                  " rows, but q has T = ", T);
  const std::vector<std::int64_t> seqs = detail::paged::sequences_with_queries(fn, table, cu_seqlens);
  // The pages are read in place (the flash kernel's rows through the page table, as
  // attention_prefill_paged; int8: widened to code · scale as the key tiles are packed); one
  // table for both sets, so a shared pool takes the fused path.
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const std::int64_t b = seqs[i], s0 = cu_seqlens[b], s1 = cu_seqlens[b + 1], L = table.lengths[b];
    LoopOptions o = opt;
    o.q_offset = L - (s1 - s0);
    o.local_offset = 0;
    const auto [kg, vg] = detail::paged::sequence_kv(glob, table, b, L);
    const auto [kl, vl] = detail::paged::sequence_kv(loc, table, b, L);
    detail::loop_attention_arch<simd::default_arch, KV>(q.slice(0, s0, s1), kg, vg, kl, vl, gate_w, gate_b, window,
                                                        out.slice(0, s0, s1), o,
                                                        gates.data == nullptr ? View2<float>{} : gates.slice(0, s0, s1));
  }
}

}  // namespace attnkit
