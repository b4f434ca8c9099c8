/// @file
/// @brief Shared test helpers: seeded random fills, an AllClose predicate, and a dense attention
/// problem (owning strided BSHD buffers) that runs headwise::attention and the fp64
/// headwise::reference::attention on the same stored inputs and reports the errors.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <headwise/headwise.hpp>
#include <headwise/reference/attention.hpp>

namespace hwt {

using headwise::attention_options;
using headwise::bf16;
using headwise::causal_mode;
using headwise::f16;
using headwise::head_map;
using headwise::tensor_view;

inline constexpr float kInf = std::numeric_limits<float>::infinity();
inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Random fills (seeded, deterministic for a given standard library)
// ---------------------------------------------------------------------------------------------

/// x[i] ~ N(mean, stddev²).
inline void fill_normal(std::span<float> x, std::uint64_t seed, float mean = 0.0f, float stddev = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(mean, stddev);
  for (auto& v : x) v = dist(gen);
}

/// x[i] ~ U[lo, hi).
inline void fill_uniform(std::span<float> x, std::uint64_t seed, float lo, float hi) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (auto& v : x) v = dist(gen);
}

inline std::vector<float> random_normal(std::size_t n, std::uint64_t seed, float mean = 0.0f, float stddev = 1.0f) {
  std::vector<float> v(n);
  fill_normal(v, seed, mean, stddev);
  return v;
}

inline std::vector<float> random_uniform(std::size_t n, std::uint64_t seed, float lo, float hi) {
  std::vector<float> v(n);
  fill_uniform(v, seed, lo, hi);
  return v;
}

// ---------------------------------------------------------------------------------------------
// AllClose: |got - want| <= atol + rtol·|want| elementwise; NaN anywhere fails; equal infinities
// pass. Reports the mismatch count, the first mismatching index and the largest difference.
// ---------------------------------------------------------------------------------------------

template <class G, class W>
::testing::AssertionResult AllClose(const G* got, const W* want, std::size_t n, double rtol, double atol) {
  std::size_t bad = 0, first = n;
  double max_diff = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    bool ok;
    if (std::isnan(g) || std::isnan(w)) {
      ok = false;
    } else if (g == w) {
      ok = true;
    } else {
      const double d = std::abs(g - w);  // inf when exactly one side is infinite
      ok = d <= atol + rtol * std::abs(w);
      if (std::isfinite(d)) max_diff = std::max(max_diff, d);
    }
    if (!ok) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << n << " elements differ (rtol " << rtol << ", atol "
                                       << atol << "); first at index " << first << ": got "
                                       << static_cast<double>(got[first]) << ", want "
                                       << static_cast<double>(want[first]) << "; max finite |diff| " << max_diff;
}

template <class G, class W>
::testing::AssertionResult AllClose(const G& got, const W& want, double rtol, double atol) {
  if (std::size(got) != std::size(want))
    return ::testing::AssertionFailure() << "size mismatch: " << std::size(got) << " vs " << std::size(want);
  return AllClose(std::data(got), std::data(want), std::size(got), rtol, atol);
}

/// Bitwise equality of two float arrays (distinguishes -0/+0, compares NaN payloads).
inline ::testing::AssertionResult BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size mismatch";
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return ::testing::AssertionFailure() << "first difference at index " << i << ": " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Storage dtypes
// ---------------------------------------------------------------------------------------------

enum class kv_dtype { f32, bf16, f16 };

inline const char* dtype_name(kv_dtype t) {
  switch (t) {
    case kv_dtype::bf16: return "bf16";
    case kv_dtype::f16: return "f16";
    default: return "f32";
  }
}

/// A NaN of the storage type (used to fill padding that must never be read).
template <class T>
T nan_of() {
  if constexpr (std::is_same_v<T, bf16>) return bf16{0x7FC0};
  else if constexpr (std::is_same_v<T, f16>) return f16{0x7E00};
  else return kNaN;
}

inline const char* causal_name(causal_mode c) {
  switch (c) {
    case causal_mode::bottom_right: return "BR";
    case causal_mode::top_left: return "TL";
    default: return "None";
  }
}

// ---------------------------------------------------------------------------------------------
// Strided 4-D buffers: logical [batch, seq, heads, dim], with padding or a BHSD memory order
// ---------------------------------------------------------------------------------------------

