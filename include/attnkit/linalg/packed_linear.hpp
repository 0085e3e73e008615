// attnkit/linalg/packed_linear.hpp — a linear layer with weights packed once at load.
//
// Computes y = x W^T (or y += x W^T with accumulate) for W stored PyTorch-style [out, in]:
//   x [tokens, in]  (any row stride >= 0, inner dimension contiguous)
//   y [tokens, out] (row stride >= out, inner dimension contiguous; must not overlap x)
// Weights are packed into blocks of 16 output rows (zero-padded tails): bf16 weights as
// [out/16][in/2 padded to 16][16][2] (K-pairs interleaved: the AVX512-BF16 / AMX operand
// layout), f32 weights as [out/16][in][16], q8 weights (pack_q8: int8 in groups of 32 along
// `in` with a bf16 scale per row and group, GGUF Q8_0's information; detail/q8_kernels.hpp) as
// [out/16][in/32][8][16][4] bytes then the scales. forward() never re-packs.
//
// Precision (bf16 weights):
//  * exact: float32 products, float32 accumulation: the result of an fp32 GEMM (rel. error
//    ~1e-7). With more than 8 tokens and AMX available, x is split into three bf16 planes
//    (hi + mid + lo == x for normal floats) and each plane is multiplied on AMX tiles, so
//    every product is still exact; otherwise bf16 weights are widened to f32 and use FMA.
//    Products and inputs below the float32 normal range are flushed to zero on AMX.
//  * fast: x is rounded to bf16 (RNE) once per call and multiplied bf16 x bf16 with float32
//    accumulation (llama.cpp's bf16 path), ~1e-3 relative error; AMX tiles with more than 8
//    tokens when available, FMA otherwise.
// f32 weights always use float32 FMA: fast is the same as exact for them.
// Precision (q8 weights; the weights themselves carry the quantisation error, <= s/2 each):
//  * exact: the int8 weights are widened exactly and multiplied with f32 activations (FMA).
//  * fast: decode quantises the activations per token and group of 32 to int8 too (VNNI
//    dot products, llama.cpp's Q8_0 path; ~1e-2 relative); prefill dequantises weight panels
//    into bf16 AMX tiles (bf16(q · s), activations rounded to bf16) when AMX is available and
//    into f32 FMA panels otherwise (exact prefill always uses the f32 panels).
// Measured on this CPU class (2 threads): fp32 FMA ~425 GFLOP/s, vdpbf16ps ~213 (half), AMX
// 0.8-2 TFLOP/s in these kernels, so no path uses vdpbf16ps.
//
// Execution: tokens <= 8 (decode) stream every packed weight byte once with FMA (memory
// bound; both precisions cost the same). More tokens: a register-blocked GEMM, 8 tokens x 48 outputs per
// FMA tile with K blocks of 128 whose weight panel stays in L1 (bf16 panels widened to f32
// once per block), or 32 x 32 AMX tiles over all of K. Threads (OpenMP) split the output
// blocks into contiguous ranges; each output's arithmetic does not depend on the split, so
// results are bit-identical for any thread count. Scratch (rounded activations, weight panels)
// is thread-local and reused across calls.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <new>
#include <utility>

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/precision.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"
#include "attnkit/linalg/detail/linear_kernels.hpp"
#include "attnkit/linalg/detail/q8_kernels.hpp"

namespace attnkit {

// How a PackedLinear stores its weights.
enum class LinearFormat { f32, bf16, q8 };
inline const char* linear_format_name(LinearFormat f) {
  return f == LinearFormat::f32 ? "f32" : f == LinearFormat::bf16 ? "bf16" : "q8";
}

struct LinearOptions {
  Precision precision = Precision::exact;
  int num_threads = 0;      // 0 -> OpenMP default
  bool accumulate = false;  // y += x W^T instead of y = x W^T
};

namespace detail::linear {

inline constexpr std::size_t kAlign = 64;
inline constexpr std::int64_t kMC = 256;       // tokens converted and blocked per chunk
inline constexpr std::int64_t kMCAmx = 128;    // most tokens per chunk on the AMX path (multiple of 32; measured 128/256/512)
inline constexpr std::int64_t kAmxChunkBytes = std::int64_t{1} << 20;  // activation planes of one AMX chunk (L2: 2 MiB)
inline constexpr std::int64_t kKC = 128;       // K per K block (even): a 3 x 8 KiB f32 weight micro-panel in L1
inline constexpr double kMinParallelMacs = 1 << 18;
// The q8 AMX path re-dequantises every weight once per token chunk, so it takes chunks as large
// as 2 MiB of activation planes allow (up to 512 tokens), split evenly (device host, T 512 and
// 2048: 0.89-1.12x bf16 against 0.78-0.97x with the bf16 path's 128-token chunks).
inline constexpr std::int64_t kMCAmxQ8 = 512;
inline constexpr std::int64_t kAmxChunkBytesQ8 = std::int64_t{2} << 20;

inline std::shared_ptr<void> aligned_alloc_shared(std::size_t bytes) {
  void* p = ::operator new(bytes, std::align_val_t(kAlign));
  return std::shared_ptr<void>(p, [](void* q) { ::operator delete(q, std::align_val_t(kAlign)); });
}

// Growable, 64-byte-aligned scratch owned by one thread.
struct Scratch {
  std::shared_ptr<void> buf;
  std::size_t capacity = 0;
  float* get(std::size_t floats) {
    if (floats > capacity) {
      buf = aligned_alloc_shared(floats * sizeof(float));
      capacity = floats;
    }
    return static_cast<float*>(buf.get());
  }
};

// bf16-rounded activations (Precision::fast), filled by all threads of one call.
inline float* activation_scratch(std::size_t floats) {
  static thread_local Scratch s;
  return s.get(floats);
}

// One worker's widened weight micro-panel.
inline float* panel_scratch(std::size_t floats) {
  static thread_local Scratch s;
  return s.get(floats);
}

// The q8 paths' per-call buffers, taken on the calling thread before the parallel region (so no
// worker allocates): quantised or padded activations, and one weight panel per worker.
inline float* q8_activation_scratch(std::size_t floats) {
  static thread_local Scratch s;
  return s.get(floats);
}
inline float* q8_panel_scratch(std::size_t floats) {
  static thread_local Scratch s;
  return s.get(floats);
}

}  // namespace detail::linear

class PackedLinear {
 public:
  PackedLinear() = default;

