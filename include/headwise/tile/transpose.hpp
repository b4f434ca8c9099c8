/// @file
/// @brief Register-block transpose: one lanes x lanes block of floats per call, into vectors.
#pragma once

#include <cstddef>

#include "arch.hpp"
#include "diagnostics.hpp"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

/// col[l][i] = src[i][l] for i, l < lanes: the block's columns as vectors, src rows ld_src
/// apart (any alignment). In registers on AVX-512 (16x16: 64 shuffles) and AVX/AVX2 (8x8: 24),
/// element by element elsewhere.
template <class Arch>
inline void transpose_block(const float* src, std::ptrdiff_t ld_src, xsimd::batch<float, Arch>* col) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr int w = arch_traits<Arch>::lanes;
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512_v<Arch>) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
    // Pairs of rows interleaved per 128-bit block, then 4-row groups: u[4g + k], block L, holds
    // rows 4g..4g+3 of column 4L + k.
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 4; ++g) {
      r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    // Column 4L + k: block g of it is block L of u[4g + k] (a 4x4 transpose of 128-bit blocks).
    for (int k = 0; k < 4; ++k) {
      const __m512 x0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44), x1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
      const __m512 x2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44),
                   x3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
      col[0 + k] = B(_mm512_shuffle_f32x4(x0, x2, 0x88));
      col[4 + k] = B(_mm512_shuffle_f32x4(x0, x2, 0xDD));
      col[8 + k] = B(_mm512_shuffle_f32x4(x1, x3, 0x88));
      col[12 + k] = B(_mm512_shuffle_f32x4(x1, x3, 0xDD));
    }
    return;
  }
#endif
#if XSIMD_WITH_AVX
  if constexpr (std::is_base_of_v<xsimd::avx, Arch> && w == 8) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 2; ++g) {
      r[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      r[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      r[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      r[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      col[k] = B(_mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
      col[4 + k] = B(_mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
    }
    return;
  }
#endif
  for (int l = 0; l < w; ++l) {
    alignas(64) float c[w];
    for (int i = 0; i < w; ++i) c[i] = src[i * ld_src + l];
    col[l] = B::load_aligned(c);
  }
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP
