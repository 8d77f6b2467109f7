"""The error table: every Conveyor error has its HTTP status and gRPC code."""

from __future__ import annotations

import pytest

from conveyor import errors
from conveyor.protocol import ERROR_STATUSES, grpc_code_for, http_status_for, status_for

EXPECTED = {
    "InvalidInput": (400, "INVALID_ARGUMENT"),
    "ConfigError": (400, "INVALID_ARGUMENT"),
    "ModelNotFound": (404, "NOT_FOUND"),
    "NotFound": (404, "NOT_FOUND"),
    "QueueFull": (503, "UNAVAILABLE"),
    "Unavailable": (503, "UNAVAILABLE"),
    "OutOfMemory": (503, "RESOURCE_EXHAUSTED"),
    "DeadlineExceeded": (504, "DEADLINE_EXCEEDED"),
    "Cancelled": (499, "CANCELLED"),
    "ModelExecutionError": (500, "INTERNAL"),
    "Conflict": (409, "ALREADY_EXISTS"),
    "InternalError": (500, "INTERNAL"),
    "ConveyorError": (500, "INTERNAL"),
}


def test_every_conveyor_error_has_a_row() -> None:
    assert set(EXPECTED) == set(errors.__all__)
    assert {cls.__name__ for cls in ERROR_STATUSES} == set(errors.__all__)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_statuses(name: str) -> None:
    exc = getattr(errors, name)("boom")
    assert (http_status_for(exc), grpc_code_for(exc)) == EXPECTED[name]


def test_grpc_codes_are_status_code_names() -> None:
    grpc = pytest.importorskip("grpc")
    for status in ERROR_STATUSES.values():
        assert status.grpc_code in grpc.StatusCode.__members__


def test_subclasses_inherit_and_foreign_errors_are_internal() -> None:
    class TooBig(errors.InvalidInput):
        pass

    class NewKind(errors.ConveyorError):
        pass

    assert status_for(TooBig("x")) == (400, "INVALID_ARGUMENT")
    assert status_for(NewKind("x")) == (500, "INTERNAL")
    # Builtins that Conveyor errors also derive from do not borrow their rows.
    assert status_for(ValueError("x")) == (500, "INTERNAL")
    assert status_for(TimeoutError()) == (500, "INTERNAL")
    assert status_for(KeyError("x")) == (500, "INTERNAL")
