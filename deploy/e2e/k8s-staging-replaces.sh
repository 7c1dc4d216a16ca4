#!/usr/bin/env bash
# Prints the `replace` block a Go module that requires k8s.io/kubernetes at a release needs: k8s.io/kubernetes keeps
# its staging modules (k8s.io/api, k8s.io/client-go, ...) as local `replace`s, so each is replaced with the published
# v0.X.Y of the same release. Read from k8s.io/kubernetes's go.mod in the module cache (downloaded if missing); used
# by deploy/e2e/build-k8s.sh and benchmarks/draexample/build.sh.
#
#   deploy/e2e/k8s-staging-replaces.sh v1.34.4
set -euo pipefail
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"

version="$1"
staging="v0.${version#v1.}"
GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" >/dev/null
modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$version.mod"
modules="$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile")"
grep -qx 'k8s.io/api' <<<"$modules" || {
	echo "no staging modules found in $modfile" >&2
	exit 1
}
echo "replace ("
while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done <<<"$modules"
echo ")"
