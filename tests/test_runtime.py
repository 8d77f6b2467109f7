"""The in-process Runtime: results, batching, errors, concurrency, shutdown."""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import os
import threading
import time
import weakref

import numpy as np
import onnxruntime as ort
import pytest

import conveyor
from conveyor.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    QueueFull,
    Unavailable,
)


def _config(max_batch_size: int = 64, delay_us: int = 0, **batching) -> dict:
    return {
        "backend": "python",
        "max_batch_size": max_batch_size,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [4]}],
        "dynamic_batching": {"max_queue_delay_us": delay_us, **batching},
    }


@pytest.fixture(scope="module")
def example_repository():
    return conveyor.example_repository()


def _double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2}


class _BlockingModel:
    """Doubles its input; while `hold` is set, a batch waits for `release`."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.seen: list[float] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.seen.extend(float(v) for v in x[:, 0])
        self.entered.release()
        self.release.wait()
        return {"y": x * 2}


def _row(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_batched_results_equal_unbatched_for_the_example_mlp(example_repository):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(example_repository / "mlp" / "1" / "model.onnx"))
    expected = session.run(None, {"x": x})[0]
    with conveyor.Runtime.from_repository(example_repository, models=["mlp"]) as rt:
        whole = rt.infer("mlp", {"x": x})["probs"]

        async def one_row_each():
            return await asyncio.gather(*(rt.infer_async("mlp", {"x": x[i : i + 1]}) for i in range(64)))

        rows = asyncio.run(one_row_each())
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([r["probs"] for r in rows]), expected, rtol=1e-5, atol=1e-6)


def test_64_threads_each_get_their_own_answers_and_batches_form():
    threads_n, per_thread = 64, 1000
    with conveyor.Runtime() as rt:
        first_batch_held = threading.Event()

        def model(inputs):
            # Hold the first batch until every other caller is queued behind it, so that the
            # batches after it are formed under real contention. (Waiting for a fixed share
            # queued could wait forever: the first batch may already hold most callers.)
            if not first_batch_held.is_set():
                first_batch_held.set()
                while rt.model_stats("echo")["queue_depth"] < threads_n - len(inputs["x"]):
                    time.sleep(0.0005)
            return {"y": inputs["x"] + 0.5}

        rt.add_model("echo", _config(max_batch_size=64, delay_us=500), model)
        failures: list[str] = []

        def caller(thread_index: int) -> None:
            for i in range(per_thread):
                value = float(thread_index * per_thread + i)
                out = rt.infer("echo", _row(value))["y"]
                if out.shape != (1, 4) or not np.all(out == value + 0.5):
                    failures.append(f"thread {thread_index} request {i}: got {out}")

        workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stats = rt.model_stats("echo")
    assert failures == []
    total = threads_n * per_thread
    assert stats["requests"] == stats["succeeded"] == total
    assert sum(size * n for size, n in stats["batch_size_histogram"].items()) == total
    assert stats["in_flight"] == 0
    assert max(stats["batch_size_histogram"]) >= threads_n // 2
    assert stats["mean_batch_size"] > 4


def test_async_requests_from_several_event_loops():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(delay_us=200), _double)

        def loop_main(offset: int) -> list[float]:
            async def run():
                outs = await asyncio.gather(*(rt.infer_async("double", _row(offset + i)) for i in range(200)))
                return [float(o["y"][0, 0]) for o in outs]

            return asyncio.run(run())

        results = {}
        threads = []
        for k in range(4):
            t = threading.Thread(target=lambda k=k: results.__setitem__(k, loop_main(1000 * k)))
            threads.append(t)
            t.start()
        for t in threads:
            t.join()
    for k in range(4):
        assert results[k] == [2.0 * (1000 * k + i) for i in range(200)]


def test_deadline_fires_while_the_only_instance_is_busy():
    model = _BlockingModel()
    with conveyor.Runtime() as rt:
        rt.add_model("slow", _config(max_batch_size=1), model)
        busy, busy_out = _in_thread(rt.infer, "slow", _row(1))
        model.entered.acquire()
        with pytest.raises(DeadlineExceeded, match="deadline"):
            rt.infer("slow", _row(2), timeout_us=1000)
        model.release.set()
        busy.join()
        stats = rt.model_stats("slow")
    assert busy_out["result"]["y"][0, 0] == 2
    assert model.seen == [1.0]
    assert stats["expired"] == 1


def test_full_queue_rejects_at_once():
    model = _BlockingModel()
    with conveyor.Runtime() as rt:
        rt.add_model("slow", _config(max_batch_size=1, max_queue_size=2), model)

        async def scenario():
            running = asyncio.ensure_future(rt.infer_async("slow", _row(0)))
            await asyncio.to_thread(model.entered.acquire)
            queued = [asyncio.ensure_future(rt.infer_async("slow", _row(v))) for v in (1, 2)]
            await asyncio.sleep(0)  # let both submit
            with pytest.raises(QueueFull, match="max_queue_size 2"):
                await rt.infer_async("slow", _row(3))
            model.release.set()
            return await asyncio.gather(running, *queued)

        results = asyncio.run(scenario())
    assert [float(r["y"][0, 0]) for r in results] == [0.0, 2.0, 4.0]


def test_higher_priority_is_served_first():
    model = _BlockingModel()
    with conveyor.Runtime() as rt:
        rt.add_model("slow", _config(max_batch_size=1, priority_levels=2), model)
        first, _ = _in_thread(rt.infer, "slow", _row(0))
        model.entered.acquire()

        async def queue_three():
            low = asyncio.ensure_future(rt.infer_async("slow", _row(1), priority=2))
            default = asyncio.ensure_future(rt.infer_async("slow", _row(2)))
            high = asyncio.ensure_future(rt.infer_async("slow", _row(3), priority=1))
            await asyncio.sleep(0)
            model.release.set()
            await asyncio.gather(low, default, high)

        asyncio.run(queue_three())
        first.join()
    assert model.seen == [0.0, 3.0, 1.0, 2.0]


def test_cancelled_request_is_dropped_from_the_queue():
    model = _BlockingModel()
    with conveyor.Runtime() as rt:
        rt.add_model("slow", _config(max_batch_size=1), model)
        first, _ = _in_thread(rt.infer, "slow", _row(0))
        model.entered.acquire()

        async def cancel_one():
            task = asyncio.ensure_future(rt.infer_async("slow", _row(7)))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            model.release.set()
            return await rt.infer_async("slow", _row(8))

        last = asyncio.run(cancel_one())
        first.join()
        stats = rt.model_stats("slow")
    assert model.seen == [0.0, 8.0]
    assert float(last["y"][0, 0]) == 16.0
    assert stats["cancelled"] == 1


def test_the_requests_of_one_loop_turn_form_one_batch_and_each_gets_its_own_rows():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(max_batch_size=64), lambda inputs: {"y": inputs["x"] * 2})

        async def burst():
            # Every call runs in one turn of the loop: their requests reach the batcher together.
            return await asyncio.gather(
                *(rt.infer_async("double", {"x": np.full((1 + i % 3, 4), i, np.float32)}) for i in range(20))
            )

        results = asyncio.run(burst())
        stats = rt.model_stats("double")
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((1 + i % 3, 4), 2 * i, np.float32))
    assert stats["batches"] == 1
    assert stats["requests"] == 20


def test_a_request_refused_when_its_turn_is_queued_fails_alone():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(), lambda inputs: {"y": inputs["x"] * 2})

        async def burst():
            good = [asyncio.ensure_future(rt.infer_async("double", _row(i))) for i in range(3)]
            bad = asyncio.ensure_future(rt.infer_async("double", {"x": np.ones((1, 5), np.float32)}))
            return await asyncio.gather(*good), await asyncio.gather(bad, return_exceptions=True)

        answers, (refusal,) = asyncio.run(burst())
    assert [float(a["y"][0, 0]) for a in answers] == [0.0, 2.0, 4.0]
    assert isinstance(refusal, InvalidInput)
    assert "input 'x'" in str(refusal) and "[-1, 4]" in str(refusal)


def test_close_queues_and_answers_requests_submitted_but_not_yet_queued():
    rt = conveyor.Runtime()
    rt.add_model("double", _config(), lambda inputs: {"y": inputs["x"] * 2})

    async def scenario():
        task = asyncio.ensure_future(rt.infer_async("double", _row(21)))
        await asyncio.sleep(0)  # the task has submitted; the loop has not queued its request yet
        (bridge,) = rt._bridges.values()
        held = bridge.completions.held()
        rt.close()
        return held, await task

    held, answer = asyncio.run(scenario())
    assert held == 1
    assert float(answer["y"][0, 0]) == 42.0


async def _settled(completions, futures) -> None:
    """Resolves `completions` (a LoopCompletions driven by hand) until every future is done."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(completions.fileno(), ready.set)
    try:
        while not all(f.done() for f in futures):
            await ready.wait()
            ready.clear()
            completions.resolve()
    finally:
        loop.remove_reader(completions.fileno())


