"""MPS on a real GPU: the plugin serves MPS partitions and replicas to the kubelet simulator, and CUDA processes
started with exactly the environment Allocate returned are held to their limits.

(a) whole GPUs (the nvml backend): Allocate and admission latency, the baseline; (b) 7 x 1g.18gb MPS partitions:
the control daemon's start, the daemon killed (partitions Unhealthy to the kubelet) and restarted (Healthy again),
Allocate and admission latency, then 7 pods admitted and 7 CUDA clients at once, each filling its GPU in 1 GiB
steps until refused; (c) 3g.71gb + 4g.71gb, two clients at once; (d) ``sharing.mps`` with 4 replicas, two clients.
Each client runs bf16 matmuls for 2 s (its compute share), asks for its limit plus 1 GiB in one allocation
(refused under MPS), fills to its limit in 1 GiB steps, then waits for every client of its wave to hold its memory
at the same time. The same client alone without MPS gives the whole GPU's figures.

Nothing changes GPU settings: MPS needs no compute-mode change, and every daemon is quit at the end.

Run ``python -m benchmarks.mps_proof [--out DIR] [--calls N]``; ``--fake`` runs the plumbing against the fake NVML
and a stand-in control program, without clients (no GPU needed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import structlog

from benchmarks.provenance import measured_commit
from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.backends.partitioned import PartitionedBackend, PartitionedSettings
from gpuplugin.core.backend import Backend
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.devices.mps import MEMORY_LIMIT, PIPE_DIRECTORY, ControlDaemons, MpsBackend, MpsSharing
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.kubelet.watcher import WatcherSettings
from gpuplugin.testing.simulator import KubeletSimulator

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "h200-x1" / "mps"
GPU = "nvidia.com/gpu"
SMALL = "nvidia.com/mig-1g.18gb"
LARGE = "nvidia.com/mig-3g.71gb"
HALF = "nvidia.com/mig-4g.71gb"
SHARED = "nvidia.com/gpu.shared"
#: Seconds between the daemons' liveness queries here: how soon a killed daemon is noticed.
PROBE_INTERVAL_S = 0.5
WAIT_S = 30.0

#: A CUDA client: one allocation of its limit + 1 GiB (must fail), then 1 GiB steps until refused, then it holds
#: its memory until every client of its wave does (a file each in the barrier directory).
CLIENT = r"""
import json, os, sys, time
limit_mib, barrier, wave = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = {"limit_mib": limit_mib}
try:
    import torch
    props = torch.cuda.get_device_properties(0)
    out["sm_count"] = props.multi_processor_count
    # Compute share: bf16 matmuls for about 2 s, before the memory is filled (they need 384 MiB).
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    a @ b
    torch.cuda.synchronize()
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 2.0:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        n += 10
    out["matmul_tflops"] = round(2 * 8192**3 * n / (time.perf_counter() - started) / 1e12, 1)
    del a, b
    torch.cuda.empty_cache()
    if wave == 0:
        print(json.dumps(out))
        sys.exit(0)
    try:
        big = torch.empty((limit_mib + 1024) << 20, dtype=torch.uint8, device="cuda")
        out["beyond_refused"] = False
        del big
    except torch.OutOfMemoryError as error:
        out["beyond_refused"] = True
        out["beyond_error"] = str(error).splitlines()[0][:160]
    torch.cuda.empty_cache()
    chunks = []
    while len(chunks) < 1024:
        try:
            chunks.append(torch.ones(1 << 30, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            break
    torch.cuda.synchronize()
    out["filled_mib"] = len(chunks) * 1024
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 90
    while len(os.listdir(barrier)) < wave and time.monotonic() < deadline:
        time.sleep(0.05)
    out["clients_holding_at_once"] = len(os.listdir(barrier))
    out["still_held_mib"] = sum(c.numel() for c in chunks) >> 20
except Exception as error:
    out["error"] = repr(error)[:300]
print(json.dumps(out))
"""


@dataclass
class Plugin:
    kubelet: KubeletSimulator
    manager: Manager
    backend: Backend


@asynccontextmanager
async def serving(backend: Backend, directory: Path, resources: tuple[str, ...]) -> AsyncIterator[Plugin]:
    """The plugin's manager over ``backend``, registered with the kubelet simulator, every resource allocatable."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    settings = ManagerSettings(
        server=ServerSettings(kubelet_dir=directory), watcher=WatcherSettings(poll_interval_s=0.05)
    )
    async with KubeletSimulator(directory) as kubelet:
        manager = Manager(backend, settings)
        await manager.start()
        try:
            for resource in resources:
                await kubelet.wait_registered(resource, timeout=WAIT_S)
            await kubelet.wait_for(lambda: all(kubelet.allocatable(r) > 0 for r in resources), timeout=WAIT_S)
            yield Plugin(kubelet, manager, backend)
        finally:
            await manager.aclose()


def nvml_backend(fake: bool, *, report_mig: bool) -> NvmlBackend:
    settings = NvmlSettings(report_mig_devices=report_mig)
    if not fake:
        return NvmlBackend(settings, HealthPolicy())
    from gpuplugin.backends.nvml.fake import h200_node

    return NvmlBackend(settings, HealthPolicy(), h200_node(1))


def daemon_options(root: Path, fake: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"root": str(root), "probe_interval_s": PROBE_INTERVAL_S}
    if fake:
        options["command"] = [sys.executable, str(Path(__file__).resolve().parents[1] / "tests/fake_mps_control.py")]
    return options


def partitioned(layout: Any, root: Path, fake: bool) -> PartitionedBackend:
    settings = PartitionedSettings.from_options({"parent": "nvml", "layout": layout, "mps": daemon_options(root, fake)})
    return PartitionedBackend(settings, nvml_backend(fake, report_mig=True))


def summary(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "max_ms": round(ms[-1], 3),
    }


async def latencies(plugin: Plugin, resource: str, calls: int) -> dict[str, Any]:
    """Admit and remove a one-device pod ``calls`` times: Allocate as the plugin answered it, and the admission."""
    allocate: list[float] = []
    admission: list[float] = []
    for n in range(calls):
        pod = f"latency-{n}"
        started = time.perf_counter()
        admitted = await plugin.kubelet.admit(pod, [{resource: 1}])
        admission.append(time.perf_counter() - started)
        allocate.append(admitted.containers[0].allocations[resource].allocate_s)
        await plugin.kubelet.remove_pod(pod)
    return {"resource": resource, "allocate": summary(allocate), "admission": summary(admission)}


def daemon_pid(pipe_dir: str) -> int | None:
    """The control daemon started with ``-d`` on ``pipe_dir`` (the stand-in's PID file where there is one)."""
    pid_file = Path(pipe_dir) / "nvidia-cuda-mps-control.pid"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdecimal():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-d" in argv and f"{PIPE_DIRECTORY}={pipe_dir}".encode() in environ:
            return int(proc.name)
    if pid_file.exists():
        return int(pid_file.read_text())
    return None


async def kill_daemon(plugin: Plugin, daemons: ControlDaemons, resource: str) -> dict[str, Any]:
    """SIGKILL the GPU's control daemon: how long until the kubelet sees the partitions Unhealthy, and Healthy."""
    kubelet = plugin.kubelet
    total = kubelet.allocatable(resource)
    (uuid,) = daemons.daemons
    pid = await asyncio.to_thread(daemon_pid, str(daemons.settings.pipe_dir(uuid)))
    if pid is None:
        return {"error": "control daemon not found"}
    started = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    await kubelet.wait_for(lambda: kubelet.allocatable(resource) == 0, timeout=WAIT_S)
    unhealthy_s = time.perf_counter() - started
    states = set(kubelet.devices(resource).values())
    await kubelet.wait_for(lambda: kubelet.allocatable(resource) == total, timeout=WAIT_S)
    healthy_s = time.perf_counter() - started
    state = daemons.states()[uuid]
    return {
        "killed_pid": pid,
        "to_unhealthy_s": round(unhealthy_s, 3),
        "states_seen_while_down": sorted(states),
        "to_healthy_again_s": round(healthy_s, 3),
        "restart_to_answer_s": None if state.last_start_s is None else round(state.last_start_s, 3),
        "daemon_starts": state.starts,
    }


async def whole_gpu_client(fake: bool) -> dict[str, Any]:
    """The same client without MPS, alone on the GPU: the SMs and matmul rate that the shares are a part of."""
    if fake:
        return {"skipped": "no GPU (--fake)"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, "0", "-", "0", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 240)
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def mps_processes() -> list[str]:
    """Every MPS control daemon and server on the machine (by process name), with its state (Z: a zombie)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            name = (proc / "comm").read_text().strip() if proc.name.isdecimal() else ""
        except OSError:
            continue
        if name.startswith("nvidia-cuda-mps"):
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "?"
            found.append(f"{proc.name} {name} {state}")
    return found


async def run_clients(allocations: list[Mapping[str, Any]], fake: bool) -> list[dict[str, Any]]:
    """One CUDA client per allocation, all at once, each with the base environment plus exactly Allocate's."""
    if fake:
        return [{"skipped": "no GPU (--fake)"} for _ in allocations]
    barrier = Path(tempfile.mkdtemp(prefix="mps-wave-"))
    try:
        processes = []
        for allocation in allocations:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_MPS_", "CUDA_VISIBLE_DEVICES"))}
            env.update(allocation["envs"])
            limit = int(allocation["envs"][MEMORY_LIMIT].split("=")[1].rstrip("M"))
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    CLIENT,
                    str(limit),
                    str(barrier),
                    str(len(allocations)),
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        results = []
        for allocation, process in zip(allocations, processes, strict=True):
            out, err = await asyncio.wait_for(process.communicate(), 240)
            try:
                result = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                result = {"error": f"exit {process.returncode}: {err.decode()[-400:]}"}
            result["device"] = allocation["device"]
            result["within_limit"] = result.get("filled_mib", 0) <= result.get("limit_mib", 0)
            result["near_limit"] = result.get("filled_mib", 0) >= result.get("limit_mib", 0) - 2048
            results.append(result)
        return results
    finally:
        shutil.rmtree(barrier, ignore_errors=True)


async def admit_all(plugin: Plugin, resources: list[str]) -> list[dict[str, Any]]:
    """Admit one pod per entry (one device each), keeping Allocate's env and mounts."""
    allocations = []
    for n, resource in enumerate(resources):
        admitted = await plugin.kubelet.admit(f"client-{n}", [{resource: 1}])
        allocation = admitted.containers[0].allocations[resource]
        response = allocation.response
        mounts = [(m.host_path, m.container_path, m.read_only) for m in response.mounts]
        for host, container, _ in mounts:
            # No container runtime here: the mount is the identity, and its source must exist.
            assert host == container, mounts
            assert await asyncio.to_thread(Path(host).is_dir), mounts
        allocations.append(
            {"device": allocation.device_ids[0], "resource": resource, "envs": dict(response.envs), "mounts": mounts}
        )
    return allocations


def control_without_daemon(directory: Path, fake: bool) -> dict[str, Any]:
    """What the control program answers where no daemon runs (how a dead daemon looks to the probe)."""
    command = daemon_options(directory, fake).get("command", ["nvidia-cuda-mps-control"])
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, PIPE_DIRECTORY: str(directory), "CUDA_MPS_LOG_DIRECTORY": str(directory)}
    try:
        done = subprocess.run(command, input="get_server_list\n", capture_output=True, text=True, env=env, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": repr(error)}
    return {"returncode": done.returncode, "output": (done.stdout + done.stderr).strip()[:300]}


def daemons_left(work: Path) -> list[str]:
    return sorted(str(p) for p in work.glob("*/GPU-*/pipe") if daemon_pid(str(p)) is not None)


async def stage(report: dict[str, Any], name: str, step: Any) -> None:
    """Run one step; a failure is recorded under its name and the next steps still run."""
    try:
        report[name] = await step
    except Exception as error:
        report[name] = {"error": f"{type(error).__name__}: {error}"[:500]}


async def prove(calls: int, fake: bool) -> dict[str, Any]:
    # Short: the control socket's path, <root>/<gpu uuid>/pipe/control, must stay under 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="mps-"))
    report: dict[str, Any] = {"fake": fake, "calls": calls}
    report["control_without_daemon"] = await asyncio.to_thread(control_without_daemon, work / "none", fake)
    report["mps_processes_before"] = await asyncio.to_thread(mps_processes)
    await stage(report, "whole_gpu_client", whole_gpu_client(fake))
    try:
        async with serving(nvml_backend(fake, report_mig=False), work / "whole", (GPU,)) as plugin:
            await stage(report, "whole_gpu", latencies(plugin, GPU, calls))

        backend = partitioned("all-1g.18gb", work / "s", fake)
        started = time.perf_counter()
        async with serving(backend, work / "small", (SMALL,)) as plugin:
            report["small_start_to_served_s"] = round(time.perf_counter() - started, 3)
            report["daemon_start_s"] = [round(s.last_start_s or -1, 3) for s in backend.daemons.states().values()]
            await stage(report, "small_kill", kill_daemon(plugin, backend.daemons, SMALL))
            await stage(report, "small_latency", latencies(plugin, SMALL, calls))
            await stage(report, "small_allocations", admit_all(plugin, [SMALL] * 7))
            if isinstance(report["small_allocations"], list):
                await stage(report, "small_clients", run_clients(report["small_allocations"], fake))

        backend = partitioned(["3g.71gb", "4g.71gb"], work / "h", fake)
        async with serving(backend, work / "halves", (LARGE, HALF)) as plugin:
            states = backend.daemons.states().values()
            report["halves_daemon_start_s"] = [round(s.last_start_s or -1, 3) for s in states]
            await stage(report, "halves_latency", latencies(plugin, LARGE, calls))
            await stage(report, "halves_allocations", admit_all(plugin, [LARGE, HALF]))
            if isinstance(report["halves_allocations"], list):
                await stage(report, "halves_clients", run_clients(report["halves_allocations"], fake))

        sharing = MpsSharing.from_mapping(
            {
                "renameByDefault": True,
                "resources": [{"name": GPU, "replicas": 4}],
                "daemon": daemon_options(work / "r", fake),
            }
        )
        mps_backend = MpsBackend(nvml_backend(fake, report_mig=False), sharing)
        async with serving(mps_backend, work / "replicas", (SHARED,)) as plugin:
            await stage(report, "replicas_latency", latencies(plugin, SHARED, calls))
            await stage(report, "replica_allocations", admit_all(plugin, [SHARED, SHARED]))
            if isinstance(report["replica_allocations"], list):
                await stage(report, "replica_clients", run_clients(report["replica_allocations"], fake))
        report["daemons_left"] = await asyncio.to_thread(daemons_left, work)
        report["mps_processes_after"] = await asyncio.to_thread(mps_processes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def markdown(report: Mapping[str, Any], commit: str) -> str:
    rows = [
        ("whole GPU (nvml)", report.get("whole_gpu", {})),
        ("MPS partition 1g.18gb", report.get("small_latency", {})),
        ("MPS partition 3g.71gb", report.get("halves_latency", {})),
        ("MPS replica (sharing.mps, 4 per GPU)", report.get("replicas_latency", {})),
    ]
    lines = [
        f"# MPS on one H200 (commit {commit})",
        "",
        "`python -m benchmarks.mps_proof --out benchmarks/results/h200-x1/mps`; every figure is in `mps_proof.json`.",
        "",
        f"Allocate and admission through the kubelet simulator, {report['calls']} one-device pods each, ms:",
        "",
        "| devices | Allocate median | p99 | admission median | p99 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, figures in rows:
        if "allocate" not in figures:
            lines.append(f"| {name} | {figures} | | | |")
            continue
        a, b = figures["allocate"], figures["admission"]
        lines.append(f"| {name} | {a['median_ms']} | {a['p99_ms']} | {b['median_ms']} | {b['p99_ms']} |")
    kill = report.get("small_kill", {})
    lines += [
        "",
        f"Control daemon start (launch to first answer): {report.get('daemon_start_s')} s (7 x 1g.18gb), "
        f"{report.get('halves_daemon_start_s')} s (3g + 4g); plugin start to all 7 partitions served: "
        f"{report.get('small_start_to_served_s')} s.",
        "",
        f"Daemon killed (SIGKILL, probe every {PROBE_INTERVAL_S} s): partitions Unhealthy to the kubelet after "
        f"{kill.get('to_unhealthy_s')} s, Healthy again after {kill.get('to_healthy_again_s')} s "
        f"(restart to answer {kill.get('restart_to_answer_s')} s, starts {kill.get('daemon_starts')}).",
        "",
        "CUDA clients, each started with exactly its Allocate environment, all of a wave at once "
        "(limit+1 GiB in one allocation, then 1 GiB steps until refused):",
        "",
        "| wave | device | limit MiB | limit+1 GiB refused | filled MiB | SMs seen | bf16 TFLOP/s | holding at once |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    whole = report.get("whole_gpu_client", {})
    lines.append(
        f"| alone, no MPS | whole GPU | - | - | - | {whole.get('sm_count')} | {whole.get('matmul_tflops')} | - |"
    )
    for wave, key in (
        ("7 x 1g.18gb", "small_clients"),
        ("3g + 4g", "halves_clients"),
        ("4 replicas", "replica_clients"),
    ):
        clients = report.get(key, [])
        if not isinstance(clients, list):
            lines.append(f"| {wave} | {clients} | | | | | | |")
            continue
        for client in clients:
            lines.append(
                f"| {wave} | `{client.get('device')}` | {client.get('limit_mib')} | {client.get('beyond_refused')} | "
                f"{client.get('filled_mib')} | {client.get('sm_count')} | {client.get('matmul_tflops')} | "
                f"{client.get('clients_holding_at_once')} |"
                + (f" error: {client['error']}" if "error" in client else "")
            )
    lines += [
        "",
        f"Daemons left running after the plugin stopped: {len(report.get('daemons_left', []))}; MPS processes "
        f"on the machine before: {report.get('mps_processes_before')}, after: {report.get('mps_processes_after')}. "
        f"The control program where no daemon runs: {report['control_without_daemon']}.",
        "",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--calls", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--fake", is_flag=True, help="The fake NVML and a stand-in control program; no CUDA clients.")
def main(out: Path, calls: int, fake: bool) -> None:
    """Prove MPS partitions and replicas on this machine's GPU and print the figures."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    commit = measured_commit()
    report = asyncio.run(prove(calls, fake))
    report["commit"] = commit
    text = markdown(report, report["commit"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "mps_proof.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "mps_proof.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
