// attnkit/text/generate.hpp — text generation over a model, a session, a tokenizer and a sampler.
//
// Contract: Generator::generate() prefills a prompt at the session's position (in chunks of
// prefill_chunk tokens, or one step), then samples one token at a time and runs it through the
// caches. It stops when
//   * an id of eos_ids is sampled (not printed, not added to the context),
//   * a stop string appears in the text (it may span tokens; the text from its start on is not
//     printed), or
//   * max_tokens tokens were generated.
// Text reaches on_text as the tokens arrive, in whole UTF-8 characters (StreamDecoder), with the
// longest tail that could be the start of a stop string held back until the next token decides.
// Before any work, a prompt whose tokens plus max_tokens need more positions than the model's
// max_position_embeddings is an attnkit::Error naming the sizes.
// The session and the context (every token the model has seen or will see) carry over between
// calls: a second generate() prefills only its own prompt, after the tokens already in the
// caches. The last token a call sampled without running it (max_tokens or a stop string ended
// the call) is held and run first by the next call, so the caches always end up holding the
// whole context; generate() with an empty prompt goes on from where the last call ended.
// Ids the model can score but the tokenizer cannot decode (Qwen3's embedding rows beyond the
// tokenizer's vocabulary) are never sampled.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/model/qwen3.hpp"
#include "attnkit/text/sampler.hpp"
#include "attnkit/text/tokenizer.hpp"

namespace attnkit::text {

// Turns generated ids into printable text: whole UTF-8 characters, any stop string cut off and
// never shown in part. push() returns what may be printed now; finish() the rest.
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop, bool skip_special = true)
      : decoder_(tok, skip_special), stop_(std::move(stop)) {
    for (std::size_t i = 0; i < stop_.size(); ++i)
      ATTNKIT_REQUIRE(!stop_[i].empty(), "TextStream: argument 'stop': string ", i, " is empty");
  }

  std::string push(TokenId id) {
    if (stopped_) return {};
    pending_ += decoder_.push(id);
    return release(false);
  }
  // The text still held (partial UTF-8 as U+FFFD, a tail that began a stop string) unless a stop
  // string was found.
  std::string finish() {
    if (stopped_) return {};
    pending_ += decoder_.flush();
    return release(true);
  }
  bool stopped() const { return stopped_; }
  const std::string& matched() const { return matched_; }  // the stop string found

 private:
  // Invariant: no tail of the text already released is a proper prefix of a stop string, so a
  // stop string can only start inside pending_.
  std::string release(bool final) {
    std::size_t first = std::string::npos;
    for (const auto& s : stop_) {
      const auto at = pending_.find(s);
      if (at < first) {
        first = at;
        matched_ = s;
      }
    }
    if (first != std::string::npos) {
      stopped_ = true;
      std::string out = pending_.substr(0, first);
      pending_.clear();
      return out;
    }
    std::size_t hold = 0;
    if (!final)
      for (const auto& s : stop_)
        for (std::size_t len = std::min(s.size() - 1, pending_.size()); len > hold; --len)
          if (pending_.compare(pending_.size() - len, len, s, 0, len) == 0) {
            hold = len;
            break;
          }
    std::string out = pending_.substr(0, pending_.size() - hold);
    pending_.erase(0, pending_.size() - hold);
    return out;
  }

  StreamDecoder decoder_;
  std::vector<std::string> stop_;
  std::string pending_, matched_;
  bool stopped_ = false;
};

struct GenerateOptions {
  std::int64_t max_tokens = 256;
  std::vector<TokenId> eos_ids;   // stop when one is sampled
  std::vector<std::string> stop;  // stop strings
  std::int64_t prefill_chunk = 0; // tokens per prefill step; 0: the whole prompt in one step
  bool skip_special = true;       // leave special tokens' text (added tokens marked special) out
};

enum class StopReason { eos, stop_string, max_tokens };

inline const char* stop_reason_name(StopReason r) {
  return r == StopReason::eos ? "eos" : r == StopReason::stop_string ? "stop string" : "max tokens";
}

struct GenerateResult {
  std::vector<TokenId> tokens;      // generated ids (an EOS id that ended the call excluded)
  std::string text;                 // everything on_text received
  std::int64_t prompt_tokens = 0;   // tokens this call prefilled (a held token included)
  std::int64_t generated_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;  // decode: sampling and single-token steps
  StopReason stop_reason = StopReason::max_tokens;
  TokenId eos_id = -1;              // the EOS id sampled (stop_reason eos)
  std::string stop_string;          // the stop string found (stop_reason stop_string)
};

using TextCallback = std::function<void(std::string_view)>;

class Generator {
 public:
  // The model and tokenizer must outlive the generator. `forward` gives precision and threads
  // (its logits rows and trace are set here); `limits` the session's memory and position limits.
  Generator(const model::Qwen3Model& m, const Tokenizer& tok, const SamplerOptions& sampling = {},
            const model::SessionOptions& session = {}, const model::ForwardOptions& forward = {},
            const model::SessionLimits& limits = {})
      : model_(m), tok_(tok), sampler_(sampling), session_opt_(session), limits_(limits),
        session_(m.new_session(session, limits)), forward_(forward) {
    const std::int64_t V = m.config().vocab_size;
    ATTNKIT_REQUIRE(tok.vocab_size() <= V, "Generator: the tokenizer has ", tok.vocab_size(),
                    " token ids, the model's vocab_size is ", V, " (a tokenizer of another model?)");
    forward_.trace = nullptr;
    logits_.resize(static_cast<std::size_t>(V));
  }

