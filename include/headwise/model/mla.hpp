/// @file
/// @brief A DeepSeek-V2/V3 multi-head latent attention (MLA) layer around headwise's kernels:
/// configuration, weights, the step functions (latent and query projections, absorption, the
/// expanded "naive" K/V, un-absorption, output projection), a latent cache and the layer
/// forward in either form. The math is ALGORITHMS.md §4 (deepseek-ai/DeepSeek-V3
/// inference/model.py); requires Eigen 3.4 (link headwise::model).
///
/// Conventions:
///  * headwise::model::matrix is a row-major f32 Eigen matrix. Activations have one row per
///    token (tokens x features), so a (tokens x heads·dim) matrix is directly a
///    [1, tokens, heads, dim] tensor_view for the kernels.
///  * Weights follow torch.nn.Linear: (out_features x in_features), y = x·Wᵀ. W_kv_b is
///    (heads·(qk_nope + v_head) x d_c) with, per head h, rows h·(qk_nope+v_head) + [0, qk_nope)
///    = W_UK^(h) and the next v_head rows = W_UV^(h) (the reference's [n_h, 256, d_c] view).
///  * Per head, queries are [q_nope (qk_nope) ; q_rope (qk_rope)]; latent rows are
///    [c (d_c) ; k_rope (qk_rope)], with c RMS-normalised (eps 1e-6) when config.kv_norm and
///    k_rope already rotated. One rope key is shared by all heads.
///  * One sequence (batch 1) per call; positions are absolute token indices.
#pragma once

// GCC 12 reports false -Wmaybe-uninitialized on AVX-512 intrinsics (_mm512_undefined_*) inlined
// into Eigen's GEMM kernels; the suppression has to cover Eigen's templates, i.e. its include,
// and the functions here that instantiate them.
#include "../tile/diagnostics.hpp"
HEADWISE_DIAGNOSTICS_PUSH
#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../core/checks.hpp"
#include "../core/dtype.hpp"
#include "../core/options.hpp"
#include "../core/view.hpp"
#include "../variants/attention.hpp"
#include "../variants/mla.hpp"
#include "rope.hpp"

namespace headwise::model {

/// Row-major f32 matrix: activations are tokens x features, weights are out x in (nn.Linear).
using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// A weight vector (RMSNorm gains).
using weight_vector = Eigen::VectorXf;

/// RMSNorm epsilon of DeepSeek's q_a_layernorm and kv_a_layernorm.
inline constexpr double mla_norm_eps = 1e-6;

/// Shapes and positional settings of one MLA layer (DeepSeek config names in brackets).
struct mla_config {
  std::int64_t heads = 0;         ///< query heads n_h [num_attention_heads]
  std::int64_t d_model = 0;       ///< hidden size [hidden_size]
  std::int64_t q_lora_rank = 0;   ///< query compression rank d_c'; 0 = none (W_q directly)
  std::int64_t kv_lora_rank = 0;  ///< latent width d_c [kv_lora_rank]
  std::int64_t qk_nope = 0;       ///< non-rotary query/key dims per head [qk_nope_head_dim]; may be 0
  std::int64_t qk_rope = 0;       ///< decoupled rotary dims d_R [qk_rope_head_dim]; even, may be 0
  std::int64_t v_head = 0;        ///< value dims per head [v_head_dim]
  double rope_theta = 10000.0;    ///< RoPE base [rope_theta]
  yarn_config yarn{};             ///< YaRN [rope_scaling]; factor 1 = none
  std::int64_t max_seq_len = 4096;  ///< the reference's runtime max_seq_len: YaRN (and mscale²)
                                    ///< apply iff it exceeds yarn.original_max_position
  rope_pairing pairing = rope_pairing::interleaved;  ///< DeepSeek reference: interleaved
  bool kv_norm = true;  ///< RMSNorm on c (kv_a_layernorm); TransMLA-converted models have none
  bool q_norm = true;   ///< RMSNorm after W_q_a (q_a_layernorm); used only when q_lora_rank > 0
  /// Width of the blocks RoPE rotates inside the qk_rope dims, each with the frequencies of a
  /// rope_block-wide RoPE: 0 = one block of qk_rope (DeepSeek). gqa_to_mla() sets head_dim so
  /// that the rope slot holds every KV head's rotated key.
  std::int64_t rope_block = 0;

