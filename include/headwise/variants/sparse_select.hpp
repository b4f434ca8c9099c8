/// @file
/// @brief Adaptive block selection for block-sparse prefill: FlexPrefill, MInference
/// vertical-slash and XAttention estimators, each returning a block_mask_data (built with
/// block_mask_builder) for headwise's block-sparse executor, plus selection statistics.
///
/// Selection and execution are separate (ALGORITHMS.md §6): these functions only read Q and K,
/// estimate which keys matter, and return the mask. All three are causal prefill selectors:
/// seq_q == seq_kv (so bottom-right and top-left alignment coincide), every batch row is
/// selected independently, and every method keeps the diagonal so no row is ever empty. The
/// mask has one head per output head of the head map (heads_q for head_map::interleave,
/// max(heads_q, heads_kv) for head_map::tile); attention head a reads query head a % heads_q
/// and KV head ⌊a/g⌋ (interleave) or a % heads_kv (tile), as in headwise::attention.
///
/// The estimators' dot products run on the tile layer (tile::qk_tile, query rows across
/// lanes, K read in place for f32 or converted per tile for bf16/f16; the query heads of one
/// KV group share each K tile), their softmaxes on tile::softmax_update / exp2_softmax, with
/// O(tile) scratch (FlexPrefill's query-aware heads add O(nb²)). Estimation cost per attention
/// head: FlexPrefill and vertical-slash 2·R·N·d FMAs (R = block_size or last_q rows, two
/// passes), XAttention N²·d/(2·stride), against N²·d for the causal attention itself. The
/// work is split over (batch, KV head) items with OpenMP; each item is computed by one
/// thread in a fixed order, so the result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/block_mask.hpp"
#include "../core/checks.hpp"
#include "../core/dtype.hpp"
#include "../core/options.hpp"
#include "../engine/head_map.hpp"
#include "../engine/scheduler.hpp"
#include "../tile/diagnostics.hpp"
#include "../tile/tile.hpp"
#include "attention.hpp"
#include "block_sparse.hpp"

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise {

/// What a selection kept, over all (batch, head, query block) rows of its mask.
struct sparse_stats {
  /// Blocks kept (partial + full); a row's gathered columns count as ceil(count / kv_block)
  /// blocks, the tiles the executor's column pass computes.
  std::int64_t kept_blocks = 0;
  /// Blocks with at least one key visible under the causal mask (the denominator of `selected`).
  std::int64_t causal_blocks = 0;
  /// kept_blocks / causal_blocks: 1.0 = dense causal (1.0 for an empty mask).
  double selected = 0;
  /// FlexPrefill's computational_ratio: kept_blocks / (num_q_blocks · num_kv_blocks · heads ·
  /// batch). The denominator includes the upper triangle, so dense causal ≈ 0.5.
  double computational_ratio = 0;
  /// FlexPrefill only: per (batch, head), index b·heads + h, 1 if the JS test chose the
  /// query-aware pattern. Empty for the other methods; all 0 in FlexPrefill's dense fallback.
  std::vector<std::uint8_t> query_aware;
};

/// A mask and its statistics.
struct sparse_selection {
  block_mask_data mask;
  sparse_stats stats;
};

/// FlexPrefill (Lai et al., ICLR'25; ALGORITHMS.md §6.1). Defaults are the reference's
/// (`patch.py`): γ = 0.9, τ = 0.1, min_budget = 1024 tokens, no max budget, blocks of 128.
struct flexprefill_options {
  double gamma = 0.9;              ///< attention coverage, in (0, 1]
  double tau = 0.1;                ///< JS-distance threshold of the query-aware test, in (0, 1]
  std::int64_t min_budget = 1024;  ///< tokens, >= 0; min_b = ceil(min_budget / block_size) blocks
  std::int64_t max_budget = 0;     ///< tokens, >= 0; 0 = none; max_b = min(ceil(max_budget / block_size), nb)
  std::int64_t block_size = 128;   ///< q_block = kv_block of the mask, >= 1
  head_map heads = head_map::interleave;  ///< head_map::tile is the reference's gqa_interleave=True
  int num_threads = 0;                    ///< OpenMP threads, 0 = default
};

/// MInference vertical-slash (ALGORITHMS.md §6.2). Defaults: the most common per-head
/// configuration of Llama-3.1-8B-Instruct (1000, 6096), 64 estimation rows, 64-row blocks,
/// the first 30 columns and the nearest 100 diagonals forced (`vertical_and_slash_kernel`).
struct vertical_slash_options {
  std::int64_t vertical_size = 1000;  ///< >= 0; k_v = min(N, max(vertical_size, 30))
  std::int64_t slash_size = 6096;     ///< >= 0; k_s = min(N, max(slash_size, 50))
  std::int64_t last_q = 64;           ///< estimation rows, >= 1 (min(last_q, N) are used)
  std::int64_t block = 64;            ///< query rows per mask row block (q_block = kv_block), >= 1
  std::int64_t forced_vertical = 30;  ///< the first keys forced into the vertical top-k, >= 0
  std::int64_t forced_slash = 100;    ///< the nearest offsets forced into the slash top-k, >= 0
  head_map heads = head_map::interleave;
  int num_threads = 0;
};

/// XAttention (Xu et al., ICML'25; ALGORITHMS.md §6.3), select_mode "inverse", norm = 1.
/// threshold defaults to the documented experiments' 0.9 (the code's signature says 0.8).
struct xattention_options {
  std::int64_t block = 128;  ///< q_block = kv_block of the mask, >= 1
  std::int64_t stride = 8;   ///< antidiagonal stride S, >= 1, divides block
  double threshold = 0.9;    ///< mass coverage τ per query-block row, in (0, 1]
  head_map heads = head_map::interleave;
  int num_threads = 0;
};

/// Jensen-Shannon distance sqrt(½KL(p‖m) + ½KL(q‖m)), m = (p+q)/2, natural log: 0 for equal
/// distributions, sqrt(ln 2) ≈ 0.8326 for disjoint ones. Entries <= 0 contribute 0
/// (0·log 0 = 0; the reference's torch code gives NaN there); a NaN entry gives NaN (and
/// FlexPrefill then takes the vertical-slash pattern). Throws argument_error when the sizes
/// differ.
inline double js_distance(std::span<const double> p, std::span<const double> q) {
  if (p.size() != q.size())
    throw argument_error("headwise::js_distance", "q", "size = p.size() = " + detail::to_text(p.size()),
                         detail::to_text(q.size()));
  double kl_p = 0, kl_q = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double a = p[i] <= 0 ? 0.0 : p[i], b = q[i] <= 0 ? 0.0 : q[i];  // NaN stays NaN
    const double m = 0.5 * (a + b);
    if (a != 0) kl_p += a * std::log(a / m);
    if (b != 0) kl_q += b * std::log(b / m);
  }
  const double js = 0.5 * kl_p + 0.5 * kl_q;
  return std::sqrt(js < 0 ? 0.0 : js);  // rounding below 0 clamps; NaN stays NaN
}

