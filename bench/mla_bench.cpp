/// @file
/// @brief MLA benchmarks (DeepSeek-V2/V3 shapes). mla_absorbed[_bf16|_f16]: decode over the
/// latent cache through headwise::mla_absorbed (MQA, dqk = d_c + d_rope = 576, dv = d_c = 512,
/// V a prefix of K, so the bytes are the latent's only); compute-bound from about 16 heads, so
/// the counter to read is `roofline`. mla_naive: prefill with the expanded per-head K (192) and
/// V (128) through headwise::attention (the expansion GEMM is not timed).

#include "common.hpp"

namespace headwise_bench {

namespace {

constexpr std::int64_t kLatent = 512, kRope = 64;

shape absorbed(std::int64_t heads, std::int64_t seq_kv, kv_dtype t = kv_dtype::f32, int threads = 1) {
  shape s;
  s.family = "mla_absorbed";
  s.dtype = t;
  s.seq_q = 1;
  s.seq_kv = seq_kv;
  s.heads_q = heads;
  s.heads_kv = 1;
  s.dim_qk = kLatent + kRope;
  s.dim_v = kLatent;
  s.causal = true;  // bottom-right: the new token sees the whole cache
  s.name_causal = false;
  s.v_in_k = true;
  s.threads = threads;
  return s;
}

shape naive(std::int64_t seq, int threads = 1) {
  shape s;
  s.family = "mla_naive";
  s.seq_q = seq;
  s.seq_kv = seq;
  s.heads_q = 16;
  s.heads_kv = 16;
  s.dim_qk = 128 + kRope;
  s.dim_v = 128;
  s.causal = true;
  s.threads = threads;
  return s;
}

/// Absorbed queries and the latent cache (batch, seq_kv, 576) in the storage type T.
template <class T>
struct latent_inputs {
  bench_buffer<float> q, o;
  bench_buffer<T> latent;
  explicit latent_inputs(const shape& s)
      : q(random_normal<float>(static_cast<std::size_t>(s.batch * s.seq_q * s.heads_q * s.dim_qk), 1)),
        o(static_cast<std::size_t>(s.batch * s.seq_q * s.heads_q * s.dim_v), 0.0f),
        latent(random_normal<T>(static_cast<std::size_t>(s.batch * s.seq_kv * s.dim_qk), 2)) {}
};

template <class T>
void run_absorbed(benchmark::State& state, const shape& s, const std::string& name) {
  auto& in = input_slot::instance().get<latent_inputs<T>>("latent:" + s.data_key(), s);
  const auto q = headwise::bshd<const float>(in.q.data(), s.batch, s.seq_q, s.heads_q, s.dim_qk);
  const headwise::tensor_view<const T, 3> latent(in.latent.data(), {s.batch, s.seq_kv, s.dim_qk});
  const auto o = headwise::bshd<float>(in.o.data(), s.batch, s.seq_q, s.heads_q, s.dim_v);
  headwise::attention_options opt;
  opt.causal = headwise::causal_mode::bottom_right;
  opt.scale = 0.1352338f;  // V3: 192^-0.5 · mscale²
  opt.num_threads = s.threads;
  run_timed(state, s, name, [&] { headwise::mla_absorbed(q, latent, o, opt); });
}

void run_naive(benchmark::State& state, const shape& s, const std::string& name) {
  auto& in = input_slot::instance().get<dense_inputs<float>>("dense:" + s.data_key(), s);
  const auto q = headwise::bshd<const float>(in.q.data(), s.batch, s.seq_q, s.heads_q, s.dim_qk);
  const auto k = headwise::bshd<const float>(in.k.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_qk);
  const auto v = headwise::bshd<const float>(in.v.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_v);
  const auto o = headwise::bshd<float>(in.o.data(), s.batch, s.seq_q, s.heads_q, s.dim_v);
  headwise::attention_options opt;
  opt.causal = headwise::causal_mode::bottom_right;
  opt.scale = 0.1352338f;
  opt.num_threads = s.threads;
  run_timed(state, s, name, [&] { headwise::attention(q, k, v, o, opt); });
}

}  // namespace

std::vector<shape> mla_shapes(const plan_options& opt) {
  std::vector<shape> list;
  const int all = opt.hardware_threads;
  // Representative: the bar shape (16 heads, 8k latent cache, one thread), the head
  // sweep to 128 (compute-bound: toward the FMA peak), bf16, all cores, naive prefill.
  for (std::int64_t h : {16, 64, 128}) add_unique(list, absorbed(h, 8192));
  add_unique(list, absorbed(16, 8192, kv_dtype::bf16));
  if (all > 1) {
    add_unique(list, absorbed(16, 8192, kv_dtype::f32, all));
    add_unique(list, absorbed(128, 8192, kv_dtype::f32, all));
  }
  add_unique(list, naive(2048));
  if (opt.full) {
    for (kv_dtype t : {kv_dtype::f32, kv_dtype::bf16, kv_dtype::f16}) {
      for (std::int64_t h : {16, 32, 64, 128}) add_unique(list, absorbed(h, 8192, t));
      for (std::int64_t len : {1024, 4096, 16384, 32768, 65536}) add_unique(list, absorbed(16, len, t));
      for (int n : thread_sweep(all)) {
        add_unique(list, absorbed(16, 8192, t, n));
        add_unique(list, absorbed(128, 8192, t, n));
      }
    }
    for (int n : thread_sweep(all)) add_unique(list, naive(4096, n));
  }
  return list;
}

void register_mla_benchmarks(const std::vector<shape>& shapes) {
  for (const shape& s : shapes) {
    const std::string name = s.name();
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [s, name](benchmark::State& state) {
      if (s.family == "mla_naive") {
        run_naive(state, s, name);
        return;
      }
      switch (s.dtype) {
        case kv_dtype::bf16:
          run_absorbed<headwise::bf16>(state, s, name);
          break;
        case kv_dtype::f16:
          run_absorbed<headwise::f16>(state, s, name);
          break;
        default:
          run_absorbed<float>(state, s, name);
          break;
      }
    });
    b->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench
