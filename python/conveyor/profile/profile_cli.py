"""`conveyor profile MODEL --slo-p99-ms X`: find the configuration that serves the most under a p99 objective.

The knobs (conveyor.profile.search): backend (onnx, or native where the kernels run the
graph), max_batch_size, max_queue_delay_us, preferred batch sizes, instance count, compute
threads per instance (onnxruntime intra-op or the native kernels'), onnxruntime inter-op
threads, CPU pinning, and on a machine with a GPU the device. Each configuration's capacity
is the highest Poisson arrival rate whose p99 meets the objective with errors under 0.1%
(find-peak with short probes, conveyor.profile.profile_trials); memory breaks near-ties.

`--search quick` (the default) calibrates a cost model from compute time per batch size,
then hill-climbs from its best predictions within 10% of the space; `--search exhaustive`
measures every configuration. One short trial is noisy and the best of many noisy values is
biased upward, so the search's `--finalists` best and the model's own configuration are
measured `--repetitions` times more: the highest mean wins, reported with its 95% interval. Written to --out: the
recommended config.toml (the model's own file with the winning knobs), profile.json (every
trial, the Pareto set of capacity, p99 and memory, how much each knob mattered), and
checkpoint.jsonl, from which an interrupted run resumes without repeating a trial.

Exit status: 0 a recommendation was written; 1 the profile failed (the message says why);
2 a usage error or bad input; 4 no configuration met the objective (the closest are named,
with how far they missed and what to relax); 130 interrupted (run it again to resume).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conveyor.cli_values import choice, env, positive_float, positive_int, run_verb
from conveyor.errors import ConveyorError
from conveyor.toml_text import toml_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OBJECTIVE, EXIT_INTERRUPTED = 0, 1, 2, 4, 130
CHECKPOINT_NAME = "checkpoint.jsonl"
FAILED_SCORE = -1e9  # a trial that failed, crashed or timed out: below any configuration that ran
CHECKPOINT_FORMAT = "conveyor-profile-checkpoint"
SEARCH_CHOICES = ("quick", "exhaustive")
EPILOG = (
    "Every flag can also be set by an environment variable: CONVEYOR_ and the flag's name in capitals with dashes "
    "as underscores (--slo-p99-ms: CONVEYOR_SLO_P99_MS); a flag given on the command line wins. Knobs: backend, "
    "device, max_batch_size, max_queue_delay_us, preferred_batch_sizes (none, half, quarter), instance_count, "
    "threads, inter_op_threads, pinning (none, cores); --set KNOB=V1,V2 searches those values, --set KNOB=V fixes "
    "one. Exit status: 0 a recommendation was written; 1 the profile failed; 2 a usage error or bad input; 4 no "
    "configuration met the objective (the closest are named); 130 interrupted (run the same command to resume)."
)


class ProfileError(Exception):
    """A profile that cannot go on; the message says what was wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"expected a number between 0 and 1, got {value}")
    return value


