/// @file
/// @brief Packing K rows D-major (keys across lanes) for the key-lane layout: K_buf[d][j] from
/// rows K[j][d], converting bf16/f16 to f32 on the way. AVX-512 uses a 16x16 register
/// transpose; other architectures a scalar loop.
#pragma once

#include <cstdint>
#include <cstring>

#include "diagnostics.hpp"
#include "memory.hpp"

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

#if XSIMD_WITH_AVX512F
/// In-register transpose of 16 rows of 16 floats: afterwards r[i] holds column i.
inline void transpose16x16(__m512 (&r)[16]) noexcept {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

/// K_buf[d][j] = f32(row_j[d]) for j < n, d < dim; K_buf[d][j] = 0 for n <= j < n_pad.
/// `row(j)` returns a pointer to key j's dim_qk storage elements; ld is K_buf's row stride
/// (>= n_pad, a multiple of the lane count).
template <class Arch, class T, class Row>
inline void pack_k_dmajor(float* k_buf, std::ptrdiff_t ld, Row&& row, std::ptrdiff_t n, std::ptrdiff_t n_pad,
                          std::ptrdiff_t dim) noexcept {
  std::ptrdiff_t j0 = 0;
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512_v<Arch>) {
    for (; j0 + 16 <= n; j0 += 16) {
      const T* src[16];
      for (int i = 0; i < 16; ++i) src[i] = row(j0 + i);
      std::ptrdiff_t d0 = 0;
      for (; d0 + 16 <= dim; d0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = load_as_float<Arch>(src[i] + d0);
        transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_store_ps(k_buf + (d0 + i) * ld + j0, r[i]);
      }
      for (; d0 < dim; ++d0)
        for (int i = 0; i < 16; ++i) k_buf[d0 * ld + j0 + i] = to_float(src[i][d0]);
    }
  }
#endif
  for (; j0 < n; ++j0) {
    const T* src = row(j0);
    for (std::ptrdiff_t d = 0; d < dim; ++d) k_buf[d * ld + j0] = to_float(src[d]);
  }
  for (std::ptrdiff_t d = 0; d < dim; ++d)
    for (std::ptrdiff_t j = n; j < n_pad; ++j) k_buf[d * ld + j] = 0.0f;
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP
