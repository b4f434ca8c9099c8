/// @file
/// @brief Differential attention (DIFF Transformer V1 and V2) and Grouped Differential Attention
/// (GDA), fused: one engine pass per (sequence, K/V pair, query block) computes the signal and
/// the noise maps against the same K/V tiles (each V row read once for both), and its epilogue
/// combines them: (1 - λ_init)·RMSNorm(out_signal - λ·out_noise).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.hpp"

namespace headwise {

/// The per-head normalisation after the difference.
enum class diff_norm : std::uint8_t {
  rms,   ///< DIFF V1 / GDA: (1 - λ_init)·weight ⊙ x / sqrt(mean(x²) + eps) over the dim_v channels
  none,  ///< DIFF V2: the plain difference, no norm and no (1 - λ_init) factor
};

/// Options of diff_attention: every attention option (scale defaults to 1/sqrt(d), d the
/// half-head dim q.shape[3]; causal, windows, sink tokens, softcap, num_threads) plus the
/// differential ones. sink_logits and head_map::tile are not supported.
struct diff_options : attention_options {
  /// λ, one scalar per layer (DIFF V1/GDA: exp(λq1·λk1) - exp(λq2·λk2) + λ_init, see
  /// headwise::model::diff_lambda). Exactly one of lambda and lambda_tokens must be given.
  std::optional<float> lambda{};
  /// λ per token and signal head (DIFF V2: sigmoid(W_λ x)), shape (batch, seq_q, heads_signal).
  tensor_view<const float, 3> lambda_tokens{};
  /// λ_init of the layer: the output factor (1 - λ_init). Required with diff_norm::rms, not
  /// allowed with diff_norm::none (see headwise::model::diff_lambda_init).
  std::optional<float> lambda_init{};
  /// The normalisation after the difference.
  diff_norm norm = diff_norm::rms;
  /// RMSNorm weight shared by every head, shape (dim_v); absent = ones. Only with diff_norm::rms.
  tensor_view<const float, 1> norm_weight{};
  /// RMSNorm epsilon (> 0).
  float norm_eps = 1e-5f;
  /// false: k holds 2·pairs heads, interleaved (k1_j, k2_j) (DIFF V1, GDA); true: k holds
  /// `pairs` heads that both maps read (DIFF V2: one GQA call over the 2H striped heads).
  bool shared_keys = false;
};

namespace detail {

/// out_row <- combine(out_row, noise_row): the difference, then the optional RMSNorm.
struct diff_combine {
  const float* weight = nullptr;  ///< dim_v values or null (ones)
  float eps = 1e-5f;
  float factor = 1.0f;  ///< 1 - λ_init (rms) or 1
  bool rms = true;

  void operator()(float* o, const float* noise, float lambda, std::int64_t dv) const noexcept {
    double ss = 0.0;
    for (std::int64_t c = 0; c < dv; ++c) {
      o[c] -= lambda * noise[c];
      ss += static_cast<double>(o[c]) * o[c];
    }
    if (!rms) return;
    const auto f = static_cast<float>(factor / std::sqrt(ss / static_cast<double>(dv) + eps));
    for (std::int64_t c = 0; c < dv; ++c) o[c] *= weight != nullptr ? f * weight[c] : f;
  }
};

/// The query source of a differential problem: striped query heads in, signal heads out, noise
/// rows into scratch; finish() combines a finished block of rows (engine::final_target::done).
struct diff_q {
  tensor_view<const float, 4> q;    ///< (batch, seq_q, heads_signal + heads_noise, d)
  tensor_view<float, 4> out;        ///< (batch, seq_q, heads_signal, dv)
  tensor_view<float, 4> noise;      ///< scratch (batch, seq_q, heads_noise, dv)
  tensor_view<float, 3> lse_signal; ///< optional
  tensor_view<float, 3> lse_noise;  ///< optional
  tensor_view<const float, 3> lambda_tokens;
  float lambda = 0.0f;
  std::int64_t signal_per_pair = 1, signal_per_noise = 1;
  diff_combine combine;

