/// @file
/// @brief Dense attention: MHA, GQA, MQA and SQA (by head counts), reverse SQA (tile head
/// map), with causal alignments, sliding window, sink tokens, sink logits, softcap and LSE.
#pragma once

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "../core/checks.hpp"
#include "../core/dtype.hpp"
#include "../core/options.hpp"
#include "../engine/engine.hpp"

namespace headwise {

namespace detail {

/// Checks the head counts against the head map; returns the map.
inline engine::head_mapper check_heads(const checker& c, const attention_options& opt, std::int64_t heads_q,
                                       std::int64_t heads_kv, const std::string& kv_arg) {
  c.require(opt.heads == head_map::interleave || opt.heads == head_map::tile, "options.heads",
            "interleave or tile", static_cast<int>(opt.heads));
  if (opt.heads == head_map::interleave) {
    if (heads_q % heads_kv != 0)
      c.fail(kv_arg,
             "a divisor of heads_q = " + to_text(heads_q) +
                 " for head_map::interleave (use head_map::tile for heads_kv > heads_q, reverse SQA)",
             to_text(heads_kv));
  } else {
    const std::int64_t hi = std::max(heads_q, heads_kv), lo = std::min(heads_q, heads_kv);
    if (hi % lo != 0)
      c.fail(kv_arg, "heads_q and heads_kv where one divides the other for head_map::tile",
             "heads_q = " + to_text(heads_q) + ", heads_kv = " + to_text(heads_kv));
  }
  return engine::head_mapper::make(opt.heads, heads_q, heads_kv);
}

/// The longest key sequence a dense call accepts: 2^40 keys (no cache is near it; zero-stride
/// views could declare up to 2^62, and tile and split arithmetic would then overflow).
inline constexpr std::int64_t max_seq_kv = std::int64_t{1} << 40;

/// The largest logit softcap: cap·log2(e) must stay finite in the tile (FLT_MAX / log2(e) ≈ 2.36e38).
inline constexpr float max_softcap = 1e38f;

/// Checks the options that do not depend on the tensors' layout.
inline void check_options(const checker& c, const attention_options& opt, std::int64_t heads_out) {
  if (opt.scale) c.require(std::isfinite(*opt.scale), "options.scale", "a finite value", *opt.scale);
  // 0 = off; else a normal float whose reciprocal and cap·log2(e) (the tile's factors) are finite.
  c.require(opt.softcap == 0.0f ||
                (opt.softcap >= std::numeric_limits<float>::min() && opt.softcap <= max_softcap),
            "options.softcap", "0 (off) or a value in [1.17549435e-38, 1e38]", opt.softcap);
  c.require(opt.window_left >= -1, "options.window_left", ">= -1 (-1 = unbounded)", opt.window_left);
  c.require(opt.window_right >= -1, "options.window_right", ">= -1 (-1 = unbounded)", opt.window_right);
  c.require(opt.causal == causal_mode::none || opt.window_right <= 0, "options.window_right",
            "-1 or 0 with a causal mask", opt.window_right);
  c.require(opt.sink_tokens >= 0, "options.sink_tokens", ">= 0", opt.sink_tokens);
  c.require(opt.num_threads >= 0, "options.num_threads", ">= 0 (0 = OpenMP default)", opt.num_threads);
  c.require(opt.causal == causal_mode::none || opt.causal == causal_mode::bottom_right ||
                opt.causal == causal_mode::top_left,
            "options.causal", "none, bottom_right or top_left", static_cast<int>(opt.causal));
  if (!opt.sink_logits.absent()) {
    c.view(opt.sink_logits, "options.sink_logits", {1}, {"heads_out"});
    c.equal(opt.sink_logits.shape[0], heads_out, "options.sink_logits.shape[0] (heads_out)", "the output heads");
    for (std::int64_t h = 0; h < heads_out; ++h) {
      const float s = opt.sink_logits(h);
      if (std::isnan(s) || s == INFINITY)
        c.fail("options.sink_logits[" + to_text(h) + "]", "a finite value or -inf (no sink)", to_text(s));
    }
  }
}

/// Outputs (out, lse) may not overlap an input, sink logits or each other; V may alias K.
template <class O, class L, class... In>
void check_outputs(const checker& c, const O& out, const L& lse, const attention_options& opt,
                   const std::pair<const char*, In>&... inputs) {
  c.no_self_overlap(out, "out");
  (c.no_alias(out, "out", inputs.second, inputs.first), ...);
  c.no_alias(out, "out", opt.sink_logits, "options.sink_logits");
  if (!lse.absent()) {
    c.no_self_overlap(lse, "lse");
    c.no_alias(lse, "lse", out, "out");
    (c.no_alias(lse, "lse", inputs.second, inputs.first), ...);
    c.no_alias(lse, "lse", opt.sink_logits, "options.sink_logits");
  }
}

/// Softmax scale: the option, or 1/sqrt(dim_qk).
inline float resolve_scale(const attention_options& opt, std::int64_t dim_qk) {
  return opt.scale ? *opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim_qk)));
}

/// Fills the problem's fields that do not depend on where its rows live.
template <class QS, class KS>
void finish_problem(engine::problem<QS, KS>& pb, const attention_options& opt, const engine::head_mapper& heads,
                    std::int64_t batch, std::int64_t dim_qk, std::int64_t dim_v) {
  pb.sink_logits = opt.sink_logits;
  pb.heads = heads;
  pb.batch = batch;
  pb.dim_qk = dim_qk;
  pb.dim_v = dim_v;
  pb.scale = resolve_scale(opt, dim_qk);
}

/// Validates the arguments of a dense attention call; returns the resolved problem.
template <class KV>
engine::problem<engine::dense_q, engine::dense_kv<KV>> check_attention(
    const checker& c, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, tensor_view<const KV, 4> v,
    tensor_view<float, 4> out, const attention_options& opt, tensor_view<float, 3> lse) {
  static_assert(is_kv_dtype_v<KV>, "headwise: K/V storage must be float, headwise::bf16 or headwise::f16");
  c.view(q, "q", {1, 0, 1, 1}, {"batch", "seq_q", "heads_q", "dim_qk"});
  c.view(k, "k", {1, 0, 1, 1}, {"batch", "seq_kv", "heads_kv", "dim_qk"});
  c.view(v, "v", {1, 0, 1, 1}, {"batch", "seq_kv", "heads_kv", "dim_v"});
  c.view(out, "out", {1, 0, 1, 1}, {"batch", "seq_q", "heads_out", "dim_v"});
  const std::int64_t batch = q.shape[0], seq_q = q.shape[1], heads_q = q.shape[2], dim_qk = q.shape[3];
  const std::int64_t seq_kv = k.shape[1], heads_kv = k.shape[2], dim_v = v.shape[3];
  c.equal(k.shape[0], batch, "k.shape[0] (batch)", "q.shape[0]");
  c.equal(v.shape[0], batch, "v.shape[0] (batch)", "q.shape[0]");
  c.equal(out.shape[0], batch, "out.shape[0] (batch)", "q.shape[0]");
  c.equal(k.shape[3], dim_qk, "k.shape[3] (dim_qk)", "q.shape[3]");
  c.require(seq_kv <= max_seq_kv, "k.shape[1] (seq_kv)", "<= 2^40 keys", seq_kv);
  c.equal(v.shape[1], seq_kv, "v.shape[1] (seq_kv)", "k.shape[1]");
  c.equal(v.shape[2], heads_kv, "v.shape[2] (heads_kv)", "k.shape[2]");
  c.equal(out.shape[1], seq_q, "out.shape[1] (seq_q)", "q.shape[1]");
  c.equal(out.shape[3], dim_v, "out.shape[3] (dim_v)", "v.shape[3]");
  const engine::head_mapper heads = check_heads(c, opt, heads_q, heads_kv, "k.shape[2] (heads_kv)");
  c.equal(out.shape[2], heads.heads_out, "out.shape[2] (heads_out)",
          opt.heads == head_map::interleave ? "heads_q" : "max(heads_q, heads_kv)");
  if (!lse.absent()) {
    c.view(lse, "lse", {1, 1, 0}, {"batch", "heads_out", "seq_q"});
    c.equal(lse.shape[0], batch, "lse.shape[0] (batch)", "q.shape[0]");
    c.equal(lse.shape[1], heads.heads_out, "lse.shape[1] (heads_out)", "out.shape[2]");
    c.equal(lse.shape[2], seq_q, "lse.shape[2] (seq_q)", "q.shape[1]");
  }
  check_options(c, opt, heads.heads_out);
  check_outputs(c, out, lse, opt, std::pair<const char*, decltype(q)>{"q", q},
                std::pair<const char*, decltype(k)>{"k", k}, std::pair<const char*, decltype(v)>{"v", v});

  engine::problem<engine::dense_q, engine::dense_kv<KV>> pb;
  pb.qs = engine::dense_q{q, out, lse};
  pb.ks = engine::dense_kv<KV>{k, v};
  finish_problem(pb, opt, heads, batch, dim_qk, dim_v);
  return pb;
}

