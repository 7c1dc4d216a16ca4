#!/usr/bin/env bash
# Builds the kubelet plugin of the Kubernetes DRA example driver (cmd/dra-example-kubeletplugin of
# sigs.k8s.io/dra-example-driver) at a pinned release from Go modules, cached in a directory keyed by the version
# beside the Kubernetes build of deploy/e2e/build-k8s.sh; the in-run baseline of benchmarks/dra_baseline.py.
#
#   benchmarks/draexample/build.sh     # prints the binary's path on its last line
#
# DRA_EXAMPLE_VERSION picks another release; K8S_VERSION the Kubernetes release its k8s.io modules are set to (the
# cluster's). The default v0.2.1 is the newest the Go module proxy serves and is written against Kubernetes 1.34
# (resource.k8s.io/v1, the v1 DRA gRPC service). It requires k8s.io/kubernetes, whose staging modules
# (k8s.io/api, ...) are local `replace`s there: deploy/e2e/k8s-staging-replaces.sh gives the published ones.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"

case "${1:-}" in
-h | --help)
	sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
"") ;;
*)
	echo "build.sh: unknown argument $1" >&2
	exit 2
	;;
esac

VERSION="${DRA_EXAMPLE_VERSION:-v0.2.1}"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuplugin-e2e}"
DIR="$CACHE/dra-example-$VERSION-k8s-$K8S_VERSION"
BINARY="$DIR/bin/dra-example-kubeletplugin"
module=sigs.k8s.io/dra-example-driver

if [[ -x "$BINARY" ]]; then
	echo "$BINARY"
	exit 0
fi
if ! command -v go >/dev/null 2>&1; then
	echo "the DRA example driver needs Go (1.24 or later, with the module proxy reachable) to build" >&2
	exit 1
fi

src="$DIR/src"
rm -rf "$src"
mkdir -p "$src" "$DIR/bin"
cd "$src"
export GOFLAGS="-mod=mod -buildvcs=false"
replaces="$("$here/../../deploy/e2e/k8s-staging-replaces.sh" "$K8S_VERSION")"
printf 'module gpuplugin.bench/draexample\n\ngo 1.24\n\nrequire (\n\t%s %s\n\tk8s.io/kubernetes %s\n)\n\n%s\n' \
	"$module" "$VERSION" "$K8S_VERSION" "$replaces" >go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "%s/cmd/dra-example-kubeletplugin"\n' "$module" >tools.go

start=$(date +%s)
go mod tidy >&2
nice -n 10 go build -trimpath -ldflags "-s -w" -o "$BINARY" "$module/cmd/dra-example-kubeletplugin" >&2
end=$(date +%s)
echo "built the DRA example kubelet plugin $VERSION (k8s.io modules of $K8S_VERSION) in $((end - start)) s" >&2
echo "$((end - start))" >"$DIR/build-seconds"
echo "$BINARY"
