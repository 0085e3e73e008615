// attnkit/core/cpu.hpp — what the running CPU is, for the few kernel choices that were measured
// to go opposite ways on AMD and Intel cores of the same instruction set (the far weight
// prefetch of the decode GEMVs, vdpbf16ps in bf16 decode): the build's -march says what may run,
// not what pays.
#pragma once

namespace attnkit::cpu {

// Whether the CPU is AMD's (checked once).
inline bool is_amd() {
  static const bool amd = [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
#else
    return false;
#endif
  }();
  return amd;
}

}  // namespace attnkit::cpu
