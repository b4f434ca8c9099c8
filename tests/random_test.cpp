// Randomized differential testing of every public entry point against the fp64 references
// (issue 7, item 1). Each configuration i is drawn from (seed, i) alone, run through the kernel
// and through headwise::reference::attention / reference::diff_attention on the same stored
// inputs, and checked with the tolerances of the hand-written tests.
//
// Entry points and what the draw covers:
//   * attention: MHA/GQA/MQA/SQA (head_map::interleave) and head_map::tile (incl. reverse SQA);
//     f32/bf16/f16 K/V; dims 1..256 (72, 80, 96, 128 favoured), dim_qk != dim_v, 576/512;
//     seq_q 0..~300, seq_kv 0..~300 (non-multiples of the 16/64 tiles favoured), a decode mode
//     (seq_q 1..4, seq_kv up to 5000: the key-lane and split-KV paths) and a long-prefill mode
//     (300..1100 both); batch 1..3; causal none/bottom_right/top_left, sliding windows (incl.
//     INT64_MAX sides), sink tokens, sink logits (incl. -inf), softcap, explicit scale (incl.
//     negative and 0), large logits; padded and BHSD-ordered views of q, k, v, out and lse,
//     V aliasing a prefix of K; LSE on/off; num_threads 0..3.
//   * attention_blocked: the same with a random work decomposition (rows, block_kv,
//     decode_block_kv, split_kv down to 1, prefetch_bytes): split-KV and its merge at small sizes.
//   * attention_varlen, attention_paged, attention_paged_varlen: ragged lengths (0 included),
//     random page sizes, shuffled block tables with garbage past each sequence's last page,
//     spare pages (NaN), strided pages; against one reference call per sequence.
//   * mla_absorbed, mla_absorbed_paged: heads 1..128, d_c + d_rope up to 512 + 64, required scale,
//     V = the first d_c values of the latent; strided latent.
//   * diff_attention: hs:hn:pairs with hs % hn == 0 and pairs | hn, shared_keys, λ or per-token λ,
//     norm rms (λ_init, weight, eps) or none, optional LSEs; against reference::diff_attention.
//   * merge_states: attention over keys [0, s) and [s, skv) merged (in place or not, either
//     order) == attention over all keys.
// Every configuration is also run a second time with another num_threads and must give
// bitwise the same out and lse ("results do not depend on it").
//
// Tolerances (those of attention_test.cpp / diff_test.cpp, common/testing.hpp):
//   * out: |out - ref| <= out_tol_for_logits(L)·max|V|, i.e. kOutTol = 2e-5 of max|V| while
//     L <= 20, 1e-6·L beyond. L = |scale|·max Σ_d |q_d·k_d| over the pairs the call uses (the
//     f32 rounding error of a logit is proportional to it; it bounds every |logit|, which is
//     what attention_test.cpp's L is), at least the largest finite sink logit; a softcap does
//     not lower it (near the knee tanh' ~ 1 passes the raw logit's rounding through).
//   * lse: |lse - ref| <= max(kLseRelTol·max(1, |ref|), 1e-6·L when L > 20); -inf exactly.
//   * bf16/f16: the same (the reference reads the same stored values).
//   * diff_attention: the budget A = out_tol_for_logits(L)·max|V|·(1 + |λ|) on the difference,
//     carried through 1/r of the RMSNorm as diff_test.cpp does, plus 1e-5 relative.
//   * merge_states: twice the bounds (two f32 results combined).
//   * rows with no visible key: out exactly 0, lse exactly -inf (or the head's sink logit).
//   * out and lse padding (strided views) must keep its sentinel; input padding holds NaN.
//
// Environment:
//   HEADWISE_RANDOM_SEED    base seed (decimal or 0x-hex; default kDefaultSeed)
//   HEADWISE_RANDOM_COUNT   configurations to check (default 2000; e.g. 100000 for a long run)
//   HEADWISE_RANDOM_REPLAY  <seed>:<index>: check that one configuration only, printed in full
//   HEADWISE_TEST_SUMMARY   a file the summary line is appended to
//   HEADWISE_TEST_VERBOSE   set: print every configuration with its worst error/tolerance ratios
// A failure prints `replay: HEADWISE_RANDOM_REPLAY=<seed>:<i> <config>` and the error; the run
// stops after kMaxFailures failing configurations.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <headwise/reference/diff.hpp>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/testing.hpp"

namespace {

using namespace hwt;
using headwise::diff_norm;
using headwise::diff_options;
using headwise::engine::blocking;

constexpr std::uint64_t kDefaultSeed = 20250607;
constexpr std::int64_t kDefaultCount = 2000;
constexpr std::int64_t kMaxFailures = 10;
constexpr double kDiffRtol = 1e-5;  ///< diff_test.cpp's relative term
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr std::int64_t kHuge = std::numeric_limits<std::int64_t>::max();

std::size_t sz(std::int64_t x) { return static_cast<std::size_t>(x); }

// =============================================================================================
// Seeds and the random source of one configuration
// =============================================================================================

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

/// The seed of configuration `index` of run `seed`: a function of both alone.
std::uint64_t config_seed(std::uint64_t seed, std::uint64_t index) {
  return splitmix64(splitmix64(seed) ^ splitmix64(index + 0x5851F42D4C957F2DULL));
}

class rng {
 public:
  explicit rng(std::uint64_t s) : g_(s) {}
  /// Uniform in [lo, hi] (inclusive).
  std::int64_t range(std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(g_);
  }
  double real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g_); }
  float realf(double lo, double hi) { return static_cast<float>(real(lo, hi)); }
  bool coin(double p) { return real(0.0, 1.0) < p; }
  template <class T>
  T pick(std::initializer_list<T> xs) {
    return *(xs.begin() + range(0, static_cast<std::int64_t>(xs.size()) - 1));
  }
  /// An index drawn with the given (relative) weights.
  std::size_t weighted(std::initializer_list<double> w) {
    double total = 0;
    for (const double x : w) total += x;
    double r = real(0.0, total);
    std::size_t i = 0;
    for (const double x : w) {
      if (r < x) return i;
      r -= x;
      ++i;
    }
    return w.size() - 1;
  }
  std::uint64_t bits() { return g_(); }
  std::mt19937_64& gen() { return g_; }

 private:
  std::mt19937_64 g_;
};

// =============================================================================================
// Configurations
// =============================================================================================

enum class entry : int {
  attention,
  attention_blocked,
  varlen,
  paged,
  paged_varlen,
  mla,
  mla_paged,
  diff,
  merge,
  count
};
constexpr std::size_t kEntries = static_cast<std::size_t>(entry::count);

const char* entry_name(entry e) {
  switch (e) {
    case entry::attention:
      return "attention";
    case entry::attention_blocked:
      return "attention_blocked";
    case entry::varlen:
      return "attention_varlen";
    case entry::paged:
      return "attention_paged";
    case entry::paged_varlen:
      return "attention_paged_varlen";
    case entry::mla:
      return "mla_absorbed";
    case entry::mla_paged:
      return "mla_absorbed_paged";
    case entry::diff:
      return "diff_attention";
    case entry::merge:
      return "merge_states";
    default:
      return "?";
  }
}

/// Everything one configuration needs; the fields an entry point does not use keep defaults.
struct config {
  entry ep = entry::attention;
  kv_dtype dtype = kv_dtype::f32;
  std::int64_t batch = 1, seq_q = 1, seq_kv = 1;  ///< dense shapes (paged: seq_q)
  std::vector<std::int64_t> lens_q, lens_k;       ///< varlen / paged: per sequence
  std::int64_t heads_q = 1, heads_kv = 1, dim_qk = 64, dim_v = 64;
  head_map map = head_map::interleave;
  layout lay_q, lay_k, lay_v, lay_out, lay_lse;
  bool v_aliases_k = false;
  bool with_lse = true;
  // options
  causal_mode causal = causal_mode::none;
  std::int64_t window_left = -1, window_right = -1, sink_tokens = 0;
  std::vector<float> sink_logits;  ///< empty = absent
  float softcap = 0.0f;
  std::optional<float> scale;
  float q_scale = 1.0f;
  int threads = 0, threads2 = 1;  ///< the run, and the bitwise re-run
  // attention_blocked
  blocking blk{};
  // paged
  std::int64_t page_size = 16, spare_pages = 0, spare_cols = 0;
  // mla: dim_qk = d_c + d_rope, dim_v = d_c, heads_q = heads
  std::int64_t d_rope = 0;
  // diff: heads_q = hs + hn, heads_kv = pairs (v heads)
  std::int64_t hs = 1, hn = 1, pairs = 1;
  bool shared_keys = false;
  std::optional<float> lambda;
  bool lambda_tokens = false;
  float lambda_lo = 0.0f, lambda_hi = 1.0f;
  diff_norm norm = diff_norm::rms;
  std::optional<float> lambda_init;
  bool norm_weight = false;
  float norm_eps = 1e-5f;
  bool lse_noise = false;
  // merge
  std::int64_t split = 0;
  bool in_place = false, swap_order = false;

  std::uint64_t data_seed = 0;

  [[nodiscard]] std::int64_t heads_out() const {
    if (ep == entry::diff) return hs;
    return map == head_map::interleave ? heads_q : std::max(heads_q, heads_kv);
  }
  [[nodiscard]] bool is_varlen() const { return ep == entry::varlen || ep == entry::paged_varlen; }
  [[nodiscard]] bool is_paged() const {
    return ep == entry::paged || ep == entry::paged_varlen || ep == entry::mla_paged;
  }

  [[nodiscard]] attention_options options(const std::vector<float>* sinks) const {
    attention_options o;
    o.scale = scale;
    o.causal = causal;
    o.window_left = window_left;
    o.window_right = window_right;
    o.sink_tokens = sink_tokens;
    if (sinks != nullptr && !sinks->empty())
      o.sink_logits = tensor_view<const float, 1>(sinks->data(), {static_cast<std::int64_t>(sinks->size())});
    o.softcap = softcap;
    o.heads = map;
    o.num_threads = threads;
    return o;
  }

  [[nodiscard]] std::string str() const;
};

std::string layout_str(const layout& l) {
  if (l.dense()) return "dense";
  std::ostringstream os;
  os << "{seq+" << l.pad_seq << " head+" << l.pad_head << " batch+" << l.pad_batch << (l.bhsd ? " BHSD" : "")
     << "}";
  return os.str();
}

std::string side_str(std::int64_t x) { return x == kHuge ? "INT64_MAX" : std::to_string(x); }

template <class T>
std::string list_str(const std::vector<T>& v) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  os << "]";
  return os.str();
}

std::string config::str() const {
  std::ostringstream os;
  os.precision(9);
  os << entry_name(ep) << " " << dtype_name(dtype) << " B" << batch;
  if (is_varlen())
    os << " lens_q" << list_str(lens_q);
  else
    os << " sq" << seq_q;
  if (is_paged() || is_varlen())
    os << " lens_kv" << list_str(lens_k);
  else
    os << " skv" << seq_kv;
  if (ep == entry::diff) {
    os << " hs:hn:pairs " << hs << ":" << hn << ":" << pairs << " d" << dim_qk << " dv" << dim_v
       << (shared_keys ? " shared_keys" : "");
  } else if (ep == entry::mla || ep == entry::mla_paged) {
    os << " heads" << heads_q << " d_c" << dim_v << " d_rope" << d_rope;
  } else {
    os << " hq" << heads_q << " hkv" << heads_kv << (map == head_map::tile ? " tile" : " interleave")
       << " dqk" << dim_qk << " dv" << dim_v << (v_aliases_k ? " v=k[..dv]" : "");
  }
  os << " | q" << layout_str(lay_q) << " k" << layout_str(lay_k);
  if (ep != entry::mla && ep != entry::mla_paged && !v_aliases_k) os << " v" << layout_str(lay_v);
  os << " out" << layout_str(lay_out);
  if (with_lse)
    os << " lse" << layout_str(lay_lse);
  else
    os << " no-lse";
  os << " | causal=" << causal_name(causal) << " window=(" << side_str(window_left) << ","
     << side_str(window_right) << ") sink_tokens=" << sink_tokens;
  if (!sink_logits.empty()) os << " sink_logits=" << list_str(sink_logits);
  if (softcap > 0) os << " softcap=" << softcap;
  os << " scale=";
  if (scale)
    os << *scale;
  else
    os << "default";
  if (q_scale != 1.0f) os << " q_scale=" << q_scale;
  os << " threads=" << threads << "/" << threads2;
  if (ep == entry::attention_blocked)
    os << " | blocking{rows " << blk.rows << " block_kv " << blk.block_kv << " decode_block_kv "
       << blk.decode_block_kv << " split_kv " << blk.split_kv << " prefetch " << blk.prefetch_bytes << "}";
  if (is_paged())
    os << " | page_size " << page_size << " spare_pages " << spare_pages << " spare_cols " << spare_cols;
  if (ep == entry::diff) {
    os << " | ";
    if (lambda)
      os << "lambda=" << *lambda;
    else
      os << "lambda_tokens~U[" << lambda_lo << "," << lambda_hi << ")";
    os << " norm=" << (norm == diff_norm::rms ? "rms" : "none");
    if (lambda_init) os << " lambda_init=" << *lambda_init;
    if (norm == diff_norm::rms) os << " eps=" << norm_eps << (norm_weight ? " weight" : "");
    os << (lse_noise ? " lse_noise" : "");
  }
  if (ep == entry::merge)
    os << " | split " << split << (in_place ? " in-place" : "") << (swap_order ? " (b, a)" : " (a, b)");
  os << " | data_seed " << data_seed;
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// The draw
// ---------------------------------------------------------------------------------------------

/// A length in [1, max]: small, near a tile multiple, or uniform.
std::int64_t draw_len(rng& r, std::int64_t max) {
  std::int64_t v;
  switch (r.weighted({35, 25, 40})) {
    case 0:
      v = r.range(1, 16);
      break;
    case 1:
      v = r.pick<std::int64_t>({16, 32, 48, 64, 128, 192, 256}) + r.range(-1, 1);
      break;
    default:
      v = r.range(1, max);
      break;
  }
  return std::clamp<std::int64_t>(v, 1, max);
}

layout draw_layout(rng& r, double p_strided = 0.3, bool allow_bhsd = true) {
  layout l;
  if (!r.coin(p_strided)) return l;
  l.pad_seq = r.coin(0.5) ? r.range(0, 7) : 0;
  l.pad_head = r.coin(0.5) ? r.range(0, 5) : 0;
  l.pad_batch = r.coin(0.4) ? r.range(0, 40) : 0;
  l.bhsd = allow_bhsd && r.coin(0.35);
  if (l.dense()) l.pad_head = 1;
  return l;
}

/// An LSE view (batch, heads, seq): only padding (its last axis is the sequence).
layout draw_lse_layout(rng& r) {
  layout l;
  if (!r.coin(0.25)) return l;
  l.pad_head = r.range(1, 9);                   // between heads (rows of seq)
  l.pad_seq = r.coin(0.5) ? r.range(0, 9) : 0;  // between batches
  return l;
}

kv_dtype draw_dtype(rng& r) { return r.pick({kv_dtype::f32, kv_dtype::bf16, kv_dtype::f16}); }

/// heads_q, heads_kv and the map of attention-like entry points.
void draw_heads(rng& r, config& c, bool decode) {
  if (r.coin(0.2)) {  // tile: one divides the other; reverse SQA when heads_kv > heads_q
    c.map = head_map::tile;
    const std::int64_t lo = r.pick<std::int64_t>({1, 1, 2, 2, 3, 4}),
                       ratio = r.pick<std::int64_t>({1, 2, 2, 3, 4});
    if (r.coin(0.5)) {
      c.heads_q = lo * ratio;
      c.heads_kv = lo;
    } else {
      c.heads_q = lo;
      c.heads_kv = lo * ratio;
    }
    return;
  }
  c.map = head_map::interleave;
  c.heads_kv = r.pick<std::int64_t>({1, 1, 2, 2, 3, 4});
  std::int64_t g = r.pick<std::int64_t>({1, 1, 2, 3, 4, 4, 5, 8});
  if (decode && r.coin(0.2)) g = r.pick<std::int64_t>({16, 32});  // wide MQA/GQA groups
  c.heads_q = c.heads_kv * g;
}

/// (dim_qk, dim_v) of attention-like entry points.
void draw_dims(rng& r, config& c, bool allow_mla_dims) {
  auto one = [&]() -> std::int64_t {
    switch (r.weighted({50, 25, 25})) {
      case 0:
        return r.pick<std::int64_t>({64, 72, 80, 96, 128});
      case 1:
        return r.pick<std::int64_t>({8, 16, 32, 40, 48, 112, 160, 192, 256});
      default:
        return r.pick<std::int64_t>({1, 2, 3, 5, 7, 13, 17, 31, 33, 65, 100, 129});
    }
  };
  const std::size_t kind = r.weighted({75, 17, allow_mla_dims ? 8.0 : 0.0});
  if (kind == 0) {
    c.dim_qk = c.dim_v = one();
  } else if (kind == 1) {
    c.dim_qk = one();
    c.dim_v = r.coin(0.5) ? one() : r.pick<std::int64_t>({64, 128, 96, 72});
  } else {
    c.dim_qk = 576;
    c.dim_v = 512;
  }
}

/// Causal mode, window, sink tokens, sink logits, softcap, scale, logit magnitude, threads.
void draw_options(rng& r, config& c, std::int64_t max_skv, bool allow_sink_logits, bool allow_masks = true) {
  if (allow_masks) {
    c.causal = r.pick({causal_mode::none, causal_mode::bottom_right, causal_mode::top_left});
    if (r.coin(0.35)) {  // sliding window
      const std::int64_t span = std::max<std::int64_t>(max_skv, 4) + 4;
      auto side = [&]() -> std::int64_t {
        switch (r.weighted({20, 40, 37, 3})) {
          case 0:
            return -1;
          case 1:
            return r.range(0, 8);
          case 2:
            return r.range(0, span);
          default:
            return kHuge;
        }
      };
      c.window_left = side();
      c.window_right = c.causal != causal_mode::none ? r.pick<std::int64_t>({-1, 0}) : side();
    }
    if (r.coin(c.window_left >= 0 ? 0.5 : 0.1))
      c.sink_tokens = r.coin(0.7) ? r.range(0, 8) : r.range(0, std::max<std::int64_t>(max_skv, 1) + 3);
  }
  if (allow_sink_logits && r.coin(0.2)) {
    c.sink_logits.resize(sz(c.heads_out()));
    for (auto& s : c.sink_logits) {
      switch (r.weighted({15, 10, 75})) {
        case 0:
          s = kNegInf;
          break;
        case 1:
          s = r.realf(3.0, 30.0);
          break;
        default:
          s = static_cast<float>(std::normal_distribution<double>(0.0, 2.0)(r.gen()));
          break;
      }
    }
  }
  if (r.coin(0.15)) {
    c.softcap = r.realf(1.0, 50.0);
    if (r.coin(0.5)) c.q_scale = r.realf(3.0, 20.0);  // into the cap's saturation
  }
  if (r.coin(0.2)) {
    const double mag = r.coin(0.05) ? 0.0 : r.real(0.01, 0.35);
    c.scale = static_cast<float>(r.coin(0.2) ? -mag : mag);
  }
  if (c.q_scale == 1.0f && r.coin(0.08)) c.q_scale = r.realf(2.0, 12.0);  // large logits
  c.threads = static_cast<int>(r.range(0, 3));
  c.threads2 = static_cast<int>((c.threads + r.range(1, 3)) % 4);
}

/// A work decomposition; the tiniest tiles and splits only for short sequences (they exercise
/// the same code there, and cost a thousand tiles per row on long ones).
void draw_blocking(rng& r, const config& c, blocking& b) {
  const bool long_q = c.seq_q > 256, long_kv = c.seq_kv > 512;
  b.rows = long_q ? r.pick<std::int64_t>({8, 16, 24, 32, 64, 128, 256})
                  : r.pick<std::int64_t>({1, 2, 3, 4, 7, 8, 16, 24, 32, 64, 128, 256});
  b.block_kv = long_kv ? r.pick<std::int64_t>({16, 17, 32, 48, 64, 128})
                       : r.pick<std::int64_t>({1, 2, 3, 8, 16, 17, 32, 48, 64, 128});
  b.decode_block_kv = long_kv ? r.pick<std::int64_t>({8, 15, 16, 32, 64})
                              : r.pick<std::int64_t>({1, 2, 4, 8, 15, 16, 32, 64});
  b.split_kv = long_kv ? r.pick<std::int64_t>({0, 64, 100, 256, 2048})
                       : r.pick<std::int64_t>({0, 1, 2, 5, 16, 33, 64, 100, 256, 2048});
  b.prefetch_bytes = r.pick<std::int64_t>({0, 64, 4096, 192 * 1024});
  b.decode_block_kv16 = b.decode_block_kv;  // not a draw of its own: the seeds keep their configurations
}

/// Reference cost (multiply-adds) of a configuration: what the draw keeps small.
double ref_cost(const config& c) {
  const double per_key = static_cast<double>(c.dim_qk + c.dim_v);
  if (c.ep == entry::diff) return static_cast<double>(c.batch * c.seq_q * c.seq_kv * (c.hs + c.hn)) * per_key;
  const double ho = static_cast<double>(c.heads_out());
  if (c.is_varlen()) {
    double s = 0;
    for (std::size_t b = 0; b < c.lens_q.size(); ++b) s += static_cast<double>(c.lens_q[b] * c.lens_k[b]);
    return s * ho * per_key;
  }
  if (c.is_paged()) {
    double s = 0;
    for (const auto l : c.lens_k) s += static_cast<double>(c.seq_q * l);
    return s * ho * per_key;
  }
  return static_cast<double>(c.batch * c.seq_q * c.seq_kv) * ho * per_key *
         (c.ep == entry::merge ? 1.0 : 1.0);
}

/// Draws the sizes with `draw` until the reference cost is within budget (rejection keeps the
/// shape of the distribution; the config's own random stream makes it deterministic).
template <class F>
void draw_sized(rng& r, config& c, double budget, F&& draw) {
  for (int tries = 0; tries < 64; ++tries) {
    draw();
    if (ref_cost(c) <= budget) return;
  }
  // Still too large (rare): shrink the longest axis until it fits.
  while (ref_cost(c) > budget) {
    if (c.is_varlen() || c.is_paged()) {
      for (auto& l : c.lens_k) l /= 2;
      for (auto& l : c.lens_q) l = (l + 1) / 2;
    } else if (c.seq_kv >= c.seq_q) {
      c.seq_kv /= 2;
    } else {
      c.seq_q /= 2;
    }
  }
  (void)r;
}

/// The per-configuration budget: mostly small, sometimes larger.
double draw_budget(rng& r) { return r.coin(0.9) ? 1.5e6 : 8e6; }

void draw_attention(rng& r, config& c) {
  c.dtype = draw_dtype(r);
  const std::size_t mode = r.weighted({84, 12, 4});  // prefill-sized, decode, long prefill
  const bool decode = mode == 1, long_prefill = mode == 2;
  const double budget = decode ? 1.2e7 : long_prefill ? 5e7 : draw_budget(r);
  draw_sized(r, c, budget, [&] {
    draw_heads(r, c, decode);
    draw_dims(r, c, !long_prefill);
    c.batch = r.coin(0.6) || long_prefill ? 1 : r.range(2, 3);
    if (decode) {
      c.seq_q = r.range(1, 4);
      c.seq_kv = r.coin(0.5) ? r.range(300, 2500) : r.range(2000, 5000);
      c.dim_qk = c.dim_v = std::min<std::int64_t>(c.dim_qk, 128);
    } else if (long_prefill) {  // several q-blocks and key tiles, prefill-sized splits
      c.seq_q = r.range(300, 1100);
      c.seq_kv = r.range(300, 1100);
    } else {
      c.seq_q = r.coin(0.03) ? 0 : draw_len(r, 300);
      c.seq_kv = r.coin(0.05) ? 0 : draw_len(r, 300);
    }
  });
  c.lay_q = draw_layout(r);
  c.lay_k = draw_layout(r);
  c.lay_v = draw_layout(r);
  c.lay_out = draw_layout(r);
  c.with_lse = r.coin(0.75);
  c.lay_lse = draw_lse_layout(r);
  if (c.dim_v <= c.dim_qk && r.coin(0.12)) c.v_aliases_k = true;
  draw_options(r, c, c.seq_kv, true);
  if (c.ep == entry::attention_blocked) draw_blocking(r, c, c.blk);
}

/// Ragged lengths of `batch` sequences: queries (chunk) and keys (cache).
void draw_ragged(rng& r, config& c, std::int64_t batch, bool chunked_prefill) {
  c.lens_q.assign(sz(batch), 0);
  c.lens_k.assign(sz(batch), 0);
  for (std::int64_t b = 0; b < batch; ++b) {
    auto& lq = c.lens_q[sz(b)];
    auto& lk = c.lens_k[sz(b)];
    lq = r.coin(0.1) ? 0 : (r.coin(0.4) ? r.range(1, 4) : draw_len(r, 120));
    if (chunked_prefill && r.coin(0.7)) {
      lk = lq + (r.coin(0.2) ? 0 : draw_len(r, 250));  // the chunk is the newest tokens
    } else {
      lk = r.coin(0.1) ? 0 : draw_len(r, 300);
    }
  }
}

void draw_varlen(rng& r, config& c) {
  c.dtype = draw_dtype(r);
  const double budget = draw_budget(r);
  draw_sized(r, c, budget, [&] {
    draw_heads(r, c, false);
    draw_dims(r, c, false);
    c.batch = r.range(1, 6);
    draw_ragged(r, c, c.batch, c.ep == entry::paged_varlen);
  });
  c.lay_q = draw_layout(r);
  c.lay_k = draw_layout(r);
  c.lay_v = draw_layout(r);
  c.lay_out = draw_layout(r);
  c.with_lse = r.coin(0.75);
  c.lay_lse = draw_lse_layout(r);
  if (c.dim_v <= c.dim_qk && r.coin(0.1)) c.v_aliases_k = true;
  std::int64_t max_k = 1;
  for (const auto l : c.lens_k) max_k = std::max(max_k, l);
  draw_options(r, c, max_k, true);
  if (c.is_paged()) {
    c.page_size = r.pick<std::int64_t>({1, 2, 3, 4, 7, 8, 16, 16, 17, 32, 64, 100, 256});
    c.spare_pages = r.range(0, 3);
    c.spare_cols = r.range(0, 2);
  }
}

void draw_paged(rng& r, config& c) {
  c.dtype = draw_dtype(r);
  const bool decode = r.coin(0.6);
  const bool long_cache = r.coin(0.1);
  const double budget = long_cache ? 1.2e7 : draw_budget(r);
  draw_sized(r, c, budget, [&] {
    draw_heads(r, c, decode);
    draw_dims(r, c, false);
    c.batch = r.range(1, 4);
    c.seq_q = decode ? r.range(1, 4) : (r.coin(0.05) ? 0 : draw_len(r, 100));
    c.lens_k.assign(sz(c.batch), 0);
    for (auto& l : c.lens_k) l = r.coin(0.1) ? 0 : (long_cache ? r.range(1000, 5000) : draw_len(r, 300));
  });
  c.lay_q = draw_layout(r);
  c.lay_k = draw_layout(r, 0.2);
  c.lay_v = draw_layout(r, 0.2);
  c.lay_out = draw_layout(r);
  c.with_lse = r.coin(0.75);
  c.lay_lse = draw_lse_layout(r);
  if (c.dim_v <= c.dim_qk && r.coin(0.1)) c.v_aliases_k = true;
  std::int64_t max_k = 1;
  for (const auto l : c.lens_k) max_k = std::max(max_k, l);
  draw_options(r, c, max_k, true);
  c.page_size = r.pick<std::int64_t>({1, 2, 3, 4, 7, 8, 16, 16, 17, 32, 64, 100, 256});
  c.spare_pages = r.range(0, 3);
  c.spare_cols = r.range(0, 2);
}

void draw_mla(rng& r, config& c) {
  c.dtype = draw_dtype(r);
  c.map = head_map::interleave;
  c.heads_kv = 1;
  const bool paged = c.ep == entry::mla_paged;
  const double budget = r.coin(0.15) ? 1.2e7 : draw_budget(r);
  draw_sized(r, c, budget, [&] {
    c.heads_q = r.pick<std::int64_t>({1, 2, 4, 5, 8, 16, 16, 24, 32, 40, 64, 128});
    if (r.coin(0.2)) {
      c.dim_v = 512;
      c.d_rope = 64;
    } else {
      c.dim_v = r.pick<std::int64_t>({8, 16, 24, 32, 48, 64, 72, 128, 256});
      c.d_rope = r.pick<std::int64_t>({0, 8, 8, 16, 32, 64});
    }
    c.dim_qk = c.dim_v + c.d_rope;
    c.batch = r.range(1, 3);
    c.seq_q = r.coin(0.7) ? r.range(1, 4) : draw_len(r, 64);
    if (paged) {
      c.lens_k.assign(sz(c.batch), 0);
      for (auto& l : c.lens_k) l = r.coin(0.1) ? 0 : (r.coin(0.2) ? r.range(300, 3000) : draw_len(r, 300));
    } else {
      c.seq_kv = r.coin(0.05) ? 0 : (r.coin(0.2) ? r.range(300, 3000) : draw_len(r, 300));
    }
  });
  c.lay_q = draw_layout(r);
  c.lay_k = draw_layout(r, 0.3, false);  // the latent: (batch or pages, seq, 1, D)
  c.lay_out = draw_layout(r);
  c.with_lse = r.coin(0.75);
  c.lay_lse = draw_lse_layout(r);
  std::int64_t max_k = c.seq_kv;
  for (const auto l : c.lens_k) max_k = std::max(max_k, l);
  draw_options(r, c, max_k, true);
  c.scale = r.coin(0.3) ? 0.1352338f : r.realf(0.03, 0.2);  // required
  if (paged) {
    c.page_size = r.pick<std::int64_t>({1, 3, 8, 16, 16, 32, 64, 100});
    c.spare_pages = r.range(0, 2);
    c.spare_cols = r.range(0, 2);
  }
}

void draw_diff(rng& r, config& c) {
  c.dtype = draw_dtype(r);
  c.map = head_map::interleave;
  const bool decode = r.coin(0.1);
  const double budget = decode ? 1e7 : draw_budget(r);
  draw_sized(r, c, budget, [&] {
    c.hn = r.pick<std::int64_t>({1, 1, 2, 2, 3, 4});
    const std::int64_t g = r.pick<std::int64_t>({1, 1, 2, 3, 4, 8});
    c.hs = g * c.hn;
    std::vector<std::int64_t> divs;
    for (std::int64_t p = 1; p <= c.hn; ++p)
      if (c.hn % p == 0) divs.push_back(p);
    c.pairs = divs[sz(r.range(0, static_cast<std::int64_t>(divs.size()) - 1))];
    c.heads_q = c.hs + c.hn;
    c.heads_kv = c.pairs;
    c.dim_qk = r.pick<std::int64_t>({8, 16, 32, 40, 64, 64, 72, 80, 96, 128, 7, 33});
    switch (r.weighted({45, 35, 20})) {
      case 0:
        c.dim_v = std::min<std::int64_t>(2 * c.dim_qk, 256);
        break;
      case 1:
        c.dim_v = c.dim_qk;
        break;
      default:
        c.dim_v = r.pick<std::int64_t>({1, 16, 64, 100, 128});
        break;
    }
    c.batch = r.coin(0.6) ? 1 : r.range(2, 3);
    if (decode) {
      c.seq_q = r.range(1, 4);
      c.seq_kv = r.range(300, 4000);
    } else {
      c.seq_q = r.coin(0.03) ? 0 : draw_len(r, 200);
      c.seq_kv = r.coin(0.05) ? 0 : draw_len(r, 250);
    }
  });
  c.shared_keys = r.coin(0.3);
  c.lay_q = draw_layout(r);
  c.lay_k = draw_layout(r);
  c.lay_v = draw_layout(r);
  c.lay_out = draw_layout(r);
  c.with_lse = r.coin(0.6);  // lse_signal
  c.lse_noise = r.coin(0.6);
  c.lay_lse = draw_lse_layout(r);
  draw_options(r, c, c.seq_kv, false);
  if (r.coin(0.6)) {
    c.lambda = r.realf(-0.3, 1.0);
  } else {
    c.lambda_tokens = true;
    if (r.coin(0.8)) {
      c.lambda_lo = 0.0f;
      c.lambda_hi = 1.0f;
    } else {
      c.lambda_lo = -1.0f;
      c.lambda_hi = 1.5f;
    }
  }
  if (r.coin(0.65)) {
    c.norm = diff_norm::rms;
    c.lambda_init = r.realf(0.1, 0.8);
    c.norm_weight = r.coin(0.5);
    c.norm_eps = r.pick({1e-5f, 1e-6f, 1e-3f});
  } else {
    c.norm = diff_norm::none;
  }
}

void draw_merge(rng& r, config& c) {
  c.dtype = draw_dtype(r);
  draw_sized(r, c, draw_budget(r), [&] {
    draw_heads(r, c, false);
    draw_dims(r, c, false);
    c.batch = r.coin(0.7) ? 1 : 2;
    c.seq_q = draw_len(r, 100);
    c.seq_kv = r.coin(0.05) ? 0 : draw_len(r, 300);
  });
  c.lay_q = draw_layout(r);
  c.lay_k = draw_layout(r);
  c.lay_v = draw_layout(r);
  c.lay_out = draw_layout(r);
  c.with_lse = true;
  c.lay_lse = draw_lse_layout(r);
  draw_options(r, c, c.seq_kv, false, false);  // no mask: a key range is a plain sub-problem
  switch (r.weighted({10, 10, 80})) {
    case 0:
      c.split = 0;
      break;
    case 1:
      c.split = c.seq_kv;
      break;
    default:
      c.split = r.range(0, c.seq_kv);
      break;
  }
  c.in_place = r.coin(0.4);
  c.swap_order = r.coin(0.5);
}

/// Configuration `index` of run `seed`.
config make_config(std::uint64_t seed, std::uint64_t index) {
  rng r(config_seed(seed, index));
  config c;
  c.ep = static_cast<entry>(r.weighted({17, 8, 11, 11, 11, 9, 9, 16, 8}));
  switch (c.ep) {
    case entry::attention:
    case entry::attention_blocked:
      draw_attention(r, c);
      break;
    case entry::varlen:
    case entry::paged_varlen:
      draw_varlen(r, c);
      break;
    case entry::paged:
      draw_paged(r, c);
      break;
    case entry::mla:
    case entry::mla_paged:
      draw_mla(r, c);
      break;
    case entry::diff:
      draw_diff(r, c);
      break;
    default:
      draw_merge(r, c);
      break;
  }
  c.data_seed = r.bits();
  return c;
}

// =============================================================================================
// Checking
// =============================================================================================

/// The failures of one configuration: a count and the first few messages.
struct failure_log {
  std::int64_t count = 0;
  std::string text;
  double out_ratio = 0, lse_ratio = 0;  ///< worst |error| / tolerance seen (out, lse)
  bool detail = false;                  ///< record where the worst ratios were attained
  std::string worst_out_at, worst_lse_at;
  /// Records err / tol; true when it is a new worst and `detail` is on (describe it then).
  bool saw(double& worst, double err, double tol) {
    if (!(tol > 0) || !(err / tol > worst)) return false;
    worst = err / tol;
    return detail;
  }
  void add(const std::string& msg) {
    if (count++ < 4) text += (text.empty() ? "" : "\n    ") + msg;
  }
  [[nodiscard]] bool ok() const { return count == 0; }
};

/// Tolerances of one configuration (see the file comment).
struct tolerance {
  double out_abs = 0;  ///< |out - ref| bound
  double lse_rel = kLseRelTol;
  double lse_abs = 0;  ///< absolute LSE floor for large logits
  [[nodiscard]] double lse(double want) const {
    return std::max(lse_rel * std::max(1.0, std::abs(want)), lse_abs);
  }
};

/// out_tol_for_logits(L)·max|V|; the LSE gets the absolute 1e-6·L when L > 20. `factor`
/// scales both (2 for a result combined from two kernel results).
tolerance make_tolerance(double vmax, double logit_bound, double factor = 1.0) {
  tolerance t;
  t.out_abs = factor * out_tol_for_logits(logit_bound) * (vmax > 0 ? vmax : 1.0);
  t.lse_rel = factor * kLseRelTol;
  t.lse_abs = logit_bound > 20.0 ? factor * 1e-6 * logit_bound : 0.0;
  return t;
}

std::string fmt(double x) {
  std::ostringstream os;
  os.precision(9);
  os << x;
  return os.str();
}

/// One output row (dv contiguous values) against the reference row. `empty`: no visible key
/// (out must be exactly 0). got_lse may be null (no LSE requested).
void check_row(failure_log& f, const tolerance& t, const char* what, std::int64_t b, std::int64_t i,
               std::int64_t h, const float* got, const float* want, std::int64_t dv, bool empty,
               const float* got_lse, float want_lse) {
  auto where = [&](std::int64_t d) {
    std::ostringstream os;
    os << what << "[seq " << b << ", pos " << i << ", head " << h;
    if (d >= 0) os << ", d " << d;
    os << "]";
    return os.str();
  };
  for (std::int64_t d = 0; d < dv; ++d) {
    const float g = got[d], w = want[d];
    if (!std::isfinite(g)) return f.add(where(d) + " = " + fmt(g) + " (non-finite), ref " + fmt(w));
    if (empty) {
      if (g != 0.0f) return f.add(where(d) + " = " + fmt(g) + " in a fully masked row, expected exactly 0");
      continue;
    }
    const double e = std::abs(static_cast<double>(g) - static_cast<double>(w));
    if (f.saw(f.out_ratio, e, t.out_abs))
      f.worst_out_at = where(d) + " = " + fmt(g) + ", ref " + fmt(w) + ", tol " + fmt(t.out_abs);
    if (!(e <= t.out_abs))
      return f.add(where(d) + " = " + fmt(g) + ", ref " + fmt(w) + ": |diff| " + fmt(e) + " > tol " +
                   fmt(t.out_abs));
  }
  if (got_lse == nullptr) return;
  const float g = *got_lse;
  if (want_lse == kNegInf || g == kNegInf) {
    if (g != want_lse)
      f.add(std::string("lse of ") + where(-1) + " = " + fmt(g) + ", ref " + fmt(want_lse) +
            (empty ? " (fully masked row)" : ""));
    return;
  }
  const double e = std::abs(static_cast<double>(g) - static_cast<double>(want_lse));
  if (f.saw(f.lse_ratio, e, t.lse(want_lse)))
    f.worst_lse_at =
        "lse of " + where(-1) + " = " + fmt(g) + ", ref " + fmt(want_lse) + ", tol " + fmt(t.lse(want_lse));
  if (!std::isfinite(g) || !(e <= t.lse(want_lse)))
    f.add(std::string("lse of ") + where(-1) + " = " + fmt(g) + ", ref " + fmt(want_lse) + ": |diff| " +
          fmt(e) + " > tol " + fmt(t.lse(want_lse)));
}

/// The buffer elements outside the tensor's view still hold `sentinel` (bitwise).
template <class T>
bool padding_intact(const tensor4<T>& t, T sentinel) {
  const auto cov = t.covered();
  for (std::size_t i = 0; i < t.buf.size(); ++i)
    if (!cov[i] && std::memcmp(&t.buf[i], &sentinel, sizeof(T)) != 0) return false;
  return true;
}

template <class T>
bool bitwise_same(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// True iff query i of a sequence (seq_q, seq_kv) sees at least one key.
bool row_sees_a_key(const attention_options& o, std::int64_t i, std::int64_t seq_q, std::int64_t seq_kv) {
  for (std::int64_t j = 0; j < seq_kv; ++j)
    if (headwise::reference::visible(o, i, j, seq_q, seq_kv)) return true;
  return false;
}

/// The logit scale L the tolerances follow: |scale|·max Σ_d |q_d·k_d| over the (query head,
/// key head) pairs of the call (the magnitude the f32 rounding of a logit is proportional to;
/// it bounds every |logit|). Cauchy-Schwarz |scale|·max‖q‖·max‖k‖ when that is <= 20 (the
/// tolerance is flat below 20), else exact.
template <class KV>
double logit_bound(tensor_view<const float, 4> q, tensor_view<const KV, 4> k,
                   const std::vector<std::pair<std::int64_t, std::int64_t>>& heads, double scale) {
  const std::int64_t B = q.shape[0], Sq = q.shape[1], Sk = k.shape[1], D = q.shape[3];
  if (B == 0 || Sq == 0 || Sk == 0 || scale == 0.0) return 0.0;
  double qn = 0, kn = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (const auto& [hq, hk] : heads) {
      for (std::int64_t i = 0; i < Sq; ++i) {
        double s = 0;
        for (std::int64_t d = 0; d < D; ++d) s += static_cast<double>(q(b, i, hq, d)) * q(b, i, hq, d);
        qn = std::max(qn, s);
      }
      for (std::int64_t j = 0; j < Sk; ++j) {
        double s = 0;
        for (std::int64_t d = 0; d < D; ++d) {
          const double x = headwise::to_float(k(b, j, hk, d));
          s += x * x;
        }
        kn = std::max(kn, s);
      }
    }
  const double cs = std::abs(scale) * std::sqrt(qn) * std::sqrt(kn);
  if (cs <= 20.0) return cs;
  // Exact, in f32 with four partial sums (only the magnitude matters).
  std::vector<float> qa(sz(D)), ka(sz(Sk * D));
  double m = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (const auto& [hq, hk] : heads) {
      for (std::int64_t j = 0; j < Sk; ++j)
        for (std::int64_t d = 0; d < D; ++d) ka[sz(j * D + d)] = std::abs(headwise::to_float(k(b, j, hk, d)));
      for (std::int64_t i = 0; i < Sq; ++i) {
        for (std::int64_t d = 0; d < D; ++d) qa[sz(d)] = std::abs(q(b, i, hq, d));
        for (std::int64_t j = 0; j < Sk; ++j) {
          const float* kk = ka.data() + j * D;
          float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
          std::int64_t d = 0;
          for (; d + 4 <= D; d += 4) {
            a0 += qa[sz(d)] * kk[d];
            a1 += qa[sz(d + 1)] * kk[d + 1];
            a2 += qa[sz(d + 2)] * kk[d + 2];
            a3 += qa[sz(d + 3)] * kk[d + 3];
          }
          for (; d < D; ++d) a0 += qa[sz(d)] * kk[d];
          m = std::max(m, static_cast<double>((a0 + a1) + (a2 + a3)));
        }
      }
    }
  return std::abs(scale) * m * (1.0 + 1e-4);
}

/// L with the sink logits: at least the largest finite one (a softcap does not lower L: the
/// rounding of the raw logit passes through tanh' <= 1 near the knee).
double effective_logits(const config& c, double raw) {
  double l = raw;
  for (const float s : c.sink_logits)
    if (std::isfinite(s)) l = std::max(l, std::abs(static_cast<double>(s)));
  return l;
}

/// (query head, key head) of every output head of an attention-like call.
std::vector<std::pair<std::int64_t, std::int64_t>> head_pairs(const config& c) {
  std::vector<std::pair<std::int64_t, std::int64_t>> v;
  const std::int64_t ho = c.heads_out();
  for (std::int64_t h = 0; h < ho; ++h) {
    const std::int64_t hk = c.map == head_map::interleave ? h / (c.heads_q / c.heads_kv) : h % c.heads_kv;
    v.emplace_back(h % c.heads_q, hk);
  }
  return v;
}

double resolved_scale(const config& c) {
  return c.scale ? static_cast<double>(*c.scale) : 1.0 / std::sqrt(static_cast<double>(c.dim_qk));
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// N(0, 1) samples, fast (the fills dominated the run time with std::normal_distribution):
/// 2^16 normal values drawn once, indexed by 16-bit slices of a splitmix64 stream.
class fast_normal {
 public:
  explicit fast_normal(std::uint64_t seed) : state_(seed) {}
  float operator()() {
    if (left_ == 0) {
      bits_ = splitmix64(state_++);
      left_ = 4;
    }
    const auto idx = static_cast<std::size_t>(bits_ & 0xFFFFu);
    bits_ >>= 16;
    --left_;
    return table()[idx];
  }

 private:
  static const std::vector<float>& table() {
    static const std::vector<float> t = [] {
      std::mt19937_64 g(0x6E6F726D616CULL);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> v(std::size_t{1} << 16);
      for (auto& x : v) x = nd(g);
      return v;
    }();
    return t;
  }
  std::uint64_t state_, bits_ = 0;
  int left_ = 0;
};

/// Logical values ~ N(0, stddev²) in BSHD order (independent of the layout), stored as T.
template <class T>
void fill_normal4(tensor4<T>& t, std::mt19937_64& g, float stddev) {
  fast_normal nd(g());
  t.for_each(
      [&](auto b, auto s, auto h, auto d) { t.at(b, s, h, d) = headwise::from_float<T>(stddev * nd()); });
}

template <class T>
double max_abs4(const tensor_view<const T, 4>& v) {
  double m = 0;
  for (std::int64_t b = 0; b < v.shape[0]; ++b)
    for (std::int64_t s = 0; s < v.shape[1]; ++s)
      for (std::int64_t h = 0; h < v.shape[2]; ++h)
        for (std::int64_t d = 0; d < v.shape[3]; ++d)
          m = std::max(m, std::abs(static_cast<double>(headwise::to_float(v(b, s, h, d)))));
  return m;
}

/// A (batch, heads, seq) LSE buffer held as tensor4 {1, batch, heads, seq}: padding between
/// heads (pad_head) and between batches (pad_seq).
tensor4<float> make_lse(std::int64_t batch, std::int64_t heads, std::int64_t seq, const layout& l) {
  layout m = l;
  m.bhsd = false;
  m.pad_batch = 0;
  return tensor4<float>({1, batch, heads, seq}, m, kLseSentinel);
}
tensor_view<float, 3> lse3(tensor4<float>& t) {
  return {t.buf.data(), {t.shape[1], t.shape[2], t.shape[3]}, {t.stride[1], t.stride[2], 1}};
}
tensor_view<float, 2> lse2(tensor4<float>& t) {  // (heads, total): t = {1, 1, heads, total}
  return {t.buf.data(), {t.shape[2], t.shape[3]}, {t.stride[2], 1}};
}
/// A ragged tensor (total, heads, dim) held as tensor4 {1, total, heads, dim}.
template <class T>
tensor_view<T, 3> rag3(tensor4<T>& t) {
  return {t.buf.data(), {t.shape[1], t.shape[2], t.shape[3]}, {t.stride[1], t.stride[2], 1}};
}
template <class T>
tensor_view<const T, 3> rag3c(const tensor4<T>& t) {
  return {t.buf.data(), {t.shape[1], t.shape[2], t.shape[3]}, {t.stride[1], t.stride[2], 1}};
}
/// Rows [first, first + len) of a ragged tensor4 {1, total, heads, dim} as a batch-1 view.
template <class T>
tensor_view<const T, 4> rows4(const tensor4<T>& t, std::int64_t first, std::int64_t len, std::int64_t dim) {
  return {t.buf.data() + first * t.stride[1], {1, len, t.shape[2], dim}, t.stride};
}
/// Batch b of a tensor4 as a batch-1 view.
template <class T>
tensor_view<const T, 4> batch4(const tensor4<T>& t, std::int64_t b, std::int64_t dim) {
  return {t.buf.data() + b * t.stride[0], {1, t.shape[1], t.shape[2], dim}, t.stride};
}

/// Snapshot of the kernel's outputs (for the bitwise re-run with another thread count).
struct snapshot {
  std::vector<float> a, b, c;
};

// ---------------------------------------------------------------------------------------------
// Paged caches: logical per-sequence K/V scattered into shuffled pages
// ---------------------------------------------------------------------------------------------

template <class T>
struct paged_store {
  std::int64_t batch = 0, page_size = 1, num_pages = 0, cols = 0;
  tensor4<T> k, v;  ///< (num_pages, page_size, heads, dim); v unused when it aliases k
  std::vector<std::int32_t> table, seqlens;

  paged_store(const std::vector<std::int64_t>& lens, std::int64_t ps, std::int64_t spare_pages,
              std::int64_t spare_cols, std::int64_t heads, std::int64_t dk, std::int64_t dv, bool has_v,
              const layout& lk, const layout& lv, std::mt19937_64& g)
      : batch(static_cast<std::int64_t>(lens.size())), page_size(ps) {
    std::vector<std::int64_t> need;
    std::int64_t maxneed = 0;
    for (const auto l : lens) {
      need.push_back((l + ps - 1) / ps);
      num_pages += need.back();
      maxneed = std::max(maxneed, need.back());
    }
    num_pages += spare_pages;
    if (num_pages == 0) num_pages = 1;  // at least one page
    cols = maxneed + spare_cols;
    k = tensor4<T>({num_pages, ps, heads, dk}, lk, nan_of<T>());
    if (has_v) v = tensor4<T>({num_pages, ps, heads, dv}, lv, nan_of<T>());
    std::vector<std::int32_t> perm(sz(num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), g);
    table.assign(sz(std::max<std::int64_t>(1, batch * cols)), -1);
    std::size_t next = 0;
    std::uniform_int_distribution<int> garbage(0, 4);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t p = 0; p < cols; ++p) {
        auto& e = table[sz(b * cols + p)];
        if (p < need[sz(b)]) {
          e = perm[next++];
        } else {  // never read: anything goes
          switch (garbage(g)) {
            case 0:
              e = -1;
              break;
            case 1:
              e = static_cast<std::int32_t>(num_pages);
              break;
            case 2:
              e = std::numeric_limits<std::int32_t>::max();
              break;
            case 3:
              e = std::numeric_limits<std::int32_t>::min();
              break;
            default:
              e = perm[sz(static_cast<std::int64_t>(g() % static_cast<std::uint64_t>(num_pages)))];
              break;
          }
        }
      }
    for (const auto l : lens) seqlens.push_back(static_cast<std::int32_t>(l));
  }
  /// (page, row) of token j of sequence b.
  [[nodiscard]] std::pair<std::int64_t, std::int64_t> where(std::int64_t b, std::int64_t j) const {
    return {table[sz(b * cols + j / page_size)], j % page_size};
  }
  [[nodiscard]] tensor_view<const std::int32_t, 2> table_view() const {
    return {table.data(), {batch, cols}};
  }
  [[nodiscard]] tensor_view<const std::int32_t, 1> seqlens_view() const { return {seqlens.data(), {batch}}; }
};

// =============================================================================================
// The entry points
// =============================================================================================

/// Checks out (and lse) of an attention-like call row by row. got_out(b, i, h) / got_lse(b, h, i)
/// address the kernel's outputs; ref_out / ref_lse are contiguous in the same (seq, pos, head)
/// order as `rows` enumerates them.
struct row_ref {
  std::int64_t b, i, h;
  const float* got;
  const float* want;
  const float* got_lse;  ///< null without LSE
  float want_lse;
  bool empty;
};

// ---- dense: attention, attention_blocked, merge_states ---------------------------------------

template <class KV>
void run_dense(const config& c, failure_log& f) {
  const std::int64_t B = c.batch, Sq = c.seq_q, Sk = c.seq_kv, Hq = c.heads_q, Hk = c.heads_kv,
                     Ho = c.heads_out();
  const std::int64_t Dq = c.dim_qk, Dv = c.dim_v;
  std::mt19937_64 g(c.data_seed);
  tensor4<float> q({B, Sq, Hq, Dq}, c.lay_q, kNaN);
  tensor4<KV> k({B, Sk, Hk, Dq}, c.lay_k, nan_of<KV>());
  tensor4<KV> v;
  fill_normal4(q, g, c.q_scale);
  fill_normal4(k, g, 1.0f);
  if (!c.v_aliases_k) {
    v = tensor4<KV>({B, Sk, Hk, Dv}, c.lay_v, nan_of<KV>());
    fill_normal4(v, g, 1.0f);
  }
  const tensor_view<const KV, 4> kv = k.cview();
  const tensor_view<const KV, 4> vv =
      c.v_aliases_k ? tensor_view<const KV, 4>(k.buf.data(), {B, Sk, Hk, Dv}, k.stride) : v.cview();
  const tensor_view<const float, 4> qv = q.cview();
  attention_options o = c.options(&c.sink_logits);

  // Reference over all keys.
  std::vector<float> ref_out(sz(B * Sq * Ho * Dv), kOutSentinel), ref_lse(sz(B * Ho * Sq), kLseSentinel);
  headwise::reference::attention(qv, kv, vv, headwise::bshd(ref_out.data(), B, Sq, Ho, Dv), o,
                                 headwise::bhs(ref_lse.data(), B, Ho, Sq));

  tensor4<float> out({B, Sq, Ho, Dv}, c.lay_out, kOutSentinel);
  tensor4<float> lse = make_lse(B, Ho, Sq, c.lay_lse);
  const bool want_lse = c.with_lse;
  double factor = 1.0;

  if (c.ep == entry::merge) {
    factor = 2.0;
    // Keys [0, split) and [split, Sk): two attention calls with LSE, then merge_states.
    const std::int64_t s = c.split;
    auto sub = [&](auto view, std::int64_t first, std::int64_t len) {
      view.data += first * view.stride[1];
      view.shape[1] = len;
      return view;
    };
    tensor4<float> oa({B, Sq, Ho, Dv}, c.lay_out, kOutSentinel), ob({B, Sq, Ho, Dv}, layout{}, kOutSentinel);
    tensor4<float> la = make_lse(B, Ho, Sq, c.lay_lse), lb = make_lse(B, Ho, Sq, layout{});
    headwise::attention(qv, sub(kv, 0, s), sub(vv, 0, s), oa.view(), o, lse3(la));
    headwise::attention(qv, sub(kv, s, Sk - s), sub(vv, s, Sk - s), ob.view(), o, lse3(lb));
    tensor4<float>& o1 = c.swap_order ? ob : oa;
    tensor4<float>& l1 = c.swap_order ? lb : la;
    tensor4<float>& o2 = c.swap_order ? oa : ob;
    tensor4<float>& l2 = c.swap_order ? la : lb;
    if (c.in_place) {
      headwise::merge_states(o1.cview(), lse3(l1), o2.cview(), lse3(l2), o1.view(), lse3(l1));
      out = o1;
      lse = l1;
    } else {
      headwise::merge_states(o1.cview(), lse3(l1), o2.cview(), lse3(l2), out.view(), lse3(lse));
    }
  } else {
    auto run = [&](int threads, tensor4<float>& ot, tensor4<float>& lt) {
      o.num_threads = threads;
      const tensor_view<float, 3> lview = want_lse ? lse3(lt) : tensor_view<float, 3>{};
      if (c.ep == entry::attention_blocked)
        headwise::attention_blocked(qv, kv, vv, ot.view(), o, lview, c.blk);
      else
        headwise::attention(qv, kv, vv, ot.view(), o, lview);
    };
    run(c.threads, out, lse);
    tensor4<float> out2({B, Sq, Ho, Dv}, c.lay_out, kOutSentinel);
    tensor4<float> lse2b = make_lse(B, Ho, Sq, c.lay_lse);
    run(c.threads2, out2, lse2b);
    if (!bitwise_same(out.buf, out2.buf) || !bitwise_same(lse.buf, lse2b.buf))
      f.add("out/lse differ bitwise between num_threads=" + std::to_string(c.threads) + " and " +
            std::to_string(c.threads2));
    o.num_threads = c.threads;
  }

  // Tolerances.
  double L = 0;
  const auto hp = head_pairs(c);
  L = logit_bound(qv, kv, hp, resolved_scale(c));
  const tolerance t = make_tolerance(max_abs4(vv), effective_logits(c, L), factor);

  const tensor_view<float, 3> lv = lse3(lse);
  for (std::int64_t i = 0; i < Sq; ++i) {
    const bool empty = !row_sees_a_key(o, i, Sq, Sk);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < Ho; ++h) {
        const float* lg = (want_lse || c.ep == entry::merge) ? &lv(b, h, i) : nullptr;
        check_row(f, t, "out", b, i, h, &out.at(b, i, h, 0), ref_out.data() + ((b * Sq + i) * Ho + h) * Dv,
                  Dv, empty, lg, ref_lse[sz((b * Ho + h) * Sq + i)]);
        if (f.count > 8) return;
      }
  }
  if (!padding_intact(out, kOutSentinel)) f.add("out written outside its view (padding changed)");
  if (!padding_intact(lse, kLseSentinel)) f.add("lse written outside its view (padding changed)");
  if (!want_lse && c.ep != entry::merge) {
    for (const float x : lse.buf)
      if (std::memcmp(&x, &kLseSentinel, sizeof(float)) != 0) {
        f.add("lse buffer written although no lse view was passed");
        break;
      }
  }
}

// ---- varlen and paged (ragged or not) --------------------------------------------------------

/// attention_varlen, attention_paged, attention_paged_varlen; one reference call per sequence.
template <class KV>
void run_ragged(const config& c, failure_log& f) {
  const std::int64_t Hq = c.heads_q, Hk = c.heads_kv, Ho = c.heads_out(), Dq = c.dim_qk, Dv = c.dim_v;
  const std::int64_t B = c.ep == entry::paged ? c.batch : static_cast<std::int64_t>(c.lens_q.size());
  std::mt19937_64 g(c.data_seed);
  const bool varlen_q = c.ep != entry::paged;
  // Query rows: ragged (total_q) or dense (B, seq_q).
  std::vector<std::int64_t> lq(sz(B)), q0(sz(B)), k0(sz(B));
  std::int64_t Tq = 0, Tk = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    lq[sz(b)] = varlen_q ? c.lens_q[sz(b)] : c.seq_q;
    q0[sz(b)] = Tq;
    k0[sz(b)] = Tk;
    Tq += lq[sz(b)];
    Tk += c.lens_k[sz(b)];
  }
  std::vector<std::int32_t> cu_q(sz(B + 1)), cu_k(sz(B + 1));
  for (std::int64_t b = 0; b <= B; ++b) {
    cu_q[sz(b)] = static_cast<std::int32_t>(b < B ? q0[sz(b)] : Tq);
    cu_k[sz(b)] = static_cast<std::int32_t>(b < B ? k0[sz(b)] : Tk);
  }
  tensor4<float> q = varlen_q ? tensor4<float>({1, Tq, Hq, Dq}, c.lay_q, kNaN)
                              : tensor4<float>({B, c.seq_q, Hq, Dq}, c.lay_q, kNaN);
  fill_normal4(q, g, c.q_scale);
  // Logical K/V of every sequence, contiguous (1, total_k, heads, dim) (the varlen inputs,
  // and the source of the pages).
  const bool paged = c.is_paged();
  tensor4<KV> k({1, Tk, Hk, Dq}, paged ? layout{} : c.lay_k, nan_of<KV>());
  tensor4<KV> v;
  fill_normal4(k, g, 1.0f);
  if (!c.v_aliases_k) {
    v = tensor4<KV>({1, Tk, Hk, Dv}, paged ? layout{} : c.lay_v, nan_of<KV>());
    fill_normal4(v, g, 1.0f);
  }
  auto k_rows = [&](std::int64_t b) { return rows4(k, k0[sz(b)], c.lens_k[sz(b)], Dq); };
  auto v_rows = [&](std::int64_t b) {
    return c.v_aliases_k ? rows4(k, k0[sz(b)], c.lens_k[sz(b)], Dv)
                         : rows4(v, k0[sz(b)], c.lens_k[sz(b)], Dv);
  };
  auto q_rows = [&](std::int64_t b) {
    return varlen_q ? rows4(q, q0[sz(b)], lq[sz(b)], Dq) : batch4(q, b, Dq);
  };

  std::optional<paged_store<KV>> ps;
  if (paged) {
    ps.emplace(c.lens_k, c.page_size, c.spare_pages, c.spare_cols, Hk, Dq, Dv, !c.v_aliases_k, c.lay_k,
               c.lay_v, g);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t j = 0; j < c.lens_k[sz(b)]; ++j) {
        const auto [page, row] = ps->where(b, j);
        for (std::int64_t h = 0; h < Hk; ++h) {
          for (std::int64_t d = 0; d < Dq; ++d) ps->k.at(page, row, h, d) = k.at(0, k0[sz(b)] + j, h, d);
          if (!c.v_aliases_k)
            for (std::int64_t d = 0; d < Dv; ++d) ps->v.at(page, row, h, d) = v.at(0, k0[sz(b)] + j, h, d);
        }
      }
  }

  attention_options o = c.options(&c.sink_logits);
  // Reference, per sequence, into contiguous (rows, Ho, Dv) and (rows, Ho) in row order.
  std::vector<float> ref_out(sz(Tq * Ho * Dv), kOutSentinel), ref_lse(sz(Ho * Tq), kLseSentinel);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = lq[sz(b)];
    headwise::reference::attention(
        q_rows(b), k_rows(b), v_rows(b), headwise::bshd(ref_out.data() + q0[sz(b)] * Ho * Dv, 1, n, Ho, Dv),
        o, tensor_view<float, 3>(ref_lse.data() + q0[sz(b)], {1, Ho, n}, {Ho * Tq, Tq, 1}));
  }

  // The kernel.
  const std::array<std::int64_t, 4> out_shape =
      varlen_q ? std::array<std::int64_t, 4>{1, Tq, Ho, Dv} : std::array<std::int64_t, 4>{B, c.seq_q, Ho, Dv};
  tensor4<float> out(out_shape, c.lay_out, kOutSentinel);
  auto new_lse = [&] {
    return varlen_q ? tensor4<float>({1, 1, Ho, Tq}, layout{0, c.lay_lse.pad_head, 0, false}, kLseSentinel)
                    : make_lse(B, Ho, c.seq_q, c.lay_lse);
  };
  tensor4<float> lse = new_lse();
  const tensor_view<const std::int32_t, 1> cuq(cu_q.data(), {B + 1}), cuk(cu_k.data(), {B + 1});
  auto run = [&](int threads, tensor4<float>& ot, tensor4<float>& lt) {
    o.num_threads = threads;
    if (c.ep == entry::varlen) {
      const tensor_view<const KV, 3> k3 = rag3c(k);
      const tensor_view<const KV, 3> v3 =
          c.v_aliases_k ? tensor_view<const KV, 3>(k.buf.data(), {Tk, Hk, Dv}, {k.stride[1], k.stride[2], 1})
                        : rag3c(v);
      headwise::attention_varlen(rag3c(q), k3, v3, cuq, cuk, rag3(ot), o,
                                 c.with_lse ? lse2(lt) : tensor_view<float, 2>{});
      return;
    }
    headwise::paged_kv<KV> kvp;
    kvp.k_pages = ps->k.cview();
    kvp.v_pages = c.v_aliases_k ? tensor_view<const KV, 4>(ps->k.buf.data(),
                                                           {ps->num_pages, c.page_size, Hk, Dv}, ps->k.stride)
                                : ps->v.cview();
    kvp.block_table = ps->table_view();
    kvp.seqlens = ps->seqlens_view();
    if (c.ep == entry::paged)
      headwise::attention_paged(q.cview(), kvp, ot.view(), o,
                                c.with_lse ? lse3(lt) : tensor_view<float, 3>{});
    else
      headwise::attention_paged_varlen(rag3c(q), cuq, kvp, rag3(ot), o,
                                       c.with_lse ? lse2(lt) : tensor_view<float, 2>{});
  };
  run(c.threads, out, lse);
  {
    tensor4<float> out2(out_shape, c.lay_out, kOutSentinel);
    tensor4<float> lse2b = new_lse();
    run(c.threads2, out2, lse2b);
    if (!bitwise_same(out.buf, out2.buf) || !bitwise_same(lse.buf, lse2b.buf))
      f.add("out/lse differ bitwise between num_threads=" + std::to_string(c.threads) + " and " +
            std::to_string(c.threads2));
    o.num_threads = c.threads;
  }

  // Tolerances: max|V| over every sequence, L over every sequence.
  double vmax = 0, L = 0;
  const auto hp = head_pairs(c);
  for (std::int64_t b = 0; b < B; ++b) {
    vmax = std::max(vmax, max_abs4(v_rows(b)));
    L = std::max(L, logit_bound(q_rows(b), k_rows(b), hp, resolved_scale(c)));
  }
  const tolerance t = make_tolerance(vmax, effective_logits(c, L));

  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = lq[sz(b)];
    for (std::int64_t i = 0; i < n; ++i) {
      const bool empty = !row_sees_a_key(o, i, n, c.lens_k[sz(b)]);
      const std::int64_t r = q0[sz(b)] + i;
      for (std::int64_t h = 0; h < Ho; ++h) {
        const float* got = varlen_q ? &out.at(0, r, h, 0) : &out.at(b, i, h, 0);
        const float* lg = nullptr;
        if (c.with_lse) lg = varlen_q ? &lse2(lse)(h, r) : &lse3(lse)(b, h, i);
        check_row(f, t, "out", b, i, h, got, ref_out.data() + (r * Ho + h) * Dv, Dv, empty, lg,
                  ref_lse[sz(h * Tq + r)]);
        if (f.count > 8) return;
      }
    }
  }
  if (!padding_intact(out, kOutSentinel)) f.add("out written outside its view (padding changed)");
  if (!padding_intact(lse, kLseSentinel))
    f.add(c.with_lse ? "lse written outside its view (padding changed)"
                     : "lse buffer written although no lse view was passed");
}

