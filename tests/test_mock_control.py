"""The mock backend's control socket (JSON lines), its async client and the `gpuplugin mock` commands."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiofiles.os
import pytest
import structlog.testing
from click.testing import CliRunner, Result

from gpuplugin.backends.mock import (
    ControlRequestError,
    ControlUnavailable,
    LoseRequest,
    MockBackend,
    RecoverRequest,
    StatusRequest,
    XidRequest,
    control,
    create,
    gpu_uuid,
    parse_request,
)
from gpuplugin.backends.mock.cli import mock_cli
from gpuplugin.backends.mock.control import CHECK_INTERVAL_S, ControlServer
from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.backends.partitioned import create as create_partitioned
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import BackendEvent, HealthChanged, InventoryChanged
from gpuplugin.core.model import Health
from gpuplugin.devices.health import MAX_XID, HealthPolicy
from tests.fakes import until


@pytest.fixture
async def backend(workdir: Path) -> AsyncIterator[MockBackend]:
    b = create(BackendContext(health_policy=HealthPolicy(recovery_quiet_period_s=0.05), state_dir=workdir))
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
def sock(backend: MockBackend) -> Path:
    return backend.settings.control_socket


@pytest.fixture
async def events(backend: MockBackend) -> AsyncIterator[AsyncGenerator[BackendEvent, None]]:
    stream = backend.events()
    assert isinstance(stream, AsyncGenerator)
    try:
        yield stream
    finally:
        await stream.aclose()


async def next_event(stream: AsyncGenerator[BackendEvent, None]) -> BackendEvent:
    async with asyncio.timeout(2.0):
        return await anext(stream)


class Connection:
    """One raw client connection, to send several lines on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, line: bytes) -> dict[str, Any]:
        self.writer.write(line + b"\n")
        await self.writer.drain()
        async with asyncio.timeout(2.0):
            answer: dict[str, Any] = json.loads(await self.reader.readline())
        return answer


@pytest.fixture
async def connection(sock: Path) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        yield Connection(reader, writer)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        ({"op": "xid", "gpu": 0, "xid": 79}, XidRequest(0, 79)),
        ({"op": "xid", "gpu": 1, "xid": 31, "instance": [2, 0]}, XidRequest(1, 31, (2, 0))),
        ({"op": "lose", "gpu": 3}, LoseRequest(3)),
        ({"op": "lose", "gpu": 3, "reason": "pulled"}, LoseRequest(3, "pulled")),
        ({"op": "recover", "gpu": 3, "instance": None}, RecoverRequest(3)),
        ({"op": "status"}, StatusRequest()),
    ],
)
def test_valid_requests_parse_into_typed_requests(message: dict[str, Any], parsed: object) -> None:
    """Each op with its fields parses into its request dataclass, optional fields defaulted."""
    assert parse_request(message) == parsed


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([1, 2], "a request is a JSON object, got list"),
        ({"gpu": 0}, "op: must be one of xid, lose, recover, unplug, plug, status, timeslices, got None"),
        ({"op": "reboot"}, "op: must be one of"),
        ({"op": "xid", "gpu": 0}, "xid: missing field xid"),
        ({"op": "plug"}, "plug: missing field gpu"),
        ({"op": "unplug", "gpu": 0, "force": True}, "unplug: unknown field force"),
        ({"op": "xid", "gpu": "0", "xid": 79}, "gpu: must be a non-negative integer, got '0'"),
        ({"op": "xid", "gpu": True, "xid": 79}, "gpu: must be a non-negative integer, got True"),
        ({"op": "xid", "gpu": 0, "xid": -1}, f"xid: must be an XID number from 0 to {MAX_XID}, got -1"),
        (
            {"op": "xid", "gpu": 0, "xid": 99999999999},
            f"xid: must be an XID number from 0 to {MAX_XID}, got 99999999999",
        ),
        (
            {"op": "xid", "gpu": 0, "xid": MAX_XID + 1},
            f"xid: must be an XID number from 0 to {MAX_XID}, got {MAX_XID + 1}",
        ),
        ({"op": "xid", "gpu": 0, "xid": 79, "instance": [1]}, "instance: must be [gpu_instance, compute_instance]"),
        ({"op": "lose", "gpu": 0, "reason": ""}, "reason: must be a non-empty string"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(message: object, error: str) -> None:
    """A malformed request raises ControlRequestError whose message starts with the field at fault."""
    with pytest.raises(ControlRequestError) as caught:
        parse_request(message)
    assert str(caught.value).startswith(error), str(caught.value)


async def test_an_xid_over_the_socket_reaches_the_health_tracker(
    sock: Path, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """`control` sends an xid request; the answer names the GPU and action, and an Unhealthy event follows."""
    answer = await control(sock, {"op": "xid", "gpu": 2, "xid": 79})
    uuid = gpu_uuid("mock-node", 2)
    assert answer == {"ok": True, "gpu": 2, "uuid": uuid, "xid": 79, "instance": None, "action": "fatal"}
    event = await next_event(events)
    assert event == HealthChanged(gpu=uuid, health=Health.UNHEALTHY, reason="XID 79", xid=79)


async def test_every_op_works_over_the_socket(sock: Path, events: AsyncGenerator[BackendEvent, None]) -> None:
    """lose, recover, unplug, plug and status answer ok and have their effect."""
    assert (await control(sock, {"op": "lose", "gpu": 0}))["lost"] is True
    assert (await next_event(events)) == HealthChanged(
        gpu=gpu_uuid("mock-node", 0), health=Health.UNHEALTHY, reason="GPU has fallen off the bus"
    )
    assert (await control(sock, {"op": "recover", "gpu": 0}))["ok"] is True
    healed = await next_event(events)
    assert isinstance(healed, HealthChanged)
    assert healed.health is Health.HEALTHY
    assert (await control(sock, {"op": "unplug", "gpu": 7}))["changed"] is True
    unplugged = await next_event(events)
    assert isinstance(unplugged, InventoryChanged)
    assert len(unplugged.tree.devices) == 7
    status = await control(sock, {"op": "status"})
    assert [g["present"] for g in status["gpus"]] == [True] * 7 + [False]
    assert (await control(sock, {"op": "plug", "gpu": 7}))["changed"] is True
    assert isinstance(await next_event(events), InventoryChanged)


async def test_status_reports_each_gpu_with_its_faults(sock: Path, backend: MockBackend) -> None:
    """status lists every GPU with index, uuid, presence, lost flag, health and current faults."""
    backend.xid(1, 48, (3, 0))
    backend.xid(2, 79)
    gpus = (await control(sock, {"op": "status"}))["gpus"]
    assert len(gpus) == 8
    assert gpus[0] == {
        "index": 0,
        "uuid": gpu_uuid("mock-node", 0),
        "present": True,
        "lost": False,
        "health": "Healthy",
        "faults": [],
    }
    # A partition's fault leaves the whole GPU Healthy.
    assert (gpus[1]["health"], gpus[1]["faults"]) == ("Healthy", [{"reason": "XID 48", "xid": 48, "instance": [3, 0]}])
    assert (gpus[2]["health"], gpus[2]["faults"]) == ("Unhealthy", [{"reason": "XID 79", "xid": 79, "instance": None}])


async def test_bad_input_is_answered_and_the_connection_stays_usable(connection: Connection) -> None:
    """Garbage, unknown ops, missing fields and out-of-range GPUs each get one error answer, then requests work."""
    bad = [
        (b"this is not json", "not a JSON request"),
        (b"\xff\xfe", "not a JSON request"),
        (b"[]", "a request is a JSON object"),
        (b'{"op": "explode"}', "op: must be one of"),
        (b'{"op": "xid", "gpu": 0}', "xid: missing field xid"),
        (b'{"op": "xid", "gpu": 8, "xid": 79}', "gpu: index 8 out of range 0..7"),
        (b'{"op": "lose", "gpu": 99}', "gpu: index 99 out of range 0..7"),
    ]
    for line, error in bad:
        answer = await connection.ask(line)
        assert answer["ok"] is False, line
        assert answer["error"].startswith(error), answer
    answer = await connection.ask(b'{"op": "status"}')
    assert answer["ok"] is True
    assert len(answer["gpus"]) == 8


async def test_an_overlong_request_is_refused_and_the_connection_closed(connection: Connection) -> None:
    """A request line over the limit is answered with an error and the server hangs up (it cannot resync)."""
    answer = await connection.ask(b'{"op": "status", "pad": "' + b"x" * 100_000 + b'"}')
    assert answer == {"ok": False, "error": "request longer than 65536 bytes"}
    async with asyncio.timeout(2.0):
        assert await connection.reader.read() == b""


async def test_the_socket_is_private_to_its_owner(sock: Path) -> None:
    """The control socket is created with mode 0600: whoever can connect can fail GPUs."""
    assert stat.S_IMODE((await aiofiles.os.stat(sock)).st_mode) == 0o600


async def test_close_ends_open_connections(workdir: Path) -> None:
    """aclose hangs up on connected clients, removes the socket file and leaves no task behind."""
    b = create(BackendContext(state_dir=workdir))
    await b.start()
    reader, writer = await asyncio.open_unix_connection(b.settings.control_socket)
    try:
        # One round trip, so that the server has accepted the connection and waits for the next line.
        assert (await Connection(reader, writer).ask(b'{"op": "status"}'))["ok"] is True
        await b.aclose()
        async with asyncio.timeout(2.0):
            assert await reader.read() == b""
        assert not b.settings.control_socket.exists()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_client_says_when_no_backend_listens(workdir: Path) -> None:
    """control() on a missing socket raises ControlUnavailable telling how to start the backend."""
    with pytest.raises(
        ControlUnavailable, match=r"no mock backend listening on .*: is `gpuplugin serve --backend mock`"
    ):
        await control(workdir / "none.sock", {"op": "status"})


async def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run a `gpuplugin mock` command in a thread, so that the backend keeps serving on this loop."""
    # The backend logs to stdout on this loop while CliRunner has replaced stdout: keep its logs out of the output.
    with structlog.testing.capture_logs():
        return await asyncio.to_thread(CliRunner().invoke, mock_cli, list(args), env=env)


async def test_cli_xid_prints_the_action_and_fails_the_gpu(
    sock: Path, backend: MockBackend, events: AsyncGenerator[BackendEvent, None]
) -> None:
    """`gpuplugin mock xid` prints the GPU and the action taken, and the GPU (here a partition of it) turns
    Unhealthy."""
    backend.partitions_served({gpu_uuid("mock-node", 1): [(1, 0), (2, 1)]})
    result = await invoke("xid", "--gpu", "1", "--xid", "79", "--instance", "2,1", "--socket", str(sock))
    assert result.exit_code == 0, result.output
    assert result.output == f"GPU 1 ({gpu_uuid('mock-node', 1)}): XID 79 on instance 2,1: fatal\n"
    event = await next_event(events)
    assert isinstance(event, HealthChanged)
    assert (event.instance, event.health) == ((2, 1), Health.UNHEALTHY)


async def test_cli_refuses_an_xid_out_of_range_with_one_line(sock: Path, backend: MockBackend) -> None:
    """An XID past the range (99999999999) is refused with one line naming the range; nothing is counted."""
    result = await invoke("xid", "--gpu", "0", "--xid", "99999999999", "--socket", str(sock))
    assert result.exit_code == 1
    assert result.output == f"Error: xid: must be an XID number from 0 to {MAX_XID}, got 99999999999\n"
    assert not backend.xid_counts and all(s.faults == () for s in backend.status())


async def test_cli_refuses_an_instance_on_a_whole_gpu_with_one_line(sock: Path, backend: MockBackend) -> None:
    """--instance on a GPU served whole would change nothing: refused with one line, and nothing is raised."""
    for command in (("xid", "--xid", "79"), ("recover",)):
        result = await invoke(command[0], "--gpu", "0", *command[1:], "--instance", "1,0", "--socket", str(sock))
        assert result.exit_code == 1
        assert result.output == (
            "Error: instance: GPU 0 is not partitioned (it is served whole); leave out the instance, or serve it "
            "through the partitioned backend\n"
        )
    assert all(s.faults == () for s in backend.status())


async def test_an_instance_must_be_one_of_the_gpus_served_partitions(sock: Path, backend: MockBackend) -> None:
    """On a partitioned GPU the control takes its partitions only, and names them when refusing another."""
    backend.partitions_served({gpu_uuid("mock-node", 0): [(2, 0), (1, 0)]})
    refused = await control(sock, {"op": "xid", "gpu": 0, "xid": 79, "instance": [3, 0]})
    assert refused == {"ok": False, "error": "instance: GPU 0 has no partition 3,0; it has 1,0 2,0"}
    accepted = await control(sock, {"op": "xid", "gpu": 0, "xid": 79, "instance": [2, 0]})
    assert accepted["ok"] and accepted["instance"] == [2, 0]
    not_partitioned = await control(sock, {"op": "recover", "gpu": 1, "instance": [2, 0]})
    assert not not_partitioned["ok"] and "GPU 1 is not partitioned" in not_partitioned["error"]


async def test_cli_commands_drive_every_op(sock: Path, backend: MockBackend) -> None:
    """lose, recover, unplug and plug each print what happened and change the backend's state."""
    for args, expected in [
        (("lose", "--gpu", "3"), "lost"),
        (("recover", "--gpu", "3"), "recovered"),
        (("unplug", "--gpu", "4"), "unplugged"),
        (("unplug", "--gpu", "4"), "already unplugged"),
        (("plug", "--gpu", "4"), "plugged"),
    ]:
        result = await invoke(*args, "--socket", str(sock))
        assert result.exit_code == 0, result.output
        assert result.output == f"GPU {args[2]} ({gpu_uuid('mock-node', int(args[2]))}): {expected}\n"
    assert [s.present for s in backend.status()] == [True] * 8
    assert not backend.status()[3].lost


async def test_cli_status_prints_a_table_or_json(sock: Path, backend: MockBackend) -> None:
    """`status` prints one row per GPU; with --json it prints the GPUs as the control socket reports them."""
    backend.xid(0, 79)
    table = await invoke("status", "--socket", str(sock))
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["INDEX", "UUID", "PRESENT", "LOST", "HEALTH", "FAULTS"]
    assert lines[1].split() == ["0", gpu_uuid("mock-node", 0), "yes", "no", "Unhealthy", "XID", "79"]
    assert len(lines) == 9
    as_json = await invoke("status", "--json", env={"GPUPLUGIN_MOCK_SOCKET": str(sock)})
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == (await control(sock, {"op": "status"}))["gpus"]


async def test_cli_reports_a_refused_request_and_exits_non_zero(sock: Path) -> None:
    """A request the backend refuses prints its error on one line and exits with status 1."""
    result = await invoke("lose", "--gpu", "8", "--socket", str(sock))
    assert result.exit_code == 1
    assert result.output == "Error: gpu: index 8 out of range 0..7\n"


async def test_cli_without_a_backend_says_how_to_start_one(workdir: Path) -> None:
    """With no backend on the socket, commands print one line naming the socket and exit non-zero."""
    missing = workdir / "none.sock"
    result = await invoke("status", "--socket", str(missing))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: no mock backend listening on {missing}: is `gpuplugin serve --backend mock` running?\n"
    )


async def test_cli_rejects_a_malformed_instance(sock: Path) -> None:
    """--instance must be two integers GI,CI; anything else is a usage error (exit 2)."""
    result = await invoke("xid", "--gpu", "0", "--xid", "79", "--instance", "1", "--socket", str(sock))
    assert result.exit_code == 2
    assert "must be GI,CI" in result.output


def test_cli_socket_defaults_to_the_backends_default_path() -> None:
    """Without --socket or the variable, commands use /run/gpuplugin/mock.sock, as the backend does."""
    result = CliRunner().invoke(mock_cli, ["status", "--help"])
    assert result.exit_code == 0
    assert "/run/gpuplugin/mock.sock" in result.output
    assert "GPUPLUGIN_MOCK_SOCKET" in result.output


async def test_the_partitioned_backend_tells_the_mock_which_instances_exist(workdir: Path) -> None:
    """Under the partitioned backend the control takes a served partition (7 per GPU by default) and refuses
    another, over the socket as `gpuplugin mock` sends it."""
    backend = create_partitioned(BackendContext(options={"parent_options": {"gpus": 2}}, state_dir=workdir))
    await backend.start()
    try:
        sock = workdir / "mock.sock"
        served = {d.instance for d in (await backend.discover()).devices if d.gpu == gpu_uuid("mock-node", 0)}
        assert (1, 0) in served and (99, 0) not in served
        accepted = await control(sock, {"op": "xid", "gpu": 0, "xid": 79, "instance": [1, 0]})
        assert accepted["ok"] and accepted["action"] == "fatal"
        refused = await control(sock, {"op": "xid", "gpu": 0, "xid": 79, "instance": [99, 0]})
        assert not refused["ok"] and refused["error"].startswith("instance: GPU 0 has no partition 99,0; it has 1,0")
    finally:
        await backend.aclose()


# Every node its own UUIDs: the seed is the Kubernetes node's name.


def test_uuids_are_seeded_by_the_kubernetes_node_name_unless_set() -> None:
    """NODE_NAME (the downward API's spec.nodeName) seeds the UUIDs, so two nodes differ; node_name, if set, wins;
    without either the seed stays mock-node."""
    on_a = MockSettings.from_options({}, env={"NODE_NAME": "kind-worker"})
    on_b = MockSettings.from_options({}, env={"NODE_NAME": "kind-worker2"})
    assert (on_a.node_name, on_b.node_name) == ("kind-worker", "kind-worker2")
    assert Inventory.build(on_a).devices[0].id == gpu_uuid("kind-worker", 0) != Inventory.build(on_b).devices[0].id
    assert MockSettings.from_options({"node_name": "fixed"}, env={"NODE_NAME": "kind-worker"}).node_name == "fixed"
    assert MockSettings.from_options({}, env={}).node_name == "mock-node"
    assert MockSettings.from_options({}, env={"NODE_NAME": ""}).node_name == "mock-node"


async def test_a_deleted_control_socket_is_served_again(sock: Path, backend: MockBackend) -> None:
    """A control socket deleted under a running mock backend (``/run`` cleaned) is served again at the same path,
    private to its owner, within a few seconds, and the CLI reaches the backend through it."""
    with structlog.testing.capture_logs() as logs:
        sock.unlink()
        # Logged once it listens again with the socket's mode set.
        served_again = "mock control socket gone; serving it again"
        await until(lambda: any(e["event"] == served_again for e in logs), timeout_s=3 * CHECK_INTERVAL_S)
        answer = await control(sock, {"op": "status"})
    assert answer["ok"] is True
    assert len(answer["gpus"]) == backend.settings.gpus
    assert stat.S_IMODE((await aiofiles.os.stat(sock)).st_mode) == 0o600
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == [served_again]
    result = await invoke("status", "--socket", str(sock))
    assert result.exit_code == 0, result.output


async def test_a_control_socket_another_backend_serves_is_never_taken_over(workdir: Path) -> None:
    """Where another mock backend's live socket has replaced ours at our path, it is left alone; once nobody
    listens on that file any more, ours is served there again."""
    path = workdir / "mock.sock"
    ours = ControlServer(path, lambda request: {"who": "ours"}, check_interval_s=0.05)
    theirs = ControlServer(workdir / "theirs.sock", lambda request: {"who": "theirs"})
    await ours.start()
    try:
        await theirs.start()
        with structlog.testing.capture_logs() as logs:
            # At once, never missing in between: ours would be served again in that gap.
            (workdir / "theirs.sock").rename(path)
            await until(lambda: any(e["event"].startswith("mock control socket now served by") for e in logs))
            assert (await control(path, {"op": "status"}))["who"] == "theirs"
            await theirs.aclose()
            await until(lambda: any(e["event"] == "mock control socket gone; serving it again" for e in logs))
            assert (await control(path, {"op": "status"}))["who"] == "ours"
    finally:
        await theirs.aclose()
        await ours.aclose()
    assert not path.exists()
