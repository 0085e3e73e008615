// Tests for attnkit/io: safetensors reader/writer, sharded checkpoints, Qwen3 config parsing,
// on the copied fixtures, on generated files, and on broken files (each error message checked).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

#include "attnkit/io/config.hpp"
#include "attnkit/io/safetensors.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace attnkit::io;
using Catch::Contains;
using attnkit::test::Rng;

namespace {

const fs::path kFixtures = fs::path(ATTNKIT_TEST_DATA) / "fixtures";
const char* const kFixtureNames[] = {"qwen3-tiny-f32", "qwen3-tiny-bf16", "qwen3-tiny-swa", "qwen3-tiny-oldconfig"};

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

// A fresh directory under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  explicit TempDir(std::uint64_t seed) {
    path = fs::temp_directory_path() / ("attnkit-test-io-" + std::to_string(::getpid()) + "-" + std::to_string(seed));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_bytes(const fs::path& p, const std::vector<std::byte>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A raw safetensors image: 8-byte length, the header text as given, then `data_bytes` bytes.
std::vector<std::byte> make_raw(const std::string& header, std::size_t data_bytes, std::uint64_t claimed_len = ~0ull) {
  const std::uint64_t n = claimed_len == ~0ull ? header.size() : claimed_len;
  std::vector<std::byte> out(8 + header.size() + data_bytes, std::byte{0});
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

SafetensorsFile parse(const std::vector<std::byte>& b) { return SafetensorsFile::from_memory(b.data(), b.size(), "mem.safetensors"); }

std::vector<std::int64_t> random_shape(Rng& rng) {
  const auto rank = rng.integer(0, 4);
  std::vector<std::int64_t> s;
  for (int i = 0; i < rank; ++i) s.push_back(rng.integer(0, 6) == 0 ? 0 : rng.integer(1, 7));
  return s;
}

std::int64_t numel_of(const std::vector<std::int64_t>& s) {
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

std::vector<std::byte> random_bytes(Rng& rng, std::size_t n) {
  std::vector<std::byte> b(n);
  for (auto& x : b) x = static_cast<std::byte>(rng.integer(0, 255));
  return b;
}

// Expected Qwen3 weight names and shapes for a config (spec §1.8).
std::map<std::string, std::vector<std::int64_t>> qwen3_weight_shapes(const Qwen3Config& c) {
  const std::int64_t D = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const std::int64_t q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  std::map<std::string, std::vector<std::int64_t>> m;
  m["model.embed_tokens.weight"] = {V, D};
  m["model.norm.weight"] = {D};
  if (!c.tie_word_embeddings) m["lm_head.weight"] = {V, D};
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    m[p + "input_layernorm.weight"] = {D};
    m[p + "post_attention_layernorm.weight"] = {D};
    m[p + "self_attn.q_proj.weight"] = {q, D};
    m[p + "self_attn.k_proj.weight"] = {kv, D};
    m[p + "self_attn.v_proj.weight"] = {kv, D};
    m[p + "self_attn.o_proj.weight"] = {D, q};
    m[p + "self_attn.q_norm.weight"] = {c.head_dim};
    m[p + "self_attn.k_norm.weight"] = {c.head_dim};
    m[p + "mlp.gate_proj.weight"] = {I, D};
    m[p + "mlp.up_proj.weight"] = {I, D};
    m[p + "mlp.down_proj.weight"] = {D, I};
  }
  return m;
}

// float64 oracle for IEEE binary16: value = (-1)^s * 2^(e-15) * (1 + m/1024), subnormal 2^-14 * m/1024.
double f16_reference(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0x1f) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0) v = std::ldexp(m / 1024.0, -14);
  else v = std::ldexp(1.0 + m / 1024.0, e - 15);
  return s ? -v : v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fixtures

TEST_CASE("fixtures: model and reference files match config.json and reference.json", "[io][fixtures]") {
  for (const char* name : kFixtureNames) {
    CAPTURE(name);
    const fs::path dir = kFixtures / name;
    const Qwen3Config cfg = Qwen3Config::load(dir);
    const nlohmann::json ref = read_json(dir / "reference.json");

    // model.safetensors: exactly the Qwen3 weights, in the dtype the reference was made with.
    const Checkpoint ckpt = Checkpoint::open(dir);
    const auto expected = qwen3_weight_shapes(cfg);
    const DType weight_dtype = ref["weights_dtype"] == "torch.bfloat16" ? DType::BF16 : DType::F32;
    CHECK(cfg.dtype == (weight_dtype == DType::BF16 ? "bfloat16" : "float32"));
    std::vector<std::string> expected_names;
    for (const auto& [n, shape] : expected) {
      CAPTURE(n);
      expected_names.push_back(n);
      const TensorInfo& t = ckpt.tensor(n, shape);
      CHECK(t.dtype == weight_dtype);
      CHECK(t.nbytes == static_cast<std::size_t>(numel_of(shape)) * dtype_size(weight_dtype));
      const auto v = to_f32(t);
      REQUIRE(v.size() == static_cast<std::size_t>(numel_of(shape)));
      for (float x : v) REQUIRE(std::isfinite(x));
    }
    CHECK(ckpt.names() == expected_names);
    CHECK(ckpt.shards().size() == 1);
    CHECK(ckpt.shards()[0].metadata() == nlohmann::json{{"format", "pt"}});

    // reference.safetensors: the tensors reference.json lists.
    const SafetensorsFile r = SafetensorsFile::open(dir / "reference.safetensors");
    std::vector<std::string> ref_names;
    for (const auto& [n, shape] : ref["tensors"].items()) {
      CAPTURE(n);
      ref_names.push_back(n);
      const TensorInfo& t = r.tensor(n);
      CHECK(t.shape == shape.get<std::vector<std::int64_t>>());
      CHECK(t.dtype == (n.ends_with("_ids") ? DType::I64 : DType::F32));
    }
    std::sort(ref_names.begin(), ref_names.end());
    CHECK(r.names() == ref_names);
    CHECK(r.tensor("input_ids").shape == std::vector<std::int64_t>{ref["T"].get<std::int64_t>()});
    CHECK(r.tensor("hidden_states").shape[0] == cfg.num_hidden_layers + 1);
    CHECK(r.tensor("logits").shape[1] == cfg.vocab_size);
    for (const char* ids : {"input_ids", "greedy_ids"})
      for (auto id : to_i64(r.tensor(ids))) REQUIRE((id >= 0 && id < cfg.vocab_size));
    for (float x : to_f32(r.tensor("logits"))) REQUIRE(std::isfinite(x));
    const float* logits = data_as<float>(r.tensor("logits"));  // writer aligned it: zero-copy works
    CHECK(logits == reinterpret_cast<const float*>(r.tensor("logits").data));
  }
}

TEST_CASE("fixtures: config.json of all four layouts", "[io][config]") {
  const auto f32 = Qwen3Config::load(kFixtures / "qwen3-tiny-f32" / "config.json");
  CHECK(f32.model_type == "qwen3");
  CHECK(f32.vocab_size == 512);
  CHECK(f32.hidden_size == 64);
  CHECK(f32.intermediate_size == 160);
  CHECK(f32.num_hidden_layers == 2);
  CHECK(f32.num_attention_heads == 4);
  CHECK(f32.num_key_value_heads == 2);
  CHECK(f32.head_dim == 32);  // != hidden / heads = 16
  CHECK(f32.rms_norm_eps == 1e-6);
  CHECK(f32.rope_theta == 1e6);
  CHECK(f32.max_position_embeddings == 4096);
  CHECK(f32.tie_word_embeddings);
  CHECK_FALSE(f32.sliding_window.has_value());
  CHECK(f32.layer_types == std::vector<LayerType>{LayerType::full_attention, LayerType::full_attention});
  CHECK(f32.dtype == "float32");
  CHECK(f32.raw["transformers_version"] == "5.17.0");

  const auto bf = Qwen3Config::load(kFixtures / "qwen3-tiny-bf16");
  CHECK(bf.dtype == "bfloat16");
  CHECK(bf.head_dim == 32);

  const auto swa = Qwen3Config::load(kFixtures / "qwen3-tiny-swa");
  CHECK(swa.layer_types == std::vector<LayerType>{LayerType::sliding_attention, LayerType::full_attention,
                                                  LayerType::sliding_attention});
  CHECK(swa.sliding_window == std::optional<std::int64_t>(8));
  CHECK(swa.num_key_value_heads == 1);
  CHECK(swa.head_dim == 16);
  CHECK(swa.hidden_size == 48);
  CHECK_FALSE(swa.tie_word_embeddings);
  CHECK(swa.num_sliding_layers() == 2);

  const auto old = Qwen3Config::load(kFixtures / "qwen3-tiny-oldconfig");
  CHECK(old.rope_theta == 1e6);
  CHECK(old.dtype == "bfloat16");
  CHECK(old.vocab_size == 320);
  CHECK(old.hidden_size == 32);
  CHECK(old.head_dim == 16);
  CHECK(old.layer_types == std::vector<LayerType>{LayerType::full_attention, LayerType::full_attention});
  CHECK_FALSE(old.sliding_window.has_value());

  // to_json writes the newer layout and round-trips every field.
  for (const auto* c : {&f32, &bf, &swa, &old}) {
    const nlohmann::json j = c->to_json();
    CHECK(j.contains("rope_parameters"));
    CHECK_FALSE(j.contains("torch_dtype"));
    CHECK_FALSE(j.contains("rope_theta"));
    const auto back = Qwen3Config::from_json(j);
    CHECK(back.model_type == c->model_type);
    CHECK(back.vocab_size == c->vocab_size);
    CHECK(back.hidden_size == c->hidden_size);
    CHECK(back.intermediate_size == c->intermediate_size);
    CHECK(back.num_hidden_layers == c->num_hidden_layers);
    CHECK(back.num_attention_heads == c->num_attention_heads);
    CHECK(back.num_key_value_heads == c->num_key_value_heads);
    CHECK(back.head_dim == c->head_dim);
    CHECK(back.rms_norm_eps == c->rms_norm_eps);
    CHECK(back.rope_theta == c->rope_theta);
    CHECK(back.max_position_embeddings == c->max_position_embeddings);
    CHECK(back.tie_word_embeddings == c->tie_word_embeddings);
    CHECK(back.sliding_window == c->sliding_window);
    CHECK(back.layer_types == c->layer_types);
    CHECK(back.dtype == c->dtype);
    CHECK(back.raw["architectures"] == c->raw["architectures"]);  // unknown fields survive
  }
}

// ---------------------------------------------------------------------------------------------
// Writer / reader round trips

TEST_CASE("writer round trip: every dtype, 0-dim and empty tensors", "[io][writer]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  TempDir tmp(seed);
  const DType dtypes[] = {DType::F32, DType::BF16, DType::F16, DType::F64, DType::I64, DType::I32};

  for (int round = 0; round < 20; ++round) {
    CAPTURE(round);
    SafetensorsWriter w;
    struct Expect {
      DType dtype;
      std::vector<std::int64_t> shape;
      std::vector<std::byte> bytes;
    };
    std::map<std::string, Expect> expect;
    const int count = static_cast<int>(rng.integer(0, 9));
    for (int i = 0; i < count; ++i) {
      const DType d = dtypes[rng.integer(0, 5)];
      auto shape = random_shape(rng);
      if (i == 0) shape = {};                   // a 0-dim tensor in every non-empty file
      if (i == 1) shape = {3, 0};               // and an empty one
      std::string name = std::to_string(rng.integer(0, 1 << 20));  // (no "t" + ...: GCC 12 -Wrestrict false positive)
      name.insert(0, 1, 't').append(".").append(std::to_string(i));
      auto bytes = random_bytes(rng, static_cast<std::size_t>(numel_of(shape)) * dtype_size(d));
      w.add(name, d, shape, bytes.data(), bytes.size());
      expect[name] = {d, shape, std::move(bytes)};
    }
    w.set_metadata("format", "pt");
    w.set_metadata("round", std::to_string(round));
    const fs::path file = tmp.path / "rt.safetensors";
    w.write(file);

    const auto check = [&](const SafetensorsFile& f) {
      REQUIRE(f.tensors().size() == expect.size());
      for (const auto& [name, e] : expect) {
        CAPTURE(name);
        const TensorInfo& t = f.tensor(name);
        CHECK(t.dtype == e.dtype);
        CHECK(t.shape == e.shape);
        CHECK(t.numel() == numel_of(e.shape));
        REQUIRE(t.nbytes == e.bytes.size());
        CHECK((t.nbytes == 0 || std::memcmp(t.data, e.bytes.data(), t.nbytes) == 0));
      }
      CHECK(f.metadata() == nlohmann::json{{"format", "pt"}, {"round", std::to_string(round)}});
    };
    check(SafetensorsFile::open(file));
    const auto image = w.serialize();
    check(SafetensorsFile::from_memory(image.data(), image.size(), "image"));

    // Layout: header padded to 8 bytes, data in sorted name order with contiguous offsets.
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(image[i]);
    CHECK(n % 8 == 0);
    const auto header = nlohmann::json::parse(reinterpret_cast<const char*>(image.data()) + 8,
                                              reinterpret_cast<const char*>(image.data()) + 8 + n);
    std::uint64_t offset = 0;
    for (const auto& [name, e] : expect) {
      CHECK(header[name]["data_offsets"] == nlohmann::json{offset, offset + e.bytes.size()});
      offset += e.bytes.size();
    }
    CHECK(image.size() == 8 + n + offset);
  }
}

TEST_CASE("sharded checkpoint: two shards and an index", "[io][checkpoint]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  TempDir tmp(seed);

  std::map<std::string, std::vector<float>> values;
  std::map<std::string, std::vector<std::int64_t>> shapes;
  SafetensorsWriter s1, s2;
  nlohmann::json weight_map = nlohmann::json::object();
  for (int i = 0; i < 7; ++i) {
    const std::string name = "model.layers." + std::to_string(i) + ".w";
    const std::vector<std::int64_t> shape = {rng.integer(1, 9), rng.integer(1, 9)};
    auto v = rng.normal_vec(static_cast<std::size_t>(numel_of(shape)));
    const bool first = i % 2 == 0;
    (first ? s1 : s2).add_f32(name, shape, v.data());
    weight_map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    values[name] = std::move(v);
    shapes[name] = shape;
  }
  s1.write(tmp.path / "model-00001-of-00002.safetensors");
  s2.write(tmp.path / "model-00002-of-00002.safetensors");
  const auto write_index = [&](const nlohmann::json& j) {
    std::ofstream(tmp.path / "model.safetensors.index.json") << j.dump();
  };
  write_index({{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}});

  for (const fs::path& where : {tmp.path, tmp.path / "model.safetensors.index.json"}) {
    const Checkpoint c = Checkpoint::open(where);
    CHECK(c.shards().size() == 2);
    std::vector<std::string> names;
    for (const auto& [n, v] : values) names.push_back(n);
    CHECK(c.names() == names);
    for (const auto& [n, v] : values) {
      CAPTURE(n);
      CHECK(c.contains(n));
      std::vector<float> got(v.size(), std::numeric_limits<float>::quiet_NaN());
      to_f32(c.tensor(n, shapes[n]), got.data());
      CHECK(attnkit::test::bit_equal(got, v));
    }
    CHECK_FALSE(c.contains("lm_head.weight"));
    REQUIRE_THROWS_WITH(c.tensor("lm_head.weight"),
                        Contains("model.safetensors.index.json: missing tensor 'lm_head.weight'"));
  }
  // A shard file directly is a one-file checkpoint.
  CHECK(Checkpoint::open(tmp.path / "model-00002-of-00002.safetensors").names().size() == 3);

  SECTION("tensor claimed by the index but absent in its shard") {
    auto wm = weight_map;
    wm["model.layers.0.w"] = "model-00002-of-00002.safetensors";
    write_index({{"weight_map", wm}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path),
                        Contains("tensor 'model.layers.0.w' is listed for shard 'model-00002-of-00002.safetensors' "
                                 "but that shard does not contain it"));
  }
  SECTION("missing shard") {
    auto wm = weight_map;
    wm["extra"] = "model-00003-of-00003.safetensors";
    write_index({{"weight_map", wm}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path),
                        Contains("missing shard file 'model-00003-of-00003.safetensors' (listed for tensor 'extra')"));
  }
  SECTION("weight_map not an object / entries not strings / shard escaping the directory") {
    write_index({{"weight_map", nlohmann::json::array()}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path),
                        Contains("'weight_map' must be an object of tensor name -> shard file"));
    write_index({{"metadata", {}}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path),
                        Contains("'weight_map' must be an object of tensor name -> shard file"));
    write_index({{"weight_map", {{"a", 3}}}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path), Contains("weight_map entry 'a' is not a string (number)"));
    write_index({{"weight_map", {{"a", "../model-00001-of-00002.safetensors"}}}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path),
                        Contains("shard '../model-00001-of-00002.safetensors' is not a file name inside the checkpoint"));
    write_index({{"weight_map", {{"a", "/etc/passwd"}}}});
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path), Contains("is not a file name inside the checkpoint directory"));
  }
  SECTION("index that is not JSON") {
    std::ofstream(tmp.path / "model.safetensors.index.json") << "{\"weight_map\": ";
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path), Contains("model.safetensors.index.json: index file is not valid JSON"));
  }
  SECTION("directory without model files, path that does not exist") {
    fs::create_directories(tmp.path / "empty");
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path / "empty"),
                        Contains("no model.safetensors or model.safetensors.index.json in directory"));
    REQUIRE_THROWS_WITH(Checkpoint::open(tmp.path / "nope"), Contains("nope: checkpoint does not exist"));
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions

TEST_CASE("to_f32: F16 exhaustively, BF16 and F64 vs known values; to_i64", "[io][convert]") {
  // Every binary16 bit pattern: through the SIMD path (16 at a time) and the scalar tail.
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  SafetensorsWriter w;
  w.add("h", DType::F16, {65536}, all.data(), all.size() * 2);
  w.add("h_tail", DType::F16, {7}, all.data() + 0x7c00 - 3, 14);  // around +inf, scalar only
  const auto image = w.serialize();
  const auto f = SafetensorsFile::from_memory(image.data(), image.size(), "f16");
  std::vector<float> got(65536, 0.f);
  to_f32(f.tensor("h"), got.data());
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(i);
    const double ref = f16_reference(static_cast<std::uint16_t>(i));
    if (std::isnan(ref)) {
      REQUIRE(std::isnan(got[i]));
      REQUIRE(std::signbit(got[i]) == std::signbit(ref));
    } else {
      REQUIRE(static_cast<double>(got[i]) == ref);  // exact
      REQUIRE(std::signbit(got[i]) == std::signbit(ref));
      REQUIRE(std::bit_cast<std::uint32_t>(f16_to_f32(static_cast<std::uint16_t>(i))) ==
              std::bit_cast<std::uint32_t>(got[i]));  // scalar == SIMD, bit for bit
    }
  }
  // BF16: every bit pattern (SIMD path, then a 5-element scalar tail) is the upper half of the float.
  w.add("b_all", DType::BF16, {65536}, all.data(), all.size() * 2);
  w.add("b_tail", DType::BF16, {5}, all.data() + 0x7f7e, 10);
  const auto image_b = w.serialize();
  const auto fb = SafetensorsFile::from_memory(image_b.data(), image_b.size(), "bf16");
  std::vector<float> got_b(65536, 0.f);
  to_f32(fb.tensor("b_all"), got_b.data());
  for (std::size_t i = 0; i < all.size(); ++i)
    REQUIRE(std::bit_cast<std::uint32_t>(got_b[i]) == static_cast<std::uint32_t>(i) << 16);
  const auto tail_b = to_f32(fb.tensor("b_tail"));
  for (std::size_t i = 0; i < 5; ++i) REQUIRE(std::bit_cast<std::uint32_t>(tail_b[i]) == (0x7f7eu + i) << 16);

  const auto tail = to_f32(f.tensor("h_tail"));
  CHECK(tail[2] == 65504.f);  // largest finite half
  CHECK(std::isinf(tail[3]));
  CHECK(std::isnan(tail[4]));
  CHECK(f16_to_f32(0x0001) == 0x1p-24f);  // smallest subnormal
  CHECK(f16_to_f32(0x03ff) == 1023 * 0x1p-24f);
  CHECK(f16_to_f32(0x0400) == 0x1p-14f);
  CHECK(f16_to_f32(0x3c00) == 1.f);
  CHECK(f16_to_f32(0xc000) == -2.f);
  CHECK(f16_to_f32(0x3555) == 0x1.554p-2f);
  CHECK(std::signbit(f16_to_f32(0x8000)));

  SafetensorsWriter w2;
  const std::uint16_t b[] = {0x3f80, 0xc000, 0x3fc0, 0x7f80, 0x0001, 0x8000, 0x4049};
  w2.add("b", DType::BF16, {7}, b, sizeof b);
  const double d[] = {1.0, -0.1, 1e300, 3.0000001};
  w2.add("d", DType::F64, {2, 2}, d, sizeof d);
  const std::int32_t i32[] = {-5, 2147483647, 0};
  w2.add("i32", DType::I32, {3}, i32, sizeof i32);
  const std::int64_t i64[] = {-5, std::int64_t{1} << 40};
  w2.add("i64", DType::I64, {2}, i64, sizeof i64);
  const float scalar = 2.5f;
  w2.add("scalar", DType::F32, {}, &scalar, 4);
  const auto image2 = w2.serialize();
  const auto f2 = SafetensorsFile::from_memory(image2.data(), image2.size(), "mixed");
  const auto bv = to_f32(f2.tensor("b"));
  CHECK(bv == std::vector<float>{1.f, -2.f, 1.5f, std::numeric_limits<float>::infinity(), 0x1p-133f, -0.f, 3.140625f});
  const auto dv = to_f32(f2.tensor("d"));
  CHECK(dv == std::vector<float>{1.f, -0.1f, std::numeric_limits<float>::infinity(), static_cast<float>(3.0000001)});
  CHECK(to_i64(f2.tensor("i32")) == std::vector<std::int64_t>{-5, 2147483647, 0});
  CHECK(to_i64(f2.tensor("i64")) == std::vector<std::int64_t>{-5, std::int64_t{1} << 40});
  CHECK(to_f32(f2.tensor("scalar")) == std::vector<float>{2.5f});
  CHECK(f2.tensor("scalar").numel() == 1);

  REQUIRE_THROWS_WITH(to_f32(f2.tensor("i64")), Contains("to_f32: tensor 'i64': dtype I64 is not a float type"));
  float sink;
  REQUIRE_THROWS_WITH(to_f32(f2.tensor("i32"), &sink), Contains("to_f32: tensor 'i32': dtype I32 is not a float type"));
  REQUIRE_THROWS_WITH(to_f32(f2.tensor("b"), nullptr), Contains("to_f32: argument 'dst': null"));
  REQUIRE_THROWS_WITH(to_i64(f2.tensor("d")), Contains("to_i64: tensor 'd': dtype F64 is not an integer type"));
  REQUIRE_THROWS_WITH(data_as<float>(f2.tensor("d")), Contains("data_as: tensor 'd': dtype is F64, requested F32"));
  // Sorted name order puts "scalar" (F32) after "i64"; a 2-byte tensor named "a" shifts it off 4-byte alignment.
  SafetensorsWriter w3;
  w3.add("a", DType::BF16, {1}, b, 2);
  w3.add("b", DType::F32, {}, &scalar, 4);
  const auto image3 = w3.serialize();
  const auto f3 = SafetensorsFile::from_memory(image3.data(), image3.size(), "unaligned");
  REQUIRE_THROWS_WITH(data_as<float>(f3.tensor("b")), Contains("data_as: tensor 'b': data is not aligned to 4 bytes"));
  CHECK(to_f32(f3.tensor("b")) == std::vector<float>{2.5f});
  CHECK(data_as<attnkit::bf16>(f3.tensor("a"))->bits == b[0]);
  CHECK(parse_dtype("BF16") == DType::BF16);
  REQUIRE_THROWS_WITH(parse_dtype("U8", "ctx: "), Contains("ctx: unknown dtype 'U8'"));
}

// ---------------------------------------------------------------------------------------------
// Broken files: each failure has its own message.

TEST_CASE("broken safetensors files", "[io][errors]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  TempDir tmp(seed);
  // A valid 2-tensor file to cut and corrupt.
  SafetensorsWriter w;
  const auto a = rng.normal_vec(6), b = rng.normal_vec(5);
  w.add_f32("a", {2, 3}, a.data());
  w.add_f32("b", {5}, b.data());
  const auto good = w.serialize();
  const auto ok = [](const std::string& header, std::size_t data) { return make_raw(header, data); };
  using R = std::vector<std::byte>;

  SECTION("shorter than 8 bytes") {
    const fs::path p = tmp.path / "short.safetensors";
    write_bytes(p, R(good.begin(), good.begin() + 5));
    REQUIRE_THROWS_WITH(SafetensorsFile::open(p),
                        Contains("short.safetensors: file is 5 bytes, shorter than the 8-byte header length"));
    write_bytes(p, {});
    REQUIRE_THROWS_WITH(SafetensorsFile::open(p), Contains("file is 0 bytes, shorter than the 8-byte header length"));
    REQUIRE_THROWS_WITH(SafetensorsFile::from_memory(good.data(), 7, "m"),
                        Contains("m: file is 7 bytes, shorter than the 8-byte header length"));
    REQUIRE_THROWS_WITH(SafetensorsFile::from_memory(nullptr, 16, "m"), Contains("m: null buffer of 16 bytes"));
  }
  SECTION("file cannot be opened / is a directory") {
    REQUIRE_THROWS_WITH(SafetensorsFile::open(tmp.path / "absent.safetensors"),
                        Contains("absent.safetensors: cannot open: No such file or directory"));
    REQUIRE_THROWS_WITH(SafetensorsFile::open(tmp.path), Contains(": not a regular file"));
  }
  SECTION("header length beyond the file, or absurd") {
    const fs::path p = tmp.path / "hdr.safetensors";
    write_bytes(p, R(good.begin(), good.begin() + 40));  // cut inside the header
    REQUIRE_THROWS_WITH(SafetensorsFile::open(p), Contains("extends beyond the end of the file (40 bytes)"));
    REQUIRE_THROWS_WITH(parse(make_raw("{}", 0, 3)), Contains("header length 3 extends beyond the end of the file (10 bytes)"));
    REQUIRE_THROWS_WITH(parse(make_raw("{}", 0, 100'000'001)),
                        Contains("header length 100000001 is absurd (more than 100000000 bytes)"));
    REQUIRE_THROWS_WITH(parse(make_raw("{}", 0, ~0ull - 1)), Contains("is absurd"));
  }
  SECTION("truncated in the data section") {
    const fs::path p = tmp.path / "cut.safetensors";
    write_bytes(p, R(good.begin(), good.end() - 3));
    REQUIRE_THROWS_WITH(SafetensorsFile::open(p),
                        Contains("cut.safetensors: tensor 'b': data_offsets [24, 44] outside the data section (41 bytes)"));
  }
  SECTION("offsets out of range, reversed, wrong form") {
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 8)),
                        Contains("tensor 'x': data_offsets [4, 12] outside the data section (8 bytes)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 8)),
                        Contains("tensor 'x': data_offsets [4, 0] has begin > end"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8)),
                        Contains("tensor 'x': 'data_offsets' must be [begin, end]"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":{"a":1,"b":2}}})", 8)),
                        Contains("tensor 'x': 'data_offsets' must be [begin, end]"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8)),
                        Contains("tensor 'x': data_offsets begin is negative (-8)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", 8)),
                        Contains("tensor 'x': data_offsets end is not an integer (string)"));
  }
  SECTION("size mismatch") {
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]}})", 16)),
                        Contains("tensor 'x': data size 16 bytes does not match shape [2, 3] x BF16 (12 bytes)"));
  }
  SECTION("unknown dtype, wrong JSON types, missing fields") {
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}})", 8)),
                        Contains("mem.safetensors: tensor 'x': unknown dtype 'Q4_K'"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': 'dtype' is not a string (number)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': 'shape' is not an array (number)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":[1,2]})", 8)), Contains("tensor 'x': entry is not a JSON object"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"shape":[2],"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': missing 'dtype'"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': missing 'shape'"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2]}})", 8)),
                        Contains("tensor 'x': missing 'data_offsets'"));
  }
  SECTION("bad shape entries and overflow") {
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': shape entry 0 is negative (-2)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[1,2.5],"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': shape entry 1 is not an integer (number)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[null],"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': shape entry 0 is not an integer (null)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", 8)),
                        Contains("tensor 'x': shape entry 0 is too large (18446744073709551615)"));
    REQUIRE_THROWS_WITH(
        parse(ok(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8)),
        Contains("tensor 'x': shape [4294967296, 4294967296] has more elements than fit in 64 bits"));
    REQUIRE_THROWS_WITH(
        parse(ok(R"({"x":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8)),
        Contains("has more elements than fit in 64 bits"));
  }
  SECTION("overlapping tensors") {
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12)),
                        Contains("tensors 'x' [0, 8) and 'y' [4, 12) overlap"));
    // Listed out of order, and an empty tensor inside another one is not an overlap.
    const auto f = parse(ok(R"({"y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
                            R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                            R"("x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12));
    CHECK(f.names() == std::vector<std::string>{"e", "x", "y"});
  }
  SECTION("duplicate names, bad JSON, not an object, bad metadata") {
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                 R"("x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
                        Contains("duplicate tensor name 'x' in header"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"x":{"dtype":"F32",)", 8)), Contains("mem.safetensors: header is not valid JSON"));
    REQUIRE_THROWS_WITH(parse(ok("\xff\xfe", 0)), Contains("header is not valid JSON"));
    REQUIRE_THROWS_WITH(parse(ok("[1,2]", 0)), Contains("header is not a JSON object (array)"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"__metadata__":[]})", 0)),
                        Contains("__metadata__ must be an object of strings, got array"));
    REQUIRE_THROWS_WITH(parse(ok(R"({"__metadata__":{"format":"pt","n":3}})", 0)),
                        Contains("__metadata__ entry 'n' must be a string, got number"));
    // Padding spaces after the JSON are part of the format.
    CHECK(parse(ok(R"({"__metadata__":{"format":"pt"}}   )", 0)).metadata()["format"] == "pt");
  }
  SECTION("missing tensor, wrong shape, non-float weight") {
    const fs::path p = tmp.path / "model.safetensors";
    SafetensorsWriter w2;
    w2.add_f32("w", {2, 3}, a.data());
    const std::int64_t ids[] = {1, 2};
    w2.add("ids", DType::I64, {2}, ids, sizeof ids);
    w2.write(p);
    const auto f = SafetensorsFile::open(p);
    REQUIRE_THROWS_WITH(f.tensor("nope"), Contains("model.safetensors: missing tensor 'nope'"));
    const auto c = Checkpoint::open(tmp.path);
    REQUIRE_THROWS_WITH(c.tensor("nope"), Contains("model.safetensors: missing tensor 'nope'"));
    REQUIRE_THROWS_WITH(c.tensor("w", {3, 2}), Contains("tensor 'w': expected shape [3, 2], got [2, 3]"));
    REQUIRE_THROWS_WITH(c.tensor("w", {6}), Contains("tensor 'w': expected shape [6], got [2, 3]"));
    REQUIRE_THROWS_WITH(c.tensor("ids", {2}), Contains("tensor 'ids': dtype I64 is not a float type"));
    CHECK(c.tensor("w", {2, 3}).nbytes == 24);
  }
  SECTION("writer argument errors") {
    SafetensorsWriter w2;
    const float x[4] = {};
    REQUIRE_THROWS_WITH(w2.add("a", DType::F32, {2, 3}, x, 16),
                        Contains("SafetensorsWriter::add: argument 'nbytes': 16 does not match shape [2, 3] x F32 (24 bytes)"));
    REQUIRE_THROWS_WITH(w2.add("a", DType::F32, {-1, 3}, x, 16),
                        Contains("SafetensorsWriter::add: argument 'shape': negative dimension in [-1, 3]"));
    REQUIRE_THROWS_WITH(w2.add("a", DType::F32, {1ll << 40, 1ll << 40}, x, 16),
                        Contains("SafetensorsWriter::add: argument 'shape': [1099511627776, 1099511627776] overflows"));
    REQUIRE_THROWS_WITH(w2.add("a", DType::F32, {4}, nullptr, 16),
                        Contains("SafetensorsWriter::add: argument 'data': null for tensor 'a'"));
    REQUIRE_THROWS_WITH(w2.add("__metadata__", DType::F32, {4}, x, 16), Contains("'__metadata__' is reserved"));
    w2.add("a", DType::F32, {4}, x, 16);
    REQUIRE_THROWS_WITH(w2.add_f32("a", {4}, x), Contains("SafetensorsWriter::add: argument 'name': duplicate tensor 'a'"));
    REQUIRE_THROWS_WITH(w2.write(tmp.path / "no-such-dir" / "x.safetensors"),
                        Contains("SafetensorsWriter::write: cannot open"));
  }
}

