"""The configuration search behind `conveyor profile`: the space, a cost model, quick and exhaustive search.

Pure logic, no model and no clock: a search calls `evaluate(configuration) -> score`
(the capacity at the objective; 0 or less for a configuration that failed or met it at no
rate, the nearer 0 the closer it came)
and tests drive it with simulated capacity surfaces.

- `SearchSpace`: the knobs (backend, max_batch_size, max_queue_delay_us, preferred batch
  sizes, instance count, compute threads per instance, onnxruntime inter-op threads, CPU
  pinning) and the rules a configuration must keep (instances x threads within the CPU
  budget, no queue delay or preferred sizes without batching). Every configuration is
  canonical: knobs that cannot matter are at one value, so no two configurations run alike.
- `CostModel`: from measured compute time per batch (backend, threads, batch size) it
  predicts each configuration's capacity under the p99 objective: the busiest rate at which
  a batch's queueing plus compute still fits the objective.
- `quick_search`: a constrained hill climb seeded by the cost model's best predictions.
  It moves to the first neighbour (one knob one step away, tried in predicted order, the
  last move's direction first) that beats the current best by `min_gain`, and when none
  does it restarts from the best-predicted configuration not yet near a visited one.
- `exhaustive_search`: every configuration, in predicted order.
- `pareto_front`, `knob_effects`, `choose_winner`: the report's Pareto set, how much each
  knob mattered around the winner, and the winner (memory breaks near-ties in capacity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Configuration = dict[str, Any]
# The capacity (> 0); a configuration that meets the objective at no rate scores below 0, the closer to 0
# the nearer it came, so the climb still heads toward the objective when nothing meets it yet.
Evaluate = Callable[[Configuration], float]

# python: only for a model written in Python; trees: only for a tree ensemble (neither has threads to tune).
BACKENDS = ("onnx", "native", "python", "trees")
# The batcher dispatches early when the rows reach the largest preferred size, and only while it
# would otherwise wait out a queue delay: a preferred size is one below max_batch_size.
PREFERRED_CHOICES = ("none", "half", "quarter")
PINNING_CHOICES = ("none", "cores")
KNOB_ORDER = ("backend", "device", "max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "instance_count",
              "threads", "inter_op_threads", "pinning")  # fmt: skip
KNOB_HELP = {
    "backend": "onnx (onnxruntime) or native (Conveyor's kernels, supported graphs only)",
    "device": "cpu, or cuda on a machine with a GPU and onnxruntime-gpu (onnx backend only)",
    "max_batch_size": "the largest batch the batcher forms",
    "max_queue_delay_us": "how long the batcher may wait to fill a batch",
    "preferred_batch_sizes": "none, half or quarter: dispatch a batch once it holds that share of max_batch_size "
    "instead of waiting out the queue delay (no effect without a delay)",
    "instance_count": "execution instances running batches side by side",
    "threads": "compute threads per instance (onnx: intra_op_threads; native: native.threads)",
    "inter_op_threads": "onnxruntime inter-op threads (the onnx backend runs graphs sequentially, so 1 by default)",
    "pinning": "none, or cores: each instance's thread pinned to its own CPU, round robin ([instance_group] cpu_pinning)",
}
ORDINAL_KNOBS = frozenset(
    {
        "max_batch_size",
        "max_queue_delay_us",
        "instance_count",
        "threads",
        "inter_op_threads",
    }
)
TIE_TOLERANCE = 0.03  # capacities this close (relative) count as a tie, broken by memory


class SpaceError(ValueError):
    """A search space or knob override that cannot be used; the message says what to change."""


def configuration_key(configuration: Mapping[str, Any]) -> str:
    """A canonical text key of a configuration (knobs in KNOB_ORDER): checkpoints and caches use it."""
    return ",".join(f"{name}={configuration[name]}" for name in KNOB_ORDER if name in configuration)


def preferred_sizes(choice: str, max_batch_size: int) -> list[int]:
    """The preferred_batch_sizes list a preferred-sizes choice stands for ([] for none)."""
    divisor = {"none": 0, "half": 2, "quarter": 4}[choice]
    if divisor == 0 or max_batch_size < divisor:
        return []
    return [max_batch_size // divisor]


@dataclass(frozen=True)
class SearchSpace:
    """Knob values to search (each tuple ordered: neighbours are adjacent values) and the rules they keep."""

    values: Mapping[str, tuple[Any, ...]]
    max_compute_threads: int  # instance_count x threads may not exceed it
    max_instances: int

    def __post_init__(self) -> None:
        missing = [name for name in KNOB_ORDER if not self.values.get(name)]
        if missing:
            raise SpaceError(f"the search space has no values for {', '.join(missing)}")
        if not self.configurations():
            raise SpaceError(f"no configuration fits the constraints (at most {self.max_instances} instances and "
                             f"{self.max_compute_threads} compute threads in all): relax --max-instances or "
                             "--max-threads, or allow smaller values with --set")  # fmt: skip

    def canonical(self, configuration: Configuration) -> Configuration:
        """The configuration with the knobs that cannot matter at their first value (so duplicates collapse)."""
        result = dict(configuration)
        if result["max_batch_size"] <= 1:
            result["max_queue_delay_us"] = min(self.values["max_queue_delay_us"])
        if result["max_queue_delay_us"] == 0:  # the batcher dispatches at once: preferred sizes never apply
            result["preferred_batch_sizes"] = self.values["preferred_batch_sizes"][0]
        sizes = preferred_sizes(result["preferred_batch_sizes"], result["max_batch_size"])
        for choice in self.values["preferred_batch_sizes"]:  # the first choice naming the same sizes
            if preferred_sizes(choice, result["max_batch_size"]) == sizes:
                result["preferred_batch_sizes"] = choice
                break
        if result["backend"] != "onnx":
            result["inter_op_threads"] = min(self.values["inter_op_threads"])
        if result["backend"] in ("python", "trees"):  # the model's own code, or one thread per instance
            result["threads"] = min(self.values["threads"])
        if result["device"] != "cpu":  # pinning the host threads of a GPU model is not searched
            result["pinning"] = self.values["pinning"][0]
        return result

    def problem(self, configuration: Configuration) -> str | None:
        """Why a configuration is outside the space's rules, or None when it is inside."""
        if configuration["instance_count"] > self.max_instances:
            return f"more than {self.max_instances} instances"
        threads = configuration["instance_count"] * configuration["threads"]
        if threads > self.max_compute_threads:
            return f"{threads} compute threads, over {self.max_compute_threads}"
        if configuration["max_batch_size"] <= 1 and configuration["max_queue_delay_us"] > 0:
            return "a queue delay without batching"
        if configuration["device"] != "cpu" and configuration["backend"] != "onnx":
            return f"the {configuration['backend']} backend runs on the CPU only"
        return None

    def configurations(self) -> list[Configuration]:
        """Every valid canonical configuration, in a fixed order."""
        found: dict[str, Configuration] = {}

        def walk(index: int, partial: Configuration) -> None:
            if index == len(KNOB_ORDER):
                candidate = self.canonical(partial)
                if self.problem(candidate) is None:
                    found.setdefault(configuration_key(candidate), candidate)
                return
            name = KNOB_ORDER[index]
            for value in self.values[name]:
                walk(index + 1, {**partial, name: value})

        walk(0, {})
        return list(found.values())

    def neighbours(self, configuration: Configuration) -> list[tuple[str, int, Configuration]]:
        """Valid configurations one knob away: (knob, direction, configuration); ordinal knobs move one step."""
        out: list[tuple[str, int, Configuration]] = []
        own = configuration_key(configuration)
        for name in KNOB_ORDER:
            values = self.values[name]
            if configuration[name] not in values:
                continue
            at = values.index(configuration[name])
            if name in ORDINAL_KNOBS:
                steps = [(at + step, step) for step in (-1, 1) if 0 <= at + step < len(values)]
            else:
                steps = [(other, 0) for other in range(len(values)) if other != at]
            for index, direction in steps:
                candidate = self.canonical({**configuration, name: values[index]})
                if self.problem(candidate) is None and configuration_key(candidate) != own:
                    out.append((name, direction, candidate))
        return out


