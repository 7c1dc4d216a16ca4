"""Finding backends by name: built-in ones and third-party ones, through the ``gpuplugin.backends`` entry point."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from gpuplugin.core.backend import Backend
from gpuplugin.devices.health import HealthPolicy

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
    found = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILT_IN.items()}
    found.update({ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)})
    return found


def backend_names() -> list[str]:
    return sorted(_entry_points())


def load_factory(name: str) -> BackendFactory:
    ep = _entry_points().get(name)
    if ep is not None:
        factory: BackendFactory = ep.load()
        return factory
    raise UnknownBackend(f"no backend named {name!r}; installed: {', '.join(backend_names()) or 'none'}")
