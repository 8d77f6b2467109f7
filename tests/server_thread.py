"""A Server on a background thread, for tests that talk to it over real sockets."""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from collections import Counter
from typing import Any

from conveyor.server.serve import ServeOptions, Server

TIMEOUT_S = 30.0  # bound on every wait; a healthy run takes milliseconds


class ServerThread:
    """A Server on its own event loop (uvloop when installed) in a daemon thread."""

    def __init__(self, options: ServeOptions, **server_arguments: Any) -> None:
        """`server_arguments`: keyword arguments of Server beside the options."""
        self.options = options
        self.server_arguments = server_arguments
        try:
            import uvloop
        except ImportError:  # plain asyncio works too
            self.loop = asyncio.new_event_loop()
        else:
            self.loop = uvloop.new_event_loop()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.server: Server | None = None
        self.thread = threading.Thread(target=self._run, name="http-server", daemon=True)
        self.thread.start()
        assert self.started.wait(TIMEOUT_S), "the server did not start"
        if self.start_error is not None:
            raise self.start_error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        if self.start_error is None:
            self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        try:
            self.server = Server(self.options, **self.server_arguments)
            await self.server.start()
        except BaseException as exc:  # reported to the test thread
            self.start_error = exc
        finally:
            self.started.set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.http_port

    def rollout_requests(self, model: str) -> Counter[tuple[str, str]]:
        """`model`'s conveyor_rollout_requests_total by (version, routing), read from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=TIMEOUT_S) as answer:
            text = answer.read().decode()
        counts: Counter[tuple[str, str]] = Counter()
        for line in text.splitlines():
            if line.startswith("conveyor_rollout_requests_total{") and f'model="{model}"' in line:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                counts[labels["version"], labels["routing"]] += int(float(line.rsplit(" ", 1)[1]))
        return counts

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive()
