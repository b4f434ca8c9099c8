/// @file
/// @brief Block-sparse prefill benchmarks: the executor at fixed densities (block_sparse) and
/// the adaptive selectors end to end, estimation included (flexprefill, vertical_slash,
/// xattention). Every case also times dense causal attention (headwise::attention) on the
/// same inputs in the same process (median of 3 calls) and reports against it:
///   selected   kept / causal blocks (pairs, for vertical_slash's columns)
///   vs_dense   time / dense causal time
///   bar        vs_dense / selected (block_sparse) or vs_dense / (selected + 0.10) (selectors):
///              the bars are bar <= 1.3
///   rel_err    ||O - O_dense||_F / ||O_dense||_F
///   GFLOP/s, peak_frac  on the pairs actually computed (kept, causal-visible)
///   select_ms  the selection alone (one call, before the timed loop), included in ms

#include <cmath>
#include <map>

#include "common.hpp"

namespace headwise_bench {

namespace {

shape sparse_case(const char* family, int density, std::int64_t block, int threads, std::int64_t seq = 16384) {
  shape s;
  s.family = family;
  s.seq_q = s.seq_kv = seq;
  s.heads_q = s.heads_kv = 4;
  s.dim_qk = s.dim_v = 128;
  s.causal = true;
  s.threads = threads;
  s.sparse_block = block;
  s.density = density;
  return s;
}

/// Q, K, V, O of one sparse case plus, per thread count, the dense causal output and time.
/// structured: local attention (a positional code in dims [0, 64)), a sink key and a few
/// needle columns (a shared direction in dims [64, 128)), on top of noise; random otherwise.
struct sparse_inputs {
  bench_buffer<float> q, k, v, o;
  bench_buffer<float> dense_out;
  std::map<int, double> dense_seconds;

  sparse_inputs(const shape& s, bool structured) {
    const std::int64_t n = s.seq_q, h = s.heads_q, d = s.dim_qk;
    const auto size = static_cast<std::size_t>(n * h * d);
    q = random_normal<float>(size, 1);
    k = random_normal<float>(size, 2);
    v = random_normal<float>(static_cast<std::size_t>(n * h * s.dim_v), 3);
    o.assign(v.size(), 0.0f);
    if (!structured) return;
    const std::int64_t half = d / 2, freqs = half / 2;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t hh = 0; hh < h; ++hh) {
        float* qi = &q[static_cast<std::size_t>((i * h + hh) * d)];
        float* ki = &k[static_cast<std::size_t>((i * h + hh) * d)];
        for (std::int64_t f = 0; f < freqs; ++f) {  // wavelengths 32 .. 4096 tokens
          const double w = 2.0 * 3.14159265358979 / (32.0 * std::pow(128.0, static_cast<double>(f) / (freqs - 1)));
          const auto c = static_cast<float>(2.2 * std::cos(w * static_cast<double>(i)));
          const auto sn = static_cast<float>(2.2 * std::sin(w * static_cast<double>(i)));
          qi[2 * f] = c;
          qi[2 * f + 1] = sn;
          ki[2 * f] = c;
          ki[2 * f + 1] = sn;
        }
        const bool needle = i == 0 || i % 2749 == 1234;  // the sink and ~6 needle columns
        for (std::int64_t x = half; x < d; ++x) {
          qi[x] = 0.5f * qi[x] + (x == half ? 12.0f : 0.0f);
          ki[x] = 0.5f * ki[x] + (x == half && needle ? 12.0f : 0.0f);
        }
      }
  }

  headwise::tensor_view<const float, 4> qv(const shape& s) const {
    return headwise::bshd<const float>(q.data(), 1, s.seq_q, s.heads_q, s.dim_qk);
  }
  headwise::tensor_view<const float, 4> kv(const shape& s) const {
    return headwise::bshd<const float>(k.data(), 1, s.seq_kv, s.heads_kv, s.dim_qk);
  }
  headwise::tensor_view<const float, 4> vv(const shape& s) const {
    return headwise::bshd<const float>(v.data(), 1, s.seq_kv, s.heads_kv, s.dim_v);
  }
  headwise::tensor_view<float, 4> ov(const shape& s) {
    return headwise::bshd<float>(o.data(), 1, s.seq_q, s.heads_q, s.dim_v);
  }

  /// Dense causal time on s.threads threads (median of 3 calls, measured once) and output.
  double dense(const shape& s) {
    if (auto it = dense_seconds.find(s.threads); it != dense_seconds.end()) return it->second;
    headwise::attention_options opt;
    opt.causal = headwise::causal_mode::bottom_right;
    opt.num_threads = s.threads;
    std::vector<double> t;
    for (int r = 0; r < 3; ++r) {
      wall_timer w;
      w.time([&] { headwise::attention(qv(s), kv(s), vv(s), ov(s), opt); });
      t.push_back(w.seconds());
    }
    std::sort(t.begin(), t.end());
    dense_out = o;
    return dense_seconds[s.threads] = t[1];
  }

  [[nodiscard]] double rel_err() const {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < o.size(); ++i) {
      const double e = static_cast<double>(o[i]) - static_cast<double>(dense_out[i]);
      num += e * e;
      den += static_cast<double>(dense_out[i]) * static_cast<double>(dense_out[i]);
    }
    return den > 0 ? std::sqrt(num / den) : 0.0;
  }
};

/// Query-key pairs the executor computes under the mask (causal-visible keys of kept blocks
/// and columns), and the causal pairs of dense attention.
struct pair_count {
  double kept = 0, causal = 0;
};
pair_count count_pairs(const headwise::block_mask_data& m) {
  pair_count c;
  const std::int64_t nqb = m.num_q_blocks(), off = m.seq_kv - m.seq_q;
  auto visible = [&](std::int64_t p0, std::int64_t p1, std::int64_t k0, std::int64_t k1) {
    double n = 0;
    for (std::int64_t i = p0; i < p1; ++i)
      n += static_cast<double>(std::max<std::int64_t>(0, std::min(k1, i + off + 1) - k0));
    return n;
  };
  for (std::int64_t r = 0; r < m.batch * m.heads * nqb; ++r) {
    const std::int64_t qb = r % nqb, p0 = qb * m.q_block, p1 = std::min(m.seq_q, p0 + m.q_block);
    c.causal += visible(p0, p1, 0, m.seq_kv);
    auto blocks = [&](const std::vector<std::int32_t>& num, const std::vector<std::int32_t>& idx, std::int64_t w) {
      for (std::int32_t e = 0; e < num[static_cast<std::size_t>(r)]; ++e) {
        const std::int64_t kb = idx[static_cast<std::size_t>(r * w + e)];
        c.kept += visible(p0, p1, kb * m.kv_block, std::min(m.seq_kv, (kb + 1) * m.kv_block));
      }
    };
    blocks(m.kv_num_blocks, m.kv_indices, m.kv_width);
    blocks(m.full_kv_num_blocks, m.full_kv_indices, m.full_width);
    for (std::int32_t e = 0; e < m.column_count[static_cast<std::size_t>(r)]; ++e) {
      const std::int64_t j = m.column_index[static_cast<std::size_t>(r * m.column_width + e)];
      c.kept += visible(p0, p1, j, j + 1);
    }
  }
  return c;
}

/// The block_sparse case's mask: per (head, query block) the diagonal block plus random
/// causal blocks, density percent of the row's causal blocks (at least the diagonal).
headwise::block_mask_data density_mask(const shape& s) {
  headwise::block_mask_builder bld(1, s.heads_q, s.seq_q, s.seq_kv, s.sparse_block, s.sparse_block,
                                   headwise::causal_mode::bottom_right);
  std::mt19937_64 gen(42);
  for (std::int64_t h = 0; h < s.heads_q; ++h)
    for (std::int64_t qb = 0; qb < bld.num_q_blocks(); ++qb) {
      std::vector<std::int64_t> below;
      for (std::int64_t kb = 0; kb < qb && kb < bld.num_kv_blocks(); ++kb) below.push_back(kb);
      std::shuffle(below.begin(), below.end(), gen);
      const auto keep = static_cast<std::size_t>(std::llround(s.density / 100.0 * static_cast<double>(qb + 1)));
      bld.add_block(0, h, qb, qb);
      for (std::size_t x = 0; x + 1 < keep && x < below.size(); ++x) bld.add_block(0, h, qb, below[x]);
    }
  return std::move(bld).finish();
}

void set_sparse_counters(benchmark::State& state, const shape& s, double seconds, const pair_count& pc,
                         double selected, double dense_seconds, double rel_err, bool selector) {
  const auto it = static_cast<double>(state.iterations());
  if (it <= 0 || seconds <= 0) return;
  const double per_call = seconds / it;
  const double flops = 2.0 * pc.kept * static_cast<double>(s.dim_qk + s.dim_v);  // pc counts every head
  state.counters["ms"] = benchmark::Counter(per_call * 1e3);
  state.counters["GFLOP/s"] = benchmark::Counter(flops / per_call / 1e9);
  state.counters["peak_frac"] =
      benchmark::Counter(flops / per_call / (machine_limits::instance().fma_peak_gflops(s.threads) * 1e9));
  state.counters["selected"] = benchmark::Counter(selected);
  state.counters["vs_dense"] = benchmark::Counter(per_call / dense_seconds);
  state.counters["bar"] = benchmark::Counter(per_call / dense_seconds / (selector ? selected + 0.10 : selected));
  state.counters["rel_err"] = benchmark::Counter(rel_err);
  state.counters["dense_ms"] = benchmark::Counter(dense_seconds * 1e3);
}

