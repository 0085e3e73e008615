// attnkit/model/qwen3.hpp — the Qwen3 decoder, composed from token mixers and a residual policy.
//
//   x0 = embed[ids];  per layer l:  h = R.input(l, mixer); R.add(mixer_l(RMSNorm_in(h)))
//                                    h = R.input(l, mlp);   R.add(MLP_l(RMSNorm_post(h)))
//   logits = RMSNorm_final(R.output()) E^T            (spec §1.5; E tied or lm_head.weight)
// With the plain SumResidual policy this is exactly Hugging Face's Qwen3ForCausalLM. load() and
// compose() ask the recipe that accepts the config (recipe.hpp) for a plan: the token mixer of
// each layer (by registry name), the residual policy (what each sublayer sees), the stack policy
// (how many passes over the layers, and what happens between them) and the block shape
// (optional norms after each sublayer); then they check that no tensor or config field went
// unused. build() takes the parts directly. Weights stay in their stored type (f32 or bf16) and
// are packed once at build.
//
// Inference: a Session holds the per-layer states (KV caches). forward() runs any number of new
// tokens at the session's current position: a whole prompt (prefill), a chunk of one (chunked
// prefill), or one token (decode); the states advance by that many tokens.
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "attnkit/core/stage_profile.hpp"
#include "attnkit/io/config.hpp"
#include "attnkit/io/safetensors.hpp"
#include "attnkit/model/builtin.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/recipe.hpp"
#include "attnkit/model/trace.hpp"
#include "attnkit/model/ops.hpp"
#include "attnkit/model/residual.hpp"
#include "attnkit/model/tensor_source.hpp"

namespace attnkit::model {

// SwiGLU MLP (spec §1.4) with gate and up fused into one packed [2I, D] product.
class SwiGLU {
 public:
  SwiGLU() = default;
  SwiGLU(const BuildContext& ctx, int layer) {
    const auto& c = ctx.config;
    I_ = c.intermediate_size;
    const std::string p = ctx.prefix(layer) + "mlp.";
    HostTensor g = ctx.source.get(p + "gate_proj.weight", {I_, c.hidden_size});
    HostTensor u = ctx.source.get(p + "up_proj.weight", {I_, c.hidden_size});
    gate_up_ = pack_fused({&g, &u});
    down_ = pack_linear(ctx.source.get(p + "down_proj.weight", {c.hidden_size, I_}));
  }
  void forward(ConstView2<float> x, View2<float> out, const StepContext& ctx) const {
    const std::int64_t T = x.shape[0];
    std::vector<float> own_gu, own_act;
    float* gu = scratch(ctx.workspace, ScratchSlot::mlp_gate_up, static_cast<std::size_t>(T * 2 * I_), own_gu);
    float* act = scratch(ctx.workspace, ScratchSlot::mlp_act, static_cast<std::size_t>(T * I_), own_act);
    {
      ATTNKIT_STAGE("mlp.gate_up");
      gate_up_.forward(x, View2<float>(gu, {T, 2 * I_}), {ctx.precision, ctx.num_threads, false});
    }
    {
      ATTNKIT_STAGE("mlp.silu_mul");
      ops::silu_mul(View2<float>(gu, {T, 2 * I_}), View2<float>(act, {T, I_}), ctx.num_threads);
    }
    ATTNKIT_STAGE("mlp.down");
    down_.forward(View2<float>(act, {T, I_}), out, {ctx.precision, ctx.num_threads, false});
  }
  std::size_t weight_bytes() const { return gate_up_.bytes() + down_.bytes(); }

 private:
  std::int64_t I_ = 0;
  PackedLinear gate_up_, down_;
};

struct DecoderLayer {
  std::unique_ptr<TokenMixer> mixer;
  SwiGLU mlp;
  std::vector<float> input_norm, post_norm;
  std::vector<float> mixer_out_norm, mlp_out_norm;  // BlockShape's optional output norms (empty: none)
};

// The mixers plain Qwen3 registers (full and sliding attention).
inline MixerRegistry default_mixers() {
  MixerRegistry r;
  register_qwen3_attention(r);
  return r;
}

class Session;
class BatchSession;
struct BatchOptions;
struct SequenceTokens;

// Which rows of logits a forward step computes.
enum class LogitsRows { all, last, none };

struct ForwardOptions {
  LogitsRows logits = LogitsRows::all;
  Precision precision = Precision::exact;
  int num_threads = 0;
  // Called with (index, hidden [T, D]) for the embeddings (0), after each layer (1..L), and
  // after the final norm (L+1) — the layout of Hugging Face's output_hidden_states — of the
  // last pass over the layers.
  std::function<void(int, ConstView2<float>)> on_hidden;
  // Called for every pass of a looped stack with (pass, index, hidden [T, D]): index 0 is the
  // pass's input, 1..L the output of each layer.
  std::function<void(int, int, ConstView2<float>)> on_pass_hidden;
  // Mechanisms record their internals here (gates, routing weights, ...); null: not recorded.
  // A looped stack also records, per step: "exit_gate" [steps, T] (λ, with an exit gate),
  // "exit_probability" [steps, T] (p), and for the rows whose logits are computed (all rows with
  // LogitsRows::all, else the last; others NaN) "logits_per_step" [steps, T, V] and
  // "step_entropy" [steps, T] (of the next-token softmax).
  Trace* trace = nullptr;
  // Which step's output a looped stack returns (unset: the stack's default, e.g. Ouro's
  // early_exit_threshold); every step runs regardless.
  std::optional<ExitRule> exit;
};

// Limits a session enforces (beside SessionOptions, which shapes the states). The memory check
// runs before anything is allocated: Qwen3Model::new_session (the reserved tokens) and forward
// (the states at the step's end plus the step's buffers) estimate the bytes from the model's
// shape and refuse with an attnkit::Error naming the sizes; every cache also checks its own
// allocation against the same limit.
struct SessionLimits {
  // The most bytes the session's states plus one step's buffers may take; 0: the memory the
  // system reports available (MemAvailable) at each check.
  std::uint64_t max_memory_bytes = 0;
  // Positions beyond the config's max_position_embeddings are refused unless this is set (RoPE
  // beyond the trained range: the model runs, its output is not what it was trained for).
  bool allow_beyond_max_positions = false;
};

// Bytes a session needs for a number of positions (estimated from the model's shape: KV rows of
// every attention-type layer and pass, sliding layers capped at their window; fixed-size
// recurrent states are checked when they are created) and one forward step's working buffers.
struct MemoryEstimate {
  std::uint64_t states = 0, step = 0;
  std::uint64_t total() const { return add_bytes(states, step); }
};

// What to do with checkpoint tensors or config fields that no part of the model consumed.
enum class Unused { error, warn };

struct LoadOptions {
  const Registry* registry = nullptr;  // null: default_registry()
  Unused unused = Unused::error;
  // With Unused::warn, where the warnings go (null: standard error).
  std::function<void(const std::string&)> on_warning;
  // How the linear layers (projections, MLPs, embeddings and head) are packed: unset keeps the
  // checkpoint's type; WeightType::q8 quantises them at load (8-bit weights, groups of 32).
  std::optional<WeightType> weights;
};

class Qwen3Model {
 public:
  // Builds from any tensor source with the given mixers (per config layer_types), residual and
  // stack policies, bypassing recipes. The source must outlive the model only while building
  // (weights are packed).
  static Qwen3Model build(const io::Qwen3Config& config, const TensorSource& source,
                          const MixerRegistry& mixers = default_mixers(),
                          std::shared_ptr<const ResidualPolicy> residual = std::make_shared<SumResidual>(),
                          std::shared_ptr<const StackPolicy> stack = std::make_shared<SinglePass>()) {
    config.validate();
    io::ConfigFields fields(config);
    Qwen3Model m;
    m.init(config, source, fields, 0.f);
    ATTNKIT_REQUIRE(residual && stack && stack->passes() >= 1,
                    "Qwen3Model::build: the residual and stack policies must be set, with at least one pass");
    m.residual_ = std::move(residual);
    m.stack_ = std::move(stack);
    BuildContext ctx{m.config_, source, m.rope_, fields, m.stack_->passes(), m.stack_->pass_windows()};
    std::vector<std::string> types;
    for (auto& t : config.layer_types) types.push_back(t.name);
    m.assemble(ctx, mixers, types, BlockShape{});
    m.recipe_ = "custom";
    return m;
  }

  // Builds through the recipe that accepts `config` (see recipe.hpp), then checks that every
  // tensor of the source and every field of the config was consumed (opt.unused).
  static Qwen3Model compose(const io::Qwen3Config& config, const TensorSource& source, const LoadOptions& opt = {});

  // Loads a Hugging Face checkpoint directory (config.json + safetensors) through the recipes.
  static Qwen3Model load(const std::filesystem::path& dir, const LoadOptions& opt = {});

  // Deterministic random weights for any config a recipe accepts (benchmarks, the built-in model).
  // q8: random bf16 weights quantised at load, as a bf16 checkpoint loaded with weights = q8.
  static Qwen3Model random(const io::Qwen3Config& config, WeightType type, std::uint64_t seed = 0,
                           const Registry* registry = nullptr) {
    RandomSource src(type == WeightType::q8 ? WeightType::bf16 : type, seed);
    LoadOptions opt;
    opt.registry = registry;
    if (type == WeightType::q8) opt.weights = type;
    return compose(config, src, opt);
  }

  const io::Qwen3Config& config() const { return config_; }
  const std::string& source() const { return source_; }
  WeightType weight_type() const { return weight_type_; }
  int num_layers() const { return static_cast<int>(layers_.size()); }
  int passes() const { return stack_->passes(); }
  const std::string& recipe() const { return recipe_; }
  const ResidualPolicy& residual_policy() const { return *residual_; }
  const StackPolicy& stack_policy() const { return *stack_; }
  const TokenMixer& mixer(int layer) const { return *layers_.at(static_cast<std::size_t>(layer)).mixer; }
  // Bytes of packed weights held in memory.
  std::size_t weight_bytes() const { return lm_head_.bytes() + layer_bytes() + (tied_ ? 0 : embed_.bytes()); }
  // Bytes of weights one decode step reads (every layer and the head; one embedding row aside).
  // (A stack of several passes reads the layers once per pass.)
  std::size_t streamed_bytes_per_token() const {
    return lm_head_.bytes() + static_cast<std::size_t>(passes()) * layer_bytes();
  }
  // Bytes of the layers' weights (mixers and MLPs): what each pass over the stack reads.
  std::size_t layer_bytes() const {
    std::size_t b = 0;
    for (auto& l : layers_) b += l.mixer->weight_bytes() + l.mlp.weight_bytes();
    return b;
  }

