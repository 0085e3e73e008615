// attnkit/model/tensor_source.hpp — where model builders get their weights from.
//
// A TensorSource hands out named tensors as float32 or bf16 (kept as stored: a bf16 checkpoint
// stays bf16, F16/F64 are converted to float32). Two sources exist: a checkpoint directory
// (zero-copy views into the memory-mapped safetensors files) and a deterministic random
// generator (benchmarks and the built-in default model). Builders name the tensors and shapes
// they expect; a missing tensor or a wrong shape is an error naming both. Mixers added later
// (loop gates, AttnRes projections, ...) pull their extra tensors through the same interface.
#pragma once

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/io/safetensors.hpp"

namespace attnkit::model {

// How weights are held: f32 and bf16 are storage types (a checkpoint's, kept as stored); q8 is
// a packing of the linear layers only (int8 groups of 32 with a scale each, quantised at load:
// PackedLinear::pack_q8); norms and other small vectors stay float.
enum class WeightType { f32, bf16, q8 };
inline const char* weight_type_name(WeightType t) {
  return t == WeightType::f32 ? "f32" : t == WeightType::bf16 ? "bf16" : "q8";
}

// A tensor handed to a builder. Move-only: `data` points either into a mapping that outlives the
// build, or into this object's own storage.
struct HostTensor {
  WeightType type = WeightType::f32;  // storage: f32 or bf16
  std::string name;
  // How pack_linear packs it when it is a linear layer's weight (unset: as stored). Set by
  // PackAsSource for every tensor it hands out.
  std::optional<WeightType> pack_as;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
  std::vector<float> owned_f32;
  std::vector<bf16> owned_bf16;

  HostTensor() = default;
  HostTensor(HostTensor&&) noexcept = default;
  HostTensor& operator=(HostTensor&&) noexcept = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  const float* f32() const { return type == WeightType::f32 ? static_cast<const float*>(data) : nullptr; }
  const bf16* bf16_data() const { return type == WeightType::bf16 ? static_cast<const bf16*>(data) : nullptr; }
  // Float32 copy (exact for both storage types).
  std::vector<float> to_f32() const {
    std::vector<float> out(static_cast<std::size_t>(numel()));
    if (type == WeightType::f32) std::memcpy(out.data(), data, out.size() * sizeof(float));
    else convert(static_cast<const bf16*>(data), out.data(), numel());
    return out;
  }
};

inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual bool contains(const std::string& name) const = 0;
  // The tensor `name`, which must have exactly `shape` (an empty shape means a 0-dim scalar).
  virtual HostTensor get(const std::string& name, const std::vector<std::int64_t>& shape) const = 0;
  virtual std::string describe() const = 0;
  // Tensors the source holds that no get() asked for and ignore() did not excuse, sorted: a
  // loader rejects them (a checkpoint part nothing consumed means a mechanism would be dropped
  // in silence). Sources that make tensors on demand hold none.
  virtual std::vector<std::string> unconsumed() const { return {}; }
  // Marks a stored tensor as deliberately unused (a tied model's lm_head.weight, as transformers does).
  virtual void ignore(const std::string& /*name*/) const {}
  // The effective f32 weight [n] of an RMSNorm whose checkpoint stores it relative to `offset`:
  // offset 1 for Qwen3.5 / Qwen3-Next / Gemma norms, y = norm(x) · (1 + w); 0 for plain ones.
  // The sum is formed in f32, as transformers does, so the result is the same bit for bit.
  virtual std::vector<float> norm_weight(const std::string& name, std::int64_t n, float offset) const {
    std::vector<float> w = get(name, {n}).to_f32();
    if (offset != 0.f)
      for (auto& x : w) x += offset;
    return w;
  }
};

// Tensors of a Hugging Face checkpoint directory (model.safetensors or a sharded index).
class CheckpointSource : public TensorSource {
 public:
  explicit CheckpointSource(const std::filesystem::path& dir) : ckpt_(io::Checkpoint::open(dir)), where_(dir.string()) {}
  bool contains(const std::string& name) const override { return ckpt_.contains(name); }
  HostTensor get(const std::string& name, const std::vector<std::int64_t>& shape) const override {
    const io::TensorInfo& t = ckpt_.tensor(name, std::span<const std::int64_t>(shape.data(), shape.size()));
    ignore(name);
    HostTensor h;
    h.name = name;
    h.shape = shape;
    // Zero-copy when the data is aligned for its type (files written by Python's safetensors
    // are); otherwise (a writer that packs tensors tightly) copy to aligned memory.
    auto borrow = [&](WeightType type, auto& owned) {
      using T = typename std::remove_reference_t<decltype(owned)>::value_type;
      h.type = type;
      h.data = t.data;
      if (reinterpret_cast<std::uintptr_t>(t.data) % alignof(T) != 0) {
        owned.resize(static_cast<std::size_t>(t.numel()));
        std::memcpy(owned.data(), t.data, t.nbytes);
        h.data = owned.data();
      }
    };
    if (t.dtype == io::DType::F32) {
      borrow(WeightType::f32, h.owned_f32);
    } else if (t.dtype == io::DType::BF16) {
      borrow(WeightType::bf16, h.owned_bf16);
    } else {  // F16 / F64 (integers are rejected by to_f32 with a message naming the tensor)
      h.type = WeightType::f32;
      h.owned_f32 = io::to_f32(t);
      h.data = h.owned_f32.data();
    }
    return h;
  }
  std::string describe() const override { return "checkpoint " + where_; }
  const io::Checkpoint& checkpoint() const { return ckpt_; }
  std::vector<std::string> unconsumed() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (auto& n : ckpt_.names())
      if (!used_.count(n)) out.push_back(n);
    std::sort(out.begin(), out.end());
    return out;
  }
  void ignore(const std::string& name) const override {
    std::lock_guard<std::mutex> lock(mu_);
    used_.insert(name);
  }

 private:
  io::Checkpoint ckpt_;
  std::string where_;
  mutable std::mutex mu_;
  mutable std::set<std::string> used_;
};

// Deterministic random weights: element i of tensor `name` depends only on (seed, name, i), so
// the result is the same for any thread count. RMSNorm weights ("...norm.weight") are ones, as
// initialised in transformers, and norm biases (a LayerNorm's, e.g. the sparse indexer's
// k_norm.bias) zeros; everything else is uniform with standard deviation `stddev`.
// A norm weight is a ".weight" whose module name contains "norm" (model.norm, q_norm,
// input_layernorm_2, ...); a norm bias likewise a ".bias". Norms stored as an offset
// (norm_weight with offset != 0) are offset + a small random w, so the effective weight stays
// near 1. Gated DeltaNet's decay
// parameters follow transformers' init so random models neither explode nor forget at once:
// "...A_log" = log A with A uniform in [1, 16], "...dt_bias" = 1. Tuneable attention's
// "...self_attn.U" [d_k, r] is uniform with standard deviation 1/sqrt(r) whatever `stddev`, so
// E[U Uᵀ] = I and the layer starts near plain attention (a random metric, not an orthogonal U).
class RandomSource : public TensorSource {
 public:
  RandomSource(WeightType type, std::uint64_t seed, float stddev = 0.02f) : type_(type), seed_(seed), stddev_(stddev) {
    ATTNKIT_REQUIRE(type != WeightType::q8, "RandomSource: q8 is a packing, not a storage type: make bf16 weights and ",
                    "pack them as q8 (PackAsSource, LoadOptions::weights)");
  }
  bool contains(const std::string&) const override { return true; }
  HostTensor get(const std::string& name, const std::vector<std::int64_t>& shape) const override {
    HostTensor h;
    h.name = name;
    h.shape = shape;
    const std::int64_t n = h.numel();
    const bool ones = is_norm_weight(name) || ends_with(name, ".dt_bias");
    const bool zeros = is_norm_bias(name);
    const bool a_log = ends_with(name, ".A_log");
    const bool metric = ends_with(name, "self_attn.U") && shape.size() == 2 && shape[1] > 0;
    const float stddev = metric ? 1.0f / std::sqrt(static_cast<float>(shape[1])) : stddev_;
    const std::uint64_t key = seed_ ^ hash(name);
    auto value = [&](std::int64_t i) {
      if (ones) return 1.0f;
      if (zeros) return 0.0f;
      if (a_log) return std::log(8.5f + 7.5f * unit(key, i));  // log U[1, 16]
      return stddev * 1.7320508f * unit(key, i);  // uniform on [-a, a] has standard deviation a / sqrt(3)
    };
    constexpr std::int64_t chunk = 1 << 16;
    const std::int64_t chunks = (n + chunk - 1) / chunk;
    auto fill = [&](auto* d) {
      using T = std::remove_pointer_t<decltype(d)>;
      parallel_for(chunks, 0, [&](std::int64_t c) {
        for (std::int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) d[i] = T(value(i));
      });
      h.data = d;
    };
    h.type = type_;
    if (type_ == WeightType::f32) {
      h.owned_f32.resize(static_cast<std::size_t>(n));
      fill(h.owned_f32.data());
    } else {
      h.owned_bf16.resize(static_cast<std::size_t>(n));
      fill(h.owned_bf16.data());
    }
    return h;
  }
  std::string describe() const override {
    return std::string("random ") + weight_type_name(type_) + " weights (seed " + std::to_string(seed_) + ")";
  }
  std::vector<float> norm_weight(const std::string& name, std::int64_t n, float offset) const override {
    if (offset == 0.f) return TensorSource::norm_weight(name, n, offset);
    std::vector<float> w(static_cast<std::size_t>(n));
    const std::uint64_t key = seed_ ^ hash(name);
    for (std::int64_t i = 0; i < n; ++i) w[static_cast<std::size_t>(i)] = offset + stddev_ * 1.7320508f * unit(key, i);
    return w;
  }

 private:
  // Element i of the tensor with key seed ^ hash(name): uniform on [-1, 1).
  static float unit(std::uint64_t key, std::int64_t i) {
    const std::uint64_t r = mix(key + static_cast<std::uint64_t>(i) * 0x9e3779b97f4a7c15ull);
    return static_cast<float>(r >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }
  static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  }
  static bool is_norm_weight(const std::string& name) { return is_norm_param(name, ".weight"); }
  static bool is_norm_bias(const std::string& name) { return is_norm_param(name, ".bias"); }
  static bool is_norm_param(const std::string& name, const std::string& suffix) {
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) return false;
    const std::string module = name.substr(0, name.size() - suffix.size());
    const auto dot = module.rfind('.');
    return module.find("norm", dot == std::string::npos ? 0 : dot + 1) != std::string::npos;
  }
  static std::uint64_t mix(std::uint64_t z) {  // splitmix64 finaliser
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  static std::uint64_t hash(const std::string& s) {  // FNV-1a
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return mix(h);
  }
  WeightType type_;
  std::uint64_t seed_;
  float stddev_;
};

// Another source's tensors, with every linear layer packed as `type` (q8: quantised at load;
// bf16 / f32: converted). Everything else passes through. The inner source must outlive this one.
class PackAsSource : public TensorSource {
 public:
  PackAsSource(const TensorSource& inner, WeightType type) : inner_(inner), type_(type) {}
  bool contains(const std::string& name) const override { return inner_.contains(name); }
  HostTensor get(const std::string& name, const std::vector<std::int64_t>& shape) const override {
    HostTensor h = inner_.get(name, shape);
    h.pack_as = type_;
    return h;
  }
  std::string describe() const override {
    return inner_.describe() + ", linear layers packed as " + weight_type_name(type_);
  }
  std::vector<std::string> unconsumed() const override { return inner_.unconsumed(); }
  void ignore(const std::string& name) const override { inner_.ignore(name); }
  std::vector<float> norm_weight(const std::string& name, std::int64_t n, float offset) const override {
    return inner_.norm_weight(name, n, offset);
  }

 private:
  const TensorSource& inner_;
  WeightType type_;
};

}  // namespace attnkit::model
