// KV caches: paged and ragged (varlen) batches, chunked prefill with a growing cache, the append
// helpers, and their bad input.
//   * paged == contiguous: attention_paged / attention_paged_varlen over pages scattered by a
//     shuffled block table equal per-sequence headwise::attention on contiguous views holding the
//     same stored values (bitwise: the engine cuts the same tiles either way, only where the rows
//     come from differs; and within tolerance, to say how far off a failure is);
//   * varlen == a loop over the sequences (lse laid out as (heads, total_q));
//   * chunked prefill (kv_cache_append / paged_kv_append, then attention on the new chunk) ==
//     one-shot prefill over the same stored K/V;
//   * convert / kv_cache_append / paged_kv_append write exactly the right slots, round to nearest
//     even, and nothing else;
//   * every result above is bitwise independent of the thread count;
//   * bad input: argument_error naming the argument, outputs untouched.
// Tolerances: attention_test.cpp's (common/testing.hpp); two kernel results are compared with
// twice kOutTol·max|V| (out) and twice kLseRelTol (lse).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "common/testing.hpp"

namespace {

using namespace hwt;
using headwise::paged_kv;

constexpr double kPairOutTol = 2 * kOutTol;     ///< two kernel results, in units of max|V|
constexpr double kPairLseTol = 2 * kLseRelTol;  ///< two kernel results, relative to max(1, |lse|)

::testing::AssertionResult LseClose(const float* a, const float* b, std::size_t n, double rel) {
  for (std::size_t i = 0; i < n; ++i) {
    if (a[i] == b[i]) continue;
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= rel * std::max(1.0, std::abs(double(b[i])))))
      return ::testing::AssertionFailure() << "lse index " << i << ": " << a[i] << " vs " << b[i];
  }
  return ::testing::AssertionSuccess();
}

template <class T>
double max_abs(const std::vector<T>& v) {
  double m = 0;
  for (const T& x : v) m = std::max(m, std::abs(static_cast<double>(headwise::to_float(x))));
  return m > 0 ? m : 1.0;
}

/// What is switched on besides the causal mask: nothing, or window + sinks + sink logits + softcap.
enum class extra { plain, all };

/// Options: causal `c`; with extra::all a left window of 50, 3 sink tokens, sink logits (one
/// -inf) and softcap 20, held alive by `sinks`.
attention_options make_options(causal_mode c, extra x, std::int64_t heads_out, std::vector<float>& sinks) {
  attention_options o;
  o.causal = c;
  if (x == extra::all) {
    o.window_left = 50;
    o.sink_tokens = 3;
    o.softcap = 20.0f;
    sinks = random_uniform(static_cast<std::size_t>(heads_out), 99, -1.0f, 3.0f);
    sinks[1] = -kInf;
    o.sink_logits = tensor_view<const float, 1>(sinks.data(), {heads_out});
  }
  return o;
}

/// One sequence's K/V, stored T, contiguous [len, heads_kv, dim] (never an empty buffer).
template <class T>
struct seq_kv {
  std::int64_t len;
  std::vector<T> k, v;
};

template <class T>
std::vector<seq_kv<T>> make_sequences(const std::vector<std::int64_t>& lens, std::int64_t hkv, std::int64_t dqk,
                                      std::int64_t dv, std::uint64_t seed) {
  std::vector<seq_kv<T>> s;
  for (const std::int64_t len : lens) {
    s.push_back({len, random_stored<T>(static_cast<std::size_t>(std::max<std::int64_t>(1, len * hkv * dqk)), seed),
                 random_stored<T>(static_cast<std::size_t>(std::max<std::int64_t>(1, len * hkv * dv)), seed + 1)});
    seed += 2;
  }
  return s;
}

/// headwise::attention of sq query rows (q: [sq, hq, dqk] contiguous) against one sequence's
/// contiguous K/V; out [sq, heads_out, dv], lse [heads_out, sq].
template <class T>
void attend_one(const float* q, std::int64_t sq, std::int64_t hq, const seq_kv<T>& kv, std::int64_t hkv,
                std::int64_t dqk, std::int64_t dv, std::int64_t heads_out, const attention_options& o, float* out,
                float* lse) {
  headwise::attention(tensor_view<const float, 4>(q, {1, sq, hq, dqk}),
                      tensor_view<const T, 4>(kv.k.data(), {1, kv.len, hkv, dqk}),
                      tensor_view<const T, 4>(kv.v.data(), {1, kv.len, hkv, dv}),
                      headwise::bshd(out, 1, sq, heads_out, dv), o, headwise::bhs(lse, 1, heads_out, sq));
}

template <class F>
void for_dtype(kv_dtype t, F&& f) {
  switch (t) {
    case kv_dtype::bf16: f(bf16{}); break;
    case kv_dtype::f16: f(f16{}); break;
    default: f(float{}); break;
  }
}

// =============================================================================================
// Paged == contiguous (attention_paged): batch 3 with lengths 37, 0, 2101
// =============================================================================================

struct paged_case {
  kv_dtype dtype;
  std::int64_t page, sq, hq, hkv, d;
  extra x;
  [[nodiscard]] std::string name() const {
    std::ostringstream os;
    os << "paged_" << dtype_name(dtype) << "_page" << page << "_sq" << sq << (sq > 1 ? "_chunk" : "_decode") << "_hq"
       << hq << "_hkv" << hkv << "_d" << d << (x == extra::all ? "_window_sinks_softcap" : "");
    return os.str();
  }
};
void PrintTo(const paged_case& c, std::ostream* os) { *os << c.name(); }

template <class T>
void check_paged(const paged_case& c) {
  // 0 tokens; 37 (not a multiple of 16, 64 or 7); 2101 (> the default split_kv of 2048, so decode
  // rows are split; 2048 is not a page boundary for page size 7).
  const std::vector<std::int64_t> lens = {37, 0, 2101};
  const std::int64_t B = 3, sq = c.sq, hq = c.hq, hkv = c.hkv, d = c.d, ho = hq;
  const std::uint64_t seed = std::hash<std::string>{}(c.name());
  const auto seqs = make_sequences<T>(lens, hkv, d, d, seed);
  paged_cache<T> pc(lens, c.page, hkv, d, d, seed + 100);
  for (std::int64_t b = 0; b < B; ++b)
    pc.fill(b, lens[static_cast<std::size_t>(b)], seqs[static_cast<std::size_t>(b)].k.data(),
            seqs[static_cast<std::size_t>(b)].v.data());
  const std::vector<float> q = random_normal(static_cast<std::size_t>(B * sq * hq * d), seed + 200);
  std::vector<float> sinks;
  attention_options o = make_options(causal_mode::bottom_right, c.x, ho, sinks);

  // Per-sequence contiguous calls.
  const std::size_t n_out = static_cast<std::size_t>(B * sq * ho * d), n_lse = static_cast<std::size_t>(B * ho * sq);
  std::vector<float> want(n_out, kOutSentinel), want_lse(n_lse, kLseSentinel);
  double vmax = 1.0;
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& s = seqs[static_cast<std::size_t>(b)];
    attend_one(q.data() + b * sq * hq * d, sq, hq, s, hkv, d, d, ho, o, want.data() + b * sq * ho * d,
               want_lse.data() + b * ho * sq);
    vmax = std::max(vmax, max_abs(s.v));
  }

  std::vector<float> first_out, first_lse;
  for (const int nt : {1, 2, 3, 0}) {
    std::vector<float> out(n_out, kOutSentinel), lse(n_lse, kLseSentinel);
    o.num_threads = nt;
    headwise::attention_paged(tensor_view<const float, 4>(q.data(), {B, sq, hq, d}), pc.view(),
                              headwise::bshd(out.data(), B, sq, ho, d), o, headwise::bhs(lse.data(), B, ho, sq));
    const std::string what = c.name() + " threads " + std::to_string(nt);
    if (nt == 1) {
      EXPECT_TRUE(AllClose(out, want, 0.0, kPairOutTol * vmax)) << what << ": paged vs contiguous (out)";
      EXPECT_TRUE(LseClose(lse.data(), want_lse.data(), n_lse, kPairLseTol)) << what << ": paged vs contiguous (lse)";
      EXPECT_TRUE(BitwiseEqual(out, want)) << what << ": paged vs contiguous, bitwise (out)";
      EXPECT_TRUE(BitwiseEqual(lse, want_lse)) << what << ": paged vs contiguous, bitwise (lse)";
      first_out = out;
      first_lse = lse;
    } else {
      EXPECT_TRUE(BitwiseEqual(out, first_out)) << what << ": thread count changed out";
      EXPECT_TRUE(BitwiseEqual(lse, first_lse)) << what << ": thread count changed lse";
    }
  }
  // Sequence 1 has no keys: out = 0, lse = -inf (or the sink logit).
  for (std::int64_t h = 0; h < ho; ++h)
    for (std::int64_t i = 0; i < sq; ++i) {
      const float l = first_lse[static_cast<std::size_t>((1 * ho + h) * sq + i)];
      const float want_l = sinks.empty() ? -kInf : sinks[static_cast<std::size_t>(h)];
      if (std::isinf(want_l)) {
        EXPECT_EQ(l, want_l) << "empty sequence, head " << h;
      } else {  // the sink goes through the log2 domain: within the LSE tolerance
        EXPECT_NEAR(l, want_l, kLseRelTol * std::max(1.0f, std::abs(want_l))) << "empty sequence, head " << h;
      }
      for (std::int64_t e = 0; e < d; ++e)
        ASSERT_EQ(first_out[static_cast<std::size_t>(((1 * sq + i) * ho + h) * d + e)], 0.0f) << "empty sequence";
    }
}