  // Packs f32 weights w[out, in] (row stride ld_w) and keeps them as f32.
  static PackedLinear pack(const float* w, std::int64_t out_features, std::int64_t in_features, std::int64_t ld_w) {
    check_pack_args(w, out_features, in_features, ld_w, "PackedLinear::pack");
    PackedLinear p(out_features, in_features, LinearFormat::f32);
    float* dst = static_cast<float*>(p.data_.get());
    const std::int64_t K = in_features, N = out_features;
    parallel_for(p.blocks_, 0, [&](std::int64_t b) {
      float* blk = dst + b * K * kBlock;
      const int rows = static_cast<int>(std::min<std::int64_t>(kBlock, N - b * kBlock));
      const float* src = w + b * kBlock * ld_w;
      for (std::int64_t k = 0; k < K; ++k) {  // sequential writes, 16 read streams
        for (int l = 0; l < rows; ++l) blk[k * kBlock + l] = src[l * ld_w + k];
        for (int l = rows; l < kBlock; ++l) blk[k * kBlock + l] = 0.f;
      }
    });
    return p;
  }

  // Packs bf16 weights and keeps them as bf16 (bit-exact).
  static PackedLinear pack(const bf16* w, std::int64_t out_features, std::int64_t in_features, std::int64_t ld_w) {
    check_pack_args(w, out_features, in_features, ld_w, "PackedLinear::pack");
    PackedLinear p(out_features, in_features, LinearFormat::bf16);
    p.fill_bf16([&](std::int64_t o, std::int64_t k) { return w[o * ld_w + k].bits; });
    return p;
  }

  // Packs f32 weights rounded (RNE) to bf16.
  static PackedLinear pack_as_bf16(const float* w, std::int64_t out_features, std::int64_t in_features,
                                   std::int64_t ld_w) {
    check_pack_args(w, out_features, in_features, ld_w, "PackedLinear::pack_as_bf16");
    PackedLinear p(out_features, in_features, LinearFormat::bf16);
    p.fill_bf16([&](std::int64_t o, std::int64_t k) { return bf16::round(w[o * ld_w + k]); });
    return p;
  }

  // Quantises f32 or bf16 weights to q8 (groups of 32 along in_features, the last one
  // zero-padded; see detail/q8_kernels.hpp). A weight that is not finite cannot be held: error.
  static PackedLinear pack_q8(const float* w, std::int64_t out_features, std::int64_t in_features, std::int64_t ld_w) {
    check_pack_args(w, out_features, in_features, ld_w, "PackedLinear::pack_q8");
    PackedLinear p(out_features, in_features, LinearFormat::q8);
    p.fill_q8([&](std::int64_t o, std::int64_t k0, int n, float* dst) { std::memcpy(dst, w + o * ld_w + k0, n * 4); });
    return p;
  }
  static PackedLinear pack_q8(const bf16* w, std::int64_t out_features, std::int64_t in_features, std::int64_t ld_w) {
    check_pack_args(w, out_features, in_features, ld_w, "PackedLinear::pack_q8");
    PackedLinear p(out_features, in_features, LinearFormat::q8);
    p.fill_q8([&](std::int64_t o, std::int64_t k0, int n, float* dst) {
      for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(w[o * ld_w + k0 + i]);
    });
    return p;
  }

  std::int64_t out_features() const { return out_; }
  std::int64_t in_features() const { return in_; }
  LinearFormat format() const { return format_; }
  bool is_bf16() const { return format_ == LinearFormat::bf16; }
  // Bytes of packed weight storage (including the zero padding of the last block / odd K).
  std::size_t bytes() const { return bytes_; }

