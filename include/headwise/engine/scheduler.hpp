/// @file
/// @brief The scheduler: the one place that uses OpenMP. It cuts a problem into work items
/// (sequence, KV head, q-block, KV split), picks each item's tile layout, runs them, then
/// merges split items in split order. The cut depends only on shapes and the blocking, so
/// results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "../tile/diagnostics.hpp"
#include "mainloop.hpp"
#include "merge.hpp"

#if defined(_OPENMP)
#include <omp.h>
#define HEADWISE_PRAGMA_(x) _Pragma(#x)
#define HEADWISE_OMP(...) HEADWISE_PRAGMA_(omp __VA_ARGS__)
#else
#define HEADWISE_OMP(...)
#endif

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::engine {

/// Threads to use: 0 = omp_get_max_threads(); 1 inside an enclosing parallel region; never
/// more than the work items. Without OpenMP always 1.
inline int resolve_threads(int requested, std::int64_t items) noexcept {
#if defined(_OPENMP)
  int nt = requested > 0 ? requested : omp_get_max_threads();
  if (omp_in_parallel()) nt = 1;
#else
  (void)requested;
  int nt = 1;
#endif
  if (items < nt) nt = static_cast<int>(items < 1 ? 1 : items);
  return nt;
}

inline int thread_index() noexcept {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// True when a work item of `rows` query rows would fill at most half a vector: such items
/// (decode) run with keys across lanes.
template <class Arch>
constexpr bool use_key_lanes(std::int64_t rows) noexcept {
  return rows * 2 <= tile::arch_traits<Arch>::lanes;
}

/// Keys per split of a query-lane item that holds all its sequence's rows: as much work per
/// split as a decode split of split_kv keys has (32 rows x 256 dims per key: GQA 32/8, D 128),
/// so that absorbed MLA (16-128 heads x 1088 dims per key) gets enough splits for every core;
/// rounded down to a multiple of block_kv, then clamped to [min(512, split_kv), split_kv], and
/// raised so that a sequence of seq_kv keys has at most max_splits splits (the partial states
/// of 128 heads take about as much memory as the cache itself). The floor of 512 (was 256)
/// halves the splits of 64-128 heads (8k keys: 16 instead of 32; 32 heads: 16 instead of
/// 19): each split writes and the merge reads rows x (dim_v + 1) floats, which cost 64- and
/// 128-head calls 7-9% on one and two threads of the development VM (docs/benchmarks.md,
/// 2026-12-07 (morning)). Shapes only, never threads.
inline std::int64_t query_lane_split(const blocking& blk, std::int64_t rows, std::int64_t dims,
                                     std::int64_t seq_kv) noexcept {
  if (blk.split_kv <= 0) return 0;
  constexpr std::int64_t decode_work_per_key = 32 * 256, max_splits = 64;
  const std::int64_t split_kv = std::min<std::int64_t>(blk.split_kv, std::int64_t{1} << 40);  // no overflow
  const std::int64_t bk = std::max<std::int64_t>(1, blk.block_kv);
  std::int64_t keys = split_kv * decode_work_per_key / std::max<std::int64_t>(1, rows * dims);
  keys = std::clamp<std::int64_t>(keys / bk * bk, std::min<std::int64_t>(512, split_kv), split_kv);
  return std::max(keys, seq_kv / max_splits + (seq_kv % max_splits != 0));
}

/// Keys per split of a key-lane (decode) item: at most split_kv, and otherwise a min_splits-th
/// of the sequence rounded up to a multiple of min_keys (at least min_keys): about min_splits
/// splits (33-64 from 16k keys until split_kv binds; 5000 keys: 20 of 256), so that one
/// sequence gives 16 cores work, about 4 splits each (a 4k-key cache had 2 splits of 2048; a
/// 32k one, 16 splits of 2048, ran about 20% slower on 16 cores than 64 of 512;
/// docs/benchmarks.md, 2026-12-06 (night)); then raised so that a sequence
/// has at most 1024 splits. Real caches never reach that cap before 2M keys (their partial
/// states stay far below the cache); zero-stride views of 2^40 keys would otherwise allocate
/// 2^29 partial states. Shapes only, never threads.
inline std::int64_t key_lane_split(const blocking& blk, std::int64_t seq_kv) noexcept {
  if (blk.split_kv <= 0) return 0;
  constexpr std::int64_t max_splits = 1024, min_splits = 64, min_keys = 256;
  const std::int64_t even = tile::round_up(seq_kv / min_splits + (seq_kv % min_splits != 0), min_keys);
  const std::int64_t split = std::min(blk.split_kv, std::max(min_keys, even));
  return std::max(split, seq_kv / max_splits + (seq_kv % max_splits != 0));
}

/// A mask spec whose mask depends on the work item (block-sparse: per sequence and head)
/// provides make_item(b, hk, seq_q, seq_kv); it runs query-lane items of one KV head only.
template <class MaskSpec>
concept per_item_mask = requires(const MaskSpec& ms) { ms.make_item(std::int64_t{}, std::int64_t{}, std::int64_t{}, std::int64_t{}); };

template <class MaskSpec>
auto make_mask(const MaskSpec& ms, std::int64_t b, std::int64_t hk, std::int64_t seq_q, std::int64_t seq_kv) {
  if constexpr (per_item_mask<MaskSpec>) {
    return ms.make_item(b, hk, seq_q, seq_kv);
  } else {
    (void)b;
    (void)hk;
    return ms.make(seq_q, seq_kv);
  }
}

struct work_item {
  std::int64_t b, hk, p0, p1, k_begin, k_end;  ///< hk: first KV head (key-lane items cover all)
  std::int64_t partial;  ///< offset of this split's state in the partial buffer, -1 if final
  bool first_split;
  bool keys;             ///< key-lane layout
};

/// A q-block cut into splits: its partial states are merged into the output in split order.
struct split_group {
  std::int64_t b, hk, nh, p0, p1, partial, nsplit, rows;  ///< rows = nh·(p1 - p0)·group
};

/// Scratch that outlives a call, one per calling thread (thread_local): the workspaces of the
/// call's OpenMP threads and the split-KV partial states. Allocated per call, they were zeroed
/// and, past the allocator's thresholds, page-faulted in again on every call: on the
/// development VM a 16-head absorbed MLA call (8192 keys) took 1.9-3.1 ms that way against
/// 1.7 ms with the scratch kept. It only grows; it is freed at thread exit or by
/// headwise::release_scratch(). Results never depend on what an earlier call left in it: what
/// a call reads it has written first, or (pad columns) does not use (workspace::reserve resets
/// q_for, the record of an earlier item).
struct call_scratch {
  std::vector<workspace> ws;
  aligned_vector<float> partial;
  bool busy = false;  ///< a call on this thread is using it (a nested call takes its own)
};
inline call_scratch& thread_scratch() {
  thread_local call_scratch scratch;
  return scratch;
}
/// Marks a scratch busy for one call.
struct scratch_claim {
  call_scratch& s;
  explicit scratch_claim(call_scratch& x) noexcept : s(x) { s.busy = true; }
  ~scratch_claim() { s.busy = false; }
  scratch_claim(const scratch_claim&) = delete;
  scratch_claim& operator=(const scratch_claim&) = delete;
};

/// Runs every work item of the problem through the mainloop.
template <class Arch, class QS, class KS, class MaskSpec, class Score>
void run(const problem<QS, KS>& pb, const MaskSpec& ms, const Score& score, const blocking& blk, int num_threads) {
  const std::int64_t g = pb.heads.group, dv = pb.dim_v, hkv = pb.heads.heads_kv;
  // Differential problems (a second key set): two row segments, query lanes only.
  constexpr bool two_keys = requires { pb.ks.k2_row(std::int64_t{}, std::int64_t{}, std::int64_t{}); };
  constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  const std::int64_t seg0 = pb.heads.segment_heads(0), seg1 = pb.heads.segment_heads(1);
  std::vector<work_item> items;
  std::vector<split_group> groups;
  std::int64_t partial_floats = 0, lanes_q = 0, rows_k = 0, max_skv = 0;
  for (std::int64_t b = 0; b < pb.batch; ++b) {
    const std::int64_t sq = pb.qs.len(b), skv = pb.ks.len(b);
    if (sq == 0) continue;
    max_skv = std::max(max_skv, skv);
    // Decode (few rows per KV head): keys across lanes, one item for all KV heads of a key
    // range, so the cache is read in address order; the key range is cut into splits.
    const bool keys = !two_keys && !per_item_mask<MaskSpec> && use_key_lanes<Arch>(g * sq);
    std::int64_t bq = keys ? sq : std::max<std::int64_t>(1, blk.rows / g);
    // Two segments: positions per item such that both segments fill whole vectors, unless that
    // would more than double the item (many signal heads per noise head: pad instead).
    if (seg1 > 0 && !keys) {
      const std::int64_t up = tile::round_up(bq, w / std::gcd(w, seg1));
      if (up * g <= 2 * std::max<std::int64_t>(blk.rows, g)) bq = up;
    }
    const std::int64_t nqb = (sq + bq - 1) / bq;
    // Items that hold all of a sequence's query rows (decode, absorbed MLA with many heads,
    // short chunks) are cut along the keys too, so that one sequence can use every thread.
    const std::int64_t split = keys ? key_lane_split(blk, skv) : query_lane_split(blk, std::min(bq, sq) * g, pb.dim_qk + dv, skv);
    const std::int64_t nsplit = (keys || nqb == 1) && split > 0 && skv > split ? skv / split + (skv % split != 0) : 1;
    if (keys) {
      rows_k = std::max(rows_k, std::min(bq, sq) * g);
    } else {
      const std::int64_t np = std::min(bq, sq);
      lanes_q = std::max(lanes_q, query_lanes<Arch>::lanes_for(np * seg0, np * seg1));
    }
    const std::int64_t nh = keys ? hkv : 1;
    for (std::int64_t hk = 0; hk < hkv; hk += nh)
      for (std::int64_t qb = nqb - 1; qb >= 0; --qb) {  // later q-blocks first: longest under causal
        const std::int64_t p0 = qb * bq, p1 = std::min(sq, p0 + bq);
        if (nsplit == 1) {
          items.push_back({b, hk, p0, p1, 0, std::numeric_limits<std::int64_t>::max(), -1, true, keys});
          continue;
        }
        const std::int64_t rows = nh * (p1 - p0) * g;
        groups.push_back({b, hk, nh, p0, p1, partial_floats, nsplit, rows});
        for (std::int64_t s = 0; s < nsplit; ++s) {
          items.push_back({b, hk, p0, p1, s * split, s + 1 < nsplit ? (s + 1) * split : skv, partial_floats,
                           s == 0, keys});
          partial_floats += rows * (dv + 1);
        }
      }
  }
  if (items.empty()) return;
  const auto n_items = static_cast<std::int64_t>(items.size());
  const int nt = resolve_threads(num_threads, n_items);
  // Tiles never exceed the longest sequence: the same cut, no scratch for keys that do not exist.
  const std::int64_t bk_q = std::clamp<std::int64_t>(max_skv, 1, blk.block_kv);
  using KV = std::remove_cv_t<std::remove_pointer_t<decltype(pb.ks.k_row(0, 0, 0))>>;
  const std::int64_t bk_k =
      std::clamp<std::int64_t>(max_skv, 1, sizeof(KV) == 2 ? blk.decode_block_kv16 : blk.decode_block_kv);
  // Sized before any work. Should a call ever start while another on this thread holds the
  // thread's scratch (nothing in headwise does that), it runs on a scratch of its own.
  call_scratch own;
  call_scratch& scratch = thread_scratch().busy ? own : thread_scratch();
  const scratch_claim claim(scratch);
  if (static_cast<int>(scratch.ws.size()) < nt) scratch.ws.resize(static_cast<std::size_t>(nt));
  std::vector<workspace>& ws = scratch.ws;
  for (int t = 0; t < nt; ++t) {
    workspace& x = ws[static_cast<std::size_t>(t)];
    if (lanes_q > 0) query_lanes<Arch>::reserve(x, lanes_q, pb.dim_qk, dv, bk_q, two_keys);
    if (rows_k > 0) key_lanes<Arch>::reserve(x, rows_k, hkv, pb.dim_qk, dv, bk_k);
  }
  if (static_cast<std::int64_t>(scratch.partial.size()) < partial_floats)
    scratch.partial.resize(static_cast<std::size_t>(partial_floats));
  aligned_vector<float>& partial = scratch.partial;

  auto run_item = [&](std::int64_t it, int thread) {
    const work_item& wi = items[static_cast<std::size_t>(it)];
    workspace& mine = ws[static_cast<std::size_t>(thread)];
    const auto mask = make_mask(ms, wi.b, wi.hk, pb.qs.len(wi.b), pb.ks.len(wi.b));
    const std::int64_t rows = (wi.p1 - wi.p0) * g;  // per KV head
    auto go = [&](auto& lay, std::int64_t bk) {
      if (wi.partial < 0) {
        attend_block<Arch>(pb, mask, score, bk, blk.prefetch_bytes, lay, wi.b, wi.hk, wi.p0, wi.p1, wi.k_begin, wi.k_end, true,
                           final_target<QS>{pb.qs, wi.b});
      } else {
        float* o = partial.data() + wi.partial;
        const std::int64_t all = rows * lay.heads();
        attend_block<Arch>(pb, mask, score, bk, blk.prefetch_bytes, lay, wi.b, wi.hk, wi.p0, wi.p1, wi.k_begin, wi.k_end, wi.first_split,
                           partial_target{o, o + all * dv, dv});
      }
    };
    if constexpr (!two_keys) {
      if (wi.keys) {
        key_lanes<Arch> lay(mine, rows, hkv, pb.dim_qk, dv, bk_k);
        go(lay, bk_k);
        return;
      }
    }
    const std::int64_t np = wi.p1 - wi.p0;
    query_lanes<Arch> lay(mine, np * seg0, np * seg1, pb.dim_qk, dv, wi.p0 == 0 && wi.p1 == pb.qs.len(wi.b));
    go(lay, bk_q);
  };
  // One thread runs the items in place, as thread 0 (inside a caller's parallel region
  // omp_get_thread_num() is the caller's index): an OpenMP region, even if(false), costs a team
  // and, with libgomp, a futex wake per call (microseconds, a large part of a short decode call).
  if (nt > 1) {
    HEADWISE_OMP(parallel for num_threads(nt) schedule(dynamic, 1))
    for (std::int64_t it = 0; it < n_items; ++it) run_item(it, thread_index());
  } else {
    for (std::int64_t it = 0; it < n_items; ++it) run_item(it, 0);
  }

  // Split-KV reduce: fold each group's partial states in split order, then write the rows.
  const auto n_groups = static_cast<std::int64_t>(groups.size());
  [[maybe_unused]] const int nt2 = resolve_threads(num_threads, n_groups);
  auto merge_group = [&](std::int64_t gi) {
    const split_group& sg = groups[static_cast<std::size_t>(gi)];
    const std::int64_t stride = sg.rows * (dv + 1);
    float* acc = partial.data() + sg.partial;  // split 0, merged in place
    float* acc_lse = acc + sg.rows * dv;
    for (std::int64_t s = 1; s < sg.nsplit; ++s) {
      const float* o = acc + s * stride;
      for (std::int64_t r = 0; r < sg.rows; ++r) merge_into(acc + r * dv, acc_lse[r], o + r * dv, o[sg.rows * dv + r], dv);
    }
    const final_target<QS> t{pb.qs, sg.b};
    const std::int64_t rows_h = (sg.p1 - sg.p0) * g;
    for (std::int64_t r = 0; r < sg.rows; ++r) {
      const auto id = pb.heads.row_of(r % rows_h, sg.p1 - sg.p0);
      const std::int64_t pos = sg.p0 + id.pos, head = pb.heads.out_head(sg.hk + r / rows_h, id.j);
      std::copy(acc + r * dv, acc + (r + 1) * dv, t.row(r, pos, head));
      t.set_lse(r, pos, head, acc_lse[r]);
    }
    t.done(sg.hk, sg.nh, sg.p0, sg.p1);
  };
  if (nt2 > 1) {
    HEADWISE_OMP(parallel for num_threads(nt2) schedule(static))
    for (std::int64_t gi = 0; gi < n_groups; ++gi) merge_group(gi);
  } else {
    for (std::int64_t gi = 0; gi < n_groups; ++gi) merge_group(gi);
  }
}

}  // namespace headwise::engine

HEADWISE_DIAGNOSTICS_POP
