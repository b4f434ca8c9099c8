// Decode (short queries against long caches) and split-KV:
//   * decode against the fp64 reference: seq_q {1, 2, 4, 16} x seq_kv {1 .. 5000}, GQA 32/8,
//     MHA 8/8, MQA 8/1, dims 64/80/128 and 576/512 (bf16 also 20 to 144: odd vector counts,
//     tails), bottom-right causal, windows + sinks, sink logits, softcap, f32/bf16/f16 K/V (the
//     reference reads the same stored bf16/f16 values);
//   * split-KV + merge == one pass, for several split sizes and decode tile sizes, and bitwise
//     independent of the thread count;
//   * merge_states: two halves merged == the whole, associativity, empty states, in place, errors.
//
// Tolerances are attention_test.cpp's (common/testing.hpp): out within kOutTol·max|V| = 2e-5·max|V|
// of the reference, lse within kLseRelTol·max(1, |lse|) = 4e-6 relative; with softcap the logit-
// scale bound out_tol_for_logits(cap). Two results that are each within those bounds of the
// reference are compared with twice the bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "common/testing.hpp"

namespace {

using namespace hwt;
using headwise::engine::blocking;

/// Checks a comparison against the reference tolerances (as attention_test.cpp's expect_matches).
void expect_close_to_reference(const compare_result& r, const std::string& what, double out_tol = kOutTol,
                               double lse_abs_tol = -1.0) {
  if (std::getenv("HEADWISE_TEST_VERBOSE") != nullptr)
    std::printf("[errors] out %.3g of %.3g | lse rel %.3g abs %.3g | %s\n", r.out_err, out_tol, r.lse_rel_err,
                r.lse_err, what.c_str());
  EXPECT_EQ(r.nonfinite, 0) << what << "\n  " << r;
  EXPECT_LE(r.out_err, out_tol) << what << "\n  " << r;
  if (lse_abs_tol >= 0) {
    EXPECT_LE(r.lse_err, lse_abs_tol) << what << "\n  " << r;
  } else {
    EXPECT_LE(r.lse_rel_err, kLseRelTol) << what << "\n  " << r;
  }
  EXPECT_TRUE(r.padding_intact) << what << ": out written outside its view";
}

/// |a - b| <= atol + rtol·|b| for two LSE arrays, with equal infinities passing.
::testing::AssertionResult LseClose(const std::vector<float>& a, const std::vector<float>& b, double rel) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size mismatch";
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= rel * std::max(1.0, std::abs(double(b[i])))))
      return ::testing::AssertionFailure() << "lse index " << i << ": " << a[i] << " vs " << b[i];
  }
  return ::testing::AssertionSuccess();
}

/// What is switched on besides bottom-right causal.
enum class extra { plain, window_sinks, sink_logits, softcap, no_causal };

const char* extra_name(extra x) {
  switch (x) {
    case extra::window_sinks: return "window_sinks";
    case extra::sink_logits: return "sink_logits";
    case extra::softcap: return "softcap";
    case extra::no_causal: return "nocausal";
    default: return "causalBR";
  }
}

constexpr float kSoftcap = 20.0f;

/// Options for one `extra`, with sink logits (heads_out of them) kept in `sinks`.
attention_options decode_options(extra x, std::int64_t seq_kv, std::int64_t heads_out, std::vector<float>& sinks,
                                 problem_spec& s) {
  attention_options o;
  o.causal = x == extra::no_causal ? causal_mode::none : causal_mode::bottom_right;
  if (x == extra::window_sinks) {
    o.window_left = std::max<std::int64_t>(3, seq_kv / 10);
    o.sink_tokens = 4;
  }
  if (x == extra::sink_logits) {
    // Ordinary sinks, no sink (-inf) and a dominating one (every logit is O(1)).
    sinks = random_uniform(static_cast<std::size_t>(heads_out), 7 + static_cast<std::uint64_t>(heads_out), -2.0f,
                           4.0f);
    sinks[0] = -kInf;
    if (heads_out > 2) sinks[2] = 30.0f;
    o.sink_logits = tensor_view<const float, 1>(sinks.data(), {heads_out});
  }
  if (x == extra::softcap) {
    o.softcap = kSoftcap;
    s.q_scale = 12.0f;  // raw logits ~ N(0, 12²): well into the cap's saturation
  }
  return o;
}

// =============================================================================================
// Decode against the fp64 reference
// =============================================================================================

