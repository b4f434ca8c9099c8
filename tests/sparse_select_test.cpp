// Adaptive block selection (variants/sparse_select.hpp): FlexPrefill, MInference vertical-slash
// and XAttention builders, their statistics, the JS distance and the vertical-slash index
// builder, checked against element-level brute force (ALGORITHMS.md §6.1-6.3, §8 item 8).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numbers>
#include <random>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <headwise/variants/sparse_select.hpp>

#include "common/testing.hpp"

namespace {

using headwise::bf16;
using headwise::block_mask_builder;
using headwise::block_mask_data;
using headwise::causal_mode;
using headwise::head_map;
using headwise::tensor_view;

// ---------------------------------------------------------------------------------------------
// Inputs and mask helpers
// ---------------------------------------------------------------------------------------------

/// Contiguous BSHD q (f32) and k (f32, plus a bf16 copy on request).
struct qk_case {
  std::int64_t batch, n, hq, hkv, d;
  std::vector<float> q, k;
  qk_case(std::int64_t b, std::int64_t n_, std::int64_t hq_, std::int64_t hkv_, std::int64_t d_)
      : batch(b), n(n_), hq(hq_), hkv(hkv_), d(d_), q(static_cast<std::size_t>(b * n_ * hq_ * d_), 0.0f),
        k(static_cast<std::size_t>(b * n_ * hkv_ * d_), 0.0f) {}
  float& qa(std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t x) {
    return q[static_cast<std::size_t>(((b * n + i) * hq + h) * d + x)];
  }
  float& ka(std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t x) {
    return k[static_cast<std::size_t>(((b * n + j) * hkv + h) * d + x)];
  }
  void randomize(std::uint64_t seed, float qs = 1.0f, float ks = 1.0f) {
    hwt::fill_normal(q, seed, 0.0f, qs);
    hwt::fill_normal(k, seed + 1, 0.0f, ks);
  }
  [[nodiscard]] tensor_view<const float, 4> qv() const { return {q.data(), {batch, n, hq, d}}; }
  [[nodiscard]] tensor_view<const float, 4> kv() const { return {k.data(), {batch, n, hkv, d}}; }
  /// Rounds k to bf16 (so the f32 and bf16 runs read the same values) and returns the bf16 copy.
  std::vector<bf16> round_k_to_bf16() {
    std::vector<bf16> kb(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      kb[i] = headwise::to_bf16(k[i]);
      k[i] = headwise::to_float(kb[i]);
    }
    return kb;
  }
  [[nodiscard]] tensor_view<const bf16, 4> kv_bf16(const std::vector<bf16>& kb) const {
    return {kb.data(), {batch, n, hkv, d}};
  }
};

/// The element mask of a (seq_q == seq_kv) block mask: [b][h][i][j] = 1 iff j is in a full block
/// of i's query block, or (in a partial block or a column of it) and j <= i.
std::vector<std::uint8_t> expand(const block_mask_data& m) {
  const std::int64_t N = m.seq_q, nqb = m.num_q_blocks();
  std::vector<std::uint8_t> e(static_cast<std::size_t>(m.batch * m.heads * N * N), 0);
  for (std::int64_t b = 0; b < m.batch; ++b)
    for (std::int64_t h = 0; h < m.heads; ++h)
      for (std::int64_t qb = 0; qb < nqb; ++qb) {
        const auto s = static_cast<std::size_t>((b * m.heads + h) * nqb + qb);
        const std::int64_t p0 = qb * m.q_block, p1 = std::min(N, p0 + m.q_block);
        auto set = [&](std::int64_t j, bool causal) {
          for (std::int64_t i = p0; i < p1; ++i)
            if (!causal || j <= i) e[static_cast<std::size_t>(((b * m.heads + h) * N + i) * N + j)] = 1;
        };
        auto blocks = [&](const std::vector<std::int32_t>& num, const std::vector<std::int32_t>& idx,
                          std::int64_t width, bool causal) {
          if (num.empty()) return;
          for (std::int32_t t = 0; t < num[s]; ++t) {
            const std::int64_t kb = idx[s * static_cast<std::size_t>(width) + static_cast<std::size_t>(t)];
            for (std::int64_t j = kb * m.kv_block; j < std::min(N, (kb + 1) * m.kv_block); ++j) set(j, causal);
          }
        };
        blocks(m.kv_num_blocks, m.kv_indices, m.kv_width, true);
        blocks(m.full_kv_num_blocks, m.full_kv_indices, m.full_width, false);
        if (!m.column_count.empty())
          for (std::int32_t t = 0; t < m.column_count[s]; ++t)
            set(m.column_index[s * static_cast<std::size_t>(m.column_width) + static_cast<std::size_t>(t)], true);
      }
  return e;
}

std::vector<std::uint8_t> dense_causal(std::int64_t batch, std::int64_t heads, std::int64_t n) {
  std::vector<std::uint8_t> e(static_cast<std::size_t>(batch * heads * n * n), 0);
  for (std::int64_t bh = 0; bh < batch * heads; ++bh)
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j <= i; ++j) e[static_cast<std::size_t>((bh * n + i) * n + j)] = 1;
  return e;
}

::testing::AssertionResult SameElements(const std::vector<std::uint8_t>& got, const std::vector<std::uint8_t>& want,
                                        std::int64_t n) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  std::size_t bad = 0, first = got.size();
  for (std::size_t x = 0; x < got.size(); ++x)
    if (got[x] != want[x]) {
      if (bad++ == 0) first = x;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  const auto nn = static_cast<std::size_t>(n * n);
  return ::testing::AssertionFailure() << bad << " elements differ; first at (bh " << first / nn << ", i "
                                       << (first % nn) / static_cast<std::size_t>(n) << ", j "
                                       << first % static_cast<std::size_t>(n) << "): got " << int(got[first])
                                       << ", want " << int(want[first]);
}

/// The kept (qb, kb) blocks of (b, h) (partial and full).
std::set<std::pair<std::int64_t, std::int64_t>> blocks_of(const block_mask_data& m, std::int64_t b, std::int64_t h) {
  std::set<std::pair<std::int64_t, std::int64_t>> r;
  const std::int64_t nqb = m.num_q_blocks();
  for (std::int64_t qb = 0; qb < nqb; ++qb) {
    const auto s = static_cast<std::size_t>((b * m.heads + h) * nqb + qb);
    for (std::int32_t t = 0; t < m.kv_num_blocks[s]; ++t)
      r.insert({qb, m.kv_indices[s * static_cast<std::size_t>(m.kv_width) + static_cast<std::size_t>(t)]});
    if (!m.full_kv_num_blocks.empty())
      for (std::int32_t t = 0; t < m.full_kv_num_blocks[s]; ++t)
        r.insert({qb, m.full_kv_indices[s * static_cast<std::size_t>(m.full_width) + static_cast<std::size_t>(t)]});
  }
  return r;
}

