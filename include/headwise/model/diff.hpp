/// @file
/// @brief A differential attention layer (DIFF Transformer V1, Ye et al.) and its grouped
/// generalisation GDA (Grouped Differential Attention, Lim et al., Motif) around the fused
/// headwise::diff_attention kernel: λ and λ_init, configuration, weights, Q/K/V projections with
/// interleaved RoPE, a K/V cache, the layer forward (fused, and an unfused two-call form for
/// checks), and group-differentiated growth of the signal heads. The math is ALGORITHMS.md §2-§3;
/// requires Eigen 3.4 (link headwise::model).
///
/// Conventions (as headwise/model/mla.hpp):
///  * headwise::model::matrix is a row-major f32 Eigen matrix; activations are tokens x
///    features, weights follow torch.nn.Linear (out_features x in_features), y = x·Wᵀ.
///  * d = config.head_dim is the HALF-head dim: queries and keys are d wide, values and outputs
///    2d wide, and the softmax scale is 1/sqrt(d) (unilm's `scaling = head_dim ** -0.5`).
///  * W_q's rows are the striped query heads (d rows each): heads_noise groups of
///    [G signal heads, 1 noise head], G = heads_signal / heads_noise. G = 1 is DIFF V1's
///    [q1_0, q2_0, q1_1, q2_1, ...] (unilm's q_proj viewed as [2h, d]).
///  * W_k's rows are 2·kv_pairs key heads of d rows, interleaved (k1_j, k2_j); W_v's rows are
///    kv_pairs value heads of 2d rows ([v1_j | v2_j] in the GDA ports' interleaved V heads).
///    Signal head i reads pair i / (heads_signal / kv_pairs); noise head n reads pair
///    n / (heads_noise / kv_pairs), the pair of its signal heads.
///  * W_o is d_model x heads_signal·2d: only the signal heads produce output.
///  * One sequence (batch 1) per call; positions are absolute token indices.
#pragma once

// GCC 12 reports false -Wmaybe-uninitialized on AVX-512 intrinsics (_mm512_undefined_*) inlined
// into Eigen's GEMM kernels; the suppression has to cover Eigen's templates, i.e. its include,
// and the functions here that instantiate them.
#include "../tile/diagnostics.hpp"
HEADWISE_DIAGNOSTICS_PUSH
#include <Eigen/Dense>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../core/checks.hpp"
#include "../core/dtype.hpp"
#include "../core/options.hpp"
#include "../core/view.hpp"
#include "../variants/attention.hpp"
#include "../variants/diff.hpp"
#include "../variants/kv_cache.hpp"
#include "mla.hpp"
#include "rope.hpp"

