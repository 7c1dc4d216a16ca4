#!/usr/bin/env bash
# Installs what `make e2e` needs from Debian's packages, where missing: containerd and runc (the container
# runtime), CNI plugins (pod networking on a bridge), debootstrap (the image's root filesystem), busybox-static (the
# test pods' image), gcc (a static pause binary), openssl (the cluster's certificates), iptables. Go must be
# installed (the Kubernetes binaries are built from Go modules).
set -euo pipefail
# The machine's Go (1.24 or later is needed), ahead of an older one that Debian's packages may have put on PATH.
[[ -x /usr/local/go/bin/go ]] && PATH="/usr/local/go/bin:$PATH"
packages=(containerd runc containernetworking-plugins debootstrap busybox-static gcc libc6-dev openssl iptables)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "go is not installed: the Kubernetes binaries are built from Go modules" >&2; exit 1; }
