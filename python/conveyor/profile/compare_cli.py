"""`conveyor compare BUNDLE...`: bench bundles side by side, priced, with a CI gate.

    conveyor compare base/ cand/ [--prices FILE] [--machine BUNDLE=NAME ...] [--markdown FILE] [--html FILE]
                     [--json FILE] [--fail-on-regression PCT] [--metric capacity|p99] [--allow-different-models]

The first bundle is the baseline. A few lines go to stdout (each bundle's value, each
candidate's ratios and verdicts); --markdown, --html and --json write the full reports. Exit
status: 0 done; 1 a candidate regressed beyond --fail-on-regression PCT with 95%
confidence (or failed its accuracy check); 2 the comparison could not be made as asked
(not a bundle, a newer bundle format, a price table without a bundle's machine, bundles
of different models, a gate that cannot judge). cli.py registers the verb
(`register_compare_commands`); `main` runs it alone (tests call it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from conveyor.cli_values import BadEnv, env, positive_int, run_verb
from conveyor.errors import ConveyorError

EXIT_REGRESSION, EXIT_USAGE = 1, 2
METRICS = ("capacity", "p99")
EPILOG = (
    "Every flag that takes one value can also be set by an environment variable: CONVEYOR_ and the flag's name in "
    "capitals with dashes as underscores (--prices: CONVEYOR_PRICES); --machine is given on the command line only. "
    "Exit status: 0 done; 1 a candidate regressed beyond "
    "--fail-on-regression (or failed its accuracy check); 2 bad input, or a gate that cannot judge."
)


class _BadValue(argparse.ArgumentTypeError, ValueError):
    """A flag value argparse shows with its message (and cli_values.env reports for an environment variable)."""


def percent(text: str) -> float:
    """A tolerance in percent: 0 to below 100."""
    try:
        value = float(text)
    except ValueError:
        raise _BadValue(f"expected a percentage from 0 to below 100, got {text!r}") from None
    if not 0.0 <= value < 100.0:
        raise _BadValue(f"expected a percentage from 0 to below 100, got {value:g}")
    return value


class CompareCommandError(Exception):
    """The comparison could not be made as asked; the message says why and what to do."""


def register_compare_commands(subparsers: Any) -> None:
    """Adds `conveyor compare` to the top-level parser's subcommands."""
    p = subparsers.add_parser(
        "compare",
        help="compare bench bundles: capacity, p99 and cost per 1,000 inferences, with 95%% intervals",
        description="Compare result bundles of 'conveyor bench' (the first is the baseline): capacity at the "
        "objective (or the summary metric when a bundle has no --find-peak capacity), the ratios of capacity and "
        "p99 against the baseline with seeded bootstrap 95% intervals and a verdict each (better, worse, "
        "indistinguishable), cost per 1,000 inferences from a price table, and the differences between the machines' "
        "fingerprints. Bundles of different models are refused; a bundle whose accuracy check failed is never ranked.",
        epilog=EPILOG,
    )
    add_compare_arguments(p)
    p.set_defaults(run=run_compare)


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", type=str,
                   help="bundle directories written by 'conveyor bench --out DIR'; the first is the baseline")
    p.add_argument("--prices", type=Path, metavar="FILE", default=env("prices", None, Path),
                   help="price table, TOML ([prices] NAME = {usd_per_hour, dated}) or CSV (machine,usd_per_hour,dated): "
                   "adds cost per 1,000 inferences (examples/prices/cloud_prices_2026.toml shows the format)")
    p.add_argument("--machine", action="append", default=[], metavar="BUNDLE=NAME",
                   help="the price table's name for a bundle's machine (repeatable); default: the bundle "
                   "fingerprint's system_name")
    p.add_argument("--markdown", type=Path, metavar="FILE", default=env("markdown", None, Path),
                   help="write the report as Markdown to FILE")
    p.add_argument("--html", type=Path, metavar="FILE", default=env("html", None, Path),
                   help="write the report as one self-contained HTML page with plots to FILE (needs matplotlib: "
                   "pip install 'conveyor-serve[profile]')")
    p.add_argument("--json", type=Path, metavar="FILE", default=env("json", None, Path),
                   help="write the comparison's numbers (values, intervals, verdicts, fingerprints) as JSON to FILE")
    p.add_argument("--fail-on-regression", type=percent, metavar="PCT",
                   default=env("fail-on-regression", None, percent),
                   help="exit 1 when a candidate's --metric is worse than the baseline's by more than PCT percent "
                   "with 95%% confidence, or its accuracy check failed (for CI pipelines)")
    p.add_argument("--metric", choices=METRICS, default=env("metric", "capacity"),
                   help="the metric --fail-on-regression judges: capacity (the compared metric: capacity at the "
                   "objective, or the summary metric) or p99 (default capacity)")
    p.add_argument("--allow-different-models", action="store_true",
                   help="compare bundles whose model hashes differ anyway (the report flags every comparison)")
    p.add_argument("--seed", type=int, default=env("seed", None, int),
                   help="the bootstrap's seed (default: a fixed one, so the same bundles give the same intervals)")
    p.add_argument("--resamples", type=positive_int, default=env("resamples", None, positive_int),
                   help="bootstrap resamples (default 10000)")


