/// @file
/// @brief Merging two attention states (O, LSE) over disjoint key sets: the split-KV reduce,
/// and the public merge_states.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace headwise::engine {

/// (o_a, lse_a) <- merge((o_a, lse_a), (o_b, lse_b)) for one row of dv values; o normalised,
/// lse natural log. With w = exp(lse - max): o = (w_a·o_a + w_b·o_b) / (w_a + w_b),
/// lse = max + log(w_a + w_b). An empty state (lse = -inf, o = 0) is the identity.
inline void merge_into(float* o_a, float& lse_a, const float* o_b, float lse_b, std::int64_t dv) noexcept {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  if (lse_b == ninf) return;
  if (lse_a == ninf) {
    for (std::int64_t c = 0; c < dv; ++c) o_a[c] = o_b[c];
    lse_a = lse_b;
    return;
  }
  const double m = lse_a > lse_b ? lse_a : lse_b;
  const double wa = std::exp(static_cast<double>(lse_a) - m), wb = std::exp(static_cast<double>(lse_b) - m);
  const double s = wa + wb;
  const auto fa = static_cast<float>(wa / s), fb = static_cast<float>(wb / s);
  for (std::int64_t c = 0; c < dv; ++c) o_a[c] = fa * o_a[c] + fb * o_b[c];
  lse_a = static_cast<float>(m + std::log(s));
}

}  // namespace headwise::engine
