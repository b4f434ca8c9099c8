/// @file
/// @brief Storage dtypes for K/V (f32, bf16, f16) and their exact scalar conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace headwise {

/// bfloat16 storage: the upper 16 bits of an IEEE binary32. Compute is always f32.
struct bf16 {
  std::uint16_t bits = 0;
};

/// IEEE binary16 storage. Compute is always f32.
struct f16 {
  std::uint16_t bits = 0;
};

namespace detail {
inline std::uint32_t float_bits(float x) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) noexcept {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
}  // namespace detail

/// bf16 -> f32, exact.
inline float to_float(bf16 h) noexcept {
  return detail::bits_float(static_cast<std::uint32_t>(h.bits) << 16);
}

/// f16 -> f32, exact (subnormals, infinities and NaN included).
inline float to_float(f16 h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1Fu;
  std::uint32_t man = h.bits & 0x3FFu;
  if (exp == 0x1F) return detail::bits_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp != 0) return detail::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return detail::bits_float(sign);  // +-0
  // subnormal: value = man * 2^-24
  int e = -1;
  do {
    man <<= 1;
    ++e;
  } while ((man & 0x400u) == 0);
  man &= 0x3FFu;
  return detail::bits_float(sign | (static_cast<std::uint32_t>(112 - e) << 23) | (man << 13));
}

inline float to_float(float x) noexcept { return x; }

/// f32 -> bf16 with round-to-nearest-even; NaN stays NaN (quiet).
inline bf16 to_bf16(float x) noexcept {
  std::uint32_t u = detail::float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16{static_cast<std::uint16_t>(u >> 16)};
}

/// f32 -> f16 with round-to-nearest-even; overflow gives +-inf, NaN stays NaN.
inline f16 to_f16(float x) noexcept {
  const std::uint32_t u = detail::float_bits(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return f16{static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu))};
  if (abs >= 0x477FF000u) return f16{static_cast<std::uint16_t>(sign | 0x7C00u)};  // rounds to inf
  if (abs < 0x38800000u) {  // result is subnormal or zero: value / 2^-24, rounded
    if (abs < 0x33000000u) return f16{static_cast<std::uint16_t>(sign)};  // < 2^-25: rounds to 0
    const std::uint32_t e = abs >> 23;
    const std::uint32_t man = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // 14 + (112 - e) ... shift of the 24-bit mantissa
    std::uint32_t r = man >> shift;
    const std::uint32_t rem = man & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16{static_cast<std::uint16_t>(sign | r)};
  }
  std::uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xFFFu + ((r >> 13) & 1u);
  return f16{static_cast<std::uint16_t>(sign | (r >> 13))};
}

/// Conversion from f32 into a storage type: identity for float.
template <class T>
T from_float(float x) noexcept {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16(x);
  } else if constexpr (std::is_same_v<T, f16>) {
    return to_f16(x);
  } else {
    static_assert(std::is_same_v<T, float>, "headwise: storage dtype must be float, bf16 or f16");
    return x;
  }
}

/// True for the K/V storage types headwise accepts.
template <class T>
inline constexpr bool is_kv_dtype_v =
    std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

/// The dtype's name, as used in benchmark family suffixes and error messages.
template <class T>
constexpr const char* dtype_name() noexcept {
  if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else if constexpr (std::is_same_v<T, f16>) return "f16";
  else return "f32";
}

}  // namespace headwise
