#!/usr/bin/env bash
# The README's second command: brings up the local infrastructure if needed, then checks
# formatting and lints and runs the whole test suite (unit tests and the black-box tests
# against real Kafka, registry, PostgreSQL and Redis).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case ${1:-} in
  -h | --help)
    echo "Usage: infra/test.sh [cargo test args...]"
    exit 0
    ;;
esac
started=$SECONDS
infra/local.sh up
# The tests read the local SMTP server's captured mail; what earlier runs left there (a
# long chaos run leaves hundreds of thousands) would make every look take seconds.
state=${NEWSROOM_STATE_DIR:-$ROOT/.local}
if [[ -d $state/smtp/mail ]]; then
  echo "[test] clearing $(find "$state/smtp/mail" -name '*.eml' | wc -l) captured mails of earlier runs"
  find "$state/smtp/mail" -name '*.eml' -delete
fi
# The cluster tests and the chaos pass run on a three-node Kafka cluster of their own.
infra/local.sh cluster up
cargo fmt --all -- --check
infra/unused-deps.sh
# The statements written with sqlx's query macros, checked against a database migrated
# afresh, and the committed `.sqlx/` data the builds use checked against them (ADR 32).
infra/sqlx-queries.sh check
cargo clippy --workspace --all-targets -- -D warnings
# The ownership tests start the newsroom binary as separate processes; the benchmark's
# smoke run below uses the bench binary.
cargo build --bin newsroom
cargo build -p bench
cargo build -p newsroom-tests --bin chaos
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The benchmark is not a test; its quick run only checks that it still works end to end
# (debug build: its figures mean nothing here).
if [[ $status -eq 0 && -z ${NEWSROOM_SKIP_BENCH_SMOKE:-} ]]; then
  echo "[test] benchmark smoke run (bench --quick)"
  target/debug/bench --quick --out target/bench-quick.json >/dev/null || status=$?
fi
# The chaos run's short pass: every role as its own process on a three-node Kafka cluster,
# faults of every kind at random under a recorded workload, then the checker (issue 14).
if [[ $status -eq 0 && -z ${NEWSROOM_SKIP_CHAOS:-} ]]; then
  echo "[test] chaos short pass (chaos --quick)"
  target/debug/chaos --quick --out target/chaos-quick.json >/dev/null || status=$?
fi
echo "[test] done in $((SECONDS - started))s"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i - 1); if ($i == "failed;") f += $(i - 1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
