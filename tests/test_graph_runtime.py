"""Model graphs served in-process: every graph's answers equal running its steps by hand.

The step models are Python callables (`Runtime.add_model`); the graphs are added with
`add_model` too (backend "graph"). Expected answers come from calling the step models
through the runtime on the rows numpy selects, for every batch size up to the graph's
max_batch_size and every mix of rows taking each branch. Ordering between threads uses
gates (events set inside the models) and the batchers' own counters, never sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from conveyor.errors import DeadlineExceeded, ModelExecutionError, Unavailable
from conveyor.runtime import Runtime

from processes import DEADLINE_S, wait_for

MAX_ROWS = 6  # the graphs' max_batch_size; every mask of up to this many rows is tried
STEP_BATCH = 8  # the step models' max_batch_size


def tensors(*specs: tuple[str, str, list[int]]) -> list[dict[str, Any]]:
    return [{"name": name, "datatype": datatype, "dims": dims} for name, datatype, dims in specs]


def model_config(inputs=(("x", "FP32", [4]),), outputs=(("y", "FP32", [4]),), max_batch_size=STEP_BATCH, **batching):
    config = {"max_batch_size": max_batch_size, "inputs": tensors(*inputs), "outputs": tensors(*outputs)}
    if batching:
        config["dynamic_batching"] = batching
    return config


def add_graph(runtime: Runtime, name: str, graph: dict[str, Any], **config: Any) -> None:
    """Loads a graph in-process over the step models loaded already."""
    runtime.add_model(name, {"max_batch_size": MAX_ROWS, **config, "graph": graph})


def step(name: str, model: str, inputs: dict[str, str] | None = None, **options: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "inputs": inputs or {"x": "x"}, **options}


# -- step models: pure functions of their rows ---------------------------------------

def double(inputs):
    return {"y": inputs["x"] * 2 + 1}


def shift(inputs):
    return {"y": inputs["x"] - 3}


def square(inputs):
    return {"y": inputs["x"] * inputs["x"]}


def join(inputs):
    return {"z": inputs["a"] + 10 * inputs["c"]}


def cheap(inputs):
    x = inputs["x"]
    return {"p": np.stack([x[:, 0], 1 - x[:, 0]], axis=1)}


def costly(inputs):
    x = inputs["x"]
    return {"p": np.stack([x[:, 1] + x[:, 2], x[:, 3]], axis=1)}


def classify(inputs):
    return {"logits": inputs["x"][:, :3].copy()}


def flaky(inputs):
    x = inputs["x"]
    if np.any(x[:, 3] < 0):
        raise ValueError("a row with a negative last column")
    return {"y": x + 100, "s": x[:, :1] * 7}


def total(inputs):
    return {"s": inputs["x"].sum(axis=1, keepdims=True)}


X4 = (("x", "FP32", [4]),)
STEP_MODELS: dict[str, tuple[dict[str, Any], Callable]] = {
    "double": (model_config(), double),
    "shift": (model_config(), shift),
    "square": (model_config(), square),
    "join": (model_config(inputs=(("a", "FP32", [4]), ("c", "FP32", [4])), outputs=(("z", "FP32", [4]),)), join),
    "cheap": (model_config(outputs=(("p", "FP32", [2]),)), cheap),
    "costly": (model_config(outputs=(("p", "FP32", [2]),)), costly),
    "classify": (model_config(outputs=(("logits", "FP32", [3]),)), classify),
    "flaky": (model_config(outputs=(("y", "FP32", [4]), ("s", "FP32", [1]))), flaky),
    "total": (model_config(outputs=(("s", "FP32", [1]),)), total),
}

GRAPHS: dict[str, dict[str, Any]] = {
    "pipeline": {"inputs": ["x"], "outputs": {"out": "B.y"},
                 "step": [step("A", "double"), step("B", "shift", {"x": "A.y"})]},
    "fanjoin": {"inputs": ["x"], "outputs": {"z": "J.z"},
                "step": [step("A", "double"), step("C", "square"), step("J", "join", {"a": "A.y", "c": "C.y"})]},
    "cascade": {"inputs": ["x"], "outputs": {"p": ["costly.p", "cheap.p"], "first": "cheap.p"},
                "step": [step("cheap", "cheap"), step("costly", "costly", when="max(cheap.p) < 0.6")]},
    "switch": {"inputs": ["x"], "outputs": {"y": ["left.y", "right.y"]},
               "step": [step("cls", "classify"),
                        step("left", "double", when="argmax(cls.logits) in [0, 2]"),
                        step("right", "shift", when="not argmax(cls.logits) in [0, 2]")]},
    "element": {"inputs": ["x"], "outputs": {"y": ["A.y", "B.y"]},
                "step": [step("A", "double", when="x[1] > 0"), step("B", "shift")]},
    "aliases": {"inputs": ["x"], "outputs": {"out": "shifted", "mid": "doubled"},
                "step": [step("A", "double", outputs={"y": "doubled"}),
                         step("B", "shift", {"x": "doubled"}, outputs={"y": "shifted"})]},
    "optional": {"inputs": ["x"], "outputs": {"y": "flaky.y", "s": ["flaky.s", "tot.s"]},
                 "step": [step("flaky", "flaky", optional=True, default={"y": -1.0}), step("tot", "total")]},
}


@pytest.fixture()
def rt() -> Iterator[Runtime]:
    with Runtime() as runtime:
        for name, (config, fn) in STEP_MODELS.items():
            runtime.add_model(name, config, fn)
        for name, graph in GRAPHS.items():
            add_graph(runtime, name, graph)
        yield runtime


def by_hand(runtime: Runtime, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The step model's answer for these rows, through the runtime (no call for no rows)."""
    rows = len(next(iter(inputs.values())))
    if rows == 0:
        config, _ = STEP_MODELS[model]
        return {t["name"]: np.zeros((0, *t["dims"]), np.float32) for t in config["outputs"]}
    return runtime.infer(model, inputs)