  // y = x W^T (or y += x W^T). x [tokens, in], y [tokens, out].
  void forward(ConstView2<float> x, View2<float> y, const LinearOptions& opt = {}) const {
    constexpr const char* fn = "PackedLinear::forward";
    ATTNKIT_REQUIRE(data_ != nullptr, fn, ": argument 'this': the layer is empty (default-constructed, not packed)");
    check_view(x, fn, "x");
    check_view(y, fn, "y");
    ATTNKIT_REQUIRE(x.shape[1] == in_, fn, ": argument 'x': expected ", in_, " columns (in_features), got shape ",
                    detail::shape_string(x));
    ATTNKIT_REQUIRE(y.shape[1] == out_, fn, ": argument 'y': expected ", out_,
                    " columns (out_features), got shape ", detail::shape_string(y));
    ATTNKIT_REQUIRE(y.shape[0] == x.shape[0], fn, ": argument 'y': token count ", y.shape[0],
                    " does not match x's ", x.shape[0]);
    const std::int64_t T = x.shape[0];
    if (T == 0) return;
    ATTNKIT_REQUIRE(x.shape[0] == 1 || x.stride[0] >= 0, fn, ": argument 'x': negative row stride");
    ATTNKIT_REQUIRE(y.shape[0] == 1 || y.stride[0] >= out_, fn, ": argument 'y': row stride ", y.stride[0],
                    " is smaller than out_features ", out_, " (rows would overlap)");
    {
      const auto x0 = reinterpret_cast<std::uintptr_t>(x.data), y0 = reinterpret_cast<std::uintptr_t>(y.data);
      const auto x1 = reinterpret_cast<std::uintptr_t>(x.data + (T - 1) * x.stride[0] + in_);
      const auto y1 = reinterpret_cast<std::uintptr_t>(y.data + (T - 1) * y.stride[0] + out_);
      ATTNKIT_REQUIRE(y1 <= x0 || x1 <= y0, fn, ": argument 'y': overlaps x (in-place is not supported)");
    }
    const double macs = static_cast<double>(T) * static_cast<double>(out_) * static_cast<double>(in_);
    int nt = resolve_threads(opt.num_threads);
    if (macs < detail::linear::kMinParallelMacs) nt = 1;
    nt = static_cast<int>(std::min<std::int64_t>(nt, blocks_));
    const bool exact = opt.precision == Precision::exact;
    if (format_ == LinearFormat::bf16) forward_bf16(x, y, exact, opt.accumulate, nt);
    else if (format_ == LinearFormat::q8) forward_q8(x, y, exact, opt.accumulate, nt);
    else forward_f32(x, y, opt.accumulate, nt);
  }

  // Unpacks W[o, :] as float into dst[in].
  void row(std::int64_t o, float* dst) const {
    constexpr const char* fn = "PackedLinear::row";
    ATTNKIT_REQUIRE(data_ != nullptr, fn, ": argument 'this': the layer is empty (default-constructed, not packed)");
    ATTNKIT_REQUIRE(o >= 0 && o < out_, fn, ": argument 'o': row ", o, " out of range [0, ", out_, ")");
    ATTNKIT_REQUIRE(dst != nullptr, fn, ": argument 'dst': null pointer");
    const std::int64_t b = o / kBlock, l = o % kBlock;
    if (format_ == LinearFormat::q8) {
      const std::int64_t kq = detail::linear::q8_groups(in_);
      const std::uint8_t* blk = static_cast<const std::uint8_t*>(data_.get()) + b * detail::linear::q8_block_bytes(kq);
      for (std::int64_t k = 0; k < in_; ++k) dst[k] = detail::linear::q8_value(blk, kq, static_cast<int>(l), k);
    } else if (format_ == LinearFormat::bf16) {
      const std::uint16_t* blk = static_cast<const std::uint16_t*>(data_.get()) + b * kpairs_ * kBlock * 2;
      for (std::int64_t k = 0; k < in_; ++k) dst[k] = bf16::to_float(blk[((k / 2) * kBlock + l) * 2 + (k % 2)]);
    } else {
      const float* blk = static_cast<const float*>(data_.get()) + b * in_ * kBlock;
      for (std::int64_t k = 0; k < in_; ++k) dst[k] = blk[k * kBlock + l];
    }
  }

 private:
  static constexpr int kBlock = detail::linear::kBlock;
  static constexpr std::int64_t kPairAlign = detail::linear::kAmxK / 2;  // stored K-pairs: a whole number of AMX steps

  std::int64_t out_ = 0, in_ = 0, blocks_ = 0;
  std::int64_t kpairs_ = 0;  // stored K-pairs per block (bf16): ceil(in / 2) rounded up to kPairAlign
  LinearFormat format_ = LinearFormat::f32;
  std::size_t bytes_ = 0;
  std::shared_ptr<void> data_;  // immutable after packing: copies share it

  PackedLinear(std::int64_t out, std::int64_t in, LinearFormat format)
      : out_(out),
        in_(in),
        blocks_((out + kBlock - 1) / kBlock),
        kpairs_(((in + 1) / 2 + kPairAlign - 1) / kPairAlign * kPairAlign),
        format_(format) {
    bytes_ = format == LinearFormat::bf16 ? static_cast<std::size_t>(blocks_ * kpairs_ * kBlock) * 4
             : format == LinearFormat::q8
                 ? static_cast<std::size_t>(blocks_ * detail::linear::q8_block_bytes(detail::linear::q8_groups(in)))
                 : static_cast<std::size_t>(blocks_ * in_ * kBlock) * 4;
    data_ = allocate_aligned_shared(bytes_);  // huge pages: decode streams these bytes every token
  }

