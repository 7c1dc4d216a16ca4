"""A time-sliced claim's interval set on its GPU: through the backend's TimeSliceControl (the mock records it and
reports it on its control socket), held while any claim needs it, back to Default when the last one goes (after a
plugin restart too, from the checkpoint), and refused with one line where it cannot be set.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

from pathlib import Path

from gpuplugin.backends.mock.control import control
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.plugin import DraPlugin
from tests.test_dra import DRIVER, DraNode, dra_node
from tests.test_dra_sharing import opaque, shared_claim, time_sliced
from tests.test_mock_control import invoke


async def intervals(node: DraNode) -> list[int]:
    """Each mock GPU's interval, as the control socket reports it (0 Default … 3 Long)."""
    answer = await control(node.backend.settings.control_socket, {"op": "timeslices"})
    assert answer["ok"], answer
    return list(answer["timeslices"].values())


async def test_a_long_claim_sets_its_gpu_to_long_until_it_is_unprepared(workdir: Path) -> None:
    """Preparing a Long claim sets its GPU to interval 3 (the other GPU stays Default); unpreparing puts 0 back."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced("Long")))
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        assert await intervals(node) == [3, 0]
        assert (await node.unprepare(claim)).claims[claim.uid].error == ""
        assert await intervals(node) == [0, 0]


async def test_the_interval_stays_while_another_claim_holds_it(workdir: Path) -> None:
    """Two Short claims on one GPU: the first unprepared leaves Short for the second; the last one restores Default."""
    async with dra_node(workdir) as node:
        first, second = (shared_claim(node, opaque(time_sliced("Short"))) for _ in range(2))
        response = await node.prepare(first, second)
        assert [response.claims[c.uid].error for c in (first, second)] == ["", ""]
        await node.unprepare(first)
        assert await intervals(node) == [1, 0]
        await node.unprepare(second)
        assert await intervals(node) == [0, 0]


async def test_a_second_claim_asking_another_interval_on_the_gpu_fails_with_one_line(workdir: Path) -> None:
    """A Long claim on a GPU a Medium claim holds fails naming the GPU, both intervals and the other claim; the GPU
    stays Medium and the failed claim leaves no spec."""
    async with dra_node(workdir) as node:
        medium = shared_claim(node, opaque(time_sliced("Medium")))
        long = shared_claim(node, opaque(time_sliced("Long")))
        response = await node.prepare(medium, long)
        gpu = node.tree.devices[0].id
        assert response.claims[medium.uid].error == ""
        assert response.claims[long.uid].error == (
            f"claim {long.namespace}/{long.name}: GPU {gpu} runs time slices of interval Medium for claim "
            f"{medium.namespace}/{medium.name}; this claim asks Long"
        )
        assert await intervals(node) == [2, 0]
        assert not spec_path(node.settings, long.uid).exists()


async def test_a_restarted_plugin_restores_default_from_its_checkpoint(workdir: Path) -> None:
    """A Short claim prepared, the plugin restarted: unpreparing it then still puts the GPU back to Default."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced("Short")))
        await node.prepare(claim)
        await node.restart()
        assert await intervals(node) == [1, 0]
        assert (await node.unprepare(claim)).claims[claim.uid].error == ""
        assert await intervals(node) == [0, 0]


async def test_a_default_claim_leaves_the_gpu_alone(workdir: Path) -> None:
    """Time-slicing at Default changes nothing on the GPU, preparing or unpreparing."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced()))
        await node.prepare(claim)
        await node.unprepare(claim)
        assert node.backend.timeslice_sets == 0


async def test_a_gpu_that_does_not_answer_fails_the_claim_with_the_cause(workdir: Path) -> None:
    """The interval cannot be set on a GPU that fell off the bus: the claim fails with one line saying so, and is not
    recorded."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced("Long")))
        node.backend.lose(0)
        error = (await node.prepare(claim)).claims[claim.uid].error
        assert error == (
            f"claim {claim.namespace}/{claim.name}: GPU {node.tree.devices[0].id}: the GPU does not answer "
            "(it fell off the bus)"
        )
        assert claim.uid not in node.plugin.checkpoint.claims


async def test_without_the_capability_a_non_default_interval_is_refused(workdir: Path) -> None:
    """A plugin whose backend cannot set intervals refuses a Long claim with one line naming the field, and still
    prepares a Default one."""
    async with dra_node(workdir) as node:
        await node.plugin.aclose()
        await node.kubelet.wait_gone(DRIVER)
        node.plugin = DraPlugin(node.settings, lambda: node.tree, node.claims)
        await node.plugin.start()
        await node.kubelet.wait_registered(DRIVER)
        long, default = shared_claim(node, opaque(time_sliced("Long"))), shared_claim(node, opaque(time_sliced()))
        response = await node.prepare(long, default)
        assert response.claims[long.uid].error == (
            f"claim {long.namespace}/{long.name}: sharing.timeSlicingConfig.interval: this plugin cannot set a "
            "GPU's time-slice interval (Long); use Default"
        )
        assert response.claims[default.uid].error == ""


async def test_gpuplugin_mock_timeslices_prints_each_gpus_interval(workdir: Path) -> None:
    """``gpuplugin mock timeslices`` prints each GPU's UUID and interval name: Long for a Long claim's GPU."""
    async with dra_node(workdir) as node:
        claim = shared_claim(node, opaque(time_sliced("Long")))
        await node.prepare(claim)
        result = await invoke("timeslices", "--socket", str(node.backend.settings.control_socket))
        assert result.exit_code == 0, result.output
        first, second = (device.id for device in node.tree.devices)
        assert result.output == f"{first} Long\n{second} Default\n"
