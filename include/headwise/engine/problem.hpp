/// @file
/// @brief The resolved problem the engine runs: row sources, head map, dims, score parameters,
/// and the work decomposition.
#pragma once

#include <cstdint>

#include "../core/view.hpp"
#include "head_map.hpp"
#include "sources.hpp"

namespace headwise::engine {

/// One attention problem, validated by the caller (variants/). QS supplies query/output/LSE
/// rows per sequence (dense_q, varlen_q), KS the K/V rows (dense_kv, varlen_kv,
/// paged_kv_source).
template <class QS, class KS>
struct problem {
  QS qs;
  KS ks;
  tensor_view<const float, 1> sink_logits;  ///< (heads_out); optional
  head_mapper heads;
  std::int64_t batch = 0, dim_qk = 0, dim_v = 0;
  float scale = 1.0f;
};

/// Work decomposition. rows: lanes (query positions x group heads) per query-lane work item;
/// block_kv: keys per query-lane tile; decode_block_kv: keys per key-lane (decode) tile when K/V
/// are stored in f32, decode_block_kv16 when they are stored in bf16/f16 (the same bytes per tile);
/// split_kv: keys per split of a work item that holds all of a sequence's query rows (decode:
/// at most split_kv, else about 64 splits of >= 256 keys, key_lane_split; absorbed MLA, short
/// chunks: query_lane_split, >= 512 keys), 0 = never split; prefetch_bytes: how much of the KV cache
/// (every head, K and V) a query-lane item that streams its sequence's cache once (absorbed
/// MLA, short chunks) keeps on its way into L2 ahead of the tile being computed, 0 (the
/// default) = none, the hardware prefetchers only (key-lane decode items ignore it: their
/// kernels prefetch the rows read next, key_lanes::next_rows). Splits depend only on
/// these numbers and the shapes, never on the thread count.
struct blocking {
  std::int64_t rows = 128;
  std::int64_t block_kv = 64;
  std::int64_t decode_block_kv = 16;
  std::int64_t split_kv = 2048;
  std::int64_t prefetch_bytes = 0;
  std::int64_t decode_block_kv16 = 32;  ///< last, so that {rows, block_kv, decode_block_kv, ...} still reads the same
};

}  // namespace headwise::engine