# ---------------------------------------------------------------- building a space


def default_values(*, backends: Sequence[str], cpus: int, model_max_batch_size: int, slo_p99_ms: float,
                   gpu: bool) -> dict[str, tuple[Any, ...]]:  # fmt: skip
    """The knob values searched unless --set says otherwise, for this model and machine.

    max_batch_size: powers of two to 128 (only 0 for a model that does not batch); queue
    delays of 0, 0.5 and 2 ms under half the objective; preferred sizes none or half (quarter
    through --set); instances and threads up to the CPUs; pinning only
    with two CPUs or more; cuda only where a GPU can run the model (never on a CPU-only host).
    """
    if model_max_batch_size == 0:
        batch_sizes: tuple[int, ...] = (0,)
    else:
        batch_sizes = (1, 2, 4, 8, 16, 32, 64, 128)
    delays = tuple(delay for delay in (0, 500, 2000) if delay == 0 or delay <= slo_p99_ms * 1000 / 2)
    counts = tuple(range(1, max(1, min(cpus, 8)) + 1))
    threads = tuple(2**power for power in range(8) if 2**power <= max(1, cpus))
    return {
        "backend": tuple(backend for backend in BACKENDS if backend in backends),
        "device": ("cpu", "cuda") if gpu else ("cpu",),
        "max_batch_size": batch_sizes,
        "max_queue_delay_us": delays if model_max_batch_size else (0,),
        "preferred_batch_sizes": ("none", "half") if model_max_batch_size else ("none",),
        "instance_count": counts,
        "threads": threads,
        "inter_op_threads": (1,),
        "pinning": PINNING_CHOICES if cpus >= 2 else ("none",),
    }


