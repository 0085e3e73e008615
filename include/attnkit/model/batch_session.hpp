// attnkit/model/batch_session.hpp — many sequences at once (continuous batching) over a paged
// KV cache.
//
// A BatchSession holds any number of sequences, each with its own position. One
// Qwen3Model::forward_batch() call runs the new tokens of any subset of them — a whole prompt,
// a chunk of one, or one decode token each, mixed freely — packed along the token axis, so the
// linear layers (projections, MLPs, the head) run once over all the step's tokens and read their
// weights once per step instead of once per sequence.
//
// K/V storage: the mixers that ask for it (TokenMixer::paged_layout: Qwen3 full attention, Tuneable
// attention's folded form, routed attention, Loop Attention, sparse attention; f32, bf16 or int8
// caches) keep their K/V in ONE page pool of the
// session (attention/paged_kv.hpp; pages of BatchOptions::page_size tokens; every such layer and
// pass owns a range of the pool's KV-head axis, so one page id holds the same positions in every
// layer), plus what else they keep per sequence (TokenMixer::new_paged_state: Loop Attention's
// stack-mode rings, sparse attention's index keys). Each sequence has a page table; the pool
// doubles when it runs out (BatchOptions::initial_pages first). Other mixers (sliding windows,
// Tuneable's unfolded form, Gated DeltaNet, ...) keep a state per sequence and run per sequence inside
// the step (TokenMixer::forward_batch's default): every model works in a batch session, and the
// MLPs and the head are still batched. Sliding windows stay per sequence on purpose: one page id
// holds a position in every layer, so a windowed layer in the pool could not drop the pages
// below its window (the paged kernels take a window and never read them; an engine with a pool
// per layer group can use that).
//
// Prefix sharing: fork(s) starts a new sequence holding everything s holds: its pages are
// shared (reference counts, no copy), per-sequence states are copied (MixerState::clone; mixers
// whose states cannot be copied refuse the fork by name). A page shared by several sequences is
// copied before a step writes into it (copy on write: only a partly filled last page can be), so
// a prompt prefilled once and forked B ways is stored once.
//
// Results equal running each sequence in its own Session (the same kernels over the same rows;
// the linear layers' blocking over more rows may round differently in the last bits).
//
// Failure: checks (unknown or repeated sequences, empty token lists, token ids, positions,
// memory) run before anything changes. If a step throws after it started (an exception inside a
// kernel, a refused allocation), the step's sequences are broken: forward_batch refuses them, and
// remove() is what remains to do with them; the other sequences are untouched.
//
// Traces: each entry of a step may name its own Trace (SequenceTokens::trace); what the
// mechanisms record for that sequence's tokens lands there at its positions, as a Session's
// forward would record it (model/trace.hpp routes the step's packed rows). ForwardOptions::trace
// is refused here: one trace cannot hold several sequences' positions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "attnkit/attention/paged_kv.hpp"
#include "attnkit/model/qwen3.hpp"

namespace attnkit::model {

struct BatchOptions {
  std::int64_t page_size = 16;      // tokens per page: a power of two
  std::int64_t initial_pages = 64;  // pool pages allocated with the session; the pool doubles as needed
};

// One sequence's new tokens in a batch step.
struct SequenceTokens {
  std::int64_t sequence = 0;
  std::span<const std::int64_t> ids;
  Trace* trace = nullptr;  // where this sequence's internals are recorded (null: not traced)
};

// See the top of the file. Belongs to one thread at a time, like Session; the model must outlive it.
class BatchSession {
 public:
  // A new, empty sequence; returns its id (ids are never reused).
  std::int64_t add() {
    const MemoryLimitScope scope(limits_.max_memory_bytes);
    Sequence s;
    for (int l = 0; l < static_cast<int>(head0_.size()); ++l)
      s.states.push_back(head0_[static_cast<std::size_t>(l)] >= 0 ? model_->mixer(l).new_paged_state(opt_)
                                                                  : model_->mixer(l).new_state(opt_));
    seqs_.emplace(next_id_, std::move(s));
    return next_id_++;
  }