  /// Query/key dims per head in the naive form: qk_nope + qk_rope.
  [[nodiscard]] std::int64_t qk_head_dim() const noexcept { return qk_nope + qk_rope; }
  /// Latent row width d_c + qk_rope: also the absorbed queries' dim_qk.
  [[nodiscard]] std::int64_t latent_dim() const noexcept { return kv_lora_rank + qk_rope; }
  /// RoPE block width (rope_block, or qk_rope when 0).
  [[nodiscard]] std::int64_t rope_width() const noexcept { return rope_block == 0 ? qk_rope : rope_block; }

  /// Throws argument_error naming the first inconsistent field ("config.<field>").
  void validate() const {
    const detail::checker c("headwise::model::mla_config");
    using detail::to_text;
    // Every extent at most 2^20, so that products of two of them (weight shapes) fit easily.
    constexpr std::int64_t mx = std::int64_t{1} << 20;
    c.require(heads >= 1 && heads <= mx, "config.heads", "1..2^20", heads);
    c.require(d_model >= 1 && d_model <= mx, "config.d_model", "1..2^20", d_model);
    c.require(q_lora_rank >= 0 && q_lora_rank <= mx, "config.q_lora_rank", "0..2^20 (0 = no query compression)",
              q_lora_rank);
    c.require(kv_lora_rank >= 1 && kv_lora_rank <= mx, "config.kv_lora_rank", "1..2^20", kv_lora_rank);
    c.require(qk_nope >= 0 && qk_nope <= mx, "config.qk_nope", "0..2^20", qk_nope);
    c.require(qk_rope >= 0 && qk_rope <= mx && qk_rope % 2 == 0, "config.qk_rope", "an even value in 0..2^20",
              qk_rope);
    c.require(qk_nope + qk_rope >= 1, "config.qk_nope + config.qk_rope", ">= 1", qk_nope + qk_rope);
    c.require(v_head >= 1 && v_head <= mx, "config.v_head", "1..2^20", v_head);
    if (qk_rope == 0) {
      c.require(rope_block == 0, "config.rope_block", "0 when qk_rope = 0", rope_block);
    } else {
      c.require(rope_block == 0 || (rope_block >= 2 && rope_block % 2 == 0 && qk_rope % rope_block == 0),
                "config.rope_block", "0 or an even divisor of qk_rope = " + to_text(qk_rope), rope_block);
    }
    c.require(std::isfinite(rope_theta) && rope_theta > 1.0, "config.rope_theta", "a finite value > 1",
              rope_theta);
    detail::check_yarn(c, yarn, "config.yarn");
    c.require(max_seq_len >= 1, "config.max_seq_len", ">= 1", max_seq_len);
    detail::check_pairing(c, pairing, "config.pairing");
  }

  /// The RoPE frequencies of one rope block (rope_frequencies(rope_width(), ...)).
  [[nodiscard]] std::vector<double> rope_freqs() const {
    return rope_frequencies(rope_width(), rope_theta, yarn, max_seq_len);
  }
  /// The softmax scale: mla_softmax_scale(qk_nope, qk_rope, yarn, max_seq_len).
  [[nodiscard]] float softmax_scale() const { return mla_softmax_scale(qk_nope, qk_rope, yarn, max_seq_len); }

