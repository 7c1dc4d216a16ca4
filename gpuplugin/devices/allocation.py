"""Preferred allocation: which of the available devices GetPreferredAllocation suggests for one container.

Everything that depends only on the inventory (pair scores, each device's GPU, NUMA nodes) is computed once in
``build_policy``. ``choose`` runs on the RPC path: it does no I/O and works on small integers, so that it answers
in microseconds where NVIDIA's plugin re-queried NVML for every pair on every call.

The policies reason per physical GPU: devices on one GPU (replicas, partitions) are interchangeable for scoring,
so a search picks how many devices each GPU gives and then takes each GPU's lowest devices in tree order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from operator import add, sub
from types import MappingProxyType
from typing import Protocol

from gpuplugin.core.errors import InvalidRequest
from gpuplugin.core.model import AllocationPolicyKind, Device, DeviceTree, Link, PCIeLevel

#: Score per active NVLink link between two GPUs, as NVIDIA's plugin counts it.
NVLINK_SCORE = 100

#: Score of a pair of GPUs without NVLink, by how close they sit on PCIe (NVIDIA's values).
PCIE_SCORES: Mapping[PCIeLevel, int] = MappingProxyType(
    {
        PCIeLevel.INTERNAL: 60,
        PCIeLevel.SINGLE: 50,
        PCIeLevel.MULTIPLE: 40,
        PCIeLevel.HOSTBRIDGE: 30,
        PCIeLevel.NODE: 20,
        PCIeLevel.SYSTEM: 10,
    }
)

#: Inventories of at most this many whole GPUs get every set ranked once, so a request only scans a table.
TABLE_GPUS = 12

#: Largest search, in candidate sets, that the topology policy solves exactly; above it, greedy + swaps.
EXHAUSTIVE_LIMIT = 256

#: Work per call for greedy growth, and again for swaps, in row elements; it bounds seeds and swap tries.
GREEDY_WORK = 4096

#: What one greedy step or swap try costs besides its row, in row elements (interpreter overhead).
_STEP_OVERHEAD = 32

#: How many IDs an error message lists before it only counts the rest.
_LISTED_IDS = 10

# Below any reachable marginal score, so that a full GPU is never picked.
_UNAVAILABLE = -(1 << 62)


class AllocationImpossible(InvalidRequest, ValueError):
    """The request cannot be met (the message says why); retrying the same request does not help."""


class AllocationPolicy(Protocol):
    """Chooses the devices to suggest for one container, among those the kubelet says are free."""

    def choose(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        """Return ``size`` distinct IDs from ``available`` including ``must_include``, in tree order.

        Raises AllocationImpossible when no such set exists or an ID is not one of this resource's devices.
        """
        ...


def link_score(link: Link) -> int:
    """NVIDIA's score for a pair of GPUs: 100 per NVLink link, else by PCIe distance."""
    return link.nvlinks * NVLINK_SCORE if link.nvlinks > 0 else PCIE_SCORES[link.pcie]


def build_policy(kind: AllocationPolicyKind, devices: Sequence[Device], tree: DeviceTree) -> AllocationPolicy:
    """Precompute what ``kind`` needs about ``devices`` (one resource's) and return the policy.

    Raises ValueError when ``devices`` repeat an ID or span several resources.
    """
    inventory = _Inventory(devices)
    if kind is AllocationPolicyKind.TOPOLOGY:
        return _TopologyPolicy(inventory, devices, tree)
    if kind is AllocationPolicyKind.DISTRIBUTED:
        return _DistributedPolicy(inventory)
    if kind is AllocationPolicyKind.PACKED:
        return _PackedPolicy(inventory)
    raise ValueError(f"unknown allocation policy {kind!r}")


def _named(ids: Iterable[str]) -> str:
    listed = list(ids)
    shown = ", ".join(repr(i) for i in listed[:_LISTED_IDS])
    rest = len(listed) - _LISTED_IDS
    return f"{shown} and {rest} more" if rest > 0 else shown


class _Request:
    """A validated request in device indices (tree order): the fixed devices and the other free ones."""

    __slots__ = ("free", "must", "need")

    def __init__(self, must: list[int], free: list[int], need: int) -> None:
        self.must = must
        self.free = free
        self.need = need
        """How many devices to choose besides ``must``."""


