/// @file
/// @brief Online softmax over key-major score tiles (lanes = query rows): update and finalize.
///
/// Scores arrive in the log2 domain (the scale·log2(e) factor is folded into the packed Q), so
/// the state per lane is (m, l) with m the running max of s·log2(e) and l = Σ 2^(s - m).
/// A lane that has seen no visible key has m = -inf, l = 0; exp2 is then evaluated against
/// 0 instead of -inf so that -inf - -inf never makes a NaN.
#pragma once

#include <cmath>
#include <limits>

#include "arch.hpp"
#include "diagnostics.hpp"
#include "exp.hpp"

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

/// P = 2^(S - m) in place over `count` vectors `stride` floats apart; returns Σ P (lane-wise).
template <class Arch>
inline xsimd::batch<float, Arch> exp2_store_sum(float* s, std::ptrdiff_t stride, std::ptrdiff_t count,
                                                xsimd::batch<float, Arch> m) noexcept {
  using B = xsimd::batch<float, Arch>;
  B sum0(0.0f), sum1(0.0f);  // two independent sums
  std::ptrdiff_t j = 0;
  for (; j + 2 <= count; j += 2) {
    const B p0 = exp2_softmax<Arch>(B::load_aligned(s + j * stride) - m);
    const B p1 = exp2_softmax<Arch>(B::load_aligned(s + (j + 1) * stride) - m);
    p0.store_aligned(s + j * stride);
    p1.store_aligned(s + (j + 1) * stride);
    sum0 += p0;
    sum1 += p1;
  }
  if (j < count) {
    const B p0 = exp2_softmax<Arch>(B::load_aligned(s + j * stride) - m);
    p0.store_aligned(s + j * stride);
    sum0 += p0;
  }
  return sum0 + sum1;
}

/// One online-softmax step over a (n, ld_s) key-major tile, nvec lane vectors:
///   m' = max(m, max_j S[j]);  α = 2^(m - m');  P[j] = 2^(S[j] - m');  l' = α·l + Σ_j P[j].
/// S is overwritten by P. m, l, alpha are aligned lane arrays.
template <class Arch>
inline void softmax_update(float* s, std::ptrdiff_t ld_s, std::ptrdiff_t n, std::ptrdiff_t nvec, float* m,
                           float* l, float* alpha) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  const B neg_inf(-std::numeric_limits<float>::infinity());
  for (std::ptrdiff_t v = 0; v < nvec; ++v) {
    float* sv = s + v * w;
    // Row max: vertical, four independent chains.
    B mx0 = neg_inf, mx1 = neg_inf, mx2 = neg_inf, mx3 = neg_inf;
    std::ptrdiff_t j = 0;
    for (; j + 4 <= n; j += 4) {
      mx0 = xsimd::max(mx0, B::load_aligned(sv + (j + 0) * ld_s));
      mx1 = xsimd::max(mx1, B::load_aligned(sv + (j + 1) * ld_s));
      mx2 = xsimd::max(mx2, B::load_aligned(sv + (j + 2) * ld_s));
      mx3 = xsimd::max(mx3, B::load_aligned(sv + (j + 3) * ld_s));
    }
    for (; j < n; ++j) mx0 = xsimd::max(mx0, B::load_aligned(sv + j * ld_s));
    const B m_old = B::load_aligned(m + v * w);
    const B m_new = xsimd::max(xsimd::max(mx0, mx1), xsimd::max(xsimd::max(mx2, mx3), m_old));
    const B m_ref = xsimd::select(m_new == neg_inf, B(0.0f), m_new);  // -inf - -inf guard
    const B a = exp2_softmax<Arch>(m_old - m_ref);
    // P = 2^(S - m'), Σ P
    const B sum = exp2_store_sum<Arch>(sv, ld_s, n, m_ref);
    const B l_new = tile::fma<Arch>(a, B::load_aligned(l + v * w), sum);
    l_new.store_aligned(l + v * w);
    m_new.store_aligned(m + v * w);
    a.store_aligned(alpha + v * w);
  }
}

/// Final normalisation of one lane: 1/l (0 for a lane with no visible key, so O = 0) and the
/// natural-log LSE = (m + log2 l)·ln 2 (-inf for such a lane).
struct softmax_result {
  float inv_l;
  float lse;
};
inline softmax_result softmax_finalize(float m, float l) noexcept {
  if (!(l > 0.0f)) return {0.0f, -std::numeric_limits<float>::infinity()};
  constexpr double ln2 = 0.693147180559945309417;
  return {1.0f / l, static_cast<float>((static_cast<double>(m) + std::log2(static_cast<double>(l))) * ln2)};
}

/// S <- c·tanh(S / cap) on a (n, ld_s) tile, with c = cap·log2(e): logit softcap applied to
/// scaled logits, moving them into the log2 domain.
template <class Arch>
inline void softcap_tile(float* s, std::ptrdiff_t ld_s, std::ptrdiff_t n, std::ptrdiff_t nvec, float cap) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  constexpr float log2e = 1.4426950408889634f;
  const B inv(1.0f / cap), c(cap * log2e);
  for (std::ptrdiff_t j = 0; j < n; ++j)
    for (std::ptrdiff_t v = 0; v < nvec; ++v) {
      float* p = s + j * ld_s + v * w;
      (c * xsimd::tanh(B::load_aligned(p) * inv)).store_aligned(p);
    }
}

