#!/usr/bin/env bash
# Builds helm from Go modules (helm.sh/helm/v3/cmd/helm), cached in a directory keyed by the version.
# Prints the helm binary's path on its last line; a warm run only checks the cache.
set -euo pipefail
# The machine's Go (1.24 or later is needed), ahead of an older one that Debian's packages may have put on PATH.
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"

HELM_VERSION="${HELM_VERSION:-v3.19.5}"
CACHE="${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuplugin-e2e}"
DIR="$CACHE/helm-$HELM_VERSION"

if [[ -x "$DIR/bin/helm" ]]; then
    echo "$DIR/bin/helm"
    exit 0
fi
mkdir -p "$DIR/src" "$DIR/bin"
cd "$DIR/src"
printf 'module gpuplugin.e2e/helm\n\ngo 1.24\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" > go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "helm.sh/helm/v3/cmd/helm"\n' > tools.go
start=$(date +%s)
export GOFLAGS="-mod=mod -buildvcs=false"
go mod tidy >&2
nice -n 10 go build -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    -o "$DIR/bin/helm" helm.sh/helm/v3/cmd/helm >&2
echo "built helm $HELM_VERSION in $(($(date +%s) - start)) s" >&2
echo "$DIR/bin/helm"