  /// DeepSeek-V2-Lite (16B) attention shapes: 16 heads, d_model 2048, no q compression, d_c 512,
  /// 128/64/128, YaRN factor 40 (mscale 0.707) over 4096, max_seq_len 163840.
  static mla_config deepseek_v2_lite() {
    mla_config m;
    m.heads = 16;
    m.d_model = 2048;
    m.q_lora_rank = 0;
    m.kv_lora_rank = 512;
    m.qk_nope = 128;
    m.qk_rope = 64;
    m.v_head = 128;
    m.yarn = yarn_config{40.0, 4096, 32.0, 1.0, 0.707};
    m.max_seq_len = 163840;
    return m;
  }
  /// DeepSeek-V3 (671B) attention shapes: 128 heads, d_model 7168, q_lora_rank 1536, d_c 512,
  /// 128/64/128, YaRN factor 40 (mscale 1) over 4096, max_seq_len 163840.
  static mla_config deepseek_v3() {
    mla_config m = deepseek_v2_lite();
    m.heads = 128;
    m.d_model = 7168;
    m.q_lora_rank = 1536;
    m.yarn.mscale = 1.0;
    return m;
  }
};

/// The weights of one MLA layer (nn.Linear layout, see the file comment). Unused weights stay
/// empty (0 x 0): w_q without query compression, else w_q_a/q_norm/w_q_b; kv_norm is empty
/// when config.kv_norm is false.
struct mla_weights {
  matrix w_q;              ///< heads·(qk_nope+qk_rope) x d_model (q_lora_rank = 0) [wq]
  matrix w_q_a;            ///< q_lora_rank x d_model [wq_a]
  weight_vector q_norm;    ///< q_lora_rank, when config.q_norm [q_norm]
  matrix w_q_b;            ///< heads·(qk_nope+qk_rope) x q_lora_rank [wq_b]
  matrix w_kv_a;           ///< (d_c + qk_rope) x d_model: rows [W_DKV ; W_KR] [wkv_a]
  weight_vector kv_norm;   ///< d_c, when config.kv_norm [kv_norm]
  matrix w_kv_b;           ///< heads·(qk_nope+v_head) x d_c: per head [W_UK^(h) ; W_UV^(h)] [wkv_b]
  matrix w_o;              ///< d_model x heads·v_head [wo]

  /// Validates config, then every weight's shape; throws argument_error naming the weight
  /// ("weights.<name>") with its expected shape.
  void check(const mla_config& config) const;
};

/// A configuration with its weights (what gqa_to_mla() and compress_latent() produce).
struct mla_parameters {
  mla_config config;
  mla_weights weights;
};

namespace detail {

inline std::string shape_text(std::int64_t rows, std::int64_t cols) { return to_text(rows) + " x " + to_text(cols); }

inline void check_matrix(const checker& c, const matrix& m, const std::string& name, std::int64_t rows,
                         std::int64_t cols, const std::string& what) {
  if (m.rows() != rows || m.cols() != cols)
    c.fail(name, what + " = " + shape_text(rows, cols), shape_text(m.rows(), m.cols()));
}

inline void check_vector(const checker& c, const weight_vector& v, const std::string& name, std::int64_t size,
                         const std::string& what) {
  if (v.size() != size) c.fail(name, "size " + what + " = " + to_text(size), "size " + to_text(v.size()));
}

inline void check_unused(const checker& c, std::int64_t size, const std::string& name, const std::string& why) {
  if (size != 0) c.fail(name, "empty (" + why + ")", to_text(size) + " values");
}

/// Checks the activations x (tokens x d_model) and their positions.
inline void check_tokens(const checker& c, const matrix& x, const std::string& x_name, std::int64_t d_model,
                         std::span<const std::int64_t> positions) {
  c.equal(x.cols(), d_model, x_name + ".cols() (d_model)", "config.d_model");
  c.equal(static_cast<std::int64_t>(positions.size()), x.rows(), "positions.size()", x_name + ".rows()");
  for (std::size_t t = 0; t < positions.size(); ++t)
    if (positions[t] < 0) c.fail("positions[" + to_text(t) + "]", ">= 0", to_text(positions[t]));
}

/// Row-wise RMSNorm in place: x ← x / sqrt(mean(x²) + eps) · weight (mean in double).
template <class Block>
void rms_norm_rows(Block&& x, const weight_vector& weight, double eps) {
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    double ss = 0;
    for (Eigen::Index d = 0; d < x.cols(); ++d) ss += static_cast<double>(x(t, d)) * static_cast<double>(x(t, d));
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.cols()) + eps);
    for (Eigen::Index d = 0; d < x.cols(); ++d)
      x(t, d) = static_cast<float>(static_cast<double>(x(t, d)) * inv * static_cast<double>(weight(d)));
  }
}

/// Rotates, in every row t of m (at positions[t]), `groups` rope slots of `width` values
/// starting at column `first` with stride `group_stride`, each slot as rope blocks.
inline void rope_rows(matrix& m, std::span<const std::int64_t> positions, const mla_config& cfg,
                      std::int64_t first, std::int64_t groups, std::int64_t group_stride) {
  if (cfg.qk_rope == 0) return;
  const std::vector<double> freqs = cfg.rope_freqs();
  const std::int64_t rb = cfg.rope_width(), blocks = cfg.qk_rope / rb;
  for (Eigen::Index t = 0; t < m.rows(); ++t) {
    const rope_rotation rot(positions[static_cast<std::size_t>(t)], freqs);
    float* row = m.data() + t * m.cols();
    for (std::int64_t g = 0; g < groups; ++g)
      for (std::int64_t k = 0; k < blocks; ++k) rot.apply(row + first + g * group_stride + k * rb, cfg.pairing);
  }
}

}  // namespace detail

inline void mla_weights::check(const mla_config& config) const {
  config.validate();
  const detail::checker c("headwise::model::mla_weights");
  const mla_config& m = config;
  const std::int64_t dq = m.qk_head_dim();
  if (m.q_lora_rank == 0) {
    detail::check_matrix(c, w_q, "weights.w_q", m.heads * dq, m.d_model, "heads·(qk_nope+qk_rope) x d_model");
    detail::check_unused(c, w_q_a.size(), "weights.w_q_a", "config.q_lora_rank = 0");
    detail::check_unused(c, q_norm.size(), "weights.q_norm", "config.q_lora_rank = 0");
    detail::check_unused(c, w_q_b.size(), "weights.w_q_b", "config.q_lora_rank = 0");
  } else {
    detail::check_unused(c, w_q.size(), "weights.w_q", "config.q_lora_rank > 0: use w_q_a and w_q_b");
    detail::check_matrix(c, w_q_a, "weights.w_q_a", m.q_lora_rank, m.d_model, "q_lora_rank x d_model");
    if (m.q_norm) {
      detail::check_vector(c, q_norm, "weights.q_norm", m.q_lora_rank, "q_lora_rank");
    } else {
      detail::check_unused(c, q_norm.size(), "weights.q_norm", "config.q_norm = false");
    }
    detail::check_matrix(c, w_q_b, "weights.w_q_b", m.heads * dq, m.q_lora_rank,
                         "heads·(qk_nope+qk_rope) x q_lora_rank");
  }
  detail::check_matrix(c, w_kv_a, "weights.w_kv_a", m.latent_dim(), m.d_model, "(kv_lora_rank+qk_rope) x d_model");
  if (m.kv_norm) {
    detail::check_vector(c, kv_norm, "weights.kv_norm", m.kv_lora_rank, "kv_lora_rank");
  } else {
    detail::check_unused(c, kv_norm.size(), "weights.kv_norm", "config.kv_norm = false");
  }
  detail::check_matrix(c, w_kv_b, "weights.w_kv_b", m.heads * (m.qk_nope + m.v_head), m.kv_lora_rank,
                       "heads·(qk_nope+v_head) x kv_lora_rank");
  detail::check_matrix(c, w_o, "weights.w_o", m.d_model, m.heads * m.v_head, "d_model x heads·v_head");
}

/// The positions start, start+1, ..., start+count-1.
inline std::vector<std::int64_t> token_positions(std::int64_t start, std::int64_t count) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(count > 0 ? count : 0));
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = start + static_cast<std::int64_t>(i);
  return p;
}

/// The latent rows of tokens x (tokens x d_model) at `positions`: tokens x (d_c + qk_rope),
/// [c ; k_rope] = W_kv_a·x, c ← RMSNorm(c)·kv_norm (eps 1e-6) when config.kv_norm,
/// k_rope ← RoPE(k_rope, position) (per rope block). What the absorbed kernel's cache holds.
inline matrix project_latent(const mla_config& config, const mla_weights& weights, const matrix& x,
                             std::span<const std::int64_t> positions) {
  const detail::checker c("headwise::model::project_latent");
  weights.check(config);
  detail::check_tokens(c, x, "x", config.d_model, positions);
  matrix lat = x * weights.w_kv_a.transpose();
  if (config.kv_norm) detail::rms_norm_rows(lat.leftCols(config.kv_lora_rank), weights.kv_norm, mla_norm_eps);
  detail::rope_rows(lat, positions, config, config.kv_lora_rank, 1, 0);
  return lat;
}

