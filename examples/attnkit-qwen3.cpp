// attnkit-qwen3 — run a Qwen3 forward pass on the CPU with attnkit.
//
//   attnkit-qwen3                                  built-in small random model, random prompt
//   attnkit-qwen3 --model DIR --ids 1,2,3 --generate 8
//   attnkit-qwen3 --random qwen3-0.6b --dtype bf16 --prompt-len 512 --generate 32 --precision fast
//   attnkit-qwen3 --model loop-checkpoint --ids 1,2,3 --trace-out trace.safetensors --plot gates.svg
//   attnkit-qwen3 --model attnres-checkpoint --prompt-len 64 --plot routing.svg
//   attnkit-qwen3 --random tiny-lt2-dsa --prompt-len 40 --trace-out t.safetensors --plot topk.svg
//   attnkit-qwen3 --model DIR --prompt "Once upon a time" --max-tokens 64 --temperature 0.7
//   attnkit-qwen3 --model DIR --chat --no-think --interactive
//
// Any checkpoint or config a built-in recipe accepts runs as it is (plain Qwen3, Loop Attention,
// Attention Residuals, Ouro, Qwen3.5 / Qwen3-Next hybrids with Gated DeltaNet, LT2 looped hybrids
// with Gated DeltaNet and full or DeepSeek sparse attention, R-GQA and Tuneable attention layers).
// Prints a model summary and `prefill: N tok/s` / `decode: N tok/s`. Errors are one line on
// stderr, "attnkit-qwen3: error: ...": exit code 2 for a bad command line (unknown option, missing
// or malformed value, out-of-range number, empty id list, ids outside the vocabulary, a prompt
// longer than the model's max_position_embeddings without --allow-long-context), 1 for a run
// that fails (unreadable files, a checkpoint the recipes refuse, more memory than allowed). See --help.
// Text mode (--prompt, --prompt-file, --interactive): tokenizer.json of the model directory (or
// --tokenizer), sampling defaults from generation_config.json, output text streamed to stdout as
// tokens arrive and nothing else there; the summary and the timing lines go to stderr.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "attnkit/attnkit.hpp"
#include "attnkit/text/chat.hpp"
#include "attnkit/text/generate.hpp"
#include "attnkit/text/generation_config.hpp"
#include "attnkit/text/tokenizer.hpp"
#include "attnkit/viz/trace_plot.hpp"

using namespace attnkit;
using Clock = std::chrono::steady_clock;

namespace {

const char* kUsage = R"(usage: attnkit-qwen3 [options]
model (default: a built-in small deterministic random Qwen3, nothing to download):
  --model DIR              Hugging Face checkpoint directory (config.json + safetensors)
  --random NAME|FILE.json  random weights of a named shape (qwen3-0.6b, qwen3-0.6b-loop, qwen3-0.6b-attnres,
                           tiny, tiny-loop, tiny-attnres, ouro-1.4b, tiny-ouro, hybrid-0.6b, tiny-hybrid,
                           lt2-hybrid-1.3b, lt2-gdn-dsa-1.3b, tiny-lt2, tiny-lt2-dsa, qwen3-0.6b-rgqa,
                           qwen3-0.6b-tuneable, tiny-rgqa, tiny-tuneable) or of any config file
  --loop-mode stack|layer  Loop Attention mode of a random model (adds the loop fields if absent)
  --loop-window N          Loop Attention window of a random model
  --attnres-mode MODE      Attention Residuals mode of a random model: block, full, delta, delta_block
                           (adds the AttnRes fields if absent)
  --attnres-form open|kimi Attention Residuals form of a random model (open-attention-residuals or Kimi's)
  --loops N                loop a random model's layer stack N times (a cache per loop and layer)
  --allow-unused           load a checkpoint even if some tensors or config fields go unused (warns)
  --dtype f32|bf16|q8      weight type for --random and the default model (default bf16); q8 (8-bit
                           weights in groups of 32, quantised at load) also applies to --model
  --seed N                 seed of the random weights and of sampling (default 0)
input (default: --prompt-len 32 random ids):
  --ids 1,2,3              token ids
  --ids-from FILE:TENSOR   token ids from an I64/I32 tensor of a safetensors file
  --prompt-len N           N random token ids (benchmarking)
  --max-memory SIZE        refuse a run whose session (caches, buffers, ids, logits) needs more than SIZE bytes
                           (suffix K, M, G, T; default: the memory the system reports available)
  --allow-long-context     run prompts (+ generated ids) longer than the model's max_position_embeddings
run:
  --decode                 feed the ids one token at a time through the caches instead of one prefill
  --chunk N                prefill in chunks of N tokens (continuing the caches)
  --generate N             greedy continuation of N tokens; prints `generated: id id ...`
  --batch B                B sequences at once in a batch session (paged KV cache, continuous batching): each
                           gets its own random prompt of --prompt-len ids (or all share --ids / --ids-from,
                           prefilled once and forked: the prompt's pages are stored once), prefilled together,
                           then --generate N greedy ids each, one decode step for all B; the prefill and decode
                           lines give the aggregate tokens/s
  --page-size P            tokens per KV page of --batch (a power of two, default 16)
  --logits-out FILE        write tensor `logits` F32 [T, vocab], one row per input token
  --trace-out FILE         write the mechanism's internals over the input tokens as safetensors
                           (Loop Attention: `gates` F32 [layers, T, heads] of the looping pass;
                           Attention Residuals: `attnres_weights` F32 [layers, 2, T, sources];
                           looped stacks: `logits_per_step` [steps, T, vocab], `exit_gate` [steps, T], ...;
                           Gated DeltaNet: `gdn_beta`, `gdn_decay` [layers, T, value heads]; gated
                           attention: `attn_gate` [layers, T, heads]; sparse attention: `topk_indices`
                           [layers, T, top-k], each query's kept key positions, -1 padded; R-GQA:
                           `router_probs` and `router_weight` [layers, T, heads], 0 for heads not kept);
                           with --batch, one file per prefilled sequence over its own prompt, FILE with
                           .seq<b> before its extension (so is --plot's)
  --exit RULE              output of a looped stack: last, step:N (0-based), threshold:Q, expected
  --plot FILE.svg          draw the trace as an SVG picture (heat maps with axes and colour scale; sparse
                           attention: a query x key map of the keys each query kept, for one layer)
  --plot-layer N           the layer the plot's per-token panels show (default: the last with data)
  --threads N              OpenMP threads (default: OMP_NUM_THREADS or all cores)
  --precision exact|fast   matrix products: fp32-accurate (default) or bf16-rounded activations (faster;
                           with q8 weights, decode also quantises activations to int8: VNNI)
  --kv-cache f32|bf16|int8 KV cache storage (default f32; int8: a scale per token and KV head)
  --profile                after the prefill and after the generation, the wall time of each stage of the
                           forward: norms, projections, RoPE, cache appends, the attention kernel, the MLP's
                           products and activation, the head (stages nest: mixer > attn.*, mlp > mlp.*)
  --help
text (stdout carries only the generated text, streamed; the summary and timing lines go to stderr):
  --prompt TEXT            generate a continuation of TEXT (special tokens such as <|im_start|> in it count)
  --prompt-file F          the prompt is the contents of file F
  --tokenizer F            tokenizer.json (default: the one in the --model directory)
  --max-tokens N           generate at most N tokens (default 256, or what the context has left)
  --stop TEXT              stop where TEXT appears in the output, which ends before it (repeatable); generation
                           always stops at the EOS ids of generation_config.json and config.json and at the
                           tokenizer's <|im_end|> and <|endoftext|>
  --chat                   wrap the prompt in Qwen3's chat template (a user turn, then the assistant's)
  --system TEXT            a system message first (with --chat)
  --no-think               Qwen3's empty think block after the assistant prompt (thinking off)
  --interactive            a chat read from stdin, one user turn per line, until EOF (implies --chat; --prompt
                           is the first turn); each turn prefills only its own tokens, the conversation stays
                           in the KV cache
  --special                print special tokens (<|im_start|>, ...) the model generates (default: left out)
  --chunk N                also the prefill chunk in text mode
sampling (defaults: generation_config.json of the --model directory, else transformers' defaults: greedy;
          when sampling, temperature 1, top-k 50, top-p 1, min-p 0):
  --temperature X          0 = greedy (also --top-k 1)
  --top-k N                keep the N most likely tokens (0 = off)
  --top-p X                keep the smallest set of most likely tokens with probability >= X, in (0, 1]
  --min-p X                drop tokens less likely than X times the most likely, in [0, 1]
  --repeat-penalty X       divide positive / multiply negative logits of recent tokens by X (1 = off)
  --repeat-last-n N        the recent tokens the penalty looks at (default 64, -1 = all, 0 = off)
  --sample-seed N          seed of sampling alone (default: --seed); the same seed gives the same text
)";

constexpr int kUsageError = 2, kRuntimeError = 1;
constexpr std::int64_t kMaxTokens = std::int64_t{1} << 40;  // beyond any memory; keeps sums from overflowing

// A bad command line (exit code 2) or, with kRuntimeError, a failed run (1).
[[noreturn]] void die(const std::string& msg, int code = kUsageError) {
  std::fprintf(stderr, "attnkit-qwen3: error: %s\n", msg.c_str());
  std::exit(code);
}

std::int64_t parse_int(const std::string& s, const char* what, std::int64_t lo = 0,
                       std::int64_t hi = std::numeric_limits<std::int64_t>::max()) {
  std::size_t pos = 0;
  long long v = 0;
  if (s.empty()) die(std::string(what) + ": empty value");
  try {
    v = std::stoll(s, &pos);
  } catch (const std::out_of_range&) {
    die(std::string(what) + ": out of range: '" + s + "' (must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "])");
  } catch (...) {
    die(std::string(what) + ": not an integer: '" + s + "'");
  }
  if (pos != s.size()) die(std::string(what) + ": not an integer: '" + s + "'");
  if (v < lo) die(std::string(what) + ": must be >= " + std::to_string(lo) + ", got " + s);
  if (v > hi) die(std::string(what) + ": must be <= " + std::to_string(hi) + ", got " + s);
  return v;
}

// A byte count: an integer with an optional binary suffix K, M, G or T (KiB, MiB, GiB, TiB).
std::uint64_t parse_bytes(const std::string& s, const char* what) {
  std::string digits = s;
  int shift = 0;
  if (!digits.empty()) {
    const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(digits.back())));
    const std::string units = "KMGT";
    if (const auto at = units.find(u); at != std::string::npos) {
      shift = 10 * static_cast<int>(at + 1);
      digits.pop_back();
    }
  }
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
    die(std::string(what) + ": expected a byte count such as 512M, 8G or 1000000, got '" + s + "'");
  const std::int64_t n = parse_int(digits, what, 1, std::numeric_limits<std::int64_t>::max() >> shift);
  return static_cast<std::uint64_t>(n) << shift;
}