/// Counts the kept blocks of a mask against the blocks visible under `causal` (see
/// sparse_stats; used by all three selectors). Gathered columns count as ceil(count/kv_block)
/// blocks per row.
inline sparse_stats mask_stats(const block_mask_data& m, causal_mode causal) {
  sparse_stats st;
  const std::int64_t nqb = m.num_q_blocks(), nkb = m.num_kv_blocks();
  if (nqb == 0 || nkb == 0) {
    st.selected = 1.0;
    return st;
  }
  const block_mask_builder probe(1, 1, m.seq_q, m.seq_kv, m.q_block, m.kv_block, causal);
  std::vector<std::int64_t> visible(static_cast<std::size_t>(nqb), 0);
  for (std::int64_t qb = 0; qb < nqb; ++qb)
    for (std::int64_t kb = 0; kb < nkb; ++kb) visible[static_cast<std::size_t>(qb)] += probe.visibility(qb, kb) > 0;
  for (std::int64_t b = 0; b < m.batch; ++b)
    for (std::int64_t h = 0; h < m.heads; ++h)
      for (std::int64_t qb = 0; qb < nqb; ++qb) {
        const auto s = static_cast<std::size_t>((b * m.heads + h) * nqb + qb);
        std::int64_t kept = m.kv_num_blocks.empty() ? 0 : m.kv_num_blocks[s];
        if (!m.full_kv_num_blocks.empty()) kept += m.full_kv_num_blocks[s];
        if (!m.column_count.empty()) kept += (m.column_count[s] + m.kv_block - 1) / m.kv_block;
        st.kept_blocks += kept;
        st.causal_blocks += visible[static_cast<std::size_t>(qb)];
      }
  st.selected = st.causal_blocks > 0 ? static_cast<double>(st.kept_blocks) / static_cast<double>(st.causal_blocks)
                                     : 1.0;
  st.computational_ratio = static_cast<double>(st.kept_blocks) /
                           (static_cast<double>(nqb) * static_cast<double>(nkb) * static_cast<double>(m.heads) *
                            static_cast<double>(m.batch));
  return st;
}

/// MInference's index builder (`csrc/vertical_slash_index.cu`) for one (b, h) of `builder`:
/// the pattern of `vertical` key indices and `slash` diagonal offsets (o = i - j), over row
/// blocks of `block` query rows of a sequence of `seq` (seq_q = seq_kv).
/// For row block m, [s_m, e_m) with s_m = m·block and e_m = s_m + block (not clamped to seq,
/// as the CUDA kernel), each offset o < e_m covers the key band [hi - block, hi) with
/// hi = max(e_m - o, block); overlapping or adjacent bands are merged, and verticals inside a
/// merged range are dropped (no double counting); the rest of the verticals are columns.
/// The merged ranges are not block aligned (the kernel's 64-wide blocks start anywhere); the
/// key blocks lying wholly inside a range are listed as blocks and the ragged ends (< block
/// keys each) as columns: the same key set as all-columns, with O(ranges·block + verticals)
/// columns per row instead of O(N) (an all-columns mask of 32 heads at 128K keys would need a
/// 32 GiB padded column index). The executor applies col <= row to both.
/// Deviations from the CUDA kernel, both toward the definition: a merged range is the exact
/// union of its bands (the kernel grows it in whole 64-key blocks, `range_end += 64`, which
/// can add up to 63 keys past the last band), and verticals past the last band are kept (the
/// kernel stops at the last band; the same whenever offset 0 is present, as the selector
/// guarantees). Inputs need not be sorted or unique.
/// `builder` must have ceil(seq/block) query and key blocks (built with q_block = kv_block =
/// block, seq_q = seq_kv = seq); entries must lie in [0, seq). Throws argument_error otherwise.
inline void vertical_slash_index(block_mask_builder& builder, std::int64_t b, std::int64_t h, std::int64_t seq,
                                 std::int64_t block, std::span<const std::int64_t> vertical,
                                 std::span<const std::int64_t> slash) {
  const detail::checker c("headwise::vertical_slash_index");
  c.require(block >= 1, "block", ">= 1", block);
  c.require(seq >= 0, "seq", ">= 0", seq);
  const std::int64_t nb = (seq + block - 1) / block;
  c.require(builder.num_q_blocks() == nb && builder.num_kv_blocks() == nb, "builder",
            "ceil(seq/block) = " + detail::to_text(nb) + " query and key blocks",
            detail::to_text(builder.num_q_blocks()) + " query and " + detail::to_text(builder.num_kv_blocks()) +
                " key blocks");
  for (std::size_t i = 0; i < vertical.size(); ++i)  // messages built only on failure
    if (vertical[i] < 0 || vertical[i] >= seq)
      c.fail("vertical[" + detail::to_text(i) + "]", "a key index in [0, seq = " + detail::to_text(seq) + ")",
             detail::to_text(vertical[i]));
  for (std::size_t i = 0; i < slash.size(); ++i)
    if (slash[i] < 0 || slash[i] >= seq)
      c.fail("slash[" + detail::to_text(i) + "]", "an offset in [0, seq = " + detail::to_text(seq) + ")",
             detail::to_text(slash[i]));

  std::vector<std::int64_t> v(vertical.begin(), vertical.end()), s(slash.begin(), slash.end());
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  std::sort(s.begin(), s.end(), std::greater<>());
  s.erase(std::unique(s.begin(), s.end()), s.end());

  struct range {
    std::int64_t lo, hi;
  };
  std::vector<range> ranges;
  for (std::int64_t m = 0; m < nb; ++m) {
    const std::int64_t e_m = m * block + block;
    const std::int64_t lim = std::min(e_m, seq);  // keys >= lim are invisible to every row of the block
    ranges.clear();
    // Offsets descend, so band ends hi = max(e_m - o, block) ascend: merge in one sweep,
    // starting at the first offset o < e_m.
    const auto first_o = std::partition_point(s.begin(), s.end(), [&](std::int64_t o) { return o >= e_m; });
    for (auto it = first_o; it != s.end(); ++it) {
      const std::int64_t o = *it;
      const std::int64_t hi = std::max(e_m - o, block), lo = hi - block;
      if (!ranges.empty() && lo <= ranges.back().hi) {
        ranges.back().hi = std::max(ranges.back().hi, hi);
      } else {
        ranges.push_back({lo, hi});
      }
    }
    for (const range& r : ranges) {
      // Key blocks lying wholly inside the range are listed as blocks (the builder makes them
      // partial or full by causality), the ragged ends as columns: the same keys.
      const std::int64_t hi = std::min(r.hi, lim);
      std::int64_t kb = (r.lo + block - 1) / block, j = r.lo;
      const std::int64_t first = std::min(kb * block, hi);
      for (; j < first; ++j) builder.add_column(b, h, m, j);
      for (; kb * block < hi && std::min((kb + 1) * block, seq) <= hi; ++kb) {
        builder.add_block(b, h, m, kb);
        j = std::min((kb + 1) * block, seq);
      }
      for (; j < hi; ++j) builder.add_column(b, h, m, j);
    }
    std::size_t ri = 0;
    for (const std::int64_t j : v) {
      if (j >= lim) break;
      while (ri < ranges.size() && ranges[ri].hi <= j) ++ri;
      if (ri < ranges.size() && ranges[ri].lo <= j) continue;  // inside a band: dropped
      builder.add_column(b, h, m, j);
    }
  }
}

