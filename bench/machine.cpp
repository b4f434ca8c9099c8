/// @file
/// @brief The machine's own limits, measured in the same run: fp32 FMA peak (register-only
/// xsimd FMA loop) and read bandwidth (streaming xsimd sum over a buffer far larger than the LLC).

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <xsimd/xsimd.hpp>

#include "common.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace headwise_bench {

namespace {

using batch = xsimd::batch<float>;
constexpr int fma_accumulators = 16;  // independent chains: > latency x FMA ports on every x86

/// Keeps a value alive without letting the compiler see through it.
void sink(float x) { benchmark::DoNotOptimize(x); }

/// `iters` rounds of 16 independent register FMAs acc = acc·a + c; returns the FLOPs done.
/// The fixed point c / (1 - a) keeps every value normal, so no denormal assists. tile::fma, as
/// in the kernels: with xsimd::fma a clang AVX-512 build measured a multiply and an add.
double fma_loop(std::int64_t iters) {
  batch acc[fma_accumulators];
  for (int i = 0; i < fma_accumulators; ++i) acc[i] = batch(0.001f * static_cast<float>(i + 1));
  const batch a(0.9999f), c(1e-4f);
  for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < fma_accumulators; ++i) acc[i] = headwise::tile::fma(acc[i], a, c);
  }
  batch total = acc[0];
  for (int i = 1; i < fma_accumulators; ++i) total += acc[i];
  sink(xsimd::hadd(total));
  return 2.0 * fma_accumulators * batch::size * static_cast<double>(iters);
}

/// Sum of n floats at p (p aligned to the batch), 8 independent vector accumulators.
float sum_stream(const float* p, std::size_t n) {
  constexpr std::size_t step = 8 * batch::size;
  batch a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f), a4(0.0f), a5(0.0f), a6(0.0f), a7(0.0f);
  std::size_t i = 0;
  for (; i + step <= n; i += step) {
    a0 += batch::load_aligned(p + i + 0 * batch::size);
    a1 += batch::load_aligned(p + i + 1 * batch::size);
    a2 += batch::load_aligned(p + i + 2 * batch::size);
    a3 += batch::load_aligned(p + i + 3 * batch::size);
    a4 += batch::load_aligned(p + i + 4 * batch::size);
    a5 += batch::load_aligned(p + i + 5 * batch::size);
    a6 += batch::load_aligned(p + i + 6 * batch::size);
    a7 += batch::load_aligned(p + i + 7 * batch::size);
  }
  float s = xsimd::hadd(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)));
  for (; i < n; ++i) s += p[i];
  return s;
}

/// A page-aligned float buffer, first touched by `threads` threads in the slices they read.
class read_buffer {
 public:
  read_buffer(std::size_t bytes, int threads) : threads_(threads) {
    constexpr std::size_t chunk = 4096;  // slice granularity in floats (16 KiB, page multiple)
    floats_ = std::max<std::size_t>(chunk, bytes / sizeof(float) / chunk * chunk);
    data_ = static_cast<float*>(std::aligned_alloc(4096, floats_ * sizeof(float)));
    if (data_ == nullptr) throw std::bad_alloc();
    const std::size_t chunks = floats_ / chunk;
    for_slices(
        [&](std::size_t begin, std::size_t end) {
          for (std::size_t i = begin; i < end; ++i) data_[i] = 1.0f;
        },
        chunks, chunk);
  }
  read_buffer(const read_buffer&) = delete;
  read_buffer& operator=(const read_buffer&) = delete;
  ~read_buffer() { std::free(data_); }

  [[nodiscard]] std::size_t bytes() const noexcept { return floats_ * sizeof(float); }

  /// One pass: every thread sums its slice; returns the wall seconds of the pass.
  double pass() const {
    constexpr std::size_t chunk = 4096;
    float sums[256] = {};
    const auto t0 = wall_timer::clock::now();
    for_slices([&](std::size_t begin,
                   std::size_t end) { sums[thread_id() % 256] += sum_stream(data_ + begin, end - begin); },
               floats_ / chunk, chunk);
    const double s = std::chrono::duration<double>(wall_timer::clock::now() - t0).count();
    float total = 0.0f;
    for (float x : sums) total += x;
    sink(total);
    return s;
  }

 private:
  static int thread_id() {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
  }

  /// Runs f(begin, end) on `threads_` threads, each on one contiguous slice (static split).
  template <class F>
  void for_slices(F&& f, std::size_t chunks, std::size_t chunk) const {
    const int n = threads_;
#if defined(_OPENMP)
#pragma omp parallel num_threads(n)
#endif
    {
      const int t = thread_id();
#if defined(_OPENMP)
      const int nt = omp_get_num_threads();
#else
      const int nt = 1;
#endif
      const std::size_t begin = chunks * static_cast<std::size_t>(t) / static_cast<std::size_t>(nt);
      const std::size_t end = chunks * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(nt);
      if (end > begin) f(begin * chunk, end * chunk);
    }
    (void)n;
  }

  int threads_;
  std::size_t floats_ = 0;
  float* data_ = nullptr;
};

/// Runs fma_loop(iters) on `threads` threads at once; returns the summed GFLOP/s (each thread's
/// FLOPs over its own wall time).
double fma_gflops(int threads, std::int64_t iters) {
  double rates[256] = {};
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
#if defined(_OPENMP)
#pragma omp barrier
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    const auto t0 = wall_timer::clock::now();
    const double flops = fma_loop(iters);
    const double s = std::chrono::duration<double>(wall_timer::clock::now() - t0).count();
    rates[t % 256] = flops / s / 1e9;
  }
  (void)threads;
  double total = 0.0;
  for (double r : rates) total += r;
  return total;
}