  // Throws attnkit::Error when the states for opt.reserve_tokens do not fit limits.max_memory_bytes
  // (or the available memory).
  inline Session new_session(const SessionOptions& opt = {}, const SessionLimits& limits = {}) const;

  // The bytes a session of these options holds after `positions` tokens, and a forward step of
  // `step_tokens` tokens needs beside it.
  MemoryEstimate estimate_memory(std::int64_t positions, std::int64_t step_tokens, const SessionOptions& opt = {}) const {
    const auto& c = config_;
    MemoryEstimate e;
    for (int l = 0; l < num_layers(); ++l) e.states = add_bytes(e.states, layer_state_bytes(l, positions, opt));
    const std::int64_t width = 3 * c.hidden_size + 3 * c.intermediate_size +
                               (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    e.step = mul_bytes(step_tokens, width, sizeof(float));
    return e;
  }

  // Bytes of layer l's state after `positions` tokens (estimated; see estimate_memory).
  std::uint64_t layer_state_bytes(int l, std::int64_t positions, const SessionOptions& opt = {}) const {
    const auto& c = config_;
    const std::uint64_t per_row = kv_token_bytes(opt.kv_type, c.num_key_value_heads, c.head_dim);
    const std::string k = layers_.at(static_cast<std::size_t>(l)).mixer->kind();
    if (k == "linear_attention") return 0;  // fixed-size state
    std::int64_t rows = positions;
    if (k == "sliding_attention" && c.sliding_window) rows = std::min(rows, *c.sliding_window);
    return mul_bytes(passes(), rows, per_row);
  }

  // Refuses (attnkit::Error naming the sizes) a session that would hold `positions` tokens and
  // run a step of `step_tokens`, plus `extra_bytes` the caller allocates for it (ids, logits),
  // when that exceeds limits.max_memory_bytes or, without a limit, the available memory;
  // `held_positions`: tokens the session's states already hold (only the growth needs memory).
  void require_memory_for(std::int64_t positions, std::int64_t step_tokens, const SessionOptions& opt,
                          const SessionLimits& limits, const std::string& who, std::uint64_t extra_bytes = 0,
                          std::int64_t held_positions = 0) const {
    const MemoryEstimate e = estimate_memory(positions, step_tokens, opt);
    const std::uint64_t held = estimate_memory(held_positions, 0, opt).states;
    const std::uint64_t need = add_bytes(e.total(), extra_bytes);
    const std::string sizes = "states for " + std::to_string(positions) + " positions " + mib_string(e.states) +
                              ", buffers of a " + std::to_string(step_tokens) + "-token step " + mib_string(e.step) +
                              (extra_bytes ? ", inputs and outputs " + mib_string(extra_bytes) : "");
    require_bytes(need, held, sizes, limits, who);
  }
  // Refuses `need` bytes (described by `sizes`) beyond limits.max_memory_bytes or, without a
  // limit, the growth beyond the `held` bytes when it exceeds the available memory.
  static void require_bytes(std::uint64_t need, std::uint64_t held, const std::string& sizes, const SessionLimits& limits,
                            const std::string& who) {
    if (limits.max_memory_bytes) {
      ATTNKIT_REQUIRE(need <= limits.max_memory_bytes, who, ": needs about ", mib_string(need), " (", sizes,
                      ") but the memory limit is ", mib_string(limits.max_memory_bytes),
                      " (SessionLimits::max_memory_bytes)");
      return;
    }
    const std::uint64_t grow = need - std::min(need, held);
    if (grow < (std::uint64_t{64} << 20)) return;  // not worth reading /proc/meminfo
    const std::uint64_t avail = available_memory_bytes();
    ATTNKIT_REQUIRE(avail == 0 || grow <= avail, who, ": needs about ", mib_string(grow), " more (", sizes,
                    ") but only ", mib_string(avail),
                    " of memory are available (SessionLimits::max_memory_bytes sets a limit instead)");
  }
  // Refuses positions beyond max_position_embeddings unless limits allow them.
  void require_positions(std::int64_t end, const SessionLimits& limits, const std::string& who) const {
    const std::int64_t max_pos = config_.max_position_embeddings;
    ATTNKIT_REQUIRE(limits.allow_beyond_max_positions || max_pos <= 0 || end <= max_pos, who, ": ", end,
                    " positions exceed the model's max_position_embeddings ", max_pos,
                    " (set SessionLimits::allow_beyond_max_positions to run beyond the trained range)");
  }

  // Runs ids at the session's position; writes logits [T, V] (LogitsRows::all) or [1, V]
  // (last) into `logits`, which must have that shape (or be empty for LogitsRows::none).
  inline void forward(Session& s, std::span<const std::int64_t> ids, View2<float> logits,
                      const ForwardOptions& opt = {}) const;

  // Batch sessions (model/batch_session.hpp): many sequences at once over a paged KV cache.
  // forward_batch runs each entry's ids at its sequence's position, all entries packed in one
  // step; logits get [Σ ids, V] (LogitsRows::all), [entries, V] (last: each entry's last token)
  // or nothing (none).
  inline BatchSession new_batch_session(const SessionOptions& opt, const BatchOptions& batch,
                                        const SessionLimits& limits = {}) const;
  inline void forward_batch(BatchSession& s, std::span<const SequenceTokens> step, View2<float> logits,
                            const ForwardOptions& opt = {}) const;

  // Embedding row of token `id` as float.
  void embed(std::int64_t id, float* dst) const {
    ATTNKIT_REQUIRE(id >= 0 && id < config_.vocab_size, "Qwen3Model: token id ", id, " outside the vocabulary [0, ",
                    config_.vocab_size, ")");
    (tied_ ? lm_head_ : embed_).row(id, dst);
  }

 private:
  // Shared state every build path sets first: config, RoPE table, embeddings and head.
  void init(const io::Qwen3Config& config, const TensorSource& source, io::ConfigFields&, float norm_weight_offset) {
    config_ = config;
    source_ = source.describe();
    rope_ = std::make_shared<const ops::Rope>(config.rotary_dim(), config.rope_theta);
    const std::int64_t D = config.hidden_size, V = config.vocab_size;
    final_norm_ = source.norm_weight("model.norm.weight", D, norm_weight_offset);
    HostTensor embed = source.get("model.embed_tokens.weight", {V, D});
    weight_type_ = embed.type;
    if (config.tie_word_embeddings) {
      // Tied (as transformers does, a stored lm_head.weight is ignored): one packed matrix
      // serves as the head, and embedding lookups read rows back from it.
      lm_head_ = pack_linear(embed);
      tied_ = true;
      source.ignore("lm_head.weight");
    } else {
      lm_head_ = pack_linear(source.get("lm_head.weight", {V, D}));
      embed_ = pack_linear(embed);
    }
  }
  // The layers: mixer `types[l]` from `mixers`, SwiGLU, pre-norms and the block's output norms.
  void assemble(const BuildContext& ctx, const MixerRegistry& mixers, const std::vector<std::string>& types,
                const BlockShape& block) {
    const auto& c = ctx.config;
    const std::int64_t D = c.hidden_size;
    ATTNKIT_REQUIRE(static_cast<std::int64_t>(types.size()) == c.num_hidden_layers, "Qwen3Model: the plan names ",
                    types.size(), " mixers for ", c.num_hidden_layers, " layers");
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      DecoderLayer layer;
      layer.mixer = mixers.build(types[static_cast<std::size_t>(l)], ctx, l);
      layer.mlp = SwiGLU(ctx, l);
      layer.input_norm = ctx.norm_weight(ctx.prefix(l) + "input_layernorm.weight", D);
      layer.post_norm = ctx.norm_weight(ctx.prefix(l) + "post_attention_layernorm.weight", D);
      if (!block.mixer_output_norm.empty())
        layer.mixer_out_norm = ctx.norm_weight(ctx.prefix(l) + block.mixer_output_norm + ".weight", D);
      if (!block.mlp_output_norm.empty())
        layer.mlp_out_norm = ctx.norm_weight(ctx.prefix(l) + block.mlp_output_norm + ".weight", D);
      layers_.push_back(std::move(layer));
    }
  }

