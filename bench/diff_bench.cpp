/// @file
/// @brief Differential attention benchmarks. gda: the fused kernel, headwise::diff_attention
/// (signal and noise maps of a K/V pair in one pass, the combine in its epilogue); gda_unfused:
/// the same layer as two headwise::attention calls (signal heads on K1, noise heads on K2, both
/// on V) followed by the combine pass, with Q1/Q2 gathered out of the striped Q before timing
/// (the comparison is kernels only); diff: DIFF (hs = hn = h) through the fused kernel.
/// FLOPs = 2·pairs·(hs + hn)·(d + 2d); bytes = K1, K2 and V once.

#include <algorithm>
#include <cstring>

#include "common.hpp"

namespace headwise_bench {

namespace {

shape gda(const char* family, std::int64_t hs, std::int64_t hn, std::int64_t pairs, std::int64_t d, bool causal,
          int threads = 1, std::int64_t seq = 2048, kv_dtype t = kv_dtype::f32) {
  shape s;
  s.family = family;
  s.dtype = t;
  s.seq_q = seq;
  s.seq_kv = seq;
  s.heads_q = hs;
  s.heads_noise = hn;
  s.heads_kv = pairs;
  s.dim_qk = d;
  s.dim_v = 2 * d;
  s.causal = causal;
  s.threads = threads;
  return s;
}

/// Striped Q (batch, seq_q, hs + hn, d), K pairs (batch, seq_kv, 2·pairs, d), V (batch,
/// seq_kv, pairs, 2d), out (batch, seq_q, hs, 2d); for the unfused form also Q1/Q2 gathered and
/// the two attention outputs.
template <class KV>
struct gda_inputs {
  std::int64_t hs, hn;
  bench_buffer<float> q;
  bench_buffer<KV> k, v;
  bench_buffer<float> o, q1, q2, o1, o2;
  bench_buffer<float> norm_weight;
  explicit gda_inputs(const shape& s)
      : hs(s.heads_q), hn(s.heads_noise),
        q(random_normal<float>(static_cast<std::size_t>(s.batch * s.seq_q * (hs + hn) * s.dim_qk), 1)),
        k(random_normal<KV>(static_cast<std::size_t>(s.batch * s.seq_kv * 2 * s.heads_kv * s.dim_qk), 2)),
        v(random_normal<KV>(static_cast<std::size_t>(s.batch * s.seq_kv * s.heads_kv * s.dim_v), 3)),
        o(static_cast<std::size_t>(s.batch * s.seq_q * hs * s.dim_v), 0.0f),
        norm_weight(random_normal<float>(static_cast<std::size_t>(s.dim_v), 4)) {
    if (s.family != "gda_unfused") return;
    const std::int64_t g = hs / hn, tokens = s.batch * s.seq_q, d = s.dim_qk;
    q1.resize(static_cast<std::size_t>(tokens * hs * d));
    q2.resize(static_cast<std::size_t>(tokens * hn * d));
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t h = 0; h < hs + hn; ++h) {
        const float* src = q.data() + (t * (hs + hn) + h) * d;
        const std::int64_t grp = h / (g + 1), j = h % (g + 1);
        float* dst = j < g ? q1.data() + (t * hs + grp * g + j) * d : q2.data() + (t * hn + grp) * d;
        std::copy(src, src + d, dst);
      }
    o1.resize(o.size());
    o2.resize(static_cast<std::size_t>(tokens * hn * s.dim_v));
  }
};

headwise::diff_options layer_options(const shape& s, const bench_buffer<float>& norm_weight) {
  headwise::diff_options opt;
  opt.causal = s.causal ? headwise::causal_mode::bottom_right : headwise::causal_mode::none;
  opt.num_threads = s.threads;
  opt.lambda = 0.8f;
  opt.lambda_init = 0.2f;  // layer 0
  opt.norm_weight = headwise::tensor_view<const float, 1>(norm_weight.data(), {s.dim_v});
  return opt;
}

template <class KV>
void run_fused(benchmark::State& state, const shape& s, const std::string& name) {
  auto& in = input_slot::instance().get<gda_inputs<KV>>("gda:" + s.family + s.data_key(), s);
  const std::int64_t hs = s.heads_q, hn = s.heads_noise;
  const auto q = headwise::bshd<const float>(in.q.data(), s.batch, s.seq_q, hs + hn, s.dim_qk);
  const auto k = headwise::bshd<const KV>(in.k.data(), s.batch, s.seq_kv, 2 * s.heads_kv, s.dim_qk);
  const auto v = headwise::bshd<const KV>(in.v.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_v);
  const auto o = headwise::bshd<float>(in.o.data(), s.batch, s.seq_q, hs, s.dim_v);
  const headwise::diff_options opt = layer_options(s, in.norm_weight);
  run_timed(state, s, name, [&] { headwise::diff_attention(q, k, v, o, opt); });
}

/// K1 or K2 of every pair as a strided (batch, seq_kv, pairs, d) view of the interleaved K.
template <class KV>
headwise::tensor_view<const KV, 4> key_set(const bench_buffer<KV>& k, const shape& s, int set) {
  const std::int64_t d = s.dim_qk, p = s.heads_kv;
  return headwise::tensor_view<const KV, 4>(k.data() + set * d, {s.batch, s.seq_kv, p, d},
                                            {s.seq_kv * 2 * p * d, 2 * p * d, 2 * d, 1});
}

template <class KV>
void run_unfused(benchmark::State& state, const shape& s, const std::string& name) {
  auto& in = input_slot::instance().get<gda_inputs<KV>>("gda:" + s.family + s.data_key(), s);
  const std::int64_t hs = s.heads_q, hn = s.heads_noise, dv = s.dim_v, g = hs / hn;
  const auto q1 = headwise::bshd<const float>(in.q1.data(), s.batch, s.seq_q, hs, s.dim_qk);
  const auto q2 = headwise::bshd<const float>(in.q2.data(), s.batch, s.seq_q, hn, s.dim_qk);
  const auto v = headwise::bshd<const KV>(in.v.data(), s.batch, s.seq_kv, s.heads_kv, dv);
  const auto o1 = headwise::bshd<float>(in.o1.data(), s.batch, s.seq_q, hs, dv);
  const auto o2 = headwise::bshd<float>(in.o2.data(), s.batch, s.seq_q, hn, dv);
  const headwise::diff_options opt = layer_options(s, in.norm_weight);
  const headwise::detail::diff_combine combine{in.norm_weight.data(), opt.norm_eps, 1.0f - *opt.lambda_init, true};
  const std::int64_t tokens = s.batch * s.seq_q;
  const float lambda = *opt.lambda;
  run_timed(state, s, name, [&] {
    headwise::attention(q1, key_set(in.k, s, 0), v, o1, opt);
    headwise::attention(q2, key_set(in.k, s, 1), v, o2, opt);
    const float* n2 = in.o2.data();
    float* out = in.o.data();
    const float* a1 = in.o1.data();
#if defined(_OPENMP)
#pragma omp parallel for num_threads(s.threads) schedule(static) if (s.threads > 1)
#endif
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t i = 0; i < hs; ++i) {
        float* dst = out + (t * hs + i) * dv;
        std::copy(a1 + (t * hs + i) * dv, a1 + (t * hs + i + 1) * dv, dst);
        combine(dst, n2 + (t * hn + i / g) * dv, lambda, dv);
      }
  });
}

template <class KV>
void run_gda(benchmark::State& state, const shape& s, const std::string& name) {
  if (s.family == "gda_unfused") {
    run_unfused<KV>(state, s, name);
  } else {
    run_fused<KV>(state, s, name);
  }
}

}  // namespace

std::vector<shape> diff_shapes(const plan_options& opt) {
  std::vector<shape> list;
  const int all = opt.hardware_threads;
  // Representative: the bar shape (hs 8, hn 2, 2 pairs, d 64: Motif-like 4:1 grouping)
  // fused and unfused, causal too, DIFF at the same width (8 diff heads = 16 maps), and all cores.
  for (const char* f : {"gda", "gda_unfused"}) {
    add_unique(list, gda(f, 8, 2, 2, 64, false));
    add_unique(list, gda(f, 8, 2, 2, 64, true));
  }
  add_unique(list, gda("diff", 8, 8, 8, 64, false));
  add_unique(list, gda("diff", 8, 8, 8, 64, true));
  if (all > 1) {
    add_unique(list, gda("gda", 8, 2, 2, 64, true, all));
    add_unique(list, gda("gda_unfused", 8, 2, 2, 64, true, all));
  }
  if (opt.full) {
    for (const char* f : {"gda", "gda_unfused"}) {
      // Group ratios at a fixed signal width (G = 1, 2, 4, 8); Motif-2-12.7B's 4:1 grouping at
      // d 128 (16:4 over 4 pairs); the bf16 cache; a thread sweep at 4k.
      for (std::int64_t hn : {8, 4, 2, 1}) add_unique(list, gda(f, 8, hn, std::min<std::int64_t>(hn, 2), 64, true));
      add_unique(list, gda(f, 16, 4, 4, 128, true));
      add_unique(list, gda(f, 8, 2, 2, 64, true, 1, 2048, kv_dtype::bf16));
      for (int n : thread_sweep(all)) add_unique(list, gda(f, 8, 2, 2, 64, true, n, 4096));
    }
    for (std::int64_t hkv : {8, 4}) add_unique(list, gda("diff", 8, 8, hkv, 64, true));
  }
  return list;
}

void register_diff_benchmarks(const std::vector<shape>& shapes) {
  for (const shape& s : shapes) {
    const std::string name = s.name();
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [s, name](benchmark::State& state) {
      switch (s.dtype) {
        case kv_dtype::bf16:
          run_gda<headwise::bf16>(state, s, name);
          break;
        case kv_dtype::f16:
          run_gda<headwise::f16>(state, s, name);
          break;
        default:
          run_gda<float>(state, s, name);
          break;
      }
    });
    b->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench
