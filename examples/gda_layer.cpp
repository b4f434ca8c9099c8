/// @file
/// @brief A Grouped Differential Attention (GDA) layer, Motif-2-12.7B-shaped but small, through
/// headwise::model (headwise/model/diff.hpp): prefill through the fused headwise::diff_attention
/// kernel, checked against the unfused form (two headwise::attention calls, signal and noise,
/// then the λ-difference and RMSNorm); decode one token from a K/V cache; then grow the signal
/// heads ×2 (group-differentiated growth) and check that the layer computes the same function.
/// Returns non-zero on a mismatch.
///
/// Shapes: d_model 512, 8 signal and 2 noise heads (G = 4, as Motif-2-12.7B's 32/8), 2 K/V pairs
/// (Motif: 8), half-head dim d = 32 (values and outputs 2d = 64; Motif: 128), layer 5, interleaved
/// RoPE, bottom-right causal. Random weights (nn.Linear init scale, λ vectors N(0, 0.1²) as the
/// DIFF reference, RMSNorm gain 1).
#if __has_include(<Eigen/Dense>)

#include <headwise/model/diff.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

namespace {

namespace hm = headwise::model;

hm::matrix random_matrix(std::int64_t rows, std::int64_t cols, std::mt19937& rng, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  hm::matrix m(rows, cols);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

hm::weight_vector random_vector(std::int64_t n, std::mt19937& rng, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  hm::weight_vector v(n);
  for (std::int64_t i = 0; i < n; ++i) v(i) = normal(rng);
  return v;
}

/// max |a − b| / max |b|.
double rel_diff(const hm::matrix& a, const hm::matrix& b) {
  const double den = static_cast<double>(b.cwiseAbs().maxCoeff());
  return static_cast<double>((a - b).cwiseAbs().maxCoeff()) / (den > 0 ? den : 1.0);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  hm::gda_config cfg;
  cfg.d_model = 512;
  cfg.heads_signal = 8;
  cfg.heads_noise = 2;
  cfg.kv_pairs = 2;
  cfg.head_dim = 32;
  cfg.layer_index = 5;

  std::mt19937 rng(11);
  const auto fan_in = [](std::int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); };
  const std::int64_t d = cfg.head_dim;
  hm::gda_weights w;
  w.w_q = random_matrix(cfg.query_heads() * d, cfg.d_model, rng, fan_in(cfg.d_model));
  w.w_k = random_matrix(2 * cfg.kv_pairs * d, cfg.d_model, rng, fan_in(cfg.d_model));
  w.w_v = random_matrix(cfg.kv_pairs * 2 * d, cfg.d_model, rng, fan_in(cfg.d_model));
  w.w_o = random_matrix(cfg.d_model, cfg.heads_signal * 2 * d, rng, fan_in(cfg.heads_signal * 2 * d));
  w.lambda_q1 = random_vector(d, rng, 0.1f);
  w.lambda_k1 = random_vector(d, rng, 0.1f);
  w.lambda_q2 = random_vector(d, rng, 0.1f);
  w.lambda_k2 = random_vector(d, rng, 0.1f);
  w.norm_weight = hm::weight_vector::Ones(2 * d);
  w.check(cfg);

  // One thread for headwise and Eigen: the products are small, and the timings are then per core.
  constexpr int threads = 1;
  Eigen::setNbThreads(threads);
  constexpr std::int64_t prompt = 256;
  const hm::matrix x = random_matrix(prompt, cfg.d_model, rng, 1.0f);

  std::printf("GDA layer: d_model %d, %d signal + %d noise heads (G = %d), %d K/V pairs, d = %d (V %d)\n",
              static_cast<int>(cfg.d_model), static_cast<int>(cfg.heads_signal),
              static_cast<int>(cfg.heads_noise), static_cast<int>(cfg.group()),
              static_cast<int>(cfg.kv_pairs), static_cast<int>(d), static_cast<int>(2 * d));
  std::printf(
      "layer %d: lambda_init %.5f, lambda %.5f; %d attention maps per token (DIFF with %d heads: %d)\n",
      static_cast<int>(cfg.layer_index), cfg.lambda_init(), w.lambda(cfg),
      static_cast<int>(cfg.query_heads()), static_cast<int>(cfg.heads_signal),
      static_cast<int>(2 * cfg.heads_signal));

  // Prefill: fused kernel vs the unfused two-call form (best of 3 runs each).
  hm::matrix fused, unfused;
  double fused_ms = 1e30, unfused_ms = 1e30;
  for (int run = 0; run < 3; ++run) {
    auto t0 = std::chrono::steady_clock::now();
    fused = hm::gda_forward(cfg, w, x, 0, threads);
    fused_ms = std::min(fused_ms, ms_since(t0));
    t0 = std::chrono::steady_clock::now();
    unfused = hm::gda_forward_unfused(cfg, w, x, 0, threads);
    unfused_ms = std::min(unfused_ms, ms_since(t0));
  }
  const double e_unfused = rel_diff(fused, unfused);
  std::printf(
      "prefill %d tokens: fused %.2f ms, unfused (2 attention calls + combine) %.2f ms "
      "(best of 3, projections included)\n",
      static_cast<int>(prompt), fused_ms, unfused_ms);
  std::printf("  fused vs unfused: max rel diff %.3g, max abs diff %.3g (limit 1e-4 rel)\n", e_unfused,
              static_cast<double>((fused - unfused).cwiseAbs().maxCoeff()));

  // Decode: the prompt minus its last token into a cache, then that token alone.
  hm::gda_cache<float> cache(cfg, prompt);
  (void)hm::gda_forward(cfg, w, x.topRows(prompt - 1), cache, threads);
  const hm::matrix last = hm::gda_forward(cfg, w, x.bottomRows(1), cache, threads);
  const double e_decode = rel_diff(last, fused.bottomRows(1));
  std::printf("decode token %d against the %d-token cache: max rel diff to the prefill row %.3g\n",
              static_cast<int>(prompt - 1), static_cast<int>(prompt - 1), e_decode);

  // Group-differentiated growth: 8 -> 16 signal heads (G 4 -> 8), noise heads and K/V unchanged.
  const hm::gda_parameters grown = hm::grow_signal_heads(cfg, w, 2);
  const hm::gda_parameters skewed = hm::grow_signal_heads(cfg, w, 2, {0.7, 0.3});
  const hm::matrix out_grown = hm::gda_forward(grown.config, grown.weights, x, 0, threads);
  const hm::matrix out_skewed = hm::gda_forward(skewed.config, skewed.weights, x, 0, threads);
  const double e_grown = rel_diff(out_grown, fused), e_skewed = rel_diff(out_skewed, fused);
  std::printf(
      "grown x2: %d signal heads (G = %d); output vs original: max rel diff %.3g (uniform split), "
      "%.3g (split 0.7/0.3)\n",
      static_cast<int>(grown.config.heads_signal), static_cast<int>(grown.config.group()), e_grown, e_skewed);

  const bool ok = e_unfused < 1e-4 && e_decode < 1e-4 && e_grown < 1e-4 && e_skewed < 1e-4 &&
                  grown.config.group() == 2 * cfg.group() && cache.length() == prompt;
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}

#else

#include <cstdio>

int main() {
  std::printf("gda_layer: skipped (needs Eigen 3.4 and headwise::model)\n");
  return 0;
}

#endif
