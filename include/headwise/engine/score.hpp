/// @file
/// @brief Score-modifier policies: how raw Q·Kᵀ becomes a log2-domain logit.
#pragma once

#include "../tile/softmax.hpp"

namespace headwise::engine {

inline constexpr float log2e = 1.4426950408889634f;

/// s = scale·(q·k): the whole factor scale·log2(e) is folded into the packed Q.
struct plain_score {
  [[nodiscard]] static float q_factor(float scale) noexcept { return scale * log2e; }
  template <class Arch>
  void apply(float*, std::ptrdiff_t) const noexcept {}
};

/// s = cap·tanh(scale·(q·k)/cap) (Gemma 2, Grok): Q carries scale, the tile pass the rest.
struct softcap_score {
  float cap = 0.0f;
  [[nodiscard]] static float q_factor(float scale) noexcept { return scale; }
  /// Elementwise over `count` scores (a multiple of the lane count).
  template <class Arch>
  void apply(float* s, std::ptrdiff_t count) const noexcept {
    tile::softcap_tile<Arch>(s, count, 1, count / tile::arch_traits<Arch>::lanes, cap);
  }
};

}  // namespace headwise::engine
