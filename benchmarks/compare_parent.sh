#!/usr/bin/env bash
# A smoke check for CI: quick Allocate runs of the parent commit and of the checkout, on this machine, compared by
# `python -m benchmarks compare`. It reports; it fails only on a gross regression (the plugin's Allocate p50, over
# the grpclib floor measured beside it, at least twice the parent's, beyond the noise), so that a noisy machine
# cannot make CI flaky. Where there is no parent (a shallow clone) or a run fails, it says so and succeeds.
#
#   benchmarks/compare_parent.sh [BASE]     BASE defaults to HEAD~1
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
base="${1:-HEAD~1}"

if ! git -C "$repo" rev-parse --verify -q "$base^{commit}" >/dev/null; then
	echo "compare_parent: no commit $base here (a shallow clone?): nothing compared" >&2
	exit 0
fi
work="$(mktemp -d /tmp/gpc-XXXXXX)"
cleanup() {
	git -C "$repo" worktree remove --force "$work/base" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT
git -C "$repo" worktree add --detach -q "$work/base" "$base"

# The Python client only (seconds), the floors beside the plugin; each run imports the code of its own folder.
run() {
	(cd "$1" && GPUPLUGIN_GOKUBELET=/nonexistent "$python" -m benchmarks allocate --quick --calls 1000 \
		--no-progress --out "$2" >"$2.log" 2>&1)
}
if ! run "$work/base" "$work/old"; then
	echo "compare_parent: the run of $base failed, nothing compared:" >&2
	tail -5 "$work/old.log" >&2
	exit 0
fi
if ! run "$repo" "$work/new"; then
	echo "compare_parent: the run of the checkout failed, nothing compared:" >&2
	tail -5 "$work/new.log" >&2
	exit 0
fi
echo "compare_parent: $(git -C "$repo" rev-parse --short "$base") (OLD) against the checkout (NEW)"
"$python" -m benchmarks compare "$work/old" "$work/new" --judge p50 --threshold 1.0
