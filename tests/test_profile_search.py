"""The configuration search on simulated capacity surfaces: quick search against an exhaustive sweep.

A simulated machine has a compute time per batch (backend, threads, rows); the "true"
capacity of a configuration adds what the cost model does not know (contention that hurts
more than it assumes, queueing that needs more headroom, the queue delay and preferred sizes
helping or hurting, pinning, ceilings), in several shapes, each with seeded noise per
configuration. The cost model only sees (noisy) compute times, as `conveyor profile`'s
calibration gives it. Quick search must reach 97% of the sweep's best in at most 10% of its trials.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conveyor.profile.search import (
    KNOB_ORDER,
    CostModel,
    Scored,
    SearchSpace,
    SpaceError,
    build_space,
    choose_winner,
    configuration_key,
    default_budget,
    exhaustive_search,
    knob_effects,
    pareto_front,
    parse_override,
    preferred_sizes,
    quick_search,
)

SLO_MS = 10.0
CPUS = 4


def _noise(seed: int, key: str, amplitude: float) -> float:
    """A deterministic factor in [1 - amplitude, 1 + amplitude] for (seed, configuration)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    unit = int.from_bytes(digest[:8], "little") / 2**64
    return 1 + amplitude * (2 * unit - 1)


@dataclass(frozen=True)
class Machine:
    """Compute time per batch: a fixed cost per batch plus a cost per row that threads divide (sub-linearly)."""

    fixed_s: dict[str, float]
    per_row_s: dict[str, float]
    thread_scaling: float = 0.7  # speed-up with t threads: t ** scaling on the rows' share

    def batch_s(self, backend: str, threads: int, rows: int) -> float:
        return self.fixed_s[backend] + self.per_row_s[backend] * max(1, rows) / threads**self.thread_scaling

    def timings(
        self,
        batches: list[int],
        threads: list[int],
        seed: int,
        distortion: dict[str, float],
    ) -> dict:
        """What calibration would measure: each time off by up to 5%, and a backend-wide distortion."""
        return {(backend, "cpu", t): {b: self.batch_s(backend, t, b) * distortion.get(backend, 1.0)
                                      * _noise(seed, f"{backend}{t}{b}", 0.05) for b in batches}
                for backend in self.fixed_s for t in threads}  # fmt: skip


@dataclass(frozen=True)
class Surface:
    """A 'true' capacity surface over configurations, with what the cost model does not know."""

    name: str
    machine: Machine
    contention_power: float = 1.5  # the cost model assumes 1
    headroom: float = 2.6  # p99 ~ delay + headroom x t(b); the cost model assumes 2
    delay_gain: float = 0.06  # throughput gained per log2 of (1 + delay / 250 us), batching fuller
    pinning_gain: float = 0.04  # with threads <= CPUs; pinning oversubscribed threads loses 12%
    ceiling_qps: float = math.inf  # e.g. the generator or memory bandwidth
    noise: float = 0.03
    distortion: dict[str, float] | None = None  # calibration's bias per backend
    small_batch_bonus: float = 0.0  # many instances of small batches win (cache effects)

    def capacity(self, configuration: dict, seed: int) -> float:
        c = configuration
        n, t = c["instance_count"], c["threads"]
        oversubscribed = n * t > CPUS
        contention = max(1.0, n * t / CPUS) ** self.contention_power
        delay_ms = c["max_queue_delay_us"] / 1000
        preferred = preferred_sizes(c["preferred_batch_sizes"], c["max_batch_size"])
        effective_delay = delay_ms * (0.5 if preferred else 1.0)
        best = 0.0
        batch = 1
        while batch <= max(1, c["max_batch_size"]):
            seconds = self.machine.batch_s(c["backend"], t, batch) * contention
            if effective_delay + self.headroom * seconds * 1000 <= SLO_MS:
                rate = n * batch / seconds * 0.65
                rate *= 1 + self.small_batch_bonus * (n - 1) / max(1, math.log2(batch) + 1)
                best = max(best, rate)
            batch *= 2
        if best == 0.0:
            return 0.0
        best *= 1 + self.delay_gain * math.log2(1 + c["max_queue_delay_us"] / 250) * (0.7 if preferred else 1.0)
        if c["pinning"] == "cores":
            best *= 0.88 if oversubscribed else 1 + self.pinning_gain
        best = min(best, self.ceiling_qps)
        return best * _noise(seed, configuration_key(c), self.noise)

    def cost_model(self, seed: int) -> CostModel:
        timings = self.machine.timings([1, 2, 4, 8, 16, 32, 64, 128], [1, 2, 4], seed, self.distortion or {})
        return CostModel(timings, SLO_MS / 1000, CPUS)


