/// @file
/// @brief Shared pieces of headwise_bench: benchmark shapes and their names, FLOP/byte
/// models, the machine limits measured at startup, the input cache and the counters.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <headwise/headwise.hpp>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace headwise_bench {

// ---------------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------------

/// K/V storage dtype of a benchmark (Q and O are always f32).
enum class kv_dtype : std::uint8_t { f32, bf16, f16 };

inline const char* dtype_name(kv_dtype t) noexcept {
  switch (t) {
    case kv_dtype::bf16:
      return "bf16";
    case kv_dtype::f16:
      return "f16";
    default:
      return "f32";
  }
}

inline std::size_t dtype_size(kv_dtype t) noexcept { return t == kv_dtype::f32 ? 4 : 2; }

/// One benchmark case: the family and every dimension that goes into its name.
struct shape {
  std::string family;  ///< mha, gqa, sqa, mha_tune, unfused_eigen (dtype suffix added by name())
  kv_dtype dtype = kv_dtype::f32;
  std::int64_t batch = 1, seq_q = 2048, seq_kv = 2048, heads_q = 8, heads_kv = 8;
  std::int64_t dim_qk = 128, dim_v = 128;
  bool causal = false;  ///< bottom-right aligned
  int threads = 1;
  headwise::head_map heads = headwise::head_map::interleave;
  std::int64_t rows = 0, block_kv = 0;  ///< explicit engine::blocking (tuning family); 0 = default
  std::int64_t page_size = 0;           ///< paged KV cache (decode_paged families); 0 = contiguous
  bool name_causal = true;              ///< decode names omit causal (bottom-right, all keys visible)
  bool v_in_k = false;                  ///< V is a prefix of K (absorbed MLA): K/V bytes are K's only
  /// Differential families (gda, gda_unfused, diff): heads_q = signal heads hs, heads_noise = hn,
  /// heads_kv = K/V pairs (K holds 2 heads of dim_qk = d per pair, V one of dim_v = 2d).
  std::int64_t heads_noise = 0;
  /// Block-sparse families (block_sparse, flexprefill, vertical_slash, xattention): the block
  /// size (q and kv) and, for block_sparse, the percent of causal blocks kept.
  std::int64_t sparse_block = 0;
  int density = 0;

  /// `<family>[_<dtype>]/b:../sq:../skv:../hq:../hkv:../dqk:../dv:../causal:../threads:..`
  /// (DESIGN.md §4), plus `/rows:../bkv:..` for the tuning family.
  [[nodiscard]] std::string name() const {
    std::string n = family;
    if (dtype != kv_dtype::f32) n += std::string("_") + dtype_name(dtype);
    auto arg = [&n](const char* key, std::int64_t value) {
      n += '/';
      n += key;
      n += ':';
      n += std::to_string(value);
    };
    if (sparse_block > 0) {  // <family>/sq/skv/hq/hkv/dqk/dv/causal[/density][/block]/threads
      arg("sq", seq_q);
      arg("skv", seq_kv);
      arg("hq", heads_q);
      arg("hkv", heads_kv);
      arg("dqk", dim_qk);
      arg("dv", dim_v);
      arg("causal", causal ? 1 : 0);
      if (density > 0) arg("density", density);
      // The block size is named when it is not the family's default (64 for block_sparse and
      // vertical_slash, 128 for flexprefill and xattention).
      if (sparse_block != (family == "block_sparse" || family == "vertical_slash" ? 64 : 128)) arg("block", sparse_block);
      arg("threads", threads);
      return n;
    }
    if (heads_noise > 0) {  // gda/sq/skv/hs/hn/hkv/d/causal/threads; diff: h = hs = hn
      if (batch != 1) arg("b", batch);
      arg("sq", seq_q);
      arg("skv", seq_kv);
      if (family == "diff") {
        arg("h", heads_q);
      } else {
        arg("hs", heads_q);
        arg("hn", heads_noise);
      }
      arg("hkv", heads_kv);
      arg("d", dim_qk);
      if (dim_v != 2 * dim_qk) arg("dv", dim_v);
      arg("causal", causal ? 1 : 0);
      arg("threads", threads);
      return n;
    }
    arg("b", batch);
    arg("sq", seq_q);
    arg("skv", seq_kv);
    arg("hq", heads_q);
    arg("hkv", heads_kv);
    arg("dqk", dim_qk);
    arg("dv", dim_v);
    if (name_causal) arg("causal", causal ? 1 : 0);
    if (page_size > 0) arg("page", page_size);
    arg("threads", threads);
    if (rows > 0) {
      arg("rows", rows);
      arg("bkv", block_kv);
    }
    return n;
  }

