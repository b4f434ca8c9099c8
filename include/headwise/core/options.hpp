/// @file
/// @brief attention_options: scale, causal alignment, window, sinks, softcap, head map, threads.
#pragma once

#include <cstdint>
#include <optional>

#include "view.hpp"

namespace headwise {

/// Causal masking and how the diagonal is aligned when seq_q != seq_kv.
enum class causal_mode : std::uint8_t {
  none,          ///< every key visible (subject to window and sinks)
  bottom_right,  ///< key j visible to query i iff j <= i + (seq_kv - seq_q): FlashAttention,
                 ///< right for KV caches (decode, chunked prefill)
  top_left,      ///< key j visible to query i iff j <= i: PyTorch SDPA is_causal=True
};

/// Which KV head a query head reads, and which query head an attention head uses.
enum class head_map : std::uint8_t {
  interleave,  ///< heads_q % heads_kv == 0; query head h reads KV head h / (heads_q/heads_kv)
               ///< (repeat_interleave, FlashAttention GQA). Output has heads_q heads.
  tile,        ///< max % min == 0; attention head a uses query head a % heads_q and KV head
               ///< a % heads_kv (FlexPrefill gqa_interleave; reverse SQA when heads_kv >
               ///< heads_q). Output has max(heads_q, heads_kv) heads.
};

/// Options of every attention entry point, named after PyTorch SDPA / FlashAttention.
struct attention_options {
  /// Softmax scale; default 1/sqrt(dim_qk). Must be finite.
  std::optional<float> scale{};
  /// Causal mask and its alignment (see causal_mode).
  causal_mode causal = causal_mode::none;
  /// Sliding window, inclusive, around the diagonal d(i) (aligned as `causal`, bottom-right
  /// when causal is none, as FlashAttention): keys in [d(i) - window_left, d(i) + window_right].
  /// -1 = unbounded on that side. With causal, window_right must be -1 or 0.
  std::int64_t window_left = -1;
  std::int64_t window_right = -1;
  /// Sink tokens (StreamingLLM): the first `sink_tokens` keys stay visible whatever the left
  /// window bound; causality still applies to them.
  std::int64_t sink_tokens = 0;
  /// Per-head sink logits (gpt-oss): one extra logit per output head in the softmax
  /// denominator, in the scaled logit domain, with no value row. Shape [heads_out]. Absent by
  /// default. -inf means no sink for that head.
  tensor_view<const float, 1> sink_logits{};
  /// Logit softcap: s <- softcap * tanh(s / softcap) after scaling. 0 = off; otherwise a value
  /// in [FLT_MIN, 1e38] (subnormal caps would make 1/softcap infinite).
  float softcap = 0.0f;
  /// Head map between query heads and KV heads (see head_map).
  head_map heads = head_map::interleave;
  /// OpenMP threads; 0 = omp_get_max_threads(). Results do not depend on it.
  int num_threads = 0;
};

}  // namespace headwise
