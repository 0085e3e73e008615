// attnkit-op's input reader, shared by the program and its fuzzer (fuzz/fuzz_op_input.cpp): the
// table of ops (tensors with symbolic shapes, options), the command-line parser and the runner
// that reads, checks and converts the input tensors and calls the kernel. Limits cap the sizes a
// run may allocate, for untrusted input.
#pragma once
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/attention/variant.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/io/safetensors.hpp"
#include "attnkit/recurrent/gated_delta.hpp"
#include "attnkit/recurrent/gated_norm.hpp"
#include "attnkit/recurrent/linear_attention.hpp"
#include "attnkit/recurrent/short_conv.hpp"
#include "attnkit/sparse/indexer.hpp"
#include "attnkit/sparse/sparse_attention.hpp"

using namespace attnkit;

namespace {

// A bad command line or input: reported like attnkit::Error (exit code 2).
[[noreturn]] void fail(const std::string& msg) { throw Error(msg); }

// A tensor's shape as symbols ("T", "H_k"), "NAME-1", or fixed sizes ("1").
using Pattern = std::vector<std::string>;

std::string pattern_string(const Pattern& p) {
  std::string s = "[";
  for (std::size_t i = 0; i < p.size(); ++i) s += (i ? ", " : "") + p[i];
  return s + "]";
}

struct TensorSpec {
  std::string name;
  std::vector<Pattern> shapes;  // accepted shapes (the first one is shown first in --help)
  bool optional = false;
  std::string note;  // shown in --help
  TensorSpec(std::string n, std::vector<Pattern> s, bool opt = false, std::string nt = {})
      : name(std::move(n)), shapes(std::move(s)), optional(opt), note(std::move(nt)) {}
};

struct OptionSpec {
  std::string name;   // "--chunk"
  std::string value;  // "N"; empty for a flag
  std::string help;
};

class Run;

// Caps for runs on untrusted input (the fuzzer): elements per input or output tensor and threads.
// 0: no cap.
struct Limits {
  std::int64_t max_elements = 0;
  int max_threads = 0;
};

struct Op {
  std::string name, summary;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<OptionSpec> options;
  std::function<void(Run&)> run;
};

struct Loaded {
  std::vector<float> data;
  std::vector<std::int64_t> shape;
};

// One invocation: the op, the input file, the options given, the sizes bound so far and the
// outputs written.
class Run {
 public:
  Run(const Op& op, const io::SafetensorsFile& in, std::map<std::string, std::string> opts, Limits limits = {})
      : op_(op), in_(in), opts_(std::move(opts)), limits_(limits) {}

  // Refuses a buffer of n elements beyond the limit (before it is allocated).
  void check_size(std::int64_t n, const std::string& what) const {
    if (limits_.max_elements > 0 && n > limits_.max_elements)
      fail(op_.name + ": " + what + ": " + std::to_string(n) + " elements exceed this run's limit of " +
           std::to_string(limits_.max_elements));
  }

  const std::string& op_name() const { return op_.name; }
  const Op& op() const { return op_; }

  bool has(const std::string& name) const { return in_.contains(name); }

  // Reads an input tensor of the op's table, converted to float32, checking its shape against
  // the sizes bound by earlier tensors (and binding the new ones).
  Loaded& input(const std::string& name) {
    if (auto it = loaded_.find(name); it != loaded_.end()) return it->second;
    const TensorSpec& spec = input_spec(name);
    if (!in_.contains(name)) {
      std::string have;
      for (const auto& n : in_.names()) have += (have.empty() ? "" : ", ") + n;
      fail(op_.name + ": missing tensor '" + name + "' " + pattern_string(spec.shapes[0]) + " in " + in_.path() +
           " (it has: " + (have.empty() ? "no tensors" : have) + ")");
    }
    const io::TensorInfo& t = in_.tensor(name);
    if (!io::is_float_dtype(t.dtype))
      fail(op_.name + ": tensor '" + name + "': dtype " + io::dtype_name(t.dtype) +
           " is not a float type (F32, BF16, F16, F64)");
    bind(name, spec, t.shape);
    std::int64_t n = 1;
    for (auto s : t.shape) n = s > 0 && n > INT64_MAX / s ? INT64_MAX : n * s;
    check_size(n, "tensor '" + name + "'");
    Loaded& l = loaded_[name];
    l.shape = t.shape;
    l.data = io::to_f32(t);
    return l;
  }
  std::optional<std::reference_wrapper<Loaded>> optional_input(const std::string& name) {
    if (!has(name)) return std::nullopt;
    return std::ref(input(name));
  }

  std::int64_t dim(const std::string& sym) const {
    auto it = dims_.find(sym);
    if (it == dims_.end()) fail(op_.name + ": internal: size '" + sym + "' is not bound yet");
    return it->second;
  }
  // Sizes not read from a tensor (e.g. the output head count of linear attention).
  void set_dim(const std::string& sym, std::int64_t v, const std::string& why) {
    dims_[sym] = v;
    why_[sym] = why;
  }

