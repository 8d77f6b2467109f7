#!/usr/bin/env bash
# bench/device_check.sh: the GPU checks in one go, on a machine with an NVIDIA GPU.
#
#   bash bench/device_check.sh                 # from the repository root, on the GPU machine
#   bash bench/device_check.sh --fetch-wheels  # beforehand, on a machine with PyPI access
#
# What it does, in about 2-4 minutes and never more than ~6 (every step has a deadline):
#   1. installs from ./.whl any carried wheel whose package is missing (the GPU machine
#      may have no registry access): the Python dependencies Conveyor imports, and CuPy
#      (cupy-cuda13x or cupy-cuda12x, whichever matches the driver) or nvidia-cublas when
#      carried and absent;
#   2. builds the package in place with CUDA (cmake + ninja into build/device-check, for
#      the GPU's own architecture; the module lands in python/conveyor/ as in a dev build);
#   3. runs the GPU tests (pytest -m gpu tests/) and the CPU-side CUDA tests, under
#      CONVEYOR_EXPECT_CUDA=1: a GPU test that skips (no CuPy, no device, no cuBLASLt,
#      no CUDA build) fails, and any skip in the GPU run fails the check;
#   4. runs the GPU benchmarks (bench/bench_cuda_kernels.py): normalize_image and
#      softmax_topk against the measured device copy bandwidth, dense against CuPy and
#      against a plain cuBLASLt GEMM; a skipped benchmark fails the check too;
#   5. with the time left, the CUDA tests again under compute-sanitizer memcheck (skipped
#      where the tool is missing or refuses the device);
#   6. prints a summary and, when $OUT is set, writes it there with the logs.
#
# Needs: an NVIDIA GPU and driver, nvcc (CUDA 12 or 13), CMake >= 3.24, a C++20 compiler,
# Python >= 3.11 with numpy, pybind11, pytest, pytest-benchmark, CuPy, onnx and onnxruntime,
# and cuBLASLt for the dense path (the nvidia-cublas wheel, found through Python, or a
# toolkit's; CONVEYOR_CUBLAS_ROOT points elsewhere). PYTHON picks the interpreter
# (default python3). Exit status: 0 when the build and every test passed, and no GPU test
# or benchmark skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# ---- wheels for the GPU machine's Python (run with registry access) -------------------------
if [ "${1:-}" = "--fetch-wheels" ]; then
  # The GPU machine's interpreter (Python 3.12 on x86-64 Linux here); override with
  # WHEEL_PYTHON_VERSION. CuPy and nvidia-cublas are on that machine already and too big
  # to carry; name them in EXTRA_WHEELS to fetch them anyway.
  version=${WHEEL_PYTHON_VERSION:-3.12}
  mkdir -p .whl
  "$PY" -m pip download --dest .whl --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    pydantic ${EXTRA_WHEELS:-}
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  ls -la .whl
  echo "carry .whl to the GPU machine (it is git-ignored locally, so name it in the carried paths)"
  exit 0
fi

START=$(date +%s)
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-340}
WORK=build/device-check
mkdir -p "$WORK"
LOGS=$WORK/logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
SUMMARY=$LOGS/summary.txt
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# step_timeout MAX: MAX seconds, or what is left of the budget if that is less.
step_timeout() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
# skipped_count LOG: the skips in the summary line pytest -q writes last (0 if none).
skipped_count() { tail -n 1 "$1" | grep -Eo "[0-9]+ skipped" | grep -Eo "[0-9]+" || echo 0; }

say "== Conveyor device check: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.mem --format=csv 2>&1
  nvidia-smi 2>&1 | grep -o "CUDA Version: [0-9.]*"
  nvcc --version 2>&1 | tail -n 2
  "$PY" --version 2>&1
  cmake --version 2>&1 | head -n 1
} >"$LOGS/env.txt"
cat "$LOGS/env.txt" | tee -a "$SUMMARY"

