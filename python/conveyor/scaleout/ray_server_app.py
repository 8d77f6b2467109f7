"""The server-wide KServe v2 routes of a repository deployed on Ray Serve (application "conveyor", at /v2).

Each model is its own application at /v2/models/<model>; Serve's proxy sends what no
model's prefix matches here: liveness, readiness (every model has a live replica), server
metadata, the model list and the repository index, and a clear 404 for a model that is
not deployed. What the answers say about the replicas comes from the hub.
"""

from __future__ import annotations

from typing import Any

import orjson

from conveyor.protocol.http_codec import encode_error
from conveyor.scaleout.ray_hub import hub_actor
from conveyor.server.dataplane import EXTENSIONS, SERVER_NAME
from conveyor.server.responses import Response
from conveyor.server.routes import Route, match_route

__all__ = ["ServerRoutes"]


class ServerRoutes:
    """A Serve deployment class answering the server-wide routes over the model applications `apps`."""

    def __init__(self, apps: list[str], server_version: str = "0") -> None:
        self.apps = sorted(apps)
        self.server_version = server_version
        self._hub = hub_actor()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response as StarletteResponse

        response = await self.answer(request.scope["method"].encode(), request.scope["path"])
        return StarletteResponse(b"".join(response.body), status_code=response.status,
                                 media_type=response.content_type.decode())

    async def answer(self, method: bytes, path: str) -> Response:
        route = match_route(method, path)
        if isinstance(route, Response):
            return route
        if route.name == "live":
            return Response(200, [b"{}"])
        if route.name == "ready":
            missing = await self._without_replicas()
            if missing:
                return Response(400, [encode_error(f"the server is not ready: no live replica of {', '.join(missing)} "
                                                   "(serve.status() says why)")])
            return Response(200, [b"{}"])
        if route.name == "server_metadata":
            return _json({"name": SERVER_NAME, "version": self.server_version, "extensions": list(EXTENSIONS)})
        if route.name == "models":
            return _json({"models": self.apps})
        if route.name == "index":
            return _json(await self._index())
        if route.model and route.model not in self.apps:
            return Response(404, [encode_error(f"model '{route.model}' is not deployed (deployed: "
                                               f"{', '.join(self.apps)})")])
        return Response(404, [encode_error(_elsewhere(route))])

    async def _without_replicas(self) -> list[str]:
        live = {info["app"] for info in await self._hub.replicas.remote()}
        return [app for app in self.apps if app not in live]

    async def _index(self) -> list[dict[str, Any]]:
        counts: dict[str, int] = {}
        for info in await self._hub.replicas.remote():
            counts[info["app"]] = counts.get(info["app"], 0) + 1
        rows = []
        for app in self.apps:
            replicas = counts.get(app, 0)
            rows.append({"name": app, "state": "READY" if replicas else "UNAVAILABLE",
                         "reason": f"{replicas} live replica{'s' if replicas != 1 else ''}"})
        return rows


def _elsewhere(route: Route) -> str:
    return (f"{route.name} is not served on Ray Serve's proxy: repository control and rollouts are the "
            "deployment's (redeploy with conveyor ray serve); each replica's /metrics is listed by "
            "conveyor ray endpoints")


def _json(payload: Any) -> Response:
    return Response(200, [orjson.dumps(payload)])