class PagedKv : public ::testing::TestWithParam<paged_case> {};

TEST_P(PagedKv, PagedEqualsContiguousAndIsThreadInvariant) {
  for_dtype(GetParam().dtype, [&](auto tag) { check_paged<decltype(tag)>(GetParam()); });
}

std::vector<paged_case> paged_cases() {
  std::vector<paged_case> v;
  for (const kv_dtype t : {kv_dtype::f32, kv_dtype::bf16})
    for (const std::int64_t page : {1, 16, 64, 7})
      for (const std::int64_t sq : {1, 5}) v.push_back({t, page, sq, 8, 2, 64, extra::plain});
  v.push_back({kv_dtype::f16, 16, 1, 32, 8, 128, extra::plain});
  v.push_back({kv_dtype::bf16, 7, 5, 8, 2, 64, extra::all});
  v.push_back({kv_dtype::f32, 16, 1, 4, 4, 80, extra::all});  // 1 row per item: key lanes on every build
  v.push_back({kv_dtype::f16, 64, 2, 8, 8, 64, extra::all});
  // Tiles across one page boundary at any offset (two runs of rows: paged_kv_source::tile):
  // 32-key bf16 and 16-key f32 decode tiles over 20- and 24-token pages.
  for (const kv_dtype t : {kv_dtype::f32, kv_dtype::bf16})
    for (const std::int64_t page : {20, 24}) v.push_back({t, page, 1, 8, 2, 64, extra::plain});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Paged, PagedKv, ::testing::ValuesIn(paged_cases()),
                         [](const ::testing::TestParamInfo<paged_case>& info) { return info.param.name(); });

// =============================================================================================
// Paged varlen == contiguous: ragged queries against a paged cache
// =============================================================================================

struct paged_varlen_case {
  kv_dtype dtype;
  std::int64_t page;
  extra x;
  [[nodiscard]] std::string name() const {
    return std::string("paged_varlen_") + dtype_name(dtype) + "_page" + std::to_string(page) +
           (x == extra::all ? "_window_sinks_softcap" : "");
  }
};
void PrintTo(const paged_varlen_case& c, std::ostream* os) { *os << c.name(); }

template <class T>
void check_paged_varlen(const paged_varlen_case& c) {
  // (q, kv): a 5-token chunk of 37; one query and no keys; decode against 2101 (split); 9 queries
  // against 5 keys (bottom-right: the first 4 rows see nothing).
  const std::vector<std::int64_t> kv_lens = {37, 0, 2101, 5}, q_lens = {5, 1, 1, 9};
  const std::int64_t B = 4, hq = 8, hkv = 2, d = 64, ho = hq;
  const std::uint64_t seed = std::hash<std::string>{}(c.name());
  const auto seqs = make_sequences<T>(kv_lens, hkv, d, d, seed);
  paged_cache<T> pc(kv_lens, c.page, hkv, d, d, seed + 100);
  for (std::int64_t b = 0; b < B; ++b)
    pc.fill(b, kv_lens[static_cast<std::size_t>(b)], seqs[static_cast<std::size_t>(b)].k.data(),
            seqs[static_cast<std::size_t>(b)].v.data());
  std::vector<std::int32_t> cu = {0};
  for (const auto n : q_lens) cu.push_back(cu.back() + static_cast<std::int32_t>(n));
  const std::int64_t total = cu.back();
  const std::vector<float> q = random_normal(static_cast<std::size_t>(total * hq * d), seed + 200);
  std::vector<float> sinks;
  attention_options o = make_options(causal_mode::bottom_right, c.x, ho, sinks);

  const std::size_t n_out = static_cast<std::size_t>(total * ho * d), n_lse = static_cast<std::size_t>(ho * total);
  std::vector<float> want(n_out, kOutSentinel), want_lse(n_lse, kLseSentinel);  // lse: (heads, total_q)
  double vmax = 1.0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = q_lens[static_cast<std::size_t>(b)];
    std::vector<float> l(static_cast<std::size_t>(ho * n));
    attend_one(q.data() + cu[static_cast<std::size_t>(b)] * hq * d, n, hq, seqs[static_cast<std::size_t>(b)], hkv, d,
               d, ho, o, want.data() + cu[static_cast<std::size_t>(b)] * ho * d, l.data());
    for (std::int64_t h = 0; h < ho; ++h)
      for (std::int64_t i = 0; i < n; ++i)
        want_lse[static_cast<std::size_t>(h * total + cu[static_cast<std::size_t>(b)] + i)] =
            l[static_cast<std::size_t>(h * n + i)];
    vmax = std::max(vmax, max_abs(seqs[static_cast<std::size_t>(b)].v));
  }

  std::vector<float> first_out, first_lse;
  for (const int nt : {1, 2, 3, 0}) {
    std::vector<float> out(n_out, kOutSentinel), lse(n_lse, kLseSentinel);
    o.num_threads = nt;
    headwise::attention_paged_varlen(tensor_view<const float, 3>(q.data(), {total, hq, d}),
                                     tensor_view<const std::int32_t, 1>(cu.data(), {B + 1}), pc.view(),
                                     tensor_view<float, 3>(out.data(), {total, ho, d}), o,
                                     tensor_view<float, 2>(lse.data(), {ho, total}));
    const std::string what = c.name() + " threads " + std::to_string(nt);
    if (nt == 1) {
      EXPECT_TRUE(AllClose(out, want, 0.0, kPairOutTol * vmax)) << what << ": paged varlen vs contiguous (out)";
      EXPECT_TRUE(LseClose(lse.data(), want_lse.data(), n_lse, kPairLseTol)) << what << ": (lse)";
      EXPECT_TRUE(BitwiseEqual(out, want)) << what << ": paged varlen vs contiguous, bitwise (out)";
      EXPECT_TRUE(BitwiseEqual(lse, want_lse)) << what << ": paged varlen vs contiguous, bitwise (lse)";
      first_out = out;
      first_lse = lse;
    } else {
      EXPECT_TRUE(BitwiseEqual(out, first_out)) << what << ": thread count changed out";
      EXPECT_TRUE(BitwiseEqual(lse, first_lse)) << what << ": thread count changed lse";
    }
  }
}

class PagedVarlen : public ::testing::TestWithParam<paged_varlen_case> {};

TEST_P(PagedVarlen, RaggedQueriesOnPagedCacheEqualPerSequenceCalls) {
  for_dtype(GetParam().dtype, [&](auto tag) { check_paged_varlen<decltype(tag)>(GetParam()); });
}

