/// @file
/// @brief headwise_bench main: our own flags, the machine limits measured before the kernels,
/// then every benchmark registered by shape.
///
/// Flags of our own (removed before Google Benchmark sees argv):
///   --full   the sweeps (threads, lengths, dims, head ratios, K/V dtypes)
///   --tune   the hidden mha_tune blocking grid (rows x block_kv)
/// The default --benchmark_min_time is 0.5 s (given on the command line, it wins). It is set as
/// a flag, not with ->MinTime(), because MinTime() would append "/min_time:0.500" to every name.
/// stdout carries only what Google Benchmark prints (so --benchmark_format=json stays valid);
/// progress notes go to stderr.

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

bool starts_with(const char* s, const char* prefix) {
  return std::strncmp(s, prefix, std::strlen(prefix)) == 0;
}

/// True for --benchmark_list_tests[=true|1|yes] (listing needs no machine measurements).
bool is_list_tests(const char* arg) {
  if (std::strcmp(arg, "--benchmark_list_tests") == 0) return true;
  if (!starts_with(arg, "--benchmark_list_tests=")) return false;
  const std::string v = arg + std::strlen("--benchmark_list_tests=");
  return v == "true" || v == "1" || v == "yes" || v == "on";
}

int hardware_threads() {
  int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(_OPENMP)
  n = std::max(n, omp_get_num_procs());
#endif
  return std::max(n, 1);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace headwise_bench;

  plan_options plan;
  plan.hardware_threads = hardware_threads();
  bool list_only = false, has_min_time = false, help = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--full") == 0) {
      plan.full = true;
      continue;
    }
    if (i > 0 && std::strcmp(argv[i], "--tune") == 0) {
      plan.tune = true;
      continue;
    }
    help = help || std::strcmp(argv[i], "--help") == 0;
    list_only = list_only || is_list_tests(argv[i]);
    has_min_time = has_min_time || starts_with(argv[i], "--benchmark_min_time=");
    args.push_back(argv[i]);
  }
  if (help) {
    std::fprintf(stderr,
                 "headwise_bench flags:\n"
                 "  --full   full sweep (threads, lengths, dims, head ratios, bf16/f16 K/V)\n"
                 "  --tune   the mha_tune blocking grid (rows x block_kv)\n"
                 "  env HEADWISE_BENCH_BW_BYTES: read-bandwidth buffer size (default 1 GiB)\n"
                 "  default --benchmark_min_time=0.5\n"
                 "Google Benchmark flags:\n");
  }
  static char default_min_time[] = "--benchmark_min_time=0.5";
  if (!has_min_time) args.insert(args.begin() + 1, default_min_time);
  int args_count = static_cast<int>(args.size());
  args.push_back(nullptr);

  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 1;

  const std::vector<shape> dense = dense_shapes(plan);
  const std::vector<shape> decode = decode_shapes(plan);
  const std::vector<shape> mla = mla_shapes(plan);
  const std::vector<shape> eigen = unfused_eigen_shapes(plan);
  const std::vector<shape> diff = diff_shapes(plan);
  const std::vector<shape> sparse = sparse_shapes(plan);

  // Every thread count a registered benchmark uses, ascending.
  std::vector<int> thread_counts;
  for (const auto* list : {&dense, &decode, &mla, &eigen, &diff, &sparse}) {
    for (const shape& s : *list) {
      if (std::find(thread_counts.begin(), thread_counts.end(), s.threads) == thread_counts.end()) {
        thread_counts.push_back(s.threads);
      }
    }
  }
  std::sort(thread_counts.begin(), thread_counts.end());

  // Machine limits first, with nothing else running (the kernels' fractions divide by them).
  if (!list_only) {
    machine_limits::instance().measure(thread_counts);
    add_machine_context(thread_counts);
  }

  register_machine_benchmarks(thread_counts);
  register_dense_benchmarks(dense);
  register_decode_benchmarks(decode);
  register_mla_benchmarks(mla);
  register_unfused_eigen_benchmarks(eigen);
  register_diff_benchmarks(diff);
  register_sparse_benchmarks(sparse);

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
