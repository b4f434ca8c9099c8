#!/usr/bin/env bash
# Build and run the benchmark suite (Release, -march=native). Arguments go to headwise_bench:
# its own --full selects the full sweep; Google Benchmark flags (--benchmark_filter=...,
# --benchmark_out=f.json --benchmark_out_format=json, ...) work as usual.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

jobs=$(nproc 2>/dev/null || echo 2)
build=build/bench

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DHEADWISE_BUILD_TESTS=OFF -DHEADWISE_BUILD_EXAMPLES=OFF -DHEADWISE_BUILD_BENCHMARKS=ON
cmake --build "$build" -j"$jobs" --target headwise_bench

exec "$build/bench/headwise_bench" --benchmark_counters_tabular=true "$@"
