"""Alert delivery: one JSON log line per event, and an optional webhook.

`log_event` writes the event as one compact JSON line with sorted keys, so log
shippers index it as-is. `WebhookSender` POSTs events from one background thread: the
caller (the monitor's evaluation loop) never waits for the network and never sees an
exception. Delivery retries connection errors, 5xx and 429 with exponential backoff and
jitter; any other answer outside 2xx (redirects included: a webhook URL that moved is a
configuration error) fails the event at once.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from conveyor.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["WebhookSender", "log_event", "to_json"]

# The longest wait between two attempts, whatever backoff_s and the attempt number say.
MAX_BACKOFF_S = 300.0
DEFAULT_EVENT_NAME = "monitor"


def to_json(event: Any) -> str:
    """`event` as compact JSON with sorted keys: numpy values become Python numbers or
    lists, non-finite floats null, paths and other objects their str()."""
    return json.dumps(_plain(event), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _plain(value: Any) -> Any:
    """`value` made of JSON types only (see to_json)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _plain(tolist())
    return str(value)


def log_event(logger: logging.Logger, event: dict, level: int = logging.WARNING) -> None:
    """Log `event` as one JSON line; it always carries "event" (default "monitor") and
    "time" (Unix seconds, default now). The caller's dict is not modified."""
    record = {"event": DEFAULT_EVENT_NAME, "time": time.time(), **event}
    logger.log(level, "%s", to_json(record))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Report a redirect as the HTTP error it is: following it would turn the POST into a GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class WebhookSender:
    """POSTs JSON events to one URL from a daemon thread, through a bounded queue.

    `send` never blocks and never raises: a full queue drops the event (counted).
    An event is tried up to `retries` + 1 times; the n-th retry waits about
    `backoff_s` * 2**(n-1) seconds (jittered to 50-100 %, at most MAX_BACKOFF_S).
    `stats()` counts sent, failed (given up), dropped (queue full, sent after close,
    or abandoned at close), retried (attempts after the first) and pending (queued).
    """

    def __init__(
        self,
        url: str,
        *,
        max_queue: int = 1000,
        retries: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`timeout_s` bounds each attempt's connect and each read; `headers` are added to
        (and may override) Content-Type: application/json. Raises ConfigError for a URL
        that is not http(s)://host/... or a negative or zero limit."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # raises for a port that is not a number in 0..65535
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"webhook url must be http://host/... or https://host/..., got {url!r}")
        if max_queue < 1:
            raise ConfigError(f"webhook max_queue must be >= 1, got {max_queue!r}")
        if retries < 0:
            raise ConfigError(f"webhook retries must be >= 0, got {retries!r}")
        if backoff_s < 0:
            raise ConfigError(f"webhook backoff_s must be >= 0, got {backoff_s!r}")
        if not timeout_s > 0:
            raise ConfigError(f"webhook timeout_s must be > 0, got {timeout_s!r}")
        self._url = url
        # For log lines: no credentials, query or fragment (they may carry tokens).
        self._safe_url = f"{parts.scheme}://{parts.hostname}{f':{port}' if port else ''}{parts.path}"
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._max_queue = max_queue
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        # Built once: the proxy settings of the environment are read here.
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        self._condition = threading.Condition()
        # Guarded by _condition: the queue, the flags and the counters.
        self._queue: deque[bytes] = deque()
        self._busy = False  # the worker holds an event it took from the queue
        self._closed = False
        self._counts = {"sent": 0, "failed": 0, "dropped": 0, "retried": 0}
        # Set when close() stops waiting: interrupts a backoff and abandons what is left.
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conveyor-webhook", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> bool:
        """Queue `event` for delivery; False (and counted as dropped) when the queue is
        full, the sender is closed or the event cannot be encoded."""
        try:
            body = to_json(event).encode()
        except Exception:  # e.g. a self-referencing structure: the caller must not see it
            logger.exception("webhook %s: an event could not be encoded as JSON; dropped", self._safe_url)
            body = None
        with self._condition:
            if body is None or self._closed or len(self._queue) >= self._max_queue:
                self._counts["dropped"] += 1
                return False
            self._queue.append(body)
            self._condition.notify_all()
            return True

    def stats(self) -> dict:
        """{"sent", "failed", "dropped", "retried", "pending"}: events since the sender was made."""
        with self._condition:
            return {**self._counts, "pending": len(self._queue)}

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting events and deliver the queued ones for up to `timeout_s`; then
        abandon the rest (counted as dropped; a retry in progress fails) and wait for the
        worker, which may take one more attempt's `timeout_s`. Idempotent."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            drained = self._condition.wait_for(lambda: not self._queue and not self._busy, timeout=max(timeout_s, 0.0))
        if not drained:
            logger.warning("webhook %s: closing with events still undelivered after %.3g s", self._safe_url, timeout_s)
        self._abort.set()
        with self._condition:
            self._condition.notify_all()
        self._thread.join(self._timeout_s)

    # -- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._queue or self._closed or self._abort.is_set())
                if self._abort.is_set() or not self._queue:
                    self._counts["dropped"] += len(self._queue)
                    self._queue.clear()
                    self._condition.notify_all()
                    return
                body = self._queue.popleft()
                self._busy = True
            try:
                delivered = self._deliver(body)
            except Exception:  # a bug must not end the thread: the next events still go out
                logger.exception("webhook %s: delivering an event failed unexpectedly", self._safe_url)
                delivered = False
            with self._condition:
                self._busy = False
                self._counts["sent" if delivered else "failed"] += 1
                self._condition.notify_all()

    def _deliver(self, body: bytes) -> bool:
        """Try `body` until it is accepted, cannot be, or the retries are spent."""
        attempt = 1
        while True:
            retryable, reason = self._post(body)
            if reason is None:
                return True
            if not retryable or attempt > self._retries:
                logger.warning(
                    "webhook %s: giving up on an event after %d attempt(s): %s", self._safe_url, attempt, reason
                )
                return False
            with self._condition:
                self._counts["retried"] += 1
            # The exponent is capped: 2**k for a large retry count would overflow a float.
            delay_s = min(self._backoff_s * 2 ** min(attempt - 1, 32), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
            logger.debug("webhook %s: %s; retrying in %.3g s", self._safe_url, reason, delay_s)
            if self._abort.wait(delay_s):
                logger.warning("webhook %s: closed while retrying an event (%s); given up", self._safe_url, reason)
                return False
            attempt += 1

    def _post(self, body: bytes) -> tuple[bool, str | None]:
        """One attempt: (retryable, None) when accepted, else (retryable, what went wrong)."""
        request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                response.read()
            return False, None
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code >= 500 or exc.code == 429, f"HTTP {exc.code} {exc.reason}"
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, bad answer
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return True, f"{type(exc).__name__}: {reason}"
