"""NodePrepareResources and NodeUnprepareResources of this plugin beside the Kubernetes DRA example driver's kubelet
plugin (sigs.k8s.io/dra-example-driver, built by benchmarks/draexample/build.sh), in one run, on one real API server.

Both run as processes on one node of a control plane of the cached upstream binaries (tests/controlplane.py: etcd,
kube-apiserver), each with 8 devices (ours: the mock backend) published in its ResourceSlice, each reading the claims
from the API server with the same admin kubeconfig. One client, the DRA kubelet simulator, registers both from one
plugin-registry directory and calls them over their unix sockets. Each claim is a ResourceClaim created in the API
server, allocated one device of the driver's slice (the status written as the scheduler writes it), prepared, then
unprepared, then deleted; the two drivers take turns claim by claim, so that the machine's noise falls on both.
Only the two calls are timed.

The example plugin's API client is given 1000 requests/s (its default of 5/s, burst 10, would make every prepare
past the tenth wait for the client's rate limiter, which is not what is measured here).

Run ``python -m benchmarks.dra_baseline [--claims N] [--results FILE]``; prints each driver's p50 and p99 in ms and
writes them, with the commit measured, to FILE (default: benchmarks/results/cluster/dra-baseline.json).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click
import structlog
from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice
from lightkube.types import PatchType

from benchmarks.measure import nearest_rank
from benchmarks.provenance import ROOT, measured_commit
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.testing.dra import DraKubelet
from tests.controlplane import ADMIN_TOKEN, ControlPlane, available, control_plane

NODE = "bench"
GPUS = 8
OURS = "gpu.gpuplugin.dev"
EXAMPLE = "gpu.example.com"
BUILD = ROOT / "benchmarks/draexample/build.sh"
RESULTS = ROOT / "benchmarks/results/cluster/dra-baseline.json"
CALLS = ("NodePrepareResources", "NodeUnprepareResources")
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Published:
    """A driver's pool on the node and the device names its ResourceSlice lists."""

    driver: str
    pool: str
    devices: tuple[str, ...]


def example_binary() -> Path:
    """The example driver's kubelet plugin, built (or taken from the cache) by its build script."""
    done = subprocess.run([str(BUILD)], stdout=subprocess.PIPE, text=True, check=True, timeout=1800)
    return Path(done.stdout.strip().splitlines()[-1])


def percentiles_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of samples in seconds, in ms."""
    ordered = sorted(samples)
    return {
        "p50_ms": round(nearest_rank(ordered, 50) * 1000, 3),
        "p99_ms": round(nearest_rank(ordered, 99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


@asynccontextmanager
async def process(command: list[str], log: Path, env: Mapping[str, str]) -> Any:
    """A process running for the block's length, its output in ``log``; stopped by its PID (SIGTERM, then SIGKILL)."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command, env=dict(env), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def published(admin: AsyncClient, driver: str) -> Published:
    """The driver's slice of the node once it lists every device."""
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            async for found in admin.list(ResourceSlice):
                spec = found.spec
                if spec.driver == driver and spec.nodeName == NODE and len(spec.devices or []) >= GPUS:
                    return Published(driver, spec.pool.name, tuple(d.name for d in spec.devices or []))
            await asyncio.sleep(0.1)


async def allocated_claim(admin: AsyncClient, pool: Published, device: str, number: int) -> ClaimRef:
    """A ResourceClaim of one device, its status allocating ``device`` of the pool as the scheduler would."""
    name = f"{pool.driver.split('.')[1]}-{number}"
    request = {"name": "gpu", "exactly": {"deviceClassName": "bench.example.com", "count": 1}}
    doc = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"devices": {"requests": [request]}},
    }
    created = await admin.create(cast(ResourceClaim, from_dict(doc)))
    result = {"request": "gpu", "driver": pool.driver, "pool": pool.pool, "device": device}
    selector = {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}
    status = {"status": {"allocation": {"devices": {"results": [result]}, "nodeSelector": selector}}}
    await admin.patch(ResourceClaim.Status, name, status, namespace="default", patch_type=PatchType.MERGE)
    uid = created.metadata.uid if created.metadata else None
    if uid is None:
        raise RuntimeError(f"the API server returned claim {name} without a UID")
    return ClaimRef("default", name, uid)