def parse_override(text: str) -> tuple[str, tuple[Any, ...]]:
    """`KNOB=V1,V2,...` (from --set) as (knob, values); SpaceError naming the knobs or the bad value."""
    name, equals, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not equals or not raw.strip():
        raise SpaceError(f"--set {text!r}: expected KNOB=VALUE[,VALUE...], e.g. --set max_batch_size=8,16")
    if name not in KNOB_ORDER:
        raise SpaceError(f"--set {text!r}: unknown knob {name!r}; knobs: {', '.join(KNOB_ORDER)}")
    values: list[Any] = []
    for item in (part.strip() for part in raw.split(",")):
        if name in ORDINAL_KNOBS:
            try:
                value: Any = int(item)
            except ValueError:
                raise SpaceError(f"--set {text!r}: {name} takes whole numbers, got {item!r}") from None
            if value < (0 if name in ("max_batch_size", "max_queue_delay_us") else 1):
                raise SpaceError(f"--set {text!r}: {name} value {value} is too small")
        else:
            choices = {"backend": BACKENDS, "device": ("cpu", "cuda"), "preferred_batch_sizes": PREFERRED_CHOICES,
                       "pinning": PINNING_CHOICES}[name]  # fmt: skip
            if item not in choices:
                raise SpaceError(f"--set {text!r}: {name} is one of {', '.join(choices)}, got {item!r}")
            value = item
        if value not in values:
            values.append(value)
    ordered = sorted(values) if name in ORDINAL_KNOBS else values
    return name, tuple(ordered)


def build_space(*, backends: Sequence[str], cpus: int, model_max_batch_size: int, slo_p99_ms: float,
                gpu: bool = False, overrides: Sequence[str] = (), max_instances: int | None = None,
                max_threads: int | None = None, unavailable: Mapping[str, str] | None = None) -> SearchSpace:  # fmt: skip
    """The space `conveyor profile` searches: the defaults, --set overrides, and the command line's limits.

    `unavailable` maps a backend that cannot run the model to why; asking for it with --set
    is an error quoting the reason. Asking for cuda without a GPU is refused the same way.
    """
    values = default_values(backends=backends, cpus=cpus, model_max_batch_size=model_max_batch_size,
                            slo_p99_ms=slo_p99_ms, gpu=gpu)  # fmt: skip
    for text in overrides:
        name, chosen = parse_override(text)
        if name == "backend":
            for backend in chosen:
                if backend not in backends:
                    reason = (unavailable or {}).get(backend, "it cannot run this model")
                    raise SpaceError(f"--set {text!r}: the {backend} backend is not available: {reason}")
        if name == "device" and "cuda" in chosen and not gpu:
            raise SpaceError(f"--set {text!r}: this machine has no GPU that onnxruntime can use; profile on the GPU "
                             "machine, or leave device out")  # fmt: skip
        if model_max_batch_size == 0 and name == "max_batch_size" and chosen != (0,):
            raise SpaceError(f"--set {text!r}: the model does not batch (max_batch_size = 0 in its config: its "
                             "graph has no batch dimension)")  # fmt: skip
        values[name] = chosen
    if not values["backend"]:
        raise SpaceError(
            "no backend can run this model: " + "; ".join(f"{k}: {v}" for k, v in (unavailable or {}).items())
        )
    limit_instances = max_instances if max_instances is not None else max(values["instance_count"])
    limit_threads = max_threads if max_threads is not None else max(cpus, 1) * 2
    return SearchSpace(values, max_compute_threads=limit_threads, max_instances=limit_instances)


