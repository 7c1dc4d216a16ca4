"""Finding backends by name: built-in ones and third-party ones, through the ``gpuplugin.backends`` entry point."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuplugin.core.backend import Backend
from gpuplugin.devices.health import HealthPolicy

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

ENTRY_POINT_GROUP = "gpuplugin.backends"
#: The backends that ship with gpuplugin, found even where the package metadata is not installed.
BUILT_IN = {
    "mock": "gpuplugin.backends.mock:create",
    "nvml": "gpuplugin.backends.nvml:create",
    "partitioned": "gpuplugin.backends.partitioned:create",
}


@dataclass(frozen=True, slots=True)
class BackendContext:
    """What the core hands a backend factory."""

    options: Mapping[str, Any] = field(default_factory=dict)
    """The backend's own settings: its section of the config file, overridden by its command-line flags."""
    health_policy: HealthPolicy = field(default_factory=HealthPolicy)
    state_dir: Path = Path("/run/gpuplugin")
    """Where the backend may keep sockets and files that live as long as the process (the mock's control socket)."""


BackendFactory = Callable[[BackendContext], Backend]


class UnknownBackend(LookupError):
    """No backend has that name; retrying does not help."""


def _entry_points() -> dict[str, EntryPoint]:
    # Here, not at the top: scanning every installed distribution's metadata costs a serve start milliseconds that
    # a built-in backend does not need.
    from importlib.metadata import EntryPoint, entry_points

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update({name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILT_IN.items()})
    return found


def backend_names() -> list[str]:
    return sorted(_entry_points())


def load_factory(name: str) -> BackendFactory:
    """The factory of the backend ``name``: a built-in one without reading any metadata, else an entry point's."""
    if name in BUILT_IN:
        module, _, attribute = BUILT_IN[name].partition(":")
        built_in: BackendFactory = getattr(importlib.import_module(module), attribute)
        return built_in
    ep = _entry_points().get(name)
    if ep is not None:
        factory: BackendFactory = ep.load()
        return factory
    raise UnknownBackend(f"no backend named {name!r}; installed: {', '.join(backend_names()) or 'none'}")