/// The queries of tokens x at `positions`: tokens x heads·(qk_nope+qk_rope), per head
/// [q_nope ; RoPE(q_rope)], from W_q·x or W_q_b·RMSNorm(W_q_a·x) (q_lora_rank > 0).
inline matrix project_queries(const mla_config& config, const mla_weights& weights, const matrix& x,
                              std::span<const std::int64_t> positions) {
  const detail::checker c("headwise::model::project_queries");
  weights.check(config);
  detail::check_tokens(c, x, "x", config.d_model, positions);
  matrix q;
  if (config.q_lora_rank == 0) {
    q = x * weights.w_q.transpose();
  } else {
    matrix a = x * weights.w_q_a.transpose();
    if (config.q_norm) detail::rms_norm_rows(a, weights.q_norm, mla_norm_eps);
    q = a * weights.w_q_b.transpose();
  }
  detail::rope_rows(q, positions, config, config.qk_nope, config.heads, config.qk_head_dim());
  return q;
}

/// Absorbs W_UK into the queries: q (tokens x heads·(qk_nope+qk_rope)) -> tokens x
/// heads·(d_c+qk_rope), per head q̃_h = [W_UK^(h)ᵀ q_nope_h ; q_rope_h]; then
/// q̃_h·[c ; k_rope] = q_h·[W_UK^(h) c ; k_rope], the naive logit.
inline matrix absorb_queries(const mla_config& config, const mla_weights& weights, const matrix& q) {
  const detail::checker c("headwise::model::absorb_queries");
  weights.check(config);
  const std::int64_t h_n = config.heads, dq = config.qk_head_dim(), dc = config.kv_lora_rank,
                     dr = config.qk_rope, da = config.latent_dim(), nope = config.qk_nope;
  c.equal(q.cols(), h_n * dq, "q.cols() (heads·(qk_nope+qk_rope))", "config");
  const Eigen::Index n = q.rows();
  matrix qa(n, h_n * da);
  for (std::int64_t h = 0; h < h_n; ++h) {
    if (nope > 0) {
      qa.block(0, h * da, n, dc).noalias() =
          q.block(0, h * dq, n, nope) * weights.w_kv_b.block(h * (nope + config.v_head), 0, nope, dc);
    } else {
      qa.block(0, h * da, n, dc).setZero();
    }
    qa.block(0, h * da + dc, n, dr) = q.block(0, h * dq + nope, n, dr);
  }
  return qa;
}

/// K and V of the naive (decompressed) form, tokens x heads·dim each.
struct expanded_kv {
  matrix k;  ///< tokens x heads·(qk_nope+qk_rope): K_h = [W_UK^(h) c ; k_rope]
  matrix v;  ///< tokens x heads·v_head: V_h = W_UV^(h) c
};

/// Expands latent rows (tokens x (d_c+qk_rope)) into the naive per-head K and V.
inline expanded_kv expand_latent(const mla_config& config, const mla_weights& weights, const matrix& latent) {
  const detail::checker c("headwise::model::expand_latent");
  weights.check(config);
  const std::int64_t h_n = config.heads, dq = config.qk_head_dim(), dc = config.kv_lora_rank,
                     dr = config.qk_rope, nope = config.qk_nope, dv = config.v_head;
  c.equal(latent.cols(), config.latent_dim(), "latent.cols() (d_c+qk_rope)", "config");
  const Eigen::Index n = latent.rows();
  expanded_kv kv{matrix(n, h_n * dq), matrix(n, h_n * dv)};
  for (std::int64_t h = 0; h < h_n; ++h) {
    const std::int64_t r0 = h * (nope + dv);
    if (nope > 0)
      kv.k.block(0, h * dq, n, nope).noalias() =
          latent.leftCols(dc) * weights.w_kv_b.block(r0, 0, nope, dc).transpose();
    kv.k.block(0, h * dq + nope, n, dr) = latent.rightCols(dr);
    kv.v.block(0, h * dv, n, dv).noalias() = latent.leftCols(dc) * weights.w_kv_b.block(r0 + nope, 0, dv, dc).transpose();
  }
  return kv;
}

