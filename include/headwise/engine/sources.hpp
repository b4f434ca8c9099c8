/// @file
/// @brief Where query rows, output rows and K/V rows live: dense [batch, seq, heads, dim]
/// views, ragged (cu_seqlens) packed views, and paged KV caches (block tables). The mainloop
/// reads rows only through these policies.
#pragma once

#include <cstdint>

#include "../core/view.hpp"

namespace headwise::engine {

/// Queries, outputs and LSE in [batch, seq, heads, dim] / [batch, heads, seq] views.
struct dense_q {
  tensor_view<const float, 4> q;
  tensor_view<float, 4> out;
  tensor_view<float, 3> lse;  ///< optional
  [[nodiscard]] std::int64_t len(std::int64_t /*b*/) const noexcept { return q.shape[1]; }
  [[nodiscard]] const float* row(std::int64_t b, std::int64_t i, std::int64_t h) const noexcept {
    return &q(b, i, h, 0);
  }
  [[nodiscard]] float* out_row(std::int64_t b, std::int64_t i, std::int64_t h) const noexcept {
    return &out(b, i, h, 0);
  }
  [[nodiscard]] float* lse_at(std::int64_t b, std::int64_t h, std::int64_t i) const noexcept {
    return lse.absent() ? nullptr : &lse(b, h, i);
  }
};

/// Ragged queries packed as [total_q, heads, dim], sequence b = rows [cu[b], cu[b+1]);
/// LSE as [heads, total_q] (FlashAttention varlen).
struct varlen_q {
  tensor_view<const float, 3> q;
  tensor_view<float, 3> out;
  tensor_view<float, 2> lse;  ///< optional
  const std::int32_t* cu = nullptr;
  [[nodiscard]] std::int64_t len(std::int64_t b) const noexcept { return cu[b + 1] - cu[b]; }
  [[nodiscard]] const float* row(std::int64_t b, std::int64_t i, std::int64_t h) const noexcept {
    return &q(cu[b] + i, h, 0);
  }
  [[nodiscard]] float* out_row(std::int64_t b, std::int64_t i, std::int64_t h) const noexcept {
    return &out(cu[b] + i, h, 0);
  }
  [[nodiscard]] float* lse_at(std::int64_t b, std::int64_t h, std::int64_t i) const noexcept {
    return lse.absent() ? nullptr : &lse(h, cu[b] + i);
  }
};

/// K/V rows of a tile: in place when they are evenly strided (ld in elements), else null.
/// A paged tile across one page boundary has k == nullptr (not one run: the query-lane layouts
/// convert it row by row) and two runs instead: rows [0, split) from k_at[0] / v_at[0], rows
/// [split, n) from k_at[1] / v_at[1], both at strides ld_k / ld_v (split 0: no runs).
template <class KV>
struct kv_tile_rows {
  const KV* k = nullptr;
  const KV* v = nullptr;
  std::int64_t ld_k = 0, ld_v = 0;
  const KV* k2 = nullptr;  ///< second key set (differential: the noise keys), stride ld_k
  std::int64_t split = 0;
  const KV* k_at[2] = {nullptr, nullptr};
  const KV* v_at[2] = {nullptr, nullptr};
};

/// K/V in [batch, seq_kv, heads_kv, dim] views (V may alias K).
template <class KV>
struct dense_kv {
  tensor_view<const KV, 4> k, v;
  [[nodiscard]] std::int64_t len(std::int64_t /*b*/) const noexcept { return k.shape[1]; }
  [[nodiscard]] const KV* k_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &k(b, j, h, 0);
  }
  [[nodiscard]] const KV* v_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &v(b, j, h, 0);
  }
  [[nodiscard]] kv_tile_rows<KV> tile(std::int64_t b, std::int64_t a, std::int64_t /*n*/,
                                      std::int64_t h) const noexcept {
    return {k_row(b, a, h), v_row(b, a, h), k.stride[1], v.stride[1]};
  }
};

/// Ragged K/V packed as [total_kv, heads_kv, dim], sequence b = rows [cu[b], cu[b+1]).
template <class KV>
struct varlen_kv {
  tensor_view<const KV, 3> k, v;
  const std::int32_t* cu = nullptr;
  [[nodiscard]] std::int64_t len(std::int64_t b) const noexcept { return cu[b + 1] - cu[b]; }
  [[nodiscard]] const KV* k_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &k(cu[b] + j, h, 0);
  }
  [[nodiscard]] const KV* v_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &v(cu[b] + j, h, 0);
  }
  [[nodiscard]] kv_tile_rows<KV> tile(std::int64_t b, std::int64_t a, std::int64_t /*n*/,
                                      std::int64_t h) const noexcept {
    return {k_row(b, a, h), v_row(b, a, h), k.stride[0], v.stride[0]};
  }
};

