// attnkit/model/workspace.hpp — a forward step's scratch buffers, reused by every layer.
//
// A layer's intermediates (the fused q/k/v rows, the attention output, the MLP's gate/up rows
// and activations) are dead when the layer ends, and the next layer wants the same sizes.
// Allocating and zero-filling them per layer cost 0.09 s of a 2.1 s prefill of 512 tokens after
// 8192 (Qwen3-0.6B, AMX host, 2 threads, timed by core/stage_profile.hpp): ~31 MB per layer
// written by one thread just before the kernels wrote it again.
// A Workspace lives for one forward (Qwen3Model::run_stack makes it and hands it to the layers in
// StepContext::workspace); each slot is uninitialised, 64-byte aligned memory that grows when a
// layer asks for more and is otherwise reused. Whoever takes a slot writes all of it before
// reading it. Slots are per purpose, so the buffers one layer holds at once never alias; the
// model's memory estimate (estimate_memory) already counts all of them for a step.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "attnkit/core/memory.hpp"

namespace attnkit::model {

// What a slot holds (one buffer per purpose).
// mixer: a mixer's own transforms of its q and k (Tuneable's unfolded q U, k U).
enum class ScratchSlot { qkv, attention, mlp_gate_up, mlp_act, mixer, count };

// Switched on, every buffer a Workspace hands out is first filled with NaN, so a layer that
// reads scratch it did not write shows NaN instead of the previous layer's numbers (the model
// tests switch it on; it costs a fill per buffer).
inline std::atomic<bool>& poison_workspaces() {
  static std::atomic<bool> on{false};
  return on;
}

class Workspace {
 public:
  // At least n floats of slot s, uninitialised (the previous layer's values, or garbage).
  float* get(ScratchSlot s, std::size_t n) {
    Buffer& slot = slots_[static_cast<std::size_t>(s)];
    if (slot.capacity < n) {
      slot.data.reset();  // before the new one: a step's peak stays one buffer per slot
      slot.data.reset(static_cast<float*>(allocate_aligned(n * sizeof(float))));
      slot.capacity = n;
    }
    if (poison_workspaces().load(std::memory_order_relaxed))
      std::fill_n(slot.data.get(), n, std::numeric_limits<float>::quiet_NaN());
    return slot.data.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<float, Free> data;
    std::size_t capacity = 0;
  };
  std::array<Buffer, static_cast<std::size_t>(ScratchSlot::count)> slots_;
};

// n floats for slot s: the step's workspace where there is one (a model's forward), else `own`
// resized (a mixer called on its own).
inline float* scratch(Workspace* ws, ScratchSlot s, std::size_t n, std::vector<float>& own) {
  if (ws) return ws->get(s, n);
  own.resize(n);
  return own.data();
}

}  // namespace attnkit::model
