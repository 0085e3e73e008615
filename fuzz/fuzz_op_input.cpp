// libFuzzer target: attnkit-op's input reader (examples/attnkit_op_reader.hpp). The input is a
// command line (the op and its options, space-separated) up to the first newline, then the bytes
// of a safetensors file. The reader must parse the options, read and check the tensors and run
// the kernel, or throw attnkit::Error; sizes are capped (Limits) so each run stays small.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "attnkit_op_reader.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* nl = static_cast<const std::uint8_t*>(std::memchr(data, '\n', size));
  if (!nl) return 0;
  std::vector<std::string> args;
  {
    std::istringstream line(std::string(reinterpret_cast<const char*>(data), static_cast<std::size_t>(nl - data)));
    std::string a;
    while (line >> a) args.push_back(a);
  }
  const std::size_t head = static_cast<std::size_t>(nl - data) + 1;
  try {
    const Invocation inv = parse_args(args, /*need_files=*/false);
    if (inv.help) return 0;
    const auto in = io::SafetensorsFile::from_memory(data + head, size - head, "fuzz.safetensors");
    Limits limits;
    limits.max_elements = 4096;
    limits.max_threads = 2;
    Run run(*inv.op, in, inv.opts, limits);
    execute(run);
    float sum = 0;  // every output element is readable (ASan)
    for (const auto& [name, t] : run.outputs())
      for (float x : t.data) sum += x;
    volatile float sink = sum;
    (void)sink;
  } catch (const attnkit::Error&) {
  }
  return 0;
}