  template <class T>
  static void check_pack_args(const T* w, std::int64_t out, std::int64_t in, std::int64_t ld_w, const char* fn) {
    ATTNKIT_REQUIRE(out > 0, fn, ": argument 'out_features': must be positive, got ", out);
    ATTNKIT_REQUIRE(in > 0, fn, ": argument 'in_features': must be positive, got ", in);
    ATTNKIT_REQUIRE(ld_w >= in, fn, ": argument 'ld_w': row stride ", ld_w, " is smaller than in_features ", in);
    ATTNKIT_REQUIRE(w != nullptr, fn, ": argument 'w': null pointer");
  }

  // get(o, k) -> bf16 bits of W[o, k] for o < out, k < in.
  template <class Get>
  void fill_bf16(Get&& get) {
    std::uint32_t* dst = static_cast<std::uint32_t*>(data_.get());
    const std::int64_t K = in_, N = out_, KP = kpairs_, full_pairs = in_ / 2;
    parallel_for(blocks_, 0, [&](std::int64_t b) {
      std::uint32_t* blk = dst + b * KP * kBlock;
      const std::int64_t o0 = b * kBlock;
      const int rows = static_cast<int>(std::min<std::int64_t>(kBlock, N - o0));
      for (std::int64_t k = 0; k < KP; ++k) {  // sequential writes, 16 read streams
        for (int l = 0; l < rows; ++l) {
          const std::uint32_t even = k < full_pairs || 2 * k < K ? get(o0 + l, 2 * k) : 0u;
          const std::uint32_t odd = k < full_pairs ? get(o0 + l, 2 * k + 1) : 0u;
          blk[k * kBlock + l] = even | (odd << 16);
        }
        for (int l = rows; l < kBlock; ++l) blk[k * kBlock + l] = 0u;
      }
    });
  }

  // get(o, k0, n, dst): dst[0..n) = W[o, k0 .. k0 + n) as float, for o < out, k0 + n <= in.
  template <class Get>
  void fill_q8(Get&& get) {
    namespace L = detail::linear;
    std::uint8_t* dst = static_cast<std::uint8_t*>(data_.get());
    const std::int64_t kq = L::q8_groups(in_), ldw = L::q8_block_bytes(kq);
    parallel_for(blocks_, 0, [&](std::int64_t b) {
      std::uint8_t* blk = dst + b * ldw;
      auto* scales = reinterpret_cast<std::uint16_t*>(blk + kq * L::kQ8GroupBytes);
      std::memset(blk, 128, static_cast<std::size_t>(kq * L::kQ8GroupBytes));  // padded rows: q = 0
      std::memset(scales, 0, static_cast<std::size_t>(ldw - kq * L::kQ8GroupBytes));
      float group[L::kQ8Group];
      for (int l = 0; l < kBlock && b * kBlock + l < out_; ++l)
        for (std::int64_t g = 0; g < kq; ++g) {
          const std::int64_t o = b * kBlock + l, k0 = g * L::kQ8Group;
          const int n = static_cast<int>(std::min<std::int64_t>(L::kQ8Group, in_ - k0));
          get(o, k0, n, group);
          for (int i = 0; i < n; ++i)
            ATTNKIT_REQUIRE(std::isfinite(group[i]), "PackedLinear::pack_q8: weight [", o, ", ", k0 + i, "] is ",
                            group[i], ": int8 groups with a finite scale cannot hold it");
          L::q8_quantize_group(group, n, l, blk + g * L::kQ8GroupBytes, scales + g * kBlock + l);
        }
    });
  }

  // Thread t's contiguous range of packed blocks.
  std::int64_t block_begin(int t, int nt) const { return blocks_ * t / nt; }

  // Decode (at most two token tiles, each weight read once): the output blocks are handed out
  // through StealingRanges, strips of kNB blocks from a thread's own range and then single
  // blocks from the back of the fullest other one, so that neither thread streams alone at the
  // end of a call (on the 2-core VM the static split left one idle for 9-17% of a Qwen3-0.6B
  // layer's GEMV time; 28 layers' GEMVs, old and new alternated in one process: 1.04-1.05x).
  // Each output's sum runs over K in the same order whoever computes it: the bits do not depend
  // on the split. Empty (a fixed split) for one thread or more than StealingRanges supports.
  std::optional<StealingRanges> decode_ranges(int nt) const {
    if (nt <= 1 || nt > StealingRanges::kMaxThreads) return std::nullopt;
    return std::optional<StealingRanges>(std::in_place, blocks_, nt);
  }
  // run(b0, b1) over the blocks thread t computes: its claims from `ranges`, or without them its
  // fixed share.
  template <class Run>
  void for_blocks(int t, int nthreads, std::optional<StealingRanges>& ranges, Run&& run) const {
    if (!ranges) return run(block_begin(t, nthreads), block_begin(t + 1, nthreads));
    for (auto r = ranges->next(t, detail::linear::kNB, 1); r.first < r.second; r = ranges->next(t, detail::linear::kNB, 1))
      run(r.first, r.second);
  }

