"""System calls of the serve process per Allocate: ``strace -c`` attached to the plugin while a scenario runs.

Run ``python -m benchmarks.syscalls --out DIR`` (Linux, strace installed, ptrace allowed). It runs ``python -m
benchmarks allocate --calls N --no-baselines`` into DIR/bench, attaches ``strace -c -f`` to the plugin's ``serve``
process once it is up, and writes DIR/syscalls.json and DIR/syscalls.md: each system call's count, and per
Allocate over every Allocate the plugin answered (recorded calls and warm-up calls, Python and Go clients alike).
Registration, ListAndWatch and start-up add a few hundred calls in all: they are counted too, so a per-Allocate
figure is an upper bound that tightens as N grows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import click

#: The calls that move bytes on the plugin's sockets and wait for them, in the order the report lists them.
SOCKET_CALLS = ("write", "sendto", "sendmsg", "writev", "read", "recvfrom", "recvmsg", "epoll_wait", "epoll_pwait")


def serve_child(parent: int) -> int | None:
    """The pid of ``parent``'s child running ``gpuplugin serve``, if it has one now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The parent pid is the 4th field after the command name, which is in parentheses and may hold spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"gpuplugin" in argv and b"serve" in argv:
            return int(entry.name)
    return None


def parse_summary(text: str) -> dict[str, int]:
    """Each system call's count from ``strace -c``'s table."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # Rows: % time, seconds, usecs/call, calls, [errors], syscall; the total row's name is "total".
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def answered_allocates(results: Mapping[str, object], calls: int) -> int:
    """Allocate calls the plugin answered in the run: each of its Allocate measures, plus their warm-up calls."""
    latency = results["latency"]
    assert isinstance(latency, dict)
    measures = [m for name, m in latency.items() if name.startswith("Allocate") and not name.startswith("floor")]
    # As the runner warms up each target: a tenth of the calls, at most 200.
    return sum(int(m["count"]) + min(200, calls // 10) for m in measures)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--calls", type=click.IntRange(100, 10_000_000), default=4000, show_default=True)
@click.option("--callers", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Results folder.")
@click.option("--allow-dirty", is_flag=True, help="Passed on to the benchmark run.")
def main(calls: int, callers: int, out: Path, allow_dirty: bool) -> None:
    """Count the serve process's system calls during ``allocate`` and divide by the Allocate calls it answered."""
    strace = shutil.which("strace")
    if strace is None:
        raise click.ClickException("strace is not installed")
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "benchmarks", "allocate", "--calls", str(calls), "--callers", str(callers)]
    argv += [
        "--no-baselines",
        "--no-progress",
        "--out",
        str(out / "bench"),
        *(["--allow-dirty"] if allow_dirty else []),
    ]
    with (out / "bench.log").open("wb") as log:
        bench = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while (pid := serve_child(bench.pid)) is None and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if pid is None:
            bench.kill()
            bench.wait()
            raise click.ClickException(f"no serve process appeared; see {out / 'bench.log'}")
        summary = out / "strace.txt"
        tracer = subprocess.Popen([strace, "-c", "-f", "-o", str(summary), "-p", str(pid)], stderr=subprocess.DEVNULL)
        code = bench.wait()
        # strace ends with the process it traces and writes its table then.
        tracer.wait(timeout=60)
    if code != 0:
        raise click.ClickException(f"the benchmark exited {code}; see {out / 'bench.log'}")
    counts = parse_summary(summary.read_text())
    allocates = answered_allocates(json.loads((out / "bench" / "results.json").read_text()), calls)
    per_allocate = {name: counts[name] / allocates for name in SOCKET_CALLS if name in counts}
    report = {
        "allocates": allocates,
        "callers": callers,
        "counts": counts,
        "per_allocate": per_allocate,
        "pid": pid,
        "python": sys.version.split()[0],
        "tree": os.getcwd(),
    }
    (out / "syscalls.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"| {name} | {counts[name]:,} | {counts[name] / allocates:.2f} |" for name in per_allocate]
    table = "\n".join(["| system call | count | per Allocate |", "|---|---:|---:|", *rows])
    (out / "syscalls.md").write_text(f"{allocates:,} Allocate calls answered, {callers} caller(s).\n\n{table}\n")
    click.echo(table)


if __name__ == "__main__":
    main(prog_name="python -m benchmarks.syscalls")