namespace headwise::model {

/// λ_init of layer `layer_index` (0-based): 0.8 − 0.6·exp(−0.3·layer_index), computed in
/// double; 0.2, 0.35551, 0.47071, 0.55606, 0.61928, 0.66612 for layers 0..5.
/// This is microsoft/unilm Diff-Transformer's lambda_init_fn(depth) with its 0-based `depth`,
/// i.e. the paper's 0.8 − 0.6·exp(−0.3·(l − 1)) for a 1-based layer l. The MLX Motif port
/// writes exp(−0.3·(layer_idx − 1)) with a 0-based layer_idx, one layer behind this choice
/// (ALGORITHMS.md §9): its λ_init of layer L >= 1 is diff_lambda_init(L − 1), and of layer 0
/// 0.8 − 0.6·e^0.3 ≈ −0.0099, which no layer_index here gives (layer_index must be >= 0).
inline double diff_lambda_init(std::int64_t layer_index) {
  const detail::checker c("headwise::model::diff_lambda_init");
  c.require(layer_index >= 0, "layer_index", ">= 0 (0-based: unilm's depth, the paper's l - 1)",
            layer_index);
  return 0.8 - 0.6 * std::exp(-0.3 * static_cast<double>(layer_index));
}

/// The layer's re-parameterised λ (DIFF V1, GDA): exp(λq1·λk1) − exp(λq2·λk2) + λ_init, dot
/// products and exponentials in double. The four vectors must have the same length (d). λ may be
/// negative; nothing clamps it (as in the reference).
inline double diff_lambda(const weight_vector& lambda_q1, const weight_vector& lambda_k1,
                          const weight_vector& lambda_q2, const weight_vector& lambda_k2,
                          double lambda_init) {
  const detail::checker c("headwise::model::diff_lambda");
  const std::int64_t n = lambda_q1.size();
  c.equal(lambda_k1.size(), n, "lambda_k1.size()", "lambda_q1.size()");
  c.equal(lambda_q2.size(), n, "lambda_q2.size()", "lambda_q1.size()");
  c.equal(lambda_k2.size(), n, "lambda_k2.size()", "lambda_q1.size()");
  c.require(std::isfinite(lambda_init), "lambda_init", "a finite value", lambda_init);
  double d1 = 0, d2 = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    d1 += static_cast<double>(lambda_q1(i)) * static_cast<double>(lambda_k1(i));
    d2 += static_cast<double>(lambda_q2(i)) * static_cast<double>(lambda_k2(i));
  }
  return std::exp(d1) - std::exp(d2) + lambda_init;
}

/// Shapes and settings of one GDA layer (G = heads_signal / heads_noise; G = 1 is DIFF V1).
/// Motif-2-12.7B: heads_signal 32, heads_noise 8 (G = 4), kv_pairs 8 (16 K/V heads), head_dim 128.
struct gda_config {
  std::int64_t d_model = 0;       ///< hidden size
  std::int64_t heads_signal = 0;  ///< H_s signal heads (= output heads)
  std::int64_t heads_noise = 0;   ///< H_n noise heads; H_s must be a multiple of H_n
  std::int64_t kv_pairs = 0;      ///< K/V pairs P (Motif num_kv_heads / 2); divides H_n and H_s
  std::int64_t head_dim = 0;      ///< d: query/key width; values and outputs are 2d wide
  std::int64_t layer_index = 0;   ///< 0-based layer index: λ_init = diff_lambda_init(layer_index)
  bool rope = true;               ///< RoPE on every d-wide query and key head
  double rope_theta = 10000.0;    ///< RoPE base
  rope_pairing pairing = rope_pairing::interleaved;  ///< DIFF: apply_rotary_emb(interleaved=True)
  bool causal = true;                                ///< bottom-right causal mask (right for a K/V cache)
  float norm_eps = 1e-5f;                            ///< the per-head RMSNorm epsilon

  /// G = heads_signal / heads_noise: signal heads per noise head.
  [[nodiscard]] std::int64_t group() const noexcept {
    return heads_noise > 0 ? heads_signal / heads_noise : 0;
  }
  /// Striped query heads: heads_signal + heads_noise.
  [[nodiscard]] std::int64_t query_heads() const noexcept { return heads_signal + heads_noise; }
  /// diff_lambda_init(layer_index).
  [[nodiscard]] double lambda_init() const { return diff_lambda_init(layer_index); }
  /// Row of W_q where query head `slot` of group `n` starts (slot G is the noise head).
  [[nodiscard]] std::int64_t q_row(std::int64_t n, std::int64_t slot) const noexcept {
    return (n * (group() + 1) + slot) * head_dim;
  }

  /// Throws argument_error naming the first inconsistent field ("config.<field>").
  void validate() const {
    const detail::checker c("headwise::model::gda_config");
    using detail::to_text;
    // Sizes stay far from overflow: every weight has at most 2^40 values.
    constexpr std::int64_t max_extent = std::int64_t{1} << 20;
    c.require(d_model >= 1 && d_model <= max_extent, "config.d_model", "1..2^20", d_model);
    c.require(heads_noise >= 1 && heads_noise <= max_extent, "config.heads_noise", "1..2^20", heads_noise);
    c.require(heads_signal <= max_extent, "config.heads_signal", "<= 2^20", heads_signal);
    c.require(head_dim <= max_extent / std::max<std::int64_t>(1, heads_signal + heads_noise), "config.head_dim",
              "(heads_signal + heads_noise)·head_dim <= 2^20", head_dim);
    c.require(heads_signal >= 1 && heads_signal % heads_noise == 0, "config.heads_signal",
              "a positive multiple of heads_noise = " + to_text(heads_noise), heads_signal);
    c.require(kv_pairs >= 1 && heads_noise % kv_pairs == 0, "config.kv_pairs",
              "a divisor of heads_noise = " + to_text(heads_noise) + " (and so of heads_signal)",
              kv_pairs);
    c.require(head_dim >= 1 && (!rope || head_dim % 2 == 0), "config.head_dim",
              rope ? "an even value >= 2 (RoPE)" : ">= 1", head_dim);
    c.require(layer_index >= 0, "config.layer_index", ">= 0 (0-based)", layer_index);
    c.require(!rope || (std::isfinite(rope_theta) && rope_theta > 1.0), "config.rope_theta",
              "a finite value > 1", rope_theta);
    detail::check_pairing(c, pairing, "config.pairing");
    c.require(std::isfinite(norm_eps) && norm_eps > 0.0f, "config.norm_eps", "a finite value > 0",
              norm_eps);
  }
};

/// The weights of one GDA layer (nn.Linear layout and head order: see the file comment).
struct gda_weights {
  matrix w_q;                 ///< (heads_signal + heads_noise)·d x d_model, striped heads
  matrix w_k;                 ///< 2·kv_pairs·d x d_model, interleaved (k1_j, k2_j)
  matrix w_v;                 ///< kv_pairs·2d x d_model
  matrix w_o;                 ///< d_model x heads_signal·2d
  weight_vector lambda_q1;    ///< d
  weight_vector lambda_k1;    ///< d
  weight_vector lambda_q2;    ///< d
  weight_vector lambda_k2;    ///< d
  weight_vector norm_weight;  ///< 2d: the RMSNorm gain shared by every head (subln.weight)

  /// Validates config, then every weight's shape ("weights.<name>" with its expected shape),
  /// that the λ vectors and the norm weight are finite, and that λ is finite in f32.
  void check(const gda_config& config) const {
    config.validate();
    const detail::checker c("headwise::model::gda_weights");
    const std::int64_t d = config.head_dim, p = config.kv_pairs;
    detail::check_matrix(c, w_q, "weights.w_q", config.query_heads() * d, config.d_model,
                         "(heads_signal+heads_noise)·head_dim x d_model");
    detail::check_matrix(c, w_k, "weights.w_k", 2 * p * d, config.d_model, "2·kv_pairs·head_dim x d_model");
    detail::check_matrix(c, w_v, "weights.w_v", p * 2 * d, config.d_model, "kv_pairs·2·head_dim x d_model");
    detail::check_matrix(c, w_o, "weights.w_o", config.d_model, config.heads_signal * 2 * d,
                         "d_model x heads_signal·2·head_dim");
    const auto finite_vector = [&](const weight_vector& v, const std::string& name, std::int64_t size,
                                   const std::string& what) {
      detail::check_vector(c, v, name, size, what);
      for (std::int64_t i = 0; i < size; ++i)
        if (!std::isfinite(v(i))) c.fail(name + "[" + detail::to_text(i) + "]", "a finite value", detail::to_text(v(i)));
    };
    finite_vector(lambda_q1, "weights.lambda_q1", d, "head_dim");
    finite_vector(lambda_k1, "weights.lambda_k1", d, "head_dim");
    finite_vector(lambda_q2, "weights.lambda_q2", d, "head_dim");
    finite_vector(lambda_k2, "weights.lambda_k2", d, "head_dim");
    finite_vector(norm_weight, "weights.norm_weight", 2 * d, "2·head_dim");
    const double lam = lambda(config);  // exp can overflow for large λ vectors
    c.require(std::isfinite(lam) && std::isfinite(static_cast<float>(lam)),
              "weights.lambda_q1 / lambda_k1 / lambda_q2 / lambda_k2",
              "λ vectors whose λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init is finite in f32",
              lam);
  }