INSTANTIATE_TEST_SUITE_P(PagedVarlen, PagedVarlen,
                         ::testing::Values(paged_varlen_case{kv_dtype::f32, 16, extra::plain},
                                           paged_varlen_case{kv_dtype::bf16, 7, extra::plain},
                                           paged_varlen_case{kv_dtype::f16, 1, extra::plain},
                                           paged_varlen_case{kv_dtype::bf16, 64, extra::all}),
                         [](const ::testing::TestParamInfo<paged_varlen_case>& info) { return info.param.name(); });

// =============================================================================================
// Varlen == a loop over the sequences (attention_varlen)
// =============================================================================================

struct varlen_case {
  const char* label;
  kv_dtype dtype;
  std::vector<std::int64_t> q_lens, k_lens;
  std::int64_t hq, hkv, d;
  causal_mode causal;
  extra x;
  std::int64_t window_left;  ///< applied on top of `x` (-1 = none)
  bool strided;              ///< padded head and token strides for q, k, v and out
  [[nodiscard]] std::string name() const {
    return std::string("varlen_") + dtype_name(dtype) + "_" + label + "_causal" + causal_name(causal) +
           (x == extra::all ? "_window_sinks_softcap" : "") + (strided ? "_strided" : "");
  }
};
void PrintTo(const varlen_case& c, std::ostream* os) { *os << c.name(); }

/// A packed [total, heads, dim] buffer with optional padding (head stride dim+3, row stride +5).
template <class T>
struct packed3 {
  std::int64_t total, heads, dim;
  std::array<std::int64_t, 3> stride;
  std::vector<T> buf;
  packed3(std::int64_t t, std::int64_t h, std::int64_t dm, bool strided, T fill)
      : total(t), heads(h), dim(dm),
        stride{h * (dm + (strided ? 3 : 0)) + (strided ? 5 : 0), dm + (strided ? 3 : 0), 1},
        buf(static_cast<std::size_t>(std::max<std::int64_t>(1, t * stride[0])), fill) {}
  T& at(std::int64_t r, std::int64_t h, std::int64_t d) {
    return buf[static_cast<std::size_t>(r * stride[0] + h * stride[1] + d)];
  }
  tensor_view<T, 3> view() { return {buf.data(), {total, heads, dim}, stride}; }
  tensor_view<const T, 3> cview() const { return {buf.data(), {total, heads, dim}, stride}; }
};

template <class T>
void check_varlen(const varlen_case& c) {
  const std::int64_t B = static_cast<std::int64_t>(c.q_lens.size()), hq = c.hq, hkv = c.hkv, d = c.d, ho = hq;
  const std::uint64_t seed = std::hash<std::string>{}(c.name());
  const auto seqs = make_sequences<T>(c.k_lens, hkv, d, d, seed);
  std::vector<std::int32_t> cu_q = {0}, cu_k = {0};
  for (std::int64_t b = 0; b < B; ++b) {
    cu_q.push_back(cu_q.back() + static_cast<std::int32_t>(c.q_lens[static_cast<std::size_t>(b)]));
    cu_k.push_back(cu_k.back() + static_cast<std::int32_t>(c.k_lens[static_cast<std::size_t>(b)]));
  }
  const std::int64_t total_q = cu_q.back(), total_k = cu_k.back();
  packed3<float> q(total_q, hq, d, c.strided, kNaN);
  packed3<T> k(total_k, hkv, d, c.strided, nan_of<T>()), v(total_k, hkv, d, c.strided, nan_of<T>());
  const std::vector<float> qc = random_normal(static_cast<std::size_t>(total_q * hq * d), seed + 300);
  for (std::int64_t r = 0; r < total_q; ++r)
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t e = 0; e < d; ++e) q.at(r, h, e) = qc[static_cast<std::size_t>((r * hq + h) * d + e)];
  double vmax = 1.0;
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& s = seqs[static_cast<std::size_t>(b)];
    for (std::int64_t j = 0; j < s.len; ++j)
      for (std::int64_t h = 0; h < hkv; ++h)
        for (std::int64_t e = 0; e < d; ++e) {
          k.at(cu_k[static_cast<std::size_t>(b)] + j, h, e) = s.k[static_cast<std::size_t>((j * hkv + h) * d + e)];
          v.at(cu_k[static_cast<std::size_t>(b)] + j, h, e) = s.v[static_cast<std::size_t>((j * hkv + h) * d + e)];
        }
    vmax = std::max(vmax, max_abs(s.v));
  }
  std::vector<float> sinks;
  attention_options o = make_options(c.causal, c.x, ho, sinks);
  if (c.window_left >= 0) o.window_left = c.window_left;

  // The loop over sequences.
  std::vector<float> want(static_cast<std::size_t>(total_q * ho * d), kOutSentinel);
  std::vector<float> want_lse(static_cast<std::size_t>(ho * total_q), kLseSentinel);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = c.q_lens[static_cast<std::size_t>(b)];
    std::vector<float> l(static_cast<std::size_t>(std::max<std::int64_t>(1, ho * n)));
    attend_one(qc.data() + cu_q[static_cast<std::size_t>(b)] * hq * d, n, hq, seqs[static_cast<std::size_t>(b)], hkv,
               d, d, ho, o, want.data() + cu_q[static_cast<std::size_t>(b)] * ho * d, l.data());
    for (std::int64_t h = 0; h < ho; ++h)
      for (std::int64_t i = 0; i < n; ++i)
        want_lse[static_cast<std::size_t>(h * total_q + cu_q[static_cast<std::size_t>(b)] + i)] =
            l[static_cast<std::size_t>(h * n + i)];
  }

  std::vector<float> first_out, first_lse;
  for (const int nt : {1, 2, 3, 0}) {
    packed3<float> out(total_q, ho, d, c.strided, kOutSentinel);
    std::vector<float> lse(static_cast<std::size_t>(ho * total_q), kLseSentinel);
    o.num_threads = nt;
    headwise::attention_varlen(q.cview(), k.cview(), v.cview(), tensor_view<const std::int32_t, 1>(cu_q.data(), {B + 1}),
                               tensor_view<const std::int32_t, 1>(cu_k.data(), {B + 1}), out.view(), o,
                               tensor_view<float, 2>(lse.data(), {ho, total_q}));
    // Dense copy of out; the padding must still hold the sentinel.
    std::vector<float> got;
    std::vector<bool> covered(out.buf.size(), false);
    for (std::int64_t r = 0; r < total_q; ++r)
      for (std::int64_t h = 0; h < ho; ++h)
        for (std::int64_t e = 0; e < d; ++e) {
          got.push_back(out.at(r, h, e));
          covered[static_cast<std::size_t>(r * out.stride[0] + h * out.stride[1] + e)] = true;
        }
    bool padding_intact = true;
    for (std::size_t i = 0; i < out.buf.size(); ++i)
      if (!covered[i] && out.buf[i] != kOutSentinel) padding_intact = false;
    const std::string what = c.name() + " threads " + std::to_string(nt);
    EXPECT_TRUE(padding_intact) << what << ": out written outside its view";
    if (nt == 1) {
      EXPECT_TRUE(AllClose(got, want, 0.0, kPairOutTol * vmax)) << what << ": varlen vs loop (out)";
      EXPECT_TRUE(LseClose(lse.data(), want_lse.data(), lse.size(), kPairLseTol)) << what << ": varlen vs loop (lse)";
      EXPECT_TRUE(BitwiseEqual(got, want)) << what << ": varlen vs loop, bitwise (out)";
      EXPECT_TRUE(BitwiseEqual(lse, want_lse)) << what << ": varlen vs loop, bitwise (lse)";
      first_out = got;
      first_lse = lse;
    } else {
      EXPECT_TRUE(BitwiseEqual(got, first_out)) << what << ": thread count changed out";
      EXPECT_TRUE(BitwiseEqual(lse, first_lse)) << what << ": thread count changed lse";
    }
  }
}

class Varlen : public ::testing::TestWithParam<varlen_case> {};

