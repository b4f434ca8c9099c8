// headwise::attention against the fp64 reference (headwise::reference::attention).
//
// Tolerances (stated once here, defined in common/testing.hpp):
//   * out:  max |out - ref| <= kOutTol · max|V| with kOutTol = 2e-5, for logits |s| <= ~20.
//     The kernel computes in f32: logits carry ~u·|s|·(a few) error (u = 2^-24), exp2_softmax
//     is within 2.5e-7 relative, and the running sums add ~u per term (n <= 1000 keys, mostly
//     cancelling). Measured worst case across the sweep and all three arch builds: 1.5e-6, so
//     2e-5 leaves >10x margin while still catching any real bug (a wrong mask bit, a lost
//     rescale, a wrong head) which shows up as >= 1e-3.
//   * lse:  |lse - ref| <= kLseRelTol · max(1, |ref|) with kLseRelTol = 4e-6: the LSE is an f32
//     (half an ulp = 6e-8 relative) plus the logit error above. Measured <= 6e-7.
//   * bf16/f16 K/V: the SAME bounds. The inputs are stored once in bf16/f16 and the reference
//     reads those stored values, so only compute error (identical to f32) is measured.
//   * large logits (|s| ~ 1e3): out_tol_for_logits(L) = max(kOutTol, 1e-6·L), i.e. the softmax's
//     2-Lipschitz bound applied to a logit error of 8u·L, with L the logit scale of the test.
//     The LSE is 1-Lipschitz in the logits, so there |δlse| <= the same 1e-6·L, absolute: the
//     error follows the logit scale of the whole row, not the value of the LSE (a causal row
//     with few visible keys can have lse ~ 80 while its logits carry ~1e3-scale errors).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "common/testing.hpp"

namespace {

using namespace hwt;
using headwise::engine::blocking;

/// Checks a comparison against the tolerances: out_err <= out_tol; for the LSE either
/// |δlse| / max(1, |lse|) <= kLseRelTol (default) or, when lse_abs_tol >= 0, |δlse| <= lse_abs_tol.
/// Set HEADWISE_TEST_VERBOSE=1 to print every measured error (to review the margins).
void expect_matches(const compare_result& r, const std::string& what, double out_tol = kOutTol,
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

// =============================================================================================
// The main sweep: lengths x dims x head ratios x causal alignment
// =============================================================================================

struct sweep_case {
  std::int64_t batch, sq, skv, hq, hkv, dqk, dv;
  causal_mode causal;
  head_map map;

  [[nodiscard]] std::string name() const {
    std::ostringstream os;
    os << "sq" << sq << "_skv" << skv << "_hq" << hq << "_hkv" << hkv << "_d" << dqk;
    if (dv != dqk) os << "x" << dv;
    os << "_causal" << causal_name(causal);
    if (map == head_map::tile) os << "_tile";
    if (batch != 1) os << "_b" << batch;
    return os.str();
  }
};

void PrintTo(const sweep_case& c, std::ostream* os) { *os << c.name(); }

struct head_cfg {
  std::int64_t hq, hkv;
  head_map map;
};

std::vector<sweep_case> sweep_cases() {
  // MHA 4/4 (ratio 1; also xSQA 4/4 in H=16 framing), GQA 8/2 (ratio 4), MQA 8/1 (all),
  // SQA 8/4 (H=16), reverse SQA 2/8 (tile), tile map 8/2.
  const head_cfg heads[] = {{4, 4, head_map::interleave}, {8, 2, head_map::interleave},
                            {8, 1, head_map::interleave}, {8, 4, head_map::interleave},
                            {2, 8, head_map::tile},       {8, 2, head_map::tile}};
  const std::int64_t dims[] = {64, 80, 96, 128, 192};
  const causal_mode modes[] = {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left};
  // Both lengths <= 129: every causal mode, cycling through head configs and dims.
  const std::pair<std::int64_t, std::int64_t> small[] = {
      {1, 1},    {1, 7},    {1, 64},   {1, 129},  {7, 1},     {7, 7},     {7, 63},    {7, 129},
      {63, 63},  {63, 64},  {63, 65},  {63, 1},   {63, 127},  {64, 64},   {64, 63},   {64, 65},
      {64, 127}, {64, 1},   {65, 64},  {65, 65},  {65, 129},  {65, 7},    {127, 127}, {127, 1},
      {127, 64}, {127, 129}, {127, 65}, {129, 129}, {129, 7}, {129, 65},  {129, 127}, {129, 63}};
  // Pair p in mode m gets head config (p + 2m) mod 6 and dim (p + m) mod 5, so every causal mode
  // meets every head config and every dim.
  std::vector<sweep_case> out;
  std::size_t p = 0;
  for (const auto& [sq, skv] : small) {
    for (std::size_t m = 0; m < 3; ++m) {
      const head_cfg& h = heads[(p + 2 * m) % 6];
      const std::int64_t d = dims[(p + m) % 5];
      const std::int64_t batch = (3 * p + m) % 7 == 3 ? 2 : 1;
      out.push_back({batch, sq, skv, h.hq, h.hkv, d, d, modes[m], h.map});
    }
    ++p;
  }
  // One length is 1000: one causal mode each, modest heads/dims (the reference is O(sq·skv·d)).
  out.push_back({1, 1, 1000, 8, 2, 128, 128, causal_mode::bottom_right, head_map::interleave});
  out.push_back({1, 7, 1000, 8, 1, 96, 96, causal_mode::top_left, head_map::interleave});
  out.push_back({1, 129, 1000, 2, 8, 64, 64, causal_mode::none, head_map::tile});
  out.push_back({1, 1000, 1, 4, 4, 80, 80, causal_mode::bottom_right, head_map::interleave});
  out.push_back({1, 1000, 7, 8, 4, 64, 64, causal_mode::top_left, head_map::interleave});
  out.push_back({1, 1000, 129, 8, 2, 64, 64, causal_mode::bottom_right, head_map::interleave});
  out.push_back({1, 1000, 1000, 4, 4, 64, 64, causal_mode::bottom_right, head_map::interleave});
  out.push_back({1, 1000, 1000, 8, 2, 64, 64, causal_mode::top_left, head_map::interleave});
  // MLA-absorbed shape (dim_qk 576, dim_v 512), once.
  out.push_back({1, 65, 129, 8, 1, 576, 512, causal_mode::bottom_right, head_map::interleave});
  return out;
}

class AttentionSweep : public ::testing::TestWithParam<sweep_case> {};

TEST_P(AttentionSweep, MatchesReference) {
  const sweep_case& c = GetParam();
  problem_spec s;
  s.batch = c.batch;
  s.seq_q = c.sq;
  s.seq_kv = c.skv;
  s.heads_q = c.hq;
  s.heads_kv = c.hkv;
  s.dim_qk = c.dqk;
  s.dim_v = c.dv;
  s.map = c.map;
  attention_options o;
  o.causal = c.causal;
  expect_matches(compare_with_reference(s, o, std::hash<std::string>{}(c.name())), c.name());
}

INSTANTIATE_TEST_SUITE_P(Sweep, AttentionSweep, ::testing::ValuesIn(sweep_cases()),
                         [](const ::testing::TestParamInfo<sweep_case>& info) { return info.param.name(); });

// =============================================================================================
// Sliding windows and sink tokens
// =============================================================================================

struct window_case {
  std::int64_t sq, skv;
  std::int64_t left, right, sinks;
  causal_mode causal;
  [[nodiscard]] std::string name() const {
    auto v = [](std::int64_t x) { return x < 0 ? std::string("inf") : std::to_string(x); };
    return "sq" + std::to_string(sq) + "_skv" + std::to_string(skv) + "_wl" + v(left) + "_wr" + v(right) + "_sinks" +
           std::to_string(sinks) + "_causal" + causal_name(causal);
  }
};
void PrintTo(const window_case& c, std::ostream* os) { *os << c.name(); }

class WindowTest : public ::testing::TestWithParam<window_case> {};

TEST_P(WindowTest, MatchesReference) {
  const window_case& c = GetParam();
  problem_spec s;
  s.seq_q = c.sq;
  s.seq_kv = c.skv;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 64;
  attention_options o;
  o.causal = c.causal;
  o.window_left = c.left;
  o.window_right = c.right;
  o.sink_tokens = c.sinks;
  expect_matches(compare_with_reference(s, o, std::hash<std::string>{}(c.name())), c.name());
}

INSTANTIATE_TEST_SUITE_P(
    Windows, WindowTest,
    ::testing::Values(
        // no causal mask: bottom-right aligned window
        window_case{65, 129, 0, 0, 0, causal_mode::none}, window_case{65, 129, 3, 2, 0, causal_mode::none},
        window_case{129, 65, 0, -1, 0, causal_mode::none}, window_case{129, 65, -1, 0, 0, causal_mode::none},
        window_case{64, 64, -1, 5, 0, causal_mode::none}, window_case{64, 64, 16, 16, 0, causal_mode::none},
        window_case{7, 129, 200, -1, 0, causal_mode::none}, window_case{65, 129, 0, 0, 2, causal_mode::none},
        window_case{129, 129, 10, 3, 4, causal_mode::none},
        // bottom-right causal
        window_case{65, 129, 0, 0, 0, causal_mode::bottom_right},
        window_case{129, 129, 8, 0, 0, causal_mode::bottom_right},
        window_case{129, 65, 8, -1, 0, causal_mode::bottom_right},
        window_case{64, 127, 63, 0, 0, causal_mode::bottom_right},
        window_case{65, 129, 0, -1, 4, causal_mode::bottom_right},
        window_case{127, 129, 5, 0, 70, causal_mode::bottom_right},
        window_case{1, 1000, 31, 0, 4, causal_mode::bottom_right},
        window_case{65, 63, 16, 0, 200, causal_mode::bottom_right},
        // top-left causal
        window_case{65, 129, 0, 0, 0, causal_mode::top_left}, window_case{129, 65, 8, 0, 0, causal_mode::top_left},
        window_case{129, 129, 4, -1, 3, causal_mode::top_left}, window_case{7, 129, 2, 0, 1, causal_mode::top_left}),
    [](const ::testing::TestParamInfo<window_case>& info) { return info.param.name(); });

TEST(WindowTest, HugeWindowSidesAreUnbounded) {
  // INT64_MAX used as "no bound" must behave as -1, not overflow the band arithmetic.
  problem_spec s;
  s.seq_q = 37;
  s.seq_kv = 70;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 64;
  constexpr std::int64_t huge = std::numeric_limits<std::int64_t>::max();
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left}) {
    attention_options o;
    o.causal = c;
    dense_problem<float> a(s, 12), b(s, 12);
    a.run(o);
    o.window_left = huge;
    if (c == causal_mode::none) o.window_right = huge;
    b.run(o);
    b.run_reference(o);
    EXPECT_TRUE(AllClose(a.out_dense(), b.out_dense(), 0.0, kOutTol * a.max_abs_v)) << causal_name(c);
    expect_matches(b.compare(), std::string("huge window ") + causal_name(c));
  }
}