  // Tile loop for one thread over its blocks [b0, b1) and tokens [0, mc) of a chunk: strips
  // of up to kNB blocks (strip(bs, nb) runs first), then token tiles of up to kMR.
  template <int kMR = detail::linear::kMR, class Pick, class Strip, class Run>
  void tile_loop(std::int64_t b0, std::int64_t b1, std::int64_t mc, Pick&& pick, Strip&& strip, Run&& run) const {
    using detail::linear::kNB;
    for (std::int64_t bs = b0; bs < b1; bs += kNB) {
      const int nb = static_cast<int>(std::min<std::int64_t>(kNB, b1 - bs));
      const std::int64_t last_block = bs + nb - 1;
      const int last_lanes = static_cast<int>(std::min<std::int64_t>(kBlock, out_ - last_block * kBlock));
      strip(bs, nb);
      const int mr_full = static_cast<int>(std::min<std::int64_t>(kMR, mc));
      const auto full = pick(mr_full, nb);
      for (std::int64_t t0 = 0; t0 < mc; t0 += kMR) {
        const int mr = static_cast<int>(std::min<std::int64_t>(kMR, mc - t0));
        run(mr == mr_full ? full : pick(mr, nb), bs, t0, last_lanes);
      }
    }
  }

  void forward_bf16(ConstView2<float> x, View2<float> y, bool exact, bool accumulate, int nt) const {
    namespace L = detail::linear;
    const std::int64_t T = x.shape[0], K = in_, KP = (in_ + 1) / 2;
#if defined(ATTNKIT_LINEAR_AMX)
    // Tiles only above one register tile of tokens: for 2-8 (a batch decode step) the three-plane
    // exact tiles measured 0.77-0.88x of the FMA stream kernel below, fast ones level (0.94-1.17x;
    // Qwen3-0.6B batch sessions, AMX host, 2026-12-06, docs/performance.md).
    if (T > L::kMR && L::amx_available())
    {
      const std::uint32_t* W = static_cast<const std::uint32_t*>(data_.get());
      const std::int64_t ldw = kpairs_ * kBlock;
      auto strip = [&](int, std::int64_t bs, int) { return W + bs * ldw; };
      auto stored = [&](std::int64_t bs, int nw) {
        return std::pair<const char*, const char*>{reinterpret_cast<const char*>(W + bs * ldw),
                                                   reinterpret_cast<const char*>(W + (bs + nw) * ldw)};
      };
      return exact ? forward_amx<3>(x, y, accumulate, nt, kpairs_, ldw, strip, stored)
                   : forward_amx<1>(x, y, accumulate, nt, kpairs_, ldw, strip, stored);
    }
#endif
    const std::int64_t MC = std::min<std::int64_t>(L::kMC, T);
    const std::int64_t ldr = (K + 15) / 16 * 16;  // rounded-activation row stride
    float* xr = exact ? nullptr : L::activation_scratch(static_cast<std::size_t>(MC * ldr));
    // One or two token tiles (decode, a small batch of sequences): widen the weights in
    // registers, streaming all of K per tile (a second tile re-reads its strip from L2; measured,
    // model decode of 16 sequences: 1.8x faster than the panel). Otherwise widen a K block of a
    // strip once into an f32 panel and reuse it for all tiles.
    const bool single_tile = T <= 2 * L::kMR;
    const std::int64_t KCP = L::kKC / 2;
    const std::uint32_t* W = static_cast<const std::uint32_t*>(data_.get());
    const std::int64_t ldw = kpairs_ * kBlock;
    auto none = [](std::int64_t, int) {};
    // Decode: blocks handed out through StealingRanges (decode_ranges; one token chunk only).
    auto ranges = single_tile && T <= MC ? decode_ranges(nt) : std::optional<StealingRanges>{};
    auto body = [&](int t, int nthreads) {
      const std::int64_t b0 = block_begin(t, nthreads), b1 = block_begin(t + 1, nthreads);
      float* panel = single_tile ? nullptr : L::panel_scratch(static_cast<std::size_t>(L::kNB * L::kKC * kBlock));
      for (std::int64_t m0 = 0; m0 < T; m0 += MC) {
        const std::int64_t mc = std::min(MC, T - m0);
        const float* xa = x.data + m0 * x.stride[0];
        std::int64_t lda = x.stride[0];
        if (!exact) {
          // Each thread rounds a share of the chunk's rows; all threads read all of them.
          for (std::int64_t r = mc * t / nthreads; r < mc * (t + 1) / nthreads; ++r)
            L::round_to_bf16_row(xa + r * lda, K, xr + r * ldr);
          barrier(nthreads);
          xa = xr;
          lda = ldr;
        }
        float* ym = y.data + m0 * y.stride[0];
        const std::int64_t ldy = y.stride[0];
        if (single_tile) {
          const auto strips = [&](std::int64_t s0, std::int64_t s1) {
            tile_loop(s0, s1, mc, [](int mr, int nb) { return L::pick_bf16_stream(mr, nb); }, none,
                      [&](L::KernelBf16 kern, std::int64_t bs, std::int64_t t0, int last_lanes) {
                        kern(xa + t0 * lda, lda, W + bs * ldw, ldw, K / 2, K % 2 != 0, ym + t0 * ldy + bs * kBlock,
                             ldy, last_lanes, accumulate);
                      });
          };
          for_blocks(t, nthreads, ranges, strips);
        } else {
          for (std::int64_t k0 = 0; k0 < KP; k0 += KCP) {
            const std::int64_t kcp = std::min(KCP, KP - k0), kc = std::min(2 * kcp, K - 2 * k0);
            const bool load_y = accumulate || k0 > 0;
            tile_loop(
                b0, b1, mc, [](int mr, int nb) { return L::pick_f32<false>(mr, nb); },
                [&](std::int64_t bs, int nb) { L::widen_panel(W + bs * ldw + k0 * kBlock, ldw, nb, kcp, panel); },
                [&](L::KernelF32 kern, std::int64_t bs, std::int64_t t0, int last_lanes) {
                  kern(xa + t0 * lda + 2 * k0, lda, panel, 2 * kcp * kBlock, kc, ym + t0 * ldy + bs * kBlock, ldy,
                       last_lanes, load_y);
                });
          }
        }
        if (!exact) barrier(nthreads);  // the next chunk overwrites the rounded rows
      }
    };
    run_parallel(nt, body);
  }

#if defined(ATTNKIT_LINEAR_AMX)
  // Prefill on AMX: activations split into P bf16 planes once per token chunk (P = 1: fast,
  // P = 3: exact), then 32-token x 32-output register tiles over all of K (the accumulators
  // are tiles, so there is no K blocking). strip(t, bs, nw) gives worker t's B-tile layout
  // weights of blocks [bs, bs + nw) (kpairs K-pairs per block, ldw uint32 apart): the packed
  // bf16 weights themselves, or a dequantised q8 panel.
  // stored(bs, nw) is the byte range in memory that blocks [bs, bs + nw) come from (the packed
  // bf16 weights, or the int8 blocks a q8 strip is widened from), prefetched while the strip
  // before them runs.
  template <int P, class Strip, class Stored>
  void forward_amx(ConstView2<float> x, View2<float> y, bool accumulate, int nt, std::int64_t kpairs, std::int64_t ldw,
                   Strip&& strip, Stored&& stored, std::int64_t max_chunk = detail::linear::kMCAmx,
                   std::int64_t chunk_bytes = detail::linear::kAmxChunkBytes, bool even_chunks = false) const {
    namespace L = detail::linear;
    const std::int64_t T = x.shape[0], K = in_;
    const std::int64_t lda = 2 * kpairs + 32;  // bf16 per activation row; +64 bytes against 4 KiB aliasing
    // Token chunk: the chunk's activation planes are re-read for every weight strip, so they
    // should stay in L2 (kAmxChunkBytes); 32..kMCAmx tokens.
    const std::int64_t fit = chunk_bytes / (P * lda * 2) / 32 * 32;
    std::int64_t MC = std::min<std::int64_t>(std::clamp<std::int64_t>(fit, 32, max_chunk), (T + 31) / 32 * 32);
    if (even_chunks) {
      const std::int64_t chunks = (T + MC - 1) / MC;
      MC = ((T + chunks - 1) / chunks + 31) / 32 * 32;
    }
    const std::int64_t plane = MC * lda;
    std::uint16_t* xb =
        reinterpret_cast<std::uint16_t*>(L::activation_scratch(static_cast<std::size_t>(P * plane / 2)));
    const std::int64_t ksteps = kpairs / kPairAlign;
    auto body = [&](int t, int nthreads) {
      const std::int64_t b0 = block_begin(t, nthreads), b1 = block_begin(t + 1, nthreads);
      alignas(64) float c[4 * 256];
      L::amx_configure();
      for (std::int64_t m0 = 0; m0 < T; m0 += MC) {
        const std::int64_t mc = std::min(MC, T - m0), mcr = (mc + 15) / 16 * 16;
        for (std::int64_t r = mcr * t / nthreads; r < mcr * (t + 1) / nthreads; ++r)
          L::split_row_to_bf16<P>(r < mc ? x.data + (m0 + r) * x.stride[0] : x.data, r < mc ? K : 0, xb + r * lda,
                                  plane, lda);
        barrier(nthreads);
        for (std::int64_t bs = b0; bs < b1; bs += 2) {
          const int nw = static_cast<int>(std::min<std::int64_t>(2, b1 - bs));
          const std::uint32_t* w = strip(t, bs, nw);
          // The strip after this one: the next of this chunk, else the first of the next chunk.
          const std::int64_t bn = bs + 2 < b1 ? bs + 2 : m0 + MC < T ? b0 : b1;
          const auto [pf, pf_end] = bn < b1 ? stored(bn, static_cast<int>(std::min<std::int64_t>(2, b1 - bn)))
                                             : std::pair<const char*, const char*>{nullptr, nullptr};
          for (std::int64_t t0 = 0; t0 < mc; t0 += 32) {
            const int na = mc - t0 > 16 ? 2 : 1;
            const char* pf_t =
                pf ? pf + std::min<std::int64_t>(t0 / 32 * ksteps * L::kAmxPrefetchLines * 64, pf_end - pf) : nullptr;
            L::pick_amx<P>(na, nw)(xb + t0 * lda, lda * 2, plane * 2, w, ldw, ksteps, c, pf_t, pf_end);
            for (int a = 0; a < na; ++a)
              for (int b = 0; b < nw; ++b) {
                const std::int64_t o0 = (bs + b) * kBlock;
                const int lanes = static_cast<int>(std::min<std::int64_t>(kBlock, out_ - o0));
                const __mmask16 m = static_cast<__mmask16>((1u << lanes) - 1u);
                const float* ct = c + (a * nw + b) * 256;
                for (std::int64_t r = 0; r < 16 && t0 + a * 16 + r < mc; ++r) {
                  float* yr = y.data + (m0 + t0 + a * 16 + r) * y.stride[0] + o0;
                  __m512 v = _mm512_load_ps(ct + r * 16);
                  if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, yr));
                  _mm512_mask_storeu_ps(yr, m, v);
                }
              }
          }
        }
        barrier(nthreads);  // the next chunk overwrites the activations
      }
      L::amx_release();
    };
    run_parallel(nt, body);
  }