struct decode_case {
  kv_dtype dtype;
  std::int64_t batch, sq, skv, hq, hkv, dqk, dv;
  extra x;
  [[nodiscard]] std::string name() const {
    std::ostringstream os;
    os << "decode_" << dtype_name(dtype) << "_sq" << sq << "_skv" << skv << "_hq" << hq << "_hkv" << hkv << "_d"
       << dqk;
    if (dv != dqk) os << "x" << dv;
    os << "_" << extra_name(x);
    if (batch != 1) os << "_b" << batch;
    return os.str();
  }
};
void PrintTo(const decode_case& c, std::ostream* os) { *os << c.name(); }

std::vector<decode_case> decode_cases() {
  using enum kv_dtype;
  std::vector<decode_case> v;
  // GQA 32/8, d 128: every seq_kv at seq_q = 1 in f32, then the other seq_q in bf16 and f16.
  for (const std::int64_t skv : {1, 7, 63, 64, 65, 129, 1000, 5000})
    v.push_back({f32, 1, 1, skv, 32, 8, 128, 128, extra::plain});
  for (const auto& [sq, skv] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {1, 1}, {1, 65}, {1, 5000}, {2, 64}, {2, 1000}, {4, 129}, {4, 5000}, {16, 7}, {16, 1000}})
    v.push_back({bf16, 1, sq, skv, 32, 8, 128, 128, extra::plain});
  for (const auto& [sq, skv] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {1, 7}, {1, 129}, {1, 5000}, {2, 63}, {4, 1000}, {16, 65}, {16, 129}})
    v.push_back({f16, 1, sq, skv, 32, 8, 128, 128, extra::plain});
  // MHA 8/8.
  for (const std::int64_t sq : {1, 2, 4, 16}) {
    v.push_back({f32, 1, sq, 7, 8, 8, 64, 64, extra::plain});
    v.push_back({f32, 1, sq, 1000, 8, 8, 64, 64, extra::plain});
  }
  v.push_back({bf16, 1, 4, 65, 8, 8, 64, 64, extra::plain});
  v.push_back({f16, 1, 16, 5000, 8, 8, 64, 64, extra::plain});
  v.push_back({f32, 2, 2, 129, 8, 8, 80, 80, extra::plain});
  v.push_back({bf16, 1, 1, 5000, 8, 8, 80, 80, extra::plain});
  v.push_back({f16, 1, 4, 64, 8, 8, 80, 80, extra::plain});
  // MQA 8/1.
  v.push_back({f32, 1, 1, 1000, 8, 1, 80, 80, extra::plain});
  v.push_back({f32, 1, 4, 63, 8, 1, 128, 128, extra::plain});
  v.push_back({bf16, 3, 2, 129, 8, 1, 128, 128, extra::plain});
  v.push_back({f16, 1, 16, 1000, 8, 1, 64, 64, extra::plain});
  // bf16 key-lane decode (at most 4 rows per KV head: key lanes on AVX-512 and AVX2) at dims of
  // an odd number of AVX-512 vectors (48, 144) or with a tail (40, 20), and with dim_v not a
  // whole number of vectors (72, 36: V converted to f32).
  v.push_back({bf16, 1, 1, 1000, 8, 2, 48, 48, extra::plain});
  v.push_back({bf16, 1, 2, 129, 4, 2, 40, 72, extra::plain});
  v.push_back({bf16, 1, 1, 65, 4, 4, 20, 36, extra::plain});
  v.push_back({bf16, 1, 1, 1000, 4, 1, 96, 144, extra::plain});
  // MLA-absorbed shape (dim_qk 576, dim_v 512), once.
  v.push_back({bf16, 1, 1, 1000, 16, 1, 576, 512, extra::plain});
  // Windows + sink tokens, sink logits, softcap, no causal mask.
  v.push_back({f32, 1, 1, 1000, 32, 8, 128, 128, extra::window_sinks});
  v.push_back({bf16, 1, 4, 5000, 32, 8, 128, 128, extra::window_sinks});
  v.push_back({f16, 1, 16, 129, 8, 8, 64, 64, extra::window_sinks});
  v.push_back({f32, 1, 1, 65, 32, 8, 128, 128, extra::sink_logits});
  v.push_back({bf16, 1, 2, 1000, 32, 8, 128, 128, extra::sink_logits});
  v.push_back({f16, 1, 16, 7, 8, 1, 80, 80, extra::sink_logits});  // 9 rows see no key: lse = sink
  v.push_back({f32, 1, 1, 1000, 32, 8, 128, 128, extra::softcap});
  v.push_back({bf16, 1, 4, 129, 8, 8, 64, 64, extra::softcap});
  v.push_back({f16, 1, 16, 1000, 8, 1, 64, 64, extra::softcap});
  v.push_back({f32, 1, 16, 64, 32, 8, 128, 128, extra::no_causal});
  v.push_back({bf16, 2, 4, 7, 8, 8, 64, 64, extra::no_causal});
  return v;
}

