#!/usr/bin/env bash
# Compiles the extension (the _core target: every binding source, linked) against each
# Python's headers, and reports which versions compile. A compile check only: nothing is
# imported or tested, and CUDA is left out (the bindings compile the same either way).
#
#   scripts/check_python_versions.sh                       # every Python found (see below)
#   scripts/check_python_versions.sh /usr/bin/python3.12 ... # these interpreters
#
# Found by default: python3.11 .. python3.14 on PATH, then the interpreters under
# $PYENV_ROOT/versions (default ~/.pyenv); the first one of each minor version from 3.11
# (the oldest the package supports). An
# interpreter without its development headers (Python.h; Debian's python3.X-dev) is
# reported and skipped. pybind11 is header-only: the interpreter's own is used when it
# has one, else that of $PYTHON (default python3).
#
# Builds go to build/python-check/<version> (kept, so a rerun only recompiles what
# changed), the module inside it (never into python/conveyor, where the dev build's
# module lives), logs to build/python-check/<version>.log. Exit status: 0 when every checked
# version compiled (and at least one was checked).
set -uo pipefail
cd "$(dirname "$0")/.."
HOST_PY=${PYTHON:-python3}
WORK=build/python-check
mkdir -p "$WORK"

candidates=("$@")
if [ ${#candidates[@]} = 0 ]; then
  # Only those that run: a pyenv shim for a version not selected does not.
  for minor in 11 12 13 14; do
    found=$(command -v "python3.$minor" 2>/dev/null) && "$found" -c "" 2>/dev/null && candidates+=("$found")
  done
  for interpreter in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3; do
    [ -x "$interpreter" ] && candidates+=("$interpreter")
  done
fi

host_pybind11=$("$HOST_PY" -m pybind11 --cmakedir 2>/dev/null)
generator=(-G Ninja)
command -v ninja >/dev/null 2>&1 || generator=()
declare -A seen
results=()
failed=0
checked=0
for interpreter in "${candidates[@]}"; do
  version=$("$interpreter" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    results+=("?     $interpreter: does not run"); failed=1; continue; }
  [ -n "${seen[$version]:-}" ] && continue
  seen[$version]=1
  if ! "$interpreter" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    results+=("$version  $interpreter: older than the 3.11 the package needs, not checked")
    continue
  fi
  full=$("$interpreter" -c 'import platform; print(platform.python_version())')
  if ! "$interpreter" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'; then
    results+=("$version  $full $interpreter: no development headers (Python.h), not checked")
    continue
  fi
  pybind11_dir=$("$interpreter" -m pybind11 --cmakedir 2>/dev/null || echo "$host_pybind11")
  if [ -z "$pybind11_dir" ]; then
    results+=("$version  $full $interpreter: no pybind11 found (pip install pybind11), not checked")
    failed=1
    continue
  fi
  log=$WORK/$version.log
  checked=$((checked + 1))
  echo "== Python $full ($interpreter): configuring and building _core, log in $log"
  if cmake -S . -B "$WORK/$version" ${generator[@]+"${generator[@]}"} -DCONVEYOR_CUDA=OFF \
      -DCONVEYOR_BUILD_PYTHON=ON -DCONVEYOR_BUILD_TESTS=OFF -DPython_EXECUTABLE="$interpreter" \
      -DCONVEYOR_PYTHON_MODULE_DIR="$PWD/$WORK/$version/module" -Dpybind11_DIR="$pybind11_dir" >"$log" 2>&1 &&
    cmake --build "$WORK/$version" --target _core -j "$(nproc)" >>"$log" 2>&1; then
    results+=("$version  $full $interpreter: compiles")
  else
    results+=("$version  $full $interpreter: FAILED (last lines of $log below)")
    tail -n 30 "$log"
    failed=1
  fi
done

echo "== extension compile check, by Python version"
printf '  %s\n' "${results[@]}"
[ $checked -gt 0 ] || { echo "no Python with development headers was found" >&2; exit 1; }
exit $failed
