"""`conveyor profile` on the example models: the recommendation against the model's own configuration, and
quick search against an exhaustive sweep of the same small space.

For each model (the example mlp and image_classifier, each with a p99 objective near a few
times its compute time per batch plus what a shared machine adds to a p99):

1. quick search over the default space: the recommended configuration's capacity (the search's
   three finalists re-measured --repetitions times, the best mean with its 95% interval) against
   the configuration the model ships with (measured as often), the trial count and the time taken;
2. a small space (24 configurations unless --small-space says otherwise), searched
   exhaustively and quickly, each run with fresh trials: quick's winner against the sweep's
   winner (both re-measured), and their trial counts.

Capacities are this machine's and load-dependent (a shared 2-CPU box is noisy): read the
ratios, each measured in the same run, with the intervals and the uptime load printed beside them. Usage:

    PYTHONPATH=python python bench/profile_quick_vs_exhaustive.py [--models mlp image_classifier]
        [--slo-p99-ms mlp=5 image_classifier=10] [--probe-duration-s 0.3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conveyor.profile.profile_cli import main as profile_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
DEFAULT_OBJECTIVES = {"mlp": 5.0, "image_classifier": 10.0}
# 2 backends x batch sizes 8/32/64 x 2 instance counts x delay 0 or 500 us (preferred sizes none): 24
SMALL_SPACE = ["backend=onnx,native", "max_batch_size=8,32,64", "instance_count=1,2", "max_queue_delay_us=0,500",
               "preferred_batch_sizes=none", "threads=1", "pinning=none"]  # fmt: skip


def run_profile(model: str, slo_ms: float, out: Path, extra: list[str]) -> tuple[dict[str, Any], float, int]:
    """One `conveyor profile` run; (its profile.json, seconds taken, exit status)."""
    argv = [
        model,
        "--repository",
        str(EXAMPLES),
        "--slo-p99-ms",
        str(slo_ms),
        "--out",
        str(out),
        "--fresh",
        *extra,
    ]
    started = time.monotonic()
    code = profile_main(argv)
    seconds = time.monotonic() - started
    report = json.loads((out / "profile.json").read_text()) if (out / "profile.json").exists() else {}
    return report, seconds, code


def capacity_text(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("capacity_qps") is None:
        return "—"
    interval = summary.get("ci95")
    text = f"{summary['capacity_qps']:,.0f}"
    return text + (f" [{interval[0]:,.0f}, {interval[1]:,.0f}]" if interval else "")


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not a.get("capacity_qps") or not b.get("capacity_qps"):
        return None
    return a["capacity_qps"] / b["capacity_qps"]


def measure_model(model: str, slo_ms: float, base: Path, common: list[str], small_space: list[str]) -> dict[str, Any]:
    sets = [item for knob in small_space for item in ("--set", knob)]
    quick, quick_s, quick_code = run_profile(model, slo_ms, base / f"{model}-quick", common)
    small_sweep, sweep_s, _ = run_profile(model, slo_ms, base / f"{model}-small-exhaustive",
                                          [*common, *sets, "--search", "exhaustive"])  # fmt: skip
    small_quick, small_quick_s, _ = run_profile(model, slo_ms, base / f"{model}-small-quick", [*common, *sets])
    return {
        "model": model, "slo_p99_ms": slo_ms, "exit_status": quick_code,
        "default_space": {"size": quick.get("space_size"), "trials": quick.get("trial_count"), "seconds": quick_s,
                          "winner": quick.get("winner"), "baseline": quick.get("baseline"),
                          "gain": ratio(quick.get("winner"), quick.get("baseline"))},
        "small_space": {"size": small_sweep.get("space_size"),
                        "exhaustive": {"trials": small_sweep.get("trial_count"), "seconds": sweep_s,
                                       "winner": small_sweep.get("winner")},
                        "quick": {"trials": small_quick.get("trial_count"), "seconds": small_quick_s,
                                  "winner": small_quick.get("winner")},
                        "quick_over_exhaustive": ratio(small_quick.get("winner"), small_sweep.get("winner"))},
    }  # fmt: skip


def report_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for result in results:
        default, small = result["default_space"], result["small_space"]
        trials = default["trials"] or {}
        lines += [
            f"## {result['model']} at p99 <= {result['slo_p99_ms']:g} ms",
            (
                f"- default space: {default['size']} configurations, quick search {trials.get('search')} trials "
                f"(+{trials.get('rerun')} re-runs of the 3 finalists, +{trials.get('baseline')} of the shipped config) in "
                f"{default['seconds']:.0f} s"
            ),
            f"- recommended: {capacity_text(default['winner'])} queries/s; shipped config: "
            f"{capacity_text(default['baseline'])} queries/s; ratio "
            + (f"{default['gain']:.2f}" if default["gain"] else "—"),
            f"  knobs: {json.dumps((default['winner'] or {}).get('configuration'))}",
            f"- small space ({small['size']} configurations): exhaustive {small['exhaustive']['trials']} in "
            f"{small['exhaustive']['seconds']:.0f} s -> {capacity_text(small['exhaustive']['winner'])}; quick "
            f"{small['quick']['trials']} in {small['quick']['seconds']:.0f} s -> "
            f"{capacity_text(small['quick']['winner'])}; quick / exhaustive "
            + (f"{small['quick_over_exhaustive']:.2f}" if small["quick_over_exhaustive"] else "—"),
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_OBJECTIVES))
    parser.add_argument(
        "--slo-p99-ms",
        nargs="*",
        default=[],
        metavar="MODEL=MS",
        help="objectives per model (default mlp=5 image_classifier=10)",
    )
    parser.add_argument("--probe-duration-s", default="0.3")
    parser.add_argument("--repetitions", default="3")
    parser.add_argument("--small-space", nargs="*", default=SMALL_SPACE, metavar="KNOB=VALUES")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="keep the profiles here (default: a temporary dir)",
    )
    args = parser.parse_args(argv)
    objectives = dict(DEFAULT_OBJECTIVES)
    for item in args.slo_p99_ms:
        name, _, value = item.partition("=")
        objectives[name] = float(value)
    common = [
        "--probe-duration-s",
        args.probe_duration_s,
        "--repetitions",
        args.repetitions,
    ]
    with tempfile.TemporaryDirectory(prefix="profile-bench-") as scratch:
        base = args.out or Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        results = [measure_model(model, objectives.get(model, 5.0), base, common, args.small_space)
                   for model in args.models]  # fmt: skip
    print("\n".join(report_lines(results)))
    print(f"load average at the end: {' '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print(
        json.dumps(results, indent=2, default=str),
        file=sys.stderr if args.out is None else sys.stdout,
    )
    if args.out is not None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