  // A new sequence holding what `sequence` holds (shared pages, copied states); returns its id.
  std::int64_t fork(std::int64_t sequence) {
    const Sequence& from = at("BatchSession::fork", sequence);
    ATTNKIT_REQUIRE(!from.broken, "BatchSession::fork: sequence ", sequence, " is broken by a failed step");
    const MemoryLimitScope scope(limits_.max_memory_bytes);
    Sequence s;
    s.position = from.position;
    for (std::size_t l = 0; l < from.states.size(); ++l)
      s.states.push_back(from.states[l] ? from.states[l]->clone(model_->mixer(static_cast<int>(l)).kind()) : nullptr);
    for (auto p : from.pages) visit_pool([&](auto& pool) { pool.share(p); });
    s.pages = from.pages;
    seqs_.emplace(next_id_, std::move(s));
    return next_id_++;
  }

  // Drops a sequence (broken or not) and returns its pages to the pool.
  void remove(std::int64_t sequence) {
    Sequence& s = at("BatchSession::remove", sequence);
    for (auto p : s.pages) visit_pool([&](auto& pool) { pool.free(p); });
    seqs_.erase(sequence);
  }

  bool contains(std::int64_t sequence) const { return seqs_.count(sequence) != 0; }
  std::int64_t position(std::int64_t sequence) const { return at("BatchSession::position", sequence).position; }
  bool broken(std::int64_t sequence) const { return at("BatchSession::broken", sequence).broken; }
  std::vector<std::int64_t> sequences() const {
    std::vector<std::int64_t> ids;
    for (auto& [id, s] : seqs_) ids.push_back(id);
    return ids;
  }
  std::int64_t size() const { return static_cast<std::int64_t>(seqs_.size()); }
  std::int64_t page_size() const { return batch_.page_size; }
  // Pages of the pool in use (a page several sequences share counts once) and in all.
  std::int64_t pages_in_use() const {
    std::int64_t n = 0;
    visit_pool([&](const auto& pool) { n = pool.pages_in_use(); });
    return n;
  }
  std::int64_t pool_pages() const {
    std::int64_t n = 0;
    visit_pool([&](const auto& pool) { n = pool.num_pages(); });
    return n;
  }
  // The pages of a sequence's page table (for inspection; the session owns them).
  const std::vector<std::int32_t>& pages(std::int64_t sequence) const { return at("BatchSession::pages", sequence).pages; }
  // Layers whose K/V live in the page pool (the others keep a state per sequence).
  bool layer_paged(int layer) const { return head0_.at(static_cast<std::size_t>(layer)) >= 0; }

  const SessionOptions& options() const { return opt_; }
  const BatchOptions& batch_options() const { return batch_; }
  const SessionLimits& limits() const { return limits_; }
  SessionLimits& limits() { return limits_; }

 private:
  friend class Qwen3Model;
  struct Sequence {
    std::int64_t position = 0;
    bool broken = false;
    std::vector<std::int32_t> pages;
    std::vector<std::unique_ptr<MixerState>> states;  // per layer; where the layer is paged, its new_paged_state() (often null)
  };

  template <class F>
  void visit_pool(F&& f) {
    std::visit([&](auto& p) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(p)>, std::monostate>) f(p);
    }, pool_);
  }
  template <class F>
  void visit_pool(F&& f) const {
    std::visit([&](const auto& p) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(p)>, std::monostate>) f(p);
    }, pool_);
  }
  Sequence& at(const char* fn, std::int64_t id) {
    auto it = seqs_.find(id);
    ATTNKIT_REQUIRE(it != seqs_.end(), fn, ": argument 'sequence': no sequence ", id, " in this batch session");
    return it->second;
  }
  const Sequence& at(const char* fn, std::int64_t id) const { return const_cast<BatchSession*>(this)->at(fn, id); }
  // Bytes of one page in the pool (all its layers' K and V).
  std::uint64_t page_bytes() const {
    const std::int64_t P = batch_.page_size, d = head_dim_;
    switch (opt_.kv_type) {
      case CacheType::bf16: return PagePool<bf16>::page_bytes(P, pool_heads_, d, d);
      case CacheType::int8: return PagePool<std::int8_t>::page_bytes(P, pool_heads_, d, d);
      default: return PagePool<float>::page_bytes(P, pool_heads_, d, d);
    }
  }

  const Qwen3Model* model_ = nullptr;
  SessionOptions opt_;
  SessionLimits limits_;
  BatchOptions batch_;
  std::vector<std::int64_t> head0_;  // per layer: its first KV head in the pool; -1: per-sequence states
  std::int64_t pool_heads_ = 0, head_dim_ = 0;
  std::variant<std::monostate, PagePool<float>, PagePool<bf16>, PagePool<std::int8_t>> pool_;
  std::map<std::int64_t, Sequence> seqs_;
  std::int64_t next_id_ = 0;
};