# ---- 1. carried wheels ----------------------------------------------------------------------
driver_cuda=$(nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9]*" | grep -o "[0-9]*$" || true)
if compgen -G ".whl/*.whl" >/dev/null; then
  for wheel in .whl/*.whl; do
    dist=$(basename "$wheel" | cut -d- -f1)
    case "$dist" in
      cupy_cuda1[0-9]x) [ "$dist" = "cupy_cuda${driver_cuda}x" ] || continue
        "$PY" -c "import cupy" >/dev/null 2>&1 && continue ;;
    esac
    "$PY" -m pip show "${dist//_/-}" >/dev/null 2>&1 && continue
    say "installing carried wheel $(basename "$wheel")"
    "$PY" -m pip install --no-index --no-deps --quiet "$wheel" >>"$LOGS/build.log" 2>&1 || say "  FAILED (see build.log)"
  done
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib
for name in ("numpy", "cupy", "pybind11", "pytest", "pytest_benchmark", "pydantic", "onnx", "onnxruntime"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # a missing one is reported, and the steps that need it fail
        print(f"  {name} MISSING ({type(error).__name__}: {error})")
EOF

# ---- 2. build -------------------------------------------------------------------------------
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
arch=${CONVEYOR_CUDA_ARCH:-${arch:-90}}
generator=(-G Ninja)
command -v ninja >/dev/null 2>&1 || generator=()
build_rc=1
build_start=$(date +%s)
if timeout "$(step_timeout 240)" cmake -S . -B "$WORK" ${generator[@]+"${generator[@]}"} -DCMAKE_BUILD_TYPE=Release \
    -DCONVEYOR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >>"$LOGS/build.log" 2>&1 &&
  timeout "$(step_timeout 240)" cmake --build "$WORK" -j "$(nproc)" >>"$LOGS/build.log" 2>&1; then
  build_rc=0
fi
say "== build (sm_$arch): $([ $build_rc = 0 ] && echo ok || echo FAILED) in $(($(date +%s) - build_start)) s"
grep -E "conveyor: " "$LOGS/build.log" | tee -a "$SUMMARY"
if [ $build_rc != 0 ]; then
  tail -n 40 "$LOGS/build.log" | tee -a "$SUMMARY"
fi
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "from conveyor.kernels import cuda; print('  kernels:', cuda.info())" 2>&1 | tee -a "$SUMMARY"
expect_cublaslt=0
"$PY" -c "from conveyor import _core; raise SystemExit(0 if _core.cuda.cublaslt_built() else 1)" 2>/dev/null &&
  expect_cublaslt=1

# ---- 3. tests ---------------------------------------------------------------------------------
# -W default: a third-party warning is shown, not turned into a failure, on this one-off run.
PYTEST=("$PY" -m pytest -p no:cacheprovider -W default -q -rfEs)
tests_rc=1
if [ $build_rc = 0 ]; then
  CONVEYOR_EXPECT_CUDA=1 CONVEYOR_EXPECT_CUBLASLT=$expect_cublaslt timeout "$(step_timeout 150)" \
    "${PYTEST[@]}" -m gpu --continue-on-collection-errors tests/ >"$LOGS/gpu_tests.log" 2>&1
  tests_rc=$?
  # conftest.py fails a skipped gpu test under CONVEYOR_EXPECT_CUDA=1; a skip still counted
  # here (a whole module skipped at import) means GPU tests did not run either.
  gpu_skipped=$(skipped_count "$LOGS/gpu_tests.log")
  if [ "$gpu_skipped" != 0 ]; then
    say "  $gpu_skipped GPU test(s) skipped: a GPU check must run them all (see SKIPPED lines in gpu_tests.log)"
    tests_rc=1
  fi
  CONVEYOR_EXPECT_CUDA=1 CONVEYOR_EXPECT_CUBLASLT=$expect_cublaslt timeout "$(step_timeout 60)" \
    "${PYTEST[@]}" -m "not gpu" tests/test_cuda_kernels.py >>"$LOGS/gpu_tests.log" 2>&1 || tests_rc=1
  say "== tests: $([ $tests_rc = 0 ] && echo ok || echo "FAILED (rc $tests_rc)")"
  grep -E "^(FAILED|ERROR)| passed| failed| skipped| error|no tests ran" "$LOGS/gpu_tests.log" | head -n 40 | tee -a "$SUMMARY"
fi

# ---- 4. benchmarks ------------------------------------------------------------------------
export CONVEYOR_BENCH_REPORT=$LOGS/bench_report.jsonl
: >"$CONVEYOR_BENCH_REPORT"
bench_skipped=0
if [ $build_rc = 0 ] && [ "$(left)" -gt 30 ]; then
  CONVEYOR_EXPECT_CUDA=1 timeout "$(step_timeout 150)" "${PYTEST[@]}" bench/bench_cuda_kernels.py \
    --benchmark-enable --benchmark-columns=median,iqr,rounds --benchmark-sort=name >"$LOGS/bench.log" 2>&1
  bench_rc=$?
  say "== benchmarks: $([ $bench_rc = 0 ] && echo ok || echo "rc $bench_rc"): $(tail -n 1 "$LOGS/bench.log")"
  bench_skipped=$(skipped_count "$LOGS/bench.log")
  if [ "$bench_skipped" != 0 ]; then
    say "  FAILED: $bench_skipped GPU benchmark(s) skipped:"
    grep -E "^SKIPPED" "$LOGS/bench.log" | head -n 10 | tee -a "$SUMMARY"
  fi
  sed -n '/candidate vs baseline/,$p' "$LOGS/bench.log" | grep -E "speedup|incomplete|not timed" | tee -a "$SUMMARY"
  "$PY" - "$CONVEYOR_BENCH_REPORT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by_name = {line["name"]: line for line in lines}
for line in lines:
    name = line["name"]
    if name.endswith(": copy"):
        continue
    text = f"  {name}: {line['seconds_per_call'] * 1e6:.1f} us/call"
    if "gb_per_s" in line:
        text += f", {line['gb_per_s']:.0f} GB/s"
        copy = by_name.get(f"{name}: copy")
        if copy:
            text += f" = {100 * line['gb_per_s'] / copy['gb_per_s']:.0f}% of copy ({copy['gb_per_s']:.0f} GB/s)"
    if "tflop_per_s" in line:
        text += f", {line['tflop_per_s']:.2f} TFLOP/s"
    print(text)
EOF
fi

# ---- 5. memcheck with the time left -----------------------------------------------------------
if [ $build_rc = 0 ] && command -v compute-sanitizer >/dev/null 2>&1 && [ "$(left)" -gt 60 ]; then
  timeout "$(step_timeout 120)" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "${PYTEST[@]}" -m gpu -x -k "not every_k and not many_threads and not dense_matches" \
    tests/test_cuda_kernels.py >"$LOGS/memcheck.log" 2>&1
  memcheck_rc=$?
  case $memcheck_rc in
    0) say "== memcheck: no errors" ;;
    124) say "== memcheck: stopped at the deadline (partial run); errors so far: $(grep -c "Invalid\|out of bounds" "$LOGS/memcheck.log")" ;;
    *) say "== memcheck: rc $memcheck_rc"; grep -E "ERROR SUMMARY|Invalid|Device not supported|^FAILED" "$LOGS/memcheck.log" | head -n 20 | tee -a "$SUMMARY" ;;
  esac
fi

say "== done in $(($(date +%s) - START)) s"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOGS"/* "$OUT"/ 2>/dev/null
fi
[ $build_rc = 0 ] && [ $tests_rc = 0 ] && [ "$bench_skipped" = 0 ]
