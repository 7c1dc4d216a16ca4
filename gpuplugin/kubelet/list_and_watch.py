"""The ListAndWatch stream: every open stream gets the current device list, then each new one.

The template is grpclib's health ``Watch``: send the current state, wait for a change, send again, clean up in
``finally``. Stopping sends one empty list, so the kubelet drops the resource's allocatable to zero at once.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import structlog
from grpclib.server import Stream

from gpuplugin.core.errors import NotServing
from gpuplugin.kubelet.view import ResourceView

log = structlog.get_logger("gpuplugin.kubelet.list_and_watch")


class DeviceListFeed:
    """One resource's current view, and the ListAndWatch streams that follow it."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self._log = log.bind(resource=resource)
        self._view: ResourceView | None = None
        self._changed = asyncio.Condition()
        self._stopping = False
        self.open_streams = 0

    @property
    def view(self) -> ResourceView | None:
        return self._view

    def current(self) -> ResourceView:
        """The view the RPCs answer from; NotServing before the first one and once stopping."""
        view = self._view
        if view is None or self._stopping:
            raise NotServing(f"{self.resource} is not being served now")
        return view

    async def publish(self, view: ResourceView) -> None:
        """Serve ``view`` from now on; every open stream sends it."""
        async with self._changed:
            self._view = view
            self._changed.notify_all()

    async def stop(self) -> None:
        """Every open stream sends an empty list and ends."""
        async with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def _has_news(self, sent: int) -> bool:
        return self._stopping or (self._view is not None and self._view.version != sent)

    async def stream(self, stream: Stream[Any, Any]) -> None:
        """The ListAndWatch handler: runs until the kubelet hangs up or the feed stops."""
        await stream.recv_message()
        self.open_streams += 1
        self._log.info("ListAndWatch stream opened", streams=self.open_streams)
        sent = -1
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(functools.partial(self._has_news, sent))
                    if self._stopping:
                        message = b""
                    else:
                        assert self._view is not None
                        message, sent = self._view.list_message, self._view.version
                await stream.send_message(message)
                if self._stopping:
                    return
        finally:
            self.open_streams -= 1
            self._log.info("ListAndWatch stream closed", streams=self.open_streams)
