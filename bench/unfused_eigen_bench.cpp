/// @file
/// @brief The unfused_eigen baseline: per (batch, head), S = scale·Q·Kᵀ materialised with an
/// Eigen GEMM, causal mask, row softmax, O = P·V with a second Eigen GEMM.

// GCC 12 flags AVX-512 intrinsics inside Eigen's own GEMM packing (_mm512_undefined_ps) as
// maybe-uninitialized; the pragma has to cover Eigen's templates, i.e. its include.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <Eigen/Core>
#include <cmath>
#include <limits>

#include "common.hpp"


namespace headwise_bench {

namespace {

using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using head_view = Eigen::Map<const row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using head_out_view = Eigen::Map<row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

/// out = softmax(scale·Q·Kᵀ + mask)·V for every (batch, head), GQA by repeat-interleave.
/// `scores` is the materialised (seq_q, seq_kv) matrix, reused across heads.
void unfused_attention(const shape& s, dense_inputs<float>& in, row_matrix& scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dim_qk));
  const std::int64_t group = s.heads_q / s.heads_kv;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t h = 0; h < s.heads_q; ++h) {
      const std::int64_t g = h / group;
      // Head slices of the BSHD tensors: rows are tokens, the outer stride skips the other heads.
      const head_view q_g(in.q.data() + (b * s.seq_q * s.heads_q + h) * s.dim_qk, s.seq_q, s.dim_qk,
                          Eigen::OuterStride<>(s.heads_q * s.dim_qk));  // (seq_q, dim_qk)
      const head_view k_g(in.k.data() + (b * s.seq_kv * s.heads_kv + g) * s.dim_qk, s.seq_kv, s.dim_qk,
                          Eigen::OuterStride<>(s.heads_kv * s.dim_qk));  // (seq_kv, dim_qk)
      const head_view v_g(in.v.data() + (b * s.seq_kv * s.heads_kv + g) * s.dim_v, s.seq_kv, s.dim_v,
                          Eigen::OuterStride<>(s.heads_kv * s.dim_v));  // (seq_kv, dim_v)
      head_out_view o_g(in.o.data() + (b * s.seq_q * s.heads_q + h) * s.dim_v, s.seq_q, s.dim_v,
                        Eigen::OuterStride<>(s.heads_q * s.dim_v));  // (seq_q, dim_v)

      // S = scale · Q Kᵀ  (seq_q, seq_kv), always the full matrix
      scores.noalias() = scale * q_g * k_g.transpose();

      // P = softmax(S + mask) by rows. The bottom-right causal mask puts -inf on keys
      // j > i + seq_kv - seq_q; exp(-inf - max) is exactly 0, so the masked tail is written as
      // zeros directly (Eigen's vectorised exp would return a denormal for -inf, and denormals
      // would slow the P·V GEMM down).
      for (std::int64_t i = 0; i < s.seq_q; ++i) {
        const std::int64_t visible =
            s.causal ? std::min(s.seq_kv, std::max<std::int64_t>(0, i + s.seq_kv - s.seq_q + 1)) : s.seq_kv;
        auto row = scores.row(i);
        if (visible < s.seq_kv) row.tail(s.seq_kv - visible).setZero();
        if (visible == 0) continue;  // no visible key: O row = 0
        auto p = row.head(visible).array();
        const float m = p.maxCoeff();
        p = (p - m).exp();
        p *= 1.0f / p.sum();
      }

      // O = P V  (seq_q, dim_v)
      o_g.noalias() = scores * v_g;
    }
  }
}

}  // namespace

std::vector<shape> unfused_eigen_shapes(const plan_options& opt) {
  // Every f32 mha, gqa and sqa shape of the dense plan with the interleave head map (default:
  // L=2048 D=128 at one thread: MHA H=8 causal 0 and 1, GQA 32/8, SQA 8/4 and 4/4; --full: the
  // sweeps up to L=4096). Reverse SQA (tile head map) has no baseline.
  plan_options dense = opt;
  dense.tune = false;
  std::vector<shape> list;
  for (shape s : dense_shapes(dense)) {
    if ((s.family != "mha" && s.family != "gqa" && s.family != "sqa") || s.dtype != kv_dtype::f32 ||
        s.heads != headwise::head_map::interleave)
      continue;
    if (!opt.full && (s.threads != 1 || s.seq_q != 2048)) continue;
    if (s.seq_q > 4096 || s.seq_kv > 4096) continue;
    s.family = "unfused_eigen";
    add_unique(list, s);
  }
  return list;
}

void register_unfused_eigen_benchmarks(const std::vector<shape>& shapes) {
  for (const shape& s : shapes) {
    const std::string name = s.name();
    benchmark::RegisterBenchmark(name.c_str(), [s, name](benchmark::State& state) {
      // Same key as the dense f32 benchmarks: the same inputs are reused when shapes match.
      auto& in = input_slot::instance().get<dense_inputs<float>>("dense:" + s.data_key(), s);
      row_matrix scores(s.seq_q, s.seq_kv);  // (seq_q, seq_kv), outside the timed loop
      Eigen::setNbThreads(s.threads);        // Eigen's own GEMM threading
      run_timed(state, s, name, [&] { unfused_attention(s, in, scores); });
    })->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
