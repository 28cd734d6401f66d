#!/usr/bin/env bash
# The SQL statements written with sqlx's query macros are checked against the schema at
# compile time. Builds read what the macros need from `.sqlx/` (committed; .cargo/config.toml
# sets SQLX_OFFLINE), so they need no database; this script makes that data afresh from a
# database migrated from infra/migrations (ADR 32):
#   infra/sqlx-queries.sh check    fail if `.sqlx/` differs from what the statements need
#   infra/sqlx-queries.sh prepare  rewrite `.sqlx/` (after changing a statement)
# Needs the local PostgreSQL of infra/local.sh, or NEWSROOM_SQLX_ADMIN_URL: a role that may
# create databases.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case ${1:-} in
  check | prepare) mode=$1 ;;
  -h | --help)
    echo "Usage: infra/sqlx-queries.sh check|prepare"
    exit 0
    ;;
  *)
    echo "Usage: infra/sqlx-queries.sh check|prepare" >&2
    exit 2
    ;;
esac
admin=${NEWSROOM_SQLX_ADMIN_URL:-postgres://newsroom:newsroom@127.0.0.1:${NEWSROOM_PG_PORT:-5432}/postgres}
# The same server and options, another database (one per run: runs may share a server).
base=${admin%%\?*}
options=${admin#"$base"}
db=newsroom_sqlx_$$
url=${base%/*}/$db$options
# The projector's statements run under a version's search_path (projector/sqlx.toml reads
# this variable): the `_v1` schemas first, as every later version is made LIKE them.
path=users_v1,news_v1,reads_v1,notify_v1,public
separator='?'
[[ -z $options ]] || separator='&'
projector_url=$url${separator}options=-c%20search_path%3D${path//,/%2C}
export PGOPTIONS="-c client_min_messages=warning"
psql_() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
out=$(mktemp -d)
cleanup() {
  rm -rf "$out"
  psql_ "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
}
trap cleanup EXIT
echo "[sqlx] migrating a fresh database $db"
psql_ "$admin" -c "CREATE DATABASE $db" >/dev/null
for migration in infra/migrations/*.sql; do
  psql_ -1 "$url" -f "$migration" >/dev/null
done
# The crates with statements cleaned, so that every macro runs again against the database
# and writes what it needs (their dependencies' check builds serve clippy afterwards).
crates=(newsroom-command newsroom-query newsroom-projector newsroom-infra newsroom)
for crate in "${crates[@]}"; do
  cargo clean -q -p "$crate"
done
echo "[sqlx] checking every statement against it"
DATABASE_URL=$url NEWSROOM_SQLX_PROJECTOR_URL=$projector_url SQLX_OFFLINE=false SQLX_OFFLINE_DIR=$out \
  cargo check -q "${crates[@]/#/-p}" --all-targets
made=$(find "$out" -name 'query-*.json' | wc -l)
if [[ $made -eq 0 ]]; then
  echo "[sqlx] the macros wrote nothing: were the crates checked again?" >&2
  exit 1
fi
if [[ $mode == prepare ]]; then
  rm -rf .sqlx
  mkdir -p .sqlx
  cp "$out"/query-*.json .sqlx/
  echo "[sqlx] .sqlx/ holds $made statements"
elif ! diff -r -q .sqlx "$out" >/dev/null; then
  diff -r -q .sqlx "$out" || true
  echo "[sqlx] .sqlx/ is not what the statements need: run infra/sqlx-queries.sh prepare" >&2
  exit 1
else
  echo "[sqlx] .sqlx/ matches the $made statements"
fi