  // A float32 output of the given shape, written to --out at the end.
  float* output(const std::string& name, std::vector<std::int64_t> shape) {
    std::int64_t n = 1;
    for (auto s : shape) {
      if (s < 0) fail(op_.name + ": output '" + name + "': shape " + io::shape_string(shape) + " has a negative size");
      n *= s;
    }
    check_size(n, "output '" + name + "'");
    auto& o = outputs_[name];
    o.shape = std::move(shape);
    o.data.assign(static_cast<std::size_t>(n), 0.f);
    return o.data.data();
  }
  const std::map<std::string, Loaded>& outputs() const { return outputs_; }
  // An integer output (written as I64), e.g. selected key indices.
  std::vector<std::int64_t>& int_output(const std::string& name, std::vector<std::int64_t> shape) {
    std::int64_t n = 1;
    for (auto s : shape) {
      if (s < 0) fail(op_.name + ": output '" + name + "': shape " + io::shape_string(shape) + " has a negative size");
      n *= s;
    }
    check_size(n, "output '" + name + "'");
    auto& o = int_outputs_[name];
    o.first = std::move(shape);
    o.second.assign(static_cast<std::size_t>(n), 0);
    return o.second;
  }
  const std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>>& int_outputs() const {
    return int_outputs_;
  }

