"""Named scenarios: what node the plugin serves and which phases run, each a few lines of settings."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

RESOURCE = "nvidia.com/gpu"
#: How the plugin serves each mock GPU: whole, sliced into MIG-style partitions, or time-sliced into replicas.
NODE_KINDS = ("whole", "mig", "replicas")
#: The partition profile of ``mig``: the smallest, so the most partitions per GPU.
MIG_PROFILE = "1g.18gb"
MIG_RESOURCE = f"nvidia.com/mig-{MIG_PROFILE}"
#: 1g.18gb partitions an H200 holds (its 7 compute slices): what ``layout: all-1g.18gb`` makes of each GPU.
MIG_PER_GPU = 7

#: Where the plugin's devices come from: the mock backend's fake GPUs, or the node's real ones through NVML.
BACKENDS = ("mock", "nvml")

#: GPUs per container and how often each is asked for: mostly small jobs, now and then a whole node's worth.
DEFAULT_SIZE_MIX: Mapping[int, float] = MappingProxyType({1: 0.55, 2: 0.25, 4: 0.15, 8: 0.05})


@dataclass(frozen=True, slots=True)
class ChurnSettings:
    """Pods arriving, living and leaving while health flaps and (optionally) the kubelet restarts."""

    duration_s: float = 30.0
    """How long pods keep arriving (seconds)."""
    arrival_rate_per_s: float | None = None
    """Poisson arrivals (pods per second); None sends the next pod as soon as the previous one is admitted."""
    max_containers: int = 2
    """Each pod has 1 to this many containers (uniform)."""
    size_mix: Mapping[int, float] = field(default_factory=lambda: DEFAULT_SIZE_MIX)
    """Devices per container and their weights."""
    mean_lifetime_s: float = 0.05
    """Mean of the exponential pod lifetime (seconds): short, so devices are freed and taken again all the time."""
    flap_rate_per_s: float = 2.0
    """Health flaps started per second (Poisson); 0 turns them off."""
    mean_flap_hold_s: float = 0.2
    """How long a flapped GPU stays unhealthy before it is recovered (exponential mean, seconds)."""
    kubelet_restarts: int = 0
    """Kubelet restarts spread evenly over the run."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One benchmark: the node, and how many calls, pods and restarts each phase makes (0 or None skips it)."""

    name: str
    description: str
    gpus: int = 8
    """Mock GPUs on the node (count); 0 (the nvml backend): as many as register."""
    callers: int = 1
    """Concurrent callers of Allocate in the RPC phase (the kubelet itself uses one)."""
    concurrent_callers: int = 0
    """A second Allocate phase with this many concurrent callers, floors included; 0: none."""
    allocate_calls: int = 10_000
    """Allocate calls of one GPU per target (plugin, and each baseline) in the RPC phase."""
    preferred_calls: int = 5_000
    """GetPreferredAllocation calls alone, sizes drawn from the churn's size mix."""
    block_calls: int = 500
    """Calls per target before switching to the next one: targets alternate, so drift hits all alike."""
    admissions: int = 2_000
    """Whole admissions by the Go client (GetPreferredAllocation, Allocate, checkpoint), sizes from the churn's mix;
    run where gokubelet is built."""
    baselines: bool = True
    """Measure the grpclib and grpcio floors with the same client loop."""
    churn: ChurnSettings | None = field(default_factory=ChurnSettings)
    restarts: int = 20
    """Kubelet restarts in the restart phase (median re-registration time)."""
    mock_only: bool = False
    """About the size of a mock node: it means nothing on a real one, so the nvml backend refuses it."""
    node: str = "whole"
    """How each GPU is served: ``whole``, ``mig`` (partitions of 1g.18gb) or ``replicas`` (time-sliced)."""
    per_gpu: int = 1
    """Devices each GPU is served as: 1 whole, 7 partitions (``mig``), or the time-slicing replica count."""
    against_nvidia: bool = False
    """After ours, run NVIDIA's device plugin through the same phases with the same clients, where it can run
    (the nvml backend, a GPU, the binary built); the report's comparison with NVIDIA reads that run."""

    def __post_init__(self) -> None:
        if self.node not in NODE_KINDS:
            raise ValueError(f"scenario {self.name}: node must be one of {', '.join(NODE_KINDS)}, got {self.node!r}")
        allowed = {"whole": self.per_gpu == 1, "mig": self.per_gpu == MIG_PER_GPU, "replicas": self.per_gpu >= 2}
        if not allowed[self.node]:
            raise ValueError(f"scenario {self.name}: {self.per_gpu} devices per GPU do not fit node {self.node!r}")

    @property
    def resource(self) -> str:
        """The resource the plugin serves and the load asks for."""
        return MIG_RESOURCE if self.node == "mig" else RESOURCE

    @property
    def devices(self) -> int:
        """Devices of :attr:`resource` on the mock node."""
        return self.gpus * self.per_gpu

    @property
    def max_per_container(self) -> int | None:
        """The most devices a churn container asks for; None: the mix as it is, within the node.

        Partitions: one GPU's worth (a container wanting more would ask for whole GPUs). Replicas: one per GPU, as
        the distributed policy hands them out; a second replica of the same GPU adds no compute.
        """
        return {"whole": None, "mig": self.per_gpu, "replicas": self.gpus}[self.node]

    def plugin_config(self) -> dict[str, Any] | None:
        """The plugin's config file (``--config``) for a sliced node; None: whole GPUs, command-line flags only."""
        if self.node == "mig":
            partitioned = {
                "parent": "mock",
                "parent_options": {"gpus": self.gpus},
                "strategy": "mixed",
                "layout": f"all-{MIG_PROFILE}",
            }
            return {"version": "v1", "backend": {"name": "partitioned", "partitioned": partitioned}}
        if self.node == "replicas":
            return {
                "version": "v1",
                "backend": {"name": "mock", "mock": {"gpus": self.gpus}},
                "sharing": {"timeSlicing": {"resources": [{"name": RESOURCE, "replicas": self.per_gpu}]}},
            }
        return None

    def quick(self) -> Scenario:
        """A run of a few seconds that proves the suite works; its figures say nothing about speed."""
        churn = self.churn and dataclasses.replace(
            self.churn, duration_s=1.5, kubelet_restarts=min(self.churn.kubelet_restarts, 1)
        )
        return dataclasses.replace(
            self,
            allocate_calls=min(self.allocate_calls, 200),
            preferred_calls=min(self.preferred_calls, 100),
            admissions=min(self.admissions, 50),
            block_calls=min(self.block_calls, 100),
            churn=churn,
            restarts=min(self.restarts, 2),
        )

    def on_backend(self, backend: str) -> Scenario:
        """The scenario as run on ``backend``: on nvml the node is the real one, named so, and nothing flaps.

        NVML's health events come from the GPUs alone (there is no control socket to inject them), so the churn
        runs without flaps; ``benchmarks.nvml_figures`` times a health event instead, at the health thread's edge.
        """
        if backend == "mock":
            return self
        if backend != "nvml":
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if self.mock_only:
            raise ValueError(f"scenario {self.name} measures a {self.gpus}-GPU mock node; on nvml run 'nvml'")
        churn = self.churn and dataclasses.replace(self.churn, flap_rate_per_s=0.0)
        return dataclasses.replace(
            self,
            name=re.sub(r"^whole-\d+", "whole-nvml", self.name),
            description=f"{self.description}; on nvml: the node's own GPUs, churn without health flaps",
            gpus=0,
            churn=churn,
        )


SCENARIOS: Mapping[str, Scenario] = MappingProxyType(
    {
        s.name: s
        for s in (
            Scenario("whole-8", "whole GPUs on an 8-GPU node, one caller: every phase"),
            Scenario(
                "whole-8-c16",
                "whole GPUs on an 8-GPU node, 16 concurrent Allocate callers",
                callers=16,
                preferred_calls=0,
                admissions=0,
                churn=None,
                restarts=0,
            ),
            Scenario("whole-64", "whole GPUs on a 64-GPU mock node: every phase", gpus=64, mock_only=True),
            Scenario(
                "allocate",
                "Allocate of one GPU, sequential calls through the simulator, beside both floors",
                preferred_calls=0,
                admissions=0,
                churn=None,
                restarts=0,
            ),
            Scenario(
                "restarts",
                "kubelet restarts: median time to register again",
                allocate_calls=0,
                preferred_calls=0,
                admissions=0,
                baselines=False,
                churn=None,
            ),
            Scenario(
                "churn",
                "pod churn with health flaps and kubelet restarts mid-run on an 8-GPU node",
                allocate_calls=0,
                preferred_calls=0,
                admissions=0,
                baselines=False,
                churn=ChurnSettings(kubelet_restarts=3),
                restarts=0,
            ),
            Scenario(
                "nvml",
                "whole GPUs of the real node (2 on mock): every phase, 1 and 16 callers, churn with kubelet restarts",
                gpus=2,
                concurrent_callers=16,
                churn=ChurnSettings(kubelet_restarts=3),
                against_nvidia=True,
            ),
            Scenario(
                "mig-8x7",
                "8 mock GPUs x 7 MIG-style partitions (partitioned backend, mixed, all-1g.18gb): 56 "
                f"{MIG_RESOURCE}, every phase",
                mock_only=True,
                node="mig",
                per_gpu=MIG_PER_GPU,
            ),
            Scenario(
                "replicas-8x16",
                f"8 mock GPUs x 16 time-sliced replicas (distributed policy): 128 {RESOURCE}, every phase",
                mock_only=True,
                node="replicas",
                per_gpu=16,
            ),
        )
    }
)

#: What ``all`` runs: every scenario except the ones that only repeat a phase of another.
FULL_SUITE = ("whole-8", "whole-8-c16", "whole-64", "churn", "mig-8x7", "replicas-8x16")
#: ``all`` on the nvml backend: the node's size is fixed, so the mock node sizes give way to the one ``nvml`` run.
FULL_SUITE_NVML = ("nvml",)


def suite(name: str, backend: str) -> tuple[str, ...]:
    """The scenario names a command line's SCENARIO stands for on ``backend``."""
    if name != "all":
        return (name,)
    return FULL_SUITE_NVML if backend == "nvml" else FULL_SUITE
