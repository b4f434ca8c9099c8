/// @file
/// @brief exp2 for the softmax: a degree-6 polynomial on [-1/2, 1/2] and an exponent shift.
#pragma once

#include "arch.hpp"
#include "diagnostics.hpp"

HEADWISE_DIAGNOSTICS_PUSH

namespace headwise::tile {

/// Stated error bound of exp2_softmax, in units of relative error, for x in [-125, 0]
/// (the softmax's domain: x = s - max <= 0). Checked by tests/tile_test.cpp against
/// long-double exp2 over a dense sweep. Results below 2^-126 flush to 0; -inf gives 0;
/// NaN gives NaN. Also accurate (same bound) on (0, 127].
inline constexpr double exp2_rel_error_bound = 2.5e-7;

/// 2^x, vectorised: n = round(x), f = x - n in [-1/2, 1/2], 2^f by a degree-6 polynomial
/// (Cephes exp2f coefficients), then 2^n assembled in the exponent bits.
template <class Arch>
inline xsimd::batch<float, Arch> exp2_softmax(xsimd::batch<float, Arch> x) noexcept {
  using B = xsimd::batch<float, Arch>;
  using I = xsimd::batch<std::int32_t, Arch>;
  // Operand order keeps NaN: xsimd 8.1 max(a, b)/min(a, b) return b when either is NaN.
  x = xsimd::max(B(-127.0f), x);
  x = xsimd::min(B(127.0f), x);
  const I n = xsimd::nearbyint_as_int(x);
  const B f = x - xsimd::to_float(n);  // [-1/2, 1/2]
  B p = B(1.535336188319500e-4f);
  p = tile::fma<Arch>(p, f, B(1.339887440266574e-3f));
  p = tile::fma<Arch>(p, f, B(9.618437357674640e-3f));
  p = tile::fma<Arch>(p, f, B(5.550332471162809e-2f));
  p = tile::fma<Arch>(p, f, B(2.402264791363012e-1f));
  p = tile::fma<Arch>(p, f, B(6.931472028550421e-1f));
  p = tile::fma<Arch>(p, f, B(1.0f));
  // 2^n with n in [-127, 127]; n = -127 gives the bit pattern 0, i.e. a flush to zero.
  const B two_n = xsimd::bitwise_cast<B>((n + I(127)) << 23);
  return p * two_n;
}

}  // namespace headwise::tile

HEADWISE_DIAGNOSTICS_POP
