"""What a resource serves at one moment: its devices, with everything the RPCs need precomputed.

A new view is built when the inventory or health changes; the RPC paths read it and do no other work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuplugin.core.backend import AllocationPolicyKind
from gpuplugin.core.model import Device, DeviceTree, Health, ResourceRules
from gpuplugin.devices.allocation import AllocationPolicy, build_policy
from gpuplugin.devices.strategies import CDI_NAME_ATTRIBUTE
from gpuplugin.kubelet.api import v1beta1 as api


@dataclass(frozen=True, slots=True)
class ResourceView:
    """A resource's devices at one moment, with what the RPCs need precomputed."""

    resource: str
    devices: Mapping[str, Device]
    """By ID, in tree order, health as served (discovered health with health events folded in)."""
    unhealthy: frozenset[str]
    list_message: bytes
    """The encoded ListAndWatchResponse."""
    policy: AllocationPolicy
    policy_key: tuple[Any, ...]
    """What the policy was built from: the same key means the same policy (health alone does not matter)."""
    rules: ResourceRules
    version: int
    cdi_names: Mapping[str, str] = field(default_factory=dict)
    """The CDI device name of each device that has one (a CDI strategy is on), by ID."""

    @classmethod
    def build(
        cls,
        resource: str,
        devices: Sequence[Device],
        tree: DeviceTree,
        policy_kind: AllocationPolicyKind,
        version: int,
        previous: ResourceView | None = None,
    ) -> ResourceView:
        """Precompute a view; the allocation policy is reused from ``previous`` when only health changed."""
        policy_key = (policy_kind, tree.links, tuple((d.id, d.gpu, d.numa_node, d.instance) for d in devices))
        policy = (
            previous.policy
            if previous is not None and previous.policy_key == policy_key
            else build_policy(policy_kind, devices, tree)
        )
        listed = api.ListAndWatchResponse(
            devices=[
                api.Device(
                    id=d.id,
                    health=str(d.health),
                    topology=None if d.numa_node is None else api.TopologyInfo(nodes=[api.NumaNode(id=d.numa_node)]),
                )
                for d in devices
            ]
        )
        return cls(
            resource=resource,
            devices={d.id: d for d in devices},
            unhealthy=frozenset(d.id for d in devices if d.health is not Health.HEALTHY),
            list_message=bytes(listed),
            policy=policy,
            policy_key=policy_key,
            rules=tree.rules_of(resource),
            version=version,
            cdi_names={d.id: name for d in devices if (name := d.attributes.get(CDI_NAME_ATTRIBUTE)) is not None},
        )
