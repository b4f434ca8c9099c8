/// @file
/// @brief The SIMD architecture the kernels are compiled for, and its register-blocking shape.
#pragma once

#include <cstddef>
#include <type_traits>
#include <xsimd/xsimd.hpp>

namespace headwise::tile {

/// Compile-time architecture: the best the translation unit's flags allow (-march=native by
/// default). One instantiation per TU; no runtime dispatch inside the library.
using default_arch = xsimd::default_arch;

template <class Arch>
inline constexpr bool is_avx512_v =
#if XSIMD_WITH_AVX512F
    std::is_base_of_v<xsimd::avx512f, Arch>;
#else
    false;
#endif

template <class Arch>
inline constexpr bool is_avx2_v =
#if XSIMD_WITH_AVX2
    std::is_base_of_v<xsimd::avx2, Arch> && !is_avx512_v<Arch>;
#else
    false;
#endif

/// Register budget and microkernel blocking for one architecture. The accumulators of both
/// microkernels are (keys_or_dims x vecs) vectors; with 32 registers (AVX-512) 6x4 = 24
/// accumulators + 4 operand vectors + 1 broadcast fit, with 16 (AVX2, SSE) 6x2 = 12 + 2 + 1.
template <class Arch>
struct arch_traits {
  using batch = xsimd::batch<float, Arch>;
  static constexpr int lanes = static_cast<int>(batch::size);
  static constexpr int vregs = is_avx512_v<Arch> ? 32 : 16;
  static constexpr int rows_blk = 6;                    ///< keys (QK) or value dims (PV) per block
  static constexpr int vecs_blk = vregs >= 32 ? 4 : 2;  ///< lane vectors per block
  static constexpr std::size_t alignment = Arch::alignment();
};

/// Whether Arch has fused multiply-add instructions (AVX-512, or FMA3 with SSE4.2/AVX/AVX2).
template <class Arch>
inline constexpr bool has_fma_v = is_avx512_v<Arch> || std::is_base_of_v<xsimd::fma3<xsimd::sse4_2>, Arch> ||
                                  std::is_base_of_v<xsimd::fma3<xsimd::avx>, Arch> ||
                                  std::is_base_of_v<xsimd::fma3<xsimd::avx2>, Arch>;

/// a·b + c, with one rounding on every arch that has FMA instructions (has_fma_v; elsewhere,
/// e.g. SSE2 or AVX2 without -mfma, xsimd::fma's multiply and add). xsimd 8.1 has no AVX-512
/// kernel for xsimd::fma: its generic fallback computes x * y + z through the batch operators,
/// which GCC contracts into one FMA (-ffp-contract=fast) and clang does not
/// (-ffp-contract=on stops at the operator calls), so a clang build ran a multiply and an add
/// for every FMA of every kernel: half the FMA peak, and different bits from a GCC build.
template <class Arch>
inline xsimd::batch<float, Arch> fma(xsimd::batch<float, Arch> a, xsimd::batch<float, Arch> b,
                                     xsimd::batch<float, Arch> c) noexcept {
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512_v<Arch>) {
    return _mm512_fmadd_ps(a, b, c);
  } else
#endif
  {
    return xsimd::fma(a, b, c);
  }
}

/// Rounds n up to a multiple of m (m > 0).
constexpr std::ptrdiff_t round_up(std::ptrdiff_t n, std::ptrdiff_t m) noexcept { return (n + m - 1) / m * m; }

}  // namespace headwise::tile
