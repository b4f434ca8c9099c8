/// @file
/// @brief The scheduler: the one place that uses OpenMP. Work items are (batch, KV head,
/// q-block); each computes whole output rows, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "mainloop.hpp"

#if defined(_OPENMP)
#include <omp.h>
#define HEADWISE_PRAGMA_(x) _Pragma(#x)
#define HEADWISE_OMP(...) HEADWISE_PRAGMA_(omp __VA_ARGS__)
#else
#define HEADWISE_OMP(...)
#endif

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

/// Runs every work item of the problem through the mainloop.
template <class Arch, class KV, class Mask, class Score>
void run(const problem<KV>& pb, const Mask& mask, const Score& score, const blocking& blk, int num_threads) {
  const std::int64_t bq = positions_per_block(blk, pb.heads.group);
  const std::int64_t nqb = (pb.seq_q + bq - 1) / bq;
  const std::int64_t items = pb.batch * pb.heads.heads_kv * nqb;
  if (items == 0) return;
  const int nt = resolve_threads(num_threads, items);
  constexpr std::int64_t w = tile::arch_traits<Arch>::lanes;
  const std::int64_t lanes = (bq * pb.heads.group + w - 1) / w * w;
  std::vector<workspace> ws(static_cast<std::size_t>(nt));  // allocated before any work
  for (auto& x : ws) x.reserve(lanes, pb.dim_qk, pb.dim_v, blk.block_kv, !std::is_same_v<KV, float>);

  HEADWISE_OMP(parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1))
  for (std::int64_t it = 0; it < items; ++it) {
#if defined(_OPENMP)
    workspace& mine = ws[static_cast<std::size_t>(omp_get_thread_num())];
#else
    workspace& mine = ws[0];
#endif
    // Later q-blocks first: under causal masks they cost the most (longest-first balance).
    const std::int64_t qb = nqb - 1 - it % nqb;
    const std::int64_t rest = it / nqb;
    const std::int64_t hk = rest % pb.heads.heads_kv;
    const std::int64_t b = rest / pb.heads.heads_kv;
    const std::int64_t p0 = qb * bq;
    const std::int64_t p1 = std::min(pb.seq_q, p0 + bq);
    attend_block<Arch>(pb, mask, score, blk, mine, b, hk, p0, p1);
  }
}

}  // namespace headwise::engine