TEST(SinkTokens, WithoutWindowTheyChangeNothing) {
  // Sink tokens only lift the left window bound: with no window they are a no-op.
  problem_spec s;
  s.seq_q = 65;
  s.seq_kv = 129;
  s.heads_q = s.heads_kv = 4;
  s.dim_qk = s.dim_v = 64;
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left}) {
    attention_options o;
    o.causal = c;
    dense_problem<float> a(s, 11), b(s, 11);
    a.run(o);
    o.sink_tokens = 5;
    b.run(o);
    b.run_reference(o);
    EXPECT_TRUE(AllClose(a.out_dense(), b.out_dense(), 0.0, kOutTol * a.max_abs_v)) << causal_name(c);
    expect_matches(b.compare(), std::string("sinks=5 no window ") + causal_name(c));
  }
}

TEST(SinkTokens, MoreSinksThanKeys) {
  problem_spec s;
  s.seq_q = 33;
  s.seq_kv = 40;
  s.heads_q = 8;
  s.heads_kv = 1;
  s.dim_qk = s.dim_v = 96;
  attention_options o;
  o.causal = causal_mode::bottom_right;
  o.window_left = 3;
  o.sink_tokens = 1000;  // every key is a sink: equals plain causal
  expect_matches(compare_with_reference(s, o, 5), "sinks=1000");
  o.window_left = 0;
  o.sink_tokens = 40;
  expect_matches(compare_with_reference(s, o, 6), "sinks=40 window 0");
}

// =============================================================================================
// Per-head sink logits
// =============================================================================================

/// A row with no visible key but a sink logit has lse = the sink (up to f32 rounding of the
/// log2-domain round trip); -inf (no sink) must stay exactly -inf.
void expect_lse_is_sink(float lse, float sink) {
  if (sink == -kInf) {
    EXPECT_EQ(lse, -kInf);
  } else {
    EXPECT_NEAR(lse, sink, 1e-6f * std::max(1.0f, std::abs(sink)));
  }
}

TEST(SinkLogits, MatchReferenceIncludingNoSinkAndDominatingSink) {
  const float ninf = -kInf;
  const std::vector<float> sinks = {ninf, 0.0f, 1.5f, -3.0f, 100.0f, 2.0f, ninf, 0.5f};
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left}) {
    problem_spec s;
    s.seq_q = 65;
    s.seq_kv = 129;
    s.heads_q = 8;
    s.heads_kv = 2;
    s.dim_qk = s.dim_v = 64;
    dense_problem<float> p(s, 21);
    attention_options o;
    o.causal = c;
    o.sink_logits = tensor_view<const float, 1>(sinks.data(), {8});
    p.run(o);
    p.run_reference(o);
    expect_matches(p.compare(), std::string("sink logits ") + causal_name(c));
    // Head 4's sink (100) dominates every logit (|s| < ~10): out ~ 0, lse ~ 100.
    for (std::int64_t i = 0; i < s.seq_q; ++i) {
      EXPECT_NEAR(p.lse[static_cast<std::size_t>(4 * s.seq_q + i)], 100.0f, 1e-4f) << "row " << i;
      for (std::int64_t d = 0; d < s.dim_v; ++d) ASSERT_LE(std::abs(p.out.at(0, i, 4, d)), 1e-30f);
    }
  }
}

TEST(SinkLogits, TileMapAndFullyMaskedRows) {
  // Reverse SQA (tile): sink logits are per OUTPUT head (heads_out = heads_kv = 8). With
  // bottom-right causal and seq_q > seq_kv, the first rows see no key: out = 0 and lse = the
  // sink logit (-inf where there is no sink).
  const float ninf = -kInf;
  const std::vector<float> sinks = {0.25f, ninf, -1.0f, 3.0f, ninf, 0.0f, 7.0f, -2.0f};
  problem_spec s;
  s.seq_q = 70;
  s.seq_kv = 40;
  s.heads_q = 2;
  s.heads_kv = 8;
  s.dim_qk = s.dim_v = 80;
  s.map = head_map::tile;
  dense_problem<float> p(s, 22);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  o.sink_logits = tensor_view<const float, 1>(sinks.data(), {8});
  p.run(o);
  p.run_reference(o);
  expect_matches(p.compare(), "tile + sink logits");
  for (std::int64_t h = 0; h < 8; ++h)
    for (std::int64_t i = 0; i < 30; ++i) {
      expect_lse_is_sink(p.lse[static_cast<std::size_t>(h * 70 + i)], sinks[static_cast<std::size_t>(h)]);
      for (std::int64_t d = 0; d < 80; ++d) ASSERT_EQ(p.out.at(0, i, h, d), 0.0f) << h << "," << i << "," << d;
    }
}

// =============================================================================================
// Softcap, explicit scale, dims
// =============================================================================================

class SoftcapTest : public ::testing::TestWithParam<float> {};

TEST_P(SoftcapTest, LargeLogitsMatchReference) {
  const float cap = GetParam();
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
    problem_spec s;
    s.seq_q = 65;
    s.seq_kv = 129;
    s.heads_q = 8;
    s.heads_kv = 2;
    s.dim_qk = s.dim_v = 64;
    s.q_scale = 30.0f;  // raw logits ~ N(0, 30²), up to ~120: well into the cap's saturation
    attention_options o;
    o.causal = c;
    o.softcap = cap;
    if (c == causal_mode::bottom_right) o.window_left = 20;
    expect_matches(compare_with_reference(s, o, 31), "softcap " + std::to_string(cap), out_tol_for_logits(cap));
  }
}

INSTANTIATE_TEST_SUITE_P(Caps, SoftcapTest, ::testing::Values(30.0f, 50.0f, 5.0f),
                         [](const ::testing::TestParamInfo<float>& info) {
                           return "cap" + std::to_string(static_cast<int>(info.param));
                         });