/// Memory layout of a [batch, seq, heads, dim] tensor.
///   bhsd == false: BSHD order; head stride = dim + pad_head, seq stride = heads·hs + pad_seq,
///                  batch stride = seq·ss + pad_batch.
///   bhsd == true:  [B, H, S, D] memory passed as a BSHD view with swapped strides; seq stride =
///                  dim + pad_head ("row" pad), head stride = seq·ss + pad_seq, batch stride =
///                  heads·hs + pad_batch.
struct layout {
  std::int64_t pad_seq = 0, pad_head = 0, pad_batch = 0;
  bool bhsd = false;
  [[nodiscard]] bool dense() const { return pad_seq == 0 && pad_head == 0 && pad_batch == 0 && !bhsd; }
};

template <class T>
struct tensor4 {
  std::array<std::int64_t, 4> shape{}, stride{};
  std::vector<T> buf;

  tensor4() = default;
  tensor4(std::array<std::int64_t, 4> shp, const layout& L, T fill) : shape(shp) {
    const auto [B, S, H, D] = shp;
    if (!L.bhsd) {
      stride[3] = 1;
      stride[2] = D + L.pad_head;
      stride[1] = H * stride[2] + L.pad_seq;
      stride[0] = S * stride[1] + L.pad_batch;
    } else {
      stride[3] = 1;
      stride[1] = D + L.pad_head;
      stride[2] = S * stride[1] + L.pad_seq;
      stride[0] = H * stride[2] + L.pad_batch;
    }
    // Always at least one element, so that empty tensors still have a real pointer.
    buf.assign(static_cast<std::size_t>(std::max<std::int64_t>(1, B * stride[0])), fill);
  }
  T& at(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) {
    return buf[static_cast<std::size_t>(b * stride[0] + s * stride[1] + h * stride[2] + d * stride[3])];
  }
  const T& at(std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) const {
    return buf[static_cast<std::size_t>(b * stride[0] + s * stride[1] + h * stride[2] + d * stride[3])];
  }
  tensor_view<T, 4> view() { return {buf.data(), shape, stride}; }
  tensor_view<const T, 4> cview() const { return {buf.data(), shape, stride}; }
  /// Calls f(b, s, h, d) for every logical element, in BSHD order.
  template <class F>
  void for_each(F&& f) const {
    for (std::int64_t b = 0; b < shape[0]; ++b)
      for (std::int64_t s = 0; s < shape[1]; ++s)
        for (std::int64_t h = 0; h < shape[2]; ++h)
          for (std::int64_t d = 0; d < shape[3]; ++d) f(b, s, h, d);
  }
  /// A mask of the buffer's elements that are part of the logical tensor.
  [[nodiscard]] std::vector<bool> covered() const {
    std::vector<bool> m(buf.size(), false);
    for_each([&](std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) {
      m[static_cast<std::size_t>(b * stride[0] + s * stride[1] + h * stride[2] + d * stride[3])] = true;
    });
    return m;
  }
};

// ---------------------------------------------------------------------------------------------
// A dense attention problem
// ---------------------------------------------------------------------------------------------

struct problem_spec {
  std::int64_t batch = 1, seq_q = 1, seq_kv = 1, heads_q = 1, heads_kv = 1, dim_qk = 64, dim_v = 64;
  kv_dtype dtype = kv_dtype::f32;
  head_map map = head_map::interleave;  ///< copied into the options of every run
  layout lay{};                         ///< memory layout of q, k, v and out
  bool v_aliases_k = false;             ///< v = the first dim_v columns of k (dim_v <= dim_qk)
  float q_scale = 1.0f;                 ///< q ~ N(0, q_scale²): controls the logit magnitude
  float k_scale = 1.0f;                 ///< k ~ N(0, k_scale²)
  float v_scale = 1.0f;                 ///< v ~ N(0, v_scale²)

