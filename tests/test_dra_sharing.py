"""Sharing through a claim over the real sockets: time-slicing set in the claim's opaque config (our driver's
``GpuConfig``), containers of a pod sharing one claim, bad configs failing their claim only, and the example in
deploy/dra/shared-claim.yaml.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gpuplugin.devices.mps import ControlDaemonSettings
from gpuplugin.dra.checkpoint import CheckpointCorrupt, PreparedClaim, decode, encode
from gpuplugin.dra.claims import AllocatedDevice, ClaimRef, ClaimUnavailable, OpaqueConfig, allocation_of
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.driver import DEFAULT_DRIVER_NAME
from gpuplugin.dra.sharing import API_VERSION, INTERVAL_ENV, INTERVALS, KIND, STRATEGY_ENV, interval_of
from gpuplugin.testing.dra import PodNotStarted
from tests.test_deploy import validate
from tests.test_dra import DRIVER, NODE, DraNode, cdi_spec, dra_node, env_of
from tests.test_dra_apiserver import cluster
from tests.test_dra_fuzz import FUZZ
from tests.test_mps import FAKE_CONTROL

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "dra" / "shared-claim.yaml"


def fake_daemons() -> ControlDaemonSettings:
    """Claims' MPS control daemons run as tests/fake_mps_control.py."""
    return ControlDaemonSettings(command=(sys.executable, FAKE_CONTROL))


def gpu_config(sharing: Any = None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, **extra}
    if sharing is not None:
        params["sharing"] = sharing
    return params


def opaque(parameters: Any, *, driver: str = DRIVER, requests: list[str] | None = None) -> dict[str, Any]:
    """One entry of an allocation result's ``config`` list."""
    entry: dict[str, Any] = {"source": "FromClaim", "opaque": {"driver": driver, "parameters": parameters}}
    if requests is not None:
        entry["requests"] = requests
    return entry


def time_sliced(interval: str | None = None) -> dict[str, Any]:
    sharing: dict[str, Any] = {"strategy": "TimeSlicing"}
    if interval is not None:
        sharing["timeSlicingConfig"] = {"interval": interval}
    return gpu_config(sharing)


def shared_claim(node: DraNode, *config: dict[str, Any], devices: dict[str, list[str]] | None = None) -> ClaimRef:
    return node.claims.allocate(DRIVER, NODE, devices or {"gpu": [node.names()[0]]}, config=list(config))


def envs(node: DraNode, claim: ClaimRef) -> dict[str, dict[str, str]]:
    """Each CDI device's environment by its request (the part of its name after the claim UID)."""
    return {
        device["name"].removeprefix(f"{claim.uid}-"): dict(e.split("=", 1) for e in device["containerEdits"]["env"])
        for device in cdi_spec(node, claim)["devices"]
    }


async def test_a_time_sliced_claim_gets_its_gpu_and_the_interval_in_its_environment(workdir: Path) -> None:
    """A claim configured for time-slicing at the Long interval: its CDI device shows the GPU, as unshared, plus the
    strategy and interval; a claim without config gets neither."""
    async with dra_node(workdir) as node:
        sliced, plain = shared_claim(node, opaque(time_sliced("Long"))), node.claim(node.names()[1])
        response = await node.prepare(sliced, plain)
        assert [response.claims[c.uid].error for c in (sliced, plain)] == ["", ""]
        assert env_of(cdi_spec(node, sliced)) == {
            "NVIDIA_VISIBLE_DEVICES": node.tree.devices[0].id,
            STRATEGY_ENV: "TimeSlicing",
            INTERVAL_ENV: "Long",
        }
        assert env_of(cdi_spec(node, plain)) == {"NVIDIA_VISIBLE_DEVICES": node.tree.devices[1].id}


async def test_time_slicing_without_its_config_takes_the_default_interval(workdir: Path) -> None:
    """``strategy: TimeSlicing`` alone means the Default interval; a GpuConfig without ``sharing`` shares nothing."""
    async with dra_node(workdir) as node:
        sliced = shared_claim(node, opaque(time_sliced()))
        unshared = shared_claim(node, opaque(gpu_config()), devices={"gpu": [node.names()[1]]})
        await node.prepare(sliced, unshared)
        assert env_of(cdi_spec(node, sliced))[INTERVAL_ENV] == "Default"
        assert STRATEGY_ENV not in env_of(cdi_spec(node, unshared))


async def test_config_for_another_driver_is_ignored_even_when_it_is_not_ours_to_read(workdir: Path) -> None:
    """Another driver's config, in any shape, neither fails the claim nor shares its GPU."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque({"kind": "Else", "sharing": 7}, driver="gpu.nvidia.com"))
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        assert STRATEGY_ENV not in env_of(cdi_spec(node, claim))


async def test_a_config_applies_to_the_requests_it_names_and_the_last_one_wins(workdir: Path) -> None:
    """A config naming ``train`` shares that request's GPU only; of two configs naming it, the later (the claim's,
    after its class's) sets the interval; one naming no request applies to every request."""
    async with dra_node(workdir, gpus=4) as node:
        first, second, third, fourth = node.names()
        named = shared_claim(
            node,
            opaque(time_sliced("Short"), requests=["train"]),
            opaque(time_sliced("Medium"), requests=["train"]),
            devices={"train": [first], "eval": [second]},
        )
        everything = shared_claim(node, opaque(time_sliced("Long")), devices={"train": [third], "eval": [fourth]})
        response = await node.prepare(named, everything)
        assert all(response.claims[c.uid].error == "" for c in (named, everything))
        env = envs(node, named)
        assert env["train"][INTERVAL_ENV] == "Medium" and STRATEGY_ENV not in env["eval"]
        assert {r: e[INTERVAL_ENV] for r, e in envs(node, everything).items()} == {"train": "Long", "eval": "Long"}


async def test_a_config_naming_a_request_shares_its_subrequests(workdir: Path) -> None:
    """A config naming ``gpu`` applies to the subrequest ``gpu/large`` the scheduler chose."""
    async with dra_node(workdir) as node:
        claim = shared_claim(
            node, opaque(time_sliced("Short"), requests=["gpu"]), devices={"gpu/large": [node.names()[0]]}
        )
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        assert envs(node, claim)["gpu_large"][INTERVAL_ENV] == "Short"


@pytest.mark.parametrize(
    ("parameters", "error"),
    [
        (
            gpu_config({"strategy": "Sometimes"}),
            "config[0].opaque.parameters.sharing.strategy: must be one of MPS, TimeSlicing, got 'Sometimes'",
        ),
        (
            gpu_config({"strategy": "MPS", "timeSlicingConfig": {}}),
            "config[0].opaque.parameters.sharing.timeSlicingConfig: only with strategy TimeSlicing, not MPS",
        ),
        (
            time_sliced("Sometimes"),
            "config[0].opaque.parameters.sharing.timeSlicingConfig.interval: must be one of Default, Long, Medium, "
            "Short, got 'Sometimes'",
        ),
        (gpu_config(replicas=4), "config[0].opaque.parameters.replicas: unknown setting (known: apiVersion, kind"),
        ({**time_sliced(), "apiVersion": "resource.nvidia.com/v1beta1"}, "config[0].opaque.parameters.apiVersion:"),
        (None, "config[0].opaque.parameters: "),
    ],
)
async def test_a_bad_config_fails_its_claim_only_with_one_line_naming_the_field(
    workdir: Path, parameters: Any, error: str
) -> None:
    """A config of ours that does not decode fails that claim with one line naming the field; another claim of the
    same call is prepared, and the failed one leaves no spec and no checkpoint entry."""
    async with dra_node(workdir) as node:
        bad, good = shared_claim(node, opaque(parameters)), node.claim(node.names()[1])
        response = await node.prepare(bad, good)
        message = response.claims[bad.uid].error
        assert message.startswith(f"claim {bad.namespace}/{bad.name}: {error}"), message
        assert "\n" not in message
        assert response.claims[good.uid].error == ""
        assert not spec_path(node.settings, bad.uid).exists()
        assert bad.uid not in node.plugin.checkpoint.claims