def rows_for(mask: tuple[bool, ...], seed: int) -> np.ndarray:
    """Random rows (distinct values: a row answered out of place shows)."""
    return np.random.default_rng(seed).uniform(-2, 2, (len(mask), 4)).astype(np.float32)


def masks() -> Iterator[tuple[int, tuple[bool, ...]]]:
    """Every batch size 1..MAX_ROWS with every mix of rows (True: the row takes the branch)."""
    for rows in range(1, MAX_ROWS + 1):
        for bits in itertools.product((False, True), repeat=rows):
            yield rows, bits


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, f"{what}: {name}"
        np.testing.assert_array_equal(got[name], value, err_msg=f"{what}: output {name}")


# -- every graph, every batch size, every mix of rows ---------------------------------

@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
def test_pipeline_and_fan_out_join_equal_their_steps(rt: Runtime, rows: int) -> None:
    x = rows_for((False,) * rows, seed=rows)
    a = by_hand(rt, "double", {"x": x})["y"]
    assert_same(rt.infer("pipeline", {"x": x}), {"out": by_hand(rt, "shift", {"x": a})["y"]}, "pipeline")
    c = by_hand(rt, "square", {"x": x})["y"]
    assert_same(rt.infer("fanjoin", {"x": x}), {"z": by_hand(rt, "join", {"a": a, "c": c})["z"]}, "fanjoin")
    doubled = by_hand(rt, "double", {"x": x})["y"]
    expected = {"out": by_hand(rt, "shift", {"x": doubled})["y"], "mid": doubled}
    assert_same(rt.infer("aliases", {"x": x}), expected, "aliases")


def test_cascade_runs_the_costly_step_on_unsure_rows_only(rt: Runtime) -> None:
    sent = skipped = 0
    for rows, bits in masks():
        x = rows_for(bits, seed=rows)
        x[:, 0] = np.where(bits, 0.5, 0.9)  # max(cheap.p) is 0.5 (unsure: costly runs) or 0.9
        first = by_hand(rt, "cheap", {"x": x})["p"]
        unsure = first.max(axis=1) < 0.6
        assert list(unsure) == list(bits)
        p = first.copy()
        p[unsure] = by_hand(rt, "costly", {"x": x[unsure]})["p"]
        assert_same(rt.infer("cascade", {"x": x}), {"p": p, "first": first}, f"cascade {bits}")
        sent += int(unsure.sum())
        skipped += rows - int(unsure.sum())
    cheap_stats, costly_stats = rt.model_stats("cascade")["steps"]
    assert (cheap_stats["step"], costly_stats["step"], costly_stats["model"]) == ("cheap", "costly", "costly")
    assert costly_stats["rows"] == sent and costly_stats["skipped_rows"] == skipped
    assert costly_stats["requests"] == sum(1 for _, bits in masks() if any(bits))