  /// The layer's λ: diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, config.lambda_init()).
  [[nodiscard]] double lambda(const gda_config& config) const {
    return diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, config.lambda_init());
  }
};

/// A configuration with its weights (what grow_signal_heads() returns).
struct gda_parameters {
  gda_config config;
  gda_weights weights;
};

/// Q, K and V of a chunk of tokens (RoPE already applied to q and k when config.rope).
struct gda_projections {
  matrix q;  ///< tokens x (heads_signal + heads_noise)·d, striped
  matrix k;  ///< tokens x 2·kv_pairs·d, interleaved (k1_j, k2_j)
  matrix v;  ///< tokens x kv_pairs·2d
};

namespace detail {

inline void check_gda_call(const checker& c, const gda_config& config, const gda_weights& weights,
                           const matrix& x, std::int64_t start_pos, int num_threads) {
  weights.check(config);
  c.equal(x.cols(), config.d_model, "x.cols() (d_model)", "config.d_model");
  c.require(start_pos >= 0, "start_pos", ">= 0", start_pos);
  c.require(num_threads >= 0, "num_threads", ">= 0", num_threads);
}

/// λ as the kernel's float (finite: weights.check() has run).
inline float gda_lambda(const gda_config& config, const gda_weights& weights) {
  return static_cast<float>(weights.lambda(config));
}

/// The projections without the checks.
inline gda_projections gda_project_unchecked(const gda_config& config, const gda_weights& weights,
                                             const matrix& x, std::int64_t start_pos) {
  gda_projections p{x * weights.w_q.transpose(), x * weights.w_k.transpose(), x * weights.w_v.transpose()};
  if (config.rope) {
    const std::int64_t d = config.head_dim, hq = config.query_heads(), hk = 2 * config.kv_pairs;
    const std::vector<double> freqs = rope_frequencies(d, config.rope_theta, yarn_config{}, 1);
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const rope_rotation rot(start_pos + t, freqs);
      for (std::int64_t h = 0; h < hq; ++h) rot.apply(p.q.data() + t * p.q.cols() + h * d, config.pairing);
      for (std::int64_t h = 0; h < hk; ++h) rot.apply(p.k.data() + t * p.k.cols() + h * d, config.pairing);
    }
  }
  return p;
}

/// The fused kernel's options for this layer; norm_weight points into `weights`.
inline diff_options gda_kernel_options(const gda_config& config, const gda_weights& weights, float lambda,
                                       int num_threads) {
  diff_options o;
  o.causal = config.causal ? causal_mode::bottom_right : causal_mode::none;
  o.num_threads = num_threads;
  o.lambda = lambda;
  o.lambda_init = static_cast<float>(config.lambda_init());
  o.norm = diff_norm::rms;
  o.norm_weight = tensor_view<const float, 1>(weights.norm_weight.data(), {2 * config.head_dim});
  o.norm_eps = config.norm_eps;
  return o;  // scale: the kernel's default 1/sqrt(d)
}

/// Fused attention of the chunk's queries over K/V views, then W_o: tokens x d_model.
template <class KV>
matrix gda_attend(const gda_config& config, const gda_weights& weights, float lambda, const matrix& q,
                  tensor_view<const KV, 4> k, tensor_view<const KV, 4> v, int num_threads) {
  const std::int64_t n = q.rows(), d = config.head_dim;
  matrix o(n, config.heads_signal * 2 * d);  // (tokens, heads_signal·2d)
  headwise::diff_attention(bshd<const float>(q.data(), 1, n, config.query_heads(), d), k, v,
                           bshd(o.data(), 1, n, config.heads_signal, 2 * d),
                           gda_kernel_options(config, weights, lambda, num_threads));
  return o * weights.w_o.transpose();
}

}  // namespace detail

