// headwise::model's differential attention layer (headwise/model/diff.hpp): λ_init and λ, the
// GDA / DIFF V1 layer forward (fused kernel and the unfused two-call form), the K/V cache
// (chunked prefill and decode), group-differentiated growth of the signal heads, bad input.
//
// The oracle is an fp64 layer written here from the formulas (ALGORITHMS.md §2-§3),
// independently of the library code: projections in double, interleaved RoPE per d-wide head,
// per-head causal softmax (signal head i on k1 of pair i / (Hs/P), noise head n on k2 of pair
// n / (Hn/P), both reading the pair's 2d-wide V), out1_i − λ·out2_{i/G}, RMSNorm over 2d
// (eps 1e-5) times the shared weight and (1 − λ_init), then W_o.
//
// Tolerances (max|got − want| / max|want| over a whole layer output):
//   * kLayerTol = 1e-5: an f32 layer (f32 GEMMs of depth <= 64, f32 RoPE, the f32 kernel, an
//     RMSNorm whose denominator is an O(1) per-head RMS) against fp64, or two f32 paths against
//     each other (fused vs unfused, decode vs prefill, grown vs original). Each f32 step adds a
//     few ulps (6e-8) times a growth factor of order sqrt(depth); measured <= 1e-6, so 1e-5
//     keeps a margin and still catches real errors (a wrong head, pair, λ, RoPE or norm all give
//     >= 1e-2).
//   * kBf16Tol = 2e-2: a bf16 K/V cache (relative rounding 2^-9 per stored value) against f32.
//   * λ_init and λ against hand values (12 digits): 1e-11; against the same fp64 formula: 1e-15.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include <headwise/model/diff.hpp>

#include "common/testing.hpp"

namespace {

namespace hm = headwise::model;
using hm::matrix;
using hwt::ThrowsArgumentError;

constexpr double kLayerTol = 1e-5;
constexpr double kBf16Tol = 2e-2;

void report(const std::string& what, double err, double tol) {
  if (std::getenv("HEADWISE_TEST_VERBOSE") != nullptr)
    std::printf("[errors] %.3g of %.3g | %s\n", err, tol, what.c_str());
}

// =============================================================================================
// Random weights and comparisons
// =============================================================================================

matrix random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed, float stddev) {
  matrix m(rows, cols);
  hwt::fill_normal(std::span<float>(m.data(), static_cast<std::size_t>(m.size())), seed, 0.0f, stddev);
  return m;
}

hm::weight_vector random_vector(std::int64_t n, std::uint64_t seed, float mean, float stddev) {
  hm::weight_vector v(n);
  hwt::fill_normal(std::span<float>(v.data(), static_cast<std::size_t>(v.size())), seed, mean, stddev);
  return v;
}

float fan_in(std::int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); }

/// A small layer: d_model 48, head_dim 8, heads_noise 2, heads_signal = G·2.
hm::gda_config small_config(std::int64_t group, std::int64_t pairs, bool rope) {
  hm::gda_config c;
  c.d_model = 48;
  c.heads_noise = 2;
  c.heads_signal = group * c.heads_noise;
  c.kv_pairs = pairs;
  c.head_dim = 8;
  c.layer_index = 2;  // λ_init = 0.4707
  c.rope = rope;
  c.rope_theta = 100.0;  // sizeable angles over a dozen positions
  return c;
}

hm::gda_weights random_weights(const hm::gda_config& c, std::uint64_t seed) {
  const std::int64_t d = c.head_dim, p = c.kv_pairs;
  hm::gda_weights w;
  w.w_q = random_matrix(c.query_heads() * d, c.d_model, seed + 1, fan_in(c.d_model));
  w.w_k = random_matrix(2 * p * d, c.d_model, seed + 2, fan_in(c.d_model));
  w.w_v = random_matrix(p * 2 * d, c.d_model, seed + 3, fan_in(c.d_model));
  w.w_o = random_matrix(c.d_model, c.heads_signal * 2 * d, seed + 4, fan_in(c.heads_signal * 2 * d));
  // Larger than the reference's N(0, 0.1²) init, so that λ is visibly away from λ_init.
  w.lambda_q1 = random_vector(d, seed + 5, 0.0f, 0.3f);
  w.lambda_k1 = random_vector(d, seed + 6, 0.0f, 0.3f);
  w.lambda_q2 = random_vector(d, seed + 7, 0.0f, 0.3f);
  w.lambda_k2 = random_vector(d, seed + 8, 0.0f, 0.3f);
  w.norm_weight = random_vector(2 * d, seed + 9, 1.0f, 0.2f);
  return w;
}

/// max|got − want| / max|want|.
double rel_err(const matrix& got, const std::vector<double>& want) {
  EXPECT_EQ(static_cast<std::size_t>(got.size()), want.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size() && i < static_cast<std::size_t>(got.size()); ++i) {
    const double g = static_cast<double>(got.data()[i]);
    num = std::max(num, std::isnan(g) ? INFINITY : std::abs(g - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / (den > 0 ? den : 1.0);
}

double rel_err(const matrix& got, const matrix& want) {
  return rel_err(got, std::vector<double>(want.data(), want.data() + want.size()));
}

// =============================================================================================
// The fp64 oracle, written from the formulas
// =============================================================================================

using vec = std::vector<double>;
using rows = std::vector<vec>;

double ref_lambda_init(std::int64_t layer) { return 0.8 - 0.6 * std::exp(-0.3 * static_cast<double>(layer)); }

double ref_dot(const hm::weight_vector& a, const hm::weight_vector& b) {
  double s = 0;
  for (Eigen::Index i = 0; i < a.size(); ++i) s += static_cast<double>(a(i)) * static_cast<double>(b(i));
  return s;
}

vec ref_linear(const matrix& w, const vec& x) {
  vec y(static_cast<std::size_t>(w.rows()), 0.0);
  for (std::int64_t r = 0; r < w.rows(); ++r)
    for (std::int64_t c = 0; c < w.cols(); ++c)
      y[static_cast<std::size_t>(r)] += static_cast<double>(w(r, c)) * x[static_cast<std::size_t>(c)];
  return y;
}

/// Interleaved RoPE of one d-wide head: pair (2i, 2i+1) turns by pos·theta^(-2i/d).
void ref_rope(double* x, std::int64_t d, std::int64_t pos, double theta) {
  for (std::int64_t i = 0; i < d / 2; ++i) {
    const double a =
        static_cast<double>(pos) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

/// Softmax attention of one head, fp64: query t sees keys j <= t (causal; seq_q = seq_kv) or all.
rows ref_head(const rows& q, const rows& k, const rows& v, double scale, bool causal) {
  rows o;
  for (std::size_t t = 0; t < q.size(); ++t) {
    const std::size_t visible = causal ? t + 1 : k.size();
    vec s(visible);
    double mx = -INFINITY;
    for (std::size_t j = 0; j < visible; ++j) {
      double dot = 0;
      for (std::size_t e = 0; e < q[t].size(); ++e) dot += q[t][e] * k[j][e];
      s[j] = scale * dot;
      mx = std::max(mx, s[j]);
    }
    double den = 0;
    vec acc(v[0].size(), 0.0);
    for (std::size_t j = 0; j < visible; ++j) {
      const double p = std::exp(s[j] - mx);
      den += p;
      for (std::size_t e = 0; e < acc.size(); ++e) acc[e] += p * v[j][e];
    }
    for (auto& a : acc) a /= den;
    o.push_back(acc);
  }
  return o;
}

/// Columns [first, first + width) of every row.
rows slice(const rows& m, std::int64_t first, std::int64_t width) {
  rows s;
  for (const auto& r : m) s.emplace_back(r.begin() + first, r.begin() + first + width);
  return s;
}

/// The GDA layer in fp64 on a prompt at positions start_pos.. (no earlier context).
vec ref_gda(const hm::gda_config& c, const hm::gda_weights& w, const matrix& x, std::int64_t start_pos = 0) {
  const std::int64_t n = x.rows(), d = c.head_dim, hs = c.heads_signal, hn = c.heads_noise, p = c.kv_pairs;
  const std::int64_t g = hs / hn;
  const double lambda_init = ref_lambda_init(c.layer_index);
  const double lambda =
      std::exp(ref_dot(w.lambda_q1, w.lambda_k1)) - std::exp(ref_dot(w.lambda_q2, w.lambda_k2)) + lambda_init;
  rows q, k, v;
  for (std::int64_t t = 0; t < n; ++t) {
    const vec xt(x.data() + t * x.cols(), x.data() + (t + 1) * x.cols());
    q.push_back(ref_linear(w.w_q, xt));
    k.push_back(ref_linear(w.w_k, xt));
    v.push_back(ref_linear(w.w_v, xt));
    if (c.rope) {
      for (std::int64_t h = 0; h < hs + hn; ++h)
        ref_rope(&q.back()[static_cast<std::size_t>(h * d)], d, start_pos + t, c.rope_theta);
      for (std::int64_t h = 0; h < 2 * p; ++h)
        ref_rope(&k.back()[static_cast<std::size_t>(h * d)], d, start_pos + t, c.rope_theta);
    }
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Striped query heads: group m = [signal m·G .. m·G+G-1, noise m].
  auto q_head = [&](std::int64_t m, std::int64_t slot) { return slice(q, (m * (g + 1) + slot) * d, d); };
  std::vector<rows> noise;
  for (std::int64_t m = 0; m < hn; ++m) {
    const std::int64_t pair = m / (hn / p);
    noise.push_back(ref_head(q_head(m, g), slice(k, (2 * pair + 1) * d, d), slice(v, pair * 2 * d, 2 * d),
                             scale, c.causal));
  }
  rows o(static_cast<std::size_t>(n), vec(static_cast<std::size_t>(hs * 2 * d)));
  for (std::int64_t i = 0; i < hs; ++i) {
    const std::int64_t pair = i / (hs / p);
    const rows sig = ref_head(q_head(i / g, i % g), slice(k, 2 * pair * d, d), slice(v, pair * 2 * d, 2 * d),
                              scale, c.causal);
    for (std::int64_t t = 0; t < n; ++t) {
      vec diff(static_cast<std::size_t>(2 * d));
      double ss = 0;
      for (std::int64_t e = 0; e < 2 * d; ++e) {
        const auto ue = static_cast<std::size_t>(e);
        diff[ue] = sig[static_cast<std::size_t>(t)][ue] -
                   lambda * noise[static_cast<std::size_t>(i / g)][static_cast<std::size_t>(t)][ue];
        ss += diff[ue] * diff[ue];
      }
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(2 * d) + 1e-5);
      for (std::int64_t e = 0; e < 2 * d; ++e)
        o[static_cast<std::size_t>(t)][static_cast<std::size_t>(i * 2 * d + e)] =
            (1.0 - lambda_init) * diff[static_cast<std::size_t>(e)] * inv *
            static_cast<double>(w.norm_weight(e));
    }
  }
  vec out;
  for (std::int64_t t = 0; t < n; ++t) {
    const vec y = ref_linear(w.w_o, o[static_cast<std::size_t>(t)]);
    out.insert(out.end(), y.begin(), y.end());
  }
  return out;
}

// =============================================================================================
// λ_init and λ
// =============================================================================================

TEST(DiffLambda, diff_lambda_init_values) {
  // 0.8 − 0.6·exp(−0.3·l), l 0-based (unilm's depth): 0.2, 0.35551, 0.47071, 0.55606, ...
  const double want[] = {0.2, 0.355509067591, 0.470713018344, 0.556058204156, 0.619283472853, 0.666121903911};
  for (std::int64_t l = 0; l < 6; ++l) {
    EXPECT_NEAR(hm::diff_lambda_init(l), want[l], 1e-11) << "layer " << l;
    EXPECT_NEAR(hm::diff_lambda_init(l), ref_lambda_init(l), 1e-15) << "layer " << l;
  }
  EXPECT_DOUBLE_EQ(hm::diff_lambda_init(0), 0.8 - 0.6);
  EXPECT_NEAR(hm::diff_lambda_init(1000), 0.8, 1e-15);
  hm::gda_config c = small_config(2, 2, true);
  c.layer_index = 4;
  EXPECT_EQ(c.lambda_init(), hm::diff_lambda_init(4));
}

TEST(DiffLambda, diff_lambda_matches_hand_values) {
  // λq1·λk1 = 1·0.5 + 2·0.25 = 1; λq2·λk2 = −1·0.5 + 0·3 = −0.5.
  hm::weight_vector q1(2), k1(2), q2(2), k2(2);
  q1 << 1.0f, 2.0f;
  k1 << 0.5f, 0.25f;
  q2 << -1.0f, 0.0f;
  k2 << 0.5f, 3.0f;
  EXPECT_NEAR(hm::diff_lambda(q1, k1, q2, k2, 0.2), std::exp(1.0) - std::exp(-0.5) + 0.2, 1e-12);
  EXPECT_NEAR(hm::diff_lambda(q1, k1, q2, k2, 0.2), 2.311751168746, 1e-11);
  // Zero vectors: exp(0) − exp(0) + λ_init = λ_init (the initial λ of a fresh layer ≈ λ_init).
  const hm::weight_vector z = hm::weight_vector::Zero(8);
  EXPECT_EQ(hm::diff_lambda(z, z, z, z, 0.35), 0.35);
  // λ can be negative: nothing clamps it.
  const hm::weight_vector z2 = hm::weight_vector::Zero(2);
  EXPECT_LT(hm::diff_lambda(z2, z2, q1, k1, 0.2), 0.0);
  // The layer's λ uses its config's λ_init.
  const hm::gda_config c = small_config(2, 2, true);
  const hm::gda_weights w = random_weights(c, 1);
  EXPECT_EQ(w.lambda(c),
            hm::diff_lambda(w.lambda_q1, w.lambda_k1, w.lambda_q2, w.lambda_k2, hm::diff_lambda_init(2)));
  const headwise::diff_options o = hm::gda_options(c, w, 3);
  EXPECT_EQ(*o.lambda, static_cast<float>(w.lambda(c)));
  EXPECT_EQ(*o.lambda_init, static_cast<float>(hm::diff_lambda_init(2)));
  EXPECT_EQ(o.causal, headwise::causal_mode::bottom_right);
  EXPECT_EQ(o.norm, headwise::diff_norm::rms);
  EXPECT_EQ(o.norm_weight.data, w.norm_weight.data());
  EXPECT_EQ(o.norm_weight.shape[0], 16);
  EXPECT_FALSE(o.scale.has_value());  // the kernel's 1/sqrt(head_dim)
  EXPECT_EQ(o.num_threads, 3);
}

// =============================================================================================
// The layer: fused == unfused == fp64, for G = 1 (DIFF), 2, 4, with and without RoPE
// =============================================================================================

struct layer_case {
  std::int64_t group, pairs;
  bool rope, causal;
  [[nodiscard]] std::string name() const {
    // Appended piece by piece: GCC 12 warns (-Wrestrict, a false positive) on "G" + std::to_string.
    std::string s = "G";
    s += std::to_string(group);
    s += "_P";
    s += std::to_string(pairs);
    s += rope ? "_rope" : "_norope";
    s += causal ? "" : "_noncausal";
    return s;
  }
};

void PrintTo(const layer_case& c, std::ostream* os) { *os << c.name(); }

class GdaLayerTest : public ::testing::TestWithParam<layer_case> {};

TEST_P(GdaLayerTest, gda_fused_matches_fp64_and_unfused) {
  const layer_case& lc = GetParam();
  hm::gda_config cfg = small_config(lc.group, lc.pairs, lc.rope);
  cfg.causal = lc.causal;
  const hm::gda_weights w = random_weights(cfg, 100 + static_cast<std::uint64_t>(lc.group * 10 + lc.pairs));
  const matrix x = random_matrix(13, cfg.d_model, 7, 1.0f);
  const matrix fused = hm::gda_forward(cfg, w, x);
  const matrix unfused = hm::gda_forward_unfused(cfg, w, x);
  const vec ref = ref_gda(cfg, w, x);
  const double e_fused = rel_err(fused, ref), e_unfused = rel_err(unfused, ref),
               e_fu = rel_err(fused, unfused);
  report("gda fused vs fp64 " + lc.name(), e_fused, kLayerTol);
  report("gda unfused vs fp64 " + lc.name(), e_unfused, kLayerTol);
  EXPECT_LE(e_fused, kLayerTol);
  EXPECT_LE(e_unfused, kLayerTol);
  EXPECT_LE(e_fu, kLayerTol);
  // At later positions (RoPE moves, the relative geometry does not: the same up to rounding).
  const matrix later = hm::gda_forward(cfg, w, x, 37);
  EXPECT_LE(rel_err(later, ref_gda(cfg, w, x, 37)), kLayerTol);
  EXPECT_LE(rel_err(hm::gda_forward_unfused(cfg, w, x, 37), ref_gda(cfg, w, x, 37)), kLayerTol);
}

INSTANTIATE_TEST_SUITE_P(Configs, GdaLayerTest,
                         ::testing::Values(layer_case{1, 2, true, true}, layer_case{1, 2, false, true},
                                           layer_case{1, 1, true, true}, layer_case{2, 1, true, true},
                                           layer_case{2, 2, false, true}, layer_case{2, 2, true, true},
                                           layer_case{4, 2, true, true}, layer_case{4, 1, false, true},
                                           layer_case{2, 2, true, false}),
                         [](const ::testing::TestParamInfo<layer_case>& p) { return p.param.name(); });

TEST(GdaLayer, gda_oracle_is_sensitive) {
  // The checks above would catch a wrong λ, a wrong noise head or a wrong pair: each moves the
  // fp64 output by far more than kLayerTol.
  const hm::gda_config cfg = small_config(2, 2, true);
  const hm::gda_weights w = random_weights(cfg, 5);
  const matrix x = random_matrix(9, cfg.d_model, 6, 1.0f);
  const matrix got = hm::gda_forward(cfg, w, x);
  hm::gda_weights other_lambda = w;
  other_lambda.lambda_q1 *= 1.5f;
  EXPECT_GT(rel_err(got, ref_gda(cfg, other_lambda, x)), 1e-3);
  hm::gda_weights swapped = w;  // noise heads of the two groups swapped
  const std::int64_t d = cfg.head_dim;
  swapped.w_q.middleRows(cfg.q_row(0, 2), d) = w.w_q.middleRows(cfg.q_row(1, 2), d);
  swapped.w_q.middleRows(cfg.q_row(1, 2), d) = w.w_q.middleRows(cfg.q_row(0, 2), d);
  EXPECT_GT(rel_err(got, ref_gda(cfg, swapped, x)), 1e-3);
  hm::gda_config later = cfg;
  later.layer_index = 3;
  EXPECT_GT(rel_err(got, ref_gda(later, w, x)), 1e-3);
}

TEST(GdaLayer, gda_empty_chunk) {
  const hm::gda_config cfg = small_config(2, 2, true);
  const hm::gda_weights w = random_weights(cfg, 8);
  EXPECT_EQ(hm::gda_forward(cfg, w, matrix(0, cfg.d_model)).rows(), 0);
  EXPECT_EQ(hm::gda_forward(cfg, w, matrix(0, cfg.d_model)).cols(), cfg.d_model);
  EXPECT_EQ(hm::gda_forward_unfused(cfg, w, matrix(0, cfg.d_model)).rows(), 0);
  hm::gda_cache<float> cache(cfg);
  EXPECT_EQ(hm::gda_forward(cfg, w, matrix(0, cfg.d_model), cache).rows(), 0);
  EXPECT_EQ(cache.length(), 0);
}

// =============================================================================================
// The K/V cache: chunked prefill and decode against one-shot prefill; bf16 cache
// =============================================================================================

TEST(GdaCache, gda_decode_matches_prefill) {
  for (const std::int64_t group : {1, 4}) {
    const hm::gda_config cfg = small_config(group, 2, true);
    const hm::gda_weights w = random_weights(cfg, 40 + static_cast<std::uint64_t>(group));
    const std::int64_t n = 14;
    const matrix x = random_matrix(n, cfg.d_model, 42, 1.0f);
    const matrix full = hm::gda_forward(cfg, w, x);
    EXPECT_LE(rel_err(full, ref_gda(cfg, w, x)), kLayerTol);
    // Prompt of 5, a chunk of 3 at positions 5..7, then decode 8..13 one token at a time.
    hm::gda_cache<float> cache(cfg, n);
    matrix got(n, cfg.d_model);
    got.topRows(5) = hm::gda_forward(cfg, w, x.topRows(5), cache);
    got.middleRows(5, 3) = hm::gda_forward(cfg, w, x.middleRows(5, 3), cache);
    for (std::int64_t p = 8; p < n; ++p) {
      got.row(p) = hm::gda_forward(cfg, w, x.middleRows(p, 1), cache);
      EXPECT_EQ(cache.length(), p + 1);
      EXPECT_LE(rel_err(got.row(p), full.row(p)), kLayerTol) << "G " << group << ", position " << p;
    }
    EXPECT_LE(rel_err(got, full), kLayerTol) << "G " << group;
    // Roll back the last two tokens and decode them again: the same rows.
    cache.truncate(n - 2);
    for (std::int64_t p = n - 2; p < n; ++p)
      EXPECT_LE(rel_err(hm::gda_forward(cfg, w, x.middleRows(p, 1), cache), full.row(p)), kLayerTol);
  }
}

TEST(GdaCache, gda_bf16_cache) {
  const hm::gda_config cfg = small_config(2, 2, true);
  const hm::gda_weights w = random_weights(cfg, 51);
  const std::int64_t n = 10;
  const matrix x = random_matrix(n, cfg.d_model, 52, 1.0f);
  hm::gda_cache<float> f32(cfg);
  hm::gda_cache<headwise::bf16> bf(cfg);
  matrix out_f32(n, cfg.d_model), out_bf(n, cfg.d_model);
  out_f32.topRows(6) = hm::gda_forward(cfg, w, x.topRows(6), f32);
  out_bf.topRows(6) = hm::gda_forward(cfg, w, x.topRows(6), bf);
  for (std::int64_t p = 6; p < n; ++p) {
    out_f32.row(p) = hm::gda_forward(cfg, w, x.middleRows(p, 1), f32);
    out_bf.row(p) = hm::gda_forward(cfg, w, x.middleRows(p, 1), bf);
  }
  const double e = rel_err(out_bf, out_f32);
  report("gda bf16 vs f32 cache", e, kBf16Tol);
  EXPECT_LE(e, kBf16Tol);
  EXPECT_GT(e, 0.0);  // the cache really is bf16
  EXPECT_LE(rel_err(out_f32, hm::gda_forward(cfg, w, x)), kLayerTol);
}

// =============================================================================================
// Group-differentiated growth
// =============================================================================================

struct growth_case {
  std::int64_t group, factor;
  std::vector<double> split;
  [[nodiscard]] std::string name() const {
    std::string s = "G";
    s += std::to_string(group);
    s += "_x";
    s += std::to_string(factor);
    s += split.empty() ? "_uniform" : "_split";
    return s;
  }
};

void PrintTo(const growth_case& c, std::ostream* os) { *os << c.name(); }

class GdaGrowthTest : public ::testing::TestWithParam<growth_case> {};

TEST_P(GdaGrowthTest, gda_growth_keeps_the_function) {
  const growth_case& gc = GetParam();
  const hm::gda_config cfg = small_config(gc.group, 2, true);
  const hm::gda_weights w = random_weights(cfg, 60 + static_cast<std::uint64_t>(gc.group * 10 + gc.factor));
  const hm::gda_parameters grown = hm::grow_signal_heads(cfg, w, gc.factor, gc.split);
  const hm::gda_config& g = grown.config;
  EXPECT_EQ(g.heads_signal, cfg.heads_signal * gc.factor);
  EXPECT_EQ(g.group(), cfg.group() * gc.factor);
  EXPECT_EQ(g.heads_noise, cfg.heads_noise);
  EXPECT_EQ(g.kv_pairs, cfg.kv_pairs);
  EXPECT_EQ(g.head_dim, cfg.head_dim);
  EXPECT_EQ(g.layer_index, cfg.layer_index);
  EXPECT_NO_THROW(grown.weights.check(g));
  // K, V, λ and the norm are untouched; every copy holds its source head's W_q rows.
  EXPECT_TRUE(grown.weights.w_k == w.w_k);
  EXPECT_TRUE(grown.weights.w_v == w.w_v);
  EXPECT_TRUE(grown.weights.norm_weight == w.norm_weight);
  EXPECT_EQ(grown.weights.lambda(g), w.lambda(cfg));
  const std::int64_t d = cfg.head_dim;
  for (std::int64_t m = 0; m < cfg.heads_noise; ++m) {
    EXPECT_TRUE(grown.weights.w_q.middleRows(g.q_row(m, g.group()), d) ==
                w.w_q.middleRows(cfg.q_row(m, cfg.group()), d));
    for (std::int64_t s = 0; s < g.group(); ++s)
      EXPECT_TRUE(grown.weights.w_q.middleRows(g.q_row(m, s), d) ==
                  w.w_q.middleRows(cfg.q_row(m, s / gc.factor), d))
          << "group " << m << " slot " << s;
  }
  const matrix x = random_matrix(11, cfg.d_model, 61, 1.0f);
  const matrix before = hm::gda_forward(cfg, w, x);
  const matrix after = hm::gda_forward(g, grown.weights, x);
  const double e = rel_err(after, before);
  report("gda grown vs original " + gc.name(), e, kLayerTol);
  EXPECT_LE(e, kLayerTol);
  EXPECT_LE(rel_err(after, ref_gda(g, grown.weights, x)), kLayerTol);
  EXPECT_LE(rel_err(hm::gda_forward_unfused(g, grown.weights, x), before), kLayerTol);
}

INSTANTIATE_TEST_SUITE_P(Factors, GdaGrowthTest,
                         ::testing::Values(growth_case{1, 2, {}}, growth_case{1, 3, {}},
                                           growth_case{2, 2, {}}, growth_case{2, 3, {}},
                                           growth_case{1, 2, {0.75, 0.25}},
                                           growth_case{2, 3, {0.5, 0.3, 0.2}},
                                           growth_case{4, 2, {1.25, -0.25}}, growth_case{2, 1, {}}),
                         [](const ::testing::TestParamInfo<growth_case>& p) { return p.param.name(); });

TEST(GdaGrowth, gda_growth_split_breaks_symmetry_of_w_o_only) {
  const hm::gda_config cfg = small_config(2, 2, false);
  const hm::gda_weights w = random_weights(cfg, 70);
  const hm::gda_parameters grown = hm::grow_signal_heads(cfg, w, 2, {0.75, 0.25});
  const std::int64_t d2 = 2 * cfg.head_dim;
  for (std::int64_t i = 0; i < cfg.heads_signal; ++i) {
    const matrix src = w.w_o.middleCols(i * d2, d2);
    EXPECT_LE(rel_err(grown.weights.w_o.middleCols(2 * i * d2, d2), matrix(src * 0.75f)), 1e-7);
    EXPECT_LE(rel_err(grown.weights.w_o.middleCols((2 * i + 1) * d2, d2), matrix(src * 0.25f)), 1e-7);
  }
  // Growing twice composes: ×2 then ×2 is G·4, the same function.
  const hm::gda_parameters twice = hm::grow_signal_heads(grown.config, grown.weights, 2);
  EXPECT_EQ(twice.config.group(), 4 * cfg.group());
  const matrix x = random_matrix(7, cfg.d_model, 71, 1.0f);
  EXPECT_LE(rel_err(hm::gda_forward(twice.config, twice.weights, x), hm::gda_forward(cfg, w, x)), kLayerTol);
}

// =============================================================================================
// Bad input: argument_error naming the field, before any work
// =============================================================================================

TEST(GdaErrors, gda_bad_config) {
  const hm::gda_config good = small_config(2, 2, true);
  EXPECT_NO_THROW(good.validate());
  auto bad = [&](auto mutate, const char* arg) {
    hm::gda_config c = good;
    mutate(c);
    EXPECT_TRUE(ThrowsArgumentError([&] { c.validate(); }, arg));
    EXPECT_TRUE(
        ThrowsArgumentError([&] { (void)hm::gda_forward(c, random_weights(good, 1), matrix(2, 48)); }, arg));
  };
  bad([](hm::gda_config& c) { c.d_model = 0; }, "config.d_model");
  bad([](hm::gda_config& c) { c.heads_noise = 0; }, "config.heads_noise");
  bad([](hm::gda_config& c) { c.heads_signal = 3; }, "config.heads_signal");  // not a multiple of 2
  bad([](hm::gda_config& c) { c.heads_signal = 0; }, "config.heads_signal");
  bad([](hm::gda_config& c) { c.kv_pairs = 3; }, "config.kv_pairs");  // does not divide heads_noise
  bad([](hm::gda_config& c) { c.kv_pairs = 0; }, "config.kv_pairs");
  bad([](hm::gda_config& c) { c.head_dim = 7; }, "config.head_dim");  // odd with RoPE
  bad([](hm::gda_config& c) { c.layer_index = -1; }, "config.layer_index");
  bad([](hm::gda_config& c) { c.rope_theta = 1.0; }, "config.rope_theta");
  bad([](hm::gda_config& c) { c.pairing = static_cast<hm::rope_pairing>(9); }, "config.pairing");
  bad([](hm::gda_config& c) { c.norm_eps = 0.0f; }, "config.norm_eps");
  // Odd head_dim is fine without RoPE; theta is then unused.
  hm::gda_config c = good;
  c.rope = false;
  c.head_dim = 7;
  c.rope_theta = 0;
  EXPECT_NO_THROW(c.validate());
  EXPECT_TRUE(ThrowsArgumentError([] { (void)hm::diff_lambda_init(-1); }, "layer_index"));
}

TEST(GdaErrors, gda_bad_weights) {
  const hm::gda_config cfg = small_config(2, 2, true);
  const hm::gda_weights good = random_weights(cfg, 90);
  EXPECT_NO_THROW(good.check(cfg));
  const matrix x = random_matrix(3, cfg.d_model, 91, 1.0f);
  auto bad = [&](auto mutate, const char* arg) {
    hm::gda_weights w = good;
    mutate(w);
    EXPECT_TRUE(ThrowsArgumentError([&] { w.check(cfg); }, arg));
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, w, x); }, arg));
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_forward_unfused(cfg, w, x); }, arg));
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::grow_signal_heads(cfg, w, 2); }, arg));
  };
  bad([](hm::gda_weights& w) { w.w_q.resize(47, 48); }, "weights.w_q");
  bad([](hm::gda_weights& w) { w.w_k.resize(32, 47); }, "weights.w_k");
  bad([](hm::gda_weights& w) { w.w_v.resize(16, 48); }, "weights.w_v");
  bad([](hm::gda_weights& w) { w.w_o.resize(48, 32); }, "weights.w_o");
  bad([](hm::gda_weights& w) { w.lambda_q1.resize(7); }, "weights.lambda_q1");
  bad([](hm::gda_weights& w) { w.lambda_k1.resize(0); }, "weights.lambda_k1");
  bad([](hm::gda_weights& w) { w.lambda_q2(3) = NAN; }, "weights.lambda_q2");
  bad([](hm::gda_weights& w) { w.lambda_k2.resize(16); }, "weights.lambda_k2");
  bad([](hm::gda_weights& w) { w.norm_weight.resize(8); }, "weights.norm_weight");
  bad([](hm::gda_weights& w) { w.norm_weight(0) = INFINITY; }, "weights.norm_weight");
  // λ overflows f32: exp(λq1·λk1) with λq1·λk1 = 8·100 = 800.
  bad(
      [](hm::gda_weights& w) {
        w.lambda_q1.setConstant(10.0f);
        w.lambda_k1.setConstant(10.0f);
      },
      "weights.lambda_q1");
  // The message names the expected shape.
  hm::gda_weights w = good;
  w.w_o.resize(48, 63);
  try {
    w.check(cfg);
    ADD_FAILURE() << "no throw";
  } catch (const headwise::argument_error& e) {
    EXPECT_NE(std::string(e.what()).find("48 x 64"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("48 x 63"), std::string::npos) << e.what();
  }
  // diff_lambda's vector lengths.
  const hm::weight_vector a = hm::weight_vector::Ones(4), b = hm::weight_vector::Ones(5);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::diff_lambda(a, b, a, a, 0.2); }, "lambda_k1.size()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::diff_lambda(a, a, b, a, 0.2); }, "lambda_q2.size()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::diff_lambda(a, a, a, b, 0.2); }, "lambda_k2.size()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::diff_lambda(a, a, a, a, NAN); }, "lambda_init"));
}

