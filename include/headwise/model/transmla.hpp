/// @file
/// @brief TransMLA (fxmeng/TransMLA) at the weight level: a plain GQA layer, its exact
/// rewriting as an MLA layer ("GQA ≡ MLA", ALGORITHMS.md §4) and PCA compression of the
/// latent to a smaller kv_lora_rank from calibration activations. Requires Eigen 3.4.
///
/// gqa_to_mla(), without RoPE: the latent is c = [K ; V], the stacked KV heads (2·Hkv·dh,
/// exactly the GQA cache), qk_nope = v_head = dh, qk_rope = 0 (no rope slot: the absorbed
/// kernel then reads latent rows of d_c values and V is the whole row), W_UK^(i) / W_UV^(i) are
/// the identity blocks selecting K / V head ⌊i/g⌋.
/// With RoPE: the whole rotated K goes into the decoupled rope slot, qk_rope = Hkv·dh rotated
/// per dh-wide block with the GQA frequencies (config.rope_block = dh), qk_nope = 0 (no
/// non-rotary logit part), c = V (d_c = Hkv·dh), and q_rope of head i is zero outside block
/// ⌊i/g⌋, where it holds head i's query.
/// Scale: the MLA layer scales logits by (qk_nope + qk_rope)^-0.5 (no YaRN in the converted
/// config); GQA uses dh^-0.5. As TransMLA does, the conversion folds the ratio
/// sqrt(qk_nope + qk_rope)/sqrt(dh) into the query weights (exactly 1 without RoPE, sqrt(Hkv)
/// with RoPE), so the converted layer is an ordinary MLA checkpoint that any MLA implementation
/// runs with its usual scale; no scale-override field is needed.
#pragma once

// GCC 12 reports false -Wmaybe-uninitialized on AVX-512 intrinsics (_mm512_undefined_*) inlined
// into Eigen's GEMM kernels; the suppression has to cover Eigen's templates, i.e. its include,
// and the functions here that instantiate them.
#include "../tile/diagnostics.hpp"
HEADWISE_DIAGNOSTICS_PUSH
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/checks.hpp"
#include "../core/options.hpp"
#include "../core/view.hpp"
#include "../variants/attention.hpp"
#include "mla.hpp"
#include "rope.hpp"

namespace headwise::model {

/// A GQA attention layer (Llama style): heads_q query heads sharing heads_kv KV heads
/// (query head h reads KV head ⌊h / (heads_q/heads_kv)⌋), head_dim each, optional RoPE.
struct gqa_config {
  std::int64_t heads_q = 0;
  std::int64_t heads_kv = 0;
  std::int64_t head_dim = 0;
  std::int64_t d_model = 0;
  bool rope = true;             ///< RoPE on every query and key head (head_dim wide)
  double rope_theta = 10000.0;  ///< RoPE base
  rope_pairing pairing = rope_pairing::half_split;  ///< HF Llama: half_split

  /// Throws argument_error naming the first inconsistent field ("config.<field>").
  void validate() const {
    const detail::checker c("headwise::model::gqa_config");
    using detail::to_text;
    // Every extent at most 2^20, so that products of two of them (weight shapes) fit easily.
    constexpr std::int64_t mx = std::int64_t{1} << 20;
    c.require(heads_q >= 1 && heads_q <= mx, "config.heads_q", "1..2^20", heads_q);
    c.require(heads_kv >= 1 && heads_q % heads_kv == 0, "config.heads_kv",
              "a divisor of heads_q = " + to_text(heads_q), heads_kv);
    c.require(head_dim >= 1 && head_dim <= mx && (!rope || head_dim % 2 == 0), "config.head_dim",
              rope ? "an even value in 2..2^20 (RoPE)" : "1..2^20", head_dim);
    c.require(d_model >= 1 && d_model <= mx, "config.d_model", "1..2^20", d_model);
    c.require(!rope || (std::isfinite(rope_theta) && rope_theta > 1.0), "config.rope_theta", "a finite value > 1",
              rope_theta);
    detail::check_pairing(c, pairing, "config.pairing");
  }
};

/// GQA weights, nn.Linear layout (out x in); per-head blocks of head_dim rows in head order.
struct gqa_weights {
  matrix w_q;  ///< heads_q·head_dim x d_model
  matrix w_k;  ///< heads_kv·head_dim x d_model
  matrix w_v;  ///< heads_kv·head_dim x d_model
  matrix w_o;  ///< d_model x heads_q·head_dim

  /// Validates config, then every weight's shape ("weights.<name>", expected shape).
  void check(const gqa_config& config) const {
    config.validate();
    const detail::checker c("headwise::model::gqa_weights");
    const std::int64_t dq = config.heads_q * config.head_dim, dk = config.heads_kv * config.head_dim;
    detail::check_matrix(c, w_q, "weights.w_q", dq, config.d_model, "heads_q·head_dim x d_model");
    detail::check_matrix(c, w_k, "weights.w_k", dk, config.d_model, "heads_kv·head_dim x d_model");
    detail::check_matrix(c, w_v, "weights.w_v", dk, config.d_model, "heads_kv·head_dim x d_model");
    detail::check_matrix(c, w_o, "weights.w_o", config.d_model, dq, "d_model x heads_q·head_dim");
  }
};

/// The GQA layer on a prompt x (tokens x d_model) at positions 0..n-1: Q = x·W_qᵀ, K = x·W_kᵀ,
/// V = x·W_vᵀ, RoPE per head on Q and K (when config.rope; no YaRN), causal headwise::attention
/// with scale 1/sqrt(head_dim), output o·W_oᵀ (tokens x d_model).
inline matrix gqa_forward(const gqa_config& config, const gqa_weights& weights, const matrix& x,
                          int num_threads = 0) {
  const detail::checker c("headwise::model::gqa_forward");
  weights.check(config);
  c.equal(x.cols(), config.d_model, "x.cols() (d_model)", "config.d_model");
  c.require(num_threads >= 0, "num_threads", ">= 0", num_threads);
  const std::int64_t n = x.rows(), hq = config.heads_q, hk = config.heads_kv, dh = config.head_dim;
  if (n == 0) return matrix(0, config.d_model);
  matrix q = x * weights.w_q.transpose();
  matrix k = x * weights.w_k.transpose();
  const matrix v = x * weights.w_v.transpose();
  if (config.rope) {
    const std::vector<double> freqs = rope_frequencies(dh, config.rope_theta, yarn_config{}, 1);
    for (std::int64_t t = 0; t < n; ++t) {
      const detail::rope_rotation rot(t, freqs);
      for (std::int64_t h = 0; h < hq; ++h) rot.apply(q.data() + t * q.cols() + h * dh, config.pairing);
      for (std::int64_t h = 0; h < hk; ++h) rot.apply(k.data() + t * k.cols() + h * dh, config.pairing);
    }
  }
  matrix o(n, hq * dh);
  attention_options opt;
  opt.causal = causal_mode::bottom_right;
  opt.num_threads = num_threads;
  headwise::attention(bshd<const float>(q.data(), 1, n, hq, dh), bshd<const float>(k.data(), 1, n, hk, dh),
            bshd<const float>(v.data(), 1, n, hk, dh), bshd(o.data(), 1, n, hq, dh), opt);
  return o * weights.w_o.transpose();
}

/// Rewrites a GQA layer as an exactly equivalent MLA layer (see the file comment for the
/// construction and how the 1/sqrt(head_dim) scale is kept). The result has q_lora_rank 0, no
/// kv/q norm, no YaRN (factor 1), the GQA pairing and rope_theta; W_o is unchanged. Its latent
/// cache (2·Hkv·dh values per token, or Hkv·dh + Hkv·dh with RoPE) is the GQA KV cache.
inline mla_parameters gqa_to_mla(const gqa_config& config, const gqa_weights& weights) {
  weights.check(config);
  const std::int64_t hq = config.heads_q, hk = config.heads_kv, dh = config.head_dim, g = hq / hk;
  mla_parameters p;
  mla_config& m = p.config;
  mla_weights& w = p.weights;
  m.heads = hq;
  m.d_model = config.d_model;
  m.q_lora_rank = 0;
  m.v_head = dh;
  m.rope_theta = config.rope_theta;
  m.yarn = yarn_config{};
  m.max_seq_len = m.yarn.original_max_position;
  m.pairing = config.pairing;
  m.kv_norm = false;
  m.q_norm = false;
  w.w_o = weights.w_o;
  if (!config.rope) {
    m.kv_lora_rank = 2 * hk * dh;
    m.qk_nope = dh;
    m.qk_rope = 0;
    m.rope_block = 0;
    w.w_q = weights.w_q;  // (qk_nope+qk_rope)^-0.5 = dh^-0.5 already
    w.w_kv_a.resize(2 * hk * dh, config.d_model);
    w.w_kv_a.topRows(hk * dh) = weights.w_k;
    w.w_kv_a.bottomRows(hk * dh) = weights.w_v;
    w.w_kv_b = matrix::Zero(hq * 2 * dh, 2 * hk * dh);
    for (std::int64_t i = 0; i < hq; ++i) {
      const std::int64_t kv = i / g;
      w.w_kv_b.block(i * 2 * dh, kv * dh, dh, dh).setIdentity();                // W_UK^(i): K head kv
      w.w_kv_b.block(i * 2 * dh + dh, hk * dh + kv * dh, dh, dh).setIdentity();  // W_UV^(i): V head kv
    }
  } else {
    m.kv_lora_rank = hk * dh;
    m.qk_nope = 0;
    m.qk_rope = hk * dh;
    m.rope_block = dh;
    // Fold sqrt(qk_nope+qk_rope)/sqrt(dh) = sqrt(Hkv) into the queries: the MLA scale
    // (Hkv·dh)^-0.5 times sqrt(Hkv) is dh^-0.5, GQA's scale.
    const double fold = std::sqrt(static_cast<double>(m.qk_head_dim()) / static_cast<double>(dh));
    w.w_q = matrix::Zero(hq * m.qk_rope, config.d_model);
    for (std::int64_t i = 0; i < hq; ++i)
      w.w_q.block(i * m.qk_rope + (i / g) * dh, 0, dh, config.d_model) =
          (weights.w_q.middleRows(i * dh, dh).cast<double>() * fold).cast<float>();
    w.w_kv_a.resize(2 * hk * dh, config.d_model);
    w.w_kv_a.topRows(hk * dh) = weights.w_v;     // c = V
    w.w_kv_a.bottomRows(hk * dh) = weights.w_k;  // rope slot = K (rotated per head block)
    w.w_kv_b = matrix::Zero(hq * dh, hk * dh);
    for (std::int64_t i = 0; i < hq; ++i) w.w_kv_b.block(i * dh, (i / g) * dh, dh, dh).setIdentity();  // W_UV^(i)
  }
  w.check(m);
  return p;
}

/// What compress_latent() measured on the calibration latents, and the compressed layer.
struct compression_report {
  std::int64_t rank = 0;        ///< the new kv_lora_rank
  double relative_error = 0;    ///< ||C − R·Rᵀ·C||_F / ||C||_F over the calibration latents C
  double energy_retained = 1;   ///< Σ top-rank eigenvalues of C·Cᵀ / Σ all (0..1)
  mla_parameters compressed;    ///< the layer with latent rank `rank`
};

/// PCA compression of the non-rotary latent c (TransMLA's joint PCA, without its RoRoPE /
/// FreqFold / BKV steps): C = W_DKV·x over the calibration hidden states (calibration: tokens x
/// d_model), R = the `rank` leading eigenvectors of C·Cᵀ (uncentred: the best rank-r subspace
/// for ||C − R·Rᵀ·C||), then W_DKV ← Rᵀ·W_DKV, W_UK^(h) ← W_UK^(h)·R, W_UV^(h) ← W_UV^(h)·R
/// (computed in double). The rope rows of W_kv_a and the queries are unchanged. At rank = d_c
/// the layer is unchanged up to rounding. Requires config.kv_norm == false (a normalised latent
/// is not linear in x; TransMLA-converted models have no kv norm) and 1 <= rank <= d_c.
inline compression_report compress_latent(const mla_config& config, const mla_weights& weights, std::int64_t rank,
                                          const matrix& calibration) {
  const detail::checker c("headwise::model::compress_latent");
  weights.check(config);
  c.require(!config.kv_norm, "config.kv_norm",
            "false (RMSNorm makes the latent non-linear in x, so PCA cannot be folded into W_kv_a)", "true");
  const std::int64_t dc = config.kv_lora_rank;
  c.require(rank >= 1 && rank <= dc, "rank", "1..kv_lora_rank = " + detail::to_text(dc), rank);
  c.equal(calibration.cols(), config.d_model, "calibration.cols() (d_model)", "config.d_model");
  c.require(calibration.rows() >= 1, "calibration.rows()", ">= 1 token", calibration.rows());

  using dmat = Eigen::MatrixXd;
  const dmat w_dkv = weights.w_kv_a.topRows(dc).cast<double>();
  const dmat lat = calibration.cast<double>() * w_dkv.transpose();  // tokens x d_c
  const dmat cov = lat.transpose() * lat;
  const Eigen::SelfAdjointEigenSolver<dmat> eig(cov);
  c.require(eig.info() == Eigen::Success, "calibration", "activations whose latent covariance has an eigenbasis",
            "a failed eigensolve");
  // Eigenvalues ascend: the leading `rank` are the last columns, taken largest first.
  dmat r(dc, rank);
  double kept = 0, total = 0;
  for (std::int64_t i = 0; i < dc; ++i) total += std::max(0.0, eig.eigenvalues()(i));
  for (std::int64_t j = 0; j < rank; ++j) {
    r.col(j) = eig.eigenvectors().col(dc - 1 - j);
    kept += std::max(0.0, eig.eigenvalues()(dc - 1 - j));
  }
  compression_report rep;
  rep.rank = rank;
  rep.energy_retained = total > 0 ? std::min(1.0, kept / total) : 1.0;
  const double norm = lat.norm();
  rep.relative_error = norm > 0 ? (lat - (lat * r) * r.transpose()).norm() / norm : 0.0;

  mla_config& m = rep.compressed.config;
  mla_weights& w = rep.compressed.weights;
  m = config;
  m.kv_lora_rank = rank;
  w = weights;
  w.w_kv_a.resize(rank + config.qk_rope, config.d_model);
  w.w_kv_a.topRows(rank) = (r.transpose() * w_dkv).cast<float>();
  w.w_kv_a.bottomRows(config.qk_rope) = weights.w_kv_a.bottomRows(config.qk_rope);
  w.w_kv_b = (weights.w_kv_b.cast<double>() * r).cast<float>();  // every row block: W·R
  w.check(m);
  return rep;
}

}  // namespace headwise::model

HEADWISE_DIAGNOSTICS_POP
