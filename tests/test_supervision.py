"""Supervision and the kubelet's directory: long-lived tasks that fail are restarted, counted, and reported when they
keep failing; the plugin waits for a kubelet directory that does not exist yet or was removed and created again."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from click.testing import CliRunner

from gpuplugin.cli import main
from gpuplugin.core.clock import VirtualClock
from gpuplugin.core.instance import SocketIdentity
from gpuplugin.core.tasks import SupervisionSettings, Supervisor, TaskFailing, TaskSet
from gpuplugin.daemon.agent import Daemon
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.daemon.probes import ListenAddress, ProbeSettings
from gpuplugin.daemon.settings import Overrides, PluginSettings
from gpuplugin.kubelet.registration import RegistrationSettings
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.kubelet.watcher import WatcherSettings
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import GPU_RESOURCE, StaticBackend, gpu_tree, until
from tests.test_probes import ask, request
from tests.test_reliability import FaultyBackend, serve
from tests.test_reload import config, write_atomically
from tests.test_reload import running as running_daemon

#: The issue's bound for a removed-and-recreated kubelet directory: registered with the new kubelet within 2 s.
REREGISTER_S = 2.0
#: Restarts fast enough for a test: five failures within the window make a task failing.
QUICK = SupervisionSettings(first_backoff_s=0.01, max_backoff_s=0.05, failure_budget=5, exit_grace_s=0.3)


@pytest.fixture(autouse=True)
def _logs_captured() -> Iterator[None]:
    """Logs kept as events, not rendered: a console traceback per restart costs more time than the backoffs."""
    with structlog.testing.capture_logs():
        yield


async def advance_until(clock: VirtualClock, done: Callable[[], object], step_s: float) -> None:
    """Move ``clock`` on by ``step_s`` at a time until ``done()``; fails after a thousand steps."""
    for _ in range(1000):
        if done():
            return
        await clock.advance(step_s)
    raise AssertionError("condition not met in virtual time")


class Flaky:
    """A task body that fails its first ``failures`` runs, then runs until cancelled."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.error = error or RuntimeError("flaky")
        self.runs = 0
        self.running = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise self.error
        self.running.set()
        await asyncio.Event().wait()


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"first_retry_s": 0.0}, "first_retry_s"),
        ({"first_retry_s": 2.0, "max_retry_s": 1.0}, "max_retry_s"),
        ({"max_retry_s": 4000.0}, "max_retry_s"),
        ({"call_timeout_s": 0.0}, "call_timeout_s"),
    ],
)
def test_registration_settings_out_of_range_are_refused_naming_the_field(values: dict[str, float], field: str) -> None:
    """A registration setting outside its documented range is refused with its name."""
    with pytest.raises(ValueError, match=f"registration.{field}: must be"):
        RegistrationSettings(**values)


@pytest.mark.parametrize("field", ["first_backoff_s", "failure_budget", "failure_window_s", "exit_grace_s"])
def test_supervision_settings_out_of_range_are_refused_naming_the_field(field: str) -> None:
    """A supervision setting outside its documented range is refused with its name."""
    with pytest.raises(ValueError, match=f"supervision.{field}"):
        SupervisionSettings(**{field: -1})


@pytest.mark.parametrize("field", ["poll_interval_s", "settle_s"])
def test_watcher_settings_out_of_range_are_refused_naming_the_field(field: str) -> None:
    """A socket-watcher setting outside its documented range is refused with its name."""
    with pytest.raises(ValueError, match=f"watcher.{field}"):
        WatcherSettings(**cast(dict[str, Any], {field: 5.0}))


async def test_a_failing_task_is_restarted_with_backoff_and_its_restarts_counted() -> None:
    """A supervised task that raises (a MemoryError too) is started again, each restart counted under its name."""
    supervisor = Supervisor(QUICK)
    tasks = TaskSet("owner", supervisor)
    flaky = Flaky(2, MemoryError())
    with structlog.testing.capture_logs() as logs:
        tasks.supervise(flaky, "flaky")
        await asyncio.wait_for(flaky.running.wait(), 2)
        await tasks.aclose()
    assert supervisor.restarts == {"owner:flaky": 2}
    assert [(e["event"], e["task"], e["error"]) for e in logs if e["log_level"] == "error"] == [
        ("task failed; restarting", "owner:flaky", "MemoryError")
    ] * 2
    assert supervisor.failing() == {}


async def test_a_task_that_ends_unexpectedly_is_restarted_and_one_expected_to_end_is_not() -> None:
    """A supervised task that returns is started again unless it was expected to end."""
    supervisor = Supervisor(QUICK)
    tasks = TaskSet("owner", supervisor)
    runs = count()
    again = asyncio.Event()

    async def ends() -> None:
        if next(runs) == 1:
            again.set()
            await asyncio.Event().wait()

    done_runs = count()

    async def finishes() -> None:
        next(done_runs)

    tasks.supervise(ends, "ends")
    finished = tasks.supervise(finishes, "finishes", expect_end=True)
    await asyncio.wait_for(again.wait(), 2)
    await asyncio.wait_for(finished, 2)
    await tasks.aclose()
    assert supervisor.restarts == {"owner:ends": 1, "owner:finishes": 0}
    assert next(done_runs) == 1


async def test_a_task_past_its_failure_budget_is_failing_and_given_up_after_the_grace_period() -> None:
    """Five failures within the window name the task as failing; still failing after the grace, it is given up."""
    clock = VirtualClock()
    given_up: list[tuple[float, TaskFailing]] = []
    supervisor = Supervisor(
        QUICK, on_give_up=lambda failure: given_up.append((clock.monotonic(), failure)), clock=clock
    )
    tasks = TaskSet("owner", supervisor)
    flaky = Flaky(1_000_000, OSError("no such file"))
    try:
        tasks.supervise(flaky, "doomed")
        await advance_until(clock, lambda: "owner:doomed" in supervisor.failing(), QUICK.first_backoff_s)
        # Marked failing within the last step; it is given up one grace period after that mark.
        failing_from = clock.monotonic()
        assert "last: OSError: no such file" in supervisor.failing()["owner:doomed"]
        await advance_until(clock, lambda: given_up, QUICK.first_backoff_s)
    finally:
        await tasks.aclose()
        supervisor.close()
    ((at, failure),) = given_up
    assert failing_from + QUICK.exit_grace_s - QUICK.first_backoff_s <= at <= failing_from + QUICK.exit_grace_s
    assert failure.task == "owner:doomed"
    assert "owner:doomed keeps failing" in str(failure)


async def test_a_failing_task_its_owner_stops_is_failing_no_more_and_never_given_up() -> None:
    """A task that kept failing and was then cancelled by its owner (a resource removed) ends nothing."""
    clock = VirtualClock()
    given_up: list[TaskFailing] = []
    supervisor = Supervisor(replace(QUICK, exit_grace_s=1.0), on_give_up=given_up.append, clock=clock)
    tasks = TaskSet("owner", supervisor)
    try:
        task = tasks.supervise(Flaky(1_000_000), "removed")
        await advance_until(clock, supervisor.failing, QUICK.first_backoff_s)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert supervisor.failing() == {}
        await clock.advance(1.2)
    finally:
        await tasks.aclose()
        supervisor.close()
    assert not given_up


async def test_a_failing_task_that_runs_through_the_grace_period_recovers() -> None:
    """A task that failed its budget but then runs without failing for the grace period is healthy again."""
    clock = VirtualClock()
    given_up: list[TaskFailing] = []
    supervisor = Supervisor(QUICK, on_give_up=given_up.append, clock=clock)
    tasks = TaskSet("owner", supervisor)
    flaky = Flaky(QUICK.failure_budget)
    try:
        tasks.supervise(flaky, "shaky")
        await advance_until(clock, flaky.running.is_set, QUICK.first_backoff_s)
        assert "owner:shaky" in supervisor.failing()
        await clock.advance(QUICK.exit_grace_s)
        assert supervisor.failing() == {}
    finally:
        await tasks.aclose()
        supervisor.close()
    assert not given_up


async def http_get(port: int, path: str) -> tuple[int, str]:
    answer, _ = await ask(port, request(path, "Connection: close"))
    return answer.status, answer.body.decode()