  // Options (validated against the op's table before the run).
  bool flag(const std::string& name) const { return opts_.count(name) != 0; }
  std::optional<std::string> value(const std::string& name) const {
    auto it = opts_.find(name);
    return it == opts_.end() ? std::nullopt : std::optional<std::string>(it->second);
  }
  std::int64_t integer(const std::string& name, std::int64_t dflt, std::int64_t lo,
                       std::int64_t hi = std::numeric_limits<std::int64_t>::max()) const {
    const auto v = value(name);
    if (!v) return dflt;
    std::size_t pos = 0;
    long long x = 0;
    try {
      x = std::stoll(*v, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (pos == 0 || pos != v->size()) fail(name + ": not an integer: '" + *v + "'");
    if (x < lo) fail(name + ": must be >= " + std::to_string(lo) + ", got " + *v);
    if (x > hi) fail(name + ": must be <= " + std::to_string(hi) + ", got " + *v);
    return x;
  }
  float real(const std::string& name, float dflt) const {
    const auto v = value(name);
    if (!v) return dflt;
    std::size_t pos = 0;
    float x = 0;
    try {
      x = std::stof(*v, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (pos == 0 || pos != v->size() || !std::isfinite(x)) fail(name + ": not a finite number: '" + *v + "'");
    return x;
  }
  // One of `choices`; the first is the default.
  std::string choice(const std::string& name, const std::vector<std::string>& choices) const {
    const auto v = value(name);
    if (!v) return choices[0];
    for (const auto& c : choices)
      if (*v == c) return c;
    std::string list;
    for (std::size_t i = 0; i < choices.size(); ++i) list += (i ? (i + 1 == choices.size() ? " or " : ", ") : "") + choices[i];
    fail(name + ": expected " + list + ", got '" + *v + "'");
  }
  // An option without a default (checked before any tensor is read).
  std::int64_t required_integer(const std::string& name, std::int64_t lo) const {
    if (!value(name)) {
      std::string arg = name;
      for (const auto& o : op_.options)
        if (o.name == name && !o.value.empty()) arg += " " + o.value;
      fail(op_.name + ": " + arg + " is required");
    }
    return integer(name, 0, lo);
  }
  int threads() const {
    const int t = static_cast<int>(integer("--threads", 0, 0, 4096));
    return limits_.max_threads > 0 ? std::min(t == 0 ? limits_.max_threads : t, limits_.max_threads) : t;
  }

 private:
  const TensorSpec& input_spec(const std::string& name) const {
    for (const auto& s : op_.inputs)
      if (s.name == name) return s;
    fail(op_.name + ": internal: tensor '" + name + "' is not in the op's table");
  }

  // Matches `shape` against one of the spec's patterns; binds new symbols. The error names the
  // tensor, the dimension and whichever tensor fixed the size it disagrees with.
  void bind(const std::string& name, const TensorSpec& spec, const std::vector<std::int64_t>& shape) {
    std::string why;
    for (const Pattern& p : spec.shapes) {
      if (p.size() != shape.size()) {  // a reason from a pattern of the right rank says more
        if (why.empty()) why = "rank " + std::to_string(shape.size()) + ", expected " + pattern_string(p);
        continue;
      }
      std::map<std::string, std::int64_t> fresh;
      std::string err;
      for (std::size_t i = 0; i < p.size() && err.empty(); ++i) {
        std::string sym = p[i];
        std::int64_t offset = 0;
        if (sym.size() > 2 && sym.compare(sym.size() - 2, 2, "-1") == 0) sym.resize(sym.size() - 2), offset = 1;
        const std::int64_t got = shape[i] + offset;  // the symbol's value implied by this dimension
        if (!sym.empty() && std::isdigit(static_cast<unsigned char>(sym[0]))) {
          if (shape[i] != std::stoll(sym)) err = "dimension " + std::to_string(i) + " is " + std::to_string(shape[i]) + ", expected " + sym;
          continue;
        }
        std::optional<std::int64_t> known;
        std::string source;
        if (auto it = dims_.find(sym); it != dims_.end()) known = it->second, source = why_.at(sym);
        else if (auto jt = fresh.find(sym); jt != fresh.end()) known = jt->second, source = "'" + name + "'";
        if (known && *known != got)
          err = "dimension " + std::to_string(i) + " (" + p[i] + ") is " + std::to_string(shape[i]) + ", but " + p[i] +
                " = " + std::to_string(*known - offset) + " (set by " + source + ")";
        else
          fresh[sym] = got;
      }
      if (err.empty()) {
        for (const auto& [s, v] : fresh)
          if (!dims_.count(s)) dims_[s] = v, why_[s] = "'" + name + "'";
        return;
      }
      if (why.empty() || why.rfind("rank ", 0) == 0) why = err;
    }
    std::string shapes;
    for (std::size_t i = 0; i < spec.shapes.size(); ++i) shapes += (i ? " or " : "") + pattern_string(spec.shapes[i]);
    fail(op_.name + ": tensor '" + name + "': shape " + io::shape_string(shape) + ": " + why +
         (spec.shapes.size() > 1 ? " (accepted: " + shapes + ")" : ""));
  }

  const Op& op_;
  const io::SafetensorsFile& in_;
  std::map<std::string, std::string> opts_;
  Limits limits_;
  std::map<std::string, std::int64_t> dims_;
  std::map<std::string, std::string> why_;  // which tensor fixed each size
  std::map<std::string, Loaded> loaded_;
  std::map<std::string, Loaded> outputs_;
  std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> int_outputs_;  // shape, data
};

// Views over loaded tensors (row-major contiguous).
ConstView1<float> view1(const Loaded& t) { return ConstView1<float>(t.data.data(), {t.shape[0]}); }
ConstView2<float> view2(const Loaded& t) { return ConstView2<float>(t.data.data(), {t.shape[0], t.shape[1]}); }
ConstView3<float> view3(const Loaded& t) {
  return ConstView3<float>(t.data.data(), {t.shape[0], t.shape[1], t.shape[2]});
}

const OptionSpec kThreads{"--threads", "N", "OpenMP threads (default: OMP_NUM_THREADS or all cores)"};
const OptionSpec kIndexerPrecision{"--precision", "exact|fast",
                                   "fast: int8 index vectors scored on VNNI (as DeepSeek's FP8 indexer), for 16 or more "
                                   "queries (default exact)"};
const OptionSpec kScale{"--scale", "X", "score scale (default d_k^-1/2)"};

// ---- the ops ------------------------------------------------------------------------------------

void run_gated_delta(Run& r) {
  const Loaded &q = r.input("q"), &k = r.input("k"), &v = r.input("v"), &g = r.input("g"), &beta = r.input("beta");
  const std::int64_t T = r.dim("T"), Hv = r.dim("H_v"), dk = r.dim("d_k"), dv = r.dim("d_v");
  float* state = r.output("final_state", {Hv, dk, dv});
  if (auto init = r.optional_input("initial_state")) std::copy(init->get().data.begin(), init->get().data.end(), state);
  GatedDeltaOptions opt;
  const std::string mode = r.choice("--mode", {"auto", "chunked", "recurrent"});
  opt.mode = mode == "chunked" ? GatedDeltaMode::chunked
             : mode == "recurrent" ? GatedDeltaMode::recurrent
                                   : GatedDeltaMode::automatic;
  opt.chunk = r.integer("--chunk", opt.chunk, 1);
  opt.qk_l2norm = !r.flag("--no-l2norm");
  opt.scale = r.real("--scale", 0.f);
  opt.num_threads = r.threads();
  float* out = r.output("out", {T, Hv, dv});
  gated_delta_rule(view3(q), view3(k), view3(v), view2(g), view2(beta), View3<float>(state, {Hv, dk, dv}),
                   View3<float>(out, {T, Hv, dv}), opt);
}

void run_linear_attention(Run& r) {
  const Loaded &q = r.input("q"), &k = r.input("k"), &v = r.input("v");
  const std::int64_t H = std::max({q.shape[1], k.shape[1], v.shape[1]});
  r.set_dim("H", H, "max(H_q, H_k, H_v)");
  const std::int64_t T = r.dim("T"), dk = r.dim("d_k"), dv = r.dim("d_v");
  LinearAttentionOptions opt;
  const std::string fm = r.choice("--feature-map", {"identity", "elu", "relu"});
  opt.feature_map = fm == "elu" ? LinearFeatureMap::elu : fm == "relu" ? LinearFeatureMap::relu : LinearFeatureMap::identity;
  opt.normalize = r.flag("--normalize");
  opt.norm_q = r.flag("--norm-q");
  opt.norm_k = r.flag("--norm-k");
  const std::string mode = r.choice("--mode", {"auto", "chunked", "recurrent"});
  opt.mode = mode == "chunked" ? LinearAttentionMode::chunked
             : mode == "recurrent" ? LinearAttentionMode::recurrent
                                   : LinearAttentionMode::automatic;
  opt.chunk = r.integer("--chunk", opt.chunk, 1);
  opt.scale = r.real("--scale", 0.f);
  opt.num_threads = r.threads();
  float* state = r.output("final_state", {H, dk, dv});
  if (auto init = r.optional_input("initial_state")) std::copy(init->get().data.begin(), init->get().data.end(), state);
  View2<float> z;
  if (opt.normalize) {
    float* zp = r.output("final_z", {H, dk});
    if (auto init = r.optional_input("initial_z")) std::copy(init->get().data.begin(), init->get().data.end(), zp);
    z = View2<float>(zp, {H, dk});
  } else if (r.has("initial_z")) {
    fail("linear-attention: tensor 'initial_z' given, but --normalize is off");
  }
  float* out = r.output("out", {T, H, dv});
  linear_attention(view3(q), view3(k), view3(v), View3<float>(state, {H, dk, dv}), z, View3<float>(out, {T, H, dv}),
                   opt);
}

// ---- attention variants (attention/variant.hpp) of the attention and decode ops ----------------
// --alibi | --softcap X (one logits slot), --sinks (input 'sinks' [H]), --metric (input 'metric'
// [d_k, d_k]). The flags are checked before any tensor is read; the tensors after q, k, v (which
// bind H and d_k).
enum class LogitsFlag { none, softcap, alibi };

struct VariantFlags {
  LogitsFlag logits = LogitsFlag::none;
  float cap = 0.f;
  bool sinks = false, metric = false;
};

VariantFlags variant_flags(const Run& r) {
  VariantFlags f;
  const bool alibi = r.flag("--alibi"), softcap = r.value("--softcap").has_value();
  if (alibi && softcap)
    fail(r.op_name() + ": --alibi and --softcap cannot be combined (both transform the logits; a variant has one logits slot)");
  if (softcap) {
    f.logits = LogitsFlag::softcap;
    f.cap = r.real("--softcap", 0.f);
    if (!(f.cap > 0.f)) fail("--softcap: must be > 0, got " + *r.value("--softcap"));
  } else if (alibi) {
    f.logits = LogitsFlag::alibi;
  }
  f.sinks = r.flag("--sinks");
  f.metric = r.flag("--metric");
  return f;
}

// The policies' data; views into the Run's loaded tensors (valid for the run).
struct VariantInputs {
  VariantFlags flags;
  std::vector<float> slopes;  // ALiBi, [H]
  const float* sinks = nullptr;
  ConstView2<float> metric;
};

// Reads the tensors the flags ask for (after q: H and d_k are bound). A 'sinks' or 'metric' tensor
// without its flag is left unused, with a note on stderr (one file may serve runs with and
// without the variant, but a forgotten flag should not pass unnoticed).
VariantInputs variant_inputs(Run& r, const VariantFlags& f) {
  VariantInputs in;
  in.flags = f;
  if (f.logits == LogitsFlag::alibi) in.slopes = alibi_slopes(r.dim("H"));
  const auto read = [&](const char* name, const char* flag, bool on) -> const Loaded* {
    if (on) return &r.input(name);
    if (r.has(name))
      std::fprintf(stderr, "attnkit-op: note: %s: tensor '%s' not used (no %s)\n", r.op_name().c_str(), name, flag);
    return nullptr;
  };
  if (const Loaded* s = read("sinks", "--sinks", f.sinks)) in.sinks = s->data.data();
  if (const Loaded* m = read("metric", "--metric", f.metric)) in.metric = view2(*m);
  return in;
}

// Calls fn(variant) with the AttentionVariant the flags ask for, built slot by slot: logits
// {none, soft-cap, ALiBi} x sinks {off, on} x metric {off, on} = 12 instantiations per call
// site; no flag gives PlainAttention (the plain kernel).
template <class F, class... Ps>
void with_metric(const VariantInputs& in, F& fn, const Ps&... ps) {
  if (in.flags.metric) fn(make_variant(ps..., QueryMetric{in.metric}));
  else if constexpr (sizeof...(Ps) == 0) fn(PlainAttention{});
  else fn(make_variant(ps...));
}
template <class F, class... Ps>
void with_sinks(const VariantInputs& in, F& fn, const Ps&... ps) {
  if (in.flags.sinks) with_metric(in, fn, ps..., Sinks{in.sinks});
  else with_metric(in, fn, ps...);
}
template <class F>
void with_variant(const VariantInputs& in, F&& fn) {
  switch (in.flags.logits) {
    case LogitsFlag::none: return with_sinks(in, fn);
    case LogitsFlag::softcap: return with_sinks(in, fn, SoftCap{in.flags.cap});
    case LogitsFlag::alibi: return with_sinks(in, fn, Alibi{in.slopes.data()});
  }
}

void run_attention(Run& r) {
  const VariantFlags vf = variant_flags(r);
  const Loaded &q = r.input("q"), &k = r.input("k"), &v = r.input("v");
  const std::int64_t T = r.dim("T"), H = r.dim("H"), dv = r.dim("d_v");
  const VariantInputs vi = variant_inputs(r, vf);
  AttentionOptions opt;
  opt.scale = r.real("--scale", 0.f);
  opt.num_threads = r.threads();
  float* out = r.output("out", {T, H, dv});
  float* lse = r.output("lse", {T, H});
  const View3<float> o(out, {T, H, dv});
  const View2<float> l(lse, {T, H});
  const std::int64_t w = r.integer("--window", 0, 1);
  with_variant(vi, [&](const auto& var) {
    if (w > 0) attention_prefill<float>(view3(q), view3(k), view3(v), o, SlidingWindowMask{w}, opt, l, var);
    else attention_prefill<float>(view3(q), view3(k), view3(v), o, CausalMask{}, opt, l, var);
  });
}

void run_decode(Run& r) {
  const VariantFlags vf = variant_flags(r);
  const Loaded &q = r.input("q"), &k = r.input("k"), &v = r.input("v");
  const std::int64_t H = r.dim("H"), T = r.dim("T_kv"), dv = r.dim("d_v");
  const VariantInputs vi = variant_inputs(r, vf);
  DecodeOptions opt;
  opt.scale = r.real("--scale", 0.f);
  opt.num_threads = r.threads();
  // --window N: only the last N keys (a sliding layer's view of its cache). ALiBi positions are
  // relative: the slice's rows are positions first..T-1 and the query is the last one, which is
  // q_position's default (slice length - 1) in the slice's own numbering.
  const std::int64_t first = std::max<std::int64_t>(0, T - r.integer("--window", T, 1));
  float* out = r.output("out", {H, dv});
  float* lse = r.output("lse", {H});
  with_variant(vi, [&](const auto& var) {
    attention_decode<float>(view2(q), view3(k).slice(0, first, T), view3(v).slice(0, first, T),
                            View2<float>(out, {H, dv}), opt, View1<float>(lse, {H}), var);
  });
}

void run_short_conv(Run& r) {
  const Loaded &x = r.input("x"), &w = r.input("weight");
  const std::int64_t T = r.dim("T"), C = r.dim("C"), K = r.dim("K");
  ShortConvOptions opt;
  opt.activation = r.choice("--activation", {"silu", "none"}) == "silu" ? ConvActivation::silu : ConvActivation::none;
  opt.num_threads = r.threads();
  float* state = r.output("final_state", {K - 1, C});
  if (auto init = r.optional_input("initial_state")) std::copy(init->get().data.begin(), init->get().data.end(), state);
  float* y = r.output("y", {T, C});
  causal_conv1d(view2(x), ConstView2<float>(w.data.data(), {C, K}), View2<float>(state, {K - 1, C}),
                View2<float>(y, {T, C}), opt);
}

void run_gated_norm(Run& r) {
  const Loaded &x = r.input("x"), &z = r.input("z"), &w = r.input("weight");
  const std::int64_t T = r.dim("T"), H = r.dim("H"), d = r.dim("d");
  float* y = r.output("y", {T, H, d});
  gated_rms_norm(view3(x), view3(z), view1(w).data, r.real("--eps", 1e-6f), View3<float>(y, {T, H, d}), r.threads());
}

// --topk K: required; the kernels index keys with int32.
std::int64_t topk(Run& r) {
  const std::int64_t K = r.required_integer("--topk", 1);
  if (K > INT32_MAX) fail("--topk: must be <= " + std::to_string(INT32_MAX) + ", got " + std::to_string(K));
  return K;
}

// The lightning indexer on index_q, index_k, index_w (queries at positions 0..T-1 of the T keys):
// writes index_score and topk_indices and returns the selection as the attention kernel takes it.
std::vector<std::int32_t> run_indexer_outputs(Run& r, std::int64_t K) {
  const Loaded &iq = r.input("index_q"), &ik = r.input("index_k"), &iw = r.input("index_w");
  const std::int64_t T = r.dim("T");
  r.check_size(T * K, "top-k selection");
  IndexerOptions opt;
  opt.q_offset = 0;
  opt.num_threads = r.threads();
  opt.precision = r.choice("--precision", {"exact", "fast"}) == "fast" ? Precision::fast : Precision::exact;
  float* score = r.output("index_score", {T, T});
  indexer_scores(view3(iq), view2(ik), view2(iw), View2<float>(score, {T, T}), opt);
  std::vector<std::int32_t> idx(static_cast<std::size_t>(T * K));
  indexer_topk(view3(iq), view2(ik), view2(iw), View2<std::int32_t>(idx.data(), {T, K}), opt);
  auto& sel = r.int_output("topk_indices", {T, K});
  std::copy(idx.begin(), idx.end(), sel.begin());
  return idx;
}

void run_indexer(Run& r) {
  const std::int64_t K = topk(r);
  r.threads();  // a bad --threads is reported before any tensor is read
  run_indexer_outputs(r, K);
}

void run_sparse_attention(Run& r) {
  const std::int64_t K = topk(r);
  const bool kv_bf16 = r.choice("--kv", {"f32", "bf16"}) == "bf16";
  SparseAttentionOptions opt;
  opt.scale = r.real("--scale", 0.f);
  opt.q_offset = 0;
  opt.num_threads = r.threads();
  const Loaded &q = r.input("q"), &k = r.input("k"), &v = r.input("v");
  const std::vector<std::int32_t> idx = run_indexer_outputs(r, K);
  const std::int64_t T = r.dim("T"), H = r.dim("H"), H_kv = r.dim("H_kv"), dk = r.dim("d_k"), dv = r.dim("d_v");
  float* out = r.output("out", {T, H, dv});
  const ConstView2<std::int32_t> sel(idx.data(), {T, K});
  const View3<float> o(out, {T, H, dv});
  if (kv_bf16) {  // K/V stored as bf16 (round to nearest even), as in a bf16 KV cache
    std::vector<bf16> kb(k.data.size()), vb(v.data.size());
    simd::to_bf16(k.data.data(), kb.data(), static_cast<std::int64_t>(kb.size()));
    simd::to_bf16(v.data.data(), vb.data(), static_cast<std::int64_t>(vb.size()));
    sparse_attention_prefill<bf16>(view3(q), ConstView3<bf16>(kb.data(), {T, H_kv, dk}),
                                   ConstView3<bf16>(vb.data(), {T, H_kv, dv}), sel, o, opt);
  } else {
    sparse_attention_prefill<float>(view3(q), view3(k), view3(v), sel, o, opt);
  }
}

const std::vector<OptionSpec> kModeOptions{
    {"--mode", "auto|chunked|recurrent", "path (auto: recurrent for short inputs, else chunked)"},
    {"--chunk", "N", "chunk length of the chunked path (default 64)"}};

std::vector<OptionSpec> join(std::vector<OptionSpec> a, const std::vector<OptionSpec>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The attention variants of the attention and decode ops (attention/variant.hpp).
const std::vector<OptionSpec> kVariantOptions{
    {"--alibi", "", "ALiBi with the standard slopes alibi_slopes(H) (not with --softcap)"},
    {"--softcap", "X", "soft-cap the scaled logits: X·tanh(z / X), X > 0 (not with --alibi)"},
    {"--sinks", "", "attention sinks: input 'sinks', one logit per head in the softmax denominator"},
    {"--metric", "", "query metric (Tuneable attention): q·M with input 'metric' M before the scores"},
    kScale,
    kThreads};
const TensorSpec kSinksInput{"sinks", {{"H"}}, true, "with --sinks; natural-log units, -inf: no sink"};
const TensorSpec kMetricInput{"metric", {{"d_k", "d_k"}}, true, "with --metric; Tuneable's folded M = U·Uᵀ"};

// The table: one entry per kernel.
const std::vector<Op>& ops() {
  static const std::vector<Op> table{
      {"gated-delta",
       "gated delta rule (Gated DeltaNet, attnkit::gated_delta_rule)",
       {{"q", {{"T", "H_k", "d_k"}}},
        {"k", {{"T", "H_k", "d_k"}}},
        {"v", {{"T", "H_v", "d_v"}}},
        {"g", {{"T", "H_v"}}, false, "log decay"},
        {"beta", {{"T", "H_v"}}},
        {"initial_state", {{"H_v", "d_k", "d_v"}}, true, "default zeros"}},
       {{"out", {{"T", "H_v", "d_v"}}}, {"final_state", {{"H_v", "d_k", "d_v"}}}},
       join(kModeOptions, {{"--no-l2norm", "", "q and k are already L2-normalised (default: normalise inside)"},
                           kScale,
                           kThreads}),
       run_gated_delta},
      {"linear-attention",
       "causal linear attention, fla semantics (attnkit::linear_attention)",
       {{"q", {{"T", "H_q", "d_k"}}},
        {"k", {{"T", "H_k", "d_k"}}},
        {"v", {{"T", "H_v", "d_v"}}},
        {"initial_state", {{"H", "d_k", "d_v"}}, true, "H = max(H_q, H_k, H_v); default zeros"},
        {"initial_z", {{"H", "d_k"}}, true, "with --normalize; default zeros"}},
       {{"out", {{"T", "H", "d_v"}}}, {"final_state", {{"H", "d_k", "d_v"}}}, {"final_z", {{"H", "d_k"}}, true, "with --normalize"}},
       join(kModeOptions, {{"--feature-map", "identity|elu|relu", "feature map φ of q and k (elu: elu + 1)"},
                           {"--normalize", "", "divide by scale·φ(q)·z (fla normalize)"},
                           {"--norm-q", "", "φ(q) / (Σφ(q) + 1e-4)"},
                           {"--norm-k", "", "φ(k) / (Σφ(k) + 1e-4)"},
                           kScale,
                           kThreads}),
       run_linear_attention},
      {"attention",
       "causal or sliding-window softmax attention, GQA (attnkit::attention_prefill); queries are the last T keys; "
       "variants: ALiBi or soft-cap, sinks, query metric (attention/variant.hpp)",
       {{"q", {{"T", "H", "d_k"}}},
        {"k", {{"T_kv", "H_kv", "d_k"}}},
        {"v", {{"T_kv", "H_kv", "d_v"}}},
        kSinksInput,
        kMetricInput},
       {{"out", {{"T", "H", "d_v"}}}, {"lse", {{"T", "H"}}, false, "natural log; with --sinks the sink is in it"}},
       join({{"--window", "N", "sliding window of N keys including the query (default: causal)"}}, kVariantOptions),
       run_attention},
      {"decode",
       "one query token against a KV cache (attnkit::attention_decode); variants as for attention",
       {{"q", {{"H", "d_k"}}}, {"k", {{"T_kv", "H_kv", "d_k"}}}, {"v", {{"T_kv", "H_kv", "d_v"}}}, kSinksInput, kMetricInput},
       {{"out", {{"H", "d_v"}}}, {"lse", {{"H"}}, false, "natural log; with --sinks the sink is in it"}},
       join({{"--window", "N", "attend to the last N keys only (default: all); ALiBi: the query is at the last key"}},
            kVariantOptions),
       run_decode},
      {"short-conv",
       "causal depthwise short convolution with decode state (attnkit::causal_conv1d)",
       {{"x", {{"T", "C"}}},
        {"weight", {{"C", "1", "K"}, {"C", "K"}}, false, "a conv1d.weight"},
        {"initial_state", {{"K-1", "C"}}, true, "the previous K-1 inputs, oldest first; default zeros"}},
       {{"y", {{"T", "C"}}}, {"final_state", {{"K-1", "C"}}}},
       {{"--activation", "silu|none", "activation after the convolution (default silu)"}, kThreads},
       run_short_conv},
      {"gated-norm",
       "gated RMSNorm: weight ⊙ x / rms(x) ⊙ SiLU(z) per head (attnkit::gated_rms_norm)",
       {{"x", {{"T", "H", "d"}}}, {"z", {{"T", "H", "d"}}}, {"weight", {{"d"}}}},
       {{"y", {{"T", "H", "d"}}}},
       {{"--eps", "X", "epsilon under the square root (default 1e-6)"}, kThreads},
       run_gated_norm},
      {"sparse-attention",
       "DeepSeek sparse attention: lightning indexer, top-K keys per query, softmax attention over them, GQA "
       "(attnkit::indexer_scores, indexer_topk, sparse_attention_prefill); causal, queries at positions 0..T-1",
       {{"q", {{"T", "H", "d_k"}}},
        {"k", {{"T", "H_kv", "d_k"}}},
        {"v", {{"T", "H_kv", "d_v"}}},
        {"index_q", {{"T", "H_I", "d_I"}}},
        {"index_k", {{"T", "d_I"}}, false, "one key head shared by the index heads"},
        {"index_w", {{"T", "H_I"}}, false, "head weights, scaling included"}},
       {{"index_score", {{"T", "T"}}, false, "Σ_j index_w·ReLU(index_q·index_k); -inf for keys after the query"},
        {"topk_indices", {{"T", "K"}}, false, "I64: the top min(K, t+1) keys, ties to the lower index, ascending, -1 padded"},
        {"out", {{"T", "H", "d_v"}}}},
       {{"--topk", "K", "keys kept per query (required)"},
        {"--kv", "f32|bf16", "K/V storage: bf16 rounds k and v to bf16 first, like a bf16 KV cache (default f32)"},
        kIndexerPrecision,
        kScale,
        kThreads},
       run_sparse_attention},
      {"indexer",
       "DeepSeek lightning indexer alone: scores and top-K keys per query (attnkit::indexer_scores, indexer_topk); "
       "queries at positions 0..T-1",
       {{"index_q", {{"T", "H_I", "d_I"}}},
        {"index_k", {{"T", "d_I"}}, false, "one key head shared by the index heads"},
        {"index_w", {{"T", "H_I"}}, false, "head weights, scaling included"}},
       {{"index_score", {{"T", "T"}}, false, "Σ_j index_w·ReLU(index_q·index_k); -inf for keys after the query"},
        {"topk_indices", {{"T", "K"}}, false, "I64: the top min(K, t+1) keys, ties to the lower index, ascending, -1 padded"}},
       {{"--topk", "K", "keys kept per query (required)"}, kIndexerPrecision, kThreads},
       run_indexer},
  };
  return table;
}

[[maybe_unused]] std::string usage() {  // unused where a fuzzer includes the reader
  std::string s =
      "usage: attnkit-op OP --in FILE.safetensors --out FILE.safetensors [options]\n"
      "Runs one attnkit kernel on the named tensors of --in (F32, BF16, F16 or F64; no batch axis) and\n"
      "writes its outputs to --out as F32 (selected key indices as I64). Shapes: symbols must agree\n"
      "across tensors.\n"
      "Exit code 2 on bad input (message on stderr).\n\nops:\n";
  auto tensors = [](const std::vector<TensorSpec>& list) {
    std::string t;
    for (const auto& ts : list) {
      t += "      " + ts.name + " ";
      for (std::size_t i = 0; i < ts.shapes.size(); ++i) t += (i ? " or " : "") + pattern_string(ts.shapes[i]);
      if (ts.optional || !ts.note.empty())
        t += "  (" + std::string(ts.optional ? "optional" : "") + (ts.optional && !ts.note.empty() ? "; " : "") + ts.note + ")";
      t += "\n";
    }
    return t;
  };
  for (const Op& op : ops()) {
    s += "  " + op.name + ": " + op.summary + "\n    inputs:\n" + tensors(op.inputs) + "    outputs:\n" +
         tensors(op.outputs) + "    options:\n";
    for (const auto& o : op.options) {
      std::string head = "      " + o.name + (o.value.empty() ? "" : " " + o.value);
      head.resize(std::max<std::size_t>(head.size() + 2, 40), ' ');
      s += head + o.help + "\n";
    }
    s += "\n";
  }
  s += "  --help prints this.\n";
  return s;
}

// A parsed command line: the op, the files and the options (validated against the op's table).
struct Invocation {
  const Op* op = nullptr;
  std::string in_path, out_path;
  std::map<std::string, std::string> opts;
  bool help = false;
};

// Parses the arguments after the program name; throws attnkit::Error on a bad command line.
// With `need_files` false, --in and --out may be left out (the fuzzer passes the input itself).
Invocation parse_args(const std::vector<std::string>& args, bool need_files = true) {
  Invocation inv;
  for (const auto& a : args)
    if (a == "--help" || a == "-h") {
      inv.help = true;
      return inv;
    }
  if (args.empty()) fail("no op given (try --help)");
  for (const Op& o : ops())
    if (o.name == args[0]) inv.op = &o;
  if (!inv.op) {
    std::string names;
    for (const Op& o : ops()) names += (names.empty() ? "" : ", ") + o.name;
    fail("unknown op '" + args[0] + "' (ops: " + names + ")");
  }
  const Op* op = inv.op;
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) fail(a + ": missing value");
      return args[++i];
    };
    if (a == "--in") {
      inv.in_path = value();
      continue;
    }
    if (a == "--out") {
      inv.out_path = value();
      continue;
    }
    const OptionSpec* spec = nullptr;
    for (const auto& o : op->options)
      if (o.name == a) spec = &o;
    if (!spec) {
      std::string names = "--in, --out";
      for (const auto& o : op->options) names += ", " + o.name;
      fail(op->name + ": unknown option '" + a + "' (options: " + names + ")");
    }
    if (inv.opts.count(a)) fail(a + ": given twice");
    inv.opts[a] = spec->value.empty() ? "" : value();
  }
  if (need_files && inv.in_path.empty()) fail(op->name + ": --in FILE.safetensors is required");
  if (need_files && inv.out_path.empty()) fail(op->name + ": --out FILE.safetensors is required");
  return inv;
}

// Reads the op's inputs from `in`, checks them and runs the kernel; the outputs are in the Run.
void execute(Run& run) { run.op().run(run); }

}  // namespace