TEST_P(Varlen, VarlenEqualsLoopOverSequencesAndIsThreadInvariant) {
  for_dtype(GetParam().dtype, [&](auto tag) { check_varlen<decltype(tag)>(GetParam()); });
}

std::vector<varlen_case> varlen_cases() {
  using enum kv_dtype;
  const causal_mode br = causal_mode::bottom_right;
  // (q, k) lengths: (1, 0) one query, no keys; (0, 1) no queries; (5, 3) more queries than keys;
  // (40, 300) fewer.
  const std::vector<std::int64_t> mq = {1, 0, 5, 40}, mk = {0, 1, 3, 300};
  // Decode: one query each against 2101 (split), 0, 1 and 64 keys.
  const std::vector<std::int64_t> dq = {1, 1, 1, 1}, dk = {2101, 0, 1, 64};
  return {
      {"mixed", f32, mq, mk, 8, 2, 64, br, extra::plain, -1, false},
      {"mixed", bf16, mq, mk, 8, 2, 64, br, extra::plain, -1, true},
      {"mixed", f16, mq, mk, 8, 1, 80, br, extra::all, -1, false},
      {"mixed_wl5", f32, mq, mk, 4, 4, 64, causal_mode::top_left, extra::plain, 5, true},
      {"decode", f16, dq, dk, 8, 2, 64, br, extra::plain, -1, false},
      {"decode", f32, dq, dk, 4, 4, 80, br, extra::all, -1, true},  // 1 row per item: splits on every build
      {"decode", bf16, dq, dk, 32, 8, 128, br, extra::plain, -1, false},
      {"chunk", bf16, {64, 1, 2, 20}, {64, 129, 1000, 20}, 8, 1, 128, causal_mode::none, extra::plain, 10, true},
  };
}

INSTANTIATE_TEST_SUITE_P(Varlen, Varlen, ::testing::ValuesIn(varlen_cases()),
                         [](const ::testing::TestParamInfo<varlen_case>& info) { return info.param.name(); });

// =============================================================================================
// Chunked prefill with a growing cache == one-shot prefill
// =============================================================================================

constexpr std::int64_t kCB = 2, kCHq = 8, kCHkv = 2, kCD = 64, kCN = 302;  // 300 prompt + 2 decode
constexpr std::int64_t kChunks[] = {64, 64, 64, 64, 44, 1, 1};

/// Inputs of the chunked-prefill tests: q, new K and new V for all kCN tokens, f32.
struct prompt {
  std::vector<float> q, k, v;
  prompt()
      : q(random_normal(static_cast<std::size_t>(kCB * kCN * kCHq * kCD), 401)),
        k(random_normal(static_cast<std::size_t>(kCB * kCN * kCHkv * kCD), 402)),
        v(random_normal(static_cast<std::size_t>(kCB * kCN * kCHkv * kCD), 403)) {}
  /// Tokens [a, a+n) of (B, kCN, heads, kCD) data.
  static tensor_view<const float, 4> slice(const std::vector<float>& x, std::int64_t heads, std::int64_t a,
                                           std::int64_t n) {
    return {x.data() + a * heads * kCD, {kCB, n, heads, kCD}, {kCN * heads * kCD, heads * kCD, kCD, 1}};
  }
};

/// One-shot bottom-right attention over all kCN tokens with the K/V stored as T.
template <class T>
void one_shot(const prompt& p, std::vector<T>& ks, std::vector<T>& vs, std::vector<float>& out,
              std::vector<float>& lse) {
  ks.assign(p.k.size(), T{});
  vs.assign(p.v.size(), T{});
  headwise::convert(headwise::bshd<const float>(p.k.data(), kCB, kCN, kCHkv, kCD), headwise::bshd(ks.data(), kCB, kCN, kCHkv, kCD));
  headwise::convert(headwise::bshd<const float>(p.v.data(), kCB, kCN, kCHkv, kCD), headwise::bshd(vs.data(), kCB, kCN, kCHkv, kCD));
  out.assign(p.q.size(), kOutSentinel);
  lse.assign(static_cast<std::size_t>(kCB * kCHq * kCN), kLseSentinel);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  headwise::attention(headwise::bshd<const float>(p.q.data(), kCB, kCN, kCHq, kCD),
                      headwise::bshd<const T>(ks.data(), kCB, kCN, kCHkv, kCD),
                      headwise::bshd<const T>(vs.data(), kCB, kCN, kCHkv, kCD),
                      headwise::bshd(out.data(), kCB, kCN, kCHq, kCD), o, headwise::bhs(lse.data(), kCB, kCHq, kCN));
}

/// Views of rows [a, a+n) of the (B, kCN, H, D) output and the (B, H, kCN) lse.
tensor_view<float, 4> out_rows(std::vector<float>& out, std::int64_t a, std::int64_t n) {
  return {out.data() + a * kCHq * kCD, {kCB, n, kCHq, kCD}, {kCN * kCHq * kCD, kCHq * kCD, kCD, 1}};
}
tensor_view<float, 3> lse_rows(std::vector<float>& lse, std::int64_t a, std::int64_t n) {
  return {lse.data() + a, {kCB, kCHq, n}, {kCHq * kCN, kCN, 1}};
}

template <class T>
void check_chunked_contiguous() {
  const prompt p;
  constexpr std::int64_t cap = 320;
  std::vector<T> kc(static_cast<std::size_t>(kCB * cap * kCHkv * kCD), nan_of<T>()), vc(kc.size(), nan_of<T>());
  const auto kcv = headwise::bshd(kc.data(), kCB, cap, kCHkv, kCD), vcv = headwise::bshd(vc.data(), kCB, cap, kCHkv, kCD);
  std::vector<std::int32_t> lens(kCB, 0);
  std::vector<float> out(p.q.size(), kOutSentinel), lse(static_cast<std::size_t>(kCB * kCHq * kCN), kLseSentinel);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  std::int64_t a = 0;
  for (const std::int64_t n : kChunks) {
    headwise::kv_cache_append(kcv, vcv, tensor_view<const std::int32_t, 1>(lens.data(), {kCB}),
                              prompt::slice(p.k, kCHkv, a, n), prompt::slice(p.v, kCHkv, a, n));
    for (auto& l : lens) l += static_cast<std::int32_t>(n);
    tensor_view<const T, 4> kp(kc.data(), {kCB, a + n, kCHkv, kCD}, kcv.stride), vp(vc.data(), {kCB, a + n, kCHkv, kCD}, vcv.stride);
    headwise::attention(prompt::slice(p.q, kCHq, a, n), kp, vp, out_rows(out, a, n), o, lse_rows(lse, a, n));
    a += n;
  }
  ASSERT_EQ(a, kCN);
  std::vector<T> ks, vs;
  std::vector<float> want, want_lse;
  one_shot(p, ks, vs, want, want_lse);
  // The cache holds exactly the converted tokens; the rest is untouched.
  for (std::int64_t b = 0; b < kCB; ++b) {
    const std::size_t row = static_cast<std::size_t>(kCN * kCHkv * kCD), off = static_cast<std::size_t>(b * cap * kCHkv * kCD);
    EXPECT_EQ(std::memcmp(kc.data() + off, ks.data() + b * kCN * kCHkv * kCD, row * sizeof(T)), 0) << "k cache, batch " << b;
    EXPECT_EQ(std::memcmp(vc.data() + off, vs.data() + b * kCN * kCHkv * kCD, row * sizeof(T)), 0) << "v cache, batch " << b;
    for (std::size_t i = off + row; i < off + static_cast<std::size_t>(cap * kCHkv * kCD); ++i) {
      ASSERT_TRUE(std::isnan(headwise::to_float(kc[i])) && std::isnan(headwise::to_float(vc[i]))) << "slot " << i;
    }
  }
  EXPECT_TRUE(AllClose(out, want, 0.0, kPairOutTol * max_abs(vs))) << headwise::dtype_name<T>() << " chunked vs one-shot (out)";
  EXPECT_TRUE(LseClose(lse.data(), want_lse.data(), lse.size(), kPairLseTol)) << headwise::dtype_name<T>() << " (lse)";
}