def _compare(args: argparse.Namespace) -> tuple[Any, list[str], list[str]]:
    from conveyor.profile.bundle import read_bundle
    from conveyor.profile.compare import (
        BOOTSTRAP_RESAMPLES,
        BOOTSTRAP_SEED,
        compare_bundles,
        parse_machine_mappings,
        read_price_table,
        regressions,
    )

    bundles = [(given, read_bundle(given)) for given in args.bundles]
    prices = read_price_table(args.prices) if args.prices is not None else None
    result = compare_bundles(bundles, prices=prices, machines=parse_machine_mappings(args.machine),
                             allow_different_models=args.allow_different_models,
                             seed=BOOTSTRAP_SEED if args.seed is None else args.seed,
                             resamples=args.resamples or BOOTSTRAP_RESAMPLES)  # fmt: skip
    found, unjudged = ([], [])
    if args.fail_on_regression is not None:
        if len(bundles) < 2:
            raise CompareCommandError("--fail-on-regression needs a baseline and at least one candidate bundle")
        found, unjudged = regressions(result, args.metric, args.fail_on_regression)
    return result, found, unjudged


def _write(path: Path, text: str, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CompareCommandError(f"cannot write the {what} to {path}: {exc.strerror or exc}; pass another path") from None


def run_compare(args: argparse.Namespace) -> int:
    """Runs `conveyor compare`: prints the verdicts, writes the reports, applies the gate; returns the exit status."""
    from conveyor.profile.compare_report import render_html, render_markdown, render_text, result_document, svg_count

    for value in vars(args).values():
        if isinstance(value, BadEnv):
            print(f"conveyor compare: error: {value.message}", file=sys.stderr)
            return EXIT_USAGE
    if args.metric not in METRICS:  # argparse checks choices on the command line, not an environment default
        print(f"conveyor compare: error: environment variable CONVEYOR_METRIC={args.metric!r} is not one of "
              f"{', '.join(METRICS)}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        started = time.perf_counter()
        result, found, unjudged = _compare(args)
        print(render_text(result))
        if args.markdown is not None:
            _write(args.markdown, render_markdown(result), "Markdown report")
            print(f"wrote the Markdown report to {args.markdown}")
        if args.json is not None:
            _write(args.json, json.dumps(result_document(result), indent=2, allow_nan=False) + "\n", "JSON report")
            print(f"wrote the comparison as JSON to {args.json}")
        if args.html is not None:
            page = render_html(result)
            _write(args.html, page, "HTML report")
            print(f"wrote the HTML report ({svg_count(page)} plots) to {args.html} in "
                  f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        if unjudged and not found:
            raise CompareCommandError(f"--fail-on-regression cannot judge {args.metric}: " + "; ".join(unjudged))
    except (ConveyorError, CompareCommandError) as exc:
        print(f"conveyor compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in found:
        print(f"conveyor compare: regression: {line}", file=sys.stderr)
    for line in unjudged:
        print(f"conveyor compare: warning: cannot judge {line}", file=sys.stderr)
    return EXIT_REGRESSION if found else 0


def main(argv: list[str] | None = None) -> int:
    """`conveyor compare` on its own: `argv` is the verb's arguments (default sys.argv[1:]), without "compare"."""
    return run_verb(register_compare_commands, "compare", argv)


if __name__ == "__main__":
    sys.exit(main())