/// fma_loop iterations that take about `seconds` on one thread.
std::int64_t fma_iterations_for(double seconds) {
  static const double per_iter = [] {
    std::int64_t iters = 1 << 16;
    for (;;) {
      const auto t0 = wall_timer::clock::now();
      fma_loop(iters);
      const double s = std::chrono::duration<double>(wall_timer::clock::now() - t0).count();
      if (s > 0.02) return s / static_cast<double>(iters);
      iters *= 4;
    }
  }();
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(seconds / per_iter));
}

std::size_t bw_bytes_from_env() {
  constexpr std::size_t default_bytes = std::size_t{1} << 30;  // 1 GiB: far larger than any LLC
  const char* env = std::getenv("HEADWISE_BENCH_BW_BYTES");
  if (env == nullptr || *env == '\0') return default_bytes;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(env, &end, 10);
  if (end == env || *end != '\0' || v < (1u << 20)) {
    std::fprintf(stderr, "headwise_bench: ignoring HEADWISE_BENCH_BW_BYTES=%s (want an integer >= 1048576)\n",
                 env);
    return default_bytes;
  }
  return static_cast<std::size_t>(v);
}

}  // namespace

machine_limits::machine_limits() : bw_bytes_(bw_bytes_from_env()) {}

machine_limits& machine_limits::instance() {
  static machine_limits limits;
  return limits;
}

const machine_limits::entry& machine_limits::get(int threads) {
  for (const auto& e : entries_) {
    if (e.threads == threads) return e;
  }
  std::fprintf(stderr, "headwise_bench: measuring machine limits on %d thread(s): ", threads);
  // Best of 6 runs of ~0.05 s: the peak is a maximum, and shared (virtual) machines have
  // neighbours whose bursts only ever make a run slower.
  double gflops = 0.0;
  const std::int64_t iters = fma_iterations_for(0.05);
  for (int run = 0; run < 6; ++run) gflops = std::max(gflops, fma_gflops(threads, iters));
  std::fprintf(stderr, "fp32 FMA peak %.1f GFLOP/s, ", gflops);
  double best = 0.0;
  {
    const read_buffer buffer(bw_bytes_, threads);
    for (int pass = 0; pass < 3; ++pass)
      best = std::max(best, static_cast<double>(buffer.bytes()) / buffer.pass());
  }
  std::fprintf(stderr, "read bandwidth %.2f GB/s (%zu MiB buffer)\n", best / 1e9, bw_bytes_ >> 20);
  entries_.push_back({threads, gflops, best / 1e9});
  return entries_.back();
}

void machine_limits::measure(const std::vector<int>& thread_counts) {
  for (int t : thread_counts) get(t);
}

double machine_limits::fma_peak_gflops(int threads) { return get(threads).fma_gflops; }
double machine_limits::read_bw_gbs(int threads) { return get(threads).bw_gbs; }

void add_machine_context(const std::vector<int>& thread_counts) {
  auto& limits = machine_limits::instance();
  char buf[64];
  for (int t : thread_counts) {
    std::snprintf(buf, sizeof buf, "%.2f", limits.fma_peak_gflops(t));
    benchmark::AddCustomContext("fma_peak_gflops_t" + std::to_string(t), buf);
    std::snprintf(buf, sizeof buf, "%.3f", limits.read_bw_gbs(t));
    benchmark::AddCustomContext("read_bw_gbs_t" + std::to_string(t), buf);
  }
  benchmark::AddCustomContext("read_bw_buffer_bytes", std::to_string(limits.bw_bytes()));
  benchmark::AddCustomContext("xsimd_arch", xsimd::default_arch::name());
}

void register_machine_benchmarks(const std::vector<int>& thread_counts) {
  // Each row shows the startup value that the kernels' fractions use (GFLOP/s, GB/s) and
  // `rerun`, the best of the row's own iterations (the same measurement, shorter), so that
  // drift during the run shows. The row times are those of the rows' own measurements.
  for (int t : thread_counts) {
    const std::string fma_name = "machine/fma_peak/threads:" + std::to_string(t);
    benchmark::RegisterBenchmark(fma_name.c_str(), [t](benchmark::State& state) {
      const std::int64_t iters = fma_iterations_for(0.02);
      double best = 0.0;
      for (auto _ : state) best = std::max(best, fma_gflops(t, iters));
      state.counters["GFLOP/s"] = benchmark::Counter(machine_limits::instance().fma_peak_gflops(t));
      state.counters["rerun"] = benchmark::Counter(best);
    })->Unit(benchmark::kMillisecond);
  }
  // All the bandwidth rows after all the FMA rows: one table header each with tabular counters.
  for (int t : thread_counts) {
    const std::string bw_name = "machine/read_bw/threads:" + std::to_string(t);
    benchmark::RegisterBenchmark(bw_name.c_str(), [t, bw_name](benchmark::State& state) {
      const std::size_t bytes = machine_limits::instance().bw_bytes();
      const auto& buffer = input_slot::instance().get<read_buffer>(
          "read_buffer:" + std::to_string(bytes) + ":" + std::to_string(t), bytes, t);
      if (input_slot::instance().needs_warm_up(bw_name)) buffer.pass();
      double best = 0.0;
      for (auto _ : state) best = std::max(best, static_cast<double>(buffer.bytes()) / buffer.pass() / 1e9);
      state.counters["GB/s"] = benchmark::Counter(machine_limits::instance().read_bw_gbs(t));
      state.counters["rerun"] = benchmark::Counter(best);
    })->Unit(benchmark::kMillisecond);
  }
}

}  // namespace headwise_bench
