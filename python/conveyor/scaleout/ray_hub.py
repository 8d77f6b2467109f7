"""The hub: one Ray actor through which Conveyor's replicas find and ask each other.

Serve routes a request to one replica of its choosing and offers no way to reach a
given replica, or all of them. Some questions need every replica of a model: the
model's drift over all the rows the deployment answered (each replica's monitor saw a
share), or the replica that recorded the prediction a label is for. So each replica
registers with the hub and keeps one long poll open on it (`next_tasks`); a replica that
wants an answer from the others `ask`s the hub, which queues the question in their
inboxes and gathers the answers. The hub also lists each replica's own endpoints
(HTTP, gRPC, metrics) for ingress mode "replica" and for Prometheus discovery.

A replica that stops polling (killed, its node lost) is left out after STALE_S and
forgotten after FORGET_S; an `ask` waits for the live replicas' answers at most its
timeout and names those that did not answer.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import ray

__all__ = ["HUB_NAME", "HUB_NAMESPACE", "STALE_S", "ClusterHub", "hub_actor"]

HUB_NAME = "conveyor-hub"
HUB_NAMESPACE = "conveyor"
POLL_S = 1.0  # a long poll returns after this long without tasks
# A replica that has not polled for this long is left out: long enough that a replica
# whose event loop is busy for a few seconds (a starved node) does not flap.
STALE_S = 15.0
FORGET_S = 60.0  # and forgotten after this long


@dataclass
class _Replica:
    info: dict[str, Any]
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    polling: bool = False


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=10_000)
class ClusterHub:
    """Registry and message hub of the Conveyor replicas in one Ray cluster (a named, detached actor)."""

    def __init__(self) -> None:
        self._replicas: dict[str, _Replica] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)

    async def register(self, replica_id: str, info: dict[str, Any]) -> None:
        """Add (or refresh) a replica: `info` holds its app, deployment, models and endpoints."""
        known = self._replicas.get(replica_id)
        if known is None:
            self._replicas[replica_id] = _Replica(dict(info, replica=replica_id))
        else:
            known.info = dict(info, replica=replica_id)
            known.last_seen = time.monotonic()

    async def unregister(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    async def next_tasks(self, replica_id: str, wait_s: float = POLL_S) -> list[tuple[int, str, Any]] | None:
        """The questions queued for a replica, waiting up to `wait_s` for one; None when the
        hub does not know the replica (it restarted): register again."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            return None
        replica.polling = True
        replica.last_seen = time.monotonic()
        try:
            first = await asyncio.wait_for(replica.inbox.get(), wait_s)
        except asyncio.TimeoutError:
            return []
        finally:
            replica.polling = False
            replica.last_seen = time.monotonic()
        tasks = [first]
        while not replica.inbox.empty():
            tasks.append(replica.inbox.get_nowait())
        return tasks

    async def reply(self, task_id: int, ok: bool, value: Any) -> None:
        """A replica's answer to a task (`ok` False: `value` is the error message)."""
        waiter = self._waiting.pop(task_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result((ok, value))

    def _live(self, replica: _Replica, now: float) -> bool:
        return replica.polling or now - replica.last_seen < STALE_S

    def _forget_lost(self, now: float) -> None:
        for replica_id, replica in list(self._replicas.items()):
            if not replica.polling and now - replica.last_seen > FORGET_S:
                del self._replicas[replica_id]

    async def replicas(self, app: str | None = None) -> list[dict[str, Any]]:
        """The live replicas (of one app, or all): their registration info."""
        now = time.monotonic()
        self._forget_lost(now)
        return [
            dict(r.info) for r in self._replicas.values()
            if self._live(r, now) and (app is None or r.info.get("app") == app)
        ]  # fmt: skip

    async def ask(
        self, kind: str, payload: Any, *, model: str, exclude: str | None = None, timeout_s: float = 10.0,
    ) -> dict[str, tuple[bool, Any]]:
        """Ask every live replica serving `model` (but `exclude`) and gather the answers:
        {replica id: (ok, answer or error message)}; one that does not answer within
        `timeout_s` gets (False, "no answer within ...")."""
        now = time.monotonic()
        self._forget_lost(now)
        loop = asyncio.get_running_loop()
        asked: dict[str, tuple[int, asyncio.Future]] = {}
        for replica_id, replica in self._replicas.items():
            if replica_id == exclude or not self._live(replica, now) or model not in replica.info.get("models", ()):
                continue
            task_id = next(self._ids)
            waiter = loop.create_future()
            self._waiting[task_id] = waiter
            asked[replica_id] = (task_id, waiter)
            replica.inbox.put_nowait((task_id, kind, payload))
        if not asked:
            return {}
        await asyncio.wait([w for _, w in asked.values()], timeout=timeout_s)
        answers: dict[str, tuple[bool, Any]] = {}
        for replica_id, (task_id, waiter) in asked.items():
            self._waiting.pop(task_id, None)
            answers[replica_id] = waiter.result() if waiter.done() else (False, f"no answer within {timeout_s:g} s")
        return answers


def hub_actor() -> Any:
    """The cluster's hub (created on first use): a detached actor that outlives any one deployment."""
    return ClusterHub.options(
        name=HUB_NAME, namespace=HUB_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
