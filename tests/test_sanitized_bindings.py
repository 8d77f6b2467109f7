"""The binding-heavy tests again, against an AddressSanitizer build of the extension.

Ownership bugs at the Python/C++ edge (a numpy view outliving its block, a BYTES element
read after its request dropped it, a completion delivered into a freed queue) rarely
crash an ordinary build: the pool caches freed blocks and CPython reuses freed objects.
Here conveyor._core is built with AddressSanitizer (+UBSan) in build/cpp-tests-asan, a
copy of the package around it, and the tests below run in a child interpreter with the
sanitizer runtime preloaded and PYTHONMALLOC=malloc, so every Python object is a heap
block ASan watches and cached pool blocks are poisoned. Any report fails the run.
"""

from __future__ import annotations

import sys

import pytest

from sanitizer_build import (
    REPO_ROOT,
    SANITIZER_REPORT_MARKERS,
    run,
    sanitized_package_dir,
    sanitized_python,
)

# The tests that cross the edge most: the runtime and its loop bridge, pipelines,
# BYTES through both protocols, failing models under load, abandoned event loops, and
# TreeEnsemble.run (a borrowed input, outputs sharing one block and one capsule).
SANITIZED_TESTS = [
    "tests/test_edge_ownership.py",
    "tests/test_runtime.py",
    "tests/test_pipeline_steps.py",
    "tests/test_native_backend.py",
    "tests/test_trees_backend.py",
]

@pytest.mark.slow
def test_binding_tests_pass_under_address_sanitizer() -> None:
    env = sanitized_python()
    command = [
        # --capture=sys: a sanitizer report goes to the real stderr, not a capture file.
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", "--rootdir", str(REPO_ROOT),
        "-c", str(REPO_ROOT / "pyproject.toml"), *SANITIZED_TESTS,
    ]  # fmt: skip
    output = run(command, "the binding tests under AddressSanitizer", env=env, timeout_s=1800)
    assert not any(marker in output for marker in SANITIZER_REPORT_MARKERS), output[-20_000:]
    assert " passed" in output and " failed" not in output, output[-20_000:]
    # The child imported the sanitized module, not an installed or in-tree one.
    assert str(sanitized_package_dir()) in run(
        [sys.executable, "-c", "import conveyor._core as core; print(core.__file__)"],
        "locating the sanitized module",
        env=env,
    )
