/// @file
/// @brief Multi-head latent attention (DeepSeek-V2/V3 MLA), absorbed form: MQA over the latent
/// cache with dim_qk = d_c + d_rope, dim_v = d_c and V a prefix view of K. The weight-side steps
/// (absorption, RoPE, the expanded "naive" K/V, TransMLA conversion) live in headwise/model/.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>

#include "attention.hpp"
#include "kv_cache.hpp"

namespace headwise {

namespace detail {

/// The latent rows as the engine's K (all d_c + d_rope values) and V (the first d_c values):
/// one KV head, V aliasing K.
template <class T, std::size_t R>
std::pair<tensor_view<const T, R + 1>, tensor_view<const T, R + 1>> latent_as_kv(tensor_view<const T, R> latent,
                                                                                  std::int64_t d_c) {
  tensor_view<const T, R + 1> k;
  k.data = latent.data;
  for (std::size_t i = 0; i + 1 < R; ++i) {
    k.shape[i] = latent.shape[i];
    k.stride[i] = latent.stride[i];
  }
  k.shape[R - 1] = 1;  // heads_kv
  k.stride[R - 1] = latent.shape[R - 1];
  k.shape[R] = latent.shape[R - 1];
  k.stride[R] = latent.stride[R - 1];
  tensor_view<const T, R + 1> v = k;
  v.shape[R] = d_c;
  return {k, v};
}

/// The MLA-specific checks: an explicit scale, d_c in [1, dim_qk], the latent width.
inline void check_mla(const checker& c, const attention_options& opt, std::int64_t dim_qk, std::int64_t latent_dim,
                      const std::string& latent_arg, std::int64_t d_c, const std::string& out_arg) {
  c.require(opt.scale.has_value(), "options.scale",
            "an explicit softmax scale for MLA: (qk_nope + qk_rope)^-0.5 times YaRN's mscale^2, e.g. "
            "headwise::model::mla_softmax_scale(qk_nope, qk_rope, yarn, max_seq_len) (1/sqrt(d_c + d_rope) would be "
            "wrong)",
            "none");
  c.equal(latent_dim, dim_qk, latent_arg + " (d_c + d_rope)", "the queries' dim_qk");
  c.require(d_c >= 1 && d_c <= dim_qk, out_arg + " (d_c)",
            "1..dim_qk = " + to_text(dim_qk) + " (V is the first d_c values of each latent row)", d_c);
}

/// The prologue both entry points share: q and out views, the MLA checks against the latent
/// (named `name`, axes `axes`), and the latent as the engine's K and V views.
template <class KV>
std::pair<tensor_view<const KV, 4>, tensor_view<const KV, 4>> check_mla_call(
    const checker& c, tensor_view<const float, 4> q, tensor_view<const KV, 3> lat, const std::string& name,
    const std::array<std::int64_t, 3>& min_extent, const std::array<const char*, 3>& axes,
    tensor_view<float, 4> out, const attention_options& opt) {
  c.view(q, "q", {1, 0, 1, 1}, {"batch", "seq_q", "heads", "dim_qk"});
  c.view(lat, name, min_extent, axes);
  c.view(out, "out", {1, 0, 1, 1}, {"batch", "seq_q", "heads", "d_c"});
  check_mla(c, opt, q.shape[3], lat.shape[2], name + ".shape[2]", out.shape[3], "out.shape[3]");
  return latent_as_kv<KV, 3>(lat, out.shape[3]);
}

}  // namespace detail

/// Absorbed MLA attention (DeepSeek's attn_impl="absorb"), for decode and chunked prefill:
///   out[b,i,h] = Σ_j softmax_j(scale·q[b,i,h]·latent[b,j]) latent[b,j,:d_c]
/// q: (batch, seq_q, heads, d_c + d_rope) f32, the absorbed queries [W_UKᵀ q_nope ; q_rope];
/// latent: (batch, seq_kv, d_c + d_rope) in f32, bf16 or f16, rows [c ; RoPE(k_rope)];
/// out: (batch, seq_q, heads, d_c) f32 (multiply by W_UV per head for the head outputs);
/// lse (optional): (batch, heads, seq_q). options.scale is required (see check_mla); causal
/// (use bottom_right for a cache), windows, sinks and softcap work as in attention().
template <class T>
void mla_absorbed(tensor_view<const float, 4> q, tensor_view<T, 3> latent, tensor_view<float, 4> out,
                  const attention_options& options, tensor_view<float, 3> lse = {}) {
  using KV = detail::kv_storage_t<T>;
  static_assert(is_kv_dtype_v<KV>, "headwise: the latent cache must be float, headwise::bf16 or headwise::f16");
  const detail::checker c("headwise::mla_absorbed");
  const tensor_view<const KV, 3> lat(latent);
  const auto [k, v] = detail::check_mla_call<KV>(c, q, lat, "latent", {1, 0, 1}, {"batch", "seq_kv", "d_c + d_rope"},
                                                 out, options);
  c.equal(lat.shape[0], q.shape[0], "latent.shape[0] (batch)", "q.shape[0]");
  c.require(lat.shape[1] <= detail::max_seq_kv, "latent.shape[1] (seq_kv)", "<= 2^40 keys", lat.shape[1]);
  // Outputs against the latent under its own name (check_attention sees it as k and v).
  c.no_alias(out, "out", lat, "latent");
  if (!lse.absent()) {
    c.view(lse, "lse", {1, 1, 0}, {"batch", "heads_out", "seq_q"});
    c.no_alias(lse, "lse", lat, "latent");
  }
  // The rest (heads, LSE, options, aliasing) as for any MQA call, the latent named k/v.
  const auto pb = detail::check_attention<KV>(c, q, k, v, out, options, lse);
  detail::run_attention<tile::default_arch>(pb, options, default_blocking());
}

/// Absorbed MLA over a paged latent cache: latent_pages (num_pages, page_size, d_c + d_rope),
/// token j of sequence b in row j % page_size of page block_table[b][j / page_size], seqlens[b]
/// tokens per sequence (ragged caches). q, out, lse as in mla_absorbed(); use
/// causal_mode::bottom_right for chunked prefill so the queries are each sequence's newest tokens.
template <class T>
void mla_absorbed_paged(tensor_view<const float, 4> q, tensor_view<T, 3> latent_pages,
                        tensor_view<const std::int32_t, 2> block_table, tensor_view<const std::int32_t, 1> seqlens,
                        tensor_view<float, 4> out, const attention_options& options,
                        tensor_view<float, 3> lse = {}) {
  using KV = detail::kv_storage_t<T>;
  static_assert(is_kv_dtype_v<KV>, "headwise: the latent cache must be float, headwise::bf16 or headwise::f16");
  const detail::checker c("headwise::mla_absorbed_paged");
  const tensor_view<const KV, 3> lat(latent_pages);
  const auto [k, v] = detail::check_mla_call<KV>(c, q, lat, "latent_pages", {1, 1, 1},
                                                 {"num_pages", "page_size", "d_c + d_rope"}, out, options);
  // Outputs against the latent under its own name (the paged checks below see it as k/v_pages).
  c.no_alias(out, "out", lat, "latent_pages");
  if (!lse.absent()) {
    c.view(lse, "lse", {1, 1, 0}, {"batch", "heads_out", "seq_q"});
    c.no_alias(lse, "lse", lat, "latent_pages");
  }
  const paged_kv<KV> kv{k, v, block_table, seqlens};
  // Block table, lengths, heads and LSE as for any paged MQA call, under this function's names.
  detail::attention_paged_checked<KV>(c, q, kv, out, options, lse, "");
}

}  // namespace headwise
