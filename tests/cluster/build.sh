#!/usr/bin/env bash
# Builds the `kube` multi-call binary (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy) from
# Go modules.
#
# Usage: tests/cluster/build.sh OUTPUT   (e.g. .tools/k8s-v1.30.14/kube)
# Env:   KUBE_BUILD_TAGS=nokubectl  leave kubectl out (nonode: the kubelet and
#                                   kube-proxy; comma-separated for both)
#        FORCE=1                    rebuild even if OUTPUT is up to date
#
# Idempotent: does nothing if OUTPUT exists and is newer than go.mod, go.sum
# and the Go sources. The first build downloads ~150 MB of modules and
# compiles for about 7 minutes on 2 cores; later builds reuse
# the Go build cache.
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
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
export CGO_ENABLED=${CGO_ENABLED:-0}
# The release the binary reports (apiserver /version, the node's
# kubeletVersion); without these it says v0.0.0-master.
version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)
[[ $version =~ ^v([0-9]+)\.([0-9]+)\. ]] || { echo "build.sh: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=${BASH_REMATCH[1]}"
  ldflags+=" -X $pkg.gitMinor=${BASH_REMATCH[2]} -X $pkg.gitTreeState=clean"
done
start=$(date +%s)
go build -trimpath -ldflags="$ldflags" ${KUBE_BUILD_TAGS:+-tags "$KUBE_BUILD_TAGS"} -o "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "build.sh: built $out ($(du -h "$out" | cut -f1)) in $(( $(date +%s) - start ))s"
