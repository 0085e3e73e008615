// attnkit/model/batch_session.hpp — many sequences at once (continuous batching) over a paged
// KV cache.
//
// A BatchSession holds any number of sequences, each with its own position. One
// Qwen3Model::forward_batch() call runs the new tokens of any subset of them — a whole prompt,
// a chunk of one, or one decode token each, mixed freely — packed along the token axis, so the
// linear layers (projections, MLPs, the head) run once over all the step's tokens and read their
// weights once per step instead of once per sequence.
//
// K/V storage: the mixers that ask for it (TokenMixer::paged_layout: Qwen3 full and sliding
// attention, Tuneable attention, routed attention, Loop Attention, sparse attention; f32, bf16 or
// int8 caches) keep their K/V in a page pool of the session (attention/paged_kv.hpp; pages of
// BatchOptions::page_size tokens): one pool per window, 0 (full attention) and each sliding
// window the model has. Every layer and pass of a pool owns a range of its KV-head axis, so one
// page id holds the same positions in every layer of that pool; each sequence has a page table
// per pool. A sliding layer's pool frees a sequence's pages once they lie wholly below its
// window (after each step: what the next token cannot see), so a sliding layer holds about
// window + page_size positions per sequence however long it runs, as a ring would; the freed
// pages' table entries stay (the kernels never read below the window). Mixers add what else
// they keep per sequence (TokenMixer::new_paged_state: Loop Attention's stack-mode rings, sparse
// attention's index keys). A pool doubles when it runs out (BatchOptions::initial_pages first).
// Other mixers (Gated DeltaNet, ...) keep a state per sequence and run per sequence inside the
// step (TokenMixer::forward_batch's default): every model works in a batch session, and the MLPs
// and the head are still batched.
//
// Prefix sharing: fork(s) starts a new sequence holding everything s holds: its pages (in every
// pool) are shared (reference counts, no copy), per-sequence states are copied (MixerState::clone; mixers
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
    s.pages.resize(pools_.size());
    s.held.resize(pools_.size(), 0);
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
    for (std::size_t i = 0; i < pools_.size(); ++i)
      for (std::size_t j = from.held[i]; j < from.pages[i].size(); ++j)
        visit_pool(i, [&](auto& pool) { pool.share(from.pages[i][j]); });
    s.pages = from.pages;
    s.held = from.held;
    seqs_.emplace(next_id_, std::move(s));
    return next_id_++;
  }

  // Drops a sequence (broken or not) and returns its pages to the pools.
  void remove(std::int64_t sequence) {
    Sequence& s = at("BatchSession::remove", sequence);
    for (std::size_t i = 0; i < pools_.size(); ++i)
      for (std::size_t j = s.held[i]; j < s.pages[i].size(); ++j) visit_pool(i, [&](auto& pool) { pool.free(s.pages[i][j]); });
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
  // The windows of the session's page pools (0: full attention), in the order of their first layer.
  std::vector<std::int64_t> pool_windows() const {
    std::vector<std::int64_t> w;
    for (const auto& p : pools_) w.push_back(p.window);
    return w;
  }
  // Pages of the pool of `window` (0: full attention; none such: 0) in use (a page several
  // sequences share counts once) and in all.
  std::int64_t pages_in_use(std::int64_t window = 0) const {
    std::int64_t n = 0;
    if (const int i = pool_index(window); i >= 0) visit_pool(i, [&](const auto& pool) { n = pool.pages_in_use(); });
    return n;
  }
  std::int64_t pool_pages(std::int64_t window = 0) const {
    std::int64_t n = 0;
    if (const int i = pool_index(window); i >= 0) visit_pool(i, [&](const auto& pool) { n = pool.num_pages(); });
    return n;
  }
  // The pages a sequence holds in the pool of `window`, in position order (for inspection; the
  // session owns them). A sliding window's pool: those from the first page its window still
  // reaches (first_page(): the table entries before it are freed).
  std::vector<std::int32_t> pages(std::int64_t sequence, std::int64_t window = 0) const {
    const Sequence& s = at("BatchSession::pages", sequence);
    const int i = pool_index(window);
    if (i < 0) return {};
    return {s.pages[i].begin() + static_cast<std::ptrdiff_t>(s.held[i]), s.pages[i].end()};
  }
  // The page-table entry of the first page pages(sequence, window) lists (0 for full attention).
  std::int64_t first_page(std::int64_t sequence, std::int64_t window = 0) const {
    const Sequence& s = at("BatchSession::first_page", sequence);
    const int i = pool_index(window);
    return i < 0 ? 0 : static_cast<std::int64_t>(s.held[i]);
  }
  // Layers whose K/V live in a page pool (the others keep a state per sequence), and its window.
  bool layer_paged(int layer) const { return head0_.at(static_cast<std::size_t>(layer)) >= 0; }
  std::int64_t layer_window(int layer) const {
    const int i = pool_of_.at(static_cast<std::size_t>(layer));
    return i < 0 ? 0 : pools_[static_cast<std::size_t>(i)].window;
  }

  const SessionOptions& options() const { return opt_; }
  const BatchOptions& batch_options() const { return batch_; }
  const SessionLimits& limits() const { return limits_; }
  SessionLimits& limits() { return limits_; }

 private:
  friend class Qwen3Model;
  struct Sequence {
    std::int64_t position = 0;
    bool broken = false;
    std::vector<std::vector<std::int32_t>> pages;  // per pool: the page table
    std::vector<std::size_t> held;                 // per pool: the first entry the sequence still holds
    std::vector<std::unique_ptr<MixerState>> states;  // per layer; where the layer is paged, its new_paged_state() (often null)
  };
  // One page pool: the K/V of the layers of one window, side by side on its head axis.
  struct Pool {
    std::int64_t window = 0, heads = 0;
    std::variant<std::monostate, PagePool<float>, PagePool<bf16>, PagePool<std::int8_t>> pages;
  };

  template <class F>
  void visit_pool(std::size_t i, F&& f) {
    std::visit([&](auto& p) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(p)>, std::monostate>) f(p);
    }, pools_[i].pages);
  }
  template <class F>
  void visit_pool(std::size_t i, F&& f) const {
    std::visit([&](const auto& p) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(p)>, std::monostate>) f(p);
    }, pools_[i].pages);
  }
  int pool_index(std::int64_t window) const {
    for (std::size_t i = 0; i < pools_.size(); ++i)
      if (pools_[i].window == window) return static_cast<int>(i);
    return -1;
  }
  Sequence& at(const char* fn, std::int64_t id) {
    auto it = seqs_.find(id);
    ATTNKIT_REQUIRE(it != seqs_.end(), fn, ": argument 'sequence': no sequence ", id, " in this batch session");
    return it->second;
  }
  const Sequence& at(const char* fn, std::int64_t id) const { return const_cast<BatchSession*>(this)->at(fn, id); }
  // Bytes of one page of pool i (all its layers' K and V).
  std::uint64_t page_bytes(std::size_t i) const {
    const std::int64_t P = batch_.page_size, d = head_dim_, H = pools_[i].heads;
    switch (opt_.kv_type) {
      case CacheType::bf16: return PagePool<bf16>::page_bytes(P, H, d, d);
      case CacheType::int8: return PagePool<std::int8_t>::page_bytes(P, H, d, d);
      default: return PagePool<float>::page_bytes(P, H, d, d);
    }
  }
  // After a step: a windowed pool's pages wholly below what s's next token sees go back.
  void free_below_window(Sequence& s) {
    const std::int64_t P = batch_.page_size;
    for (std::size_t i = 0; i < pools_.size(); ++i) {
      if (pools_[i].window == 0) continue;
      const auto first_seen = static_cast<std::size_t>(std::max<std::int64_t>(0, s.position - pools_[i].window + 1) / P);
      for (; s.held[i] < first_seen; ++s.held[i]) visit_pool(i, [&](auto& pool) { pool.free(s.pages[i][s.held[i]]); });
    }
  }

  const Qwen3Model* model_ = nullptr;
  SessionOptions opt_;
  SessionLimits limits_;
  BatchOptions batch_;
  std::vector<std::int64_t> head0_;  // per layer: its first KV head in its pool; -1: per-sequence states
  std::vector<int> pool_of_;         // per layer: its pool; -1: per-sequence states
  std::int64_t head_dim_ = 0;        // of every pool
  std::vector<Pool> pools_;
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
    if (p.paged() && (s.head_dim_ == 0 || s.head_dim_ == p.head_dim)) {  // one head width for every pool
      int i = s.pool_index(p.window);
      if (i < 0) {
        i = static_cast<int>(s.pools_.size());
        s.pools_.push_back({p.window, 0, {}});
      }
      auto& pool = s.pools_[static_cast<std::size_t>(i)];
      s.head0_.push_back(pool.heads);
      s.pool_of_.push_back(i);
      pool.heads += p.kv_heads;
      s.head_dim_ = p.head_dim;
    } else {
      s.head0_.push_back(-1);
      s.pool_of_.push_back(-1);
    }
  }
  const MemoryLimitScope scope(limits.max_memory_bytes);
  for (auto& pool : s.pools_) {
    const std::int64_t P = batch.page_size, n = batch.initial_pages, H = pool.heads, d = s.head_dim_;
    if (opt.kv_type == CacheType::bf16) pool.pages.emplace<PagePool<bf16>>(n, P, H, d, d);
    else if (opt.kv_type == CacheType::int8) pool.pages.emplace<PagePool<std::int8_t>>(n, P, H, d, d);
    else pool.pages.emplace<PagePool<float>>(n, P, H, d, d);
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

  // Pages the step needs in each pool: a shared last page it writes into is copied first, then new pages.
  const std::int64_t P = bs.batch_.page_size;
  const std::size_t n_pools = bs.pools_.size();
  std::vector<std::int64_t> grown(n_pools), pool_pages(n_pools);
  for (std::size_t i = 0; i < n_pools; ++i) {
    std::int64_t new_pages = 0, in_use = 0;
    bs.visit_pool(i, [&](auto& pool) {
      in_use = pool.pages_in_use();
      pool_pages[i] = pool.num_pages();
      for (std::int64_t b = 0; b < B; ++b) {
        const auto& table = seq[b]->pages[i];
        const std::int64_t have = static_cast<std::int64_t>(table.size());
        new_pages += std::max<std::int64_t>(0, (cu[b + 1] - cu[b] + pos0[b] + P - 1) / P - have);
        if (pos0[b] % P != 0) new_pages += pool.refs(table[static_cast<std::size_t>(pos0[b] / P)]) > 1;
      }
    });
    for (grown[i] = pool_pages[i]; grown[i] < in_use + new_pages;) grown[i] *= 2;
  }
  {  // memory, before anything changes: the pools after growth, per-sequence states, the step's buffers
    std::uint64_t states = 0, held = 0;
    for (std::size_t i = 0; i < n_pools; ++i) {
      states = add_bytes(states, mul_bytes(grown[i], bs.page_bytes(i)));
      held = add_bytes(held, mul_bytes(pool_pages[i], bs.page_bytes(i)));
    }
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
    std::string pools;
    for (std::size_t i = 0; i < n_pools; ++i)
      pools += (i ? ", " : " (page pools of ") + std::to_string(grown[i]) + " pages" +
               (bs.pools_[i].window ? " for a window of " + std::to_string(bs.pools_[i].window) : std::string()) +
               (i + 1 == n_pools ? ")" : "");
    const std::string sizes = "states of " + std::to_string(bs.size()) + " sequences " + mib_string(states) + pools +
                              ", buffers of a " + std::to_string(N) + "-token step " + mib_string(buffers);
    require_bytes(need, held, sizes, bs.limits_, fn);
  }
  const MemoryLimitScope scope(bs.limits_.max_memory_bytes);
  for (std::size_t i = 0; i < n_pools; ++i)  // all or nothing: no sequence changes yet
    bs.visit_pool(i, [&](auto& pool) { pool.grow(grown[i]); });
  for (auto* s : seq) s->broken = true;  // until the step completes

  std::vector<std::vector<std::int64_t>> indptr(n_pools, std::vector<std::int64_t>{0});
  std::vector<std::vector<std::int32_t>> indices(n_pools);
  std::vector<std::int64_t> ids, row_tokens;
  std::vector<ops::Rope::Angles> angles;
  for (std::int64_t b = 0; b < B; ++b) {
    auto& s = *seq[b];
    const std::int64_t n = cu[b + 1] - cu[b];
    for (std::size_t i = 0; i < n_pools; ++i) {
      auto& table = s.pages[i];
      bs.visit_pool(i, [&](auto& pool) {
        if (pos0[b] % P != 0) {  // copy on write
          std::int32_t& last = table[static_cast<std::size_t>(pos0[b] / P)];
          if (pool.refs(last) > 1) {
            const std::int32_t own = pool.allocate();
            pool.copy_page(last, own);
            pool.free(last);
            last = own;
          }
        }
        while (static_cast<std::int64_t>(table.size()) * P < pos0[b] + n) table.push_back(pool.allocate());
      });
      indices[i].insert(indices[i].end(), table.begin(), table.end());
      indptr[i].push_back(static_cast<std::int64_t>(indices[i].size()));
    }
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
  std::vector<BatchStep> pooled(n_pools, bstep);  // each pool's: its pages and tables
  for (std::size_t i = 0; i < n_pools; ++i) {
    BatchStep& st = pooled[i];
    st.table = PageTable{indptr[i], indices[i], pos0};
    st.window = bs.pools_[i].window;
    auto& pages = bs.pools_[i].pages;
    if (auto* p = std::get_if<PagePool<float>>(&pages)) st.pages_f32 = p->view();
    if (auto* p = std::get_if<PagePool<bf16>>(&pages)) st.pages_bf16 = p->view();
    if (auto* p = std::get_if<PagePool<std::int8_t>>(&pages)) st.pages_int8 = p->view();
  }
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
              const int pool = bs.pool_of_[l];
              BatchStep st = pool >= 0 ? pooled[static_cast<std::size_t>(pool)] : bstep;
              st.kv_head0 = bs.head0_[l];
              for (std::int64_t b = 0; b < B; ++b) states[static_cast<std::size_t>(b)] = seq[b]->states[l].get();
              st.states = states;
              layers_[l].mixer->forward_batch(xn, y, st, c);
            });
  for (std::int64_t b = 0; b < B; ++b) {
    seq[b]->position += cu[b + 1] - cu[b];
    seq[b]->broken = false;
    bs.free_below_window(*seq[b]);
  }
}

}  // namespace attnkit::model