BALANCED = Machine(fixed_s={"onnx": 60e-6, "native": 25e-6}, per_row_s={"onnx": 12e-6, "native": 14e-6})
HEAVY = Machine(
    fixed_s={"onnx": 150e-6, "native": 80e-6},
    per_row_s={"onnx": 90e-6, "native": 70e-6},
)
SURFACES = [
    Surface("smooth", BALANCED),
    Surface(
        "ridge: contention punishes any oversubscription",
        BALANCED,
        contention_power=3.0,
        pinning_gain=0.08,
    ),
    Surface(
        "plateau: a ceiling many configurations reach",
        BALANCED,
        ceiling_qps=60_000.0,
        noise=0.02,
    ),
    Surface(
        "deceptive: calibration flatters native by 40%",
        HEAVY,
        distortion={"native": 0.6},
    ),
    Surface(
        "multimodal: small batches on many instances compete with large ones",
        HEAVY,
        small_batch_bonus=0.35,
        delay_gain=0.0,
    ),
    Surface(
        "latency-bound: little batching fits the objective",
        HEAVY,
        headroom=4.0,
        delay_gain=-0.05,
    ),
]


# Spaces of a few hundred configurations: 10% of them is a budget of 20-30 trials.
SPACES = {
    "224 configurations": ["max_queue_delay_us=0,1000", "preferred_batch_sizes=none", "threads=1,2",
                           "max_batch_size=1,4,16,64"],
    "304 configurations": ["max_queue_delay_us=0,500", "preferred_batch_sizes=none,half", "threads=1,2",
                           "pinning=none", "max_batch_size=1,2,4,8,16,32,64"],
}  # fmt: skip


def _space(name: str = "304 configurations") -> SearchSpace:
    return build_space(backends=["onnx", "native"], cpus=CPUS, model_max_batch_size=64, slo_p99_ms=SLO_MS,
                       overrides=SPACES[name])  # fmt: skip


@pytest.mark.parametrize("name", SPACES)
def test_the_test_spaces_are_large_enough_for_the_claim(name: str) -> None:
    assert len(_space(name).configurations()) == int(name.split()[0]) >= 100