double parse_number(const std::string& s, const char* what) {
  std::size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (...) {
    die(std::string(what) + ": not a number: '" + s + "'");
  }
  if (pos != s.size() || !std::isfinite(v)) die(std::string(what) + ": not a number: '" + s + "'");
  return v;
}

std::vector<std::int64_t> parse_ids(const std::string& s) {
  std::vector<std::int64_t> ids;
  if (s.find_first_not_of(" \t") == std::string::npos) die("--ids: empty list (give ids like 1,2,3)");
  std::stringstream ss(s);
  std::string tok;
  std::size_t index = 0;
  while (std::getline(ss, tok, ',')) {
    if (tok.find_first_not_of(" \t") == std::string::npos)
      die("--ids: empty entry at index " + std::to_string(index) + " in '" + s + "'");
    ids.push_back(parse_int(tok, "--ids", 0));
    ++index;
  }
  if (s.back() == ',') die("--ids: empty entry at index " + std::to_string(index) + " in '" + s + "' (trailing comma)");
  return ids;
}

// The built-in default: small enough to build in well under a second, with both layer types.
nlohmann::json builtin_config() {
  return {{"model_type", "qwen3"},       {"vocab_size", 4096},          {"hidden_size", 256},
          {"intermediate_size", 768},    {"num_hidden_layers", 4},      {"num_attention_heads", 8},
          {"num_key_value_heads", 4},    {"head_dim", 64},              {"rms_norm_eps", 1e-6},
          {"rope_parameters", {{"rope_theta", 1000000.0}, {"rope_type", "default"}}},
          {"max_position_embeddings", 4096}, {"tie_word_embeddings", true}, {"hidden_act", "silu"},
          {"use_sliding_window", true},  {"sliding_window", 64},
          {"layer_types", {"full_attention", "sliding_attention", "full_attention", "sliding_attention"}},
          {"dtype", "bfloat16"}};
}

// Loop Attention on a plain config: every layer full attention, IQuest defaults.
nlohmann::json with_loop(nlohmann::json j) {
  j["use_sliding_window"] = false;
  j["sliding_window"] = nullptr;
  j.erase("layer_types");
  j["loop_num"] = 2;
  j["loop_window_size"] = 64;
  j["loop_mode"] = "stack";
  return j;
}