  io::Qwen3Config config_;
  std::string source_, recipe_;
  WeightType weight_type_ = WeightType::f32;
  std::vector<DecoderLayer> layers_;
  std::vector<float> final_norm_;
  PackedLinear embed_, lm_head_;
  bool tied_ = false;
  std::shared_ptr<const ResidualPolicy> residual_;
  std::shared_ptr<const StackPolicy> stack_;
  std::shared_ptr<const ops::Rope> rope_;
  class Readout;
  inline ExitRule exit_rule(const char* fn, const ForwardOptions& opt) const;
  template <class MixerCall>
  void run_stack(const char* fn, std::span<const std::int64_t> ids, std::vector<std::int64_t> row_tokens,
                 View2<float> logits, StepContext ctx, const ForwardOptions& opt, MixerCall&& mixer) const;
};

// A session belongs to one thread at a time; several sessions of one model may run on different
// threads at once (the model is read-only after it is built; see the README's thread-safety
// contract). If forward() throws after it started changing the states (a worker's exception, an
// allocation the limits refuse), the session is left broken: every later forward() throws until
// set_position() rewinds it to a consistent state or it is replaced.
class Session {
 public:
  std::int64_t position() const { return position_; }
  const SessionOptions& options() const { return opt_; }
  const SessionLimits& limits() const { return limits_; }
  SessionLimits& limits() { return limits_; }
  bool broken() const { return broken_; }

  // Direct access for code that prepares or rewinds a session's states itself (benchmarks that
  // fill a long context with random K/V rows, then cut the caches back after each timed step;
  // see Qwen3Attention::cache()). After changing the states, set_position() must say how many
  // positions they hold: the next forward() starts there, and each cache checks that it agrees.
  int num_states() const { return static_cast<int>(states_.size()); }
  MixerState& state(int layer) { return *states_.at(static_cast<std::size_t>(layer)); }
  void set_position(std::int64_t position) {
    ATTNKIT_REQUIRE(position >= 0, "Session::set_position: argument 'position': must be >= 0, got ", position);
    position_ = position;
    broken_ = false;
  }

