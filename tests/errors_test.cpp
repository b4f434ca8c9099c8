// Bad input: every case throws headwise::argument_error (a std::invalid_argument) naming the
// argument, before any work: no buffer (out, lse, or anything an output aliases) changes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/testing.hpp"

namespace {

using headwise::argument_error;
using headwise::attention_options;
using headwise::causal_mode;
using headwise::head_map;
using headwise::tensor_view;
using hwt::kInf;
using hwt::kNaN;
using ::testing::HasSubstr;

static_assert(std::is_base_of_v<std::invalid_argument, argument_error>);

constexpr std::int64_t B = 2, SQ = 5, SK = 7, HQ = 4, HK = 2, D = 8;
constexpr std::size_t kBuf = 4096;  // every backing buffer: large enough for any view below

/// One call's arguments over owned backing buffers (valid by default).
struct call {
  std::vector<float> qb, kb, vb, ob, lb, sb;
  tensor_view<const float, 4> q, k, v;
  tensor_view<float, 4> out;
  tensor_view<float, 3> lse;
  attention_options o;

  call() : qb(hwt::random_normal(kBuf, 1)), kb(hwt::random_normal(kBuf, 2)), vb(hwt::random_normal(kBuf, 3)),
           ob(kBuf, hwt::kOutSentinel), lb(kBuf, hwt::kLseSentinel), sb(64, 0.5f) {
    q = headwise::bshd<const float>(qb.data(), B, SQ, HQ, D);
    k = headwise::bshd<const float>(kb.data(), B, SK, HK, D);
    v = headwise::bshd<const float>(vb.data(), B, SK, HK, D);
    out = headwise::bshd(ob.data(), B, SQ, HQ, D);
    lse = headwise::bhs(lb.data(), B, HQ, SQ);
  }
  call(const call&) = delete;
  call& operator=(const call&) = delete;

  /// Re-shapes the head counts (contiguous views, same buffers).
  void heads(std::int64_t hq, std::int64_t hkv, std::int64_t hout, head_map map) {
    q = headwise::bshd<const float>(qb.data(), B, SQ, hq, D);
    k = headwise::bshd<const float>(kb.data(), B, SK, hkv, D);
    v = headwise::bshd<const float>(vb.data(), B, SK, hkv, D);
    out = headwise::bshd(ob.data(), B, SQ, hout, D);
    lse = headwise::bhs(lb.data(), B, hout, SQ);
    o.heads = map;
  }
  void run() const { headwise::attention(q, k, v, out, o, lse); }
  void run_reference() const { headwise::reference::attention(q, k, v, out, o, lse); }
  [[nodiscard]] std::vector<std::vector<float>> snapshot() const { return {qb, kb, vb, ob, lb, sb}; }
};

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0)
      return false;
  return true;
}

