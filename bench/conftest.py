"""Shared benchmark plumbing for bench/.

- Collects ``bench_*.py`` files, so ``pytest bench --benchmark-enable`` runs them all
  (the default test run never looks here: testpaths is tests/).
- ``ratio_report``: every benchmark compares against a baseline measured in the same run.
  A test registers its finished ``benchmark`` as the candidate or the baseline of a named
  comparison; the end of the run prints both medians and their ratio per comparison.

    def test_fast(benchmark, ratio_report):
        benchmark.group = "sum 1k"
        benchmark(fast_sum, data)
        ratio_report.candidate("sum 1k", benchmark, label="fast_sum", goal_speedup=2.0)

    def test_numpy(benchmark, ratio_report):
        benchmark.group = "sum 1k"
        benchmark(np.sum, data)
        ratio_report.baseline("sum 1k", benchmark, label="np.sum")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # Files named on the command line are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if not parent.session.isinitpath(file_path):
            return pytest.Module.from_parent(parent, path=file_path)
    return None


@dataclass
class _Side:
    label: str
    median_s: float | None  # None: the benchmark did not time (e.g. --benchmark-disable)


@dataclass
class _Comparison:
    module: str
    candidate: _Side | None = None
    baseline: _Side | None = None
    goal_speedup: float | None = None  # baseline / candidate the candidate should reach
    calls: int | None = None  # calls per timed round: the report adds the difference per call


def _median_s(benchmark: Any) -> float | None:
    metadata = getattr(benchmark, "stats", None)
    return metadata.stats.median if metadata is not None else None


def _format_s(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


class RatioReport:
    """Candidate and baseline medians per named comparison, printed at the end of the run."""

    def __init__(self) -> None:
        self.comparisons: dict[str, _Comparison] = {}
        self.figures: dict[str, tuple[str, str]] = {}
        self.notes: list[str] = []  # printed after the comparisons, each once

    def note(self, text: str) -> None:
        """A line for the end of the run about what was measured (a converter's quirk, a skipped side)."""
        if text not in self.notes:
            self.notes.append(text)

    def _get(self, name: str, module: str) -> _Comparison:
        return self.comparisons.setdefault(name, _Comparison(module=module))

    def candidate(
        self,
        name: str,
        benchmark: Any,
        *,
        label: str = "candidate",
        goal_speedup: float | None = None,
        calls: int | None = None,
    ) -> None:
        """Records benchmark (already run) as the candidate; goal_speedup is baseline/candidate.

        `calls`: how many calls one timed round makes; the report then also prints the
        time the candidate adds per call, (candidate - baseline) / calls.
        """
        comparison = self._get(name, _module_of(benchmark))
        comparison.candidate = _Side(label, _median_s(benchmark))
        comparison.goal_speedup = goal_speedup
        comparison.calls = calls

    def baseline(self, name: str, benchmark: Any, *, label: str = "baseline") -> None:
        """Records benchmark (already run) as the baseline the candidate is compared with."""
        self._get(name, _module_of(benchmark)).baseline = _Side(label, _median_s(benchmark))

    def figure(self, name: str, text: str, *, module: str) -> None:
        """A figure a benchmark measured itself (e.g. paired timings from C++), printed as it is."""
        self.figures[name] = (module, text)

    def lines(self) -> list[str]:
        out = [f"{module}: {name}: {text}" for name, (module, text) in sorted(self.figures.items())]
        for name, c in sorted(self.comparisons.items(), key=lambda item: (item[1].module, item[0])):
            head = f"{c.module}: {name}:"
            if c.candidate is None or c.baseline is None:
                out.append(f"{head} incomplete (candidate or baseline did not run)")
                continue
            if c.candidate.median_s is None or c.baseline.median_s is None:
                out.append(f"{head} not timed (run with --benchmark-enable)")
                continue
            speedup = c.baseline.median_s / c.candidate.median_s
            line = (
                f"{head} {c.candidate.label} {_format_s(c.candidate.median_s)} vs "
                f"{c.baseline.label} {_format_s(c.baseline.median_s)} (medians): "
                f"speedup {speedup:.2f}x"
            )
            if c.calls:
                added_s = (c.candidate.median_s - c.baseline.median_s) / c.calls
                line += f", adds {added_s * 1e9:+.0f} ns per call"
            if c.goal_speedup is not None:
                verdict = "met" if speedup >= c.goal_speedup else "NOT met"
                line += f", goal >= {c.goal_speedup:.2f}x {verdict}"
            out.append(line)
        return out


def _module_of(benchmark: Any) -> str:
    fullname = getattr(benchmark, "fullname", "") or ""
    return Path(fullname.split("::", 1)[0]).name or "?"


_REPORT = pytest.StashKey[RatioReport]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = RatioReport()


@pytest.fixture(scope="session")  # one report per run; module fixtures may add notes to it
def ratio_report(request: pytest.FixtureRequest) -> RatioReport:
    return request.config.stash[_REPORT]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is None or not (report.comparisons or report.figures):
        return
    terminalreporter.section("candidate vs baseline, measured in this run")
    for line in report.lines():
        terminalreporter.write_line(line)
    for note in report.notes:
        terminalreporter.write_line(f"note: {note}")


@pytest.fixture(scope="module")
def loop() -> Any:
    """A uvloop event loop, as the servers run on: async benchmarks measure what they would see."""
    event_loop = uvloop.new_event_loop()
    yield event_loop
    event_loop.close()
