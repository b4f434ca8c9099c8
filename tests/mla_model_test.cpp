// headwise::model: the MLA layer (absorbed and naive forms), RoPE / YaRN / MLA-scale helpers,
// the GQA -> MLA conversion and the latent PCA compression (headwise/model/{rope,mla,transmla}.hpp).
//
// Oracles are written here from the formulas (ALGORITHMS.md §4), in fp64, independently of the
// library code: YaRN frequencies, both RoPE pairings, the naive MLA layer and a GQA layer.
//
// Tolerances (errors are max|got − want| / max|want| over a whole layer output, unless stated):
//   * kLayerTol = 1e-5: an f32 layer (three f32 GEMMs of depth <= 64, f32 RoPE outputs, the f32
//     attention kernel) against fp64, or two f32 paths against each other (absorbed vs naive,
//     decode vs prefill, converted MLA vs GQA, full-rank PCA vs uncompressed). Each f32 step
//     adds a few ulps (u = 6e-8) times a growth factor of order sqrt(depth); measured <= 5e-7
//     on the native build, so 1e-5 keeps a 20x margin and still catches any real error (a wrong
//     head block, a missing RoPE, a wrong scale all give >= 1e-2).
//   * kBf16Tol = 2e-2: a bf16 latent cache (8-bit mantissa: relative rounding 2^-9 = 2e-3 per
//     stored value) against the f32 cache. The rounding enters the logits and values linearly, so
//     the outputs move by a few 1e-3; measured ~3e-3.
//   * RoPE against the fp64 formula: 1e-6 absolute on O(1) inputs (f32 output rounding);
//     half_split vs permuted interleaved is bitwise (the same operations on the same values).
//   * YaRN frequencies against the fp64 formula: 1e-14 relative. Scales: 1e-6 absolute.
//   * PCA: error non-increasing in rank (1e-12 slack for fp64 rounding), <= 1e-5 at full rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numbers>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include <headwise/model/mla.hpp>
#include <headwise/model/rope.hpp>
#include <headwise/model/transmla.hpp>

#include "common/testing.hpp"

namespace {

namespace hm = headwise::model;
using hm::matrix;
using hm::rope_pairing;
using hwt::ThrowsArgumentError;

constexpr double kLayerTol = 1e-5;
constexpr double kBf16Tol = 2e-2;

void report(const char* what, double err, double tol) {
  if (std::getenv("HEADWISE_TEST_VERBOSE") != nullptr) std::printf("[errors] %.3g of %.3g | %s\n", err, tol, what);
}

// =============================================================================================
// Random weights and comparisons
// =============================================================================================

matrix random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed, float stddev) {
  matrix m(rows, cols);
  hwt::fill_normal(std::span<float>(m.data(), static_cast<std::size_t>(m.size())), seed, 0.0f, stddev);
  return m;
}

hm::weight_vector random_gain(std::int64_t n, std::uint64_t seed) {
  hm::weight_vector v(n);
  hwt::fill_normal(std::span<float>(v.data(), static_cast<std::size_t>(v.size())), seed, 1.0f, 0.2f);
  return v;
}

float fan_in(std::int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); }

hm::mla_weights random_weights(const hm::mla_config& m, std::uint64_t seed) {
  hm::mla_weights w;
  const std::int64_t dq = m.qk_nope + m.qk_rope;
  if (m.q_lora_rank == 0) {
    w.w_q = random_matrix(m.heads * dq, m.d_model, seed + 1, fan_in(m.d_model));
  } else {
    w.w_q_a = random_matrix(m.q_lora_rank, m.d_model, seed + 2, fan_in(m.d_model));
    if (m.q_norm) w.q_norm = random_gain(m.q_lora_rank, seed + 3);
    w.w_q_b = random_matrix(m.heads * dq, m.q_lora_rank, seed + 4, fan_in(m.q_lora_rank));
  }
  w.w_kv_a = random_matrix(m.kv_lora_rank + m.qk_rope, m.d_model, seed + 5, fan_in(m.d_model));
  if (m.kv_norm) w.kv_norm = random_gain(m.kv_lora_rank, seed + 6);
  w.w_kv_b = random_matrix(m.heads * (m.qk_nope + m.v_head), m.kv_lora_rank, seed + 7, fan_in(m.kv_lora_rank));
  w.w_o = random_matrix(m.d_model, m.heads * m.v_head, seed + 8, fan_in(m.heads * m.v_head));
  return w;
}

/// V2-Lite-like but small, with YaRN active (max_seq_len > original) so that both the frequency
/// blend and mscale² are exercised; theta 500 so that RoPE turns the pairs by sizeable angles.
hm::mla_config small_config(std::int64_t q_lora, bool kv_norm, rope_pairing pairing) {
  hm::mla_config m;
  m.heads = 4;
  m.d_model = 64;
  m.q_lora_rank = q_lora;
  m.kv_lora_rank = 32;
  m.qk_nope = 16;
  m.qk_rope = 8;
  m.v_head = 16;
  m.rope_theta = 500.0;
  m.yarn = hm::yarn_config{4.0, 16, 32.0, 1.0, 0.707};
  m.max_seq_len = 64;
  m.pairing = pairing;
  m.kv_norm = kv_norm;
  return m;
}

/// max|got − want| / max|want|.
double rel_err(const matrix& got, const std::vector<double>& want) {
  EXPECT_EQ(static_cast<std::size_t>(got.size()), want.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<double>(got.data()[i]);
    num = std::max(num, std::isnan(g) ? INFINITY : std::abs(g - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / (den > 0 ? den : 1.0);
}

std::vector<double> to_double(const matrix& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}

double rel_err(const matrix& got, const matrix& want) { return rel_err(got, to_double(want)); }

// =============================================================================================
// fp64 oracles, written from the formulas
// =============================================================================================

/// YaRN-blended inverse frequencies (DeepSeek precompute_freqs_cis), fp64.
std::vector<double> ref_freqs(std::int64_t dim, double theta, const hm::yarn_config& y, std::int64_t max_seq) {
  std::vector<double> f;
  for (std::int64_t i = 0; i < dim / 2; ++i)
    f.push_back(1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(dim)));
  if (max_seq > y.original_max_position && y.factor != 1.0) {
    const double d = static_cast<double>(dim);
    auto corr = [&](double rot) {
      return d * std::log(static_cast<double>(y.original_max_position) / (rot * 2.0 * std::numbers::pi)) /
             (2.0 * std::log(theta));
    };
    const double lo = std::max(0.0, std::floor(corr(y.beta_fast)));
    double hi = std::min(d - 1.0, std::ceil(corr(y.beta_slow)));
    if (lo == hi) hi += 0.001;
    for (std::size_t i = 0; i < f.size(); ++i) {
      const double ramp = std::min(1.0, std::max(0.0, (static_cast<double>(i) - lo) / (hi - lo)));
      f[i] = f[i] * (1.0 - ramp) + f[i] / y.factor * ramp;
    }
  }
  return f;
}

/// RoPE of one dim-wide vector in fp64: pair i is (2i, 2i+1) or (i, i+dim/2).
void ref_rope(double* x, std::int64_t dim, std::int64_t pos, const std::vector<double>& f, rope_pairing p) {
  for (std::int64_t i = 0; i < dim / 2; ++i) {
    const std::int64_t a = p == rope_pairing::interleaved ? 2 * i : i;
    const std::int64_t b = p == rope_pairing::interleaved ? 2 * i + 1 : i + dim / 2;
    const double th = static_cast<double>(pos) * f[static_cast<std::size_t>(i)];
    const double xa = x[a], xb = x[b];
    x[a] = xa * std::cos(th) - xb * std::sin(th);
    x[b] = xa * std::sin(th) + xb * std::cos(th);
  }
}

std::vector<double> ref_linear(const matrix& w, const std::vector<double>& x) {
  std::vector<double> y(static_cast<std::size_t>(w.rows()), 0.0);
  for (std::int64_t r = 0; r < w.rows(); ++r)
    for (std::int64_t c = 0; c < w.cols(); ++c) y[static_cast<std::size_t>(r)] += static_cast<double>(w(r, c)) * x[static_cast<std::size_t>(c)];
  return y;
}

void ref_rms_norm(double* x, std::int64_t n, const hm::weight_vector& g) {
  double ss = 0;
  for (std::int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-6);
  for (std::int64_t i = 0; i < n; ++i) x[i] *= inv * static_cast<double>(g(i));
}

std::vector<double> row_of(const matrix& x, std::int64_t t) {
  return std::vector<double>(x.data() + t * x.cols(), x.data() + (t + 1) * x.cols());
}

/// Causal softmax attention of one head in fp64: o[t] = Σ_{j<=t} softmax(scale·q[t]·k[j]) v[j].
std::vector<std::vector<double>> ref_causal_head(const std::vector<std::vector<double>>& q,
                                                 const std::vector<std::vector<double>>& k,
                                                 const std::vector<std::vector<double>>& v, double scale) {
  std::vector<std::vector<double>> o;
  for (std::size_t t = 0; t < q.size(); ++t) {
    std::vector<double> s(t + 1);
    double mx = -INFINITY;
    for (std::size_t j = 0; j <= t; ++j) {
      double dot = 0;
      for (std::size_t d = 0; d < q[t].size(); ++d) dot += q[t][d] * k[j][d];
      s[j] = scale * dot;
      mx = std::max(mx, s[j]);
    }
    double den = 0;
    std::vector<double> acc(v[0].size(), 0.0);
    for (std::size_t j = 0; j <= t; ++j) {
      const double p = std::exp(s[j] - mx);
      den += p;
      for (std::size_t d = 0; d < acc.size(); ++d) acc[d] += p * v[j][d];
    }
    for (auto& a : acc) a /= den;
    o.push_back(acc);
  }
  return o;
}

/// The naive MLA layer in fp64 on a prompt at positions 0..n-1 (ALGORITHMS.md §4).
std::vector<double> ref_mla(const hm::mla_config& m, const hm::mla_weights& w, const matrix& x) {
  const std::int64_t n = x.rows(), H = m.heads, dn = m.qk_nope, dr = m.qk_rope, dc = m.kv_lora_rank,
                     dv = m.v_head, dq = dn + dr;
  const std::int64_t rb = m.rope_block == 0 ? dr : m.rope_block;
  const std::vector<double> f = ref_freqs(rb, m.rope_theta, m.yarn, m.max_seq_len);
  double scale = 1.0 / std::sqrt(static_cast<double>(dq));
  if (m.max_seq_len > m.yarn.original_max_position && m.yarn.factor > 1) {
    const double ms = 0.1 * m.yarn.mscale * std::log(m.yarn.factor) + 1.0;
    scale *= ms * ms;
  }
  std::vector<std::vector<double>> q(static_cast<std::size_t>(n)), c(static_cast<std::size_t>(n)),
      kr(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t) {
    const std::vector<double> xt = row_of(x, t);
    std::vector<double> qt;
    if (m.q_lora_rank == 0) {
      qt = ref_linear(w.w_q, xt);
    } else {
      std::vector<double> a = ref_linear(w.w_q_a, xt);
      if (m.q_norm) ref_rms_norm(a.data(), m.q_lora_rank, w.q_norm);
      qt = ref_linear(w.w_q_b, a);
    }
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t b = 0; b < dr / std::max<std::int64_t>(rb, 1); ++b) ref_rope(&qt[static_cast<std::size_t>(h * dq + dn + b * rb)], rb, t, f, m.pairing);
    std::vector<double> kv = ref_linear(w.w_kv_a, xt);
    if (m.kv_norm) ref_rms_norm(kv.data(), dc, w.kv_norm);
    for (std::int64_t b = 0; b < dr / std::max<std::int64_t>(rb, 1); ++b) ref_rope(&kv[static_cast<std::size_t>(dc + b * rb)], rb, t, f, m.pairing);
    q[static_cast<std::size_t>(t)] = qt;
    c[static_cast<std::size_t>(t)].assign(kv.begin(), kv.begin() + dc);
    kr[static_cast<std::size_t>(t)].assign(kv.begin() + dc, kv.end());
  }
  std::vector<std::vector<double>> o(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(H * dv)));
  for (std::int64_t h = 0; h < H; ++h) {
    std::vector<std::vector<double>> qh, kh, vh;
    for (std::int64_t t = 0; t < n; ++t) {
      const auto& ct = c[static_cast<std::size_t>(t)];
      std::vector<double> k(static_cast<std::size_t>(dq), 0.0), v(static_cast<std::size_t>(dv), 0.0);
      for (std::int64_t r = 0; r < dn; ++r)
        for (std::int64_t j = 0; j < dc; ++j)
          k[static_cast<std::size_t>(r)] += static_cast<double>(w.w_kv_b(h * (dn + dv) + r, j)) * ct[static_cast<std::size_t>(j)];
      for (std::int64_t r = 0; r < dr; ++r) k[static_cast<std::size_t>(dn + r)] = kr[static_cast<std::size_t>(t)][static_cast<std::size_t>(r)];
      for (std::int64_t r = 0; r < dv; ++r)
        for (std::int64_t j = 0; j < dc; ++j)
          v[static_cast<std::size_t>(r)] += static_cast<double>(w.w_kv_b(h * (dn + dv) + dn + r, j)) * ct[static_cast<std::size_t>(j)];
      const auto& qt = q[static_cast<std::size_t>(t)];
      qh.emplace_back(qt.begin() + h * dq, qt.begin() + (h + 1) * dq);
      kh.push_back(k);
      vh.push_back(v);
    }
    const auto oh = ref_causal_head(qh, kh, vh, scale);
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t r = 0; r < dv; ++r)
        o[static_cast<std::size_t>(t)][static_cast<std::size_t>(h * dv + r)] = oh[static_cast<std::size_t>(t)][static_cast<std::size_t>(r)];
  }
  std::vector<double> out;
  for (std::int64_t t = 0; t < n; ++t) {
    const auto y = ref_linear(w.w_o, o[static_cast<std::size_t>(t)]);
    out.insert(out.end(), y.begin(), y.end());
  }
  return out;
}