#endif

  void forward_q8(ConstView2<float> x, View2<float> y, bool exact, bool accumulate, int nt) const {
    namespace L = detail::linear;
    const std::int64_t T = x.shape[0], K = in_, kq = L::q8_groups(K), KQ = kq * L::kQ8Group;
    const std::uint8_t* W = static_cast<const std::uint8_t*>(data_.get());
    const std::int64_t ldw = L::q8_block_bytes(kq);
    auto none = [](std::int64_t, int) {};
    if (T <= L::kMR) {
      // Decode: each weight byte is read once (a strip's token tiles share it in L1). The
      // activations are prepared here: int8 per group (fast, VNNI) or zero-padded f32 (exact).
#if defined(ATTNKIT_LINEAR_VNNI)
      if (!exact) {
        // Per token: KQ int8, then kq scales and kq corrections (4-byte aligned: KQ % 32 == 0).
        const std::int64_t row_bytes = KQ + 8 * kq;
        auto* buf = reinterpret_cast<std::uint8_t*>(L::q8_activation_scratch(static_cast<std::size_t>(T * row_bytes / 4)));
        auto* xq = reinterpret_cast<std::int8_t*>(buf);
        auto* xs = reinterpret_cast<float*>(buf + T * KQ);
        auto* xc = reinterpret_cast<std::int32_t*>(buf + T * KQ + 4 * T * kq);
        for (std::int64_t r = 0; r < T; ++r)
          L::q8_quantize_activations(x.data + r * x.stride[0], K, xq + r * KQ, xs + r * kq, xc + r * kq);
        auto ranges = decode_ranges(nt);
        run_parallel(nt, [&](int t, int nthreads) {
          for_blocks(t, nthreads, ranges, [&](std::int64_t b0, std::int64_t b1) {
            tile_loop<L::kQ8MR>(b0, b1, T, [](int mr, int nb) { return L::pick_q8_vnni(mr, nb); }, none,
                                [&](L::KernelQ8Vnni kern, std::int64_t bs, std::int64_t t0, int last_lanes) {
                                  kern(xq + t0 * KQ, KQ, xs + t0 * kq, xc + t0 * kq, kq, W + bs * ldw, ldw, kq,
                                       y.data + t0 * y.stride[0] + bs * kBlock, y.stride[0], last_lanes, accumulate);
                                });
          });
        });
        return;
      }
#endif
      float* xp = L::q8_activation_scratch(static_cast<std::size_t>(T * KQ));
      for (std::int64_t r = 0; r < T; ++r) {
        std::memcpy(xp + r * KQ, x.data + r * x.stride[0], static_cast<std::size_t>(K) * sizeof(float));
        std::fill(xp + r * KQ + K, xp + (r + 1) * KQ, 0.f);
      }
      auto ranges = decode_ranges(nt);
      run_parallel(nt, [&](int t, int nthreads) {
        for_blocks(t, nthreads, ranges, [&](std::int64_t b0, std::int64_t b1) {
          tile_loop<L::kQ8MR>(b0, b1, T, [](int mr, int nb) { return L::pick_q8_f32(mr, nb); }, none,
                              [&](L::KernelQ8F32 kern, std::int64_t bs, std::int64_t t0, int last_lanes) {
                                kern(xp + t0 * KQ, KQ, W + bs * ldw, ldw, kq, y.data + t0 * y.stride[0] + bs * kBlock,
                                     y.stride[0], last_lanes, accumulate);
                              });
        });
      });
      return;
    }
#if defined(ATTNKIT_LINEAR_AMX)
    if (!exact && L::amx_available()) {
      // One dequantised bf16 strip (2 blocks, all of K) per worker, re-made per token chunk.
      const std::int64_t kpairs = kq * (L::kQ8Group / 2), ldp = kpairs * kBlock;
      auto* panels = reinterpret_cast<std::uint32_t*>(L::q8_panel_scratch(static_cast<std::size_t>(nt * 2 * ldp)));
      return forward_amx<1>(x, y, accumulate, nt, kpairs, ldp, [&](int t, std::int64_t bs, int nw) {
        std::uint32_t* panel = panels + t * 2 * ldp;
        L::q8_widen_panel_bf16(W + bs * ldw, ldw, kq, nw, panel);
        return static_cast<const std::uint32_t*>(panel);
      }, [&](std::int64_t bs, int nw) {  // the int8 blocks the next strip is widened from
        return std::pair<const char*, const char*>{reinterpret_cast<const char*>(W + bs * ldw),
                                                   reinterpret_cast<const char*>(W + (bs + nw) * ldw)};
      }, L::kMCAmxQ8, L::kAmxChunkBytesQ8, true);
    }
#endif
    // Prefill on FMA: a K block (kKC, whole groups) of a strip widened once into an f32 panel.
    const std::int64_t GC = L::kKC / L::kQ8Group, panel_floats = L::kNB * L::kKC * kBlock;
    float* panels = L::q8_panel_scratch(static_cast<std::size_t>(nt * panel_floats));
    run_parallel(nt, [&](int t, int nthreads) {
      const std::int64_t b0 = block_begin(t, nthreads), b1 = block_begin(t + 1, nthreads);
      float* panel = panels + t * panel_floats;
      for (std::int64_t m0 = 0; m0 < T; m0 += L::kMC) {
        const std::int64_t mc = std::min(L::kMC, T - m0);
        for (std::int64_t g0 = 0; g0 < kq; g0 += GC) {
          const std::int64_t ng = std::min(GC, kq - g0), k0 = g0 * L::kQ8Group, kc = std::min(ng * L::kQ8Group, K - k0);
          tile_loop(
              b0, b1, mc, [](int mr, int nb) { return L::pick_f32<false>(mr, nb); },
              [&](std::int64_t bs, int nb) { L::q8_widen_panel(W + bs * ldw, ldw, kq, nb, g0, ng, panel); },
              [&](L::KernelF32 kern, std::int64_t bs, std::int64_t t0, int last_lanes) {
                kern(x.data + (m0 + t0) * x.stride[0] + k0, x.stride[0], panel, ng * L::kQ8Group * kBlock, kc,
                     y.data + (m0 + t0) * y.stride[0] + bs * kBlock, y.stride[0], last_lanes, accumulate || g0 > 0);
              });
        }
      }
    });
  }

  void forward_f32(ConstView2<float> x, View2<float> y, bool accumulate, int nt) const {
    namespace L = detail::linear;
    const std::int64_t T = x.shape[0], K = in_;
    // Single token tile: stream the packed weights. Otherwise copy a K block of a strip into a
    // compact panel first (the packed blocks are K*64 bytes apart, which aliases in L1).
    const bool single_tile = T <= L::kMR;
    const std::int64_t KC = single_tile ? K : L::kKC;
    const float* W = static_cast<const float*>(data_.get());
    const std::int64_t ldw = K * kBlock;
    auto body = [&](int t, int nthreads) {
      const std::int64_t b0 = block_begin(t, nthreads), b1 = block_begin(t + 1, nthreads);
      float* panel = single_tile ? nullptr : L::panel_scratch(static_cast<std::size_t>(L::kNB * L::kKC * kBlock));
      for (std::int64_t m0 = 0; m0 < T; m0 += L::kMC) {
        const std::int64_t mc = std::min(L::kMC, T - m0);
        for (std::int64_t k0 = 0; k0 < K; k0 += KC) {
          const std::int64_t kc = std::min(KC, K - k0);
          const bool load_y = accumulate || k0 > 0;
          const float* src = panel;
          std::int64_t lds = kc * kBlock;
          if (single_tile) {
            src = W + k0 * kBlock;
            lds = ldw;
          }
          tile_loop(
              b0, b1, mc,
              [&](int mr, int nb) { return single_tile ? L::pick_f32<true>(mr, nb) : L::pick_f32<false>(mr, nb); },
              [&](std::int64_t bs, int nb) {
                if (single_tile) return;
                for (int j = 0; j < nb; ++j)
                  std::memcpy(panel + j * kc * kBlock, W + (bs + j) * ldw + k0 * kBlock,
                              static_cast<std::size_t>(kc * kBlock) * sizeof(float));
              },
              [&](L::KernelF32 kern, std::int64_t bs, std::int64_t t0, int last_lanes) {
                kern(x.data + (m0 + t0) * x.stride[0] + k0, x.stride[0], single_tile ? src + bs * lds : src, lds, kc,
                     y.data + (m0 + t0) * y.stride[0] + bs * kBlock, y.stride[0], last_lanes, load_y);
              });
        }
      }
    };
    run_parallel(nt, body);
  }

  // A breakable barrier (core/threading.hpp): a thread that throws before a barrier must not
  // leave the others waiting in it.
  static void barrier(int nthreads) {
    ATTNKIT_FAULT_POINT("linear");
    team_barrier(nthreads);
  }

  // Runs body(t, nt) on nt threads (one team; body may use barrier()). A worker's exception
  // ends the team and is rethrown here; y is then partly written.
  template <class Body>
  static void run_parallel(int nt, Body&& body) {
    run_team(nt, [&](int t, int n) {
      ATTNKIT_FAULT_POINT("linear");
      body(t, n);
    });
  }
};

}  // namespace attnkit