bool same_mask(const block_mask_data& a, const block_mask_data& b) {
  return a.batch == b.batch && a.heads == b.heads && a.seq_q == b.seq_q && a.q_block == b.q_block &&
         a.kv_block == b.kv_block && a.kv_width == b.kv_width && a.full_width == b.full_width &&
         a.column_width == b.column_width && a.kv_num_blocks == b.kv_num_blocks && a.kv_indices == b.kv_indices &&
         a.full_kv_num_blocks == b.full_kv_num_blocks && a.full_kv_indices == b.full_kv_indices &&
         a.column_count == b.column_count && a.column_index == b.column_index;
}

/// Every (b, h, qb) keeps its diagonal block (at element level: (i, i) visible for all i).
::testing::AssertionResult DiagonalKept(const block_mask_data& m) {
  const auto e = expand(m);
  const std::int64_t N = m.seq_q;
  for (std::int64_t bh = 0; bh < m.batch * m.heads; ++bh)
    for (std::int64_t i = 0; i < N; ++i)
      if (!e[static_cast<std::size_t>((bh * N + i) * N + i)])
        return ::testing::AssertionFailure() << "(bh " << bh << ", i " << i << ") does not see its own key";
  return ::testing::AssertionSuccess();
}

/// Needle keys: noise N(0, 0.1²) with K[pos] = (beta, 0, ...) and (cancel) K[pos+1] = -K[pos];
/// queries (2, 0, ...) + N(0, 0.1²). Attention concentrates on the needle column.
void needles(qk_case& c, std::uint64_t seed, const std::vector<std::pair<std::int64_t, std::int64_t>>& head_pos,
             float beta, bool cancel) {
  hwt::fill_normal(c.q, seed, 0.0f, 0.1f);
  hwt::fill_normal(c.k, seed + 1, 0.0f, 0.1f);
  for (std::int64_t b = 0; b < c.batch; ++b) {
    for (std::int64_t i = 0; i < c.n; ++i)
      for (std::int64_t h = 0; h < c.hq; ++h) c.qa(b, i, h, 0) += 2.0f;
    for (const auto& [h, pos] : head_pos) {
      for (std::int64_t x = 0; x < c.d; ++x) {
        c.ka(b, pos, h, x) = x == 0 ? beta : 0.0f;
        if (cancel) c.ka(b, pos + 1, h, x) = x == 0 ? -beta : 0.0f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// JS distance and statistics
// ---------------------------------------------------------------------------------------------

TEST(sparse_select, js_distance_extremes) {
  const std::vector<double> p{0.1, 0.2, 0.3, 0.4};
  EXPECT_NEAR(headwise::js_distance(p, p), 0.0, 1e-12);
  // Filled element by element: GCC 12.2 at -O2 -march=x86-64-v4 miscompiles
  // `const std::vector<double> a{0.5, 0.5, 0.0, 0.0}` feeding this inlined loop (the SLP
  // vectorizer stores 0.5 into all four elements; -fno-tree-slp-vectorize avoids it).
  std::vector<double> a(4, 0.0), b(4, 0.0);
  a[0] = a[1] = 0.5;
  b[2] = 0.25;
  b[3] = 0.75;
  EXPECT_NEAR(headwise::js_distance(a, b), std::sqrt(std::numbers::ln2), 1e-12);
  EXPECT_NEAR(headwise::js_distance(a, b), 0.8325546, 1e-7);
  // Symmetric, and a hand value: p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4),
  // JS = ½·ln(4/3) + ½·(½ln(2/3) + ½ln 2).
  const std::vector<double> x{1.0, 0.0}, y{0.5, 0.5};
  const double js = 0.5 * std::log(4.0 / 3.0) + 0.5 * (0.5 * std::log(2.0 / 3.0) + 0.5 * std::log(2.0));
  EXPECT_NEAR(headwise::js_distance(x, y), std::sqrt(js), 1e-12);
  EXPECT_NEAR(headwise::js_distance(y, x), std::sqrt(js), 1e-12);
  // NaN in, NaN out (FlexPrefill's D < τ is then false: vertical-slash).
  std::vector<double> n(2, 0.5);
  n[0] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(std::isnan(headwise::js_distance(n, y)));
}

TEST(sparse_select, mask_stats_counts_blocks_and_columns) {
  // 1 batch, 2 heads, N = 300, blocks of 64 (nb = 5, 15 causal blocks per head).
  block_mask_builder bld(1, 2, 300, 300, 64, 64, causal_mode::bottom_right);
  for (std::int64_t qb = 0; qb < 5; ++qb) {
    for (std::int64_t kb = 0; kb <= qb; ++kb) bld.add_block(0, 0, qb, kb);  // head 0: dense
    bld.add_block(0, 1, qb, qb);                                            // head 1: diagonal ...
    for (std::int64_t j = 0; j < 65 && j < qb * 64; ++j) bld.add_column(0, 1, qb, j);  // ... + 65 columns (2 blocks)
  }
  const block_mask_data m = std::move(bld).finish();
  const auto st = headwise::mask_stats(m, causal_mode::bottom_right);
  EXPECT_EQ(st.causal_blocks, 30);
  // head 1: qb 0: 1; qb 1: 1 + ceil(64/64); qb >= 2: 1 + ceil(65/64) = 3.
  EXPECT_EQ(st.kept_blocks, 15 + 1 + 2 + 3 + 3 + 3);
  EXPECT_DOUBLE_EQ(st.selected, 27.0 / 30.0);
  EXPECT_DOUBLE_EQ(st.computational_ratio, 27.0 / (25.0 * 2.0));
  EXPECT_TRUE(st.query_aware.empty());
}

// ---------------------------------------------------------------------------------------------
// γ = 1 / threshold = 1 / budgets >= nb / sizes >= N: dense causal (§8 item 8)
// ---------------------------------------------------------------------------------------------

TEST(sparse_select, flexprefill_gamma_one_is_dense_causal) {
  struct cfg {
    std::int64_t batch, n, hq, hkv, block, min_budget;
    double tau;
    head_map map;
  };
  const cfg cfgs[] = {
      {1, 640, 2, 1, 128, 128, 1.0, head_map::interleave},   // τ = 1: every head query-aware
      {2, 640, 4, 2, 128, 128, 1e-9, head_map::interleave},  // τ tiny: vertical-slash, k = N//128+1 >= nb
      {1, 700, 2, 2, 128, 0, 1e-9, head_map::tile},          // partial last block, min_budget 0
      {2, 640, 2, 1, 128, 1024, 0.1, head_map::interleave},  // dense fallback (N <= ceil(min_budget/B)·B)
      {1, 200, 1, 1, 64, 640, 0.1, head_map::interleave},    // budgets >= nb (fallback too)
      {1, 1, 1, 1, 128, 0, 0.1, head_map::interleave},       // N == 1
  };
  for (const cfg& c : cfgs) {
    SCOPED_TRACE(::testing::Message() << "batch " << c.batch << " N " << c.n << " hq " << c.hq << " hkv " << c.hkv
                                      << " B " << c.block << " min_budget " << c.min_budget << " tau " << c.tau);
    qk_case in(c.batch, c.n, c.hq, c.hkv, 8);
    in.randomize(42, 1.0f, 1.0f);
    headwise::flexprefill_options o;
    o.gamma = 1.0;
    o.tau = c.tau;
    o.block_size = c.block;
    o.min_budget = c.min_budget;
    o.heads = c.map;
    const auto sel = headwise::flexprefill_select(in.qv(), in.kv(), o);
    EXPECT_EQ(sel.mask.heads, c.hq);
    EXPECT_EQ(sel.mask.q_block, c.block);
    EXPECT_TRUE(SameElements(expand(sel.mask), dense_causal(c.batch, c.hq, c.n), c.n));
    EXPECT_DOUBLE_EQ(sel.stats.selected, 1.0);
    EXPECT_EQ(sel.stats.kept_blocks, sel.stats.causal_blocks);
    ASSERT_EQ(sel.stats.query_aware.size(), static_cast<std::size_t>(c.batch * c.hq));
    for (auto qa : sel.stats.query_aware) {
      EXPECT_EQ(qa, c.tau == 1.0 ? 1 : 0);  // τ = 1: query-aware; τ tiny or the dense fallback: 0
    }
    const std::int64_t nb = (c.n + c.block - 1) / c.block;
    EXPECT_NEAR(sel.stats.computational_ratio,
                static_cast<double>(nb * (nb + 1) / 2) / static_cast<double>(nb * nb), 1e-12);
  }
}

TEST(sparse_select, flexprefill_budget_uses_hardcoded_128) {
  // With B = 64, γ = 1 gives k = ⌊(N+1)/128⌋ + 1 = 6 of nb = 10 blocks per pattern: not dense.
  qk_case in(1, 640, 1, 1, 8);
  in.randomize(7);
  headwise::flexprefill_options o;
  o.gamma = 1.0;
  o.tau = 1e-9;
  o.block_size = 64;
  o.min_budget = 0;
  const auto sel = headwise::flexprefill_select(in.qv(), in.kv(), o);
  EXPECT_EQ(sel.stats.query_aware[0], 0);
  EXPECT_LT(sel.stats.selected, 1.0);
  EXPECT_TRUE(DiagonalKept(sel.mask));
  // Per row at most 6 verticals + 6 slashes (block 0 and the diagonal among them).
  for (std::int64_t qb = 0; qb < 10; ++qb) {
    std::int64_t row = 0;
    for (const auto& [r, kb] : blocks_of(sel.mask, 0, 0)) row += r == qb;
    EXPECT_LE(row, 12);
  }
}

TEST(sparse_select, vertical_slash_sizes_ge_n_is_dense_causal) {
  for (const std::int64_t n : {300, 256, 65}) {
    SCOPED_TRACE(::testing::Message() << "N " << n);
    qk_case in(2, n, 2, 1, 8);
    in.randomize(3);
    headwise::vertical_slash_options o;
    o.vertical_size = n;
    o.slash_size = n;
    const auto sel = headwise::vertical_slash_select(in.qv(), in.kv(), o);
    EXPECT_EQ(sel.mask.q_block, 64);
    EXPECT_TRUE(SameElements(expand(sel.mask), dense_causal(2, 2, n), n));
    EXPECT_DOUBLE_EQ(sel.stats.selected, 1.0);
    // Only one of the two (verticals) suffices.
    o.slash_size = 0;
    o.forced_slash = 0;
    const auto sel2 = headwise::vertical_slash_select(in.qv(), in.kv(), o);
    EXPECT_TRUE(SameElements(expand(sel2.mask), dense_causal(2, 2, n), n));
  }
}

TEST(sparse_select, xattention_threshold_one_is_dense_causal) {
  for (const std::int64_t n : {512, 300}) {
    qk_case in(2, n, 2, 2, 8);
    in.randomize(5);
    headwise::xattention_options o;
    o.threshold = 1.0;
    const auto sel = headwise::xattention_select(in.qv(), in.kv(), o);
    EXPECT_TRUE(SameElements(expand(sel.mask), dense_causal(2, 2, n), n));
    EXPECT_DOUBLE_EQ(sel.stats.selected, 1.0);
  }
}

// ---------------------------------------------------------------------------------------------
// vertical_slash_index against the definition
// ---------------------------------------------------------------------------------------------

/// §6.2 by definition: row block [s_m, e_m = s_m + B) sees keys in the bands
/// [max(e_m-o, B) - B, max(e_m-o, B)) of the offsets o < e_m, and the verticals; then j <= i.
std::vector<std::uint8_t> vs_brute(std::int64_t n, std::int64_t block, const std::vector<std::int64_t>& v,
                                   const std::vector<std::int64_t>& s) {
  std::vector<std::uint8_t> e(static_cast<std::size_t>(n * n), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t e_m = (i / block) * block + block;
    for (std::int64_t j = 0; j <= i; ++j) {
      bool in = std::find(v.begin(), v.end(), j) != v.end();
      for (const std::int64_t o : s) {
        if (o >= e_m) continue;
        const std::int64_t hi = std::max(e_m - o, block);
        in = in || (hi - block <= j && j < hi);
      }
      e[static_cast<std::size_t>(i * n + j)] = in;
    }
  }
  return e;
}

TEST(sparse_select, vertical_slash_index_matches_brute_force) {
  std::mt19937_64 gen(11);
  struct cfg {
    std::int64_t n, block;
  };
  for (const cfg& c : {cfg{200, 64}, cfg{256, 64}, cfg{77, 16}, cfg{130, 7}, cfg{1, 64}, cfg{64, 64}}) {
    for (int trial = 0; trial < 6; ++trial) {
      std::uniform_int_distribution<std::int64_t> pos(0, c.n - 1);
      std::vector<std::int64_t> v, s;
      const int nv = trial == 0 ? 0 : static_cast<int>(1 + c.n / 12), ns = trial == 1 ? 0 : static_cast<int>(1 + c.n / 15);
      for (int t = 0; t < nv; ++t) v.push_back(pos(gen));
      for (int t = 0; t < ns; ++t) s.push_back(pos(gen));
      if (trial >= 2) {
        // Overlaps: verticals inside slash bands, duplicates, adjacent and large offsets.
        v.push_back(c.n - 1);
        v.push_back(v.front());
        s.push_back(0);
        s.push_back(std::min<std::int64_t>(1, c.n - 1));
        s.push_back(std::min(c.block, c.n - 1));
        s.push_back(std::min(c.block + 1, c.n - 1));
        s.push_back(c.n - 1);  // >= e_m for every block but the last ones
        if (!s.empty() && c.n > 3) v.push_back(std::max<std::int64_t>(0, c.n - 1 - s.front()));
      }
      SCOPED_TRACE(::testing::Message() << "N " << c.n << " block " << c.block << " trial " << trial << " |v| "
                                        << v.size() << " |s| " << s.size());
      block_mask_builder bld(1, 1, c.n, c.n, c.block, c.block, causal_mode::bottom_right);
      headwise::vertical_slash_index(bld, 0, 0, c.n, c.block, v, s);
      const block_mask_data m = std::move(bld).finish();
      EXPECT_TRUE(SameElements(expand(m), vs_brute(c.n, c.block, v, s), c.n));
      // Ragged band ends and verticals only as columns: fewer than 2·block per band plus the
      // verticals, per row.
      for (std::int32_t x : m.column_count)
        EXPECT_LE(x, static_cast<std::int32_t>(2 * c.block * static_cast<std::int64_t>(s.size()) +
                                                static_cast<std::int64_t>(v.size())));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// FlexPrefill's pattern decision
// ---------------------------------------------------------------------------------------------

TEST(sparse_select, flexprefill_query_aware_on_block_constant_input) {
  // Keys constant inside each 128-block, identical queries: the pooled estimate softmax(q̄·K̄ᵀ)
  // reproduces the block sums of the true attention, so D < τ.
  const std::int64_t N = 1024, d = 4;
  const float c[8] = {0.5f, -0.3f, 1.0f, 0.2f, -0.8f, 0.7f, 0.1f, -3.0f};
  qk_case in(1, N, 2, 1, d);
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t h = 0; h < 2; ++h) in.qa(0, i, h, 0) = h == 0 ? 2.0f : 1.0f;
  for (std::int64_t j = 0; j < N; ++j) in.ka(0, j, 0, 0) = c[j / 128];
  headwise::flexprefill_options o;
  o.min_budget = 128;
  const auto sel = headwise::flexprefill_select(in.qv(), in.kv(), o);
  ASSERT_EQ(sel.stats.query_aware.size(), 2u);
  EXPECT_EQ(sel.stats.query_aware[0], 1);
  EXPECT_EQ(sel.stats.query_aware[1], 1);
  EXPECT_GT(sel.stats.selected, 0.0);
  EXPECT_LE(sel.stats.selected, 1.0);
  EXPECT_LT(sel.stats.selected, 1.0);  // the global cover at γ = 0.9 leaves blocks out
  EXPECT_TRUE(DiagonalKept(sel.mask));
  for (std::int64_t qb = 0; qb < 8; ++qb) EXPECT_TRUE(blocks_of(sel.mask, 0, 0).count({qb, 0}));  // key block 0
}

TEST(sparse_select, flexprefill_vertical_slash_on_cancelling_needles) {
  // Needle pairs K[300] = -K[301] = (8, 0, 0, 0): the true attention piles onto key 300, the
  // block mean of its block cancels, so the pooled estimate is near uniform and D >= τ.
  const std::int64_t N = 1024, d = 4;
  qk_case in(1, N, 2, 1, d);
  needles(in, 21, {{0, 300}}, 8.0f, true);
  headwise::flexprefill_options o;
  o.min_budget = 384;  // min_b = 3: room for the needle block beside the forced block 0
  const auto sel = headwise::flexprefill_select(in.qv(), in.kv(), o);
  EXPECT_EQ(sel.stats.query_aware[0], 0);
  EXPECT_EQ(sel.stats.query_aware[1], 0);
  EXPECT_GT(sel.stats.selected, 0.0);
  EXPECT_LE(sel.stats.selected, 1.0);
  EXPECT_TRUE(DiagonalKept(sel.mask));
  for (std::int64_t h = 0; h < 2; ++h) {
    const auto bl = blocks_of(sel.mask, 0, h);
    for (std::int64_t qb = 2; qb < 8; ++qb) EXPECT_TRUE(bl.count({qb, 2})) << "head " << h << " qb " << qb;
  }
}

TEST(sparse_select, flexprefill_head_maps_pick_the_right_kv_head) {
  // KV head 0 has its needle in block 2, KV head 1 in block 5; max_budget 256 (2 blocks per
  // pattern) keeps each head's selection narrow enough to tell them apart.
  const std::int64_t N = 1024, d = 4;
  for (const head_map map : {head_map::interleave, head_map::tile}) {
    qk_case in(1, N, 4, 2, d);
    needles(in, 5, {{0, 300}, {1, 700}}, 8.0f, true);
    headwise::flexprefill_options o;
    o.min_budget = 128;
    o.max_budget = 256;
    o.heads = map;
    const auto sel = headwise::flexprefill_select(in.qv(), in.kv(), o);
    for (std::int64_t h = 0; h < 4; ++h) {
      const std::int64_t kvh = map == head_map::interleave ? h / 2 : h % 2;
      SCOPED_TRACE(::testing::Message() << (map == head_map::tile ? "tile" : "interleave") << " head " << h);
      EXPECT_EQ(sel.stats.query_aware[static_cast<std::size_t>(h)], 0);
      const auto bl = blocks_of(sel.mask, 0, h);
      EXPECT_EQ(bl.count({7, 2}), kvh == 0 ? 1u : 0u);
      EXPECT_EQ(bl.count({7, 5}), kvh == 1 ? 1u : 0u);
    }
  }
}

/// Top-k indices by (value descending, index ascending).
std::vector<std::int64_t> ref_top_k(const std::vector<double>& x, std::int64_t k) {
  std::vector<std::int64_t> idx(x.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<std::int64_t>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
    return x[static_cast<std::size_t>(a)] > x[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(std::min<std::int64_t>(k, static_cast<std::int64_t>(idx.size()))));
  return idx;
}

/// The softmax (double) of the last `rows` query rows of (b, qh) against k of head hk, causal
/// bottom-right, scaled 1/sqrt(d): calls f(r, pos, j, p) for every visible (row, key).
template <class F>
void ref_last_rows(qk_case& in, std::int64_t b, std::int64_t qh, std::int64_t hk, std::int64_t rows, F&& f) {
  const std::int64_t N = in.n, d = in.d;
  const double sc = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> l(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t pos = N - rows + r;
    double mx = -1e300;
    for (std::int64_t j = 0; j <= pos; ++j) {
      double x = 0;
      for (std::int64_t t = 0; t < d; ++t) x += static_cast<double>(in.qa(b, pos, qh, t)) * in.ka(b, j, hk, t);
      l[static_cast<std::size_t>(j)] = x * sc;
      mx = std::max(mx, x * sc);
    }
    double sum = 0;
    for (std::int64_t j = 0; j <= pos; ++j) sum += std::exp(l[static_cast<std::size_t>(j)] - mx);
    for (std::int64_t j = 0; j <= pos; ++j) f(r, pos, j, std::exp(l[static_cast<std::size_t>(j)] - mx) / sum);
  }
}

struct flex_ref {
  std::set<std::pair<std::int64_t, std::int64_t>> blocks;
  bool query_aware = false;
  double D = 0;
};

/// FlexPrefill's get_active_blocks for one head, in double, straight from ALGORITHMS.md §6.1.
flex_ref flex_brute(qk_case& in, std::int64_t b, std::int64_t qh, std::int64_t hk,
                    const headwise::flexprefill_options& o) {
  const std::int64_t N = in.n, d = in.d, B = o.block_size, nb = (N + B - 1) / B;
  const std::int64_t min_b = (o.min_budget + B - 1) / B;
  const std::int64_t max_b = o.max_budget == 0 ? nb : std::min((o.max_budget + B - 1) / B, nb);
  const double sc = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> av(static_cast<std::size_t>(N), 0.0), as(static_cast<std::size_t>(N), 0.0);
  ref_last_rows(in, b, qh, hk, B, [&](std::int64_t, std::int64_t pos, std::int64_t j, double p) {
    av[static_cast<std::size_t>(j)] += p / static_cast<double>(B);
    as[static_cast<std::size_t>(pos - j)] += p / static_cast<double>(B);
  });
  auto cover = [&](std::vector<double> x) {
    std::sort(x.begin(), x.end(), std::greater<>());
    double cum = 0;
    std::int64_t n = 0;
    for (double v : x) {
      cum += v;
      if (cum > o.gamma) break;
      ++n;
    }
    return n + 1;
  };
  auto clampb = [&](std::int64_t k) { return std::min(std::max(k, min_b), max_b); };
  std::int64_t k_v = clampb(cover(av) / 128 + 1), k_s = clampb(cover(as) / 128 + 1);
  std::vector<double> abar(static_cast<std::size_t>(nb), 0.0), ahat(static_cast<std::size_t>(nb));
  for (std::int64_t j = 0; j < N; ++j) abar[static_cast<std::size_t>(j / B)] += av[static_cast<std::size_t>(j)];
  std::vector<double> kbar(static_cast<std::size_t>(nb * d), 0.0), qm(static_cast<std::size_t>(d), 0.0);
  for (std::int64_t j = 0; j < N; ++j)
    for (std::int64_t t = 0; t < d; ++t)
      kbar[static_cast<std::size_t>((j / B) * d + t)] += in.ka(b, j, hk, t) / static_cast<double>(std::min(B, N - (j / B) * B));
  for (std::int64_t r = N - B; r < N; ++r)
    for (std::int64_t t = 0; t < d; ++t) qm[static_cast<std::size_t>(t)] += in.qa(b, r, qh, t) * sc / static_cast<double>(B);
  double mx = -1e300, sum = 0;
  for (std::int64_t kb = 0; kb < nb; ++kb) {
    double x = 0;
    for (std::int64_t t = 0; t < d; ++t) x += qm[static_cast<std::size_t>(t)] * kbar[static_cast<std::size_t>(kb * d + t)];
    ahat[static_cast<std::size_t>(kb)] = x;
    mx = std::max(mx, x);
  }
  for (double& x : ahat) sum += x = std::exp(x - mx);
  for (double& x : ahat) x /= sum;
  double js = 0;
  for (std::int64_t kb = 0; kb < nb; ++kb) {
    const double p = abar[static_cast<std::size_t>(kb)], q = ahat[static_cast<std::size_t>(kb)], m = 0.5 * (p + q);
    if (p > 0) js += 0.5 * p * std::log(p / m);
    if (q > 0) js += 0.5 * q * std::log(q / m);
  }
  flex_ref res;
  res.D = std::sqrt(js);
  res.query_aware = res.D < o.tau;
  if (res.query_aware) k_v = k_s = min_b;
  std::vector<double> vb = abar, sb(static_cast<std::size_t>(nb), 0.0);
  for (std::int64_t o2 = 0; o2 < N; ++o2) sb[static_cast<std::size_t>(nb - 1 - (N - 1 - o2) / B)] += as[static_cast<std::size_t>(o2)];
  vb[0] = sb[0] = std::numeric_limits<double>::infinity();
  const auto V = ref_top_k(vb, std::min(k_v, nb)), S = ref_top_k(sb, std::min(k_s, nb));
  for (std::int64_t qb = 0; qb < nb; ++qb) {
    res.blocks.insert({qb, 0});
    res.blocks.insert({qb, qb});
    for (auto v : V)
      if (v <= qb) res.blocks.insert({qb, v});
    for (auto s2 : S)
      if (qb - s2 >= 0) res.blocks.insert({qb, qb - s2});
  }
  if (res.query_aware) {
    std::vector<std::pair<double, std::int64_t>> e;
    for (std::int64_t qb = 0; qb < nb; ++qb) {
      std::vector<double> qbar(static_cast<std::size_t>(d), 0.0);
      const std::int64_t i1 = std::min(N, (qb + 1) * B);
      for (std::int64_t i = qb * B; i < i1; ++i)
        for (std::int64_t t = 0; t < d; ++t) qbar[static_cast<std::size_t>(t)] += in.qa(b, i, qh, t) / static_cast<double>(i1 - qb * B);
      std::vector<double> l(static_cast<std::size_t>(qb + 1));
      double m2 = -1e300, s2 = 0;
      for (std::int64_t kb = 0; kb <= qb; ++kb) {
        double x = 0;
        for (std::int64_t t = 0; t < d; ++t) x += qbar[static_cast<std::size_t>(t)] * kbar[static_cast<std::size_t>(kb * d + t)];
        l[static_cast<std::size_t>(kb)] = x * sc;
        m2 = std::max(m2, x * sc);
      }
      for (double& x : l) s2 += x = std::exp(x - m2);
      for (std::int64_t kb = 0; kb <= qb; ++kb) e.push_back({-l[static_cast<std::size_t>(kb)] / s2, qb * nb + kb});
    }
    std::sort(e.begin(), e.end());
    double cum = 0;
    for (const auto& [negp, flat] : e) {
      cum += -negp;
      if (cum > o.gamma * static_cast<double>(nb)) break;
      res.blocks.insert({flat / nb, flat % nb});
    }
  }
  return res;
}

TEST(sparse_select, flexprefill_matches_double_brute_force) {
  struct cfg {
    std::int64_t n, hq, hkv, d, block, min_budget, max_budget;
    double gamma, tau;
    head_map map;
  };
  const cfg cfgs[] = {
      {700, 4, 2, 8, 128, 128, 0, 0.9, 0.1, head_map::interleave},
      {1000, 4, 2, 8, 128, 384, 0, 0.95, 0.2, head_map::tile},
      {600, 2, 1, 16, 64, 64, 256, 0.9, 0.1, head_map::interleave},
      {530, 3, 3, 4, 32, 0, 0, 0.8, 0.3, head_map::interleave},
  };
  int qa = 0, vs = 0;
  for (const cfg& c : cfgs) {
    SCOPED_TRACE(::testing::Message() << "N " << c.n << " hq " << c.hq << " hkv " << c.hkv << " d " << c.d << " B "
                                      << c.block << " budgets [" << c.min_budget << ", " << c.max_budget << "] gamma "
                                      << c.gamma << " tau " << c.tau);
    qk_case in(2, c.n, c.hq, c.hkv, c.d);
    in.randomize(1234 + static_cast<std::uint64_t>(c.n));
    // Per head a different logit scale: flat heads (query-aware) to peaked ones (vertical-slash).
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t i = 0; i < c.n; ++i)
        for (std::int64_t h = 0; h < c.hq; ++h)
          for (std::int64_t t = 0; t < c.d; ++t) in.qa(b, i, h, t) *= 0.15f + 1.2f * static_cast<float>(h + b);
    headwise::flexprefill_options o;
    o.gamma = c.gamma;
    o.tau = c.tau;
    o.block_size = c.block;
    o.min_budget = c.min_budget;
    o.max_budget = c.max_budget;
    o.heads = c.map;
    const auto sel = headwise::flexprefill_select(in.qv(), in.kv(), o);
    const auto hm = headwise::engine::head_mapper::make(c.map, c.hq, c.hkv);
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t h = 0; h < hm.heads_out; ++h) {
        const std::int64_t hk = c.map == head_map::interleave ? h / hm.group : h % c.hkv;
        const flex_ref want = flex_brute(in, b, hm.q_head(h), hk, o);
        ASSERT_GT(std::abs(want.D - c.tau), 1e-4) << "input too close to the decision boundary";
        EXPECT_EQ(sel.stats.query_aware[static_cast<std::size_t>(b * hm.heads_out + h)], want.query_aware ? 1 : 0)
            << "b " << b << " h " << h << " D " << want.D;
        EXPECT_EQ(blocks_of(sel.mask, b, h), want.blocks) << "b " << b << " h " << h << " D " << want.D;
        (want.query_aware ? qa : vs) += 1;
      }
  }
  EXPECT_GT(qa, 0);  // both branches exercised
  EXPECT_GT(vs, 0);
}

/// vertical_and_slash_kernel's estimate in double, then the index by definition (vs_brute).
std::vector<std::uint8_t> vs_select_brute(qk_case& in, std::int64_t b, std::int64_t qh, std::int64_t hk,
                                          const headwise::vertical_slash_options& o) {
  const std::int64_t N = in.n, R = std::min(o.last_q, N);
  std::vector<double> col(static_cast<std::size_t>(N), 0.0), diag(static_cast<std::size_t>(N), 0.0);
  ref_last_rows(in, b, qh, hk, R, [&](std::int64_t, std::int64_t pos, std::int64_t j, double p) {
    col[static_cast<std::size_t>(j)] += p;
    diag[static_cast<std::size_t>(pos - j)] += p;
  });
  const double inf = std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < std::min(o.forced_vertical, N); ++j) col[static_cast<std::size_t>(j)] = inf;
  for (std::int64_t j = 0; j < std::min(o.forced_slash, N); ++j) diag[static_cast<std::size_t>(j)] = inf;
  const auto v = ref_top_k(col, std::min(N, std::max<std::int64_t>(o.vertical_size, 30)));
  auto s = ref_top_k(diag, std::min(N, std::max<std::int64_t>(o.slash_size, 50)));
  s.push_back(0);  // the diagonal, always
  return vs_brute(N, o.block, v, s);
}

TEST(sparse_select, vertical_slash_matches_double_brute_force) {
  struct cfg {
    std::int64_t n, hq, hkv, d, vsize, ssize, last_q, block, fv, fs;
  };
  for (const cfg& c : {cfg{300, 2, 1, 8, 20, 10, 64, 64, 30, 100}, cfg{257, 2, 2, 4, 40, 60, 17, 32, 3, 5},
                      cfg{200, 4, 2, 8, 35, 55, 300, 16, 0, 0}}) {
    SCOPED_TRACE(::testing::Message() << "N " << c.n << " hq " << c.hq << " hkv " << c.hkv << " sizes (" << c.vsize
                                      << ", " << c.ssize << ") last_q " << c.last_q << " block " << c.block
                                      << " forced (" << c.fv << ", " << c.fs << ")");
    qk_case in(2, c.n, c.hq, c.hkv, c.d);
    in.randomize(99 + static_cast<std::uint64_t>(c.n), 1.5f, 1.0f);
    headwise::vertical_slash_options o;
    o.vertical_size = c.vsize;
    o.slash_size = c.ssize;
    o.last_q = c.last_q;
    o.block = c.block;
    o.forced_vertical = c.fv;
    o.forced_slash = c.fs;
    const auto sel = headwise::vertical_slash_select(in.qv(), in.kv(), o);
    const auto got = expand(sel.mask);
    const std::int64_t N = c.n, g = c.hq / c.hkv;
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t h = 0; h < c.hq; ++h) {
        const auto want = vs_select_brute(in, b, h, h / g, o);
        const auto off = static_cast<std::ptrdiff_t>((b * c.hq + h) * N * N);
        const std::vector<std::uint8_t> mine(got.begin() + off, got.begin() + off + N * N);
        EXPECT_TRUE(SameElements(mine, want, N)) << "b " << b << " h " << h;
      }
    // Not trivially dense: some causal elements are left out.
    const auto dense = dense_causal(2, c.hq, N);
    EXPECT_LT(std::count(got.begin(), got.end(), 1), std::count(dense.begin(), dense.end(), 1));
    EXPECT_TRUE(DiagonalKept(sel.mask));
  }
}

// ---------------------------------------------------------------------------------------------
// XAttention
// ---------------------------------------------------------------------------------------------

/// W[qb][kb] by the formula of §6.3, in double, for one (b, query head, KV head).
std::vector<double> xattn_brute_W(qk_case& in, std::int64_t b, std::int64_t qh, std::int64_t hk, std::int64_t block,
                                  std::int64_t S) {
  const std::int64_t N = in.n, d = in.d, bs = block / S, Rn = (N + S - 1) / S, nb = (N + block - 1) / block;
  auto qa = [&](std::int64_t i, std::int64_t x) { return i < N ? static_cast<double>(in.qa(b, i, qh, x)) : 0.0; };
  auto ka = [&](std::int64_t j, std::int64_t x) { return j < N ? static_cast<double>(in.ka(b, j, hk, x)) : 0.0; };
  std::vector<double> W(static_cast<std::size_t>(nb * nb), 0.0), a(static_cast<std::size_t>(Rn));
  for (std::int64_t r = 0; r < Rn; ++r) {
    double mx = -1e300;
    for (std::int64_t c = 0; c <= r; ++c) {
      double x = 0;
      for (std::int64_t j = 0; j < S; ++j)
        for (std::int64_t t = 0; t < d; ++t) x += qa(r * S + S - 1 - j, t) * ka(c * S + j, t);
      a[static_cast<std::size_t>(c)] = x / (std::sqrt(static_cast<double>(d)) * static_cast<double>(S));
      mx = std::max(mx, a[static_cast<std::size_t>(c)]);
    }
    double sum = 0;
    for (std::int64_t c = 0; c <= r; ++c) sum += std::exp(a[static_cast<std::size_t>(c)] - mx);
    for (std::int64_t c = 0; c <= r; ++c)
      W[static_cast<std::size_t>((r / bs) * nb + c / bs)] += std::exp(a[static_cast<std::size_t>(c)] - mx) / sum;
  }
  return W;
}

/// find_blocks_chunked by the spec: block 0 and the diagonal, then by descending W while the
/// mass before the block is < τ·ΣW.
std::set<std::int64_t> xattn_brute_choose(const std::vector<double>& W, std::int64_t nb, std::int64_t qb, double tau) {
  std::set<std::int64_t> keep{0, qb};
  double total = 0;
  for (std::int64_t kb = 0; kb <= qb; ++kb) total += W[static_cast<std::size_t>(qb * nb + kb)];
  double cum = W[static_cast<std::size_t>(qb * nb)] + (qb > 0 ? W[static_cast<std::size_t>(qb * nb + qb)] : 0.0);
  std::vector<std::pair<double, std::int64_t>> rest;
  for (std::int64_t kb = 1; kb < qb; ++kb) rest.push_back({-W[static_cast<std::size_t>(qb * nb + kb)], kb});
  std::sort(rest.begin(), rest.end());
  for (const auto& [negw, kb] : rest) {
    if (!(cum < tau * total)) break;
    keep.insert(kb);
    cum += -negw;
  }
  return keep;
}

TEST(sparse_select, xattention_antidiagonal_scores_match_brute_force) {
  using Arch = headwise::tile::default_arch;
  namespace ss = headwise::detail::sparse_select;
  struct cfg {
    std::int64_t n, hq, hkv, d, block, stride;
  };
  for (const cfg& c : {cfg{40, 1, 1, 3, 8, 4}, cfg{93, 2, 1, 5, 16, 4}, cfg{128, 2, 2, 4, 32, 8}, cfg{50, 1, 1, 2, 6, 3},
                      cfg{64, 3, 1, 4, 16, 16}}) {
    SCOPED_TRACE(::testing::Message() << "N " << c.n << " hq " << c.hq << " hkv " << c.hkv << " d " << c.d << " block "
                                      << c.block << " stride " << c.stride);
    qk_case in(2, c.n, c.hq, c.hkv, c.d);
    in.randomize(17, 1.5f, 1.5f);
    const auto hm = headwise::engine::head_mapper::make(head_map::interleave, c.hq, c.hkv);
    const std::int64_t nb = (c.n + c.block - 1) / c.block;
    ss::scratch<Arch> ws;
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t hk = 0; hk < c.hkv; ++hk) {
        std::vector<std::int64_t> outs, qheads;
        ss::group_heads(hm, hk, outs, qheads);
        std::vector<std::vector<double>> want;
        for (const std::int64_t qh : qheads) want.push_back(xattn_brute_W(in, b, qh, hk, c.block, c.stride));
        std::int64_t rows = 0;
        ss::xattn_item<Arch, float>(ws, in.qv(), in.kv(), b, hk, qheads, c.block, c.stride,
                                    [&](std::int64_t jh, std::int64_t qb, std::span<const double> W) {
                                      ++rows;
                                      ASSERT_EQ(W.size(), static_cast<std::size_t>(qb + 1));
                                      for (std::int64_t kb = 0; kb <= qb; ++kb)
                                        EXPECT_NEAR(W[static_cast<std::size_t>(kb)],
                                                    want[static_cast<std::size_t>(jh)][static_cast<std::size_t>(qb * nb + kb)],
                                                    2e-5)
                                            << "b " << b << " head " << jh << " qb " << qb << " kb " << kb;
                                    });
        EXPECT_EQ(rows, nb * static_cast<std::int64_t>(qheads.size()));
      }
    // The selection against the spec's rule on the brute-force W.
    for (const double tau : {0.3, 0.6, 0.9, 0.97}) {
      headwise::xattention_options o;
      o.block = c.block;
      o.stride = c.stride;
      o.threshold = tau;
      const auto sel = headwise::xattention_select(in.qv(), in.kv(), o);
      EXPECT_TRUE(DiagonalKept(sel.mask));
      for (std::int64_t b = 0; b < 2; ++b)
        for (std::int64_t h = 0; h < c.hq; ++h) {
          const auto W = xattn_brute_W(in, b, h, hm.heads_kv == c.hq ? h : h / (c.hq / c.hkv), c.block, c.stride);
          std::set<std::pair<std::int64_t, std::int64_t>> want;
          for (std::int64_t qb = 0; qb < nb; ++qb)
            for (const std::int64_t kb : xattn_brute_choose(W, nb, qb, tau)) want.insert({qb, kb});
          EXPECT_EQ(blocks_of(sel.mask, b, h), want) << "tau " << tau << " b " << b << " h " << h;
        }
    }
  }
}

/// q_i = k_i = α(cos θ_i, sin θ_i), θ_i = π·i/N: logits fall with |i - j|, attention is local.
qk_case local_input(std::int64_t n, std::int64_t heads, float alpha) {
  qk_case in(1, n, heads, heads, 2);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t h = 0; h < heads; ++h) {
      const double th = std::numbers::pi * static_cast<double>(i) / static_cast<double>(n);
      in.qa(0, i, h, 0) = in.ka(0, i, h, 0) = alpha * static_cast<float>(std::cos(th));
      in.qa(0, i, h, 1) = in.ka(0, i, h, 1) = alpha * static_cast<float>(std::sin(th));
    }
  return in;
}

TEST(sparse_select, xattention_local_input_keeps_few_blocks) {
  const std::int64_t N = 2048;
  qk_case in = local_input(N, 2, 14.0f);
  headwise::xattention_options o;  // block 128, stride 8, τ = 0.9
  const auto sel = headwise::xattention_select(in.qv(), in.kv(), o);
  const std::int64_t nb = N / 128;
  EXPECT_EQ(sel.stats.causal_blocks, 2 * nb * (nb + 1) / 2);
  EXPECT_LT(sel.stats.selected, 0.35) << "kept " << sel.stats.kept_blocks;
  EXPECT_TRUE(DiagonalKept(sel.mask));
  for (std::int64_t h = 0; h < 2; ++h)
    for (const auto& [qb, kb] : blocks_of(sel.mask, 0, h))
      EXPECT_TRUE(kb == 0 || kb == qb || kb == qb - 1) << "h " << h << " (" << qb << ", " << kb << ")";
}

// ---------------------------------------------------------------------------------------------
// Vertical-slash estimation, dtypes, threads
// ---------------------------------------------------------------------------------------------

TEST(sparse_select, vertical_slash_estimate_finds_needle_column) {
  const std::int64_t N = 512;
  qk_case in(1, N, 2, 1, 4);
  needles(in, 8, {{0, 300}}, 8.0f, false);
  headwise::vertical_slash_options o;
  o.vertical_size = 8;  // floored to 30
  o.forced_vertical = 4;
  o.slash_size = 0;  // floored to 50
  o.forced_slash = 8;
  const auto sel = headwise::vertical_slash_select(in.qv(), in.kv(), o);
  const auto e = expand(sel.mask);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 300; i < N; ++i)
      ASSERT_TRUE(e[static_cast<std::size_t>((h * N + i) * N + 300)]) << "h " << h << " i " << i;
  EXPECT_TRUE(DiagonalKept(sel.mask));
  EXPECT_GT(sel.stats.selected, 0.0);
  EXPECT_LT(sel.stats.selected, 1.0);
  // The forced first columns are visible to every row that can see them.
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t j = 0; j < std::min<std::int64_t>(4, i + 1); ++j)
      EXPECT_TRUE(e[static_cast<std::size_t>(i * N + j)]) << "i " << i << " j " << j;
}

