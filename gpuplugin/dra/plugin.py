"""The DRA kubelet plugin of one node: the DRAPlugin service on its socket, registered with the plugin watcher,
its prepared claims kept in a checkpoint across restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from grpclib.server import Server

from gpuplugin.core.model import DeviceTree
from gpuplugin.devices.mps import ControlDaemonSettings
from gpuplugin.dra.checkpoint import Checkpoint
from gpuplugin.dra.claims import ClaimSource
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.health import HealthFeed, HealthService
from gpuplugin.dra.preparer import ClaimPreparer
from gpuplugin.dra.registration import Registration
from gpuplugin.dra.service import DraCodec, DraPluginService

log = structlog.get_logger("gpuplugin.dra.plugin")


class DraPlugin:
    """Serves claims of ``settings.driver_name`` on the devices of the tree ``tree()`` returns when asked."""

    def __init__(
        self,
        settings: DriverSettings,
        tree: Callable[[], DeviceTree],
        claims: ClaimSource,
        *,
        backend: object = None,
        mps: ControlDaemonSettings | None = None,
    ) -> None:
        """``backend`` and ``mps``: how claims' sharing is applied on the node (ClaimPreparer)."""
        self.settings = settings
        self.checkpoint = Checkpoint(settings.checkpoint_path)
        self.preparer = ClaimPreparer(settings, tree, claims, self.checkpoint, backend=backend, mps=mps)
        self.health = HealthFeed(tree)
        self.registration = Registration(settings)
        self._server: Server | None = None

    async def start(self) -> None:
        """Load the checkpoint, serve the DRA socket, then offer registration (the kubelet dials the socket it
        names right away). Raises CheckpointCorrupt or OSError; nothing is left serving then."""
        await self.checkpoint.load()
        path = self.settings.socket_path
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        # A socket left by a previous run refuses the bind; nothing listens on it any more.
        path.unlink(missing_ok=True)
        server = Server([DraPluginService(self.preparer), HealthService(self.settings, self.health)], codec=DraCodec())
        try:
            await server.start(path=str(path))
            self._server = server
            await self.registration.start()
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "DRA plugin serving",
            driver=self.settings.driver_name,
            socket=str(path),
            prepared_claims=len(self.checkpoint.claims),
        )

    async def tree_changed(self) -> None:
        """The tree ``tree()`` returns changed: health streams send the new list where a device's health changed."""
        await self.health.tree_changed()

    async def aclose(self) -> None:
        """Withdraw the registration, stop serving and remove the socket. Prepared claims and their CDI specs stay:
        their pods still run, and the next start serves them from the checkpoint."""
        await self.registration.close()
        await self.health.close()
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()
            self.settings.socket_path.unlink(missing_ok=True)