async def test_daemon_with_a_task_that_keeps_failing_turns_healthz_503_naming_it_and_ends_with_task_failing(
    workdir: Path,
) -> None:
    """A backend event stream that keeps failing: restarts counted in /metrics, /healthz 503 naming the task, and
    after the grace period the daemon closes everything and raises TaskFailing (the CLI exits 1)."""
    settings = PluginSettings(
        backend="mock",
        manager=ManagerSettings(
            server=ServerSettings(kubelet_dir=workdir),
            supervision=SupervisionSettings(first_backoff_s=0.01, max_backoff_s=0.05, exit_grace_s=1.0),
        ),
        probes=ProbeSettings(address=ListenAddress("127.0.0.1", 0)),
        state_dir=workdir,
    )
    daemon = Daemon(settings, config=None, overrides=Overrides())
    backend = FaultyBackend(gpu_tree(2))
    for _ in range(1000):  # every subscription fails at once
        backend.break_events(OSError("the driver went away"))
    daemon.manager.backend = backend  # the mock the daemon made was never started
    async with KubeletSimulator(workdir) as kubelet:
        run = asyncio.create_task(daemon.run(asyncio.Event()))
        try:
            await kubelet.wait_registered(GPU_RESOURCE, timeout=5)
            assert daemon.probes is not None
            await until(lambda: daemon.supervisor.failing(), timeout_s=5)
            status, body = await http_get(daemon.probes.port, "/healthz")
            assert status == 503 and "task manager:backend events keeps failing" in body, body
            assert "OSError: the driver went away" in body
            _, metrics = await http_get(daemon.probes.port, "/metrics")
            restarts = [line for line in metrics.splitlines() if line.startswith("gpuplugin_task_restarts_total")]
            assert 'gpuplugin_task_restarts_total{task="manager:socket watcher"} 0.0' in restarts
            assert any('task="manager:backend events"' in line and not line.endswith(" 0.0") for line in restarts)
            with pytest.raises(TaskFailing, match="manager:backend events"):
                await asyncio.wait_for(run, 5)
        finally:
            if not run.done():
                run.cancel()
    assert daemon.manager.servers == {}