def test_held_requests_go_once_they_would_fill_half_a_batch():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(max_batch_size=8), lambda inputs: {"y": inputs["x"] * 2})
        unbatched = {
            **_config(max_batch_size=0),
            "inputs": [{"name": "x", "datatype": "FP32", "dims": [1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "dims": [1, 4]}],
        }
        rt.add_model("unbatched", unbatched, lambda inputs: {"y": inputs["x"] * 2})
        completions = conveyor._core.LoopCompletions()

        async def scenario():
            loop = asyncio.get_running_loop()
            held = []
            futures = []
            for name in ("double",) * 4 + ("unbatched",):
                handle = rt.model(name)
                futures.append(loop.create_future())
                completions.submit(handle.batcher, _row(1), futures[-1], handle.input_names, handle.output_names,
                                   0, -1, 0, None)
                held.append(completions.held())
            await _settled(completions, futures)
            return held, [float(f.result()["y"][0, 0]) for f in futures]

        held, answers = asyncio.run(scenario())
    # half of max_batch_size 8 is 4: the fourth request takes the four; a model that does
    # not batch takes its request at once
    assert held == [1, 2, 3, 0, 0]
    assert answers == [2.0] * 5


@pytest.fixture
def doubling_by_hand():
    """A runtime serving `double`, its handle, and a LoopCompletions driven by hand."""
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(), lambda inputs: {"y": inputs["x"] * 2})
        yield rt, rt.model("double"), conveyor._core.LoopCompletions()


