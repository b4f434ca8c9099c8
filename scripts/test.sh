#!/usr/bin/env bash
# Build and run headwise's test suite, what CI runs (.ci/run):
#   1. release: the Release build's GoogleTest suites for the native, x86-64-v3 and x86-64 (SSE2,
#      no OpenMP) builds, incl. the randomized differential driver (2,000 configurations per
#      build), the examples, the benchmarks' build and the consumer (packaging) tests;
#   2. fuzz: the libFuzzer harness (fuzz/attention_fuzz.cpp, clang, ASan + UBSan) for 50,000
#      executions from the seed corpus (scripts/fuzz.sh);
#   3. sanitizers: the errors, audit, semantics, decode, kv_cache, mla and diff suites
#      (HEADWISE_SANITIZE_SUITES)
#      and the examples under AddressSanitizer + UndefinedBehaviorSanitizer (preset `asan`), and
#      the concurrency test under ThreadSanitizer with OpenMP off (preset `tsan`).
# Each stage runs only when the one before passed. HEADWISE_TEST_FUZZ=0 / HEADWISE_TEST_SANITIZERS=0
# skip stages 2 / 3 (e.g. for a quick local run); HEADWISE_FUZZ_RUNS sets stage 2's count. Extra
# arguments go to the Release ctest, e.g. `scripts/test.sh -L arch:native`. The last lines are
# a summary: the tests passed per stage, the random configurations and fuzz executions checked.
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

if [ "$rc" -eq 0 ] && [ "${HEADWISE_TEST_FUZZ:-1}" != 0 ]; then
  flog=build/fuzz-stage.log
  set +e
  bash scripts/fuzz.sh "${HEADWISE_FUZZ_RUNS:-50000}" 2>&1 | tee "$flog"
  rc=${PIPESTATUS[0]}
  set -e
  grep -E '^fuzz: ' "$flog" | tail -n 1 >>"$summary" || echo "fuzz: no result (exit $rc)" >>"$summary"
fi

if [ "$rc" -eq 0 ] && [ "${HEADWISE_TEST_SANITIZERS:-1}" != 0 ]; then
  # ASan + UBSan: a labelled subset of the native suites (the whole suite takes longer to compile
  # under ASan than CI's limit allows) plus every example. The fuzz stage already ran every entry
  # point under the same sanitizers with arbitrary shapes, strides and options.
  suites=${HEADWISE_SANITIZE_SUITES:-errors;audit;semantics;decode;kv_cache;mla;diff}
  cmake --preset asan -DHEADWISE_TEST_SUITES="$suites" >/dev/null
  cmake --build --preset asan -j"$jobs"
  alog=build/asan/ctest.log
  set +e
  ctest --preset asan -j"$jobs" -LE consumer 2>&1 | tee "$alog"
  rc=${PIPESTATUS[0]}
  set -e
  echo "asan+ubsan ($suites, examples): $(grep -E 'tests passed, [0-9]+ tests? failed out of' "$alog" | tail -n 1 || echo 'no ctest summary')" \
    >>"$summary"
  if [ "$rc" -eq 0 ]; then
    # TSan: kernels called from several std::threads at once (OpenMP off: libgomp is not
    # TSan-instrumented).
    cmake --preset tsan -DHEADWISE_TEST_SUITES=concurrency >/dev/null
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