  /// Key of the input tensors (what the random inputs depend on; threads and blocking do not).
  [[nodiscard]] std::string data_key() const {
    return std::string(dtype_name(dtype)) + ':' + std::to_string(batch) + ':' + std::to_string(seq_q) + ':' +
           std::to_string(seq_kv) + ':' + std::to_string(heads_q) + ':' + std::to_string(heads_kv) + ':' +
           std::to_string(dim_qk) + ':' + std::to_string(dim_v) + ':' + std::to_string(heads_out()) + ':' +
           std::to_string(heads_noise);
  }

  /// Output heads: heads_q, or max(heads_q, heads_kv) with the tile head map (reverse SQA).
  [[nodiscard]] std::int64_t heads_out() const noexcept {
    return heads == headwise::head_map::tile ? std::max(heads_q, heads_kv) : heads_q;
  }
  /// Attention maps per token: the output heads, plus the noise heads of differential families.
  [[nodiscard]] std::int64_t maps() const noexcept { return heads_out() + heads_noise; }

  /// Number of visible (query, key) pairs of one head. Exact, not halved: with the bottom-right
  /// causal mask query i sees keys j <= i + seq_kv - seq_q, i.e. min(seq_kv, max(0, i + seq_kv -
  /// seq_q + 1)) keys; for seq_q == seq_kv that sums to seq_q (seq_q + 1) / 2.
  [[nodiscard]] double visible_pairs() const noexcept {
    if (!causal) return static_cast<double>(seq_q) * static_cast<double>(seq_kv);
    double pairs = 0.0;
    for (std::int64_t i = 0; i < seq_q; ++i) {
      pairs += static_cast<double>(std::min(seq_kv, std::max<std::int64_t>(0, i + seq_kv - seq_q + 1)));
    }
    return pairs;
  }

  /// FLOPs of one call: 2·B·maps·pairs·(dim_qk + dim_v) (S = Q·Kᵀ and O += P·V; maps = heads_out,
  /// or hs + hn for the differential families).
  [[nodiscard]] double flops() const noexcept {
    return 2.0 * static_cast<double>(batch) * static_cast<double>(maps()) * visible_pairs() *
           static_cast<double>(dim_qk + dim_v);
  }

  /// K and V bytes one call must read, each KV head once: B·seq_kv·heads_kv·(dim_qk + dim_v)·sizeof
  /// (dim_qk only when V is a prefix of K: the latent cache of absorbed MLA).
  [[nodiscard]] double kv_bytes() const noexcept {
    const std::int64_t per_head = v_in_k ? dim_qk : (heads_noise > 0 ? 2 * dim_qk : dim_qk) + dim_v;
    return static_cast<double>(batch) * static_cast<double>(seq_kv) * static_cast<double>(heads_kv) *
           static_cast<double>(per_head) * static_cast<double>(dtype_size(dtype));
  }
};

/// What the command line asked for.
struct plan_options {
  bool full = false;  ///< --full: the sweeps
  bool tune = false;  ///< --tune: the mha_tune blocking grid
  int hardware_threads = 1;
};

/// The thread counts of a thread sweep: 1, 2, 4, 8, 16 up to the hardware, plus the hardware
/// count itself when it is not a power of two.
inline std::vector<int> thread_sweep(int hardware_threads) {
  std::vector<int> t;
  for (int n : {1, 2, 4, 8, 16}) {
    if (n <= hardware_threads) t.push_back(n);
  }
  if (hardware_threads > 1 && std::find(t.begin(), t.end(), hardware_threads) == t.end()) {
    t.push_back(hardware_threads);
  }
  return t;
}

