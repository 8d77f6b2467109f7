"""CONVEYOR_EXPECT_CUDA=1 turns a skipped gpu test into a failure (the hook in conftest.py).

Runs pytest in a subprocess on a generated test file, beside a copy of this directory's
conftest.py, with and without the variable, and reads each test's outcome from the
JUnit XML report. Needs no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

GENERATED_TESTS = '''
import pytest


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="CuPy is not installed")
def test_gpu_skipped_by_a_mark():
    pass


@pytest.mark.gpu
def test_gpu_skipped_in_its_body():
    pytest.skip("no CUDA device is visible")


@pytest.mark.gpu
def test_gpu_that_runs():
    pass


@pytest.mark.skipif(True, reason="not a gpu test")
def test_cpu_skipped():
    pass


@pytest.mark.gpu
@pytest.mark.xfail(reason="a known gpu bug", strict=True)
def test_gpu_expected_to_fail():
    raise AssertionError("the known bug")
'''

PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider --strict-markers
markers =
    gpu: needs a CUDA GPU
"""

TIMEOUT_S = 120.0  # a bound on the subprocess; it takes about a second


def _outcomes(tmp_path: Path, expect_cuda: bool) -> tuple[int, dict[str, tuple[str, str]]]:
    """Runs the generated tests; returns pytest's exit code and {test: (outcome, message)}."""
    work = tmp_path / ("expect" if expect_cuda else "plain")
    work.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), work / "conftest.py")
    (work / "pytest.ini").write_text(PYTEST_INI)
    (work / "test_generated.py").write_text(GENERATED_TESTS)
    environment = {name: value for name, value in os.environ.items() if name != "CONVEYOR_EXPECT_CUDA"}
    if expect_cuda:
        environment["CONVEYOR_EXPECT_CUDA"] = "1"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--junitxml", str(work / "report.xml"), "test_generated.py"],
        cwd=work, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    assert (work / "report.xml").exists(), completed.stdout + completed.stderr
    outcomes = {}
    for case in ElementTree.parse(work / "report.xml").iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                outcome, message = child.tag, (child.get("message") or "") + (child.text or "")
        outcomes[case.get("name")] = (outcome, message)
    return completed.returncode, outcomes


def test_without_the_variable_gpu_tests_skip(tmp_path: Path) -> None:
    returncode, outcomes = _outcomes(tmp_path, expect_cuda=False)
    assert returncode == 0, outcomes
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == {
        "test_gpu_skipped_by_a_mark": "skipped",
        "test_gpu_skipped_in_its_body": "skipped",
        "test_gpu_that_runs": "passed",
        "test_cpu_skipped": "skipped",
        "test_gpu_expected_to_fail": "skipped",  # JUnit's record of an xfail
    }


def test_with_the_variable_a_gpu_skip_fails_and_says_what_is_missing(tmp_path: Path) -> None:
    returncode, outcomes = _outcomes(tmp_path, expect_cuda=True)
    assert returncode == pytest.ExitCode.TESTS_FAILED, outcomes
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == {
        "test_gpu_skipped_by_a_mark": "error",  # the skipif mark acts in setup
        "test_gpu_skipped_in_its_body": "failure",
        "test_gpu_that_runs": "passed",
        "test_cpu_skipped": "skipped",  # only gpu tests are held to the expectation
        "test_gpu_expected_to_fail": "skipped",  # an xfail is not a skip
    }
    for name, missing in (("test_gpu_skipped_by_a_mark", "CuPy is not installed"),
                          ("test_gpu_skipped_in_its_body", "no CUDA device is visible")):
        message = outcomes[name][1]
        assert f"CONVEYOR_EXPECT_CUDA=1, but this gpu test skipped: {missing}." in message, message
        assert "unset CONVEYOR_EXPECT_CUDA" in message
