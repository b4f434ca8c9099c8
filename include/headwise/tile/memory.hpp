/// @file
/// @brief Loads and stores with tails, and loads that convert bf16/f16 storage to f32.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../core/dtype.hpp"
#include "arch.hpp"
#include "diagnostics.hpp"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

/// Loads n <= lanes floats, zero-filling the remaining lanes; never reads past p + n.
template <class Arch>
inline xsimd::batch<float, Arch> load_partial(const float* p, int n) noexcept {
  using B = xsimd::batch<float, Arch>;
  if (n >= static_cast<int>(B::size)) return B::load_unaligned(p);
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512_v<Arch>) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
#endif
  alignas(64) float buf[B::size] = {};
  std::memcpy(buf, p, sizeof(float) * static_cast<std::size_t>(n));
  return B::load_aligned(buf);
}

/// Stores the first n <= lanes lanes; never writes past p + n.
template <class Arch>
inline void store_partial(float* p, xsimd::batch<float, Arch> x, int n) noexcept {
  using B = xsimd::batch<float, Arch>;
  if (n >= static_cast<int>(B::size)) {
    x.store_unaligned(p);
    return;
  }
  alignas(64) float buf[B::size];
  x.store_aligned(buf);
  std::memcpy(p, buf, sizeof(float) * static_cast<std::size_t>(n));
}

/// Loads `lanes` storage elements at p as f32 (exact conversion).
template <class Arch, class T>
inline xsimd::batch<float, Arch> load_as_float(const T* p) noexcept {
  using B = xsimd::batch<float, Arch>;
  if constexpr (std::is_same_v<T, float>) {
    return B::load_unaligned(p);
  } else {
#if XSIMD_WITH_AVX512F
    if constexpr (is_avx512_v<Arch>) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (std::is_same_v<T, bf16>) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        return _mm512_cvtph_ps(h);
      }
    }
#endif
#if XSIMD_WITH_AVX2
    if constexpr (B::size == 8 && std::is_base_of_v<xsimd::avx2, Arch>) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (std::is_same_v<T, bf16>) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
#if defined(__F16C__)
      else {
        return _mm256_cvtph_ps(h);
      }
#endif
    }
#endif
    alignas(64) float buf[B::size];
    for (std::size_t i = 0; i < B::size; ++i) buf[i] = to_float(p[i]);
    return B::load_aligned(buf);
  }
}

/// Loads n < lanes storage elements at p as f32, zero-filling the remaining lanes; never reads
/// past p + n (the tail of a row read in place).
template <class Arch, class T>
inline xsimd::batch<float, Arch> load_as_float_partial(const T* p, int n) noexcept {
  using B = xsimd::batch<float, Arch>;
  if constexpr (std::is_same_v<T, float>) {
    return load_partial<Arch>(p, n);
  } else {
    alignas(64) T buf[B::size] = {};
    std::memcpy(buf, p, sizeof(T) * static_cast<std::size_t>(n));
    return load_as_float<Arch>(buf);
  }
}

/// dst[0..n) = f32(src[0..n)): a row of K or V converted once into a packed tile buffer.
template <class Arch, class T>
inline void convert_row(float* dst, const T* src, std::ptrdiff_t n) noexcept {
  using B = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t w = B::size;
  std::ptrdiff_t i = 0;
  for (; i + w <= n; i += w) load_as_float<Arch>(src + i).store_unaligned(dst + i);
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

/// Prefetches the 64-byte lines of [p, p + bytes) into L2: a KV row that the mainloop reads
/// soon (an unaligned row's first and last lines included).
inline void prefetch_l2(const void* p, std::ptrdiff_t bytes) noexcept {
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t{63};
  const std::uintptr_t end = reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(bytes);
  for (std::uintptr_t x = first; x < end; x += 64) __builtin_prefetch(reinterpret_cast<const void*>(x), 0, 2);
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP
