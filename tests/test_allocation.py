"""The preferred allocation policies: topology scoring, spreading, packing, validation and search quality."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuplugin.core.model import (
    AllocationPolicyKind,
    ContainerSpec,
    Device,
    DeviceTree,
    Link,
    PCIeLevel,
    links_from_pairs,
)
from gpuplugin.devices.allocation import PCIE_SCORES, AllocationImpossible, build_policy, link_score

RESOURCE = "nvidia.com/gpu"
TOPOLOGY = AllocationPolicyKind.TOPOLOGY
DISTRIBUTED = AllocationPolicyKind.DISTRIBUTED
PACKED = AllocationPolicyKind.PACKED

Pairs = Sequence[tuple[int, int, Link]]


def make_tree(gpus: int, pairs: Pairs = (), *, replicas: int = 1, numa: Sequence[int | None] = ()) -> DeviceTree:
    """GPUs ``g0``.. with ``replicas`` devices each (``g0::0``..) and links between GPU indices."""
    devices = [
        Device(
            id=f"g{g}" if replicas == 1 else f"g{g}::{r}",
            resource=RESOURCE,
            gpu=f"g{g}",
            spec=ContainerSpec(),
            numa_node=numa[g] if numa else None,
        )
        for g in range(gpus)
        for r in range(replicas)
    ]
    return DeviceTree(devices=tuple(devices), links=links_from_pairs((f"g{a}", f"g{b}", link) for a, b, link in pairs))


def choose(
    tree: DeviceTree, kind: AllocationPolicyKind, size: int, must: Sequence[str] = (), **kw: object
) -> list[str]:
    """Ask a fresh policy for ``size`` devices with every device of the tree free unless ``available`` is given."""
    available = kw.get("available", [d.id for d in tree.devices])
    assert isinstance(available, list)
    return build_policy(kind, tree.of(RESOURCE), tree).choose(available, must, size)


def nvlink_domains(gpus: int, domain: int, *, replicas: int = 1) -> DeviceTree:
    """Domains of ``domain`` NVLinked GPUs, PCIe switch pairs inside them, two NUMA nodes."""
    pairs = []
    for a, b in itertools.combinations(range(gpus), 2):
        pcie = PCIeLevel.SINGLE if a // 2 == b // 2 else PCIeLevel.NODE if a < gpus // 2 <= b else PCIeLevel.SYSTEM
        pairs.append((a, b, Link(nvlinks=4 if a // domain == b // domain else 0, pcie=pcie)))
    return make_tree(gpus, pairs, replicas=replicas, numa=[g * 2 // gpus for g in range(gpus)])


def test_link_score_follows_nvidia() -> None:
    """NVLink scores 100 per link and otherwise the PCIe level decides, same board best."""
    assert link_score(Link(nvlinks=3, pcie=PCIeLevel.SYSTEM)) == 300
    assert link_score(Link(pcie=PCIeLevel.INTERNAL)) == 60
    assert link_score(Link()) == PCIE_SCORES[PCIeLevel.SYSTEM] == 10


def test_nvlink_pair_preferred_over_pcie_pair() -> None:
    """Two NVLinked GPUs win over two GPUs behind one PCIe switch."""
    tree = make_tree(4, [(0, 1, Link(pcie=PCIeLevel.SINGLE)), (2, 3, Link(nvlinks=2))])
    assert choose(tree, TOPOLOGY, 2) == ["g2", "g3"]


def test_same_switch_preferred_over_cross_numa() -> None:
    """Next to a required GPU, the one on its PCIe switch wins over one across NUMA nodes."""
    tree = make_tree(3, [(0, 1, Link(pcie=PCIeLevel.SYSTEM)), (0, 2, Link(pcie=PCIeLevel.SINGLE))], numa=[0, 1, 0])
    assert choose(tree, TOPOLOGY, 2, ["g0"]) == ["g0", "g2"]


def test_numa_breaks_link_ties() -> None:
    """When links tie, a GPU on the required GPU's NUMA node wins over a lower one on another node."""
    tree = make_tree(4, [(a, b, Link(nvlinks=1)) for a, b in itertools.combinations(range(4), 2)], numa=[0, 1, 1, 0])
    assert choose(tree, TOPOLOGY, 2, ["g2"]) == ["g1", "g2"]


