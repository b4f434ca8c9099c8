/// @file
/// @brief Dense attention benchmarks: mha, gqa, sqa (and reverse SQA), their bf16/f16 K/V
/// variants, and the hidden mha_tune blocking grid, all through headwise::attention.

#include "common.hpp"

namespace headwise_bench {

namespace {

/// The prefill shape every family starts from: B=1, L=2048, H=8, D=128, one thread.
shape base(const char* family, std::int64_t heads_q, std::int64_t heads_kv, bool causal, int threads = 1) {
  shape s;
  s.family = family;
  s.heads_q = heads_q;
  s.heads_kv = heads_kv;
  s.causal = causal;
  s.threads = threads;
  return s;
}

template <class KV>
void run_dense(benchmark::State& state, const shape& s, const std::string& name) {
  auto& in = input_slot::instance().get<dense_inputs<KV>>("dense:" + s.data_key(), s);
  const auto q = headwise::bshd<const float>(in.q.data(), s.batch, s.seq_q, s.heads_q, s.dim_qk);
  const auto k = headwise::bshd<const KV>(in.k.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_qk);
  const auto v = headwise::bshd<const KV>(in.v.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_v);
  const auto o = headwise::bshd<float>(in.o.data(), s.batch, s.seq_q, s.heads_out(), s.dim_v);
  headwise::attention_options opt;
  opt.causal = s.causal ? headwise::causal_mode::bottom_right : headwise::causal_mode::none;
  opt.heads = s.heads;
  opt.num_threads = s.threads;  // the library's own thread count; never omp_set_num_threads
  if (s.rows > 0) {
    const headwise::engine::blocking blk{s.rows, s.block_kv};
    run_timed(state, s, name, [&] { headwise::attention_blocked(q, k, v, o, opt, {}, blk); });
  } else {
    run_timed(state, s, name, [&] { headwise::attention(q, k, v, o, opt); });
  }
}

}  // namespace

std::vector<shape> dense_shapes(const plan_options& opt) {
  std::vector<shape> list;
  // Representative set: prefill MHA (the PEERS.md §1 shapes), GQA 4:1, SQA in the H=16 framing
  // (sSQA hq8/hkv4, xSQA hq4/hkv4), and MHA causal on more threads.
  add_unique(list, base("mha", 8, 8, false));
  add_unique(list, base("mha", 8, 8, true));
  add_unique(list, base("gqa", 32, 8, true));
  add_unique(list, base("sqa", 8, 4, true));
  add_unique(list, base("sqa", 4, 4, true));
  add_unique(list, base("mha", 8, 8, true, 2));
  if (opt.hardware_threads > 2) add_unique(list, base("mha", 8, 8, true, opt.hardware_threads));

  if (opt.full) {
    // Thread sweeps: MHA H=32 and GQA 32/8, causal.
    for (int t : thread_sweep(opt.hardware_threads)) {
      add_unique(list, base("mha", 32, 32, true, t));
      add_unique(list, base("gqa", 32, 8, true, t));
    }
    // The block-sparse families' shape, dense causal (their in-run reference as a benchmark of
    // its own, for interleaved repetitions).
    {
      shape s = base("mha", 4, 4, true);
      s.seq_q = s.seq_kv = 16384;
      add_unique(list, s);
    }
    // Sequence length sweep, MHA causal.
    for (std::int64_t len : {512, 1024, 2048, 4096, 8192}) {
      shape s = base("mha", 8, 8, true);
      s.seq_q = s.seq_kv = len;
      add_unique(list, s);
    }
    // Head dimension sweep, MHA, both masks.
    for (std::int64_t d : {64, 80, 96, 128, 192}) {
      for (bool causal : {false, true}) {
        shape s = base("mha", 8, 8, causal);
        s.dim_qk = s.dim_v = d;
        add_unique(list, s);
      }
    }
    // GQA ratios 4:1, 8:1 and MQA (32:1).
    for (std::int64_t hkv : {8, 4, 1}) add_unique(list, base("gqa", 32, hkv, true));
    // SQA: sSQA 8/4, xSQA 4/4, xSMQA 4/1, and reverse SQA 4/8 (head_map::tile: 8 output heads).
    for (auto [hq, hkv] : {std::pair{8, 4}, std::pair{4, 4}, std::pair{4, 1}})
      add_unique(list, base("sqa", hq, hkv, true));
    {
      shape s = base("sqa", 4, 8, true);
      s.heads = headwise::head_map::tile;
      add_unique(list, s);
    }
    // Reduced-precision K/V storage (family suffix _bf16 / _f16).
    for (kv_dtype t : {kv_dtype::bf16, kv_dtype::f16}) {
      for (bool causal : {false, true}) {
        shape s = base("mha", 8, 8, causal);
        s.dtype = t;
        add_unique(list, s);
      }
      shape g = base("gqa", 32, 8, true);
      g.dtype = t;
      add_unique(list, g);
    }
  }

  if (opt.tune) {
    // Blocking grid of the engine (rows per work item x keys per tile), MHA L=2048 H=8 D=128.
    for (bool causal : {false, true}) {
      for (std::int64_t rows : {32, 64, 128, 256}) {
        for (std::int64_t bkv : {32, 64, 128, 256}) {
          shape s = base("mha_tune", 8, 8, causal);
          s.rows = rows;
          s.block_kv = bkv;
          add_unique(list, s);
        }
      }
    }
  }
  return list;
}

void register_dense_benchmarks(const std::vector<shape>& shapes) {
  for (const shape& s : shapes) {
    const std::string name = s.name();
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [s, name](benchmark::State& state) {
      switch (s.dtype) {
        case kv_dtype::bf16:
          run_dense<headwise::bf16>(state, s, name);
          break;
        case kv_dtype::f16:
          run_dense<headwise::f16>(state, s, name);
          break;
        default:
          run_dense<float>(state, s, name);
          break;
      }
    });
    b->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench
