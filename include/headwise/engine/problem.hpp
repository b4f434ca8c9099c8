/// @file
/// @brief The resolved problem the engine runs: views, sizes, head map, score parameters.
#pragma once

#include <cstdint>

#include "../core/view.hpp"
#include "head_map.hpp"

namespace headwise::engine {

/// One attention problem, validated by the caller (variants/). Layout [batch, seq, heads, dim]
/// with any strides on the first three axes and a contiguous dim axis.
template <class KV>
struct problem {
  tensor_view<const float, 4> q;               ///< (batch, seq_q, heads_q, dim_qk)
  tensor_view<const KV, 4> k;                  ///< (batch, seq_kv, heads_kv, dim_qk)
  tensor_view<const KV, 4> v;                  ///< (batch, seq_kv, heads_kv, dim_v); may alias k
  tensor_view<float, 4> out;                   ///< (batch, seq_q, heads_out, dim_v)
  tensor_view<float, 3> lse;                   ///< (batch, heads_out, seq_q) natural log; optional
  tensor_view<const float, 1> sink_logits;     ///< (heads_out); optional
  head_mapper heads;
  std::int64_t batch = 0, seq_q = 0, seq_kv = 0, dim_qk = 0, dim_v = 0;
  float scale = 1.0f;
};

/// Work decomposition: lanes (query rows = positions x group heads) per work item, keys per tile.
struct blocking {
  std::int64_t rows = 128;
  std::int64_t block_kv = 64;
};

}  // namespace headwise::engine