# ---------------------------------------------------------------- the parser


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        default=env("model", None),
        help="the model to profile (env CONVEYOR_MODEL)",
    )
    p.add_argument(
        "--repository",
        type=Path,
        metavar="DIR",
        default=env("repository", None, Path),
        help="the model repository holding MODEL (default: the bundled examples)",
    )
    p.add_argument(
        "--model-version",
        type=positive_int,
        default=env("model-version", None, positive_int),
        help="the version to profile (default: the newest)",
    )
    p.add_argument(
        "--slo-p99-ms",
        type=positive_float,
        default=env("slo-p99-ms", None, positive_float),
        help="the p99 latency objective in milliseconds (required)",
    )
    searches = choice(SEARCH_CHOICES)
    p.add_argument(
        "--search",
        type=searches,
        default=env("search", "quick", searches),
        help="quick (default: cost model, then a hill climb within --max-trials) or exhaustive "
        "(every configuration of the space)",
    )
    p.add_argument(
        "--max-trials",
        type=positive_int,
        default=env("max-trials", None, positive_int),
        help="quick search's trial budget (default: 10%% of the space, at least 8)",
    )
    space = p.add_argument_group("the space and its constraints")
    space.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KNOB=V[,V...]",
        default=env("set", None, lambda text: text.split(";")),
        help="search these values of a knob (one value fixes it), e.g. --set max_batch_size=16,32 "
        "--set backend=onnx; repeatable (env: ';' between settings)",
    )
    space.add_argument(
        "--max-instances",
        type=positive_int,
        default=env("max-instances", None, positive_int),
        help="at most this many instances",
    )
    space.add_argument(
        "--max-threads",
        type=positive_int,
        default=env("max-threads", None, positive_int),
        help="at most this many compute threads in all (instances x threads; default: 2 per CPU)",
    )
    space.add_argument(
        "--max-memory-mb",
        type=positive_float,
        default=env("max-memory-mb", None, positive_float),
        help="configurations whose memory (peak RSS growth while loaded and under load) passes this are infeasible",
    )
    trials = p.add_argument_group("trials")
    trials.add_argument(
        "--probe-duration-s",
        type=positive_float,
        default=env("probe-duration-s", 0.3, positive_float),
        help="each find-peak probe's minimum duration (default 0.3; a trial runs several)",
    )
    trials.add_argument(
        "--min-queries",
        type=positive_int,
        default=env("min-queries", 200, positive_int),
        help="each probe's minimum query count (default 200)",
    )
    trials.add_argument(
        "--precision",
        type=_fraction,
        default=env("precision", 0.05, _fraction),
        help="find-peak's relative precision per trial (default 0.05)",
    )
    trials.add_argument("--trial-timeout-s", type=positive_float, default=env("trial-timeout-s", 120.0,
                        positive_float), help="a trial still running after this long is stopped and recorded as "
                        "timed out (default 120)")  # fmt: skip
    trials.add_argument(
        "--repetitions",
        type=positive_int,
        default=env("repetitions", 3, positive_int),
        help="times the winner and the model's own configuration are measured again for their "
        "95%% intervals (default 3)",
    )
    trials.add_argument(
        "--finalists",
        type=positive_int,
        default=env("finalists", 3, positive_int),
        help="the best configurations of the search measured --repetitions times more; the highest mean wins "
        "(default 3)",
    )
    trials.add_argument("--seed", type=int, default=env("seed", 0, int), help="base seed (default 0)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=env("out", None, Path),
        help="where the recommendation, the report and the checkpoint go (default: profile-MODEL)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard the checkpoint in --out and start over",
    )


def register_profile_commands(subparsers: Any) -> None:
    """Adds `conveyor profile` to the top-level parser's subcommands."""
    p = subparsers.add_parser(
        "profile", help="search the batching and threading configuration that serves most under a p99 objective",
        description="Search MODEL's configuration (backend, batching, instances, threads, pinning) for the highest "
        "capacity under --slo-p99-ms: Poisson arrivals, p99 counted from each request's scheduled time, errors "
        "under 0.1%%. Writes the recommended config.toml, the Pareto set and how much each knob mattered; "
        "interrupted runs resume from the checkpoint in --out.",
        epilog=EPILOG,
    )  # fmt: skip
    _add_arguments(p)
    p.set_defaults(run=run_profile)


def main(argv: list[str] | None = None) -> int:
    """`conveyor profile` on its own: parses `argv` and runs it, returning the exit status."""
    return run_verb(register_profile_commands, "profile", argv)


# ---------------------------------------------------------------- the checkpoint


class Checkpoint:
    """checkpoint.jsonl: a header naming what is profiled, then calibration and trial lines, flushed as written."""

    def __init__(self, path: Path, header: dict[str, Any], *, fresh: bool) -> None:
        self.path = path
        self.calibration: list[list[Any]] | None = None
        self.records: list[Any] = []
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            self._read(header)
        else:
            self._append({"kind": "header", **header})

    def _read(self, header: dict[str, Any]) -> None:
        from conveyor.profile.profile_trials import TrialRecord

        lines = self.path.read_text(encoding="utf-8").splitlines()
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # a line cut short by an interruption: the trial runs again
                    break
                raise ProfileError(f"{self.path}, line {number}: not a checkpoint line; pass --fresh to start over")
        saved = entries[0] if entries else {}
        if saved.get("kind") != "header" or saved.get("format") != CHECKPOINT_FORMAT:
            raise ProfileError(f"{self.path} is not a conveyor profile checkpoint: pass --fresh, or another --out")
        differing = sorted(key for key in header if saved.get(key) != header[key])
        if differing:
            raise ProfileError(f"{self.path} was written for a different profile (it differs in "
                               f"{', '.join(differing)}): pass --fresh to start over, or another --out")  # fmt: skip
        for entry in entries[1:]:
            if entry.get("kind") == "calibration":
                self.calibration = entry["rows"]
            elif entry.get("kind") == "trial":
                self.records.append(TrialRecord.from_document(entry["record"]))
        with self.path.open("w", encoding="utf-8") as file:  # drop a cut-short last line before appending
            for entry in entries:
                file.write(json.dumps(entry) + "\n")

    def _append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(_plain(entry)) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def save_calibration(self, rows: list[list[Any]]) -> None:
        self.calibration = rows
        self._append({"kind": "calibration", "rows": rows})

    def save(self, record: Any) -> None:
        self.records.append(record)
        self._append({"kind": "trial", "record": record.document()})

    def find(self, key: str, purpose: str, seed: int | None = None) -> Any:
        for record in self.records:
            if record.key == key and record.purpose == purpose and (seed is None or record.seed == seed):
                return record
        return None


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities as null, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ---------------------------------------------------------------- progress


@contextmanager
def progress_display(total: int, stream: Any = None) -> Iterator[Callable[[str, int], None]]:
    """A progress callback (what ran, trials done): a rich bar with ETA on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        printed = [0]

        def line(text: str, done: int) -> None:  # one line per finished trial
            if done > printed[0]:
                printed[0] = done
                print(f"  [{done}/{total}] {text}", file=stream, flush=True)

        yield line
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,  # fmt: skip
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=Console(file=stream)) as progress:
        task = progress.add_task("profiling", total=total)
        yield lambda text, done: progress.update(task, description=text[:60], completed=done)


# ---------------------------------------------------------------- the profile


class Profiler:
    """Runs the search over a TrialRunner, recording every trial in the checkpoint (and reusing recorded ones)."""

    def __init__(self, args: argparse.Namespace, model: Any, space: Any, runner: Any, checkpoint: Checkpoint,
                 cost_model: Any, say: Callable[[str, int], None]) -> None:  # fmt: skip
        self.args, self.model, self.space, self.runner = args, model, space, runner
        self.checkpoint, self.cost_model, self.say = checkpoint, cost_model, say
        self.trials_done = 0

    def seed_for(self, key: str, purpose: str, repetition: int = 0) -> int:
        from conveyor.profile.scenarios import derive_seed

        digest = zlib.crc32(f"{purpose}:{key}".encode())
        return derive_seed(self.args.seed, digest * 16 + repetition, "schedule")

    def start_rate(self, configuration: dict[str, Any]) -> float | None:
        """The cost model's prediction, scaled by how far its predictions were from the trials measured so far."""
        if not configuration:
            return None
        predicted = self.cost_model.predict(configuration)
        ratios = sorted(
            r.capacity_qps / self.cost_model.predict(r.configuration)
            for r in self.checkpoint.records
            if r.status == "ok" and r.configuration and self.cost_model.predict(r.configuration) > 0
        )
        scale = ratios[len(ratios) // 2] if ratios else 1.0
        return predicted * scale if predicted > 0 else None

    def measure(self, configuration: dict[str, Any], purpose: str, repetition: int = 0) -> Any:
        """The configuration's record: from the checkpoint when it was measured before, else a new trial."""
        from conveyor.profile.search import configuration_key

        key = configuration_key(configuration)
        seed = self.seed_for(key, purpose, repetition)
        record = self.checkpoint.find(key, purpose, seed)
        if record is None:
            self.say(f"{purpose}: {key or 'the model as configured'}", self.trials_done)
            record = self.runner.run(configuration, seed, self.start_rate(configuration), purpose)
            self.checkpoint.save(record)
        self.trials_done += 1
        self.say(f"{purpose}: {_record_text(record)}", self.trials_done)
        return record

    def score(self, record: Any) -> float:
        """The search's score: the capacity; at most -1 for a miss, the nearer the closer to -1; -1e9 a failure.

        A miss: the lowest p99 over the objective (-p99 / objective), or memory over
        --max-memory-mb (-memory / limit), so the climb heads toward what would fit.
        """
        limit = self.args.max_memory_mb
        if limit is not None and record.memory_mb is not None and record.memory_mb > limit:
            return -record.memory_mb / limit
        if record.status == "ok":
            return record.capacity_qps
        if record.status == "unmet" and record.best_p99_ms is not None:
            return -record.best_p99_ms / self.args.slo_p99_ms
        return FAILED_SCORE

    def search(self) -> Any:
        from conveyor.profile.search import exhaustive_search, quick_search

        def evaluate(configuration: dict[str, Any]) -> float:
            return self.score(self.measure(configuration, "search"))

        if self.args.search == "exhaustive":
            return exhaustive_search(self.space, evaluate, self.cost_model.predict)
        return quick_search(
            self.space,
            evaluate,
            self.cost_model.predict,
            max_trials=self.args.max_trials,
        )

    def repeat(self, configuration: dict[str, Any], purpose: str) -> list[Any]:
        return [self.measure(configuration, purpose, repetition) for repetition in range(self.args.repetitions)]


def _record_text(record: Any) -> str:
    if record.status == "ok":
        return f"{record.capacity_qps:,.0f} queries/s at p99 {record.p99_ms:.2f} ms ({record.seconds:.1f} s)"
    if record.status == "unmet":
        return f"met at no rate (lowest p99 {_ms(record.best_p99_ms)})"
    return f"{record.status}: {record.error}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def detect_gpu() -> bool:
    """True when onnxruntime can use CUDA and nvidia-smi lists a GPU: never on a CPU-only host."""
    try:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return False
    except ImportError:
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def allowed_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def calibration_keys(space: Any) -> list[tuple[str, str, int]]:
    """(backend, device, threads) combinations the cost model needs compute times for."""
    keys = {(c["backend"], c["device"], c["threads"]) for c in space.configurations()}
    return sorted(keys)


def make_runner(model: Any, settings: Any) -> Any:
    """The trial runner (a worker process running trials in-process); tests replace it with a simulated one."""
    from conveyor.profile.profile_trials import TrialRunner

    return TrialRunner(model, settings)


def profile(args: argparse.Namespace) -> int:
    """Runs the profile the flags describe and writes its outputs; returns the exit status."""
    from conveyor.examples import example_repository
    from conveyor.profile.fingerprint import config_sha256, file_sha256
    from conveyor.profile.profile_trials import (
        TrialSettings,
        cost_model_from,
        describe_model,
    )
    from conveyor.profile.search import SpaceError, build_space

    if args.model is None:
        raise ProfileError("MODEL is required: pass the model's name (or set CONVEYOR_MODEL)")
    if args.slo_p99_ms is None:
        raise ProfileError("--slo-p99-ms is required: the p99 latency objective in milliseconds")
    repository = args.repository or example_repository()
    model = describe_model(repository, args.model, args.model_version)
    cpus, gpu = allowed_cpus(), detect_gpu()
    try:
        space = build_space(backends=model.backends, cpus=cpus, model_max_batch_size=model.max_batch_size,
                            slo_p99_ms=args.slo_p99_ms, gpu=gpu, overrides=args.overrides or (),
                            max_instances=args.max_instances, max_threads=args.max_threads,
                            unavailable=model.unavailable)  # fmt: skip
    except SpaceError as exc:
        raise ProfileError(str(exc)) from None
    settings = TrialSettings(slo_p99_ms=args.slo_p99_ms, probe_duration_s=args.probe_duration_s,
                             min_queries=args.min_queries, precision=args.precision,
                             timeout_s=args.trial_timeout_s)  # fmt: skip
    out = args.out or Path(f"profile-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    header = {"format": CHECKPOINT_FORMAT, "model": model.name, "version": model.version,
              "model_sha256": file_sha256(_model_file(model)),
              "config_sha256": config_sha256(model.config_data), "slo_p99_ms": args.slo_p99_ms,
              "settings": _plain({k: v for k, v in vars(settings).items() if k != "slo_p99_ms"}), "seed": args.seed,
              "cpus": cpus}  # fmt: skip
    checkpoint = Checkpoint(out / CHECKPOINT_NAME, header, fresh=args.fresh)
    runner = make_runner(model, settings)
    started = time.monotonic()
    try:
        if checkpoint.calibration is None:
            checkpoint.save_calibration(runner.calibrate(calibration_keys(space), max(space.values["max_batch_size"])))
        cost_model = cost_model_from(checkpoint.calibration, args.slo_p99_ms, cpus)
        size = len(space.configurations())
        from conveyor.profile.search import default_budget

        budget = size if args.search == "exhaustive" else min(size, args.max_trials or default_budget(size))
        with progress_display(budget + (args.finalists + 1) * args.repetitions) as say:
            profiler = Profiler(args, model, space, runner, checkpoint, cost_model, say)
            log = profiler.search()
            report = _finish(profiler, log, time.monotonic() - started)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(checkpoint.records)} trials are saved in {checkpoint.path}; run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    finally:
        runner.close()
    return _write_outputs(args, model, out, report)


def _model_file(model: Any) -> Path:
    from conveyor.backends import model_file_path

    return model_file_path(model.config_data["backend"], model.version_dir)


def _finish(profiler: Profiler, log: Any, search_seconds: float) -> dict[str, Any]:
    """Re-measures the search's finalists and the model's own configuration; the report's document.

    The winner is the finalist with the highest mean capacity over its repetitions (memory
    breaks near-ties), not the highest single search trial.
    """
    from conveyor.profile.search import Scored, choose_winner, configuration_key, finalists, knob_effects, pareto_front
    from conveyor.profile.statistics import summarize_repetitions

    records = [profiler.checkpoint.find(configuration_key(c), "search") for c, _ in log.trials]
    scored = [Scored(r.configuration, max(0.0, profiler.score(r)), r.p99_ms, r.memory_mb) for r in records]
    winner = choose_winner(scored)
    args = profiler.args
    report: dict[str, Any] = {
        "model": profiler.model.name, "version": profiler.model.version, "slo_p99_ms": args.slo_p99_ms,
        "search": args.search, "space_size": len(profiler.space.configurations()),
        "space": {name: list(values) for name, values in profiler.space.values.items()},
        "constraints": {"max_instances": profiler.space.max_instances,
                        "max_compute_threads": profiler.space.max_compute_threads,
                        "max_memory_mb": args.max_memory_mb},
        "calibration": profiler.checkpoint.calibration, "trials": [r.document() for r in records],
        "winner": None, "baseline": None, "pareto": [], "knob_effects": [], "closest": [],
    }  # fmt: skip
    if winner is None:
        report["closest"] = _closest(records, args.slo_p99_ms)
        over_memory = [r.memory_mb for r in records if r.status == "ok" and r.memory_mb is not None]
        report["least_memory_mb_meeting_objective"] = min(over_memory, default=None)
        report["seconds"] = search_seconds
        return report
    confirmed = []
    for candidate in finalists(scored, args.finalists):
        summary = _summary(profiler.repeat(candidate.configuration, "rerun"), summarize_repetitions)
        confirmed.append((candidate, summary))
    baseline = profiler.repeat({}, "baseline")
    report["finalists"] = [{"configuration": c.configuration, "search_capacity_qps": c.capacity_qps, **summary}
                           for c, summary in confirmed]  # fmt: skip
    remeasured = [Scored(c.configuration, summary["capacity_qps"] or 0.0, c.p99_ms, _mean(summary["memory_mb"]))
                  for c, summary in confirmed]  # fmt: skip
    chosen = choose_winner(remeasured)
    report["seconds"] = search_seconds
    report["trial_count"] = {"search": len(log.trials), "rerun": len(confirmed) * args.repetitions,
                             "baseline": len(baseline)}  # fmt: skip
    report["baseline"] = _summary(baseline, summarize_repetitions)
    if chosen is None:  # every finalist missed the objective when measured again
        report["unconfirmed"] = True
        report["closest"] = _closest(records, args.slo_p99_ms)
        return report
    summary = next(summary for c, summary in confirmed if c.configuration == chosen.configuration)
    winner = next(c for c, _ in confirmed if c.configuration == chosen.configuration)
    report["winner"] = {"configuration": winner.configuration, "search_capacity_qps": winner.capacity_qps,
                        "memory_mb": chosen.memory_mb, **summary}  # fmt: skip
    report["pareto"] = [{"configuration": s.configuration, "capacity_qps": s.capacity_qps, "p99_ms": s.p99_ms,
                         "memory_mb": s.memory_mb} for s in pareto_front(scored)]  # fmt: skip
    report["knob_effects"] = [{"knob": e.knob, "spread": e.spread, "values": [[v, c] for v, c in e.values]}
                              for e in knob_effects(winner, scored)]  # fmt: skip
    return report


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None


def _summary(records: list[Any], summarize: Callable[[list[float]], Any]) -> dict[str, Any]:
    capacities = [r.score for r in records]
    stats = summarize(capacities)
    failures = [f"{r.status}: {r.error}" for r in records if r.status not in ("ok", "unmet")]
    return {"capacity_qps": stats.mean, "ci95": list(stats.ci95) if stats.ci95 else None, "cv": stats.cv,
            "capacities_qps": capacities, "p99_ms": [r.p99_ms for r in records],
            "memory_mb": [r.memory_mb for r in records], "failures": failures}  # fmt: skip


def _closest(records: list[Any], slo_ms: float) -> list[dict[str, Any]]:
    """The configurations whose lowest p99 came nearest the objective, with how far over it they stayed."""
    near = sorted((r for r in records if r.status == "unmet" and r.best_p99_ms is not None),
                  key=lambda r: r.best_p99_ms)[:3]  # fmt: skip
    return [{"configuration": r.configuration, "best_p99_ms": r.best_p99_ms, "at_rate_qps": r.lowest_rate_qps,
             "miss": r.best_p99_ms / slo_ms - 1, "status": r.status} for r in near]  # fmt: skip


# ---------------------------------------------------------------- outputs


def recommended_config_text(model: Any, report: dict[str, Any]) -> str:
    """The model's own config.toml with the winning knobs, checked to parse as a model config."""
    import tomllib

    from conveyor.config import parse_model_config
    from conveyor.profile.profile_trials import apply_knobs

    winner = report["winner"]
    data = apply_knobs(model.file_data, winner["configuration"])
    interval = winner["ci95"]
    header = [
        f"# Recommended by `conveyor profile` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} for p99 <= "
        f"{report['slo_p99_ms']:g} ms: {winner['capacity_qps']:,.0f} queries/s"
        + (f" (95% interval {interval[0]:,.0f} to {interval[1]:,.0f})" if interval else "")
        + f"; the configuration before: {report['baseline']['capacity_qps']:,.0f} queries/s.",
        f"# The winning knobs: {_knobs_text(winner['configuration'])}. Comments of the original file are not kept.",
    ]
    text = "\n".join(header) + "\n\n" + toml_text(data)
    parse_model_config(tomllib.loads(text), source="the recommended config.toml", name=model.name)
    return text


def _knobs_text(configuration: Mapping[str, Any], only: Any = None) -> str:
    """`knob value, ...` (only the knobs named in `only`, when given)."""
    shown = [(name, value) for name, value in configuration.items() if only is None or name in only]
    return ", ".join(f"{name} {value}" for name, value in shown) or "as configured"


def _varying(report: Mapping[str, Any]) -> list[str]:
    return [name for name, values in report["space"].items() if len(values) > 1]


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    """What `conveyor profile` prints: the winner against the configuration before, the Pareto set, the why."""
    trials = report["trials"]
    failed = [t for t in trials if t["status"] in ("failed", "crashed", "timed out")]
    lines = [
        f"{report['model']} v{report['version']}, p99 <= {report['slo_p99_ms']:g} ms: {len(trials)} of "
        f"{report['space_size']} configurations measured ({report['search']} search) in "
        f"{report['seconds']:.0f} s" + (f"; {len(failed)} failed and were skipped" if failed else "")
    ]
    winner, baseline = report["winner"], report["baseline"]
    varying = _varying(report)
    fixed = {name: values[0] for name, values in report["space"].items() if name not in varying}
    lines.append(
        f"recommended: {_knobs_text(winner['configuration'], varying)}"
        + (f" (fixed: {_knobs_text(fixed)})" if fixed else "")
    )
    lines.append(
        f"  capacity {_interval_text(winner)}; the configuration before: {_interval_text(baseline)}"
        + (f" (x{winner['capacity_qps'] / baseline['capacity_qps']:.2f})" if baseline["capacity_qps"] else "")
    )
    lines.append("Pareto set (capacity, p99 at capacity, memory):")
    for point in report["pareto"][:8]:
        lines.append(
            f"  {point['capacity_qps']:>10,.0f} queries/s  {_ms(point['p99_ms']):>9}  "
            f"{_mb(point['memory_mb']):>8}  {_knobs_text(point['configuration'], varying)}"
        )
    lines.append("why (capacity spread when one knob varies around the winner, as a share of its capacity):")
    for effect in report["knob_effects"]:
        if effect["spread"] is None:
            continue
        values = ", ".join(f"{value}: {capacity:,.0f}" for value, capacity in effect["values"])
        lines.append(f"  {effect['knob']:<22} {effect['spread']:>6.0%}  ({values})")
    lines.append(f"wrote {out / 'config.toml'} and {out / 'profile.json'}")
    return lines