namespace detail::sparse_select {

template <class T>
using avec = std::vector<T, xsimd::aligned_allocator<T, 64>>;

inline constexpr double log2e = 1.4426950408889634074;
inline constexpr float neg_inf = -std::numeric_limits<float>::infinity();

/// Checks q, k, the head map and the thread count; returns the head map.
template <class KV>
engine::head_mapper check_qk(const checker& c, tensor_view<const float, 4> q, tensor_view<const KV, 4> k,
                             head_map heads, int num_threads) {
  static_assert(is_kv_dtype_v<KV>, "headwise: K storage must be float, headwise::bf16 or headwise::f16");
  c.view(q, "q", {1, 0, 1, 1}, {"batch", "seq_q", "heads_q", "dim_qk"});
  c.view(k, "k", {1, 0, 1, 1}, {"batch", "seq_kv", "heads_kv", "dim_qk"});
  c.equal(k.shape[0], q.shape[0], "k.shape[0] (batch)", "q.shape[0]");
  c.equal(k.shape[3], q.shape[3], "k.shape[3] (dim_qk)", "q.shape[3]");
  c.require(q.shape[1] == k.shape[1], "q.shape[1] (seq_q)",
            "seq_q == seq_kv = k.shape[1] = " + to_text(k.shape[1]) + " (causal prefill selection)",
            q.shape[1]);
  c.require(q.shape[1] <= std::numeric_limits<std::int32_t>::max(), "q.shape[1] (seq_q)",
            "<= 2^31 - 1 (int32 mask indices)", q.shape[1]);
  attention_options ao;
  ao.heads = heads;
  const engine::head_mapper hm = check_heads(c, ao, q.shape[2], k.shape[2], "k.shape[2] (heads_kv)");
  c.require(num_threads >= 0, "options.num_threads", ">= 0 (0 = OpenMP default)", num_threads);
  return hm;
}

inline void check_unit(const checker& c, double x, const char* arg) {
  c.require(x > 0.0 && x <= 1.0, arg, "a value in (0, 1]", x);
}
/// A block size the executor accepts as q_block (block_sparse_attention: [1, 1024]).
inline void check_block(const checker& c, std::int64_t x, const char* arg) {
  c.require(x >= 1 && x <= max_q_block, arg, "in [1, 1024]", x);
}
inline void check_min(const checker& c, std::int64_t x, std::int64_t lo, const char* arg) {
  c.require(x >= lo, arg, ">= " + to_text(lo), x);
}

/// Runs f(item, thread) over n items on resolve_threads(num_threads) threads.
template <class F>
void for_items(std::int64_t n, int threads, F&& f) {
  const int nt = engine::resolve_threads(threads, n);
  if (nt > 1) {
    HEADWISE_OMP(parallel for num_threads(nt) schedule(dynamic, 1))
    for (std::int64_t it = 0; it < n; ++it) f(it, engine::thread_index());
  } else {  // in place, as thread 0 (see engine::run)
    for (std::int64_t it = 0; it < n; ++it) f(it, 0);
  }
}

/// Indices of the k largest scores, by (score descending, index ascending); NaN sorts last.
template <class T>
std::vector<std::int64_t> top_k(std::span<const T> score, std::int64_t k) {
  const auto n = static_cast<std::int64_t>(score.size());
  k = std::clamp<std::int64_t>(k, 0, n);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), std::int64_t{0});
  auto key = [&](std::int64_t i) {
    const T v = score[static_cast<std::size_t>(i)];
    return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
  };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](std::int64_t a, std::int64_t b) {
    const T ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

/// FlexPrefill's score_cover_topk: 1 + #{m : cumsum(sort_desc(x))_m <= γ·Σx}. The total is
/// summed in the same (sorted) order as the cumulative sum, so γ = 1 covers every entry
/// despite rounding (Σx = 1 in exact arithmetic, as the reference assumes).
inline std::int64_t cover(std::vector<double> x, double gamma) {
  for (double& v : x)
    if (!(v > 0)) v = 0;  // NaN, -0
  std::sort(x.begin(), x.end(), std::greater<>());
  double total = 0;
  for (const double v : x) total += v;
  const double bound = gamma * total;
  double cum = 0;
  std::int64_t n = 0;
  for (const double v : x) {
    cum += v;
    if (!(cum <= bound)) break;
    ++n;
  }
  return n + 1;
}

/// Per-thread scratch of the estimators.
template <class Arch>
struct scratch {
  avec<float> q_buf, s_buf, k_buf, m, l, aux;
  std::vector<float> row, kbar;
  std::vector<std::vector<float>> av, as;
};

/// The softmax P of the last R query rows (positions N-R+r) of query heads `qheads` against
/// all N keys of KV head hk, scale·QKᵀ with the bottom-right causal mask, in fp32 on the
/// tile layer. Returns per head av[j] = Σ_r P[r][j] (column sums) and as[o] = Σ_r
/// P[r][N-R+r-o] for o in [0, N) (diagonal sums). Two passes over K tiles (online max/sum,
/// then normalised P), so memory is O(tile), not O(R·N). 1 <= R <= N.
template <class Arch, class KV>
void last_rows_scores(scratch<Arch>& ws, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, std::int64_t b,
                      std::int64_t hk, std::span<const std::int64_t> qheads, std::int64_t R, double scale) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  constexpr std::int64_t T = 128;  // keys per tile
  const std::int64_t N = k.shape[1], d = q.shape[3], nh = static_cast<std::int64_t>(qheads.size());
  const std::int64_t Rp = tile::round_up(R, w), ld = nh * Rp, nvec = ld / w;
  ws.q_buf.assign(static_cast<std::size_t>(d * ld), 0.0f);
  ws.s_buf.resize(static_cast<std::size_t>(T * ld));
  ws.m.resize(static_cast<std::size_t>(ld));
  ws.l.resize(static_cast<std::size_t>(ld));
  ws.aux.resize(static_cast<std::size_t>(ld));
  if constexpr (!std::is_same_v<KV, float>) ws.k_buf.resize(static_cast<std::size_t>(T * d));
  const float qf = static_cast<float>(scale * log2e);  // log2-domain logits
  for (std::int64_t jh = 0; jh < nh; ++jh)
    for (std::int64_t r = 0; r < R; ++r) {
      const float* src = &q(b, N - R + r, qheads[static_cast<std::size_t>(jh)], 0);
      for (std::int64_t dd = 0; dd < d; ++dd) ws.q_buf[static_cast<std::size_t>(dd * ld + jh * Rp + r)] = src[dd] * qf;
    }
  float* s = ws.s_buf.data();
  auto scores = [&](std::int64_t j0, std::int64_t n) {  // S tile (n, ld), masked
    const float* kr;
    std::ptrdiff_t ldk;
    if constexpr (std::is_same_v<KV, float>) {
      kr = &k(b, j0, hk, 0);
      ldk = k.stride[1];
    } else {
      for (std::int64_t jj = 0; jj < n; ++jj)
        tile::convert_row<Arch>(ws.k_buf.data() + jj * d, &k(b, j0 + jj, hk, 0), d);
      kr = ws.k_buf.data();
      ldk = d;
    }
    tile::qk_tile<Arch>(s, ld, kr, ldk, ws.q_buf.data(), ld, d, n, nvec);
    for (std::int64_t jj = 0; jj < n; ++jj) {
      // Row r (position N-R+r) sees key j iff r >= j - (N-R); pad lanes r >= R never.
      const std::int64_t lim = std::clamp<std::int64_t>(j0 + jj - (N - R), 0, R);
      for (std::int64_t jh = 0; jh < nh; ++jh) {
        float* hr = s + jj * ld + jh * Rp;
        std::fill(hr, hr + lim, neg_inf);
        std::fill(hr + R, hr + Rp, neg_inf);
      }
    }
  };
  std::fill(ws.m.begin(), ws.m.end(), neg_inf);
  std::fill(ws.l.begin(), ws.l.end(), 0.0f);
  for (std::int64_t j0 = 0; j0 < N; j0 += T) {
    const std::int64_t n = std::min(T, N - j0);
    scores(j0, n);
    tile::softmax_update<Arch>(s, ld, n, nvec, ws.m.data(), ws.l.data(), ws.aux.data());
  }
  for (std::int64_t x = 0; x < ld; ++x) {
    auto& mx = ws.m[static_cast<std::size_t>(x)];
    const float l = ws.l[static_cast<std::size_t>(x)];
    if (mx == neg_inf) mx = 0.0f;
    ws.aux[static_cast<std::size_t>(x)] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  ws.av.resize(static_cast<std::size_t>(nh));
  ws.as.resize(static_cast<std::size_t>(nh));
  for (std::int64_t jh = 0; jh < nh; ++jh) {
    ws.av[static_cast<std::size_t>(jh)].assign(static_cast<std::size_t>(N), 0.0f);
    ws.as[static_cast<std::size_t>(jh)].assign(static_cast<std::size_t>(N + Rp), 0.0f);  // index o + R
  }
  for (std::int64_t j0 = 0; j0 < N; j0 += T) {
    const std::int64_t n = std::min(T, N - j0);
    scores(j0, n);
    for (std::int64_t jj = 0; jj < n; ++jj)
      for (std::int64_t v = 0; v < nvec; ++v) {
        float* p = s + jj * ld + v * w;
        const B mv = B::load_aligned(ws.m.data() + v * w), iv = B::load_aligned(ws.aux.data() + v * w);
        (tile::exp2_softmax<Arch>(B::load_aligned(p) - mv) * iv).store_aligned(p);
      }
    for (std::int64_t jj = 0; jj < n; ++jj) {
      const std::int64_t j = j0 + jj;
      for (std::int64_t jh = 0; jh < nh; ++jh) {
        const float* hr = s + jj * ld + jh * Rp;
        float* dst = ws.as[static_cast<std::size_t>(jh)].data() + (N - j);  // as[o + R], o = N-R+r-j
        B acc(0.0f);
        for (std::int64_t v = 0; v < Rp; v += w) {
          const B p = B::load_aligned(hr + v);
          acc += p;
          (B::load_unaligned(dst + v) + p).store_unaligned(dst + v);
        }
        ws.av[static_cast<std::size_t>(jh)][static_cast<std::size_t>(j)] = xsimd::hadd(acc);
      }
    }
  }
  for (std::int64_t jh = 0; jh < nh; ++jh) {  // shift to as[o], o in [0, N)
    auto& a = ws.as[static_cast<std::size_t>(jh)];
    std::copy(a.begin() + R, a.begin() + R + N, a.begin());
    a.resize(static_cast<std::size_t>(N));
  }
}

/// The attention heads (output heads) of KV head hk and their query heads.
inline void group_heads(const engine::head_mapper& hm, std::int64_t hk, std::vector<std::int64_t>& outs,
                        std::vector<std::int64_t>& qheads) {
  outs.resize(static_cast<std::size_t>(hm.group));
  qheads.resize(static_cast<std::size_t>(hm.group));
  for (std::int64_t j = 0; j < hm.group; ++j) {
    outs[static_cast<std::size_t>(j)] = hm.out_head(hk, j);
    qheads[static_cast<std::size_t>(j)] = hm.q_head(outs[static_cast<std::size_t>(j)]);
  }
}

/// Every causal block of every (b, h): the dense-causal mask.
inline block_mask_data all_causal(std::int64_t batch, std::int64_t heads, std::int64_t n, std::int64_t block) {
  block_mask_builder bld(batch, heads, n, n, block, block, causal_mode::bottom_right);
  const std::int64_t nb = bld.num_q_blocks();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t qb = 0; qb < nb; ++qb)
        for (std::int64_t kb = 0; kb <= qb; ++kb) bld.add_block(b, h, qb, kb);
  return std::move(bld).finish();
}

