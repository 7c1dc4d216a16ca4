#!/usr/bin/env bash
# Builds the upstream Kubernetes binaries (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl)
# and etcd from Go modules, cached in a directory keyed by the version. A warm run only checks the cache.
#
#   deploy/e2e/build-k8s.sh            # prints the bin directory on its last line
#   K8S_VERSION=v1.34.4 E2E_CACHE=~/.cache/gpuplugin-e2e deploy/e2e/build-k8s.sh
#
# k8s.io/kubernetes keeps its staging modules as local `replace`s: deploy/e2e/k8s-staging-replaces.sh gives the
# module that requires it the published ones of the same release.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The machine's Go (1.24 or later is needed), ahead of an older one that Debian's packages may have put on PATH.
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuplugin-e2e}"
DIR="$CACHE/k8s-$K8S_VERSION"
BIN="$DIR/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl etcd)

have_all() {
    for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

if have_all; then
    echo "$BIN"
    exit 0
fi

src="$DIR/src"
mkdir -p "$src" "$BIN"
cd "$src"

replaces="$("$here/k8s-staging-replaces.sh" "$K8S_VERSION")"
printf 'module gpuplugin.e2e/k8s\n\ngo 1.24\n\nrequire k8s.io/kubernetes %s\n\n%s\n' "$K8S_VERSION" "$replaces" > go.mod

cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO

start=$(date +%s)
export GOFLAGS="-mod=mod -buildvcs=false"
go mod tidy >&2
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl >&2
nice -n 10 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
end=$(date +%s)
echo "built Kubernetes $K8S_VERSION and etcd in $((end - start)) s" >&2
echo "$((end - start))" > "$DIR/build-seconds"
echo "$BIN"
