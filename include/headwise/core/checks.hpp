/// @file
/// @brief Argument checking shared by every entry point: shapes, strides, null data, overflow,
/// aliasing. Everything here runs before any work; failures throw headwise::argument_error.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
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

/// Builds the messages of argument_error for one entry point. A passing check costs little
/// more than its test: names are string_views (literals need no allocation) and a `given`
/// value is formatted only on failure, so a call with a short cache is not dominated by its
/// checks (callers that concatenate names or bounds still pay for that: docs/design.md).
class checker {
 public:
  explicit checker(std::string function) : fn_(std::move(function)) {}

  [[noreturn]] void fail(std::string_view arg, std::string_view expected, std::string_view given) const {
    throw argument_error(fn_, std::string(arg), std::string(expected), std::string(given));
  }
  /// `given`: a string, or a value formatted (to_text) only when the check fails.
  template <class G>
  void require(bool ok, std::string_view arg, std::string_view expected, const G& given) const {
    if (!ok) fail(arg, expected, text(given));
  }
  void equal(std::int64_t got, std::int64_t want, std::string_view arg, std::string_view what) const {
    if (got != want) fail(arg, std::string(what) + " = " + to_text(want), to_text(got));
  }

  /// A tensor argument: non-negative shape, extents that fit 64-bit offsets, contiguous last
  /// axis, non-null data unless empty. `min_extent[i]` is the smallest legal extent of axis i.
  template <class T, std::size_t R>
  void view(const tensor_view<T, R>& t, std::string_view name, const std::array<std::int64_t, R>& min_extent,
            const std::array<const char*, R>& axis) const {
    for (std::size_t i = 0; i < R; ++i) {
      if (t.shape[i] < min_extent[i])
        fail(std::string(name) + ".shape[" + std::to_string(i) + "] (" + axis[i] + ")", ">= " + to_text(min_extent[i]),
             to_text(t.shape[i]));
    }
    if (t.numel_checked() < 0)
      fail(std::string(name) + ".shape", "a size whose element offsets fit in 64 bits", "an overflowing shape/stride");
    if (t.numel() == 0) return;
    if (t.data == nullptr) fail(std::string(name) + ".data", "a non-null pointer", "nullptr");
    if (t.shape[R - 1] != 1 && t.stride[R - 1] != 1)
      fail(std::string(name) + ".stride[" + std::to_string(R - 1) + "]",
           "1 (the " + std::string(axis[R - 1]) + " axis must be contiguous)", to_text(t.stride[R - 1]));
  }

  /// Outputs must not overlap themselves: distinct indices, distinct elements.
  template <class T, std::size_t R>
  void no_self_overlap(const tensor_view<T, R>& t, std::string_view name) const {
    if (t.numel() == 0) return;
    std::array<std::pair<std::int64_t, std::int64_t>, R> ax{};  // (|stride|, extent)
    for (std::size_t i = 0; i < R; ++i)  // extent-1 axes never step (their stride may be INT64_MIN)
      ax[i] = {t.shape[i] == 1 ? 0 : t.stride[i] < 0 ? -t.stride[i] : t.stride[i], t.shape[i]};
    std::sort(ax.begin(), ax.end());
    std::int64_t span = 1;  // elements covered by the inner axes
    for (auto [s, n] : ax) {
      if (n == 1) continue;
      if (s < span) fail(std::string(name) + ".stride", "strides that give every element its own address",
                         "overlapping strides");
      span = s * (n - 1) + span;
    }
  }

  template <class A, class Bv>
  void no_alias(const A& out, std::string_view out_name, const Bv& in, std::string_view in_name) const {
    if (range(out).overlaps(range(in)))
      fail(out_name, "memory not overlapping '" + std::string(in_name) + "'", "an aliasing view");
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
  template <class G>
  static std::string text(const G& g) {
    if constexpr (std::is_convertible_v<const G&, std::string_view>) {
      return std::string(std::string_view(g));
    } else {
      return detail::to_text(g);
    }
  }
  std::string fn_;
};

}  // namespace headwise::detail
