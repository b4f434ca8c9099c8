/// @file
/// @brief Naive fp64 references for differential attention (headwise::diff_attention: DIFF V1,
/// DIFF V2, GDA), written straight from the formulas (docs: ALGORITHMS.md §2-§3), never through
/// the engine: an explicit mask per key, a max-subtracted softmax in double, then the
/// difference and the RMSNorm in double. Slow on purpose; used by the tests (include it
/// explicitly). K/V are read through headwise::to_float, so bf16/f16 inputs are taken at their
/// stored values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../variants/diff.hpp"

namespace headwise::reference {

namespace diff_detail {

inline constexpr double kNegInf = -std::numeric_limits<double>::infinity();

/// True iff key j is visible to query i (attention_options): the diagonal d(i) is j = i
/// (top_left) or j = i + seq_kv - seq_q (bottom_right, and the window's anchor without causal);
/// causal hides j > d(i); the window keeps [d(i) - window_left, d(i) + window_right] (-1 =
/// unbounded side); the first sink_tokens keys ignore the left window bound.
inline bool key_visible(const attention_options& o, std::int64_t i, std::int64_t j, std::int64_t seq_q,
                        std::int64_t seq_kv) {
  const std::int64_t diag = o.causal == causal_mode::top_left ? i : i + (seq_kv - seq_q);
  if (o.causal != causal_mode::none && j > diag) return false;
  if (o.window_right >= 0 && j - diag > o.window_right) return false;
  const bool sink = j < o.sink_tokens;
  if (!sink && o.window_left >= 0 && diag - j > o.window_left) return false;
  return true;
}

/// The scaled (and soft-capped) logits of one query row against one K head: -inf where masked.
template <class KT>
void logits_row(const float* qrow, const tensor_view<KT, 4>& k, std::int64_t b, std::int64_t kh, std::int64_t i,
                std::int64_t seq_q, double scale, const attention_options& o, std::vector<double>& s) {
  const std::int64_t seq_kv = k.shape[1], d = k.shape[3];
  s.assign(static_cast<std::size_t>(seq_kv), kNegInf);
  for (std::int64_t j = 0; j < seq_kv; ++j) {
    if (!key_visible(o, i, j, seq_q, seq_kv)) continue;
    double dot = 0;
    for (std::int64_t c = 0; c < d; ++c)
      dot += static_cast<double>(qrow[c]) * static_cast<double>(to_float(k(b, j, kh, c)));
    double x = scale * dot;
    if (o.softcap > 0.0f) x = static_cast<double>(o.softcap) * std::tanh(x / static_cast<double>(o.softcap));
    s[static_cast<std::size_t>(j)] = x;
  }
}

/// Softmax of a logit row in place (max-subtracted); returns its log-sum-exp. A row with no
/// visible key becomes all zeros and returns -inf.
inline double softmax_in_place(std::vector<double>& s) {
  double mx = kNegInf;
  for (const double x : s) mx = std::max(mx, x);
  if (mx == kNegInf) {
    std::fill(s.begin(), s.end(), 0.0);
    return kNegInf;
  }
  double den = 0;
  for (double& x : s) {
    x = std::exp(x - mx);  // exp(-inf) = 0 for masked keys
    den += x;
  }
  for (double& x : s) x /= den;
  return mx + std::log(den);
}

/// o = Σ_j p_j V[b, j, vh, :].
template <class VT>
void weighted_values(const std::vector<double>& p, const tensor_view<VT, 4>& v, std::int64_t b, std::int64_t vh,
                     std::vector<double>& o) {
  const std::int64_t dv = v.shape[3];
  o.assign(static_cast<std::size_t>(dv), 0.0);
  for (std::int64_t j = 0; j < v.shape[1]; ++j) {
    const double pj = p[static_cast<std::size_t>(j)];
    if (pj == 0.0) continue;
    for (std::int64_t c = 0; c < dv; ++c)
      o[static_cast<std::size_t>(c)] += pj * static_cast<double>(to_float(v(b, j, vh, c)));
  }
}

/// (1 - λ_init)·weight ⊙ x / sqrt(mean(x²) + eps), in place.
inline void rms_norm(std::vector<double>& x, double factor, const tensor_view<const float, 1>& weight, double eps) {
  double ss = 0;
  for (const double e : x) ss += e * e;
  const double f = factor / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  for (std::size_t c = 0; c < x.size(); ++c)
    x[c] *= weight.absent() ? f : f * static_cast<double>(weight(static_cast<std::int64_t>(c)));
}

inline double resolve_scale(const attention_options& o, std::int64_t d) {
  return o.scale ? static_cast<double>(*o.scale) : 1.0 / std::sqrt(static_cast<double>(d));
}

/// A view of exactly `want` (view checks V1-V4, then each extent), or absent when `optional`.
template <class T, std::size_t R>
void check_exact(const detail::checker& c, const tensor_view<T, R>& t, const std::string& name,
                 const std::array<std::int64_t, R>& want, bool optional) {
  if (optional && t.absent()) return;
  std::array<std::int64_t, R> lo{};
  std::array<const char*, R> axes{};
  for (std::size_t i = 0; i < R; ++i) axes[i] = "axis";
  c.view(t, name, lo, axes);
  for (std::size_t i = 0; i < R; ++i)
    c.equal(t.shape[i], want[i], name + ".shape[" + std::to_string(i) + "]", "the reference's shape");
}

/// q, k, v, out of a differential reference: views with the same batch, seq_kv and dims.
template <class KT, class VT>
void check_qkvo(const detail::checker& c, tensor_view<const float, 4> q, tensor_view<KT, 4> k,
                tensor_view<VT, 4> v, tensor_view<float, 4> out) {
  c.view(q, "q", {1, 0, 1, 1}, {"batch", "seq_q", "heads", "d"});
  c.view(k, "k", {1, 0, 1, 1}, {"batch", "seq_kv", "heads", "d"});
  c.view(v, "v", {1, 0, 1, 1}, {"batch", "seq_kv", "heads", "dim_v"});
  c.view(out, "out", {1, 0, 0, 1}, {"batch", "seq_q", "heads", "dim_v"});
  c.equal(k.shape[0], q.shape[0], "k.shape[0]", "q.shape[0]");
  c.equal(v.shape[0], q.shape[0], "v.shape[0]", "q.shape[0]");
  c.equal(out.shape[0], q.shape[0], "out.shape[0]", "q.shape[0]");
  c.equal(out.shape[1], q.shape[1], "out.shape[1]", "q.shape[1]");
  c.equal(v.shape[1], k.shape[1], "v.shape[1]", "k.shape[1]");
}

}  // namespace diff_detail

/// Reference for headwise::diff_attention (same arguments and layouts):
///   G = hs/hn, r1 = hs/pairs, r2 = hn/pairs (hs = out.shape[2], hn = q.shape[2] - hs);
///   signal head i: query head (i/G)·(G+1) + i%G, K head 2·(i/r1) (or i/r1 with shared_keys),
///                  V head i/r1;
///   noise head n:  query head n·(G+1) + G, K head 2·(n/r2) + 1 (or n/r2), V head n/r2;
///   diff_i = out1_i - λ·out2_{i/G}; out_i = (1 - λ_init)·RMSNorm(diff_i) or diff_i (norm none).
/// lse_signal (batch, hs, seq_q) and lse_noise (batch, hn, seq_q) are optional; so is pre_norm
/// (batch, seq_q, hs, dim_v): diff_i before the norm (used by the tests to scale tolerances).
/// Only the shape relations it relies on are checked.
template <class KT, class VT>
void diff_attention(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
                    tensor_view<float, 4> out, const diff_options& opt, tensor_view<float, 3> lse_signal = {},
                    tensor_view<float, 3> lse_noise = {}, tensor_view<float, 4> pre_norm = {}) {
  const detail::checker c("headwise::reference::diff_attention");
  diff_detail::check_qkvo(c, q, k, v, out);
  const std::int64_t batch = q.shape[0], seq_q = q.shape[1], d = q.shape[3], dv = v.shape[3];
  const std::int64_t hs = out.shape[2], hn = q.shape[2] - hs, pairs = v.shape[2];
  c.require(hn >= 1 && pairs >= 1 && hs % hn == 0 && hn % pairs == 0 && hs % pairs == 0, "q.shape[2], out.shape[2], v.shape[2]",
            "hs % hn == 0, pairs dividing hs and hn", "hs " + std::to_string(hs) + ", hn " + std::to_string(hn) +
                                                         ", pairs " + std::to_string(pairs));
  c.equal(k.shape[2], opt.shared_keys ? pairs : 2 * pairs, "k.shape[2]", "(2 *) pairs");
  c.equal(k.shape[3], d, "k.shape[3]", "q.shape[3]");
  c.equal(out.shape[3], dv, "out.shape[3]", "v.shape[3]");
  c.require(opt.lambda.has_value() != !opt.lambda_tokens.absent(), "options.lambda", "exactly one λ", "");
  const bool rms = opt.norm == diff_norm::rms;
  c.require(!rms || opt.lambda_init.has_value(), "options.lambda_init", "a value with diff_norm::rms", "none");
  diff_detail::check_exact(c, opt.lambda_tokens, "options.lambda_tokens", {batch, seq_q, hs}, true);
  diff_detail::check_exact(c, opt.norm_weight, "options.norm_weight", {dv}, true);
  diff_detail::check_exact(c, lse_signal, "lse_signal", {batch, hs, seq_q}, true);
  diff_detail::check_exact(c, lse_noise, "lse_noise", {batch, hn, seq_q}, true);
  diff_detail::check_exact(c, pre_norm, "pre_norm", {batch, seq_q, hs, dv}, true);

  const std::int64_t G = hs / hn, r1 = hs / pairs, r2 = hn / pairs;
  const double scale = diff_detail::resolve_scale(opt, d);
  const double factor = rms ? 1.0 - static_cast<double>(*opt.lambda_init) : 1.0;
  const double eps = static_cast<double>(opt.norm_eps);
  std::vector<double> p;
  std::vector<std::vector<double>> noise(static_cast<std::size_t>(hn));
  std::vector<double> o1;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < seq_q; ++i) {
      for (std::int64_t n = 0; n < hn; ++n) {
        const std::int64_t qh = n * (G + 1) + G, pair = n / r2, kh = opt.shared_keys ? pair : 2 * pair + 1;
        diff_detail::logits_row(&q(b, i, qh, 0), k, b, kh, i, seq_q, scale, opt, p);
        const double lse = diff_detail::softmax_in_place(p);
        diff_detail::weighted_values(p, v, b, pair, noise[static_cast<std::size_t>(n)]);
        if (!lse_noise.absent()) lse_noise(b, n, i) = static_cast<float>(lse);
      }
      for (std::int64_t s = 0; s < hs; ++s) {
        const std::int64_t qh = (s / G) * (G + 1) + s % G, pair = s / r1, kh = opt.shared_keys ? pair : 2 * pair;
        diff_detail::logits_row(&q(b, i, qh, 0), k, b, kh, i, seq_q, scale, opt, p);
        const double lse = diff_detail::softmax_in_place(p);
        diff_detail::weighted_values(p, v, b, pair, o1);
        if (!lse_signal.absent()) lse_signal(b, s, i) = static_cast<float>(lse);
        const double lam = static_cast<double>(opt.lambda ? *opt.lambda : opt.lambda_tokens(b, i, s));
        const auto& o2 = noise[static_cast<std::size_t>(s / G)];
        for (std::size_t ch = 0; ch < o1.size(); ++ch) o1[ch] -= lam * o2[ch];
        if (!pre_norm.absent())
          for (std::int64_t ch = 0; ch < dv; ++ch)
            pre_norm(b, i, s, ch) = static_cast<float>(o1[static_cast<std::size_t>(ch)]);
        if (rms) diff_detail::rms_norm(o1, factor, opt.norm_weight, eps);
        for (std::int64_t ch = 0; ch < dv; ++ch) out(b, i, s, ch) = static_cast<float>(o1[static_cast<std::size_t>(ch)]);
      }
    }
}

