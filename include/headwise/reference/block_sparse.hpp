/// @file
/// @brief Naive fp64 reference for headwise::block_sparse_attention: the block mask expanded
/// to an element predicate, then the dense reference. Same arguments, same validation.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../variants/block_sparse.hpp"
#include "attention.hpp"

namespace headwise::reference {

/// True iff the block mask lets query i of attention head h (batch row b) see key j.
inline bool block_visible(const block_mask& m, const attention_options& opt, std::int64_t b, std::int64_t h,
                          std::int64_t i, std::int64_t j, std::int64_t seq_q, std::int64_t seq_kv) {
  const std::int64_t mb = m.kv_num_blocks.shape[0] == 1 ? 0 : b, mh = m.kv_num_blocks.shape[1] == 1 ? 0 : h;
  const std::int64_t qb = i / m.q_block, kb = j / m.kv_block;
  auto in = [&](const tensor_view<const std::int32_t, 3>& n, const tensor_view<const std::int32_t, 4>& idx,
                std::int64_t x) {
    if (n.absent()) return false;
    for (std::int64_t e = 0; e < n(mb, mh, qb); ++e)
      if (idx(mb, mh, qb, e) == x) return true;
    return false;
  };
  if (in(m.full_kv_num_blocks, m.full_kv_indices, kb)) return true;
  if (!in(m.kv_num_blocks, m.kv_indices, kb) && !in(m.column_count, m.column_index, j)) return false;
  const std::int64_t diag = opt.causal == causal_mode::top_left ? i : i + (seq_kv - seq_q);
  return opt.causal == causal_mode::none || j <= diag;
}

/// Reference for headwise::block_sparse_attention.
template <class KT, class VT>
void block_sparse_attention(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
                            tensor_view<float, 4> out, const block_mask& mask, const attention_options& opt = {},
                            tensor_view<float, 3> lse = {}) {
  using KV = detail::kv_storage_t<KT>;
  const detail::checker c("headwise::reference::block_sparse_attention");
  const auto pb = detail::check_block_sparse<KV>(c, q, tensor_view<const KV, 4>(k), tensor_view<const KV, 4>(v), out,
                                                 mask, opt, lse);
  const std::int64_t seq_q = q.shape[1], seq_kv = k.shape[1];
  ref_detail::attend(pb, opt, [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return block_visible(mask, opt, b, h, i, j, seq_q, seq_kv);
  });
}

}  // namespace headwise::reference
