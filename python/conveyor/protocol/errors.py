"""The one table from Conveyor's errors to HTTP statuses and gRPC status codes.

Each error gets the gRPC code that names it, and the HTTP status Google's canonical
mapping gives that code (google/rpc/code.proto), so the two front ends agree. Two
rows depart from plain Triton on purpose, and one departs from the canonical map:

- DeadlineExceeded: Triton answers UNAVAILABLE for a request whose timeout passed in
  the queue. DEADLINE_EXCEEDED / 504 say what happened, and keep "the server is
  overloaded" (503) apart from "your deadline was too short" in metrics and retries.
- Cancelled: Triton answers 400. The caller gave up, so nobody usually reads this;
  499 (client closed request, as nginx and Envoy log it) keeps cancellations out of
  the 4xx error rate of requests that were actually wrong. 499 is not in Python's
  http.HTTPStatus: give it a reason phrase of your own ("Client Closed Request").
- OutOfMemory: RESOURCE_EXHAUSTED is gRPC's code for it, but its canonical HTTP
  status, 429, tells a client that *it* sends too much; the pool limit is the
  server's, so HTTP says 503 (retry later), as for any other temporary overload.

QueueFull is UNAVAILABLE / 503, as in Triton: a full queue is temporary overload,
the case clients and load balancers retry on. RESOURCE_EXHAUSTED / 429 would tell
the client its own quota is spent, which is not what a shared queue means.

Statuses are plain ints and codes are `grpc.StatusCode` member names, so this module
needs neither an HTTP library nor grpc.
"""

from __future__ import annotations

from typing import NamedTuple

from conveyor.errors import (
    Cancelled,
    ConfigError,
    Conflict,
    ConveyorError,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    NotFound,
    OutOfMemory,
    QueueFull,
    Unavailable,
)


class ErrorStatus(NamedTuple):
    http_status: int
    grpc_code: str  # a grpc.StatusCode member name


INTERNAL = ErrorStatus(500, "INTERNAL")

ERROR_STATUSES: dict[type[BaseException], ErrorStatus] = {
    InvalidInput: ErrorStatus(400, "INVALID_ARGUMENT"),
    ConfigError: ErrorStatus(400, "INVALID_ARGUMENT"),  # a config override or load request that is wrong
    ModelNotFound: ErrorStatus(404, "NOT_FOUND"),
    NotFound: ErrorStatus(404, "NOT_FOUND"),  # e.g. the status of a shared-memory region never registered
    Conflict: ErrorStatus(409, "ALREADY_EXISTS"),  # e.g. a second rollout on a model that has one
    QueueFull: ErrorStatus(503, "UNAVAILABLE"),
    Unavailable: ErrorStatus(503, "UNAVAILABLE"),
    OutOfMemory: ErrorStatus(503, "RESOURCE_EXHAUSTED"),
    DeadlineExceeded: ErrorStatus(504, "DEADLINE_EXCEEDED"),
    Cancelled: ErrorStatus(499, "CANCELLED"),
    ModelExecutionError: ErrorStatus(500, "INTERNAL"),
    InternalError: INTERNAL,
    ConveyorError: INTERNAL,  # a subclass added later without a row of its own
}


def status_for(exc: BaseException) -> ErrorStatus:
    """The row for `exc`'s most specific class in the table; INTERNAL for anything else."""
    for cls in type(exc).__mro__:
        status = ERROR_STATUSES.get(cls)
        if status is not None:
            return status
    return INTERNAL


def http_status_for(exc: BaseException) -> int:
    return status_for(exc).http_status


def grpc_code_for(exc: BaseException) -> str:
    return status_for(exc).grpc_code