void run_sparse_case(benchmark::State& state, const shape& s, const std::string& name) {
  const bool selector = s.family != "block_sparse";
  auto& in = input_slot::instance().get<sparse_inputs>(
      std::string(selector ? "sparse-structured:" : "sparse-random:") + s.data_key(), s, selector);
  headwise::attention_options opt;
  opt.causal = headwise::causal_mode::bottom_right;
  opt.num_threads = s.threads;
  try {
    const double dense_seconds = in.dense(s);
    headwise::block_mask_data mask;
    double selected = 0;
    auto select = [&] {
      if (s.family == "flexprefill") {
        headwise::flexprefill_options fo;
        fo.block_size = s.sparse_block;
        fo.num_threads = s.threads;
        auto r = headwise::flexprefill_select(in.qv(s), in.kv(s), fo);
        selected = r.stats.selected;
        mask = std::move(r.mask);
      } else if (s.family == "vertical_slash") {
        headwise::vertical_slash_options vo;
        vo.block = s.sparse_block;
        vo.num_threads = s.threads;
        auto r = headwise::vertical_slash_select(in.qv(s), in.kv(s), vo);
        selected = r.stats.selected;
        mask = std::move(r.mask);
      } else {
        headwise::xattention_options xo;
        xo.block = s.sparse_block;
        xo.num_threads = s.threads;
        auto r = headwise::xattention_select(in.qv(s), in.kv(s), xo);
        selected = r.stats.selected;
        mask = std::move(r.mask);
      }
    };
    double select_seconds = 0;
    if (selector) {
      wall_timer st;
      st.time(select);
      select_seconds = st.seconds();
    } else {
      mask = density_mask(s);
    }
    const pair_count pc = count_pairs(mask);
    if (!selector || s.family == "vertical_slash") selected = pc.kept / pc.causal;  // pairs: columns have no blocks
    auto call = [&] {
      if (selector) select();
      headwise::block_sparse_attention(in.qv(s), in.kv(s), in.vv(s), in.ov(s), mask.view(), opt);
    };
    if (input_slot::instance().needs_warm_up(name)) call();
    wall_timer timer;
    for (auto _ : state) timer.time(call);
    benchmark::ClobberMemory();
    set_sparse_counters(state, s, timer.seconds(), pc, selected, dense_seconds, in.rel_err(), selector);
    if (selector) state.counters["select_ms"] = benchmark::Counter(select_seconds * 1e3);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace

std::vector<shape> sparse_shapes(const plan_options& opt) {
  std::vector<shape> list;
  // block_sparse: blocks of 64 (measured faster than 128 at 5-10% and 50%+ density, slower at
  // 20-30%: docs/benchmarks.md); the selectors at their sources' block sizes (FlexPrefill and
  // XAttention 128, MInference 64).
  add_unique(list, sparse_case("block_sparse", 10, 64, 1));
  for (const char* f : {"flexprefill", "vertical_slash", "xattention"})
    add_unique(list, sparse_case(f, 0, f == std::string("vertical_slash") ? 64 : 128, 1));
  if (opt.full) {
    for (std::int64_t blk : {64, 128})
      for (int d : {5, 10, 20, 30, 50, 75, 100}) add_unique(list, sparse_case("block_sparse", d, blk, 1));
    for (int t : thread_sweep(opt.hardware_threads)) {
      add_unique(list, sparse_case("block_sparse", 10, 64, t));
      add_unique(list, sparse_case("flexprefill", 0, 128, t));
    }
    add_unique(list, sparse_case("flexprefill", 0, 64, 1));
  }
  // Cases on the same inputs run together: the dense reference is timed once per inputs and
  // thread count (the input cache keeps one set of inputs).
  std::stable_partition(list.begin(), list.end(), [](const shape& s) { return s.family == "block_sparse"; });
  return list;
}

void register_sparse_benchmarks(const std::vector<shape>& shapes) {
  for (const shape& s : shapes) {
    const std::string name = s.name();
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [s, name](benchmark::State& state) {
      run_sparse_case(state, s, name);
    });
    b->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench
