// attnkit/model/mixer.hpp — the token-mixer seam of a decoder block.
//
// A decoder block is  h -> pre-norm -> token mixer -> (residual policy) -> pre-norm -> MLP.
// The token mixer is the part that moves information across tokens (attention of some kind,
// a recurrence, ...). Each mixer owns its weights and creates its own per-sequence state (KV
// cache, ring buffer, recurrent state). Adding a mixer is a new file with a TokenMixer subclass
// and a factory registered under the config's layer-type name; nothing else changes.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "attnkit/attention/paged_kv.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/stage_profile.hpp"
#include "attnkit/core/view.hpp"
#include "attnkit/io/config.hpp"
#include "attnkit/linalg/packed_linear.hpp"
#include "attnkit/model/ops.hpp"
#include "attnkit/model/tensor_source.hpp"
#include "attnkit/model/trace.hpp"
#include "attnkit/model/workspace.hpp"

namespace attnkit::model {

// KV cache storage: f32, bf16, or int8 with a scale per token and KV head (attention/quant.hpp).
enum class CacheType { f32, bf16, int8 };

// Bytes one token's K and V take in a cache of type t for kv_heads heads of head_dim (int8: the
// codes and a float scale per row).
inline std::uint64_t kv_token_bytes(CacheType t, std::int64_t kv_heads, std::int64_t head_dim) {
  if (t == CacheType::int8) return mul_bytes(kv_heads, 2, add_bytes(static_cast<std::uint64_t>(head_dim), sizeof(float)));
  return mul_bytes(kv_heads, 2 * head_dim, t == CacheType::f32 ? sizeof(float) : sizeof(bf16));
}

// Per-sequence settings that shape the mixer states.
struct SessionOptions {
  CacheType kv_type = CacheType::f32;
  std::int64_t reserve_tokens = 0;  // KV capacity to reserve up front (0: grow on demand)
};

// Per-call settings of one forward step (a prefill chunk or a decode step).
struct StepContext {
  std::int64_t pos0 = 0;     // absolute position of the first token of this step
  int num_threads = 0;       // 0: OpenMP default
  Precision precision = Precision::exact;
  const ops::Rope::Angles* rope = nullptr;  // RoPE angles of this step's positions, shared by all layers
  int pass = 0;                             // which run over the layer stack (looped stacks run it several times)
  Trace* trace = nullptr;                   // where mechanisms record their internals (gates, ...); may be null
  Workspace* workspace = nullptr;           // the step's scratch buffers (workspace.hpp); null: allocate
};

class MixerState {
 public:
  virtual ~MixerState() = default;
  // A copy holding the same tokens (a batch session's fork: a sequence continued two ways).
  // States that cannot be copied say so; kind names the mixer in the error.
  virtual std::unique_ptr<MixerState> clone(const std::string& kind) const {
    detail::throw_error("token mixer '", kind, "': its per-sequence state cannot be copied, so a batch session cannot ",
                        "fork a sequence of this model (start the new sequence from its prompt instead)");
  }
};

// K/V a mixer keeps in a batch session's shared page pool instead of per-sequence states: its
// number of KV heads (all its passes together) and head dimension; none: per-sequence states.
// window > 0: the mixer reads only each sequence's last `window` positions (a sliding window), so
// its K/V go to the session's pool of that window, whose pages wholly below every sequence's
// window are freed as the sequences advance (their table entries stay, never read).
struct PagedLayout {
  std::int64_t kv_heads = 0, head_dim = 0, window = 0;
  bool paged() const { return kv_heads > 0; }
};

// One step of a batch session (model/batch_session.hpp) as a mixer sees it: B sequences' new
// tokens packed along the token axis, rows cu_seqlens[b] .. cu_seqlens[b + 1] of x belong to
// sequence b and sit at positions pos0[b] ...
struct BatchStep {
  std::span<const std::int64_t> cu_seqlens;  // [B + 1]
  std::span<const std::int64_t> pos0;        // [B]
  std::span<const ops::Rope::Angles> rope;   // [B]: the model's RoPE angles of each sequence's new tokens
  // Each sequence's own state (B of them): new_state()'s for mixers without a paged layout,
  // new_paged_state()'s (possibly null) for paged ones.
  std::span<MixerState* const> states;
  // Paged mixers: the session's pool of the mixer's window (f32, bf16 or int8: the others are
  // empty) and this mixer's heads in it, [kv_head0, kv_head0 + layout.kv_heads); the sequences'
  // page tables in that pool with their lengths before the step (= pos0), covering the step's new
  // tokens (pages allocated, none shared where the step writes). window: the pool's (0: full);
  // entries of a windowed pool's tables below each sequence's window may point at freed pages.
  MutablePagedKV<float> pages_f32;
  MutablePagedKV<bf16> pages_bf16;
  MutablePagedKV<std::int8_t> pages_int8;  // codes and a scale per token and KV head
  std::int64_t kv_head0 = -1, window = 0;
  PageTable table;
  std::int64_t batch() const { return static_cast<std::int64_t>(pos0.size()); }
  std::int64_t tokens(std::int64_t b) const { return cu_seqlens[b + 1] - cu_seqlens[b]; }
};

class TokenMixer {
 public:
  virtual ~TokenMixer() = default;
  virtual std::string kind() const = 0;
  // One line on the mixer and its settings, for summaries (default: kind()).
  virtual std::string describe() const { return kind(); }
  virtual std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const = 0;
  // x: normalised input [T, D]; out: [T, D] (overwritten). Consumes the step's tokens into `state`.
  virtual void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const = 0;
  virtual std::size_t weight_bytes() const = 0;

  // Batch sessions. A mixer that keeps softmax K/V can ask for a share of the session's page
  // pool (pages shared between sequences, copy on write); the default keeps a state per sequence.
  virtual PagedLayout paged_layout(const SessionOptions& /*opt*/) const { return {}; }
  // A paged mixer's per-sequence state beside its pages (e.g. sparse attention's index-key
  // cache), handed to forward_batch in BatchStep::states; null (the default): none.
  virtual std::unique_ptr<MixerState> new_paged_state(const SessionOptions& /*opt*/) const { return nullptr; }
  // Bytes that state holds after `positions` tokens (the batch step's memory check counts them).
  virtual std::uint64_t paged_state_bytes(std::int64_t /*positions*/, const SessionOptions& /*opt*/) const { return 0; }
  // Runs a batch step's tokens (x [N, D] -> out [N, D]). The default runs forward() on each
  // sequence's rows with its own state, so every mixer works in a batch session; mixers
  // override it to run their projections on all N rows at once (weights read once per step).
  virtual void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const {
    ATTNKIT_REQUIRE(static_cast<std::int64_t>(step.states.size()) == step.batch(), "TokenMixer::forward_batch: ",
                    kind(), ": ", step.states.size(), " states for ", step.batch(), " sequences");
    for (std::int64_t b = 0; b < step.batch(); ++b) {
      ATTNKIT_REQUIRE(step.states[b] != nullptr, "TokenMixer::forward_batch: ", kind(), ": sequence ", b, " has no state");
      StepContext c = ctx;
      c.pos0 = step.pos0[b];
      c.rope = step.rope.empty() ? nullptr : &step.rope[b];
      c.trace = ctx.trace ? ctx.trace->sequence(b) : nullptr;  // records at the sequence's own positions
      const std::int64_t r0 = step.cu_seqlens[b], r1 = step.cu_seqlens[b + 1];
      if (r1 > r0) forward(x.slice(0, r0, r1), out.slice(0, r0, r1), *step.states[b], c);
    }
  }
};

// What every factory (mixer, residual policy, stack policy) gets: the config and its extension
// fields (reads mark them consumed), the weight source, the number of passes the stack makes
// over the layers (known once the stack policy is built; 1 before), and objects shared across
// layers (the RoPE table).
struct BuildContext {
  const io::Qwen3Config& config;
  const TensorSource& source;
  std::shared_ptr<const ops::Rope> rope;
  io::ConfigFields& fields;
  int passes = 1;
  // Sliding layers' window in each pass (the stack policy's pass_windows(); empty: the config's).
  std::vector<std::int64_t> pass_windows = {};
  // How the checkpoint stores RMSNorm weights (Plan::norm_weight_offset): 1 for (1 + w) norms.
  float norm_weight_offset = 0.f;
  std::string prefix(int layer) const { return "model.layers." + std::to_string(layer) + "."; }
  // The effective weight [n] of the RMSNorm `name`, under the model's norm convention.
  std::vector<float> norm_weight(const std::string& name, std::int64_t n) const {
    return source.norm_weight(name, n, norm_weight_offset);
  }
};

using MixerFactory = std::function<std::unique_ptr<TokenMixer>(const BuildContext&, int layer)>;

// Layer-type name (config.json's layer_types vocabulary) -> factory.
class MixerRegistry {
 public:
  void add(std::string layer_type, MixerFactory f) { factories_[std::move(layer_type)] = std::move(f); }
  bool has(const std::string& layer_type) const { return factories_.count(layer_type) != 0; }
  std::unique_ptr<TokenMixer> build(const std::string& layer_type, const BuildContext& ctx, int layer) const {
    auto it = factories_.find(layer_type);
    ATTNKIT_REQUIRE(it != factories_.end(), "MixerRegistry::build: layer ", layer, ": no token mixer registered for layer type '",
                    layer_type, "' (known: ", known(), ")");
    return it->second(ctx, layer);
  }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (auto& [k, f] : factories_) n.push_back(k);
    return n;
  }
  std::string known() const {
    std::string s;
    for (auto& [k, f] : factories_) s += (s.empty() ? "" : ", ") + k;
    return s.empty() ? "none" : s;
  }

 private:
  std::map<std::string, MixerFactory> factories_;
};

// Packs a dense [out, in] matrix of f32 or bf16 values as `as` (q8 quantises; bf16 rounds
// f32 values; f32 widens bf16 ones, exactly). `what` names it in errors.
template <class T>
PackedLinear pack_as(const T* w, std::int64_t out, std::int64_t in, WeightType as, const std::string& what) {
  try {
    if (as == WeightType::q8) return PackedLinear::pack_q8(w, out, in, in);
    if constexpr (std::is_same_v<T, float>) {
      return as == WeightType::bf16 ? PackedLinear::pack_as_bf16(w, out, in, in) : PackedLinear::pack(w, out, in, in);
    } else {
      if (as == WeightType::bf16) return PackedLinear::pack(w, out, in, in);
      std::vector<float> f(static_cast<std::size_t>(out * in));
      convert(w, f.data(), out * in);
      return PackedLinear::pack(f.data(), out, in, in);
    }
  } catch (const Error& e) {
    throw Error(what + ": " + e.what());
  }
}

// Packs a linear layer from a source tensor [out, in]: as stored, or as t.pack_as.
inline PackedLinear pack_linear(const HostTensor& t) {
  const std::int64_t out = t.shape.at(0), in = t.shape.at(1);
  const WeightType as = t.pack_as.value_or(t.type);
  return t.type == WeightType::bf16 ? pack_as(t.bf16_data(), out, in, as, t.name) : pack_as(t.f32(), out, in, as, t.name);
}

// Packs several [out_i, in] tensors as one [sum out_i, in] linear layer (fused q/k/v or
// gate/up: one pass over the activations instead of several). All parts must share a type.
inline PackedLinear pack_fused(const std::vector<const HostTensor*>& parts) {
  const std::int64_t in = parts.at(0)->shape.at(1);
  std::int64_t out = 0;
  for (auto* p : parts) {
    ATTNKIT_REQUIRE(p->shape.at(1) == in && p->type == parts[0]->type, "pack_fused: parts differ in width or type");
    out += p->shape[0];
  }
  std::string names;
  for (auto* p : parts) names += (names.empty() ? "" : " + ") + p->name;
  const WeightType as = parts[0]->pack_as.value_or(parts[0]->type);
  auto concat = [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> w(static_cast<std::size_t>(out * in));
    std::int64_t row = 0;
    for (auto* p : parts) {
      std::memcpy(w.data() + row * in, p->data, static_cast<std::size_t>(p->numel()) * sizeof(T));
      row += p->shape[0];
    }
    return pack_as(w.data(), out, in, as, names);
  };
  return parts[0]->type == WeightType::bf16 ? concat(bf16{}) : concat(float{});
}

}  // namespace attnkit::model