// A named shape or a config file, as JSON (parsed later by the registry of recipes).
std::pair<nlohmann::json, std::string> named_config(const std::string& name) {
  if (name == "qwen3-0.6b" || name == "Qwen3-0.6B") return {io::qwen3_0_6b_config().raw, name};
  if (name == "qwen3-0.6b-loop") return {with_loop(io::qwen3_0_6b_config().raw), name};
  if (name == "qwen3-0.6b-attnres") return {model::open_attnres_0_6b_config(), name};
  if (name == "tiny" || name == "default") return {builtin_config(), name};
  if (name == "tiny-loop") return {with_loop(builtin_config()), name};
  if (name == "tiny-attnres") return {model::with_attnres(builtin_config()), name};
  if (name == "ouro-1.4b") return {model::ouro_1_4b_config(), name};
  if (name == "tiny-ouro") return {model::with_ouro(builtin_config()), name};
  if (name == "hybrid-0.6b") return {model::hybrid_0_6b_config(), name};
  if (name == "tiny-hybrid") return {model::with_hybrid(builtin_config()), name};
  if (name == "lt2-hybrid-1.3b") return {model::lt2_hybrid_1_3b_config(), name};
  if (name == "lt2-gdn-dsa-1.3b") return {model::lt2_gdn_dsa_1_3b_config(), name};
  if (name == "tiny-lt2") return {model::lt2_tiny_config(false), name};
  if (name == "tiny-lt2-dsa") return {model::lt2_tiny_config(true), name};
  if (name == "qwen3-0.6b-rgqa") return {model::qwen3_0_6b_rgqa_config(), name};
  if (name == "qwen3-0.6b-tuneable") return {model::qwen3_0_6b_tuneable_config(), name};
  if (name == "tiny-rgqa") return {model::with_routed_attention(builtin_config(), 1), name};
  if (name == "tiny-tuneable") return {model::with_tuneable_attention(builtin_config()), name};
  if (name.size() > 5 && name.substr(name.size() - 5) == ".json") return {io::read_json_file(name, "config file"), name};
  die("--random: unknown shape '" + name +
      "' (known: qwen3-0.6b, qwen3-0.6b-loop, qwen3-0.6b-attnres, ouro-1.4b, hybrid-0.6b, lt2-hybrid-1.3b, lt2-gdn-dsa-1.3b, "
      "qwen3-0.6b-rgqa, qwen3-0.6b-tuneable, tiny, tiny-loop, tiny-attnres, tiny-ouro, tiny-hybrid, tiny-lt2, tiny-lt2-dsa, "
      "tiny-rgqa, tiny-tuneable, or a config .json file)");
}

// One line on the mechanism a model runs: recipe, passes, the first layer's mixer and (hybrids)
// the first mixer of another kind.
std::string mechanism_summary(const model::Qwen3Model& m) {
  std::string s = "recipe " + m.recipe() + ", " + std::to_string(m.passes()) + (m.passes() == 1 ? " pass" : " passes") +
                  ", " + m.mixer(0).describe();
  for (int l = 1; l < m.num_layers(); ++l)
    if (m.mixer(l).kind() != m.mixer(0).kind()) {
      s += "; layer ";
      s += std::to_string(l);
      s += ": ";
      s += m.mixer(l).describe();
      break;
    }
  if (m.residual_policy().kind() != "sum") s += ", " + m.residual_policy().describe();
  if (m.passes() > 1 && m.stack_policy().kind() == "looped") s += ", " + m.stack_policy().describe();
  return s;
}

// ---- text mode

struct TextArgs {
  std::optional<std::string> prompt;  // --prompt, or the contents of --prompt-file
  std::string prompt_file, tokenizer;
  std::optional<std::int64_t> max_tokens;
  std::vector<std::string> stop;
  bool chat = false, no_think = false, interactive = false, special = false;
  std::optional<std::string> system;
  // Sampling flags given on the command line (unset: the generation_config.json default).
  std::optional<double> temperature, top_p, min_p, repeat_penalty;
  std::optional<std::int64_t> top_k, repeat_last_n;
  std::optional<std::uint64_t> sample_seed;
};

// eos_token_id of a config.json (an integer or a list), as transformers reads it there.
std::vector<std::int64_t> config_eos_ids(const nlohmann::json& raw) {
  std::vector<std::int64_t> ids;
  if (!raw.is_object() || !raw.contains("eos_token_id")) return ids;
  const auto& e = raw.at("eos_token_id");
  if (e.is_number_integer()) ids.push_back(e.get<std::int64_t>());
  if (e.is_array())
    for (const auto& v : e)
      if (v.is_number_integer()) ids.push_back(v.get<std::int64_t>());
  return ids;
}

// --profile: the wall time of each stage of the forward since the last report
// (core/stage_profile.hpp; nested stages are part of their parents), then cleared.
void print_stages(std::FILE* f, const char* what) {
  if (!profile::stage_profile_enabled()) return;
  const auto rows = profile::stage_totals();
  double total = 0;
  for (const auto& r : rows)
    if (r.name == "forward") total = r.seconds;
  std::fprintf(f, "profile (%s): wall time per stage (nested: mixer > attn.*, mlp > mlp.*)\n", what);
  for (const auto& r : rows)
    std::fprintf(f, "  %-18s %10.3f ms %6.1f%% %8lld calls\n", r.name.c_str(), r.seconds * 1e3,
                 total > 0 ? 100.0 * r.seconds / total : 0.0, (long long)r.calls);
  profile::reset_stage_totals();
}

void print_timing(const text::GenerateResult& r) {
  std::fprintf(stderr, "prefill: %.1f tok/s (%lld tokens in %.3f s)\n",
               r.prefill_seconds > 0 ? r.prompt_tokens / r.prefill_seconds : 0.0, (long long)r.prompt_tokens,
               r.prefill_seconds);
  std::fprintf(stderr, "decode: %.1f tok/s (%lld tokens in %.3f s, stop: %s)\n",
               r.decode_seconds > 0 ? r.generated_tokens / r.decode_seconds : 0.0, (long long)r.generated_tokens,
               r.decode_seconds, text::stop_reason_name(r.stop_reason));
}