inline BatchSession Qwen3Model::new_batch_session(const SessionOptions& opt, const BatchOptions& batch,
                                                  const SessionLimits& limits) const {
  constexpr const char* fn = "Qwen3Model::new_batch_session";
  ATTNKIT_REQUIRE(batch.page_size >= 1 && (batch.page_size & (batch.page_size - 1)) == 0, fn,
                  ": argument 'batch.page_size': must be a power of two, got ", batch.page_size);
  ATTNKIT_REQUIRE(batch.initial_pages >= 1, fn, ": argument 'batch.initial_pages': must be >= 1, got ", batch.initial_pages);
  ATTNKIT_REQUIRE(opt.reserve_tokens == 0, fn, ": argument 'opt.reserve_tokens': a batch session reserves pages ",
                  "(BatchOptions::initial_pages), not tokens; leave it 0");
  BatchSession s;
  s.model_ = this;
  s.opt_ = opt;
  s.limits_ = limits;
  s.batch_ = batch;
  for (auto& l : layers_) {
    const PagedLayout p = l.mixer->paged_layout(opt);
    if (p.paged() && (s.head_dim_ == 0 || s.head_dim_ == p.head_dim)) {  // one pool: one head width
      s.head0_.push_back(s.pool_heads_);
      s.pool_heads_ += p.kv_heads;
      s.head_dim_ = p.head_dim;
    } else {
      s.head0_.push_back(-1);
    }
  }
  if (s.pool_heads_ > 0) {
    const MemoryLimitScope scope(limits.max_memory_bytes);
    const std::int64_t P = batch.page_size, n = batch.initial_pages, H = s.pool_heads_, d = s.head_dim_;
    if (opt.kv_type == CacheType::bf16) s.pool_.emplace<PagePool<bf16>>(n, P, H, d, d);
    else if (opt.kv_type == CacheType::int8) s.pool_.emplace<PagePool<std::int8_t>>(n, P, H, d, d);
    else s.pool_.emplace<PagePool<float>>(n, P, H, d, d);
  }
  return s;
}