def test_an_answer_that_cannot_be_made_fails_its_own_request_only(doubling_by_hand):
    _, handle, completions = doubling_by_hand

    async def scenario():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        # The middle request names an output the batch does not have.
        for future, names in zip(futures, (handle.output_names, ("y", "z"), handle.output_names)):
            completions.submit(handle.batcher, _row(3), future, handle.input_names, names, 0, -1, 0, None)
        completions.flush()
        await _settled(completions, futures)
        return await asyncio.gather(*futures, return_exceptions=True)

    first, broken, last = asyncio.run(scenario())
    assert float(first["y"][0, 0]) == float(last["y"][0, 0]) == 6.0
    assert isinstance(broken, conveyor.errors.InternalError)
    assert "completing the request failed: the batch has 1 outputs, the model 2" in str(broken)


def test_a_request_cancelled_before_it_is_queued_never_reaches_the_batcher(doubling_by_hand):
    rt, handle, completions = doubling_by_hand

    async def scenario():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(2)]
        ids = [
            completions.submit(handle.batcher, _row(v), f, handle.input_names, handle.output_names, 0, -1, 0, None)
            for v, f in zip((1, 2), futures)
        ]
        futures[0].cancel()
        completions.cancel(handle.batcher, ids[0])
        assert completions.held() == 2
        completions.flush()
        assert completions.held() == 0
        await _settled(completions, futures[1:])
        return futures[1].result(), completions.waiting()

    answer, waiting = asyncio.run(scenario())
    stats = rt.model_stats("double")
    assert float(answer["y"][0, 0]) == 4.0
    assert waiting == 0
    assert stats["requests"] == 1  # the cancelled one was never queued
    assert stats["cancelled"] == 0


def test_a_model_that_raises_fails_only_its_requests():
    def picky(inputs):
        if np.any(inputs["x"] < 0):
            raise ValueError("negative values are not allowed")
        return {"y": inputs["x"] * 2}

    with conveyor.Runtime() as rt:
        rt.add_model("picky", _config(max_batch_size=1), picky)
        rt.add_model("double", _config(), _double)
        with pytest.raises(ModelExecutionError, match="negative values are not allowed"):
            rt.infer("picky", _row(-1))
        assert float(rt.infer("picky", _row(3))["y"][0, 0]) == 6.0
        assert float(rt.infer("double", _row(4))["y"][0, 0]) == 8.0
        assert rt.model_stats("picky")["failed"] == 1


def test_outputs_that_break_the_config_are_execution_errors():
    with conveyor.Runtime() as rt:
        rt.add_model("wrong_dtype", _config(), lambda inputs: {"y": inputs["x"].astype(np.float64)})
        rt.add_model("wrong_rows", _config(), lambda inputs: {"y": np.zeros((5, 4), np.float32)})
        with pytest.raises(ModelExecutionError, match="FP64|float64"):
            rt.infer("wrong_dtype", _row(1))
        with pytest.raises(ModelExecutionError, match="batch"):
            rt.infer("wrong_rows", _row(1))


def test_close_drains_accepted_requests():
    model = _BlockingModel()
    rt = conveyor.Runtime()
    rt.add_model("slow", _config(max_batch_size=4, delay_us=0), model)

    async def scenario():
        tasks = [asyncio.ensure_future(rt.infer_async("slow", _row(v))) for v in range(10)]
        await asyncio.sleep(0)
        await asyncio.to_thread(model.entered.acquire)
        model.release.set()
        await asyncio.to_thread(rt.close)
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert sorted(float(r["y"][0, 0]) for r in results) == [2.0 * v for v in range(10)]
    with pytest.raises((Unavailable, ModelNotFound)):
        rt.infer("slow", _row(1))


def test_bad_inputs_say_what_was_expected():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(max_batch_size=8), _double)
        with pytest.raises(InvalidInput, match=r"missing \['x'\]"):
            rt.infer("double", {"z": np.zeros((1, 4), np.float32)})
        with pytest.raises(InvalidInput, match=r"unexpected \['extra'\]"):
            rt.infer("double", {"x": np.zeros((1, 4), np.float32), "extra": np.zeros(1)})
        with pytest.raises(InvalidInput, match="expected datatype FP32, got INT64"):
            rt.infer("double", {"x": np.zeros((1, 4), np.int64)})
        with pytest.raises(InvalidInput, match=r"expected shape \[-1, 4\].*got \[1, 5\]"):
            rt.infer("double", {"x": np.zeros((1, 5), np.float32)})
        with pytest.raises(InvalidInput, match=r"batch of 9 rows is outside \[1, max_batch_size=8\]"):
            rt.infer("double", {"x": np.zeros((9, 4), np.float32)})
        with pytest.raises(InvalidInput, match="priority 3"):
            rt.infer("double", _row(1), priority=3)
        with pytest.raises(InvalidInput, match="timeout_us"):
            rt.infer("double", _row(1), timeout_us=0)
        with pytest.raises(ModelNotFound, match="^Request for unknown model: 'nope' is not found"):
            rt.infer("nope", _row(1))
        with pytest.raises(ModelNotFound, match="^Request for unknown model: .double. version 5 is not found"):
            rt.infer("double", _row(1), version=5)
        # Lists and non-contiguous arrays are converted, not rejected.
        out = rt.infer("double", {"x": [[1, 2, 3, 4]]})["y"]
        np.testing.assert_array_equal(out, [[2, 4, 6, 8]])
        strided = np.arange(16, dtype=np.float32).reshape(2, 8)[:, ::2]
        np.testing.assert_array_equal(rt.infer("double", {"x": strided})["y"], strided * 2)


def test_outputs_are_views_of_the_batch_output():
    seen_outputs = []

    def model(inputs):
        y = inputs["x"] * 3
        seen_outputs.append(y)
        return {"y": y}

    with conveyor.Runtime() as rt:
        rt.add_model("triple", _config(max_batch_size=8), model)

        async def scenario():
            return await asyncio.gather(*(rt.infer_async("triple", _row(v)) for v in range(4)))

        results = asyncio.run(scenario())
    for v, result in enumerate(results):
        assert float(result["y"][0, 0]) == 3.0 * v
        assert any(np.shares_memory(result["y"], out) for out in seen_outputs)


def test_model_stats_report_batches_and_percentiles():
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(), _double)
        for v in range(10):
            rt.infer("double", _row(v))
        stats = rt.model_stats("double")
    assert stats["requests"] == stats["succeeded"] == 10
    assert stats["batches"] == 10
    assert stats["batch_size_histogram"] == {1: 10}
    assert stats["mean_batch_size"] == 1.0
    for key in ("queue_time_us", "compute_time_us", "request_time_us"):
        assert stats[key]["count"] == 10
        assert 0 <= stats[key]["p50"] <= stats[key]["p99"]


class _Doubler:
    """Doubles its input; an object, so that a test can watch its lifetime through a weak reference."""

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}


def test_replaced_and_unloaded_versions_are_freed():
    # The batcher is a C++ object the garbage collector cannot look into: a reference from
    # its executor back to the version that owns it would be a cycle nothing ever frees, and
    # every reload would leak the whole replaced version (backend, model, config, batcher).
    with conveyor.Runtime() as rt:
        first, second = _Doubler(), _Doubler()
        watched = [weakref.ref(first), weakref.ref(second)]
        rt.add_model("m", _config(), first)
        assert rt.infer("m", _row(1))["y"][0, 0] == 2
        rt.add_model("m", _config(), second)  # a reload of the same version replaces the first
        assert rt.infer("m", _row(2))["y"][0, 0] == 4
        rt.unload_model("m")
        del first, second
        gc.collect()
        assert [ref() is None for ref in watched] == [True, True]