// ---- MLA (absorbed, dense or paged latent) -----------------------------------------------------

template <class KV>
void run_mla(const config& c, failure_log& f) {
  const std::int64_t H = c.heads_q, D = c.dim_qk, Dc = c.dim_v, Sq = c.seq_q;
  const bool paged = c.ep == entry::mla_paged;
  const std::int64_t B = c.batch;
  std::mt19937_64 g(c.data_seed);
  tensor4<float> q({B, Sq, H, D}, c.lay_q, kNaN);
  fill_normal4(q, g, c.q_scale);
  std::vector<std::int64_t> lens(sz(B)), k0(sz(B));
  std::int64_t Tk = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    lens[sz(b)] = paged ? c.lens_k[sz(b)] : c.seq_kv;
    k0[sz(b)] = Tk;
    Tk += lens[sz(b)];
  }
  // The latent: dense (B, seq_kv, 1, D) with its layout, or logical rows (1, total, 1, D) that
  // are scattered into pages.
  tensor4<KV> lat = paged ? tensor4<KV>({1, Tk, 1, D}, layout{}, nan_of<KV>())
                          : tensor4<KV>({B, c.seq_kv, 1, D}, c.lay_k, nan_of<KV>());
  fill_normal4(lat, g, 1.0f);
  auto k_rows = [&](std::int64_t b, std::int64_t dim) {
    return paged ? rows4(lat, k0[sz(b)], lens[sz(b)], dim) : batch4(lat, b, dim);
  };
  std::optional<paged_store<KV>> ps;
  if (paged) {
    ps.emplace(c.lens_k, c.page_size, c.spare_pages, c.spare_cols, 1, D, Dc, false, c.lay_k, layout{}, g);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t j = 0; j < lens[sz(b)]; ++j) {
        const auto [page, row] = ps->where(b, j);
        for (std::int64_t d = 0; d < D; ++d) ps->k.at(page, row, 0, d) = lat.at(0, k0[sz(b)] + j, 0, d);
      }
  }
  attention_options o = c.options(&c.sink_logits);
  std::vector<float> ref_out(sz(B * Sq * H * Dc), kOutSentinel), ref_lse(sz(B * H * Sq), kLseSentinel);
  for (std::int64_t b = 0; b < B; ++b)
    headwise::reference::attention(batch4(q, b, D), k_rows(b, D), k_rows(b, Dc),
                                   headwise::bshd(ref_out.data() + b * Sq * H * Dc, 1, Sq, H, Dc), o,
                                   headwise::bhs(ref_lse.data() + b * H * Sq, 1, H, Sq));

  tensor4<float> out({B, Sq, H, Dc}, c.lay_out, kOutSentinel);
  tensor4<float> lse = make_lse(B, H, Sq, c.lay_lse);
  auto run = [&](int threads, tensor4<float>& ot, tensor4<float>& lt) {
    o.num_threads = threads;
    const tensor_view<float, 3> lview = c.with_lse ? lse3(lt) : tensor_view<float, 3>{};
    if (paged) {
      const tensor_view<const KV, 3> pages(ps->k.buf.data(), {ps->num_pages, c.page_size, D},
                                           {ps->k.stride[0], ps->k.stride[1], 1});
      headwise::mla_absorbed_paged(q.cview(), pages, ps->table_view(), ps->seqlens_view(), ot.view(), o,
                                   lview);
    } else {
      const tensor_view<const KV, 3> l3(lat.buf.data(), {B, c.seq_kv, D}, {lat.stride[0], lat.stride[1], 1});
      headwise::mla_absorbed(q.cview(), l3, ot.view(), o, lview);
    }
  };
  run(c.threads, out, lse);
  {
    tensor4<float> out2({B, Sq, H, Dc}, c.lay_out, kOutSentinel);
    tensor4<float> lse2b = make_lse(B, H, Sq, c.lay_lse);
    run(c.threads2, out2, lse2b);
    if (!bitwise_same(out.buf, out2.buf) || !bitwise_same(lse.buf, lse2b.buf))
      f.add("out/lse differ bitwise between num_threads=" + std::to_string(c.threads) + " and " +
            std::to_string(c.threads2));
    o.num_threads = c.threads;
  }
  double vmax = 0, L = 0;
  std::vector<std::pair<std::int64_t, std::int64_t>> hp;
  for (std::int64_t h = 0; h < H; ++h) hp.emplace_back(h, 0);
  for (std::int64_t b = 0; b < B; ++b) {
    vmax = std::max(vmax, max_abs4(k_rows(b, Dc)));
    L = std::max(L, logit_bound(batch4(q, b, D), k_rows(b, D), hp, resolved_scale(c)));
  }
  const tolerance t = make_tolerance(vmax, effective_logits(c, L));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < Sq; ++i) {
      const bool empty = !row_sees_a_key(o, i, Sq, lens[sz(b)]);
      for (std::int64_t h = 0; h < H; ++h) {
        check_row(f, t, "out", b, i, h, &out.at(b, i, h, 0), ref_out.data() + ((b * Sq + i) * H + h) * Dc, Dc,
                  empty, c.with_lse ? &lse3(lse)(b, h, i) : nullptr, ref_lse[sz((b * H + h) * Sq + i)]);
        if (f.count > 8) return;
      }
    }
  if (!padding_intact(out, kOutSentinel)) f.add("out written outside its view (padding changed)");
  if (!padding_intact(lse, kLseSentinel))
    f.add(c.with_lse ? "lse written outside its view (padding changed)"
                     : "lse buffer written although no lse view was passed");
}

