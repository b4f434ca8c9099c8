/// @file
/// @brief Head map policy: which query head and which output head each (KV head, j) serves.
#pragma once

#include <cstdint>

#include "../core/options.hpp"

namespace headwise::engine {

/// The attention heads of a KV head form its group (size `group`): they are packed into the
/// lanes of one work item so every K/V byte is read once per KV head.
///   interleave: attention head a = hk·group + j  (heads_out = heads_q)
///   tile:       attention head a = hk + j·heads_kv (heads_out = max(heads_q, heads_kv))
/// Attention head a reads query head a mod heads_q and writes output head a.
struct head_mapper {
  head_map kind = head_map::interleave;
  std::int64_t heads_q = 1, heads_kv = 1, heads_out = 1, group = 1;

  static head_mapper make(head_map kind, std::int64_t heads_q, std::int64_t heads_kv) noexcept {
    head_mapper m;
    m.kind = kind;
    m.heads_q = heads_q;
    m.heads_kv = heads_kv;
    m.heads_out = kind == head_map::interleave ? heads_q : (heads_q > heads_kv ? heads_q : heads_kv);
    m.group = m.heads_out / heads_kv;
    return m;
  }
  [[nodiscard]] std::int64_t out_head(std::int64_t hk, std::int64_t j) const noexcept {
    return kind == head_map::interleave ? hk * group + j : hk + j * heads_kv;
  }
  [[nodiscard]] std::int64_t q_head(std::int64_t out) const noexcept { return out % heads_q; }
};

}  // namespace headwise::engine
