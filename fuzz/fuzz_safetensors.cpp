// libFuzzer target: arbitrary bytes as a safetensors file. Parsing must either succeed, with every
// tensor's bytes inside the buffer, or throw attnkit::Error; ASan/UBSan catch everything else.
#include <cstddef>
#include <cstdint>

#include "attnkit/io/safetensors.hpp"

using namespace attnkit::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = SafetensorsFile::from_memory(data, size, "fuzz.safetensors");
    unsigned sum = 0;
    for (const auto& t : f.tensors()) {
      // Every claimed byte must lie inside the input (ASan checks the reads).
      for (std::size_t i = 0; i < t.nbytes; ++i) sum += static_cast<unsigned>(t.data[i]);
      if (&f.tensor(t.name) != &t || !f.contains(t.name)) __builtin_trap();
      if (static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype) != t.nbytes) __builtin_trap();
      if (is_float_dtype(t.dtype)) {
        for (float x : to_f32(t)) sum += x == x;
        try {
          if (t.dtype == DType::F32) sum += data_as<float>(t) != nullptr;
        } catch (const attnkit::Error&) {  // unaligned: allowed, reported as an error
        }
      } else {
        for (auto x : to_i64(t)) sum += static_cast<unsigned>(x);
      }
    }
    sum += static_cast<unsigned>(f.metadata().size());
    volatile unsigned sink = sum;
    (void)sink;
  } catch (const attnkit::Error&) {
  }
  return 0;
}
