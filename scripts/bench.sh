#!/usr/bin/env bash
# token-broker's benchmarks (issue 8): builds the bench targets (Release, Ninja, ccache) and runs
# bench/bench.py. Not tests: nothing here asserts a speed.
#
#   bash scripts/bench.sh all          # client, rpc, scale, churn, then bench/RESULTS.md
#   bash scripts/bench.sh rpc          # broker beside echo_server, prints the ratios
#   bash scripts/bench.sh scale        # 1M connections: load rate, RSS
#   bash scripts/bench.sh churn        # 100k connections, 60 s tokens: refreshes
#   bash scripts/bench.sh client       # tokenbroker::Client cached Get, metrics_bench
#   bash scripts/bench.sh report       # bench/RESULTS.md from bench/results/*.json
#   bash scripts/bench.sh smoke        # a few seconds of each (scripts/test.sh runs this)
#
# Options before the command: --build DIR (default build/bench, or $TB_BENCH_BUILD) and
# --no-build (use DIR as it is; test.sh passes its release tree). Options after the command go
# to bench.py (bench.py <command> --help). Run the big ones on a quiet machine: "rpc" waits for
# a 1-minute load average below 1 and declares a run void if echo_server gives less than 60k
# RPS at one channel and 16 in flight.
set -euo pipefail
cd "$(dirname "$0")/.."

build="${TB_BENCH_BUILD:-build/bench}"
do_build=1
while (($#)); do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --no-build) do_build=0; shift ;;
    *) break ;;
  esac
done
cmd="${1:?usage: scripts/bench.sh [--build DIR] [--no-build] all|rpc|scale|churn|client|report|smoke}"
shift

targets=(token-broker fake_provider echo_server load_gen seed_store client_bench metrics_bench)
if ((do_build)) && [[ "$cmd" != report ]]; then
  if [[ ! -f "$build/build.ninja" ]]; then
    CCACHE_BASEDIR="$PWD" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_COMPILER=g++ >/dev/null
  fi
  CCACHE_BASEDIR="$PWD" ninja -C "$build" -j"$(nproc)" "${targets[@]}" >/dev/null
fi

py=/usr/bin/python3
run() { "$py" bench/bench.py --build "$build" "$@"; }
case "$cmd" in
  all)
    run client "$@"
    run rpc "$@"
    run scale
    run churn
    run report
    ;;
  *) run "$cmd" "$@" ;;
esac
