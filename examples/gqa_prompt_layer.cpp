/// @file
/// @brief A small GQA self-attention layer over a prompt: projections, RoPE, causal attention
/// with headwise, output projection; checked against the fp64 reference and timed.
///
/// Shapes (Llama-style GQA): d_model 512, 8 query heads, 2 KV heads, head dim 64, a prompt of
/// 300 tokens. Projections are plain loops to keep the example dependency-free; in a real
/// model they are your GEMMs. The KV heads are written straight into a [batch, seq, heads, dim]
/// buffer, the layout a KV cache grows in.
#include <headwise/headwise.hpp>
#include <headwise/reference/attention.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr int d_model = 512, heads_q = 8, heads_kv = 2, head_dim = 64, seq = 300;

/// y[t][o] = Σ_i x[t][i] · w[i][o]   (x: seq x in, w: in x out, y: seq x out)
std::vector<float> project(const std::vector<float>& x, const std::vector<float>& w, int in, int out) {
  std::vector<float> y(static_cast<std::size_t>(seq) * out, 0.0f);
  for (int t = 0; t < seq; ++t)
    for (int i = 0; i < in; ++i) {
      const float xi = x[static_cast<std::size_t>(t) * in + i];
      for (int o = 0; o < out; ++o) y[static_cast<std::size_t>(t) * out + o] += xi * w[static_cast<std::size_t>(i) * out + o];
    }
  return y;
}

/// Rotary embedding, half-split pairing (i, i + dim/2) as HF Llama, theta 10000, in place on
/// a (seq, heads, dim) buffer.
void rope(std::vector<float>& x, int heads) {
  for (int t = 0; t < seq; ++t)
    for (int h = 0; h < heads; ++h) {
      float* row = &x[(static_cast<std::size_t>(t) * heads + h) * head_dim];
      for (int i = 0; i < head_dim / 2; ++i) {
        const double freq = std::pow(10000.0, -2.0 * i / head_dim);
        const auto c = static_cast<float>(std::cos(t * freq)), s = static_cast<float>(std::sin(t * freq));
        const float a = row[i], b = row[i + head_dim / 2];
        row[i] = a * c - b * s;
        row[i + head_dim / 2] = a * s + b * c;
      }
    }
}

}  // namespace

int main() {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& e : v) e = normal(rng) * scale;
    return v;
  };
  const float w_scale = 1.0f / std::sqrt(static_cast<float>(d_model));
  const auto hidden = random(static_cast<std::size_t>(seq) * d_model, 1.0f);
  const auto w_q = random(static_cast<std::size_t>(d_model) * heads_q * head_dim, w_scale);
  const auto w_k = random(static_cast<std::size_t>(d_model) * heads_kv * head_dim, w_scale);
  const auto w_v = random(static_cast<std::size_t>(d_model) * heads_kv * head_dim, w_scale);
  const auto w_o = random(static_cast<std::size_t>(heads_q) * head_dim * d_model, w_scale);

  // Q, K, V in [seq, heads, dim] (batch 1), RoPE on Q and K.
  auto q = project(hidden, w_q, d_model, heads_q * head_dim);
  auto k = project(hidden, w_k, d_model, heads_kv * head_dim);
  const auto v = project(hidden, w_v, d_model, heads_kv * head_dim);
  rope(q, heads_q);
  rope(k, heads_kv);

  // Causal GQA attention: bottom-right alignment, the one a KV cache needs.
  std::vector<float> attn(static_cast<std::size_t>(seq) * heads_q * head_dim), lse(static_cast<std::size_t>(heads_q) * seq);
  headwise::attention_options options;
  options.causal = headwise::causal_mode::bottom_right;
  const auto q_view = headwise::bshd<const float>(q.data(), 1, seq, heads_q, head_dim);
  const auto k_view = headwise::bshd<const float>(k.data(), 1, seq, heads_kv, head_dim);
  const auto v_view = headwise::bshd<const float>(v.data(), 1, seq, heads_kv, head_dim);
  const auto t0 = std::chrono::steady_clock::now();
  headwise::attention(q_view, k_view, v_view, headwise::bshd(attn.data(), 1, seq, heads_q, head_dim), options,
                      headwise::bhs(lse.data(), 1, heads_q, seq));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Output projection.
  const auto y = project(attn, w_o, heads_q * head_dim, d_model);

  // Check the attention against the fp64 reference.
  std::vector<float> ref(attn.size()), ref_lse(lse.size());
  headwise::reference::attention(q_view, k_view, v_view, headwise::bshd(ref.data(), 1, seq, heads_q, head_dim),
                                 options, headwise::bhs(ref_lse.data(), 1, heads_q, seq));
  double err = 0, lse_err = 0;
  for (std::size_t i = 0; i < attn.size(); ++i) err = std::fmax(err, std::fabs(attn[i] - ref[i]));
  for (std::size_t i = 0; i < lse.size(); ++i) lse_err = std::fmax(lse_err, std::fabs(lse[i] - ref_lse[i]));

  const double pairs = seq * (seq + 1) / 2.0;
  const double flops = 2.0 * heads_q * pairs * (2 * head_dim);
  std::printf("GQA layer: seq %d, heads %d/%d, dim %d; attention %.3f ms (%.1f GFLOP/s)\n", seq, heads_q, heads_kv,
              head_dim, secs * 1e3, flops / secs * 1e-9);
  std::printf("y[0][0..3] = %.5f %.5f %.5f %.5f\n", y[0], y[1], y[2], y[3]);
  std::printf("max |attention - fp64 reference| = %.3g, max |lse - reference| = %.3g\n", err, lse_err);
  return err < 1e-4 && lse_err < 1e-4 ? 0 : 1;
}