/// Band mask on a (n, ld_s) tile whose first key has index 0 relative to the arrays: key jj is
/// visible to lane r iff jj <= hi[r] && (jj >= lo[r] || jj < sink). lo/hi are per-lane float
/// bounds relative to the tile start (clamped to [-1, n], so exact); hidden scores become -inf.
template <class Arch>
inline void band_mask_tile(float* s, std::ptrdiff_t ld_s, std::ptrdiff_t n, std::ptrdiff_t nvec, const float* lo,
                           const float* hi, std::ptrdiff_t sink) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  const B neg_inf(-std::numeric_limits<float>::infinity());
  for (std::ptrdiff_t v = 0; v < nvec; ++v) {
    const B lo_v = B::load_aligned(lo + v * w), hi_v = B::load_aligned(hi + v * w);
    for (std::ptrdiff_t j = 0; j < n; ++j) {
      float* p = s + j * ld_s + v * w;
      const B jj(static_cast<float>(j));
      const auto keep = j < sink ? (jj <= hi_v) : ((jj <= hi_v) && (jj >= lo_v));
      xsimd::select(keep, B::load_aligned(p), neg_inf).store_aligned(p);
    }
  }
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

/// Horizontal max of a vector (xsimd 8.1 has no reduce_max): a shuffle tree on AVX-512 and
/// AVX (log2(lanes) steps, not a serial scan), lane by lane elsewhere.
template <class Arch>
inline float reduce_max(xsimd::batch<float, Arch> x) noexcept {
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512_v<Arch>) {
    __m512 v = x;
    v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));  // swap 256-bit halves
    v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // swap 128-bit blocks in pairs
    v = _mm512_max_ps(v, _mm512_permute_ps(v, 0x4E));        // swap 64-bit pairs
    v = _mm512_max_ps(v, _mm512_permute_ps(v, 0xB1));        // swap neighbours
    return _mm512_cvtss_f32(v);
  } else
#endif
#if XSIMD_WITH_AVX
  if constexpr (std::is_base_of_v<xsimd::avx, Arch>) {
    __m256 v = x;
    v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 0x01));
    v = _mm256_max_ps(v, _mm256_permute_ps(v, 0x4E));
    v = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));
    return _mm256_cvtss_f32(v);
  } else
#endif
  {
    alignas(64) float buf[xsimd::batch<float, Arch>::size];
    x.store_aligned(buf);
    float m = buf[0];
    for (std::size_t i = 1; i < xsimd::batch<float, Arch>::size; ++i) m = buf[i] > m ? buf[i] : m;
    return m;
  }
}

/// Key-lane online-softmax step on a (rows, ld_s) row-major tile of n keys (n <= ld_s): for
/// each row r, m' = max(m, max_j S[r][j]), α = 2^(m - m'), P = 2^(S - m'), l' = α·l + Σ P.
/// Columns n..round_up(n, lanes) are set to P = 0, the rest of each row is not touched. m, l,
/// alpha: one float per row.
template <class Arch>
inline void softmax_update_rows(float* s, std::ptrdiff_t ld_s, std::ptrdiff_t rows, std::ptrdiff_t n, float* m,
                                float* l, float* alpha) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const std::ptrdiff_t nvec = (n + w - 1) / w;
  for (std::ptrdiff_t r = 0; r < rows; ++r) {
    float* sr = s + r * ld_s;
    for (std::ptrdiff_t j = n; j < nvec * w; ++j) sr[j] = ninf;  // pad keys
    B mx0(ninf), mx1(ninf);
    std::ptrdiff_t v = 0;
    for (; v + 2 <= nvec; v += 2) {
      mx0 = xsimd::max(mx0, B::load_aligned(sr + v * w));
      mx1 = xsimd::max(mx1, B::load_aligned(sr + (v + 1) * w));
    }
    if (v < nvec) mx0 = xsimd::max(mx0, B::load_aligned(sr + v * w));
    const float m_old = m[r];
    float m_new = reduce_max<Arch>(xsimd::max(mx0, mx1));
    m_new = m_old > m_new ? m_old : m_new;
    const float m_ref = m_new == ninf ? 0.0f : m_new;  // -inf - -inf guard
    const B sum = exp2_store_sum<Arch>(sr, w, nvec, B(m_ref));
    const float a = exp2_softmax<Arch>(B(m_old - m_ref)).get(0);
    l[r] = a * l[r] + xsimd::hadd(sum);
    m[r] = m_new;
    alpha[r] = a;
  }
}

/// Key-lane band mask on a (rows, ld_s) tile of n keys: key jj (relative to the tile start)
/// stays visible to row r iff jj <= hi[r] && (jj >= lo[r] || jj < sink); others become -inf.
template <class Arch>
inline void band_mask_rows(float* s, std::ptrdiff_t ld_s, std::ptrdiff_t rows, std::ptrdiff_t n, const float* lo,
                           const float* hi, std::ptrdiff_t sink) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  const B ninf(-std::numeric_limits<float>::infinity());
  alignas(64) float iota[w];
  for (std::ptrdiff_t i = 0; i < w; ++i) iota[i] = static_cast<float>(i);
  const B step = B::load_aligned(iota);
  const B sink_v(static_cast<float>(sink));
  const std::ptrdiff_t nvec = (n + w - 1) / w;
  for (std::ptrdiff_t r = 0; r < rows; ++r) {
    const B lo_v(lo[r]), hi_v(hi[r]);
    for (std::ptrdiff_t v = 0; v < nvec; ++v) {
      float* p = s + r * ld_s + v * w;
      const B jj = step + B(static_cast<float>(v * w));
      const auto keep = (jj <= hi_v) && ((jj >= lo_v) || (jj < sink_v));
      xsimd::select(keep, B::load_aligned(p), ninf).store_aligned(p);
    }
  }
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP
