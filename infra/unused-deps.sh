#!/usr/bin/env bash
# Fails when a workspace member names a dependency in its Cargo.toml that none of its Rust
# sources refers to (the same heuristic as cargo-machete, without building anything).
# It reads the `[dependencies]`, `[dev-dependencies]` and `[build-dependencies]` tables;
# `[dependencies.name]` and `[target.*]` tables are not used in this workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case ${1:-} in
  -h | --help)
    echo "Usage: infra/unused-deps.sh   (run by infra/test.sh; prints each unused dependency)"
    exit 0
    ;;
esac
fail=0
for toml in Cargo.toml */Cargo.toml; do
  dir=$(dirname "$toml")
  if [[ $dir == . ]]; then srcs=(src); else srcs=("$dir"); fi
  deps=$(awk '/^\[(dev-|build-)?dependencies\]/ { on = 1; next } /^\[/ { on = 0 }
              on && /^[A-Za-z0-9_-]+[ .=]/ { sub(/[ .=].*/, ""); print }' "$toml")
  for dep in $deps; do
    id=${dep//-/_}
    if ! grep -rqE "(^|[^A-Za-z0-9_])${id}(::|!)|use ${id}\b|extern crate ${id}\b" --include='*.rs' "${srcs[@]}"; then
      echo "$toml: dependency $dep is not used" >&2
      fail=1
    fi
  done
done
exit $fail