/// A GQA layer in fp64 on a prompt at positions 0..n-1.
std::vector<double> ref_gqa(const hm::gqa_config& g, const hm::gqa_weights& w, const matrix& x) {
  const std::int64_t n = x.rows(), hq = g.heads_q, hk = g.heads_kv, dh = g.head_dim;
  const std::vector<double> f = ref_freqs(dh, g.rope_theta, hm::yarn_config{}, 1);
  std::vector<std::vector<double>> q, k, v;
  for (std::int64_t t = 0; t < n; ++t) {
    const auto xt = row_of(x, t);
    q.push_back(ref_linear(w.w_q, xt));
    k.push_back(ref_linear(w.w_k, xt));
    v.push_back(ref_linear(w.w_v, xt));
    if (g.rope) {
      for (std::int64_t h = 0; h < hq; ++h) ref_rope(&q.back()[static_cast<std::size_t>(h * dh)], dh, t, f, g.pairing);
      for (std::int64_t h = 0; h < hk; ++h) ref_rope(&k.back()[static_cast<std::size_t>(h * dh)], dh, t, f, g.pairing);
    }
  }
  std::vector<std::vector<double>> o(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(hq * dh)));
  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t kvh = h / (hq / hk);
    std::vector<std::vector<double>> qh, kh, vh;
    for (std::int64_t t = 0; t < n; ++t) {
      const auto& qt = q[static_cast<std::size_t>(t)];
      const auto& kt = k[static_cast<std::size_t>(t)];
      const auto& vt = v[static_cast<std::size_t>(t)];
      qh.emplace_back(qt.begin() + h * dh, qt.begin() + (h + 1) * dh);
      kh.emplace_back(kt.begin() + kvh * dh, kt.begin() + (kvh + 1) * dh);
      vh.emplace_back(vt.begin() + kvh * dh, vt.begin() + (kvh + 1) * dh);
    }
    const auto oh = ref_causal_head(qh, kh, vh, 1.0 / std::sqrt(static_cast<double>(dh)));
    for (std::int64_t t = 0; t < n; ++t)
      std::copy(oh[static_cast<std::size_t>(t)].begin(), oh[static_cast<std::size_t>(t)].end(),
                o[static_cast<std::size_t>(t)].begin() + h * dh);
  }
  std::vector<double> out;
  for (std::int64_t t = 0; t < n; ++t) {
    const auto y = ref_linear(w.w_o, o[static_cast<std::size_t>(t)]);
    out.insert(out.end(), y.begin(), y.end());
  }
  return out;
}

/// Runs a layer on a prompt in one chunk with a fresh cache.
template <class T = float>
matrix run_prefill(const hm::mla_layer& layer, const matrix& x, hm::mla_form form) {
  hm::latent_cache<T> cache(layer.config().latent_dim());
  return layer.forward(x, cache, form);
}

// =============================================================================================
// Scale, YaRN frequencies, RoPE
// =============================================================================================

TEST(MlaRope, mla_softmax_scale_values) {
  const hm::yarn_config v3{40.0, 4096, 32.0, 1.0, 1.0};
  EXPECT_NEAR(hm::mla_softmax_scale(128, 64, v3, 163840), 0.1352338, 1e-6);
  EXPECT_NEAR(hm::mla_config::deepseek_v3().softmax_scale(), 0.1352338, 1e-6);
  hm::yarn_config lite = v3;
  lite.mscale = 0.707;
  EXPECT_NEAR(hm::mla_softmax_scale(128, 64, lite, 163840), 0.1147214, 1e-6);
  EXPECT_NEAR(hm::mla_config::deepseek_v2_lite().softmax_scale(), 0.1147214, 1e-6);
  const double plain = 1.0 / std::sqrt(192.0);  // 0.0721688, not 576^-0.5
  EXPECT_NEAR(hm::mla_softmax_scale(128, 64, hm::yarn_config{}, 163840), plain, 1e-7);
  EXPECT_NEAR(hm::mla_softmax_scale(128, 64, v3, 4096), plain, 1e-7);  // reference: only past 4096
  EXPECT_NEAR(hm::yarn_mscale(40.0, 1.0), 1.368888, 1e-6);
  EXPECT_EQ(hm::yarn_mscale(1.0, 1.0), 1.0);
  EXPECT_EQ(hm::yarn_mscale(0.5, 1.0), 1.0);
}

TEST(MlaRope, mla_yarn_frequencies_match_formula) {
  // DeepSeek-V3's rope: 64 dims, theta 10000, factor 40, beta 32/1 over 4096, max_seq_len 163840.
  const hm::yarn_config y{40.0, 4096, 32.0, 1.0, 1.0};
  const auto got = hm::rope_frequencies(64, 10000.0, y, 163840);
  const auto want = ref_freqs(64, 10000.0, y, 163840);
  ASSERT_EQ(got.size(), 32u);
  for (std::size_t i : {0u, 5u, 10u, 11u, 15u, 20u, 22u, 23u, 31u})
    EXPECT_NEAR(got[i], want[i], 1e-14 * want[i]) << "i = " << i;
  // low = floor(10.47) = 10, high = ceil(22.5) = 23: i <= 10 untouched, i >= 23 divided by 40.
  EXPECT_DOUBLE_EQ(got[0], 1.0);
  EXPECT_NEAR(got[10], std::pow(10000.0, -20.0 / 64.0), 1e-15);
  EXPECT_NEAR(got[31], std::pow(10000.0, -62.0 / 64.0) / 40.0, 1e-18);
  const double r15 = (15.0 - 10.0) / 13.0, f15 = std::pow(10000.0, -30.0 / 64.0);
  EXPECT_NEAR(got[15], f15 * (1 - r15) + f15 / 40.0 * r15, 1e-16);
  // Not past the original length: plain frequencies, bitwise.
  const auto plain = hm::rope_frequencies(64, 10000.0, y, 4096);
  for (std::size_t i = 0; i < plain.size(); ++i)
    EXPECT_EQ(plain[i], std::pow(10000.0, -2.0 * static_cast<double>(i) / 64.0));
  EXPECT_TRUE(hm::rope_frequencies(0, 10000.0, y, 163840).empty());
}