/// An independent reference for DIFF Transformer V1 in its own indexing
/// (microsoft/unilm Diff-Transformer, flash versions), not GDA's striping:
///   q (batch, seq_q, 2h, d): diff head i owns query half-heads 2i (Q1) and 2i+1 (Q2);
///   k (batch, seq_kv, 2h_kv, d): K1 = k[2⌊i/n_rep⌋], K2 = k[2⌊i/n_rep⌋ + 1], n_rep = h/h_kv;
///   v (batch, seq_kv, h_kv, dim_v): V_{⌊i/n_rep⌋};
///   H_i = (A1_i - λ·A2_i)·V (the maps are combined before V, as in the paper's formula);
///   out_i = (1 - λ_init)·weight ⊙ H_i / sqrt(mean(H_i²) + eps).
/// The mask and softcap options apply to both maps; scale defaults to 1/sqrt(d).
template <class KT, class VT>
void diff_transformer(tensor_view<const float, 4> q, tensor_view<KT, 4> k, tensor_view<VT, 4> v,
                      tensor_view<float, 4> out, double lambda, double lambda_init, const attention_options& mask,
                      tensor_view<const float, 1> weight = {}, double eps = 1e-5) {
  const detail::checker c("headwise::reference::diff_transformer");
  diff_detail::check_qkvo(c, q, k, v, out);
  const std::int64_t batch = q.shape[0], seq_q = q.shape[1], d = q.shape[3], dv = v.shape[3];
  const std::int64_t h = q.shape[2] / 2, h_kv = v.shape[2];
  c.require(h_kv >= 1 && q.shape[2] == 2 * h && out.shape[2] == h && k.shape[2] == 2 * h_kv && h % h_kv == 0,
            "q.shape[2]",
            "2h query half-heads, h outputs, 2h_kv keys, h_kv | h", q.shape[2]);
  c.equal(k.shape[3], d, "k.shape[3]", "q.shape[3]");
  c.equal(out.shape[3], dv, "out.shape[3]", "v.shape[3]");
  diff_detail::check_exact(c, weight, "weight", {dv}, true);
  const std::int64_t n_rep = h / h_kv, seq_kv = k.shape[1];
  const double scale = diff_detail::resolve_scale(mask, d);
  std::vector<double> a1, a2, hrow(static_cast<std::size_t>(dv));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < seq_q; ++i)
      for (std::int64_t hd = 0; hd < h; ++hd) {
        const std::int64_t g = hd / n_rep;
        diff_detail::logits_row(&q(b, i, 2 * hd, 0), k, b, 2 * g, i, seq_q, scale, mask, a1);
        diff_detail::logits_row(&q(b, i, 2 * hd + 1, 0), k, b, 2 * g + 1, i, seq_q, scale, mask, a2);
        diff_detail::softmax_in_place(a1);
        diff_detail::softmax_in_place(a2);
        std::fill(hrow.begin(), hrow.end(), 0.0);
        for (std::int64_t j = 0; j < seq_kv; ++j) {
          const double w = a1[static_cast<std::size_t>(j)] - lambda * a2[static_cast<std::size_t>(j)];
          if (w == 0.0) continue;
          for (std::int64_t ch = 0; ch < dv; ++ch)
            hrow[static_cast<std::size_t>(ch)] += w * static_cast<double>(to_float(v(b, j, g, ch)));
        }
        diff_detail::rms_norm(hrow, 1.0 - lambda_init, weight, eps);
        for (std::int64_t ch = 0; ch < dv; ++ch)
          out(b, i, hd, ch) = static_cast<float>(hrow[static_cast<std::size_t>(ch)]);
      }
}

}  // namespace headwise::reference
