// attnkit/core/precision.hpp — how exact a product must be, for the linear layers and attention.
#pragma once

namespace attnkit {

enum class Precision {
  exact,  // float32-accurate products (bf16 operands: the f32 side split into bf16 planes)
  fast    // the f32 side rounded to bf16 once (AMX tiles where available); ~1e-3 relative error
};

}  // namespace attnkit