TEST(MlaRope, mla_rope_pairings_match_formula) {
  const std::int64_t dim = 16;
  const auto freqs = hm::rope_frequencies(dim, 100.0, hm::yarn_config{}, 1);
  for (const rope_pairing p : {rope_pairing::interleaved, rope_pairing::half_split})
    for (const std::int64_t pos : {0, 1, 7, 1000}) {
      std::vector<float> x = hwt::random_normal(static_cast<std::size_t>(dim), 10 + static_cast<std::uint64_t>(pos));
      std::vector<double> want(x.begin(), x.end());
      ref_rope(want.data(), dim, pos, ref_freqs(dim, 100.0, hm::yarn_config{}, 1), p);
      hm::apply_rope(x.data(), dim, pos, freqs, p);
      EXPECT_TRUE(hwt::AllClose(x, want, 0.0, 1e-6)) << "pos " << pos;
    }
  // Interleaved pair 0 is (x0, x1); half_split pair 0 is (x0, x8).
  std::vector<float> e(dim, 0.0f);
  e[0] = 1.0f;
  std::vector<float> a = e, b = e;
  hm::apply_rope(a.data(), dim, 1, freqs, rope_pairing::interleaved);
  hm::apply_rope(b.data(), dim, 1, freqs, rope_pairing::half_split);
  EXPECT_NEAR(a[1], std::sin(1.0), 1e-7);
  EXPECT_EQ(a[8], 0.0f);
  EXPECT_NEAR(b[8], std::sin(1.0), 1e-7);
  EXPECT_EQ(b[1], 0.0f);
}

TEST(MlaRope, mla_rope_half_split_is_permuted_interleaved) {
  // HF DeepSeek-V3: y = [x0, x2, ..., x_{d-2}, x1, x3, ..., x_{d-1}]; half_split(y) = perm(interleaved(x)).
  const std::int64_t dim = 24;
  const auto freqs = hm::rope_frequencies(dim, 10000.0, hm::yarn_config{8.0, 32, 32.0, 1.0, 1.0}, 128);
  auto perm = [&](const std::vector<float>& x) {
    std::vector<float> y(x.size());
    for (std::int64_t i = 0; i < dim / 2; ++i) {
      y[static_cast<std::size_t>(i)] = x[static_cast<std::size_t>(2 * i)];
      y[static_cast<std::size_t>(i + dim / 2)] = x[static_cast<std::size_t>(2 * i + 1)];
    }
    return y;
  };
  for (const std::int64_t pos : {3, 77}) {
    const std::vector<float> x = hwt::random_normal(static_cast<std::size_t>(dim), 20 + static_cast<std::uint64_t>(pos));
    std::vector<float> inter = x, half = perm(x);
    hm::apply_rope(inter.data(), dim, pos, freqs, rope_pairing::interleaved);
    hm::apply_rope(half.data(), dim, pos, freqs, rope_pairing::half_split);
    EXPECT_TRUE(hwt::BitwiseEqual(half, perm(inter))) << "pos " << pos;
  }
}

TEST(MlaRope, mla_rope_blocks_rotate_each_block) {
  const std::int64_t dim = 8, blocks = 3, stride = 11;
  const auto freqs = hm::rope_frequencies(dim, 50.0, hm::yarn_config{}, 1);
  const std::vector<float> x = hwt::random_normal(static_cast<std::size_t>(blocks * stride), 5);
  std::vector<float> got = x, want = x;
  hm::apply_rope_blocks(got.data(), blocks, dim, 9, freqs, rope_pairing::half_split, stride);
  for (std::int64_t b = 0; b < blocks; ++b) hm::apply_rope(want.data() + b * stride, dim, 9, freqs, rope_pairing::half_split);
  EXPECT_TRUE(hwt::BitwiseEqual(got, want));  // the gaps between blocks are untouched too
  std::vector<float> contiguous = x, one_by_one = x;
  hm::apply_rope_blocks(contiguous.data(), 4, dim, 2, freqs, rope_pairing::interleaved);
  for (std::int64_t b = 0; b < 4; ++b) hm::apply_rope(one_by_one.data() + b * dim, dim, 2, freqs, rope_pairing::interleaved);
  EXPECT_TRUE(hwt::BitwiseEqual(contiguous, one_by_one));
}

// =============================================================================================
// The MLA layer: absorbed == naive == fp64 reference
// =============================================================================================

struct layer_case {
  std::int64_t q_lora;
  bool kv_norm, q_norm;
  rope_pairing pairing;
  [[nodiscard]] std::string name() const {
    return std::string("qlora") + std::to_string(q_lora) + (q_lora > 0 && !q_norm ? "_noqnorm" : "") +
           (kv_norm ? "_kvnorm" : "_nokvnorm") + (pairing == rope_pairing::interleaved ? "_interleaved" : "_halfsplit");
  }
};

void PrintTo(const layer_case& c, std::ostream* os) { *os << c.name(); }

class MlaLayerTest : public ::testing::TestWithParam<layer_case> {};

TEST_P(MlaLayerTest, mla_absorbed_equals_naive_and_reference) {
  const layer_case& lc = GetParam();
  hm::mla_config cfg = small_config(lc.q_lora, lc.kv_norm, lc.pairing);
  cfg.q_norm = lc.q_norm;
  const hm::mla_layer layer(cfg, random_weights(cfg, 100 + std::hash<std::string>{}(lc.name()) % 1000));
  const matrix x = random_matrix(13, cfg.d_model, 7, 1.0f);
  const matrix absorbed = run_prefill(layer, x, hm::mla_form::absorbed);
  const matrix naive = run_prefill(layer, x, hm::mla_form::naive);
  const auto ref = ref_mla(cfg, layer.weights(), x);
  const double e_abs = rel_err(absorbed, ref), e_naive = rel_err(naive, ref), e_an = rel_err(absorbed, naive);
  report(("absorbed vs fp64 " + lc.name()).c_str(), e_abs, kLayerTol);
  report(("naive vs fp64 " + lc.name()).c_str(), e_naive, kLayerTol);
  EXPECT_LE(e_abs, kLayerTol);
  EXPECT_LE(e_naive, kLayerTol);
  EXPECT_LE(e_an, kLayerTol);
}

INSTANTIATE_TEST_SUITE_P(
    Configs, MlaLayerTest,
    ::testing::Values(layer_case{0, true, true, rope_pairing::interleaved}, layer_case{0, true, true, rope_pairing::half_split},
                      layer_case{0, false, true, rope_pairing::interleaved}, layer_case{0, false, true, rope_pairing::half_split},
                      layer_case{24, true, true, rope_pairing::interleaved}, layer_case{24, true, true, rope_pairing::half_split},
                      layer_case{24, false, true, rope_pairing::interleaved}, layer_case{24, false, false, rope_pairing::half_split}),
    [](const ::testing::TestParamInfo<layer_case>& p) { return p.param.name(); });

TEST(MlaLayer, mla_step_functions_compose_to_the_naive_logits) {
  // absorb_queries · latent row == project_queries · expand_latent K row, head by head.
  const hm::mla_config cfg = small_config(0, true, rope_pairing::interleaved);
  const hm::mla_weights w = random_weights(cfg, 3);
  const matrix x = random_matrix(5, cfg.d_model, 4, 1.0f);
  const auto pos = hm::token_positions(2, 5);
  const matrix lat = hm::project_latent(cfg, w, x, pos);
  const matrix q = hm::project_queries(cfg, w, x, pos);
  const matrix qa = hm::absorb_queries(cfg, w, q);
  const hm::expanded_kv kv = hm::expand_latent(cfg, w, lat);
  ASSERT_EQ(lat.cols(), cfg.latent_dim());
  ASSERT_EQ(qa.cols(), cfg.heads * cfg.latent_dim());
  double worst = 0, mag = 0;
  for (std::int64_t h = 0; h < cfg.heads; ++h)
    for (std::int64_t t = 0; t < 5; ++t)
      for (std::int64_t j = 0; j < 5; ++j) {
        const double absorbed =
            qa.row(t).segment(h * cfg.latent_dim(), cfg.latent_dim()).cast<double>().dot(lat.row(j).cast<double>());
        const double naive = q.row(t).segment(h * cfg.qk_head_dim(), cfg.qk_head_dim()).cast<double>().dot(
            kv.k.row(j).segment(h * cfg.qk_head_dim(), cfg.qk_head_dim()).cast<double>());
        worst = std::max(worst, std::abs(absorbed - naive));
        mag = std::max(mag, std::abs(naive));
      }
  EXPECT_LE(worst, kLayerTol * mag);
  // The un-absorbed value path: W_UV·(Σ p c) == Σ p (W_UV c), checked on the latent rows themselves.
  const matrix o_lat = lat.leftCols(cfg.kv_lora_rank).replicate(1, cfg.heads);
  EXPECT_LE(rel_err(hm::unabsorb_output(cfg, w, o_lat), kv.v), kLayerTol);
}

TEST(MlaLayer, mla_qk_rope_zero) {
  // No decoupled rope slot at all: latent rows are c only and V is the whole row.
  hm::mla_config cfg = small_config(0, true, rope_pairing::interleaved);
  cfg.qk_rope = 0;
  const hm::mla_layer layer(cfg, random_weights(cfg, 11));
  const matrix x = random_matrix(9, cfg.d_model, 12, 1.0f);
  const auto ref = ref_mla(cfg, layer.weights(), x);
  EXPECT_LE(rel_err(run_prefill(layer, x, hm::mla_form::absorbed), ref), kLayerTol);
  EXPECT_LE(rel_err(run_prefill(layer, x, hm::mla_form::naive), ref), kLayerTol);
}

TEST(MlaLayer, mla_qk_nope_zero_with_rope_blocks) {
  // All of q·k through the rope slot, rotated as two blocks (what gqa_to_mla builds).
  hm::mla_config cfg = small_config(0, false, rope_pairing::half_split);
  cfg.qk_nope = 0;
  cfg.qk_rope = 16;
  cfg.rope_block = 8;
  const hm::mla_layer layer(cfg, random_weights(cfg, 21));
  const matrix x = random_matrix(9, cfg.d_model, 22, 1.0f);
  const auto ref = ref_mla(cfg, layer.weights(), x);
  EXPECT_LE(rel_err(run_prefill(layer, x, hm::mla_form::absorbed), ref), kLayerTol);
  EXPECT_LE(rel_err(run_prefill(layer, x, hm::mla_form::naive), ref), kLayerTol);
}

TEST(MlaLayer, mla_pairing_permuted_weights_agree) {
  // HF's conversion: permute the q_rope rows of W_q and the k_rope rows of W_kv_a as
  // [0, 2, 4, ..., 1, 3, 5, ...]; then the half_split model equals the interleaved one.
  const hm::mla_config inter = small_config(24, true, rope_pairing::interleaved);
  hm::mla_config half = inter;
  half.pairing = rope_pairing::half_split;
  const hm::mla_weights w = random_weights(inter, 31);
  hm::mla_weights wp = w;
  const std::int64_t dr = inter.qk_rope, dq = inter.qk_head_dim();
  auto permute_rows = [&](matrix& m, const matrix& src, std::int64_t first) {
    for (std::int64_t i = 0; i < dr / 2; ++i) {
      m.row(first + i) = src.row(first + 2 * i);
      m.row(first + dr / 2 + i) = src.row(first + 2 * i + 1);
    }
  };
  for (std::int64_t h = 0; h < inter.heads; ++h) permute_rows(wp.w_q_b, w.w_q_b, h * dq + inter.qk_nope);
  permute_rows(wp.w_kv_a, w.w_kv_a, inter.kv_lora_rank);
  const matrix x = random_matrix(11, inter.d_model, 32, 1.0f);
  const matrix a = run_prefill(hm::mla_layer(inter, w), x, hm::mla_form::absorbed);
  const matrix b = run_prefill(hm::mla_layer(half, wp), x, hm::mla_form::absorbed);
  EXPECT_LE(rel_err(b, a), kLayerTol);
  // ... and it does matter: the unpermuted weights with half_split pairing give another layer.
  const matrix c = run_prefill(hm::mla_layer(half, w), x, hm::mla_form::absorbed);
  EXPECT_GT(rel_err(c, a), 1e-3);
}

// =============================================================================================
// Decode and chunked prefill against one-shot prefill; bf16 latent cache
// =============================================================================================

TEST(MlaLayer, mla_decode_matches_prefill) {
  const hm::mla_config cfg = small_config(24, true, rope_pairing::interleaved);
  const hm::mla_layer layer(cfg, random_weights(cfg, 41));
  const std::int64_t n = 14;
  const matrix x = random_matrix(n, cfg.d_model, 42, 1.0f);
  for (const hm::mla_form form : {hm::mla_form::absorbed, hm::mla_form::naive}) {
    const matrix full = run_prefill(layer, x, form);
    // Prompt of 5 in one chunk, a chunk of 3 at positions 5..7, then decode 8..13 one by one.
    hm::latent_cache<float> cache(cfg.latent_dim());
    matrix got(n, cfg.d_model);
    got.topRows(5) = layer.forward(x.topRows(5), cache, form);
    got.middleRows(5, 3) = layer.forward(x.middleRows(5, 3), cache, form);
    for (std::int64_t p = 8; p < n; ++p) {
      got.row(p) = layer.forward(x.middleRows(p, 1), cache, form);
      EXPECT_EQ(cache.length(), p + 1);
      EXPECT_LE(rel_err(got.row(p), full.row(p)), kLayerTol) << "position " << p;
    }
    EXPECT_LE(rel_err(got, full), kLayerTol);
    // The latent cache is the same whatever the chunking.
    hm::latent_cache<float> one(cfg.latent_dim());
    (void)layer.forward(x, one, form);
    EXPECT_LE(rel_err(cache.to_matrix(), one.to_matrix()), 1e-6);
  }
}