/// Appends s unless a shape of the same name is already there.
inline void add_unique(std::vector<shape>& list, const shape& s) {
  const std::string n = s.name();
  for (const auto& o : list) {
    if (o.name() == n) return;
  }
  list.push_back(s);
}

// ---------------------------------------------------------------------------------------------
// Machine limits (machine.cpp)
// ---------------------------------------------------------------------------------------------

/// fp32 FMA peak and read bandwidth per thread count, measured once at startup.
class machine_limits {
 public:
  static machine_limits& instance();

  /// Measures both limits for every thread count not measured yet (progress on stderr).
  void measure(const std::vector<int>& thread_counts);

  /// GFLOP/s of the register-only FMA loop on `threads` threads, summed (measured on demand).
  double fma_peak_gflops(int threads);
  /// GB/s (1e9 bytes) of the streaming read on `threads` threads, best of 3 passes.
  double read_bw_gbs(int threads);

  /// Size of the bandwidth buffer: 1 GiB, or env HEADWISE_BENCH_BW_BYTES.
  [[nodiscard]] std::size_t bw_bytes() const noexcept { return bw_bytes_; }

 private:
  machine_limits();
  struct entry {
    int threads;
    double fma_gflops;
    double bw_gbs;
  };
  const entry& get(int threads);
  std::vector<entry> entries_;
  std::size_t bw_bytes_;
};

/// Registers `machine/fma_peak/threads:N` and `machine/read_bw/threads:N` for each N.
void register_machine_benchmarks(const std::vector<int>& thread_counts);

/// Adds the measured limits and the SIMD arch to Google Benchmark's custom context.
void add_machine_context(const std::vector<int>& thread_counts);

// ---------------------------------------------------------------------------------------------
// Kernel families (dense_bench.cpp, unfused_eigen_bench.cpp)
// ---------------------------------------------------------------------------------------------

std::vector<shape> dense_shapes(const plan_options& opt);
void register_dense_benchmarks(const std::vector<shape>& shapes);

std::vector<shape> decode_shapes(const plan_options& opt);
void register_decode_benchmarks(const std::vector<shape>& shapes);

std::vector<shape> mla_shapes(const plan_options& opt);
void register_mla_benchmarks(const std::vector<shape>& shapes);

std::vector<shape> diff_shapes(const plan_options& opt);
void register_diff_benchmarks(const std::vector<shape>& shapes);

std::vector<shape> sparse_shapes(const plan_options& opt);
void register_sparse_benchmarks(const std::vector<shape>& shapes);

std::vector<shape> unfused_eigen_shapes(const plan_options& opt);
void register_unfused_eigen_benchmarks(const std::vector<shape>& shapes);

// ---------------------------------------------------------------------------------------------
// Inputs and timing
// ---------------------------------------------------------------------------------------------

/// One slot holding the inputs of the benchmark that runs now. Google Benchmark calls a
/// benchmark function once per iteration-count trial; the slot keeps the inputs across those
/// calls (and across benchmarks of the same data key) and drops them when a benchmark with
/// other inputs starts, so that at most one set of inputs is alive.
class input_slot {
 public:
  static input_slot& instance() {
    static input_slot slot;
    return slot;
  }

  /// The cached T under `key`, built as T(args...) when the key changed. Keys must encode T.
  template <class T, class... Args>
  T& get(const std::string& key, Args&&... args) {
    if (!data_ || key != key_) {
      data_.reset();  // free the old inputs before allocating the new ones
      data_ = std::make_shared<T>(std::forward<Args>(args)...);
      key_ = key;
    }
    return *static_cast<T*>(data_.get());
  }

  /// True the first time it is asked for `benchmark_name` in a row (its warm-up call is due).
  bool needs_warm_up(const std::string& benchmark_name) {
    if (benchmark_name == warmed_) return false;
    warmed_ = benchmark_name;
    return true;
  }

 private:
  std::shared_ptr<void> data_;
  std::string key_;
  std::string warmed_;
};