TEST(ChunkedPrefill, KvCacheAppendChunksEqualOneShotF32) { check_chunked_contiguous<float>(); }
TEST(ChunkedPrefill, KvCacheAppendChunksEqualOneShotBf16) { check_chunked_contiguous<bf16>(); }

template <class T>
void check_chunked_paged(std::int64_t page) {
  const prompt p;
  paged_cache<T> pc({kCN, kCN}, page, kCHkv, kCD, kCD, 77 + static_cast<std::uint64_t>(page), 2, 0);
  std::fill(pc.seqlens.begin(), pc.seqlens.end(), 0);
  std::vector<float> out(p.q.size(), kOutSentinel), lse(static_cast<std::size_t>(kCB * kCHq * kCN), kLseSentinel);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  std::int64_t a = 0;
  for (const std::int64_t n : kChunks) {
    headwise::paged_kv_append(pc.k_view(), pc.v_view(), pc.table_view(), pc.seqlens_view(),
                              prompt::slice(p.k, kCHkv, a, n), prompt::slice(p.v, kCHkv, a, n));
    for (auto& l : pc.seqlens) l += static_cast<std::int32_t>(n);
    headwise::attention_paged(prompt::slice(p.q, kCHq, a, n), pc.view(), out_rows(out, a, n), o, lse_rows(lse, a, n));
    a += n;
  }
  std::vector<T> ks, vs;
  std::vector<float> want, want_lse;
  one_shot(p, ks, vs, want, want_lse);
  for (std::int64_t b = 0; b < kCB; ++b)
    for (std::int64_t j = 0; j < kCN; ++j)
      for (std::int64_t h = 0; h < kCHkv; ++h) {
        const std::size_t src = static_cast<std::size_t>(((b * kCN + j) * kCHkv + h) * kCD);
        ASSERT_EQ(std::memcmp(pc.k_pages.data() + pc.k_offset(b, j, h), ks.data() + src, kCD * sizeof(T)), 0)
            << "k token " << j << " of sequence " << b;
        ASSERT_EQ(std::memcmp(pc.v_pages.data() + pc.v_offset(b, j, h), vs.data() + src, kCD * sizeof(T)), 0)
            << "v token " << j << " of sequence " << b;
      }
  const std::string what = std::string(headwise::dtype_name<T>()) + " page " + std::to_string(page);
  EXPECT_TRUE(AllClose(out, want, 0.0, kPairOutTol * max_abs(vs))) << what << " paged chunked vs one-shot (out)";
  EXPECT_TRUE(LseClose(lse.data(), want_lse.data(), lse.size(), kPairLseTol)) << what << " (lse)";
}

TEST(ChunkedPrefill, PagedAppendChunksEqualOneShotBf16Page16) { check_chunked_paged<bf16>(16); }
TEST(ChunkedPrefill, PagedAppendChunksEqualOneShotBf16Page7) { check_chunked_paged<bf16>(7); }
TEST(ChunkedPrefill, PagedAppendChunksEqualOneShotF32Page64) { check_chunked_paged<float>(64); }

TEST(ChunkedPrefill, PagedVarlenRaggedChunksEqualOneShotBf16) {
  // Two sequences prefilled together with different chunk lengths per step (0 = idle this step)
  // through attention_paged_varlen, each sequence appended on its own (paged_kv_append on a
  // one-row block table); then decode steps. Sequence 1 only uses the first 150 tokens.
  const prompt p;
  const std::vector<std::vector<std::int64_t>> steps = {{64, 50}, {64, 50}, {64, 0}, {64, 50}, {44, 0}, {1, 1}, {1, 1}};
  const std::int64_t len1 = 152;
  paged_cache<bf16> pc({kCN, len1}, 16, kCHkv, kCD, kCD, 91, 2, 1);
  std::fill(pc.seqlens.begin(), pc.seqlens.end(), 0);
  std::vector<float> out(p.q.size(), kOutSentinel), lse(static_cast<std::size_t>(kCB * kCHq * kCN), kLseSentinel);
  attention_options o;
  o.causal = causal_mode::bottom_right;
  std::vector<std::int64_t> pos(2, 0);
  for (const auto& st : steps) {
    const std::int64_t total = st[0] + st[1];
    std::vector<float> q(static_cast<std::size_t>(total * kCHq * kCD));
    std::vector<std::int32_t> cu = {0, static_cast<std::int32_t>(st[0]), static_cast<std::int32_t>(total)};
    for (std::int64_t b = 0; b < 2; ++b) {
      const std::int64_t n = st[static_cast<std::size_t>(b)], a = pos[static_cast<std::size_t>(b)];
      // Append this sequence's n tokens through its own block-table row.
      auto k_new = prompt::slice(p.k, kCHkv, a, n), v_new = prompt::slice(p.v, kCHkv, a, n);
      k_new.data += b * k_new.stride[0];
      v_new.data += b * v_new.stride[0];
      k_new.shape[0] = v_new.shape[0] = 1;
      const tensor_view<const std::int32_t, 2> row(pc.block_table.data() + b * pc.max_pages, {1, pc.max_pages});
      const tensor_view<const std::int32_t, 1> len(pc.seqlens.data() + b, {1});
      headwise::paged_kv_append(pc.k_view(), pc.v_view(), row, len, k_new, v_new);
      pc.seqlens[static_cast<std::size_t>(b)] += static_cast<std::int32_t>(n);
      for (std::int64_t i = 0; i < n; ++i)
        std::copy_n(p.q.data() + ((b * kCN + a + i) * kCHq) * kCD, kCHq * kCD,
                    q.data() + (cu[static_cast<std::size_t>(b)] + i) * kCHq * kCD);
    }
    std::vector<float> o_step(static_cast<std::size_t>(total * kCHq * kCD), kOutSentinel);
    std::vector<float> l_step(static_cast<std::size_t>(kCHq * total), kLseSentinel);
    headwise::attention_paged_varlen(tensor_view<const float, 3>(q.data(), {total, kCHq, kCD}),
                                     tensor_view<const std::int32_t, 1>(cu.data(), {3}), pc.view(),
                                     tensor_view<float, 3>(o_step.data(), {total, kCHq, kCD}), o,
                                     tensor_view<float, 2>(l_step.data(), {kCHq, total}));
    for (std::int64_t b = 0; b < 2; ++b) {
      const std::int64_t n = st[static_cast<std::size_t>(b)], a = pos[static_cast<std::size_t>(b)];
      for (std::int64_t i = 0; i < n; ++i) {
        std::copy_n(o_step.data() + (cu[static_cast<std::size_t>(b)] + i) * kCHq * kCD, kCHq * kCD,
                    out.data() + ((b * kCN + a + i) * kCHq) * kCD);
        for (std::int64_t h = 0; h < kCHq; ++h)
          lse[static_cast<std::size_t>((b * kCHq + h) * kCN + a + i)] =
              l_step[static_cast<std::size_t>(h * total + cu[static_cast<std::size_t>(b)] + i)];
      }
      pos[static_cast<std::size_t>(b)] += n;
    }
  }
  ASSERT_EQ(pos[0], kCN);
  ASSERT_EQ(pos[1], len1);
  // One shot per sequence over its own length.
  std::vector<bf16> ks, vs;
  std::vector<float> want, want_lse;
  one_shot(p, ks, vs, want, want_lse);  // sequence 0 (kCN tokens)
  const double tol = kPairOutTol * max_abs(vs);
  for (std::int64_t i = 0; i < kCN; ++i) {
    const std::size_t r = static_cast<std::size_t>(i * kCHq * kCD);
    ASSERT_TRUE(AllClose(out.data() + r, want.data() + r, static_cast<std::size_t>(kCHq * kCD), 0.0, tol)) << "seq 0 row " << i;
  }
  // Sequence 1: bottom-right attention over its first len1 tokens.
  std::vector<float> w1(static_cast<std::size_t>(len1 * kCHq * kCD)), l1(static_cast<std::size_t>(kCHq * len1));
  headwise::attention(tensor_view<const float, 4>(p.q.data() + kCN * kCHq * kCD, {1, len1, kCHq, kCD}),
                      tensor_view<const bf16, 4>(ks.data() + kCN * kCHkv * kCD, {1, len1, kCHkv, kCD}),
                      tensor_view<const bf16, 4>(vs.data() + kCN * kCHkv * kCD, {1, len1, kCHkv, kCD}),
                      headwise::bshd(w1.data(), 1, len1, kCHq, kCD), o, headwise::bhs(l1.data(), 1, kCHq, len1));
  EXPECT_TRUE(AllClose(out.data() + kCN * kCHq * kCD, w1.data(), w1.size(), 0.0, tol)) << "seq 1";
  for (std::int64_t h = 0; h < kCHq; ++h) {
    EXPECT_TRUE(LseClose(lse.data() + h * kCN, want_lse.data() + h * kCN, kCN, kPairLseTol)) << "seq 0 head " << h;
    EXPECT_TRUE(LseClose(lse.data() + (kCHq + h) * kCN, l1.data() + h * len1, static_cast<std::size_t>(len1), kPairLseTol))
        << "seq 1 head " << h;
  }
}