async def test_two_containers_of_a_pod_sharing_a_claim_get_the_same_devices_prepared_once(workdir: Path) -> None:
    """Two containers naming one time-sliced claim (one by its request, one by the whole claim): the claim is read and
    prepared once, and both containers are given the same CDI device, one spec with the GPU time-sliced."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced("Medium")))
        ids = await node.kubelet.start_pod(DRIVER, {"app": [(claim, "gpu")], "sidecar": [(claim, "")]})
        assert ids == {"app": [f"k8s.gpu.gpuplugin.dev/claim={claim.uid}-gpu"]} | {"sidecar": ids["app"]}
        assert node.claims.reads == 1
        (device,) = cdi_spec(node, claim)["devices"]
        assert device["name"] == f"{claim.uid}-gpu"
        assert env_of(cdi_spec(node, claim))[INTERVAL_ENV] == "Medium"


async def test_a_pod_with_a_badly_configured_shared_claim_does_not_start(workdir: Path) -> None:
    """The kubelet does not start a pod whose shared claim failed: the error names the claim and the field."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(gpu_config({"strategy": "Sometimes"})))
        with pytest.raises(PodNotStarted, match=r"sharing\.strategy: must be one of MPS, TimeSlicing"):
            await node.kubelet.start_pod(DRIVER, {"a": [(claim, "gpu")], "b": [(claim, "gpu")]})


