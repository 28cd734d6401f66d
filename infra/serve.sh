#!/usr/bin/env bash
# The README's first command: brings up the local infrastructure, builds newsroom and
# serves every role in one process (command API :8080, query API :8081). Ctrl-C stops
# newsroom; `infra/local.sh down` stops the infrastructure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case ${1:-} in
  -h | --help)
    echo "Usage: infra/serve.sh [newsroom run flags...]  (see: cargo run -- run --help)"
    exit 0
    ;;
esac
infra/local.sh up
cargo build --release --bin newsroom
export NEWSROOM_LOCAL="${NEWSROOM_LOCAL:-true}"
export NEWSROOM_ADMIN_EMAIL="${NEWSROOM_ADMIN_EMAIL:-admin@newsroom.local}"
export NEWSROOM_ADMIN_PASSWORD="${NEWSROOM_ADMIN_PASSWORD:-change-me-now}"
echo "[serve] command API http://127.0.0.1:8080, query API http://127.0.0.1:8081; admin $NEWSROOM_ADMIN_EMAIL"
exec target/release/newsroom run "$@"
