#!/usr/bin/env bash
# Build the libFuzzer harness (fuzz/attention_fuzz.cpp: ASan + UBSan, clang 14) and run it for a
# fixed number of executions from the seed corpus (fuzz/corpus/, copied to a scratch dir so the
# repository is never written). Usage: scripts/fuzz.sh [runs] (default 50000).
# Prints one summary line "fuzz: <N> executions, 0 failures" and exits 0, or prints the failing
# case and the path of the saved crash input and exits nonzero. Replay a crash with
#   build/fuzz/attention_fuzz <crash file>
# Extra libFuzzer flags can be passed in HEADWISE_FUZZ_FLAGS (e.g. "-max_total_time=600").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=${1:-50000}
if ! [[ $runs =~ ^[0-9]+$ ]] || [ "$runs" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [runs]" >&2
  exit 2
fi

# --- dependencies (Debian 12) -----------------------------------------------------------------
bash scripts/install-deps.sh clang-14 libclang-rt-14-dev libomp-14-dev libxsimd-dev

cxx=clang++-14
command -v "$cxx" >/dev/null 2>&1 || cxx=clang++

# --- build (only when the harness, the headers or the flags changed) --------------------------
out=build/fuzz
bin=$out/attention_fuzz
mkdir -p "$out"
flags=(-std=c++20 -O1 -g "-fsanitize=fuzzer,address,undefined" -fno-sanitize-recover=all -march=x86-64-v3
       -Wall -Wextra -Wconversion -Wno-sign-conversion -I include -I /usr/include/eigen3)
# OpenMP (libomp) when clang can link it, so that num_threads and the threaded paths are fuzzed.
omp_probe=$out/omp_probe.cpp
printf '#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n' > "$omp_probe"
if "$cxx" -fopenmp "$omp_probe" -o "$out/omp_probe" >/dev/null 2>&1 && "$out/omp_probe"; then
  flags+=(-fopenmp)
else
  echo "fuzz.sh: OpenMP (libomp) not usable with $cxx; building the harness without it"
fi
stamp="$("$cxx" --version | head -n 1) ${flags[*]}"
if [ ! -x "$bin" ] || [ ! -f "$bin.flags" ] || [ "$(cat "$bin.flags")" != "$stamp" ] ||
   [ -n "$(find fuzz/attention_fuzz.cpp include -newer "$bin" -type f -print -quit)" ]; then
  echo "fuzz.sh: building $bin"
  start=$(date +%s)
  "$cxx" "${flags[@]}" fuzz/attention_fuzz.cpp -o "$bin.tmp"
  mv "$bin.tmp" "$bin"
  echo "$stamp" > "$bin.flags"
  echo "fuzz.sh: built in $(( $(date +%s) - start )) s"
fi

# --- run --------------------------------------------------------------------------------------
work=$out/run
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
if [ -d fuzz/corpus ]; then cp fuzz/corpus/* "$work/corpus/" 2>/dev/null || true; fi
log=$work/fuzz.log
echo "fuzz.sh: $runs executions (seed 1, corpus $(find "$work/corpus" -type f | wc -l) files), log in $log"
start=$(date +%s)
set +e
# shellcheck disable=SC2086
HEADWISE_FUZZ_STATS=1 ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
  LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/fuzz/lsan.supp:print_suppressions=0} "$bin" -runs="$runs" -seed=1 -max_len=512 \
  -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$work/artifacts/" \
  ${HEADWISE_FUZZ_FLAGS:-} "$work/corpus" > "$log" 2>&1
rc=$?
set -e
secs=$(( $(date +%s) - start ))

done_runs=$(sed -n 's/^Done \([0-9][0-9]*\) runs in .*/\1/p' "$log" | tail -n 1)
if [ "$rc" -ne 0 ] || [ -z "$done_runs" ]; then
  echo "fuzz.sh: FAILED (libFuzzer exit $rc after $secs s); the end of $log:" >&2
  tail -n 60 "$log" >&2
  for f in "$work"/artifacts/*; do
    [ -e "$f" ] && echo "fuzz.sh: crash input saved as $f (replay: $bin $f)" >&2
  done
  echo "fuzz: ${done_runs:-?} executions, 1 failures"
  exit 1
fi
# The outcome table (calls, accepted, rejected per entry point), from HEADWISE_FUZZ_STATS.
sed -n '/^entry point/,/^total/p' "$log"
echo "fuzz.sh: $secs s"
echo "fuzz: $done_runs executions, 0 failures"
