"""The mock backend: settings, inventory, topology, and faults applied through the health tracker."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import gpuplugin.backends.mock
from gpuplugin.backends.mock import (
    ControlRequestError,
    MockBackend,
    MockSettings,
    NVLinkGroup,
    create,
    gpu_uuid,
    load_settings,
)
from gpuplugin.backends.registry import BackendContext, load_factory
from gpuplugin.core.backend import Backend, BackendEvent, HealthChanged, InventoryChanged
from gpuplugin.core.clock import VirtualClock
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import DeviceNode, Health, PCIeLevel
from gpuplugin.devices.health import HealthPolicy, XidAction

#: Virtual seconds: the health tests below run on a VirtualClock.
QUIET_S = 30.0
UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def context(state_dir: Path, **options: Any) -> BackendContext:
    return BackendContext(
        options=options, health_policy=HealthPolicy(recovery_quiet_period_s=QUIET_S), state_dir=state_dir
    )


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def backend(workdir: Path, clock: VirtualClock) -> AsyncIterator[MockBackend]:
    b = MockBackend(context(workdir), clock=clock)
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
async def events(backend: MockBackend) -> AsyncIterator[AsyncGenerator[BackendEvent, None]]:
    stream = backend.events()
    assert isinstance(stream, AsyncGenerator)
    try:
        yield stream
    finally:
        await stream.aclose()


async def next_event(stream: AsyncGenerator[BackendEvent, None], timeout_s: float = 2.0) -> BackendEvent:
    async with asyncio.timeout(timeout_s):
        return await anext(stream)


async def next_health(stream: AsyncGenerator[BackendEvent, None], timeout_s: float = 2.0) -> HealthChanged:
    event = await next_event(stream, timeout_s)
    assert isinstance(event, HealthChanged), event
    return event


def test_default_settings_describe_an_hgx_h200_board() -> None:
    """Defaults are eight H200s on two NUMA nodes, one NVSwitch with 18 links, and PCIe switches by pairs."""
    s = MockSettings()
    assert (s.gpus, s.model, s.memory_mib, s.resource, s.node_name) == (
        8,
        "NVIDIA H200",
        143771,
        "nvidia.com/gpu",
        "mock-node",
    )
    assert s.numa_nodes == 2
    assert s.nvlink_groups == (NVLinkGroup((0, 1, 2, 3, 4, 5, 6, 7), 18),)
    assert s.pcie_switches == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert s.device_node_host_path == "/dev/null"
    assert MockSettings.from_options({}, state_dir=Path("/var/run/x")).control_socket == Path("/var/run/x/mock.sock")


def test_create_is_the_registered_entry_point_and_a_backend(workdir: Path) -> None:
    """The `mock` entry point loads `create`, which returns something satisfying the Backend protocol."""
    assert load_factory("mock") is gpuplugin.backends.mock.create
    assert isinstance(create(context(workdir)), Backend)


async def test_default_inventory_has_eight_gpus_split_over_two_numa_nodes(backend: MockBackend) -> None:
    """Discover returns eight whole GPUs, the first four on NUMA node 0 and the rest on node 1."""
    tree = await backend.discover()
    assert len(tree.devices) == 8
    assert tree.resources == ("nvidia.com/gpu",)
    assert [d.numa_node for d in tree.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(d.gpu == d.id and UUID.match(d.id) for d in tree.devices)
    assert all(d.health is Health.HEALTHY for d in tree.devices)
    assert [d.attributes["index"] for d in tree.devices] == [str(i) for i in range(8)]


async def test_devices_carry_what_a_container_needs(backend: MockBackend) -> None:
    """Each GPU exposes its UUID in NVIDIA_VISIBLE_DEVICES and /dev/null as /dev/nvidiaN, plus operator attributes."""
    device = (await backend.discover()).devices[3]
    assert dict(device.spec.list_env) == {"NVIDIA_VISIBLE_DEVICES": device.id}
    assert device.spec.device_nodes == (DeviceNode("/dev/null", "/dev/nvidia3", "rw"),)
    assert dict(device.attributes) == {
        "index": "3",
        "model": "NVIDIA H200",
        "memory_mib": "143771",
        "pci_bus_id": "00000000:13:00.0",
    }


async def test_default_links_follow_nvswitch_pcie_switches_and_numa(backend: MockBackend) -> None:
    """Every pair has 18 NVLinks; PCIe is SINGLE behind one switch, NODE on one NUMA node, SYSTEM across."""
    tree = await backend.discover()
    ids = [d.id for d in tree.devices]
    assert len(tree.links) == 28
    assert all(link.nvlinks == 18 for link in tree.links.values())
    assert tree.link(ids[0], ids[1]).pcie is PCIeLevel.SINGLE
    assert tree.link(ids[6], ids[7]).pcie is PCIeLevel.SINGLE
    assert tree.link(ids[0], ids[3]).pcie is PCIeLevel.NODE
    assert tree.link(ids[4], ids[6]).pcie is PCIeLevel.NODE
    assert tree.link(ids[3], ids[4]).pcie is PCIeLevel.SYSTEM


async def test_custom_topology_sums_nvlinks_of_overlapping_groups(workdir: Path) -> None:
    """NVLink groups set per-pair link counts (summed where groups overlap); unlinked pairs have none."""
    settings = MockSettings.from_options(
        {"gpus": 4, "nvlink_groups": [[0, 1], {"gpus": [1, 2], "links": 4}, {"gpus": [0, 1], "links": 2}]},
        state_dir=workdir,
    )
    b = MockBackend(context(workdir), settings=settings)
    tree = await b.discover()
    ids = [d.id for d in tree.devices]
    assert tree.link(ids[0], ids[1]).nvlinks == 20
    assert tree.link(ids[1], ids[2]).nvlinks == 4
    assert tree.link(ids[0], ids[3]).nvlinks == 0


def test_uuids_are_deterministic_per_node_name() -> None:
    """The same node name and index always give the same UUID; another node name gives others."""
    # Pinned, not compared with itself: a mock UUID must be the same in every process, on every start.
    assert gpu_uuid("mock-node", 0) == "GPU-794a54b7-0b68-591b-b2d0-b055de3589fb"
    assert UUID.match(gpu_uuid("mock-node", 0))
    assert len({gpu_uuid("mock-node", i) for i in range(8)}) == 8
    assert gpu_uuid("node-a", 0) != gpu_uuid("node-b", 0)


async def test_uuids_survive_a_restart(workdir: Path) -> None:
    """Two backends with the same node name serve the same device IDs."""
    first = MockBackend(context(workdir), settings=MockSettings(node_name="kind-worker"))
    second = MockBackend(context(workdir), settings=MockSettings(node_name="kind-worker"))
    assert [d.id for d in (await first.discover()).devices] == [d.id for d in (await second.discover()).devices]
    assert (await first.discover()).devices[0].id == gpu_uuid("kind-worker", 0)


def test_topology_defaults_follow_the_gpu_count() -> None:
    """With four GPUs from options, the NVSwitch group, PCIe pairs and NUMA split cover exactly those four."""
    s = MockSettings.from_options({"gpus": "4"})
    assert s.gpus == 4
    assert s.nvlink_groups == (NVLinkGroup((0, 1, 2, 3)),)
    assert s.pcie_switches == ((0, 1), (2, 3))


async def test_yaml_config_is_read_at_start_and_options_override_it(workdir: Path) -> None:
    """Settings come from the YAML file named by `config`; options given alongside win over the file."""
    config = workdir / "mock.yaml"
    config.write_text(
        "gpus: 4\n"
        "model: NVIDIA H100 80GB HBM3\n"
        "memory_mib: 81559\n"
        "numa_nodes: 1\n"
        "nvlink_groups:\n"
        "  - {gpus: [0, 1, 2, 3], links: 12}\n"
        "pcie_switches: [[0, 1, 2, 3]]\n"
    )
    b = create(context(workdir, config=str(config), model="NVIDIA H100"))
    await b.start()
    try:
        tree = await b.discover()
    finally:
        await b.aclose()
    assert len(tree.devices) == 4
    assert {d.attributes["model"] for d in tree.devices} == {"NVIDIA H100"}
    assert {d.attributes["memory_mib"] for d in tree.devices} == {"81559"}
    assert {d.numa_node for d in tree.devices} == {0}
    assert {(link.nvlinks, link.pcie) for link in tree.links.values()} == {(12, PCIeLevel.SINGLE)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpus": "x"}, "mock.gpus: must be an integer from 1 to 1024, got 'x'"),
        ({"gpus": 0}, "mock.gpus: must be an integer from 1 to 1024, got 0"),
        ({"gpus": True}, "mock.gpus: must be an integer from 1 to 1024, got True"),
        ({"gpus": 100000}, "mock.gpus: must be an integer from 1 to 1024, got 100000"),
        ({"memory_mib": -1}, "mock.memory_mib: must be an integer from 1 to 1048576, got -1"),
        ({"numa_nodes": "two"}, "mock.numa_nodes: must be an integer from 1 to 1024, got 'two'"),
        ({"model": ""}, "mock.model: must be a non-empty string"),
        ({"resource": "gpu"}, "mock.resource: resource name 'gpu' is not an extended resource"),
        ({"gpu": 8}, "mock.gpu: unknown setting"),
        ({"nvlink_groups": [[0, 9]]}, "mock.nvlink_groups[0]: GPU index 9 out of range 0..7"),
        ({"nvlink_groups": [[0, 1], [2, 2]]}, "mock.nvlink_groups[1]: lists a GPU twice"),
        (
            {"nvlink_groups": [{"gpus": [0, 1], "links": 0}]},
            "mock.nvlink_groups[0].links: must be an integer from 1 to 64",
        ),
        ({"nvlink_groups": [{"links": 4}]}, "mock.nvlink_groups[0].gpus: missing"),
        ({"nvlink_groups": [[0, "a"]]}, "mock.nvlink_groups[0][1]: must be an integer from 0 to 1023, got 'a'"),
        ({"nvlink_groups": "all"}, "mock.nvlink_groups: expected list, got 'all'"),
        ({"gpus": 4, "pcie_switches": [[0, 1], [4, 5]]}, "mock.pcie_switches[1]: GPU index 4 out of range 0..3"),
        ({"pcie_switches": [[0, 1], [1, 2]]}, "mock.pcie_switches[1]: GPU 1 is already behind switch 0"),
        ({"device_node_host_path": "dev/null"}, "mock.device_node_host_path: must be an absolute path"),
        ({"control_socket": "/tmp/" + "s" * 120}, "mock.control_socket: "),
        ({"memory_mib": 2**20 + 1}, "mock.memory_mib: must be an integer from 1 to 1048576, got 1048577"),
        ({"numa_nodes": 1025}, "mock.numa_nodes: must be an integer from 1 to 1024, got 1025"),
        ({"nvlink_groups": [{"gpus": [0, 1], "links": 65}]}, "mock.nvlink_groups[0].links: must be an integer from 1"),
        ({"nvlink_groups": [[0, 1]] * 513}, "mock.nvlink_groups: has 513 entries, at most 512"),
        ({"pcie_switches": [[0]] * 1025}, "mock.pcie_switches: has 1025 entries, at most 1024"),
        ({"gpus": "9" * 5000}, "mock.gpus: must be an integer from 1 to 1024, got '99999"),
    ],
)
def test_a_bad_setting_raises_one_error_naming_it(options: dict[str, Any], message: str) -> None:
    """Each invalid setting raises ConfigError whose message starts with the setting's name."""
    with pytest.raises(ConfigError) as caught:
        MockSettings.from_options(options)
    assert str(caught.value).startswith(message), str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_settings_built_in_code_are_checked_too() -> None:
    """Constructing MockSettings directly with GPUs outside the layout fails, naming the group."""
    with pytest.raises(ConfigError, match=r"^mock\.nvlink_groups\[0\]: GPU index 4 out of range 0\.\.3$"):
        MockSettings(gpus=4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "mock.config: cannot read"),
        ("- 1\n- 2\n", "mock.config: .*: must be a mapping, got list"),
        ("gpus: [\n", "mock.config: .*: not valid YAML at line 2"),
        (b"gpus: \xff\n", r"mock.config: .*: not UTF-8 text \(byte 6 is 0xff\)"),
        ("gpus: " + "[" * 5000 + "\n", "mock.config: .*: (nested too deeply|not valid YAML)"),
        ("gpus: eight\n", "mock.gpus: must be an integer from 1 to 1024, got 'eight'"),
        ("nvlink_groups: [[0, 8]]\n", r"mock.nvlink_groups\[0\]: GPU index 8 out of range 0..7"),
    ],
)
async def test_a_bad_config_file_raises_an_error_naming_the_setting(
    workdir: Path, content: str | bytes | None, message: str
) -> None:
    """A missing, malformed, non-UTF-8 or invalid YAML file raises ConfigError naming `mock.config` or the bad
    field."""
    config = workdir / "mock.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content)
    with pytest.raises(ConfigError, match=f"^{message}"):
        await load_settings({"config": str(config)}, state_dir=workdir)