/// FlexPrefill's selection for one attention head.
struct flex_head {
  std::vector<std::int64_t> vertical, slash;  ///< key blocks V, block offsets S
  std::vector<std::int64_t> picks;            ///< query-aware picks, flattened qb·nb + kb
  bool query_aware = false;
};

/// K̄: block means of K head hk (nb × d, f32), the partial last block divided by its real count.
template <class Arch, class KV>
void key_block_means(scratch<Arch>& ws, tensor_view<const KV, 4> k, std::int64_t b, std::int64_t hk,
                     std::int64_t B, std::int64_t nb) {
  const std::int64_t N = k.shape[1], d = k.shape[3];
  ws.kbar.assign(static_cast<std::size_t>(nb * d), 0.0f);
  ws.row.resize(static_cast<std::size_t>(d));
  for (std::int64_t j = 0; j < N; ++j) {
    tile::convert_row<Arch>(ws.row.data(), &k(b, j, hk, 0), d);
    float* dst = ws.kbar.data() + (j / B) * d;
    for (std::int64_t dd = 0; dd < d; ++dd) dst[dd] += ws.row[static_cast<std::size_t>(dd)];
  }
  for (std::int64_t kb = 0; kb < nb; ++kb) {
    const float inv = 1.0f / static_cast<float>(std::min(B, N - kb * B));
    for (std::int64_t dd = 0; dd < d; ++dd) ws.kbar[static_cast<std::size_t>(kb * d + dd)] *= inv;
  }
}