TEST_CASE("mutation fuzz: corrupted files parse or throw attnkit::Error", "[io][fuzz]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  SafetensorsWriter w;
  const auto v = rng.normal_vec(12);
  w.add_f32("model.a", {3, 4}, v.data());
  const std::uint16_t h[3] = {0x3c00, 0x8001, 0x7e00};
  w.add("model.h", DType::F16, {3}, h, sizeof h);
  const std::int64_t ids[2] = {7, -1};
  w.add("ids", DType::I64, {2}, ids, sizeof ids);
  w.add("s", DType::BF16, {}, h, 2);
  w.set_metadata("format", "pt");
  const auto good = w.serialize();
  int parsed = 0, rejected = 0;
  for (int it = 0; it < 2000; ++it) {
    CAPTURE(it);
    auto m = good;
    const int flips = static_cast<int>(rng.integer(1, 4));
    for (int k = 0; k < flips && !m.empty(); ++k) {
      const auto pos = static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(m.size()) - 1));
      switch (rng.integer(0, 3)) {
        case 0: m[pos] ^= static_cast<std::byte>(1 << rng.integer(0, 7)); break;
        case 1: m[pos] = static_cast<std::byte>(rng.integer(0, 255)); break;
        case 2: m[pos] = static_cast<std::byte>("0123456789[]{},\":-"[rng.integer(0, 17)]); break;
        default: m.resize(pos); break;
      }
    }
    // Exact-size heap copy so ASan sees any read past the end.
    std::unique_ptr<std::byte[]> buf(new std::byte[std::max<std::size_t>(m.size(), 1)]);
    if (!m.empty()) std::memcpy(buf.get(), m.data(), m.size());
    try {
      const auto f = SafetensorsFile::from_memory(buf.get(), m.size(), "mutant");
      double sum = 0;
      for (const auto& t : f.tensors()) {
        for (std::size_t i = 0; i < t.nbytes; ++i) sum += static_cast<double>(t.data[i]);
        if (is_float_dtype(t.dtype))
          for (float x : to_f32(t)) sum += std::isfinite(x) ? 0.0 : 1.0;
        else
          for (auto x : to_i64(t)) sum += static_cast<double>(x & 1);
      }
      CHECK(sum >= 0);
      ++parsed;
    } catch (const attnkit::Error&) {
      ++rejected;
    }
  }
  CAPTURE(parsed, rejected);
  CHECK(parsed + rejected == 2000);
  CHECK(rejected > 0);
  CHECK(parsed > 0);
}

