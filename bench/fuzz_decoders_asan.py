"""A long run of the request-decoder fuzzer (tests/fuzz_decoders.py) against the AddressSanitizer core.

    python bench/fuzz_decoders_asan.py [--seconds 600 | --runs N] [--seed 1] [--corpus DIR] [--log FILE]

Builds (or reuses) build/cpp-tests-asan as tests/test_fuzz_decoders.py does, then fuzzes
for the given time or number of runs and prints the figures to report: executions,
coverage (libFuzzer's cov and ft), corpus size, sanitizer reports and findings, with the
exact command. The corpus directory keeps what the run learned (default: a new temporary
one, seeded with valid requests); a finding's input is written to the current directory
as crash-<sha1>. Exits 1 if the run found anything.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from sanitizer_build import SANITIZER_REPORT_MARKERS, sanitized_fuzzer

HARNESS = REPO_ROOT / "tests" / "fuzz_decoders.py"
DICTIONARY = REPO_ROOT / "tests" / "fuzz_decoders.dict"
FINDING_MARKERS = (*SANITIZER_REPORT_MARKERS, "Uncaught Python exception", "ERROR: libFuzzer")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, default=600, help="fuzz this long (default 600)")
    budget.add_argument("--runs", type=int, help="fuzz this many inputs instead of a time")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed (default 1)")
    parser.add_argument("--corpus", type=Path, help="corpus directory to grow (default: a new temporary one)")
    parser.add_argument("--log", type=Path, help="also write the fuzzer's whole output here")
    return parser.parse_args()


def main() -> int:
    """Run the fuzzer once and print its figures; 1 if it found anything."""
    options = _arguments()
    env = sanitized_fuzzer()
    corpus = options.corpus or Path(tempfile.mkdtemp(prefix="fuzz-decoders-corpus-"))
    budget = f"-runs={options.runs}" if options.runs is not None else f"-max_total_time={options.seconds}"
    command = [sys.executable, str(HARNESS), str(corpus), budget, f"-seed={options.seed}", f"-dict={DICTIONARY}",
               "-max_len=4096", "-print_final_stats=1"]  # fmt: skip
    print("command:", " ".join(f"{key}={shlex.quote(env[key])}" for key in ("ASAN_OPTIONS", "LD_PRELOAD",
                                                                            "PYTHONMALLOC", "PYTHONPATH")),
          shlex.join(command), flush=True)  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall_s = time.monotonic() - started
    output = result.stdout
    if options.log is not None:
        options.log.write_text(output)
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", output)
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", output, flags=re.MULTILINE))
    findings = [line for line in output.splitlines() if any(marker in line for marker in FINDING_MARKERS)]
    print(f"exit status {result.returncode}, {wall_s:.0f} s wall")
    if done:
        runs, cov, ft, entries, size = done[-1]
        executed = int(stats.get("number_of_executed_units", runs))
        print(f"executions {executed} ({executed / wall_s:.0f}/s), cov {cov}, ft {ft}, corpus {entries} inputs "
              f"({size}) in {corpus}")
    print(f"sanitizer reports: {sum(output.count(marker) for marker in SANITIZER_REPORT_MARKERS)}")
    print(f"findings: {len(findings)}")
    for line in findings:
        print("  ", line)
    if result.returncode != 0 or findings:
        print(output[-20_000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
