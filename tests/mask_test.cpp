// engine::band_mask (and no_mask): the KV tiles a block of query positions visits, checked
// against brute force over random configurations.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <headwise/reference/attention.hpp>

#include "common/testing.hpp"

namespace {

using headwise::attention_options;
using headwise::causal_mode;
using headwise::engine::band_mask;
using headwise::engine::no_mask;

struct tile_rec {
  std::int64_t a, n;
  bool full;
};

template <class Mask>
std::vector<tile_rec> tiles_of(const Mask& m, std::int64_t p0, std::int64_t p1, std::int64_t block_kv) {
  std::vector<tile_rec> t;
  m.for_each_tile(p0, p1, 0, std::numeric_limits<std::int64_t>::max(), block_kv, [&](std::int64_t a, std::int64_t n, bool full) { t.push_back({a, n, full}); });
  return t;
}

std::string describe(const band_mask& m, std::int64_t p0, std::int64_t p1, std::int64_t block_kv) {
  std::ostringstream os;
  os << "band{seq_kv " << m.seq_kv << ", offset " << m.offset << ", left " << m.left << ", right " << m.right
     << ", sinks " << m.sink_tokens << "} block [" << p0 << ", " << p1 << ") block_kv " << block_kv;
  return os.str();
}

/// Checks the tile walk of one block against a visibility predicate vis(i, j).
template <class Vis>
::testing::AssertionResult check_block(const band_mask& m, std::int64_t p0, std::int64_t p1, std::int64_t block_kv,
                                       Vis&& vis) {
  const std::vector<tile_rec> tiles = tiles_of(m, p0, p1, block_kv);
  const std::int64_t skv = m.seq_kv;
  std::vector<char> covered(static_cast<std::size_t>(skv), 0);
  std::int64_t prev_end = 0;
  for (const tile_rec& t : tiles) {
    if (t.n < 1 || t.n > block_kv)
      return ::testing::AssertionFailure() << "tile [" << t.a << ", +" << t.n << ") has a bad size";
    if (t.a < prev_end)
      return ::testing::AssertionFailure() << "tile at " << t.a << " overlaps or precedes the previous (end "
                                           << prev_end << ")";
    if (t.a < 0 || t.a + t.n > skv)
      return ::testing::AssertionFailure() << "tile [" << t.a << ", " << t.a + t.n << ") outside [0, " << skv << ")";
    prev_end = t.a + t.n;
    for (std::int64_t j = t.a; j < t.a + t.n; ++j) covered[static_cast<std::size_t>(j)] = 1;
    if (t.full)
      for (std::int64_t i = p0; i < p1; ++i)
        for (std::int64_t j = t.a; j < t.a + t.n; ++j)
          if (!vis(i, j))
            return ::testing::AssertionFailure() << "tile [" << t.a << ", " << t.a + t.n << ") marked full but key "
                                                 << j << " is hidden from query " << i;
  }
  std::int64_t union_size = 0;
  for (std::int64_t j = 0; j < skv; ++j) {
    bool any = false;
    for (std::int64_t i = p0; i < p1 && !any; ++i) any = vis(i, j);
    union_size += any;
    if (any != (covered[static_cast<std::size_t>(j)] != 0))
      return ::testing::AssertionFailure() << "key " << j << (any ? " is visible to the block but not visited"
                                                                    : " is visited but hidden from every query");
  }
  // No gratuitous fragmentation: each of at most two visited intervals is cut at most at three
  // points where "full" may change.
  const std::int64_t max_tiles = (union_size + block_kv - 1) / block_kv + 8;
  if (static_cast<std::int64_t>(tiles.size()) > max_tiles)
    return ::testing::AssertionFailure() << tiles.size() << " tiles for " << union_size << " keys";
  return ::testing::AssertionSuccess();
}

/// The band's own definition, written out independently.
bool band_visible(const band_mask& m, std::int64_t i, std::int64_t j) {
  if (j < 0 || j >= m.seq_kv) return false;
  const std::int64_t d = i + m.offset;
  if (m.right >= 0 && j > d + m.right) return false;
  if (m.left >= 0 && j < d - m.left && j >= m.sink_tokens) return false;
  return true;
}

std::int64_t pick(std::mt19937_64& g, std::int64_t lo, std::int64_t hi) {  // inclusive
  return lo + static_cast<std::int64_t>(g() % static_cast<std::uint64_t>(hi - lo + 1));
}

std::int64_t pick_block_kv(std::mt19937_64& g) {
  const std::int64_t choices[] = {1, 2, 3, 7, 16, 64, 200};
  return g() % 4 == 0 ? pick(g, 1, 100) : choices[g() % 7];
}

class BandMaskRandom : public ::testing::TestWithParam<int> {};

TEST_P(BandMaskRandom, RawBandsMatchBruteForce) {
  // Arbitrary offsets (either sign), windows, sinks and blocks.
  std::mt19937_64 g(1000 + static_cast<std::uint64_t>(GetParam()));
  for (int it = 0; it < 400; ++it) {
    band_mask m;
    m.seq_kv = pick(g, 0, 260);
    const std::int64_t seq_q = pick(g, 1, 260);
    m.offset = pick(g, -300, 300);
    m.left = g() % 3 == 0 ? -1 : pick(g, 0, 150);
    m.right = g() % 3 == 0 ? -1 : pick(g, 0, 150);
    m.sink_tokens = g() % 2 ? 0 : pick(g, 0, 300);
    const std::int64_t block_kv = pick_block_kv(g);
    const std::int64_t p0 = pick(g, 0, seq_q - 1), p1 = pick(g, p0 + 1, std::min(seq_q, p0 + 80));
    // lane_bounds agrees with the definition.
    for (std::int64_t i = p0; i < p1; ++i) {
      const auto kb = m.lane_bounds(i);
      for (std::int64_t j = 0; j < m.seq_kv; ++j) {
        const bool by_bounds = j <= kb.hi && (j >= kb.lo || j < m.sinks());
        ASSERT_EQ(by_bounds, band_visible(m, i, j)) << describe(m, p0, p1, block_kv) << " i " << i << " j " << j;
      }
    }
    ASSERT_TRUE(check_block(m, p0, p1, block_kv, [&](std::int64_t i, std::int64_t j) { return band_visible(m, i, j); }))
        << describe(m, p0, p1, block_kv);
  }
}

TEST_P(BandMaskRandom, OptionBandsMatchReferenceVisibility) {
  // Bands built from attention_options exactly as headwise::attention builds them, checked
  // against reference::visible (the semantics the fp64 reference uses).
  std::mt19937_64 g(2000 + static_cast<std::uint64_t>(GetParam()));
  const causal_mode modes[] = {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left};
  for (int it = 0; it < 400; ++it) {
    attention_options o;
    o.causal = modes[g() % 3];
    const std::int64_t seq_q = pick(g, 1, 260), seq_kv = pick(g, 0, 260);
    o.window_left = g() % 3 == 0 ? -1 : pick(g, 0, 120);
    if (o.causal == causal_mode::none) o.window_right = g() % 3 == 0 ? -1 : pick(g, 0, 120);
    else o.window_right = g() % 2 ? -1 : 0;
    // A band is only used when something bounds it; sinks matter only with a left window.
    if (o.causal == causal_mode::none && o.window_left < 0 && o.window_right < 0) o.window_left = pick(g, 0, 50);
    o.sink_tokens = g() % 2 ? 0 : pick(g, 0, 280);
    const band_mask m = headwise::detail::make_band(o).make(seq_q, seq_kv);
    const std::int64_t block_kv = pick_block_kv(g);
    const std::int64_t p0 = pick(g, 0, seq_q - 1), p1 = pick(g, p0 + 1, std::min(seq_q, p0 + 80));
    auto vis = [&](std::int64_t i, std::int64_t j) { return headwise::reference::visible(o, i, j, seq_q, seq_kv); };
    for (std::int64_t i = p0; i < p1; ++i)
      for (std::int64_t j = 0; j < seq_kv; ++j)
        ASSERT_EQ(band_visible(m, i, j), vis(i, j)) << hwt::options_str(o) << " sq " << seq_q << " i " << i << " j " << j;
    ASSERT_TRUE(check_block(m, p0, p1, block_kv, vis)) << hwt::options_str(o) << " seq_q " << seq_q << " "
                                                       << describe(m, p0, p1, block_kv);
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, BandMaskRandom, ::testing::Range(0, 6),
                         [](const ::testing::TestParamInfo<int>& info) { return "seed" + std::to_string(info.param); });

TEST(BandMask, WholeRangeOfEveryBlockPartition) {
  // For fixed configurations, walking every block of a partition of [0, seq_q) visits, per
  // query, a superset of its visible keys, and the full tiles are correct (exhaustive).
  const std::int64_t seq_q = 77, seq_kv = 133;
  for (const causal_mode c : {causal_mode::bottom_right, causal_mode::top_left})
    for (const std::int64_t left : {-1, 0, 5, 40})
      for (const std::int64_t sinks : {0, 3})
        for (const std::int64_t bq : {1, 4, 16, 77})
          for (const std::int64_t block_kv : {1, 8, 64}) {
            attention_options o;
            o.causal = c;
            o.window_left = left;
            o.sink_tokens = sinks;
            const band_mask m = headwise::detail::make_band(o).make(seq_q, seq_kv);
            for (std::int64_t p0 = 0; p0 < seq_q; p0 += bq) {
              const std::int64_t p1 = std::min(seq_q, p0 + bq);
              ASSERT_TRUE(check_block(m, p0, p1, block_kv, [&](std::int64_t i, std::int64_t j) {
                return headwise::reference::visible(o, i, j, seq_q, seq_kv);
              })) << hwt::options_str(o)
                  << " " << describe(m, p0, p1, block_kv);
            }
          }
}

TEST(BandMask, CausalDiagonalTilesAreSplitIntoFullAndBoundary) {
  // Bottom-right causal, seq_q = seq_kv = 256, block of queries [64, 128), block_kv 64: keys
  // [0, 64) are visible to every query (full), [64, 128) is the diagonal (not full), nothing
  // beyond 127 is visited.
  attention_options o;
  o.causal = causal_mode::bottom_right;
  const band_mask m = headwise::detail::make_band(o).make(256, 256);
  const auto t = tiles_of(m, 64, 128, 64);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].a, 0);
  EXPECT_EQ(t[0].n, 64);
  EXPECT_TRUE(t[0].full);
  EXPECT_EQ(t[1].a, 64);
  EXPECT_EQ(t[1].n, 64);
  EXPECT_FALSE(t[1].full);
}

TEST(BandMask, NothingVisibleVisitsNothing) {
  attention_options o;
  o.causal = causal_mode::bottom_right;
  // seq_q 100 > seq_kv 30: queries 0..69 see no key.
  const band_mask m = headwise::detail::make_band(o).make(100, 30);
  EXPECT_TRUE(tiles_of(m, 0, 70, 16).empty());
  EXPECT_FALSE(tiles_of(m, 0, 71, 16).empty());
  const band_mask empty_kv = headwise::detail::make_band(o).make(5, 0);
  EXPECT_TRUE(tiles_of(empty_kv, 0, 5, 16).empty());
}

TEST(NoMask, CoversAllKeysWithFullTiles) {
  for (const std::int64_t skv : {0, 1, 63, 64, 65, 1000})
    for (const std::int64_t block_kv : {1, 7, 64, 2000}) {
      const no_mask m{skv};
      const auto t = tiles_of(m, 0, 10, block_kv);
      std::int64_t next = 0;
      for (const tile_rec& r : t) {
        EXPECT_EQ(r.a, next);
        EXPECT_GE(r.n, 1);
        EXPECT_LE(r.n, block_kv);
        EXPECT_TRUE(r.full);
        next = r.a + r.n;
      }
      EXPECT_EQ(next, skv) << "skv " << skv << " block_kv " << block_kv;
      EXPECT_EQ(static_cast<std::int64_t>(t.size()), (skv + block_kv - 1) / block_kv);
    }
}

}  // namespace
