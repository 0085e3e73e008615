// attnkit/core/error.hpp — the one exception type and the argument checks.
//
// Contract: every public entry point validates its arguments before touching memory and throws
// attnkit::Error with a message of the form "<function>: <argument>: <problem>". Nothing in the
// library aborts or returns silently on bad input.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace attnkit {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
[[noreturn]] inline void throw_error(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw Error(os.str());
}
}  // namespace detail

}  // namespace attnkit

// ATTNKIT_REQUIRE(cond, parts...): throws attnkit::Error(parts...) when cond is false. The
// message parts are only formatted on failure, so checks on hot entry points cost a branch.
#define ATTNKIT_REQUIRE(cond, ...)                                       \
  do {                                                                  \
    if (!(cond)) [[unlikely]] ::attnkit::detail::throw_error(__VA_ARGS__); \
  } while (0)