TEST(GdaErrors, gda_bad_forward_input_leaves_cache_untouched) {
  const hm::gda_config cfg = small_config(2, 2, true);
  const hm::gda_weights w = random_weights(cfg, 92);
  hm::gda_cache<float> cache(cfg);
  (void)hm::gda_forward(cfg, w, random_matrix(3, cfg.d_model, 93, 1.0f), cache);
  ASSERT_EQ(cache.length(), 3);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, w, matrix(2, 47), cache); }, "x.cols()"));
  EXPECT_TRUE(
      ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, w, matrix(2, 48), cache, -1); }, "num_threads"));
  hm::gda_weights bad_w = w;
  bad_w.w_v.resize(1, 1);
  EXPECT_TRUE(
      ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, bad_w, matrix(2, 48), cache); }, "weights.w_v"));
  EXPECT_EQ(cache.length(), 3);
  hm::gda_config other = cfg;
  other.kv_pairs = 1;
  hm::gda_cache<float> wrong(other);
  EXPECT_TRUE(
      ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, w, matrix(2, 48), wrong); }, "cache.pairs()"));
  EXPECT_EQ(wrong.length(), 0);
  other = cfg;
  other.head_dim = 4;
  hm::gda_cache<float> wrong_dim(other);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, w, matrix(2, 48), wrong_dim); },
                                  "cache.head_dim()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_forward(cfg, w, matrix(2, 48), -1); }, "start_pos"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_project(cfg, w, matrix(2, 48), -3); }, "start_pos"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_options(cfg, w, -2); }, "num_threads"));
  EXPECT_TRUE(ThrowsArgumentError([&] { cache.truncate(4); }, "tokens"));
  EXPECT_TRUE(ThrowsArgumentError([&] { cache.append(matrix(1, 32), matrix(1, 31)); }, "v.cols()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { cache.append(matrix(1, 31), matrix(1, 32)); }, "k.cols()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { cache.append(matrix(2, 32), matrix(1, 32)); }, "v.rows()"));
  EXPECT_EQ(cache.length(), 3);
  hm::gda_config bad_cfg = cfg;
  bad_cfg.kv_pairs = 0;
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_cache<float>(bad_cfg); }, "config.kv_pairs"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gda_cache<float>(cfg, -1); }, "reserve_tokens"));
}

TEST(GdaErrors, gda_bad_growth_arguments) {
  const hm::gda_config cfg = small_config(2, 2, true);
  const hm::gda_weights w = random_weights(cfg, 95);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::grow_signal_heads(cfg, w, 0); }, "factor"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::grow_signal_heads(cfg, w, 2, {1.0}); }, "split.size()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::grow_signal_heads(cfg, w, 2, {0.5, 0.6}); }, "split"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::grow_signal_heads(cfg, w, 2, {NAN, 0.5}); }, "split[0]"));
  EXPECT_TRUE(ThrowsArgumentError(
      [&] {
        (void)hm::grow_signal_heads(cfg, w, 3, {0.5, 0.5, INFINITY});
      },
      "split[2]"));
  hm::gda_config bad = cfg;
  bad.heads_signal = 5;
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::grow_signal_heads(bad, w, 2); }, "config.heads_signal"));
}

}  // namespace
