"""The partitioned backend: a parent backend's GPUs (``mock`` or ``nvml``) served as MIG-style partitions.

Registered under the ``gpuplugin.backends`` entry point as ``partitioned = "gpuplugin.backends.partitioned:create"``.
"""

from __future__ import annotations

from gpuplugin.backends.partitioned.backend import (
    InstanceProfileSource,
    PartitionedBackend,
    build_parent,
    parent_context,
)
from gpuplugin.backends.partitioned.placement import LayoutError, Placement, fill, place
from gpuplugin.backends.partitioned.profiles import (
    H200_PROFILES,
    InstanceProfileInfo,
    Profile,
    ProfileError,
    ProfileTable,
    memory_gb,
    profile_name,
    table_from_infos,
    valid_starts,
)
from gpuplugin.backends.partitioned.settings import (
    Layout,
    PartitionedSettings,
    ProfileSource,
    Strategy,
    parse_layout,
)
from gpuplugin.backends.partitioned.slicing import StrategyError, mig_resource, partition_id, slice_tree
from gpuplugin.backends.registry import BackendContext

__all__ = [
    "H200_PROFILES",
    "InstanceProfileInfo",
    "InstanceProfileSource",
    "Layout",
    "LayoutError",
    "PartitionedBackend",
    "PartitionedSettings",
    "Placement",
    "Profile",
    "ProfileError",
    "ProfileSource",
    "ProfileTable",
    "Strategy",
    "StrategyError",
    "build_parent",
    "create",
    "fill",
    "memory_gb",
    "mig_resource",
    "parent_context",
    "parse_layout",
    "partition_id",
    "place",
    "profile_name",
    "slice_tree",
    "table_from_infos",
    "valid_starts",
]


def create(ctx: BackendContext) -> PartitionedBackend:
    """The entry point's factory: settings from ``ctx.options`` (raises ConfigError), the parent built
    by its own factory with the same health policy and state directory."""
    settings = PartitionedSettings.from_options(ctx.options)
    return PartitionedBackend(settings, build_parent(settings, ctx))
