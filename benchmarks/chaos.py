"""Chaos soak: a seeded schedule of node-life faults against ``gpuplugin serve``, with invariants checked throughout.

``serve`` runs as its own process (mock backend, a config file, probes on loopback) beside the kubelet simulator.
Faults, drawn from a seeded schedule: kubelet restarts, our socket deleted, the kubelet directory removed and made
again, XIDs, lost GPUs, unplugged GPUs, recoveries, good and bad config edits, SIGKILL and restart, pods admitted
and removed. After each fault the invariants must hold again within the deadline, and hold at every check:

- registered, with its ListAndWatch stream open, whenever a kubelet is there;
- the listed devices are exactly the backend's devices (replicas of every present GPU), Healthy exactly where the
  GPU has no fault;
- ``/healthz`` answers 200 (no supervised task has given up);
- the plugin's RSS and open file descriptors stay under their bounds.

``python -m benchmarks.chaos --duration-s 1800 --seed 7`` is the long run whose figures the README quotes;
``tests/test_chaos.py`` runs a short one in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.provenance import measured_commit
from gpuplugin.daemon.logs import configure
from gpuplugin.devices.sharing import REPLICA_SEPARATOR
from gpuplugin.testing.simulator import KubeletSimulator

RESOURCE = "nvidia.com/gpu"
ROOT = Path(__file__).resolve().parent.parent

#: Faults and their weights in the schedule: the common ones of a node's life drawn most often.
FAULTS: dict[str, int] = {
    "xid": 6,
    "lose": 3,
    "recover": 6,
    "unplug": 2,
    "plug": 2,
    "kubelet_restart": 4,
    "socket_deleted": 3,
    "directory_removed": 2,
    "config_good": 3,
    "config_bad": 2,
    "sigkill": 2,
    "surge": 1,
    "pod": 6,
}
#: Bad config edits: each must be refused with the old config serving on (the watcher alive for the next edit).
BAD_CONFIGS = (
    "version: v1\nbackend: [not, a, mapping]\n",
    "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 100000000}]}}\n",
    "version: v1\nplugin: {logLevel: loud}\n",
    "version: v1\n: : :\n",
)


@dataclass(frozen=True, slots=True)
class ChaosSettings:
    """One chaos run."""

    duration_s: float = 60.0
    """Seconds of faults; the run ends after the first fault past it has settled."""
    seed: int = 1
    """Seeds the schedule: the same seed draws the same faults in the same order."""
    gpus: int = 4
    """Mock GPUs served; 1 to 16."""
    pause_s: float = 0.2
    """Seconds between one fault settling and the next; the invariants are checked during the pause too."""
    deadline_s: float = 2.0
    """Seconds within which the invariants must hold again after a fault (the issue's 'registered within 2 s')."""
    hang_s: float = 30.0
    """Seconds after which a fault that has not settled ends the run as failed."""
    rss_limit_mib: float = 200.0
    """The plugin's resident memory must stay under this, in MiB."""
    fd_limit: int = 256
    """The plugin's open file descriptors must stay under this."""


@dataclass
class Figures:
    """What a run measured."""

    seed: int
    duration_s: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    settle_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Per fault kind: seconds from the fault to the invariants holding again."""
    late: list[str] = field(default_factory=list)
    """Faults that settled, but after the deadline."""
    violations: list[str] = field(default_factory=list)
    """Invariants found broken while the plugin should have been settled; a correct plugin has none."""
    max_rss_mib: float = 0.0
    max_fds: int = 0
    plugin_starts: int = 0
    pods_admitted: int = 0
    pods_refused: int = 0

    def summary(self) -> dict[str, Any]:
        settle = {
            kind: {
                "count": len(values),
                "p50_ms": round(statistics.median(values) * 1000, 1),
                "max_ms": round(max(values) * 1000, 1),
            }
            for kind, values in sorted(self.settle_s.items())
        }
        return {
            "seed": self.seed,
            "duration_s": round(self.duration_s, 1),
            "faults": sum(self.faults.values()),
            "by_kind": dict(sorted(self.faults.items())),
            "settle": settle,
            "late": self.late,
            "violations": self.violations,
            "max_rss_mib": round(self.max_rss_mib, 1),
            "max_fds": self.max_fds,
            "plugin_starts": self.plugin_starts,
            "pods_admitted": self.pods_admitted,
            "pods_refused": self.pods_refused,
        }


class ChaosFailure(AssertionError):
    """A fault did not settle within the hang guard: the plugin did not heal."""


@dataclass
class Model:
    """What the plugin should serve: the config's replicas, and each GPU's presence and fault."""

    gpus: int
    replicas: int = 1
    faulted: set[int] = field(default_factory=set)
    unplugged: set[int] = field(default_factory=set)
    uuids: dict[int, str] = field(default_factory=dict)

    def expected(self) -> dict[str, bool]:
        """Device ID to whether it should be Healthy."""
        out: dict[str, bool] = {}
        for index, uuid in self.uuids.items():
            if index in self.unplugged:
                continue
            ids = [uuid] if self.replicas == 1 else [f"{uuid}{REPLICA_SEPARATOR}{n}" for n in range(self.replicas)]
            for device_id in ids:
                out[device_id] = index not in self.faulted
        return out

    def reset(self) -> None:
        """A new plugin process: the mock's faults and unplugs lived in the old one."""
        self.faulted.clear()
        self.unplugged.clear()


def config_text(model: Model) -> str:
    sharing = ""
    if model.replicas > 1:
        sharing = f"sharing: {{timeSlicing: {{resources: [{{name: {RESOURCE}, replicas: {model.replicas}}}]}}}}\n"
    return (
        "version: v1\n"
        f"backend: {{name: mock, mock: {{gpus: {model.gpus}}}}}\n"
        # Only fatal XIDs are injected; a recoverable one would heal on a timer the model does not follow.
        "health: {recoveryQuietPeriodSeconds: 3600}\n" + sharing
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def http_status(port: int, path: str) -> int:
    """The status code of a GET on loopback; 0 when nothing answers."""
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return 0
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


class Plugin:
    """``gpuplugin serve`` as a process of its own; its log appended to one file across restarts."""

    def __init__(self, work: Path, kubelet_dir: Path, state_dir: Path, config: Path, python: str) -> None:
        self.work = work
        self.kubelet_dir = kubelet_dir
        self.state_dir = state_dir
        self.config = config
        self.python = python
        self.log_path = work / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, port: int, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPLUGIN_", "DP_", "NODE_NAME"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(self.python, "-m", "gpuplugin", "serve", "--log-format", "json"),
                    *("--kubelet-dir", str(self.kubelet_dir), "--state-dir", str(self.state_dir)),
                    *("--config", str(self.config), "--metrics-address", f"127.0.0.1:{port}", *extra),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd=self.work,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            await asyncio.to_thread(self.process.wait, 10)

    async def stop(self) -> int | None:
        """SIGTERM, as the kubelet stops a pod; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait, 10)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Chaos:
    """One run: the kubelet simulator, the plugin process, the model and the schedule."""

    def __init__(self, settings: ChaosSettings, work: Path, python: str = sys.executable) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.work = work
        self.kubelet_dir = work / "kubelet"
        self.state_dir = work / "state"
        self.config = work / "config" / "config.yaml"
        self.port = free_port()
        self.model = Model(gpus=settings.gpus)
        self.figures = Figures(seed=settings.seed)
        self.kubelet: KubeletSimulator | None = None
        self.python = python
        self.plugin = self.new_plugin()
        self._pods = 0
        self.last_fault = "start"

    def registrations(self) -> int:
        return 0 if self.kubelet is None else len(self.kubelet.registrations)

    # The invariants.

    def problems(self) -> list[str]:
        """What is wrong now; empty when every invariant holds."""
        out: list[str] = []
        if not self.plugin.alive():
            return [f"serve exited {self.plugin.process.returncode if self.plugin.process else None}"]
        kubelet = self.kubelet
        if kubelet is not None:
            if not kubelet.stream_open(RESOURCE):
                out.append("not registered with a ListAndWatch stream open")
            listed = {i: s.healthy for i, s in kubelet.device_states(RESOURCE).items()}
            expected = self.model.expected()
            if listed != expected:
                missing = sorted(set(expected) - set(listed))[:3]
                extra = sorted(set(listed) - set(expected))[:3]
                wrong = sorted(i for i in set(listed) & set(expected) if listed[i] != expected[i])[:3]
                out.append(f"devices differ: missing {missing}, extra {extra}, wrong health {wrong}")
        rss = process_rss_mib(self.plugin.pid)
        fds = process_fds(self.plugin.pid)
        self.figures.max_rss_mib = max(self.figures.max_rss_mib, rss)
        self.figures.max_fds = max(self.figures.max_fds, fds)
        if rss > self.settings.rss_limit_mib:
            out.append(f"RSS {rss:.0f} MiB over {self.settings.rss_limit_mib:g}")
        if fds > self.settings.fd_limit:
            out.append(f"{fds} file descriptors, over {self.settings.fd_limit}")
        return out

    async def settled(self, kind: str, started: float, registrations: int | None) -> None:
        """Wait until the invariants hold, /healthz included, and (where ``registrations`` is given) the plugin has
        registered again since; record how long it took from ``started``, when the fault was injected."""
        last: list[str] = []
        while True:
            last = self.problems()
            if not last and registrations is not None and self.registrations() <= registrations:
                last = ["not registered again yet"]
            if not last:
                status = await http_status(self.port, "/healthz")
                if status == 200:
                    break
                last = [f"/healthz answered {status}"]
            elapsed = time.monotonic() - started
            if elapsed > self.settings.hang_s:
                raise ChaosFailure(
                    f"{kind}: not settled after {self.settings.hang_s:g} s: {'; '.join(last)}\n"
                    f"serve's last log lines:\n{self.plugin.log_tail()}"
                )
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        self.figures.settle_s[kind].append(took)
        if took > self.settings.deadline_s:
            self.figures.late.append(f"{kind}: {took:.2f} s")

    async def steady(self, seconds: float) -> None:
        """The invariants keep holding while nothing is injected."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            problems = self.problems()
            if problems:
                self.figures.violations.append(f"after {self.last_fault}: {'; '.join(problems)}")
                return
            await asyncio.sleep(0.05)

    # Faults.

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        from gpuplugin.backends.mock.control import control

        return await control(self.state_dir / "mock.sock", request)

    def new_plugin(self) -> Plugin:
        return Plugin(self.work, self.kubelet_dir, self.state_dir, self.config, self.python)

    async def start_plugin(self, *extra: str) -> None:
        self.model.reset()
        write_atomically(self.config, config_text(self.model))
        # A fresh port each start: a second instance starts its probes while the first still serves its own.
        self.port = free_port()
        self.plugin.start(self.port, *extra)
        self.figures.plugin_starts += 1
        await self.wait_serving()

    async def wait_serving(self) -> None:
        """Until the plugin's mock backend answers on its control socket; learns the GPUs' UUIDs."""
        async with asyncio.timeout(self.settings.hang_s):
            while True:
                with contextlib.suppress(ConnectionError):
                    answer = await self.control({"op": "status"})
                    if answer.get("ok"):
                        break
                if not self.plugin.alive():
                    raise ChaosFailure(f"serve exited at start:\n{self.plugin.log_tail()}")
                await asyncio.sleep(0.05)
        self.model.uuids = {gpu["index"]: gpu["uuid"] for gpu in answer["gpus"]}

    async def start_kubelet(self) -> None:
        self.kubelet = KubeletSimulator(self.kubelet_dir)
        await self.kubelet.start()

    async def inject(self, kind: str) -> None:
        model, rng = self.model, self.rng
        present = [i for i in range(model.gpus) if i not in model.unplugged]
        healthy = [i for i in present if i not in model.faulted]
        started = time.monotonic()
        # A fault that makes the plugin register again settles only once it has: until then the old stream can
        # still show the right devices.
        registrations = self.registrations() if kind in ("socket_deleted", "sigkill", "surge") else None
        match kind:
            case "xid" if healthy:
                gpu = rng.choice(healthy)
                await self.expect_ok({"op": "xid", "gpu": gpu, "xid": 79})
                model.faulted.add(gpu)
            case "lose" if healthy:
                gpu = rng.choice(healthy)
                await self.expect_ok({"op": "lose", "gpu": gpu})
                model.faulted.add(gpu)
            case "recover" if model.faulted & set(present):
                gpu = rng.choice(sorted(model.faulted & set(present)))
                await self.expect_ok({"op": "recover", "gpu": gpu})
                model.faulted.discard(gpu)
            case "unplug" if len(healthy) > 1:
                gpu = rng.choice(healthy)
                await self.expect_ok({"op": "unplug", "gpu": gpu})
                model.unplugged.add(gpu)
            case "plug" if model.unplugged:
                gpu = rng.choice(sorted(model.unplugged))
                await self.expect_ok({"op": "plug", "gpu": gpu})
                model.unplugged.discard(gpu)
            case "kubelet_restart" if self.kubelet is not None:
                await self.kubelet.restart()
            case "socket_deleted":
                for path in self.kubelet_dir.glob("gpuplugin-*.sock"):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            case "directory_removed" if self.kubelet is not None:
                await self.kubelet.aclose()
                await asyncio.to_thread(shutil.rmtree, self.kubelet_dir, True)
                await asyncio.sleep(rng.uniform(0, 0.5))
                await self.start_kubelet()
            case "config_good":
                model.replicas = rng.choice([r for r in (1, 2, 3, 4) if r != model.replicas])
                write_atomically(self.config, config_text(model))
            case "config_bad":
                write_atomically(self.config, rng.choice(BAD_CONFIGS))
                # Refused: the model stays; the good text goes back so that a later SIGKILL restarts on it. The
                # watcher reads the good text as new again and applies it (nothing changes).
                await asyncio.sleep(0.3)
                write_atomically(self.config, config_text(model))
            case "sigkill":
                await self.plugin.kill()
                await self.start_plugin()
            case "surge":
                await self.surge()
            case "pod" if self.kubelet is not None:
                await self.admit_pod()
            case _:
                return
        self.figures.faults[kind] += 1
        self.last_fault = kind
        await self.settled(kind, started, registrations)

    async def surge(self) -> None:
        """A rolling update with maxSurge: a second instance starts beside the first, waits for its lock, and takes
        over once the first is stopped; the first exits 0 and the second never touches its sockets meanwhile."""
        old, new, new_port = self.plugin, self.new_plugin(), free_port()
        new.start(new_port, "--instance-wait", str(self.settings.hang_s))
        self.figures.plugin_starts += 1
        # While it waits, the first keeps serving undisturbed.
        await self.steady(0.5)
        if not new.alive():
            raise ChaosFailure(f"surge: the second instance exited while waiting for the lock:\n{new.log_tail()}")
        code = await old.stop()
        if code != 0:
            self.figures.violations.append(f"surge: the first instance exited {code} on SIGTERM")
        self.plugin, self.port = new, new_port
        self.model.reset()
        await self.wait_serving()

    async def expect_ok(self, request: dict[str, Any]) -> None:
        answer = await self.control(request)
        if not answer.get("ok"):
            raise ChaosFailure(f"mock refused {request}: {answer.get('error')}")

    async def admit_pod(self) -> None:
        from gpuplugin.testing.admission import AdmissionError

        assert self.kubelet is not None
        self._pods += 1
        name = f"pod-{self._pods}"
        try:
            await self.kubelet.admit(name, [{RESOURCE: self.rng.choice((1, 2))}])
            self.figures.pods_admitted += 1
        except AdmissionError as exc:
            # Not enough healthy free devices: the kubelet fails the pod, as it should. Anything else is a finding.
            self.figures.pods_refused += 1
            if "Available" not in str(exc) and "available" not in str(exc):
                self.figures.violations.append(f"pod refused for another reason than capacity: {exc}")
        for pod in self.kubelet.pods()[:-2]:
            await self.kubelet.remove_pod(pod)

    async def run(self) -> Figures:
        for directory in (self.kubelet_dir, self.state_dir, self.config.parent):
            directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            await self.start_kubelet()
            await self.start_plugin()
            await self.settled("start", started, None)
            kinds, weights = list(FAULTS), list(FAULTS.values())
            while time.monotonic() - started < self.settings.duration_s:
                await self.inject(self.rng.choices(kinds, weights)[0])
                await self.steady(self.settings.pause_s)
        finally:
            self.figures.duration_s = time.monotonic() - started
            await self.plugin.stop()
            if self.kubelet is not None:
                await self.kubelet.aclose()
        return self.figures


@contextlib.asynccontextmanager
async def workspace() -> AsyncIterator[Path]:
    """A short directory under /tmp (unix socket paths have a 108-byte limit), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


async def run_chaos(settings: ChaosSettings, on_work: Callable[[Path], None] | None = None) -> Figures:
    async with workspace() as work:
        if on_work is not None:
            on_work(work)
        return await Chaos(settings, work).run()


def main(argv: list[str] | None = None) -> int:
    defaults = ChaosSettings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the schedule")
    parser.add_argument("--gpus", type=int, default=defaults.gpus, choices=range(1, 17), metavar="1-16")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.duration_s <= 0:
        parser.error("--duration-s: must be > 0")
    settings = ChaosSettings(duration_s=args.duration_s, seed=args.seed, gpus=args.gpus)
    # The kubelet simulator's own log to stderr, warnings only: stdout carries the figures.
    configure("console", "warning")
    try:
        figures = asyncio.run(run_chaos(settings))
    except ChaosFailure as exc:
        print(f"chaos: FAILED: {exc}", file=sys.stderr)
        return 1
    summary = {"commit": measured_commit(), **figures.summary()}
    print(json.dumps(summary, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if figures.violations else 0


if __name__ == "__main__":
    sys.exit(main())
