#!/usr/bin/env bash
# The SQL statements written with sqlx's query macros are checked against the schema at
# compile time. Builds read what the macros need from `.sqlx/` (committed), so they need no
# database; this script makes that data afresh from a database migrated from
# infra/migrations (ADR 32):
#   infra/sqlx-queries.sh check    fail if `.sqlx/` differs from what the statements need
#   infra/sqlx-queries.sh prepare  rewrite `.sqlx/` (after changing a statement)
# Needs the local PostgreSQL of infra/local.sh (or NEWSROOM_SQLX_ADMIN_URL, a role that may
# create databases).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case ${1:-} in
  check | prepare) mode=$1 ;;
  *)
    echo "Usage: infra/sqlx-queries.sh check|prepare"
    [[ ${1:-} == -h || ${1:-} == --help ]] && exit 0
    exit 2
    ;;
esac
admin=${NEWSROOM_SQLX_ADMIN_URL:-postgres://newsroom:newsroom@127.0.0.1:${NEWSROOM_PG_PORT:-5432}/postgres}
db=newsroom_sqlx_check
url=${admin%/*}/$db
echo "[sqlx] migrating a fresh database $db"
export PGOPTIONS="-c client_min_messages=warning"
psql -q -v ON_ERROR_STOP=1 "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
for migration in infra/migrations/*.sql; do
  psql -q -1 -v ON_ERROR_STOP=1 "$url" -f "$migration" >/dev/null
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The crates with statements cleaned, so that every macro runs again against the database
# and writes what it needs (their dependencies' check builds serve clippy afterwards).
target=target
crates=(newsroom-command newsroom-query newsroom-infra newsroom)
for crate in "${crates[@]}"; do
  cargo clean -q --target-dir "$target" -p "$crate" 2>/dev/null || true
done
echo "[sqlx] checking every statement against it"
DATABASE_URL=$url SQLX_OFFLINE=false SQLX_OFFLINE_DIR=$out \
  cargo check -q --target-dir "$target" "${crates[@]/#/-p}" --all-targets
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null
if [[ $mode == prepare ]]; then
  rm -rf .sqlx
  mkdir -p .sqlx
  cp "$out"/*.json .sqlx/
  echo "[sqlx] .sqlx/ holds $(ls .sqlx | wc -l) statements"
elif ! diff -r -q .sqlx "$out" >/dev/null; then
  diff -r -q .sqlx "$out" || true
  echo "[sqlx] .sqlx/ is not what the statements need: run infra/sqlx-queries.sh prepare" >&2
  exit 1
else
  echo "[sqlx] .sqlx/ matches the $(ls .sqlx | wc -l) statements"
fi