TEST(sparse_select, sparse_bf16_keys_select_like_f32) {
  {  // FlexPrefill, needle input
    qk_case in(1, 1024, 2, 1, 4);
    needles(in, 31, {{0, 300}}, 8.0f, true);
    const auto kb = in.round_k_to_bf16();
    headwise::flexprefill_options o;
    o.min_budget = 384;
    const auto a = headwise::flexprefill_select(in.qv(), in.kv(), o);
    const auto b = headwise::flexprefill_select(in.qv(), in.kv_bf16(kb), o);
    EXPECT_TRUE(same_mask(a.mask, b.mask));
    EXPECT_EQ(a.stats.query_aware, b.stats.query_aware);
  }
  {  // vertical-slash, needle input
    qk_case in(1, 512, 2, 1, 4);
    needles(in, 8, {{0, 300}}, 8.0f, false);
    const auto kb = in.round_k_to_bf16();
    headwise::vertical_slash_options o;
    o.vertical_size = 40;
    o.slash_size = 60;
    const auto a = headwise::vertical_slash_select(in.qv(), in.kv(), o);
    const auto b = headwise::vertical_slash_select(in.qv(), in.kv_bf16(kb), o);
    EXPECT_TRUE(same_mask(a.mask, b.mask));
  }
  {  // XAttention, local input
    qk_case in = local_input(1024, 2, 14.0f);
    const auto kb = in.round_k_to_bf16();
    const auto a = headwise::xattention_select(in.qv(), in.kv());
    const auto b = headwise::xattention_select(in.qv(), in.kv_bf16(kb));
    EXPECT_TRUE(same_mask(a.mask, b.mask));
    EXPECT_LT(b.stats.selected, 0.6);
  }
}