// =============================================================================================
// Append helpers: convert, kv_cache_append, paged_kv_append
// =============================================================================================

TEST(KvCacheAppend, ConvertF32ToBf16IsRoundToNearestEven) {
  auto f = [](std::uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
  };
  // (input bits, expected bf16 bits): ties go to the even neighbour, just-above/below ties round
  // to nearest, overflow rounds to inf, -0, inf and subnormal ties.
  const std::vector<std::pair<std::uint32_t, std::uint16_t>> exact = {
      {0x3F808000u, 0x3F80}, {0x3F818000u, 0x3F82}, {0x3F808001u, 0x3F81}, {0x3F807FFFu, 0x3F80},
      {0xBF808000u, 0xBF80}, {0xBF818000u, 0xBF82}, {0x7F7FFFFFu, 0x7F80}, {0x7F7F7FFFu, 0x7F7F},
      {0x80000000u, 0x8000}, {0x7F800000u, 0x7F80}, {0xFF800000u, 0xFF80}, {0x00008000u, 0x0000},
      {0x00018000u, 0x0002}, {0x00000001u, 0x0000}, {0x3F800000u, 0x3F80}};
  std::vector<float> src;
  for (const auto& e : exact) src.push_back(f(e.first));
  src.push_back(kNaN);
  src.push_back(f(0xFFC00001u));
  for (const float x : random_normal(2000, 5, 0.0f, 100.0f)) src.push_back(x);
  for (const float x : random_uniform(2000, 6, -1e-30f, 1e-30f)) src.push_back(x);
  const std::int64_t n = static_cast<std::int64_t>(src.size());
  std::vector<bf16> dst(static_cast<std::size_t>(n), bf16{0x1234});
  headwise::convert(tensor_view<const float, 1>(src.data(), {n}), tensor_view<bf16, 1>(dst.data(), {n}));
  for (std::size_t i = 0; i < exact.size(); ++i)
    EXPECT_EQ(dst[i].bits, exact[i].second) << std::hex << "input 0x" << exact[i].first;
  for (std::size_t i = exact.size(); i < exact.size() + 2; ++i)
    EXPECT_TRUE(std::isnan(headwise::to_float(dst[i]))) << "NaN must stay NaN";
  for (std::size_t i = 0; i < src.size(); ++i)
    ASSERT_EQ(dst[i].bits, headwise::to_bf16(src[i]).bits) << "index " << i << " value " << src[i];
}

TEST(KvCacheAppend, ConvertStridedF16AndF32WriteOnlyTheView) {
  // (4, 5, 6) values into a destination with padded strides: each element is to_f16 / the same
  // float; the padding keeps its sentinel.
  const std::vector<float> src = random_normal(4 * 5 * 6, 8, 0.0f, 1000.0f);
  const std::array<std::int64_t, 3> shape{4, 5, 6}, stride{5 * 9 + 2, 9, 1};
  std::vector<f16> d16(static_cast<std::size_t>(4 * stride[0]), f16{0x5555});
  std::vector<float> d32(d16.size(), kOutSentinel);
  headwise::convert(tensor_view<const float, 3>(src.data(), shape), tensor_view<f16, 3>(d16.data(), shape, stride));
  headwise::convert(tensor_view<const float, 3>(src.data(), shape), tensor_view<float, 3>(d32.data(), shape, stride));
  std::vector<bool> covered(d16.size(), false);
  for (std::int64_t a = 0; a < 4; ++a)
    for (std::int64_t b = 0; b < 5; ++b)
      for (std::int64_t c = 0; c < 6; ++c) {
        const std::size_t di = static_cast<std::size_t>(a * stride[0] + b * stride[1] + c);
        const float x = src[static_cast<std::size_t>((a * 5 + b) * 6 + c)];
        covered[di] = true;
        EXPECT_EQ(d16[di].bits, headwise::to_f16(x).bits) << x;
        EXPECT_EQ(d32[di], x);
      }
  for (std::size_t i = 0; i < d16.size(); ++i)
    if (!covered[i]) {
      EXPECT_EQ(d16[i].bits, 0x5555) << "f16 padding " << i;
      EXPECT_EQ(d32[i], kOutSentinel) << "f32 padding " << i;
    }
}

template <class T>
T sentinel_of() {
  if constexpr (std::is_same_v<T, float>) return kOutSentinel;
  else return T{0x1234};
}
template <class T>
bool same_value(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
void check_kv_cache_append_slots() {
  // Caches (3, 20, 2, 8) for K and (3, 20, 2, 6) for V with padded strides; positions 0, 5 and 17,
  // n = 3 (the last fills the cache exactly). Everything except the 3 new tokens keeps its sentinel.
  constexpr std::int64_t B = 3, cap = 20, H = 2, DK = 8, DV = 6, n = 3;
  const layout L{3, 2, 5, false};
  tensor4<T> kc({B, cap, H, DK}, L, sentinel_of<T>()), vc({B, cap, H, DV}, L, sentinel_of<T>());
  const std::vector<std::int32_t> pos = {0, 5, 17};
  const std::vector<float> kn = random_normal(B * n * H * DK, 11, 0.0f, 3.0f), vn = random_normal(B * n * H * DV, 12, 0.0f, 3.0f);
  headwise::kv_cache_append(kc.view(), vc.view(), tensor_view<const std::int32_t, 1>(pos.data(), {B}),
                            headwise::bshd<const float>(kn.data(), B, n, H, DK), headwise::bshd<const float>(vn.data(), B, n, H, DV));
  auto check = [&](const tensor4<T>& c, const std::vector<float>& src, std::int64_t D, const char* which) {
    std::vector<bool> written(c.buf.size(), false);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t d = 0; d < D; ++d) {
            const std::int64_t s = pos[static_cast<std::size_t>(b)] + t;
            written[static_cast<std::size_t>(b * c.stride[0] + s * c.stride[1] + h * c.stride[2] + d)] = true;
            const T want = headwise::from_float<T>(src[static_cast<std::size_t>(((b * n + t) * H + h) * D + d)]);
            ASSERT_TRUE(same_value(c.at(b, s, h, d), want)) << which << " b" << b << " t" << t << " h" << h << " d" << d;
          }
    for (std::size_t i = 0; i < c.buf.size(); ++i)
      if (!written[i]) {
        ASSERT_TRUE(same_value(c.buf[i], sentinel_of<T>())) << which << ": slot " << i << " was written";
      }
  };
  check(kc, kn, DK, "k_cache");
  check(vc, vn, DV, "v_cache");
  // n = 0 appends nothing.
  const auto kb = kc.buf, vb = vc.buf;
  headwise::kv_cache_append(kc.view(), vc.view(), tensor_view<const std::int32_t, 1>(pos.data(), {B}),
                            headwise::bshd<const float>(kn.data(), B, 0, H, DK), headwise::bshd<const float>(vn.data(), B, 0, H, DV));
  EXPECT_TRUE(bytes_of(kb) == bytes_of(kc.buf) && bytes_of(vb) == bytes_of(vc.buf)) << "n = 0 changed the cache";
}