async def measure(
    plane: ControlPlane, directory: Path, example: Path, claims: int
) -> dict[str, dict[str, list[float]]]:
    """Starts both plugins, then times each driver's calls for ``claims`` claims, turn about; seconds per call."""
    kubeconfig = plane.work / "admin.kubeconfig"
    registry = directory / "plugins_registry"
    registry.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLUGIN_")} | {"KUBECONFIG": str(kubeconfig)}
    config = directory / "gpuplugin.json"
    config.write_text(
        json.dumps(
            {
                "version": "v1",
                "plugin": {"pluginsRegistryDir": str(registry)},
                "flags": {"plugin": {"cdiSpecDir": str(directory / "ours/cdi")}},
            }
        )
    )
    ours = [sys.executable, "-m", "gpuplugin", "serve", "--backend", "mock", "--mock-gpus", str(GPUS)]
    ours += ["--config", str(config), "--kubelet-api", "dra", "--node-name", NODE]
    ours += ["--kubelet-plugins-dir", str(directory / "ours/plugins"), "--state-dir", str(directory / "ours/state")]
    theirs = [str(example), "--node-name", NODE, "--num-devices", str(GPUS), "--cdi-root", str(directory / "ex/cdi")]
    theirs += ["--kubelet-registrar-directory-path", str(registry)]
    theirs += ["--kubelet-plugins-directory-path", str(directory / "ex/plugins"), "--kubeconfig", str(kubeconfig)]
    theirs += ["--kube-api-qps", "1000", "--kube-api-burst", "1000"]
    times: dict[str, dict[str, list[float]]] = {d: {c: [] for c in CALLS} for d in (OURS, EXAMPLE)}
    admin = AsyncClient(config=KubeConfig.from_dict(plane.kubeconfig(ADMIN_TOKEN)), field_manager="bench")
    try:
        async with AsyncExitStack() as stack:
            kubelet = await stack.enter_async_context(DraKubelet(registry))
            procs = [
                await stack.enter_async_context(process(ours, directory / "gpuplugin.log", env)),
                await stack.enter_async_context(process(theirs, directory / "dra-example.log", env)),
            ]
            pools = {}
            for driver, proc in zip((OURS, EXAMPLE), procs, strict=True):
                started = asyncio.ensure_future(kubelet.wait_registered(driver, timeout_s=START_TIMEOUT_S))
                exited = asyncio.ensure_future(proc.wait())
                await asyncio.wait([started, exited], return_when=asyncio.FIRST_COMPLETED)
                if exited.done():
                    started.cancel()
                    raise RuntimeError(f"{driver}'s plugin exited {proc.returncode} before it registered")
                exited.cancel()
                await started
                pools[driver] = await published(admin, driver)
            for number in range(claims):
                # Turn about, the first driver of each round alternating.
                for driver in (OURS, EXAMPLE) if number % 2 == 0 else (EXAMPLE, OURS):
                    pool = pools[driver]
                    claim = await allocated_claim(admin, pool, pool.devices[number % len(pool.devices)], number)
                    start = time.perf_counter()
                    response = await kubelet.prepare(driver, [claim])
                    times[driver]["NodePrepareResources"].append(time.perf_counter() - start)
                    error = response.claims[claim.uid].error
                    if error or not response.claims[claim.uid].devices:
                        raise RuntimeError(f"{driver} did not prepare {claim.name}: {error or 'no devices'}")
                    start = time.perf_counter()
                    response = await kubelet.unprepare(driver, [claim])
                    times[driver]["NodeUnprepareResources"].append(time.perf_counter() - start)
                    if response.claims[claim.uid].error:
                        raise RuntimeError(
                            f"{driver} did not unprepare {claim.name}: {response.claims[claim.uid].error}"
                        )
                    await admin.delete(ResourceClaim, claim.name, namespace="default")
    finally:
        await admin.close()
    return times


def add_node(plane: ControlPlane) -> None:
    """The Node both drivers publish their slices for (no kubelet behind it; none is needed to publish)."""
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}
    done = plane.kubectl("apply", "-f", "-", stdin=json.dumps(node))
    if done.returncode != 0:
        raise RuntimeError(f"kubectl apply of Node {NODE}: {done.stderr.strip()}")


def report(times: Mapping[str, Mapping[str, list[float]]], claims: int, example: Path) -> dict[str, Any]:
    """The results file's content: both drivers' figures and what was measured."""
    return {
        "commit": measured_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kubernetes": example.parent.parent.name.split("-k8s-")[-1],
        "dra_example_driver": example.parent.parent.name.split("-")[2],
        "claims": claims,
        "devices_per_claim": 1,
        "drivers": {d: {c: percentiles_ms(s) for c, s in calls.items()} for d, calls in times.items()},
    }


@click.command()
@click.option("--claims", type=click.IntRange(min=1), default=300, show_default=True, help="Claims per driver.")
@click.option(
    "--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True, help="JSON out."
)
def main(claims: int, results: Path) -> None:
    """Measure this DRA plugin's prepare and unprepare calls beside the DRA example driver's."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    reason = available()
    if reason is not None:
        raise click.ClickException(reason)
    try:
        example = example_binary()
    except (OSError, subprocess.SubprocessError) as exc:
        raise click.ClickException(f"the DRA example driver could not be built ({BUILD}): {exc}") from None
    with tempfile.TemporaryDirectory(prefix="gp-dra-baseline-", dir="/tmp") as tmp, control_plane() as plane:
        add_node(plane)
        try:
            times = asyncio.run(measure(plane, Path(tmp), example, claims))
        except (RuntimeError, TimeoutError) as exc:
            logs = {
                name: (Path(tmp) / name).read_text(errors="replace")[-1500:]
                for name in ("gpuplugin.log", "dra-example.log")
            }
            raise click.ClickException(
                f"{exc or 'timed out'}\n" + "\n".join(f"--- {k}\n{v}" for k, v in logs.items())
            ) from None
    result = report(times, claims, example)
    click.echo(f"{claims} claims of one device each, per driver (ms):")
    click.echo(f"{'':26}{'prepare p50':>12}{'p99':>9}{'unprepare p50':>15}{'p99':>9}")
    for driver, calls in result["drivers"].items():
        prepare, unprepare = calls["NodePrepareResources"], calls["NodeUnprepareResources"]
        click.echo(
            f"{driver:26}{prepare['p50_ms']:>12.2f}{prepare['p99_ms']:>9.2f}"
            f"{unprepare['p50_ms']:>15.2f}{unprepare['p99_ms']:>9.2f}"
        )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"written to {results} (commit {result['commit']})")


if __name__ == "__main__":
    main()