TEST(sparse_select, sparse_thread_count_does_not_change_masks) {
  qk_case in(2, 640, 4, 2, 8);
  in.randomize(77, 1.0f, 1.0f);
  headwise::flexprefill_options fo;
  fo.min_budget = 128;
  headwise::vertical_slash_options vo;
  vo.vertical_size = 40;
  vo.slash_size = 60;
  headwise::xattention_options xo;
  xo.block = 64;
  block_mask_data f1, v1, x1;
  for (const int nt : {1, 2, 3}) {
    fo.num_threads = vo.num_threads = xo.num_threads = nt;
    const auto f = headwise::flexprefill_select(in.qv(), in.kv(), fo);
    const auto v = headwise::vertical_slash_select(in.qv(), in.kv(), vo);
    const auto x = headwise::xattention_select(in.qv(), in.kv(), xo);
    if (nt == 1) {
      f1 = f.mask;
      v1 = v.mask;
      x1 = x.mask;
      continue;
    }
    EXPECT_TRUE(same_mask(f.mask, f1)) << nt;
    EXPECT_TRUE(same_mask(v.mask, v1)) << nt;
    EXPECT_TRUE(same_mask(x.mask, x1)) << nt;
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

TEST(sparse_select, sparse_bad_inputs_throw_argument_error) {
  using hwt::ThrowsArgumentError;
  qk_case in(1, 300, 4, 2, 8);
  in.randomize(1);
  const auto q = in.qv();
  const auto k = in.kv();
  auto flex = [&](auto edit) {
    return [&, edit] {
      headwise::flexprefill_options o;
      edit(o);
      (void)headwise::flexprefill_select(q, k, o);
    };
  };
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.gamma = 0.0; }), "options.gamma"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.gamma = 1.5; }), "options.gamma"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.gamma = std::nan(""); }), "options.gamma"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.tau = 0.0; }), "options.tau"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.tau = 2.0; }), "options.tau"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.min_budget = -1; }), "options.min_budget"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.max_budget = -5; }), "options.max_budget"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.block_size = 0; }), "options.block_size"));
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.block_size = 2048; }), "options.block_size"));  // executor max 1024
  EXPECT_TRUE(ThrowsArgumentError(flex([](auto& o) { o.num_threads = -1; }), "options.num_threads"));

  auto vs = [&](auto edit) {
    return [&, edit] {
      headwise::vertical_slash_options o;
      edit(o);
      (void)headwise::vertical_slash_select(q, k, o);
    };
  };
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.vertical_size = -1; }), "options.vertical_size"));
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.slash_size = -1; }), "options.slash_size"));
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.last_q = 0; }), "options.last_q"));
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.block = 0; }), "options.block"));
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.block = 1025; }), "options.block"));
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.forced_vertical = -1; }), "options.forced_vertical"));
  EXPECT_TRUE(ThrowsArgumentError(vs([](auto& o) { o.forced_slash = -1; }), "options.forced_slash"));

  auto xa = [&](auto edit) {
    return [&, edit] {
      headwise::xattention_options o;
      edit(o);
      (void)headwise::xattention_select(q, k, o);
    };
  };
  EXPECT_TRUE(ThrowsArgumentError(xa([](auto& o) { o.block = 0; }), "options.block"));
  EXPECT_TRUE(ThrowsArgumentError(xa([](auto& o) { o.block = 2048; }), "options.block"));
  EXPECT_TRUE(ThrowsArgumentError(xa([](auto& o) { o.stride = 0; }), "options.stride"));
  EXPECT_TRUE(ThrowsArgumentError(xa([](auto& o) { o.stride = 3; }), "options.stride"));  // 128 % 3 != 0
  EXPECT_TRUE(ThrowsArgumentError(xa([](auto& o) { o.threshold = 0.0; }), "options.threshold"));
  EXPECT_TRUE(ThrowsArgumentError(xa([](auto& o) { o.threshold = 1.01; }), "options.threshold"));

  // Tensor arguments, for each selector.
  qk_case shorter(1, 299, 4, 2, 8);
  qk_case heads3(1, 300, 3, 2, 8);
  qk_case tile_bad(1, 300, 4, 3, 8);
  qk_case dim(1, 300, 4, 2, 8);
  const tensor_view<const float, 4> k_dim(dim.k.data(), {1, 300, 2, 4});
  auto each = [&](auto q_, auto k_, headwise::head_map map, const std::string& arg) {
    headwise::flexprefill_options fo;
    fo.heads = map;
    headwise::vertical_slash_options vo;
    vo.heads = map;
    headwise::xattention_options xo;
    xo.heads = map;
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)headwise::flexprefill_select(q_, k_, fo); }, arg));
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)headwise::vertical_slash_select(q_, k_, vo); }, arg));
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)headwise::xattention_select(q_, k_, xo); }, arg));
  };
  each(q, shorter.kv(), head_map::interleave, "q.shape[1]");
  each(shorter.qv(), k, head_map::interleave, "q.shape[1]");
  each(heads3.qv(), heads3.kv(), head_map::interleave, "k.shape[2]");
  each(tile_bad.qv(), tile_bad.kv(), head_map::tile, "k.shape[2]");
  each(q, k_dim, head_map::interleave, "k.shape[3]");
  const tensor_view<const float, 4> null_q(nullptr, {1, 300, 4, 8});
  each(null_q, k, head_map::interleave, "q.data");

  // vertical_slash_index and js_distance.
  block_mask_builder bld(1, 1, 100, 100, 16, 16, causal_mode::bottom_right);
  const std::vector<std::int64_t> ok{1, 2}, neg{3, -1}, big{100};
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::vertical_slash_index(bld, 0, 0, 100, 16, big, ok); }, "vertical[0]"));
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::vertical_slash_index(bld, 0, 0, 100, 16, ok, neg); }, "slash[1]"));
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::vertical_slash_index(bld, 0, 0, 100, 0, ok, ok); }, "block"));
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::vertical_slash_index(bld, 0, 0, 100, 32, ok, ok); }, "builder"));
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::vertical_slash_index(bld, 0, 0, -1, 16, ok, ok); }, "seq"));
  const std::vector<double> p2{0.5, 0.5}, p3{0.2, 0.3, 0.5};
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)headwise::js_distance(p2, p3); }, "q"));
}

}  // namespace
