#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz into build/fuzz (clang 14, ASan + UBSan, Ninja,
# ccache) and runs each for [seconds] (default 60), one after the other, on a copy of its seed
# corpus (tests/fuzz/corpus/<target>/ is never written to). Then replays every input kept in
# tests/fuzz/regressions/<target>/ once. Fails if anything crashes, naming the reproducer.
#   bash scripts/fuzz.sh [seconds] [target...]
# Environment: FUZZ_WORK (default build/fuzz/run) holds the working corpora and crash files;
# FUZZ_KEEP_CORPUS=1 keeps the working corpora between runs (long local runs) instead of starting
# from the seeds again.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
all_targets=(fuzz_callback_query fuzz_provider_response fuzz_connect_link fuzz_config)
if (($#)); then
  targets=("$@")
else
  targets=("${all_targets[@]}")
fi

export CCACHE_BASEDIR=$PWD
export CCACHE_NOHASHDIR=1
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G}

# Optimized, with debug info and with assert() left on: a failed invariant is a finding too.
cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g" -DCMAKE_CXX_COMPILER=clang++ -DTB_FUZZ=ON \
  -DTB_WERROR=OFF >/dev/null
ninja -C build/fuzz "${targets[@]}"

# Our own sanitizer settings, whatever an earlier phase of test.sh exported.
export ASAN_OPTIONS=detect_leaks=1:detect_stack_use_after_return=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
unset LSAN_OPTIONS

# Longest input per target: a request head, a response body, a link token (VerifyLink reads at
# most 4096 bytes), a config file.
declare -A max_len=(
  [fuzz_callback_query]=4096
  [fuzz_provider_response]=8192
  [fuzz_connect_link]=6144
  [fuzz_config]=8192
)

work=${FUZZ_WORK:-build/fuzz/run}
failed=()
for t in "${targets[@]}"; do
  bin=build/fuzz/tests/fuzz/$t
  corpus=$work/$t/corpus
  artifacts=$work/$t/artifacts
  if [[ ${FUZZ_KEEP_CORPUS:-0} != 1 ]]; then
    rm -rf "$corpus"
  fi
  rm -rf "$artifacts"
  mkdir -p "$corpus" "$artifacts"
  cp -n tests/fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
  dict=()
  if [[ -f tests/fuzz/$t.dict ]]; then
    dict=(-dict=tests/fuzz/$t.dict)
  fi

  echo "== fuzz $t for ${seconds}s (seeds: $(ls tests/fuzz/corpus/"$t" | wc -l))"
  status=0
  "$bin" "$corpus" "${dict[@]}" -max_total_time="$seconds" -max_len="${max_len[$t]}" \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$work/$t/log" 2>&1 || status=$?
  grep -E '^(#[0-9]+ +DONE|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb))' \
    "$work/$t/log" || true
  if ((status != 0)) || compgen -G "$artifacts/*" >/dev/null; then
    tail -n 60 "$work/$t/log" >&2
    for f in "$artifacts"/*; do
      [[ -e $f ]] && echo "fuzz.sh: $t: reproducer $f (replay: $bin $f)" >&2
    done
    failed+=("$t")
  fi

  regressions=(tests/fuzz/regressions/"$t"/*)
  if [[ -e ${regressions[0]} ]]; then
    echo "== replay ${#regressions[@]} regression input(s) of $t"
    if ! "$bin" -rss_limit_mb=2048 -timeout=10 "${regressions[@]}" >"$work/$t/regressions.log" 2>&1;
    then
      tail -n 60 "$work/$t/regressions.log" >&2
      echo "fuzz.sh: $t: a regression input fails again (see $work/$t/regressions.log)" >&2
      failed+=("$t (regressions)")
    fi
  fi
done

if ((${#failed[@]})); then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} target(s), ${seconds}s each, no crash"
