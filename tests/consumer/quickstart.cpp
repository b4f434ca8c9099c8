// quickstart.cpp: causal GQA attention over a prompt with headwise. This exact file is the
// README's quick start; ctest builds it against an installed headwise (find_package), through
// add_subdirectory and through pkg-config.
#include <headwise/headwise.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int batch = 1, seq = 256, heads_q = 8, heads_kv = 2, dim = 64;  // GQA: 4 query heads per KV head
  std::vector<float> q(batch * seq * heads_q * dim), k(batch * seq * heads_kv * dim), v(k.size());
  std::vector<float> out(q.size()), lse(batch * heads_q * seq);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * static_cast<float>(i));
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.11f * static_cast<float>(i));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.05f * static_cast<float>(i));

  headwise::attention_options options;
  options.causal = headwise::causal_mode::bottom_right;  // query i sees keys 0..i
  headwise::attention(headwise::bshd<const float>(q.data(), batch, seq, heads_q, dim),
                      headwise::bshd<const float>(k.data(), batch, seq, heads_kv, dim),
                      headwise::bshd<const float>(v.data(), batch, seq, heads_kv, dim),
                      headwise::bshd(out.data(), batch, seq, heads_q, dim), options,
                      headwise::bhs(lse.data(), batch, heads_q, seq));

  // The first token sees only key 0, so its output is exactly V[0] of its KV head (h / 4).
  float err = 0.0f;
  for (int h = 0; h < heads_q; ++h)
    for (int d = 0; d < dim; ++d) err = std::fmax(err, std::fabs(out[h * dim + d] - v[(h / 4) * dim + d]));
  std::printf("out[0][0][0] = %.6f, lse[0][0][%d] = %.4f, first-token error %.2g\n", out[0], seq - 1,
              lse[seq - 1], err);
  return err < 1e-6f ? 0 : 1;
}