/// Un-absorbs the absorbed kernel's output: tokens x heads·d_c -> tokens x heads·v_head,
/// o_h = W_UV^(h) õ_h.
inline matrix unabsorb_output(const mla_config& config, const mla_weights& weights, const matrix& o_latent) {
  const detail::checker c("headwise::model::unabsorb_output");
  weights.check(config);
  const std::int64_t h_n = config.heads, dc = config.kv_lora_rank, nope = config.qk_nope, dv = config.v_head;
  c.equal(o_latent.cols(), h_n * dc, "o_latent.cols() (heads·d_c)", "config");
  const Eigen::Index n = o_latent.rows();
  matrix o(n, h_n * dv);
  for (std::int64_t h = 0; h < h_n; ++h)
    o.block(0, h * dv, n, dv).noalias() =
        o_latent.block(0, h * dc, n, dc) * weights.w_kv_b.block(h * (nope + dv) + nope, 0, dv, dc).transpose();
  return o;
}

/// The output projection: tokens x heads·v_head -> tokens x d_model, o·W_oᵀ.
inline matrix output_projection(const mla_config& config, const mla_weights& weights, const matrix& o) {
  const detail::checker c("headwise::model::output_projection");
  weights.check(config);
  c.equal(o.cols(), config.heads * config.v_head, "o.cols() (heads·v_head)", "config");
  return o * weights.w_o.transpose();
}

/// A caller-owned latent cache of one sequence: length() rows of width() values stored as T
/// (float, headwise::bf16 or headwise::f16; rounded to nearest even on append). The absorbed
/// kernel reads it as its K (all values) and V (the first d_c).
template <class T>
class latent_cache {
  static_assert(is_kv_dtype_v<T>, "headwise::model::latent_cache: T must be float, bf16 or f16");

 public:
  latent_cache() = default;
  /// An empty cache for rows of `width` values (config.latent_dim()), with room reserved for
  /// `reserve_tokens` rows.
  explicit latent_cache(std::int64_t width, std::int64_t reserve_tokens = 0) : width_(width) {
    const detail::checker c("headwise::model::latent_cache");
    c.require(width >= 1, "width", ">= 1", width);
    c.require(reserve_tokens >= 0 && reserve_tokens <= (std::int64_t{1} << 40) / width, "reserve_tokens",
              ">= 0 and width·reserve_tokens <= 2^40 values", reserve_tokens);
    rows_.reserve(static_cast<std::size_t>(width * reserve_tokens));
  }

  /// Values per row.
  [[nodiscard]] std::int64_t width() const noexcept { return width_; }
  /// Rows (tokens) held.
  [[nodiscard]] std::int64_t length() const noexcept {
    return width_ == 0 ? 0 : static_cast<std::int64_t>(rows_.size()) / width_;
  }
  /// Appends rows (tokens x width, f32), converted to T (headwise::convert).
  void append(const matrix& rows) {
    const detail::checker c("headwise::model::latent_cache::append");
    c.equal(rows.cols(), width_, "rows.cols()", "the cache width");
    if (rows.rows() == 0) return;
    const std::size_t old = rows_.size();
    rows_.resize(old + static_cast<std::size_t>(rows.size()));
    headwise::convert(tensor_view<const float, 2>(rows.data(), {rows.rows(), width_}),
            tensor_view<T, 2>(rows_.data() + old, {rows.rows(), width_}));
  }
  /// Keeps the first `tokens` rows (e.g. to roll back a rejected draft).
  void truncate(std::int64_t tokens) {
    const detail::checker c("headwise::model::latent_cache::truncate");
    c.require(tokens >= 0 && tokens <= length(), "tokens", "0..length() = " + detail::to_text(length()),
              tokens);
    rows_.resize(static_cast<std::size_t>(tokens * width_));
  }
  /// The cache as the kernels' latent: (batch 1, length, width).
  [[nodiscard]] tensor_view<const T, 3> view() const { return {rows_.data(), {1, length(), width_}}; }
  /// The stored rows converted back to f32 (length x width).
  [[nodiscard]] matrix to_matrix() const {
    matrix m(length(), width_);
    for (std::size_t i = 0; i < rows_.size(); ++i) m.data()[i] = to_float(rows_[i]);
    return m;
  }
  /// The stored values, row-major.
  [[nodiscard]] const std::vector<T>& data() const noexcept { return rows_; }

