// Qwen3.5 / Qwen3-Next hybrids (spec §7): fixture qwen35-hybrid-tiny (transformers'
// Qwen3_5ForCausalLM, float64 eager) in prefill, decode and uneven chunks; the Qwen3-Next fused
// and fla weight layouts (the fixture's weights rewritten) give the same logits; a looped hybrid;
// Gated DeltaNet and attention-gate traces; partial rotary and rope_parameters keys in the config;
// configuration and checkpoint errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "attnkit/model/qwen3.hpp"
#include "model_test_util.hpp"
#include "test_util.hpp"

using namespace attnkit;
using namespace attnkit::test;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

const char* kFixture = "qwen35-hybrid-tiny";

struct Reference {
  std::vector<std::int64_t> ids;
  std::vector<float> logits;
};
Reference load_reference() {
  auto f = io::SafetensorsFile::open(fixture(kFixture) / "reference.safetensors");
  return {io::to_i64(f.tensor("input_ids")), io::to_f32(f.tensor("logits"))};
}

// The fixture's tensors as f32 matrices by name.
struct Tensors {
  io::SafetensorsFile file = io::SafetensorsFile::open(fixture(kFixture) / "model.safetensors");
  std::vector<float> get(const std::string& n) const { return io::to_f32(file.tensor(n)); }
  std::vector<std::int64_t> shape(const std::string& n) const { return file.tensor(n).shape; }
};

// Rows [r0, r0 + n) of a row-major matrix with `cols` columns, appended to dst.
void append_rows(std::vector<float>& dst, const std::vector<float>& m, std::int64_t cols, std::int64_t r0, std::int64_t n) {
  dst.insert(dst.end(), m.begin() + r0 * cols, m.begin() + (r0 + n) * cols);
}

enum class Layout { qwen3_next, fla };

// Writes the fixture into dir with every Gated DeltaNet layer in another checkpoint layout.
void write_layout(const fs::path& dir, Layout layout, nlohmann::json config) {
  const Tensors src;
  const std::int64_t nk = config["linear_num_key_heads"], nv = config["linear_num_value_heads"],
                     dk = config["linear_key_head_dim"], dv = config["linear_value_head_dim"],
                     D = config["hidden_size"], K = config["linear_conv_kernel_dim"];
  const std::int64_t key = nk * dk, val = nv * dv, r = nv / nk;
  std::ofstream(dir / "config.json") << config.dump(1);
  io::SafetensorsWriter w;
  for (const auto& n : src.file.names()) {
    const auto pos = n.find(".linear_attn.");
    if (pos == std::string::npos) {
      const auto& t = src.file.tensor(n);
      w.add(n, t.dtype, t.shape, t.data, t.nbytes);
      continue;
    }
    const std::string p = n.substr(0, pos + 13), leaf = n.substr(pos + 13);
    auto put = [&](const std::string& name, std::vector<std::int64_t> shape, const std::vector<float>& v) {
      w.add_f32(p + name, std::move(shape), v.data());
    };
    if (leaf == "in_proj_qkv.weight") {
      const auto qkv = src.get(n), z = src.get(p + "in_proj_z.weight");
      if (layout == Layout::qwen3_next) {  // grouped per key head: [q | k | v (r·dv) | z (r·dv)]
        std::vector<float> qkvz;
        for (std::int64_t j = 0; j < nk; ++j) {
          append_rows(qkvz, qkv, D, j * dk, dk);
          append_rows(qkvz, qkv, D, key + j * dk, dk);
          append_rows(qkvz, qkv, D, 2 * key + j * r * dv, r * dv);
          append_rows(qkvz, z, D, j * r * dv, r * dv);
        }
        put("in_proj_qkvz.weight", {2 * key + 2 * val, D}, qkvz);
      } else {
        std::vector<float> q, k, v;
        append_rows(q, qkv, D, 0, key);
        append_rows(k, qkv, D, key, key);
        append_rows(v, qkv, D, 2 * key, val);
        put("q_proj.weight", {key, D}, q);
        put("k_proj.weight", {key, D}, k);
        put("v_proj.weight", {val, D}, v);
        put("g_proj.weight", {val, D}, z);
      }
    } else if (leaf == "in_proj_b.weight") {
      const auto b = src.get(n), a = src.get(p + "in_proj_a.weight");
      if (layout == Layout::qwen3_next) {  // per key head [b (r) | a (r)]
        std::vector<float> ba;
        for (std::int64_t j = 0; j < nk; ++j) {
          append_rows(ba, b, D, j * r, r);
          append_rows(ba, a, D, j * r, r);
        }
        put("in_proj_ba.weight", {2 * nv, D}, ba);
      } else {
        put("b_proj.weight", {nv, D}, b);
        put("a_proj.weight", {nv, D}, a);
      }
    } else if (leaf == "conv1d.weight" && layout == Layout::fla) {
      const auto c = src.get(n);
      std::vector<float> q, k, v;
      append_rows(q, c, K, 0, key);
      append_rows(k, c, K, key, key);
      append_rows(v, c, K, 2 * key, val);
      put("q_conv1d.weight", {key, 1, K}, q);
      put("k_conv1d.weight", {key, 1, K}, k);
      put("v_conv1d.weight", {val, 1, K}, v);
    } else if (leaf == "norm.weight" && layout == Layout::fla) {
      put("o_norm.weight", src.shape(n), src.get(n));
    } else if (leaf == "out_proj.weight" && layout == Layout::fla) {
      put("o_proj.weight", src.shape(n), src.get(n));
    } else if (leaf == "in_proj_z.weight" || leaf == "in_proj_a.weight") {
      // written with in_proj_qkv / in_proj_b
    } else {
      put(leaf, src.shape(n), src.get(n));
    }
  }
  w.write(dir / "model.safetensors");
}

}  // namespace

