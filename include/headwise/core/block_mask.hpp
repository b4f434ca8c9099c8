/// @file
/// @brief block_mask: which keys each block of queries attends to, for block-sparse attention.
/// The layout is FlexAttention's BlockMask (BCSR over q_block x kv_block tiles, with "partial"
/// and "full" block lists), plus MInference's column index (single keys outside any listed
/// block). block_mask is a set of non-owning views; block_mask_data owns its arrays, is what
/// every builder returns and converts to a block_mask with view().
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "options.hpp"
#include "view.hpp"

namespace headwise {

/// The key set of every (batch, head, query block), as views (int32). B and H may be 1
/// (broadcast over the batch or the heads); H is otherwise the number of output heads.
///   query block qb = query positions [qb·q_block, min((qb+1)·q_block, seq_q));
///   kv_indices[b,h,qb, 0..kv_num_blocks[b,h,qb]): key blocks kb = keys [kb·kv_block, ...),
///       element-masked by options.causal ("partial" blocks);
///   full_kv_indices[b,h,qb, 0..full_kv_num_blocks[b,h,qb]): key blocks with every key visible
///       to every query of the block, no element mask (optional);
///   column_index[b,h,qb, 0..column_count[b,h,qb]): single keys outside the listed blocks,
///       element-masked by options.causal like partial blocks (optional).
/// Each list is sorted ascending without repeats; a block is in at most one of the two block
/// lists; no column falls inside a listed block. headwise::block_sparse_attention checks all
/// of it before any work.
struct block_mask {
  std::int64_t q_block = 64;
  std::int64_t kv_block = 64;
  tensor_view<const std::int32_t, 3> kv_num_blocks;       ///< (B|1, H|1, num_q_blocks)
  tensor_view<const std::int32_t, 4> kv_indices;          ///< (B|1, H|1, num_q_blocks, width)
  tensor_view<const std::int32_t, 3> full_kv_num_blocks;  ///< optional, as kv_num_blocks
  tensor_view<const std::int32_t, 4> full_kv_indices;     ///< optional, as kv_indices
  tensor_view<const std::int32_t, 3> column_count;        ///< optional, as kv_num_blocks
  tensor_view<const std::int32_t, 4> column_index;        ///< optional, as kv_indices
};

/// An owned block mask: the arrays of a block_mask and their extents. Builders return it;
/// view() lends it to block_sparse_attention (keep the data alive during the call).
struct block_mask_data {
  std::int64_t batch = 1, heads = 1, seq_q = 0, seq_kv = 0;
  std::int64_t q_block = 64, kv_block = 64;
  std::int64_t kv_width = 1, full_width = 1, column_width = 1;  ///< row widths of the index arrays
  std::vector<std::int32_t> kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, column_count,
      column_index;

  [[nodiscard]] std::int64_t num_q_blocks() const noexcept { return (seq_q + q_block - 1) / q_block; }
  [[nodiscard]] std::int64_t num_kv_blocks() const noexcept { return (seq_kv + kv_block - 1) / kv_block; }

  [[nodiscard]] block_mask view() const {
    const std::int64_t nqb = num_q_blocks();
    block_mask m;
    m.q_block = q_block;
    m.kv_block = kv_block;
    auto counts = [&](const std::vector<std::int32_t>& c) {
      return tensor_view<const std::int32_t, 3>(c.data(), {batch, heads, nqb});
    };
    auto lists = [&](const std::vector<std::int32_t>& l, std::int64_t w) {
      return tensor_view<const std::int32_t, 4>(l.data(), {batch, heads, nqb, w});
    };
    m.kv_num_blocks = counts(kv_num_blocks);
    m.kv_indices = lists(kv_indices, kv_width);
    if (!full_kv_num_blocks.empty()) {
      m.full_kv_num_blocks = counts(full_kv_num_blocks);
      m.full_kv_indices = lists(full_kv_indices, full_width);
    }
    if (!column_count.empty()) {
      m.column_count = counts(column_count);
      m.column_index = lists(column_index, column_width);
    }
    return m;
  }
};

/// Collects the key blocks and columns of each (batch, head, query block) and packs them
/// into a block_mask_data. add_block classifies a block itself: dropped when no query of the
/// block can see any of its keys under `causal`, full when every query sees every key,
/// partial otherwise. finish() sorts, removes repeats and drops columns inside listed blocks
/// or invisible to every query of their block (MInference's "no double counting").
class block_mask_builder {
 public:
  block_mask_builder(std::int64_t batch, std::int64_t heads, std::int64_t seq_q, std::int64_t seq_kv,
                     std::int64_t q_block, std::int64_t kv_block, causal_mode causal)
      : causal_(causal) {
    if (batch < 1 || heads < 1 || seq_q < 0 || seq_kv < 0 || q_block < 1 || kv_block < 1)
      throw std::invalid_argument("headwise::block_mask_builder: batch, heads, q_block, kv_block >= 1 and seq_q, seq_kv >= 0");
    d_.batch = batch;
    d_.heads = heads;
    d_.seq_q = seq_q;
    d_.seq_kv = seq_kv;
    d_.q_block = q_block;
    d_.kv_block = kv_block;
    const auto n = static_cast<std::size_t>(batch * heads * d_.num_q_blocks());
    partial_.resize(n);
    full_.resize(n);
    cols_.resize(n);
  }

  [[nodiscard]] std::int64_t num_q_blocks() const noexcept { return d_.num_q_blocks(); }
  [[nodiscard]] std::int64_t num_kv_blocks() const noexcept { return d_.num_kv_blocks(); }

  /// The diagonal of query i: keys j <= diag(i) are visible under a causal mode.
  [[nodiscard]] std::int64_t diagonal(std::int64_t i) const noexcept {
    return causal_ == causal_mode::top_left ? i : i + d_.seq_kv - d_.seq_q;
  }

  /// 0: no key of kv block kb visible to any query of qb; 1: some; 2: all (a full block).
  [[nodiscard]] int visibility(std::int64_t qb, std::int64_t kb) const noexcept {
    const std::int64_t p0 = qb * d_.q_block, p1 = std::min(d_.seq_q, p0 + d_.q_block);
    const std::int64_t k0 = kb * d_.kv_block, k1 = std::min(d_.seq_kv, k0 + d_.kv_block);
    if (p0 >= p1 || k0 >= k1) return 0;
    if (causal_ == causal_mode::none) return 2;
    if (k0 > diagonal(p1 - 1)) return 0;
    return k1 - 1 <= diagonal(p0) ? 2 : 1;
  }

  void add_block(std::int64_t b, std::int64_t h, std::int64_t qb, std::int64_t kb) {
    if (kb < 0 || kb >= num_kv_blocks() || qb < 0 || qb >= num_q_blocks()) return;
    const int vis = visibility(qb, kb);
    if (vis == 0) return;
    (vis == 2 ? full_ : partial_)[slot(b, h, qb)].push_back(static_cast<std::int32_t>(kb));
  }
  void add_column(std::int64_t b, std::int64_t h, std::int64_t qb, std::int64_t col) {
    if (col < 0 || col >= d_.seq_kv || qb < 0 || qb >= num_q_blocks()) return;
    cols_[slot(b, h, qb)].push_back(static_cast<std::int32_t>(col));
  }

  [[nodiscard]] block_mask_data finish() && {
    const std::int64_t nqb = num_q_blocks();
    for (std::size_t s = 0; s < partial_.size(); ++s) {
      auto& p = partial_[s];
      auto& f = full_[s];
      auto& c = cols_[s];
      for (auto* l : {&p, &f, &c}) {
        std::sort(l->begin(), l->end());
        l->erase(std::unique(l->begin(), l->end()), l->end());
      }
      const std::int64_t qb = static_cast<std::int64_t>(s) % nqb;
      const std::int64_t p0 = qb * d_.q_block, p1 = std::min(d_.seq_q, p0 + d_.q_block);
      std::erase_if(c, [&](std::int32_t j) {
        const std::int64_t kb = j / d_.kv_block;
        if (std::binary_search(p.begin(), p.end(), kb) || std::binary_search(f.begin(), f.end(), kb)) return true;
        return causal_ != causal_mode::none && (p0 >= p1 || j > diagonal(p1 - 1));
      });
      d_.kv_width = std::max<std::int64_t>(d_.kv_width, static_cast<std::int64_t>(p.size()));
      d_.full_width = std::max<std::int64_t>(d_.full_width, static_cast<std::int64_t>(f.size()));
      d_.column_width = std::max<std::int64_t>(d_.column_width, static_cast<std::int64_t>(c.size()));
    }
    for (auto* w : {&d_.kv_width, &d_.full_width, &d_.column_width}) *w = std::max<std::int64_t>(*w, 1);
    pack(partial_, d_.kv_num_blocks, d_.kv_indices, d_.kv_width);
    pack(full_, d_.full_kv_num_blocks, d_.full_kv_indices, d_.full_width);
    pack(cols_, d_.column_count, d_.column_index, d_.column_width);
    return std::move(d_);
  }

 private:
  [[nodiscard]] std::size_t slot(std::int64_t b, std::int64_t h, std::int64_t qb) const {
    if (b < 0 || b >= d_.batch || h < 0 || h >= d_.heads)
      throw std::out_of_range("headwise::block_mask_builder: batch or head index out of range");
    return static_cast<std::size_t>((b * d_.heads + h) * num_q_blocks() + qb);
  }
  static void pack(const std::vector<std::vector<std::int32_t>>& rows, std::vector<std::int32_t>& num,
                   std::vector<std::int32_t>& idx, std::int64_t width) {
    num.assign(rows.size(), 0);
    const auto w = static_cast<std::size_t>(width);  // >= 1
    idx.assign(rows.size() * w, 0);
    for (std::size_t s = 0; s < rows.size(); ++s) {
      num[s] = static_cast<std::int32_t>(rows[s].size());
      std::copy(rows[s].begin(), rows[s].end(), idx.begin() + static_cast<std::ptrdiff_t>(s * w));
    }
  }

  causal_mode causal_;
  block_mask_data d_;
  std::vector<std::vector<std::int32_t>> partial_, full_, cols_;
};

}  // namespace headwise