TEST(Scale, ExplicitScaleMatchesReference) {
  for (const float scale : {0.05f, 0.3f, 1.0f, -0.25f}) {
    problem_spec s;
    s.seq_q = 63;
    s.seq_kv = 65;
    s.heads_q = 4;
    s.heads_kv = 4;
    s.dim_qk = s.dim_v = 64;
    attention_options o;
    o.scale = scale;
    o.causal = causal_mode::top_left;
    expect_matches(compare_with_reference(s, o, 41), "scale " + std::to_string(scale),
                   out_tol_for_logits(std::abs(scale) * 40.0));
  }
}

TEST(Scale, DefaultIsInverseSqrtDimQk) {
  // Default scale uses dim_qk (not dim_v): equal to passing 1/sqrt(dim_qk) explicitly.
  problem_spec s;
  s.seq_q = 17;
  s.seq_kv = 29;
  s.heads_q = s.heads_kv = 2;
  s.dim_qk = 192;
  s.dim_v = 128;
  dense_problem<float> a(s, 3), b(s, 3);
  a.run({});
  attention_options o;
  o.scale = static_cast<float>(1.0 / std::sqrt(192.0));
  b.run(o);
  EXPECT_TRUE(BitwiseEqual(a.out_dense(), b.out_dense()));
}

struct dims_case {
  std::int64_t dqk, dv;
};
class DimsTest : public ::testing::TestWithParam<dims_case> {};

TEST_P(DimsTest, DimQkDiffersFromDimV) {
  const auto [dqk, dv] = GetParam();
  problem_spec s;
  s.seq_q = 33;
  s.seq_kv = 70;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.dim_qk = dqk;
  s.dim_v = dv;
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
    attention_options o;
    o.causal = c;
    expect_matches(compare_with_reference(s, o, 51), "dims");
  }
}

INSTANTIATE_TEST_SUITE_P(Dims, DimsTest,
                         ::testing::Values(dims_case{64, 128}, dims_case{128, 64}, dims_case{192, 128},
                                           dims_case{7, 129}, dims_case{1, 3}, dims_case{129, 1},
                                           dims_case{80, 96}, dims_case{1, 1}),
                         [](const ::testing::TestParamInfo<dims_case>& info) {
                           return "dqk" + std::to_string(info.param.dqk) + "_dv" + std::to_string(info.param.dv);
                         });

// =============================================================================================
// Aliased and strided views
// =============================================================================================

class VAliasesK : public ::testing::TestWithParam<kv_dtype> {};

TEST_P(VAliasesK, PrefixOfK) {
  // Absorbed MLA: V is the first dim_v columns of K (same pointer, K's strides).
  for (const std::int64_t dv : {64, 96}) {
    problem_spec s;
    s.seq_q = 40;
    s.seq_kv = 90;
    s.heads_q = 8;
    s.heads_kv = 2;
    s.dim_qk = 96;
    s.dim_v = dv;
    s.dtype = GetParam();
    s.v_aliases_k = true;
    s.lay.pad_head = 3;
    attention_options o;
    o.causal = causal_mode::bottom_right;
    expect_matches(compare_with_reference(s, o, 61), s.str());
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, VAliasesK, ::testing::Values(kv_dtype::f32, kv_dtype::bf16, kv_dtype::f16),
                         [](const ::testing::TestParamInfo<kv_dtype>& info) { return dtype_name(info.param); });

struct layout_case {
  const char* name;
  layout lay;
  kv_dtype dtype;
};
void PrintTo(const layout_case& c, std::ostream* os) { *os << c.name; }

class StridedTest : public ::testing::TestWithParam<layout_case> {};

TEST_P(StridedTest, NonContiguousViewsMatchReference) {
  // Padding is filled with NaN in the inputs (reading it would poison the output) and with a
  // sentinel in out (writing it is detected).
  problem_spec s;
  s.batch = 2;
  s.seq_q = 65;
  s.seq_kv = 129;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.dim_qk = 80;
  s.dim_v = 64;
  s.lay = GetParam().lay;
  s.dtype = GetParam().dtype;
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
    attention_options o;
    o.causal = c;
    expect_matches(compare_with_reference(s, o, 71), s.str());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, StridedTest,
    ::testing::Values(layout_case{"pad_seq", {5, 0, 0, false}, kv_dtype::f32},
                      layout_case{"pad_head", {0, 3, 0, false}, kv_dtype::f32},
                      layout_case{"pad_batch", {0, 0, 17, false}, kv_dtype::f32},
                      layout_case{"pad_all", {7, 1, 33, false}, kv_dtype::f32},
                      layout_case{"bhsd", {0, 0, 0, true}, kv_dtype::f32},
                      layout_case{"bhsd_padded", {4, 2, 9, true}, kv_dtype::f32},
                      layout_case{"bhsd_bf16", {0, 0, 0, true}, kv_dtype::bf16},
                      layout_case{"pad_all_f16", {7, 1, 33, false}, kv_dtype::f16}),
    [](const ::testing::TestParamInfo<layout_case>& info) { return std::string(info.param.name); });

TEST(Strided, ResultDoesNotDependOnLayout) {
  // Same logical inputs in BSHD-contiguous and BHSD-padded memory give the same result.
  problem_spec s;
  s.batch = 3;
  s.seq_q = 20;
  s.seq_kv = 77;
  s.heads_q = 6;
  s.heads_kv = 3;
  s.dim_qk = 48;
  s.dim_v = 48;
  problem_spec t = s;
  t.lay = {3, 5, 11, true};
  attention_options o;
  o.causal = causal_mode::bottom_right;
  o.window_left = 30;
  dense_problem<float> a(s, 81), b(t, 81);
  a.run(o);
  b.run(o);
  EXPECT_TRUE(AllClose(a.out_dense(), b.out_dense(), 0.0, 1e-6 * a.max_abs_v));
  EXPECT_TRUE(AllClose(a.lse, b.lse, 1e-6, 0.0));
}

TEST(Strided, PaddedLseView) {
  problem_spec s;
  s.batch = 2;
  s.seq_q = 37;
  s.seq_kv = 50;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 32;
  dense_problem<float> p(s, 91);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  // lse as (batch, heads, seq) with seq stride 1, head stride seq+3, batch stride 4·(seq+3)+5.
  const std::int64_t hs = s.seq_q + 3, bs = 4 * hs + 5;
  std::vector<float> lse(static_cast<std::size_t>(2 * bs), kLseSentinel);
  headwise::attention(p.q_view(), p.k_view(), p.v_view(), p.out_view(), o,
                      tensor_view<float, 3>(lse.data(), {2, 4, s.seq_q}, {bs, hs, 1}));
  p.run_reference(o);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 4; ++h)
      for (std::int64_t i = 0; i < hs; ++i) {
        const float got = lse[static_cast<std::size_t>(b * bs + h * hs + i)];
        if (i >= s.seq_q) {
          EXPECT_EQ(got, kLseSentinel) << "lse padding written at " << b << "," << h << "," << i;
        } else {
          const float want = p.ref_lse[static_cast<std::size_t>((b * 4 + h) * s.seq_q + i)];
          EXPECT_NEAR(got, want, kLseRelTol * std::max(1.0f, std::abs(want)));
        }
      }
  EXPECT_EQ(lse[static_cast<std::size_t>(2 * bs - 1)], kLseSentinel);
}

