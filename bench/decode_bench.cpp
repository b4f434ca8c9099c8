/// @file
/// @brief Decode benchmarks: a few new query tokens against a long KV cache, bandwidth-bound.
/// Families decode (f32 KV), decode_bf16, decode_f16 through headwise::attention, and
/// decode_paged[_bf16] through headwise::attention_paged (page size in the name).

#include <algorithm>
#include <numeric>

#include "common.hpp"

namespace headwise_bench {

namespace {

/// GQA 32/8, D = 128, one query token: the decode shape of PEERS.md §1.
shape decode_base(std::int64_t seq_kv, kv_dtype t = kv_dtype::f32, int threads = 1) {
  shape s;
  s.family = "decode";
  s.dtype = t;
  s.batch = 1;
  s.seq_q = 1;
  s.seq_kv = seq_kv;
  s.heads_q = 32;
  s.heads_kv = 8;
  s.causal = true;  // bottom-right: the new token sees the whole cache
  s.name_causal = false;
  s.threads = threads;
  return s;
}

shape paged(shape s, std::int64_t page_size) {
  s.family = "decode_paged";
  s.page_size = page_size;
  return s;
}

/// A paged cache holding the same tokens as dense_inputs, pages scattered by a fixed shuffle.
template <class KV>
struct paged_inputs {
  bench_buffer<float> q, o;
  bench_buffer<KV> k_pages, v_pages;
  std::vector<std::int32_t> table, seqlens;
  std::int64_t pages_per_seq;

  explicit paged_inputs(const shape& s)
      : q(random_normal<float>(static_cast<std::size_t>(s.batch * s.seq_q * s.heads_q * s.dim_qk), 1)),
        o(static_cast<std::size_t>(s.batch * s.seq_q * s.heads_out() * s.dim_v), 0.0f),
        pages_per_seq((s.seq_kv + s.page_size - 1) / s.page_size) {
    const std::int64_t pages = s.batch * pages_per_seq;
    k_pages = random_normal<KV>(static_cast<std::size_t>(pages * s.page_size * s.heads_kv * s.dim_qk), 2);
    v_pages = random_normal<KV>(static_cast<std::size_t>(pages * s.page_size * s.heads_kv * s.dim_v), 3);
    table.resize(static_cast<std::size_t>(pages));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(4));
    seqlens.assign(static_cast<std::size_t>(s.batch), static_cast<std::int32_t>(s.seq_kv));
  }
};

template <class KV>
headwise::attention_options decode_options(const shape& s) {
  headwise::attention_options opt;
  opt.causal = headwise::causal_mode::bottom_right;
  opt.num_threads = s.threads;
  return opt;
}

template <class KV>
void run_decode(benchmark::State& state, const shape& s, const std::string& name) {
  if (s.page_size == 0) {
    auto& in = input_slot::instance().get<dense_inputs<KV>>("dense:" + s.data_key(), s);
    const auto q = headwise::bshd<const float>(in.q.data(), s.batch, s.seq_q, s.heads_q, s.dim_qk);
    const auto k = headwise::bshd<const KV>(in.k.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_qk);
    const auto v = headwise::bshd<const KV>(in.v.data(), s.batch, s.seq_kv, s.heads_kv, s.dim_v);
    const auto o = headwise::bshd<float>(in.o.data(), s.batch, s.seq_q, s.heads_out(), s.dim_v);
    const auto opt = decode_options<KV>(s);
    run_timed(state, s, name, [&] { headwise::attention(q, k, v, o, opt); });
    return;
  }
  auto& in = input_slot::instance().get<paged_inputs<KV>>(
      "paged:" + std::to_string(s.page_size) + ":" + s.data_key(), s);
  const std::int64_t pages = s.batch * in.pages_per_seq;
  const headwise::paged_kv<KV> kv{
      headwise::tensor_view<const KV, 4>(in.k_pages.data(), {pages, s.page_size, s.heads_kv, s.dim_qk}),
      headwise::tensor_view<const KV, 4>(in.v_pages.data(), {pages, s.page_size, s.heads_kv, s.dim_v}),
      headwise::tensor_view<const std::int32_t, 2>(in.table.data(), {s.batch, in.pages_per_seq}),
      headwise::tensor_view<const std::int32_t, 1>(in.seqlens.data(), {s.batch})};
  const auto q = headwise::bshd<const float>(in.q.data(), s.batch, s.seq_q, s.heads_q, s.dim_qk);
  const auto o = headwise::bshd<float>(in.o.data(), s.batch, s.seq_q, s.heads_out(), s.dim_v);
  const auto opt = decode_options<KV>(s);
  run_timed(state, s, name, [&] { headwise::attention_paged(q, kv, o, opt); });
}

}  // namespace

std::vector<shape> decode_shapes(const plan_options& opt) {
  std::vector<shape> list;
  const int all = opt.hardware_threads;
  // Representative: the bar shapes (one thread, 32k cache, GQA 32/8, D=128) in each
  // dtype, the same on every core, a batch of 16 sequences of 4k, and the paged cache.
  for (kv_dtype t : {kv_dtype::f32, kv_dtype::bf16, kv_dtype::f16}) add_unique(list, decode_base(32768, t));
  if (all > 1) {
    add_unique(list, decode_base(32768, kv_dtype::f32, all));
    add_unique(list, decode_base(32768, kv_dtype::bf16, all));
  }
  {
    shape s = decode_base(4096, kv_dtype::f32, all);
    s.batch = 16;
    add_unique(list, s);
  }
  add_unique(list, paged(decode_base(32768), 16));
  add_unique(list, paged(decode_base(32768, kv_dtype::bf16), 16));

  if (opt.full) {
    for (kv_dtype t : {kv_dtype::f32, kv_dtype::bf16, kv_dtype::f16}) {
      // Thread sweep at 32k.
      for (int n : thread_sweep(all)) add_unique(list, decode_base(32768, t, n));
      // Cache length sweep, one thread, and on every core (one sequence: its splits are the
      // only parallelism, 16-64 of them from 4k keys on).
      for (std::int64_t len : {1024, 4096, 16384, 32768, 65536, 131072}) add_unique(list, decode_base(len, t));
      if (all > 1)
        for (std::int64_t len : {1024, 4096, 16384}) add_unique(list, decode_base(len, t, all));
    }
    for (int n : thread_sweep(all)) {
      for (kv_dtype t : {kv_dtype::f32, kv_dtype::bf16}) {
        shape s = decode_base(4096, t, n);
        s.batch = 16;
        add_unique(list, s);
        add_unique(list, paged(decode_base(32768, t, n), 16));
      }
    }
    // Paged with larger pages; MHA and MQA decode; a few query tokens (speculative decoding).
    add_unique(list, paged(decode_base(32768), 128));
    for (std::int64_t hkv : {32, 1}) {
      shape s = decode_base(32768);
      s.heads_kv = hkv;
      add_unique(list, s);
    }
    for (std::int64_t sq : {2, 4, 16}) {
      shape s = decode_base(32768);
      s.seq_q = sq;
      add_unique(list, s);
    }
  }
  return list;
}

void register_decode_benchmarks(const std::vector<shape>& shapes) {
  for (const shape& s : shapes) {
    const std::string name = s.name();
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [s, name](benchmark::State& state) {
      switch (s.dtype) {
        case kv_dtype::bf16:
          run_decode<headwise::bf16>(state, s, name);
          break;
        case kv_dtype::f16:
          run_decode<headwise::f16>(state, s, name);
          break;
        default:
          run_decode<float>(state, s, name);
          break;
      }
    });
    b->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench
