"""One loaded model version as the runtime holds it: config, backends and batcher.

Kept apart from conveyor.runtime (which re-exports ModelHandle) so that a graph version
(conveyor.graph_runtime), which the runtime loads, can share it without an import cycle.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.backends import Backend
from conveyor.config import ModelConfig
from conveyor.errors import InvalidInput
from conveyor.pipeline import ModelSteps

ModelFunction = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ModelHandle:
    """One loaded model version: its config, backend(s) and batcher.

    `Runtime.model(name, version)` returns it; passing it instead of a name to
    `infer`/`infer_async` skips the lookup. Attributes: name, version, config,
    input_names, output_names.
    """

    __slots__ = (
        "name", "version", "config", "backends", "batcher", "input_names", "output_names", "finish", "_dtypes",
        "monitor", "per_request", "batch_outputs", "python_steps", "settled_in_core", "inputs_as_given",
    )  # fmt: skip

    def __init__(
        self, name: str, version: int, config: ModelConfig, backends: list[Backend], pool: Any,
        steps: ModelSteps | None = None, monitor: Any = None,
    ) -> None:
        self._init_common(name, version, config, backends, steps, monitor)
        batching = config.dynamic_batching
        # A backend with a C++ executor (native) runs batches without Python or the GIL,
        # unless a Python step has to run first.
        native = None if self.python_steps is not None else getattr(backends[0], "native_executor", None)
        outputs = core_output_specs(config, steps)
        watched = monitor is not None and monitor.core is not None
        # The batcher's outputs (name, datatype, dims), in its order: a graph step reads them,
        # a rollout's shadow compares one of them.
        self.batch_outputs = tuple(outputs)
        self.batcher = _core.Batcher(
            model_name=name,
            inputs=[(t.name, t.datatype, list(t.dims)) for t in config.inputs],
            outputs=outputs + [monitor.flags_output] if watched else outputs,
            executor=_batch_executor(backends, self.python_steps) if native is None else native,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=batching.max_queue_delay_us,
            preferred_batch_sizes=list(batching.preferred_batch_sizes),
            max_queue_size=batching.max_queue_size,
            priority_levels=batching.priority_levels,
            default_priority_level=batching.default_priority_level,
            default_timeout_us=batching.default_timeout_us,
            instance_count=config.instance_group.count,
            pin_instances=config.instance_group.cpu_pinning == "cores",
            pool=pool,
            pipeline=None if steps is None else steps.core,
            **({"monitor": monitor.core} if watched else {}),
        )

    @property
    def batch_output_names(self) -> tuple[str, ...]:
        """The batcher's output names, in its order (a rollout's shadow compares one of them)."""
        return tuple(spec[0] for spec in self.batch_outputs)

    def _init_common(
        self, name: str, version: int, config: ModelConfig, backends: list[Backend], steps: ModelSteps | None,
        monitor: Any,
    ) -> None:
        """The attributes every kind of version has; the batcher (or graph) is the caller's."""
        self.name = name
        self.version = version
        self.config = config
        self.backends = backends
        self.input_names = tuple(t.name for t in config.inputs)
        self.output_names = tuple(t.name for t in config.outputs)
        self._dtypes = tuple(None if t.datatype == "BF16" else t.numpy_dtype for t in config.inputs)
        # Steps that run in Python (tokenize) turn a batch's public inputs into the backend's
        # on the instance thread; they check each request before it is queued.
        self.python_steps = steps if steps is not None and steps.runs_python else None
        # With steps, the batcher's outputs are the pipeline's; `finish` makes them public.
        self.finish = None if steps is None else steps.finish
        # The monitor (if any) watches the batch in C++; per_request: it also wants each
        # completed request (capture, feedback), with the row flags the batcher appends.
        self.monitor = monitor
        self.per_request = monitor is not None and monitor.per_request
        # infer_async's answer is the batch outputs' rows as they are: the core settles the
        # request's future without Python.
        self.settled_in_core = self.finish is None and not self.per_request
        # ... and a dict of C-contiguous arrays with exactly the input names goes to the core
        # as it is, unless a Python step must check each request first (order_inputs does).
        self.inputs_as_given = self.settled_in_core and self.python_steps is None

    def order_inputs(self, inputs: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
        """The inputs as a tuple in config order; names checked, non-arrays converted."""
        try:
            arrays = tuple([inputs[name] for name in self.input_names])
        except (KeyError, TypeError):
            raise self._name_error(inputs) from None
        if len(inputs) != len(arrays):
            raise self._name_error(inputs)
        for array in arrays:
            if type(array) is not np.ndarray or not array.flags.c_contiguous:
                arrays = self._convert(arrays)
                break
        if self.python_steps is not None:
            self.python_steps.check_request(arrays)
        return arrays

    def _convert(self, arrays: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
        out = []
        for name, dtype, value in zip(self.input_names, self._dtypes, arrays):
            if isinstance(value, np.ndarray):
                out.append(np.ascontiguousarray(value))
            else:
                try:
                    out.append(np.ascontiguousarray(np.asarray(value, dtype=dtype)))
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(f"model '{self.name}': input '{name}' cannot be read as {dtype}: {exc}") from None
        return tuple(out)

    def _name_error(self, inputs: Any) -> InvalidInput:
        if not isinstance(inputs, Mapping):
            return InvalidInput(
                f"model '{self.name}': inputs must be a mapping of input name to array, got {type(inputs).__name__}"
            )
        expected, got = set(self.input_names), set(inputs)
        parts = []
        if expected - got:
            parts.append(f"missing {_few(sorted(expected - got))}")
        if got - expected:
            parts.append(f"unexpected {_few(sorted(got - expected, key=str))}")
        return InvalidInput(
            f"model '{self.name}': expected inputs {list(self.input_names)}, got {_few(sorted(got, key=str))} "
            f"({'; '.join(parts)})"
        )

    def result(self, arrays: tuple[np.ndarray, ...], offset: int, rows: int) -> dict[str, np.ndarray]:
        if rows < 0 or (offset == 0 and rows == len(arrays[0])):
            return dict(zip(self.output_names, arrays))
        end = offset + rows
        return {name: array[offset:end] for name, array in zip(self.output_names, arrays)}

    def observed(self, request_id: str | None, inputs: tuple, arrays: tuple, offset: int, rows: int, result: dict) -> None:
        """Hands one completed request to the monitor's capture and feedback."""
        flags = arrays[-1] if self.monitor.core is not None else None
        self.monitor.after_request(request_id or new_request_id(), inputs, result, flags, offset, rows)

    def close(self) -> None:
        self.batcher.stop(drain=True)
        for backend in self.backends:
            backend.close()
        if self.monitor is not None:
            self.monitor.close()


def _batch_executor(backends: list[Backend], steps: ModelSteps | None) -> Callable[[tuple, int], list[np.ndarray]]:
    """The batcher's executor. A closure, not a method of the ModelHandle: the batcher holds
    it, and a reference back to the handle would be a cycle through C++ that no garbage
    collector sees, so every replaced or unloaded version (its batcher, its counters) leaked."""

    def execute(inputs: tuple[np.ndarray, ...], instance: int) -> list[np.ndarray]:
        # Called by the batcher's instance thread, GIL held, once per batch.
        backend = backends[instance if len(backends) > 1 else 0]
        outputs = backend.execute(list(inputs) if steps is None else steps.backend_inputs(inputs, instance))
        for output in outputs:
            if not output.flags.c_contiguous:
                return [np.ascontiguousarray(o) for o in outputs]
        return outputs

    return execute


def core_output_specs(config: ModelConfig, steps: ModelSteps | None) -> list[tuple[str, str, list[int]]]:
    """The outputs the batcher produces: the pipeline's (with steps) or the config's."""
    return list(steps.core_outputs) if steps else [(t.name, t.datatype, list(t.dims)) for t in config.outputs]


_ID_BYTES = 16
_IDS_PER_DRAW = 256
_random_pool = threading.local()  # per thread: random bytes drawn ahead, and where the next id starts


def new_request_id() -> str:
    """An id for a request that came without one (responses carry it): 128 random bits.

    Not a counter: feedback labels a prediction by its id, so an id one client can guess
    from its own (the next number) would let it label another client's predictions.
    The bits come from os.urandom, drawn 256 ids at a time per thread: os.urandom releases
    the GIL around its system call, and one release per request hands the GIL to a
    batcher thread waiting to run a batch, which then runs before the event loop has
    queued the requests that would have joined it (measured: mean batch 10 down to 3-8).
    """
    pool = _random_pool
    offset = getattr(pool, "offset", _ID_BYTES * _IDS_PER_DRAW)
    if offset >= _ID_BYTES * _IDS_PER_DRAW:
        pool.bytes = os.urandom(_ID_BYTES * _IDS_PER_DRAW)
        offset = 0
    pool.offset = offset + _ID_BYTES
    return pool.bytes[offset:offset + _ID_BYTES].hex()


_NAMES_IN_AN_ERROR = 10


def _few(names: list) -> str:
    """At most _NAMES_IN_AN_ERROR names: a request with 10^5 inputs must not get a megabyte of error back."""
    if len(names) <= _NAMES_IN_AN_ERROR:
        return str(names)
    return f"{str(names[:_NAMES_IN_AN_ERROR])[:-1]}, ... and {len(names) - _NAMES_IN_AN_ERROR} more]"