// Generates text: one prompt, or (interactive) a chat whose turns come from stdin. Only the
// generated text goes to stdout, flushed piece by piece.
void run_text(const model::Qwen3Model& m, const TextArgs& a, const std::string& model_dir, bool allow_unused,
              std::uint64_t seed, std::int64_t chunk, const model::SessionOptions& session_opt,
              const model::ForwardOptions& fo, const model::SessionLimits& limits) {
  namespace fs = std::filesystem;
  std::string tok_path = a.tokenizer;
  if (tok_path.empty()) {
    if (model_dir.empty())
      die("text mode needs a tokenizer: --tokenizer FILE (a tokenizer.json), or a --model directory holding one");
    tok_path = (fs::path(model_dir) / "tokenizer.json").string();
    if (!fs::exists(tok_path)) die(tok_path + ": not found; give the tokenizer with --tokenizer FILE");
  }
  const text::Tokenizer tok = text::Tokenizer::from_file(tok_path);
  std::fprintf(stderr, "tokenizer: %s, %s\n", tok_path.c_str(), tok.describe().c_str());

  // Sampling: generation_config.json, then the flags.
  text::GenerationConfig gc;
  if (!model_dir.empty() && fs::exists(fs::path(model_dir) / "generation_config.json")) {
    auto warn = [](const std::string& msg) { std::fprintf(stderr, "attnkit-qwen3: warning: %s\n", msg.c_str()); };
    gc = text::GenerationConfig::load(model_dir, allow_unused ? std::function<void(const std::string&)>(warn) : nullptr);
    std::fprintf(stderr, "generation config: %s\n", gc.source.c_str());
  }
  text::SamplerOptions so = gc.sampler_options();
  if (a.temperature) so.temperature = *a.temperature;
  if (a.top_k) so.top_k = *a.top_k;
  if (a.top_p) so.top_p = *a.top_p;
  if (a.min_p) so.min_p = *a.min_p;
  if (a.repeat_penalty) so.repeat_penalty = *a.repeat_penalty;
  if (a.repeat_last_n) so.repeat_last_n = *a.repeat_last_n;
  so.seed = a.sample_seed.value_or(seed);
  if (so.greedy() && so.repeat_penalty == 1.0)
    std::fprintf(stderr, "sampling: greedy\n");
  else if (so.greedy())
    std::fprintf(stderr, "sampling: greedy, repeat penalty %g (last %lld)\n", so.repeat_penalty, (long long)so.repeat_last_n);
  else
    std::fprintf(stderr, "sampling: temperature %g, top-k %lld, top-p %g, min-p %g, repeat penalty %g (last %lld), seed %llu\n",
                 so.temperature, (long long)so.top_k, so.top_p, so.min_p, so.repeat_penalty, (long long)so.repeat_last_n,
                 (unsigned long long)so.seed);
  if (so.greedy() && !a.temperature && (a.top_k || a.top_p || a.min_p))
    std::fprintf(stderr, "attnkit-qwen3: note: sampling is greedy (temperature 0 by default); --top-k/--top-p/--min-p "
                         "take effect with --temperature X > 0\n");

  // Stop ids: generation_config.json, config.json and the tokenizer's end markers.
  std::vector<std::int64_t> eos = gc.eos_token_ids;
  for (auto id : config_eos_ids(m.config().raw)) eos.push_back(id);
  for (const char* marker : {"<|im_end|>", "<|endoftext|>"})
    if (auto id = tok.token_to_id(marker)) eos.push_back(*id);
  std::sort(eos.begin(), eos.end());
  eos.erase(std::unique(eos.begin(), eos.end()), eos.end());

  text::GenerateOptions go;
  go.eos_ids = eos;
  go.stop = a.stop;
  go.prefill_chunk = chunk;
  go.skip_special = !a.special;
  text::Generator gen(m, tok, so, session_opt, fo, limits);
  const std::int64_t max_pos = m.config().max_position_embeddings;
  const bool think = !a.no_think;

  auto run_turn = [&](const std::string& prompt_text) {
    const std::vector<text::TokenId> ids = tok.encode(prompt_text);
    // Unless --max-tokens says otherwise: 256, or what the context has left.
    const std::int64_t used = gen.session().position() + static_cast<std::int64_t>(gen.held().size()) +
                              static_cast<std::int64_t>(ids.size());
    go.max_tokens = a.max_tokens.value_or(std::clamp<std::int64_t>(max_pos - used, 0, 256));
    const text::GenerateResult r = gen.generate(std::span<const text::TokenId>(ids), go, [](std::string_view piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    });
    std::fputc('\n', stdout);
    std::fflush(stdout);
    print_timing(r);
    print_stages(stderr, "prefill and decode");
  };

  auto first_turn = [&](const std::string& user) {
    std::vector<text::ChatMessage> msgs;
    if (a.system) msgs.push_back({"system", *a.system});
    msgs.push_back({"user", user});
    return text::apply_qwen3_chat_template(msgs, true, think);
  };
  if (!a.interactive) {
    run_turn(a.chat ? first_turn(*a.prompt) : *a.prompt);
    return;
  }
  // Interactive: the first turn renders the template; later ones continue the cached conversation
  // (the reply's <|im_end|> was sampled, not run: the next turn starts with it).
  const bool tty = isatty(fileno(stdin));
  bool started = false;
  auto turn = [&](const std::string& user) {
    run_turn(started ? text::qwen3_next_turn(user, think) : first_turn(user));
    started = true;
  };
  if (a.prompt) turn(*a.prompt);
  std::string line;
  for (;;) {
    if (tty) std::fputs("> ", stderr);
    if (!std::getline(std::cin, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    turn(line);
  }
}

}  // namespace

// Writes a recorded trace: safetensors to `trace_out`, an SVG to `plot_out` (either may be empty),
// listing each tensor. Dies if nothing was recorded.
void write_trace(const model::Qwen3Model& m, const model::Trace& trace, const std::string& trace_out,
                 const std::string& plot_out, std::int64_t plot_layer, const std::string& label) {
  if (trace.empty()) die("--trace-out/--plot: this model records no internals (recipe " + m.recipe() + ")");
  std::vector<viz::TraceTensor> tensors;
  io::SafetensorsWriter w;
  for (const auto& name : trace.names()) {
    model::Trace::Tensor t = trace.tensor(name);
    w.add_f32(name, t.shape, t.data.data());
    std::string shape;
    for (auto d : t.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    std::printf("trace%s: %s [%s]\n", label.c_str(), name.c_str(), shape.c_str());
    tensors.push_back(std::move(t));
  }
  if (!trace_out.empty()) {
    w.write(trace_out);
    std::printf("trace%s: wrote %s\n", label.c_str(), trace_out.c_str());
  }
  if (!plot_out.empty()) {
    viz::PlotOptions po;
    po.title = m.source() + " — " + mechanism_summary(m) + label;
    po.strip_layer = plot_layer;
    // Per-step logits are data for files, not a picture (a column per vocabulary entry).
    std::erase_if(tensors, [](const viz::TraceTensor& t) { return t.name == "logits_per_step"; });
    viz::write_trace_svg(plot_out, tensors, po);
    std::printf("plot%s: wrote %s\n", label.c_str(), plot_out.c_str());
  }
}

// path with ".seq<b>" before its extension: trace.safetensors -> trace.seq3.safetensors.
std::string per_sequence_path(const std::string& path, std::int64_t b) {
  if (path.empty()) return path;
  const std::size_t slash = path.find_last_of('/'), dot = path.find_last_of('.');
  const std::string tag = ".seq" + std::to_string(b);
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return path + tag;
  return path.substr(0, dot) + tag + path.substr(dot);
}

// What --batch records: per prefilled sequence, its trace over its prompt tokens.
struct BatchTraceOut {
  std::string trace_out, plot_out;
  std::int64_t plot_layer = -1;
  bool wanted() const { return !trace_out.empty() || !plot_out.empty(); }
};

// --batch: B sequences in one batch session. Random prompts (one per sequence) are prefilled
// together; a shared prompt (shared non-empty) is prefilled once and forked. Then `generate`
// greedy ids per sequence, one decode step for all. Prints aggregate tokens/s. With tr.wanted(),
// each prefilled sequence records its own trace (SequenceTokens::trace) over its prompt, written
// to per_sequence_path(tr.trace_out / tr.plot_out, b).
void run_batch(const model::Qwen3Model& m, std::int64_t B, const std::vector<std::int64_t>& shared, std::int64_t T,
               std::int64_t generate, std::int64_t chunk, std::int64_t page_size, std::uint64_t seed,
               const model::SessionOptions& so, const model::SessionLimits& limits, Precision precision,
               const std::optional<model::ExitRule>& exit_rule, const BatchTraceOut& tr) {
  const std::int64_t V = m.config().vocab_size;
  model::BatchOptions bo;
  bo.page_size = page_size;
  const std::int64_t tokens_per_page_set = (T + generate + page_size - 1) / page_size + 1;
  bo.initial_pages = std::max<std::int64_t>(1, (shared.empty() ? B : 1 + B) * tokens_per_page_set);
  model::BatchSession bs = m.new_batch_session(so, bo, limits);
  model::ForwardOptions fo;
  fo.precision = precision;
  fo.exit = exit_rule;
  std::vector<std::vector<std::int64_t>> prompts;
  if (shared.empty()) {
    std::mt19937_64 gen(seed + 1);
    std::uniform_int_distribution<std::int64_t> tok(0, V - 1);
    for (std::int64_t b = 0; b < B; ++b) {
      prompts.emplace_back(static_cast<std::size_t>(T));
      for (auto& t : prompts.back()) t = tok(gen);
    }
  } else {
    prompts.push_back(shared);
  }
  std::vector<std::int64_t> seq;
  for (std::size_t i = 0; i < prompts.size(); ++i) seq.push_back(bs.add());
  // Prefill: every prompt in the same steps (chunks of `chunk` tokens each when set). A looped
  // stack's per-step trace covers the rows whose logits are computed, so tracing one computes
  // them all (as without --batch).
  std::vector<float> logits(static_cast<std::size_t>(B * V));
  std::vector<model::Trace> traces(tr.wanted() ? prompts.size() : 0);
  const bool want_all = tr.wanted() && m.passes() > 1;
  const std::int64_t step = chunk > 0 ? chunk : T;
  std::vector<float> all_rows(want_all ? static_cast<std::size_t>(prompts.size() * std::min(step, T) * V) : 0);
  const auto t0 = Clock::now();
  for (std::int64_t b0 = 0; b0 < T; b0 += step) {
    const std::int64_t n = std::min(step, T - b0), ns = static_cast<std::int64_t>(prompts.size());
    std::vector<model::SequenceTokens> st;
    for (std::size_t i = 0; i < prompts.size(); ++i)
      st.push_back({seq[i], std::span<const std::int64_t>(prompts[i].data() + b0, static_cast<std::size_t>(n)),
                    traces.empty() ? nullptr : &traces[i]});
    if (want_all) {
      fo.logits = model::LogitsRows::all;
      m.forward_batch(bs, st, View2<float>(all_rows.data(), {ns * n, V}), fo);
      for (std::int64_t i = 0; i < ns; ++i)  // each sequence's last row
        std::copy_n(all_rows.data() + ((i + 1) * n - 1) * V, V, logits.data() + i * V);
    } else {
      fo.logits = model::LogitsRows::last;
      m.forward_batch(bs, st, View2<float>(logits.data(), {ns, V}), fo);
    }
  }
  const double in_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const std::int64_t prefilled = static_cast<std::int64_t>(prompts.size()) * T;
  std::printf("batch: %lld sequences, pages of %lld tokens%s\n", (long long)B, (long long)page_size,
              shared.empty() ? "" : ", one shared prompt prefilled once and forked");
  std::printf("prefill: %.1f tok/s (%lld tokens of %zu sequences in %.3f s)\n", prefilled / in_s, (long long)prefilled,
              prompts.size(), in_s);
  print_stages(stdout, "prefill");
  for (std::size_t i = 0; i < traces.size(); ++i)
    write_trace(m, traces[i], per_sequence_path(tr.trace_out, static_cast<std::int64_t>(i)),
                per_sequence_path(tr.plot_out, static_cast<std::int64_t>(i)), tr.plot_layer,
                " (sequence " + std::to_string(i) + ")");
  if (!shared.empty()) {  // the others continue from the first one's pages
    for (std::int64_t b = 1; b < B; ++b) seq.push_back(bs.fork(seq[0]));
    for (std::int64_t b = 1; b < B; ++b) std::copy(logits.begin(), logits.begin() + V, logits.begin() + b * V);
  }
  // Pages in use per pool (the full-attention pool first; a sliding window's pool frees the
  // pages below its window as sequences advance).
  const auto windows = bs.pool_windows();
  std::vector<std::int64_t> pages_after_prefill;
  for (auto w : windows) pages_after_prefill.push_back(bs.pages_in_use(w));
  const auto pool_name = [](std::int64_t w) { return w ? " (window " + std::to_string(w) + ")" : std::string(); };
  if (generate <= 0) {
    for (std::size_t i = 0; i < windows.size(); ++i)
      std::printf("pages%s: %lld in use\n", pool_name(windows[i]).c_str(), (long long)pages_after_prefill[i]);
    return;
  }
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(B));
  std::vector<std::int64_t> next(static_cast<std::size_t>(B));
  const auto tg = Clock::now();
  for (std::int64_t g = 0; g < generate; ++g) {
    for (std::int64_t b = 0; b < B; ++b) {
      next[b] = ops::argmax(logits.data() + b * V, V);
      out[b].push_back(next[b]);
    }
    if (g + 1 == generate) break;
    std::vector<model::SequenceTokens> st;
    for (std::int64_t b = 0; b < B; ++b) st.push_back({seq[b], std::span<const std::int64_t>(&next[b], 1)});
    fo.logits = model::LogitsRows::last;
    m.forward_batch(bs, st, View2<float>(logits.data(), {B, V}), fo);
  }
  const double gs = std::chrono::duration<double>(Clock::now() - tg).count();
  for (std::int64_t b = 0; b < std::min<std::int64_t>(B, 4); ++b) {
    std::printf("generated[%lld]:", (long long)b);
    for (auto id : out[b]) std::printf(" %lld", (long long)id);
    std::printf("\n");
  }
  if (B > 4) std::printf("generated[4..%lld]: not shown\n", (long long)B - 1);
  if (generate > 1)
    std::printf("decode: %.1f tok/s (%lld tokens in %.3f s, %lld sequences per step)\n", B * (generate - 1) / gs,
                (long long)(B * (generate - 1)), gs, (long long)B);
  print_stages(stdout, "decode");
  for (std::size_t i = 0; i < windows.size(); ++i)
    std::printf("pages%s: %lld in use after prefill, %lld now, of %lld (%lld tokens each)\n", pool_name(windows[i]).c_str(),
                (long long)pages_after_prefill[i], (long long)bs.pages_in_use(windows[i]),
                (long long)bs.pool_pages(windows[i]), (long long)page_size);
}

int main(int argc, char** argv) {
  std::string model_dir, random_name, dtype = "bf16", ids_arg, ids_from, logits_out, trace_out, plot_out, loop_mode;
  std::string attnres_mode, attnres_form;
  std::optional<model::ExitRule> exit_rule;
  std::int64_t loops = 0;
  std::int64_t plot_layer = -1;
  std::int64_t loop_window = 0;
  bool allow_unused = false;
  std::int64_t prompt_len = -1, generate = -1, chunk = 0, seed = 0, batch = 0, page_size = 0;
  int threads = 0;
  bool decode = false, ids_given = false, allow_long = false;
  std::uint64_t max_memory = 0;
  Precision precision = Precision::exact;
  model::CacheType kv = model::CacheType::f32;
  TextArgs ta;
  bool text_only_flag = false;  // a text or sampling option was given

  std::vector<std::string> args(argv + 1, argv + argc);
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) die(a + ": missing value");
      // "--ids --generate 4": the next option is not this one's value (free text may start with --).
      const bool text = a == "--prompt" || a == "--stop" || a == "--system";
      if (!text && args[i + 1].rfind("--", 0) == 0 && args[i + 1].size() > 2)
        die(a + ": missing value (next is the option '" + args[i + 1] + "')");
      return args[++i];
    };
    for (const char* f : {"--tokenizer", "--max-tokens", "--stop", "--chat", "--system", "--no-think", "--special",
                          "--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--repeat-last-n",
                          "--sample-seed"})
      text_only_flag = text_only_flag || a == f;
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--model") model_dir = value();
    else if (a == "--random") random_name = value();
    else if (a == "--dtype") {
      dtype = value();
      if (dtype != "f32" && dtype != "bf16" && dtype != "q8") die("--dtype: expected f32, bf16 or q8, got '" + dtype + "'");
    } else if (a == "--seed") seed = parse_int(value(), "--seed");
    else if (a == "--ids") {
      ids_arg = value();
      ids_given = true;
    }
    else if (a == "--ids-from") ids_from = value();
    else if (a == "--prompt-len") prompt_len = parse_int(value(), "--prompt-len", 1, kMaxTokens);
    else if (a == "--max-memory") max_memory = parse_bytes(value(), "--max-memory");
    else if (a == "--allow-long-context") allow_long = true;
    else if (a == "--logits-out") logits_out = value();
    else if (a == "--trace-out") trace_out = value();
    else if (a == "--plot") plot_out = value();
    else if (a == "--plot-layer") plot_layer = parse_int(value(), "--plot-layer", 0, 1 << 20);
    else if (a == "--loop-mode") {
      loop_mode = value();
      if (loop_mode != "stack" && loop_mode != "layer") die("--loop-mode: expected stack or layer, got '" + loop_mode + "'");
    } else if (a == "--loop-window") loop_window = parse_int(value(), "--loop-window", 1, kMaxTokens);
    else if (a == "--attnres-mode") {
      attnres_mode = value();
      if (attnres_mode != "block" && attnres_mode != "full" && attnres_mode != "delta" && attnres_mode != "delta_block")
        die("--attnres-mode: expected block, full, delta or delta_block, got '" + attnres_mode + "'");
    } else if (a == "--loops") loops = parse_int(value(), "--loops", 1, 1024);
    else if (a == "--exit") {
      const std::string r = value();
      try {
        if (r == "last") exit_rule = model::ExitRule::last();
        else if (r == "expected") exit_rule = model::ExitRule::expected();
        else if (r.rfind("step:", 0) == 0)
          exit_rule = model::ExitRule::at_step(static_cast<int>(parse_int(r.substr(5), "--exit step:N", 0, 1 << 20)));
        else if (r.rfind("threshold:", 0) == 0) {
          const double q = parse_number(r.substr(10), "--exit threshold:Q");
          if (!(q > 0 && q <= 1)) die("--exit threshold:Q: Q must be in (0, 1], got " + r.substr(10));
          exit_rule = model::ExitRule::at_threshold(q);
        }
        else throw std::invalid_argument(r);
      } catch (const std::exception&) {
        die("--exit: expected last, step:N, threshold:Q or expected, got '" + r + "'");
      }
    } else if (a == "--attnres-form") {
      attnres_form = value();
      if (attnres_form != "open" && attnres_form != "kimi") die("--attnres-form: expected open or kimi, got '" + attnres_form + "'");
    }
    else if (a == "--prompt") ta.prompt = value();
    else if (a == "--prompt-file") ta.prompt_file = value();
    else if (a == "--tokenizer") ta.tokenizer = value();
    else if (a == "--max-tokens") ta.max_tokens = parse_int(value(), "--max-tokens", 0, kMaxTokens);
    else if (a == "--stop") {
      ta.stop.push_back(value());
      if (ta.stop.back().empty()) die("--stop: empty text");
    } else if (a == "--chat") ta.chat = true;
    else if (a == "--system") ta.system = value();
    else if (a == "--no-think") ta.no_think = true;
    else if (a == "--interactive") ta.interactive = ta.chat = true;
    else if (a == "--special") ta.special = true;
    else if (a == "--temperature") {
      ta.temperature = parse_number(value(), "--temperature");
      if (*ta.temperature < 0) die("--temperature: must be >= 0, got " + args[i]);
    } else if (a == "--top-k") ta.top_k = parse_int(value(), "--top-k", 0, kMaxTokens);
    else if (a == "--top-p") {
      ta.top_p = parse_number(value(), "--top-p");
      if (!(*ta.top_p > 0 && *ta.top_p <= 1)) die("--top-p: must be in (0, 1], got " + args[i]);
    } else if (a == "--min-p") {
      ta.min_p = parse_number(value(), "--min-p");
      if (!(*ta.min_p >= 0 && *ta.min_p <= 1)) die("--min-p: must be in [0, 1], got " + args[i]);
    } else if (a == "--repeat-penalty") {
      ta.repeat_penalty = parse_number(value(), "--repeat-penalty");
      if (!(*ta.repeat_penalty > 0)) die("--repeat-penalty: must be > 0, got " + args[i]);
    } else if (a == "--repeat-last-n") ta.repeat_last_n = parse_int(value(), "--repeat-last-n", -1, kMaxTokens);
    else if (a == "--sample-seed") ta.sample_seed = static_cast<std::uint64_t>(parse_int(value(), "--sample-seed"));
    else if (a == "--allow-unused") allow_unused = true;
    else if (a == "--decode") decode = true;
    else if (a == "--profile") profile::enable_stage_profile(true);
    else if (a == "--chunk") chunk = parse_int(value(), "--chunk", 1, kMaxTokens);
    else if (a == "--batch") batch = parse_int(value(), "--batch", 1, 1 << 16);
    else if (a == "--page-size") page_size = parse_int(value(), "--page-size", 1, 1 << 20);
    else if (a == "--generate") generate = parse_int(value(), "--generate", 0, kMaxTokens);
    else if (a == "--threads") threads = static_cast<int>(parse_int(value(), "--threads", 1, 4096));
    else if (a == "--precision") {
      const std::string p = value();
      if (p == "exact") precision = Precision::exact;
      else if (p == "fast") precision = Precision::fast;
      else die("--precision: expected exact or fast, got '" + p + "'");
    } else if (a == "--kv-cache") {
      const std::string p = value();
      if (p == "f32") kv = model::CacheType::f32;
      else if (p == "bf16") kv = model::CacheType::bf16;
      else if (p == "int8") kv = model::CacheType::int8;
      else die("--kv-cache: expected f32, bf16 or int8, got '" + p + "'");
    } else die("unknown option '" + a + "' (see --help)");
  }
  if (!model_dir.empty() && !random_name.empty()) die("--model and --random exclude each other");
  if (ids_given + (!ids_from.empty()) + (prompt_len > 0) > 1)
    die("give at most one of --ids, --ids-from, --prompt-len");
  if (decode && chunk > 0) die("--decode and --chunk exclude each other");
  if (plot_layer >= 0 && plot_out.empty()) die("--plot-layer needs --plot");
  if (page_size > 0 && batch == 0) die("--page-size needs --batch");
  if (page_size > 0 && (page_size & (page_size - 1)) != 0) die("--page-size: must be a power of two, got " + std::to_string(page_size));
  if (batch > 0 && !logits_out.empty())
    die("--batch runs many sequences: --logits-out records one (run without --batch)");
  if (!model_dir.empty() && (!loop_mode.empty() || loop_window > 0 || !attnres_mode.empty() || !attnres_form.empty() || loops > 0))
    die("--loop-mode, --loop-window, --attnres-mode, --attnres-form and --loops shape random models; a checkpoint runs as "
        "its config.json says");
  const bool text_mode = ta.prompt || !ta.prompt_file.empty() || ta.interactive;
  if (ta.prompt && !ta.prompt_file.empty()) die("--prompt and --prompt-file exclude each other");
  if (text_mode) {
    if (ids_given || !ids_from.empty() || prompt_len > 0)
      die("--ids, --ids-from and --prompt-len give token ids; a text prompt (--prompt, --prompt-file, --interactive) "
          "excludes them");
    if (generate >= 0) die("--generate counts greedy ids; with a text prompt use --max-tokens N");
    if (decode || batch > 0 || !logits_out.empty() || !trace_out.empty() || !plot_out.empty())
      die("--decode, --batch, --logits-out, --trace-out and --plot run on token ids, not with a text prompt");
    if (!ta.chat && (ta.system || ta.no_think)) die("--system and --no-think shape the chat template: add --chat");
    if (!ta.prompt_file.empty()) {
      std::ifstream in(ta.prompt_file, std::ios::binary);
      if (!in) die("--prompt-file: cannot open '" + ta.prompt_file + "'");
      std::ostringstream ss;
      ss << in.rdbuf();
      ta.prompt = ss.str();
    }
  } else if (text_only_flag) {
    die("text and sampling options (--tokenizer, --max-tokens, --stop, --chat, --system, --no-think, --special, "
        "--temperature, --top-k, --top-p, --min-p, --repeat-penalty, --repeat-last-n, --sample-seed) need "
        "--prompt TEXT, --prompt-file F or --interactive");
  }
  if (threads > 0) omp_set_num_threads(threads);
  const int nthreads = default_num_threads();

  try {
    // ---- model
    const auto t_load = Clock::now();
    const bool builtin = model_dir.empty() && random_name.empty();
    const auto wtype = dtype == "f32" ? model::WeightType::f32 : dtype == "q8" ? model::WeightType::q8 : model::WeightType::bf16;
    const model::Registry registry = model::default_registry();
    model::LoadOptions lo;
    lo.registry = &registry;
    if (allow_unused) lo.unused = model::Unused::warn;
    if (wtype == model::WeightType::q8) lo.weights = wtype;  // a checkpoint keeps its type otherwise
    model::Qwen3Model m = [&] {
      if (!model_dir.empty()) return model::Qwen3Model::load(model_dir, lo);
      auto [j, where] = builtin ? std::pair{builtin_config(), std::string("built-in default")} : named_config(random_name);
      if (!loop_mode.empty() || loop_window > 0) {
        if (!model::is_loop_config(registry.parse_config(j, where))) j = with_loop(std::move(j));
        if (!loop_mode.empty()) j["loop_mode"] = loop_mode;
        if (loop_window > 0) j["loop_window_size"] = loop_window;
      }
      if (!attnres_mode.empty() || !attnres_form.empty()) {
        if (j.value("model_type", "") != "qwen3_attnres") j = model::with_attnres(std::move(j));
        if (!attnres_mode.empty()) j["attnres_mode"] = attnres_mode;
        if (!attnres_form.empty()) j["attnres_form"] = attnres_form;
      }
      if (loops > 0) j["loop_count"] = loops;
      return model::Qwen3Model::random(registry.parse_config(j, where), wtype, static_cast<std::uint64_t>(seed), &registry);
    }();
    const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
    const auto& c = m.config();
    std::int64_t sliding = 0;
    for (auto& t : c.layer_types) sliding += t == io::LayerType::sliding_attention;
    FILE* info = text_mode ? stderr : stdout;  // in text mode stdout carries only the generated text
    std::fprintf(info, "model: %s%s\n", builtin ? "built-in default, " : "", m.source().c_str());
    std::fprintf(info, "  %lld layers (%lld sliding, window %lld), hidden %lld, heads %lld/%lld kv, head_dim %lld, "
                "intermediate %lld, vocab %lld, %s weights, %.1f MB packed, %s embeddings, built in %.2f s\n",
                (long long)c.num_hidden_layers, (long long)sliding, (long long)c.sliding_window.value_or(0),
                (long long)c.hidden_size, (long long)c.num_attention_heads, (long long)c.num_key_value_heads,
                (long long)c.head_dim, (long long)c.intermediate_size, (long long)c.vocab_size,
                model::weight_type_name(m.weight_type()), m.weight_bytes() / 1e6,
                c.tie_word_embeddings ? "tied" : "untied", load_s);
    std::fprintf(info, "  %s\n", mechanism_summary(m).c_str());
    std::fprintf(info, "  threads %d, precision %s, kv cache %s\n", nthreads, precision == Precision::exact ? "exact" : "fast",
                kv == model::CacheType::f32 ? "f32" : kv == model::CacheType::bf16 ? "bf16" : "int8");

    if (text_mode) {
      model::SessionOptions so;
      so.kv_type = kv;
      model::ForwardOptions fo;
      fo.precision = precision;
      fo.exit = exit_rule;
      model::SessionLimits limits;  // --max-memory and --allow-long-context apply to the conversation too
      limits.max_memory_bytes = max_memory;
      limits.allow_beyond_max_positions = allow_long;
      run_text(m, ta, model_dir, allow_unused, static_cast<std::uint64_t>(seed), chunk, so, fo, limits);
      return 0;
    }

    // ---- input ids
    std::vector<std::int64_t> ids;
    if (ids_given) ids = parse_ids(ids_arg);
    else if (!ids_from.empty()) {
      const auto colon = ids_from.rfind(':');
      if (colon == std::string::npos || colon == 0 || colon + 1 == ids_from.size())
        die("--ids-from: expected FILE.safetensors:TENSOR, got '" + ids_from + "'");
      auto f = io::SafetensorsFile::open(ids_from.substr(0, colon));
      ids = io::to_i64(f.tensor(ids_from.substr(colon + 1)));
      if (ids.empty()) die("--ids-from: tensor '" + ids_from.substr(colon + 1) + "' is empty");
    }
    const std::int64_t T = ids.empty() ? (prompt_len > 0 ? prompt_len : 32) : static_cast<std::int64_t>(ids.size());
    const std::int64_t V = c.vocab_size;
    for (std::int64_t t = 0; t < static_cast<std::int64_t>(ids.size()); ++t)
      if (ids[t] < 0 || ids[t] >= V)
        die("token id " + std::to_string(ids[t]) + " at index " + std::to_string(t) + " outside the vocabulary [0, " +
            std::to_string(V) + ")");
    if (builtin && generate < 0) generate = 16;
    const std::int64_t positions = T + std::max<std::int64_t>(generate, 0);
    const bool want_all = !logits_out.empty() || ((!trace_out.empty() || !plot_out.empty()) && m.passes() > 1);

    // ---- checks before anything large is allocated: positions, then memory
    model::SessionOptions so;
    so.kv_type = kv;
    so.reserve_tokens = positions;
    model::SessionLimits limits;
    limits.max_memory_bytes = max_memory;
    limits.allow_beyond_max_positions = allow_long;
    const std::int64_t max_pos = c.max_position_embeddings;
    if (max_pos > 0 && positions > max_pos) {
      const std::string what = std::to_string(T) + " input tokens" +
                               (generate > 0 ? " + " + std::to_string(generate) + " generated" : std::string()) + " = " +
                               std::to_string(positions) + " positions";
      if (!allow_long)
        die(what + " exceed the model's max_position_embeddings " + std::to_string(max_pos) +
            "; add --allow-long-context to run beyond the trained range anyway");
      std::fprintf(stderr, "attnkit-qwen3: note: %s run beyond the model's max_position_embeddings %lld (--allow-long-context)\n",
                   what.c_str(), (long long)max_pos);
    }
    const std::int64_t step = decode ? 1 : chunk > 0 ? std::min(chunk, T) : T;
    const std::uint64_t io_bytes =
        add_bytes(mul_bytes(T, sizeof(std::int64_t)), mul_bytes(want_all ? T : 1, V, sizeof(float)));
    m.require_memory_for(positions, step, so, limits, "a session of " + std::to_string(positions) + " positions", io_bytes);
    if (ids.empty()) {
      std::mt19937_64 gen(static_cast<std::uint64_t>(seed) + 1);
      std::uniform_int_distribution<std::int64_t> tok(0, c.vocab_size - 1);
      ids.resize(static_cast<std::size_t>(T));
      for (auto& t : ids) t = tok(gen);
    }

    if (batch > 0) {
      so.reserve_tokens = 0;
      run_batch(m, batch, ids_given || !ids_from.empty() ? ids : std::vector<std::int64_t>{}, T, std::max<std::int64_t>(generate, 0),
                decode ? 1 : chunk, page_size > 0 ? page_size : 16, static_cast<std::uint64_t>(seed), so, limits, precision,
                exit_rule, BatchTraceOut{trace_out, plot_out, plot_layer});
      return 0;
    }

    // ---- run
    model::Session s = m.new_session(so, limits);
    model::ForwardOptions fo;
    fo.precision = precision;
    fo.exit = exit_rule;
    model::Trace trace;
    if (!trace_out.empty() || !plot_out.empty()) fo.trace = &trace;
    // Per-step traces of a looped stack cover the tokens whose logits are computed: all of them (want_all).
    std::vector<float> logits(static_cast<std::size_t>((want_all ? T : 1) * V));
    const auto t0 = Clock::now();
    if (decode) {
      fo.logits = model::LogitsRows::last;
      for (std::int64_t t = 0; t < T; ++t) {
        float* row = logits.data() + (want_all ? t : 0) * V;
        m.forward(s, std::span<const std::int64_t>(&ids[t], 1), View2<float>(row, {1, V}), fo);
      }
    } else {
      const std::int64_t step = chunk > 0 ? chunk : T;
      for (std::int64_t b = 0; b < T; b += step) {
        const std::int64_t n = std::min(step, T - b);
        const bool last = b + n == T;
        fo.logits = want_all ? model::LogitsRows::all : (last ? model::LogitsRows::last : model::LogitsRows::none);
        View2<float> out = want_all ? View2<float>(logits.data() + b * V, {n, V})
                                    : (last ? View2<float>(logits.data(), {1, V}) : View2<float>());
        m.forward(s, std::span<const std::int64_t>(ids.data() + b, static_cast<std::size_t>(n)), out, fo);
      }
    }
    const double in_s = std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf("%s: %.1f tok/s (%lld tokens in %.3f s)\n", decode ? "decode" : "prefill", T / in_s, (long long)T, in_s);
    print_stages(stdout, decode ? "decode" : "prefill");

    fo.trace = nullptr;  // the trace covers the input tokens
    if (!trace_out.empty() || !plot_out.empty()) write_trace(m, trace, trace_out, plot_out, plot_layer, "");

    if (!logits_out.empty()) {
      io::SafetensorsWriter w;
      w.add_f32("logits", {T, V}, logits.data());
      w.write(logits_out);
      std::printf("logits: wrote [%lld, %lld] to %s\n", (long long)T, (long long)V, logits_out.c_str());
    }

    if (generate > 0) {
      std::vector<float> row(logits.end() - V, logits.end());  // logits of the last input token
      const auto tg = Clock::now();
      const std::vector<std::int64_t> gen = model::continue_greedy(m, s, row, generate, fo);
      const double gs = std::chrono::duration<double>(Clock::now() - tg).count();
      std::printf("generated:");
      for (auto g : gen) std::printf(" %lld", (long long)g);
      std::printf("\n");
      if (generate > 1) std::printf("decode: %.1f tok/s (%lld tokens in %.3f s)\n", (generate - 1) / gs, (long long)(generate - 1), gs);
      print_stages(stdout, "generation");
    }
  } catch (const std::exception& e) {
    die(e.what(), kRuntimeError);
  }
  return 0;
}