TEST(MlaLayer, mla_bf16_latent_cache) {
  const hm::mla_config cfg = small_config(0, true, rope_pairing::half_split);
  const hm::mla_layer layer(cfg, random_weights(cfg, 51));
  const std::int64_t n = 12;
  const matrix x = random_matrix(n, cfg.d_model, 52, 1.0f);
  hm::latent_cache<float> f32(cfg.latent_dim());
  hm::latent_cache<headwise::bf16> bf(cfg.latent_dim()), bf_naive(cfg.latent_dim());
  matrix out_f32(n, cfg.d_model), out_bf(n, cfg.d_model), out_bf_naive(n, cfg.d_model);
  out_f32.topRows(6) = layer.forward(x.topRows(6), f32);
  out_bf.topRows(6) = layer.forward(x.topRows(6), bf);
  out_bf_naive.topRows(6) = layer.forward(x.topRows(6), bf_naive, hm::mla_form::naive);
  for (std::int64_t p = 6; p < n; ++p) {
    out_f32.row(p) = layer.forward(x.middleRows(p, 1), f32);
    out_bf.row(p) = layer.forward(x.middleRows(p, 1), bf);
    out_bf_naive.row(p) = layer.forward(x.middleRows(p, 1), bf_naive, hm::mla_form::naive);
  }
  const double e = rel_err(out_bf, out_f32);
  report("bf16 vs f32 latent cache", e, kBf16Tol);
  EXPECT_LE(e, kBf16Tol);
  EXPECT_GT(e, 0.0);  // the cache really is bf16
  // Both forms read the same stored bf16 values: they agree to f32 accuracy.
  EXPECT_LE(rel_err(out_bf_naive, out_bf), kLayerTol);
  // The stored rows are the f32 rows rounded to nearest even.
  const matrix rows = f32.to_matrix();
  for (std::int64_t i = 0; i < rows.size(); ++i)
    ASSERT_EQ(bf.data()[static_cast<std::size_t>(i)].bits, headwise::to_bf16(rows.data()[i]).bits) << i;
}

// =============================================================================================
// GQA -> MLA
// =============================================================================================

struct gqa_case {
  std::int64_t heads_kv;  // heads_q = 4
  bool rope;
  rope_pairing pairing;
  [[nodiscard]] std::string name() const {
    std::string s = "g";
    s += std::to_string(4 / heads_kv);
    s += !rope ? "_norope" : pairing == rope_pairing::interleaved ? "_rope_interleaved" : "_rope_halfsplit";
    return s;
  }
};

void PrintTo(const gqa_case& c, std::ostream* os) { *os << c.name(); }

class GqaToMlaTest : public ::testing::TestWithParam<gqa_case> {};

TEST_P(GqaToMlaTest, gqa_to_mla_reproduces_gqa) {
  const gqa_case& gc = GetParam();
  hm::gqa_config g;
  g.heads_q = 4;
  g.heads_kv = gc.heads_kv;
  g.head_dim = 8;
  g.d_model = 48;
  g.rope = gc.rope;
  g.rope_theta = 200.0;
  g.pairing = gc.pairing;
  const std::uint64_t s = 60 + 7 * static_cast<std::uint64_t>(gc.heads_kv) + (gc.rope ? 1 : 0);
  hm::gqa_weights w{random_matrix(32, 48, s, fan_in(48)), random_matrix(gc.heads_kv * 8, 48, s + 1, fan_in(48)),
                    random_matrix(gc.heads_kv * 8, 48, s + 2, fan_in(48)), random_matrix(48, 32, s + 3, fan_in(32))};
  const std::int64_t n = 12;
  const matrix x = random_matrix(n, 48, s + 4, 1.0f);
  const matrix gqa = hm::gqa_forward(g, w, x);
  EXPECT_LE(rel_err(gqa, ref_gqa(g, w, x)), kLayerTol) << "gqa_forward vs fp64";

  const hm::mla_parameters p = hm::gqa_to_mla(g, w);
  EXPECT_FALSE(p.config.kv_norm);
  EXPECT_EQ(p.config.heads, 4);
  EXPECT_EQ(p.config.v_head, 8);
  if (gc.rope) {
    EXPECT_EQ(p.config.kv_lora_rank, gc.heads_kv * 8);
    EXPECT_EQ(p.config.qk_rope, gc.heads_kv * 8);
    EXPECT_EQ(p.config.qk_nope, 0);
  } else {
    EXPECT_EQ(p.config.kv_lora_rank, 2 * gc.heads_kv * 8);
    EXPECT_EQ(p.config.qk_rope, 0);
  }
  const hm::mla_layer layer(p.config, p.weights);
  for (const hm::mla_form form : {hm::mla_form::absorbed, hm::mla_form::naive}) {
    const char* fname = form == hm::mla_form::absorbed ? "absorbed" : "naive";
    const matrix prefill = run_prefill(layer, x, form);
    const double e = rel_err(prefill, gqa);
    report((std::string("gqa_to_mla ") + fname + " " + gc.name()).c_str(), e, kLayerTol);
    EXPECT_LE(e, kLayerTol) << fname;
    // Decode with the converted layer: prompt of 7, then token by token.
    hm::latent_cache<float> cache(p.config.latent_dim());
    matrix dec(n, 48);
    dec.topRows(7) = layer.forward(x.topRows(7), cache, form);
    for (std::int64_t t = 7; t < n; ++t) dec.row(t) = layer.forward(x.middleRows(t, 1), cache, form);
    EXPECT_LE(rel_err(dec, gqa), kLayerTol) << fname << " decode";
  }
}

INSTANTIATE_TEST_SUITE_P(Conversions, GqaToMlaTest,
                         ::testing::Values(gqa_case{4, false, rope_pairing::interleaved},
                                           gqa_case{2, false, rope_pairing::interleaved},
                                           gqa_case{1, false, rope_pairing::interleaved},
                                           gqa_case{4, true, rope_pairing::interleaved},
                                           gqa_case{2, true, rope_pairing::interleaved},
                                           gqa_case{1, true, rope_pairing::interleaved},
                                           gqa_case{4, true, rope_pairing::half_split},
                                           gqa_case{2, true, rope_pairing::half_split},
                                           gqa_case{1, true, rope_pairing::half_split}),
                         [](const ::testing::TestParamInfo<gqa_case>& p) { return p.param.name(); });

// =============================================================================================
// PCA compression of the latent
// =============================================================================================

void check_compression(const hm::mla_config& cfg, const hm::mla_weights& w, const matrix& calib, const matrix& x) {
  const std::int64_t dc = cfg.kv_lora_rank;
  double prev_err = INFINITY, prev_energy = -1;
  for (std::int64_t r = 1; r <= dc; ++r) {
    const hm::compression_report rep = hm::compress_latent(cfg, w, r, calib);
    EXPECT_EQ(rep.rank, r);
    EXPECT_EQ(rep.compressed.config.kv_lora_rank, r);
    EXPECT_EQ(rep.compressed.weights.w_kv_a.rows(), r + cfg.qk_rope);
    EXPECT_EQ(rep.compressed.weights.w_kv_b.cols(), r);
    EXPECT_LE(rep.relative_error, prev_err + 1e-12) << "rank " << r;
    EXPECT_GE(rep.energy_retained, prev_energy - 1e-12) << "rank " << r;
    // ||C − RRᵀC||² = (1 − energy)·||C||².
    EXPECT_NEAR(rep.relative_error, std::sqrt(std::max(0.0, 1.0 - rep.energy_retained)), 1e-6) << "rank " << r;
    prev_err = rep.relative_error;
    prev_energy = rep.energy_retained;
  }
  const hm::compression_report full = hm::compress_latent(cfg, w, dc, calib);
  EXPECT_LE(full.relative_error, 1e-5);
  EXPECT_NEAR(full.energy_retained, 1.0, 1e-12);
  const hm::mla_layer orig(cfg, w), comp(full.compressed.config, full.compressed.weights);
  for (const hm::mla_form form : {hm::mla_form::absorbed, hm::mla_form::naive})
    EXPECT_LE(rel_err(run_prefill(comp, x, form), run_prefill(orig, x, form)), kLayerTol);
  // A truncated latent changes the layer, by an amount that shrinks as the rank grows.
  const hm::compression_report half = hm::compress_latent(cfg, w, dc / 2, calib);
  EXPECT_GT(half.relative_error, 1e-3);
  const hm::mla_layer small(half.compressed.config, half.compressed.weights);
  EXPECT_GT(rel_err(run_prefill(small, x, hm::mla_form::absorbed), run_prefill(orig, x, hm::mla_form::absorbed)), 1e-4);
}

TEST(TransMla, transmla_compress_latent_random_mla) {
  const hm::mla_config cfg = small_config(0, false, rope_pairing::interleaved);
  const hm::mla_weights w = random_weights(cfg, 71);
  check_compression(cfg, w, random_matrix(48, cfg.d_model, 72, 1.0f), random_matrix(10, cfg.d_model, 73, 1.0f));
}

TEST(TransMla, transmla_compress_latent_converted_gqa) {
  hm::gqa_config g;
  g.heads_q = 4;
  g.heads_kv = 2;
  g.head_dim = 8;
  g.d_model = 48;
  g.rope = true;
  g.rope_theta = 200.0;
  const hm::gqa_weights w{random_matrix(32, 48, 81, fan_in(48)), random_matrix(16, 48, 82, fan_in(48)),
                          random_matrix(16, 48, 83, fan_in(48)), random_matrix(48, 32, 84, fan_in(32))};
  const hm::mla_parameters p = hm::gqa_to_mla(g, w);
  check_compression(p.config, p.weights, random_matrix(40, 48, 85, 1.0f), random_matrix(9, 48, 86, 1.0f));
  // Latents that live in a 5-dimensional subspace compress losslessly to rank 5.
  const matrix low = random_matrix(40, 5, 87, 1.0f) * random_matrix(5, 48, 88, 1.0f);
  const hm::compression_report rep = hm::compress_latent(p.config, p.weights, 5, low);
  EXPECT_LE(rep.relative_error, 1e-5);
  EXPECT_GT(hm::compress_latent(p.config, p.weights, 4, low).relative_error, 1e-3);
}

// =============================================================================================
// Bad input: argument_error naming the argument, before any work
// =============================================================================================

TEST(MlaErrors, mla_bad_config) {
  const hm::mla_config good = small_config(0, true, rope_pairing::interleaved);
  auto bad = [&](auto mutate, const char* arg) {
    hm::mla_config c = good;
    mutate(c);
    EXPECT_TRUE(ThrowsArgumentError([&] { c.validate(); }, arg));
  };
  bad([](hm::mla_config& c) { c.heads = 0; }, "config.heads");
  bad([](hm::mla_config& c) { c.d_model = -1; }, "config.d_model");
  bad([](hm::mla_config& c) { c.kv_lora_rank = 0; }, "config.kv_lora_rank");
  bad([](hm::mla_config& c) { c.q_lora_rank = -2; }, "config.q_lora_rank");
  bad([](hm::mla_config& c) { c.qk_rope = 7; }, "config.qk_rope");
  bad([](hm::mla_config& c) { c.qk_nope = -1; }, "config.qk_nope");
  bad([](hm::mla_config& c) { c.qk_nope = 0;
    c.qk_rope = 0; }, "config.qk_nope + config.qk_rope");
  bad([](hm::mla_config& c) { c.v_head = 0; }, "config.v_head");
  bad([](hm::mla_config& c) { c.rope_block = 6; }, "config.rope_block");  // does not divide 8
  bad([](hm::mla_config& c) { c.rope_theta = 0.5; }, "config.rope_theta");
  bad([](hm::mla_config& c) { c.yarn.factor = 0; }, "config.yarn.factor");
  bad([](hm::mla_config& c) { c.max_seq_len = 0; }, "config.max_seq_len");
  bad([](hm::mla_config& c) { c.pairing = static_cast<rope_pairing>(7); }, "config.pairing");
  // A bad config is reported by the layer too.
  hm::mla_config c = good;
  c.qk_rope = 5;
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::mla_layer(c, random_weights(good, 1)); }, "config.qk_rope"));
}

