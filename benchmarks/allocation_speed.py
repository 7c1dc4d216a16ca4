"""How long ``AllocationPolicy.choose`` takes on the GetPreferredAllocation path: medians over many calls.

Run: ``.venv/bin/python benchmarks/allocation_speed.py [--calls N]``. Targets: well under 100 µs for 8 GPUs,
under 1 ms for 64 GPUs and for 8 GPUs with 16 replicas each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from gpuplugin.core.model import (
    AllocationPolicyKind,
    ContainerSpec,
    Device,
    DeviceTree,
    Link,
    PCIeLevel,
    links_from_pairs,
)
from gpuplugin.devices.allocation import AllocationPolicy, build_policy

RESOURCE = "nvidia.com/gpu"


def gpu_tree(count: int, *, replicas: int = 1) -> DeviceTree:
    """``count`` GPUs in NVLink domains of 8 and PCIe switches of 2, two NUMA nodes; ``replicas`` per GPU."""
    gpus = [f"GPU-{i:04d}" for i in range(count)]
    half = max(1, count // 2)
    devices = [
        Device(
            id=gpu if replicas == 1 else f"{gpu}::{r}",
            resource=RESOURCE,
            gpu=gpu,
            spec=ContainerSpec(),
            numa_node=i // half,
        )
        for i, gpu in enumerate(gpus)
        for r in range(replicas)
    ]
    pairs: list[tuple[str, str, Link]] = []
    for i in range(count):
        for j in range(i + 1, count):
            if i // 2 == j // 2:
                pcie = PCIeLevel.SINGLE
            elif i // 4 == j // 4:
                pcie = PCIeLevel.HOSTBRIDGE
            elif i // half == j // half:
                pcie = PCIeLevel.NODE
            else:
                pcie = PCIeLevel.SYSTEM
            # Uneven NVLink counts inside a domain of 8, like a hybrid cube mesh: the search has work to do.
            nvlinks = (1 + (i + j) % 3) * (2 if i // 4 == j // 4 else 1) if i // 8 == j // 8 else 0
            pairs.append((gpus[i], gpus[j], Link(nvlinks=nvlinks, pcie=pcie)))
    return DeviceTree(devices=tuple(devices), links=links_from_pairs(pairs))


def median_us(policy: AllocationPolicy, requests: Sequence[tuple[list[str], list[str], int]], calls: int) -> float:
    """Median microseconds per ``choose`` call, cycling through ``requests``."""
    samples: list[int] = []
    for n in range(calls):
        available, must, size = requests[n % len(requests)]
        start = time.perf_counter_ns()
        policy.choose(available, must, size)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def requests_for(
    tree: DeviceTree, size: int, *, in_use: float, must: int, rng: random.Random, variants: int = 16
) -> list[tuple[list[str], list[str], int]]:
    """Random requests: a fraction of devices in use, ``must`` of the free ones required."""
    ids = [d.id for d in tree.devices]
    out: list[tuple[list[str], list[str], int]] = []
    for _ in range(variants):
        free = [i for i in ids if rng.random() >= in_use]
        while len(free) < size:
            free = ids.copy()
        out.append((free, rng.sample(free, min(must, size)), size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per case")
    args = parser.parse_args()
    rng = random.Random(7)
    trees = {"8 GPUs": gpu_tree(8), "64 GPUs": gpu_tree(64), "8x16 replicas": gpu_tree(8, replicas=16)}
    # Inventory, policy, devices asked for, fraction of devices in use, devices the request must include.
    cases: list[tuple[str, AllocationPolicyKind, int, float, int]] = [
        ("8 GPUs", AllocationPolicyKind.TOPOLOGY, 1, 0.0, 0),
        ("8 GPUs", AllocationPolicyKind.TOPOLOGY, 2, 0.0, 0),
        ("8 GPUs", AllocationPolicyKind.TOPOLOGY, 4, 0.0, 0),
        ("8 GPUs", AllocationPolicyKind.TOPOLOGY, 4, 0.25, 1),
        ("8 GPUs", AllocationPolicyKind.TOPOLOGY, 8, 0.0, 0),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 2, 0.0, 0),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 4, 0.25, 0),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 8, 0.0, 0),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 8, 0.25, 2),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 16, 0.0, 0),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 32, 0.0, 0),
        ("64 GPUs", AllocationPolicyKind.TOPOLOGY, 48, 0.1, 0),
        ("8x16 replicas", AllocationPolicyKind.TOPOLOGY, 4, 0.5, 0),
        ("8x16 replicas", AllocationPolicyKind.TOPOLOGY, 16, 0.5, 1),
        ("8x16 replicas", AllocationPolicyKind.TOPOLOGY, 40, 0.3, 0),
        ("8x16 replicas", AllocationPolicyKind.DISTRIBUTED, 4, 0.5, 0),
        ("8x16 replicas", AllocationPolicyKind.DISTRIBUTED, 40, 0.3, 1),
        ("8x16 replicas", AllocationPolicyKind.PACKED, 4, 0.5, 0),
        ("8x16 replicas", AllocationPolicyKind.PACKED, 40, 0.3, 1),
    ]
    print(f"{'inventory':<15} {'policy':<12} {'size':>4} {'in use':>6} {'must':>4} {'median µs':>10}")
    for name, kind, size, in_use, must in cases:
        tree = trees[name]
        policy = build_policy(kind, tree.of(RESOURCE), tree)
        requests = requests_for(tree, size, in_use=in_use, must=must, rng=rng)
        us = median_us(policy, requests, args.calls)
        print(f"{name:<15} {kind.value:<12} {size:>4} {in_use:>6.0%} {must:>4} {us:>10.1f}")


if __name__ == "__main__":
    main()