# ---------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class CostModel:
    """Predicted capacity from compute time per batch: {(backend, device, threads): {batch size: seconds}}.

    A batch of b rows on one instance takes t(b); under load, a request waits for the batch
    in flight, the queue delay, then its own batch: p99 ~ delay + 2 t(b). Of the batch sizes
    whose latency fits the objective, the best throughput n b / t(b) (t stretched when the
    compute threads outnumber the CPUs) at `utilisation` is the prediction.
    """

    compute_s: Mapping[tuple[str, str, int], Mapping[int, float]]
    slo_p99_s: float
    cpus: int
    utilisation: float = 0.7  # the load at which p99 typically stays within the objective

    def batch_seconds(self, backend: str, device: str, threads: int, batch: int) -> float | None:
        """t(batch): interpolated log-log between measured sizes, linear in rows beyond them; None unmeasured."""
        measured = self.compute_s.get((backend, device, threads))
        if not measured:
            fewer = [t for (b, d, t) in self.compute_s if (b, d) == (backend, device) and t < threads]
            if not fewer:
                return None
            return self.batch_seconds(backend, device, max(fewer), batch)  # more threads: no speed-up assumed
        sizes = sorted(measured)
        if batch in measured:
            return measured[batch]
        if batch < sizes[0]:
            return measured[sizes[0]]
        if batch > sizes[-1]:
            return measured[sizes[-1]] * batch / sizes[-1]
        low = max(size for size in sizes if size < batch)
        high = min(size for size in sizes if size > batch)
        share = math.log(batch / low) / math.log(high / low)
        return math.exp(math.log(measured[low]) * (1 - share) + math.log(measured[high]) * share)

    def predict(self, configuration: Configuration) -> float:
        """Predicted capacity (queries/s) under the objective; 0 when no batch size fits it."""
        instances, threads = configuration["instance_count"], configuration["threads"]
        contention = max(1.0, instances * threads / max(1, self.cpus))
        delay_s = configuration["max_queue_delay_us"] / 1e6
        best = 0.0
        for batch in batch_sizes_up_to(configuration["max_batch_size"]):  # 0 (no batching): one row at a time
            seconds = self.batch_seconds(configuration["backend"], configuration["device"], threads, batch)
            if seconds is None:
                return 0.0
            seconds *= contention
            if delay_s + 2 * seconds <= self.slo_p99_s:
                best = max(best, instances * max(1, batch) / seconds * self.utilisation)
        return best


def batch_sizes_up_to(max_batch_size: int) -> list[int]:
    """Powers of two below `max_batch_size`, then it: the batch sizes the cost model considers."""
    sizes = [2**power for power in range(max(1, max_batch_size).bit_length()) if 2**power < max_batch_size]
    return [*sizes, max(1, max_batch_size)]


# ---------------------------------------------------------------- searching


@dataclass
class SearchLog:
    """Every configuration evaluated, in order, with its score; `best` is the highest score seen."""

    trials: list[tuple[Configuration, float]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)

    def record(self, configuration: Configuration, score: float) -> None:
        self.trials.append((configuration, score))
        self.scores[configuration_key(configuration)] = score

    @property
    def best(self) -> tuple[Configuration, float] | None:
        return max(self.trials, key=lambda trial: trial[1], default=None)