def _interval_text(summary: Mapping[str, Any]) -> str:
    interval = summary.get("ci95")
    text = f"{summary['capacity_qps']:,.0f} queries/s"
    return text + (f" (95% interval {interval[0]:,.0f} to {interval[1]:,.0f})" if interval else "")


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} MB"


def unmet_message(report: dict[str, Any]) -> str:
    """No configuration met the objective: the closest, by how much they missed, and what to relax."""
    slo = report["slo_p99_ms"]
    closest = report["closest"]
    least_memory = report.get("least_memory_mb_meeting_objective")
    if least_memory is not None:
        limit = report["constraints"]["max_memory_mb"]
        return (f"every configuration measured that met p99 <= {slo:g} ms used more memory than --max-memory-mb "
                f"{limit:g} (the least: {least_memory:.1f} MB): raise --max-memory-mb, or fix smaller knobs with --set "
                "(max_batch_size, instance_count)")  # fmt: skip
    if report.get("unconfirmed"):
        return (f"the search's best configurations met p99 <= {slo:g} ms once but not when measured again: the "
                "machine may be too busy for steady measurements (run it on an idle machine, or with longer "
                "--probe-duration-s), or relax --slo-p99-ms")  # fmt: skip
    if not closest:
        return (
            f"no configuration met p99 <= {slo:g} ms, and none gave a latency to compare (every trial failed: "
            "see profile.json's trials for the errors)"
        )
    lines = [f"no configuration met p99 <= {slo:g} ms with errors under 0.1% at any rate; the closest:"]
    for entry in closest:
        lines.append(
            f"  p99 {entry['best_p99_ms']:.2f} ms ({entry['miss']:.0%} over) at "
            f"{entry['at_rate_qps'] or 0:,.1f} queries/s: {_knobs_text(entry['configuration'], _varying(report))}"
        )
    needed = math.ceil(closest[0]["best_p99_ms"] * 1.2 * 10) / 10
    lines.append(
        f"relax the objective (e.g. --slo-p99-ms {needed:g}), or widen the space with --set (smaller "
        "max_batch_size, no queue delay, more instances)"
    )
    return "\n".join(lines)


def _write_outputs(args: argparse.Namespace, model: Any, out: Path, report: dict[str, Any]) -> int:
    report["command"] = ["conveyor", "profile", *getattr(args, "argv", [])]
    (out / "profile.json").write_text(json.dumps(_plain(report), indent=2) + "\n", encoding="utf-8")
    if report["winner"] is None:
        print(f"conveyor profile: {unmet_message(report)}", file=sys.stderr)
        return EXIT_OBJECTIVE
    (out / "config.toml").write_text(recommended_config_text(model, report), encoding="utf-8")
    print("\n".join(summary_lines(report, out)))
    return EXIT_OK


def run_profile(args: argparse.Namespace) -> int:
    """The verb's entry point: runs `profile`, printing any error with what to do; returns the exit status."""
    from conveyor.errors import ConfigError, ModelNotFound

    try:
        return profile(args)
    except ProfileError as exc:
        message, code = str(exc), exc.exit_code
    except (ConfigError, ModelNotFound) as exc:
        message, code = str(exc), EXIT_USAGE
    except ConveyorError as exc:
        message, code = f"the profile failed: {exc}", EXIT_FAILED
    print(f"conveyor profile: error: {message}", file=sys.stderr)
    return code
