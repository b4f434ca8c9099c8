/// @file
/// @brief Mask policies with CUTLASS-style trip counts: which KV tiles a block of query
/// positions visits, which of them are full (unmasked fast path) and the per-lane bounds
/// applied on the boundary tiles.
///
/// A mask policy provides
///   for_each_tile(p0, p1, k_begin, k_end, block_kv, f): calls f(key0, n, full) over the key
///       tiles in [k_begin, k_end) that any query position in [p0, p1) can see, in increasing
///       key order; full == true means every key of the tile is visible to every position (no
///       element masking). [k_begin, k_end) is a split of the KV range (split-KV).
///   lane_bounds(pos) -> {lo, hi}: key j is visible to pos iff j <= hi && (j >= lo || j < sinks)
///   sinks(): the sink-token count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace headwise::engine {

inline constexpr std::int64_t unbounded_lo = std::numeric_limits<std::int64_t>::min() / 4;
inline constexpr std::int64_t unbounded_hi = std::numeric_limits<std::int64_t>::max() / 4;

struct key_bounds {
  std::int64_t lo, hi;
};

/// Every key visible: all tiles are full.
struct no_mask {
  std::int64_t seq_kv = 0;
  static constexpr bool needs_masking = false;

  template <class F>
  void for_each_tile(std::int64_t /*p0*/, std::int64_t /*p1*/, std::int64_t k_begin, std::int64_t k_end,
                     std::int64_t block_kv, F&& f) const {
    const std::int64_t end = std::min(seq_kv, k_end);
    for (std::int64_t a = k_begin; a < end; a += block_kv) f(a, std::min(block_kv, end - a), true);
  }
  [[nodiscard]] key_bounds lane_bounds(std::int64_t /*pos*/) const noexcept { return {unbounded_lo, unbounded_hi}; }
  [[nodiscard]] std::int64_t sinks() const noexcept { return 0; }
};

/// The band around the diagonal d(i) = i + offset: causal (either alignment), sliding window
/// (left, right) and sink tokens, in one policy:
///   visible(i, j) = j <= d(i) + right && (j >= d(i) - left || j < sink_tokens),  0 <= j < seq_kv
/// with right = 0 for causal and left/right unbounded when -1.
struct band_mask {
  std::int64_t seq_kv = 0;
  std::int64_t offset = 0;  ///< seq_kv - seq_q for bottom-right alignment, 0 for top-left
  std::int64_t left = -1;   ///< -1: unbounded
  std::int64_t right = -1;  ///< -1: unbounded
  std::int64_t sink_tokens = 0;
  static constexpr bool needs_masking = true;

  [[nodiscard]] std::int64_t lo(std::int64_t i) const noexcept {
    return left < 0 ? unbounded_lo : i + offset - left;
  }
  [[nodiscard]] std::int64_t hi(std::int64_t i) const noexcept {
    return right < 0 ? unbounded_hi : i + offset + right;
  }
  [[nodiscard]] key_bounds lane_bounds(std::int64_t pos) const noexcept { return {lo(pos), hi(pos)}; }
  [[nodiscard]] std::int64_t sinks() const noexcept { return sink_tokens; }

  template <class F>
  void for_each_tile(std::int64_t p0, std::int64_t p1, std::int64_t k_begin, std::int64_t k_end,
                     std::int64_t block_kv, F&& f) const {
    // lo and hi grow with i, so the block's union is [lo(p0), hi(p1-1)] (+ sinks) and the keys
    // visible to all of it are [lo(p1-1), hi(p0)] (+ sinks up to hi(p0)).
    const std::int64_t lo_min = lo(p0), lo_max = lo(p1 - 1);
    const std::int64_t hi_min = hi(p0), hi_max = hi(p1 - 1);
    const std::int64_t end = std::min(hi_max + 1, seq_kv);
    if (end <= 0) return;
    const std::int64_t sink_end = std::min(sink_tokens, end);
    const std::int64_t win_begin = std::max<std::int64_t>(lo_min, 0);
    // Cut a visited interval into block_kv tiles from its start; a tile is full when every key
    // in it is visible to every position (tiles straddling a bound take the masked path, so
    // no tile is ever cut short at a bound).
    auto visit = [&](std::int64_t a, std::int64_t b) {
      a = std::max(a, k_begin);
      b = std::min(b, k_end);
      for (std::int64_t t = a; t < b; t += block_kv) {
        const std::int64_t u = std::min(b, t + block_kv);
        const bool full = u <= hi_min + 1 && (t >= lo_max || u <= sink_tokens);
        f(t, u - t, full);
      }
    };
    if (sink_end >= win_begin) {
      visit(0, end);
    } else {
      if (sink_end > 0) visit(0, sink_end);
      if (win_begin < end) visit(win_begin, end);
    }
  }
};

/// Builds the per-sequence mask policy (sequences of a varlen or paged batch differ in length).
struct no_mask_spec {
  using mask_type = no_mask;
  [[nodiscard]] no_mask make(std::int64_t /*seq_q*/, std::int64_t seq_kv) const noexcept { return no_mask{seq_kv}; }
};

/// Band parameters independent of the sequence lengths; make() aligns the diagonal.
struct band_spec {
  using mask_type = band_mask;
  bool top_left = false;    ///< diagonal i (top-left) or i + seq_kv - seq_q (bottom-right)
  std::int64_t left = -1;   ///< -1: unbounded
  std::int64_t right = -1;  ///< -1: unbounded; 0 for causal
  std::int64_t sink_tokens = 0;
  /// Window sides at or beyond unbounded_hi (e.g. INT64_MAX meant as "no bound") are unbounded,
  /// which keeps every bound computation of band_mask inside 64 bits.
  [[nodiscard]] band_mask make(std::int64_t seq_q, std::int64_t seq_kv) const noexcept {
    auto side = [](std::int64_t w) { return w >= unbounded_hi ? std::int64_t{-1} : w; };
    return band_mask{seq_kv, top_left ? 0 : seq_kv - seq_q, side(left), side(right), sink_tokens};
  }
};

}  // namespace headwise::engine
