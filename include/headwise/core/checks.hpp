/// @file
/// @brief Argument checking shared by every entry point: shapes, strides, null data, overflow,
/// aliasing. Everything here runs before any work; failures throw headwise::argument_error.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "error.hpp"
#include "view.hpp"

namespace headwise::detail {

/// [first, last) byte addresses a view touches; empty when any extent is 0.
struct byte_range {
  std::uintptr_t first = 0, last = 0;
  [[nodiscard]] bool empty() const noexcept { return first >= last; }
  [[nodiscard]] bool overlaps(const byte_range& o) const noexcept {
    return !empty() && !o.empty() && first < o.last && o.first < last;
  }
};

/// Builds the messages of argument_error for one entry point.
class checker {
 public:
  explicit checker(std::string function) : fn_(std::move(function)) {}

  [[noreturn]] void fail(const std::string& arg, const std::string& expected, const std::string& given) const {
    throw argument_error(fn_, arg, expected, given);
  }
  void require(bool ok, const std::string& arg, const std::string& expected, const std::string& given) const {
    if (!ok) fail(arg, expected, given);
  }
  void equal(std::int64_t got, std::int64_t want, const std::string& arg, const std::string& what) const {
    if (got != want) fail(arg, what + " = " + to_text(want), to_text(got));
  }

  /// A tensor argument: non-negative shape, extents that fit 64-bit offsets, contiguous last
  /// axis, non-null data unless empty. `min_extent[i]` is the smallest legal extent of axis i.
  template <class T, std::size_t R>
  void view(const tensor_view<T, R>& t, const std::string& name, const std::array<std::int64_t, R>& min_extent,
            const std::array<const char*, R>& axis) const {
    for (std::size_t i = 0; i < R; ++i) {
      const std::string arg = name + ".shape[" + std::to_string(i) + "] (" + axis[i] + ")";
      require(t.shape[i] >= min_extent[i], arg, ">= " + to_text(min_extent[i]), to_text(t.shape[i]));
    }
    if (t.numel_checked() < 0)
      fail(name + ".shape", "a size whose element offsets fit in 64 bits", "an overflowing shape/stride");
    if (t.numel() == 0) return;
    require(t.data != nullptr, name + ".data", "a non-null pointer", "nullptr");
    require(t.shape[R - 1] == 1 || t.stride[R - 1] == 1, name + ".stride[" + std::to_string(R - 1) + "]",
            "1 (the " + std::string(axis[R - 1]) + " axis must be contiguous)", to_text(t.stride[R - 1]));
  }

  /// Outputs must not overlap themselves: distinct indices, distinct elements.
  template <class T, std::size_t R>
  void no_self_overlap(const tensor_view<T, R>& t, const std::string& name) const {
    if (t.numel() == 0) return;
    std::array<std::pair<std::int64_t, std::int64_t>, R> ax{};  // (|stride|, extent)
    for (std::size_t i = 0; i < R; ++i)  // extent-1 axes never step (their stride may be INT64_MIN)
      ax[i] = {t.shape[i] == 1 ? 0 : t.stride[i] < 0 ? -t.stride[i] : t.stride[i], t.shape[i]};
    std::sort(ax.begin(), ax.end());
    std::int64_t span = 1;  // elements covered by the inner axes
    for (auto [s, n] : ax) {
      if (n == 1) continue;
      require(s >= span, name + ".stride", "strides that give every element its own address",
              "overlapping strides");
      span = s * (n - 1) + span;
    }
  }

  template <class A, class Bv>
  void no_alias(const A& out, const std::string& out_name, const Bv& in, const std::string& in_name) const {
    if (range(out).overlaps(range(in)))
      fail(out_name, "memory not overlapping '" + in_name + "'", "an aliasing view");
  }

  template <class T, std::size_t R>
  static byte_range range(const tensor_view<T, R>& t) noexcept {
    if (t.data == nullptr || t.numel() == 0) return {};
    std::int64_t lo = 0, hi = 0;
    for (std::size_t i = 0; i < R; ++i) {
      const std::int64_t e = (t.shape[i] - 1) * t.stride[i];
      (e < 0 ? lo : hi) += e;
    }
    const auto base = reinterpret_cast<std::uintptr_t>(t.data);
    return {base + static_cast<std::uintptr_t>(lo * static_cast<std::int64_t>(sizeof(T))),
            base + static_cast<std::uintptr_t>((hi + 1) * static_cast<std::int64_t>(sizeof(T)))};
  }

  [[nodiscard]] const std::string& function() const noexcept { return fn_; }

 private:
  template <class T>
  static std::string to_text(const T& v) {
    return detail::to_text(v);
  }
  std::string fn_;
};

}  // namespace headwise::detail