/// FlexPrefill step 6 for query head qh: P = softmax_row(Q̄ K̄ᵀ/sqrt(d) + blockcausal) (Q̄ the
/// real-count block means of q, logits on the tile layer, exp/normalisation in double), then
/// the flattened entries in global descending order (ties: lower flat index) while the
/// cumulative sum <= γ·ΣP (ΣP = nb in exact arithmetic; summed in the same order, so γ = 1
/// keeps every causal block). Entries above the block diagonal have P = 0 and are skipped.
template <class Arch>
std::vector<std::int64_t> query_aware_picks(scratch<Arch>& ws, tensor_view<const float, 4> q, std::int64_t b,
                                            std::int64_t qh, std::int64_t B, std::int64_t nb, double gamma) {
  constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  const std::int64_t N = q.shape[1], d = q.shape[3];
  const std::int64_t ldq = tile::round_up(nb, w);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  ws.q_buf.assign(static_cast<std::size_t>(d * ldq), 0.0f);
  std::vector<double> acc(static_cast<std::size_t>(d));
  for (std::int64_t qb = 0; qb < nb; ++qb) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const std::int64_t i1 = std::min(N, (qb + 1) * B);
    for (std::int64_t i = qb * B; i < i1; ++i) {
      const float* src = &q(b, i, qh, 0);
      for (std::int64_t dd = 0; dd < d; ++dd) acc[static_cast<std::size_t>(dd)] += src[dd];
    }
    const double f = inv_sqrt_d / static_cast<double>(i1 - qb * B);
    for (std::int64_t dd = 0; dd < d; ++dd)
      ws.q_buf[static_cast<std::size_t>(dd * ldq + qb)] = static_cast<float>(acc[static_cast<std::size_t>(dd)] * f);
  }
  ws.s_buf.resize(static_cast<std::size_t>(nb * ldq));
  tile::qk_tile<Arch>(ws.s_buf.data(), ldq, ws.kbar.data(), d, ws.q_buf.data(), ldq, d, nb, ldq / w);
  struct entry {
    double p;
    std::int64_t flat;
  };
  std::vector<entry> e;
  e.reserve(static_cast<std::size_t>(nb * (nb + 1) / 2));
  std::vector<double> row(static_cast<std::size_t>(nb));
  for (std::int64_t qb = 0; qb < nb; ++qb) {
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t kb = 0; kb <= qb; ++kb) {
      const double x = ws.s_buf[static_cast<std::size_t>(kb * ldq + qb)];
      row[static_cast<std::size_t>(kb)] = x;
      mx = std::max(mx, x);
    }
    double sum = 0;
    for (std::int64_t kb = 0; kb <= qb; ++kb) sum += row[static_cast<std::size_t>(kb)] = std::exp(row[static_cast<std::size_t>(kb)] - mx);
    for (std::int64_t kb = 0; kb <= qb; ++kb) {
      const double p = row[static_cast<std::size_t>(kb)] / sum;
      e.push_back({std::isnan(p) ? 0.0 : p, qb * nb + kb});
    }
  }
  std::sort(e.begin(), e.end(), [](const entry& x, const entry& y) { return x.p > y.p || (x.p == y.p && x.flat < y.flat); });
  double total = 0;
  for (const entry& x : e) total += x.p;
  const double bound = gamma * total;
  std::vector<std::int64_t> picks;
  double cum = 0;
  for (const entry& x : e) {
    cum += x.p;
    if (!(cum <= bound)) break;
    picks.push_back(x.flat);
  }
  return picks;
}

/// FlexPrefill steps 1-6 for the heads of one (b, hk) item.
template <class Arch, class KV>
void flex_item(scratch<Arch>& ws, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, std::int64_t b,
               std::int64_t hk, std::span<const std::int64_t> qheads, const flexprefill_options& opt,
               std::span<flex_head> out) {
  const std::int64_t N = q.shape[1], d = q.shape[3], B = opt.block_size;
  const std::int64_t nb = (N + B - 1) / B;
  const std::int64_t min_b = (opt.min_budget + B - 1) / B;
  const std::int64_t max_b = opt.max_budget == 0 ? nb : std::min((opt.max_budget + B - 1) / B, nb);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  last_rows_scores<Arch, KV>(ws, q, k, b, hk, qheads, B, inv_sqrt_d);
  key_block_means<Arch, KV>(ws, k, b, hk, B, nb);
  const auto nh = qheads.size();
  std::vector<double> av(static_cast<std::size_t>(N)), as(static_cast<std::size_t>(N));
  std::vector<double> abar(static_cast<std::size_t>(nb)), ahat(static_cast<std::size_t>(nb)),
      sb(static_cast<std::size_t>(nb)), qmean(static_cast<std::size_t>(d));
  for (std::size_t jh = 0; jh < nh; ++jh) {
    flex_head& fh = out[jh];
    const std::int64_t qh = qheads[jh];
    // Step 2: a_v, a_s (means over the B rows).
    const double invB = 1.0 / static_cast<double>(B);
    for (std::int64_t j = 0; j < N; ++j) {
      av[static_cast<std::size_t>(j)] = ws.av[jh][static_cast<std::size_t>(j)] * invB;
      as[static_cast<std::size_t>(j)] = ws.as[jh][static_cast<std::size_t>(j)] * invB;
    }
    // Step 3: budgets, //128 hard-coded as in the reference.
    auto clamp_budget = [&](std::int64_t kk) { return std::min(std::max(kk, min_b), max_b); };
    std::int64_t k_v = clamp_budget(cover(av, opt.gamma) / 128 + 1);
    std::int64_t k_s = clamp_budget(cover(as, opt.gamma) / 128 + 1);
    // Step 4: pooled estimate vs block-summed vertical scores.
    std::fill(abar.begin(), abar.end(), 0.0);
    for (std::int64_t j = 0; j < N; ++j) abar[static_cast<std::size_t>(j / B)] += av[static_cast<std::size_t>(j)];
    std::fill(qmean.begin(), qmean.end(), 0.0);
    for (std::int64_t r = N - B; r < N; ++r) {
      const float* src = &q(b, r, qh, 0);
      for (std::int64_t dd = 0; dd < d; ++dd) qmean[static_cast<std::size_t>(dd)] += src[dd];
    }
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t kb = 0; kb < nb; ++kb) {
      double x = 0;
      for (std::int64_t dd = 0; dd < d; ++dd)
        x += qmean[static_cast<std::size_t>(dd)] * ws.kbar[static_cast<std::size_t>(kb * d + dd)];
      ahat[static_cast<std::size_t>(kb)] = x * invB * inv_sqrt_d;
      mx = std::max(mx, ahat[static_cast<std::size_t>(kb)]);
    }
    double sum = 0;
    for (double& x : ahat) sum += x = std::exp(x - mx);
    for (double& x : ahat) x /= sum;
    const double D = js_distance(abar, ahat);
    fh.query_aware = D < opt.tau;
    if (fh.query_aware) k_v = k_s = min_b;
    // Step 5: block scores, key block 0 and offset 0 forced, top-k.
    std::fill(sb.begin(), sb.end(), 0.0);
    for (std::int64_t o = 0; o < N; ++o)  // chunks of offsets counted from the far end
      sb[static_cast<std::size_t>(nb - 1 - (N - 1 - o) / B)] += as[static_cast<std::size_t>(o)];
    std::vector<double> vb = abar;
    vb[0] = std::numeric_limits<double>::infinity();
    sb[0] = std::numeric_limits<double>::infinity();
    fh.vertical = top_k<double>(vb, std::min(k_v, nb));
    fh.slash = top_k<double>(sb, std::min(k_s, nb));
    // Step 6.
    fh.picks.clear();
    if (fh.query_aware) fh.picks = query_aware_picks<Arch>(ws, q, b, qh, B, nb, opt.gamma);
  }
}

/// MInference's online estimate for one attention head: top-k verticals and slash offsets.
struct vs_head {
  std::vector<std::int64_t> vertical, slash;
};

/// XAttention's antidiagonal block scores for the heads of one (b, hk) item: for each query
/// block qb in order, on_row(jh, qb, W) with W[kb] (kb <= qb, double) the softmax mass of
/// query block qb in key block kb (ALGORITHMS.md §6.3), head jh of `qheads`.
template <class Arch, class KV, class OnRow>
void xattn_item(scratch<Arch>& ws, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, std::int64_t b,
                std::int64_t hk, std::span<const std::int64_t> qheads, std::int64_t block, std::int64_t stride,
                OnRow&& on_row) {
  using Bt = xsimd::batch<float, Arch>;
  constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  const std::int64_t N = q.shape[1], d = q.shape[3], S = stride;
  const std::int64_t nb = (N + block - 1) / block, bs = block / S, Rn = (N + S - 1) / S, Dk = S * d;
  const std::int64_t nh = static_cast<std::int64_t>(qheads.size());
  const std::int64_t Rp = tile::round_up(bs, w), ld = nh * Rp, nvec = ld / w;
  // K̃[c] = concat_j K[cS+j] is S consecutive key rows: converted per tile of Tc stride
  // columns into a packed buffer (rows past N zero), O(tile) memory; the copy costs 1/ld of the
  // dot products.
  constexpr std::int64_t Tc = 64;
  ws.k_buf.resize(static_cast<std::size_t>(Tc * Dk));
  ws.q_buf.resize(static_cast<std::size_t>(Dk * ld));
  ws.s_buf.resize(static_cast<std::size_t>(std::max<std::int64_t>(Rn, 1) * ld));
  ws.m.resize(static_cast<std::size_t>(ld));
  ws.l.resize(static_cast<std::size_t>(ld));
  ws.aux.resize(static_cast<std::size_t>(ld));
  const float qf = static_cast<float>(log2e / (std::sqrt(static_cast<double>(d)) * static_cast<double>(S)));
  std::vector<double> W(static_cast<std::size_t>(nb));
  float* s = ws.s_buf.data();
  for (std::int64_t qb = 0; qb < nb; ++qb) {
    const std::int64_t r0 = qb * bs, r1 = std::min(r0 + bs, Rn), nr = r1 - r0;
    // Q̃[r] = concat_j Q[rS+S-1-j] (rows past N zero), scaled by log2(e)/(sqrt(d)·S).
    std::fill(ws.q_buf.begin(), ws.q_buf.end(), 0.0f);
    for (std::int64_t jh = 0; jh < nh; ++jh)
      for (std::int64_t rr = 0; rr < nr; ++rr)
        for (std::int64_t jj = 0; jj < S; ++jj) {
          const std::int64_t i = (r0 + rr) * S + S - 1 - jj;
          if (i >= N) continue;
          const float* src = &q(b, i, qheads[static_cast<std::size_t>(jh)], 0);
          float* dst = ws.q_buf.data() + (jj * d) * ld + jh * Rp + rr;
          for (std::int64_t dd = 0; dd < d; ++dd) dst[dd * ld] = src[dd] * qf;
        }
    // Ã over the stride columns c < r1 (causal c <= r), then softmax over c.
    for (std::int64_t c0 = 0; c0 < r1; c0 += Tc) {
      const std::int64_t nc = std::min(Tc, r1 - c0), j0 = c0 * S, j1 = std::min(N, (c0 + nc) * S);
      for (std::int64_t j = j0; j < j1; ++j)
        tile::convert_row<Arch>(ws.k_buf.data() + (j - j0) * d, &k(b, j, hk, 0), d);
      std::fill(ws.k_buf.data() + (j1 - j0) * d, ws.k_buf.data() + nc * Dk, 0.0f);
      tile::qk_tile<Arch>(s + c0 * ld, ld, ws.k_buf.data(), Dk, ws.q_buf.data(), ld, Dk, nc, nvec);
    }
    for (std::int64_t c = 0; c < r1; ++c)
      for (std::int64_t jh = 0; jh < nh; ++jh) {
        float* hr = s + c * ld + jh * Rp;
        std::fill(hr, hr + std::clamp<std::int64_t>(c - r0, 0, nr), neg_inf);  // rows r < c
        std::fill(hr + nr, hr + Rp, neg_inf);
      }
    std::fill(ws.m.begin(), ws.m.end(), neg_inf);
    std::fill(ws.l.begin(), ws.l.end(), 0.0f);
    tile::softmax_update<Arch>(s, ld, r1, nvec, ws.m.data(), ws.l.data(), ws.aux.data());
    for (std::int64_t x = 0; x < ld; ++x) {
      const float l = ws.l[static_cast<std::size_t>(x)];
      ws.aux[static_cast<std::size_t>(x)] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    for (std::int64_t jh = 0; jh < nh; ++jh) {
      std::fill(W.begin(), W.end(), 0.0);
      for (std::int64_t kb = 0; kb <= qb; ++kb) {
        double acc = 0;
        for (std::int64_t v = 0; v < Rp; v += w) {
          Bt sum(0.0f);
          const std::int64_t c1 = std::min((kb + 1) * bs, r1);
          for (std::int64_t c = kb * bs; c < c1; ++c) sum += Bt::load_aligned(s + c * ld + jh * Rp + v);
          acc += static_cast<double>(xsimd::hadd(sum * Bt::load_aligned(ws.aux.data() + jh * Rp + v)));
        }
        W[static_cast<std::size_t>(kb)] = acc;
      }
      on_row(jh, qb, std::span<const double>(W.data(), static_cast<std::size_t>(qb + 1)));
    }
  }
}

/// find_blocks_chunked (causal prefill) for one query-block row: key block 0 and the diagonal,
/// then the other blocks by descending W (ties: lower kb) while the mass before each is
/// < τ·ΣW, starting from the forced blocks' mass.
inline void xattn_choose(std::span<const double> W, std::int64_t qb, double threshold, std::vector<std::int64_t>& keep) {
  keep.clear();
  keep.push_back(0);
  if (qb > 0) keep.push_back(qb);
  double total = 0;
  for (const double x : W) total += x;
  const double required = threshold * total;
  double cum = W[0] + (qb > 0 ? W[static_cast<std::size_t>(qb)] : 0.0);
  if (qb < 2) return;
  std::vector<double> rest(W.begin() + 1, W.begin() + qb);  // kb in (0, qb)
  for (const std::int64_t i : top_k<double>(rest, qb - 1)) {
    if (!(cum < required)) break;
    keep.push_back(i + 1);
    cum += rest[static_cast<std::size_t>(i)];
  }
}

}  // namespace detail::sparse_select

/// FlexPrefill block selection (ALGORITHMS.md §6.1, `get_active_blocks`), per attention head:
///  1. Â = softmax(q[-B:]/sqrt(d) · Kᵀ + causal) in fp32 (always 1/sqrt(d): the estimate
///     ignores the model's softmax scale, as the reference, §8 item 9);
///  2. a_v = column means, a_s = diagonal sums / B by offset;
///  3. k_v = ⌊cover_γ(a_v)/128⌋ + 1, k_s likewise (the 128 hard-coded, whatever B), clamped to
///     [min_b, max_b];
///  4. D = js_distance(blocksum(a_v), softmax(mean(q̂)·K̄ᵀ)); D < τ: query-aware, k_v = k_s =
///     min_b (even above max_b, as the reference);
///  5. top-k_v key blocks and top-k_s block offsets (offset chunks counted from the far end)
///     with key block 0 and offset 0 forced, mask {(i,v): v <= i} ∪ {(i, i-s)};
///  6. query-aware heads add the global cover of the block-level softmax of Q̄K̄ᵀ/sqrt(d).
/// Dense fallback (all causal blocks, query_aware all 0) when N == 1 or N <= max(2B,
/// ceil(min_budget/B)·B). The mask has q_block = kv_block = block_size, causal bottom-right.
/// Choices where the reference is silent or differs:
///  - batch >= 1, each row independent (the reference: batch 1); GQA through options.heads;
///  - top-k ties go to the lower key block / the nearer block offset; the query-aware order's
///    ties to the lower flattened index;
///  - the cover sums compare against γ·(the sum of the sorted scores) instead of γ (resp.
///    γ·nb): equal in exact arithmetic, and γ = 1 then covers every entry despite rounding;
///    the block-level softmaxes of steps 4 and 6 are evaluated in double;
///  - js_distance takes 0·log 0 = 0 (the reference's torch code gives NaN, i.e. vertical-slash);
///  - key block 0 and the diagonal are kept even when a budget is 0 (min_budget = 0);
///  - stats.computational_ratio counts kept causal blocks only, and the dense fallback reports
///    its real ratio (≈ 0.5; the reference returns 1 there).
/// Throws argument_error before any work for: γ or τ outside (0, 1], block_size < 1, budgets
/// < 0, num_threads < 0, seq_q != seq_kv, head counts the head map rejects, bad views.
template <class KT>
sparse_selection flexprefill_select(tensor_view<const float, 4> q, tensor_view<KT, 4> k,
                                    const flexprefill_options& options = {}) {
  using KV = std::remove_const_t<KT>;
  namespace ss = detail::sparse_select;
  const detail::checker c("headwise::flexprefill_select");
  const tensor_view<const KV, 4> kc(k);
  const engine::head_mapper hm = ss::check_qk<KV>(c, q, kc, options.heads, options.num_threads);
  ss::check_unit(c, options.gamma, "options.gamma");
  ss::check_unit(c, options.tau, "options.tau");
  ss::check_block(c, options.block_size, "options.block_size");
  ss::check_min(c, options.min_budget, 0, "options.min_budget");
  ss::check_min(c, options.max_budget, 0, "options.max_budget");

  const std::int64_t batch = q.shape[0], N = q.shape[1], B = options.block_size, H = hm.heads_out;
  sparse_selection sel;
  const std::int64_t min_b = options.min_budget / B + (options.min_budget % B != 0);
  if (N <= 1 || N <= std::max(2 * B, min_b * B)) {
    sel.mask = ss::all_causal(batch, H, N, B);
    sel.stats = mask_stats(sel.mask, causal_mode::bottom_right);
    sel.stats.query_aware.assign(static_cast<std::size_t>(batch * H), 0);
    return sel;
  }
  using Arch = tile::default_arch;
  const std::int64_t nb = (N + B - 1) / B;
  std::vector<ss::flex_head> heads(static_cast<std::size_t>(batch * H));
  const int nt = engine::resolve_threads(options.num_threads, batch * hm.heads_kv);
  std::vector<ss::scratch<Arch>> ws(static_cast<std::size_t>(nt));
  ss::for_items(batch * hm.heads_kv, nt, [&](std::int64_t it, int t) {
    const std::int64_t b = it / hm.heads_kv, hk = it % hm.heads_kv;
    std::vector<std::int64_t> outs, qheads;
    ss::group_heads(hm, hk, outs, qheads);
    std::vector<ss::flex_head> res(outs.size());
    ss::flex_item<Arch, KV>(ws[static_cast<std::size_t>(t)], q, kc, b, hk, qheads, options, res);
    for (std::size_t j = 0; j < outs.size(); ++j)
      heads[static_cast<std::size_t>(b * H + outs[j])] = std::move(res[j]);
  });
  block_mask_builder bld(batch, H, N, N, B, B, causal_mode::bottom_right);
  sel.stats.query_aware.resize(heads.size());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      const ss::flex_head& fh = heads[static_cast<std::size_t>(b * H + h)];
      sel.stats.query_aware[static_cast<std::size_t>(b * H + h)] = fh.query_aware ? 1 : 0;
      for (std::int64_t qb = 0; qb < nb; ++qb) {
        bld.add_block(b, h, qb, 0);
        bld.add_block(b, h, qb, qb);
        for (const std::int64_t v : fh.vertical)
          if (v <= qb) bld.add_block(b, h, qb, v);
        for (const std::int64_t s : fh.slash)
          if (qb - s >= 0) bld.add_block(b, h, qb, qb - s);
      }
      for (const std::int64_t p : fh.picks) bld.add_block(b, h, p / nb, p % nb);
    }
  auto qa = std::move(sel.stats.query_aware);
  sel.mask = std::move(bld).finish();
  sel.stats = mask_stats(sel.mask, causal_mode::bottom_right);
  sel.stats.query_aware = std::move(qa);
  return sel;
}