class _Inventory:
    """One resource's devices as indices: tree order for devices, first-seen order for GPUs."""

    __slots__ = ("gpu_of", "gpu_sizes", "gpus", "ids", "index", "resource")

    def __init__(self, devices: Sequence[Device]) -> None:
        self.ids = tuple(d.id for d in devices)
        self.index = {device_id: i for i, device_id in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            repeated = [i for i in dict.fromkeys(self.ids) if self.ids.count(i) > 1]
            raise ValueError(f"devices repeat IDs: {_named(repeated)}")
        resources = tuple(dict.fromkeys(d.resource for d in devices))
        if len(resources) > 1:
            raise ValueError(f"an allocation policy serves one resource, got {', '.join(resources)}")
        self.resource = resources[0] if resources else "(no devices)"
        self.gpus = tuple(dict.fromkeys(d.gpu for d in devices))
        gpu_index = {gpu: i for i, gpu in enumerate(self.gpus)}
        self.gpu_of = tuple(gpu_index[d.gpu] for d in devices)
        sizes = [0] * len(self.gpus)
        for g in self.gpu_of:
            sizes[g] += 1
        self.gpu_sizes = tuple(sizes)

    def resolve(self, available: Sequence[str], must_include: Sequence[str], size: int) -> _Request:
        """Validate a request and translate it to indices; raises AllocationImpossible."""
        if size < 1:
            raise AllocationImpossible(f"allocation size must be at least 1, got {size}")
        index = self.index
        free = dict.fromkeys(available)
        must = dict.fromkeys(must_include)
        if not (free.keys() <= index.keys() and must.keys() <= index.keys()):
            unknown = [i for i in free if i not in index]
            unknown += [i for i in must if i not in index and i not in free]
            raise AllocationImpossible(f"not devices of {self.resource}: {_named(unknown)}")
        if not must.keys() <= free.keys():
            missing = [i for i in must if i not in free]
            raise AllocationImpossible(f"must-include devices are not available: {_named(missing)}")
        if len(must) > size:
            raise AllocationImpossible(f"{len(must)} must-include devices exceed the allocation size {size}")
        if size > len(free):
            raise AllocationImpossible(f"allocation size {size} exceeds the {len(free)} available devices")
        if not must:
            return _Request([], sorted(map(index.__getitem__, free)), size)
        return _Request(
            sorted(map(index.__getitem__, must)),
            sorted(map(index.__getitem__, free.keys() - must.keys())),
            size - len(must),
        )

    def by_gpu(self, devices: list[int]) -> list[list[int]]:
        """``devices`` (in tree order) grouped per GPU."""
        gpu_of = self.gpu_of
        grouped: list[list[int]] = [[] for _ in self.gpus]
        for d in devices:
            grouped[gpu_of[d]].append(d)
        return grouped

    def answer(self, must: list[int], free_by_gpu: list[list[int]], counts: Sequence[int]) -> list[str]:
        """The IDs of ``must`` plus the first ``counts[g]`` free devices of each GPU, in tree order."""
        chosen = list(must)
        for g, count in enumerate(counts):
            if count:
                chosen += free_by_gpu[g][:count]
        ids = self.ids
        return [ids[d] for d in sorted(chosen)]


class _DistributedPolicy:
    """Spread over the least-loaded GPUs, one device per GPU in turn; load counts devices in use."""

    __slots__ = ("_inventory",)

    def __init__(self, inventory: _Inventory) -> None:
        self._inventory = inventory

    def choose(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        inv = self._inventory
        req = inv.resolve(available, must_include, size)
        free_by_gpu = inv.by_gpu(req.free)
        # Devices not free are in use and must-include ones are about to be: both load their GPU.
        heap = [(inv.gpu_sizes[g] - len(free), g) for g, free in enumerate(free_by_gpu) if free]
        heapq.heapify(heap)
        counts = [0] * len(inv.gpus)
        for _ in range(req.need):
            load, g = heap[0]
            counts[g] += 1
            if counts[g] < len(free_by_gpu[g]):
                heapq.heapreplace(heap, (load + 1, g))
            else:
                heapq.heappop(heap)
        return inv.answer(req.must, free_by_gpu, counts)


class _PackedPolicy:
    """Fill the most-loaded GPUs first, every free device of one GPU before the next."""

    __slots__ = ("_inventory",)

    def __init__(self, inventory: _Inventory) -> None:
        self._inventory = inventory

    def choose(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        inv = self._inventory
        req = inv.resolve(available, must_include, size)
        free_by_gpu = inv.by_gpu(req.free)
        sizes = inv.gpu_sizes
        # Load (devices in use or must-include) is size minus free: most loaded first, then GPU order.
        order = sorted((len(free) - sizes[g], g) for g, free in enumerate(free_by_gpu) if free)
        counts = [0] * len(inv.gpus)
        need = req.need
        for _, g in order:
            if not need:
                break
            counts[g] = min(need, len(free_by_gpu[g]))
            need -= counts[g]
        return inv.answer(req.must, free_by_gpu, counts)


class _TopologyPolicy:
    """The best-connected set: highest sum of pair scores, then most pairs sharing a NUMA node.

    Both criteria are folded into one integer weight per GPU pair (link score times a factor larger than any
    set's count of same-NUMA pairs, plus one for a shared NUMA node), so the searches add plain integers.
    """

    __slots__ = ("_full", "_inventory", "_strength", "_tables", "_weights")

    def __init__(self, inventory: _Inventory, devices: Sequence[Device], tree: DeviceTree) -> None:
        self._inventory = inventory
        gpus = inventory.gpus
        # A GPU's devices share its PCIe function, hence its NUMA node.
        numa: dict[int, int | None] = {}
        for device, g in zip(devices, inventory.gpu_of, strict=True):
            numa.setdefault(g, device.numa_node)
        links = [[link_score(tree.link(a, b)) if a != b else 0 for b in gpus] for a in gpus]
        # Two devices on one GPU share memory and need no link: better than any link between GPUs here.
        same_gpu = max([PCIE_SCORES[PCIeLevel.INTERNAL], *(max(row) for row in links)]) + NVLINK_SCORE
        n = len(inventory.ids)
        factor = n * (n - 1) // 2 + 1
        self._weights = tuple(
            [
                (same_gpu if g == h else links[g][h]) * factor
                + (1 if numa[g] is not None and numa[g] == numa[h] else 0)
                for h in range(len(gpus))
            ]
            for g in range(len(gpus))
        )
        # Orders greedy seeds: better-connected GPUs first.
        self._strength = tuple(sum(row) for row in self._weights)
        self._full = (1 << len(gpus)) - 1
        self._tables = self._ranked_sets() if len(gpus) <= TABLE_GPUS and n == len(gpus) else None

    def _ranked_sets(self) -> tuple[tuple[tuple[int, tuple[str, ...]], ...], ...]:
        """Per size, every set of GPUs as (bit mask, IDs), best first; ties in tree order."""
        weights = self._weights
        ids = self._inventory.ids
        scores = [0] * (self._full + 1)
        for mask in range(1, self._full + 1):
            low = (mask & -mask).bit_length() - 1
            rest = mask & (mask - 1)
            score = scores[rest]
            row = weights[low]
            bits = rest
            while bits:
                score += row[(bits & -bits).bit_length() - 1]
                bits &= bits - 1
            scores[mask] = score
        ranked: list[list[tuple[int, tuple[int, ...], int]]] = [[] for _ in range(len(ids) + 1)]
        for mask in range(1, self._full + 1):
            members = tuple(i for i in range(len(ids)) if mask >> i & 1)
            ranked[len(members)].append((-scores[mask], members, mask))
        return tuple(
            tuple((mask, tuple(ids[i] for i in members)) for _, members, mask in sorted(sets)) for sets in ranked
        )

    def choose(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        inv = self._inventory
        req = inv.resolve(available, must_include, size)
        if self._tables is not None:
            # One device per GPU, so a device's index is its GPU's bit.
            must_mask = sum(1 << d for d in req.must)
            blocked = self._full & ~(must_mask | sum(1 << d for d in req.free))
            for mask, ids in self._tables[size]:
                if not mask & blocked and mask & must_mask == must_mask:
                    return list(ids)
            raise AssertionError("a validated request always has a fitting set")
        free_by_gpu = inv.by_gpu(req.free)
        caps = [len(free) for free in free_by_gpu]
        if req.need == len(req.free):
            return inv.answer(req.must, free_by_gpu, caps)
        gain = [0] * len(inv.gpus)
        for d in req.must:
            gain = list(map(add, gain, self._weights[inv.gpu_of[d]]))
        candidates = [g for g, cap in enumerate(caps) if cap]
        # Upper bounds on the count vectors: subsets of free devices, and multisets of candidate GPUs.
        sets = min(math.comb(len(req.free), req.need), math.comb(len(candidates) + req.need - 1, req.need))
        if sets <= EXHAUSTIVE_LIMIT:
            counts = self._exhaustive(candidates, caps, gain, req.need)
        else:
            counts = self._greedy(candidates, caps, gain, req.need)
        return inv.answer(req.must, free_by_gpu, counts)

    def _exhaustive(self, candidates: list[int], caps: list[int], gain: list[int], need: int) -> list[int]:
        """Visit every count vector, larger counts on earlier GPUs first, so ties keep the earliest set."""
        weights = self._weights
        reach = [0] * (len(candidates) + 1)
        for i in range(len(candidates) - 1, -1, -1):
            reach[i] = reach[i + 1] + caps[candidates[i]]
        counts = [0] * len(caps)
        chosen: list[tuple[int, int]] = []
        best_score = -1
        best = counts

        def visit(i: int, remaining: int, score: int) -> None:
            nonlocal best_score, best
            if remaining == 0:
                if score > best_score:
                    best_score, best = score, counts.copy()
                return
            if reach[i] < remaining:
                return
            g = candidates[i]
            row = weights[g]
            # What one device on g scores with the fixed devices and those chosen on earlier GPUs.
            base = gain[g] + sum(row[h] * c for h, c in chosen)
            for c in range(min(caps[g], remaining), 0, -1):
                counts[g] = c
                chosen.append((g, c))
                visit(i + 1, remaining - c, score + c * base + c * (c - 1) // 2 * row[g])
                chosen.pop()
            counts[g] = 0
            visit(i + 1, remaining, score)

        visit(0, need, 0)
        return best

    def _greedy(self, candidates: list[int], caps: list[int], gain: list[int], need: int) -> list[int]:
        """Grow a set from a few seeds, adding the best-scoring device each step; then improve it by swaps.

        ``marginal[g]`` is what one more device on GPU g adds to the set; a full GPU carries a large penalty
        in it, so that plain ``max`` never picks one.
        """
        weights = self._weights
        closed = [0 if cap else _UNAVAILABLE for cap in caps]
        start = list(map(add, gain, closed))
        step_cost = len(caps) + _STEP_OVERHEAD
        seed_count = max(1, min(len(candidates), GREEDY_WORK // (need * step_cost)))
        seeds = sorted(candidates, key=lambda g: (-gain[g], -self._strength[g], g))[:seed_count]
        best: tuple[int, list[int], list[int]] | None = None
        for seed in seeds:
            counts = [0] * len(caps)
            marginal = start
            score = 0
            g = seed
            for _ in range(need):
                score += marginal[g]
                counts[g] += 1
                marginal = list(map(add, marginal, weights[g]))
                if counts[g] == caps[g]:
                    marginal[g] += _UNAVAILABLE
                g = marginal.index(max(marginal))
            if best is None or score > best[0]:
                best = (score, counts, marginal)
        assert best is not None
        _, counts, marginal = best
        tries = GREEDY_WORK // step_cost
        improved = True
        while improved and tries > 0:
            improved = False
            for out in [g for g, c in enumerate(counts) if c]:
                if not counts[out] or tries <= 0:
                    continue
                tries -= 1
                row = weights[out]
                full = counts[out] == caps[out]
                # What the set loses by dropping one device of ``out``, against what each GPU would add instead.
                loss = marginal[out] - (_UNAVAILABLE if full else 0) - row[out]
                values = list(map(sub, marginal, row))
                top = max(values)
                if top <= loss:
                    continue
                into = values.index(top)
                counts[out] -= 1
                counts[into] += 1
                marginal = list(map(add, values, weights[into]))
                if full:
                    marginal[out] -= _UNAVAILABLE
                if counts[into] == caps[into]:
                    marginal[into] += _UNAVAILABLE
                improved = True
        return counts
