#!/usr/bin/env bash
# Build and run headwise's test suite, what CI runs (.ci/run):
#   1. the Release build: GoogleTest suites for the native, x86-64-v3 and x86-64 (SSE2, no
#      OpenMP) builds, incl. the randomized differential driver (2,000 configurations per
#      build), the examples, the benchmarks' build and the consumer (packaging) tests;
#   2. with HEADWISE_TEST_SANITIZERS=1: the native suite under AddressSanitizer +
#      UndefinedBehaviorSanitizer (CMake preset `asan`), and the concurrency test under
#      ThreadSanitizer with OpenMP off (preset `tsan`).
# Stage 2 is opt-in until it has a clean run on CI's machine (it about doubles the time); extra
# arguments go to the Release ctest, e.g. `scripts/test.sh -L arch:native`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

jobs=$(nproc 2>/dev/null || echo 2)
build=build/test
summary="$PWD/$build/summary.txt"
mkdir -p "$build"
: >"$summary"
export HEADWISE_TEST_SUMMARY="$summary"  # tests append their "N checked" lines here

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DHEADWISE_BUILD_TESTS=ON -DHEADWISE_BUILD_EXAMPLES=ON -DHEADWISE_BUILD_BENCHMARKS=ON
cmake --build "$build" -j"$jobs"

log="$build/ctest.log"
set +e
ctest --test-dir "$build" --output-on-failure --no-tests=error -j"$jobs" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
echo "release: $(grep -E 'tests passed, [0-9]+ tests? failed out of' "$log" | tail -n 1 || echo 'no ctest summary')" \
  >>"$summary"

if [ "$rc" -eq 0 ] && [ "${HEADWISE_TEST_SANITIZERS:-0}" != 0 ]; then
  # ASan + UBSan: every native GoogleTest suite and example (not the consumer builds).
  cmake --preset asan >/dev/null
  cmake --build --preset asan -j"$jobs"
  alog=build/asan/ctest.log
  set +e
  ctest --preset asan -j"$jobs" -LE consumer 2>&1 | tee "$alog"
  rc=${PIPESTATUS[0]}
  set -e
  echo "asan+ubsan: $(grep -E 'tests passed, [0-9]+ tests? failed out of' "$alog" | tail -n 1 || echo 'no ctest summary')" \
    >>"$summary"
  if [ "$rc" -eq 0 ]; then
    # TSan: kernels called from several std::threads at once (OpenMP off: libgomp is not
    # TSan-instrumented).
    cmake --preset tsan >/dev/null
    cmake --build --preset tsan -j"$jobs" --target headwise_concurrency_test
    tlog=build/tsan/test.log
    set +e
    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 build/tsan/tests/headwise_concurrency_test 2>&1 | tee "$tlog"
    rc=${PIPESTATUS[0]}
    set -e
    echo "tsan: headwise_concurrency_test $(grep -E '^\[  (PASSED|FAILED) ' "$tlog" | tr '\n' ' ')(exit $rc)" >>"$summary"
  fi
fi

echo
echo "== summary"
sed 's/^/== /' "$summary"
exit "$rc"