  [[nodiscard]] std::int64_t heads_out() const {
    return map == head_map::interleave ? heads_q : std::max(heads_q, heads_kv);
  }
  [[nodiscard]] std::string str() const {
    std::ostringstream os;
    os << "B" << batch << " sq" << seq_q << " skv" << seq_kv << " hq" << heads_q << " hkv" << heads_kv << " dqk"
       << dim_qk << " dv" << dim_v << " " << dtype_name(dtype) << (map == head_map::tile ? " tile" : "")
       << (v_aliases_k ? " v=k[..dv]" : "");
    if (!lay.dense())
      os << " layout{seq+" << lay.pad_seq << " head+" << lay.pad_head << " batch+" << lay.pad_batch
         << (lay.bhsd ? " BHSD" : "") << "}";
    if (q_scale != 1.0f) os << " q_scale" << q_scale;
    return os.str();
  }
};

inline std::string options_str(const attention_options& o) {
  std::ostringstream os;
  os << "causal=" << causal_name(o.causal) << " window=(" << o.window_left << "," << o.window_right
     << ") sinks=" << o.sink_tokens << " softcap=" << o.softcap;
  if (o.scale) os << " scale=" << *o.scale;
  if (!o.sink_logits.absent()) os << " sink_logits[" << o.sink_logits.shape[0] << "]";
  os << " threads=" << o.num_threads;
  return os.str();
}

/// Errors of headwise::attention against the fp64 reference on the same stored inputs.
struct compare_result {
  double out_err = 0;            ///< max |out - ref| / max|V|  (inf if any out is NaN)
  double lse_err = 0;            ///< max |lse - ref_lse|; -inf vs -inf counts 0, other mismatch inf
  double lse_rel_err = 0;        ///< max |lse - ref_lse| / max(1, |ref_lse|)
  std::int64_t nonfinite = 0;    ///< non-finite out elements
  bool padding_intact = true;    ///< out buffer outside the view still holds its sentinel
  std::string worst;             ///< where out_err was attained
};

inline std::ostream& operator<<(std::ostream& os, const compare_result& r) {
  return os << "out_err=" << r.out_err << " lse_err=" << r.lse_err << " lse_rel_err=" << r.lse_rel_err
            << " nonfinite=" << r.nonfinite << " padding_intact=" << r.padding_intact << " worst: " << r.worst;
}

inline constexpr float kOutSentinel = 12345.0f;
inline constexpr float kLseSentinel = -777.0f;

template <class KV>
struct dense_problem {
  problem_spec spec;
  tensor4<float> q;
  tensor4<KV> k, v;
  tensor4<float> out;
  std::vector<float> lse;      ///< (batch, heads_out, seq_q), contiguous
  std::vector<float> ref_out;  ///< (batch, seq_q, heads_out, dim_v), contiguous
  std::vector<float> ref_lse;  ///< (batch, heads_out, seq_q), contiguous
  double max_abs_v = 0;

  dense_problem(const problem_spec& s, std::uint64_t seed) : spec(s) {
    const std::int64_t B = s.batch, Sq = s.seq_q, Sk = s.seq_kv, Ho = s.heads_out();
    q = tensor4<float>({B, Sq, s.heads_q, s.dim_qk}, s.lay, kNaN);
    k = tensor4<KV>({B, Sk, s.heads_kv, s.dim_qk}, s.lay, nan_of<KV>());
    if (!s.v_aliases_k) v = tensor4<KV>({B, Sk, s.heads_kv, s.dim_v}, s.lay, nan_of<KV>());
    out = tensor4<float>({B, Sq, Ho, s.dim_v}, s.lay, kOutSentinel);
    lse.assign(static_cast<std::size_t>(B * Ho * Sq), kLseSentinel);
    ref_out.assign(static_cast<std::size_t>(B * Sq * Ho * s.dim_v), kOutSentinel);
    ref_lse.assign(lse.size(), kLseSentinel);

    // Logical values are drawn in BSHD order, so they do not depend on the layout.
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    q.for_each([&](auto b, auto i, auto h, auto d) { q.at(b, i, h, d) = s.q_scale * nd(gen); });
    k.for_each([&](auto b, auto j, auto h, auto d) {
      k.at(b, j, h, d) = headwise::from_float<KV>(s.k_scale * nd(gen));
    });
    if (!s.v_aliases_k)
      v.for_each([&](auto b, auto j, auto h, auto d) {
        v.at(b, j, h, d) = headwise::from_float<KV>(s.v_scale * nd(gen));
      });
    recompute_max_abs_v();
  }

  /// max|V| over the stored values; call again after editing V (or K when V aliases it).
  void recompute_max_abs_v() {
    max_abs_v = 0;
    const auto vv = v_view();
    for (std::int64_t b = 0; b < spec.batch; ++b)
      for (std::int64_t j = 0; j < spec.seq_kv; ++j)
        for (std::int64_t h = 0; h < spec.heads_kv; ++h)
          for (std::int64_t d = 0; d < spec.dim_v; ++d)
            max_abs_v = std::max(max_abs_v, std::abs(static_cast<double>(headwise::to_float(vv(b, j, h, d)))));
  }

  tensor_view<const float, 4> q_view() const { return q.cview(); }
  tensor_view<const KV, 4> k_view() const { return k.cview(); }
  tensor_view<const KV, 4> v_view() const {
    if (spec.v_aliases_k)
      return {k.buf.data(), {spec.batch, spec.seq_kv, spec.heads_kv, spec.dim_v}, k.stride};
    return v.cview();
  }
  tensor_view<float, 4> out_view() { return out.view(); }
  tensor_view<float, 3> lse_view() { return headwise::bhs(lse.data(), spec.batch, spec.heads_out(), spec.seq_q); }
  tensor_view<float, 4> ref_out_view() {
    return headwise::bshd(ref_out.data(), spec.batch, spec.seq_q, spec.heads_out(), spec.dim_v);
  }
  tensor_view<float, 3> ref_lse_view() {
    return headwise::bhs(ref_lse.data(), spec.batch, spec.heads_out(), spec.seq_q);
  }

  attention_options fix(attention_options o) const {
    o.heads = spec.map;
    return o;
  }
  void run(const attention_options& o) { headwise::attention(q_view(), k_view(), v_view(), out_view(), fix(o), lse_view()); }
  void run_blocked(const attention_options& o, const headwise::engine::blocking& blk) {
    headwise::attention_blocked(q_view(), k_view(), v_view(), out_view(), fix(o), lse_view(), blk);
  }
  void run_reference(const attention_options& o) {
    headwise::reference::attention(q_view(), k_view(), v_view(), ref_out_view(), fix(o), ref_lse_view());
  }

  /// The computed out in contiguous BSHD order.
  [[nodiscard]] std::vector<float> out_dense() const {
    std::vector<float> r;
    r.reserve(ref_out.size());
    out.for_each([&](auto b, auto i, auto h, auto d) { r.push_back(out.at(b, i, h, d)); });
    return r;
  }

  [[nodiscard]] bool out_padding_intact() const {
    const auto cov = out.covered();
    for (std::size_t i = 0; i < out.buf.size(); ++i)
      if (!cov[i] && std::memcmp(&out.buf[i], &kOutSentinel, sizeof(float)) != 0) return false;
    return true;
  }

  [[nodiscard]] compare_result compare() const {
    compare_result r;
    const double vmax = max_abs_v > 0 ? max_abs_v : 1.0;
    const std::int64_t Ho = spec.heads_out();
    out.for_each([&](auto b, auto i, auto h, auto d) {
      const float g = out.at(b, i, h, d);
      const float w = ref_out[static_cast<std::size_t>(((b * spec.seq_q + i) * Ho + h) * spec.dim_v + d)];
      if (!std::isfinite(g)) ++r.nonfinite;
      double e = std::isnan(g) ? std::numeric_limits<double>::infinity() : std::abs(double(g) - double(w)) / vmax;
      if (e > r.out_err) {
        r.out_err = e;
        std::ostringstream os;
        os << "out[b=" << b << ",i=" << i << ",h=" << h << ",d=" << d << "]=" << g << " ref=" << w;
        r.worst = os.str();
      }
    });
    for (std::size_t x = 0; x < lse.size(); ++x) {
      const double g = lse[x], w = ref_lse[x];
      double e;
      if (g == w) e = 0;  // includes -inf == -inf
      else if (std::isnan(g) || !std::isfinite(g) || !std::isfinite(w)) e = std::numeric_limits<double>::infinity();
      else e = std::abs(g - w);
      r.lse_err = std::max(r.lse_err, e);
      r.lse_rel_err = std::max(r.lse_rel_err, std::isfinite(e) ? e / std::max(1.0, std::abs(w)) : e);
    }
    r.padding_intact = out_padding_intact();
    return r;
  }
};