TEST_CASE("qwen3.5 hybrid fixture: prefill, decode and uneven chunks match transformers", "[model][hybrid]") {
  const auto m = model::Qwen3Model::load(fixture(kFixture));
  const Reference ref = load_reference();
  CHECK(m.recipe() == "qwen3.5");
  CHECK(m.passes() == 1);
  CHECK(m.config().rotary_dim() == 4);
  for (int l = 0; l < 3; ++l) CHECK(m.mixer(l).kind() == "linear_attention");
  CHECK(m.mixer(0).describe() == "linear_attention (Gated DeltaNet, 2 key / 4 value heads, d_k 16, d_v 16, conv 4, "
                                 "Qwen3.5 layout)");
  CHECK(m.mixer(3).describe() == "full_attention, output gate, rotary 4 of 16");
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size());
  REQUIRE(T == 21);
  for (std::vector<std::int64_t> steps : {std::vector<std::int64_t>{}, {1}, {5}, {7, 3, 11}, {2, 9, 1}}) {
    CAPTURE(steps);
    const Run r = run(m, ref.ids, steps);
    const double err = test::rel_l2(r.logits, ref.logits);
    std::printf("qwen35-hybrid-tiny steps %s: relative L2 error %.3g\n",
                steps.empty() ? "prefill" : std::to_string(steps[0]).c_str(), err);
    CHECK(err <= 1e-4);
  }
  CHECK(test::bit_equal(run(m, ref.ids, {}, {}, 1).logits, run(m, ref.ids, {}, {}, 2).logits));
  CHECK(test::bit_equal(run(m, ref.ids, {1}, {}, 1).logits, run(m, ref.ids, {1}, {}, 2).logits));
  // Greedy generation continues the states (decode after prefill = decode all the way).
  auto s = m.new_session();
  const auto gen = model::generate_greedy(m, s, ref.ids, 4);
  CHECK(gen.size() == 4);
  CHECK(s.position() == T + 3);
}

TEST_CASE("qwen3.5 hybrid: the Qwen3-Next fused and fla layouts load to the same model", "[model][hybrid]") {
  TempDir tmp;
  const Reference ref = load_reference();
  const auto base = model::Qwen3Model::load(fixture(kFixture));
  const Run want = run(base, ref.ids);
  auto cfg = read_config(fixture(kFixture));
  SECTION("Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head, model_type qwen3_next with dense MLPs") {
    cfg["model_type"] = "qwen3_next";
    cfg["num_experts"] = 0;
    cfg["num_experts_per_tok"] = 10;
    cfg["decoder_sparse_step"] = 1;
    cfg.erase("rope_parameters");  // Qwen3-Next's older layout: partial rotary at the top level
    cfg["rope_theta"] = 10000.0;
    write_layout(tmp.path, Layout::qwen3_next, cfg);
    const auto m = model::Qwen3Model::load(tmp.path);
    CHECK(m.recipe() == "qwen3.5");
    CHECK(m.mixer(1).describe().find("Qwen3-Next layout") != std::string::npos);
    const Run got = run(m, ref.ids);
    CHECK(test::bit_equal(got.logits, want.logits));  // the same internal layout, bit for bit
    CHECK(test::rel_l2(run(m, ref.ids, {1}).logits, ref.logits) <= 1e-4);
  }
  SECTION("fla: q/k/v/g/a/b_proj, q/k/v_conv1d, o_norm, o_proj") {
    write_layout(tmp.path, Layout::fla, cfg);
    const auto m = model::Qwen3Model::load(tmp.path);
    CHECK(m.mixer(0).describe().find("fla layout") != std::string::npos);
    CHECK(test::bit_equal(run(m, ref.ids).logits, want.logits));
    CHECK(test::rel_l2(run(m, ref.ids, {4, 9}).logits, ref.logits) <= 1e-4);
  }
  SECTION("Qwen3-Next layer types from full_attention_interval when layer_types is absent") {
    cfg.erase("layer_types");
    cfg["full_attention_interval"] = 4;
    write_checkpoint(fixture(kFixture), tmp.path, cfg);
    CHECK(test::bit_equal(run(model::Qwen3Model::load(tmp.path), ref.ids).logits, want.logits));
  }
}