async def test_config_watcher_restarts_after_a_memory_error_and_a_later_edit_applies(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that raises MemoryError does not end the config watcher: it restarts and the next edit applies."""
    original = Daemon.reload

    async def reload(daemon: Daemon, text: str) -> None:
        if "boom" in text:
            raise MemoryError
        await original(daemon, text)

    monkeypatch.setattr(Daemon, "reload", reload)
    async with running_daemon(workdir, config()) as node:
        write_atomically(node.config, config() + "# boom\n")
        await node.until(lambda: node.daemon.supervisor.restarts["daemon:config watcher"] >= 1)
        write_atomically(node.config, config(replicas=2))
        await node.settled("nvidia.com/gpu", 4)
        assert node.daemon.reloads == 1


def static_manager(kubelet_dir: Path, *, inotify: bool, settle_s: float = 0.05) -> Manager:
    """A manager of two static GPUs serving in ``kubelet_dir``; the directory polled every 50 ms where watched so."""
    settings = ManagerSettings(
        server=ServerSettings(kubelet_dir=kubelet_dir),
        watcher=WatcherSettings(use_inotify=inotify, poll_interval_s=0.05, settle_s=settle_s),
    )
    return Manager(StaticBackend(gpu_tree(2)), settings)


@asynccontextmanager
async def started(manager: Manager) -> AsyncIterator[Manager]:
    await manager.start()
    try:
        yield manager
    finally:
        await manager.aclose()


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    began = time.monotonic()
    await step()
    return time.monotonic() - began


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
async def test_kubelet_directory_removed_and_created_again_registers_with_the_new_kubelet_within_2s(
    workdir: Path, inotify: bool
) -> None:
    """``rm -rf`` of the kubelet directory, ``mkdir`` and a new kubelet: registered with it within 2 s, no task
    failed, not ready while the directory is missing."""
    kubelet_dir = workdir / "device-plugins"
    kubelet_dir.mkdir()
    with structlog.testing.capture_logs() as logs:
        async with started(static_manager(kubelet_dir, inotify=inotify)) as manager:
            async with KubeletSimulator(kubelet_dir) as kubelet:
                await kubelet.wait_for(lambda: manager.ready, timeout=5)
            shutil.rmtree(kubelet_dir)
            await until(lambda: not manager.ready)
            await asyncio.sleep(0.3)  # the watcher has noticed and waits
            kubelet_dir.mkdir()
            async with KubeletSimulator(kubelet_dir) as kubelet:
                spent = await timed(lambda: kubelet.wait_registered(GPU_RESOURCE, timeout=REREGISTER_S))
                await kubelet.wait_for(lambda: manager.ready and kubelet.allocatable(GPU_RESOURCE) == 2, timeout=2)
    assert spent < REREGISTER_S
    assert not [e for e in logs if e["event"].startswith("task failed")]
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warnings.count("kubelet directory removed; waiting for it") == 1
    assert set(warnings) == {
        "kubelet directory removed; waiting for it",
        "kubelet not reachable; retrying with backoff",
    }


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
async def test_kubelet_directory_replaced_at_once_is_watched_again_and_registers_within_2s(
    workdir: Path, inotify: bool
) -> None:
    """``rm -rf D; mkdir D`` in one go (the watcher never sees it missing): the new directory is watched, our socket
    served in it and registered with the kubelet started there within 2 s."""
    kubelet_dir = workdir / "device-plugins"
    kubelet_dir.mkdir()
    with structlog.testing.capture_logs() as logs:
        async with started(static_manager(kubelet_dir, inotify=inotify)) as manager:
            async with KubeletSimulator(kubelet_dir) as kubelet:
                await kubelet.wait_for(lambda: manager.ready, timeout=5)
            shutil.rmtree(kubelet_dir)
            kubelet_dir.mkdir()
            await asyncio.sleep(0.3)
            async with KubeletSimulator(kubelet_dir) as kubelet:
                spent = await timed(lambda: kubelet.wait_registered(GPU_RESOURCE, timeout=REREGISTER_S))
                await kubelet.wait_for(lambda: manager.ready and kubelet.allocatable(GPU_RESOURCE) == 2, timeout=2)
            # The socket watcher follows the new directory: a kubelet restart there is noticed too.
            async with KubeletSimulator(kubelet_dir) as kubelet:
                await kubelet.wait_for(lambda: manager.ready and kubelet.allocatable(GPU_RESOURCE) == 2, timeout=2)
    assert spent < REREGISTER_S
    assert not [e for e in logs if e["event"].startswith("task failed")]


async def test_kubelet_restart_is_served_again_without_waiting_out_the_settle(workdir: Path) -> None:
    """The wait after our socket's deletion (for the directory's own removal) ends as soon as the restarting kubelet
    creates its socket: re-registration is not delayed by it."""
    settle_s = 0.5
    async with (
        KubeletSimulator(workdir) as kubelet,
        started(static_manager(workdir, inotify=True, settle_s=settle_s)) as manager,
    ):
        await kubelet.wait_for(lambda: manager.ready, timeout=5)
        await asyncio.sleep(0.2)  # the socket watcher has armed its watch
        before = len(kubelet.registrations)
        restart = await kubelet.restart()
        again = await kubelet.wait_registered(GPU_RESOURCE, after=before, timeout=5)
    assert again.monotonic_s - restart.served_monotonic_s < settle_s / 2


async def test_kubelet_restart_registers_each_resource_once(workdir: Path) -> None:
    """After each of ten kubelet restarts the resource is registered exactly once: a registration made while the
    restart's events were handled is not made again (the kubelet would replace the endpoint with itself)."""
    async with (
        KubeletSimulator(workdir) as kubelet,
        started(static_manager(workdir, inotify=True)) as manager,
    ):
        await kubelet.wait_for(lambda: manager.ready, timeout=5)
        await asyncio.sleep(0.2)  # the socket watcher has armed its watch
        for _ in range(10):
            before = len(kubelet.registrations)
            await kubelet.restart()
            await kubelet.wait_for(lambda: manager.ready and kubelet.allocatable(GPU_RESOURCE) == 2, timeout=5)
            await asyncio.sleep(0.1)  # room for a second registration, were one coming
            assert len(kubelet.registrations) - before == 1


async def test_a_late_kubelet_socket_event_does_not_register_again_with_the_same_kubelet(workdir: Path) -> None:
    """A ``kubelet.sock`` creation noticed after our socket was already served again and registered with that same
    kubelet (its events split across two batches) starts no second Register; a new kubelet's socket does."""
    async with (
        KubeletSimulator(workdir) as kubelet,
        started(static_manager(workdir, inotify=True)) as manager,
    ):
        await kubelet.wait_for(lambda: manager.ready, timeout=5)
        server = manager.servers[GPU_RESOURCE]
        before = len(kubelet.registrations)
        same = SocketIdentity.of(kubelet.socket_path)
        assert same is not None and server.registered_with == same
        server.register_again(same)
        await asyncio.sleep(0.1)  # room for a second registration, were one coming
        assert len(kubelet.registrations) == before and server.registrations == 1
        await kubelet.restart()
        await kubelet.wait_registered(GPU_RESOURCE, after=before, timeout=5)
        new = SocketIdentity.of(kubelet.socket_path)
        await until(lambda: server.registered_with == new, timeout_s=5)
        assert new != same


async def test_serve_survives_its_kubelet_directory_removed_and_created_again(workdir: Path) -> None:
    """``gpuplugin serve`` registered, then ``rm -rf D; mkdir D`` and a kubelet started there: registered with
    the new kubelet within 2 s, /healthz still 200, and no task failed."""
    kubelet_dir, state_dir = workdir / "k", workdir / "s"
    state_dir.mkdir()
    async with serve(kubelet_dir, "--state-dir", str(state_dir), "--metrics-address", "127.0.0.1:0") as plugin:
        async with KubeletSimulator(kubelet_dir) as kubelet:
            await kubelet.wait_registered("nvidia.com/gpu", timeout=10)
            port = (await plugin.wait_log(lambda e: e["event"] == "serving probes and metrics"))["port"]
        shutil.rmtree(kubelet_dir)
        await plugin.wait_log(lambda e: e["event"] == "kubelet directory removed; waiting for it")
        kubelet_dir.mkdir()
        async with KubeletSimulator(kubelet_dir) as kubelet:
            spent = await timed(lambda: kubelet.wait_registered("nvidia.com/gpu", timeout=REREGISTER_S))
            await kubelet.wait_for(lambda: kubelet.allocatable("nvidia.com/gpu") == 8, timeout=5)
            assert (await http_get(port, "/healthz"))[0] == 200
            assert (await http_get(port, "/readyz"))[0] == 200
        assert await plugin.terminate() == 0
    assert spent < REREGISTER_S
    assert not [e for e in plugin.events if e["event"].startswith("task failed")]


async def test_serve_with_a_missing_kubelet_directory_waits_for_it_and_registers_when_it_appears(
    workdir: Path,
) -> None:
    """``serve`` with a kubelet directory that does not exist: one line naming it, /healthz 200 and /readyz 503
    naming it while waiting, then served and registered once a kubelet creates it."""
    kubelet_dir, state_dir = workdir / "not-yet" / "device-plugins", workdir / "s"
    state_dir.mkdir()
    async with serve(kubelet_dir, "--state-dir", str(state_dir), "--metrics-address", "127.0.0.1:0") as plugin:
        port = (await plugin.wait_log(lambda e: e["event"] == "serving probes and metrics"))["port"]
        waiting = await plugin.wait_log(lambda e: e["event"] == "kubelet directory does not exist; waiting for it")
        assert waiting["directory"] == str(kubelet_dir)
        assert (await http_get(port, "/healthz"))[0] == 200
        status, body = await http_get(port, "/readyz")
        assert status == 503 and str(kubelet_dir) in body
        async with KubeletSimulator(kubelet_dir) as kubelet:
            await kubelet.wait_registered("nvidia.com/gpu", timeout=REREGISTER_S)
            await kubelet.wait_for(lambda: kubelet.allocatable("nvidia.com/gpu") == 8, timeout=5)
            assert (await http_get(port, "/readyz"))[0] == 200
        assert await plugin.terminate() == 0
    assert plugin.other == [], plugin.other
    problems = [e for e in plugin.events if e.get("level") in ("warning", "error", "critical")]
    assert [e["event"] for e in problems][:1] == ["kubelet directory does not exist; waiting for it"]
    assert not [e for e in problems if e["level"] in ("error", "critical")]


def test_serve_exits_1_with_one_line_when_a_task_keeps_failing(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` whose daemon gives up on a task that keeps failing exits 1 with one line naming the task."""

    async def gives_up(daemon: Daemon, stop: asyncio.Event) -> None:
        raise TaskFailing("manager:socket watcher", "5 failures in 60 s, last: OSError: gone")

    monkeypatch.setattr(Daemon, "run", gives_up)
    args = ["serve", "--kubelet-dir", str(workdir), "--state-dir", str(workdir), "--log-format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "gpuplugin: task manager:socket watcher keeps failing (5 failures in 60 s, last: OSError: gone); "
        "exiting so that the kubelet restarts the plugin"
    ]
