/// @file
/// @brief KV caches: the paged-cache description, attention over ragged (varlen) and paged
/// batches, and helpers that append tokens to a cache in f32, bf16 or f16.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "attention.hpp"

namespace headwise {

/// A paged KV cache (vLLM, FlashAttention's block_table): pages of page_size tokens. Token j
/// of sequence b lives in row j % page_size of page block_table[b][j / page_size].
template <class T>
struct paged_kv {
  tensor_view<const T, 4> k_pages;             ///< (num_pages, page_size, heads_kv, dim_qk)
  tensor_view<const T, 4> v_pages;             ///< (num_pages, page_size, heads_kv, dim_v)
  tensor_view<const std::int32_t, 2> block_table;  ///< (batch, max_pages_per_sequence)
  tensor_view<const std::int32_t, 1> seqlens;  ///< (batch): tokens in each sequence's cache
};

namespace detail {

/// cu_seqlens: length batch+1, starts at 0, non-decreasing, ends at `total`.
inline void check_cu_seqlens(const checker& c, tensor_view<const std::int32_t, 1> cu, const std::string& name,
                             std::int64_t total, const std::string& total_name) {
  c.view(cu, name, {1}, {"batch + 1"});
  c.require(cu(0) == 0, name + "[0]", "0", cu(0));
  for (std::int64_t i = 1; i < cu.shape[0]; ++i)
    if (cu(i) < cu(i - 1))
      c.fail(name + "[" + to_text(i) + "]", "a non-decreasing sequence (>= " + to_text(cu(i - 1)) + ")",
             to_text(cu(i)));
  if (cu(cu.shape[0] - 1) != total)
    c.fail(name + "[" + to_text(cu.shape[0] - 1) + "]", total_name + " = " + to_text(total),
           to_text(cu(cu.shape[0] - 1)));
}

/// Paged cache: shapes, page size >= 1, block-table entries in range for every page a sequence
/// uses, sequence lengths within the pages the block table can address. Returns (heads_kv, dim_v).
template <class T>
std::pair<std::int64_t, std::int64_t> check_paged(const checker& c, const paged_kv<T>& kv, std::int64_t batch,
                                                  std::int64_t dim_qk, const std::string& pre = "kv.",
                                                  const std::string& dim_from = "q's dim_qk") {
  static_assert(is_kv_dtype_v<T>, "headwise: K/V storage must be float, headwise::bf16 or headwise::f16");
  c.view(kv.k_pages, pre + "k_pages", {1, 1, 1, 1}, {"num_pages", "page_size", "heads_kv", "dim_qk"});
  c.view(kv.v_pages, pre + "v_pages", {1, 1, 1, 1}, {"num_pages", "page_size", "heads_kv", "dim_v"});
  const std::int64_t pages = kv.k_pages.shape[0], page_size = kv.k_pages.shape[1];
  c.equal(kv.v_pages.shape[0], pages, pre + "v_pages.shape[0] (num_pages)", pre + "k_pages.shape[0]");
  c.equal(kv.v_pages.shape[1], page_size, pre + "v_pages.shape[1] (page_size)", pre + "k_pages.shape[1]");
  c.equal(kv.v_pages.shape[2], kv.k_pages.shape[2], pre + "v_pages.shape[2] (heads_kv)", pre + "k_pages.shape[2]");
  c.equal(kv.k_pages.shape[3], dim_qk, pre + "k_pages.shape[3] (dim_qk)", dim_from);
  c.view(kv.block_table, pre + "block_table", {batch, 0}, {"batch", "max_pages_per_sequence"});
  c.equal(kv.block_table.shape[0], batch, pre + "block_table.shape[0] (batch)", "the batch size");
  c.view(kv.seqlens, pre + "seqlens", {batch}, {"batch"});
  c.equal(kv.seqlens.shape[0], batch, pre + "seqlens.shape[0] (batch)", "the batch size");
  // max_pages_per_sequence·page_size saturates (zero-stride pages may declare huge page sizes).
  const std::int64_t capacity = kv.block_table.shape[1] > std::numeric_limits<std::int64_t>::max() / page_size
                                    ? std::numeric_limits<std::int64_t>::max()
                                    : kv.block_table.shape[1] * page_size;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t len = kv.seqlens(b);
    if (len < 0 || len > capacity)
      c.fail(pre + "seqlens[" + to_text(b) + "]", "0..max_pages_per_sequence * page_size = " + to_text(capacity),
             to_text(len));
    // Every entry is checked (a 32k-token cache of 16-token pages has 2048); the message is
    // built only for a bad one.
    for (std::int64_t p = 0; p < len / page_size + (len % page_size != 0); ++p) {  // no overflow
      const std::int64_t e = kv.block_table(b, p);
      if (e < 0 || e >= pages)
        c.fail(pre + "block_table[" + to_text(b) + "][" + to_text(p) + "]",
               "a page index in [0, " + to_text(pages) + ")", to_text(e));
    }
  }
  return {kv.k_pages.shape[2], kv.v_pages.shape[3]};
}

/// Ragged queries and outputs: q (total_q, heads_q, dim_qk), out (total_q, heads_out, dim_v),
/// lse (heads_out, total_q).
inline void check_varlen_q(const checker& c, tensor_view<const float, 3> q, tensor_view<const std::int32_t, 1> cu_q,
                           tensor_view<float, 3> out, tensor_view<float, 2> lse, std::int64_t heads_out,
                           std::int64_t dim_v) {
  c.equal(out.shape[0], q.shape[0], "out.shape[0] (total_q)", "q.shape[0]");
  c.equal(out.shape[1], heads_out, "out.shape[1] (heads_out)", "the head map's output heads");
  c.equal(out.shape[2], dim_v, "out.shape[2] (dim_v)", "v's dim_v");
  check_cu_seqlens(c, cu_q, "cu_seqlens_q", q.shape[0], "q.shape[0] (total_q)");
  if (!lse.absent()) {
    c.view(lse, "lse", {1, 0}, {"heads_out", "total_q"});
    c.equal(lse.shape[0], heads_out, "lse.shape[0] (heads_out)", "out.shape[1]");
    c.equal(lse.shape[1], q.shape[0], "lse.shape[1] (total_q)", "q.shape[0]");
  }
}


}  // namespace detail