// =============================================================================================
// Head maps: which KV head (and query head) each output head reads
// =============================================================================================

TEST(HeadMap, EachOutputHeadReadsTheRightKvHead) {
  // V is a distinct constant per KV head, so out[h] == c[kv(h)] whatever the softmax weights.
  struct cfg {
    std::int64_t hq, hkv;
    head_map map;
  };
  for (const cfg c : {cfg{8, 2, head_map::interleave}, cfg{8, 1, head_map::interleave},
                      cfg{8, 4, head_map::interleave}, cfg{8, 2, head_map::tile}, cfg{2, 8, head_map::tile},
                      cfg{4, 4, head_map::tile}}) {
    problem_spec s;
    s.seq_q = 9;
    s.seq_kv = 21;
    s.heads_q = c.hq;
    s.heads_kv = c.hkv;
    s.dim_qk = 16;
    s.dim_v = 8;
    s.map = c.map;
    dense_problem<float> p(s, 101);
    p.v.for_each([&](auto b, auto j, auto h, auto d) { p.v.at(b, j, h, d) = 10.0f * static_cast<float>(h + 1); });
    p.recompute_max_abs_v();
    attention_options o;
    o.causal = causal_mode::bottom_right;
    p.run(o);
    const std::int64_t ho = s.heads_out();
    for (std::int64_t h = 0; h < ho; ++h) {
      const std::int64_t kv = c.map == head_map::interleave ? h / (c.hq / c.hkv) : h % c.hkv;
      for (std::int64_t i = 0; i < s.seq_q; ++i)
        for (std::int64_t d = 0; d < s.dim_v; ++d)
          ASSERT_NEAR(p.out.at(0, i, h, d), 10.0f * static_cast<float>(kv + 1), 1e-5f * 10.0f * static_cast<float>(kv + 1))
              << "hq " << c.hq << " hkv " << c.hkv << (c.map == head_map::tile ? " tile" : " interleave")
              << ": out head " << h << " should read kv head " << kv;
    }
    // And the query head: out head h uses q head h mod hq (reference comparison).
    p.run_reference(o);
    expect_matches(p.compare(), s.str());
  }
}

// =============================================================================================
// Extreme logits and empty rows
// =============================================================================================

class LargeLogits : public ::testing::TestWithParam<kv_dtype> {};

TEST_P(LargeLogits, FiniteAndMatchReference) {
  // q ~ N(0, 300²), k ~ N(0, 1), d = 64, default scale 1/8: logits ~ N(0, 300²), max ~1e3.
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right}) {
    problem_spec s;
    s.seq_q = 129;
    s.seq_kv = 129;
    s.heads_q = 8;
    s.heads_kv = 2;
    s.dim_qk = s.dim_v = 64;
    s.q_scale = 300.0f;
    s.dtype = GetParam();
    attention_options o;
    o.causal = c;
    expect_matches(compare_with_reference(s, o, 111), s.str() + " " + causal_name(c), out_tol_for_logits(1200.0),
                   out_tol_for_logits(1200.0));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, LargeLogits, ::testing::Values(kv_dtype::f32, kv_dtype::bf16),
                         [](const ::testing::TestParamInfo<kv_dtype>& info) { return dtype_name(info.param); });

TEST(LargeLogits, AllLogitsHugeAndNegative) {
  // Every logit ~ -1e3 (no positive logit at all): max-subtraction must still normalise.
  problem_spec s;
  s.seq_q = 20;
  s.seq_kv = 100;
  s.heads_q = s.heads_kv = 2;
  s.dim_qk = s.dim_v = 64;
  dense_problem<float> p(s, 121);
  p.q.for_each([&](auto b, auto i, auto h, auto d) { p.q.at(b, i, h, d) = -40.0f; });
  p.k.for_each([&](auto b, auto j, auto h, auto d) { p.k.at(b, j, h, d) = 3.0f + 0.01f * static_cast<float>(j % 7); });
  attention_options o;
  p.run(o);
  p.run_reference(o);
  expect_matches(p.compare(), "logits ~ -1e3", out_tol_for_logits(1100.0));
  EXPECT_LT(p.lse[0], -900.0f);
}

