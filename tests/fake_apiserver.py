"""A fake Kubernetes API server on loopback, for the DRA driver's tests: Nodes, ResourceSlices (server-side apply,
list by field selector, delete) and ResourceClaims, in memory, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SLICES = "/apis/resource.k8s.io/v1/resourceslices"


def reply(body: Any, code: int = 200) -> web.Response:
    """JSON as the API server sends it: ``application/json`` with no charset (clients match the type exactly)."""
    return web.Response(body=json.dumps(body).encode(), status=code, headers={"Content-Type": "application/json"})


def status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }
    return reply(body, code)


@dataclass
class FakeApiServer:
    """What the fake holds; ``down`` makes every request answer 503."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    claims: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    gates: frozenset[str] = frozenset()
    """The alpha DRA gates on; as with Kubernetes 1.34's defaults, none, so their fields are dropped."""
    down: bool = False
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def add_node(self, name: str, uid: str) -> None:
        self.nodes[name] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": uid}}

    def add_claim(self, namespace: str, name: str, uid: str, results: list[dict[str, str]]) -> None:
        self.claims[(namespace, name)] = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"devices": {"requests": [{"name": r["request"]} for r in results]}},
            "status": {"allocation": {"devices": {"results": results}}},
        }

    def devices(self) -> list[str]:
        """Every device name in every slice, in slice-name order."""
        return [d["name"] for name in sorted(self.slices) for d in self.slices[name]["spec"]["devices"]]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/api/v1/nodes/{name}", self._node)
        app.router.add_get(SLICES, self._list_slices)
        app.router.add_patch(SLICES + "/{name}", self._apply_slice)
        app.router.add_delete(SLICES + "/{name}", self._delete_slice)
        app.router.add_get("/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}", self._claim)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        if self.down:
            return status(503, "ServiceUnavailable", "the fake API server is down")
        response: web.StreamResponse = await handler(request)
        return response

    async def _node(self, request: web.Request) -> web.Response:
        node = self.nodes.get(request.match_info["name"])
        return reply(node) if node else status(404, "NotFound", "node not found")

    async def _list_slices(self, request: web.Request) -> web.Response:
        wanted = dict(part.split("=", 1) for part in request.query.get("fieldSelector", "").split(",") if "=" in part)
        items = [
            s
            for s in self.slices.values()
            if all(s["spec"].get(key.removeprefix("spec.")) == value for key, value in wanted.items())
        ]
        body = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList", "metadata": {}, "items": items}
        return reply(body)

    async def _apply_slice(self, request: web.Request) -> web.Response:
        if request.content_type != "application/apply-patch+yaml":
            return status(415, "UnsupportedMediaType", request.content_type)
        body = json.loads(await request.read())
        if body["metadata"]["name"] != request.match_info["name"]:
            return status(400, "BadRequest", "name mismatch")
        if "DRAPartitionableDevices" not in self.gates:
            body["spec"].pop("sharedCounters", None)
            for device in body["spec"].get("devices", []):
                device.pop("consumesCounters", None)
        if "DRADeviceTaints" not in self.gates:
            for device in body["spec"].get("devices", []):
                device.pop("taints", None)
        if request.query.get("dryRun") != "All":
            self.slices[request.match_info["name"]] = body
        return reply(body)

    async def _delete_slice(self, request: web.Request) -> web.Response:
        if self.slices.pop(request.match_info["name"], None) is None:
            return status(404, "NotFound", "slice not found")
        return reply({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    async def _claim(self, request: web.Request) -> web.Response:
        claim = self.claims.get((request.match_info["namespace"], request.match_info["name"]))
        return reply(claim) if claim else status(404, "NotFound", "claim not found")


@asynccontextmanager
async def fake_apiserver() -> AsyncIterator[FakeApiServer]:
    """The fake, listening on a free loopback port until the block ends."""
    fake = FakeApiServer()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        fake.url = f"http://127.0.0.1:{port}"
        yield fake
    finally:
        await runner.cleanup()
