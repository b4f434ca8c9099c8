#!/usr/bin/env bash
# Build headwise's tests (native, x86-64-v3 and x86-64 builds), examples and benchmarks, and
# run the whole ctest suite. Extra arguments go to ctest, e.g. `scripts/test.sh -L arch:native`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

jobs=$(nproc 2>/dev/null || echo 2)
build=build/test

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DHEADWISE_BUILD_TESTS=ON -DHEADWISE_BUILD_EXAMPLES=ON -DHEADWISE_BUILD_BENCHMARKS=ON
cmake --build "$build" -j"$jobs"

log="$build/ctest.log"
set +e
ctest --test-dir "$build" --output-on-failure --no-tests=error -j"$jobs" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

echo
echo "== $(grep -E 'tests passed, [0-9]+ tests? failed out of' "$log" | tail -n 1 || echo 'no ctest summary')"
exit "$rc"