/// Rows the reference reports empty (lse = -inf) must give exactly 0 and -inf.
template <class KV>
void expect_empty_rows_exact(dense_problem<KV>& p, std::int64_t expected_empty, const std::string& what) {
  const std::int64_t ho = p.spec.heads_out();
  std::int64_t empty = 0;
  for (std::int64_t b = 0; b < p.spec.batch; ++b)
    for (std::int64_t h = 0; h < ho; ++h)
      for (std::int64_t i = 0; i < p.spec.seq_q; ++i) {
        const std::size_t x = static_cast<std::size_t>((b * ho + h) * p.spec.seq_q + i);
        if (p.ref_lse[x] != -kInf) continue;
        ++empty;
        EXPECT_EQ(p.lse[x], -kInf) << what << ": lse of empty row b" << b << " h" << h << " i" << i;
        for (std::int64_t d = 0; d < p.spec.dim_v; ++d)
          ASSERT_EQ(p.out.at(b, i, h, d), 0.0f) << what << ": out of empty row b" << b << " h" << h << " i" << i;
      }
  EXPECT_EQ(empty, expected_empty) << what;
}

TEST(EmptyRows, BottomRightWithMoreQueriesThanKeys) {
  problem_spec s;
  s.seq_q = 129;
  s.seq_kv = 65;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 64;
  dense_problem<float> p(s, 131);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  p.run(o);
  p.run_reference(o);
  expect_matches(p.compare(), "BR sq129 skv65");
  expect_empty_rows_exact(p, 8 * 64, "BR sq129 skv65");  // rows 0..63 see no key
}

TEST(EmptyRows, WindowsThatMissEveryKey) {
  problem_spec s;
  s.seq_q = 40;
  s.seq_kv = 12;
  s.heads_q = 4;
  s.heads_kv = 1;
  s.dim_qk = s.dim_v = 32;
  {  // top-left, window 2: rows i >= 14 see keys [i-2, i] ∩ [0, 12) = {} 
    dense_problem<float> p(s, 141);
    attention_options o;
    o.causal = causal_mode::top_left;
    o.window_left = 2;
    p.run(o);
    p.run_reference(o);
    expect_matches(p.compare(), "TL window 2");
    expect_empty_rows_exact(p, 4 * (40 - 14), "TL window 2");
  }
  {  // no causal, window (0, 0) around the bottom-right diagonal: rows i < 28 see nothing
    dense_problem<float> p(s, 142);
    attention_options o;
    o.window_left = 0;
    o.window_right = 0;
    p.run(o);
    p.run_reference(o);
    expect_matches(p.compare(), "window (0,0)");
    expect_empty_rows_exact(p, 4 * 28, "window (0,0)");
  }
}

TEST(EmptyRows, ZeroKeys) {
  // seq_kv = 0 (with null K/V data): every row out = 0, lse = -inf.
  const std::int64_t B = 2, S = 9, H = 4, D = 16;
  std::vector<float> q = random_normal(B * S * H * D, 1), out(B * S * H * D, kOutSentinel), lse(B * H * S, 0.0f);
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left}) {
    std::fill(out.begin(), out.end(), kOutSentinel);
    std::fill(lse.begin(), lse.end(), 0.0f);
    attention_options o;
    o.causal = c;
    headwise::attention(headwise::bshd<const float>(q.data(), B, S, H, D),
                        headwise::bshd<const float>(nullptr, B, 0, 2, D), headwise::bshd<const float>(nullptr, B, 0, 2, D),
                        headwise::bshd(out.data(), B, S, H, D), o, headwise::bhs(lse.data(), B, H, S));
    for (const float x : out) ASSERT_EQ(x, 0.0f) << causal_name(c);
    for (const float x : lse) ASSERT_EQ(x, -kInf) << causal_name(c);
  }
  // With a sink logit: out = 0, lse = the sink.
  const std::vector<float> sinks = {1.0f, -kInf, 2.5f, 0.0f};
  attention_options o;
  o.sink_logits = tensor_view<const float, 1>(sinks.data(), {4});
  std::vector<float> kv(1, 0.0f);
  headwise::attention(headwise::bshd<const float>(q.data(), B, S, H, D), headwise::bshd<const float>(kv.data(), B, 0, 2, D),
                      headwise::bshd<const float>(kv.data(), B, 0, 2, D), headwise::bshd(out.data(), B, S, H, D), o,
                      headwise::bhs(lse.data(), B, H, S));
  for (const float x : out) ASSERT_EQ(x, 0.0f);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < S; ++i)
        expect_lse_is_sink(lse[static_cast<std::size_t>((b * H + h) * S + i)], sinks[static_cast<std::size_t>(h)]);
}

TEST(EmptyRows, ZeroQueriesIsANoOp) {
  const std::int64_t B = 2, S = 30, H = 4, D = 16;
  std::vector<float> k = random_normal(B * S * H * D, 2), v = random_normal(B * S * H * D, 3);
  std::vector<float> q(1, 1.0f), out(64, kOutSentinel), lse(64, kLseSentinel);
  for (const causal_mode c : {causal_mode::none, causal_mode::bottom_right, causal_mode::top_left}) {
    attention_options o;
    o.causal = c;
    headwise::attention(headwise::bshd<const float>(q.data(), B, 0, H, D), headwise::bshd<const float>(k.data(), B, S, H, D),
                        headwise::bshd<const float>(v.data(), B, S, H, D), headwise::bshd(out.data(), B, 0, H, D), o,
                        headwise::bhs(lse.data(), B, H, 0));
    headwise::attention(headwise::bshd<const float>(nullptr, B, 0, H, D), headwise::bshd<const float>(k.data(), B, S, H, D),
                        headwise::bshd<const float>(v.data(), B, S, H, D), headwise::bshd<float>(nullptr, B, 0, H, D), o,
                        headwise::bhs<float>(nullptr, B, H, 0));
  }
  for (const float x : out) ASSERT_EQ(x, kOutSentinel);
  for (const float x : lse) ASSERT_EQ(x, kLseSentinel);
}

