#!/usr/bin/env bash
# Builds bin/gokubelet, the kubelet's device-manager client used as a load generator, offline from Debian's Go
# sources: GOPATH mode (no module proxy), typed stubs generated from proto/v1beta1/api.proto into build/.
#
#   benchmarks/gokubelet/build.sh            build, or name the missing Debian packages and exit 1
#   benchmarks/gokubelet/build.sh --install  apt-get install what is missing first (as root), then build
#
# The binary is static (CGO_ENABLED=0): it is copied to machines without Go.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="$here/build"
gopath="$build/gopath"
gocode=/usr/share/gocode/src

# Debian package -> what it provides that the build needs (a command or a source directory).
# golang-github-golang-protobuf-1-5-dev, not -1-3-dev: grpc-go's codec marshals through github.com/golang/protobuf,
# and only 1.4+ understands the APIv2 messages protoc-gen-go generates.
declare -A needs=(
	[golang-go]="cmd:go"
	[protobuf-compiler]="cmd:protoc"
	[protoc-gen-go]="cmd:protoc-gen-go"
	[protoc-gen-go-grpc]="cmd:protoc-gen-go-grpc"
	[golang-google-grpc-dev]="dir:$gocode/google.golang.org/grpc"
	[golang-google-protobuf-dev]="dir:$gocode/google.golang.org/protobuf"
	[golang-github-golang-protobuf-1-5-dev]="file:$gocode/github.com/golang/protobuf/proto/registry.go"
)

missing_packages() {
	local package need
	for package in "${!needs[@]}"; do
		need="${needs[$package]}"
		case "$need" in
		cmd:*) command -v "${need#cmd:}" >/dev/null 2>&1 || echo "$package" ;;
		dir:*) [[ -d "${need#dir:}" ]] || echo "$package" ;;
		file:*) [[ -f "${need#file:}" ]] || echo "$package" ;;
		esac
	done | sort
}

install=0
for arg in "$@"; do
	case "$arg" in
	--install) install=1 ;;
	-h | --help)
		sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "build.sh: unknown argument $arg (only --install)" >&2
		exit 2
		;;
	esac
done

mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
	if ((!install)); then
		echo "gokubelet needs Debian packages: apt-get install -y ${missing[*]}  (or run $0 --install)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q "${missing[@]}"
	mapfile -t missing < <(missing_packages)
	if ((${#missing[@]})); then
		echo "gokubelet: still missing after apt-get install: ${missing[*]}" >&2
		exit 1
	fi
fi

# Generated code goes where its go_package says (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1), so main.go imports
# it under the kubelet's own import path. It is regenerated every build and never committed.
rm -rf "$gopath"
mkdir -p "$gopath/src" "$here/bin"
protoc -I "$repo/proto" \
	--go_out="$gopath/src" --go_opt=paths=import \
	--go-grpc_out="$gopath/src" --go-grpc_opt=paths=import \
	v1beta1/api.proto

export GO111MODULE=off
export GOPATH="$gopath:/usr/share/gocode"
export CGO_ENABLED=0
export GOFLAGS=
# A build cache even where HOME is unset (containers, CI).
if [[ -z "$(go env GOCACHE 2>/dev/null)" || "$(go env GOCACHE 2>/dev/null)" == off ]]; then
	export GOCACHE="$build/cache"
fi

cd "$here"
gofmt_out="$(gofmt -l ./*.go)"
if [[ -n "$gofmt_out" ]]; then
	echo "gokubelet: not gofmt-formatted: $gofmt_out" >&2
	exit 1
fi
go vet .
go build -trimpath -ldflags="-s -w" -o bin/gokubelet .
echo "built $here/bin/gokubelet ($(go version | cut -d' ' -f3), grpc-go $(sed -n 's/^const Version = "\(.*\)"/\1/p' "$gocode/google.golang.org/grpc/version.go"))"
