// Numerical semantics every entry point promises (README "Guarantees"): empty tensors, rows
// without keys, NaN/Inf in the inputs (which rows they reach; never a crash), logits near the
// float limits, denormal inputs, and results that do not depend on the thread count.

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/testing.hpp"
#include <headwise/reference/diff.hpp>

namespace {

using headwise::bshd;
using hwt::kInf;
using hwt::kNaN;

std::vector<float> normal(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

/// A dense attention problem (batch 1) kept as plain vectors so single values can be poisoned.
struct dense {
  std::int64_t sq, skv, hq, hkv, d;
  std::vector<float> q, k, v, out, lse;
  dense(std::int64_t sq_, std::int64_t skv_, std::int64_t hq_, std::int64_t hkv_, std::int64_t d_, std::uint64_t seed)
      : sq(sq_), skv(skv_), hq(hq_), hkv(hkv_), d(d_), q(normal(static_cast<std::size_t>(sq * hq * d), seed)),
        k(normal(static_cast<std::size_t>(skv * hkv * d), seed + 1)),
        v(normal(static_cast<std::size_t>(skv * hkv * d), seed + 2)),
        out(static_cast<std::size_t>(sq * hq * d), hwt::kOutSentinel),
        lse(static_cast<std::size_t>(hq * sq), hwt::kLseSentinel) {}
  void run(headwise::attention_options o, int threads = 1) {
    o.num_threads = threads;
    headwise::attention(bshd<const float>(q.data(), 1, sq, hq, d), bshd<const float>(k.data(), 1, skv, hkv, d),
                        bshd<const float>(v.data(), 1, skv, hkv, d), bshd<float>(out.data(), 1, sq, hq, d), o,
                        headwise::bhs<float>(lse.data(), 1, hq, sq));
  }
  float& q_at(std::int64_t i, std::int64_t h, std::int64_t c) { return q[static_cast<std::size_t>((i * hq + h) * d + c)]; }
  float& k_at(std::int64_t j, std::int64_t h, std::int64_t c) { return k[static_cast<std::size_t>((j * hkv + h) * d + c)]; }
  float& v_at(std::int64_t j, std::int64_t h, std::int64_t c) { return v[static_cast<std::size_t>((j * hkv + h) * d + c)]; }
  [[nodiscard]] float out_at(std::int64_t i, std::int64_t h, std::int64_t c) const {
    return out[static_cast<std::size_t>((i * hq + h) * d + c)];
  }
  [[nodiscard]] float lse_at(std::int64_t i, std::int64_t h) const { return lse[static_cast<std::size_t>(h * sq + i)]; }
};

/// Compares a poisoned run with the clean one row by row: `expect(i, h)` says what row (i, h)
/// may be: 0 = bitwise equal to the clean run, 1 = anything (NaN allowed), 2 = not finite.
void check_rows(const dense& clean, const dense& bad, const std::function<int(std::int64_t, std::int64_t)>& expect,
                const std::string& what) {
  std::int64_t equal_rows = 0, poisoned_rows = 0;
  for (std::int64_t i = 0; i < clean.sq; ++i)
    for (std::int64_t h = 0; h < clean.hq; ++h) {
      const int e = expect(i, h);
      bool equal = same_bits(clean.lse_at(i, h), bad.lse_at(i, h)), finite = std::isfinite(bad.lse_at(i, h));
      for (std::int64_t c = 0; c < clean.d; ++c) {
        equal = equal && same_bits(clean.out_at(i, h, c), bad.out_at(i, h, c));
        finite = finite && std::isfinite(bad.out_at(i, h, c));
      }
      if (e == 0) {
        EXPECT_TRUE(equal) << what << ": row " << i << " head " << h << " should be untouched";
        ++equal_rows;
      } else if (e == 2) {
        EXPECT_FALSE(finite) << what << ": row " << i << " head " << h << " sees the bad value";
        ++poisoned_rows;
      }
    }
  EXPECT_GT(equal_rows, 0) << what;
  (void)poisoned_rows;
}

headwise::attention_options causal() {
  headwise::attention_options o;
  o.causal = headwise::causal_mode::bottom_right;
  return o;
}

// NaN in one query row reaches only that row's output and LSE.
// Scratch kept between calls (README, "Scratch memory"): a call after calls of other shapes,
// after headwise::release_scratch(), and on a fresh thread gives bitwise the same result.
TEST(semantics, scratch_kept_between_calls_changes_no_result) {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  auto fill = [&](std::vector<float>& v) {
    for (auto& x : v) x = nd(gen);
  };
  // One decode call (key lanes, splits) and one MLA-like call (query lanes, splits).
  std::vector<float> q1(4 * 128), k1(3000 * 2 * 128), v1(3000 * 2 * 128), q2(1 * 1 * 32 * 80), k2(700 * 80),
      v2(700 * 72), big_q(64 * 8 * 64), big_k(512 * 8 * 64);
  for (auto* v : {&q1, &k1, &v1, &q2, &k2, &v2, &big_q, &big_k}) fill(*v);
  headwise::attention_options opt;
  opt.causal = headwise::causal_mode::bottom_right;
  auto call = [&](std::vector<float>& o1, std::vector<float>& o2) {
    o1.assign(4 * 128, -1.0f);
    o2.assign(32 * 72, -1.0f);
    headwise::attention(bshd<const float>(q1.data(), 1, 1, 4, 128), bshd<const float>(k1.data(), 1, 3000, 2, 128),
                        bshd<const float>(v1.data(), 1, 3000, 2, 128), bshd<float>(o1.data(), 1, 1, 4, 128), opt);
    headwise::attention(bshd<const float>(q2.data(), 1, 1, 32, 80), bshd<const float>(k2.data(), 1, 700, 1, 80),
                        bshd<const float>(v2.data(), 1, 700, 1, 72), bshd<float>(o2.data(), 1, 1, 32, 72), opt);
  };
  std::vector<float> first1, first2, again1, again2, after1, after2, fresh1, fresh2;
  headwise::release_scratch();
  call(first1, first2);
  {  // another shape fills the scratch with other data
    std::vector<float> big_o(64 * 8 * 64);
    headwise::attention(bshd<const float>(big_q.data(), 1, 64, 8, 64), bshd<const float>(big_k.data(), 1, 512, 8, 64),
                        bshd<const float>(big_k.data(), 1, 512, 8, 64), bshd<float>(big_o.data(), 1, 64, 8, 64), opt);
  }
  call(again1, again2);
  headwise::release_scratch();
  call(after1, after2);
  std::thread([&] { call(fresh1, fresh2); }).join();
  for (const auto* r : {&again1, &after1, &fresh1}) EXPECT_EQ(*r, first1);
  for (const auto* r : {&again2, &after2, &fresh2}) EXPECT_EQ(*r, first2);
  // And the kept result is the right one (fp64 reference, f32 tolerances of the suites).
  std::vector<float> ref1(first1.size()), ref2(first2.size());
  headwise::reference::attention(bshd<const float>(q1.data(), 1, 1, 4, 128), bshd<const float>(k1.data(), 1, 3000, 2, 128),
                                 bshd<const float>(v1.data(), 1, 3000, 2, 128), bshd<float>(ref1.data(), 1, 1, 4, 128),
                                 opt);
  headwise::reference::attention(bshd<const float>(q2.data(), 1, 1, 32, 80), bshd<const float>(k2.data(), 1, 700, 1, 80),
                                 bshd<const float>(v2.data(), 1, 700, 1, 72), bshd<float>(ref2.data(), 1, 1, 32, 72),
                                 opt);
  EXPECT_TRUE(hwt::AllClose(first1, ref1, 1e-4, 1e-5));
  EXPECT_TRUE(hwt::AllClose(first2, ref2, 1e-4, 1e-5));
}

TEST(semantics, nan_in_q_reaches_only_its_row) {
  for (const auto& [sq, skv] : {std::pair<std::int64_t, std::int64_t>{150, 150}, {2, 5000}}) {
    dense clean(sq, skv, 4, 2, 32, 1);
    clean.run(causal());
    dense bad = clean;
    const std::int64_t row = sq / 2;
    bad.q_at(row, 3, 5) = kNaN;
    bad.run(causal());
    check_rows(clean, bad, [&](std::int64_t i, std::int64_t h) { return i == row && h == 3 ? 2 : 0; },
               "NaN q sq=" + std::to_string(sq));
    dense inf = clean;
    inf.q_at(row, 0, 1) = kInf;
    inf.run(causal());
    check_rows(clean, inf, [&](std::int64_t i, std::int64_t h) { return i == row && h == 0 ? 1 : 0; },
               "Inf q sq=" + std::to_string(sq));
  }
}

// NaN or Inf in key row j of KV head 0 reaches the rows of that head's group that see key j;
// rows masked from j (even in the same tile: their score is replaced by -inf) and the other KV
// heads are bitwise unchanged.
TEST(semantics, bad_key_reaches_only_rows_that_see_it) {
  for (const float poison : {kNaN, kInf, -kInf}) {
    dense clean(150, 150, 4, 2, 32, 2);
    clean.run(causal());
    dense bad = clean;
    const std::int64_t j = 100;
    bad.k_at(j, 0, 7) = poison;
    bad.run(causal());
    // An infinite key gives that key's logit +inf or -inf depending on q's sign, so the rows
    // that see it may stay finite; NaN poisons every one of them.
    check_rows(clean, bad,
               [&](std::int64_t i, std::int64_t h) {
                 if (h / 2 != 0 || i < j) return 0;
                 return std::isnan(poison) ? 2 : 1;
               },
               "bad k");
  }
}

// NaN in value row j reaches every row that sees key j. A row masked from j whose key tile
// (64 keys) holds j may also turn NaN (0·NaN = NaN in P·V, as in any matmul: PyTorch's SDPA
// turns every row NaN); rows whose tiles end before j and the other KV heads are unchanged.
TEST(semantics, bad_value_reaches_rows_that_see_it_and_stays_in_its_tile) {
  dense clean(150, 150, 4, 2, 32, 3);
  clean.run(causal());
  dense bad = clean;
  const std::int64_t j = 100;
  bad.v_at(j, 1, 3) = kNaN;
  bad.run(causal());
  check_rows(clean, bad,
             [&](std::int64_t i, std::int64_t h) {
               if (h / 2 != 1 || i < (j / 64) * 64) return 0;
               return i >= j ? 2 : 1;
             },
             "NaN v");
}

// A row that sees no key gives out = 0 and lse = -inf even when a V row of a tile its block
// visits is NaN or Inf (its O accumulates 0·NaN, but 1/l = 0 writes exact zeros). Bottom-right
// causal with sq > skv leaves the first sq - skv rows without keys; prefill-sized blocks
// (query lanes) and decode-sized ones (key lanes) both.
TEST(semantics, rows_without_keys_stay_zero_with_nan_values) {
  for (const auto& [sq, skv] : {std::pair<std::int64_t, std::int64_t>{40, 30}, {3, 1}, {5, 2}}) {
    for (const float poison : {kNaN, kInf}) {
      dense bad(sq, skv, 4, 2, 32, 9);
      for (std::int64_t j = 0; j < skv; j += 7) bad.v_at(j, j % 2, 3) = poison;
      bad.run(causal());
      for (std::int64_t i = 0; i < sq - skv; ++i)
        for (std::int64_t h = 0; h < 4; ++h) {
          EXPECT_EQ(bad.lse_at(i, h), -kInf) << "sq " << sq << " row " << i;
          for (std::int64_t c = 0; c < 32; ++c)
            ASSERT_TRUE(same_bits(bad.out_at(i, h, c), 0.0f)) << "sq " << sq << " row " << i << " head " << h;
        }
    }
  }
}

// Finite logits near the float limit (scale·q·k about 1e37) give the fp64 result: the online
// softmax subtracts the running max before exponentiating.
TEST(semantics, logits_near_float_limits) {
  dense p(33, 70, 2, 1, 16, 4);
  headwise::attention_options o = causal();
  o.scale = 1e36f;
  p.run(o);
  std::vector<float> ref_out(p.out.size()), ref_lse(p.lse.size());
  headwise::reference::attention(bshd<const float>(p.q.data(), 1, p.sq, p.hq, p.d),
                                 bshd<const float>(p.k.data(), 1, p.skv, p.hkv, p.d),
                                 bshd<const float>(p.v.data(), 1, p.skv, p.hkv, p.d),
                                 bshd<float>(ref_out.data(), 1, p.sq, p.hq, p.d), o,
                                 headwise::bhs<float>(ref_lse.data(), 1, p.hq, p.sq));
  for (float x : p.out) ASSERT_TRUE(std::isfinite(x));
  for (float x : p.lse) ASSERT_TRUE(std::isfinite(x));
  // Near-ties between logits of this size differ by rounding: compare with a loose bound.
  EXPECT_TRUE(hwt::AllClose(p.out, ref_out, 1e-3, 1e-3));
  EXPECT_TRUE(hwt::AllClose(p.lse, ref_lse, 1e-5, 0.0));
}

// Denormal inputs are computed, not flushed into garbage: the result matches the reference.
TEST(semantics, denormal_inputs) {
  dense p(40, 90, 2, 2, 32, 5);
  for (auto& x : p.q) x *= 1e-39f;
  for (auto& x : p.k) x *= 1e-39f;
  for (auto& x : p.v) x *= 1e-39f;
  p.run(causal());
  std::vector<float> ref_out(p.out.size()), ref_lse(p.lse.size());
  const auto o = causal();
  headwise::reference::attention(bshd<const float>(p.q.data(), 1, p.sq, p.hq, p.d),
                                 bshd<const float>(p.k.data(), 1, p.skv, p.hkv, p.d),
                                 bshd<const float>(p.v.data(), 1, p.skv, p.hkv, p.d),
                                 bshd<float>(ref_out.data(), 1, p.sq, p.hq, p.d), o,
                                 headwise::bhs<float>(ref_lse.data(), 1, p.hq, p.sq));
  for (float x : p.out) ASSERT_TRUE(std::isfinite(x));
  // Logits are 0 to within denormals, so out is the mean of the visible V rows (values ~1e-39):
  // compare relative to the V scale.
  EXPECT_TRUE(hwt::AllClose(p.out, ref_out, 1e-4, 1e-42));
  EXPECT_TRUE(hwt::AllClose(p.lse, ref_lse, 1e-6, 0.0));
}

// Empty inputs for every entry point: nothing read, nothing written beyond the defined result.
TEST(semantics, empty_tensors_every_entry_point) {
  // varlen: sequences with no queries and with no keys.
  {
    const std::int64_t h = 2, d = 16;
    std::vector<std::int32_t> cu_q{0, 0, 3, 5}, cu_k{0, 4, 4, 9};
    std::vector<float> q = normal(5 * h * d, 6), k = normal(9 * h * d, 7), v = normal(9 * h * d, 8);
    std::vector<float> out(5 * h * d, hwt::kOutSentinel), lse(h * 5, hwt::kLseSentinel);
    headwise::attention_varlen(headwise::tensor_view<const float, 3>(q.data(), {5, h, d}),
                               headwise::tensor_view<const float, 3>(k.data(), {9, h, d}),
                               headwise::tensor_view<const float, 3>(v.data(), {9, h, d}),
                               headwise::tensor_view<const std::int32_t, 1>(cu_q.data(), {4}),
                               headwise::tensor_view<const std::int32_t, 1>(cu_k.data(), {4}),
                               headwise::tensor_view<float, 3>(out.data(), {5, h, d}), causal(),
                               headwise::tensor_view<float, 2>(lse.data(), {h, 5}));
    for (std::int64_t r = 0; r < 3; ++r)  // sequence 1: three queries, no keys
      for (std::int64_t hh = 0; hh < h; ++hh) {
        EXPECT_EQ(lse[static_cast<std::size_t>(hh * 5 + r)], -kInf);
        for (std::int64_t c = 0; c < d; ++c) EXPECT_EQ(out[static_cast<std::size_t>((r * h + hh) * d + c)], 0.0f);
      }
    for (float x : out) EXPECT_TRUE(std::isfinite(x));
  }
  // paged: a sequence whose cache is empty.
  {
    const std::int64_t h = 2, d = 16, ps = 4;
    std::vector<float> pages = normal(3 * ps * h * d, 9), q = normal(2 * h * d, 10);
    std::vector<std::int32_t> table{0, 1, 2, 0}, lens{6, 0};
    std::vector<float> out(2 * h * d, hwt::kOutSentinel), lse(2 * h, hwt::kLseSentinel);
    const headwise::tensor_view<const float, 4> kp(pages.data(), {3, ps, h, d});
    headwise::attention_paged(bshd<const float>(q.data(), 2, 1, h, d),
                              headwise::paged_kv<float>{kp, kp, {table.data(), {2, 2}}, {lens.data(), {2}}},
                              bshd<float>(out.data(), 2, 1, h, d), causal(), headwise::bhs<float>(lse.data(), 2, h, 1));
    for (std::int64_t hh = 0; hh < h; ++hh) {
      EXPECT_EQ(lse[static_cast<std::size_t>(h + hh)], -kInf);
      for (std::int64_t c = 0; c < d; ++c) EXPECT_EQ(out[static_cast<std::size_t>((h + hh) * d + c)], 0.0f);
    }
  }
  // MLA: an empty latent cache.
  {
    std::vector<float> q = normal(4 * 40, 11), lat(1), out(4 * 32, hwt::kOutSentinel), lse(4, hwt::kLseSentinel);
    headwise::attention_options o = causal();
    o.scale = 0.125f;
    headwise::mla_absorbed(bshd<const float>(q.data(), 1, 1, 4, 40),
                           headwise::tensor_view<const float, 3>(lat.data(), {1, 0, 40}),
                           bshd<float>(out.data(), 1, 1, 4, 32), o, headwise::bhs<float>(lse.data(), 1, 4, 1));
    for (float x : out) EXPECT_EQ(x, 0.0f);
    for (float x : lse) EXPECT_EQ(x, -kInf);
  }
  // diff_attention: no keys, and no queries.
  {
    std::vector<float> q = normal(3 * 6 * 8, 12), kv(1), out(3 * 4 * 16, hwt::kOutSentinel);
    headwise::diff_options o;
    o.lambda = 0.5f;
    o.lambda_init = 0.2f;
    headwise::diff_attention(bshd<const float>(q.data(), 1, 3, 6, 8), bshd<const float>(kv.data(), 1, 0, 4, 8),
                             bshd<const float>(kv.data(), 1, 0, 2, 16), bshd<float>(out.data(), 1, 3, 4, 16), o);
    for (float x : out) EXPECT_EQ(x, 0.0f);
    std::vector<float> out0(1, hwt::kOutSentinel);
    headwise::diff_attention(bshd<const float>(q.data(), 1, 0, 6, 8), bshd<const float>(q.data(), 1, 3, 4, 8),
                             bshd<const float>(q.data(), 1, 3, 2, 16), bshd<float>(out0.data(), 1, 0, 4, 16), o);
    EXPECT_EQ(out0[0], hwt::kOutSentinel);
  }
}

// Bitwise identical results for 1, 2, 3 threads and the default, for every entry point.
TEST(semantics, every_entry_point_is_thread_invariant) {
  auto same = [](const std::function<std::vector<float>(int)>& run, const char* what) {
    const std::vector<float> one = run(1);
    for (int t : {2, 3, 0}) EXPECT_TRUE(hwt::BitwiseEqual(one, run(t))) << what << " threads " << t;
  };
  same(
      [](int t) {
        dense p(200, 300, 8, 2, 64, 20);
        p.run(causal(), t);
        p.out.insert(p.out.end(), p.lse.begin(), p.lse.end());
        return p.out;
      },
      "attention prefill");
  same(
      [](int t) {
        dense p(1, 6000, 8, 2, 64, 21);
        p.run(causal(), t);
        p.out.insert(p.out.end(), p.lse.begin(), p.lse.end());
        return p.out;
      },
      "attention decode");
  same(
      [](int t) {
        const std::int64_t h = 2, d = 16;
        std::vector<std::int32_t> cu_q{0, 40, 41, 90}, cu_k{0, 100, 3100, 3150};
        std::vector<float> q = normal(90 * 4 * d, 22), k = normal(3150 * h * d, 23), v = normal(3150 * h * d, 24);
        std::vector<float> out(90 * 4 * d);
        headwise::attention_options o = causal();
        o.num_threads = t;
        headwise::attention_varlen(headwise::tensor_view<const float, 3>(q.data(), {90, 4, d}),
                                   headwise::tensor_view<const float, 3>(k.data(), {3150, h, d}),
                                   headwise::tensor_view<const float, 3>(v.data(), {3150, h, d}),
                                   headwise::tensor_view<const std::int32_t, 1>(cu_q.data(), {4}),
                                   headwise::tensor_view<const std::int32_t, 1>(cu_k.data(), {4}),
                                   headwise::tensor_view<float, 3>(out.data(), {90, 4, d}), o);
        return out;
      },
      "attention_varlen");
  same(
      [](int t) {
        const std::int64_t h = 2, d = 32, ps = 16, pages = 300;
        std::vector<float> kp = normal(pages * ps * h * d, 25), vp = normal(pages * ps * h * d, 26),
                           q = normal(2 * 8 * d, 27);
        std::vector<std::int32_t> table(2 * 150), lens{2400, 777};
        for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>((i * 7) % pages);
        std::vector<float> out(2 * 8 * d);
        headwise::attention_options o = causal();
        o.num_threads = t;
        headwise::attention_paged(
            bshd<const float>(q.data(), 2, 1, 8, d),
            headwise::paged_kv<float>{{kp.data(), {pages, ps, h, d}}, {vp.data(), {pages, ps, h, d}},
                                      {table.data(), {2, 150}}, {lens.data(), {2}}},
            bshd<float>(out.data(), 2, 1, 8, d), o);
        return out;
      },
      "attention_paged");
  same(
      [](int t) {
        std::vector<float> q = normal(2 * 16 * 72, 28), lat = normal(3000 * 72, 29), out(2 * 16 * 64);
        headwise::attention_options o = causal();
        o.scale = 0.1f;
        o.num_threads = t;
        headwise::mla_absorbed(bshd<const float>(q.data(), 1, 2, 16, 72),
                               headwise::tensor_view<const float, 3>(lat.data(), {1, 3000, 72}),
                               bshd<float>(out.data(), 1, 2, 16, 64), o);
        return out;
      },
      "mla_absorbed");
  same(
      [](int t) {
        std::vector<float> q = normal(70 * 10 * 16, 30), k = normal(90 * 4 * 16, 31), v = normal(90 * 2 * 32, 32),
                           out(70 * 8 * 32);
        headwise::diff_options o;
        o.causal = headwise::causal_mode::bottom_right;
        o.lambda = 0.4f;
        o.lambda_init = 0.3f;
        o.num_threads = t;
        headwise::diff_attention(bshd<const float>(q.data(), 1, 70, 10, 16), bshd<const float>(k.data(), 1, 90, 4, 16),
                                 bshd<const float>(v.data(), 1, 90, 2, 32), bshd<float>(out.data(), 1, 70, 8, 32), o);
        return out;
      },
      "diff_attention");
}

}  // namespace