// =============================================================================================
// Threads, blockings, identities
// =============================================================================================

TEST(Threads, ResultIsBitwiseIndependentOfThreadCount) {
  struct cfg {
    std::int64_t sq, skv, hq, hkv;
    head_map map;
    causal_mode causal;
    std::int64_t left;
  };
  for (const cfg c : {cfg{257, 300, 8, 2, head_map::interleave, causal_mode::bottom_right, -1},
                      cfg{1, 1000, 8, 1, head_map::interleave, causal_mode::bottom_right, -1},
                      cfg{100, 100, 2, 8, head_map::tile, causal_mode::none, 17},
                      cfg{130, 70, 4, 4, head_map::interleave, causal_mode::top_left, 9}}) {
    problem_spec s;
    s.batch = 2;
    s.seq_q = c.sq;
    s.seq_kv = c.skv;
    s.heads_q = c.hq;
    s.heads_kv = c.hkv;
    s.map = c.map;
    s.dim_qk = s.dim_v = 64;
    attention_options o;
    o.causal = c.causal;
    o.window_left = c.left;
    dense_problem<float> base(s, 151);
    o.num_threads = 1;
    base.run(o);
    for (const int nt : {2, 3, 0}) {
      dense_problem<float> p(s, 151);
      o.num_threads = nt;
      p.run(o);
      EXPECT_TRUE(BitwiseEqual(base.out_dense(), p.out_dense())) << s.str() << " threads " << nt;
      EXPECT_TRUE(BitwiseEqual(base.lse, p.lse)) << s.str() << " threads " << nt;
    }
  }
}

struct blocking_case {
  std::int64_t rows, block_kv;
};
class BlockedTest : public ::testing::TestWithParam<blocking_case> {};

TEST_P(BlockedTest, MatchesReference) {
  // decode tiles and KV splits follow block_kv, so small blockings also cut decode rows into splits
  const blocking blk{GetParam().rows, GetParam().block_kv, GetParam().block_kv, 3 * GetParam().block_kv};
  struct cfg {
    std::int64_t sq, skv, hq, hkv;
    causal_mode causal;
    std::int64_t left, sinks;
  };
  for (const cfg c : {cfg{129, 257, 8, 2, causal_mode::bottom_right, -1, 0}, cfg{65, 130, 4, 4, causal_mode::none, 20, 3},
                      cfg{100, 37, 8, 1, causal_mode::top_left, -1, 0}}) {
    problem_spec s;
    s.seq_q = c.sq;
    s.seq_kv = c.skv;
    s.heads_q = c.hq;
    s.heads_kv = c.hkv;
    s.dim_qk = 80;
    s.dim_v = 64;
    dense_problem<float> p(s, 161);
    attention_options o;
    o.causal = c.causal;
    o.window_left = c.left;
    o.sink_tokens = c.sinks;
    p.run_blocked(o, blk);
    p.run_reference(o);
    expect_matches(p.compare(), s.str() + " " + options_str(o) + " rows " + std::to_string(blk.rows) + " block_kv " +
                                    std::to_string(blk.block_kv));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Blockings, BlockedTest,
    ::testing::Values(blocking_case{16, 16}, blocking_case{16, 64}, blocking_case{16, 200}, blocking_case{64, 16},
                      blocking_case{64, 64}, blocking_case{64, 200}, blocking_case{128, 16}, blocking_case{128, 64},
                      blocking_case{128, 200}, blocking_case{1, 1}, blocking_case{7, 13}, blocking_case{3, 1000}),
    [](const ::testing::TestParamInfo<blocking_case>& info) {
      return "rows" + std::to_string(info.param.rows) + "_kv" + std::to_string(info.param.block_kv);
    });

TEST(Identities, ChunkedPrefillEqualsOneShot) {
  // Bottom-right causal: query rows [a, b) against the KV prefix [0, b + skv - sq) give the same
  // rows as the one-shot call (KV-cache chunked prefill; b - a = 1 is decode).
  problem_spec s;
  s.seq_q = 100;
  s.seq_kv = 160;
  s.heads_q = 8;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 64;
  dense_problem<float> full(s, 171);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  o.window_left = 50;
  o.sink_tokens = 2;
  full.run(o);
  const std::int64_t cuts[] = {0, 1, 37, 64, 99, 100};
  for (std::size_t c = 0; c + 1 < std::size(cuts); ++c) {
    const std::int64_t a = cuts[c], b = cuts[c + 1], kv_len = b + s.seq_kv - s.seq_q;
    const std::int64_t n = b - a;
    std::vector<float> out(static_cast<std::size_t>(n * 8 * 64)), lse(static_cast<std::size_t>(8 * n));
    auto q = full.q_view();
    q.data += a * q.stride[1];
    q.shape[1] = n;
    auto k = full.k_view(), v = full.v_view();
    k.shape[1] = v.shape[1] = kv_len;
    headwise::attention(q, k, v, headwise::bshd(out.data(), 1, n, 8, 64), o, headwise::bhs(lse.data(), 1, 8, n));
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t h = 0; h < 8; ++h) {
        const std::size_t row = static_cast<std::size_t>((i * 8 + h) * 64);
        std::vector<float> want(64);
        for (std::int64_t d = 0; d < 64; ++d) want[static_cast<std::size_t>(d)] = full.out.at(0, a + i, h, d);
        ASSERT_TRUE(AllClose(out.data() + row, want.data(), 64, 0.0, 2 * kOutTol * full.max_abs_v))
            << "chunk [" << a << "," << b << ") row " << a + i << " head " << h;
        EXPECT_NEAR(lse[static_cast<std::size_t>(h * n + i)], full.lse[static_cast<std::size_t>(h * 100 + a + i)],
                    1e-5f * std::max(1.0f, std::abs(full.lse[static_cast<std::size_t>(h * 100 + a + i)])));
      }
  }
}