TEST(KvCacheAppend, AppendWritesExactlyTheNewSlotsF32) { check_kv_cache_append_slots<float>(); }
TEST(KvCacheAppend, AppendWritesExactlyTheNewSlotsBf16) { check_kv_cache_append_slots<bf16>(); }
TEST(KvCacheAppend, AppendWritesExactlyTheNewSlotsF16) { check_kv_cache_append_slots<f16>(); }

template <class T>
void check_paged_append_slots(std::int64_t page) {
  // Three sequences with 40, 20 and 33 tokens' worth of pages; current lengths 15, 0, 30; n = 3
  // (crossing a page boundary for page 16 at 15..17 and at 30..32). Pages start as sentinels.
  constexpr std::int64_t H = 2, DK = 8, DV = 4, n = 3;
  paged_cache<T> pc({40, 20, 33}, page, H, DK, DV, 21 + static_cast<std::uint64_t>(page));
  std::fill(pc.k_pages.begin(), pc.k_pages.end(), sentinel_of<T>());
  std::fill(pc.v_pages.begin(), pc.v_pages.end(), sentinel_of<T>());
  pc.seqlens = {15, 0, 30};
  std::vector<T> want_k = pc.k_pages, want_v = pc.v_pages;
  const std::vector<float> kn = random_normal(3 * n * H * DK, 22), vn = random_normal(3 * n * H * DV, 23);
  for (std::int64_t b = 0; b < 3; ++b)
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        const std::int64_t j = pc.seqlens[static_cast<std::size_t>(b)] + t;
        for (std::int64_t d = 0; d < DK; ++d)
          want_k[static_cast<std::size_t>(pc.k_offset(b, j, h) + d)] =
              headwise::from_float<T>(kn[static_cast<std::size_t>(((b * n + t) * H + h) * DK + d)]);
        for (std::int64_t d = 0; d < DV; ++d)
          want_v[static_cast<std::size_t>(pc.v_offset(b, j, h) + d)] =
              headwise::from_float<T>(vn[static_cast<std::size_t>(((b * n + t) * H + h) * DV + d)]);
      }
  headwise::paged_kv_append(pc.k_view(), pc.v_view(), pc.table_view(), pc.seqlens_view(),
                            headwise::bshd<const float>(kn.data(), 3, n, H, DK), headwise::bshd<const float>(vn.data(), 3, n, H, DV));
  EXPECT_TRUE(bytes_of(want_k) == bytes_of(pc.k_pages)) << "k_pages, page size " << page;
  EXPECT_TRUE(bytes_of(want_v) == bytes_of(pc.v_pages)) << "v_pages, page size " << page;
}

TEST(KvCacheAppend, PagedAppendWritesThroughTheBlockTableBf16Page16) { check_paged_append_slots<bf16>(16); }
TEST(KvCacheAppend, PagedAppendWritesThroughTheBlockTableF32Page7) { check_paged_append_slots<float>(7); }
TEST(KvCacheAppend, PagedAppendWritesThroughTheBlockTableF16Page1) { check_paged_append_slots<f16>(1); }

// =============================================================================================
// Bad input: argument_error naming the argument, outputs untouched
// =============================================================================================

/// A valid attention_paged call (batch 2, page size 4, 6 pages, 3 table columns, lengths 5 and 9;
/// the unused table entry is -1), each test breaking one thing.
struct paged_call {
  static constexpr std::int64_t B = 2, SQ = 1, HQ = 4, HK = 2, D = 8, PS = 4, NP = 6, MP = 3;
  std::vector<float> kp = random_normal(NP * PS * HK * D, 31), vp = random_normal(NP * PS * HK * D, 32),
                     q = random_normal(B * SQ * HQ * D, 33);
  std::vector<float> out = std::vector<float>(B * SQ * HQ * D, kOutSentinel),
                     lse = std::vector<float>(B * HQ * SQ, kLseSentinel);
  std::vector<std::int32_t> table = {0, 1, -1, 2, 3, 4}, seqlens = {5, 9};
  std::int64_t page_size = PS;
  attention_options o;
  paged_call() { o.causal = causal_mode::bottom_right; }
  [[nodiscard]] paged_kv<float> kv() const {
    return {{kp.data(), {NP, page_size, HK, D}}, {vp.data(), {NP, page_size, HK, D}}, {table.data(), {B, MP}},
            {seqlens.data(), {B}}};
  }
  void run() {
    headwise::attention_paged(headwise::bshd<const float>(q.data(), B, SQ, HQ, D), kv(),
                              headwise::bshd(out.data(), B, SQ, HQ, D), o, headwise::bhs(lse.data(), B, HQ, SQ));
  }
  [[nodiscard]] std::vector<std::vector<unsigned char>> snapshot() const {
    return {bytes_of(kp), bytes_of(vp), bytes_of(q), bytes_of(out), bytes_of(lse), bytes_of(table), bytes_of(seqlens)};
  }
};

template <class Call, class F>
void expect_bad(Call& c, F&& f, const std::string& arg) {
  const auto before = c.snapshot();
  EXPECT_TRUE(ThrowsArgumentError(f, arg));
  EXPECT_TRUE(before == c.snapshot()) << "a buffer changed although the call threw (" << arg << ")";
}

TEST(PagedBadInput, ValidCallRunsAndIgnoresUnusedBlockTableEntries) {
  paged_call c;
  EXPECT_NO_THROW(c.run());
  EXPECT_NE(c.out[0], kOutSentinel);
}

TEST(PagedBadInput, NegativeBlockTableEntryForUsedPageThrows) {
  paged_call c;
  c.table[1 * 3 + 1] = -1;
  expect_bad(c, [&] { c.run(); }, "kv.block_table[1][1]");
}

TEST(PagedBadInput, BlockTableEntryEqualToNumPagesThrows) {
  paged_call c;
  c.table[0 * 3 + 1] = 6;
  expect_bad(c, [&] { c.run(); }, "kv.block_table[0][1]");
}

TEST(PagedBadInput, BlockTableEntryFarOutOfRangeInLastPartialPageThrows) {
  paged_call c;
  c.table[1 * 3 + 2] = 1 << 30;  // sequence 1 (9 tokens) uses its third page for token 8 only
  expect_bad(c, [&] { c.run(); }, "kv.block_table[1][2]");
}

TEST(PagedBadInput, SeqlensBeyondMaxPagesTimesPageSizeThrows) {
  paged_call c;
  c.seqlens[1] = 13;  // capacity 3 pages x 4
  expect_bad(c, [&] { c.run(); }, "kv.seqlens[1]");
}

TEST(PagedBadInput, NegativeSeqlensThrows) {
  paged_call c;
  c.seqlens[0] = -1;
  expect_bad(c, [&] { c.run(); }, "kv.seqlens[0]");
}

TEST(PagedBadInput, PageSizeZeroThrows) {
  paged_call c;
  c.page_size = 0;
  expect_bad(c, [&] { c.run(); }, "kv.k_pages.shape[1]");
}

TEST(PagedBadInput, PagedVarlenBlockTableRowsMustMatchBatch) {
  // cu_seqlens_q says batch 1, the block table has 2 rows.
  paged_call c;
  const std::vector<std::int32_t> cu = {0, 2};
  expect_bad(c, [&] {
    headwise::attention_paged_varlen(tensor_view<const float, 3>(c.q.data(), {2, c.HQ, c.D}),
                                     tensor_view<const std::int32_t, 1>(cu.data(), {2}), c.kv(),
                                     tensor_view<float, 3>(c.out.data(), {2, c.HQ, c.D}), c.o,
                                     tensor_view<float, 2>(c.lse.data(), {c.HQ, 2}));
  }, "kv.block_table.shape[0]");
}

TEST(PagedBadInput, PagedVarlenCuSeqlensLastNotTotalThrows) {
  paged_call c;
  const std::vector<std::int32_t> cu = {0, 1, 1};  // total_q is 2
  expect_bad(c, [&] {
    headwise::attention_paged_varlen(tensor_view<const float, 3>(c.q.data(), {2, c.HQ, c.D}),
                                     tensor_view<const std::int32_t, 1>(cu.data(), {3}), c.kv(),
                                     tensor_view<float, 3>(c.out.data(), {2, c.HQ, c.D}), c.o,
                                     tensor_view<float, 2>(c.lse.data(), {c.HQ, 2}));
  }, "cu_seqlens_q[2]");
}