def ranked_by_prediction(space: SearchSpace, predict: Callable[[Configuration], float]) -> list[Configuration]:
    """The space's configurations, best predicted first (ties in the space's fixed order)."""
    configurations = space.configurations()
    predictions = [predict(configuration) for configuration in configurations]
    order = sorted(range(len(configurations)), key=lambda index: (-predictions[index], index))
    return [configurations[index] for index in order]


def exhaustive_search(space: SearchSpace, evaluate: Evaluate,
                      predict: Callable[[Configuration], float] | None = None) -> SearchLog:  # fmt: skip
    """Evaluates every configuration (in predicted order when a cost model is given)."""
    log = SearchLog()
    ordered = ranked_by_prediction(space, predict) if predict is not None else space.configurations()
    for configuration in ordered:
        log.record(configuration, evaluate(configuration))
    return log


def default_budget(space_size: int) -> int:
    """Quick search's trials by default: 10% of the space, at least 8 (or the whole space when smaller)."""
    return min(space_size, max(8, space_size // 10))


def quick_search(space: SearchSpace, evaluate: Evaluate, predict: Callable[[Configuration], float], *,
                 max_trials: int | None = None, min_gain: float = 0.01, seeds: int = 2) -> SearchLog:  # fmt: skip
    """Hill climb from the cost model's best predictions, within `max_trials` evaluations.

    Starts by evaluating the `seeds` best-predicted configurations that differ in at least
    two knobs; climbs from the best of them (first improvement by more than `min_gain`,
    neighbours in predicted order, the last move's direction first); at a local optimum it
    restarts from the best-predicted configuration that is not a neighbour of any visited one.
    """
    ranked = ranked_by_prediction(space, predict)
    budget = default_budget(len(ranked)) if max_trials is None else max(1, min(max_trials, len(ranked)))
    predictions = {configuration_key(c): predict(c) for c in ranked}
    log = SearchLog()

    def trial(configuration: Configuration) -> float:
        key = configuration_key(configuration)
        if key not in log.scores:
            log.record(configuration, evaluate(configuration))
        return log.scores[key]

    for seed in _diverse(ranked, seeds):
        if len(log.trials) < budget:
            trial(seed)
    current, current_score = log.best or (ranked[0], 0.0)
    last_move: tuple[str, int] | None = None
    while len(log.trials) < budget:
        moved = False
        for knob, direction, candidate in _ordered_neighbours(space, current, predictions, last_move):
            if configuration_key(candidate) in log.scores:
                continue
            if len(log.trials) >= budget:
                break
            score = trial(candidate)
            if score > current_score + min_gain * abs(current_score):
                current, current_score, last_move, moved = (
                    candidate,
                    score,
                    (knob, direction),
                    True,
                )
                break
        if moved:
            continue
        restart = _restart_point(space, ranked, log)
        if restart is None or len(log.trials) >= budget:
            break
        score = trial(restart)
        if score > current_score:
            current, current_score = restart, score
        else:
            current = restart  # climb its neighbourhood too; the best seen is kept in the log
            current_score = score
        last_move = None
    return log


def _diverse(ranked: Sequence[Configuration], count: int) -> list[Configuration]:
    """The first `count` configurations of `ranked` that pairwise differ in at least two knobs."""
    chosen: list[Configuration] = []
    for configuration in ranked:
        if all(_distance(configuration, other) >= 2 for other in chosen):
            chosen.append(configuration)
        if len(chosen) == count:
            break
    return chosen


def _distance(a: Configuration, b: Configuration) -> int:
    return sum(1 for name in KNOB_ORDER if a.get(name) != b.get(name))


def _ordered_neighbours(space: SearchSpace, current: Configuration, predictions: Mapping[str, float],
                        last_move: tuple[str, int] | None) -> list[tuple[str, int, Configuration]]:  # fmt: skip
    """Neighbours to try: one continuing the last move first, then by predicted capacity."""
    neighbours = space.neighbours(current)

    def priority(entry: tuple[str, int, Configuration]) -> tuple[int, float]:
        knob, direction, candidate = entry
        momentum = last_move is not None and (knob, direction) == last_move and direction != 0
        return (
            0 if momentum else 1,
            -predictions.get(configuration_key(candidate), 0.0),
        )

    return sorted(neighbours, key=priority)


def _restart_point(space: SearchSpace, ranked: Sequence[Configuration], log: SearchLog) -> Configuration | None:
    """The best-predicted unvisited configuration at least two knobs from every visited one (else any unvisited)."""
    visited = [configuration for configuration, _ in log.trials]
    fallback = None
    for configuration in ranked:
        if configuration_key(configuration) in log.scores:
            continue
        if all(_distance(configuration, other) >= 2 for other in visited):
            return configuration
        fallback = fallback or configuration
    return fallback


# ---------------------------------------------------------------- choosing and explaining


@dataclass(frozen=True)
class Scored:
    """One evaluated configuration as the report needs it."""

    configuration: Configuration
    capacity_qps: float  # 0: failed, or met the objective at no rate
    p99_ms: float | None
    memory_mb: float | None


def choose_winner(results: Sequence[Scored], tie_tolerance: float = TIE_TOLERANCE) -> Scored | None:
    """The highest capacity; among those within `tie_tolerance` of it, the least memory (then capacity)."""
    feasible = [result for result in results if result.capacity_qps > 0]
    if not feasible:
        return None
    best = max(result.capacity_qps for result in feasible)
    close = [result for result in feasible if result.capacity_qps >= best * (1 - tie_tolerance)]
    return min(
        close,
        key=lambda r: (
            r.memory_mb if r.memory_mb is not None else math.inf,
            -r.capacity_qps,
        ),
    )


def finalists(results: Sequence[Scored], count: int) -> list[Scored]:
    """The `count` highest-capacity distinct configurations that met the objective: the ones measured again.

    One short trial per configuration is noisy; the best of many noisy values is biased
    upward (the winner's curse), so the choice is made on repeated measurements of a few.
    """
    unique: dict[str, Scored] = {}
    for result in sorted(results, key=lambda r: -r.capacity_qps):
        if result.capacity_qps > 0:
            unique.setdefault(configuration_key(result.configuration), result)
    return list(unique.values())[:count]


def pareto_front(results: Iterable[Scored]) -> list[Scored]:
    """The configurations no other beats on all of capacity (higher), p99 and memory (lower), by capacity."""
    feasible = [result for result in results if result.capacity_qps > 0]

    def costs(result: Scored) -> tuple[float, float, float]:
        return (-result.capacity_qps, result.p99_ms if result.p99_ms is not None else math.inf,
                result.memory_mb if result.memory_mb is not None else math.inf)  # fmt: skip

    front = []
    for result in feasible:
        mine = costs(result)
        dominated = any(all(o <= m for o, m in zip(costs(other), mine)) and costs(other) != mine
                        for other in feasible)  # fmt: skip
        if not dominated:
            front.append(result)
    unique = {configuration_key(result.configuration): result for result in front}
    return sorted(unique.values(), key=lambda result: -result.capacity_qps)


@dataclass(frozen=True)
class KnobEffect:
    """How capacity moved when one knob varied with every other knob at the winner's values."""

    knob: str
    values: list[tuple[Any, float]]  # (value, capacity) measured, the winner's included
    spread: float | None  # (highest - lowest) / the winner's capacity; None when the knob was not varied


def knob_effects(winner: Scored, results: Sequence[Scored]) -> list[KnobEffect]:
    """Per knob, the capacity spread over the measured configurations that differ from the winner in it alone.

    Sorted by spread, largest first: the knobs that mattered most around the winner lead.
    """
    effects = []
    for knob in KNOB_ORDER:
        values: dict[Any, float] = {}
        for result in results:
            others_equal = all(result.configuration[name] == winner.configuration[name]
                               for name in KNOB_ORDER if name != knob)  # fmt: skip
            if others_equal:
                values[result.configuration[knob]] = result.capacity_qps
        spread = None
        if len(values) > 1 and winner.capacity_qps > 0:
            spread = (max(values.values()) - min(values.values())) / winner.capacity_qps
        ordered = sorted(
            values.items(),
            key=lambda item: (isinstance(item[0], str), str(item[0]).zfill(12)),
        )
        effects.append(KnobEffect(knob, ordered, spread))
    return sorted(
        effects,
        key=lambda effect: math.inf if effect.spread is None else -effect.spread,
    )
