"""The in-process Runtime against baselines measured in the same run.

    PYTHONPATH=python python -m pytest bench/bench_runtime.py --benchmark-enable

- overhead: 256 requests in flight through infer_async on a trivial model, against
  asyncio batchers written in Python: one shaped like the adaptive batchers of Python
  model servers (ids, a timeout per awaited item, a task per batch) and the least one
  can write (a queue and a future per request); per-request cost in microseconds. The
  trivial model is Python (its batches take the GIL from the event loop) and, again, a
  GIL-free one (the example `tiny` on the native backend).
- round trip: one request on an idle runtime (submit, batch, model call, completion)
  against a bare two-thread condition-variable ping-pong (the same two wake-ups).
- batch assembly: rows written once into a pooled batch, against np.stack.
- batching gain: the example MLP at 64 concurrent callers through the Runtime, against
  one onnxruntime call per request.
- onnxruntime threads: intra-op threads 1 (the config default) against onnxruntime's
  default, at batch 64.
- onnxruntime outputs bound to given buffers (IOBinding, as a backend writing into pooled
  buffers would bind them: a fresh output buffer per batch) against `session.run`, at
  batch 1 and 32.
Ratios are printed at the end; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import onnxruntime as ort
import pytest

import conveyor
from conveyor import _core

IN_FLIGHT = 256
PER_CALLER = 16


def _trivial_config(max_batch_size: int = 256) -> dict:
    return {
        "backend": "python",
        "max_batch_size": max_batch_size,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
    }


def _identity(inputs):
    return {"y": inputs["x"]}


class MinimalAsyncioBatcher:
    """The least a Python asyncio batcher can do: a queue, a batch loop, one future per request."""

    def __init__(self, fn, max_batch_size: int) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def infer(self, inputs: dict) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def _loop(self) -> None:
        while True:
            items = [await self.queue.get()]
            while len(items) < self.max_batch_size and not self.queue.empty():
                items.append(self.queue.get_nowait())
            _run_and_resolve(self.fn, items)


class AdaptiveAsyncioBatcher(MinimalAsyncioBatcher):
    """Shaped like the adaptive batchers of Python model servers (MLServer, Ray Serve).

    Each request gets an id and a future in a dict; the batch loop waits for each next
    item with a timeout (the batch's remaining time budget), and each batch runs in a
    task of its own.
    """

    def __init__(self, fn, max_batch_size: int, max_batch_time_s: float = 0.001) -> None:
        self.max_batch_time_s = max_batch_time_s
        self.futures: dict[str, asyncio.Future] = {}
        super().__init__(fn, max_batch_size)

    async def infer(self, inputs: dict) -> dict:
        request_id = uuid.uuid4().hex
        future = self.futures[request_id] = asyncio.get_running_loop().create_future()
        await self.queue.put((request_id, inputs))
        try:
            return await future
        finally:
            self.futures.pop(request_id, None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_batch_time_s
            while len(items) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout=remaining))
                except asyncio.TimeoutError:
                    break
            loop.create_task(self._run(items))

    async def _run(self, items) -> None:
        _run_and_resolve(self.fn, [(inputs, self.futures[request_id]) for request_id, inputs in items])


def _run_and_resolve(fn, items) -> None:
    batch = {"x": np.concatenate([inputs["x"] for inputs, _ in items])}
    outputs = fn(batch)
    offset = 0
    for inputs, future in items:
        rows = len(inputs["x"])
        future.set_result({name: array[offset : offset + rows] for name, array in outputs.items()})
        offset += rows


async def _closed_loop(call, callers: int, per_caller: int, x) -> None:
    async def caller():
        for _ in range(per_caller):
            await call({"x": x})

    await asyncio.gather(*(caller() for _ in range(callers)))


def _time_overhead(benchmark, loop, call, x) -> float:
    """Times 256 callers in flight through `call`; returns the median cost per request in us."""
    benchmark.group = "overhead: 256 in flight"
    benchmark.pedantic(lambda: loop.run_until_complete(_closed_loop(call, IN_FLIGHT, PER_CALLER, x)),
                       rounds=7, warmup_rounds=1)
    return benchmark.stats.stats.median / (IN_FLIGHT * PER_CALLER) * 1e6


def _conveyor_overhead(benchmark, loop, rt, model: str, x) -> tuple[float, float]:
    """_time_overhead through rt.infer_async; (us per request, mean batch size)."""
    handle = rt.model(model)
    per_request_us = _time_overhead(benchmark, loop, lambda inputs: rt.infer_async(handle, inputs), x)
    mean_batch = rt.model_stats(model)["mean_batch_size"]
    benchmark.extra_info.update(per_request_us=per_request_us, mean_batch_size=mean_batch)
    return per_request_us, mean_batch


def test_overhead_conveyor(benchmark, ratio_report, loop):
    with conveyor.Runtime() as rt:
        rt.add_model("trivial", _trivial_config(), _identity)
        per_request_us, mean_batch = _conveyor_overhead(benchmark, loop, rt, "trivial", np.ones((1, 4), np.float32))
    print(f"\nconveyor: {per_request_us:.2f} us per request (goal <= 4), mean batch {mean_batch:.1f}")
    for shape in ("adaptive", "minimal"):
        ratio_report.candidate(f"overhead: 256 in flight ({shape} asyncio batcher)", benchmark, label="conveyor infer_async")


def test_overhead_conveyor_gil_free_model(benchmark, ratio_report, loop):
    with conveyor.Runtime() as rt:
        rt.add_model("tiny", {"backend": "native", "max_batch_size": 256},
                     model_dir=conveyor.example_repository() / "tiny" / "1")
        x = np.ones((1, *rt.model("tiny").config.inputs[0].dims), np.float32)
        per_request_us, mean_batch = _conveyor_overhead(benchmark, loop, rt, "tiny", x)
    print(f"\nconveyor, GIL-free model: {per_request_us:.2f} us per request, mean batch {mean_batch:.1f}")
    ratio_report.candidate("overhead: 256 in flight, GIL-free model (minimal asyncio batcher)", benchmark,
                           label="conveyor infer_async")


@pytest.mark.parametrize("shape", ["adaptive", "minimal"])
def test_overhead_python_asyncio_batcher(benchmark, ratio_report, loop, shape):
    batcher = loop.run_until_complete(_make_asyncio_batcher(shape))
    per_request_us = _time_overhead(benchmark, loop, batcher.infer, np.ones((1, 4), np.float32))
    batcher.task.cancel()
    # Let the loop finish the cancelled task, so none is left pending when the loop closes.
    loop.run_until_complete(asyncio.gather(batcher.task, return_exceptions=True))
    print(f"\n{shape} python asyncio batcher: {per_request_us:.2f} us per request")
    ratio_report.baseline(f"overhead: 256 in flight ({shape} asyncio batcher)", benchmark, label=f"{shape} asyncio batcher")
    if shape == "minimal":
        ratio_report.baseline("overhead: 256 in flight, GIL-free model (minimal asyncio batcher)", benchmark,
                              label="minimal asyncio batcher")


async def _make_asyncio_batcher(shape: str) -> MinimalAsyncioBatcher:
    if shape == "adaptive":
        return AdaptiveAsyncioBatcher(_identity, 256)
    return MinimalAsyncioBatcher(_identity, 256)


def test_round_trip_conveyor(benchmark, ratio_report):
    x = np.ones((1, 4), np.float32)
    entered: list[int] = []

    def model(inputs):
        entered.append(time.perf_counter_ns())
        return {"y": inputs["x"]}

    with conveyor.Runtime() as rt:
        rt.add_model("trivial", _trivial_config(), model)
        handle = rt.model("trivial")
        submit_to_call = []

        def once():
            start = time.perf_counter_ns()
            rt.infer(handle, {"x": x})
            submit_to_call.append(entered[-1] - start)

        benchmark.group = "round trip, idle"
        benchmark.pedantic(once, rounds=3000, warmup_rounds=100)
    p50_us = float(np.median(submit_to_call)) / 1000
    benchmark.extra_info["submit_to_model_call_p50_us"] = p50_us
    print(f"\nsubmit-to-model-call p50: {p50_us:.1f} us")
    ratio_report.candidate("round trip, idle", benchmark, label="conveyor infer")


def test_round_trip_condition_variable(benchmark, ratio_report):
    """Two threads handing a token back and forth through condition variables."""
    cv = threading.Condition()
    state = {"turn": "main", "stop": False}
    woken: list[int] = []
    sent: list[int] = []

    def worker():
        with cv:
            while True:
                cv.wait_for(lambda: state["turn"] == "worker" or state["stop"])
                if state["stop"]:
                    return
                woken.append(time.perf_counter_ns())
                state["turn"] = "main"
                cv.notify()

    thread = threading.Thread(target=worker)
    thread.start()

    def once():
        with cv:
            sent.append(time.perf_counter_ns())
            state["turn"] = "worker"
            cv.notify()
            cv.wait_for(lambda: state["turn"] == "main")

    benchmark.group = "round trip, idle"
    benchmark.pedantic(once, rounds=3000, warmup_rounds=100)
    with cv:
        state["stop"] = True
        cv.notify()
    thread.join()
    wake_p50_us = float(np.median(np.array(woken) - np.array(sent))) / 1000
    benchmark.extra_info["one_wake_up_p50_us"] = wake_p50_us
    print(f"\ncondition-variable wake-up p50: {wake_p50_us:.1f} us")
    ratio_report.baseline("round trip, idle", benchmark, label="condition-variable ping-pong")


@pytest.fixture(scope="module")
def request_rows():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(64)]


def test_batch_assembly_pooled(benchmark, ratio_report, request_rows):
    pool = conveyor.MemoryPool()
    benchmark.group = "batch assembly: 64 x [1, 64] FP32"
    benchmark(_core.gather_rows, request_rows, pool)
    ratio_report.candidate("batch assembly: 64 x [1, 64] FP32", benchmark, label="gather_rows", goal_speedup=3.0)


def test_batch_assembly_np_stack(benchmark, ratio_report, request_rows):
    benchmark.group = "batch assembly: 64 x [1, 64] FP32"
    benchmark(np.stack, request_rows)
    ratio_report.baseline("batch assembly: 64 x [1, 64] FP32", benchmark, label="np.stack")


MLP_REQUESTS = 4096


@pytest.fixture(scope="module")
def mlp_inputs():
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(256)]


def test_batching_gain_conveyor(benchmark, ratio_report, loop, mlp_inputs):
    with conveyor.Runtime.from_repository(conveyor.example_repository(), models=["mlp"]) as rt:
        handle = rt.model("mlp")

        async def run():
            async def caller(k):
                for i in range(MLP_REQUESTS // 64):
                    await rt.infer_async(handle, {"x": mlp_inputs[(k * 7 + i) % len(mlp_inputs)]})

            await asyncio.gather(*(caller(k) for k in range(64)))

        benchmark.group = "mlp: 4096 batch-1 requests"
        benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=5, warmup_rounds=1)
        mean_batch = rt.model_stats("mlp")["mean_batch_size"]
    benchmark.extra_info["mean_batch_size"] = mean_batch
    print(f"\nmlp through the Runtime at 64 callers: mean batch {mean_batch:.1f}")
    ratio_report.candidate("mlp: 4096 batch-1 requests", benchmark, label="Runtime, 64 callers", goal_speedup=3.0)


def test_batching_gain_one_onnxruntime_call_per_request(benchmark, ratio_report, mlp_inputs):
    session = _mlp_session(intra_op_threads=1)

    def run():
        for i in range(MLP_REQUESTS):
            session.run(None, {"x": mlp_inputs[i % len(mlp_inputs)]})

    benchmark.group = "mlp: 4096 batch-1 requests"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    ratio_report.baseline("mlp: 4096 batch-1 requests", benchmark, label="onnxruntime per request")


def _mlp_session(intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
    path = conveyor.example_repository() / "mlp" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [1, 0], ids=["intra_op_1", "onnxruntime_default"])
def test_onnxruntime_threads_at_batch_64(benchmark, ratio_report, threads):
    session = _mlp_session(intra_op_threads=threads)
    x = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    benchmark.group = "onnxruntime threads, mlp batch 64"
    benchmark(session.run, None, {"x": x})
    if threads == 1:
        ratio_report.candidate("onnxruntime threads, mlp batch 64", benchmark, label="1 intra-op thread")
    else:
        ratio_report.baseline("onnxruntime threads, mlp batch 64", benchmark, label="onnxruntime default")


@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("call", ["iobinding", "run"])
def test_onnxruntime_iobinding_into_fresh_buffers(benchmark, ratio_report, rows, call):
    """Each batch's outputs must go to a buffer of their own (an answer may still view the
    last one), so a binding is made per batch, its input and output bound anew."""
    session = _mlp_session(intra_op_threads=1)
    x = np.random.default_rng(3).standard_normal((rows, 64)).astype(np.float32)
    output = session.get_outputs()[0]
    width = output.shape[1]
    group = f"onnxruntime outputs, mlp batch {rows}"
    benchmark.group = group

    def bound() -> np.ndarray:
        out = np.empty((rows, width), np.float32)
        binding = session.io_binding()
        binding.bind_cpu_input("x", x)
        binding.bind_output(output.name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        session.run_with_iobinding(binding)
        return out

    if call == "iobinding":
        np.testing.assert_allclose(bound(), session.run(None, {"x": x})[0], rtol=1e-6)
        benchmark(bound)
        ratio_report.candidate(group, benchmark, label="IOBinding, fresh output buffer")
    else:
        benchmark(session.run, None, {"x": x})
        ratio_report.baseline(group, benchmark, label="session.run")
