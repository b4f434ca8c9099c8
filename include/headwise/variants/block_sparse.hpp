/// @file
/// @brief Block-sparse attention: the engine with a mask policy that walks a block list
/// (engine::sparse_mask), and the static block-mask builders (causal, StreamingLLM sinks +
/// local window, dilated/strided, user-supplied). Adaptive selection (FlexPrefill,
/// vertical-slash, XAttention) is in sparse_select.hpp; selection and execution meet only in
/// the block_mask.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../core/block_mask.hpp"
#include "attention.hpp"

namespace headwise {

namespace detail {

inline constexpr std::int64_t max_q_block = 1024;
inline constexpr std::int64_t max_kv_block = std::int64_t{1} << 30;

/// Checks a block mask against the problem: extents, counts within the row widths, indices in
/// range and strictly increasing, partial and full blocks disjoint, no column inside a listed
/// block. Every element is read once; nothing is written.
inline void check_block_mask(const checker& c, const block_mask& m, std::int64_t batch, std::int64_t heads,
                             std::int64_t seq_q, std::int64_t seq_kv) {
  c.require(m.q_block >= 1 && m.q_block <= max_q_block, "mask.q_block", "in [1, 1024]", m.q_block);
  c.require(m.kv_block >= 1 && m.kv_block <= max_kv_block, "mask.kv_block", "in [1, 2^30]", m.kv_block);
  const std::int64_t nqb = (seq_q + m.q_block - 1) / m.q_block, nkb = (seq_kv + m.kv_block - 1) / m.kv_block;
  // One (counts, indices) pair: extents, then the rows.
  auto pair = [&](const tensor_view<const std::int32_t, 3>& n, const tensor_view<const std::int32_t, 4>& i,
                  const std::string& nn, const std::string& in, bool required) {
    if (!required && n.absent() && i.absent()) return false;
    c.require(!n.absent(), "mask." + nn, "present together with mask." + in, "absent");
    c.require(!i.absent(), "mask." + in, "present together with mask." + nn, "absent");
    c.view(n, "mask." + nn, {1, 1, 0}, {"batch", "heads", "num_q_blocks"});
    c.view(i, "mask." + in, {1, 1, 0, 0}, {"batch", "heads", "num_q_blocks", "width"});
    const auto& ref = m.kv_num_blocks;  // every list shares the batch and head extents of kv_num_blocks
    c.require(n.shape[0] == 1 || n.shape[0] == batch, "mask." + nn + ".shape[0] (batch)",
              "1 (broadcast) or q.shape[0] = " + to_text(batch), n.shape[0]);
    c.require(n.shape[1] == 1 || n.shape[1] == heads, "mask." + nn + ".shape[1] (heads)",
              "1 (broadcast) or the output heads = " + to_text(heads), n.shape[1]);
    c.equal(n.shape[0], ref.shape[0], "mask." + nn + ".shape[0] (batch)", "mask.kv_num_blocks.shape[0]");
    c.equal(n.shape[1], ref.shape[1], "mask." + nn + ".shape[1] (heads)", "mask.kv_num_blocks.shape[1]");
    c.equal(n.shape[2], nqb, "mask." + nn + ".shape[2] (num_q_blocks)", "ceil(seq_q / q_block)");
    for (int a = 0; a < 3; ++a)
      c.equal(i.shape[static_cast<std::size_t>(a)], n.shape[static_cast<std::size_t>(a)],
              "mask." + in + ".shape[" + std::to_string(a) + "]", "mask." + nn + ".shape[" + std::to_string(a) + "]");
    return true;
  };
  pair(m.kv_num_blocks, m.kv_indices, "kv_num_blocks", "kv_indices", true);
  const bool has_full = pair(m.full_kv_num_blocks, m.full_kv_indices, "full_kv_num_blocks", "full_kv_indices", false);
  const bool has_cols = pair(m.column_count, m.column_index, "column_count", "column_index", false);

  const std::int64_t nb = m.kv_num_blocks.shape[0], nh = m.kv_num_blocks.shape[1];
  auto where = [](std::int64_t b, std::int64_t h, std::int64_t qb) {
    std::string s = "[";  // appended, not "[" + ...: GCC 12 warns (-Wrestrict) on the inlined insert
    s += to_text(b);
    s += ',';
    s += to_text(h);
    s += ',';
    s += to_text(qb);
    s += ']';
    return s;
  };
  // A row: count in [0, width], entries in [0, limit), strictly increasing.
  auto row = [&](const tensor_view<const std::int32_t, 3>& n, const tensor_view<const std::int32_t, 4>& i,
                 const std::string& nn, const std::string& in, std::int64_t b, std::int64_t h, std::int64_t qb,
                 std::int64_t limit, const char* what) -> std::pair<const std::int32_t*, std::int64_t> {
    // Messages are built only on failure: a mask holds millions of entries.
    const std::int64_t cnt = n(b, h, qb);
    if (cnt < 0 || cnt > i.shape[3])
      c.fail("mask." + nn + where(b, h, qb), "in [0, mask." + in + ".shape[3] = " + to_text(i.shape[3]) + "]",
             to_text(cnt));
    if (cnt == 0) return {nullptr, 0};
    const std::int32_t* p = &i(b, h, qb, 0);
    for (std::int64_t x = 0; x < cnt; ++x) {
      if (p[x] < 0 || p[x] >= limit)
        c.fail("mask." + in + where(b, h, qb) + "[" + to_text(x) + "]",
               std::string(what) + " in [0, " + to_text(limit) + ")", to_text(p[x]));
      if (x > 0 && p[x] <= p[x - 1])
        c.fail("mask." + in + where(b, h, qb) + "[" + to_text(x) + "]",
               "greater than the previous entry (sorted ascending, no repeats)", to_text(p[x]));
    }
    return {p, cnt};
  };
  for (std::int64_t b = 0; b < nb; ++b)
    for (std::int64_t h = 0; h < nh; ++h)
      for (std::int64_t qb = 0; qb < nqb; ++qb) {
        const auto partial = row(m.kv_num_blocks, m.kv_indices, "kv_num_blocks", "kv_indices", b, h, qb, nkb, "a key block");
        const std::int32_t* pl = partial.first;  // (no structured bindings: lambdas capture these)
        const std::int64_t np = partial.second;
        std::pair<const std::int32_t*, std::int64_t> fl{nullptr, 0}, cl{nullptr, 0};
        if (has_full)
          fl = row(m.full_kv_num_blocks, m.full_kv_indices, "full_kv_num_blocks", "full_kv_indices", b, h, qb, nkb,
                   "a key block");
        if (has_cols)
          cl = row(m.column_count, m.column_index, "column_count", "column_index", b, h, qb, seq_kv, "a key");
        auto listed = [&](std::int64_t kb) {
          return std::binary_search(pl, pl + np, kb) || std::binary_search(fl.first, fl.first + fl.second, kb);
        };
        for (std::int64_t x = 0; x < fl.second; ++x)
          if (std::binary_search(pl, pl + np, fl.first[x]))
            c.fail("mask.full_kv_indices" + where(b, h, qb) + "[" + to_text(x) + "]",
                   "a block not also in mask.kv_indices", to_text(fl.first[x]));
        for (std::int64_t x = 0; x < cl.second; ++x)
          if (listed(cl.first[x] / m.kv_block))
            c.fail("mask.column_index" + where(b, h, qb) + "[" + to_text(x) + "]",
                   "a key outside the listed blocks (it would be counted twice)", to_text(cl.first[x]));
      }
}

/// Validates a block-sparse call; returns the dense problem (the caller regroups its heads).
template <class KV>
engine::problem<engine::dense_q, engine::dense_kv<KV>> check_block_sparse(
    const checker& c, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, tensor_view<const KV, 4> v,
    tensor_view<float, 4> out, const block_mask& mask, const attention_options& opt, tensor_view<float, 3> lse) {
  auto pb = check_attention<KV>(c, q, k, v, out, opt, lse);
  c.require(opt.window_left == -1, "options.window_left",
            "-1 (block-sparse windows are block patterns: streaming_block_mask)", opt.window_left);
  c.require(opt.window_right == -1, "options.window_right", "-1 (block-sparse masks carry the window)",
            opt.window_right);
  c.require(opt.sink_tokens == 0, "options.sink_tokens", "0 (sink blocks: streaming_block_mask)",
            opt.sink_tokens);
  check_block_mask(c, mask, q.shape[0], pb.heads.heads_out, q.shape[1], k.shape[1]);
  auto no_alias_mask = [&](const auto& o, const char* name) {
    c.no_alias(o, name, mask.kv_num_blocks, "mask.kv_num_blocks");
    c.no_alias(o, name, mask.kv_indices, "mask.kv_indices");
    c.no_alias(o, name, mask.full_kv_num_blocks, "mask.full_kv_num_blocks");
    c.no_alias(o, name, mask.full_kv_indices, "mask.full_kv_indices");
    c.no_alias(o, name, mask.column_count, "mask.column_count");
    c.no_alias(o, name, mask.column_index, "mask.column_index");
  };
  no_alias_mask(out, "out");
  if (!lse.absent()) no_alias_mask(lse, "lse");
  return pb;
}

/// Runs a validated block-sparse problem: one work item per (sequence, attention head,
/// q_block of queries), K/V read through the head map.
template <class Arch, class KV>
void run_block_sparse(const engine::problem<engine::dense_q, engine::dense_kv<KV>>& pb, const block_mask& mask,
                      const attention_options& opt) {
  engine::problem<engine::dense_q, engine::per_head_kv<engine::dense_kv<KV>>> sp;
  sp.qs = pb.qs;
  sp.ks = {pb.ks, opt.heads == head_map::interleave, pb.heads.group, pb.heads.heads_kv};
  sp.sink_logits = pb.sink_logits;
  // Attention head a = "KV head" a of a one-head group: query head a % heads_q, output head a.
  sp.heads = engine::head_mapper::make(head_map::tile, pb.heads.heads_q, pb.heads.heads_out);
  sp.batch = pb.batch;
  sp.dim_qk = pb.dim_qk;
  sp.dim_v = pb.dim_v;
  sp.scale = pb.scale;
  engine::sparse_spec spec;
  spec.partial_n = mask.kv_num_blocks;
  spec.partial_i = mask.kv_indices;
  spec.full_n = mask.full_kv_num_blocks;
  spec.full_i = mask.full_kv_indices;
  spec.cols_n = mask.column_count;
  spec.cols_i = mask.column_index;
  spec.q_block = mask.q_block;
  spec.kv_block = mask.kv_block;
  spec.causal = opt.causal != causal_mode::none;
  spec.top_left = opt.causal == causal_mode::top_left;
  engine::blocking blk;
  blk.rows = mask.q_block;  // work items = the mask's query blocks
  if (opt.softcap > 0.0f) {
    engine::run<Arch>(sp, spec, engine::softcap_score{opt.softcap}, blk, opt.num_threads);
  } else {
    engine::run<Arch>(sp, spec, engine::plain_score{}, blk, opt.num_threads);
  }
}

/// The last key block the diagonal of query block qb reaches (the block of the diagonal of its
/// last query), clamped to [0, nkb - 1]; bottom-right when causal is none.
inline std::int64_t diagonal_block(const block_mask_builder& bld, std::int64_t qb, std::int64_t seq_q,
                                   std::int64_t q_block, std::int64_t kv_block) {
  const std::int64_t last = std::min(seq_q, (qb + 1) * q_block) - 1;
  return std::clamp<std::int64_t>(bld.diagonal(last) / kv_block, 0, std::max<std::int64_t>(bld.num_kv_blocks() - 1, 0));
}

inline void check_pattern(const checker& c, std::int64_t seq_q, std::int64_t seq_kv, std::int64_t q_block,
                          std::int64_t kv_block) {
  c.require(seq_q >= 0, "seq_q", ">= 0", seq_q);
  c.require(seq_kv >= 0 && seq_kv <= max_seq_kv, "seq_kv", "in [0, 2^40]", seq_kv);
  c.require(q_block >= 1 && q_block <= max_q_block, "q_block", "in [1, 1024]", q_block);
  c.require(kv_block >= 1 && kv_block <= max_kv_block, "kv_block", "in [1, 2^30]", kv_block);
  // The builders hold (num_q_blocks x num_kv_blocks) lists: keep them addressable.
  const std::int64_t nqb = (seq_q + q_block - 1) / q_block, nkb = (seq_kv + kv_block - 1) / kv_block;
  c.require(nqb <= (std::int64_t{1} << 31) / std::max<std::int64_t>(nkb, 1), "seq_q",
            "at most 2^31 (query block, key block) pairs", to_text(nqb) + " x " + to_text(nkb));
}

}  // namespace detail

/// Block-sparse attention (FlexAttention's block_mask semantics) on [batch, seq, heads, dim]
/// views: query block qb of head h attends to the keys of mask's blocks and columns for (b, h,
/// qb); keys of partial blocks and columns are element-masked by options.causal (either
/// alignment), keys of full blocks are all visible. Same q/k/v/out/lse conventions, dtypes,
/// head maps, scale, softcap, sink logits and threads as attention(); options.window_* and
/// sink_tokens must be unset (windows and sinks are block patterns: streaming_block_mask).
/// Rows with no visible key give out = 0, lse = -inf. Throws argument_error before any work.
template <class KT, class VT>
void block_sparse_attention(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
                            tensor_view<float, 4> out, const block_mask& mask, const attention_options& options = {},
                            tensor_view<float, 3> lse = {}) {
  using KV = detail::kv_storage_t<KT>;
  static_assert(std::is_same_v<KV, detail::kv_storage_t<VT>>,
                "headwise::block_sparse_attention: k and v must share a dtype");
  const detail::checker c("headwise::block_sparse_attention");
  const auto pb = detail::check_block_sparse<KV>(c, q, tensor_view<const KV, 4>(k), tensor_view<const KV, 4>(v), out,
                                                 mask, options, lse);
  detail::run_block_sparse<tile::default_arch>(pb, mask, options);
}

/// Every block visible under `causal` (1 batch row, 1 head: broadcast): dense causal (or, with
/// causal_mode::none, dense) attention as a block mask. Diagonal blocks are partial, the rest full.
inline block_mask_data causal_block_mask(std::int64_t seq_q, std::int64_t seq_kv, std::int64_t q_block = 64,
                                         std::int64_t kv_block = 64, causal_mode causal = causal_mode::bottom_right) {
  detail::check_pattern(detail::checker("headwise::causal_block_mask"), seq_q, seq_kv, q_block, kv_block);
  block_mask_builder bld(1, 1, seq_q, seq_kv, q_block, kv_block, causal);
  for (std::int64_t qb = 0; qb < bld.num_q_blocks(); ++qb)
    for (std::int64_t kb = 0; kb < bld.num_kv_blocks(); ++kb) bld.add_block(0, 0, qb, kb);
  return std::move(bld).finish();
}

/// StreamingLLM's pattern ("A-shape") in blocks: the first sink_blocks key blocks and the
/// local_blocks key blocks ending at each query block's diagonal block (the block holding the
/// diagonal of its last query; bottom-right alignment when causal is none). Broadcast (1, 1).
inline block_mask_data streaming_block_mask(std::int64_t seq_q, std::int64_t seq_kv, std::int64_t q_block,
                                            std::int64_t kv_block, std::int64_t sink_blocks, std::int64_t local_blocks,
                                            causal_mode causal = causal_mode::bottom_right) {
  const detail::checker c("headwise::streaming_block_mask");
  detail::check_pattern(c, seq_q, seq_kv, q_block, kv_block);
  c.require(sink_blocks >= 0, "sink_blocks", ">= 0", sink_blocks);
  c.require(local_blocks >= 1, "local_blocks", ">= 1 (the diagonal block)", local_blocks);
  block_mask_builder bld(1, 1, seq_q, seq_kv, q_block, kv_block, causal);
  for (std::int64_t qb = 0; qb < bld.num_q_blocks(); ++qb) {
    const std::int64_t d = detail::diagonal_block(bld, qb, seq_q, q_block, kv_block);
    for (std::int64_t kb = 0; kb < std::min(sink_blocks, bld.num_kv_blocks()); ++kb) bld.add_block(0, 0, qb, kb);
    for (std::int64_t kb = std::max<std::int64_t>(0, d - local_blocks + 1); kb <= d; ++kb) bld.add_block(0, 0, qb, kb);
  }
  return std::move(bld).finish();
}

/// Dilated (strided) pattern: key blocks d, d - stride, d - 2·stride, ... back from each query
/// block's diagonal block d, plus the local_blocks blocks ending at d. Broadcast (1, 1).
inline block_mask_data strided_block_mask(std::int64_t seq_q, std::int64_t seq_kv, std::int64_t q_block,
                                          std::int64_t kv_block, std::int64_t stride, std::int64_t local_blocks = 1,
                                          causal_mode causal = causal_mode::bottom_right) {
  const detail::checker c("headwise::strided_block_mask");
  detail::check_pattern(c, seq_q, seq_kv, q_block, kv_block);
  c.require(stride >= 1, "stride", ">= 1", stride);
  c.require(local_blocks >= 1, "local_blocks", ">= 1 (the diagonal block)", local_blocks);
  block_mask_builder bld(1, 1, seq_q, seq_kv, q_block, kv_block, causal);
  for (std::int64_t qb = 0; qb < bld.num_q_blocks(); ++qb) {
    const std::int64_t d = detail::diagonal_block(bld, qb, seq_q, q_block, kv_block);
    for (std::int64_t kb = d; kb >= 0; kb -= stride) bld.add_block(0, 0, qb, kb);
    for (std::int64_t kb = std::max<std::int64_t>(0, d - local_blocks + 1); kb <= d; ++kb) bld.add_block(0, 0, qb, kb);
  }
  return std::move(bld).finish();
}

/// A user-supplied block pattern: keep (heads|1, num_q_blocks, num_kv_blocks), nonzero = kept;
/// blocks invisible under `causal` are dropped, the others classified partial or full.
inline block_mask_data block_mask_from_dense(tensor_view<const std::uint8_t, 3> keep, std::int64_t seq_q,
                                             std::int64_t seq_kv, std::int64_t q_block, std::int64_t kv_block,
                                             causal_mode causal = causal_mode::bottom_right) {
  const detail::checker c("headwise::block_mask_from_dense");
  detail::check_pattern(c, seq_q, seq_kv, q_block, kv_block);
  c.view(keep, "keep", {1, 0, 0}, {"heads", "num_q_blocks", "num_kv_blocks"});
  const std::int64_t nqb = (seq_q + q_block - 1) / q_block, nkb = (seq_kv + kv_block - 1) / kv_block;
  c.equal(keep.shape[1], nqb, "keep.shape[1] (num_q_blocks)", "ceil(seq_q / q_block)");
  c.equal(keep.shape[2], nkb, "keep.shape[2] (num_kv_blocks)", "ceil(seq_kv / kv_block)");
  block_mask_builder bld(1, keep.shape[0], seq_q, seq_kv, q_block, kv_block, causal);
  for (std::int64_t h = 0; h < keep.shape[0]; ++h)
    for (std::int64_t qb = 0; qb < nqb; ++qb)
      for (std::int64_t kb = 0; kb < nkb; ++kb)
        if (keep(h, qb, kb) != 0) bld.add_block(0, h, qb, kb);
  return std::move(bld).finish();
}

}  // namespace headwise
