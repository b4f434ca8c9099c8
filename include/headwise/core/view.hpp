/// @file
/// @brief tensor_view: pointer + shape + element strides, the only way tensors cross the API.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace headwise {

/// A non-owning strided view of R dimensions. Strides are in elements and may be any value
/// (the kernels require only the last, "dim", axis to be contiguous). data == nullptr with
/// an all-zero shape means "absent" for optional arguments.
template <class T, std::size_t R>
struct tensor_view {
  using element_type = T;
  static constexpr std::size_t rank = R;

  T* data = nullptr;
  std::array<std::int64_t, R> shape{};
  std::array<std::int64_t, R> stride{};

  constexpr tensor_view() = default;
  constexpr tensor_view(T* p, std::array<std::int64_t, R> shp, std::array<std::int64_t, R> str)
      : data(p), shape(shp), stride(str) {}
  /// Row-major contiguous view of the given shape.
  constexpr tensor_view(T* p, std::array<std::int64_t, R> shp) : data(p), shape(shp) {
    std::int64_t s = 1;  // saturates: an overflowing shape is then rejected by numel_checked
    for (std::size_t i = R; i-- > 0;) {
      stride[i] = s;
      if (i > 0 && __builtin_mul_overflow(s, shp[i], &s)) s = std::numeric_limits<std::int64_t>::max();
    }
  }
  /// A view of T converts to a view of const T.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr tensor_view(const tensor_view<U, R>& o)  // NOLINT(google-explicit-constructor)
      : data(o.data), shape(o.shape), stride(o.stride) {}

  /// True when no tensor was given (optional arguments): a null pointer AND an all-zero shape.
  /// A null pointer with a non-empty shape is not absent: the argument checks reject it.
  [[nodiscard]] constexpr bool absent() const noexcept {
    if (data != nullptr) return false;
    for (auto s : shape)
      if (s != 0) return false;
    return true;
  }

  /// Element count: 0 when any extent is 0 (checked first: {2^62, 7, 0} is empty, not an
  /// overflow), -1 when the product overflows (only unchecked views; checked ones never do).
  [[nodiscard]] constexpr std::int64_t numel() const noexcept {
    for (auto s : shape)
      if (s == 0) return 0;
    std::int64_t n = 1;
    for (auto s : shape)
      if (__builtin_mul_overflow(n, s, &n)) return -1;
    return n;
  }

  /// numel(), or -1 when the element count or any element offset overflows 64 bits.
  [[nodiscard]] constexpr std::int64_t numel_checked() const noexcept {
    std::int64_t n = 1, reach = 0;
    for (std::size_t i = 0; i < R; ++i) {
      if (shape[i] < 0) return -1;
      if (shape[i] == 0) return 0;
    }
    for (std::size_t i = 0; i < R; ++i) {
      std::int64_t e = 0, end = 0;
      // |stride| only matters for extents >= 2, where INT64_MIN (no positive twin) overflows anyway.
      if (shape[i] > 1 && stride[i] == std::numeric_limits<std::int64_t>::min()) return -1;
      const std::int64_t s = shape[i] == 1 ? 0 : stride[i] < 0 ? -stride[i] : stride[i];
      if (__builtin_mul_overflow(n, shape[i], &n)) return -1;
      if (__builtin_mul_overflow(shape[i] - 1, s, &e)) return -1;
      if (__builtin_add_overflow(reach, e, &reach)) return -1;
      if (__builtin_add_overflow(reach, std::int64_t{1}, &end)) return -1;
      if (__builtin_mul_overflow(end, static_cast<std::int64_t>(sizeof(T)), &e)) return -1;
    }
    return n;
  }

  template <class... I>
  [[nodiscard]] constexpr std::int64_t offset(I... idx) const noexcept {
    static_assert(sizeof...(I) == R, "tensor_view: wrong number of indices");
    const std::array<std::int64_t, R> ix{static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (std::size_t i = 0; i < R; ++i) off += ix[i] * stride[i];
    return off;
  }

  template <class... I>
  [[nodiscard]] constexpr T& operator()(I... idx) const noexcept {
    return data[offset(idx...)];
  }
};

/// Contiguous [batch, seq, heads, dim] view (the default layout: a KV cache appended token by token).
template <class T>
constexpr tensor_view<T, 4> bshd(T* p, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                                 std::int64_t dim) {
  return tensor_view<T, 4>(p, {batch, seq, heads, dim});
}

/// Contiguous [batch, heads, seq] view, the layout of the log-sum-exp output.
template <class T>
constexpr tensor_view<T, 3> bhs(T* p, std::int64_t batch, std::int64_t heads, std::int64_t seq) {
  return tensor_view<T, 3>(p, {batch, heads, seq});
}

}  // namespace headwise
