"""The sanitizer builds of the core, shared by the C++ unit tests and the sanitized binding tests.

Each sanitizer has one CMake build directory under build/ in the source checkout, so
reruns are incremental and the two test files that use the AddressSanitizer build
configure it identically (no rebuild back and forth). Needs cmake and ninja on PATH
(the test extra installs both) and a source checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_TAIL_CHARS = 20_000
BUILD_DIRS = {"thread": "cpp-tests-tsan", "address": "cpp-tests-asan"}


def require_source_checkout() -> None:
    if not (REPO_ROOT / "cpp" / "tests" / "CMakeLists.txt").is_file():
        pytest.skip("not a source checkout: cpp/ is not next to tests/")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: install the test extra (pip install '.[test]')")
    return path


def run(command: list[str], what: str, env: dict[str, str] | None = None, timeout_s: int = 1800,
        cwd: Path = REPO_ROOT) -> str:
    """Run `command`, failing the test with the output's tail when it exits non-zero."""
    result = subprocess.run(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout_s, check=False,
    )  # fmt: skip
    output = result.stdout[-OUTPUT_TAIL_CHARS:]
    assert result.returncode == 0, f"{what} exited with {result.returncode}:\n{output}"
    return result.stdout


def build_dir(sanitizer: str) -> Path:
    return REPO_ROOT / "build" / BUILD_DIRS[sanitizer]


def sanitized_package_dir() -> Path:
    """Where the AddressSanitizer build keeps its own copy of the conveyor package."""
    return build_dir("address") / "site"


def configure_and_build(sanitizer: str, target: str) -> Path:
    """Configure the sanitizer's build directory (the same way every time) and build `target`."""
    cmake, ninja = tool("cmake"), tool("ninja")
    directory = build_dir(sanitizer)
    options = [
        "-DCMAKE_BUILD_TYPE=Debug",
        "-DCONVEYOR_BUILD_TESTS=ON",
        "-DCONVEYOR_CUDA=OFF",
        f"-DCONVEYOR_SANITIZER={sanitizer}",
        f"-DPython_EXECUTABLE={sys.executable}",  # its boost-headers package (the native HTTP front end)
    ]
    if sanitizer == "address":  # the extension too: the binding tests run against it
        import pybind11

        options += [
            "-DCONVEYOR_BUILD_PYTHON=ON",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCONVEYOR_PYTHON_MODULE_DIR={sanitized_package_dir() / 'conveyor'}",
        ]
    else:
        options.append("-DCONVEYOR_BUILD_PYTHON=OFF")
    run(
        [cmake, "-S", str(REPO_ROOT), "-B", str(directory), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", *options],
        f"cmake configure ({sanitizer})",
    )
    run([cmake, "--build", str(directory), "--target", target], f"build {target} ({sanitizer})")
    return directory


def compiler_runtime(directory: Path, library: str) -> str:
    """The path of a compiler runtime library (libasan.so) of the compiler the build used."""
    cache = (directory / "CMakeCache.txt").read_text()
    compiler = next(
        line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("CMAKE_CXX_COMPILER:")
    )
    path = subprocess.run(
        [compiler, f"-print-file-name={library}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.fail(f"{compiler} does not know where {library} is (got {path!r}): install the compiler's sanitizer runtime")
    return path


# The child interpreter's sanitizer settings. Python's own allocations live until exit:
# leak checking would report them all.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0 halt_on_error=1 abort_on_error=0 exitcode=86",
    "UBSAN_OPTIONS": "print_stacktrace=1 halt_on_error=1",
    "PYTHONMALLOC": "malloc",
}
# What a sanitizer writes when it finds something (ASan's header, UBSan's diagnostic).
SANITIZER_REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:")


def copy_package() -> None:
    """The conveyor sources beside the sanitized _core (the build writes only _core there)."""
    target = sanitized_package_dir() / "conveyor"
    source = REPO_ROOT / "python" / "conveyor"
    ignore = shutil.ignore_patterns("_core*.so", "__pycache__", "example_models")
    shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    examples = target / "example_models"
    if not examples.exists():
        examples.symlink_to(REPO_ROOT / "examples" / "models", target_is_directory=True)


def sanitized_python() -> dict[str, str]:
    """Build the AddressSanitizer _core, copy the package around it, and return the environment
    of a child interpreter that imports it with the sanitizer runtime preloaded and
    PYTHONMALLOC=malloc (every Python object a heap block ASan watches)."""
    require_source_checkout()
    directory = configure_and_build("address", "_core")
    copy_package()
    return {
        **os.environ,
        **SANITIZER_ENV,
        # The runtime first; libstdc++ with it, or ASan cannot find __cxa_throw to intercept
        # (the interpreter itself does not link libstdc++).
        "LD_PRELOAD": " ".join(compiler_runtime(directory, name) for name in ("libasan.so", "libstdc++.so")),
        "PYTHONPATH": os.pathsep.join([str(sanitized_package_dir()), str(REPO_ROOT / "tests")]),
    }


def sanitized_fuzzer() -> dict[str, str]:
    """sanitized_python's environment for an atheris harness: atheris' libFuzzer preloaded
    ahead of the sanitizer runtime. GCC's libasan defines the coverage callbacks
    (__sanitizer_cov_*) as no-op weak symbols; loaded first, they would take atheris'
    counters and comparisons, and libFuzzer would fuzz blind (no coverage, its corpus
    reduced to nothing). The harness must call atheris.Setup(..., internal_libfuzzer=True)."""
    spec = importlib.util.find_spec("atheris")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("atheris is not installed: install the test extra (pip install '.[test]')")
    libraries = sorted(Path(spec.submodule_search_locations[0]).glob("core_with_libfuzzer*.so"))
    if not libraries:
        pytest.fail("atheris has no core_with_libfuzzer library: reinstall it (pip install --force-reinstall atheris)")
    env = sanitized_python()
    env["LD_PRELOAD"] = f"{libraries[0]} {env['LD_PRELOAD']}"
    # verify_asan_link_order: the runtime no longer comes first (it still interposes malloc).
    # allocator_may_return_null: a request for a huge tensor fails as MemoryError, not as a report.
    env["ASAN_OPTIONS"] += " verify_asan_link_order=0 allocator_may_return_null=1"
    return env
