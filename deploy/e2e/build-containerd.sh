#!/usr/bin/env bash
# Builds containerd (containerd, ctr, containerd-shim-runc-v2) from Go modules, cached in a directory keyed by the
# version: `make e2e-dra` needs a runtime with CDI (containerd 1.7 or later), Debian's 1.6 has none.
# Prints the bin directory on its last line; a warm run only checks the cache.
#
#   CONTAINERD_VERSION=v1.7.35 E2E_CACHE=~/.cache/gpuplugin-e2e deploy/e2e/build-containerd.sh
set -euo pipefail
# The machine's Go (1.24 or later is needed), ahead of an older one that Debian's packages may have put on PATH.
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"

CONTAINERD_VERSION="${CONTAINERD_VERSION:-v1.7.35}"
CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuplugin-e2e}"
DIR="$CACHE/containerd-$CONTAINERD_VERSION"
BIN="$DIR/bin"
BINARIES=(containerd ctr containerd-shim-runc-v2)

have_all() {
    for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

if have_all; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$DIR/src" "$BIN"
cd "$DIR/src"
printf 'module gpuplugin.e2e/containerd\n\ngo 1.24\n\nrequire github.com/containerd/containerd %s\n' \
    "$CONTAINERD_VERSION" > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/cmd/containerd"
	_ "github.com/containerd/containerd/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/cmd/ctr"
)
GO
start=$(date +%s)
export GOFLAGS="-mod=mod -buildvcs=false"
go mod tidy >&2
# btrfs and devmapper snapshotters need C headers this machine lacks; the e2e uses overlayfs. The shim is static
# (no cgo) as upstream's release builds it.
tags="no_btrfs no_devmapper no_zfs no_aufs"
ldflags="-s -w -X github.com/containerd/containerd/version.Version=$CONTAINERD_VERSION"
nice -n 10 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$BIN/" \
    github.com/containerd/containerd/cmd/containerd github.com/containerd/containerd/cmd/ctr >&2
CGO_ENABLED=0 nice -n 10 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$BIN/" \
    github.com/containerd/containerd/cmd/containerd-shim-runc-v2 >&2
end=$(date +%s)
echo "built containerd $CONTAINERD_VERSION in $((end - start)) s" >&2
echo "$((end - start))" > "$DIR/build-seconds"
echo "$BIN"