TEST(Identities, BatchesAreIndependent) {
  // Batch entry b of a batched call equals the same problem run alone.
  problem_spec s;
  s.batch = 3;
  s.seq_q = 31;
  s.seq_kv = 45;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.dim_qk = s.dim_v = 32;
  dense_problem<float> p(s, 181);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  p.run(o);
  for (std::int64_t b = 0; b < 3; ++b) {
    auto q = p.q_view();
    auto k = p.k_view();
    auto v = p.v_view();
    q.data += b * q.stride[0];
    k.data += b * k.stride[0];
    v.data += b * v.stride[0];
    q.shape[0] = k.shape[0] = v.shape[0] = 1;
    std::vector<float> out(static_cast<std::size_t>(31 * 4 * 32));
    headwise::attention(q, k, v, headwise::bshd(out.data(), 1, 31, 4, 32), o);
    std::vector<float> want;
    for (std::int64_t i = 0; i < 31; ++i)
      for (std::int64_t h = 0; h < 4; ++h)
        for (std::int64_t d = 0; d < 32; ++d) want.push_back(p.out.at(b, i, h, d));
    EXPECT_TRUE(BitwiseEqual(out, want)) << "batch " << b;
  }
}

// =============================================================================================
// bf16 / f16 K/V
// =============================================================================================

struct dtype_case {
  kv_dtype dtype;
  std::int64_t sq, skv, hq, hkv, d;
  causal_mode causal;
  std::int64_t left;
  [[nodiscard]] std::string name() const {
    return std::string(dtype_name(dtype)) + "_sq" + std::to_string(sq) + "_skv" + std::to_string(skv) + "_hq" +
           std::to_string(hq) + "_hkv" + std::to_string(hkv) + "_d" + std::to_string(d) + "_causal" +
           causal_name(causal) + (left >= 0 ? "_wl" + std::to_string(left) : std::string());
  }
};
void PrintTo(const dtype_case& c, std::ostream* os) { *os << c.name(); }

class KvDtypeTest : public ::testing::TestWithParam<dtype_case> {};

TEST_P(KvDtypeTest, MatchesReferenceOnStoredValues) {
  const dtype_case& c = GetParam();
  problem_spec s;
  s.batch = 2;
  s.seq_q = c.sq;
  s.seq_kv = c.skv;
  s.heads_q = c.hq;
  s.heads_kv = c.hkv;
  s.dim_qk = s.dim_v = c.d;
  s.dtype = c.dtype;
  attention_options o;
  o.causal = c.causal;
  o.window_left = c.left;
  expect_matches(compare_with_reference(s, o, std::hash<std::string>{}(c.name())), c.name());
}

std::vector<dtype_case> dtype_cases() {
  std::vector<dtype_case> v;
  for (const kv_dtype t : {kv_dtype::bf16, kv_dtype::f16}) {
    v.push_back({t, 65, 129, 8, 2, 128, causal_mode::bottom_right, -1});
    v.push_back({t, 129, 65, 8, 1, 80, causal_mode::top_left, -1});
    v.push_back({t, 64, 64, 4, 4, 96, causal_mode::none, -1});
    v.push_back({t, 1, 300, 8, 2, 64, causal_mode::bottom_right, -1});
    v.push_back({t, 63, 127, 8, 4, 192, causal_mode::bottom_right, 20});
    v.push_back({t, 7, 33, 2, 1, 7, causal_mode::none, -1});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(KvDtypes, KvDtypeTest, ::testing::ValuesIn(dtype_cases()),
                         [](const ::testing::TestParamInfo<dtype_case>& info) { return info.param.name(); });

TEST(KvDtypes, ExtremeStoredValues) {
  // f16 K/V holding +-65504 (max finite), subnormals and +-0 next to ordinary values: the kernel
  // must read the exact stored values (the reference uses the scalar to_float).
  problem_spec s;
  s.seq_q = 16;
  s.seq_kv = 40;
  s.heads_q = s.heads_kv = 2;
  s.dim_qk = s.dim_v = 24;
  s.dtype = kv_dtype::f16;
  s.q_scale = 1e-4f;  // keeps logits O(1) although K holds 65504
  dense_problem<f16> p(s, 191);
  const std::uint16_t specials[] = {0x0001, 0x03FF, 0x8000, 0x0000, 0x7BFF, 0xFBFF, 0x0400, 0x8001};
  std::size_t n = 0;
  p.k.for_each([&](auto b, auto j, auto h, auto d) {
    if ((j + 2 * d) % 7 == 0) p.k.at(b, j, h, d) = f16{specials[n++ % 8]};
  });
  p.v.for_each([&](auto b, auto j, auto h, auto d) {
    if ((j + d) % 5 == 0) p.v.at(b, j, h, d) = f16{specials[n++ % 8]};
  });
  p.recompute_max_abs_v();
  ASSERT_EQ(p.max_abs_v, 65504.0);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  p.run(o);
  p.run_reference(o);
  expect_matches(p.compare(), "f16 extreme values");
}

}  // namespace
