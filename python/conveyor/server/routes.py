"""The v2 REST routes, matched by splitting the path (no regex, no framework)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from conveyor.protocol.http_codec import encode_error
from conveyor.server.responses import Response


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    model: str = ""
    version: str = ""
    control: bool = False  # repository, rollout and shared-memory control: guarded by the API key
    action: str = ""  # rollout_action: promote, pause, resume, abort or rollback
    region: str = ""  # shared-memory routes: the region named in the path ("" for all)


_GET_MODEL_ROUTES = {
    "": "model_metadata", "ready": "model_ready", "config": "model_config", "stats": "stats", "monitor": "monitor",
}  # fmt: skip
_POST_MODEL_ROUTES = {"infer": "infer", "feedback": "feedback"}
ROLLOUT_ACTIONS = ("promote", "pause", "resume", "abort", "rollback")
# The shared-memory extension's path prefix -> the kind its route names start with.
SHARED_MEMORY_KINDS = {"systemsharedmemory": "system", "cudasharedmemory": "cuda"}

# Routes anyone who can reach the port may call: health, metadata, statistics and
# monitoring reads, inference and its feedback. Every other route (repository index, load
# and unload, starting and steering rollouts, shared-memory status, registration and
# unregistration, and any route added later) needs the API key
# when the server has one: the guard is deny-by-default, so a new control route cannot
# slip through unguarded.
OPEN_ROUTES = frozenset({
    "live", "ready", "server_metadata", "models", "model_metadata", "model_ready", "model_config", "stats",
    "monitor", "metrics", "infer", "feedback", "rollout", "rollout_decisions",
})  # fmt: skip


# With --api-key-scope all, only these stay open: probes need no key.
HEALTH_ROUTES = frozenset({"live", "ready"})
API_KEY_SCOPES = ("control", "all")


def needs_api_key(route: Route, scope: str = "control") -> bool:
    """Whether `route` needs the API key (when the server has one): `scope` "control" keys the
    routes outside OPEN_ROUTES, "all" keys every route but the health probes."""
    if scope == "all":
        return route.name not in HEALTH_ROUTES
    return route.control or route.name not in OPEN_ROUTES


def match_route(method: bytes, path: str):
    """A Route, or a ready Response for unknown paths (404) and wrong methods (405)."""
    # Split before decoding: an encoded "/" inside a segment stays part of that segment.
    parts = [unquote(part) for part in path.strip("/").split("/")]
    found = _match(parts)
    if found is None:
        return Response(404, [encode_error(f"no route for {path}")])
    route, allowed = found
    if method not in allowed:
        methods = ", ".join(m.decode() for m in allowed)
        return Response(405, [encode_error(f"{path} accepts {methods}, not {method.decode('latin-1')}")],
                        headers=[b"Allow: " + methods.encode()])
    return route


def _match(parts: list[str]) -> tuple[Route, tuple[bytes, ...]] | None:
    get, post = (b"GET",), (b"POST",)
    if parts == ["metrics"]:
        return Route("metrics"), get
    if not parts or parts[0] != "v2":
        return None
    rest = parts[1:]
    if not rest:
        return Route("server_metadata"), get
    if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        return Route(rest[1]), get
    if rest[0] == "repository":
        return _match_repository(rest[1:], post)
    if rest[0] in SHARED_MEMORY_KINDS:
        return _match_shared_memory(SHARED_MEMORY_KINDS[rest[0]], rest[1:])
    if rest[0] != "models":
        return None
    if rest == ["models"]:
        return Route("models"), get
    if rest == ["models", "stats"]:
        return Route("stats"), get
    model, tail = rest[1], rest[2:]
    if tail and tail[0] == "rollout" and model:
        return _match_rollout(model, tail[1:])
    version = ""
    if len(tail) >= 2 and tail[0] == "versions":
        version, tail = tail[1], tail[2:]
    if len(tail) > 1 or not model:
        return None
    action = tail[0] if tail else ""
    if action in _POST_MODEL_ROUTES:
        return Route(_POST_MODEL_ROUTES[action], model, version), post
    name = _GET_MODEL_ROUTES.get(action)
    return (Route(name, model, version), get) if name else None


def _match_rollout(model: str, rest: list[str]) -> tuple[Route, tuple[bytes, ...]] | None:
    # /v2/models/{m}/rollout (GET status, POST start), .../decisions (GET), .../{action} (POST)
    if not rest:
        return Route("rollout", model), (b"GET", b"POST")
    if rest == ["decisions"]:
        return Route("rollout_decisions", model), (b"GET",)
    if len(rest) == 1 and rest[0] in ROLLOUT_ACTIONS:
        return Route("rollout_action", model, control=True, action=rest[0]), (b"POST",)
    return None


def _match_repository(rest: list[str], post: tuple[bytes, ...]) -> tuple[Route, tuple[bytes, ...]] | None:
    # /v2/repository[/{repository name}]/index and .../models/{m}/(load|unload)
    if rest and rest[-1] == "index" and len(rest) <= 2:
        return Route("index", control=True), post
    if len(rest) >= 3 and rest[-3] == "models" and rest[-1] in ("load", "unload") and len(rest) <= 4:
        return Route(rest[-1], rest[-2], control=True), post
    return None


def _match_shared_memory(kind: str, rest: list[str]) -> tuple[Route, tuple[bytes, ...]] | None:
    # /v2/{system,cuda}sharedmemory/status (GET) and .../unregister (POST), for every region;
    # .../region/{r}/status (GET), .../region/{r}/register and .../region/{r}/unregister (POST).
    region = ""
    if len(rest) == 3 and rest[0] == "region" and rest[1]:
        region, rest = rest[1], rest[2:]
    if rest == ["status"]:
        return Route(f"{kind}_shared_memory_status", control=True, region=region), (b"GET",)
    if rest == ["unregister"] or (rest == ["register"] and region):
        return Route(f"{kind}_shared_memory_{rest[0]}", control=True, region=region), (b"POST",)
    return None
