"""Split a ``perf record -e cpu-clock -p PID`` profile of a server by thread, library and the core's symbols.

Usage:
    python bench/profile/perf_split.py PERF.data --pid PID [--us-per-request US] [--top 12]

perf sees every thread (the event loop, the batcher's C++ threads, onnxruntime's and gRPC's own
threads) and only on-CPU time, so it complements py-spy, which names Python functions but only
for threads Python knows. Samples are self time (no call graphs: the core and CPython are built
without frame pointers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter

GROUPS = [
    ("kernel (syscalls, TCP, scheduler)", re.compile(r"kernel|vmlinux|\[vdso\]")),
    ("CPython interpreter (libpython)", re.compile(r"libpython")),
    ("conveyor._core (C++ core)", re.compile(r"conveyor/_core|_core\.cpython")),
    ("onnxruntime", re.compile(r"onnxruntime")),
    ("gRPC core (cygrpc)", re.compile(r"cygrpc|libgrpc")),
    ("protobuf (upb)", re.compile(r"protobuf|_message|upb")),
    ("uvloop / asyncio", re.compile(r"uvloop|loop\.cpython|_asyncio")),
    ("httptools", re.compile(r"httptools|parser\.cpython")),
    ("numpy", re.compile(r"numpy|_multiarray")),
    ("orjson", re.compile(r"orjson")),
    ("libc / libstdc++ / allocator", re.compile(r"libc\.so|libstdc\+\+|libm\.so|ld-linux|jemalloc|libgcc")),
]


def group_of(dso: str) -> str:
    for name, rx in GROUPS:
        if rx.search(dso):
            return name
    return "other: " + os.path.basename(dso)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--us-per-request", type=float, default=None)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = subprocess.run(["perf", "script", "-i", a.data, "-F", "tid,ip,sym,dso"], capture_output=True,
                         text=True, check=True).stdout
    groups: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    core: Counter[str] = Counter()
    other: Counter[str] = Counter()
    total = 0
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+[0-9a-f]+\s+(.*?)\s*\((.*)\)\s*$", line)
        if not m:
            continue
        tid, sym, dso = int(m.group(1)), m.group(2), m.group(3)
        total += 1
        g = group_of(dso)
        groups[g] += 1
        threads["event loop (main thread)" if tid == a.pid else "other threads"] += 1
        if tid != a.pid:
            other[g] += 1
        if g.startswith("conveyor._core"):
            core[re.sub(r"\(.*", "", sym).strip() or "?"] += 1
    if not total:
        print("no samples")
        return 1
    us = a.us_per_request

    def row(n: int, name: str) -> str:
        extra = f"  {n / total * us:7.1f} us/req" if us else ""
        return f"  {n / total * 100:5.1f}%{extra}  {name}"

    print(f"{a.data}: {total} samples")
    for name, n in groups.most_common():
        print(row(n, name))
    print("  by thread:", ", ".join(f"{k} {v / total * 100:.0f}%" for k, v in threads.most_common()))
    print("  other threads by library:", ", ".join(f"{k} {v / total * 100:.1f}%" for k, v in other.most_common()))
    print("  conveyor._core symbols:")
    for name, n in core.most_common(a.top):
        print("  " + row(n, name))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"samples": total, "main_share": threads["event loop (main thread)"] / total,
                       "groups": {k: v / total for k, v in groups.items()},
                       "other_threads": {k: v / total for k, v in other.items()},
                       "core_symbols": {k: v / total for k, v in core.most_common(a.top)}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