/// MInference vertical-slash selection (ALGORITHMS.md §6.2, `vertical_and_slash_kernel`), per
/// attention head: Â = softmax(q[-last_q:]·Kᵀ/sqrt(d) + causal on the last last_q columns) in
/// fp32 (last_q = min(options.last_q, N)); vertical = column sums with the first
/// forced_vertical keys forced, top k_v = min(N, max(vertical_size, 30)); slash = diagonal
/// sums over offsets [0, N) with the nearest forced_slash offsets forced, top k_s = min(N,
/// max(slash_size, 50)) (the floors 30 and 50 are MInference's constants); then
/// vertical_slash_index over row blocks of options.block rows (q_block = kv_block = block):
/// key blocks wholly inside a merged band as blocks, everything else as columns; the executor
/// applies col <= row.
/// Choices: offset 0 (the diagonal) is always added so no row is empty, whatever
/// forced_slash; top-k ties (the forced entries) go to the lower key index / the nearer
/// offset; any block size (MInference asserts 64); GQA through options.heads (MInference
/// reads KV head h / group: head_map::interleave); batch rows are independent.
/// Throws argument_error before any work for: negative sizes or forced counts, last_q < 1,
/// block < 1, num_threads < 0, seq_q != seq_kv, head counts the head map rejects, bad views.
template <class KT>
sparse_selection vertical_slash_select(tensor_view<const float, 4> q, tensor_view<KT, 4> k,
                                       const vertical_slash_options& options = {}) {
  using KV = std::remove_const_t<KT>;
  namespace ss = detail::sparse_select;
  const detail::checker c("headwise::vertical_slash_select");
  const tensor_view<const KV, 4> kc(k);
  const engine::head_mapper hm = ss::check_qk<KV>(c, q, kc, options.heads, options.num_threads);
  ss::check_min(c, options.vertical_size, 0, "options.vertical_size");
  ss::check_min(c, options.slash_size, 0, "options.slash_size");
  ss::check_min(c, options.last_q, 1, "options.last_q");
  ss::check_block(c, options.block, "options.block");
  ss::check_min(c, options.forced_vertical, 0, "options.forced_vertical");
  ss::check_min(c, options.forced_slash, 0, "options.forced_slash");

  using Arch = tile::default_arch;
  const std::int64_t batch = q.shape[0], N = q.shape[1], H = hm.heads_out;
  std::vector<ss::vs_head> heads(static_cast<std::size_t>(batch * H));
  if (N > 0) {
    const std::int64_t R = std::min(options.last_q, N);
    const std::int64_t k_v = std::min(N, std::max<std::int64_t>(options.vertical_size, 30));
    const std::int64_t k_s = std::min(N, std::max<std::int64_t>(options.slash_size, 50));
    const double scale = 1.0 / std::sqrt(static_cast<double>(q.shape[3]));
    const int nt = engine::resolve_threads(options.num_threads, batch * hm.heads_kv);
    std::vector<ss::scratch<Arch>> ws(static_cast<std::size_t>(nt));
    ss::for_items(batch * hm.heads_kv, nt, [&](std::int64_t it, int t) {
      const std::int64_t b = it / hm.heads_kv, hk = it % hm.heads_kv;
      ss::scratch<Arch>& sc = ws[static_cast<std::size_t>(t)];
      std::vector<std::int64_t> outs, qheads;
      ss::group_heads(hm, hk, outs, qheads);
      ss::last_rows_scores<Arch, KV>(sc, q, kc, b, hk, qheads, R, scale);
      for (std::size_t j = 0; j < outs.size(); ++j) {
        auto& v = sc.av[j];
        auto& s = sc.as[j];
        const float inf = std::numeric_limits<float>::infinity();
        std::fill(v.begin(), v.begin() + std::min(options.forced_vertical, N), inf);
        std::fill(s.begin(), s.begin() + std::min(options.forced_slash, N), inf);
        ss::vs_head& vh = heads[static_cast<std::size_t>(b * H + outs[j])];
        vh.vertical = ss::top_k<float>(v, k_v);
        vh.slash = ss::top_k<float>(s, k_s);
        if (std::find(vh.slash.begin(), vh.slash.end(), 0) == vh.slash.end()) vh.slash.push_back(0);
      }
    });
  }
  block_mask_builder bld(batch, H, N, N, options.block, options.block, causal_mode::bottom_right);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      const ss::vs_head& vh = heads[static_cast<std::size_t>(b * H + h)];
      vertical_slash_index(bld, b, h, N, options.block, vh.vertical, vh.slash);
    }
  sparse_selection sel;
  sel.mask = std::move(bld).finish();
  sel.stats = mask_stats(sel.mask, causal_mode::bottom_right);
  return sel;
}

/// XAttention selection (ALGORITHMS.md §6.3, `xattn_estimate` with select_mode "inverse",
/// norm 1, `find_blocks_chunked` causal prefill), per attention head: stride rows
/// Q̃[r] = concat_j Q[rS+S-1-j], K̃[c] = concat_j K[cS+j] (positions past N zero, as the
/// reference's padding), Ã[r,c] = Q̃[r]·K̃[c]/(sqrt(d)·S) for c <= r (stride-level causal, so
/// the diagonal S×S cell still mixes in future keys: the reference's quirk, kept), softmax
/// over c in fp32, W[qb,kb] = Σ_{r∈qb, c∈kb} softmax; per query-block row keep key block 0 and
/// the diagonal, then the other causal blocks by descending W (ties: lower kb) while the mass
/// kept before each is < τ·Σ_kb W. The mask has q_block = kv_block = block, causal bottom-right.
/// Choices: threshold = 1 keeps every causal block without estimating (every causal block has
/// positive mass in exact arithmetic; rounding could otherwise drop a tiny one); GQA through
/// options.heads (the reference asserts heads_q == heads_kv); any block divisible by the
/// stride (the reference asserts 128); no query chunking (it only bounds the reference's
/// memory); batch rows are independent.
/// Throws argument_error before any work for: block < 1, stride < 1 or not dividing block,
/// threshold outside (0, 1], num_threads < 0, seq_q != seq_kv, head counts the head map
/// rejects, bad views.
template <class KT>
sparse_selection xattention_select(tensor_view<const float, 4> q, tensor_view<KT, 4> k,
                                   const xattention_options& options = {}) {
  using KV = std::remove_const_t<KT>;
  namespace ss = detail::sparse_select;
  const detail::checker c("headwise::xattention_select");
  const tensor_view<const KV, 4> kc(k);
  const engine::head_mapper hm = ss::check_qk<KV>(c, q, kc, options.heads, options.num_threads);
  ss::check_block(c, options.block, "options.block");
  ss::check_min(c, options.stride, 1, "options.stride");
  c.require(options.block % options.stride == 0, "options.stride",
            "a divisor of options.block = " + detail::to_text(options.block), options.stride);
  ss::check_unit(c, options.threshold, "options.threshold");

  const std::int64_t batch = q.shape[0], N = q.shape[1], H = hm.heads_out;
  sparse_selection sel;
  if (options.threshold >= 1.0 || N == 0) {
    sel.mask = ss::all_causal(batch, H, N, options.block);
    sel.stats = mask_stats(sel.mask, causal_mode::bottom_right);
    return sel;
  }
  using Arch = tile::default_arch;
  std::vector<std::vector<std::int64_t>> rows(static_cast<std::size_t>(batch * H));  // (qb, kb) pairs
  const int nt = engine::resolve_threads(options.num_threads, batch * hm.heads_kv);
  std::vector<ss::scratch<Arch>> ws(static_cast<std::size_t>(nt));
  ss::for_items(batch * hm.heads_kv, nt, [&](std::int64_t it, int t) {
    const std::int64_t b = it / hm.heads_kv, hk = it % hm.heads_kv;
    std::vector<std::int64_t> outs, qheads, keep;
    ss::group_heads(hm, hk, outs, qheads);
    ss::xattn_item<Arch, KV>(ws[static_cast<std::size_t>(t)], q, kc, b, hk, qheads, options.block, options.stride,
                             [&](std::int64_t jh, std::int64_t qb, std::span<const double> W) {
                               ss::xattn_choose(W, qb, options.threshold, keep);
                               auto& r = rows[static_cast<std::size_t>(b * H + outs[static_cast<std::size_t>(jh)])];
                               for (const std::int64_t kb : keep) {
                                 r.push_back(qb);
                                 r.push_back(kb);
                               }
                             });
  });
  block_mask_builder bld(batch, H, N, N, options.block, options.block, causal_mode::bottom_right);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      const auto& r = rows[static_cast<std::size_t>(b * H + h)];
      for (std::size_t i = 0; i + 1 < r.size(); i += 2) bld.add_block(b, h, r[i], r[i + 1]);
    }
  sel.mask = std::move(bld).finish();
  sel.stats = mask_stats(sel.mask, causal_mode::bottom_right);
  return sel;
}

}  // namespace headwise

HEADWISE_DIAGNOSTICS_POP
