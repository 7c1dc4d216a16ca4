#!/usr/bin/env bash
# The side-by-side run behind the README's figure for wire.py: Allocate through the Go client, interleaved, with the
# tree of commit 223b5f9 as it is (A: requests decoded by wire.py) and with benchmarks/wire_ab.patch applied to it
# (B: requests decoded by betterproto2's generated messages). Each run writes OUT/a<N> or OUT/b<N>;
# `python -m benchmarks compare OUT/a<N> OUT/b<N>` compares a pair.
#   benchmarks/wire_ab.sh OUT [ROUNDS]      (needs the Go client: make gokubelet)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:?usage: benchmarks/wire_ab.sh OUT [ROUNDS]}")
rounds=${2:-10}
python=${PYTHON:-$root/.venv/bin/python}
export GPUPLUGIN_GOKUBELET=${GPUPLUGIN_GOKUBELET:-$root/benchmarks/gokubelet/bin/gokubelet}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for variant in a b; do
    mkdir -p "$work/$variant"
    git -C "$root" archive 223b5f9 | tar -x -C "$work/$variant"
done
patch --quiet -d "$work/b" -p1 < "$root/benchmarks/wire_ab.patch"
mkdir -p "$out"
for round in $(seq "$rounds"); do
    for variant in a b; do
        (cd "$work/$variant" && "$python" -m benchmarks whole-8 --seed 1 --calls 20000 --duration 0 --count 0 \
            --preferred-calls 0 --no-baselines --no-progress --allow-dirty --out "$out/$variant$round")
    done
done