def test_must_include_honoured_and_rest_chosen_near_it() -> None:
    """A required GPU is kept and the others come from its NVLink domain."""
    tree = nvlink_domains(8, 4)
    assert choose(tree, TOPOLOGY, 4, ["g5"]) == ["g4", "g5", "g6", "g7"]


def test_ties_go_to_the_lowest_devices() -> None:
    """Among equally good sets, the one earliest in tree order wins."""
    tree = make_tree(6)
    assert choose(tree, TOPOLOGY, 3) == ["g0", "g1", "g2"]


def test_replicas_of_one_gpu_score_best() -> None:
    """Under the topology policy, replicas on one GPU beat replicas on two NVLinked GPUs."""
    tree = make_tree(2, [(0, 1, Link(nvlinks=18))], replicas=3)
    assert choose(tree, TOPOLOGY, 3, ["g1::2"]) == ["g1::0", "g1::1", "g1::2"]


def test_ties_among_replicas_go_to_the_earliest_gpu() -> None:
    """Replicas of equally linked GPUs are taken from the first GPU in tree order."""
    assert choose(make_tree(3, replicas=2), TOPOLOGY, 2) == ["g0::0", "g0::1"]


@pytest.mark.parametrize("kind", list(AllocationPolicyKind))
@pytest.mark.parametrize("size", range(1, 9))
def test_exact_size(kind: AllocationPolicyKind, size: int) -> None:
    """Every policy returns exactly the requested number of distinct available devices."""
    tree = nvlink_domains(8, 4)
    available = [f"g{g}" for g in range(8)]
    chosen = choose(tree, kind, size, available=available)
    assert len(chosen) == len(set(chosen)) == size
    assert set(chosen) <= set(available)


@pytest.mark.parametrize(
    ("available", "must", "size", "message"),
    [
        (["g0", "g1"], [], 0, "at least 1"),
        (["g0", "g1"], [], -3, "at least 1"),
        (["g0", "g1"], [], 3, "exceeds the 2 available"),
        (["g0", "g0", "g1"], [], 3, "exceeds the 2 available"),
        (["g0", "g1", "g2"], ["g0", "g1", "g2"], 2, "3 must-include devices exceed the allocation size 2"),
        (["g0", "g1"], ["g2"], 1, "not available: 'g2'"),
        (["g0", "nope"], [], 1, "not devices of nvidia.com/gpu: 'nope'"),
        (["g0"], ["ghost"], 1, "not devices of nvidia.com/gpu: 'ghost'"),
    ],
)
@pytest.mark.parametrize("kind", list(AllocationPolicyKind))
def test_impossible_requests_raise(
    kind: AllocationPolicyKind, available: list[str], must: list[str], size: int, message: str
) -> None:
    """Each impossible request raises AllocationImpossible with a message naming the problem."""
    with pytest.raises(AllocationImpossible, match=message):
        choose(make_tree(4), kind, size, must, available=available)


def test_unknown_ids_are_listed_up_to_ten() -> None:
    """A message about many unknown IDs lists ten and counts the rest."""
    with pytest.raises(AllocationImpossible, match=r"'x9' and 20 more$") as info:
        choose(make_tree(2), TOPOLOGY, 1, available=[f"x{i}" for i in range(30)])
    assert "'x10'" not in str(info.value)


def test_allocation_impossible_is_a_value_error() -> None:
    """Callers that catch ValueError also catch AllocationImpossible."""
    assert issubclass(AllocationImpossible, ValueError)


def test_build_policy_rejects_mixed_resources_and_repeated_ids() -> None:
    """A policy serves one resource's distinct devices; anything else is a programming error."""
    tree = make_tree(2)
    other = Device(id="g9", resource="example.com/gpu", gpu="g0", spec=ContainerSpec())
    with pytest.raises(ValueError, match="one resource"):
        build_policy(TOPOLOGY, [*tree.devices, other], tree)
    with pytest.raises(ValueError, match="repeat IDs: 'g0'"):
        build_policy(PACKED, [tree.devices[0], tree.devices[0]], tree)


def test_distributed_spreads_one_per_gpu() -> None:
    """With every replica free, the distributed policy takes one replica per GPU before a second anywhere."""
    tree = make_tree(4, replicas=4)
    assert choose(tree, DISTRIBUTED, 6) == ["g0::0", "g0::1", "g1::0", "g1::1", "g2::0", "g3::0"]


def test_distributed_accounts_for_replicas_in_use() -> None:
    """Replicas missing from available are in use, so their GPUs are chosen last."""
    tree = make_tree(3, replicas=3)
    available = ["g0::2", "g1::0", "g1::1", "g1::2", "g2::1", "g2::2"]
    # Loads g0 2, g1 0, g2 1; each pick adds one, and ties go to the earlier GPU.
    assert choose(tree, DISTRIBUTED, 3, available=available) == ["g1::0", "g1::1", "g2::1"]
    assert choose(tree, DISTRIBUTED, 4, available=available) == ["g0::2", "g1::0", "g1::1", "g2::1"]


def test_distributed_counts_must_include_as_load() -> None:
    """A required replica loads its GPU, so the rest go elsewhere."""
    tree = make_tree(2, replicas=2)
    assert choose(tree, DISTRIBUTED, 2, ["g0::1"]) == ["g0::1", "g1::0"]


def test_packed_fills_the_most_loaded_gpu_first() -> None:
    """The packed policy empties the busiest GPU with free replicas, then the next in GPU order."""
    tree = make_tree(3, replicas=3)
    available = ["g0::0", "g0::1", "g0::2", "g1::0", "g1::1", "g1::2", "g2::1", "g2::2"]
    assert choose(tree, PACKED, 3, available=available) == ["g0::0", "g2::1", "g2::2"]


def test_packed_skips_full_gpus() -> None:
    """A GPU with every replica in use is skipped, however loaded."""
    tree = make_tree(2, replicas=2)
    assert choose(tree, PACKED, 1, available=["g1::1"]) == ["g1::1"]


@pytest.mark.parametrize("kind", list(AllocationPolicyKind))
def test_deterministic(kind: AllocationPolicyKind) -> None:
    """The same request gives the same answer every time, whatever the order of its IDs."""
    tree = nvlink_domains(16, 4)
    policy = build_policy(kind, tree.of(RESOURCE), tree)
    ids = [d.id for d in tree.devices]
    first = policy.choose(ids, ["g9"], 5)
    assert all(policy.choose(ids, ["g9"], 5) == first for _ in range(3))
    assert policy.choose(list(reversed(ids)) + ids, ["g9", "g9"], 5) == first


def test_64_gpus_answer_with_a_whole_nvlink_domain() -> None:
    """On 64 GPUs the greedy search still finds the NVLink domain around a required GPU."""
    tree = nvlink_domains(64, 8)
    policy = build_policy(TOPOLOGY, tree.of(RESOURCE), tree)
    ids = [d.id for d in tree.devices]
    assert policy.choose(ids, ["g37"], 8) == [f"g{g}" for g in range(32, 40)]
    assert policy.choose(ids, [], 8) == [f"g{g}" for g in range(8)]
    assert policy.choose(ids, [], 2) == ["g0", "g1"]
    assert len(policy.choose(ids, ["g0", "g63"], 40)) == 40


def test_greedy_packs_replicas_into_one_nvlink_domain() -> None:
    """On 8 GPUs with 16 replicas each, the greedy search packs a large request onto the best-linked GPUs."""
    chosen = choose(nvlink_domains(8, 4, replicas=16), TOPOLOGY, 40)
    # Whole GPUs first (16 + 16 + 8), all three inside one NVLink domain.
    assert {d.split("::")[0] for d in chosen} <= {"g0", "g1", "g2", "g3"}
    assert len({d.split("::")[0] for d in chosen}) == 3


