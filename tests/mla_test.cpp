// Absorbed MLA kernel (headwise::mla_absorbed, mla_absorbed_paged): MQA over the latent cache
// with V a prefix view of K, against the fp64 reference on the same stored latent; paged ==
// dense; split-KV thread invariance; decode rows == prefill rows; bad input. The weight-side
// steps (absorption, RoPE, naive form, TransMLA) are tested in mla_model_test.cpp.

#include <numeric>

#include "common/testing.hpp"

namespace {

using namespace hwt;

/// A latent cache (batch, seq_kv, d_c + d_rope) in T, absorbed queries and outputs.
template <class T>
struct mla_case {
  std::int64_t batch, seq_q, seq_kv, heads, d_c, d_rope;
  std::vector<float> q, out, lse, ref_out, ref_lse;
  std::vector<T> latent;

  mla_case(std::int64_t b, std::int64_t sq, std::int64_t skv, std::int64_t h, std::int64_t dc, std::int64_t dr,
           std::uint64_t seed)
      : batch(b), seq_q(sq), seq_kv(skv), heads(h), d_c(dc), d_rope(dr) {
    q = random_normal(static_cast<std::size_t>(b * sq * h * dim()), seed, 0.0f, 0.5f);
    const auto lat = random_normal(static_cast<std::size_t>(b * skv * dim()), seed + 1);
    latent.resize(lat.size());
    for (std::size_t i = 0; i < lat.size(); ++i) latent[i] = headwise::from_float<T>(lat[i]);
    out.assign(static_cast<std::size_t>(b * sq * h * dc), kNaN);
    ref_out = out;
    lse.assign(static_cast<std::size_t>(b * h * sq), kNaN);
    ref_lse = lse;
  }
  [[nodiscard]] std::int64_t dim() const { return d_c + d_rope; }
  [[nodiscard]] tensor_view<const float, 4> qv() const { return {q.data(), {batch, seq_q, heads, dim()}}; }
  [[nodiscard]] tensor_view<const T, 3> lv() const { return {latent.data(), {batch, seq_kv, dim()}}; }
  tensor_view<float, 4> ov(std::vector<float>& o) { return {o.data(), {batch, seq_q, heads, d_c}}; }
  tensor_view<float, 3> lsev(std::vector<float>& l) { return {l.data(), {batch, heads, seq_q}}; }

  void run(const attention_options& o) { headwise::mla_absorbed(qv(), lv(), ov(out), o, lsev(lse)); }
  /// The fp64 reference with the latent as K (all of it) and V (its first d_c values).
  void run_reference(const attention_options& o) {
    const tensor_view<const T, 4> k(latent.data(), {batch, seq_kv, 1, dim()}, {seq_kv * dim(), dim(), dim(), 1});
    const tensor_view<const T, 4> v(latent.data(), {batch, seq_kv, 1, d_c}, {seq_kv * dim(), dim(), dim(), 1});
    headwise::reference::attention(qv(), k, v, ov(ref_out), o, lsev(ref_lse));
  }
  /// max |out - ref| / max|V|, and max |lse - ref| / max(1, |ref|) (-inf == -inf counts 0).
  [[nodiscard]] std::pair<double, double> errors() const {
    double vmax = 1e-30, e = 0, el = 0;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t j = 0; j < seq_kv; ++j)
        for (std::int64_t c = 0; c < d_c; ++c)
          vmax = std::max(vmax, std::abs(static_cast<double>(
                                    headwise::to_float(latent[static_cast<std::size_t>((b * seq_kv + j) * dim() + c)]))));
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double d = std::abs(static_cast<double>(out[i]) - ref_out[i]);
      e = std::max(e, std::isfinite(out[i]) ? d / vmax : INFINITY);
    }
    for (std::size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(ref_lse[i]) && lse[i] == ref_lse[i]) continue;
      const double d = std::abs(static_cast<double>(lse[i]) - ref_lse[i]);
      el = std::max(el, std::isfinite(d) ? d / std::max(1.0, std::abs(static_cast<double>(ref_lse[i]))) : INFINITY);
    }
    return {e, el};
  }
};

attention_options mla_options(causal_mode c = causal_mode::bottom_right, int threads = 0) {
  attention_options o;
  o.scale = 0.1352338f;  // DeepSeek-V3: 192^-0.5 · mscale²
  o.causal = c;
  o.num_threads = threads;
  return o;
}

struct mla_shape {
  std::int64_t batch, seq_q, seq_kv, heads, d_c, d_rope;
};

std::string shape_str(const mla_shape& s) {
  return "b " + std::to_string(s.batch) + " sq " + std::to_string(s.seq_q) + " skv " + std::to_string(s.seq_kv) +
         " heads " + std::to_string(s.heads) + " d_c " + std::to_string(s.d_c) + " d_rope " + std::to_string(s.d_rope);
}