def test_infer_async_answers_every_cascade_request_with_its_own_rows(rt: Runtime) -> None:
    sent = []
    for index, (_, bits) in enumerate(masks()):
        x = rows_for(bits, seed=400 + index)
        x[:, 0] = np.where(bits, 0.5, 0.9)
        sent.append(x)

    async def run() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(rt.infer_async("cascade", {"x": x}) for x in sent))

    for x, got in zip(sent, asyncio.run(run()), strict=True):
        first = cheap({"x": x})["p"]
        p = first.copy()
        unsure = first.max(axis=1) < 0.6
        p[unsure] = costly({"x": x[unsure]})["p"]
        assert_same(got, {"p": p, "first": first}, "cascade infer_async")
    assert rt.model_stats("cascade")["succeeded"] == len(sent)


def test_switch_sends_each_row_to_one_branch(rt: Runtime) -> None:
    for rows, bits in masks():
        x = rows_for(bits, seed=100 + rows)
        for row, right in enumerate(bits):  # class 1 goes right; classes 0 and 2 go left
            x[row, :3] = np.abs(x[row, :3]) / 10
            x[row, 1 if right else 2 * (row % 2)] = 5.0
        left = np.array([not bit for bit in bits])
        y = np.empty_like(x)
        y[left] = by_hand(rt, "double", {"x": x[left]})["y"]
        y[~left] = by_hand(rt, "shift", {"x": x[~left]})["y"]
        assert_same(rt.infer("switch", {"x": x}), {"y": y}, f"switch {bits}")


def test_element_predicate_with_a_fallback_source(rt: Runtime) -> None:
    for rows, bits in masks():
        x = rows_for(bits, seed=200 + rows)
        x[:, 1] = np.where(bits, np.abs(x[:, 1]) + 0.1, -np.abs(x[:, 1]) - 0.1)
        chosen = np.array(bits)
        y = by_hand(rt, "shift", {"x": x})["y"].copy()  # every row: the second source
        y[chosen] = by_hand(rt, "double", {"x": x[chosen]})["y"]
        assert_same(rt.infer("element", {"x": x}), {"y": y}, f"element {bits}")


def test_optional_step_answers_defaults_and_fallbacks(rt: Runtime) -> None:
    failures = 0
    for rows, bits in masks():
        x = rows_for(bits, seed=300 + rows)
        x[:, 3] = np.where(bits, -1.0, 1.0)  # one negative row fails the flaky step's whole request
        totals = by_hand(rt, "total", {"x": x})["s"]
        if any(bits):
            failures += 1
            expected = {"y": np.full_like(x, -1.0), "s": totals}  # y has a default; s falls back to tot.s
        else:
            ran = by_hand(rt, "flaky", {"x": x})
            expected = {"y": ran["y"], "s": ran["s"]}
        assert_same(rt.infer("optional", {"x": x}), expected, f"optional {bits}")
    flaky_stats = rt.model_stats("optional")["steps"][0]
    assert flaky_stats["failed"] == flaky_stats["defaulted"] == failures
    assert rt.model_stats("optional")["failed"] == 0


def test_optional_output_without_default_or_fallback_fails_the_request(rt: Runtime) -> None:
    add_graph(rt, "bare", {"inputs": ["x"], "outputs": {"s": "flaky.s"},
                           "step": [step("flaky", "flaky", optional=True)]})
    x = np.array([[1, 2, 3, -1]], np.float32)
    with pytest.raises(ModelExecutionError, match="output 's': no step produced"):
        rt.infer("bare", {"x": x})
    x[0, 3] = 1
    assert_same(rt.infer("bare", {"x": x}), {"s": by_hand(rt, "flaky", {"x": x})["s"]}, "bare")


# -- deadlines, faults, rebinding -----------------------------------------------------

class Gated:
    """A model whose first `held` batches wait for `release`; `entered` is set when one waits."""

    def __init__(self, fn: Callable = double, held: int = 1) -> None:
        self.fn, self.held = fn, held
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, inputs):
        if self.held > 0:
            self.held -= 1
            self.entered.set()
            assert self.release.wait(DEADLINE_S), "the gate was never opened"
        return self.fn(inputs)


