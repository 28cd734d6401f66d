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
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The ownership tests start the newsroom binary as separate processes.
cargo build --bin newsroom
cargo test --workspace "$@"
echo "[test] done in $((SECONDS - started))s"
