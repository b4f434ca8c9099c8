/// @file
/// @brief Rotary position embeddings for the model-level helpers: both pairing conventions,
/// DeepSeek's YaRN-corrected frequencies and the MLA softmax scale (with YaRN's mscale²).
///
/// Conventions (ALGORITHMS.md §0, §4, §9):
///  * rope_pairing::interleaved rotates the pairs (2i, 2i+1): the DeepSeek reference
///    (inference/model.py apply_rotary_emb views the vector as d/2 complex numbers).
///  * rope_pairing::half_split rotates the pairs (i, i + d/2): HF rotate_half (Llama). HF
///    DeepSeek-V3 permutes the interleaved layout into this one, y = [x0, x2, x4, ..., x1, x3,
///    ...]; then half_split(y) equals the same permutation of interleaved(x).
///  * Pair i turns by the angle pos·freqs[i] (computed in double):
///    (a, b) -> (a·cos − b·sin, a·sin + b·cos).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <vector>

#include "../core/checks.hpp"
#include "../core/error.hpp"

namespace headwise::model {

/// Which coordinates RoPE rotates together (see the file comment).
enum class rope_pairing : std::uint8_t {
  interleaved,  ///< pairs (2i, 2i+1): DeepSeek reference, complex view
  half_split,   ///< pairs (i, i + d/2): HF rotate_half
};

/// YaRN context extension as in DeepSeek's configs (rope_scaling). factor 1 means none; below 1
/// is rejected.
struct yarn_config {
  double factor = 1.0;                        ///< rope_factor (V2/V3: 40)
  std::int64_t original_max_position = 4096;  ///< original_seq_len / original_max_position_embeddings
  double beta_fast = 32;                      ///< rotations that bound the extrapolated band
  double beta_slow = 1;                       ///< rotations that bound the interpolated band
  double mscale = 1.0;                        ///< mscale of the attention scale (V3 1.0, V2-Lite 0.707)
};

namespace detail {

using headwise::detail::checker;
using headwise::detail::to_text;

/// Checks a yarn_config (every field used by rope_frequencies and mla_softmax_scale).
inline void check_yarn(const checker& c, const yarn_config& y, const std::string& name) {
  c.require(std::isfinite(y.factor) && y.factor >= 1, name + ".factor", "a finite value >= 1 (1 = no YaRN)",
            y.factor);
  c.require(y.original_max_position >= 1, name + ".original_max_position", ">= 1",
            y.original_max_position);
  c.require(std::isfinite(y.beta_fast) && y.beta_fast > 0, name + ".beta_fast", "a finite value > 0",
            y.beta_fast);
  c.require(std::isfinite(y.beta_slow) && y.beta_slow > 0, name + ".beta_slow", "a finite value > 0",
            y.beta_slow);
  c.require(std::isfinite(y.mscale), name + ".mscale", "a finite value", y.mscale);
}

/// cos/sin of pos·freqs[i] for one position, applied to any number of rope blocks.
class rope_rotation {
 public:
  rope_rotation(std::int64_t pos, std::span<const double> freqs) : cos_(freqs.size()), sin_(freqs.size()) {
    for (std::size_t i = 0; i < freqs.size(); ++i) {
      const double a = static_cast<double>(pos) * freqs[i];
      cos_[i] = std::cos(a);
      sin_[i] = std::sin(a);
    }
  }
  /// Rotates one block of 2·freqs.size() values in place.
  void apply(float* x, rope_pairing pairing) const noexcept {
    const std::size_t half = cos_.size();
    for (std::size_t i = 0; i < half; ++i) {
      const std::size_t i0 = pairing == rope_pairing::interleaved ? 2 * i : i;
      const std::size_t i1 = pairing == rope_pairing::interleaved ? 2 * i + 1 : i + half;
      const double a = x[i0], b = x[i1];
      x[i0] = static_cast<float>(a * cos_[i] - b * sin_[i]);
      x[i1] = static_cast<float>(a * sin_[i] + b * cos_[i]);
    }
  }
  [[nodiscard]] std::int64_t dim() const noexcept { return 2 * static_cast<std::int64_t>(cos_.size()); }