def in_thread(fn: Callable, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_step_timeout_expires_a_queued_graph_request(rt: Runtime) -> None:
    gate = Gated()
    rt.add_model("slow", model_config(), gate)
    add_graph(rt, "timed", {"inputs": ["x"], "outputs": {"y": "s.y"},
                            "step": [step("s", "slow", timeout_ms=1)]})
    x = np.ones((2, 4), np.float32)
    busy, busy_out = in_thread(rt.infer, "slow", {"x": x})
    assert gate.entered.wait(DEADLINE_S)
    with pytest.raises(DeadlineExceeded, match=r"graph 'timed': step 's' \(model 'slow'\).*deadline"):
        rt.infer("timed", {"x": x})  # the step's only instance is held: its queued request expires
    gate.release.set()
    busy.join(DEADLINE_S)
    np.testing.assert_array_equal(busy_out["result"]["y"], x * 2 + 1)
    assert rt.model_stats("timed")["steps"][0]["failed"] == 1
    # (No graph call after the gate: under load a 1 ms step deadline may pass in any queue.)
    assert_same(rt.infer("slow", {"x": x}), {"y": x * 2 + 1}, "the step model after the gate")


def test_a_raising_step_fails_its_request_only(rt: Runtime) -> None:
    def boom(inputs):
        if np.any(inputs["x"][:, 0] == 13):
            raise ValueError("kaboom")
        return double(inputs)

    rt.add_model("boom", model_config(), boom)
    add_graph(rt, "exploding", {"inputs": ["x"], "outputs": {"y": "B.y"},
                                "step": [step("explode", "boom"), step("B", "shift", {"x": "explode.y"})]})
    bad, good = np.full((2, 4), 13, np.float32), np.ones((2, 4), np.float32)
    with pytest.raises(ModelExecutionError, match=r"step 'explode' \(model 'boom'\).*kaboom"):
        rt.infer("exploding", {"x": bad})
    assert_same(rt.infer("exploding", {"x": good}), {"y": good * 2 + 1 - 3}, "exploding after the failure")
    assert_same(rt.infer("pipeline", {"x": good}), {"out": good * 2 + 1 - 3}, "another graph")
    stats = rt.model_stats("exploding")
    assert (stats["succeeded"], stats["failed"]) == (1, 1)
    assert stats["steps"][1]["requests"] == 1  # the step after the failure never ran for it


def test_unloading_a_step_model_mid_traffic_and_the_rebind(rt: Runtime) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    gate = Gated(shift)
    rt.add_model("shift", STEP_MODELS["shift"][0], gate, version=2)  # the newest: the graph rebinds to it
    in_flight, in_flight_out = in_thread(rt.infer, "pipeline", {"x": x})
    assert gate.entered.wait(DEADLINE_S)  # the request holds version 2 of shift
    unloading, unload_out = in_thread(rt.unload_model, "shift")  # drains: waits for the request
    graph = rt.model("pipeline")
    wait_for(lambda: not graph.ready()[0], "the graph to lose its step")
    ready, reason = graph.ready()
    assert not ready and "step 'B' (model 'shift')" in reason and "not loaded" in reason
    with pytest.raises(Unavailable, match=r"step 'B' \(model 'shift'\).*not loaded"):
        rt.infer("pipeline", {"x": x})
    gate.release.set()
    in_flight.join(DEADLINE_S)
    unloading.join(DEADLINE_S)
    assert "error" not in unload_out
    assert_same(in_flight_out["result"], {"out": x * 2 + 1 - 3}, "the request in flight at the unload")
    rt.add_model("shift", *STEP_MODELS["shift"])
    assert graph.ready() == (True, "")
    assert_same(rt.infer("pipeline", {"x": x}), {"out": x * 2 + 1 - 3}, "after the rebind")


def test_a_reloaded_step_that_no_longer_fits_makes_the_graph_unready(rt: Runtime) -> None:
    x = np.ones((1, 4), np.float32)
    rt.add_model("shift", model_config(outputs=(("y", "FP32", [5]),)), lambda i: {"y": np.zeros((len(i["x"]), 5))})
    ready, reason = rt.model("pipeline").ready()
    assert not ready and "step 'B' (model 'shift')" in reason and "no longer fits" in reason
    with pytest.raises(Unavailable, match="no longer fits"):
        rt.infer("pipeline", {"x": x})
    assert_same(rt.infer("fanjoin", {"x": x}), {"z": (x * 2 + 1) + 10 * x * x}, "a graph not using shift")
    rt.add_model("shift", *STEP_MODELS["shift"])
    assert rt.model("pipeline").ready() == (True, "")
    assert_same(rt.infer("pipeline", {"x": x}), {"out": x * 2 + 1 - 3}, "after a fitting reload")


# -- concurrency: graph rows and direct rows share the step model's batches -------------

GRAPH_THREADS, DIRECT_THREADS, PER_THREAD = 64, 8, 5


class Marking:
    """y = 2x + 1; column 0 says graph (1) or direct (0): records which kinds each batch held."""

    def __init__(self) -> None:
        self.gate = Gated()
        self.batches: list[set[float]] = []
        self.lock = threading.Lock()

    def __call__(self, inputs):
        with self.lock:
            self.batches.append(set(inputs["x"][:, 0].tolist()))
        return self.gate(inputs)


def test_graph_and_direct_requests_share_batches_and_are_counted_exactly(rt: Runtime) -> None:
    marking = Marking()
    rt.add_model("mark", model_config(max_queue_size=4096), marking)
    add_graph(rt, "marked", {"inputs": ["x"], "outputs": {"y": "m.y", "z": "B.y"},
                             "step": [step("m", "mark"), step("B", "shift", {"x": "m.y"})]})

    def request(kind: float, marker: float, rows: int = 1) -> dict[str, np.ndarray]:
        x = np.zeros((rows, 4), np.float32)
        x[:, 0], x[:, 1], x[:, 2] = kind, marker, np.arange(rows)
        return {"x": x}

    # Ordered by the batcher's own queue: the gate holds a first direct batch; one graph
    # request and one direct request queue behind it; the next batch takes both.
    first, _ = in_thread(rt.infer, "mark", request(0.0, -1))
    assert marking.gate.entered.wait(DEADLINE_S)
    queued = [in_thread(rt.infer, "marked", request(1.0, -2))]
    wait_for(lambda: rt.model_stats("mark")["queue_depth"] == 1, "the graph's step request to queue")
    queued.append(in_thread(rt.infer, "mark", request(0.0, -3)))
    wait_for(lambda: rt.model_stats("mark")["queue_depth"] == 2, "the direct request to queue")
    marking.gate.release.set()
    for thread, out in [(first, {}), *queued]:
        thread.join(DEADLINE_S)
        assert "error" not in out
    assert marking.batches[1] == {0.0, 1.0}, marking.batches

    failures: list[str] = []

    def caller(kind: float, thread_index: int) -> None:
        for i in range(PER_THREAD):
            marker = float(1000 * thread_index + i + (0 if kind else 500_000))
            rows = 1 + (thread_index + i) % MAX_ROWS
            x = request(kind, marker, rows)["x"]
            try:
                got = rt.infer("marked" if kind else "mark", {"x": x})
            except Exception as exc:  # collected: every answer is checked after the join
                failures.append(f"{kind} {marker}: {exc!r}")
                continue
            expected = {"y": x * 2 + 1, "z": x * 2 + 1 - 3} if kind else {"y": x * 2 + 1}
            if sorted(got) != sorted(expected) or any(not np.array_equal(got[k], v) for k, v in expected.items()):
                failures.append(f"{kind} {marker}: got {got}")

    workers = [threading.Thread(target=caller, args=(1.0, t)) for t in range(GRAPH_THREADS)]
    workers += [threading.Thread(target=caller, args=(0.0, t)) for t in range(DIRECT_THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(DEADLINE_S * 4)
        assert not worker.is_alive()
    assert not failures, failures[:5]
    # The three ordered requests above: one graph call, two direct ones.
    graph_total, direct_total = 1 + GRAPH_THREADS * PER_THREAD, 2 + DIRECT_THREADS * PER_THREAD
    graph_stats, mark_stats = rt.model_stats("marked"), rt.model_stats("mark")
    assert graph_stats["succeeded"] == graph_stats["requests"] == graph_total
    assert graph_stats["failed"] == 0
    step_requests = graph_stats["steps"][0]["requests"]
    assert step_requests == graph_total
    assert mark_stats["succeeded"] == step_requests + direct_total
    assert mark_stats["failed"] == mark_stats["expired"] == mark_stats["rejected"] == 0
    assert sum(len(batch) == 2 for batch in marking.batches) >= 1
