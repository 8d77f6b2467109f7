"""A bounded run of the request-decoder fuzzer (tests/fuzz_decoders.py) against the AddressSanitizer core.

The harness decodes each fuzzed HTTP body or gRPC message as the servers do, serves it
through the data plane into the compiled core (batcher, gather, Python and native-kernel
models) and encodes the answer. It runs in a child interpreter set up by
sanitizer_build.sanitized_fuzzer (the build test_sanitized_bindings.py uses, with
atheris' libFuzzer preloaded so that coverage guides it), for a fixed number of runs from
a fixed seed: any sanitizer report, any exception other than a client error, or a seed
request that no longer succeeds fails the run. Longer runs: bench/fuzz_decoders_asan.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sanitizer_build import (
    REPO_ROOT,
    SANITIZER_REPORT_MARKERS,
    run,
    sanitized_fuzzer,
    sanitized_package_dir,
)

HARNESS = REPO_ROOT / "tests" / "fuzz_decoders.py"
DICTIONARY = REPO_ROOT / "tests" / "fuzz_decoders.dict"
RUNS = 20_000


@pytest.mark.slow
def test_fuzzed_requests_raise_only_client_errors_under_address_sanitizer(tmp_path: Path) -> None:
    env = sanitized_fuzzer()
    command = [sys.executable, str(HARNESS), str(tmp_path / "corpus"), f"-runs={RUNS}", "-seed=1",
               f"-dict={DICTIONARY}", "-max_len=4096", "-print_final_stats=1",
               f"-artifact_prefix={tmp_path}/"]  # fmt: skip
    output = run(command, "the request-decoder fuzzer under AddressSanitizer", env=env, timeout_s=600)
    assert not any(marker in output for marker in SANITIZER_REPORT_MARKERS), output[-20_000:]
    assert f"Done {RUNS} runs" in output, output[-20_000:]
    # Coverage reached libFuzzer (not the sanitizer runtime's no-op callbacks).
    assert "INITED cov: " in output and "Coverage symbols are being provided" not in output, output[-20_000:]
    assert f"conveyor._core from {sanitized_package_dir()}" in output, output[-20_000:]
