/// @file
/// @brief Token-by-token generation with a growing paged bf16 KV cache: chunked prefill of a
/// prompt, then decode steps, each appending its K/V through the block table and attending
/// with headwise::attention_paged. Checked against the fp64 reference on the same bf16 cache.
///
/// Shapes: GQA 16 query heads / 4 KV heads, head dim 64, pages of 16 tokens scattered in a
/// pool (as a serving engine's allocator hands them out), a batch of 2 sequences with prompts
/// of different lengths. Q/K/V come from a deterministic stand-in for the model's projections.
#include <headwise/headwise.hpp>
#include <headwise/reference/attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

namespace {

constexpr int heads_q = 16, heads_kv = 4, dim = 64, page_size = 16, max_pages = 32, batch = 2;

/// Stand-in for the projections of token t of sequence b: deterministic values in [-1, 1].
float feature(int b, int t, int h, int d, int which) {
  return std::sin(0.37f * static_cast<float>(t + 1) + 0.11f * static_cast<float>(h * dim + d) +
                  1.7f * static_cast<float>(b) + 2.3f * static_cast<float>(which));
}

}  // namespace

int main() {
  using headwise::bf16;
  using headwise::tensor_view;
  const int pool_pages = batch * max_pages;
  std::vector<bf16> k_pages(static_cast<std::size_t>(pool_pages) * page_size * heads_kv * dim);
  std::vector<bf16> v_pages(k_pages.size());
  // Each sequence owns max_pages pages of the pool, in a shuffled order.
  std::vector<std::int32_t> table(static_cast<std::size_t>(pool_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));
  std::vector<std::int32_t> seqlens(batch, 0);

  const tensor_view<bf16, 4> k_pool(k_pages.data(), {pool_pages, page_size, heads_kv, dim});
  const tensor_view<bf16, 4> v_pool(v_pages.data(), {pool_pages, page_size, heads_kv, dim});
  const tensor_view<const std::int32_t, 2> block_table(table.data(), {batch, max_pages});
  const tensor_view<const std::int32_t, 1> lens(seqlens.data(), {batch});

  headwise::attention_options options;
  options.causal = headwise::causal_mode::bottom_right;  // the new tokens are the newest keys

  // One step: n new tokens for every sequence, starting at position seqlens[b].
  double worst = 0.0;
  int checked = 0;
  auto step = [&](int n) {
    std::vector<float> q(static_cast<std::size_t>(batch) * n * heads_q * dim), k_new(static_cast<std::size_t>(batch) * n * heads_kv * dim);
    std::vector<float> v_new(k_new.size()), out(q.size());
    for (int b = 0; b < batch; ++b)
      for (int t = 0; t < n; ++t) {
        const int pos = seqlens[static_cast<std::size_t>(b)] + t;
        for (int h = 0; h < heads_q; ++h)
          for (int d = 0; d < dim; ++d) q[((static_cast<std::size_t>(b) * n + t) * heads_q + h) * dim + d] = feature(b, pos, h, d, 0);
        for (int h = 0; h < heads_kv; ++h)
          for (int d = 0; d < dim; ++d) {
            k_new[((static_cast<std::size_t>(b) * n + t) * heads_kv + h) * dim + d] = feature(b, pos, h, d, 1);
            v_new[((static_cast<std::size_t>(b) * n + t) * heads_kv + h) * dim + d] = feature(b, pos, h, d, 2);
          }
      }
    // Append this step's K/V (f32 -> bf16, round-to-nearest-even), then advance the lengths.
    headwise::paged_kv_append(k_pool, v_pool, block_table, lens, headwise::bshd<const float>(k_new.data(), batch, n, heads_kv, dim),
                              headwise::bshd<const float>(v_new.data(), batch, n, heads_kv, dim));
    for (auto& l : seqlens) l += n;
    const headwise::paged_kv<bf16> kv{k_pool, v_pool, block_table, lens};
    headwise::attention_paged(headwise::bshd<const float>(q.data(), batch, n, heads_q, dim), kv,
                              headwise::bshd(out.data(), batch, n, heads_q, dim), options);

    // Check: the same bf16 tokens gathered into a contiguous cache, through the fp64 reference.
    for (int b = 0; b < batch; ++b) {
      const int len = seqlens[static_cast<std::size_t>(b)];
      std::vector<bf16> kc(static_cast<std::size_t>(len) * heads_kv * dim), vc(kc.size());
      for (int j = 0; j < len; ++j)
        for (int h = 0; h < heads_kv; ++h)
          for (int d = 0; d < dim; ++d) {
            const int page = table[static_cast<std::size_t>(b * max_pages + j / page_size)];
            kc[(static_cast<std::size_t>(j) * heads_kv + h) * dim + d] = k_pool(page, j % page_size, h, d);
            vc[(static_cast<std::size_t>(j) * heads_kv + h) * dim + d] = v_pool(page, j % page_size, h, d);
          }
      std::vector<float> ref(static_cast<std::size_t>(n) * heads_q * dim);
      headwise::reference::attention(headwise::bshd<const float>(&q[static_cast<std::size_t>(b) * n * heads_q * dim], 1, n, heads_q, dim),
                                     headwise::bshd<const bf16>(kc.data(), 1, len, heads_kv, dim),
                                     headwise::bshd<const bf16>(vc.data(), 1, len, heads_kv, dim),
                                     headwise::bshd(ref.data(), 1, n, heads_q, dim), options);
      for (std::size_t i = 0; i < ref.size(); ++i)
        worst = std::max(worst, static_cast<double>(std::fabs(out[static_cast<std::size_t>(b) * n * heads_q * dim + i] - ref[i])));
      ++checked;
    }
  };

  step(100);                          // chunked prefill: two chunks of the prompt
  step(60);
  for (int t = 0; t < 40; ++t) step(1);  // generation: one token per step
  std::printf("paged bf16 KV cache: %d sequences, %d tokens each, %d pages of %d; %d checks, max |out - fp64 reference| = %.3g\n",
              batch, seqlens[0], (seqlens[0] + page_size - 1) / page_size, page_size, checked, worst);
  return worst < 1e-5 ? 0 : 1;
}