async def test_start_fails_with_the_config_error(workdir: Path) -> None:
    """A backend created with invalid options fails in start() with the error and leaves no socket behind."""
    b = create(context(workdir, gpus="x"))
    with pytest.raises(ConfigError, match=r"^mock\.gpus: "):
        await b.start()
    await b.aclose()
    assert not (workdir / "mock.sock").exists()


async def test_a_counted_xid_makes_the_gpu_unhealthy(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """A fatal XID emits HealthChanged Unhealthy for that GPU, and discover reports it so."""
    assert backend.xid(2, 79) is XidAction.FATAL
    event = await next_health(events)
    tree = await backend.discover()
    assert event == HealthChanged(gpu=tree.devices[2].id, health=Health.UNHEALTHY, reason="XID 79", xid=79)
    assert tree.devices[2].health is Health.UNHEALTHY
    assert [d.health for i, d in enumerate(tree.devices) if i != 2] == [Health.HEALTHY] * 7


async def test_an_ignored_xid_changes_nothing(backend: MockBackend, events: AsyncGenerator[BackendEvent, None]) -> None:
    """An application XID (13) emits no event: the next event is the one of a later fault."""
    assert backend.xid(0, 13) is XidAction.IGNORE
    backend.xid(1, 79)
    event = await next_health(events)
    assert (event.gpu, event.xid) == (gpu_uuid("mock-node", 1), 79)
    assert (await backend.discover()).devices[0].health is Health.HEALTHY


async def test_a_recoverable_xid_heals_after_the_quiet_period(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None], clock: VirtualClock
) -> None:
    """A recoverable XID makes the GPU Unhealthy, then Healthy again once quiet for the policy's period."""
    assert backend.xid(5, 63) is XidAction.RECOVER
    assert (await next_health(events)).health is Health.UNHEALTHY
    await clock.advance(QUIET_S - 0.1)
    assert backend.status()[5].health is Health.UNHEALTHY
    await clock.advance(0.1)
    healed = await next_health(events)
    assert healed.health is Health.HEALTHY
    assert healed.gpu == gpu_uuid("mock-node", 5)
    assert (await backend.discover()).devices[5].health is Health.HEALTHY