class DecodeVsReference : public ::testing::TestWithParam<decode_case> {};

TEST_P(DecodeVsReference, MatchesFp64ReferenceOnStoredKv) {
  const decode_case& c = GetParam();
  problem_spec s;
  s.batch = c.batch;
  s.seq_q = c.sq;
  s.seq_kv = c.skv;
  s.heads_q = c.hq;
  s.heads_kv = c.hkv;
  s.dim_qk = c.dqk;
  s.dim_v = c.dv;
  s.dtype = c.dtype;
  std::vector<float> sinks;
  const attention_options o = decode_options(c.x, c.skv, s.heads_out(), sinks, s);
  const double tol = c.x == extra::softcap ? out_tol_for_logits(kSoftcap) : kOutTol;
  const double lse_abs = c.x == extra::softcap ? out_tol_for_logits(kSoftcap) : -1.0;
  expect_close_to_reference(compare_with_reference(s, o, std::hash<std::string>{}(c.name())),
                            c.name() + " " + options_str(o), tol, lse_abs);
}

INSTANTIATE_TEST_SUITE_P(Decode, DecodeVsReference, ::testing::ValuesIn(decode_cases()),
                         [](const ::testing::TestParamInfo<decode_case>& info) { return info.param.name(); });

// =============================================================================================
// Split-KV + merge == one pass; thread-count invariance with splits
// =============================================================================================

struct split_case {
  kv_dtype dtype;
  std::int64_t batch, sq, skv, hq, hkv, d;
  extra x;
  [[nodiscard]] std::string name() const {
    std::ostringstream os;
    os << "split_" << dtype_name(dtype) << "_sq" << sq << "_skv" << skv << "_hq" << hq << "_hkv" << hkv << "_d" << d
       << "_" << extra_name(x);
    if (batch != 1) os << "_b" << batch;
    return os.str();
  }
};
void PrintTo(const split_case& c, std::ostream* os) { *os << c.name(); }

template <class KV>
void check_splits(const split_case& c) {
  problem_spec s;
  s.batch = c.batch;
  s.seq_q = c.sq;
  s.seq_kv = c.skv;
  s.heads_q = c.hq;
  s.heads_kv = c.hkv;
  s.dim_qk = s.dim_v = c.d;
  s.dtype = c.dtype;
  std::vector<float> sinks;
  attention_options o = decode_options(c.x, c.skv, s.heads_out(), sinks, s);
  const double tol = c.x == extra::softcap ? out_tol_for_logits(kSoftcap) : kOutTol;
  const double lse_abs = c.x == extra::softcap ? out_tol_for_logits(kSoftcap) : -1.0;
  const std::uint64_t seed = std::hash<std::string>{}(c.name());

  // One problem (inputs and reference computed once); every run starts from sentinel outputs.
  dense_problem<KV> p(s, seed);
  p.run_reference(o);
  auto run = [&](const blocking& blk, int nt) {
    std::fill(p.out.buf.begin(), p.out.buf.end(), kOutSentinel);
    std::fill(p.lse.begin(), p.lse.end(), kLseSentinel);
    o.num_threads = nt;
    p.run_blocked(o, blk);
  };
  // One pass (never split).
  run(blocking{128, 64, 128, 0, 0, 128}, 1);
  expect_close_to_reference(p.compare(), c.name() + " split_kv 0", tol, lse_abs);
  const std::vector<float> base_out = p.out_dense(), base_lse = p.lse;
  const double vmax = p.max_abs_v;

  for (const std::int64_t dbk : {16, 33, 128})
    for (const std::int64_t split : {0, 16, 100, 128, 2048}) {
      const blocking blk{128, 64, dbk, split, 0, dbk};  // the tile size for f32 and for 16-bit K/V
      const std::string what = c.name() + " decode_block_kv " + std::to_string(dbk) + " split_kv " +
                               std::to_string(split) + " " + options_str(o);
      run(blk, 1);
      expect_close_to_reference(p.compare(), what, tol, lse_abs);
      const std::vector<float> out1 = p.out_dense(), lse1 = p.lse;
      EXPECT_TRUE(AllClose(out1, base_out, 0.0, 2 * tol * vmax)) << what << " vs split_kv 0";
      if (c.x == extra::softcap) {
        EXPECT_TRUE(AllClose(lse1, base_lse, 0.0, 2 * lse_abs)) << what << " vs split_kv 0 (lse)";
      } else {
        EXPECT_TRUE(LseClose(lse1, base_lse, 2 * kLseRelTol)) << what << " vs split_kv 0 (lse)";
      }
      // Split points depend only on the blocking: bitwise the same for any thread count.
      for (const int nt : {2, 3, 0}) {
        run(blk, nt);
        EXPECT_TRUE(BitwiseEqual(p.out_dense(), out1)) << what << " threads " << nt << " (out)";
        EXPECT_TRUE(BitwiseEqual(p.lse, lse1)) << what << " threads " << nt << " (lse)";
      }
    }
}

class DecodeSplitKv : public ::testing::TestWithParam<split_case> {};

TEST_P(DecodeSplitKv, SplitEqualsOnePassAndReferenceAndIsThreadInvariant) {
  const split_case& c = GetParam();
  switch (c.dtype) {
    case kv_dtype::bf16: check_splits<bf16>(c); break;
    case kv_dtype::f16: check_splits<f16>(c); break;
    default: check_splits<float>(c); break;
  }
}

// Splits apply to key-lane (decode) items only: heads-per-group x seq_q <= lanes / 2, i.e. <= 2
// rows on SSE2, 4 on AVX2, 8 on AVX-512. MHA with seq_q <= 2 is key-lane on every build.
INSTANTIATE_TEST_SUITE_P(
    Splits, DecodeSplitKv,
    ::testing::Values(split_case{kv_dtype::f32, 1, 2, 1000, 8, 8, 64, extra::plain},
                      split_case{kv_dtype::f32, 2, 1, 1000, 8, 8, 64, extra::window_sinks},
                      split_case{kv_dtype::bf16, 1, 1, 5000, 32, 8, 128, extra::plain},
                      split_case{kv_dtype::f16, 2, 1, 129, 32, 8, 128, extra::sink_logits},
                      split_case{kv_dtype::bf16, 1, 4, 1000, 4, 4, 80, extra::plain},
                      split_case{kv_dtype::f32, 1, 1, 700, 16, 2, 64, extra::softcap},
                      split_case{kv_dtype::f16, 1, 2, 333, 4, 4, 64, extra::no_causal}),
    [](const ::testing::TestParamInfo<split_case>& info) { return info.param.name(); });

TEST(DecodeSplitKv, MhaDecodeUsesTheSplitKeyLanePathOnThisBuild) {
  // The split cases above only exercise split-KV if their rows take the key-lane layout: MHA
  // (1 head per KV group) with seq_q 1 or 2 must do so on every build (SSE2 has 4 lanes).
  EXPECT_TRUE(headwise::engine::use_key_lanes<headwise::tile::default_arch>(1 * 2));
  EXPECT_TRUE(headwise::engine::use_key_lanes<headwise::tile::default_arch>(1 * 1));
}

TEST(DecodeSplitKv, DefaultBlockingSplitsLongCachesThreadInvariantly) {
  // headwise::attention (default blocking) on a cache of 5000 keys = 20 splits of 256 keys.
  problem_spec s;
  s.batch = 1;
  s.seq_q = 1;
  s.seq_kv = 5000;
  s.heads_q = 4;
  s.heads_kv = 4;
  s.dim_qk = s.dim_v = 64;
  s.dtype = kv_dtype::bf16;
  attention_options o;
  o.causal = causal_mode::bottom_right;
  o.num_threads = 1;
  dense_problem<bf16> base(s, 41);
  base.run(o);
  base.run_reference(o);
  expect_close_to_reference(base.compare(), "default blocking bf16 skv 5000");
  for (const int nt : {2, 3, 0}) {
    dense_problem<bf16> p(s, 41);
    o.num_threads = nt;
    p.run(o);
    EXPECT_TRUE(BitwiseEqual(p.out_dense(), base.out_dense())) << "threads " << nt;
    EXPECT_TRUE(BitwiseEqual(p.lse, base.lse)) << "threads " << nt;
  }
}

// =============================================================================================
// merge_states
// =============================================================================================

/// An attention state (o, lse) of shape (B, S, H, D) / (B, H, S), contiguous.
struct state {
  std::int64_t B, S, H, D;
  std::vector<float> o, lse;
  state(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d, float fill = kOutSentinel)
      : B(b), S(s), H(h), D(d), o(static_cast<std::size_t>(b * s * h * d), fill),
        lse(static_cast<std::size_t>(b * h * s), kLseSentinel) {}
  tensor_view<float, 4> ov() { return headwise::bshd(o.data(), B, S, H, D); }
  tensor_view<float, 3> lv() { return headwise::bhs(lse.data(), B, H, S); }
  [[nodiscard]] tensor_view<const float, 4> oc() const { return headwise::bshd(o.data(), B, S, H, D); }
  [[nodiscard]] tensor_view<const float, 3> lc() const { return headwise::bhs(lse.data(), B, H, S); }
};

state merged(const state& a, const state& b) {
  state r(a.B, a.S, a.H, a.D);
  headwise::merge_states(a.oc(), a.lc(), b.oc(), b.lc(), r.ov(), r.lv());
  return r;
}

/// Attention of p's queries over keys [k0, k1) (a state), options o.
template <class KV>
state attend_keys(const dense_problem<KV>& p, std::int64_t k0, std::int64_t k1, const attention_options& o) {
  const problem_spec& s = p.spec;
  state r(s.batch, s.seq_q, s.heads_out(), s.dim_v);
  auto k = p.k_view(), v = p.v_view();
  k.data += k0 * k.stride[1];
  v.data += k0 * v.stride[1];
  k.shape[1] = v.shape[1] = k1 - k0;
  headwise::attention(p.q_view(), k, v, r.ov(), o, r.lv());
  return r;
}

problem_spec merge_spec() {
  problem_spec s;
  s.batch = 2;
  s.seq_q = 5;
  s.seq_kv = 300;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 64;
  return s;
}

TEST(MergeStates, MergingTwoKeyRangesEqualsAttentionOverAll) {
  // No mask (a mask would tie a query to key positions): softmax over [0, n) is the merge of the
  // softmaxes over [0, s) and [s, n). s = 0 and s = n make one side empty (lse = -inf, out = 0).
  for (const kv_dtype dt : {kv_dtype::f32, kv_dtype::bf16}) {
    problem_spec s = merge_spec();
    s.dtype = dt;
    auto run = [&](auto tag) {
      using KV = decltype(tag);
      dense_problem<KV> p(s, 51);
      attention_options o;
      p.run(o);
      p.run_reference(o);
      expect_close_to_reference(p.compare(), "whole");
      for (const std::int64_t cut : {0, 1, 64, 150, 299, 300}) {
        const state a = attend_keys(p, 0, cut, o), b = attend_keys(p, cut, s.seq_kv, o);
        const state m = merged(a, b);
        const std::string what = std::string(dtype_name(dt)) + " merge cut " + std::to_string(cut);
        EXPECT_TRUE(AllClose(m.o, p.ref_out, 0.0, kOutTol * p.max_abs_v)) << what << " vs reference";
        EXPECT_TRUE(LseClose(m.lse, p.ref_lse, kLseRelTol)) << what << " vs reference (lse)";
        EXPECT_TRUE(AllClose(m.o, p.out_dense(), 0.0, 2 * kOutTol * p.max_abs_v)) << what << " vs one pass";
        EXPECT_TRUE(LseClose(m.lse, p.lse, 2 * kLseRelTol)) << what << " vs one pass (lse)";
      }
    };
    if (dt == kv_dtype::bf16) run(bf16{});
    else run(float{});
  }
}

TEST(MergeStates, MergeIsAssociative) {
  problem_spec s = merge_spec();
  dense_problem<float> p(s, 52);
  attention_options o;
  const state a = attend_keys(p, 0, 70, o), b = attend_keys(p, 70, 71, o), c = attend_keys(p, 71, 300, o);
  const state left = merged(merged(a, b), c), right = merged(a, merged(b, c));
  EXPECT_TRUE(AllClose(left.o, right.o, 0.0, 2 * kOutTol * 4.0)) << "(a+b)+c vs a+(b+c)";  // max|V| < ~4.5
  EXPECT_TRUE(LseClose(left.lse, right.lse, 2 * kLseRelTol));
  // And with states whose LSEs differ by a lot (one dominates): still associative.
  state big = c;
  for (auto& l : big.lse) l += 40.0f;
  const state l2 = merged(merged(a, b), big), r2 = merged(a, merged(b, big));
  EXPECT_TRUE(AllClose(l2.o, r2.o, 0.0, 2 * kOutTol * 4.0));
  EXPECT_TRUE(LseClose(l2.lse, r2.lse, 2 * kLseRelTol));
  EXPECT_TRUE(AllClose(l2.o, big.o, 0.0, 1e-12 + 2 * kOutTol * 4.0)) << "a dominating state wins";
}

TEST(MergeStates, EmptyStatesAreIdentities) {
  problem_spec s = merge_spec();
  dense_problem<float> p(s, 53);
  const state a = attend_keys(p, 0, 150, {});
  state empty(s.batch, s.seq_q, s.heads_out(), s.dim_v, 0.0f);
  for (auto& l : empty.lse) l = -kInf;
  const state ae = merged(a, empty), ea = merged(empty, a);
  EXPECT_TRUE(BitwiseEqual(ae.o, a.o)) << "merge(a, empty)";
  EXPECT_TRUE(BitwiseEqual(ae.lse, a.lse)) << "merge(a, empty)";
  EXPECT_TRUE(BitwiseEqual(ea.o, a.o)) << "merge(empty, a)";
  EXPECT_TRUE(BitwiseEqual(ea.lse, a.lse)) << "merge(empty, a)";
  const state ee = merged(empty, empty);
  EXPECT_TRUE(BitwiseEqual(ee.o, empty.o)) << "merge(empty, empty): out = 0";
  EXPECT_TRUE(BitwiseEqual(ee.lse, empty.lse)) << "merge(empty, empty): lse = -inf";
  // An empty state from attention itself (zero keys) is the identity too.
  const state none = attend_keys(p, 150, 150, {});
  for (const float l : none.lse) ASSERT_EQ(l, -kInf);
  EXPECT_TRUE(BitwiseEqual(merged(a, none).o, a.o));
  EXPECT_TRUE(BitwiseEqual(merged(none, a).o, a.o));
  // Row by row: rows empty on one side take the other side's row unchanged.
  state half = a;
  for (std::size_t i = 0; i < half.lse.size(); i += 2) half.lse[i] = -kInf;
  const state b = attend_keys(p, 150, 300, {});
  const state hb = merged(half, b);
  for (std::int64_t bb = 0; bb < s.batch; ++bb)
    for (std::int64_t h = 0; h < s.heads_q; ++h)
      for (std::int64_t i = 0; i < s.seq_q; ++i) {
        const std::size_t li = static_cast<std::size_t>((bb * s.heads_q + h) * s.seq_q + i);
        if (half.lse[li] != -kInf) continue;
        const std::size_t oi = static_cast<std::size_t>(((bb * s.seq_q + i) * s.heads_q + h) * s.dim_v);
        EXPECT_TRUE(BitwiseEqualN(hb.o.data() + oi, b.o.data() + oi, static_cast<std::size_t>(s.dim_v)));
        EXPECT_EQ(hb.lse[li], b.lse[li]);
      }
}

TEST(MergeStates, InPlaceMergeIntoFirstState) {
  problem_spec s = merge_spec();
  dense_problem<float> p(s, 54);
  state a = attend_keys(p, 0, 100, {});
  const state b = attend_keys(p, 100, 300, {});
  const state want = merged(a, b);
  headwise::merge_states(a.oc(), a.lc(), b.oc(), b.lc(), a.ov(), a.lv());
  EXPECT_TRUE(BitwiseEqual(a.o, want.o));
  EXPECT_TRUE(BitwiseEqual(a.lse, want.lse));
  // Chunked accumulation in place over 4 ranges == the one-pass result.
  state acc = attend_keys(p, 0, 0, {});
  for (const auto& [k0, k1] : std::vector<std::pair<std::int64_t, std::int64_t>>{{0, 64}, {64, 65}, {65, 200}, {200, 300}}) {
    const state part = attend_keys(p, k0, k1, {});
    headwise::merge_states(acc.oc(), acc.lc(), part.oc(), part.lc(), acc.ov(), acc.lv());
  }
  p.run({});
  EXPECT_TRUE(AllClose(acc.o, p.out_dense(), 0.0, 2 * kOutTol * p.max_abs_v));
  EXPECT_TRUE(LseClose(acc.lse, p.lse, 2 * kLseRelTol));
}