def test_infer_named_takes_only_a_dict_of_the_inputs_as_arrays():
    """Runtime.infer's direct path: anything but a dict of exactly the inputs, each a
    C-contiguous ndarray, comes back None unsubmitted, for Runtime.infer's own checks."""
    with conveyor.Runtime() as rt:
        rt.add_model("double", _config(), _double)
        handle = rt.model("double")
        names = (handle.input_names, handle.output_names)
        rows = np.arange(8, dtype=np.float32).reshape(2, 4)
        answer = handle.batcher.infer_named({"x": rows}, *names)
        assert list(answer) == ["y"] and answer["y"].tolist() == (rows * 2).tolist()
        for inputs in ({"x": np.asfortranarray(rows)}, {"x": rows, "z": rows}, {"z": rows}, {"x": rows.tolist()},
                       [rows], _Mapping({"x": rows})):  # fmt: skip
            assert handle.batcher.infer_named(inputs, *names) is None
        assert rt.model_stats("double")["requests"] == 1
        np.testing.assert_array_equal(rt.infer("double", {"x": np.asfortranarray(rows)})["y"], rows * 2)
        with pytest.raises(conveyor.errors.InvalidInput, match=r"unexpected \['z'\]"):
            rt.infer("double", {"x": rows, "z": rows})


class _Mapping(collections.abc.Mapping):
    def __init__(self, items: dict) -> None:
        self.items_ = items

    def __getitem__(self, key: str) -> object:
        return self.items_[key]

    def __iter__(self):
        return iter(self.items_)

    def __len__(self) -> int:
        return len(self.items_)


def test_an_unloaded_version_that_answered_an_event_loop_is_freed():
    """The loop's completions do not keep the last model they queued to once the turn is over."""
    with conveyor.Runtime() as rt:
        model = _Doubler()
        watched = weakref.ref(model)
        rt.add_model("m", _config(), model)
        del model
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(rt.infer_async("m", _row(1)))["y"][0, 0] == 2
            rt.unload_model("m")
            gc.collect()
            assert watched() is None
        finally:
            loop.close()


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="under AddressSanitizer freed memory waits in its quarantine, so RSS grows by design",
)
def test_steady_state_reuses_pooled_memory_and_rss_stays_flat():
    pool = conveyor.MemoryPool()
    with conveyor.Runtime(pool=pool) as rt:
        rt.add_model("double", _config(), _double)
        x = _row(1)
        for _ in range(5_000):
            rt.infer("double", x)
        allocs_before = pool.stats()["upstream_allocs"]
        rss_before = _rss_bytes()
        for _ in range(100_000):
            rt.infer("double", x)
        rss_growth = _rss_bytes() - rss_before
        allocs_after = pool.stats()["upstream_allocs"]
    assert allocs_after == allocs_before
    assert rss_growth < 4 * 1024 * 1024, f"RSS grew by {rss_growth} bytes over 100k inferences"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
@pytest.mark.parametrize("pinning", ["cores", "none"])
def test_cpu_pinning_runs_each_instance_on_its_own_cpu(pinning: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    seen: set[tuple[int, frozenset[int]]] = set()
    barrier = threading.Barrier(2)

    def model(inputs):
        seen.add((threading.get_native_id(), frozenset(os.sched_getaffinity(0))))
        barrier.wait()  # both instances hold a batch at once: each runs one
        return {"y": inputs["x"]}

    config = {**_config(max_batch_size=1), "instance_group": {"count": 2, "cpu_pinning": pinning}}
    with conveyor.Runtime() as rt:
        rt.add_model("pinned", config, model)

        async def two() -> None:
            await asyncio.gather(*(rt.infer_async("pinned", _row(float(i))) for i in range(2)))

        asyncio.run(two())
    assert len({thread for thread, _ in seen}) == 2
    affinities = sorted((sorted(cpus_) for _, cpus_ in seen))
    if pinning == "none":
        assert affinities == [cpus, cpus]
    else:  # instance i on the i-th allowed CPU, round robin
        assert affinities == sorted([[cpus[0]], [cpus[1 % len(cpus)]]])
