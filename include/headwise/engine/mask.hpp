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

#include "../core/view.hpp"

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

/// Block-sparse: the key blocks and single key columns a block mask lists for the query block
/// of the work item (BCSR partial and full blocks, FlexAttention; a column index, MInference).
/// Partial blocks and columns take the element mask key <= hi(pos) (causal; unbounded when
/// not causal), full blocks none. Blocks are visited in increasing key order, then the
/// columns in chunks of block_kv keys: a chunk of consecutive keys is a contiguous tile, any
/// other chunk a gathered one (f's fourth argument). Work items must be aligned to q_block.
struct sparse_mask {
  tensor_view<const std::int32_t, 3> partial_n, full_n, cols_n;  ///< counts (b, h, qb), this (b, h) only
  tensor_view<const std::int32_t, 4> partial_i, full_i, cols_i;  ///< indices
  std::int64_t b = 0, h = 0;        ///< the mask's (batch, head) of this item (0 when broadcast)
  std::int64_t q_block = 1, kv_block = 1, seq_kv = 0;
  std::int64_t offset = 0;          ///< diagonal of query i: i + offset
  bool causal = false;
  static constexpr bool needs_masking = true;

  [[nodiscard]] std::int64_t hi(std::int64_t pos) const noexcept { return causal ? pos + offset : unbounded_hi; }
  [[nodiscard]] key_bounds lane_bounds(std::int64_t pos) const noexcept { return {unbounded_lo, hi(pos)}; }
  [[nodiscard]] std::int64_t sinks() const noexcept { return 0; }

  /// prefetch(a, n): the mainloop's hint that keys [a, a + n) come next (the block after the
  /// one being visited: listed blocks are not consecutive, so hardware prefetch misses them).
  template <class F, class Prefetch>
  void for_each_tile(std::int64_t p0, std::int64_t p1, std::int64_t k_begin, std::int64_t k_end,
                     std::int64_t block_kv, F&& f, Prefetch&& prefetch) const {
    const std::int64_t qb = p0 / q_block;
    const std::int64_t all_see = hi(p0), any_sees = hi(p1 - 1);  // keys <= all_see: every row
    const std::int64_t end = std::min({k_end, seq_kv, any_sees < unbounded_hi ? any_sees + 1 : seq_kv});
    auto row = [&](const tensor_view<const std::int32_t, 3>& n, const tensor_view<const std::int32_t, 4>& i,
                   std::int64_t& count) -> const std::int32_t* {
      count = n.absent() ? 0 : n(b, h, qb);
      return count > 0 ? &i(b, h, qb, 0) : nullptr;
    };
    std::int64_t np = 0, nf = 0, nc = 0;
    const std::int32_t* pl = row(partial_n, partial_i, np);
    const std::int32_t* fl = row(full_n, full_i, nf);
    const std::int32_t* cl = row(cols_n, cols_i, nc);
    auto block = [&](std::int64_t kb, bool is_full) {
      const std::int64_t a = std::max(kb * kv_block, k_begin);
      const std::int64_t z = std::min(kb * kv_block + kv_block, is_full ? std::min(k_end, seq_kv) : end);
      for (std::int64_t t = a; t < z; t += block_kv) {
        const std::int64_t u = std::min(z, t + block_kv);
        f(t, u - t, is_full || u - 1 <= all_see);
      }
    };
    for (std::int64_t x = 0, y = 0; x < np || y < nf;) {  // merge the two ascending lists
      const bool from_partial = y == nf || (x < np && pl[x] < fl[y]);
      const std::int64_t kb = from_partial ? pl[x++] : fl[y++];
      const bool more = x < np || y < nf;
      const std::int64_t next = !more ? -1 : (y == nf || (x < np && pl[x] < fl[y])) ? pl[x] : fl[y];
      if (next >= 0) prefetch(next * kv_block, std::min(kv_block, end - next * kv_block));
      block(kb, !from_partial);
    }
    const std::int32_t* c0 = std::lower_bound(cl, cl + nc, k_begin);
    const std::int32_t* c1 = std::lower_bound(c0, cl + nc, end);
    for (const std::int32_t* c = c0; c < c1; c += std::min<std::int64_t>(block_kv, c1 - c)) {
      const std::int64_t m = std::min<std::int64_t>(block_kv, c1 - c);
      const bool all = c[m - 1] <= all_see;
      if (c[m - 1] - c[0] == m - 1) {
        f(std::int64_t{c[0]}, m, all);
      } else {
        f(std::int64_t{c[0]}, m, all, c);
      }
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

/// A block mask's policy for each work item: the (batch, head) slice of the mask (broadcast
/// axes of extent 1 read slice 0) and the causal diagonal of the sequence.
struct sparse_spec {
  using mask_type = sparse_mask;
  tensor_view<const std::int32_t, 3> partial_n, full_n, cols_n;
  tensor_view<const std::int32_t, 4> partial_i, full_i, cols_i;
  std::int64_t q_block = 1, kv_block = 1;
  bool causal = false, top_left = false;
  [[nodiscard]] sparse_mask make_item(std::int64_t b, std::int64_t head, std::int64_t seq_q,
                                      std::int64_t seq_kv) const noexcept {
    sparse_mask m;
    m.partial_n = partial_n;
    m.full_n = full_n;
    m.cols_n = cols_n;
    m.partial_i = partial_i;
    m.full_i = full_i;
    m.cols_i = cols_i;
    m.b = partial_n.shape[0] == 1 ? 0 : b;
    m.h = partial_n.shape[1] == 1 ? 0 : head;
    m.q_block = q_block;
    m.kv_block = kv_block;
    m.seq_kv = seq_kv;
    m.offset = top_left ? 0 : seq_kv - seq_q;
    m.causal = causal;
    return m;
  }
};

}  // namespace headwise::engine