  // Tokenises `prompt` (special tokens in it are matched) and generates.
  GenerateResult generate(std::string_view prompt, const GenerateOptions& opt, const TextCallback& on_text = {}) {
    const std::vector<TokenId> ids = tok_.encode(prompt);
    return generate(std::span<const TokenId>(ids), opt, on_text);
  }

  GenerateResult generate(std::span<const TokenId> prompt, const GenerateOptions& opt, const TextCallback& on_text = {}) {
    using Clock = std::chrono::steady_clock;
    const std::int64_t V = model_.config().vocab_size, max_pos = model_.config().max_position_embeddings;
    const std::int64_t scored = std::min<std::int64_t>(V, tok_.vocab_size());  // ids the sampler may pick
    ATTNKIT_REQUIRE(opt.max_tokens >= 0, "Generator::generate: max_tokens: must be >= 0, got ", opt.max_tokens);
    ATTNKIT_REQUIRE(opt.prefill_chunk >= 0, "Generator::generate: prefill_chunk: must be >= 0, got ", opt.prefill_chunk);
    for (std::size_t i = 0; i < prompt.size(); ++i)
      ATTNKIT_REQUIRE(prompt[i] >= 0 && prompt[i] < scored, "Generator::generate: argument 'prompt': token id ", prompt[i],
                      " at index ", i, " outside the vocabulary [0, ", scored, ")");
    const auto n_prompt = static_cast<std::int64_t>(prompt.size());
    const std::int64_t in_cache = session_.position() + static_cast<std::int64_t>(held_.size());
    ATTNKIT_REQUIRE(n_prompt + static_cast<std::int64_t>(held_.size()) > 0 || session_.position() > 0,
                    "Generator::generate: argument 'prompt': empty and nothing in the context yet");
    ATTNKIT_REQUIRE(in_cache + n_prompt + opt.max_tokens <= max_pos, "Generator::generate: the prompt of ", n_prompt,
                    " tokens", in_cache > 0 ? " after " + std::to_string(in_cache) + " tokens of context" : std::string(),
                    " and max_tokens ", opt.max_tokens, " need ", in_cache + n_prompt + opt.max_tokens,
                    " positions; the model's max_position_embeddings is ", max_pos);
    TextStream stream(tok_, opt.stop, opt.skip_special);  // checks the stop strings before any work

    GenerateResult r;
    // Prefill: the held token (if any), then the prompt; with neither, sampling goes on from the
    // logits of the last token run.
    std::vector<TokenId> feed = held_;
    feed.insert(feed.end(), prompt.begin(), prompt.end());
    const auto T = static_cast<std::int64_t>(feed.size());
    const std::int64_t step = opt.prefill_chunk > 0 ? opt.prefill_chunk : T;
    const auto t0 = Clock::now();
    for (std::int64_t b = 0; b < T; b += step) {
      const std::int64_t n = std::min(step, T - b);
      const bool last = b + n == T;
      run(std::span<const TokenId>(feed.data() + b, static_cast<std::size_t>(n)), last);
    }
    context_.insert(context_.end(), prompt.begin(), prompt.end());
    held_.clear();
    r.prompt_tokens = T;
    const auto t1 = Clock::now();
    r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

    auto emit = [&](std::string piece) {
      if (piece.empty()) return;
      r.text += piece;
      if (on_text) on_text(piece);
    };
    for (std::int64_t i = 0;; ++i) {
      if (i == opt.max_tokens) {
        r.stop_reason = StopReason::max_tokens;
        break;
      }
      const TokenId id = sampler_.sample(std::span<const float>(logits_.data(), static_cast<std::size_t>(scored)), context_);
      if (std::find(opt.eos_ids.begin(), opt.eos_ids.end(), id) != opt.eos_ids.end()) {
        r.stop_reason = StopReason::eos;
        r.eos_id = id;
        break;
      }
      r.tokens.push_back(id);
      context_.push_back(id);
      held_.assign(1, id);
      emit(stream.push(id));
      if (stream.stopped()) {
        r.stop_reason = StopReason::stop_string;
        r.stop_string = stream.matched();
        break;
      }
      if (i + 1 < opt.max_tokens) {  // the last token's logits are not needed now
        run(std::span<const TokenId>(&id, 1), true);
        held_.clear();
      }
    }
    emit(stream.finish());
    r.generated_tokens = static_cast<std::int64_t>(r.tokens.size());
    r.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
    return r;
  }

  // Every token of the conversation: the caches' tokens, then the held ones.
  const std::vector<TokenId>& context() const { return context_; }
  // Sampled tokens not yet run through the model (the next generate() runs them first).
  const std::vector<TokenId>& held() const { return held_; }
  const model::Session& session() const { return session_; }
  // Logits [vocab_size] after the last token run through the model.
  std::span<const float> last_logits() const { return logits_; }
  Sampler& sampler() { return sampler_; }
  // Forgets the conversation: empty caches and context (the sampler's random state goes on).
  void reset() {
    session_ = model_.new_session(session_opt_, limits_);
    context_.clear();
    held_.clear();
  }

 private:
  void run(std::span<const TokenId> ids, bool want_logits) {
    model::ForwardOptions fo = forward_;
    fo.logits = want_logits ? model::LogitsRows::last : model::LogitsRows::none;
    const std::int64_t V = model_.config().vocab_size;
    model_.forward(session_, ids, want_logits ? View2<float>(logits_.data(), {1, V}) : View2<float>(), fo);
  }

  const model::Qwen3Model& model_;
  const Tokenizer& tok_;
  Sampler sampler_;
  model::SessionOptions session_opt_;
  model::SessionLimits limits_;
  model::Session session_;
  model::ForwardOptions forward_;
  std::vector<float> logits_;
  std::vector<TokenId> context_, held_;
};

}  // namespace attnkit::text
