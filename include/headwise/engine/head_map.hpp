/// @file
/// @brief Head map policy: which query head and which output head each (KV head, j) serves,
/// and how a work item's rows are ordered.
#pragma once

#include <cstdint>

#include "../core/options.hpp"

namespace headwise::engine {

/// The attention heads of a KV head form its group (size `group`): they are packed into the
/// lanes of one work item so every K/V byte is read once per KV head.
///   interleave: attention head a = hk·group + j  (heads_out = heads_q)
///   tile:       attention head a = hk + j·heads_kv (heads_out = max(heads_q, heads_kv))
/// Attention head a reads query head a mod heads_q and writes output head a.
///
/// Differential attention (DIFF/GDA, make_differential): KV "head" hk is a signal/noise pair;
/// its group is `group - noise` signal heads (reading K1) then `noise` noise heads (reading K2).
/// Attention head ids: signal i in [0, signal_out), noise n at signal_out + n. Query heads are
/// striped: groups of `stripe - 1` signal heads and one noise head.
struct head_mapper {
  head_map kind = head_map::interleave;
  std::int64_t heads_q = 1, heads_kv = 1, heads_out = 1, group = 1;
  std::int64_t noise = 0;       ///< noise heads per KV pair; 0 = not differential
  std::int64_t signal_out = 0;  ///< signal heads (differential)
  std::int64_t stripe = 1;      ///< signal heads per noise head + 1 (differential)

  static head_mapper make(head_map kind, std::int64_t heads_q, std::int64_t heads_kv) noexcept {
    head_mapper m;
    m.kind = kind;
    m.heads_q = heads_q;
    m.heads_kv = heads_kv;
    m.heads_out = kind == head_map::interleave ? heads_q : (heads_q > heads_kv ? heads_q : heads_kv);
    m.group = m.heads_out / heads_kv;
    return m;
  }
  /// heads_signal % heads_noise == 0 and both multiples of pairs (checked by the caller).
  static head_mapper make_differential(std::int64_t heads_signal, std::int64_t heads_noise,
                                       std::int64_t pairs) noexcept {
    head_mapper m;
    m.heads_q = heads_signal + heads_noise;
    m.heads_kv = pairs;
    m.heads_out = heads_signal + heads_noise;
    m.group = m.heads_out / pairs;
    m.noise = heads_noise / pairs;
    m.signal_out = heads_signal;
    m.stripe = heads_signal / heads_noise + 1;
    return m;
  }

  /// Rows of a work item are segment-major (differential: signal rows, then noise rows),
  /// position-major inside a segment: the heads of segment s per position.
  [[nodiscard]] std::int64_t segment_heads(int s) const noexcept { return s == 0 ? group - noise : noise; }

  struct row_id {
    std::int64_t pos;  ///< position offset in the item
    std::int64_t j;    ///< head of the group
  };
  /// Row rr of an item of npos positions.
  [[nodiscard]] row_id row_of(std::int64_t rr, std::int64_t npos) const noexcept {
    const std::int64_t s0 = group - noise;
    if (rr < npos * s0) return {rr / s0, rr % s0};
    rr -= npos * s0;
    return {rr / noise, s0 + rr % noise};
  }

  [[nodiscard]] std::int64_t out_head(std::int64_t hk, std::int64_t j) const noexcept {
    if (noise > 0) {
      const std::int64_t s0 = group - noise;
      return j < s0 ? hk * s0 + j : signal_out + hk * noise + (j - s0);
    }
    return kind == head_map::interleave ? hk * group + j : hk + j * heads_kv;
  }
  [[nodiscard]] std::int64_t q_head(std::int64_t out) const noexcept {
    if (noise > 0) {
      const std::int64_t g = stripe - 1;
      return out < signal_out ? (out / g) * stripe + out % g : (out - signal_out) * stripe + g;
    }
    return out % heads_q;
  }
};

}  // namespace headwise::engine