/// The projections of tokens x (tokens x d_model) at positions start_pos, start_pos+1, ...:
/// q = x·W_qᵀ, k = x·W_kᵀ, v = x·W_vᵀ, then (config.rope) RoPE on every d-wide query and key
/// head with config.pairing and theta (frequencies theta^(-2i/d), no YaRN).
inline gda_projections gda_project(const gda_config& config, const gda_weights& weights, const matrix& x,
                                   std::int64_t start_pos = 0) {
  const detail::checker c("headwise::model::gda_project");
  detail::check_gda_call(c, config, weights, x, start_pos, 0);
  return detail::gda_project_unchecked(config, weights, x, start_pos);
}

/// The options the layer passes to headwise::diff_attention: λ = weights.lambda(config),
/// λ_init = config.lambda_init(), diff_norm::rms with weights.norm_weight (the returned view
/// points into `weights`, keep it alive) and config.norm_eps, bottom-right causal when
/// config.causal, the default scale 1/sqrt(head_dim).
inline diff_options gda_options(const gda_config& config, const gda_weights& weights, int num_threads = 0) {
  const detail::checker c("headwise::model::gda_options");
  weights.check(config);
  c.require(num_threads >= 0, "num_threads", ">= 0", num_threads);
  return detail::gda_kernel_options(config, weights, detail::gda_lambda(config, weights), num_threads);
}

/// A caller-owned K/V cache of one sequence for a GDA layer: per token, the rotated keys
/// (2·kv_pairs·d, interleaved k1/k2) and the values (kv_pairs·2d), stored as T (float,
/// headwise::bf16 or headwise::f16; rounded to nearest even on append).
template <class T = float>
class gda_cache {
  static_assert(is_kv_dtype_v<T>, "headwise::model::gda_cache: T must be float, bf16 or f16");

 public:
  gda_cache() = default;
  /// An empty cache for `config`'s K/V shapes, with room for `reserve_tokens` tokens.
  explicit gda_cache(const gda_config& config, std::int64_t reserve_tokens = 0)
      : pairs_(config.kv_pairs), head_dim_(config.head_dim) {
    config.validate();
    const detail::checker c("headwise::model::gda_cache");
    c.require(reserve_tokens >= 0 && reserve_tokens <= (std::int64_t{1} << 40) / std::max<std::int64_t>(1, v_width()),
              "reserve_tokens", ">= 0 and reserve_tokens·(2·head_dim·kv_pairs) < 2^40 values",
              reserve_tokens);
    k_.reserve(static_cast<std::size_t>(reserve_tokens * k_width()));
    v_.reserve(static_cast<std::size_t>(reserve_tokens * v_width()));
  }

  [[nodiscard]] std::int64_t pairs() const noexcept { return pairs_; }
  [[nodiscard]] std::int64_t head_dim() const noexcept { return head_dim_; }
  /// Key values per token: 2·pairs·head_dim.
  [[nodiscard]] std::int64_t k_width() const noexcept { return 2 * pairs_ * head_dim_; }
  /// Value values per token: pairs·2·head_dim.
  [[nodiscard]] std::int64_t v_width() const noexcept { return 2 * pairs_ * head_dim_; }
  /// Tokens held.
  [[nodiscard]] std::int64_t length() const noexcept {
    return k_width() == 0 ? 0 : static_cast<std::int64_t>(k_.size()) / k_width();
  }

