"""The server-wide KServe v2 routes of a repository deployed on Ray Serve (application "conveyor", at /v2).

Each model is its own application at /v2/models/<model>; Serve's proxy sends what no
model's prefix matches here: liveness, readiness (every model of the latest deployment has
a live replica), server metadata, the model list and the repository index (every model
application with live replicas, whichever `conveyor ray serve` deployed it), and a clear
404 for a model that is not deployed. What the answers say about the replicas comes from
the hub.
"""

from __future__ import annotations

from typing import Any

import orjson

from conveyor import __version__
from conveyor.protocol.http_codec import encode_error
from conveyor.scaleout.ray_hub import hub_actor
from conveyor.server.dataplane import EXTENSIONS, SERVER_NAME
from conveyor.server.responses import Response
from conveyor.server.http import bearer_authorized
from conveyor.server.routes import Route, match_route, needs_api_key

__all__ = ["ServerRoutes"]


class ServerRoutes:
    """A Serve deployment class answering the server-wide routes over the model applications `apps`."""

    def __init__(self, apps: list[str], api_key: str | None = None, api_key_scope: str = "control") -> None:
        self.apps = sorted(apps)
        self.api_key = api_key.encode() if api_key else None
        self.api_key_scope = api_key_scope
        self._hub = hub_actor()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response as StarletteResponse

        response = await self.answer(request.scope["method"].encode(), request.scope["path"],
                                     dict(request.headers.raw))
        return StarletteResponse(b"".join(response.body), status_code=response.status,
                                 media_type=response.content_type.decode())

    async def answer(self, method: bytes, path: str, headers: dict[bytes, bytes]) -> Response:
        route = match_route(method, path)
        if isinstance(route, Response):
            return route
        if needs_api_key(route, self.api_key_scope) and not bearer_authorized(headers, self.api_key):
            return Response(401, [encode_error("this endpoint needs 'Authorization: Bearer <api key>' (the key the "
                                               "deployment was started with: --api-key)")])
        if route.name == "live":
            return Response(200, [b"{}"])
        if route.name == "ready":
            live = await self._live_counts()
            missing = [app for app in self.apps if app not in live]
            if missing:
                return Response(400, [encode_error(f"the server is not ready: no live replica of {', '.join(missing)} "
                                                   "(serve.status() says why)")])
            return Response(200, [b"{}"])
        if route.name == "server_metadata":
            return _json({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})
        counts = await self._live_counts()
        apps = sorted(set(self.apps) | set(counts))
        if route.name == "models":
            return _json({"models": apps})
        if route.name == "index":
            return _json([
                {"name": app, "state": "READY" if counts.get(app) else "UNAVAILABLE",
                 "reason": f"{counts.get(app, 0)} live replica{'s' if counts.get(app, 0) != 1 else ''}"}
                for app in apps
            ])  # fmt: skip
        if route.model and route.model not in apps:
            return Response(404, [encode_error(f"model '{route.model}' is not deployed (deployed: {', '.join(apps)})")])
        return Response(404, [encode_error(_elsewhere(route))])

    async def _live_counts(self) -> dict[str, int]:
        """Live replicas per model application: those this deployment named, and any other
        model deployed by Conveyor on the cluster (an earlier `conveyor ray serve`)."""
        counts: dict[str, int] = {}
        for info in await self._hub.replicas.remote():
            if info.get("routed"):
                counts[info["app"]] = counts.get(info["app"], 0) + 1
        return counts


def _elsewhere(route: Route) -> str:
    return (f"{route.name} is not served on Ray Serve's proxy: repository control and rollouts are the "
            "deployment's (redeploy with conveyor ray serve); each replica's /metrics is listed by "
            "conveyor ray endpoints")


def _json(payload: Any) -> Response:
    return Response(200, [orjson.dumps(payload)])