# Property tests over random trees and requests.

LINKS = st.builds(Link, nvlinks=st.integers(0, 4), pcie=st.sampled_from(list(PCIeLevel)))


@st.composite
def trees(draw: st.DrawFn, max_gpus: int = 12, max_replicas: int = 4) -> DeviceTree:
    """Random GPUs, replica counts, links (some pairs unknown) and NUMA nodes (some unknown)."""
    gpus = draw(st.integers(1, max_gpus))
    replicas = draw(st.integers(1, max_replicas))
    pairs = [(a, b, draw(LINKS)) for a, b in itertools.combinations(range(gpus), 2) if draw(st.booleans())]
    numa = draw(st.lists(st.none() | st.integers(0, 1), min_size=gpus, max_size=gpus))
    return make_tree(gpus, pairs, replicas=replicas, numa=numa)


@st.composite
def requests(draw: st.DrawFn, tree: DeviceTree) -> tuple[list[str], list[str], int]:
    """Mostly well-formed requests, with repeated IDs; now and then unknown IDs or unavailable must-includes."""
    ids = [d.id for d in tree.devices]
    if draw(st.integers(0, 9)) == 0:
        ids += ["ghost", "g999"]
    pool = st.sampled_from(ids)
    available = draw(st.lists(pool, max_size=len(ids) + 3))
    from_available = draw(st.integers(0, 9)) > 0
    must = draw(st.lists(st.sampled_from(available) if available and from_available else pool, max_size=4))
    size = draw(st.integers(-1, len(set(available)) + 1))
    return available, must, size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), tree=trees(max_gpus=24), kind=st.sampled_from(list(AllocationPolicyKind)))
def test_any_request_gets_a_valid_answer_or_allocation_impossible(
    data: st.DataObject, tree: DeviceTree, kind: AllocationPolicyKind
) -> None:
    """Every answer is exactly size distinct available IDs including must-include; else AllocationImpossible."""
    available, must, size = data.draw(requests(tree))
    policy = build_policy(kind, tree.of(RESOURCE), tree)
    try:
        chosen = policy.choose(available, must, size)
    except AllocationImpossible:
        return
    assert len(chosen) == len(set(chosen)) == size
    assert set(chosen) <= set(available)
    assert set(must) <= set(chosen)
    assert policy.choose(available, must, size) == chosen


def set_score(tree: DeviceTree, chosen: Sequence[str]) -> tuple[int, int]:
    """The topology criteria computed independently: (sum of pair scores, pairs on one NUMA node)."""
    devices = {d.id: d for d in tree.devices}
    gpus = tree.gpus()
    same_gpu = max([60, *(link_score(tree.link(a, b)) for a, b in itertools.combinations(gpus, 2))]) + 100
    links = numa = 0
    for a, b in itertools.combinations(chosen, 2):
        da, db = devices[a], devices[b]
        links += same_gpu if da.gpu == db.gpu else link_score(tree.link(da.gpu, db.gpu))
        numa += da.numa_node is not None and da.numa_node == db.numa_node
    return links, numa


@settings(max_examples=200, deadline=None)
@given(data=st.data(), tree=st.one_of(trees(max_gpus=8, max_replicas=1), trees(max_gpus=4, max_replicas=2)))
def test_topology_is_optimal_on_small_trees(data: st.DataObject, tree: DeviceTree) -> None:
    """On small trees the topology policy finds a best-scoring set, as brute force does."""
    ids = [d.id for d in tree.devices]
    available = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    must = data.draw(st.lists(st.sampled_from(available), unique=True))
    size = data.draw(st.integers(max(1, len(must)), len(available)))
    chosen = build_policy(TOPOLOGY, tree.of(RESOURCE), tree).choose(available, must, size)
    rest = [i for i in available if i not in must]
    best = max(set_score(tree, [*must, *extra]) for extra in itertools.combinations(rest, size - len(must)))
    assert set_score(tree, chosen) == best