 private:
  friend class Qwen3Model;
  SessionOptions opt_;
  SessionLimits limits_;
  bool broken_ = false;
  std::vector<std::unique_ptr<MixerState>> states_;
  std::int64_t position_ = 0;
};

inline Session Qwen3Model::new_session(const SessionOptions& opt, const SessionLimits& limits) const {
  ATTNKIT_REQUIRE(opt.reserve_tokens >= 0, "Qwen3Model::new_session: reserve_tokens must be >= 0, got ", opt.reserve_tokens);
  require_memory_for(opt.reserve_tokens, 0, opt, limits, "Qwen3Model::new_session: " + std::to_string(opt.reserve_tokens) + " reserved tokens");
  const MemoryLimitScope scope(limits.max_memory_bytes);
  Session s;
  s.opt_ = opt;
  s.limits_ = limits;
  for (auto& l : layers_) s.states_.push_back(l.mixer->new_state(opt));
  return s;
}

// Reads out one pass of the stack (the final norm of its output, the exit gate, the head's logits
// for the requested rows) and applies the exit rule; the last pass's read-out is the ordinary
// output of the model.
class Qwen3Model::Readout {
 public:
  // row_tokens: the token (row of hidden) of each logits row, ascending; a single sequence's
  // rows are all its tokens or its last one.
  Readout(const Qwen3Model& m, const ForwardOptions& opt, ExitRule rule, std::int64_t pos0, std::int64_t T,
          std::vector<std::int64_t> row_tokens, View2<float> logits, View2<float> hidden)
      : m_(m), opt_(opt), rule_(rule), pos0_(pos0), T_(T), rows_(static_cast<std::int64_t>(row_tokens.size())),
        row_tokens_(std::move(row_tokens)), logits_(logits), h_(hidden),
        gate_(m.stack_->has_exit_gate()), lambda_(static_cast<std::size_t>(T)), survive_(static_cast<std::size_t>(T), 1.f),
        cum_(static_cast<std::size_t>(T), 0.f), p_(static_cast<std::size_t>(T)), chosen_(static_cast<std::size_t>(rows_), 0) {}

  void step(int pass, ConstView2<float> out) {
    ATTNKIT_STAGE("readout");
    const int passes = m_.stack_->passes();
    const bool last = pass + 1 == passes;
    ops::rms_norm(out, m_.final_norm_.data(), static_cast<float>(m_.config_.rms_norm_eps), h_, opt_.num_threads);
    if (gate_) {
      m_.stack_->exit_gate(h_, lambda_.data());
      for (std::int64_t t = 0; t < T_; ++t) {
        const auto i = static_cast<std::size_t>(t);
        p_[i] = last ? survive_[i] : lambda_[i] * survive_[i];
        survive_[i] *= 1.f - lambda_[i];
        cum_[i] += p_[i];
      }
      if (opt_.trace) {
        opt_.trace->describe("exit_gate", {"step", "token"});
        opt_.trace->describe("exit_probability", {"step", "token"});
        opt_.trace->record_values("exit_gate", pass, pos0_, ConstView2<float>(lambda_.data(), {T_, 1}));
        opt_.trace->record_values("exit_probability", pass, pos0_, ConstView2<float>(p_.data(), {T_, 1}));
      }
    }
    if (rows_ == 0) return;
    using K = ExitRule::Kind;
    const bool mine = (rule_.kind == K::last && last) || (rule_.kind == K::step && rule_.step == pass);
    if (!(mine || rule_.kind == K::expected || rule_.kind == K::threshold || (opt_.trace && passes > 1))) return;
    const std::int64_t V = m_.config_.vocab_size;
    const std::int64_t D = m_.config_.hidden_size;
    ConstView2<float> head_in = h_;
    if (rows_ == 1) {
      head_in = h_.slice(0, row_tokens_[0], row_tokens_[0] + 1);
    } else if (rows_ < T_) {  // a batch step's last row of each sequence
      gathered_.resize(static_cast<std::size_t>(rows_ * D));
      for (std::int64_t r = 0; r < rows_; ++r) std::copy(h_.ptr(row_tokens_[r]), h_.ptr(row_tokens_[r]) + D, gathered_.data() + r * D);
      head_in = ConstView2<float>(gathered_.data(), {rows_, D});
    }
    View2<float> dst = logits_;
    if (!mine) {
      step_logits_.resize(static_cast<std::size_t>(rows_ * V));
      dst = View2<float>(step_logits_.data(), {rows_, V});
    }
    m_.lm_head_.forward(head_in, dst, {opt_.precision, opt_.num_threads, false});
    if (opt_.trace && passes > 1) {
      opt_.trace->describe("logits_per_step", {"step", "token", "vocab"});
      opt_.trace->describe("step_entropy", {"step", "token"});
      std::vector<float> ent(static_cast<std::size_t>(rows_));
      for (std::int64_t r = 0; r < rows_; ++r) ent[static_cast<std::size_t>(r)] = entropy(dst.ptr(r), V);
      // Runs of consecutive tokens: a session's rows are one run, a batch step's last rows one
      // per sequence.
      for (std::int64_t r0 = 0, r1 = 0; r0 < rows_; r0 = r1) {
        for (r1 = r0 + 1; r1 < rows_ && row_tokens_[r1] == row_tokens_[r1 - 1] + 1; ++r1) {
        }
        opt_.trace->record("logits_per_step", pass, pos0_ + row_tokens_[r0], ConstView2<float>(dst).slice(0, r0, r1));
        opt_.trace->record_values("step_entropy", pass, pos0_ + row_tokens_[r0], ConstView2<float>(ent.data() + r0, {r1 - r0, 1}));
      }
    }
    if (mine) return;
    for (std::int64_t r = 0; r < rows_; ++r) {
      const auto tok = static_cast<std::size_t>(row_tokens_[r]);
      float* o = logits_.ptr(r);
      const float* l = dst.ptr(r);
      if (rule_.kind == K::expected) {
        for (std::int64_t v = 0; v < V; ++v) o[v] = pass == 0 ? p_[tok] * l[v] : o[v] + p_[tok] * l[v];
      } else if (rule_.kind == K::threshold && !chosen_[static_cast<std::size_t>(r)] &&
                 (last || static_cast<double>(cum_[tok]) >= rule_.threshold)) {
        std::copy(l, l + V, o);
        chosen_[static_cast<std::size_t>(r)] = 1;
      }
    }
  }