async def test_a_restart_keeps_the_time_slicing_of_a_prepared_claim(workdir: Path) -> None:
    """After a plugin restart with the claim's spec gone, preparing it again writes the same time-sliced spec from the
    checkpoint, without reading the claim."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced("Short")))
        await node.prepare(claim)
        before = cdi_spec(node, claim)
        await node.restart()
        spec_path(node.settings, claim.uid).unlink()
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        assert cdi_spec(node, claim) == before
        assert node.claims.reads == 1


async def test_a_time_sliced_claim_read_from_the_api_server_is_prepared_time_sliced(workdir: Path) -> None:
    """Through the API server (lightkube's ResourceClaim model): the allocation's config for our driver reaches the
    spec, beside another driver's config that is ignored."""
    async with cluster(workdir) as c:
        results = [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": c.names()[0]}]
        c.api.add_claim("ns", "shared", "uid-1", results)
        allocation = c.api.claims[("ns", "shared")]["status"]["allocation"]["devices"]
        allocation["config"] = [opaque({"any": ["thing"]}, driver="gpu.nvidia.com"), opaque(time_sliced("Short"))]
        response = await c.kubelet.prepare(DRIVER, [ClaimRef("ns", "shared", "uid-1")])
        assert response.claims["uid-1"].error == ""
        spec = json.loads(spec_path(c.driver.settings, "uid-1").read_text())
        assert env_of(spec)[INTERVAL_ENV] == "Short" and env_of(spec)[STRATEGY_ENV] == "TimeSlicing"


def test_the_checkpoint_keeps_time_slicing_and_refuses_an_unknown_interval(tmp_path: Path) -> None:
    """Time-slicing goes through the checkpoint and back; a checkpoint naming an interval we do not know is corrupt,
    and one without time-slicing (as written before it existed) reads as unshared."""
    prepared = PreparedClaim(ClaimRef("ns", "c", "u-1"), (AllocatedDevice("gpu", NODE, "gpu-0"),), {"gpu": "Long"})
    content = encode({"u-1": prepared})
    assert decode(content, tmp_path) == {"u-1": prepared}
    document = json.loads(content)
    document["claims"]["u-1"]["timeSlicing"] = {"gpu": "Forever"}
    with pytest.raises(CheckpointCorrupt, match="Forever"):
        decode(json.dumps(document).encode(), tmp_path)
    del document["claims"]["u-1"]["timeSlicing"]
    assert decode(json.dumps(document).encode(), tmp_path)["u-1"].time_slicing == {}


def test_the_allocation_of_a_resource_claim_carries_our_configs_only() -> None:
    """From a ResourceClaim object: our driver's opaque configs with their requests and places, others skipped; a
    config entry whose requests are not names makes the claim unavailable."""
    claim = ClaimRef("ns", "c", "u-1")
    results = [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0"}]
    configs = [opaque({"x": 1}, driver="other"), opaque(time_sliced(), requests=["gpu"])]
    resource_claim = {
        "metadata": {"uid": "u-1"},
        "status": {"allocation": {"devices": {"results": results, "config": configs}}},
    }
    allocation = allocation_of(resource_claim, claim, DRIVER)
    assert allocation.configs == (OpaqueConfig(("gpu",), time_sliced(), 1),)
    configs[1]["requests"] = "gpu"
    with pytest.raises(ClaimUnavailable, match="malformed allocation config"):
        allocation_of(resource_claim, claim, DRIVER)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)

    def nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)

    return st.recursive(scalars, nested, max_leaves=20)


def parameters() -> st.SearchStrategy[Any]:
    """Anything JSON, and GpuConfigs with any values in their places."""
    value = json_values()
    words = st.sampled_from(["TimeSlicing", "MPS", "Default", "Short", "Medium", "Long", API_VERSION, KIND])
    sharing = st.fixed_dictionaries(
        {},
        optional={
            "strategy": words | value,
            "timeSlicingConfig": st.fixed_dictionaries({}, optional={"interval": words | value}) | value,
        },
    )
    config = st.fixed_dictionaries(
        {}, optional={"apiVersion": words | value, "kind": words | value, "sharing": sharing | value, "x": value}
    )
    valid = st.builds(time_sliced, st.none() | st.sampled_from(INTERVALS)) | st.just(gpu_config())
    return valid | config | value


async def test_any_opaque_parameters_give_a_prepared_claim_or_its_own_error(workdir: Path) -> None:
    """Whatever our config's parameters are, the claim is prepared (time-sliced exactly when they decode to
    time-slicing, its MPS daemon started when they decode to MPS) or gets one line of error, and the good claim of
    the same call is prepared."""
    async with dra_node(workdir, mps=fake_daemons()) as node:
        loop = asyncio.get_running_loop()
        gpu, other = node.names()
        good = node.claim(other)

        def call(make: Callable[[], Awaitable[Any]]) -> Any:
            # hypothesis runs in a worker thread (as in test_dra_fuzz.py); the RPCs run on the test's loop.
            return asyncio.run_coroutine_threadsafe(_awaited(make), loop).result(timeout=10)

        @FUZZ
        @given(params=parameters(), requests=st.none() | st.lists(st.sampled_from(["gpu", "other", ""]), max_size=2))
        def check(params: Any, requests: list[str] | None) -> None:
            claim = node.claims.allocate(DRIVER, NODE, {"gpu": [gpu]}, config=[opaque(params, requests=requests)])
            result = call(lambda: node.prepare(claim, good))
            assert result.claims[good.uid].error == ""
            entry = result.claims[claim.uid]
            try:
                interval = interval_of(OpaqueConfig((), params))
            except ValueError:
                assert entry.error and "\n" not in entry.error and "config[0].opaque.parameters" in entry.error
                return
            assert entry.error == "" and len(entry.devices) == 1
            env = env_of(cdi_spec(node, claim))
            applies = interval is not None and (not requests or "gpu" in requests)
            assert env.get(INTERVAL_ENV) == (interval if applies else None)
            call(lambda: node.unprepare(claim))

        await asyncio.to_thread(check)


async def _awaited(make: Callable[[], Awaitable[Any]]) -> Any:
    return await make()


def claim_example(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The example's ResourceClaim, its one config (for our driver) and its Pod, every object checked against the
    API's schemas."""
    found = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    (claim,) = [o for o in found if o["kind"] == "ResourceClaim"]
    # The client names the API group's ResourceClaim otherwise; its spec is a template's, checked as one.
    validate({**claim, "kind": "ResourceClaimTemplate", "spec": {"spec": claim["spec"]}})
    for obj in found:
        if obj is not claim:
            validate(obj)
    (config,) = claim["spec"]["devices"]["config"]
    assert config["opaque"]["driver"] == DEFAULT_DRIVER_NAME
    (pod,) = [o for o in found if o["kind"] == "Pod"]
    return claim, config, pod


def test_the_shared_claim_example_is_valid_and_time_sliced_for_our_driver() -> None:
    """deploy/dra/shared-claim.yaml: objects the API accepts, a ResourceClaim whose opaque config for our driver
    decodes to time-slicing, and a pod whose two containers name that one claim."""
    claim, config, pod = claim_example(EXAMPLE)
    assert interval_of(OpaqueConfig(tuple(config.get("requests", ())), config["opaque"]["parameters"])) is not None
    requests = {r["name"] for r in claim["spec"]["devices"]["requests"]}
    assert set(config.get("requests", requests)) <= requests
    (pod_claim,) = pod["spec"]["resourceClaims"]
    assert pod_claim["resourceClaimName"] == claim["metadata"]["name"]
    names = [c["name"] for container in pod["spec"]["containers"] for c in container["resources"]["claims"]]
    assert names == [pod_claim["name"]] * 2