TEST(MlaErrors, mla_bad_weights) {
  const hm::mla_config cfg = small_config(0, true, rope_pairing::interleaved);
  const hm::mla_weights good = random_weights(cfg, 90);
  EXPECT_NO_THROW(good.check(cfg));
  auto bad = [&](auto mutate, const char* arg, const hm::mla_config& c) {
    hm::mla_weights w = good;
    mutate(w);
    EXPECT_TRUE(ThrowsArgumentError([&] { w.check(c); }, arg));
    EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::mla_layer(c, w); }, arg));
  };
  bad([](hm::mla_weights& w) { w.w_q.resize(95, 64); }, "weights.w_q", cfg);
  bad([](hm::mla_weights& w) { w.w_kv_a.resize(40, 63); }, "weights.w_kv_a", cfg);
  bad([](hm::mla_weights& w) { w.w_kv_b.resize(4 * 32, 31); }, "weights.w_kv_b", cfg);
  bad([](hm::mla_weights& w) { w.w_o.resize(64, 63); }, "weights.w_o", cfg);
  bad([](hm::mla_weights& w) { w.kv_norm.resize(0); }, "weights.kv_norm", cfg);
  bad([](hm::mla_weights& w) { w.w_q_a = matrix::Zero(24, 64); }, "weights.w_q_a", cfg);
  hm::mla_config no_norm = cfg;
  no_norm.kv_norm = false;  // a kv_norm weight given anyway
  bad([](hm::mla_weights&) {}, "weights.kv_norm", no_norm);
  hm::mla_config lora = cfg;
  lora.q_lora_rank = 24;  // w_q given instead of w_q_a / w_q_b
  bad([](hm::mla_weights&) {}, "weights.w_q", lora);
  // The message names the expected shape.
  hm::mla_weights w = good;
  w.w_o.resize(64, 63);
  try {
    w.check(cfg);
    ADD_FAILURE() << "no throw";
  } catch (const headwise::argument_error& e) {
    EXPECT_NE(std::string(e.what()).find("64 x 64"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("64 x 63"), std::string::npos) << e.what();
  }
}

TEST(MlaErrors, mla_bad_forward_input_leaves_cache_untouched) {
  const hm::mla_config cfg = small_config(0, true, rope_pairing::interleaved);
  const hm::mla_layer layer(cfg, random_weights(cfg, 91));
  hm::latent_cache<float> cache(cfg.latent_dim());
  (void)layer.forward(random_matrix(3, cfg.d_model, 92, 1.0f), cache);
  const auto before = cache.data();
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)layer.forward(random_matrix(2, 63, 93, 1.0f), cache); }, "x"));
  EXPECT_EQ(cache.data(), before);
  hm::latent_cache<float> wrong(cfg.latent_dim() + 1);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)layer.forward(random_matrix(2, 64, 94, 1.0f), wrong); }, "cache.width()"));
  EXPECT_EQ(wrong.length(), 0);
  const std::vector<std::int64_t> pos{0, 1};
  EXPECT_TRUE(ThrowsArgumentError(
      [&] { (void)hm::project_latent(cfg, layer.weights(), random_matrix(3, 64, 95, 1.0f), pos); }, "positions.size()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::absorb_queries(cfg, layer.weights(), matrix(2, 95)); }, "q.cols()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { cache.truncate(99); }, "tokens"));
  EXPECT_TRUE(ThrowsArgumentError([&] { cache.append(matrix(1, 3)); }, "rows.cols()"));
}

TEST(MlaErrors, mla_bad_rope_arguments) {
  const auto f8 = hm::rope_frequencies(8, 10000.0, hm::yarn_config{}, 1);
  std::vector<float> x(16, 1.0f);
  EXPECT_TRUE(ThrowsArgumentError([&] { hm::apply_rope(x.data(), 16, 0, f8, rope_pairing::interleaved); }, "freqs.size()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { hm::apply_rope(x.data(), 7, 0, f8, rope_pairing::interleaved); }, "dim"));
  EXPECT_TRUE(ThrowsArgumentError(
      [&] { hm::apply_rope(x.data(), 8, 0, f8, static_cast<rope_pairing>(3)); }, "pairing"));
  EXPECT_TRUE(ThrowsArgumentError(
      [&] { hm::apply_rope_blocks(x.data(), 2, 8, 0, f8, rope_pairing::interleaved, 5); }, "stride"));
  EXPECT_TRUE(x == std::vector<float>(16, 1.0f));
  EXPECT_TRUE(ThrowsArgumentError([] { (void)hm::rope_frequencies(7, 10000.0, hm::yarn_config{}, 1); }, "rope_dim"));
  EXPECT_TRUE(ThrowsArgumentError(
      [] { (void)hm::rope_frequencies(8, 10000.0, hm::yarn_config{-1.0, 4096, 32, 1, 1}, 1); }, "yarn.factor"));
  EXPECT_TRUE(ThrowsArgumentError([] { (void)hm::mla_softmax_scale(0, 0, hm::yarn_config{}, 1); }, "qk_nope + qk_rope"));
}

TEST(MlaErrors, gqa_to_mla_and_transmla_bad_arguments) {
  hm::gqa_config g;
  g.heads_q = 4;
  g.heads_kv = 3;
  g.head_dim = 8;
  g.d_model = 16;
  hm::gqa_weights w{matrix::Zero(32, 16), matrix::Zero(24, 16), matrix::Zero(24, 16), matrix::Zero(16, 32)};
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gqa_to_mla(g, w); }, "config.heads_kv"));
  g.heads_kv = 2;
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gqa_to_mla(g, w); }, "weights.w_k"));
  w.w_k = matrix::Zero(16, 16);
  w.w_v = matrix::Zero(16, 17);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gqa_to_mla(g, w); }, "weights.w_v"));
  w.w_v = matrix::Zero(16, 16);
  g.head_dim = 7;
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gqa_forward(g, w, matrix::Zero(2, 16)); }, "config.head_dim"));
  g.head_dim = 8;
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::gqa_forward(g, w, matrix::Zero(2, 15)); }, "x.cols()"));

  const hm::mla_parameters p = hm::gqa_to_mla(g, w);
  const matrix calib = random_matrix(20, 16, 1, 1.0f);
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::compress_latent(p.config, p.weights, 0, calib); }, "rank"));
  EXPECT_TRUE(ThrowsArgumentError(
      [&] { (void)hm::compress_latent(p.config, p.weights, p.config.kv_lora_rank + 1, calib); }, "rank"));
  EXPECT_TRUE(ThrowsArgumentError(
      [&] { (void)hm::compress_latent(p.config, p.weights, 4, random_matrix(20, 15, 2, 1.0f)); }, "calibration.cols()"));
  EXPECT_TRUE(ThrowsArgumentError([&] { (void)hm::compress_latent(p.config, p.weights, 4, matrix(0, 16)); },
                                  "calibration.rows()"));
  const hm::mla_config normed = small_config(0, true, rope_pairing::interleaved);
  EXPECT_TRUE(ThrowsArgumentError(
      [&] { (void)hm::compress_latent(normed, random_weights(normed, 3), 4, random_matrix(8, 64, 4, 1.0f)); },
      "config.kv_norm"));
}

}  // namespace
