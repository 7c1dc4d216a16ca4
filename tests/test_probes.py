"""The probe server over real HTTP: ``/healthz``, ``/readyz``, ``/metrics``, and the listen address option."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from gpuplugin.metrics import Metrics
from gpuplugin.probes import (
    AddressError,
    ListenAddress,
    ProbeServer,
    ProbeServerError,
    ProbeSettings,
)
from gpuplugin.simulator import KubeletSimulator
from tests.test_metrics import GPU, make_manager, node, plant, until

LOCAL = ListenAddress("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9090", "127.0.0.1", 9090),
        (":8080", "", 8080),
        ("[::1]:0", "::1", 0),
        ("localhost:65535", "localhost", 65535),
        (" 0.0.0.0:80 ", "0.0.0.0", 80),
    ],
)
def test_address_forms_parse(text: str, host: str, port: int) -> None:
    """HOST:PORT, :PORT and [IPv6]:PORT give the host (empty for every interface) and port."""
    assert ListenAddress.parse(text) == ListenAddress(host, port)


@pytest.mark.parametrize(
    "text", ["8080", "", "host:", "host:http", "host:70000", "host:-1", "::1:80", "[::1]", "[]:80", "[::1:80", "a b:1"]
)
def test_bad_address_names_the_option(text: str) -> None:
    """A malformed address fails with a message naming the option and the value."""
    with pytest.raises(AddressError, match=r"^--metrics-address: ") as caught:
        ListenAddress.parse(text)
    assert repr(text) in str(caught.value)


def test_address_error_names_a_config_key() -> None:
    """The caller chooses the option name, so a config-file key can be named instead of the flag."""
    with pytest.raises(AddressError, match=r"^plugin\.metricsAddress: "):
        ListenAddress.parse("nope", option="plugin.metricsAddress")


@pytest.mark.parametrize("text", ["127.0.0.1:9090", ":8080", "[::1]:0"])
def test_address_prints_as_parsed(text: str) -> None:
    """An address prints back in the form it was given."""
    assert str(ListenAddress.parse(text)) == text


async def test_readyz_follows_registration_and_stream(workdir: Path) -> None:
    """/readyz is 503 naming the resource until the kubelet registers it and streams, 200 then, 503 once it goes."""
    async with plant(workdir) as p:
        status, text, _ = await p.get("/readyz")
        assert status == 503
        assert f"{GPU}: not registered with the kubelet" in text
        async with KubeletSimulator(workdir) as kubelet:
            await kubelet.wait_registered(GPU, timeout=5)
            await until(lambda: p.manager.ready)
            assert await p.get("/readyz") == (200, "ready\n", "text/plain; charset=utf-8")
        await until(lambda: not p.manager.ready)
        status, text, _ = await p.get("/readyz")
        assert status == 503
        assert f"{GPU}: no ListAndWatch stream open" in text


async def test_readyz_again_after_kubelet_restart(workdir: Path) -> None:
    """After a kubelet restart /readyz answers 200 again once the plugin has re-registered."""
    async with node(workdir) as (p, kubelet):
        assert (await p.get("/readyz"))[0] == 200
        before = len(kubelet.registrations)
        await kubelet.restart()
        await kubelet.wait_registered(GPU, after=before, timeout=5)
        await until(lambda: p.manager.ready)
        assert (await p.get("/readyz"))[0] == 200


async def test_readyz_without_resources(workdir: Path) -> None:
    """A manager serving no resource is not ready, and says so."""
    metrics = Metrics()
    probes = ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings(address=LOCAL))
    assert probes.readyz() == (503, "not ready:\nno resource served\n")


async def test_healthz_ok_while_the_loop_keeps_time(workdir: Path) -> None:
    """/healthz answers 200 while the event loop runs its timers on time."""
    async with plant(workdir) as p:
        assert await p.get("/healthz") == (200, "ok\n", "text/plain; charset=utf-8")


async def test_healthz_fails_when_the_lag_timer_is_overdue(workdir: Path) -> None:
    """/healthz answers 503 once the lag timer is overdue by more than the limit (a clock that jumps 10 s)."""
    now = [0.0]
    settings = ProbeSettings(address=LOCAL, max_loop_lag_s=5.0, loop_check_interval_s=3600.0)
    async with plant(workdir, settings) as p:
        clocked = ProbeServer(p.manager, Metrics(), settings, clock=lambda: now[0])
        await clocked.start()
        try:
            url = f"http://127.0.0.1:{clocked.port}/healthz"
            async with p.http.get(url) as response:
                assert response.status == 200
            now[0] += 3600.0 + 10.0
            async with p.http.get(url) as response:
                assert response.status == 503
                assert "event loop 10.0 s late (limit 5 s)" in await response.text()
        finally:
            await clocked.aclose()


async def test_healthz_fails_after_the_loop_was_blocked(workdir: Path) -> None:
    """A loop blocked past the limit makes /healthz fail, and the next on-time tick makes it pass again."""
    settings = ProbeSettings(address=LOCAL, max_loop_lag_s=0.25, loop_check_interval_s=0.3)
    async with plant(workdir, settings) as p:
        monitor = p.probes.monitor
        ticks = monitor.ticks
        await until(lambda: monitor.ticks > ticks)
        time.sleep(0.9)  # noqa: ASYNC251 - blocking the event loop is what this test is about
        status, text, _ = await p.get("/healthz")
        assert status == 503, text
        ticks = monitor.ticks
        await until(lambda: monitor.ticks > ticks + 1)
        assert (await p.get("/healthz"))[0] == 200


async def test_metrics_served_as_prometheus_text_or_openmetrics(workdir: Path) -> None:
    """/metrics is Prometheus text by default and OpenMetrics when the scraper asks for it."""
    async with plant(workdir) as p:
        status, text, content_type = await p.get("/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "# TYPE gpuplugin_devices gauge" in text
        status, text, content_type = await p.get("/metrics", Accept="application/openmetrics-text; version=1.0.0")
        assert status == 200
        assert content_type.startswith("application/openmetrics-text")
        assert text.endswith("# EOF\n")


async def test_unknown_paths_and_methods_refused(workdir: Path) -> None:
    """Paths other than the three answer 404, and writes to them 405."""
    async with plant(workdir) as p:
        for path in ("/", "/debug", "/metrics/x", "/env"):
            assert (await p.get(path))[0] == 404
        async with p.http.post(f"http://127.0.0.1:{p.probes.port}/readyz") as response:
            assert response.status == 405


async def test_nothing_from_the_environment_is_exposed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No page shows environment values or paths from the backend's options: only resource names and counts."""
    secret = "s3cr3t-token-value"
    monkeypatch.setenv("GPUPLUGIN_TEST_TOKEN", secret)
    async with node(workdir) as (p, _):
        for path in ("/metrics", "/healthz", "/readyz"):
            _, text, _ = await p.get(path)
            assert secret not in text
            assert str(workdir) not in text


async def test_busy_port_fails_with_the_option_named(workdir: Path) -> None:
    """Listening on a port already taken fails with ProbeServerError naming the option, and leaves nothing behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = Metrics()
        probes = ProbeServer(
            make_manager(workdir, metrics), metrics, ProbeSettings(address=ListenAddress("127.0.0.1", port))
        )
        with pytest.raises(ProbeServerError, match=re.escape(f"--metrics-address 127.0.0.1:{port}: cannot listen")):
            await probes.start()
        await probes.aclose()


async def test_close_is_idempotent_and_port_forgotten(workdir: Path) -> None:
    """aclose twice is safe, and the port is no longer reported once closed."""
    metrics = Metrics()
    probes = ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings(address=LOCAL))
    await probes.start()
    assert probes.port > 0
    await probes.aclose()
    await probes.aclose()
    with pytest.raises(RuntimeError):
        _ = probes.port


def test_probe_server_needs_an_address(workdir: Path) -> None:
    """A probe server without an address is a programming error, caught at construction."""
    metrics = Metrics()
    with pytest.raises(ValueError, match="address"):
        ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings())