  /// Appends rotated keys (tokens x k_width()) and values (tokens x v_width()), converted to T.
  void append(const matrix& k, const matrix& v) {
    const detail::checker c("headwise::model::gda_cache::append");
    c.equal(k.cols(), k_width(), "k.cols()", "2·pairs·head_dim");
    c.equal(v.cols(), v_width(), "v.cols()", "pairs·2·head_dim");
    c.equal(v.rows(), k.rows(), "v.rows()", "k.rows()");
    if (k.rows() == 0) return;
    const auto push = [](std::vector<T>& dst, const matrix& src) {
      const std::size_t old = dst.size();
      dst.resize(old + static_cast<std::size_t>(src.size()));
      headwise::convert(tensor_view<const float, 2>(src.data(), {src.rows(), src.cols()}),
                        tensor_view<T, 2>(dst.data() + old, {src.rows(), src.cols()}));
    };
    push(k_, k);
    push(v_, v);
  }
  /// Keeps the first `tokens` tokens (e.g. to roll back a rejected draft).
  void truncate(std::int64_t tokens) {
    const detail::checker c("headwise::model::gda_cache::truncate");
    c.require(tokens >= 0 && tokens <= length(), "tokens", "0..length() = " + detail::to_text(length()),
              tokens);
    k_.resize(static_cast<std::size_t>(tokens * k_width()));
    v_.resize(static_cast<std::size_t>(tokens * v_width()));
  }
  /// The keys as the kernel's k: (1, length, 2·pairs, head_dim).
  [[nodiscard]] tensor_view<const T, 4> k_view() const {
    return bshd<const T>(k_.data(), 1, length(), 2 * pairs_, head_dim_);
  }
  /// The values as the kernel's v: (1, length, pairs, 2·head_dim).
  [[nodiscard]] tensor_view<const T, 4> v_view() const {
    return bshd<const T>(v_.data(), 1, length(), pairs_, 2 * head_dim_);
  }

 private:
  std::int64_t pairs_ = 0, head_dim_ = 0;
  std::vector<T> k_, v_;
};

/// The GDA layer on a chunk x (tokens x d_model) at positions start_pos.. with no earlier
/// context (a prompt; start_pos only moves RoPE): projections, RoPE, the fused
/// headwise::diff_attention (bottom-right causal when config.causal), then o·W_oᵀ. Returns
/// tokens x d_model. Throws argument_error naming the bad field, weight or argument.
inline matrix gda_forward(const gda_config& config, const gda_weights& weights, const matrix& x,
                          std::int64_t start_pos = 0, int num_threads = 0) {
  const detail::checker c("headwise::model::gda_forward");
  detail::check_gda_call(c, config, weights, x, start_pos, num_threads);
  const float lambda = detail::gda_lambda(config, weights);
  const std::int64_t n = x.rows(), d = config.head_dim, p = config.kv_pairs;
  if (n == 0) return matrix(0, config.d_model);
  const gda_projections qkv = detail::gda_project_unchecked(config, weights, x, start_pos);
  return detail::gda_attend<float>(config, weights, lambda, qkv.q,
                                   bshd<const float>(qkv.k.data(), 1, n, 2 * p, d),
                                   bshd<const float>(qkv.v.data(), 1, n, p, 2 * d), num_threads);
}

/// The GDA layer on a chunk x that extends `cache`: the chunk sits at positions
/// cache.length().., its rotated K and V are appended, and its queries attend (bottom-right
/// causal when config.causal) over the whole cache. Prefill, chunked prefill and decode alike.
/// Throws argument_error (before touching the cache) for a bad x or a cache of other shapes.
template <class T>
matrix gda_forward(const gda_config& config, const gda_weights& weights, const matrix& x, gda_cache<T>& cache,
                   int num_threads = 0) {
  const detail::checker c("headwise::model::gda_forward");
  detail::check_gda_call(c, config, weights, x, 0, num_threads);
  c.equal(cache.pairs(), config.kv_pairs, "cache.pairs()", "config.kv_pairs");
  c.equal(cache.head_dim(), config.head_dim, "cache.head_dim()", "config.head_dim");
  const float lambda = detail::gda_lambda(config, weights);
  if (x.rows() == 0) return matrix(0, config.d_model);
  const gda_projections qkv = detail::gda_project_unchecked(config, weights, x, cache.length());
  cache.append(qkv.k, qkv.v);
  return detail::gda_attend<T>(config, weights, lambda, qkv.q, cache.k_view(), cache.v_view(), num_threads);
}

