// attnkit/attnkit.hpp — umbrella header: includes the whole library.
// Engines that want only one kernel include its header directly (each is self-contained).
#pragma once

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/stage_profile.hpp"
#include "attnkit/core/trace_tensor.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/common.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/loop.hpp"
#include "attnkit/attention/merge.hpp"
#include "attnkit/attention/paged_kv.hpp"
#include "attnkit/attention/prefill.hpp"

#include "attnkit/depth/attnres.hpp"
#include "attnkit/recurrent/gated_delta.hpp"
#include "attnkit/recurrent/gated_norm.hpp"
#include "attnkit/recurrent/linear_attention.hpp"
#include "attnkit/recurrent/short_conv.hpp"

#include "attnkit/linalg/packed_linear.hpp"

#include "attnkit/io/config.hpp"
#include "attnkit/io/safetensors.hpp"

#include "attnkit/model/batch_session.hpp"
#include "attnkit/model/builtin.hpp"
#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/mixers/gated_deltanet.hpp"
#include "attnkit/model/mixers/loop_attention.hpp"
#include "attnkit/model/parts/cached_attention.hpp"
#include "attnkit/model/parts/paged_attention.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"
#include "attnkit/model/recipe.hpp"
#include "attnkit/model/residuals/attention_residuals.hpp"
#include "attnkit/model/trace.hpp"
#include "attnkit/model/workspace.hpp"

#include "attnkit/viz/trace_plot.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/ops.hpp"
#include "attnkit/model/qwen3.hpp"
#include "attnkit/model/residual.hpp"
#include "attnkit/model/tensor_source.hpp"