/// A benchmark input or output: 64-byte aligned, as PyTorch's CPU allocator aligns tensors
/// (and so vLLM's KV caches). With malloc's 16-byte start, every 64-byte row load of a cache
/// straddles two lines; in one decode A/B that made bf16 8-9% slower on the device host and 50%
/// slower on a Zen 5 VM (docs/benchmarks.md, 2026-12-06).
template <class T>
using bench_buffer = std::vector<T, xsimd::aligned_allocator<T, 64>>;

/// n floats drawn from N(0, 1), converted to the storage type T (fixed seed: reproducible).
template <class T>
bench_buffer<T> random_normal(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  bench_buffer<T> x(n);
  for (auto& e : x) e = headwise::from_float<T>(dist(gen));
  return x;
}

/// Q, K, V and O of a dense [batch, seq, heads, dim] problem, K/V stored as KV.
template <class KV>
struct dense_inputs {
  bench_buffer<float> q;  // (batch, seq_q, heads_q, dim_qk)
  bench_buffer<KV> k;     // (batch, seq_kv, heads_kv, dim_qk)
  bench_buffer<KV> v;     // (batch, seq_kv, heads_kv, dim_v)
  bench_buffer<float> o;  // (batch, seq_q, heads_out, dim_v)

  explicit dense_inputs(const shape& s)
      : q(random_normal<float>(static_cast<std::size_t>(s.batch * s.seq_q * s.heads_q * s.dim_qk), 1)),
        k(random_normal<KV>(static_cast<std::size_t>(s.batch * s.seq_kv * s.heads_kv * s.dim_qk), 2)),
        v(random_normal<KV>(static_cast<std::size_t>(s.batch * s.seq_kv * s.heads_kv * s.dim_v), 3)),
        o(static_cast<std::size_t>(s.batch * s.seq_q * s.heads_out() * s.dim_v), 0.0f) {}
};

/// Accumulated wall time (std::chrono::steady_clock) of the timed calls.
class wall_timer {
 public:
  using clock = std::chrono::steady_clock;
  /// Times one call of f.
  template <class F>
  void time(F&& f) {
    const auto t0 = clock::now();
    f();
    total_ += clock::now() - t0;
  }
  [[nodiscard]] double seconds() const noexcept { return std::chrono::duration<double>(total_).count(); }

 private:
  clock::duration total_{};
};

/// Sets the kernel counters from the wall time of `iterations` calls: GFLOP/s, GB/s, peak_frac,
/// bw_frac, roofline (max(flops/peak, bytes/bw) / time; 1.0 is the limit) and ms (mean wall ms
/// per call). Plain counters: Google Benchmark reports them as given.
inline void set_kernel_counters(benchmark::State& state, const shape& s, double wall_seconds) {
  const auto iterations = static_cast<double>(state.iterations());
  if (iterations <= 0.0 || wall_seconds <= 0.0) return;
  const double per_call = wall_seconds / iterations;
  auto& limits = machine_limits::instance();
  const double peak = limits.fma_peak_gflops(s.threads) * 1e9;  // FLOP/s
  const double bw = limits.read_bw_gbs(s.threads) * 1e9;        // B/s
  const double flops = s.flops(), bytes = s.kv_bytes();
  state.counters["GFLOP/s"] = benchmark::Counter(flops / per_call / 1e9);
  state.counters["GB/s"] = benchmark::Counter(bytes / per_call / 1e9);
  state.counters["peak_frac"] = benchmark::Counter(flops / per_call / peak);
  state.counters["bw_frac"] = benchmark::Counter(bytes / per_call / bw);
  state.counters["roofline"] = benchmark::Counter(std::max(flops / peak, bytes / bw) / per_call);
  state.counters["ms"] = benchmark::Counter(per_call * 1e3);
}

/// Runs `call` once as warm-up (first call of this benchmark only), then times it per iteration
/// and sets the counters. An exception from the kernel skips the benchmark with its message.
template <class Call>
void run_timed(benchmark::State& state, const shape& s, const std::string& name, Call&& call) {
  try {
    if (input_slot::instance().needs_warm_up(name)) call();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  wall_timer timer;
  for (auto _ : state) timer.time(call);
  benchmark::ClobberMemory();
  set_kernel_counters(state, s, timer.seconds());
}

}  // namespace headwise_bench