/// Heads across 1..2 lane vectors and beyond (the narrow and the default register blocks),
/// lengths around the tiles and past split_kv (2048: split items and their merge), the
/// DeepSeek dims and small ones.
std::vector<mla_shape> sweep() {
  std::vector<mla_shape> v;
  for (std::int64_t h : {1, 5, 16, 24, 40})
    for (std::int64_t skv : {1, 7, 64, 65, 300}) v.push_back({1, 1, skv, h, 32, 8});
  for (std::int64_t sq : {2, 5}) v.push_back({2, sq, 129, 16, 48, 16});
  v.push_back({1, 1, 2500, 16, 64, 16});   // split in two, merged
  v.push_back({1, 3, 4200, 8, 32, 8});     // three splits, a few query tokens
  v.push_back({1, 1, 200, 16, 512, 64});   // DeepSeek-V2/V3 absorbed dims
  v.push_back({1, 1, 2100, 16, 512, 64});  // ... in three work-sized splits of 960 keys
  v.push_back({1, 1, 70, 128, 512, 64});   // 128 heads: 8 lane vectors on AVX-512
  v.push_back({1, 1, 1100, 128, 512, 64});  // ... in three splits (512 + 512 + 76 keys)
  v.push_back({2, 1, 33, 16, 72, 8});      // d_c not a multiple of the lanes
  return v;
}

template <class T>
void check_sweep(causal_mode c) {
  for (const auto& s : sweep()) {
    mla_case<T> m(s.batch, s.seq_q, s.seq_kv, s.heads, s.d_c, s.d_rope, 7);
    const auto o = mla_options(c);
    m.run(o);
    m.run_reference(o);
    const auto [e, el] = m.errors();
    EXPECT_LE(e, kOutTol) << shape_str(s) << " causal " << causal_name(c);
    EXPECT_LE(el, kLseRelTol) << shape_str(s) << " causal " << causal_name(c);
  }
}

TEST(MlaAbsorbed, mla_absorbed_f32_matches_reference_bottom_right) { check_sweep<float>(causal_mode::bottom_right); }
TEST(MlaAbsorbed, mla_absorbed_f32_matches_reference_no_mask) { check_sweep<float>(causal_mode::none); }
TEST(MlaAbsorbed, mla_absorbed_f32_matches_reference_top_left) { check_sweep<float>(causal_mode::top_left); }
TEST(MlaAbsorbed, mla_absorbed_bf16_latent_matches_reference) { check_sweep<bf16>(causal_mode::bottom_right); }
TEST(MlaAbsorbed, mla_absorbed_f16_latent_matches_reference) { check_sweep<f16>(causal_mode::bottom_right); }

/// The bf16 latent against the f32 result on the unrounded latent: the storage error only.
TEST(MlaAbsorbed, mla_absorbed_bf16_latent_within_tolerance_of_f32) {
  mla_case<float> f(1, 1, 500, 16, 512, 64, 3);
  mla_case<bf16> h(1, 1, 500, 16, 512, 64, 3);
  const auto o = mla_options();
  f.run(o);
  h.run(o);
  double e = 0;
  for (std::size_t i = 0; i < f.out.size(); ++i) e = std::max(e, std::abs(static_cast<double>(f.out[i]) - h.out[i]));
  EXPECT_LE(e, 2e-2);  // bf16 keeps 8 bits: ~4e-3 per value, |V| ~ 3
}

TEST(MlaAbsorbedPaged, mla_absorbed_paged_equals_dense_bitwise) {
  for (std::int64_t page : {16, 7, 1}) {
    const std::int64_t batch = 2, skv = 150, h = 16, dc = 64, dr = 16, d = dc + dr;
    mla_case<bf16> m(batch, 1, skv, h, dc, dr, 11);
    const auto o = mla_options();
    m.run(o);
    // The same tokens in scattered pages.
    const std::int64_t per_seq = (skv + page - 1) / page, pages = batch * per_seq;
    std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(5));
    std::vector<bf16> paged(static_cast<std::size_t>(pages * page * d));
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t j = 0; j < skv; ++j)
        std::copy_n(&m.latent[static_cast<std::size_t>((b * skv + j) * d)], d,
                    &paged[static_cast<std::size_t>((table[static_cast<std::size_t>(b * per_seq + j / page)] * page +
                                                     j % page) *
                                                    d)]);
    std::vector<std::int32_t> seqlens(static_cast<std::size_t>(batch), static_cast<std::int32_t>(skv));
    std::vector<float> out(m.out.size(), kNaN), lse(m.lse.size(), kNaN);
    headwise::mla_absorbed_paged(m.qv(), tensor_view<const bf16, 3>(paged.data(), {pages, page, d}),
                                 tensor_view<const std::int32_t, 2>(table.data(), {batch, per_seq}),
                                 tensor_view<const std::int32_t, 1>(seqlens.data(), {batch}), m.ov(out), o,
                                 m.lsev(lse));
    EXPECT_TRUE(BitwiseEqual(out, m.out)) << "page " << page;
    EXPECT_TRUE(BitwiseEqual(lse, m.lse)) << "page " << page;
  }
}

/// Splits depend on the shape only: one thread and several give the same bits.
TEST(MlaAbsorbed, mla_absorbed_split_results_thread_invariant) {
  mla_case<float> m(1, 1, 3000, 16, 512, 64, 13);  // 4 splits of 960 keys
  m.run(mla_options(causal_mode::bottom_right, 1));
  const auto one = m.out, one_lse = m.lse;
  for (int t : {2, 3, 4}) {
    m.run(mla_options(causal_mode::bottom_right, t));
    EXPECT_TRUE(BitwiseEqual(m.out, one)) << t << " threads";
    EXPECT_TRUE(BitwiseEqual(m.lse, one_lse)) << t << " threads";
  }
}

/// Decode of token p against the first p + 1 latent rows == row p of the causal prefill.
TEST(MlaAbsorbed, mla_absorbed_decode_at_position_matches_prefill_row) {
  const std::int64_t L = 90, h = 16, dc = 64, dr = 16, d = dc + dr;
  mla_case<float> full(1, L, L, h, dc, dr, 17);
  const auto o = mla_options();
  full.run(o);
  for (const std::int64_t p : {std::int64_t{0}, std::int64_t{1}, std::int64_t{40}, L - 1}) {
    std::vector<float> out(static_cast<std::size_t>(h * dc), kNaN);
    headwise::mla_absorbed(tensor_view<const float, 4>(&full.q[static_cast<std::size_t>(p * h * d)], {1, 1, h, d}),
                           tensor_view<const float, 3>(full.latent.data(), {1, p + 1, d}),
                           tensor_view<float, 4>(out.data(), {1, 1, h, dc}), o);
    double e = 0;
    for (std::int64_t i = 0; i < h * dc; ++i)
      e = std::max(e, std::abs(static_cast<double>(out[static_cast<std::size_t>(i)]) -
                               full.out[static_cast<std::size_t>(p * h * dc + i)]));
    EXPECT_LE(e, 1e-5) << "position " << p;
  }
}

TEST(MlaAbsorbedErrors, mla_absorbed_bad_input_throws_before_work) {
  mla_case<float> m(1, 1, 20, 4, 32, 8, 19);
  const auto o = mla_options();
  const auto sentinel = m.out;
  attention_options no_scale = o;
  no_scale.scale.reset();
  EXPECT_TRUE(ThrowsArgumentError([&] { headwise::mla_absorbed(m.qv(), m.lv(), m.ov(m.out), no_scale); },
                                  "options.scale"));
  // d_c larger than the latent (V must be a prefix of it).
  std::vector<float> wide(static_cast<std::size_t>(4 * 41), 0.0f);
  EXPECT_TRUE(ThrowsArgumentError(
      [&] {
        headwise::mla_absorbed(m.qv(), m.lv(), tensor_view<float, 4>(wide.data(), {1, 1, 4, 41}), o);
      },
      "out.shape[3] (d_c)"));
  // Latent width != the queries' width.
  EXPECT_TRUE(ThrowsArgumentError(
      [&] {
        headwise::mla_absorbed(m.qv(), tensor_view<const float, 3>(m.latent.data(), {1, 10, 39}), m.ov(m.out), o);
      },
      "latent.shape[2]"));
  // Batch mismatch.
  EXPECT_TRUE(ThrowsArgumentError(
      [&] {
        headwise::mla_absorbed(m.qv(), tensor_view<const float, 3>(m.latent.data(), {2, 10, 40}), m.ov(m.out), o);
      },
      "latent.shape[0]"));
  // Output overlapping the latent.
  EXPECT_TRUE(ThrowsArgumentError(
      [&] {
        headwise::mla_absorbed(m.qv(), m.lv(), tensor_view<float, 4>(m.latent.data(), {1, 1, 4, 32}), o);
      },
      "out"));
  // Paged: the output overlapping the latent pages, named as such.
  std::vector<std::int32_t> table_ok{0, 1}, seqlens_ok{20};
  try {
    headwise::mla_absorbed_paged(m.qv(), tensor_view<const float, 3>(m.latent.data(), {2, 10, 40}),
                                 tensor_view<const std::int32_t, 2>(table_ok.data(), {1, 2}),
                                 tensor_view<const std::int32_t, 1>(seqlens_ok.data(), {1}),
                                 tensor_view<float, 4>(m.latent.data(), {1, 1, 4, 32}), o);
    ADD_FAILURE() << "no exception for out overlapping latent_pages";
  } catch (const headwise::argument_error& e) {
    EXPECT_EQ(e.argument(), "out");
    EXPECT_NE(std::string(e.what()).find("latent_pages"), std::string::npos) << e.what();
  }
  // Paged: a block-table entry out of range.
  std::vector<std::int32_t> table{0, 5}, seqlens{20};
  EXPECT_TRUE(ThrowsArgumentError(
      [&] {
        headwise::mla_absorbed_paged(m.qv(), tensor_view<const float, 3>(m.latent.data(), {2, 10, 40}),
                                     tensor_view<const std::int32_t, 2>(table.data(), {1, 2}),
                                     tensor_view<const std::int32_t, 1>(seqlens.data(), {1}), m.ov(m.out), o);
      },
      "block_table[0][1]"));
  EXPECT_TRUE(BitwiseEqual(m.out, sentinel));  // untouched by every failed call
}

}  // namespace
