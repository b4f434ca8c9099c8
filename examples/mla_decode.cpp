/// @file
/// @brief MLA (DeepSeek-V2-Lite-shaped, small dims) generation loop over a bf16 latent cache:
/// prefill a prompt, then generate token by token with the absorbed kernel
/// (headwise::mla_absorbed via headwise::model::mla_layer), checking every step against the
/// naive (decompressed K/V) form on the same stored latent. Returns non-zero on a mismatch.
///
/// Shapes: 4 heads, d_model 128, no query compression (as V2-Lite), kv_lora_rank d_c = 64,
/// qk_nope 32, qk_rope 16, v_head 32 (V2-Lite: 16 heads, 2048, 512, 128/64/128), YaRN factor 40
/// with mscale 0.707 over 4096 positions and max_seq_len 163840, so the softmax scale is
/// (qk_nope+qk_rope)^-0.5 · mscale² as in the DeepSeek reference. The cache holds d_c + qk_rope
/// = 80 bf16 values per token; the naive form would cache heads·(48 + 32) f32 values.
/// The "model" is just this one layer with random weights: the next token's hidden state is the
/// layer output, RMS-normalised (a stand-in for sampling and embedding).
#if __has_include(<Eigen/Dense>)

#include <headwise/model/mla.hpp>

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

/// max |a − b| / max |b|.
double rel_diff(const hm::matrix& a, const hm::matrix& b) {
  const double den = static_cast<double>(b.cwiseAbs().maxCoeff());
  return static_cast<double>((a - b).cwiseAbs().maxCoeff()) / (den > 0 ? den : 1.0);
}

}  // namespace

int main() {
  // DeepSeek-V2-Lite's layout (no q compression, YaRN 40 with mscale 0.707), scaled down.
  hm::mla_config cfg = hm::mla_config::deepseek_v2_lite();
  cfg.heads = 4;
  cfg.d_model = 128;
  cfg.kv_lora_rank = 64;
  cfg.qk_nope = 32;
  cfg.qk_rope = 16;
  cfg.v_head = 32;
  cfg.pairing = hm::rope_pairing::interleaved;

  std::mt19937 rng(7);
  const auto fan_in = [](std::int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); };
  hm::mla_weights w;
  w.w_q = random_matrix(cfg.heads * cfg.qk_head_dim(), cfg.d_model, rng, fan_in(cfg.d_model));
  w.w_kv_a = random_matrix(cfg.latent_dim(), cfg.d_model, rng, fan_in(cfg.d_model));
  w.kv_norm = hm::weight_vector::Ones(cfg.kv_lora_rank);
  w.w_kv_b = random_matrix(cfg.heads * (cfg.qk_nope + cfg.v_head), cfg.kv_lora_rank, rng, fan_in(cfg.kv_lora_rank));
  w.w_o = random_matrix(cfg.d_model, cfg.heads * cfg.v_head, rng, fan_in(cfg.heads * cfg.v_head));
  const hm::mla_layer layer(cfg, w);

  constexpr std::int64_t prompt = 32, generate = 48;
  hm::latent_cache<headwise::bf16> cache(cfg.latent_dim(), prompt + generate);  // absorbed form
  hm::latent_cache<headwise::bf16> check(cfg.latent_dim(), prompt + generate);  // naive form
  hm::latent_cache<float> f32(cfg.latent_dim(), prompt + generate);             // f32, for scale

  // One thread, for headwise and for Eigen's GEMMs (which go parallel under OpenMP past ~50k
  // multiply-adds): the products here are tiny, and an OpenMP fork/join on a loaded machine can
  // cost a whole scheduler time slice.
  constexpr int threads = 1;
  Eigen::setNbThreads(threads);
  double worst = 0, worst_f32 = 0;
  const auto step = [&](const hm::matrix& x) {
    const hm::matrix out = layer.forward(x, cache, hm::mla_form::absorbed, threads);
    const hm::matrix naive = layer.forward(x, check, hm::mla_form::naive, threads);
    const hm::matrix ref32 = layer.forward(x, f32, hm::mla_form::absorbed, threads);
    worst = std::max(worst, rel_diff(out, naive));
    worst_f32 = std::max(worst_f32, rel_diff(out, ref32));
    return out;
  };

  const auto t0 = std::chrono::steady_clock::now();
  hm::matrix out = step(random_matrix(prompt, cfg.d_model, rng, 1.0f));  // prefill
  for (std::int64_t t = 0; t < generate; ++t) {
    const hm::matrix last = out.bottomRows(1);
    const float rms = std::sqrt(last.squaredNorm() / static_cast<float>(cfg.d_model));
    out = step(last / (rms > 0 ? rms : 1.0f));  // one new token at position prompt + t
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  std::printf("MLA decode: %d heads, d_c %d + rope %d (%zu bytes/token bf16 latent), scale %.7f\n",
              static_cast<int>(cfg.heads), static_cast<int>(cfg.kv_lora_rank), static_cast<int>(cfg.qk_rope),
              static_cast<std::size_t>(cfg.latent_dim()) * sizeof(headwise::bf16), static_cast<double>(cfg.softmax_scale()));
  std::printf("prefill %d + %d generated tokens (cache length %d), %.1f ms for all three forms\n",
              static_cast<int>(prompt), static_cast<int>(generate), static_cast<int>(cache.length()), ms);
  std::printf("absorbed vs naive on the same bf16 latent: max rel error %.3g (limit 1e-4)\n", worst);
  std::printf("bf16 latent vs f32 latent (information):  max rel error %.3g\n", worst_f32);
  const bool ok = worst < 1e-4 && cache.length() == prompt + generate && std::isfinite(worst_f32) && worst_f32 < 5e-2;
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}

#else

#include <cstdio>

int main() {
  std::printf("mla_decode: skipped (needs Eigen 3.4 and headwise::model)\n");
  return 0;
}

#endif
