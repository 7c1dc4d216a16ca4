"""Prometheus metrics: RPC latency on the hot path, everything else read from the manager when scraped; in DRA mode
claim counts and NodePrepareResources latency kept the same way, the rest read from the DRA daemon when scraped.

The Allocate path pays for one observation through the resource server's ``on_rpc`` hook: a bisect and three
integer additions on plain counters bound once per (resource, method), about a fifth of what a prometheus_client
``Histogram`` child costs with its locks (the hook runs on the event loop only, so no lock is needed). Devices,
streams, registrations and the health counters are not kept in gauges at all: one collector reads them, and the
RPC counters, at scrape time on the event loop, so they can never drift from what is served.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from gpuplugin import package_version
from gpuplugin.core.backend import Backend
from gpuplugin.core.model import Health
from gpuplugin.core.tasks import Supervisor
from gpuplugin.daemon.manager import Manager
from gpuplugin.devices.health import MAX_XID
from gpuplugin.kubelet.server import ResourceServer, ServerSettings

#: Allocate answers from a cache in tens of microseconds; anything near a second means the loop was blocked.
RPC_BUCKETS_S: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
#: Every health a served device can have, so each resource shows a 0 instead of a missing series.
_HEALTHS: Final = tuple(str(h) for h in Health)
_LE: Final = (*(str(b) for b in RPC_BUCKETS_S), "+Inf")
_OK: Final = "OK"
#: NodePrepareResources reads each new claim from the API server and writes its CDI spec and the checkpoint:
#: milliseconds on a healthy node, seconds when the API server is slow.
PREPARE_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _cumulative(bounds: Sequence[str], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (not cumulative) as a histogram's cumulative ``le`` buckets."""
    total, buckets = 0, []
    for le, count in zip(bounds, counts, strict=True):
        total += count
        buckets.append((le, float(total)))
    return buckets


class RpcStats:
    """One (resource, method)'s RPC counts: per latency bucket (not cumulative), their sum, and per status code."""

    __slots__ = ("buckets", "codes", "sum_s")

    def __init__(self) -> None:
        self.buckets = [0] * len(_LE)
        self.sum_s = 0.0
        # OK from the start: a rate over it exists from the first call, before any error happens.
        self.codes: dict[str, int] = {_OK: 0}

    def cumulative(self) -> list[tuple[str, float]]:
        return _cumulative(_LE, self.buckets)


class ClaimStats:
    """The DRA plugin's claim calls: claims prepared and unprepared, those that failed, and how long each
    NodePrepareResources took (per bucket, not cumulative). Counted on the event loop only."""

    __slots__ = ("prepare_buckets", "prepare_errors", "prepare_sum_s", "prepared", "unprepare_errors", "unprepared")

    def __init__(self) -> None:
        self.prepare_buckets = [0] * (len(PREPARE_BUCKETS_S) + 1)
        self.prepare_sum_s = 0.0
        self.prepared = 0
        self.prepare_errors = 0
        self.unprepared = 0
        self.unprepare_errors = 0

    def observe_prepare(self, seconds: float, prepared: int, failed: int) -> None:
        """One NodePrepareResources answered in ``seconds``: ``prepared`` claims without error, ``failed`` with one."""
        self.prepare_buckets[bisect_left(PREPARE_BUCKETS_S, seconds)] += 1
        self.prepare_sum_s += seconds
        self.prepared += prepared
        self.prepare_errors += failed

    def observe_unprepare(self, unprepared: int, failed: int) -> None:
        self.unprepared += unprepared
        self.unprepare_errors += failed


@dataclass(frozen=True, slots=True)
class DraReadings:
    """The DRA daemon's state at a scrape, read on the event loop."""

    devices: Mapping[str, int] = field(default_factory=dict)
    """Devices of the served tree by health (only healthy ones are in the ResourceSlices)."""
    prepared_claims: int = 0
    """Claims prepared now (in the checkpoint)."""
    registered: bool = False
    registrations: int = 0
    slices_current: bool = False
    """The API server holds the ResourceSlices of the served tree."""
    slice_publications: int = 0
    slice_failures: int = 0
    ready: bool = False
    backend: Backend | None = None


class Metrics:
    """The plugin's metrics, in a registry of their own (several managers, or tests, never share series)."""

    def __init__(self, *, version: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.rpc: dict[tuple[str, str], RpcStats] = {}
        """By (resource, method); read at scrape time."""
        self._manager: Manager | None = None
        self._loop_lag: Callable[[], float] | None = None
        self.supervisor: Supervisor | None = None
        self.claims = ClaimStats()
        """DRA mode: the plugin's claim calls, counted by the daemon's preparer."""
        self.dra: Callable[[], DraReadings] | None = None
        self.registry.register(_ManagerCollector(self, version or package_version()))
        # process_* (CPU seconds, resident memory, open file descriptors, start time) and python_info: what an
        # operator graphs first. The process collector reads /proc/self at scrape time, memory not disk.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def attach(self, manager: Manager) -> None:
        """Report this manager's state (devices, streams, registrations, health counters) on every scrape."""
        self._manager = manager

    @property
    def manager(self) -> Manager | None:
        return self._manager

    def attach_dra(self, readings: Callable[[], DraReadings]) -> None:
        """Report a DRA daemon (``gpuplugin_dra_*``, read through ``readings`` on every scrape) instead of a manager:
        the device plugin's own series are then left out."""
        self.dra = readings
        self.registry.register(_DraCollector(self))

    def watch_loop(self, lag_s: Callable[[], float] | None) -> None:
        """Report the event loop's lag (measured by the probe server) as ``gpuplugin_event_loop_lag_seconds``."""
        self._loop_lag = lag_s

    def watch_tasks(self, supervisor: Supervisor) -> None:
        """Report the restarts of this supervisor's tasks as ``gpuplugin_task_restarts_total``."""
        self.supervisor = supervisor

    @property
    def loop_lag(self) -> Callable[[], float] | None:
        return self._loop_lag

    def observe_rpc(self, resource: str, method: str, seconds: float, code: str) -> None:
        """Record one answered RPC: the resource server's ``on_rpc`` hook, on the Allocate path; event loop only."""
        stats = self.rpc.get((resource, method))
        if stats is None:
            stats = self.rpc[(resource, method)] = RpcStats()
        # bisect_left: the first bucket whose bound is >= seconds, Prometheus' "le".
        stats.buckets[bisect_left(RPC_BUCKETS_S, seconds)] += 1
        stats.sum_s += seconds
        stats.codes[code] = stats.codes.get(code, 0) + 1

    def server_factory(self, resource: str, backend: Backend, settings: ServerSettings) -> ResourceServer:
        """A ``Manager`` server factory whose resource servers report every RPC here."""
        return ResourceServer(resource, backend, settings, on_rpc=self.observe_rpc)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header (Prometheus text, or OpenMetrics when asked): body, content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Families:
    """One scrape's worth of the metrics read from the manager, empty until filled."""

    def __init__(self) -> None:
        self.rpc_duration = HistogramMetricFamily(
            "gpuplugin_rpc_duration_seconds",
            "Time to answer a device-plugin RPC, from request received to response sent.",
            labels=("resource", "method"),
        )
        self.rpc_total = CounterMetricFamily(
            "gpuplugin_rpc",
            "Device-plugin RPCs answered, by the gRPC status code they ended with (OK, INVALID_ARGUMENT, ...).",
            labels=("resource", "method", "code"),
        )
        self.build = InfoMetricFamily("gpuplugin_build", "The running gpuplugin.", labels=("version", "python"))
        self.devices = GaugeMetricFamily(
            "gpuplugin_devices", "Devices served per resource, by health as served.", labels=("resource", "health")
        )
        self.streams = GaugeMetricFamily(
            "gpuplugin_list_and_watch_streams", "Open ListAndWatch streams per resource.", labels=("resource",)
        )
        self.registrations = CounterMetricFamily(
            "gpuplugin_registrations",
            "Successful registrations with the kubelet per resource: the first one and every re-registration.",
            labels=("resource",),
        )
        self.registered = GaugeMetricFamily(
            "gpuplugin_registered", "1 when the resource's latest registration has succeeded.", labels=("resource",)
        )
        self.ready = GaugeMetricFamily(
            "gpuplugin_ready", "1 when every resource is served, registered and has a ListAndWatch stream open."
        )
        self.health_changes = CounterMetricFamily(
            "gpuplugin_health_changes",
            "Health changes applied to served devices, by new health and the XID behind it ('' for none).",
            labels=("health", "xid"),
        )
        self.xid_events = CounterMetricFamily(
            "gpuplugin_xid_events",
            "XIDs the backend saw, by XID and the action the health policy took (ignore, recover, fatal).",
            labels=("xid", "action"),
        )
        self.backend_errors = CounterMetricFamily(
            "gpuplugin_backend_errors",
            "Faults and errors the backend observed besides XIDs (ECC errors, lost GPUs, failing event waits).",
            labels=("backend", "kind"),
        )
        self.loop_lag = GaugeMetricFamily(
            "gpuplugin_event_loop_lag_seconds", "How late the event loop ran a timer, at the last measurement."
        )
        self.task_restarts = CounterMetricFamily(
            "gpuplugin_task_restarts",
            "Restarts of a long-lived task after it failed or ended unexpectedly (owner:name, as logged).",
            labels=("task",),
        )

    def process(self) -> list[Metric]:
        """What either mode reports: the build, the event loop, the tasks, and the backend's own counters."""
        return [self.build, self.xid_events, self.backend_errors, self.loop_lag, self.task_restarts]

    def all(self) -> list[Metric]:
        return [
            self.rpc_duration,
            self.rpc_total,
            self.build,
            self.devices,
            self.streams,
            self.registrations,
            self.registered,
            self.ready,
            self.health_changes,
            self.xid_events,
            self.backend_errors,
            self.loop_lag,
            self.task_restarts,
        ]


class _ManagerCollector:
    """Reads the manager's and its backend's state at scrape time, on the event loop (no locks needed)."""

    def __init__(self, metrics: Metrics, version: str) -> None:
        self._metrics = metrics
        self._version = version

    def describe(self) -> Iterable[Metric]:
        # Names only, so that the registry refuses another collector that would clash with these.
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        f = _Families()
        f.build.add_metric([self._version, platform.python_version()], {})
        for (resource, method), stats in self._metrics.rpc.items():
            f.rpc_duration.add_metric([resource, method], stats.cumulative(), stats.sum_s)
            for code, count in stats.codes.items():
                f.rpc_total.add_metric([resource, method, code], count)
        lag_s = self._metrics.loop_lag
        if lag_s is not None:
            f.loop_lag.add_metric([], lag_s())
        supervisor = self._metrics.supervisor
        if supervisor is not None:
            for task, count in sorted(supervisor.restarts.items()):
                f.task_restarts.add_metric([task], count)
        manager = self._metrics.manager
        if manager is not None:
            self._read(manager, f)
        dra = self._metrics.dra
        if dra is None:
            return f.all()
        backend = dra().backend
        if backend is not None:
            _read_backend(backend, f)
        return f.process()

    @staticmethod
    def _read(manager: Manager, f: _Families) -> None:
        for resource, server in sorted(manager.servers.items()):
            counts = dict.fromkeys(_HEALTHS, 0)
            if server.view is not None:
                for device in server.view.devices.values():
                    counts[str(device.health)] = counts.get(str(device.health), 0) + 1
            for health, count in counts.items():
                f.devices.add_metric([resource, health], count)
            f.streams.add_metric([resource], server.open_streams)
            f.registrations.add_metric([resource], server.registrations)
            f.registered.add_metric([resource], 1 if server.registered else 0)
        f.ready.add_metric([], 1 if manager.ready else 0)
        changes: Counter[tuple[str, str]] = Counter()
        for (health, xid), count in manager.health_changes.items():
            changes[(health, "" if xid is None else xid_label(xid))] += count
        for labels, count in changes.items():
            f.health_changes.add_metric(list(labels), count)
        _read_backend(manager.backend, f)


def _read_backend(backend: Backend, f: _Families) -> None:
    """The backend's XIDs and faults (``xid_counts``, ``fault_counts``), in either mode."""
    xids: Counter[tuple[str, str]] = Counter()
    for key, count in _counts(backend, "xid_counts").items():
        if isinstance(key, tuple) and len(key) == 2:
            xids[(xid_label(key[0]), str(key[1]))] += count
    for labels, count in xids.items():
        f.xid_events.add_metric(list(labels), count)
    for kind, count in _counts(backend, "fault_counts").items():
        f.backend_errors.add_metric([backend.name, str(kind)], count)


class _DraFamilies:
    """One scrape's worth of the DRA daemon's metrics, empty until filled."""

    def __init__(self) -> None:
        self.prepare_duration = HistogramMetricFamily(
            "gpuplugin_dra_prepare_duration_seconds",
            "Time to answer a NodePrepareResources call (all its claims), from request decoded to response built.",
        )
        self.prepared = CounterMetricFamily(
            "gpuplugin_dra_claims_prepared", "Claims NodePrepareResources answered without an error."
        )
        self.prepare_errors = CounterMetricFamily(
            "gpuplugin_dra_prepare_errors",
            "Claims NodePrepareResources answered with an error (not allocated here, unhealthy device, I/O).",
        )
        self.unprepared = CounterMetricFamily(
            "gpuplugin_dra_claims_unprepared", "Claims NodeUnprepareResources answered without an error."
        )
        self.unprepare_errors = CounterMetricFamily(
            "gpuplugin_dra_unprepare_errors", "Claims NodeUnprepareResources answered with an error."
        )
        self.prepared_claims = GaugeMetricFamily(
            "gpuplugin_dra_prepared_claims", "Claims prepared on the node now (kept in the checkpoint)."
        )
        self.devices = GaugeMetricFamily(
            "gpuplugin_dra_devices",
            "Devices of the node by health; the healthy ones are those published in the ResourceSlices.",
            labels=("health",),
        )
        self.slices_current = GaugeMetricFamily(
            "gpuplugin_dra_slices_current", "1 when the API server holds the ResourceSlices of the devices served."
        )
        self.publications = CounterMetricFamily(
            "gpuplugin_dra_slice_publications", "ResourceSlice pool generations published to the API server."
        )
        self.publish_failures = CounterMetricFamily(
            "gpuplugin_dra_slice_publish_failures",
            "Publications of a changed device list, or checks of the slices, that left them unpublished (each then "
            "retried with backoff).",
        )
        self.registrations = CounterMetricFamily(
            "gpuplugin_dra_registrations",
            "Times the kubelet reported the DRA plugin registered: the first one and one after each kubelet restart.",
        )
        self.registered = GaugeMetricFamily(
            "gpuplugin_dra_registered", "1 when the kubelet's latest report says the DRA plugin is registered."
        )
        self.ready = GaugeMetricFamily(
            "gpuplugin_dra_ready", "1 when the DRA plugin is registered and the node's ResourceSlices are published."
        )

    def all(self) -> list[Metric]:
        return list(vars(self).values())


class _DraCollector:
    """Reads the DRA daemon's state, and the claim counters, at scrape time on the event loop."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return _DraFamilies().all()

    def collect(self) -> Iterable[Metric]:
        f = _DraFamilies()
        claims = self._metrics.claims
        bounds = (*(str(b) for b in PREPARE_BUCKETS_S), "+Inf")
        f.prepare_duration.add_metric([], _cumulative(bounds, claims.prepare_buckets), claims.prepare_sum_s)
        f.prepared.add_metric([], claims.prepared)
        f.prepare_errors.add_metric([], claims.prepare_errors)
        f.unprepared.add_metric([], claims.unprepared)
        f.unprepare_errors.add_metric([], claims.unprepare_errors)
        readings = self._metrics.dra
        if readings is not None:
            r = readings()
            f.prepared_claims.add_metric([], r.prepared_claims)
            counts = dict.fromkeys(_HEALTHS, 0)
            counts.update(r.devices)
            for health, count in counts.items():
                f.devices.add_metric([health], count)
            f.slices_current.add_metric([], 1 if r.slices_current else 0)
            f.publications.add_metric([], r.slice_publications)
            f.publish_failures.add_metric([], r.slice_failures)
            f.registrations.add_metric([], r.registrations)
            f.registered.add_metric([], 1 if r.registered else 0)
            f.ready.add_metric([], 1 if r.ready else 0)
        return f.all()


def xid_label(xid: object) -> str:
    """An XID as a label value: its number from 0 to ``MAX_XID``, else ``other``, so that no value a driver (or a
    test) reports can add series without bound."""
    if isinstance(xid, int) and not isinstance(xid, bool) and 0 <= xid <= MAX_XID:
        return str(xid)
    return "other"


def _counts(backend: Backend, attribute: str) -> Mapping[object, int]:
    """A backend's optional counter (``xid_counts``, ``fault_counts``): backends without one report nothing."""
    counts = getattr(backend, attribute, None)
    return counts if isinstance(counts, Mapping) else {}
