"""The C++ unit tests (cpp/tests), built and run under ThreadSanitizer and AddressSanitizer.

Each sanitizer gets its own CMake build directory under build/ in the source checkout, so
reruns are incremental. Needs cmake and ninja on PATH (the test extra installs both).
"""

from __future__ import annotations

import os

import pytest

from sanitizer_build import configure_and_build, require_source_checkout, run

SANITIZER_ENV = {
    "thread": {"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1"},
    "address": {
        "ASAN_OPTIONS": "detect_leaks=1",
        "UBSAN_OPTIONS": "print_stacktrace=1 halt_on_error=1",
    },
}


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_cpp_unit_tests_under_sanitizer(sanitizer: str) -> None:
    require_source_checkout()
    build_dir = configure_and_build(sanitizer, "conveyor_tests")
    binary = build_dir / "cpp" / "tests" / "conveyor_tests"
    env = {**os.environ, **SANITIZER_ENV[sanitizer]}
    output = run([str(binary)], f"conveyor_tests under {sanitizer} sanitizer", env=env, timeout_s=600)
    assert " 0 failed" in output, output[-20_000:]