  [[nodiscard]] std::int64_t heads_signal() const noexcept { return out.shape[2]; }
  [[nodiscard]] std::int64_t len(std::int64_t /*b*/) const noexcept { return q.shape[1]; }
  [[nodiscard]] const float* row(std::int64_t b, std::int64_t i, std::int64_t h) const noexcept {
    return &q(b, i, h, 0);
  }
  [[nodiscard]] float* out_row(std::int64_t b, std::int64_t i, std::int64_t h) const noexcept {
    return h < heads_signal() ? &out(b, i, h, 0) : &noise(b, i, h - heads_signal(), 0);
  }
  [[nodiscard]] float* lse_at(std::int64_t b, std::int64_t h, std::int64_t i) const noexcept {
    if (h < heads_signal()) return lse_signal.absent() ? nullptr : &lse_signal(b, h, i);
    return lse_noise.absent() ? nullptr : &lse_noise(b, h - heads_signal(), i);
  }
  /// Pairs [hk0, hk0 + nh) x positions [p0, p1) are written: each signal row of those pairs
  /// becomes combine(signal row, its noise head's row). The noise head of signal head i is
  /// i / signal_per_noise, which reads the same pair (heads_noise is a multiple of pairs).
  void finish(std::int64_t b, std::int64_t hk0, std::int64_t nh, std::int64_t p0, std::int64_t p1) const noexcept {
    const std::int64_t dv = out.shape[3];
    for (std::int64_t i = hk0 * signal_per_pair; i < (hk0 + nh) * signal_per_pair; ++i)
      for (std::int64_t p = p0; p < p1; ++p) {
        const float lam = lambda_tokens.absent() ? lambda : lambda_tokens(b, p, i);
        combine(&out(b, p, i, 0), &noise(b, p, i / signal_per_noise, 0), lam, dv);
      }
  }
};

/// The head counts of a differential call: heads_signal = out heads, heads_noise = the rest of
/// q's heads, pairs = v heads.
struct diff_heads {
  std::int64_t signal, noise, pairs;
};

/// Validates a diff_attention call (everything but the tensors' dtypes); returns the problem,
/// its query source still without noise scratch.
template <class KV>
std::pair<engine::problem<diff_q, engine::pair_kv<KV>>, diff_heads> check_diff(
    const checker& c, tensor_view<const float, 4> q, tensor_view<const KV, 4> k, tensor_view<const KV, 4> v,
    tensor_view<float, 4> out, const diff_options& opt, tensor_view<float, 3> lse_signal,
    tensor_view<float, 3> lse_noise) {
  c.view(q, "q", {1, 0, 2, 1}, {"batch", "seq_q", "heads_signal + heads_noise", "d"});
  c.view(k, "k", {1, 0, 1, 1}, {"batch", "seq_kv", opt.shared_keys ? "pairs" : "2 * pairs", "d"});
  c.view(v, "v", {1, 0, 1, 1}, {"batch", "seq_kv", "pairs", "dim_v"});
  c.view(out, "out", {1, 0, 1, 1}, {"batch", "seq_q", "heads_signal", "dim_v"});
  const std::int64_t batch = q.shape[0], seq_q = q.shape[1], d = q.shape[3], dv = v.shape[3];
  const diff_heads h{out.shape[2], q.shape[2] - out.shape[2], v.shape[2]};
  c.equal(k.shape[0], batch, "k.shape[0] (batch)", "q.shape[0]");
  c.equal(v.shape[0], batch, "v.shape[0] (batch)", "q.shape[0]");
  c.equal(out.shape[0], batch, "out.shape[0] (batch)", "q.shape[0]");
  c.equal(out.shape[1], seq_q, "out.shape[1] (seq_q)", "q.shape[1]");
  c.equal(k.shape[3], d, "k.shape[3] (d)", "q.shape[3]");
  c.require(k.shape[1] <= max_seq_kv, "k.shape[1] (seq_kv)", "<= 2^40 keys", k.shape[1]);
  c.equal(v.shape[1], k.shape[1], "v.shape[1] (seq_kv)", "k.shape[1]");
  c.equal(out.shape[3], dv, "out.shape[3] (dim_v)", "v.shape[3]");
  c.require(h.noise >= 1, "out.shape[2] (heads_signal)",
            "fewer than q.shape[2] = " + to_text(q.shape[2]) +
                " (q holds heads_signal + heads_noise striped heads, out the heads_signal outputs)",
            h.signal);
  c.require(h.signal % h.noise == 0, "q.shape[2] (heads_signal + heads_noise)",
            "heads_signal = out.shape[2] = " + to_text(h.signal) + " a multiple of heads_noise",
            to_text(q.shape[2]) + " (heads_noise = " + to_text(h.noise) + ")");
  c.require(h.noise % h.pairs == 0 && h.signal % h.pairs == 0, "v.shape[2] (pairs)",
            "a divisor of heads_noise = " + to_text(h.noise) + " and heads_signal = " + to_text(h.signal),
            h.pairs);
  c.equal(k.shape[2], opt.shared_keys ? h.pairs : 2 * h.pairs,
          opt.shared_keys ? "k.shape[2] (pairs, shared_keys)" : "k.shape[2] (2 * pairs: k1, k2 interleaved)",
          opt.shared_keys ? "v.shape[2]" : "2 * v.shape[2]");
  c.require(opt.heads == head_map::interleave, "options.heads", "head_map::interleave (GDA's own head map)",
            "head_map::tile");
  c.require(opt.sink_logits.absent(), "options.sink_logits", "absent (not supported by diff_attention)",
            "a view");
  check_options(c, opt, h.signal);
  // λ: exactly one of the scalar and the per-token tensor, finite values.
  c.require(opt.lambda.has_value() != !opt.lambda_tokens.absent(), "options.lambda",
            "exactly one of options.lambda and options.lambda_tokens",
            opt.lambda ? "both" : "neither");
  if (opt.lambda) c.require(std::isfinite(*opt.lambda), "options.lambda", "a finite value", *opt.lambda);
  if (!opt.lambda_tokens.absent()) {
    const auto& t = opt.lambda_tokens;
    c.view(t, "options.lambda_tokens", {1, 0, 1}, {"batch", "seq_q", "heads_signal"});
    c.equal(t.shape[0], batch, "options.lambda_tokens.shape[0] (batch)", "q.shape[0]");
    c.equal(t.shape[1], seq_q, "options.lambda_tokens.shape[1] (seq_q)", "q.shape[1]");
    c.equal(t.shape[2], h.signal, "options.lambda_tokens.shape[2] (heads_signal)", "out.shape[2]");
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < seq_q; ++i)
        for (std::int64_t s = 0; s < h.signal; ++s)
          if (!std::isfinite(t(b, i, s)))  // messages built only on failure: this loop is per token
            c.fail("options.lambda_tokens[" + to_text(b) + "][" + to_text(i) + "][" + to_text(s) + "]",
                   "a finite value", to_text(t(b, i, s)));
  }
  c.require(opt.norm == diff_norm::rms || opt.norm == diff_norm::none, "options.norm", "rms or none",
            static_cast<int>(opt.norm));
  if (opt.norm == diff_norm::rms) {
    c.require(opt.lambda_init.has_value(), "options.lambda_init",
              "the layer's λ_init with diff_norm::rms (the output factor 1 - λ_init; see "
              "headwise::model::diff_lambda_init)",
              "none");
    c.require(std::isfinite(*opt.lambda_init), "options.lambda_init", "a finite value", *opt.lambda_init);
    c.require(std::isfinite(opt.norm_eps) && opt.norm_eps > 0.0f, "options.norm_eps", "a finite value > 0",
              opt.norm_eps);
    if (!opt.norm_weight.absent()) {
      c.view(opt.norm_weight, "options.norm_weight", {1}, {"dim_v"});
      c.equal(opt.norm_weight.shape[0], dv, "options.norm_weight.shape[0] (dim_v)", "v.shape[3]");
      for (std::int64_t i = 0; i < dv; ++i)
        if (!std::isfinite(opt.norm_weight(i)))
          c.fail("options.norm_weight[" + to_text(i) + "]", "a finite value", to_text(opt.norm_weight(i)));
    }
  } else {
    c.require(!opt.lambda_init.has_value(), "options.lambda_init", "none with diff_norm::none (DIFF V2 has no factor)",
              opt.lambda_init ? to_text(*opt.lambda_init) : "none");
    c.require(opt.norm_weight.absent(), "options.norm_weight", "absent with diff_norm::none", "a view");
  }
  auto check_lse = [&](const tensor_view<float, 3>& l, const char* name, std::int64_t heads, const char* what,
                       const char* from) {
    if (l.absent()) return;
    const std::string n = name;
    c.view(l, n, {1, 1, 0}, {"batch", what, "seq_q"});
    c.equal(l.shape[0], batch, n + ".shape[0] (batch)", "q.shape[0]");
    c.equal(l.shape[1], heads, n + ".shape[1] (" + what + ")", from);
    c.equal(l.shape[2], seq_q, n + ".shape[2] (seq_q)", "q.shape[1]");
  };
  check_lse(lse_signal, "lse_signal", h.signal, "heads_signal", "out.shape[2]");
  check_lse(lse_noise, "lse_noise", h.noise, "heads_noise", "q.shape[2] - out.shape[2]");
  using in_q = std::pair<const char*, tensor_view<const float, 4>>;
  using in_kv = std::pair<const char*, tensor_view<const KV, 4>>;
  check_outputs(c, out, tensor_view<float, 3>{}, opt, in_q{"q", q}, in_kv{"k", k}, in_kv{"v", v});
  c.no_alias(out, "out", opt.lambda_tokens, "options.lambda_tokens");
  c.no_alias(out, "out", opt.norm_weight, "options.norm_weight");
  auto check_lse_out = [&](const tensor_view<float, 3>& l, const std::string& name) {
    if (l.absent()) return;
    c.no_self_overlap(l, name);
    c.no_alias(l, name, q, "q");
    c.no_alias(l, name, k, "k");
    c.no_alias(l, name, v, "v");
    c.no_alias(l, name, out, "out");
    c.no_alias(l, name, opt.lambda_tokens, "options.lambda_tokens");
    c.no_alias(l, name, opt.norm_weight, "options.norm_weight");
  };
  check_lse_out(lse_signal, "lse_signal");
  check_lse_out(lse_noise, "lse_noise");
  if (!lse_signal.absent() && !lse_noise.absent()) c.no_alias(lse_noise, "lse_noise", lse_signal, "lse_signal");

  engine::problem<diff_q, engine::pair_kv<KV>> pb;
  pb.qs.q = q;
  pb.qs.out = out;
  pb.qs.lse_signal = lse_signal;
  pb.qs.lse_noise = lse_noise;
  pb.qs.lambda_tokens = opt.lambda_tokens;
  pb.qs.lambda = opt.lambda.value_or(0.0f);
  pb.qs.signal_per_pair = h.signal / h.pairs;
  pb.qs.signal_per_noise = h.signal / h.noise;
  const bool rms = opt.norm == diff_norm::rms;
  pb.qs.combine = diff_combine{opt.norm_weight.absent() ? nullptr : opt.norm_weight.data, opt.norm_eps,
                               rms ? 1.0f - *opt.lambda_init : 1.0f, rms};
  pb.ks = engine::pair_kv<KV>{k, v, opt.shared_keys};
  pb.heads = engine::head_mapper::make_differential(h.signal, h.noise, h.pairs);
  pb.batch = batch;
  pb.dim_qk = d;
  pb.dim_v = dv;
  pb.scale = resolve_scale(opt, d);
  return {pb, h};
}

}  // namespace detail

/// Differential attention, fused: DIFF V1, GDA (grouped: fewer noise than signal heads) and
/// DIFF V2 (per-token λ, no norm) through one engine pass.
///   out1_i = softmax(s·q1_i K1_{i / r1}ᵀ + M) V_{i / r1}          signal head i  (r1 = hs / pairs)
///   out2_n = softmax(s·q2_n K2_{n / r2}ᵀ + M) V_{n / r2}          noise head n   (r2 = hn / pairs)
///   out_i  = (1 - λ_init)·RMSNorm(out1_i - λ·out2_{i / G})       G = hs / hn   (diff_norm::rms)
///          =  out1_i - λ_{b,t,i}·out2_{i / G}                     (diff_norm::none, DIFF V2)
/// q: (batch, seq_q, hs + hn, d) f32, striped: hn groups of [G signal heads, 1 noise head]
///    (G = 1: DIFF's pairs (2i, 2i+1));
/// k: (batch, seq_kv, 2·pairs, d), heads interleaved (k1_j, k2_j), or (batch, seq_kv, pairs, d)
///    with options.shared_keys; v: (batch, seq_kv, pairs, dim_v) (V1/GDA: dim_v = 2d); k and v in
///    f32, bf16 or f16;
/// out: (batch, seq_q, hs, dim_v) f32 (hs = out.shape[2]; hn = q.shape[2] - hs);
/// lse_signal (optional): (batch, hs, seq_q); lse_noise (optional): (batch, hn, seq_q).
/// Rows with no visible key give out = 0 (lse -inf). Throws argument_error before any work.
template <class KT, class VT>
void diff_attention(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
                    tensor_view<float, 4> out, const diff_options& options, tensor_view<float, 3> lse_signal = {},
                    tensor_view<float, 3> lse_noise = {}) {
  using KV = detail::kv_storage_t<KT>;
  static_assert(std::is_same_v<KV, detail::kv_storage_t<VT>>, "headwise::diff_attention: k and v must share a dtype");
  static_assert(is_kv_dtype_v<KV>, "headwise: K/V storage must be float, headwise::bf16 or headwise::f16");
  const detail::checker c("headwise::diff_attention");
  auto [pb, h] = detail::check_diff<KV>(c, q, tensor_view<const KV, 4>(k), tensor_view<const KV, 4>(v), out, options,
                                        lse_signal, lse_noise);
  if (out.numel() == 0) return;
  // Noise rows live here until their block is combined: every row is written by the work item
  // (or split merge) that then reads it, so the buffer needs no initialisation. Its size is
  // out's times hn/hs (size checked like out's: out.numel() fits).
  const std::int64_t dv = pb.dim_v;
  const auto scratch = std::make_unique_for_overwrite<float[]>(
      static_cast<std::size_t>(q.shape[0] * q.shape[1] * h.noise * dv));
  pb.qs.noise = bshd<float>(scratch.get(), q.shape[0], q.shape[1], h.noise, dv);
  detail::run_attention<tile::default_arch>(pb, options, default_blocking());
}

}  // namespace headwise