TEST_CASE("qwen3.5 hybrid: traces of the Gated DeltaNet gates and the attention output gate", "[model][hybrid][trace]") {
  const auto m = model::Qwen3Model::load(fixture(kFixture));
  const Reference ref = load_reference();
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size());
  const Run prefill = run(m, ref.ids), decode = run(m, ref.ids, {1});
  for (const char* name : {"gdn_beta", "gdn_decay", "attn_gate"}) {
    CAPTURE(name);
    const auto a = prefill.trace.tensor(name), b = decode.trace.tensor(name);
    const bool gdn = std::string(name) != "attn_gate";
    // Layers 0 .. the last that records: the Gated DeltaNet layers are 0-2, attention is 3.
    const std::int64_t L = gdn ? 3 : 4;
    REQUIRE(a.shape == std::vector<std::int64_t>{L, T, 4});
    REQUIRE(b.shape == a.shape);
    CHECK(a.dims == std::vector<std::string>{"layer", "token", gdn ? "value head" : "head"});
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t i = 0; i < T * 4; ++i) {
        const float v = a.data[static_cast<std::size_t>(l * T * 4 + i)];
        if ((l < 3) == gdn) {  // the layers with the mechanism: a gate in (0, 1], the same in decode
          REQUIRE(v > 0.f);
          REQUIRE(v <= 1.f);
          REQUIRE(b.data[static_cast<std::size_t>(l * T * 4 + i)] == Approx(v).epsilon(1e-4));
        } else {
          REQUIRE(std::isnan(v));
        }
      }
  }
}

TEST_CASE("qwen3.5 hybrid: a looped stack gives every pass its own recurrent state", "[model][hybrid][looped]") {
  TempDir tmp;
  const Reference ref = load_reference();
  auto cfg = read_config(fixture(kFixture));
  cfg["loop_count"] = 2;
  cfg["loop_between"] = "norm";
  write_checkpoint(fixture(kFixture), tmp.path, cfg);
  const auto m = model::Qwen3Model::load(tmp.path);
  CHECK(m.passes() == 2);
  const Run prefill = run(m, ref.ids);
  CHECK(test::rel_l2(run(m, ref.ids, {1}).logits, prefill.logits) <= 1e-5);
  CHECK(test::rel_l2(run(m, ref.ids, {6, 2, 9}).logits, prefill.logits) <= 1e-5);
  CHECK(test::rel_l2(prefill.logits, ref.logits) > 1e-2);  // the second pass changes the output
  // The first step's read-out is the one-pass model's output.
  const std::int64_t T = static_cast<std::int64_t>(ref.ids.size()), V = 256;
  const auto per_step = prefill.trace.tensor("logits_per_step");
  REQUIRE(per_step.shape == std::vector<std::int64_t>{2, T, V});
  CHECK(test::rel_l2(std::vector<float>(per_step.data.begin(), per_step.data.begin() + T * V), ref.logits) <= 1e-4);
}

TEST_CASE("random hybrid models: sane outputs, decode and chunks match prefill", "[model][hybrid][random]") {
  const model::Registry reg = model::default_registry();
  nlohmann::json j = {{"model_type", "qwen3"}, {"vocab_size", 300}, {"hidden_size", 64}, {"intermediate_size", 96},
                      {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"head_dim", 16}, {"rope_parameters", {{"rope_theta", 1e6}, {"rope_type", "default"}}},
                      {"tie_word_embeddings", true}};
  j = model::with_hybrid(j);
  j["linear_num_value_heads"] = 8;  // GVA: two value heads per key head
  j["linear_value_head_dim"] = 8;
  test::Rng rng(test::fresh_seed());
  std::vector<std::int64_t> ids(37);
  for (auto& id : ids) id = rng.integer(0, 299);
  for (auto type : {model::WeightType::f32, model::WeightType::bf16}) {
    const auto m = model::Qwen3Model::random(reg.parse_config(j), type, 3, &reg);
    CHECK(m.recipe() == "qwen3.5");
    const Run prefill = run(m, ids);
    for (float v : prefill.logits) REQUIRE(std::isfinite(v));
    CHECK(test::rel_l2(run(m, ids, {1}).logits, prefill.logits) <= 1e-5);
    CHECK(test::rel_l2(run(m, ids, {10, 1, 20}).logits, prefill.logits) <= 1e-5);
    const auto decay = prefill.trace.tensor("gdn_decay");
    for (std::int64_t i = 0; i < 3 * 37 * 8; ++i) {  // layers 0-2: α in (0, 1)
      REQUIRE(decay.data[static_cast<std::size_t>(i)] > 0.f);
      REQUIRE(decay.data[static_cast<std::size_t>(i)] < 1.f);
    }
  }
  // Qwen3-0.6B's dimensions as a hybrid: layers 3, 7, ..., 27 full attention, rotary 32 of 128.
  const auto big = reg.parse_config(model::hybrid_0_6b_config());
  CHECK(big.rotary_dim() == 32);
  io::ConfigFields fields(big);
  const model::Plan plan = reg.recipe_for(big).plan(fields);
  REQUIRE(plan.mixers.size() == 28);
  for (std::size_t l = 0; l < 28; ++l) CHECK(plan.mixers[l] == ((l + 1) % 4 == 0 ? "gated_attention" : "linear_attention"));
  CHECK(plan.norm_weight_offset == 1.f);
  CHECK(fields.unconsumed().empty());
}

TEST_CASE("config: partial rotary and rope_parameters keys are read, never dropped", "[model][hybrid][config]") {
  const model::Registry reg = model::default_registry();
  auto cfg = read_config(fixture(kFixture));
  SECTION("top level, inside rope_parameters, or both alike") {
    auto j = cfg;
    j.erase("partial_rotary_factor");
    CHECK(reg.parse_config(j).rotary_dim() == 4);
    j = cfg;
    j["rope_parameters"].erase("partial_rotary_factor");
    CHECK(reg.parse_config(j).partial_rotary_factor == 0.25);
    CHECK(reg.parse_config(j).to_json()["rope_parameters"]["partial_rotary_factor"] == 0.25);
    j = cfg;
    j["partial_rotary_factor"] = 0.5;
    REQUIRE_THROWS_WITH(reg.parse_config(j, "c.json"),
                        Contains("c.json: field 'partial_rotary_factor': 0.5 differs from rope_parameters.partial_rotary_factor 0.25"));
  }
  SECTION("bad factors") {
    for (double f : {0.0, 1.5}) {
      auto j = cfg;
      j["partial_rotary_factor"] = f;
      j["rope_parameters"]["partial_rotary_factor"] = f;
      REQUIRE_THROWS_WITH(reg.parse_config(j), Contains("field 'partial_rotary_factor': must be in (0, 1]"));
    }
    auto j = cfg;
    j["partial_rotary_factor"] = 0.375;  // 16 · 0.375 = 6 rotary dims: even, fine; 0.3125 gives 5
    j["rope_parameters"]["partial_rotary_factor"] = 0.375;
    CHECK(reg.parse_config(j).rotary_dim() == 6);
    j["partial_rotary_factor"] = 0.3125;
    j["rope_parameters"]["partial_rotary_factor"] = 0.3125;
    REQUIRE_THROWS_WITH(reg.parse_config(j), Contains("gives 5 rotary dimensions"));
  }
  SECTION("an unknown rope_parameters key is reported; Qwen3.5's M-RoPE keys are consumed") {
    TempDir tmp;
    auto j = cfg;
    j["rope_parameters"]["mrope_section"] = {1, 1, 0};
    j["rope_parameters"]["mrope_interleaved"] = true;
    write_checkpoint(fixture(kFixture), tmp.path, j);
    CHECK(test::rel_l2(run(model::Qwen3Model::load(tmp.path), load_reference().ids).logits, load_reference().logits) <= 1e-4);
    j["rope_parameters"]["beta_fast"] = 32;
    write_checkpoint(fixture(kFixture), tmp.path, j);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path),
                        Contains("config fields that recipe 'qwen3.5' does not use: rope_parameters.beta_fast"));
    auto plain = read_config(fixture("qwen3-tiny-f32"));
    plain["rope_parameters"]["mrope_section"] = {4, 2, 2};
    write_checkpoint(fixture("qwen3-tiny-f32"), tmp.path, plain);
    REQUIRE_THROWS_WITH(model::Qwen3Model::load(tmp.path),
                        Contains("config fields that recipe 'qwen3' does not use: rope_parameters.mrope_section"));
  }
}

TEST_CASE("qwen3.5 hybrid: configuration and checkpoint errors name the field or tensor", "[model][hybrid][errors]") {
  TempDir tmp;
  const fs::path fx = fixture(kFixture);
  const auto cfg = read_config(fx);
  auto load_with = [&](const nlohmann::json& c, const std::string& drop = "", const std::string& reshape = "") {
    write_checkpoint(fx, tmp.path, c, drop, reshape);
    return model::Qwen3Model::load(tmp.path);
  };
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.1.linear_attn.A_log"), Contains("model.layers.1.linear_attn.A_log"));
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.2.linear_attn.conv1d.weight"),
                      Contains("model.layers.2.linear_attn.conv1d.weight"));
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.0.linear_attn.in_proj_qkv.weight"),
                      Contains("no Gated DeltaNet projection under 'model.layers.0.linear_attn.'") &&
                          Contains("in_proj_qkvz.weight (Qwen3-Next)"));
  REQUIRE_THROWS_WITH(load_with(cfg, "", "model.layers.0.linear_attn.in_proj_z.weight"),
                      Contains("model.layers.0.linear_attn.in_proj_z.weight") && Contains("[64, 64]"));
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.3.self_attn.q_norm.weight"), Contains("model.layers.3.self_attn.q_norm.weight"));
  REQUIRE_THROWS_WITH(load_with(cfg, "model.layers.3.input_layernorm.weight"), Contains("model.layers.3.input_layernorm.weight"));
  auto c = cfg;
  c["linear_num_value_heads"] = 3;
  REQUIRE_THROWS_WITH(load_with(c), Contains("field 'linear_num_value_heads': 3 is not a multiple of linear_num_key_heads 2"));
  c = cfg;
  c["linear_conv_kernel_dim"] = 0;
  REQUIRE_THROWS_WITH(load_with(c), Contains("field 'linear_conv_kernel_dim': the conv kernel must be at least 1, got 0"));
  c = cfg;
  c["linear_key_head_dim"] = 8;  // the tensors are for 16
  REQUIRE_THROWS_WITH(load_with(c), Contains("in_proj_qkv.weight"));
  c = cfg;
  c["model_type"] = "qwen3_next";  // transformers' default: 512 experts in every layer
  REQUIRE_THROWS_WITH(load_with(c), Contains("field 'num_experts': layer 0's MLP is a mixture of experts (num_experts 512, "
                                             "decoder_sparse_step 1, mlp_only_layers [])") &&
                                        Contains("dense MLPs only"));
  c["num_experts"] = 8;
  c["mlp_only_layers"] = {0, 1, 2};
  REQUIRE_THROWS_WITH(load_with(c), Contains("layer 3's MLP is a mixture of experts") && Contains("mlp_only_layers [0, 1, 2]"));
  c["mlp_only_layers"] = {0, 1, 2, 3};  // every layer dense: the experts' settings are moot
  CHECK(load_with(c).recipe() == "qwen3.5");
  c = cfg;
  c["num_experts"] = 0;  // qwen3_5_text has no MoE fields: a stray one is not dropped in silence
  REQUIRE_THROWS_WITH(load_with(c), Contains("config fields that recipe 'qwen3.5' does not use: num_experts"));
  c = cfg;
  c["mamba_ssm_dtype"] = "bfloat16";
  REQUIRE_THROWS_WITH(load_with(c), Contains("field 'mamba_ssm_dtype'"));
  c = cfg;
  c["layer_types"][1] = "sliding_attention";
  c["use_sliding_window"] = true;
  c["sliding_window"] = 8;
  REQUIRE_THROWS_WITH(load_with(c), Contains("entry 1 is 'sliding_attention'"));
  c = cfg;
  c["attn_output_gate"] = false;  // then q_proj has no gate rows
  REQUIRE_THROWS_WITH(load_with(c), Contains("model.layers.3.self_attn.q_proj.weight"));
}