@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("surface", SURFACES, ids=lambda surface: surface.name.split(":")[0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quick_search_reaches_97_percent_of_the_sweep_in_a_tenth_of_its_trials(space_name: str, surface: Surface,
                                                                               seed: int) -> None:  # fmt: skip
    space = _space(space_name)
    size = len(space.configurations())
    evaluate: Callable[[dict], float] = lambda configuration: surface.capacity(configuration, seed)
    model = surface.cost_model(seed)
    sweep = exhaustive_search(space, evaluate, model.predict)
    quick = quick_search(space, evaluate, model.predict)
    assert len(sweep.trials) == size
    assert len(quick.trials) <= size // 10
    best, found = sweep.best[1], quick.best[1]
    assert best > 0
    assert found >= 0.97 * best, f"{surface.name}: quick found {found:.0f}, the sweep {best:.0f} ({found / best:.1%})"


def test_quick_search_never_evaluates_a_configuration_twice_nor_past_its_budget() -> None:
    surface, space = SURFACES[0], _space()
    calls: list[str] = []

    def evaluate(configuration: dict) -> float:
        calls.append(configuration_key(configuration))
        return surface.capacity(configuration, 7)

    log = quick_search(space, evaluate, surface.cost_model(7).predict, max_trials=12)
    assert len(calls) == len(set(calls)) == len(log.trials) <= 12


def test_a_failing_configuration_scores_zero_and_the_climb_goes_on() -> None:
    """Every configuration with two instances 'fails' (score 0); the search still finds the best of the rest."""
    surface, space = SURFACES[0], _space()

    def evaluate(configuration: dict) -> float:
        return 0.0 if configuration["instance_count"] == 2 else surface.capacity(configuration, 4)

    model = surface.cost_model(4)
    best = exhaustive_search(space, evaluate).best[1]
    assert quick_search(space, evaluate, model.predict).best[1] >= 0.97 * best


def test_the_cost_model_interpolates_between_measured_batch_sizes_and_extends_linearly() -> None:
    model = CostModel({("onnx", "cpu", 1): {1: 1e-3, 4: 4e-3, 16: 8e-3}}, 0.1, 2)
    assert model.batch_seconds("onnx", "cpu", 1, 2) == pytest.approx(2e-3)
    assert model.batch_seconds("onnx", "cpu", 1, 32) == pytest.approx(16e-3)
    assert model.batch_seconds("onnx", "cpu", 2, 4) == pytest.approx(4e-3)  # more threads than measured: no gain
    assert model.batch_seconds("native", "cpu", 1, 4) is None
    configuration = {"backend": "onnx", "device": "cpu", "max_batch_size": 16, "max_queue_delay_us": 0,
                     "instance_count": 1, "threads": 1}  # fmt: skip
    # batch 16 fits (2 x 8 ms <= 100 ms): 0.7 x 16 / 8 ms = 1400 queries/s
    assert model.predict(configuration) == pytest.approx(1400)
    tight = CostModel(model.compute_s, 0.005, 2)  # only batch 1 fits 5 ms: 0.7 x 1 / 1 ms
    assert tight.predict(configuration) == pytest.approx(700)


def test_canonical_configurations_collapse_knobs_that_cannot_matter() -> None:
    space = _space()
    keys = [configuration_key(c) for c in space.configurations()]
    assert len(keys) == len(set(keys))
    for configuration in space.configurations():
        if configuration["max_queue_delay_us"] == 0:
            assert configuration["preferred_batch_sizes"] == "none"
        if configuration["backend"] == "native":
            assert configuration["inter_op_threads"] == 1
        assert configuration["instance_count"] * configuration["threads"] <= 2 * CPUS
        assert set(configuration) == set(KNOB_ORDER)


def test_neighbours_move_one_knob_one_step() -> None:
    space = _space()
    start = next(c for c in space.configurations() if c["max_batch_size"] == 16 and c["max_queue_delay_us"] == 500
                 and c["preferred_batch_sizes"] == "half")  # fmt: skip
    for knob, direction, neighbour in space.neighbours(start):
        changed = [name for name in KNOB_ORDER if neighbour[name] != start[name]]
        assert knob in changed and set(changed) <= {knob, "preferred_batch_sizes"}
        if knob == "max_batch_size":
            assert neighbour["max_batch_size"] == (8 if direction < 0 else 32)


def test_defaults_never_offer_a_gpu_on_a_cpu_only_host_and_refuse_one_asked_for() -> None:
    space = build_space(backends=["onnx"], cpus=2, model_max_batch_size=8, slo_p99_ms=5)
    assert {c["device"] for c in space.configurations()} == {"cpu"}
    with pytest.raises(SpaceError, match="no GPU"):
        build_space(
            backends=["onnx"],
            cpus=2,
            model_max_batch_size=8,
            slo_p99_ms=5,
            overrides=["device=cuda"],
        )
    on_gpu = build_space(
        backends=["onnx", "native"],
        cpus=2,
        model_max_batch_size=8,
        slo_p99_ms=5,
        gpu=True,
    )
    devices = {(c["backend"], c["device"]) for c in on_gpu.configurations()}
    assert ("onnx", "cuda") in devices and ("native", "cuda") not in devices


def test_overrides_and_limits_shape_the_space() -> None:
    assert parse_override("threads=2,1,2") == ("threads", (1, 2))
    assert parse_override("max-batch-size=8") == ("max_batch_size", (8,))
    for bad, message in [("threads", "expected KNOB=VALUE"), ("speed=3", "unknown knob"),
                         ("threads=two", "whole numbers"), ("pinning=numa", "one of none, cores"),
                         ("instance_count=0", "too small")]:  # fmt: skip
        with pytest.raises(SpaceError, match=message):
            parse_override(bad)
    space = build_space(backends=["onnx"], cpus=4, model_max_batch_size=64, slo_p99_ms=10, max_instances=2,
                        overrides=["max_batch_size=16", "threads=1"])  # fmt: skip
    assert {c["instance_count"] for c in space.configurations()} == {1, 2}
    assert {c["max_batch_size"] for c in space.configurations()} == {16}
    with pytest.raises(SpaceError, match="native backend is not available: it has a Conv"):
        build_space(backends=["onnx"], cpus=2, model_max_batch_size=8, slo_p99_ms=5, overrides=["backend=native"],
                    unavailable={"native": "it has a Conv"})  # fmt: skip
    with pytest.raises(SpaceError, match="no configuration fits"):
        build_space(backends=["onnx"], cpus=2, model_max_batch_size=8, slo_p99_ms=5, max_threads=1,
                    overrides=["threads=2"])  # fmt: skip
    not_batching = build_space(backends=["onnx"], cpus=2, model_max_batch_size=0, slo_p99_ms=5)
    assert {c["max_batch_size"] for c in not_batching.configurations()} == {0}
    assert default_budget(576) == 57 and default_budget(20) == 8 and default_budget(5) == 5


def _scored(capacity: float, p99: float, memory: float, **knobs: object) -> Scored:
    configuration = {name: 1 for name in KNOB_ORDER} | {
        "backend": "onnx",
        "device": "cpu",
        "preferred_batch_sizes": "none",
        "pinning": "none",
    }
    return Scored(configuration | knobs, capacity, p99, memory)


def test_winner_takes_the_least_memory_among_near_ties_and_none_when_nothing_passes() -> None:
    big = _scored(1000, 9, 300, max_batch_size=64)
    lean = _scored(985, 9, 120, max_batch_size=32)  # within 3%: wins on memory
    slow = _scored(900, 5, 50, max_batch_size=8)
    assert choose_winner([big, lean, slow]) == lean
    assert choose_winner([_scored(0, 50, 10)]) is None
    assert pareto_front([big, lean, slow, _scored(800, 9, 400, max_batch_size=2)]) == [
        big,
        lean,
        slow,
    ]


def test_knob_effects_measure_the_spread_around_the_winner() -> None:
    winner = _scored(1000, 9, 100, max_batch_size=32, instance_count=2)
    results = [
        winner,
        _scored(600, 9, 100, max_batch_size=8, instance_count=2),
        _scored(950, 9, 100, max_batch_size=32, instance_count=1),
        _scored(100, 9, 100, max_batch_size=8, instance_count=1),
    ]  # differs in two knobs: ignored
    effects = {effect.knob: effect for effect in knob_effects(winner, results)}
    assert effects["max_batch_size"].spread == pytest.approx(0.4)
    assert effects["max_batch_size"].values == [(8, 600), (32, 1000)]
    assert effects["instance_count"].spread == pytest.approx(0.05)
    assert effects["threads"].spread is None
    assert knob_effects(winner, results)[0].knob == "max_batch_size"


def test_a_python_model_searches_batching_and_instances_only() -> None:
    space = build_space(backends=["python"], cpus=2, model_max_batch_size=8, slo_p99_ms=5)
    configurations = space.configurations()
    assert {(c["backend"], c["threads"], c["inter_op_threads"]) for c in configurations} == {("python", 1, 1)}
    assert {c["instance_count"] for c in configurations} == {1, 2}
