"""bench/soak.sh end to end, briefly: its positive control (a model that leaks 256 KiB a request)
must fail the memory-growth verdict, with every kind of load sent and answered as expected.

The full 30-minute soak (a pass on the example models) is a script, not a test: see bench/soak.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import conveyor
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "bench" / "soak.sh"


@pytest.mark.skipif(shutil.which("curl") is None, reason="bench/server_control.sh waits for readiness with curl")
def test_the_soak_flags_a_leaking_model_and_sends_every_kind_of_load(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(Path(conveyor.__file__).resolve().parents[1])
    env["PYTHON"] = sys.executable
    command = [
        str(SOAK), "--leaky", "--leak-bytes-per-request", str(256 * 1024), "--out", str(tmp_path),
        "--duration-s", "16", "--sample-s", "1", "--reload-every-s", "4",
    ]  # fmt: skip
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr
    assert done.returncode == 1, report
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    # the leak (about 2 MiB a second) is what fails: nothing else went wrong
    assert not verdict["memory"]["passed"] and verdict["memory"]["slope_mib_per_10_min"] > 100, report
    assert verdict["failures"] == 0 and verdict["live_at_end"], report
    kinds = {key.split(" ")[0] for key in verdict["requests"]}
    assert {"http_infer", "grpc_infer", "http_cancelled", "grpc_cancelled", "metrics", "reload"} <= kinds, report
    assert any(k.startswith("http_malformed_") for k in kinds) and any(k.startswith("grpc_malformed_") for k in kinds)
    assert "VERDICT: FAIL" in done.stdout
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")
