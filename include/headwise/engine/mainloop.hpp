/// @file
/// @brief THE flash-attention mainloop: one work item = (sequence, KV head, block of query
/// positions, range of keys), all query heads of the KV group in its rows. Variants change it
/// only through its policies: the tile layout (query_lanes / key_lanes), the row sources, the
/// mask, the score modifier, the head map and dims in the problem.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../tile/diagnostics.hpp"
#include "layouts.hpp"
#include "mask.hpp"
#include "problem.hpp"
#include "score.hpp"

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::engine {

/// Rows go to the final output (and LSE) of the problem.
template <class QS>
struct final_target {
  const QS& qs;
  std::int64_t b;
  [[nodiscard]] float* row(std::int64_t /*r*/, std::int64_t pos, std::int64_t head) const {
    return qs.out_row(b, pos, head);
  }
  void set_lse(std::int64_t /*r*/, std::int64_t pos, std::int64_t head, float v) const {
    if (float* p = qs.lse_at(b, head, pos)) *p = v;
  }
  /// Every row of KV heads [hk0, hk0 + nh) x positions [p0, p1) is written: the query source's
  /// epilogue, if it has one (differential attention combines its signal and noise rows here).
  void done(std::int64_t hk0, std::int64_t nh, std::int64_t p0, std::int64_t p1) const {
    if constexpr (requires { qs.finish(b, hk0, nh, p0, p1); }) qs.finish(b, hk0, nh, p0, p1);
  }
};

/// Rows go to a split's partial state: rows x dv normalised O, then rows LSE values.
struct partial_target {
  float* o;
  float* lse;
  std::int64_t dv;
  [[nodiscard]] float* row(std::int64_t r, std::int64_t, std::int64_t) const { return o + r * dv; }
  void set_lse(std::int64_t r, std::int64_t, std::int64_t, float v) const { lse[r] = v; }
  void done(std::int64_t, std::int64_t, std::int64_t, std::int64_t) const noexcept {}
};

/// Attention for query positions [p0, p1) of sequence b against KV heads [hk0, hk0 + nh)
/// (nh = lay.heads()) and keys [k_begin, k_end), all query heads of each group; rows leave
/// through `target`, numbered head-major: r = h·(p1 - p0)·group + row, a row being a (position,
/// group head) in the head map's order (head_mapper::row_of). A key source with a second key
/// set (k2_row: differential attention) feeds the layout's second row segment.
template <class Arch, class Layout, class QS, class KS, class Mask, class Score, class Target>
void attend_block(const problem<QS, KS>& pb, const Mask& mask, const Score& score, std::int64_t block_kv,
                  std::int64_t prefetch_bytes, Layout& lay, std::int64_t b, std::int64_t hk0, std::int64_t p0, std::int64_t p1,
                  std::int64_t k_begin, std::int64_t k_end, bool with_sinks, const Target& target) {
  workspace& ws = lay.ws;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const std::int64_t g = pb.heads.group, nh = lay.heads();
  const std::int64_t npos = p1 - p0, rows = npos * g;  // rows per KV head
  const std::int64_t lanes = lay.lanes_per_head();
  auto lane_head = [&](std::int64_t r) { return hk0 + r / lanes; };
  constexpr bool two_keys = requires { pb.ks.k2_row(b, k_begin, hk0); };

  // Lanes: h·lanes + x <-> (KV head hk0 + h, row lay.lane_row(x)); pad lanes repeat a row.
  for (std::int64_t x = 0; x < nh * lanes; ++x) {
    const auto id = pb.heads.row_of(lay.lane_row(x % lanes), npos);
    ws.pos[x] = p0 + id.pos;
    ws.head[x] = pb.heads.out_head(lane_head(x), id.j);
    const key_bounds kb = mask.lane_bounds(ws.pos[x]);
    ws.lane_lo[x] = kb.lo;
    ws.lane_hi[x] = kb.hi;
  }
  // Q·(scale·log2 e) packed, unless this thread's last item was another split of the same
  // q-block (workspace::q_for); O = 0.
  const std::array<std::int64_t, 5> q_id{b, hk0, p0, p1, nh * lanes};
  if (ws.q_for != q_id) {
    lay.pack_q([&](std::int64_t x) { return pb.qs.row(b, ws.pos[x], pb.heads.q_head(ws.head[x])); },
               Score::q_factor(pb.scale));
    ws.q_for = q_id;
  }
  lay.zero_o();
  // (m, l) = (-inf, 0), or (sink·log2 e, 1) with a per-head sink logit (first split only).
  for (std::int64_t x = 0; x < nh * lanes; ++x) {
    const float sink = with_sinks && !pb.sink_logits.absent() ? pb.sink_logits(ws.head[x]) : neg_inf;
    const bool has_sink = std::isfinite(sink);
    ws.m[x] = has_sink ? sink * log2e : neg_inf;
    ws.l[x] = has_sink ? 1.0f : 0.0f;
  }

  const std::int64_t kv_end = std::min(k_end, pb.ks.len(b));
  // A tile is keys [a, a + n), or, when the mask gathers single keys (cols != nullptr: a
  // block-sparse column index), keys cols[0..n), ascending.
  auto tile_fn = [&](std::int64_t a, std::int64_t n, bool full, const std::int32_t* cols = nullptr) {
    auto key = [&](std::int64_t j) -> std::int64_t { return cols ? cols[j] : a + j; };
    if (!cols && prefetch_bytes > 0 && lay.prefetch_next()) {
      // Keep a window of `ahead` tokens (every head, K and V: about prefetch_bytes) on its way
      // into L2: each tile prefetches the tokens entering the window, in address order.
      using KV = std::remove_cv_t<std::remove_pointer_t<decltype(pb.ks.k_row(b, a, hk0))>>;
      const std::int64_t token_bytes =
          nh * ((two_keys ? 2 : 1) * pb.dim_qk + pb.dim_v) * static_cast<std::int64_t>(sizeof(KV));
      const std::int64_t ahead = std::max<std::int64_t>(n, prefetch_bytes / token_bytes);
      const std::int64_t from = a == k_begin ? a : a + ahead, to = std::min(a + n + ahead, kv_end);
      for (std::int64_t j = std::max(from, a); j < to; ++j)
        for (std::int64_t h = hk0; h < hk0 + nh; ++h) {
          const auto* k = pb.ks.k_row(b, j, h);
          const auto* v = pb.ks.v_row(b, j, h);
          tile::prefetch_l2(k, pb.dim_qk * static_cast<std::int64_t>(sizeof(KV)));
          if (v != k) tile::prefetch_l2(v, pb.dim_v * static_cast<std::int64_t>(sizeof(KV)));  // V in K: MLA
          if constexpr (two_keys) {
            const auto* k2 = pb.ks.k2_row(b, j, h);
            if (k2 != k) tile::prefetch_l2(k2, pb.dim_qk * static_cast<std::int64_t>(sizeof(KV)));
          }
        }
    }
    if constexpr (Mask::needs_masking) {
      if (!full && !cols) {  // boundary tile: per-lane bounds relative to key a, clamped to [-1, n]
        for (std::int64_t x = 0; x < nh * lanes; ++x) {
          ws.lo_rel[x] = static_cast<float>(std::clamp<std::int64_t>(ws.lane_lo[x] - a, -1, n));
          ws.hi_rel[x] = static_cast<float>(std::clamp<std::int64_t>(ws.lane_hi[x] - a, -1, n));
        }
      } else if (!full) {  // gathered keys: the visible ones are a run [lo_rel, hi_rel] of cols
        for (std::int64_t x = 0; x < nh * lanes; ++x) {
          ws.lo_rel[x] = static_cast<float>(std::lower_bound(cols, cols + n, ws.lane_lo[x]) - cols);
          ws.hi_rel[x] = static_cast<float>(std::upper_bound(cols, cols + n, ws.lane_hi[x]) - cols - 1);
        }
      }
    }
    for (std::int64_t h = 0; h < nh; ++h) {
      const std::int64_t hk = hk0 + h;
      lay.select(h);
      // K, V rows [a, a+n) of KV head hk: in place or packed by the layout.
      auto k_row = [&](std::int64_t j) { return pb.ks.k_row(b, key(j), hk); };
      auto v_row = [&](std::int64_t j) { return pb.ks.v_row(b, key(j), hk); };
      const auto rows_in_place = cols ? decltype(pb.ks.tile(b, a, n, hk)){} : pb.ks.tile(b, a, n, hk);
      if constexpr (requires { lay.next_rows(std::int64_t{}, rows_in_place, k_row, v_row); }) {
        // Key lanes: the rows read after this head's, the next head's of this tile (the first
        // head's of the next tile after the last head), go to L2 a few lines per key from inside
        // this head's kernels, so that the fetch overlaps the FMAs (docs/benchmarks.md,
        // "2026-12-06 (later)"). A gathered tile's next tile is unknown here: nothing after its
        // last head. After a tile that is not followed by the next keys (sinks, the last tile)
        // the prefetched rows are not read: a few wasted lines, always inside [k_begin, kv_end).
        std::int64_t hn = hk + 1, an = a;
        if (hn == hk0 + nh) {
          hn = hk0;
          an = a + n;
        }
        const std::int64_t n_next =
            cols != nullptr ? (an == a ? n : 0) : std::clamp<std::int64_t>(kv_end - an, 0, n);
        // In place (no gather): the next rows as a strided run where the source has one.
        const auto next_in_place =
            cols != nullptr || n_next == 0 ? decltype(rows_in_place){} : pb.ks.tile(b, an, n_next, hn);
        lay.next_rows(
            n_next, next_in_place,
            [&](std::int64_t j) { return pb.ks.k_row(b, cols != nullptr ? key(j) : an + j, hn); },
            [&](std::int64_t j) { return pb.ks.v_row(b, cols != nullptr ? key(j) : an + j, hn); });
      }
      if constexpr (two_keys) {
        lay.load(rows_in_place, k_row, v_row, [&](std::int64_t j) { return pb.ks.k2_row(b, key(j), hk); }, n);
      } else {
        lay.load(rows_in_place, k_row, v_row, n);
      }
      lay.qk(n);                                                     // S = Q·Kᵀ
      score.template apply<Arch>(lay.scores(), lay.score_count(n));  // softcap, if any
      if constexpr (Mask::needs_masking) {
        if (!full) lay.mask(n, cols ? 0 : std::clamp<std::int64_t>(mask.sinks() - a, 0, n));  // no sinks in gathers
      } else {
        (void)full;
      }
      lay.softmax(n);  // P = exp2(S - m'), α = exp2(m - m'), l' = α·l + ΣP
      lay.pv(n);       // O = α·O + P·V
    }
  };
  // A mask that visits keys out of order (block-sparse) announces its next tile: its K/V rows
  // (every head of the item) start on their way into L2 while the current tile computes.
  auto prefetch_keys = [&](std::int64_t a, std::int64_t n) {
    using KV = std::remove_cv_t<std::remove_pointer_t<decltype(pb.ks.k_row(b, a, hk0))>>;
    for (std::int64_t j = std::max(a, k_begin); j < std::min(a + n, kv_end); ++j)
      for (std::int64_t h = hk0; h < hk0 + nh; ++h) {
        const auto* k = pb.ks.k_row(b, j, h);
        const auto* v = pb.ks.v_row(b, j, h);
        tile::prefetch_l2(k, pb.dim_qk * static_cast<std::int64_t>(sizeof(KV)));
        if (v != k) tile::prefetch_l2(v, pb.dim_v * static_cast<std::int64_t>(sizeof(KV)));
      }
  };
  if constexpr (requires { mask.for_each_tile(p0, p1, k_begin, k_end, block_kv, tile_fn, prefetch_keys); }) {
    mask.for_each_tile(p0, p1, k_begin, k_end, block_kv, tile_fn, prefetch_keys);
  } else {
    (void)prefetch_keys;
    mask.for_each_tile(p0, p1, k_begin, k_end, block_kv, tile_fn);
  }

  // Epilogue: O / l and LSE (natural log), real rows only; the layout writes each head's rows
  // (lanes without a row, pad lanes, have no output pointer).
  for (std::int64_t h = 0; h < nh; ++h) {
    std::fill(ws.out_ptr.begin() + h * lanes, ws.out_ptr.begin() + (h + 1) * lanes, nullptr);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t x = h * lanes + lay.row_lane(r), out = h * rows + r;
      const tile::softmax_result res = tile::softmax_finalize(ws.m[x], ws.l[x]);
      ws.out_ptr[static_cast<std::size_t>(x)] = target.row(out, ws.pos[x], ws.head[x]);
      ws.out_scale[static_cast<std::size_t>(x)] = res.inv_l;
      target.set_lse(out, ws.pos[x], ws.head[x], res.lse);
    }
    lay.out_rows(h);
  }
  target.done(hk0, nh, p0, p1);
}

}  // namespace headwise::engine

HEADWISE_DIAGNOSTICS_POP