// ---- diff_attention ----------------------------------------------------------------------------

template <class KV>
void run_diff(const config& c, failure_log& f) {
  const std::int64_t B = c.batch, Sq = c.seq_q, Sk = c.seq_kv, hs = c.hs, hn = c.hn, P = c.pairs;
  const std::int64_t d = c.dim_qk, dv = c.dim_v, hk = c.shared_keys ? P : 2 * P;
  std::mt19937_64 g(c.data_seed);
  tensor4<float> q({B, Sq, hs + hn, d}, c.lay_q, kNaN);
  tensor4<KV> k({B, Sk, hk, d}, c.lay_k, nan_of<KV>());
  tensor4<KV> v({B, Sk, P, dv}, c.lay_v, nan_of<KV>());
  fill_normal4(q, g, c.q_scale);
  fill_normal4(k, g, 1.0f);
  fill_normal4(v, g, 1.0f);
  std::vector<float> lambda_tokens, weight;
  if (c.lambda_tokens) {
    std::uniform_real_distribution<float> u(c.lambda_lo, c.lambda_hi);
    lambda_tokens.resize(sz(B * Sq * hs));
    for (auto& x : lambda_tokens) x = u(g);
  }
  if (c.norm_weight) {
    std::normal_distribution<float> nd(1.0f, 0.5f);
    weight.resize(sz(dv));
    for (auto& x : weight) x = nd(g);
  }
  diff_options o;
  static_cast<attention_options&>(o) = c.options(nullptr);
  o.lambda = c.lambda;
  if (c.lambda_tokens) o.lambda_tokens = tensor_view<const float, 3>(lambda_tokens.data(), {B, Sq, hs});
  o.lambda_init = c.lambda_init;
  o.norm = c.norm;
  if (c.norm_weight) o.norm_weight = tensor_view<const float, 1>(weight.data(), {dv});
  o.norm_eps = c.norm_eps;
  o.shared_keys = c.shared_keys;

  std::vector<float> ref_out(sz(B * Sq * hs * dv), kOutSentinel), ref_pre(ref_out.size(), kOutSentinel);
  std::vector<float> ref_ls(sz(B * hs * Sq), kLseSentinel), ref_ln(sz(B * hn * Sq), kLseSentinel);
  headwise::reference::diff_attention(
      q.cview(), k.cview(), v.cview(), headwise::bshd(ref_out.data(), B, Sq, hs, dv), o,
      headwise::bhs(ref_ls.data(), B, hs, Sq), headwise::bhs(ref_ln.data(), B, hn, Sq),
      headwise::bshd(ref_pre.data(), B, Sq, hs, dv));

  tensor4<float> out({B, Sq, hs, dv}, c.lay_out, kOutSentinel);
  tensor4<float> ls = make_lse(B, hs, Sq, c.lay_lse), ln = make_lse(B, hn, Sq, c.lay_lse);
  auto run = [&](int threads, tensor4<float>& ot, tensor4<float>& lst, tensor4<float>& lnt) {
    o.num_threads = threads;
    headwise::diff_attention(q.cview(), k.cview(), v.cview(), ot.view(), o,
                             c.with_lse ? lse3(lst) : tensor_view<float, 3>{},
                             c.lse_noise ? lse3(lnt) : tensor_view<float, 3>{});
  };
  run(c.threads, out, ls, ln);
  {
    tensor4<float> out2({B, Sq, hs, dv}, c.lay_out, kOutSentinel);
    tensor4<float> ls2 = make_lse(B, hs, Sq, c.lay_lse), ln2 = make_lse(B, hn, Sq, c.lay_lse);
    run(c.threads2, out2, ls2, ln2);
    if (!bitwise_same(out.buf, out2.buf) || !bitwise_same(ls.buf, ls2.buf) || !bitwise_same(ln.buf, ln2.buf))
      f.add("out/lse differ bitwise between num_threads=" + std::to_string(c.threads) + " and " +
            std::to_string(c.threads2));
    o.num_threads = c.threads;
  }

  // The logit bound over the (query head, key head) pairs both maps use.
  const std::int64_t G = hs / hn, r1 = hs / P, r2 = hn / P;
  std::vector<std::pair<std::int64_t, std::int64_t>> hp;
  for (std::int64_t s = 0; s < hs; ++s)
    hp.emplace_back((s / G) * (G + 1) + s % G, c.shared_keys ? s / r1 : 2 * (s / r1));
  for (std::int64_t n = 0; n < hn; ++n)
    hp.emplace_back(n * (G + 1) + G, c.shared_keys ? n / r2 : 2 * (n / r2) + 1);
  const double L = effective_logits(c, logit_bound(q.cview(), k.cview(), hp, resolved_scale(c)));
  const double pre_tol = out_tol_for_logits(L);
  const tolerance lt = make_tolerance(1.0, L);
  const double vmax = std::max(max_abs4(v.cview()), 1e-30);
  double wmax = weight.empty() ? 1.0 : 0.0;
  for (const float w : weight) wmax = std::max(wmax, std::abs(static_cast<double>(w)));
  const double fac = c.lambda_init ? std::abs(1.0 - static_cast<double>(*c.lambda_init)) : 1.0;

  auto where = [](const char* what, std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t ch) {
    std::ostringstream os;
    os << what << "[b " << b << ", pos " << i << ", head " << h;
    if (ch >= 0) os << ", ch " << ch;
    os << "]";
    return os.str();
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < Sq; ++i) {
      const bool empty = !row_sees_a_key(o, i, Sq, Sk);
      for (std::int64_t h = 0; h < hs; ++h) {
        const std::size_t row = sz(((b * Sq + i) * hs + h) * dv);
        const double lam =
            c.lambda ? static_cast<double>(*c.lambda) : lambda_tokens[sz((b * Sq + i) * hs + h)];
        const double budget = pre_tol * vmax * (1.0 + std::abs(lam));
        double r = 1.0;
        if (c.norm == diff_norm::rms) {
          double ss = 0;
          for (std::int64_t ch = 0; ch < dv; ++ch)
            ss += static_cast<double>(ref_pre[row + sz(ch)]) * ref_pre[row + sz(ch)];
          r = std::sqrt(ss / static_cast<double>(dv) + static_cast<double>(c.norm_eps));
        }
        for (std::int64_t ch = 0; ch < dv; ++ch) {
          const float gv = out.at(b, i, h, ch), w = ref_out[row + sz(ch)];
          if (!std::isfinite(gv)) {
            f.add(where("out", b, i, h, ch) + " = " + fmt(gv) + " (non-finite), ref " + fmt(w));
            break;
          }
          if (empty) {
            if (gv != 0.0f) {
              f.add(where("out", b, i, h, ch) + " = " + fmt(gv) +
                    " in a fully masked row, expected exactly 0");
              break;
            }
            continue;
          }
          const double ref = std::abs(static_cast<double>(w));
          const double tol = c.norm == diff_norm::none ? budget + kDiffRtol * ref
                                                       : budget / r * (fac * wmax + ref) + kDiffRtol * ref;
          const double e = std::abs(static_cast<double>(gv) - w);
          if (f.saw(f.out_ratio, e, tol))
            f.worst_out_at =
                where("out", b, i, h, ch) + " = " + fmt(gv) + ", ref " + fmt(w) + ", tol " + fmt(tol);
          if (!(e <= tol)) {
            f.add(where("out", b, i, h, ch) + " = " + fmt(gv) + ", ref " + fmt(w) + ": |diff| " + fmt(e) +
                  " > tol " + fmt(tol) + (c.norm == diff_norm::rms ? " (rms r " + fmt(r) + ")" : ""));
            break;
          }
        }
        if (f.count > 8) return;
      }
      auto lse_check = [&](const char* name, tensor4<float>& lt4, const std::vector<float>& ref,
                           std::int64_t heads) {
        for (std::int64_t h = 0; h < heads; ++h) {
          const float gl = lse3(lt4)(b, h, i), w = ref[sz((b * heads + h) * Sq + i)];
          if (w == kNegInf || gl == kNegInf || empty) {
            if (gl != w || (empty && gl != kNegInf))
              f.add(where(name, b, i, h, -1) + " = " + fmt(gl) + ", ref " + fmt(w) +
                    (empty ? " (fully masked)" : ""));
            continue;
          }
          const double e = std::abs(static_cast<double>(gl) - w);
          if (f.saw(f.lse_ratio, e, lt.lse(w)))
            f.worst_lse_at =
                where(name, b, i, h, -1) + " = " + fmt(gl) + ", ref " + fmt(w) + ", tol " + fmt(lt.lse(w));
          if (!std::isfinite(gl) || !(e <= lt.lse(w)))
            f.add(where(name, b, i, h, -1) + " = " + fmt(gl) + ", ref " + fmt(w) + ": |diff| " + fmt(e) +
                  " > tol " + fmt(lt.lse(w)));
        }
      };
      if (c.with_lse) lse_check("lse_signal", ls, ref_ls, hs);
      if (c.lse_noise) lse_check("lse_noise", ln, ref_ln, hn);
    }
  if (!padding_intact(out, kOutSentinel)) f.add("out written outside its view (padding changed)");
  if (!padding_intact(ls, kLseSentinel))
    f.add("lse_signal buffer: written outside its view or when not passed");
  if (!padding_intact(ln, kLseSentinel))
    f.add("lse_noise buffer: written outside its view or when not passed");
}