// ---------------------------------------------------------------------------------------------
// Config

namespace {
nlohmann::json base_config() { return Qwen3Config::load(kFixtures / "qwen3-tiny-f32").raw; }
nlohmann::json old_config() { return Qwen3Config::load(kFixtures / "qwen3-tiny-oldconfig").raw; }
}  // namespace

TEST_CASE("config: older layout with use_sliding_window and max_window_layers", "[io][config]") {
  auto j = old_config();
  j["num_hidden_layers"] = 5;
  j["use_sliding_window"] = true;
  j["sliding_window"] = 16;
  j["max_window_layers"] = 3;
  auto c = Qwen3Config::from_json(j);
  using L = LayerType;
  CHECK(c.layer_types == std::vector<L>{L::full_attention, L::full_attention, L::full_attention, L::sliding_attention,
                                        L::sliding_attention});
  CHECK(c.sliding_window == std::optional<std::int64_t>(16));

  // sliding_window is ignored unless use_sliding_window is true.
  j["use_sliding_window"] = false;
  c = Qwen3Config::from_json(j);
  CHECK(c.num_sliding_layers() == 0);
  CHECK_FALSE(c.sliding_window.has_value());

  // null window: nothing slides; max_window_layers >= layers: nothing slides.
  j["use_sliding_window"] = true;
  j["sliding_window"] = nullptr;
  CHECK(Qwen3Config::from_json(j).num_sliding_layers() == 0);
  j["sliding_window"] = 16;
  j["max_window_layers"] = 28;
  CHECK(Qwen3Config::from_json(j).num_sliding_layers() == 0);
  // Absent sliding_window takes the transformers default 4096.
  j.erase("sliding_window");
  j["max_window_layers"] = 0;
  c = Qwen3Config::from_json(j);
  CHECK(c.num_sliding_layers() == 5);
  CHECK(c.sliding_window == std::optional<std::int64_t>(4096));

  // head_dim absent -> hidden / heads; defaults of absent optional fields.
  auto k = old_config();
  for (const char* f : {"head_dim", "rope_theta", "rms_norm_eps", "torch_dtype", "max_position_embeddings",
                        "tie_word_embeddings", "num_key_value_heads", "hidden_act", "attention_bias", "rope_scaling"})
    k.erase(f);
  c = Qwen3Config::from_json(k);
  CHECK(c.head_dim == 8);
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.dtype == "float32");
  CHECK(c.max_position_embeddings == 32768);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.num_key_value_heads == c.num_attention_heads);
  k["head_dim"] = nullptr;
  CHECK(Qwen3Config::from_json(k).head_dim == 8);
  // rope_scaling with the default type is accepted.
  k["rope_scaling"] = {{"rope_type", "default"}};
  CHECK(Qwen3Config::from_json(k).rope_theta == 10000.0);
}