/// Runs headwise::attention (with LSE) and the fp64 reference on the same stored inputs.
template <class KV>
compare_result compare_typed(const problem_spec& s, const attention_options& o, std::uint64_t seed) {
  dense_problem<KV> p(s, seed);
  p.run(o);
  p.run_reference(o);
  return p.compare();
}

inline compare_result compare_with_reference(const problem_spec& s, const attention_options& o,
                                             std::uint64_t seed = 1) {
  switch (s.dtype) {
    case kv_dtype::bf16: return compare_typed<bf16>(s, o, seed);
    case kv_dtype::f16: return compare_typed<f16>(s, o, seed);
    default: return compare_typed<float>(s, o, seed);
  }
}

// ---------------------------------------------------------------------------------------------
// Tolerances (see attention_test.cpp for the reasoning)
// ---------------------------------------------------------------------------------------------

/// max |out - ref| / max|V| for logits |s| <= ~20 (any K/V dtype: the reference reads the same
/// stored bf16/f16 values, so only f32 compute error is measured). Measured: <= 1.5e-6.
inline constexpr double kOutTol = 2e-5;
/// max |lse - ref_lse| / max(1, |ref_lse|). Measured: <= 6e-7 (LSE is an f32: half an ulp is
/// already 6e-8 relative).
inline constexpr double kLseRelTol = 4e-6;

/// Output tolerance when logits reach max|s|: the softmax is 2-Lipschitz from logits (max norm)
/// to the output (in units of max|V|), and each f32 logit carries an error of a few ulps of
/// max|s|: |δs| <= 8u·max|s| with u = 2^-24, so |δO|/max|V| <= 16u·max|s| ≈ 1e-6·max|s|.
/// Never below kOutTol (exp2 and accumulation error at O(1) logits).
inline double out_tol_for_logits(double max_abs_logit) { return std::max(kOutTol, 1e-6 * max_abs_logit); }


// ---------------------------------------------------------------------------------------------
// KV caches (decode_test.cpp, kv_cache_test.cpp): stored K/V per sequence, paged caches built
// from them, bitwise comparisons of raw buffers, argument errors
// ---------------------------------------------------------------------------------------------