/// Runs f, expecting argument_error whose argument() and what() contain `arg` (and what()
/// contains `extra`), with every buffer unchanged.
template <class F>
void expect_argument_error(const call& c, F&& f, const std::string& arg, const std::string& extra = "") {
  const auto before = c.snapshot();
  try {
    f();
    ADD_FAILURE() << "no exception; expected one naming '" << arg << "'";
  } catch (const argument_error& e) {
    EXPECT_THAT(e.argument(), HasSubstr(arg));
    EXPECT_THAT(std::string(e.what()), HasSubstr(arg));
    EXPECT_THAT(std::string(e.what()), HasSubstr("expected"));
    if (!extra.empty()) {
      EXPECT_THAT(std::string(e.what()), HasSubstr(extra));
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
  EXPECT_TRUE(same_bits(before, c.snapshot())) << "a buffer was modified before the error was reported";
}

// =============================================================================================
// One ctest case per bad input
// =============================================================================================

struct bad_case {
  const char* name;
  std::function<void(call&)> mutate;
  const char* arg;
  const char* extra = "";
};
void PrintTo(const bad_case& c, std::ostream* os) { *os << c.name; }

std::vector<bad_case> bad_cases() {
  const float nan = kNaN;
  return {
      // null data with nonzero sizes
      {"null_q", [](call& c) { c.q.data = nullptr; }, "q.data", "nullptr"},
      {"null_k", [](call& c) { c.k.data = nullptr; }, "k.data"},
      {"null_v", [](call& c) { c.v.data = nullptr; }, "v.data"},
      {"null_out", [](call& c) { c.out.data = nullptr; }, "out.data"},
      // zero or negative batch / heads / dims, negative seq
      {"zero_batch", [](call& c) { c.q.shape[0] = 0; }, "q.shape[0]"},
      {"negative_batch_k", [](call& c) { c.k.shape[0] = -1; }, "k.shape[0]"},
      {"zero_heads_q", [](call& c) { c.q.shape[2] = 0; }, "q.shape[2]"},
      {"negative_heads_kv", [](call& c) { c.k.shape[2] = -2; }, "k.shape[2]"},
      {"zero_heads_v", [](call& c) { c.v.shape[2] = 0; }, "v.shape[2]"},
      {"zero_heads_out", [](call& c) { c.out.shape[2] = 0; }, "out.shape[2]"},
      {"zero_dim_qk", [](call& c) { c.q.shape[3] = 0; }, "q.shape[3]"},
      {"zero_dim_k", [](call& c) { c.k.shape[3] = 0; }, "k.shape[3]"},
      {"negative_dim_v", [](call& c) { c.v.shape[3] = -8; }, "v.shape[3]"},
      {"zero_dim_out", [](call& c) { c.out.shape[3] = 0; }, "out.shape[3]"},
      {"negative_seq_q", [](call& c) { c.q.shape[1] = -1; }, "q.shape[1]"},
      {"negative_seq_kv", [](call& c) { c.k.shape[1] = -1; }, "k.shape[1]"},
      {"negative_seq_v", [](call& c) { c.v.shape[1] = -3; }, "v.shape[1]"},
      {"negative_seq_out", [](call& c) { c.out.shape[1] = -1; }, "out.shape[1]"},
      // the dim axis must be contiguous
      {"q_dim_stride", [](call& c) { c.q.stride[3] = 2; }, "q.stride[3]"},
      {"k_dim_stride", [](call& c) { c.k.stride[3] = 2; }, "k.stride[3]"},
      {"v_dim_stride", [](call& c) { c.v.stride[3] = -1; }, "v.stride[3]"},
      {"out_dim_stride", [](call& c) { c.out.stride[3] = 2; }, "out.stride[3]"},
      // shape mismatches
      {"k_batch", [](call& c) { c.k.shape[0] = 1; }, "k.shape[0]"},
      {"v_batch", [](call& c) { c.v.shape[0] = 1; }, "v.shape[0]"},
      {"out_batch", [](call& c) { c.out.shape[0] = 1; }, "out.shape[0]"},
      {"v_seq_kv", [](call& c) { c.v.shape[1] = 6; }, "v.shape[1]"},
      {"v_heads_kv", [](call& c) { c.v.shape[2] = 1; }, "v.shape[2]"},
      {"k_dim_qk", [](call& c) { c.k.shape[3] = 6; }, "k.shape[3]"},
      {"out_dim_v", [](call& c) { c.out.shape[3] = 7; }, "out.shape[3]"},
      {"out_seq_q", [](call& c) { c.out.shape[1] = 4; }, "out.shape[1]"},
      {"out_heads", [](call& c) { c.out.shape[2] = 2; }, "out.shape[2]"},
      // head maps
      {"interleave_not_divisible", [](call& c) { c.heads(6, 4, 6, head_map::interleave); }, "k.shape[2]"},
      {"interleave_more_kv_heads", [](call& c) { c.heads(2, 4, 2, head_map::interleave); }, "k.shape[2]", "tile"},
      {"tile_not_divisible", [](call& c) { c.heads(6, 4, 6, head_map::tile); }, "k.shape[2]"},
      {"tile_out_heads_wrong", [](call& c) { c.heads(2, 4, 2, head_map::tile); }, "out.shape[2]"},
      {"invalid_head_map", [](call& c) { c.o.heads = static_cast<head_map>(7); }, "options.heads"},
      // lse
      {"lse_batch", [](call& c) { c.lse.shape[0] = 1; }, "lse.shape[0]"},
      {"lse_heads", [](call& c) { c.lse.shape[1] = 3; }, "lse.shape[1]"},
      {"lse_seq", [](call& c) { c.lse.shape[2] = 4; }, "lse.shape[2]"},
      {"lse_seq_stride", [](call& c) { c.lse.stride[2] = 2; }, "lse.stride[2]"},
      {"lse_null_with_shape", [](call& c) { c.lse.data = nullptr; }, "lse.data"},
      // options
      {"window_left", [](call& c) { c.o.window_left = -2; }, "options.window_left"},
      {"window_right", [](call& c) { c.o.window_right = -5; }, "options.window_right"},
      {"causal_br_window_right",
       [](call& c) {
         c.o.causal = causal_mode::bottom_right;
         c.o.window_right = 1;
       },
       "options.window_right"},
      {"causal_tl_window_right",
       [](call& c) {
         c.o.causal = causal_mode::top_left;
         c.o.window_right = 3;
       },
       "options.window_right"},
      {"invalid_causal", [](call& c) { c.o.causal = static_cast<causal_mode>(9); }, "options.causal"},
      {"sink_tokens", [](call& c) { c.o.sink_tokens = -1; }, "options.sink_tokens"},
      {"sink_logits_length",
       [](call& c) { c.o.sink_logits = tensor_view<const float, 1>(c.sb.data(), {3}); }, "options.sink_logits"},
      {"sink_logits_nan",
       [nan](call& c) {
         c.sb[2] = nan;
         c.o.sink_logits = tensor_view<const float, 1>(c.sb.data(), {HQ});
       },
       "options.sink_logits[2]"},
      {"sink_logits_pos_inf",
       [](call& c) {
         c.sb[3] = kInf;
         c.o.sink_logits = tensor_view<const float, 1>(c.sb.data(), {HQ});
       },
       "options.sink_logits[3]"},
      {"sink_logits_stride",
       [](call& c) { c.o.sink_logits = tensor_view<const float, 1>(c.sb.data(), {HQ}, {2}); }, "options.sink_logits"},
      {"sink_logits_null_with_shape",
       [](call& c) { c.o.sink_logits = tensor_view<const float, 1>(nullptr, {HQ}); }, "options.sink_logits"},
      {"scale_nan", [nan](call& c) { c.o.scale = nan; }, "options.scale"},
      {"scale_inf", [](call& c) { c.o.scale = kInf; }, "options.scale"},
      {"scale_neg_inf", [](call& c) { c.o.scale = -kInf; }, "options.scale"},
      {"softcap_negative", [](call& c) { c.o.softcap = -1.0f; }, "options.softcap"},
      {"softcap_nan", [nan](call& c) { c.o.softcap = nan; }, "options.softcap"},
      {"softcap_inf", [](call& c) { c.o.softcap = kInf; }, "options.softcap"},
      // 1/cap would be +inf (0·inf = NaN for a zero logit), cap·log2(e) would be +inf.
      {"softcap_subnormal", [](call& c) { c.o.softcap = 1e-40f; }, "options.softcap"},
      {"softcap_huge", [](call& c) { c.o.softcap = 3e38f; }, "options.softcap"},
      {"num_threads", [](call& c) { c.o.num_threads = -1; }, "options.num_threads"},
      // aliasing: outputs may not overlap inputs or each other
      {"out_aliases_q", [](call& c) { c.out.data = c.qb.data(); }, "out", "'q'"},
      {"out_overlaps_q_partially", [](call& c) { c.out.data = c.qb.data() + 300; }, "out", "'q'"},
      {"out_aliases_k", [](call& c) { c.out.data = c.kb.data() + 17; }, "out", "'k'"},
      {"out_aliases_v", [](call& c) { c.out.data = c.vb.data() + 200; }, "out", "'v'"},
      {"out_aliases_sink_logits",
       [](call& c) {
         c.o.sink_logits = tensor_view<const float, 1>(c.ob.data() + 5, {HQ});
       },
       "out", "sink_logits"},
      {"lse_aliases_out", [](call& c) { c.lse.data = c.ob.data() + 3; }, "lse", "'out'"},
      {"lse_aliases_q", [](call& c) { c.lse.data = c.qb.data(); }, "lse", "'q'"},
      {"lse_aliases_k", [](call& c) { c.lse.data = c.kb.data() + 100; }, "lse", "'k'"},
      {"lse_aliases_v", [](call& c) { c.lse.data = c.vb.data() + 1; }, "lse", "'v'"},
      // outputs whose strides overlap themselves
      {"out_head_stride_zero", [](call& c) { c.out.stride[2] = 0; }, "out.stride"},
      {"out_seq_stride_overlaps_heads", [](call& c) { c.out.stride[1] = D; }, "out.stride"},
      {"out_batch_stride_zero", [](call& c) { c.out.stride[0] = 0; }, "out.stride"},
      {"out_head_stride_smaller_than_dim", [](call& c) { c.out.stride[2] = D - 1; }, "out.stride"},
      {"lse_head_stride_zero", [](call& c) { c.lse.stride[1] = 0; }, "lse.stride"},
      // sizes whose element offsets overflow 64 bits
      {"overflowing_stride", [](call& c) { c.k.stride[1] = std::numeric_limits<std::int64_t>::max() / 2; },
       "k.shape"},
  };
}

class BadInput : public ::testing::TestWithParam<bad_case> {};

TEST_P(BadInput, ThrowsNamingTheArgumentAndLeavesBuffersUntouched) {
  call c;
  GetParam().mutate(c);
  expect_argument_error(c, [&] { c.run(); }, GetParam().arg, GetParam().extra);
  // attention_blocked and the reference validate identically.
  expect_argument_error(
      c, [&] { headwise::attention_blocked(c.q, c.k, c.v, c.out, c.o, c.lse, headwise::engine::blocking{16, 16}); },
      GetParam().arg, GetParam().extra);
  expect_argument_error(c, [&] { c.run_reference(); }, GetParam().arg, GetParam().extra);
}

INSTANTIATE_TEST_SUITE_P(Cases, BadInput, ::testing::ValuesIn(bad_cases()),
                         [](const ::testing::TestParamInfo<bad_case>& info) { return std::string(info.param.name); });

// =============================================================================================
// Other checks
// =============================================================================================

TEST(Errors, IsAnInvalidArgument) {
  call c;
  c.o.window_left = -3;
  EXPECT_THROW(c.run(), std::invalid_argument);
  try {
    c.run();
  } catch (const std::invalid_argument& e) {
    // Function, argument, expectation and the given value all appear in the message.
    const std::string w = e.what();
    EXPECT_THAT(w, HasSubstr("headwise::attention"));
    EXPECT_THAT(w, HasSubstr("options.window_left"));
    EXPECT_THAT(w, HasSubstr("-3"));
  }
}

TEST(Errors, BlockedRejectsBadBlocking) {
  call c;
  for (const headwise::engine::blocking blk : {headwise::engine::blocking{0, 64}, headwise::engine::blocking{64, 0},
                                               headwise::engine::blocking{-1, 16}}) {
    expect_argument_error(c, [&] { headwise::attention_blocked(c.q, c.k, c.v, c.out, c.o, c.lse, blk); }, "blk");
  }
}

TEST(Errors, Bf16AndF16KvAreValidatedToo) {
  call c;
  std::vector<headwise::bf16> kb(kBuf), vb(kBuf);
  std::vector<headwise::f16> kh(kBuf), vh(kBuf);
  auto kbv = headwise::bshd<const headwise::bf16>(kb.data(), B, SK, HK, D);
  auto vbv = headwise::bshd<const headwise::bf16>(vb.data(), B, SK - 1, HK, D);
  expect_argument_error(c, [&] { headwise::attention(c.q, kbv, vbv, c.out, c.o, c.lse); }, "v.shape[1]");
  auto khv = headwise::bshd<const headwise::f16>(kh.data(), B, SK, HK, D);
  auto vhv = headwise::bshd<const headwise::f16>(vh.data(), B, SK, HK, D);
  khv.stride[3] = 3;
  expect_argument_error(c, [&] { headwise::attention(c.q, khv, vhv, c.out, c.o, c.lse); }, "k.stride[3]");
  khv.stride[3] = 1;
  c.out.data = reinterpret_cast<float*>(vh.data());  // out overlaps the f16 V storage
  expect_argument_error(c, [&] { headwise::attention(c.q, khv, vhv, c.out, c.o, c.lse); }, "out", "'v'");
}

// =============================================================================================
// Accepted inputs
// =============================================================================================

TEST(Accepted, VAliasingKMatchesReference) {
  call c;
  c.v = tensor_view<const float, 4>(c.kb.data(), {B, SK, HK, 5}, c.k.stride);  // V = K[..., :5]
  c.out = headwise::bshd(c.ob.data(), B, SQ, HQ, 5);
  c.o.causal = causal_mode::bottom_right;
  EXPECT_NO_THROW(c.run());
  std::vector<float> ref(static_cast<std::size_t>(B * SQ * HQ * 5)), ref_lse(static_cast<std::size_t>(B * HQ * SQ));
  headwise::reference::attention(c.q, c.k, c.v, headwise::bshd(ref.data(), B, SQ, HQ, 5), c.o,
                                 headwise::bhs(ref_lse.data(), B, HQ, SQ));
  EXPECT_TRUE(hwt::AllClose(c.ob.data(), ref.data(), ref.size(), 0.0, 1e-4));
  EXPECT_TRUE(hwt::AllClose(c.lb.data(), ref_lse.data(), ref_lse.size(), 1e-5, 1e-5));
  // V == K exactly (same view) is fine too.
  c.v = c.k;
  c.out = headwise::bshd(c.ob.data(), B, SQ, HQ, D);
  EXPECT_NO_THROW(c.run());
}

TEST(Accepted, EmptyTensorsMayHaveNullData) {
  call c;
  // seq_q = 0: q, out, lse null.
  EXPECT_NO_THROW(headwise::attention(headwise::bshd<const float>(nullptr, B, 0, HQ, D), c.k, c.v,
                                      headwise::bshd<float>(nullptr, B, 0, HQ, D), c.o,
                                      headwise::bhs<float>(nullptr, B, HQ, 0)));
  // seq_kv = 0: k, v null; out = 0, lse = -inf.
  EXPECT_NO_THROW(headwise::attention(c.q, headwise::bshd<const float>(nullptr, B, 0, HK, D),
                                      headwise::bshd<const float>(nullptr, B, 0, HK, D), c.out, c.o, c.lse));
  for (std::int64_t i = 0; i < B * SQ * HQ * D; ++i) ASSERT_EQ(c.ob[static_cast<std::size_t>(i)], 0.0f);
  for (std::int64_t i = 0; i < B * HQ * SQ; ++i) ASSERT_EQ(c.lb[static_cast<std::size_t>(i)], -kInf);
  EXPECT_EQ(c.ob[static_cast<std::size_t>(B * SQ * HQ * D)], hwt::kOutSentinel);
  EXPECT_EQ(c.lb[static_cast<std::size_t>(B * HQ * SQ)], hwt::kLseSentinel);
  // Absent lse and absent sink logits.
  EXPECT_NO_THROW(headwise::attention(c.q, c.k, c.v, c.out, c.o));
}

TEST(Accepted, BoundaryOptionValues) {
  call c;
  c.o.causal = causal_mode::bottom_right;
  c.o.window_left = 0;
  c.o.window_right = 0;  // allowed with causal
  c.o.sink_tokens = 1000;
  c.o.softcap = 0.0f;
  c.o.num_threads = 0;
  c.o.scale = -0.5f;  // any finite scale
  const std::vector<float> sinks = {-kInf, -kInf, 0.0f, 1e30f};
  c.o.sink_logits = tensor_view<const float, 1>(sinks.data(), {HQ});
  EXPECT_NO_THROW(c.run());
  for (std::int64_t i = 0; i < B * SQ * HQ * D; ++i) ASSERT_TRUE(std::isfinite(c.ob[static_cast<std::size_t>(i)]));
}

TEST(Accepted, InputsMayHaveAnyStrides) {
  // Inputs (not outputs) may overlap themselves or run backwards: K with head stride 0 (all KV
  // heads share one K) and V with a negative seq stride (reversed).
  call c;
  auto k = c.k;
  k.stride[2] = 0;
  auto v = c.v;
  v.data = c.vb.data() + (SK - 1) * v.stride[1];
  v.stride[1] = -v.stride[1];
  c.o.causal = causal_mode::top_left;
  EXPECT_NO_THROW(headwise::attention(c.q, k, v, c.out, c.o, c.lse));
  std::vector<float> ref(static_cast<std::size_t>(B * SQ * HQ * D)), ref_lse(static_cast<std::size_t>(B * HQ * SQ));
  headwise::reference::attention(c.q, k, v, headwise::bshd(ref.data(), B, SQ, HQ, D), c.o,
                                 headwise::bhs(ref_lse.data(), B, HQ, SQ));
  EXPECT_TRUE(hwt::AllClose(c.ob.data(), ref.data(), ref.size(), 0.0, 1e-4));
  EXPECT_TRUE(hwt::AllClose(c.lb.data(), ref_lse.data(), ref_lse.size(), 1e-5, 1e-5));
}

}  // namespace
