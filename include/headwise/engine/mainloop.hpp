/// @file
/// @brief THE flash-attention mainloop: one work item = (batch, KV head, block of query
/// positions), all query heads of the KV group packed into the lanes. Variants change it only
/// through its policies (Mask, Score, the head map and dims in the problem).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../tile/tile.hpp"
#include "mask.hpp"
#include "problem.hpp"
#include "score.hpp"

namespace headwise::engine {

template <class T>
using aligned_vector = std::vector<T, xsimd::aligned_allocator<T, 64>>;

/// Per-thread scratch, sized once per call (no allocation inside the loop).
struct workspace {
  aligned_vector<float> q_buf, s_buf, o_buf, m, l, alpha, lo_rel, hi_rel, k_buf, v_buf;
  std::vector<std::int64_t> pos, head, lane_lo, lane_hi;

  void reserve(std::int64_t lanes, std::int64_t dim_qk, std::int64_t dim_v, std::int64_t block_kv, bool convert) {
    const auto n = static_cast<std::size_t>(lanes);
    q_buf.resize(static_cast<std::size_t>(dim_qk) * n);
    s_buf.resize(static_cast<std::size_t>(block_kv) * n);
    o_buf.resize(static_cast<std::size_t>(dim_v) * n);
    for (auto* b : {&m, &l, &alpha, &lo_rel, &hi_rel}) b->resize(n);
    for (auto* b : {&pos, &head, &lane_lo, &lane_hi}) b->resize(n);
    if (convert) {
      k_buf.resize(static_cast<std::size_t>(block_kv * dim_qk));
      v_buf.resize(static_cast<std::size_t>(block_kv * dim_v));
    }
  }
};

/// Query positions per work item: enough to fill `rows` lanes with the group's heads.
inline std::int64_t positions_per_block(const blocking& blk, std::int64_t group) noexcept {
  return std::max<std::int64_t>(1, blk.rows / group);
}

/// Attention for query positions [p0, p1) of batch b against KV head hk, all heads of its group.
template <class Arch, class KV, class Mask, class Score>
void attend_block(const problem<KV>& pb, const Mask& mask, const Score& score, const blocking& blk,
                  workspace& ws, std::int64_t b, std::int64_t hk, std::int64_t p0, std::int64_t p1) {
  using traits = tile::arch_traits<Arch>;
  using B = xsimd::batch<float, Arch>;
  constexpr std::int64_t w = traits::lanes;
  constexpr bool convert = !std::is_same_v<KV, float>;
  const std::int64_t g = pb.heads.group;
  const std::int64_t rows = (p1 - p0) * g;
  const std::int64_t nvec = (rows + w - 1) / w;
  const std::int64_t ld = nvec * w;  // lanes, padded
  const std::int64_t dqk = pb.dim_qk, dv = pb.dim_v;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();

  // Lanes: row r <-> (position p0 + r / g, head j = r % g); pad lanes repeat the last row.
  for (std::int64_t r = 0; r < ld; ++r) {
    const std::int64_t rr = std::min(r, rows - 1);
    ws.pos[r] = p0 + rr / g;
    ws.head[r] = pb.heads.out_head(hk, rr % g);
    const key_bounds kb = mask.lane_bounds(ws.pos[r]);
    ws.lane_lo[r] = kb.lo;
    ws.lane_hi[r] = kb.hi;
  }

  // Q_buf = Q·(scale·log2 e), D-major: (dim_qk, ld). Pad lanes are 0.
  float* q_buf = ws.q_buf.data();
  const float qf = Score::q_factor(pb.scale);
  for (std::int64_t r = 0; r < ld; ++r) {
    float* dst = q_buf + r;
    if (r >= rows) {
      for (std::int64_t d = 0; d < dqk; ++d) dst[d * ld] = 0.0f;
      continue;
    }
    const float* src = &pb.q(b, ws.pos[r], pb.heads.q_head(ws.head[r]), 0);
    for (std::int64_t d = 0; d < dqk; ++d) dst[d * ld] = src[d] * qf;
  }

  // State: O = 0; (m, l) = (-inf, 0), or (sink·log2 e, 1) with a per-head sink logit.
  float* o_buf = ws.o_buf.data();  // (dim_v, ld)
  std::fill(o_buf, o_buf + dv * ld, 0.0f);
  for (std::int64_t r = 0; r < ld; ++r) {
    float sink = neg_inf;
    if (!pb.sink_logits.absent()) sink = pb.sink_logits(ws.head[r]);
    const bool has_sink = std::isfinite(sink);
    ws.m[r] = has_sink ? sink * log2e : neg_inf;
    ws.l[r] = has_sink ? 1.0f : 0.0f;
  }

  float* s_buf = ws.s_buf.data();  // (block_kv, ld) key-major
  const std::int64_t ld_k = convert ? dqk : pb.k.stride[1];
  const std::int64_t ld_v = convert ? dv : pb.v.stride[1];

  mask.for_each_tile(p0, p1, blk.block_kv, [&](std::int64_t a, std::int64_t n, bool full) {
    // K, V rows [a, a+n): read in place (f32) or converted once into the tile buffers.
    const float* k_rows;
    const float* v_rows;
    if constexpr (convert) {
      for (std::int64_t j = 0; j < n; ++j) {
        tile::convert_row<Arch>(ws.k_buf.data() + j * dqk, &pb.k(b, a + j, hk, 0), dqk);
        tile::convert_row<Arch>(ws.v_buf.data() + j * dv, &pb.v(b, a + j, hk, 0), dv);
      }
      k_rows = ws.k_buf.data();
      v_rows = ws.v_buf.data();
    } else {
      k_rows = &pb.k(b, a, hk, 0);
      v_rows = &pb.v(b, a, hk, 0);
    }
    // S = Q·Kᵀ  (n, ld)
    tile::qk_tile<Arch>(s_buf, ld, k_rows, ld_k, q_buf, ld, dqk, n, nvec);
    score.template apply<Arch>(s_buf, ld, n, nvec);
    if constexpr (Mask::needs_masking) {
      if (!full) {  // boundary tile: per-lane bounds relative to key a, clamped to [-1, n]
        const auto fn = static_cast<float>(n);
        for (std::int64_t r = 0; r < ld; ++r) {
          ws.lo_rel[r] = static_cast<float>(std::clamp<std::int64_t>(ws.lane_lo[r] - a, -1, n));
          ws.hi_rel[r] = std::min(static_cast<float>(std::clamp<std::int64_t>(ws.lane_hi[r] - a, -1, n)), fn);
        }
        const std::int64_t sink = std::clamp<std::int64_t>(mask.sinks() - a, 0, n);
        tile::band_mask_tile<Arch>(s_buf, ld, n, nvec, ws.lo_rel.data(), ws.hi_rel.data(), sink);
      }
    } else {
      (void)full;
    }
    // P = exp2(S - m'), α = exp2(m - m'), l' = α·l + ΣP   (S_buf now holds P)
    tile::softmax_update<Arch>(s_buf, ld, n, nvec, ws.m.data(), ws.l.data(), ws.alpha.data());
    // O = α·O + P·V  (dim_v, ld)
    tile::pv_tile<Arch>(o_buf, ld, ws.alpha.data(), v_rows, ld_v, s_buf, ld, dv, n, nvec);
  });

  // Epilogue: O / l and LSE, rows only (pad lanes dropped).
  for (std::int64_t r = 0; r < rows; ++r) {
    const tile::softmax_result res = tile::softmax_finalize(ws.m[r], ws.l[r]);
    float* dst = &pb.out(b, ws.pos[r], ws.head[r], 0);
    for (std::int64_t c = 0; c < dv; ++c) dst[c] = o_buf[c * ld + r] * res.inv_l;
    if (!pb.lse.absent()) pb.lse(b, ws.head[r], ws.pos[r]) = res.lse;
  }
  (void)sizeof(B);
}

}  // namespace headwise::engine