async def test_a_fatal_xid_stays(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None], clock: VirtualClock
) -> None:
    """After a fatal XID no recovery comes, however long the GPU stays quiet."""
    backend.xid(3, 48)
    assert (await next_health(events)).health is Health.UNHEALTHY
    await clock.advance(QUIET_S * 4)
    backend.unplug(7)
    # The unplug's event comes next: nothing was emitted in between.
    assert isinstance(await next_event(events), InventoryChanged)
    assert (await backend.discover()).devices[3].health is Health.UNHEALTHY


async def test_a_lost_gpu_stays_unhealthy_until_recovered(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """`lose` makes the GPU Unhealthy with the reason given; `recover` makes it Healthy and no longer lost."""
    backend.lose(4, "fell off the bus in CI")
    lost = await next_health(events)
    assert (lost.gpu, lost.health, lost.reason) == (
        gpu_uuid("mock-node", 4),
        Health.UNHEALTHY,
        "fell off the bus in CI",
    )
    assert backend.status()[4].lost
    backend.recover(4)
    healed = await next_health(events)
    assert (healed.gpu, healed.health) == (gpu_uuid("mock-node", 4), Health.HEALTHY)
    assert not backend.status()[4].lost
    assert (await backend.discover()).devices[4].health is Health.HEALTHY


async def test_a_lost_gpu_fails_its_probe_so_partitions_do_not_heal(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None], clock: VirtualClock
) -> None:
    """A partition's recoverable XID does not heal while its GPU is lost; it heals once the GPU is recovered."""
    backend.lose(0)
    assert (await next_health(events)).instance is None
    backend.xid(0, 63, (1, 0))
    assert (await next_health(events)).instance == (1, 0)
    await clock.advance(QUIET_S * 4)
    assert backend.status()[0].faults[1].instance == (1, 0)
    backend.recover(0)
    whole = await next_health(events)
    assert (whole.instance, whole.health) == (None, Health.HEALTHY)
    # The tracker probes again within its longest probe backoff.
    await clock.advance(HealthPolicy().probe_retry_max_s)
    partition = await next_health(events)
    assert (partition.instance, partition.health) == ((1, 0), Health.HEALTHY)


async def test_unplug_and_plug_emit_the_new_inventory(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """Unplugging a GPU emits a tree without it (and its links); plugging it back emits the full tree again."""
    gone = gpu_uuid("mock-node", 6)
    assert backend.unplug(6)
    event = await next_event(events)
    assert isinstance(event, InventoryChanged)
    assert gone not in event.tree.gpus()
    assert len(event.tree.devices) == 7
    assert len(event.tree.links) == 21
    assert all(gone not in pair for pair in event.tree.links)
    assert await backend.discover() == event.tree
    assert not backend.unplug(6)
    assert backend.plug(6)
    event = await next_event(events)
    assert isinstance(event, InventoryChanged)
    assert event.tree.gpus()[6] == gone
    assert len(event.tree.links) == 28
    assert not backend.plug(6)


async def test_an_unplugged_gpu_keeps_its_faults(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """A GPU plugged back in is still Unhealthy if it was when unplugged; it takes no XIDs while out."""
    backend.xid(1, 79)
    await next_health(events)
    backend.unplug(1)
    await next_event(events)
    with pytest.raises(ControlRequestError, match="gpu: GPU 1 is unplugged"):
        backend.xid(1, 79)
    assert backend.status()[1].present is False
    backend.plug(1)
    event = await next_event(events)
    assert isinstance(event, InventoryChanged)
    assert event.tree.devices[1].health is Health.UNHEALTHY


async def test_a_gpu_index_out_of_range_is_refused(backend: MockBackend) -> None:
    """Fault methods refuse an index the inventory does not have, naming the valid range."""
    with pytest.raises(ControlRequestError, match=r"^gpu: index 8 out of range 0\.\.7$"):
        backend.lose(8)


async def test_disabled_health_checks_ignore_every_fault(workdir: Path) -> None:
    """With checks disabled by policy, XIDs and lost GPUs leave every device Healthy."""
    ctx = BackendContext(health_policy=HealthPolicy(checks_enabled=False), state_dir=workdir)
    b = MockBackend(ctx, settings=MockSettings(control_socket=workdir / "mock.sock"))
    await b.start()
    try:
        assert b.xid(0, 79) is XidAction.IGNORE
        b.lose(1)
        assert {d.health for d in (await b.discover()).devices} == {Health.HEALTHY}
    finally:
        await b.aclose()


async def test_aclose_removes_the_socket_and_is_safe_twice(workdir: Path) -> None:
    """aclose stops the control server and removes its socket file; a second call does nothing."""
    b = create(context(workdir))
    await b.start()
    assert (workdir / "mock.sock").is_socket()
    await b.aclose()
    assert not (workdir / "mock.sock").exists()
    await b.aclose()


async def test_close_with_a_recovery_pending_leaves_no_task(workdir: Path) -> None:
    """Closing while a recoverable XID waits out its quiet period cancels the timer (no leaked task)."""
    b = create(BackendContext(health_policy=HealthPolicy(recovery_quiet_period_s=60), state_dir=workdir))
    await b.start()
    b.xid(0, 63)
    await b.aclose()


async def test_status_shows_the_fault_in_force_after_it_escalates(
    backend: MockBackend, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """A recoverable XID then a fatal one: status names the fatal XID, which no health event announced."""
    backend.xid(2, 63)
    assert (await next_health(events)).health is Health.UNHEALTHY
    backend.xid(2, 79)
    (fault,) = backend.status()[2].faults
    assert (fault.xid, fault.reason) == (79, "XID 79")
    assert backend.status()[2].health is Health.UNHEALTHY
