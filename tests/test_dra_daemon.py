"""``serve --kubelet-api dra`` operated as the device plugin is: the process set-up both modes share, /healthz,
/readyz and /metrics over HTTP on loopback, and the config file's reload, with a real DraDaemon on the mock backend
publishing to the fake API server and registered by the DRA kubelet simulator.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner

from gpuplugin.cli import main
from gpuplugin.core.tasks import SupervisionSettings, TaskFailing
from gpuplugin.daemon import dra as dra_daemon
from gpuplugin.daemon.agent import IO_THREADS, Daemon, settings_from_text
from gpuplugin.daemon.dra import DraDaemon
from gpuplugin.daemon.settings import Overrides
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.testing.dra import DraKubelet
from tests.fake_apiserver import FakeApiServer, fake_apiserver
from tests.fakes import gpu_tree
from tests.test_dra import DRIVER, NODE, settings_in
from tests.test_dra_sharing import gpu_config, opaque
from tests.test_metrics import Samples, parse, sample
from tests.test_probes import ask, request
from tests.test_reliability import FaultyBackend
from tests.test_reload import write_atomically

TIMEOUT_S = 5.0


def config(*, gpus: int = 2, extra: str = "") -> str:
    """DRA mode's config: ``gpus`` mock GPUs, probes on a free loopback port, plus ``extra`` sections."""
    return (
        'version: v1\nplugin:\n  metricsAddress: "127.0.0.1:0"\n'
        f"backend:\n  name: mock\n  mock:\n    gpus: {gpus}\n{extra}"
    )


async def http_get(port: int, path: str) -> tuple[int, str]:
    answer, _ = await ask(port, request(path, "Connection: close"))
    return answer.status, answer.body.decode()


@dataclass
class DraNode:
    """A DraDaemon serving, its fake API server and the path of its config file; the DRA kubelet simulator that
    registered it, if one did."""

    daemon: DraDaemon
    api: FakeApiServer
    config: Path
    run: asyncio.Task[None]
    kubelet: DraKubelet | None = None

    @property
    def port(self) -> int:
        assert self.daemon.probes is not None
        return self.daemon.probes.port

    async def get(self, path: str) -> tuple[int, str]:
        return await http_get(self.port, path)

    async def scrape(self) -> Samples:
        status, text = await self.get("/metrics")
        assert status == 200
        return parse(text)

    async def until(self, predicate: Callable[[], object]) -> None:
        """Poll the daemon's counters, which nothing announces."""
        async with asyncio.timeout(TIMEOUT_S):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)


@asynccontextmanager
async def dra_node(
    directory: Path, text: str, *, registered: bool = True, api_down: bool = False, **changes: Any
) -> AsyncIterator[DraNode]:
    """A DraDaemon on ``text`` (written to ``directory``/etc/config.yaml), with ``changes`` to its settings, serving
    its probes before the block; with ``registered``, registered by the DRA kubelet simulator and ready."""
    path = directory / "etc" / "config.yaml"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    (directory / "s").mkdir()
    overrides = Overrides(state_dir=directory / "s")
    settings = dataclasses.replace(settings_from_text(text, str(path), overrides), **changes)
    async with fake_apiserver() as api:
        api.add_node(NODE, "uid-1")
        api.down = api_down
        daemon = DraDaemon(
            settings, settings_in(directory), api_server=api.url, config=path, config_text=text, overrides=overrides
        )
        stop = asyncio.Event()
        run = asyncio.create_task(daemon.run(stop), name="dra daemon")
        node = DraNode(daemon, api, path, run)
        try:
            await node.until(lambda: daemon.driver is not None and _serving(node))
            if registered:
                async with DraKubelet(directory / "plugins_registry") as kubelet:
                    node.kubelet = kubelet
                    await kubelet.wait_registered(DRIVER)
                    await node.until(lambda: not daemon.not_ready_reasons())
                    await watching_config()
                    yield node
            else:
                yield node
        finally:
            stop.set()
            if not run.done():
                await asyncio.wait_for(asyncio.shield(run), TIMEOUT_S)


def _serving(node: DraNode) -> bool:
    try:
        return node.port > 0
    except RuntimeError:  # not listening yet
        return False


async def watching_config() -> None:
    """Until the config watcher runs and has armed its inotify watch (an edit before that is not seen)."""
    async with asyncio.timeout(TIMEOUT_S):
        while not any(t.get_name() == "dra-daemon:config watcher" for t in asyncio.all_tasks()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


# The process set-up both modes share.


@pytest.mark.parametrize("mode", ["device-plugin", "dra"])
def test_serve_runs_blocking_calls_on_at_most_io_threads_in_either_mode(
    mode: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` in either mode runs its daemon on a loop whose blocking calls share ``IO_THREADS`` threads of its
    own, however many are asked for at once."""
    used: set[str] = set()

    def blocking() -> None:
        used.add(threading.current_thread().name)
        time.sleep(0.02)

    async def run(daemon: object, stop: asyncio.Event) -> None:
        await asyncio.gather(*(asyncio.to_thread(blocking) for _ in range(4 * IO_THREADS)))

    monkeypatch.setattr(DraDaemon if mode == "dra" else Daemon, "run", run)
    args = ["serve", "--backend", "mock", "--kubelet-dir", str(workdir), "--state-dir", str(workdir)]
    args += ["--kubelet-api", mode, "--node-name", NODE]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert 0 < len(used) <= IO_THREADS
    assert all(name.startswith("gpuplugin-io") for name in used), used


async def test_a_daemon_leaves_the_loop_it_ran_on_as_it_found_it(workdir: Path) -> None:
    """A daemon run on a loop that outlives it (a test's) sets no executor on it, and its signals have their
    former handlers back once it stops."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = [signal.getsignal(s) for s in signals]
    async with dra_node(workdir, config()) as node:
        assert [signal.getsignal(s) for s in signals] != before
    assert [signal.getsignal(s) for s in signals] == before
    name = await asyncio.to_thread(lambda: threading.current_thread().name)
    assert not name.startswith("gpuplugin-io")
    assert node.run.exception() is None


# Probes and metrics.


async def test_dra_metrics_count_claims_devices_slices_and_registrations(workdir: Path) -> None:
    """/metrics in DRA mode: the devices, slices and registration; a prepared claim, a failing one and an
    unprepared one counted, NodePrepareResources timed; the device plugin's own series left out."""
    async with dra_node(workdir, config()) as node:
        kubelet = node.kubelet
        assert kubelet is not None
        samples = await node.scrape()
        assert sample(samples, "gpuplugin_dra_devices", health="Healthy") == 2
        assert sample(samples, "gpuplugin_dra_devices", health="Unhealthy") == 0
        assert sample(samples, "gpuplugin_dra_slices_current") == 1
        assert (sample(samples, "gpuplugin_dra_slice_publications_total") or 0) >= 1
        assert sample(samples, "gpuplugin_dra_slice_publish_failures_total") == 0
        assert (sample(samples, "gpuplugin_dra_registrations_total") or 0) >= 1
        assert sample(samples, "gpuplugin_dra_registered") == 1
        assert sample(samples, "gpuplugin_dra_ready") == 1
        assert not [name for name, _ in samples if name.startswith(("gpuplugin_rpc", "gpuplugin_list_and_watch"))]
        assert sample(samples, "gpuplugin_task_restarts_total", task="dra-daemon:config watcher") == 0

        first = node.api.devices()[0]
        node.api.add_claim("ns", "c", "u-1", [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": first}])
        good, missing = ClaimRef("ns", "c", "u-1"), ClaimRef("ns", "gone", "u-2")
        response = await kubelet.prepare(DRIVER, [good, missing])
        assert response.claims["u-1"].error == "" and "not found" in response.claims["u-2"].error
        samples = await node.scrape()
        assert sample(samples, "gpuplugin_dra_claims_prepared_total") == 1
        assert sample(samples, "gpuplugin_dra_prepare_errors_total") == 1
        assert sample(samples, "gpuplugin_dra_prepare_duration_seconds_count") == 1
        assert sample(samples, "gpuplugin_dra_prepare_duration_seconds_bucket", le="+Inf") == 1
        assert sample(samples, "gpuplugin_dra_prepared_claims") == 1

        await kubelet.unprepare(DRIVER, [good])
        samples = await node.scrape()
        assert sample(samples, "gpuplugin_dra_claims_unprepared_total") == 1
        assert sample(samples, "gpuplugin_dra_unprepare_errors_total") == 0
        assert sample(samples, "gpuplugin_dra_prepared_claims") == 0


async def test_readyz_names_what_is_missing_until_registered_and_published(workdir: Path) -> None:
    """With the API server down and no kubelet, /healthz is 200 and /readyz 503 naming the registration and the
    slices, the failed publication counted; once both are back, /readyz turns 200."""
    async with dra_node(workdir, config(), registered=False, api_down=True) as node:
        await node.until(lambda: node.daemon.publisher is not None and node.daemon.publisher.publisher.problem)
        assert (await node.get("/healthz"))[0] == 200
        status, body = await node.get("/readyz")
        assert status == 503
        assert "DRA plugin not registered by the kubelet yet" in body
        assert "cannot publish ResourceSlices: 503" in body
        samples = await node.scrape()
        assert (sample(samples, "gpuplugin_dra_slice_publish_failures_total") or 0) >= 1
        assert sample(samples, "gpuplugin_dra_slices_current") == 0
        assert sample(samples, "gpuplugin_dra_ready") == 0
        node.api.down = False
        async with DraKubelet(workdir / "plugins_registry") as kubelet:
            await kubelet.wait_registered(DRIVER)
            await node.until(lambda: not node.daemon.not_ready_reasons())
            assert await node.get("/readyz") == (200, "ready\n")


async def test_healthz_names_a_task_that_keeps_failing_and_the_daemon_ends_with_task_failing(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend whose event stream keeps failing: /healthz 503 naming the driver's task, then the DRA daemon
    closes everything and raises TaskFailing, as the device plugin's does."""
    backend = FaultyBackend(gpu_tree(2))
    for _ in range(1000):
        backend.break_events(OSError("the driver went away"))
    monkeypatch.setattr(dra_daemon, "make_backend", lambda settings: backend)
    quick = SupervisionSettings(first_backoff_s=0.01, max_backoff_s=0.05, exit_grace_s=1.0)
    text = config()
    settings = settings_from_text(text, "config", Overrides())
    manager = dataclasses.replace(settings.manager, supervision=quick)
    with structlog.testing.capture_logs():
        async with dra_node(workdir, text, registered=False, manager=manager) as node:
            await node.until(lambda: bool(node.daemon.supervisor.failing()))
            status, body = await node.get("/healthz")
            assert status == 503 and "task dra:backend events keeps failing" in body, body
            with pytest.raises(TaskFailing, match="dra:backend events"):
                await asyncio.wait_for(asyncio.shield(node.run), TIMEOUT_S)


# Config reload.


async def test_a_backend_change_is_reloaded_rediscovered_and_published(workdir: Path) -> None:
    """A config with more mock GPUs restarts the backend: its devices are published again and counted."""
    async with dra_node(workdir, config()) as node:
        write_atomically(node.config, config(gpus=3))
        await node.until(lambda: len(node.api.devices()) == 3)
        assert node.daemon.reloads == 1 and node.daemon.refused == 0
        assert sample(await node.scrape(), "gpuplugin_dra_devices", health="Healthy") == 3


async def test_time_sliced_claims_reach_the_backend_with_metrics_on_and_after_a_backend_reload(workdir: Path) -> None:
    """With /metrics served (its preparer counts claims), a claim time-sliced at Medium is prepared on the mock, which
    sets intervals; after a reload replaced the backend, a Long one is prepared on the new backend."""
    async with dra_node(workdir, config()) as node:
        kubelet = node.kubelet
        assert kubelet is not None

        async def prepare(uid: str, device: str, interval: str) -> str:
            node.api.add_claim("ns", uid, uid, [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}])
            sharing = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}}
            allocation = node.api.claims[("ns", uid)]["status"]["allocation"]
            allocation["devices"]["config"] = [opaque(gpu_config(sharing))]
            return str((await kubelet.prepare(DRIVER, [ClaimRef("ns", uid, uid)])).claims[uid].error)

        assert await prepare("u-1", node.api.devices()[0], "Medium") == ""
        driver = node.daemon.driver
        assert driver is not None
        old = driver.backend
        write_atomically(node.config, config(gpus=3))
        await node.until(lambda: len(node.api.devices()) == 3)
        assert driver.backend is not old
        assert await prepare("u-2", node.api.devices()[2], "Long") == ""


async def test_a_health_change_restarts_the_backend(workdir: Path) -> None:
    """A health section change is applied by a new backend with the new policy."""
    async with dra_node(workdir, config()) as node:
        before = node.daemon.driver.backend if node.daemon.driver is not None else None
        write_atomically(node.config, config(extra="health:\n  fatalXids: [79]\n"))
        await node.until(lambda: node.daemon.reloads == 1)
        assert node.daemon.settings.health.fatal_xids == frozenset({79})
        assert node.daemon.driver is not None and node.daemon.driver.backend is not before
        assert len(node.api.devices()) == 2


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            config().replace("plugin:\n", "plugin:\n  logLevel: debug\n"),
            "log_level: cannot change while serving in DRA mode; restart to apply",
        ),
        (
            config(extra="sharing:\n  timeSlicing:\n    resources: [{name: nvidia.com/gpu, replicas: 2}]\n"),
            "sharing.timeSlicing: not available with --kubelet-api dra",
        ),
        (config().replace("name: mock", "name: nosuch"), "nosuch"),
    ],
    ids=["restart-only", "not-in-dra-mode", "unknown-backend"],
)
async def test_a_change_that_cannot_apply_live_is_refused_with_one_line(workdir: Path, text: str, named: str) -> None:
    """A reload that changes a setting only a restart applies, asks for what DRA mode does not do, or names an
    unknown backend: one error line naming it, and the running config keeps serving; a good edit then applies."""
    async with dra_node(workdir, config()) as node:
        with structlog.testing.capture_logs() as logs:
            write_atomically(node.config, text)
            await node.until(lambda: node.daemon.refused == 1)
        errors = [e for e in logs if e["log_level"] == "error"]
        assert len(errors) == 1 and named in errors[0]["error"], errors
        assert errors[0]["event"] == "config refused; the current config keeps serving"
        assert node.daemon.reloads == 0 and len(node.api.devices()) == 2
        assert (await node.get("/readyz"))[0] == 200
        write_atomically(node.config, config(gpus=1))
        await node.until(lambda: len(node.api.devices()) == 1)


async def test_a_backend_that_does_not_start_is_refused_and_the_old_one_serves_again(workdir: Path) -> None:
    """A reloaded backend section whose backend fails to start (its mock file is missing): one error line, the
    backend of the running config started again, its devices published and the node ready."""
    async with dra_node(workdir, config()) as node:
        missing = workdir / "missing.yaml"
        with structlog.testing.capture_logs() as logs:
            write_atomically(node.config, config().replace("    gpus: 2\n", f"    gpus: 3\n    config: {missing}\n"))
            await node.until(lambda: node.daemon.refused == 1)
        errors = [e for e in logs if e["log_level"] == "error"]
        assert [e["event"] for e in errors] == [
            "config refused: its backend does not start; back to the current config"
        ]
        assert str(missing) in errors[0]["error"]
        await node.until(lambda: not node.daemon.not_ready_reasons())
        assert node.daemon.settings.backend_options == {"gpus": 2} and node.daemon.reloads == 0
        assert len(node.api.devices()) == 2
        assert (await node.get("/readyz"))[0] == 200
