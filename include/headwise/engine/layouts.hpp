/// @file
/// @brief The two tile layouts of the mainloop. Both expose the same steps (pack_q, zero_o,
/// load, qk, scores, mask, softmax, pv, out_rows), so the loop itself is written once.
///
/// query_lanes: query rows (positions x group heads) across SIMD lanes; K and V are broadcast
///   operands read in place. For prefill, and whenever a work item has at least a vector of rows.
/// key_lanes: keys across SIMD lanes of S and P; K and V rows are read in place in their
///   storage dtype (converted as loaded), K through per-row dot products folded across lanes.
///   For decode: few query rows (g x seq_q below half a vector) against long caches, where
///   query_lanes would leave most lanes empty.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../tile/diagnostics.hpp"
#include "../tile/tile.hpp"
#include "sources.hpp"

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::engine {

template <class T>
using aligned_vector = std::vector<T, xsimd::aligned_allocator<T, 64>>;

/// Per-thread scratch, sized once per call (no allocation inside the loop).
struct workspace {
  aligned_vector<float> q_buf, s_buf, o_buf, m, l, alpha, lo_rel, hi_rel, k_buf, v_buf, k2_buf;
  std::vector<std::int64_t> pos, head, lane_lo, lane_hi;
  std::vector<const void*> k_ptr, v_ptr;  ///< key-lane tiles: each key's K and V row
  std::vector<const void*> k_next, v_next;  ///< key-lane tiles: the rows read next (prefetched)
  /// Epilogue, per lane: the output row it writes (nullptr: none, a pad lane) and its 1/l.
  std::vector<float*> out_ptr;
  aligned_vector<float> out_scale;
  /// The item whose Q q_buf holds, (sequence, first KV head, p0, p1, lanes): the splits of one
  /// q-block share it, so consecutive splits of a q-block on one thread pack Q once. Valid
  /// within one call only (Q, its scale and the head map are the call's): reserve() resets it.
  std::array<std::int64_t, 5> q_for{-1, -1, -1, -1, -1};

  void reserve(std::int64_t rows, std::int64_t q_elems, std::int64_t s_elems, std::int64_t o_elems,
               std::int64_t k_elems, std::int64_t v_elems) {
    q_for.fill(-1);
    auto grow = [](auto& v, std::int64_t n) {
      if (static_cast<std::int64_t>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
    };
    grow(q_buf, q_elems);
    grow(s_buf, s_elems);
    grow(o_buf, o_elems);
    grow(k_buf, k_elems);
    grow(v_buf, v_elems);
    for (auto* b : {&m, &l, &alpha, &lo_rel, &hi_rel, &out_scale}) grow(*b, rows);
    for (auto* b : {&pos, &head, &lane_lo, &lane_hi}) grow(*b, rows);
    grow(out_ptr, rows);
  }
  void reserve_k2(std::int64_t k_elems) {
    if (static_cast<std::int64_t>(k2_buf.size()) < k_elems) k2_buf.resize(static_cast<std::size_t>(k_elems));
  }
};

/// Copies n rows of dim storage elements into a packed f32 buffer (row stride ld, tail zeroed).
template <class Arch, class KV, class Row>
void pack_rows(float* dst, std::int64_t ld, Row&& row, std::int64_t n, std::int64_t dim) {
  for (std::int64_t j = 0; j < n; ++j) {
    tile::convert_row<Arch>(dst + j * ld, row(j), dim);
    std::fill(dst + j * ld + dim, dst + (j + 1) * ld, 0.0f);
  }
}

/// dst[0..dv) = src[0..dv)·scale, exact zeros for scale 0 (whatever src holds: 0·NaN from a
/// non-finite V row of a tile the row saw no key of); src aligned and readable up to dv rounded
/// up to whole vectors. The epilogue of a row-major O (query_lanes with o_rows, key_lanes).
template <class Arch>
void scale_row_into(float* dst, const float* src, float scale, std::int64_t dv) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::int64_t w = B::size;
  for (std::int64_t c = 0; c < dv; c += w) {
    const B v = scale == 0.0f ? B(0.0f) : B::load_aligned(src + c) * B(scale);
    tile::store_partial<Arch>(dst + c, v, static_cast<int>(std::min<std::int64_t>(w, dv - c)));
  }
}

/// Query rows across lanes. Buffers: Q (dim_qk, ld), S/P (block_kv, ld), O (dim_v, ld), or,
/// for an item of one lane vector (o_rows), O row-major (ld, dim_v rounded up to vectors).
/// The rows come in one or two segments (differential attention: signal rows reading K1, then
/// noise rows reading K2), each padded to whole vectors; pad lanes repeat their segment's last
/// row with Q = 0. P·V runs over all lanes at once: both segments share each V row.
template <class Arch>
struct query_lanes {
  static constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  workspace& ws;
  std::int64_t rows0, rows1;  ///< rows of segment 0 and 1 (rows1 = 0: one segment)
  std::int64_t ld0, ld, nvec, dqk, dv;
  bool stream;  ///< the item holds all its sequence's query rows: it reads each tile once
  /// One lane vector (nvec == 1: up to a vector of rows, one segment): O is row-major and P·V
  /// loads V vectors and broadcasts P (tile::pv_tile_o_rows), a few loads per FMA fewer than
  /// broadcasting every V element to one vector of rows; the same O bits either way.
  bool o_rows;
  std::int64_t ld_o;  ///< O row stride when o_rows: dim_v rounded up to whole vectors
  /// One AVX-512 vector of rows (o_rows on AVX-512): Q is packed in quads (tile::quad_index)
  /// for tile::qk_tile_quads, which loads a key's dims four at a time for 4 FMAs instead of
  /// broadcasting each K element to one FMA.
  bool q_quads;
  const float* k_rows = nullptr;
  const float* k2_rows = nullptr;
  const float* v_rows = nullptr;
  std::int64_t ld_k = 0, ld_k2 = 0, ld_v = 0;

  query_lanes(workspace& s, std::int64_t rows0_, std::int64_t rows1_, std::int64_t dqk_, std::int64_t dv_,
              bool stream_)
      : ws(s), rows0(rows0_), rows1(rows1_), ld0(tile::round_up(rows0_, w)), ld(lanes_for(rows0_, rows1_)),
        nvec(ld / w), dqk(dqk_), dv(dv_), stream(stream_), o_rows(nvec == 1 && rows1_ == 0),
        ld_o(tile::round_up(dv_, w)), q_quads(o_rows && is_avx512_quads()) {}
  [[nodiscard]] static constexpr bool is_avx512_quads() noexcept {
#if XSIMD_WITH_AVX512F
    return tile::is_avx512_v<Arch> && w == 16;
#else
    return false;
#endif
  }

  /// Lanes of an item with segments of rows0 and rows1 rows.
  [[nodiscard]] static constexpr std::int64_t lanes_for(std::int64_t rows0, std::int64_t rows1) noexcept {
    return tile::round_up(rows0, w) + tile::round_up(rows1, w);
  }
  /// One KV head per work item (its group fills the lanes).
  [[nodiscard]] static constexpr std::int64_t heads() noexcept { return 1; }
  [[nodiscard]] std::int64_t lanes_per_head() const noexcept { return ld; }
  /// The row a lane computes (pad lanes: their segment's last row), and the lane of a row.
  [[nodiscard]] std::int64_t lane_row(std::int64_t x) const noexcept {
    return x < ld0 ? std::min(x, rows0 - 1) : rows0 + std::min(x - ld0, rows1 - 1);
  }
  [[nodiscard]] std::int64_t row_lane(std::int64_t r) const noexcept { return r < rows0 ? r : ld0 + r - rows0; }
  [[nodiscard]] bool real_lane(std::int64_t x) const noexcept {
    return x < ld0 ? x < rows0 : x - ld0 < rows1;
  }
  void select(std::int64_t /*h*/) noexcept {}

  /// Scratch for items of up to `lanes` lanes; two_keys: a second converted K tile.
  static void reserve(workspace& s, std::int64_t lanes, std::int64_t dqk, std::int64_t dv, std::int64_t bk,
                      bool two_keys) {
    s.reserve(lanes, tile::round_up(dqk, 4) * lanes, bk * lanes, tile::round_up(dv, w) * lanes, bk * dqk, bk * dv);
    if (two_keys) s.reserve_k2(bk * dqk);
  }
  /// Prefill reuses each tile across many q-blocks and the hardware prefetchers keep up; an item
  /// that holds all the query rows (absorbed MLA decode, short chunks) streams the cache once,
  /// like decode, and may fetch ahead: the mainloop keeps a window only when
  /// blocking::prefetch_bytes > 0 (default 0).
  [[nodiscard]] bool prefetch_next() const noexcept { return stream; }

  /// Q_buf[d][x] = Q[row of x][d]·qf (q_quads: at tile::quad_index(x, d)); pad lanes 0. One
  /// vector of lanes at a time, d outer: each Q_buf row segment is written whole while the w source rows stay in L1 (lane
  /// by lane, every store of a long row went to another line: most of a 128-head absorbed
  /// MLA split's time on the device).
  template <class Row>
  void pack_q(Row&& row, float qf) {
    float* q = ws.q_buf.data();
#if XSIMD_WITH_AVX512F
    if (q_quads) {  // quads (tile::quad_index), written in order; dims past dqk and pad lanes 0
      std::array<const float*, 16> src{};
      for (std::int64_t x = 0; x < 16; ++x) src[static_cast<std::size_t>(x)] = real_lane(x) ? row(x) : nullptr;
      const std::int64_t dq = tile::round_up(dqk, 4);
      for (std::int64_t d0 = 0; d0 < dq; d0 += 4)
        for (std::int64_t x = 0; x < 16; ++x) {  // in quad order: g = x / 4, b = x % 4
          const float* sr = src[static_cast<std::size_t>((x % 4) * 4 + x / 4)];
          float* dst = q + (d0 + x / 4) * 16 + (x % 4) * 4;
          for (std::int64_t e = 0; e < 4; ++e) dst[e] = sr != nullptr && d0 + e < dqk ? sr[d0 + e] * qf : 0.0f;
        }
      return;
    }
#endif
    for (std::int64_t r0 = 0; r0 < ld; r0 += w) {
      std::array<const float*, static_cast<std::size_t>(w)> src{};
      for (std::int64_t i = 0; i < w; ++i) src[static_cast<std::size_t>(i)] = real_lane(r0 + i) ? row(r0 + i) : nullptr;
      for (std::int64_t d = 0; d < dqk; ++d) {
        float* dst = q + d * ld + r0;
        for (std::int64_t i = 0; i < w; ++i) {
          const float* s = src[static_cast<std::size_t>(i)];
          dst[i] = s != nullptr ? s[d] * qf : 0.0f;
        }
      }
    }
  }
  void zero_o() { std::fill(ws.o_buf.data(), ws.o_buf.data() + (o_rows ? ld_o : dv) * ld, 0.0f); }
  /// K/V rows of a tile: in place for evenly strided f32 rows, else converted into buffers.
  /// With two segments, k2_row gives segment 1's keys (in place, the same stride, or converted).
  template <class KV, class KRow, class VRow, class K2Row>
  void load(const kv_tile_rows<KV>& t, KRow&& k_row, VRow&& v_row, K2Row&& k2_row, std::int64_t n) {
    load(t, k_row, v_row, n);
    if constexpr (std::is_same_v<KV, float>) {
      if (t.k != nullptr) {
        k2_rows = t.k2 == t.k ? k_rows : t.k2;
        ld_k2 = ld_k;
        return;
      }
    }
    if (static_cast<const void*>(k2_row(0)) == k_row(0)) {  // shared keys (DIFF V2): converted once
      k2_rows = k_rows;
      ld_k2 = ld_k;
      return;
    }
    pack_rows<Arch, KV>(ws.k2_buf.data(), dqk, k2_row, n, dqk);
    k2_rows = ws.k2_buf.data();
    ld_k2 = dqk;
  }
  template <class KV, class KRow, class VRow>
  void load(const kv_tile_rows<KV>& t, KRow&& k_row, VRow&& v_row, std::int64_t n) {
    if constexpr (std::is_same_v<KV, float>) {
      if (t.k != nullptr) {
        k_rows = t.k;
        v_rows = t.v;
        ld_k = t.ld_k;
        ld_v = t.ld_v;
        return;
      }
    }
    pack_rows<Arch, KV>(ws.k_buf.data(), dqk, k_row, n, dqk);
    k_rows = ws.k_buf.data();
    ld_k = dqk;
    bool v_in_k = dv <= dqk;
    for (std::int64_t j = 0; j < n && v_in_k; ++j) v_in_k = static_cast<const void*>(v_row(j)) == k_row(j);
    if (v_in_k) {
      v_rows = k_rows;  // V is a prefix of K (absorbed MLA's latent): converted once
      ld_v = dqk;
      return;
    }
    pack_rows<Arch, KV>(ws.v_buf.data(), dv, v_row, n, dv);
    v_rows = ws.v_buf.data();
    ld_v = dv;
  }
  /// S = Q·Kᵀ, key-major (n, ld): each segment against its keys (one pass when they share them).
  void qk(std::int64_t n) {
    float* s = ws.s_buf.data();
    const float* q = ws.q_buf.data();
#if XSIMD_WITH_AVX512F
    if (q_quads) {
      tile::qk_tile_quads(s, ld, k_rows, ld_k, q, dqk, n);
      return;
    }
#endif
    if (rows1 == 0 || k2_rows == k_rows) {
      tile::qk_tile<Arch>(s, ld, k_rows, ld_k, q, ld, dqk, n, nvec, stream);
      return;
    }
    tile::qk_tile<Arch>(s, ld, k_rows, ld_k, q, ld, dqk, n, ld0 / w);
    tile::qk_tile<Arch>(s + ld0, ld, k2_rows, ld_k2, q + ld0, ld, dqk, n, nvec - ld0 / w);
  }
  [[nodiscard]] float* scores() const noexcept { return const_cast<float*>(ws.s_buf.data()); }
  [[nodiscard]] std::int64_t score_count(std::int64_t n) const noexcept { return n * ld; }
  void mask(std::int64_t n, std::int64_t sink) {
    tile::band_mask_tile<Arch>(ws.s_buf.data(), ld, n, nvec, ws.lo_rel.data(), ws.hi_rel.data(), sink);
  }
  void softmax(std::int64_t n) {
    tile::softmax_update<Arch>(ws.s_buf.data(), ld, n, nvec, ws.m.data(), ws.l.data(), ws.alpha.data());
  }
  /// O = α·O + P·V  (dim_v, ld), or (rows0, ld_o) when o_rows (pad lanes: no O row)
  void pv(std::int64_t n) {
    if (o_rows) {
      tile::pv_tile_o_rows<Arch>(ws.o_buf.data(), ld_o, ws.alpha.data(), v_rows, ld_v, ws.s_buf.data(), ld, rows0, dv, n);
      return;
    }
    tile::pv_tile<Arch>(ws.o_buf.data(), ld, ws.alpha.data(), v_rows, ld_v, ws.s_buf.data(), ld, dv, n, nvec);
  }
  /// Epilogue: row x of O times ws.out_scale[x] (1/l) into ws.out_ptr[x], for every lane with
  /// an output row; scale 0 (no visible key) writes exact zeros, whatever O holds (0·NaN from a
  /// non-finite V row of a tile the lane saw no key of). With o_rows O is row-major and each row
  /// is scaled into place. Otherwise O is (dv, ld): a lanes x lanes block is
  /// transposed in registers (tile::transpose_block) and each lane's vector stored in its row.
  /// Reading a lane's column of O element by element (a stride of ld floats) was a tenth of a
  /// 128-head absorbed MLA split on the development VM.
  void out_rows(std::int64_t /*h*/) const {
    using B = xsimd::batch<float, Arch>;
    const float* o = ws.o_buf.data();
    if (o_rows) {  // row-major O: each lane's row scaled into place
      for (std::int64_t x = 0; x < ld; ++x)
        if (float* dst = ws.out_ptr[static_cast<std::size_t>(x)])
          scale_row_into<Arch>(dst, o + x * ld_o, ws.out_scale[static_cast<std::size_t>(x)], dv);
      return;
    }
    const std::int64_t dv_full = dv / w * w;
    for (std::int64_t x0 = 0; x0 < ld; x0 += w) {
      float* const* dst = ws.out_ptr.data() + x0;
      const float* sc = ws.out_scale.data() + x0;
      if (std::none_of(dst, dst + w, [](const float* p) { return p != nullptr; })) continue;
      for (std::int64_t c0 = 0; c0 < dv_full; c0 += w) {
        std::array<B, static_cast<std::size_t>(w)> col;
        tile::transpose_block<Arch>(o + c0 * ld + x0, ld, col.data());
        for (std::int64_t i = 0; i < w; ++i) {
          if (dst[i] == nullptr) continue;
          const B v = sc[i] == 0.0f ? B(0.0f) : col[static_cast<std::size_t>(i)] * B(sc[i]);
          v.store_unaligned(dst[i] + c0);
        }
      }
      for (std::int64_t c = dv_full; c < dv; ++c)
        for (std::int64_t i = 0; i < w; ++i)
          if (dst[i] != nullptr) dst[i][c] = sc[i] == 0.0f ? 0.0f : o[c * ld + x0 + i] * sc[i];
    }
  }
};

/// Keys across lanes. A work item covers `nh` KV heads (all of a sequence's heads in decode),
/// so one KV tile's memory (consecutive tokens, every head) is read together; the heads are
/// processed one after the other on each tile (select(h)), each with its own rows.
/// K and V are read in place, whatever their dtype and row order (dense, paged, ragged): a tile
/// is a list of row pointers. S[r][j] = Q[r]·K[j] accumulates along each row and folds across
/// lanes (tile::qk_tile_rows); P·V broadcasts P and converts V rows as they are loaded.
/// Buffers: Q (nh·rows, dqk_pad) row-major, zero-padded; O (nh·rows, dv_pad); per head and
/// tile: S/P (rows, ld_kt); V (block_kv, dv_pad) only when dim_v is not a whole number of vectors.
template <class Arch>
struct key_lanes {
  static constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  workspace& ws;
  std::int64_t rows, nh, dqk, dv, dqk_pad, dv_pad, ld_kt;
  std::int64_t seg = 0;  ///< first row of the selected head
  std::int64_t n_pad = 0;
  bool has_next = false;  ///< ws.k_next / v_next hold the rows read after this tile's head
  enum class kind : std::uint8_t { f32, bf16, f16 };
  kind k_kind = kind::f32, v_kind = kind::f32;

  key_lanes(workspace& s, std::int64_t rows_per_head, std::int64_t heads_, std::int64_t dqk_, std::int64_t dv_,
            std::int64_t bk)
      : ws(s), rows(rows_per_head), nh(heads_), dqk(dqk_), dv(dv_), dqk_pad(tile::round_up(dqk_, w)),
        dv_pad(tile::round_up(dv_, w)), ld_kt(tile::round_up(bk, w)) {}

  static void reserve(workspace& s, std::int64_t rows_per_head, std::int64_t heads, std::int64_t dqk,
                      std::int64_t dv, std::int64_t bk) {
    const std::int64_t ldk = tile::round_up(bk, w), dvp = tile::round_up(dv, w), all = rows_per_head * heads;
    s.reserve(all, all * tile::round_up(dqk, w), rows_per_head * ldk, all * dvp, 0, dv == dvp ? 0 : bk * dvp);
    for (auto* p : {&s.k_ptr, &s.v_ptr, &s.k_next, &s.v_next})
      if (static_cast<std::int64_t>(p->size()) < ldk) p->resize(static_cast<std::size_t>(ldk));
  }
  [[nodiscard]] std::int64_t heads() const noexcept { return nh; }
  [[nodiscard]] std::int64_t lanes_per_head() const noexcept { return rows; }
  [[nodiscard]] static constexpr std::int64_t lane_row(std::int64_t x) noexcept { return x; }
  [[nodiscard]] static constexpr std::int64_t row_lane(std::int64_t r) noexcept { return r; }
  /// No prefetch window (prefetch_bytes): a window measured slower on one core and on all cores
  /// (docs/benchmarks.md). The kernels prefetch the rows read next instead (next_rows).
  [[nodiscard]] static constexpr bool prefetch_next() noexcept { return false; }
  void select(std::int64_t h) noexcept {
    seg = h * rows;
    has_next = false;
  }
  /// The n_next rows the mainloop reads after this head's tile (the next head's, or the next
  /// tile's first head's): qk and pv prefetch key j's next K and V row into L2 as they compute
  /// key j, a few lines at a time, instead of leaving the next rows to the hardware
  /// prefetchers, which do not run far enough ahead. V inside K (MLA) is fetched once.
  template <class KV, class KRow, class VRow>
  void next_rows(std::int64_t n_next, const kv_tile_rows<KV>& t, KRow&& k_row, VRow&& v_row) {
    has_next = n_next > 0;
    if (!has_next) return;
    const void** kn = ws.k_next.data();
    const void** vn = ws.v_next.data();
    fill_rows(t, n_next, k_row, v_row, kn, vn);
    for (std::int64_t j = 0; j < n_next; ++j)
      if (vn[j] == kn[j]) vn[j] = nullptr;  // V inside K (MLA): fetched once
    for (std::int64_t j = n_next; j < ld_kt; ++j) kn[j] = vn[j] = nullptr;
  }
  /// kp[j] / vp[j] (vp may be null: K only) = key j's K / V row for j < n: by adding the stride
  /// along each run of the tile (dense, ragged, paged within a page or across one boundary),
  /// row by row from the source otherwise.
  template <class KV, class KRow, class VRow>
  static void fill_rows(const kv_tile_rows<KV>& t, std::int64_t n, KRow&& k_row, VRow&& v_row, const void** kp,
                        const void** vp) {
    auto run = [&](const KV* k, const KV* v, std::int64_t j0, std::int64_t j1) {
      for (std::int64_t j = j0; j < j1; ++j) kp[j] = k + (j - j0) * t.ld_k;
      if (vp != nullptr)
        for (std::int64_t j = j0; j < j1; ++j) vp[j] = v + (j - j0) * t.ld_v;
    };
    if (t.k != nullptr) {
      run(t.k, t.v, 0, n);
    } else if (t.split > 0) {
      const std::int64_t s = std::min(t.split, n);
      run(t.k_at[0], t.v_at[0], 0, s);
      run(t.k_at[1], t.v_at[1], s, n);
    } else {
      for (std::int64_t j = 0; j < n; ++j) kp[j] = k_row(j);
      if (vp != nullptr)
        for (std::int64_t j = 0; j < n; ++j) vp[j] = v_row(j);
    }
  }

  template <class Row>
  void pack_q(Row&& row, float qf) {
    float* q = ws.q_buf.data();
    for (std::int64_t r = 0; r < nh * rows; ++r) {
      const float* src = row(r);
      for (std::int64_t d = 0; d < dqk; ++d) q[r * dqk_pad + d] = src[d] * qf;
      for (std::int64_t d = dqk; d < dqk_pad; ++d) q[r * dqk_pad + d] = 0.0f;
    }
  }
  void zero_o() { std::fill(ws.o_buf.data(), ws.o_buf.data() + nh * rows * dv_pad, 0.0f); }
  template <class KV>
  static constexpr kind kind_of() noexcept {
    if constexpr (std::is_same_v<KV, bf16>) {
      return kind::bf16;
    } else if constexpr (std::is_same_v<KV, f16>) {
      return kind::f16;
    } else {
      static_assert(std::is_same_v<KV, float>, "key_lanes: K/V storage is float, bf16 or f16");
      return kind::f32;
    }
  }
  template <class F>
  static void with_type(kind k, F&& f) {
    switch (k) {
      case kind::bf16: f(bf16{}); break;
      case kind::f16: f(f16{}); break;
      default: f(0.0f); break;
    }
  }
  /// The tile's K and V rows, in place; V converted into a zero-padded buffer only when dim_v
  /// is not a whole number of vectors.
  template <class KV, class KRow, class VRow>
  void load(const kv_tile_rows<KV>& t, KRow&& k_row, VRow&& v_row, std::int64_t n) {
    n_pad = tile::round_up(n, w);
    const void** kp = ws.k_ptr.data();
    const void** vp = ws.v_ptr.data();
    const bool v_in_place = dv == dv_pad;
    k_kind = kind_of<KV>();
    fill_rows(t, n, k_row, v_row, kp, v_in_place ? vp : nullptr);
    if (v_in_place) {
      v_kind = kind_of<KV>();
      return;
    }
    pack_rows<Arch, KV>(ws.v_buf.data(), dv_pad, v_row, n, dv);
    for (std::int64_t j = 0; j < n; ++j) ws.v_ptr[static_cast<std::size_t>(j)] = ws.v_buf.data() + j * dv_pad;
    v_kind = kind::f32;
  }
  /// S = Q·Kᵀ, row-major (rows, n_pad).
  void qk(std::int64_t n) {
    with_type(k_kind, [&](auto tag) {
      tile::qk_tile_rows<Arch, decltype(tag)>(ws.s_buf.data(), ld_kt, ws.q_buf.data() + seg * dqk_pad, dqk_pad,
                                              ws.k_ptr.data(), rows, n, dqk, has_next ? ws.k_next.data() : nullptr);
    });
  }
  [[nodiscard]] float* scores() const noexcept { return const_cast<float*>(ws.s_buf.data()); }
  [[nodiscard]] std::int64_t score_count(std::int64_t /*n*/) const noexcept { return rows * ld_kt; }
  void mask(std::int64_t n, std::int64_t sink) {
    tile::band_mask_rows<Arch>(ws.s_buf.data(), ld_kt, rows, n, ws.lo_rel.data() + seg, ws.hi_rel.data() + seg, sink);
  }
  void softmax(std::int64_t n) {
    tile::softmax_update_rows<Arch>(ws.s_buf.data(), ld_kt, rows, n, ws.m.data() + seg, ws.l.data() + seg,
                                    ws.alpha.data() + seg);
  }
  /// O = α·O + P·V  (rows, dv_pad). V converted into v_buf (dim_v not a whole number of
  /// vectors) is f32 while the next rows are in the cache's dtype: no V prefetch then.
  void pv(std::int64_t n) {
    const bool v_in_place = dv == dv_pad;
    with_type(v_kind, [&](auto tag) {
      tile::pv_tile_rows<Arch, decltype(tag)>(ws.o_buf.data() + seg * dv_pad, dv_pad, ws.alpha.data() + seg,
                                              ws.v_ptr.data(), ws.s_buf.data(), ld_kt, rows, dv_pad / w, n,
                                              has_next && v_in_place ? ws.v_next.data() : nullptr);
    });
  }
  /// Epilogue: head h's rows of O (row-major already) into their output rows, as
  /// query_lanes::out_rows (scale_row_into: scale 0 writes exact zeros).
  void out_rows(std::int64_t h) const {
    for (std::int64_t x = h * rows; x < (h + 1) * rows; ++x)
      if (float* dst = ws.out_ptr[static_cast<std::size_t>(x)])
        scale_row_into<Arch>(dst, ws.o_buf.data() + x * dv_pad, ws.out_scale[static_cast<std::size_t>(x)], dv);
  }
};

}  // namespace headwise::engine

HEADWISE_DIAGNOSTICS_POP
