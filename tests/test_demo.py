"""python -m conveyor.demo, as the README suggests it: every bundled model runs, none fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conveyor

# The child imports the same conveyor as this test run: the installed package, or a
# source tree with an in-tree build (PYTHONPATH=python).
PACKAGE_PARENT = Path(conveyor.__file__).resolve().parents[1]
TIMEOUT_S = 300.0  # a bound on the subprocess; a healthy run takes a few seconds


def _run_demo(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "conveyor.demo", "--requests", "20", "--concurrency", "4", *arguments],
        env=environment, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )


def test_the_demo_runs_every_example_model_without_an_error() -> None:
    completed = _run_demo()
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "ERROR" not in output and "Traceback" not in output, output
    models = sorted(path.parent.name for path in conveyor.example_repository().glob("*/config.toml"))
    assert "churn" in models  # the monitored example: it needs the runtime with the learning loop
    lines = completed.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("model "))
    reported = [line.split()[0] for line in lines[header + 1 :] if line.strip()]
    assert reported == models, output  # one report line per model, none missing


def test_the_demo_keeps_captured_rows_in_the_data_dir_it_is_given(tmp_path: Path) -> None:
    completed = _run_demo("--data-dir", str(tmp_path))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "ERROR" not in completed.stdout + completed.stderr
    # The monitored example's learning loop set itself up there (its capture directory).
    assert (tmp_path / "churn").is_dir(), sorted(p.name for p in tmp_path.iterdir())