inline void Qwen3Model::forward_batch(BatchSession& bs, std::span<const SequenceTokens> step, View2<float> logits,
                                      const ForwardOptions& opt) const {
  ATTNKIT_STAGE("forward");
  constexpr const char* fn = "Qwen3Model::forward_batch";
  const std::int64_t B = static_cast<std::int64_t>(step.size()), V = config_.vocab_size;
  ATTNKIT_REQUIRE(bs.model_ == this, fn, ": argument 'session': made by another model");
  ATTNKIT_REQUIRE(B > 0, fn, ": argument 'step': no sequences");
  ATTNKIT_REQUIRE(opt.trace == nullptr, fn, ": ForwardOptions::trace is not used in a batch step (a trace holds one ",
                  "sequence's positions); give each entry its own SequenceTokens::trace");
  std::vector<BatchSession::Sequence*> seq(static_cast<std::size_t>(B));
  std::vector<std::int64_t> cu{0}, pos0;
  std::int64_t N = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const SequenceTokens& e = step[b];
    seq[b] = &bs.at(fn, e.sequence);
    for (std::int64_t c = 0; c < b; ++c) {
      ATTNKIT_REQUIRE(step[c].sequence != e.sequence, fn, ": argument 'step': sequence ", e.sequence, " appears twice (entries ",
                      c, " and ", b, ")");
      ATTNKIT_REQUIRE(e.trace == nullptr || step[c].trace != e.trace, fn, ": argument 'step': entries ", c, " and ", b,
                      " share one Trace (a trace holds one sequence's positions)");
    }
    ATTNKIT_REQUIRE(!seq[b]->broken, fn, ": sequence ", e.sequence, " is broken by an earlier failed step; remove it");
    ATTNKIT_REQUIRE(!e.ids.empty(), fn, ": argument 'step': entry ", b, " (sequence ", e.sequence, ") has no tokens");
    for (std::size_t t = 0; t < e.ids.size(); ++t)
      ATTNKIT_REQUIRE(e.ids[t] >= 0 && e.ids[t] < V, fn, ": argument 'step': entry ", b, " (sequence ", e.sequence,
                      "): token id ", e.ids[t], " at index ", t, " outside the vocabulary [0, ", V, ")");
    const std::int64_t n = static_cast<std::int64_t>(e.ids.size());
    require_positions(seq[b]->position + n, bs.limits_,
                      std::string(fn) + ": sequence " + std::to_string(e.sequence));
    pos0.push_back(seq[b]->position);
    N += n;
    cu.push_back(N);
  }
  const std::int64_t rows = opt.logits == LogitsRows::all ? N : opt.logits == LogitsRows::last ? B : 0;
  if (rows > 0) {
    ATTNKIT_REQUIRE(logits.shape[0] == rows && logits.shape[1] == V, fn, ": argument 'logits': shape ",
                    detail::shape_string(logits), ", expected [", rows, ", ", V, "] (",
                    opt.logits == LogitsRows::all ? "every token of the step" : "the last token of each entry", ")");
    check_view(logits, fn, "logits");
  }
  exit_rule(fn, opt);

  // Pages the step needs: a shared last page it writes into is copied first, then new pages.
  const std::int64_t P = bs.batch_.page_size;
  std::int64_t new_pages = 0;
  const bool paged = bs.pool_heads_ > 0;
  std::int64_t pool_in_use = 0, pool_pages = 0;
  if (paged) {
    pool_in_use = bs.pages_in_use();
    pool_pages = bs.pool_pages();
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t have = static_cast<std::int64_t>(seq[b]->pages.size());
      new_pages += std::max<std::int64_t>(0, (cu[b + 1] - cu[b] + pos0[b] + P - 1) / P - have);
      if (pos0[b] % P != 0) bs.visit_pool([&](auto& pool) { new_pages += pool.refs(seq[b]->pages[pos0[b] / P]) > 1; });
    }
  }
  std::int64_t grown = pool_pages;
  while (grown < pool_in_use + new_pages) grown *= 2;
  {  // memory, before anything changes: the pool after growth, per-sequence states, the step's buffers
    std::uint64_t states = mul_bytes(grown, bs.page_bytes()), held = mul_bytes(pool_pages, bs.page_bytes());
    for (auto& [id, s] : bs.seqs_) {
      std::int64_t after = s.position;
      for (std::int64_t b = 0; b < B; ++b)
        if (seq[b] == &s) after += cu[b + 1] - cu[b];
      for (int l = 0; l < num_layers(); ++l)
        if (!bs.layer_paged(l)) {
          states = add_bytes(states, layer_state_bytes(l, after, bs.opt_));
          held = add_bytes(held, layer_state_bytes(l, s.position, bs.opt_));
        } else {
          states = add_bytes(states, layers_[static_cast<std::size_t>(l)].mixer->paged_state_bytes(after, bs.opt_));
          held = add_bytes(held, layers_[static_cast<std::size_t>(l)].mixer->paged_state_bytes(s.position, bs.opt_));
        }
    }
    const std::uint64_t buffers = add_bytes(estimate_memory(0, N, bs.opt_).step, mul_bytes(rows, V, sizeof(float)));
    const std::uint64_t need = add_bytes(states, buffers);
    const std::string sizes = "states of " + std::to_string(bs.size()) + " sequences " + mib_string(states) +
                              " (page pool of " + std::to_string(grown) + " pages), buffers of a " + std::to_string(N) +
                              "-token step " + mib_string(buffers);
    require_bytes(need, held, sizes, bs.limits_, fn);
  }
  const MemoryLimitScope scope(bs.limits_.max_memory_bytes);
  if (paged) bs.visit_pool([&](auto& pool) { pool.grow(grown); });  // all or nothing: no sequence changes yet
  for (auto* s : seq) s->broken = true;  // until the step completes

  std::vector<std::int64_t> indptr{0}, ids, row_tokens;
  std::vector<std::int32_t> indices;
  std::vector<ops::Rope::Angles> angles;
  for (std::int64_t b = 0; b < B; ++b) {
    auto& s = *seq[b];
    const std::int64_t n = cu[b + 1] - cu[b];
    if (paged)
      bs.visit_pool([&](auto& pool) {
        if (pos0[b] % P != 0) {  // copy on write
          std::int32_t& last = s.pages[static_cast<std::size_t>(pos0[b] / P)];
          if (pool.refs(last) > 1) {
            const std::int32_t own = pool.allocate();
            pool.copy_page(last, own);
            pool.free(last);
            last = own;
          }
        }
        while (static_cast<std::int64_t>(s.pages.size()) * P < pos0[b] + n) s.pages.push_back(pool.allocate());
      });
    indices.insert(indices.end(), s.pages.begin(), s.pages.end());
    indptr.push_back(static_cast<std::int64_t>(indices.size()));
    ids.insert(ids.end(), step[b].ids.begin(), step[b].ids.end());
    if (opt.logits == LogitsRows::last) row_tokens.push_back(cu[b + 1] - 1);
    angles.push_back(rope_->angles(pos0[b], n));
  }
  if (opt.logits == LogitsRows::all)
    for (std::int64_t t = 0; t < N; ++t) row_tokens.push_back(t);

  BatchStep bstep;
  bstep.cu_seqlens = cu;
  bstep.pos0 = pos0;
  bstep.rope = angles;
  bstep.table = PageTable{indptr, indices, pos0};
  if (auto* p = std::get_if<PagePool<float>>(&bs.pool_)) bstep.pages_f32 = p->view();
  if (auto* p = std::get_if<PagePool<bf16>>(&bs.pool_)) bstep.pages_bf16 = p->view();
  if (auto* p = std::get_if<PagePool<std::int8_t>>(&bs.pool_)) bstep.pages_int8 = p->view();
  std::vector<MixerState*> states(static_cast<std::size_t>(B));
  // Positions in the step's records are packed rows (ctx.pos0 = 0 over all N tokens); the
  // routing trace hands each sequence's rows to its own trace.
  std::vector<Trace*> traces;
  for (const SequenceTokens& e : step) traces.push_back(e.trace);
  const bool traced = std::any_of(traces.begin(), traces.end(), [](const Trace* t) { return t != nullptr; });
  Trace router = traced ? Trace::for_batch(traces, cu, pos0) : Trace{};
  ForwardOptions run_opt = opt;
  run_opt.trace = traced ? &router : nullptr;
  StepContext ctx{0, opt.num_threads, opt.precision, nullptr, 0, run_opt.trace};
  run_stack(fn, ids, std::move(row_tokens), logits, ctx, run_opt,
            [&](std::size_t l, ConstView2<float> xn, View2<float> y, const StepContext& c) {
              BatchStep st = bstep;
              st.kv_head0 = bs.head0_[l];
              for (std::int64_t b = 0; b < B; ++b) states[static_cast<std::size_t>(b)] = seq[b]->states[l].get();
              st.states = states;
              layers_[l].mixer->forward_batch(xn, y, st, c);
            });
  for (std::int64_t b = 0; b < B; ++b) {
    seq[b]->position += cu[b + 1] - cu[b];
    seq[b]->broken = false;
  }
}

}  // namespace attnkit::model
