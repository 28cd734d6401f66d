#!/usr/bin/env bash
# Profiles benchmark phases: runs `bench --only PHASES` under `perf record -a` (the whole
# machine: newsroom, the load generator, Kafka, PostgreSQL, Redis) and summarises where the
# CPU went (bench/profile.py): per-second thread shares, then per thread the functions with
# the largest inclusive share; plus folded stacks for a flame-graph renderer.
#
# Usage: bench/profile.sh OUT_DIR PHASES [FROM_S TO_S] [-- BENCH_ARGS...]
#   PHASES: comma-separated, as `bench --only` takes them (commands, lag, queries, backlog)
#   FROM_S TO_S: the window (seconds since the first sample) to summarise; default: all.
#   Needs perf (Debian: linux-perf) and the release build (cargo build --release -p bench).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
out=$1 phases=$2
shift 2
window=()
while [[ $# -gt 0 && $1 != -- ]]; do window+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
command -v perf >/dev/null || { echo "profile: perf is not installed (Debian: linux-perf)" >&2; exit 1; }
[[ -x target/release/bench ]] || { echo "profile: build first: cargo build --release -p bench" >&2; exit 1; }

mkdir -p "$out"
echo "profile: recording bench --only $phases (figures in $out/bench.txt)" >&2
perf record -F 299 -a -g --call-graph dwarf,16384 -o "$out/perf.data" -- \
  target/release/bench --only "$phases" --out "$out/bench.json" "$@" >"$out/bench.txt" 2>"$out/bench.log"
echo "profile: summarising" >&2
perf script -F comm,pid,tid,time,ip,sym,dso -i "$out/perf.data" 2>/dev/null |
  bench/profile.py "$out/$phases" "${window[@]}" >"$out/$phases.txt"
echo "profile: $out/$phases.txt and $out/$phases.folded" >&2