 private:
  std::vector<double> cos_, sin_;
};

inline void check_pairing(const checker& c, rope_pairing p, const std::string& name) {
  c.require(p == rope_pairing::interleaved || p == rope_pairing::half_split, name, "interleaved or half_split",
            static_cast<int>(p));
}

inline void check_rope_args(const checker& c, std::int64_t dim, std::span<const double> freqs,
                            rope_pairing pairing) {
  c.require(dim >= 0 && dim % 2 == 0, "dim", "an even value >= 0", dim);
  c.equal(static_cast<std::int64_t>(freqs.size()), dim / 2, "freqs.size()", "dim / 2");
  check_pairing(c, pairing, "pairing");
}

}  // namespace detail

/// YaRN's attention-magnitude correction: 1 for factor <= 1, else 0.1·mscale·ln(factor) + 1
/// (DeepSeek inference/model.py; HF yarn_get_mscale).
inline double yarn_mscale(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

/// RoPE inverse frequencies of a rope_dim-wide vector, as DeepSeek-V3 inference/model.py
/// precompute_freqs_cis (computed in double): freqs[i] = theta^(-2i/rope_dim), i < rope_dim/2.
/// When max_seq_len > yarn.original_max_position and yarn.factor != 1, YaRN blends each
/// frequency between itself (fast, extrapolated) and freqs[i]/factor (slow, interpolated):
///   dim(r)      = rope_dim·ln(original/(2π·r)) / (2·ln theta)      (find_correction_dim)
///   low, high   = max(floor(dim(beta_fast)), 0), min(ceil(dim(beta_slow)), rope_dim − 1)
///   ramp[i]     = clamp((i − low)/(high − low), 0, 1)   (high += 0.001 when low == high)
///   freqs[i]    = freqs[i]/factor·ramp[i] + freqs[i]·(1 − ramp[i])
/// (the reference's smooth = 1 − ramp). With factor == 1 the blend is the identity and is
/// skipped, so the frequencies are bitwise the plain ones. rope_dim must be even (0 gives none).
inline std::vector<double> rope_frequencies(std::int64_t rope_dim, double theta, const yarn_config& yarn,
                                            std::int64_t max_seq_len) {
  const detail::checker c("headwise::model::rope_frequencies");
  c.require(rope_dim >= 0 && rope_dim <= (std::int64_t{1} << 20) && rope_dim % 2 == 0, "rope_dim",
            "an even value in 0..2^20", rope_dim);
  c.require(std::isfinite(theta) && theta > 1.0, "theta", "a finite value > 1", theta);
  detail::check_yarn(c, yarn, "yarn");
  c.require(max_seq_len >= 1, "max_seq_len", ">= 1", max_seq_len);
  const std::int64_t half = rope_dim / 2;
  const double d = static_cast<double>(rope_dim);
  std::vector<double> freqs(static_cast<std::size_t>(half));
  for (std::int64_t i = 0; i < half; ++i)
    freqs[static_cast<std::size_t>(i)] = std::pow(theta, -2.0 * static_cast<double>(i) / d);
  if (max_seq_len > yarn.original_max_position && yarn.factor != 1.0 && half > 0) {
    const double orig = static_cast<double>(yarn.original_max_position);
    const auto correction_dim = [&](double rotations) {
      return d * std::log(orig / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(theta));
    };
    const double low = std::max(std::floor(correction_dim(yarn.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(yarn.beta_slow)), d - 1.0);
    if (low == high) high += 0.001;
    for (std::int64_t i = 0; i < half; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double smooth = 1.0 - ramp;
      double& f = freqs[static_cast<std::size_t>(i)];
      f = f / yarn.factor * (1.0 - smooth) + f * smooth;
    }
  }
  return freqs;
}

/// Rotates one dim-wide vector x in place for position pos: pair i (chosen by `pairing`) turns
/// by pos·freqs[i], computed in double. freqs.size() must be dim/2 (e.g. from
/// rope_frequencies(dim, ...)). Throws argument_error before touching x.
inline void apply_rope(float* x, std::int64_t dim, std::int64_t pos, std::span<const double> freqs,
                       rope_pairing pairing) {
  const detail::checker c("headwise::model::apply_rope");
  detail::check_rope_args(c, dim, freqs, pairing);
  if (dim == 0) return;
  c.require(x != nullptr, "x", "a non-null pointer", "nullptr");
  detail::rope_rotation(pos, freqs).apply(x, pairing);
}

/// apply_rope on `blocks` vectors of `dim` values each, block k starting at x + k·stride
/// (stride = dim when 0: contiguous blocks, e.g. the heads of one token, or the per-KV-head
/// blocks of a TransMLA-converted rope key). All blocks use the same position and frequencies.
inline void apply_rope_blocks(float* x, std::int64_t blocks, std::int64_t dim, std::int64_t pos,
                              std::span<const double> freqs, rope_pairing pairing, std::int64_t stride = 0) {
  const detail::checker c("headwise::model::apply_rope_blocks");
  detail::check_rope_args(c, dim, freqs, pairing);
  c.require(blocks >= 0, "blocks", ">= 0", blocks);
  c.require(stride == 0 || stride >= dim, "stride", "0 (= dim) or >= dim = " + detail::to_text(dim),
            stride);
  if (dim == 0 || blocks == 0) return;
  c.require(x != nullptr, "x", "a non-null pointer", "nullptr");
  const std::int64_t step = stride == 0 ? dim : stride;
  const detail::rope_rotation rot(pos, freqs);
  for (std::int64_t k = 0; k < blocks; ++k) rot.apply(x + k * step, pairing);
}

/// MLA softmax scale, DeepSeek reference behaviour: (qk_nope + qk_rope)^-0.5 (NOT
/// (d_c + d_rope)^-0.5: absorption does not change the scale), times mscale² with
/// mscale = yarn_mscale(yarn.factor, yarn.mscale) when max_seq_len > yarn.original_max_position
/// and yarn.factor > 1. V3 (192, factor 40, mscale 1, max_seq_len 163840): 0.1352338;
/// mscale 0.707: 0.1147214; no YaRN: 192^-0.5 = 0.0721688.
/// HF differs: it multiplies by yarn_get_mscale(factor, mscale_all_dim)² whenever rope_scaling
/// is set and mscale_all_dim is nonzero, regardless of the runtime sequence length; pass
/// max_seq_len > original_max_position (and mscale = mscale_all_dim) to get HF's value.
inline float mla_softmax_scale(std::int64_t qk_nope, std::int64_t qk_rope, const yarn_config& yarn,
                               std::int64_t max_seq_len) {
  const detail::checker c("headwise::model::mla_softmax_scale");
  c.require(qk_nope >= 0 && qk_nope <= (std::int64_t{1} << 40), "qk_nope", "0..2^40", qk_nope);
  c.require(qk_rope >= 0 && qk_rope <= (std::int64_t{1} << 40), "qk_rope", "0..2^40", qk_rope);
  c.require(qk_nope + qk_rope >= 1, "qk_nope + qk_rope", ">= 1", qk_nope + qk_rope);
  detail::check_yarn(c, yarn, "yarn");
  c.require(max_seq_len >= 1, "max_seq_len", ">= 1", max_seq_len);
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_nope + qk_rope));
  if (max_seq_len > yarn.original_max_position && yarn.factor > 1.0) {
    const double m = yarn_mscale(yarn.factor, yarn.mscale);
    scale *= m * m;
  }
  return static_cast<float>(scale);
}

}  // namespace headwise::model