/// gda_forward's prompt form computed the unfused way, for checks and baselines: the signal
/// and the noise maps as two headwise::attention calls (GQA over the strided k1 / k2 heads,
/// both reading V), then per signal head i and token, in double,
///   o_i = (1 − λ_init)·norm_weight ⊙ RMSNorm(o1_i − λ·o2_{i/G}),   then o·W_oᵀ.
inline matrix gda_forward_unfused(const gda_config& config, const gda_weights& weights, const matrix& x,
                                  std::int64_t start_pos = 0, int num_threads = 0) {
  const detail::checker c("headwise::model::gda_forward_unfused");
  detail::check_gda_call(c, config, weights, x, start_pos, num_threads);
  const double lambda = weights.lambda(config);
  const std::int64_t n = x.rows(), d = config.head_dim, p = config.kv_pairs, hs = config.heads_signal,
                     hn = config.heads_noise, g = config.group();
  if (n == 0) return matrix(0, config.d_model);
  const gda_projections qkv = detail::gda_project_unchecked(config, weights, x, start_pos);
  // De-stripe the queries: q1 (tokens, hs·d), q2 (tokens, hn·d).
  matrix q1(n, hs * d), q2(n, hn * d);
  for (std::int64_t m = 0; m < hn; ++m) {
    for (std::int64_t s = 0; s < g; ++s)
      q1.middleCols((m * g + s) * d, d) = qkv.q.middleCols(config.q_row(m, s), d);
    q2.middleCols(m * d, d) = qkv.q.middleCols(config.q_row(m, g), d);
  }
  // k1_j / k2_j: every other d-wide key head, (1, tokens, pairs, d) with head stride 2d.
  const std::array<std::int64_t, 4> k_shape{1, n, p, d}, k_stride{n * 2 * p * d, 2 * p * d, 2 * d, 1};
  const tensor_view<const float, 4> k1(qkv.k.data(), k_shape, k_stride),
      k2(qkv.k.data() + d, k_shape, k_stride);
  const auto v = bshd<const float>(qkv.v.data(), 1, n, p, 2 * d);
  attention_options opt;
  opt.causal = config.causal ? causal_mode::bottom_right : causal_mode::none;
  opt.num_threads = num_threads;
  matrix o1(n, hs * 2 * d), o2(n, hn * 2 * d);
  headwise::attention(bshd<const float>(q1.data(), 1, n, hs, d), k1, v, bshd(o1.data(), 1, n, hs, 2 * d),
                      opt);
  headwise::attention(bshd<const float>(q2.data(), 1, n, hn, d), k2, v, bshd(o2.data(), 1, n, hn, 2 * d),
                      opt);
  const double factor = 1.0 - config.lambda_init(), eps = static_cast<double>(config.norm_eps);
  std::vector<double> diff(static_cast<std::size_t>(2 * d));
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t i = 0; i < hs; ++i) {
      float* row = o1.data() + t * o1.cols() + i * 2 * d;
      const float* noise = o2.data() + t * o2.cols() + (i / g) * 2 * d;
      double ss = 0;
      for (std::int64_t e = 0; e < 2 * d; ++e) {
        const double x_e = static_cast<double>(row[e]) - lambda * static_cast<double>(noise[e]);
        diff[static_cast<std::size_t>(e)] = x_e;
        ss += x_e * x_e;
      }
      const double inv = factor / std::sqrt(ss / static_cast<double>(2 * d) + eps);
      for (std::int64_t e = 0; e < 2 * d; ++e)
        row[e] = static_cast<float>(diff[static_cast<std::size_t>(e)] * inv *
                                    static_cast<double>(weights.norm_weight(e)));
    }
  return o1 * weights.w_o.transpose();
}

