#!/usr/bin/env bash
# Builds csi-sanity, the CSI conformance suite (github.com/kubernetes-csi/csi-test), at the
# version go.mod pins, from Go modules.
#
# Usage: tests/csi/build.sh OUTPUT   (e.g. .tools/csi-sanity-v5.6.0/csi-sanity)
# Env:   FORCE=1   rebuild even if OUTPUT is up to date
#
# Idempotent: does nothing if OUTPUT exists and is newer than go.mod, go.sum and tools.go.
# The first build downloads ~20 MB of modules and compiles for about a minute on 2 cores
# (62 s with an empty Go build cache); later builds reuse the Go build cache.
set -euo pipefail
out=${1:?usage: build.sh OUTPUT}
here=$(cd "$(dirname "$0")" && pwd)
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

if [ -z "${FORCE:-}" ] && [ -x "$out" ]; then
  stale=
  for f in "$here"/go.mod "$here"/go.sum "$here"/*.go; do
    if [ "$f" -nt "$out" ]; then stale=$f; break; fi
  done
  if [ -z "$stale" ]; then
    echo "build.sh: $out is up to date"
    exit 0
  fi
  echo "build.sh: $stale is newer than $out, rebuilding"
fi

command -v go >/dev/null || { echo "build.sh: go not found" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cd "$here"
# go.sum is committed and complete: the build must not change go.mod or go.sum.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"
export CGO_ENABLED=${CGO_ENABLED:-0}
start=$(date +%s)
go build -trimpath -ldflags='-s -w' -o "$out.tmp" github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
mv -f "$out.tmp" "$out"
echo "build.sh: built $out ($(du -h "$out" | cut -f1)) in $(( $(date +%s) - start ))s"
