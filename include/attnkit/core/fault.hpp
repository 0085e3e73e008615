// attnkit/core/fault.hpp — fault injection for tests of the error paths of parallel kernels.
//
// ATTNKIT_FAULT_POINT("family") sits in the worker bodies of each kernel family (prefill,
// decode, linear, recurrent, sparse, attnres, ...). It compiles to nothing unless
// ATTNKIT_FAULT_INJECTION is defined; then fault::arm(family, n) makes the n-th point of that
// family reached afterwards (on any thread) throw fault::Injected, once. Define the macro for a
// whole program or not at all (the kernels are inline: mixing would break the ODR).
#pragma once

#if defined(ATTNKIT_FAULT_INJECTION)
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

namespace attnkit::fault {

struct Injected : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct State {
  std::atomic<const char*> family{nullptr};
  std::atomic<long> countdown{0};
  std::atomic<long> hits{0};
  std::atomic<long> fired{0};
};
inline State& state() {
  static State s;
  return s;
}

// The n-th (1-based) point of `family` (a string literal) reached from now throws.
inline void arm(const char* family, long n) {
  State& s = state();
  s.family.store(nullptr);
  s.hits.store(0);
  s.fired.store(0);
  s.countdown.store(n);
  s.family.store(family);
}
inline void disarm() { state().family.store(nullptr); }
// Points of the armed family passed since arm(), and whether one threw.
inline long hits() { return state().hits.load(); }
inline bool fired() { return state().fired.load() != 0; }

inline void point(const char* family) {
  State& s = state();
  const char* armed = s.family.load(std::memory_order_acquire);
  if (!armed || std::strcmp(armed, family) != 0) return;
  s.hits.fetch_add(1);
  if (s.countdown.fetch_sub(1) == 1) {
    s.fired.store(1);
    throw Injected(std::string("injected fault in a '") + family + "' worker");
  }
}

}  // namespace attnkit::fault

#define ATTNKIT_FAULT_POINT(family) ::attnkit::fault::point(family)
#else
#define ATTNKIT_FAULT_POINT(family) ((void)0)
#endif