/// Group-differentiated growth (GDA §3): a layer with factor·heads_signal signal heads
/// (G' = factor·G; heads_noise, kv_pairs, K, V, λ and the norm unchanged) that computes the
/// same function. Signal head i becomes the copies i·factor + t (t < factor), which stay in
/// noise group i / G and on K/V pair i / (heads_signal / kv_pairs); each copy gets head i's
/// W_q rows, and W_o's 2d columns of head i are split among the copies as split[t]·W_o[:, i]
/// (default 1/factor each). Copies produce identical head outputs, so any split summing to 1
/// keeps the layer's output (exactly in real arithmetic; to f32 rounding of the scaled W_o); a
/// non-uniform split breaks the copies' symmetry for continued training.
/// The GDA paper's own initialisation of the copied heads is UNVERIFIED (ALGORITHMS.md §3);
/// this one is chosen because it is exactly function-preserving.
/// Requires factor >= 1 and split empty or of `factor` finite values summing to 1 (1e-6).
inline gda_parameters grow_signal_heads(const gda_config& config, const gda_weights& weights,
                                        std::int64_t factor, const std::vector<double>& split = {}) {
  const detail::checker c("headwise::model::grow_signal_heads");
  weights.check(config);
  c.require(factor >= 1 && factor <= (std::int64_t{1} << 20) / std::max<std::int64_t>(1, config.heads_signal),
            "factor", ">= 1 and factor·heads_signal <= 2^20", factor);
  std::vector<double> share(static_cast<std::size_t>(factor), 1.0 / static_cast<double>(factor));
  if (!split.empty()) {
    c.equal(static_cast<std::int64_t>(split.size()), factor, "split.size()",
            "factor (or empty: 1/factor each)");
    double sum = 0;
    for (std::size_t t = 0; t < split.size(); ++t) {
      if (!std::isfinite(split[t])) c.fail("split[" + detail::to_text(t) + "]", "a finite value", detail::to_text(split[t]));
      sum += split[t];
    }
    c.require(std::abs(sum - 1.0) <= 1e-6, "split", "values summing to 1 (within 1e-6)",
              "values summing to " + detail::to_text(sum));
    share = split;
  }
  const std::int64_t d = config.head_dim, hs = config.heads_signal, hn = config.heads_noise,
                     g = config.group();
  gda_parameters grown{config, weights};
  gda_config& gc = grown.config;
  gda_weights& gw = grown.weights;
  gc.heads_signal = hs * factor;
  gw.w_q.resize(gc.query_heads() * d, config.d_model);
  gw.w_o.resize(config.d_model, gc.heads_signal * 2 * d);
  for (std::int64_t m = 0; m < hn; ++m) {
    gw.w_q.middleRows(gc.q_row(m, gc.group()), d) =
        weights.w_q.middleRows(config.q_row(m, g), d);  // noise head
    for (std::int64_t s = 0; s < g; ++s) {
      const std::int64_t i = m * g + s;
      for (std::int64_t t = 0; t < factor; ++t) {
        const std::int64_t j = i * factor + t;  // in group j / G' = m, slot j % G' = s·factor + t
        gw.w_q.middleRows(gc.q_row(m, j % gc.group()), d) = weights.w_q.middleRows(config.q_row(m, s), d);
        gw.w_o.middleCols(j * 2 * d, 2 * d) =
            (weights.w_o.middleCols(i * 2 * d, 2 * d).cast<double>() * share[static_cast<std::size_t>(t)])
                .cast<float>();
      }
    }
  }
  gw.check(gc);
  return grown;
}

}  // namespace headwise::model

HEADWISE_DIAGNOSTICS_POP