/// The band the options describe (bottom-right diagonal unless top_left), or none.
inline bool banded(const attention_options& opt) {
  return opt.causal != causal_mode::none || opt.window_left >= 0 || opt.window_right >= 0;
}
inline engine::band_spec make_band(const attention_options& opt) {
  engine::band_spec m;
  m.top_left = opt.causal == causal_mode::top_left;
  m.left = opt.window_left;
  m.right = opt.causal != causal_mode::none ? 0 : opt.window_right;
  m.sink_tokens = opt.sink_tokens;
  return m;
}

/// Picks the mask and score policies (compile-time fast paths) and runs the engine.
template <class Arch, class QS, class KS>
void run_attention(const engine::problem<QS, KS>& pb, const attention_options& opt, const engine::blocking& blk) {
  auto with_score = [&](const auto& mask) {
    if (opt.softcap > 0.0f) {
      engine::run<Arch>(pb, mask, engine::softcap_score{opt.softcap}, blk, opt.num_threads);
    } else {
      engine::run<Arch>(pb, mask, engine::plain_score{}, blk, opt.num_threads);
    }
  };
  if (banded(opt)) {
    with_score(make_band(opt));
  } else {
    with_score(engine::no_mask_spec{});
  }
}

template <class T>
using kv_storage_t = std::remove_const_t<T>;

}  // namespace detail

/// Default work decomposition for this architecture (lanes per work item, keys per tile).
template <class Arch = tile::default_arch>
engine::blocking default_blocking() noexcept {
  return engine::blocking{};
}

/// Scaled dot-product attention, FlashAttention-style, on [batch, seq, heads, dim] views:
///   out[b,i,h] = Σ_j softmax_j(scale·q[b,i,h]·k[b,j,g(h)] + mask) v[b,j,g(h)]
/// q: (batch, seq_q, heads_q, dim_qk) f32; k: (batch, seq_kv, heads_kv, dim_qk) and
/// v: (batch, seq_kv, heads_kv, dim_v) in f32, bf16 or f16 (v may alias a prefix of k);
/// out: (batch, seq_q, heads_out, dim_v) f32; lse (optional): (batch, heads_out, seq_q), natural
/// log. MHA, GQA, MQA and SQA follow from the head counts; see attention_options for the rest.
/// Rows with no visible key give out = 0, lse = -inf. Throws argument_error before any work.
template <class KT, class VT>
void attention(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
               tensor_view<float, 4> out, const attention_options& options = {},
               tensor_view<float, 3> lse = {}) {
  using KV = detail::kv_storage_t<KT>;
  static_assert(std::is_same_v<KV, detail::kv_storage_t<VT>>, "headwise::attention: k and v must share a dtype");
  const detail::checker c("headwise::attention");
  const auto pb = detail::check_attention<KV>(c, q, tensor_view<const KV, 4>(k), tensor_view<const KV, 4>(v), out,
                                              options, lse);
  detail::run_attention<tile::default_arch>(pb, options, default_blocking());
}

/// Frees the calling thread's scratch: the tile buffers and split-KV partial states that every
/// call on this thread keeps for the next one (README, "Scratch memory"). The next call
/// allocates it again. For long-lived threads after an unusually large call; never needed
/// for correctness. Must not run while this thread is inside a headwise call (it cannot be:
/// headwise calls no user code).
inline void release_scratch() noexcept {
  engine::call_scratch& s = engine::thread_scratch();
  if (!s.busy) s = engine::call_scratch{};
}

/// attention() with an explicit work decomposition (benchmarks and tuning).
template <class KT, class VT>
void attention_blocked(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
                       tensor_view<float, 4> out, const attention_options& options, tensor_view<float, 3> lse,
                       const engine::blocking& blk) {
  using KV = detail::kv_storage_t<KT>;
  const detail::checker c("headwise::attention_blocked");
  c.require(blk.rows >= 1 && blk.block_kv >= 1 && blk.decode_block_kv >= 1 && blk.decode_block_kv16 >= 1 &&
                   blk.split_kv >= 0 && blk.prefetch_bytes >= 0,
               "blk",
               "rows, block_kv, decode_block_kv, decode_block_kv16 >= 1 and split_kv, prefetch_bytes >= 0",
               std::to_string(blk.rows) + ", " + std::to_string(blk.block_kv) + ", " +
                   std::to_string(blk.decode_block_kv) + ", " + std::to_string(blk.decode_block_kv16) + ", " +
                   std::to_string(blk.split_kv) + ", " +
                   std::to_string(blk.prefetch_bytes));
  const auto pb = detail::check_attention<KV>(c, q, tensor_view<const KV, 4>(k), tensor_view<const KV, 4>(v), out,
                                              options, lse);
  detail::run_attention<tile::default_arch>(pb, options, blk);
}

}  // namespace headwise