 private:
  std::int64_t width_ = 0;
  std::vector<T> rows_;
};

/// Which attention computation mla_layer::forward runs.
enum class mla_form : std::uint8_t {
  absorbed,  ///< headwise::mla_absorbed over the latent cache (MQA, dim_qk d_c+qk_rope, dim_v d_c)
  naive,     ///< expand_latent over the whole cache, then headwise::attention (dim_qk
             ///< qk_nope+qk_rope, dim_v v_head, heads_kv = heads)
};

/// One MLA attention layer (no residual, no MoE): validated configuration and weights, and a
/// forward over a chunk of tokens that extends a caller-owned latent cache.
class mla_layer {
 public:
  /// Validates config and weights (argument_error naming the field or weight).
  mla_layer(mla_config config, mla_weights weights) : config_(std::move(config)), weights_(std::move(weights)) {
    weights_.check(config_);
  }

  [[nodiscard]] const mla_config& config() const noexcept { return config_; }
  [[nodiscard]] const mla_weights& weights() const noexcept { return weights_; }

  /// The kernels' options: scale = config.softmax_scale(), causal bottom_right (the chunk is
  /// the newest tokens of the cache).
  [[nodiscard]] attention_options options(int num_threads = 0) const {
    attention_options o;
    o.scale = config_.softmax_scale();
    o.causal = causal_mode::bottom_right;
    o.num_threads = num_threads;
    return o;
  }

  /// Runs the layer on hidden states x (tokens x d_model) at positions start..start+n-1 with
  /// start = cache.length(): appends the chunk's latent rows to `cache`, attends causally over
  /// the whole cache (prefill, chunked prefill and decode alike) and returns tokens x d_model.
  /// `form` picks the absorbed kernel or the naive expansion; both read the STORED (possibly
  /// bf16-rounded) latent, so they agree to f32 accuracy for any T. Throws argument_error
  /// (before touching the cache) for a wrong x or cache width.
  template <class T>
  matrix forward(const matrix& x, latent_cache<T>& cache, mla_form form = mla_form::absorbed,
                 int num_threads = 0) const {
    const detail::checker c("headwise::model::mla_layer::forward");
    c.equal(x.cols(), config_.d_model, "x.cols() (d_model)", "config.d_model");
    c.equal(cache.width(), config_.latent_dim(), "cache.width()", "config.latent_dim() (kv_lora_rank + qk_rope)");
    c.require(form == mla_form::absorbed || form == mla_form::naive, "form", "absorbed or naive",
              static_cast<int>(form));
    c.require(num_threads >= 0, "num_threads", ">= 0", num_threads);
    const std::int64_t n = x.rows();
    if (n == 0) return matrix(0, config_.d_model);
    const std::vector<std::int64_t> pos = token_positions(cache.length(), n);
    const matrix lat = project_latent(config_, weights_, x, pos);
    const matrix q = project_queries(config_, weights_, x, pos);
    cache.append(lat);
    const std::int64_t h_n = config_.heads, len = cache.length();
    const attention_options opt = options(num_threads);
    matrix o;
    if (form == mla_form::absorbed) {
      const matrix qa = absorb_queries(config_, weights_, q);
      matrix o_lat(n, h_n * config_.kv_lora_rank);
      headwise::mla_absorbed(bshd<const float>(qa.data(), 1, n, h_n, config_.latent_dim()), cache.view(),
                   bshd(o_lat.data(), 1, n, h_n, config_.kv_lora_rank), opt);
      o = unabsorb_output(config_, weights_, o_lat);
    } else {
      const expanded_kv kv = expand_latent(config_, weights_, cache.to_matrix());
      o.resize(n, h_n * config_.v_head);
      headwise::attention(bshd<const float>(q.data(), 1, n, h_n, config_.qk_head_dim()),
                bshd<const float>(kv.k.data(), 1, len, h_n, config_.qk_head_dim()),
                bshd<const float>(kv.v.data(), 1, len, h_n, config_.v_head),
                bshd(o.data(), 1, n, h_n, config_.v_head), opt);
    }
    return output_projection(config_, weights_, o);
  }

 private:
  mla_config config_;
  mla_weights weights_;
};

}  // namespace headwise::model

HEADWISE_DIAGNOSTICS_POP
