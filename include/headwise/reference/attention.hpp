/// @file
/// @brief Naive fp64-accumulating reference attention with the same options as
/// headwise::attention. Slow on purpose: every logit is computed in double straight from the
/// definitions. Used by the tests; available to users (include it explicitly).
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "../variants/attention.hpp"

namespace headwise::reference {

/// True iff key j is visible to query i (the definition in attention_options).
inline bool visible(const attention_options& o, std::int64_t i, std::int64_t j, std::int64_t seq_q,
                    std::int64_t seq_kv) {
  const std::int64_t diag = o.causal == causal_mode::top_left ? i : i + (seq_kv - seq_q);
  if (o.causal != causal_mode::none && j > diag) return false;
  // Differences, not sums: window sides may be as large as INT64_MAX.
  if (o.window_right >= 0 && j - diag > o.window_right) return false;
  if (o.window_left >= 0 && diag - j > o.window_left && j >= o.sink_tokens) return false;
  return true;
}

namespace ref_detail {

/// fp64 attention of a validated dense problem; key j is visible to query i of attention head
/// h in batch row b iff visible(b, h, i, j).
template <class KV, class Visible>
void attend(const engine::problem<engine::dense_q, engine::dense_kv<KV>>& pb, const attention_options& opt,
            Visible&& visible) {
  const tensor_view<const float, 4> q = pb.qs.q;
  const tensor_view<const KV, 4> k = pb.ks.k, v = pb.ks.v;
  const tensor_view<float, 4> out = pb.qs.out;
  const tensor_view<float, 3> lse = pb.qs.lse;
  const double scale = pb.scale;
  const auto& hm = pb.heads;
  const std::int64_t seq_q = q.shape[1], seq_kv = k.shape[1];
  std::vector<double> s(static_cast<std::size_t>(seq_kv)), acc(static_cast<std::size_t>(pb.dim_v));
  for (std::int64_t b = 0; b < pb.batch; ++b)
    for (std::int64_t h = 0; h < hm.heads_out; ++h) {
      // Attention head h: query head h mod heads_q; KV head by the map.
      const std::int64_t hq = h % hm.heads_q;
      const std::int64_t hk = opt.heads == head_map::interleave ? h / (hm.heads_q / hm.heads_kv) : h % hm.heads_kv;
      for (std::int64_t i = 0; i < seq_q; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        const double sink = opt.sink_logits.absent() ? mx : static_cast<double>(opt.sink_logits(h));
        for (std::int64_t j = 0; j < seq_kv; ++j) {
          double x = -std::numeric_limits<double>::infinity();
          if (visible(b, h, i, j)) {
            double dot = 0;
            for (std::int64_t d = 0; d < pb.dim_qk; ++d)
              dot += static_cast<double>(q(b, i, hq, d)) * static_cast<double>(to_float(k(b, j, hk, d)));
            x = scale * dot;
            if (opt.softcap > 0) x = opt.softcap * std::tanh(x / opt.softcap);
          }
          s[static_cast<std::size_t>(j)] = x;
          mx = std::max(mx, x);
        }
        mx = std::max(mx, sink);
        double den = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        if (mx != -std::numeric_limits<double>::infinity()) {
          for (std::int64_t j = 0; j < seq_kv; ++j) {
            const double p = std::exp(s[static_cast<std::size_t>(j)] - mx);
            if (p == 0) continue;
            den += p;
            for (std::int64_t d = 0; d < pb.dim_v; ++d)
              acc[static_cast<std::size_t>(d)] += p * static_cast<double>(to_float(v(b, j, hk, d)));
          }
          den += std::exp(sink - mx);
        }
        for (std::int64_t d = 0; d < pb.dim_v; ++d)
          out(b, i, h, d) = den > 0 ? static_cast<float>(acc[static_cast<std::size_t>(d)] / den) : 0.0f;
        if (!lse.absent())
          lse(b, h, i) = den > 0 ? static_cast<float>(mx + std::log(den)) : -std::numeric_limits<float>::infinity();
      }
    }
}

}  // namespace ref_detail

/// Reference for headwise::attention: same arguments, same validation, fp64 accumulation.
template <class KT, class VT>
void attention(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
               tensor_view<float, 4> out, const attention_options& opt = {}, tensor_view<float, 3> lse = {}) {
  using KV = detail::kv_storage_t<KT>;
  const detail::checker c("headwise::reference::attention");
  const auto pb = detail::check_attention<KV>(c, q, tensor_view<const KV, 4>(k),
                                                        tensor_view<const KV, 4>(v), out, opt, lse);
  const std::int64_t seq_q = q.shape[1], seq_kv = k.shape[1];
  ref_detail::attend(pb, opt, [&](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) {
    return visible(opt, i, j, seq_q, seq_kv);
  });
}

}  // namespace headwise::reference