/// Differential attention's K/V, [batch, seq_kv, heads, dim] views: pair h has signal keys
/// K1 = k head 2h and noise keys K2 = k head 2h + 1 (interleaved pairs, as GDA/DIFF store them),
/// or, with shared keys (DIFF V2), both = k head h; its value is v head h.
template <class KV>
struct pair_kv {
  tensor_view<const KV, 4> k, v;
  bool shared = false;
  [[nodiscard]] std::int64_t len(std::int64_t /*b*/) const noexcept { return k.shape[1]; }
  [[nodiscard]] const KV* k_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &k(b, j, shared ? h : 2 * h, 0);
  }
  [[nodiscard]] const KV* k2_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &k(b, j, shared ? h : 2 * h + 1, 0);
  }
  [[nodiscard]] const KV* v_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    return &v(b, j, h, 0);
  }
  [[nodiscard]] kv_tile_rows<KV> tile(std::int64_t b, std::int64_t a, std::int64_t /*n*/,
                                      std::int64_t h) const noexcept {
    return {k_row(b, a, h), v_row(b, a, h), k.stride[1], v.stride[1], k2_row(b, a, h)};
  }
};

/// Paged KV cache (vLLM / FlashAttention block_table): pages [num_pages, page_size, heads_kv,
/// dim]; token j of sequence b is row j % page_size of page block_table[b][j / page_size];
/// sequence b holds seqlens[b] tokens.
template <class KV>
struct paged_kv_source {
  tensor_view<const KV, 4> k_pages, v_pages;
  tensor_view<const std::int32_t, 2> block_table;
  tensor_view<const std::int32_t, 1> seqlens;
  [[nodiscard]] std::int64_t page_size() const noexcept { return k_pages.shape[1]; }
  [[nodiscard]] std::int64_t len(std::int64_t b) const noexcept { return seqlens(b); }
  [[nodiscard]] const KV* k_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    const std::int64_t ps = page_size();
    return &k_pages(block_table(b, j / ps), j % ps, h, 0);
  }
  [[nodiscard]] const KV* v_row(std::int64_t b, std::int64_t j, std::int64_t h) const noexcept {
    const std::int64_t ps = page_size();
    return &v_pages(block_table(b, j / ps), j % ps, h, 0);
  }
  /// One run when the tile stays inside one page, two runs across one page boundary (a 32-key
  /// bf16 decode tile over 16-token pages), else row by row.
  [[nodiscard]] kv_tile_rows<KV> tile(std::int64_t b, std::int64_t a, std::int64_t n,
                                      std::int64_t h) const noexcept {
    const std::int64_t ps = page_size(), first = ps - a % ps;
    if (n <= first) return {k_row(b, a, h), v_row(b, a, h), k_pages.stride[1], v_pages.stride[1]};
    kv_tile_rows<KV> t;
    if (n - first > ps) return t;
    t.ld_k = k_pages.stride[1];
    t.ld_v = v_pages.stride[1];
    t.split = first;
    t.k_at[0] = k_row(b, a, h);
    t.v_at[0] = v_row(b, a, h);
    t.k_at[1] = k_row(b, a + first, h);
    t.v_at[1] = v_row(b, a + first, h);
    return t;
  }
};

/// The K/V of attention head a through another source, for problems that give every attention
/// head work items of its own (block-sparse masks differ per head): head a reads KV head
/// a / group (head_map::interleave) or a % heads_kv (head_map::tile).
template <class KS>
struct per_head_kv {
  KS ks;
  bool interleave = true;
  std::int64_t group = 1, heads_kv = 1;
  [[nodiscard]] std::int64_t kv_head(std::int64_t a) const noexcept { return interleave ? a / group : a % heads_kv; }
  [[nodiscard]] std::int64_t len(std::int64_t b) const noexcept { return ks.len(b); }
  [[nodiscard]] auto k_row(std::int64_t b, std::int64_t j, std::int64_t a) const noexcept {
    return ks.k_row(b, j, kv_head(a));
  }
  [[nodiscard]] auto v_row(std::int64_t b, std::int64_t j, std::int64_t a) const noexcept {
    return ks.v_row(b, j, kv_head(a));
  }
  [[nodiscard]] auto tile(std::int64_t b, std::int64_t j, std::int64_t n, std::int64_t a) const noexcept {
    return ks.tile(b, j, n, kv_head(a));
  }
};

}  // namespace headwise::engine