 private:
  static float entropy(const float* l, std::int64_t V) {
    double m = l[0];
    for (std::int64_t v = 1; v < V; ++v) m = std::max(m, static_cast<double>(l[v]));
    double z = 0, zl = 0;
    for (std::int64_t v = 0; v < V; ++v) {
      const double e = std::exp(l[v] - m);
      z += e;
      zl += e * (l[v] - m);
    }
    return static_cast<float>(std::log(z) - zl / z);
  }
  const Qwen3Model& m_;
  const ForwardOptions& opt_;
  ExitRule rule_;
  std::int64_t pos0_, T_, rows_;
  std::vector<std::int64_t> row_tokens_;
  std::vector<float> gathered_;
  View2<float> logits_, h_;
  bool gate_;
  std::vector<float> lambda_, survive_, cum_, p_, step_logits_;
  std::vector<char> chosen_;
};

// The exit rule of a step (the options' or the stack's default), checked against the stack.
inline ExitRule Qwen3Model::exit_rule(const char* fn, const ForwardOptions& opt) const {
  const int passes = stack_->passes();
  const ExitRule rule = opt.exit ? *opt.exit : stack_->default_exit();
  using K = ExitRule::Kind;
  ATTNKIT_REQUIRE(rule.kind != K::step || (rule.step >= 0 && rule.step < passes), fn, ": exit rule: step ",
                  rule.step, " outside the stack's ", passes, " steps");
  ATTNKIT_REQUIRE(rule.kind != K::threshold || (rule.threshold > 0.0 && rule.threshold <= 1.0),
                  fn, ": exit rule: threshold must be in (0, 1], got ", rule.threshold);
  ATTNKIT_REQUIRE((rule.kind != K::threshold && rule.kind != K::expected) || stack_->has_exit_gate(),
                  fn, ": exit rule: a threshold or expected output needs an exit gate, and stack policy '",
                  stack_->kind(), "' has none");
  return rule;
}

// The layer stack over the embedded ids: every pass, every layer, the read-out of the rows
// row_tokens into logits. mixer(l, xn, y, ctx) runs layer l's token mixer (a session's states,
// or a batch step's).
template <class MixerCall>
void Qwen3Model::run_stack(const char* fn, std::span<const std::int64_t> ids, std::vector<std::int64_t> row_tokens,
                           View2<float> logits, StepContext ctx, const ForwardOptions& opt, MixerCall&& mixer) const {
  const std::int64_t T = static_cast<std::int64_t>(ids.size()), D = config_.hidden_size;
  std::vector<float> x, xn, y;
  {
    ATTNKIT_STAGE("embed");
    x.resize(static_cast<std::size_t>(T * D));
    xn.resize(x.size());
    y.resize(x.size());
    for (std::int64_t t = 0; t < T; ++t) embed(ids[t], x.data() + t * D);
  }
  View2<float> xv(x.data(), {T, D}), xnv(xn.data(), {T, D}), yv(y.data(), {T, D});
  if (opt.on_hidden) opt.on_hidden(0, xv);

  const float eps = static_cast<float>(config_.rms_norm_eps);
  const int passes = stack_->passes();
  const ExitRule rule = exit_rule(fn, opt);
  using K = ExitRule::Kind;
  const bool per_step = passes > 1 && (opt.trace || rule.kind != K::last);
  Readout readout(*this, opt, rule, ctx.pos0, T, std::move(row_tokens), logits, xnv);
  Workspace workspace;  // the layers' scratch buffers, reused by each
  ctx.workspace = &workspace;
  std::unique_ptr<ResidualStream> stream;
  for (int pass = 0; pass < passes; ++pass) {  // x holds this pass's input
    ctx.pass = pass;
    stream = residual_->begin(xv, ctx);
    const bool report = opt.on_hidden && pass + 1 == passes;  // hidden states of the last pass
    if (opt.on_pass_hidden) opt.on_pass_hidden(pass, 0, xv);
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const DecoderLayer& layer = layers_[l];
      const int li = static_cast<int>(l);
      {
        ATTNKIT_STAGE("layer.norm");
        ops::rms_norm(stream->input(li, Sublayer::mixer), layer.input_norm.data(), eps, xnv, opt.num_threads);
      }
      {
        ATTNKIT_STAGE("mixer");
        mixer(l, xnv, yv, ctx);
      }
      if (!layer.mixer_out_norm.empty()) {
        ATTNKIT_STAGE("layer.norm");
        ops::rms_norm(yv, layer.mixer_out_norm.data(), eps, yv, opt.num_threads);
      }
      {
        ATTNKIT_STAGE("layer.residual");
        stream->add_output(li, Sublayer::mixer, yv);
      }
      {
        ATTNKIT_STAGE("layer.norm");
        ops::rms_norm(stream->input(li, Sublayer::mlp), layer.post_norm.data(), eps, xnv, opt.num_threads);
      }
      {
        ATTNKIT_STAGE("mlp");
        layer.mlp.forward(xnv, yv, ctx);
      }
      if (!layer.mlp_out_norm.empty()) {
        ATTNKIT_STAGE("layer.norm");
        ops::rms_norm(yv, layer.mlp_out_norm.data(), eps, yv, opt.num_threads);
      }
      {
        ATTNKIT_STAGE("layer.residual");
        stream->add_output(li, Sublayer::mlp, yv);
      }
      if (report && l + 1 < layers_.size()) opt.on_hidden(li + 1, stream->output());
      if (opt.on_pass_hidden) opt.on_pass_hidden(pass, li + 1, stream->output());
    }
    const bool last = pass + 1 == passes;
    if (last || per_step) readout.step(pass, stream->output());
    if (!last) {
      const ConstView2<float> o = stream->output();
      for (std::int64_t t = 0; t < T; ++t) std::copy(o.ptr(t), o.ptr(t) + D, x.data() + t * D);
      stack_->between_passes(pass, xv);
    }
  }
  if (opt.on_hidden) opt.on_hidden(static_cast<int>(layers_.size()), xnv);
}