/// Bitwise equality of n floats (distinguishes -0/+0, compares NaN payloads).
inline ::testing::AssertionResult BitwiseEqualN(const float* a, const float* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return ::testing::AssertionFailure() << "first difference at index " << i << " of " << n << ": " << a[i]
                                           << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

/// The raw bytes of a buffer (to check that an output was left untouched).
template <class T>
std::vector<unsigned char> bytes_of(const std::vector<T>& v) {
  std::vector<unsigned char> b(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

/// n values drawn from N(0, stddev²) in f32 and stored as T (the stored values are the truth).
template <class T>
std::vector<T> random_stored(std::size_t n, std::uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> nd(0.0f, stddev);
  std::vector<T> v(n);
  for (auto& x : v) x = headwise::from_float<T>(nd(gen));
  return v;
}

/// A paged KV cache (pages [num_pages, page_size, heads_kv, dim]) holding batch sequences. Pages
/// are handed out from a shuffled list, so consecutive pages of a sequence are scattered; spare
/// pages and the rows past a sequence's end hold NaN (reading them poisons the result); block-table
/// entries past a sequence's last page are -1 (out of range on purpose: they must not be read).
template <class T>
struct paged_cache {
  std::int64_t batch = 0, page_size = 1, num_pages = 0, max_pages = 0, heads_kv = 1, dim_qk = 1, dim_v = 1;
  std::vector<T> k_pages, v_pages;
  std::vector<std::int32_t> block_table, seqlens;

  /// Allocates pages for alloc_lens[b] tokens of each sequence; seqlens = alloc_lens.
  paged_cache(const std::vector<std::int64_t>& alloc_lens, std::int64_t page_size_, std::int64_t heads_kv_,
              std::int64_t dim_qk_, std::int64_t dim_v_, std::uint64_t seed, std::int64_t spare_pages = 3,
              std::int64_t spare_table_cols = 1)
      : batch(static_cast<std::int64_t>(alloc_lens.size())), page_size(page_size_), heads_kv(heads_kv_),
        dim_qk(dim_qk_), dim_v(dim_v_) {
    std::vector<std::int64_t> need;
    for (const auto len : alloc_lens) {
      need.push_back((len + page_size - 1) / page_size);
      num_pages += need.back();
      max_pages = std::max(max_pages, need.back());
    }
    num_pages += spare_pages;
    max_pages += spare_table_cols;
    k_pages.assign(static_cast<std::size_t>(num_pages * page_size * heads_kv * dim_qk), nan_of<T>());
    v_pages.assign(static_cast<std::size_t>(num_pages * page_size * heads_kv * dim_v), nan_of<T>());
    std::vector<std::int32_t> perm(static_cast<std::size_t>(num_pages));
    for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<std::int32_t>(i);
    std::mt19937_64 gen(seed);
    std::shuffle(perm.begin(), perm.end(), gen);
    block_table.assign(static_cast<std::size_t>(batch * std::max<std::int64_t>(max_pages, 1)), -1);
    std::size_t next = 0;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t p = 0; p < need[static_cast<std::size_t>(b)]; ++p)
        block_table[static_cast<std::size_t>(b * max_pages + p)] = perm[next++];
    for (const auto len : alloc_lens) seqlens.push_back(static_cast<std::int32_t>(len));
  }

  /// Where token j of sequence b lives (element offset of its head-0 row in k_pages / v_pages).
  [[nodiscard]] std::int64_t k_offset(std::int64_t b, std::int64_t j, std::int64_t h) const {
    const std::int64_t page = block_table[static_cast<std::size_t>(b * max_pages + j / page_size)];
    return ((page * page_size + j % page_size) * heads_kv + h) * dim_qk;
  }
  [[nodiscard]] std::int64_t v_offset(std::int64_t b, std::int64_t j, std::int64_t h) const {
    const std::int64_t page = block_table[static_cast<std::size_t>(b * max_pages + j / page_size)];
    return ((page * page_size + j % page_size) * heads_kv + h) * dim_v;
  }

  /// Copies a sequence's len tokens of contiguous K/V ([len, heads_kv, dim], stored T) into its pages.
  void fill(std::int64_t b, std::int64_t len, const T* k, const T* v) {
    for (std::int64_t j = 0; j < len; ++j)
      for (std::int64_t h = 0; h < heads_kv; ++h) {
        std::copy_n(k + (j * heads_kv + h) * dim_qk, dim_qk, k_pages.data() + k_offset(b, j, h));
        std::copy_n(v + (j * heads_kv + h) * dim_v, dim_v, v_pages.data() + v_offset(b, j, h));
      }
  }

  [[nodiscard]] tensor_view<T, 4> k_view() { return {k_pages.data(), {num_pages, page_size, heads_kv, dim_qk}}; }
  [[nodiscard]] tensor_view<T, 4> v_view() { return {v_pages.data(), {num_pages, page_size, heads_kv, dim_v}}; }
  [[nodiscard]] tensor_view<const std::int32_t, 2> table_view() const {
    return {block_table.data(), {batch, max_pages}};
  }
  [[nodiscard]] tensor_view<const std::int32_t, 1> seqlens_view() const { return {seqlens.data(), {batch}}; }
  [[nodiscard]] headwise::paged_kv<T> view() const {
    return {{k_pages.data(), {num_pages, page_size, heads_kv, dim_qk}},
            {v_pages.data(), {num_pages, page_size, heads_kv, dim_v}},
            table_view(),
            seqlens_view()};
  }
};

/// f() throws headwise::argument_error whose argument() and what() contain `arg`.
template <class F>
::testing::AssertionResult ThrowsArgumentError(F&& f, const std::string& arg) {
  try {
    f();
  } catch (const headwise::argument_error& e) {
    if (e.argument().find(arg) == std::string::npos || std::string(e.what()).find(arg) == std::string::npos)
      return ::testing::AssertionFailure() << "argument_error names '" << e.argument() << "', expected '" << arg
                                           << "'; what(): " << e.what();
    return ::testing::AssertionSuccess() << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "no exception; expected argument_error naming '" << arg << "'";
}

}  // namespace hwt