/// A valid attention_varlen call: batch 3, q lengths 2, 1, 3 (total 6), k lengths 4, 0, 5 (total 9).
struct varlen_call {
  static constexpr std::int64_t HQ = 4, HK = 2, D = 8, TQ = 6, TK = 9;
  std::vector<float> q = random_normal(TQ * HQ * D, 41), k = random_normal(TK * HK * D, 42), v = random_normal(TK * HK * D, 43);
  std::vector<float> out = std::vector<float>(TQ * HQ * D, kOutSentinel), lse = std::vector<float>(HQ * TQ, kLseSentinel);
  std::vector<std::int32_t> cu_q = {0, 2, 3, 6}, cu_k = {0, 4, 4, 9};
  attention_options o;
  varlen_call() { o.causal = causal_mode::bottom_right; }
  void run() {
    headwise::attention_varlen(tensor_view<const float, 3>(q.data(), {TQ, HQ, D}), tensor_view<const float, 3>(k.data(), {TK, HK, D}),
                               tensor_view<const float, 3>(v.data(), {TK, HK, D}),
                               tensor_view<const std::int32_t, 1>(cu_q.data(), {static_cast<std::int64_t>(cu_q.size())}),
                               tensor_view<const std::int32_t, 1>(cu_k.data(), {static_cast<std::int64_t>(cu_k.size())}),
                               tensor_view<float, 3>(out.data(), {TQ, HQ, D}), o, tensor_view<float, 2>(lse.data(), {HQ, TQ}));
  }
  [[nodiscard]] std::vector<std::vector<unsigned char>> snapshot() const {
    return {bytes_of(q), bytes_of(k), bytes_of(v), bytes_of(out), bytes_of(lse), bytes_of(cu_q), bytes_of(cu_k)};
  }
};

TEST(VarlenBadInput, ValidCallRuns) {
  varlen_call c;
  EXPECT_NO_THROW(c.run());
}

TEST(VarlenBadInput, CuSeqlensQNotStartingAtZeroThrows) {
  varlen_call c;
  c.cu_q = {1, 2, 3, 6};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_q[0]");
}

TEST(VarlenBadInput, CuSeqlensKNotStartingAtZeroThrows) {
  varlen_call c;
  c.cu_k = {2, 4, 4, 9};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_k[0]");
}

TEST(VarlenBadInput, CuSeqlensQNotMonotoneThrows) {
  varlen_call c;
  c.cu_q = {0, 3, 2, 6};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_q[2]");
}

TEST(VarlenBadInput, CuSeqlensKNotMonotoneThrows) {
  varlen_call c;
  c.cu_k = {0, 4, 3, 9};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_k[2]");
}

TEST(VarlenBadInput, CuSeqlensQLastNotTotalThrows) {
  varlen_call c;
  c.cu_q = {0, 2, 3, 5};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_q[3]");
}

TEST(VarlenBadInput, CuSeqlensKLastNotTotalThrows) {
  varlen_call c;
  c.cu_k = {0, 4, 4, 10};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_k[3]");
}

TEST(VarlenBadInput, CuSeqlensQAndKOfDifferentLengthsThrows) {
  varlen_call c;
  c.cu_k = {0, 4, 9};
  expect_bad(c, [&] { c.run(); }, "cu_seqlens_k.shape[0]");
}

/// A valid kv_cache_append: caches (2, 8, 2, 4) bf16, positions 3 and 5, n = 3.
struct append_call {
  static constexpr std::int64_t B = 2, CAP = 8, H = 2, D = 4;
  std::vector<bf16> kc = std::vector<bf16>(B * CAP * H * D, bf16{0x1234}), vc = kc;
  std::vector<float> kn = random_normal(B * 3 * H * D, 51), vn = random_normal(B * 3 * H * D, 52);
  std::vector<std::int32_t> pos = {3, 5};
  std::int64_t n = 3;
  void run() {
    headwise::kv_cache_append(headwise::bshd(kc.data(), B, CAP, H, D), headwise::bshd(vc.data(), B, CAP, H, D),
                              tensor_view<const std::int32_t, 1>(pos.data(), {B}),
                              headwise::bshd<const float>(kn.data(), B, n, H, D), headwise::bshd<const float>(vn.data(), B, n, H, D));
  }
  [[nodiscard]] std::vector<std::vector<unsigned char>> snapshot() const {
    return {bytes_of(kc), bytes_of(vc), bytes_of(kn), bytes_of(vn), bytes_of(pos)};
  }
};

TEST(KvCacheAppendBadInput, ValidAppendFillsTheCacheExactly) {
  append_call c;
  EXPECT_NO_THROW(c.run());
}

TEST(KvCacheAppendBadInput, AppendBeyondCapacityThrows) {
  append_call c;
  c.pos = {3, 6};  // 6 + 3 > 8
  expect_bad(c, [&] { c.run(); }, "cache_seqlens[1]");
}

TEST(KvCacheAppendBadInput, AppendAtNegativePositionThrows) {
  append_call c;
  c.pos = {-1, 0};
  expect_bad(c, [&] { c.run(); }, "cache_seqlens[0]");
}

/// A valid paged_kv_append: pages (6, 4, 2, 4) bf16, table [[0, 1, -1], [2, 3, 4]], lengths 5, 9, n = 2.
struct paged_append_call {
  static constexpr std::int64_t B = 2, NP = 6, H = 2, D = 4, MP = 3;
  std::int64_t page_size = 4, n = 2;
  std::vector<bf16> kp = std::vector<bf16>(NP * 4 * H * D, bf16{0x1234}), vp = kp;
  std::vector<float> kn = random_normal(B * 4 * H * D, 61), vn = random_normal(B * 4 * H * D, 62);
  std::vector<std::int32_t> table = {0, 1, -1, 2, 3, 4}, seqlens = {5, 9};
  void run() {
    headwise::paged_kv_append(tensor_view<bf16, 4>(kp.data(), {NP, page_size, H, D}),
                              tensor_view<bf16, 4>(vp.data(), {NP, page_size, H, D}),
                              tensor_view<const std::int32_t, 2>(table.data(), {B, MP}),
                              tensor_view<const std::int32_t, 1>(seqlens.data(), {B}),
                              headwise::bshd<const float>(kn.data(), B, n, H, D), headwise::bshd<const float>(vn.data(), B, n, H, D));
  }
  [[nodiscard]] std::vector<std::vector<unsigned char>> snapshot() const {
    return {bytes_of(kp), bytes_of(vp), bytes_of(kn), bytes_of(vn), bytes_of(table), bytes_of(seqlens)};
  }
};

TEST(PagedKvAppendBadInput, ValidPagedAppendRuns) {
  paged_append_call c;
  EXPECT_NO_THROW(c.run());
}

TEST(PagedKvAppendBadInput, PagedAppendWithNoRoomThrows) {
  paged_append_call c;
  c.seqlens = {5, 11};  // 11 + 2 > 3 pages x 4
  expect_bad(c, [&] { c.run(); }, "seqlens[1]");
}

TEST(PagedKvAppendBadInput, PagedAppendIntoUnallocatedPageThrows) {
  paged_append_call c;
  c.n = 4;  // sequence 0 grows to 9 tokens: needs table[0][2], which is -1
  expect_bad(c, [&] { c.run(); }, "block_table[0][2]");
}

TEST(PagedKvAppendBadInput, PagedAppendNegativeSeqlensThrows) {
  paged_append_call c;
  c.seqlens = {-2, 9};
  expect_bad(c, [&] { c.run(); }, "seqlens[0]");
}

TEST(PagedKvAppendBadInput, PagedAppendPageSizeZeroThrows) {
  paged_append_call c;
  c.page_size = 0;
  expect_bad(c, [&] { c.run(); }, "page_size");
}

}  // namespace