inline void Qwen3Model::forward(Session& s, std::span<const std::int64_t> ids, View2<float> logits,
                                const ForwardOptions& opt) const {
  ATTNKIT_STAGE("forward");
  const std::int64_t T = static_cast<std::int64_t>(ids.size());
  const std::int64_t V = config_.vocab_size;
  ATTNKIT_REQUIRE(T > 0, "Qwen3Model::forward: argument 'ids': empty");
  ATTNKIT_REQUIRE(s.states_.size() == layers_.size(), "Qwen3Model::forward: argument 'session': made by another model");
  const std::int64_t rows = opt.logits == LogitsRows::all ? T : opt.logits == LogitsRows::last ? 1 : 0;
  if (rows > 0) {
    ATTNKIT_REQUIRE(logits.shape[0] == rows && logits.shape[1] == V, "Qwen3Model::forward: argument 'logits': shape ",
                    detail::shape_string(logits), ", expected [", rows, ", ", V, "]");
    check_view(logits, "Qwen3Model::forward", "logits");
  }
  for (std::int64_t t = 0; t < T; ++t)
    ATTNKIT_REQUIRE(ids[t] >= 0 && ids[t] < V, "Qwen3Model::forward: argument 'ids': token id ", ids[t], " at index ", t,
                    " outside the vocabulary [0, ", V, ")");
  ATTNKIT_REQUIRE(!s.broken_, "Qwen3Model::forward: the session is broken by an earlier failed step (its states may "
                  "hold part of that step); rewind it with set_position() or start a new session");
  const std::string who = "Qwen3Model::forward: " + std::to_string(T) + " tokens at position " + std::to_string(s.position_);
  require_positions(s.position_ + T, s.limits_, who);
  require_memory_for(s.position_ + T, T, s.opt_, s.limits_, who, 0, s.position_);
  exit_rule("Qwen3Model::forward", opt);
  const MemoryLimitScope scope(s.limits_.max_memory_bytes);
  s.broken_ = true;  // until the step completes

  std::vector<std::int64_t> row_tokens(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) row_tokens[static_cast<std::size_t>(r)] = T - rows + r;
  const ops::Rope::Angles angles = rope_->angles(s.position_, T);
  StepContext ctx{s.position_, opt.num_threads, opt.precision, &angles, 0, opt.trace};
  run_stack("Qwen3Model::forward", ids, std::move(row_tokens), logits, ctx, opt,
            [&](std::size_t l, ConstView2<float> xn, View2<float> y, const StepContext& c) {
              layers_[l].mixer->forward(xn, y, *s.states_[l], c);
            });
  s.position_ += T;
  s.broken_ = false;
}

