#!/usr/bin/env bash
# Builds NVIDIA's device plugin (cmd/nvidia-device-plugin of github.com/NVIDIA/k8s-device-plugin) at a pinned release
# from Go modules, into benchmarks/nvidia/bin/, so that the nvml scenario measures it in the same run as ours.
#
#   benchmarks/nvidia/build.sh      build, or say it is built already (bin/VERSION names the release)
#
# NVIDIA_DEVICE_PLUGIN_VERSION picks another release. The default is v0.19.1: v0.20.0, the release NVIDIA's figures
# were published for, is not served by the Go module proxy this project builds from (it answers 403, "not
# available"), and v0.19.1 is the newest one it serves. The binary uses cgo (go-nvml opens libnvidia-ml at run
# time) and is linked against the build machine's glibc: build on a machine with a glibc no newer than the GPU
# node's. It runs there without Go; name it with GPUPLUGIN_NVIDIA_PLUGIN.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="${NVIDIA_DEVICE_PLUGIN_VERSION:-v0.19.1}"
module=github.com/NVIDIA/k8s-device-plugin
bin="$here/bin"

case "${1:-}" in
-h | --help)
	sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
"") ;;
*)
	echo "build.sh: unknown argument $1" >&2
	exit 2
	;;
esac

if [[ -x "$bin/nvidia-device-plugin" && "$(cat "$bin/VERSION" 2>/dev/null)" == "$version" ]]; then
	echo "built already: $bin/nvidia-device-plugin ($version)"
	exit 0
fi
if ! command -v go >/dev/null 2>&1; then
	echo "NVIDIA's plugin needs Go (1.25 or later, with the module proxy reachable) to build" >&2
	exit 1
fi

# A module of our own that requires the release: `go build` of a package of another module at a version.
work="$here/build"
rm -rf "$work"
mkdir -p "$work" "$bin"
cd "$work"
cat >go.mod <<MOD
module gpuplugin.local/nvidia-build

go 1.25
MOD
go get "$module/cmd/nvidia-device-plugin@$version"
# The flags of NVIDIA's Makefile: the version stamped, NVML's symbols resolved when the library is opened.
go build -trimpath \
	-ldflags "-s -w '-extldflags=-Wl,--export-dynamic -Wl,--unresolved-symbols=ignore-in-object-files' -X $module/internal/info.version=$version" \
	-o "$bin/nvidia-device-plugin" "$module/cmd/nvidia-device-plugin"
echo "$version" >"$bin/VERSION"
echo "built $bin/nvidia-device-plugin ($version, $(go version | cut -d' ' -f3))"