TEST_CASE("config: Qwen3-0.6B", "[io][config]") {
  const auto c = qwen3_0_6b_config();
  CHECK(c.vocab_size == 151936);
  CHECK(c.hidden_size == 1024);
  CHECK(c.intermediate_size == 3072);
  CHECK(c.num_hidden_layers == 28);
  CHECK(c.num_attention_heads == 16);
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.head_dim == 128);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.max_position_embeddings == 40960);
  CHECK(c.tie_word_embeddings);
  CHECK(c.dtype == "bfloat16");
  CHECK_FALSE(c.sliding_window.has_value());
  CHECK(c.layer_types == std::vector<LayerType>(28, LayerType::full_attention));
  CHECK(c.raw["eos_token_id"] == 151645);
  CHECK(c.raw["bos_token_id"] == 151643);
  const auto back = Qwen3Config::from_json(c.to_json());
  CHECK(back.to_json() == c.to_json());
}

TEST_CASE("config: errors name the field and the file", "[io][config][errors]") {
  const auto err = [](nlohmann::json j) { Qwen3Config::from_json(j, "cfg.json"); };
  auto j = base_config();

  SECTION("model_type") {
    j["model_type"] = "llama";
    REQUIRE_THROWS_WITH(err(j), Contains("cfg.json: field 'model_type': unsupported model type 'llama' (accepted: qwen3)"));
    constexpr std::string_view extended[] = {"qwen3", "qwen3_looped"};
    j["model_type"] = "qwen3_looped";
    CHECK(Qwen3Config::from_json(j, "cfg.json", extended).model_type == "qwen3_looped");
    j.erase("model_type");
    REQUIRE_THROWS_WITH(err(j), Contains("cfg.json: field 'model_type': missing required field"));
  }
  SECTION("missing required fields and wrong types") {
    for (const char* f : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}) {
      CAPTURE(f);
      auto k = j;
      k.erase(f);
      REQUIRE_THROWS_WITH(err(k), Contains(std::string("field '") + f + "': missing required field"));
      k[f] = "64";
      REQUIRE_THROWS_WITH(err(k), Contains(std::string("field '") + f + "': expected an integer, got string"));
      k[f] = 64.5;
      REQUIRE_THROWS_WITH(err(k), Contains(std::string("field '") + f + "': expected an integer, got number"));
    }
    j["tie_word_embeddings"] = 1;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'tie_word_embeddings': expected true or false, got number"));
    j = base_config();
    j["rms_norm_eps"] = "1e-6";
    REQUIRE_THROWS_WITH(err(j), Contains("field 'rms_norm_eps': expected a number, got string"));
    j = base_config();
    j["dtype"] = 16;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'dtype': expected a string, got number"));
    j = base_config();
    j["head_dim"] = 18446744073709551615ull;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'head_dim': integer out of range"));
    REQUIRE_THROWS_WITH(err(nlohmann::json::array()), Contains("cfg.json: config is not a JSON object (array)"));
  }
  SECTION("non-positive sizes and divisibility") {
    for (const char* f : {"vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads", "head_dim",
                          "max_position_embeddings"}) {
      CAPTURE(f);
      auto k = j;
      k[f] = 0;
      REQUIRE_THROWS_WITH(err(k), Contains(std::string("field '") + f + "': must be positive, got 0"));
    }
    auto k = j;
    k["num_hidden_layers"] = -1;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'num_hidden_layers': must be positive, got -1"));
    k["num_hidden_layers"] = 1 << 20;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'num_hidden_layers': implausibly large (1048576)"));
    k = j;
    k["num_attention_heads"] = 0;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'num_attention_heads': must be positive, got 0"));
    k = j;
    k["num_key_value_heads"] = 3;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'num_key_value_heads': num_attention_heads 4 is not divisible by "
                                         "num_key_value_heads 3"));
    k = j;
    k.erase("head_dim");
    k["num_attention_heads"] = 6;
    k["num_key_value_heads"] = 3;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'head_dim': absent and hidden_size 64 is not divisible by "
                                         "num_attention_heads 6"));
    k = j;
    k["rms_norm_eps"] = -1e-6;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'rms_norm_eps': must be positive"));
    k = j;
    k["rope_parameters"]["rope_theta"] = 0;
    REQUIRE_THROWS_WITH(err(k), Contains("field 'rope_theta': must be positive"));
  }
  SECTION("rope scaling") {
    j["rope_parameters"]["rope_type"] = "yarn";
    REQUIRE_THROWS_WITH(err(j), Contains("field 'rope_parameters.rope_type': unsupported rope scaling 'yarn'"));
    j = base_config();
    j["rope_parameters"] = 5;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'rope_parameters': expected an object, got number"));
    auto o = old_config();
    o["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
    REQUIRE_THROWS_WITH(err(o), Contains("field 'rope_scaling.type': unsupported rope scaling 'linear'"));
    o["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
    REQUIRE_THROWS_WITH(err(o), Contains("field 'rope_scaling.rope_type': unsupported rope scaling 'dynamic'"));
    o["rope_scaling"] = {{"factor", 2.0}};
    REQUIRE_THROWS_WITH(err(o), Contains("field 'rope_scaling': unsupported rope scaling without a type"));
    o["rope_scaling"] = "yarn";
    REQUIRE_THROWS_WITH(err(o), Contains("field 'rope_scaling': expected an object or null, got string"));
  }
  SECTION("activation and bias") {
    j["hidden_act"] = "gelu";
    REQUIRE_THROWS_WITH(err(j), Contains("field 'hidden_act': unsupported activation 'gelu' (only silu)"));
    j = base_config();
    j["attention_bias"] = true;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'attention_bias': true is not supported"));
  }
  SECTION("layer_types and sliding windows") {
    j["layer_types"] = nlohmann::json::array({"full_attention", "chunked_attention"});
    REQUIRE_THROWS_WITH(err(j), Contains("field 'layer_types': entry 1 is 'chunked_attention'"));
    j["layer_types"] = nlohmann::json::array({"full_attention"});
    REQUIRE_THROWS_WITH(err(j), Contains("field 'layer_types': has 1 entries, num_hidden_layers is 2"));
    j["layer_types"] = nlohmann::json::array({"full_attention", 3});
    REQUIRE_THROWS_WITH(err(j), Contains("field 'layer_types': expected a string, got number"));
    j["layer_types"] = "full_attention";
    REQUIRE_THROWS_WITH(err(j), Contains("field 'layer_types': expected an array, got string"));
    // Sliding layers need use_sliding_window and a positive window.
    j["layer_types"] = nlohmann::json::array({"sliding_attention", "full_attention"});
    j["sliding_window"] = 8;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'sliding_window': layer_types has sliding layers but there is no "
                                         "window (use_sliding_window is false, sliding_window is set)"));
    j["use_sliding_window"] = true;
    j["sliding_window"] = nullptr;
    REQUIRE_THROWS_WITH(err(j), Contains("(use_sliding_window is true, sliding_window is null)"));
    j["sliding_window"] = 0;
    REQUIRE_THROWS_WITH(err(j), Contains("field 'sliding_window': must be positive, got 0"));
    j["sliding_window"] = 8;
    const auto c = Qwen3Config::from_json(j);
    CHECK(c.sliding_window == std::optional<std::int64_t>(8));
    CHECK(c.layer_types[0] == LayerType::sliding_attention);
  }
  SECTION("validate on a hand-built config") {
    auto c = qwen3_0_6b_config();
    c.sliding_window = 128;
    REQUIRE_THROWS_WITH(c.validate("mine"), Contains("mine: field 'sliding_window': is set but no layer slides"));
    c.layer_types[3] = LayerType::sliding_attention;
    c.validate();
    c.sliding_window.reset();
    REQUIRE_THROWS_WITH(c.validate(), Contains("field 'sliding_window': sliding layers need a window"));
    c.layer_types.pop_back();
    REQUIRE_THROWS_WITH(c.validate(), Contains("field 'layer_types': has 27 entries, num_hidden_layers is 28"));
    Qwen3Config empty;
    REQUIRE_THROWS_WITH(empty.validate(), Contains("field 'vocab_size': must be positive, got 0"));
  }
  SECTION("files") {
    const auto seed = attnkit::test::fresh_seed();
    TempDir tmp(seed);
    REQUIRE_THROWS_WITH(Qwen3Config::load(tmp.path), Contains("config.json: cannot open config file"));
    std::ofstream(tmp.path / "config.json") << "{\"model_type\": \"qwen3\",";
    REQUIRE_THROWS_WITH(Qwen3Config::load(tmp.path), Contains("config.json: config file is not valid JSON"));
    std::ofstream(tmp.path / "config.json") << base_config().dump();
    CHECK(Qwen3Config::load(tmp.path / "config.json").hidden_size == 64);
  }
}