/// merge_states with a bad argument: argument_error naming it, o and lse unchanged.
void expect_merge_error(state& a, state& b, state& out, tensor_view<const float, 4> oa, tensor_view<const float, 3> la,
                        tensor_view<const float, 4> ob, tensor_view<const float, 3> lb, tensor_view<float, 4> o,
                        tensor_view<float, 3> l, const std::string& arg) {
  const auto before = std::vector<std::vector<unsigned char>>{bytes_of(a.o), bytes_of(a.lse), bytes_of(b.o),
                                                              bytes_of(b.lse), bytes_of(out.o), bytes_of(out.lse)};
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::merge_states(oa, la, ob, lb, o, l); }, arg));
  const auto after = std::vector<std::vector<unsigned char>>{bytes_of(a.o), bytes_of(a.lse), bytes_of(b.o),
                                                             bytes_of(b.lse), bytes_of(out.o), bytes_of(out.lse)};
  EXPECT_TRUE(before == after) << "a buffer changed although merge_states threw (" << arg << ")";
}

TEST(MergeStates, ShapeMismatchThrowsNamingTheArgument) {
  state a(2, 3, 4, 8, 1.0f), b(2, 3, 4, 8, 2.0f), o(2, 3, 4, 8);
  for (auto& l : a.lse) l = 0.5f;
  for (auto& l : b.lse) l = 1.5f;
  // o_b with another seq length.
  auto ob = b.oc();
  ob.shape[1] = 2;
  expect_merge_error(a, b, o, a.oc(), a.lc(), ob, b.lc(), o.ov(), o.lv(), "o_b.shape[1]");
  // out with another dim.
  auto ov = o.ov();
  ov.shape[3] = 7;
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), b.lc(), ov, o.lv(), "o.shape[3]");
  // lse_a with (batch, seq, heads) order instead of (batch, heads, seq).
  const tensor_view<const float, 3> la_wrong(a.lse.data(), {2, 3, 4});
  expect_merge_error(a, b, o, a.oc(), la_wrong, b.oc(), b.lc(), o.ov(), o.lv(), "lse_a.shape[1]");
  auto lb = b.lc();
  lb.shape[2] = 4;
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), lb, o.ov(), o.lv(), "lse_b.shape[2]");
  auto lv = o.lv();
  lv.shape[0] = 1;
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), b.lc(), o.ov(), lv, "lse.shape[0]");
}

TEST(MergeStates, AliasingOutputsThrowNamingTheArgument) {
  state a(2, 3, 4, 8, 1.0f), b(2, 3, 4, 8, 2.0f), o(2, 3, 4, 8);
  for (auto& l : a.lse) l = 0.5f;
  for (auto& l : b.lse) l = 1.5f;
  // o is o_b (only o_a may be reused, to merge in place).
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), b.lc(), b.ov(), o.lv(), "o");
  // o overlaps o_a without being the very same view (o_a's rows 0..1 written to rows 1..2).
  auto oa2 = a.oc(), ob2 = b.oc();
  oa2.shape[1] = ob2.shape[1] = 2;
  auto shifted = a.ov();
  shifted.shape[1] = 2;
  shifted.data += 4 * 8;
  state l2(2, 2, 4, 8);
  const tensor_view<const float, 3> la2(a.lse.data(), {2, 4, 2}, {12, 3, 1}), lb2(b.lse.data(), {2, 4, 2}, {12, 3, 1});
  expect_merge_error(a, b, l2, oa2, la2, ob2, lb2, shifted, l2.lv(), "o");
  // lse is lse_b.
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), b.lc(), o.ov(), b.lv(), "lse");
  // lse inside o_a.
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), b.lc(), o.ov(), headwise::bhs(a.o.data(), 2, 4, 3), "lse");
  // o self-overlapping (zero stride on the heads axis).
  tensor_view<float, 4> self(o.o.data(), {2, 3, 4, 8}, {96, 32, 0, 1});
  expect_merge_error(a, b, o, a.oc(), a.lc(), b.oc(), b.lc(), self, o.lv(), "o.stride");
}

}  // namespace