template <class KV>
void run_typed(const config& c, failure_log& f) {
  switch (c.ep) {
    case entry::attention:
    case entry::attention_blocked:
    case entry::merge:
      run_dense<KV>(c, f);
      break;
    case entry::varlen:
    case entry::paged:
    case entry::paged_varlen:
      run_ragged<KV>(c, f);
      break;
    case entry::mla:
    case entry::mla_paged:
      run_mla<KV>(c, f);
      break;
    case entry::diff:
      run_diff<KV>(c, f);
      break;
    default:
      f.add("unknown entry point");
      break;
  }
}

/// Runs and checks one configuration; exceptions count as failures.
failure_log check_config(const config& c, bool detail) {
  failure_log f;
  f.detail = detail;
  try {
    switch (c.dtype) {
      case kv_dtype::bf16:
        run_typed<bf16>(c, f);
        break;
      case kv_dtype::f16:
        run_typed<f16>(c, f);
        break;
      default:
        run_typed<float>(c, f);
        break;
    }
  } catch (const std::exception& e) {
    f.add(std::string("unexpected exception: ") + e.what());
  }
  return f;
}

// =============================================================================================
// The driver
// =============================================================================================

std::optional<std::uint64_t> parse_u64(const char* s) {
  if (s == nullptr || *s == '\0') return std::nullopt;
  try {
    std::size_t pos = 0;
    const unsigned long long v = std::stoull(s, &pos, 0);
    if (s[pos] != '\0') return std::nullopt;
    return static_cast<std::uint64_t>(v);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

void emit_summary(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (const char* path = std::getenv("HEADWISE_TEST_SUMMARY"); path != nullptr && *path != '\0') {
    std::ofstream os(path, std::ios::app);
    os << line << "\n";
    if (!os) ADD_FAILURE() << "could not append the summary to HEADWISE_TEST_SUMMARY=" << path;
  }
}

TEST(random_differential, all_entry_points) {
  std::uint64_t seed = kDefaultSeed;
  std::int64_t count = kDefaultCount;
  std::optional<std::uint64_t> replay_index;
  if (const char* s = std::getenv("HEADWISE_RANDOM_SEED"); s != nullptr && *s != '\0') {
    const auto v = parse_u64(s);
    ASSERT_TRUE(v.has_value()) << "HEADWISE_RANDOM_SEED: expected an unsigned integer, got '" << s << "'";
    seed = *v;
  }
  if (const char* s = std::getenv("HEADWISE_RANDOM_COUNT"); s != nullptr && *s != '\0') {
    const auto v = parse_u64(s);
    ASSERT_TRUE(v.has_value() && *v <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        << "HEADWISE_RANDOM_COUNT: expected an unsigned integer, got '" << s << "'";
    count = static_cast<std::int64_t>(*v);
  }
  if (const char* s = std::getenv("HEADWISE_RANDOM_REPLAY"); s != nullptr && *s != '\0') {
    const std::string r = s;
    const auto colon = r.find(':');
    ASSERT_NE(colon, std::string::npos)
        << "HEADWISE_RANDOM_REPLAY: expected <seed>:<index>, got '" << r << "'";
    const auto sv = parse_u64(r.substr(0, colon).c_str()), iv = parse_u64(r.substr(colon + 1).c_str());
    ASSERT_TRUE(sv && iv) << "HEADWISE_RANDOM_REPLAY: expected <seed>:<index>, got '" << r << "'";
    seed = *sv;
    replay_index = *iv;
  }

  std::array<std::int64_t, kEntries> per_entry{};
  std::array<double, kEntries> worst_out{}, worst_lse{};
  std::int64_t checked = 0, failures = 0;
  const bool print_errors = std::getenv("HEADWISE_TEST_VERBOSE") != nullptr;  // every config's error ratios
  const auto t0 = std::chrono::steady_clock::now();
  auto one = [&](std::uint64_t i, bool verbose) {
    const config c = make_config(seed, i);
    if (verbose)
      std::printf("config %llu of seed %llu: %s\n", static_cast<unsigned long long>(i),
                  static_cast<unsigned long long>(seed), c.str().c_str());
    const auto c0 = std::chrono::steady_clock::now();
    const failure_log f = check_config(c, verbose);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
    ++checked;
    const auto e = static_cast<std::size_t>(c.ep);
    ++per_entry[e];
    worst_out[e] = std::max(worst_out[e], f.out_ratio);
    worst_lse[e] = std::max(worst_lse[e], f.lse_ratio);
    if (print_errors)
      std::printf("[errors] %llu out %.3g lse %.3g (%.1f ms) | %s\n", static_cast<unsigned long long>(i),
                  f.out_ratio, f.lse_ratio, ms, c.str().c_str());
    if (!f.ok()) {
      ++failures;
      std::printf("replay: HEADWISE_RANDOM_REPLAY=%llu:%llu %s\n  error (%lld problem%s): %s\n",
                  static_cast<unsigned long long>(seed), static_cast<unsigned long long>(i), c.str().c_str(),
                  static_cast<long long>(f.count), f.count == 1 ? "" : "s", f.text.c_str());
      std::fflush(stdout);
    } else if (verbose) {
      std::printf("  ok; worst error/tolerance: out %.3g (%s), lse %.3g (%s)\n", f.out_ratio,
                  f.worst_out_at.c_str(), f.lse_ratio, f.worst_lse_at.c_str());
    }
  };
  if (replay_index) {
    one(*replay_index, true);
  } else {
    for (std::int64_t i = 0; i < count && failures < kMaxFailures; ++i)
      one(static_cast<std::uint64_t>(i), false);
    if (failures >= kMaxFailures && checked < count)
      std::printf("random_differential: stopped after %lld failures\n", static_cast<long long>(failures));
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::ostringstream line;
  line << "random_differential: " << checked << " configurations checked (";
  for (std::size_t e = 0; e < kEntries; ++e)
    line << (e ? ", " : "") << entry_name(static_cast<entry>(e)) << " " << per_entry[e];
  line << "), " << failures << " failures, seed " << seed;
  emit_summary(line.str());
  std::ostringstream worst;
  worst << "random_differential: worst error/tolerance (out, lse):";
  for (std::size_t e = 0; e < kEntries; ++e) {
    worst.precision(3);
    worst << (e ? "; " : " ") << entry_name(static_cast<entry>(e)) << " " << worst_out[e] << ", "
          << worst_lse[e];
  }
  std::printf("%s\nrandom_differential: %.1f s\n", worst.str().c_str(), secs);
  EXPECT_EQ(failures, 0)
      << "replay a failing configuration with the HEADWISE_RANDOM_REPLAY line printed above";
}

}  // namespace