inline Qwen3Model Qwen3Model::compose(const io::Qwen3Config& config, const TensorSource& stored,
                                      const LoadOptions& opt) {
  const PackAsSource packed_as(stored, opt.weights.value_or(WeightType::f32));
  const TensorSource& source = opt.weights ? static_cast<const TensorSource&>(packed_as) : stored;
  const Registry fallback = opt.registry ? Registry{} : default_registry();
  const Registry& reg = opt.registry ? *opt.registry : fallback;
  config.validate(config.source);
  io::ConfigFields fields(config);
  const Recipe& recipe = reg.recipe_for(config);
  Plan plan = recipe.plan(fields);
  if (fields.has("loop_count")) {  // any recipe's stack looped (stacks/looped.hpp)
    if (plan.stack != "single")
      fields.fail("loop_count", "recipe '", recipe.name, "' already runs stack policy '", plan.stack, "'");
    plan.stack = "looped";
  }
  if (plan.mixers.empty())
    for (auto& t : config.layer_types) plan.mixers.push_back(t.name);
  Qwen3Model m;
  m.init(config, source, fields, plan.norm_weight_offset);
  if (opt.weights) m.weight_type_ = *opt.weights;
  m.recipe_ = recipe.name;
  BuildContext ctx{m.config_, source, m.rope_, fields, 1, {}, plan.norm_weight_offset};
  m.stack_ = reg.stack(plan.stack, ctx);
  ATTNKIT_REQUIRE(m.stack_ && m.stack_->passes() >= 1, "Qwen3Model: stack policy '", plan.stack,
                  "' must make at least one pass");
  ctx.passes = m.stack_->passes();
  ctx.pass_windows = m.stack_->pass_windows();
  ATTNKIT_REQUIRE(ctx.pass_windows.empty() || static_cast<int>(ctx.pass_windows.size()) == ctx.passes, "Qwen3Model: stack policy '",
                  plan.stack, "' gives ", ctx.pass_windows.size(), " windows for ", ctx.passes, " passes");
  m.residual_ = reg.residual(plan.residual, ctx);
  m.assemble(ctx, reg.mixers, plan.mixers, plan.block);

  // Nothing of the checkpoint may be dropped in silence.
  std::string problems;
  const auto fields_left = fields.unconsumed();
  if (!fields_left.empty()) {
    problems += config.source + ": config fields that recipe '" + recipe.name + "' does not use:";
    for (auto& f : fields_left) problems += " " + f;
    problems += " (they select a mechanism or setting attnkit does not implement for this model)";
  }
  const auto tensors_left = source.unconsumed();
  if (!tensors_left.empty()) {
    if (!problems.empty()) problems += "; ";
    problems += source.describe() + ": " + std::to_string(tensors_left.size()) + " tensors that recipe '" + recipe.name +
                "' does not use:";
    std::size_t shown = 0;
    for (auto& t : tensors_left) {
      if (++shown > 16) {
        problems += " ... (" + std::to_string(tensors_left.size() - 16) + " more)";
        break;
      }
      problems += " " + t;
    }
  }
  if (!problems.empty()) {
    if (opt.unused == Unused::error)
      detail::throw_error("Qwen3Model: ", problems, " — pass LoadOptions::unused = Unused::warn to load anyway");
    const std::string msg = "attnkit: warning: " + problems;
    if (opt.on_warning) opt.on_warning(msg);
    else std::fprintf(stderr, "%s\n", msg.c_str());
  }
  return m;
}

inline Qwen3Model Qwen3Model::load(const std::filesystem::path& dir, const LoadOptions& opt) {
  if (!opt.registry) {  // the default registry, built once for parsing and composing
    const Registry reg = default_registry();
    LoadOptions o = opt;
    o.registry = &reg;
    return load(dir, o);
  }
  const io::Qwen3Config config = opt.registry->load_config(dir);
  CheckpointSource src(dir);
  return compose(config, src, opt);
}

// Greedy continuation from a session whose last step left `logits` [V] (the last row): each
// new id is the argmax of the previous logits and is decoded through the caches, except the
// last (its logits are not needed). Returns the n generated ids; `logits` is updated in place.
inline std::vector<std::int64_t> continue_greedy(const Qwen3Model& m, Session& s, std::span<float> logits,
                                                 std::int64_t n, const ForwardOptions& base = {}) {
  const std::int64_t V = m.config().vocab_size;
  ATTNKIT_REQUIRE(static_cast<std::int64_t>(logits.size()) == V, "continue_greedy: argument 'logits': size ",
                  logits.size(), " != vocab_size ", V);
  ForwardOptions opt = base;
  opt.logits = LogitsRows::last;
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < n; ++i) {
    out.push_back(ops::argmax(logits.data(), V));
    if (i + 1 < n) m.forward(s, std::span<const std::int64_t>(&out.back(), 1), View2<float>(logits.data(), {1, V}), opt);
  }
  return out;
}

// Greedy continuation: prefills `prompt` (in one step) then generates n ids (continue_greedy).
inline std::vector<std::int64_t> generate_greedy(const Qwen3Model& m, Session& s, std::span<const std::int64_t> prompt,
                                                 std::int64_t n, const ForwardOptions& base = {}) {
  if (n <= 0) return {};
  const std::int64_t V = m.config().vocab_size;
  std::vector<float> logits(static_cast<std::size_t>(V));
  ForwardOptions opt = base;
  opt.logits = LogitsRows::last;
  m.forward(s, prompt, View2<float>(logits.data(), {1, V}), opt);
  return continue_greedy(m, s, logits, n, opt);
}

}  // namespace attnkit::model

#include "attnkit/model/batch_session.hpp"  // BatchSession and forward_batch (needs Qwen3Model complete)
