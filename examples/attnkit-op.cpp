// attnkit-op — run one attnkit kernel on tensors from a safetensors file and write its outputs,
// so a researcher can check a kernel against their own Python code.
//
//   attnkit-op gated-delta --in inputs.safetensors --out outputs.safetensors --mode chunked
//   attnkit-op linear-attention --in x.safetensors --out y.safetensors --feature-map elu --normalize
//   attnkit-op attention --in x.safetensors --out y.safetensors --window 128
//   attnkit-op attention --in x.safetensors --out y.safetensors --softcap 30 --sinks   (x holds sinks [H])
//   attnkit-op sparse-attention --in x.safetensors --out y.safetensors --topk 2048
//
// Inputs may be F32, BF16, F16 or F64 (converted to float32); outputs are F32 (selected key
// indices I64, -1 padded). Tensor shapes use
// the kernels' layouts ([tokens, heads, head_dim], no batch axis). Every op is one entry of the
// table in ops(): its tensors (with symbolic shapes checked against each other), its options and
// its run function; --help is printed from that table.
// Exit codes: 0 done; 2 bad input (unknown op or option, missing tensor, wrong shape, a kernel's
// argument error), with a one-line message on stderr; 1 anything else.
#include "attnkit_op_reader.hpp"

using namespace attnkit;

namespace {

int run_main(int argc, char** argv) {
  const Invocation inv = parse_args(std::vector<std::string>(argv + 1, argv + argc));
  if (inv.help) {
    std::fputs(usage().c_str(), stdout);
    return 0;
  }
  const Op* op = inv.op;
  const std::string& out_path = inv.out_path;
  const io::SafetensorsFile in = io::SafetensorsFile::open(inv.in_path);
  Run run(*op, in, inv.opts);
  execute(run);
  io::SafetensorsWriter w;
  std::map<std::string, std::string> listed;  // name -> shape, all outputs in name order
  for (const auto& [name, t] : run.outputs()) {
    w.add_f32(name, t.shape, t.data.data());
    listed[name] = io::shape_string(t.shape);
  }
  for (const auto& [name, t] : run.int_outputs()) {
    w.add(name, io::DType::I64, t.first, t.second.data(), t.second.size() * sizeof(std::int64_t));
    listed[name] = io::shape_string(t.first);
  }
  std::string written;
  for (const auto& [name, shape] : listed) written += (written.empty() ? "" : ", ") + name + " " + shape;
  w.set_metadata("attnkit-op", op->name);
  w.write(out_path);
  std::printf("attnkit-op %s: wrote %s to %s\n", op->name.c_str(), written.c_str(), out_path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "attnkit-op: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attnkit-op: failed: %s\n", e.what());
    return 1;
  }
}
