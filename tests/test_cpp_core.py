"""The C++ unit tests (cpp/tests), built and run under ThreadSanitizer and AddressSanitizer.

Each sanitizer gets its own CMake build directory under build/ in the source checkout, so
reruns are incremental. Needs cmake and ninja on PATH (the test extra installs both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_TAIL_CHARS = 20_000

SANITIZER_ENV = {
    "thread": {"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1"},
    "address": {
        "ASAN_OPTIONS": "detect_leaks=1",
        "UBSAN_OPTIONS": "print_stacktrace=1 halt_on_error=1",
    },
}
BUILD_DIRS = {"thread": "cpp-tests-tsan", "address": "cpp-tests-asan"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: install the test extra (pip install -e '.[test]')")
    return path


def _run(command: list[str], what: str, env: dict[str, str] | None = None, timeout_s: int = 1200) -> str:
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = result.stdout[-OUTPUT_TAIL_CHARS:]
    assert result.returncode == 0, f"{what} exited with {result.returncode}:\n{output}"
    return output


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_cpp_unit_tests_under_sanitizer(sanitizer: str) -> None:
    if not (REPO_ROOT / "cpp" / "tests" / "CMakeLists.txt").is_file():
        pytest.skip("not a source checkout: cpp/ is not next to tests/")
    cmake, ninja = _tool("cmake"), _tool("ninja")
    build_dir = REPO_ROOT / "build" / BUILD_DIRS[sanitizer]
    _run(
        [
            cmake,
            "-S",
            str(REPO_ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Debug",
            "-DCONVEYOR_BUILD_PYTHON=OFF",
            "-DCONVEYOR_BUILD_TESTS=ON",
            "-DCONVEYOR_CUDA=OFF",
            f"-DCONVEYOR_SANITIZER={sanitizer}",
        ],
        f"cmake configure ({sanitizer})",
    )
    _run([cmake, "--build", str(build_dir), "--target", "conveyor_tests"], f"build ({sanitizer})")
    binary = build_dir / "cpp" / "tests" / "conveyor_tests"
    env = {**os.environ, **SANITIZER_ENV[sanitizer]}
    output = _run([str(binary)], f"conveyor_tests under {sanitizer} sanitizer", env=env, timeout_s=600)
    assert " 0 failed" in output, output