/// Attention over a ragged batch (FlashAttention varlen): sequence b owns query rows
/// [cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows [cu_seqlens_k[b], cu_seqlens_k[b+1]).
/// q: (total_q, heads_q, dim_qk); k: (total_k, heads_kv, dim_qk); v: (total_k, heads_kv, dim_v);
/// out: (total_q, heads_out, dim_v); lse: (heads_out, total_q), optional. Causal alignment,
/// windows and sinks apply per sequence (bottom-right: each sequence's queries are its last
/// tokens).
template <class KT, class VT>
void attention_varlen(tensor_view<const float, 3> q, tensor_view<KT, 3> k, tensor_view<VT, 3> v,
                      tensor_view<const std::int32_t, 1> cu_seqlens_q, tensor_view<const std::int32_t, 1> cu_seqlens_k,
                      tensor_view<float, 3> out, const attention_options& options = {},
                      tensor_view<float, 2> lse = {}) {
  using KV = detail::kv_storage_t<KT>;
  static_assert(std::is_same_v<KV, detail::kv_storage_t<VT>>, "headwise: k and v must share a dtype");
  static_assert(is_kv_dtype_v<KV>, "headwise: K/V storage must be float, headwise::bf16 or headwise::f16");
  const detail::checker c("headwise::attention_varlen");
  const tensor_view<const KV, 3> kc(k), vc(v);
  c.view(q, "q", {0, 1, 1}, {"total_q", "heads_q", "dim_qk"});
  c.view(kc, "k", {0, 1, 1}, {"total_k", "heads_kv", "dim_qk"});
  c.view(vc, "v", {0, 1, 1}, {"total_k", "heads_kv", "dim_v"});
  c.view(out, "out", {0, 1, 1}, {"total_q", "heads_out", "dim_v"});
  c.equal(k.shape[2], q.shape[2], "k.shape[2] (dim_qk)", "q.shape[2]");
  c.equal(v.shape[0], k.shape[0], "v.shape[0] (total_k)", "k.shape[0]");
  c.equal(v.shape[1], k.shape[1], "v.shape[1] (heads_kv)", "k.shape[1]");
  const auto heads = detail::check_heads(c, options, q.shape[1], k.shape[1], "k.shape[1] (heads_kv)");
  detail::check_varlen_q(c, q, cu_seqlens_q, out, lse, heads.heads_out, v.shape[2]);
  detail::check_cu_seqlens(c, cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k.shape[0] (total_k)");
  c.equal(cu_seqlens_k.shape[0], cu_seqlens_q.shape[0], "cu_seqlens_k.shape[0] (batch + 1)",
          "cu_seqlens_q.shape[0]");
  detail::check_options(c, options, heads.heads_out);
  detail::check_outputs(c, out, lse, options, std::pair<const char*, decltype(q)>{"q", q},
                        std::pair<const char*, decltype(kc)>{"k", kc}, std::pair<const char*, decltype(vc)>{"v", vc},
                        std::pair<const char*, decltype(cu_seqlens_q)>{"cu_seqlens_q", cu_seqlens_q},
                        std::pair<const char*, decltype(cu_seqlens_k)>{"cu_seqlens_k", cu_seqlens_k});
  engine::problem<engine::varlen_q, engine::varlen_kv<KV>> pb;
  pb.qs = engine::varlen_q{q, out, lse, cu_seqlens_q.data};
  pb.ks = engine::varlen_kv<KV>{kc, vc, cu_seqlens_k.data};
  detail::finish_problem(pb, options, heads, cu_seqlens_q.shape[0] - 1, q.shape[2], v.shape[2]);
  detail::run_attention<tile::default_arch>(pb, options, default_blocking());
}

namespace detail {
/// attention_paged() with the caller's checker (its function name in the messages).
template <class T>
void attention_paged_checked(const checker& c, tensor_view<const float, 4> q, const paged_kv<T>& kv,
                             tensor_view<float, 4> out, const attention_options& options, tensor_view<float, 3> lse,
                             const std::string& pre = "kv.") {
  c.view(q, "q", {1, 0, 1, 1}, {"batch", "seq_q", "heads_q", "dim_qk"});
  c.view(out, "out", {1, 0, 1, 1}, {"batch", "seq_q", "heads_out", "dim_v"});
  const std::int64_t batch = q.shape[0];
  const auto [heads_kv, dim_v] = detail::check_paged(c, kv, batch, q.shape[3], pre);
  const auto heads = detail::check_heads(c, options, q.shape[2], heads_kv, pre + "k_pages.shape[2] (heads_kv)");
  c.equal(out.shape[0], batch, "out.shape[0] (batch)", "q.shape[0]");
  c.equal(out.shape[1], q.shape[1], "out.shape[1] (seq_q)", "q.shape[1]");
  c.equal(out.shape[2], heads.heads_out, "out.shape[2] (heads_out)", "the head map's output heads");
  c.equal(out.shape[3], dim_v, "out.shape[3] (dim_v)", pre + "v_pages.shape[3]");
  if (!lse.absent()) {
    c.view(lse, "lse", {1, 1, 0}, {"batch", "heads_out", "seq_q"});
    c.equal(lse.shape[0], batch, "lse.shape[0] (batch)", "q.shape[0]");
    c.equal(lse.shape[1], heads.heads_out, "lse.shape[1] (heads_out)", "out.shape[2]");
    c.equal(lse.shape[2], q.shape[1], "lse.shape[2] (seq_q)", "q.shape[1]");
  }
  detail::check_options(c, options, heads.heads_out);
  const std::string kp = pre + "k_pages", vp = pre + "v_pages", bt = pre + "block_table", sl = pre + "seqlens";
  detail::check_outputs(c, out, lse, options, std::pair<const char*, decltype(q)>{"q", q},
                        std::pair<const char*, decltype(kv.k_pages)>{kp.c_str(), kv.k_pages},
                        std::pair<const char*, decltype(kv.v_pages)>{vp.c_str(), kv.v_pages},
                        std::pair<const char*, decltype(kv.block_table)>{bt.c_str(), kv.block_table},
                        std::pair<const char*, decltype(kv.seqlens)>{sl.c_str(), kv.seqlens});
  engine::problem<engine::dense_q, engine::paged_kv_source<T>> pb;
  pb.qs = engine::dense_q{q, out, lse};
  pb.ks = engine::paged_kv_source<T>{kv.k_pages, kv.v_pages, kv.block_table, kv.seqlens};
  detail::finish_problem(pb, options, heads, batch, q.shape[3], dim_v);
  detail::run_attention<tile::default_arch>(pb, options, default_blocking());
}
}  // namespace detail

/// Attention of a batch of queries against a paged KV cache (decode, or chunked prefill with
/// equal chunk lengths): q (batch, seq_q, heads_q, dim_qk), out (batch, seq_q, heads_out, dim_v),
/// lse (batch, heads_out, seq_q). Sequence b attends to its kv.seqlens[b] cached tokens; use
/// causal_mode::bottom_right so that the queries are the newest tokens.
template <class T>
void attention_paged(tensor_view<const float, 4> q, const paged_kv<T>& kv, tensor_view<float, 4> out,
                     const attention_options& options = {}, tensor_view<float, 3> lse = {}) {
  detail::attention_paged_checked(detail::checker("headwise::attention_paged"), q, kv, out, options, lse);
}

/// Ragged queries against a paged KV cache (chunked prefill of several sequences at once):
/// sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and its kv.seqlens[b] cached
/// tokens (which include this chunk's tokens). q (total_q, heads_q, dim_qk), out (total_q,
/// heads_out, dim_v), lse (heads_out, total_q).
template <class T>
void attention_paged_varlen(tensor_view<const float, 3> q, tensor_view<const std::int32_t, 1> cu_seqlens_q,
                            const paged_kv<T>& kv, tensor_view<float, 3> out, const attention_options& options = {},
                            tensor_view<float, 2> lse = {}) {
  const detail::checker c("headwise::attention_paged_varlen");
  c.view(q, "q", {0, 1, 1}, {"total_q", "heads_q", "dim_qk"});
  c.view(out, "out", {0, 1, 1}, {"total_q", "heads_out", "dim_v"});
  c.view(cu_seqlens_q, "cu_seqlens_q", {1}, {"batch + 1"});
  const std::int64_t batch = cu_seqlens_q.shape[0] - 1;
  const auto [heads_kv, dim_v] = detail::check_paged(c, kv, batch, q.shape[2]);
  const auto heads = detail::check_heads(c, options, q.shape[1], heads_kv, "kv.k_pages.shape[2] (heads_kv)");
  detail::check_varlen_q(c, q, cu_seqlens_q, out, lse, heads.heads_out, dim_v);
  detail::check_options(c, options, heads.heads_out);
  detail::check_outputs(c, out, lse, options, std::pair<const char*, decltype(q)>{"q", q},
                        std::pair<const char*, decltype(kv.k_pages)>{"kv.k_pages", kv.k_pages},
                        std::pair<const char*, decltype(kv.v_pages)>{"kv.v_pages", kv.v_pages},
                        std::pair<const char*, decltype(kv.block_table)>{"kv.block_table", kv.block_table},
                        std::pair<const char*, decltype(kv.seqlens)>{"kv.seqlens", kv.seqlens},
                        std::pair<const char*, decltype(cu_seqlens_q)>{"cu_seqlens_q", cu_seqlens_q});
  engine::problem<engine::varlen_q, engine::paged_kv_source<T>> pb;
  pb.qs = engine::varlen_q{q, out, lse, cu_seqlens_q.data};
  pb.ks = engine::paged_kv_source<T>{kv.k_pages, kv.v_pages, kv.block_table, kv.seqlens};
  detail::finish_problem(pb, options, heads, batch, q.shape[2], dim_v);
  detail::run_attention<tile::default_arch>(pb, options, default_blocking());
}

/// dst = T(src) elementwise (round-to-nearest-even for bf16 and f16), same shape, any strides
/// with a contiguous last axis: fills a KV cache from f32 values.
template <class T, std::size_t R>
void convert(tensor_view<const float, R> src, tensor_view<T, R> dst) {
  static_assert(is_kv_dtype_v<T>, "headwise::convert: destination must be float, bf16 or f16");
  const detail::checker c("headwise::convert");
  std::array<std::int64_t, R> zero{};
  std::array<const char*, R> names{};
  for (auto& n : names) n = "axis";
  c.view(src, "src", zero, names);
  c.view(dst, "dst", zero, names);
  for (std::size_t i = 0; i < R; ++i)
    c.equal(dst.shape[i], src.shape[i], "dst.shape[" + std::to_string(i) + "]", "src.shape[" + std::to_string(i) + "]");
  c.no_self_overlap(dst, "dst");
  c.no_alias(dst, "dst", src, "src");
  if (src.numel() == 0) return;
  std::array<std::int64_t, R> idx{};
  const std::int64_t inner = src.shape[R - 1];
  for (;;) {
    std::int64_t so = 0, d_o = 0;
    for (std::size_t i = 0; i + 1 < R; ++i) {
      so += idx[i] * src.stride[i];
      d_o += idx[i] * dst.stride[i];
    }
    for (std::int64_t e = 0; e < inner; ++e) dst.data[d_o + e] = from_float<T>(src.data[so + e]);
    std::size_t ax = R - 1;
    while (ax-- > 0) {
      if (++idx[ax] < src.shape[ax]) break;
      idx[ax] = 0;
    }
    if (ax == static_cast<std::size_t>(-1)) return;
  }
}

/// Appends new tokens to a contiguous cache: cache[b, cache_seqlens[b] + t] = T(new[b, t]) for
/// K and V. k_cache/v_cache: (batch, capacity, heads_kv, dim); k_new/v_new: (batch, n, heads_kv,
/// dim) f32. The caller advances cache_seqlens by n afterwards.
template <class T>
void kv_cache_append(tensor_view<T, 4> k_cache, tensor_view<T, 4> v_cache,
                     tensor_view<const std::int32_t, 1> cache_seqlens, tensor_view<const float, 4> k_new,
                     tensor_view<const float, 4> v_new) {
  const detail::checker c("headwise::kv_cache_append");
  c.view(k_cache, "k_cache", {1, 0, 1, 1}, {"batch", "capacity", "heads_kv", "dim_qk"});
  c.view(v_cache, "v_cache", {1, 0, 1, 1}, {"batch", "capacity", "heads_kv", "dim_v"});
  c.view(k_new, "k_new", {1, 0, 1, 1}, {"batch", "n", "heads_kv", "dim_qk"});
  c.view(v_new, "v_new", {1, 0, 1, 1}, {"batch", "n", "heads_kv", "dim_v"});
  const std::int64_t batch = k_cache.shape[0], n = k_new.shape[1];
  c.view(cache_seqlens, "cache_seqlens", {batch}, {"batch"});
  c.equal(cache_seqlens.shape[0], batch, "cache_seqlens.shape[0] (batch)", "k_cache.shape[0]");
  c.equal(v_cache.shape[0], batch, "v_cache.shape[0] (batch)", "k_cache.shape[0]");
  c.equal(v_cache.shape[1], k_cache.shape[1], "v_cache.shape[1] (capacity)", "k_cache.shape[1]");
  c.equal(v_cache.shape[2], k_cache.shape[2], "v_cache.shape[2] (heads_kv)", "k_cache.shape[2]");
  c.equal(k_new.shape[0], batch, "k_new.shape[0] (batch)", "k_cache.shape[0]");
  c.equal(k_new.shape[2], k_cache.shape[2], "k_new.shape[2] (heads_kv)", "k_cache.shape[2]");
  c.equal(k_new.shape[3], k_cache.shape[3], "k_new.shape[3] (dim_qk)", "k_cache.shape[3]");
  c.equal(v_new.shape[0], batch, "v_new.shape[0] (batch)", "k_cache.shape[0]");
  c.equal(v_new.shape[1], n, "v_new.shape[1] (n)", "k_new.shape[1]");
  c.equal(v_new.shape[2], v_cache.shape[2], "v_new.shape[2] (heads_kv)", "v_cache.shape[2]");
  c.equal(v_new.shape[3], v_cache.shape[3], "v_new.shape[3] (dim_v)", "v_cache.shape[3]");
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t pos = cache_seqlens(b);
    if (!(pos >= 0 && pos <= k_cache.shape[1] && n <= k_cache.shape[1] - pos))
      c.fail("cache_seqlens[" + std::to_string(b) + "]",
             "a position with room for " + std::to_string(n) + " tokens in capacity " +
                 std::to_string(k_cache.shape[1]),
             std::to_string(pos));
  }
  // Outputs first: each cache must give every element its own address and overlap no input.
  c.no_self_overlap(k_cache, "k_cache");
  c.no_self_overlap(v_cache, "v_cache");
  c.no_alias(k_cache, "k_cache", v_cache, "v_cache");
  for (const auto& [cache, name] : {std::pair{k_cache, "k_cache"}, std::pair{v_cache, "v_cache"}}) {
    c.no_alias(cache, name, k_new, "k_new");
    c.no_alias(cache, name, v_new, "v_new");
    c.no_alias(cache, name, cache_seqlens, "cache_seqlens");
  }
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t pos = cache_seqlens(b);
    auto slice = [&](auto cache) {
      auto s = cache;
      s.data = &cache(b, pos, 0, 0);
      s.shape = {1, n, cache.shape[2], cache.shape[3]};
      return s;
    };
    auto src = [&](auto t) {
      auto s = t;
      s.data = &t(b, 0, 0, 0);
      s.shape[0] = 1;
      return s;
    };
    if (n == 0) continue;
    convert(src(k_new), slice(k_cache));
    convert(src(v_new), slice(v_cache));
  }
}

/// Appends new tokens to a paged cache: token t of sequence b goes to position
/// seqlens[b] + t through the block table. k_pages/v_pages: (num_pages, page_size, heads_kv,
/// dim); k_new/v_new: (batch, n, heads_kv, dim) f32. The caller advances seqlens by n afterwards.
template <class T>
void paged_kv_append(tensor_view<T, 4> k_pages, tensor_view<T, 4> v_pages,
                     tensor_view<const std::int32_t, 2> block_table, tensor_view<const std::int32_t, 1> seqlens,
                     tensor_view<const float, 4> k_new, tensor_view<const float, 4> v_new) {
  const detail::checker c("headwise::paged_kv_append");
  c.view(k_new, "k_new", {1, 0, 1, 1}, {"batch", "n", "heads_kv", "dim_qk"});
  c.view(v_new, "v_new", {1, 0, 1, 1}, {"batch", "n", "heads_kv", "dim_v"});
  const std::int64_t batch = k_new.shape[0], n = k_new.shape[1];
  const paged_kv<T> kv{k_pages, v_pages, block_table, seqlens};
  c.view(seqlens, "seqlens", {batch}, {"batch"});
  c.equal(seqlens.shape[0], batch, "seqlens.shape[0] (batch)", "k_new.shape[0]");
  // The cache as it is (shapes, block table, current lengths), then room for the new tokens.
  (void)detail::check_paged(c, kv, batch, k_new.shape[3], "", "k_new.shape[3]");
  const std::int64_t page_size = k_pages.shape[1];
  const std::int64_t capacity = block_table.shape[1] > std::numeric_limits<std::int64_t>::max() / page_size
                                    ? std::numeric_limits<std::int64_t>::max()
                                    : block_table.shape[1] * page_size;
  for (std::int64_t b = 0; b < batch; ++b) {
    const bool room = seqlens(b) >= 0 && n <= capacity - seqlens(b);  // no overflow of seqlens + n
    const std::int64_t end = room ? static_cast<std::int64_t>(seqlens(b)) + n : 0;
    if (!room)
      c.fail("seqlens[" + std::to_string(b) + "]",
             "room for " + std::to_string(n) + " more tokens in " + std::to_string(block_table.shape[1]) +
                 " pages of " + std::to_string(page_size),
             std::to_string(seqlens(b)));
    for (std::int64_t p = 0; p < end / page_size + (end % page_size != 0); ++p) {
      const std::int64_t e = block_table(b, p);
      if (e < 0 || e >= k_pages.shape[0])
        c.fail("block_table[" + std::to_string(b) + "][" + std::to_string(p) + "]",
               "a page index in [0, " + std::to_string(k_pages.shape[0]) + ")", std::to_string(e));
    }
  }
  c.equal(k_new.shape[2], k_pages.shape[2], "k_new.shape[2] (heads_kv)", "k_pages.shape[2]");
  c.equal(v_new.shape[0], batch, "v_new.shape[0] (batch)", "k_new.shape[0]");
  c.equal(v_new.shape[1], n, "v_new.shape[1] (n)", "k_new.shape[1]");
  c.equal(v_new.shape[2], v_pages.shape[2], "v_new.shape[2] (heads_kv)", "v_pages.shape[2]");
  c.equal(v_new.shape[3], v_pages.shape[3], "v_new.shape[3] (dim_v)", "v_pages.shape[3]");
  c.no_self_overlap(k_pages, "k_pages");
  c.no_self_overlap(v_pages, "v_pages");
  c.no_alias(k_pages, "k_pages", v_pages, "v_pages");
  for (const auto& [pages, name] : {std::pair{k_pages, "k_pages"}, std::pair{v_pages, "v_pages"}}) {
    c.no_alias(pages, name, k_new, "k_new");
    c.no_alias(pages, name, v_new, "v_new");
    c.no_alias(pages, name, block_table, "block_table");
    c.no_alias(pages, name, seqlens, "seqlens");
  }
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < n; ++t) {
      const std::int64_t j = seqlens(b) + t, page = block_table(b, j / page_size), row = j % page_size;
      for (std::int64_t h = 0; h < k_new.shape[2]; ++h) {
        for (std::int64_t d = 0; d < k_new.shape[3]; ++d) k_pages(page, row, h, d) = from_float<T>(k_new(b, t, h, d));
        for (std::int64_t d = 0; d < v_new.shape[3]; ++d) v_pages(page, row, h, d) = from_float<T>(v_new(b, t, h, d));
      }
    }
}

/// Merges two attention states over disjoint key sets (chunked prefill, prefix caching,
/// context parallelism): with w = exp(lse - max(lse_a, lse_b)),
///   o = (w_a·o_a + w_b·o_b) / (w_a + w_b),  lse = max + log(w_a + w_b)   (natural log).
/// o_*: (batch, seq, heads, dim); lse_*: (batch, heads, seq). A state with lse = -inf is empty.
/// The outputs may be the very same views as (o_a, lse_a), to merge in place.
inline void merge_states(tensor_view<const float, 4> o_a, tensor_view<const float, 3> lse_a,
                         tensor_view<const float, 4> o_b, tensor_view<const float, 3> lse_b, tensor_view<float, 4> o,
                         tensor_view<float, 3> lse) {
  const detail::checker c("headwise::merge_states");
  c.view(o_a, "o_a", {0, 0, 0, 1}, {"batch", "seq", "heads", "dim"});
  c.view(o_b, "o_b", {0, 0, 0, 1}, {"batch", "seq", "heads", "dim"});
  c.view(o, "o", {0, 0, 0, 1}, {"batch", "seq", "heads", "dim"});
  c.view(lse_a, "lse_a", {0, 0, 0}, {"batch", "heads", "seq"});
  c.view(lse_b, "lse_b", {0, 0, 0}, {"batch", "heads", "seq"});
  c.view(lse, "lse", {0, 0, 0}, {"batch", "heads", "seq"});
  for (int i = 0; i < 4; ++i) {
    c.equal(o_b.shape[i], o_a.shape[i], "o_b.shape[" + std::to_string(i) + "]", "o_a.shape[" + std::to_string(i) + "]");
    c.equal(o.shape[i], o_a.shape[i], "o.shape[" + std::to_string(i) + "]", "o_a.shape[" + std::to_string(i) + "]");
  }
  const std::array<std::int64_t, 3> want{o_a.shape[0], o_a.shape[2], o_a.shape[1]};
  for (int i = 0; i < 3; ++i) {
    c.equal(lse_a.shape[i], want[i], "lse_a.shape[" + std::to_string(i) + "]", "(batch, heads, seq) of o_a");
    c.equal(lse_b.shape[i], want[i], "lse_b.shape[" + std::to_string(i) + "]", "(batch, heads, seq) of o_a");
    c.equal(lse.shape[i], want[i], "lse.shape[" + std::to_string(i) + "]", "(batch, heads, seq) of o_a");
  }
  auto same = [](const auto& x, const auto& y) {
    return static_cast<const void*>(x.data) == static_cast<const void*>(y.data) && x.stride == y.stride;
  };
  c.no_self_overlap(o, "o");
  c.no_self_overlap(lse, "lse");
  if (!same(o, o_a)) c.no_alias(o, "o", o_a, "o_a");
  c.no_alias(o, "o", o_b, "o_b");
  c.no_alias(o, "o", lse_a, "lse_a");
  c.no_alias(o, "o", lse_b, "lse_b");
  c.no_alias(o, "o", lse, "lse");
  if (!same(lse, lse_a)) c.no_alias(lse, "lse", lse_a, "lse_a");
  c.no_alias(lse, "lse", lse_b, "lse_b");
  c.no_alias(lse, "lse", o_a, "o_a");
  c.no_alias(lse, "lse", o_b, "o_b");
  const std::int64_t dim = o_a.shape[3];
  std::vector<float> row(static_cast<std::size_t>(dim));
  for (std::int64_t b = 0; b < o_a.shape[0]; ++b)
    for (std::int64_t s = 0; s < o_a.shape[1]; ++s)
      for (std::int64_t h = 0; h < o_a.shape[2]; ++h) {
        std::copy(&o_a(b, s, h, 0), &o_a(b, s, h, 0) + dim, row.begin());
        float l = lse_a(b, h, s);
        engine::merge_into(row.data(), l, &o_b(b, s, h, 0), lse_b(b, h, s), dim);
        std::copy(row.begin(), row.end(), &o(b, s, h, 0));
        lse(b, h, s) = l;
      }
}

}  // namespace headwise
