#!/usr/bin/env bash
# Builds the real Kubernetes control plane the e2e tests run (etcd, kube-apiserver,
# kube-controller-manager) from the tools modules next to this script, into a cache outside the
# clone keyed by version, and prints that bin directory on stdout (the last line).
#
# Idempotent: binaries already in the cache are reused (the cold build takes about 11 minutes and
# 4.7 GB of memory on 2 cores; a warm check is instant). Any failure exits non-zero: CI must fail,
# never skip, when the control plane cannot be built.
#
# With --check it builds nothing: it exits non-zero unless every binary is already cached (the
# test fixture uses this, so a missing build fails fast instead of building inside a test timeout).
#
# Environment: MESHCTL_K8S_CACHE overrides the cache root (default ${XDG_CACHE_HOME:-~/.cache}/meshctl/k8s).
set -euo pipefail

check_only=false
case "${1:-}" in
    --check) check_only=true ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "$0")" && pwd)"
k8s_version="v1.37.2"
etcd_version="$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/etcd/go.mod")"
[ -n "$etcd_version" ] || { echo "build-tools: no etcd version in $here/etcd/go.mod" >&2; exit 1; }
grep -q "k8s.io/kubernetes $k8s_version" "$here/tools/go.mod" \
    || { echo "build-tools: $here/tools/go.mod does not require k8s.io/kubernetes $k8s_version" >&2; exit 1; }

cache_root="${MESHCTL_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshctl/k8s}"
bin="$cache_root/$k8s_version-etcd-$etcd_version/bin"
$check_only || mkdir -p "$bin"

command -v go >/dev/null || { echo "build-tools: go is not on PATH" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# Each binary is built to a temporary name and moved into place, so an interrupted build never
# leaves a half-written binary that a later run would take as cached.
build() {  # build <module dir> <package> <output name> [ldflags]
    local dir="$1" pkg="$2" out="$3" ldflags="${4:-}"
    if [ -x "$bin/$out" ]; then
        echo "build-tools: cached $bin/$out" >&2
        return
    fi
    if $check_only; then
        echo "build-tools: $bin/$out is not built; run $0 first (cold build: about 11 minutes)" >&2
        exit 1
    fi
    echo "build-tools: building $out from $pkg (cold build: minutes)" >&2
    (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/.$out.tmp" "$pkg")
    mv -f "$bin/.$out.tmp" "$bin/$out"
}

version_flag="-X k8s.io/component-base/version.gitVersion=$k8s_version"
build "$here/etcd" go.etcd.io/etcd/server/v3 etcd
build "$here/tools" k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$version_flag"
build "$here/tools" k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$version_flag"

# A binary that does not run (wrong platform, truncated) fails here rather than in a test.
"$bin/etcd" --version >/dev/null
"$bin/kube-apiserver" --version | grep -qx "Kubernetes $k8s_version" \
    || { echo "build-tools: $bin/kube-apiserver does not report $k8s_version" >&2; exit 1; }
"$bin/kube-controller-manager" --version >/dev/null
echo "$bin"
