"""Print the markdown table of bench/README.md from the files profile_paths.sh wrote.

Usage: python bench/profile/make_table.py OUTDIR

For each path OUTDIR holds PATH.measure.json (infer/s, mean batch, server CPU us/request),
PATH.spy.json (py-spy buckets of the event-loop thread) and PATH.perf.json (perf's split by
thread and library). A bucket's share of the server's CPU is its share of the event loop's busy
py-spy samples times the event loop's share of perf's samples; perf's samples on the other threads
(batcher worker, onnxruntime, gRPC's poller and C-core threads) make one row per library.
"""

from __future__ import annotations

import json
import os
import sys

PATHS = [("http_binary", "HTTP binary"), ("http_json", "HTTP JSON"), ("grpc", "gRPC"), ("native_http", "native HTTP (binary)")]


def load(outdir: str, path: str, kind: str):
    f = os.path.join(outdir, f"{path}.{kind}.json")
    if not os.path.exists(f):
        return None
    with open(f) as fh:
        return json.load(fh)


def main() -> int:
    outdir = sys.argv[1]
    cols = []
    for key, title in PATHS:
        m, s, p = (load(outdir, key, k) for k in ("measure", "spy", "perf"))
        if m is None or p is None:
            continue
        shares: dict[str, float] = {}
        main_share = p["main_share"]
        if s and s["busy"]:
            for name, n in s["categories"].items():
                shares["event loop: " + name] = n / s["busy"] * main_share
        else:  # no py-spy buckets (a native front end): perf's libraries for the whole process
            for name, v in p["groups"].items():
                shares["all threads: " + name] = v
            main_share = 0.0
        if main_share:
            for name, v in p["other_threads"].items():
                shares["other threads: " + name] = v
        cols.append((title, m, shares))
    rows = sorted({r for _, _, sh in cols for r in sh},
                  key=lambda r: (not r.startswith("event"), -max(sh.get(r, 0) for _, _, sh in cols)))
    print("| where | " + " | ".join(t for t, _, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for _, m, sh in cols:
            v = sh.get(r)
            cells.append("" if v is None or v < 0.0005 else f"{v * 100:.1f}% · {v * m['us_per_request']:.1f} µs")
        print(f"| {r} | " + " | ".join(cells) + " |")
    print("| **server CPU per request** | " + " | ".join(f"**{m['us_per_request']:.0f} µs**" for _, m, _ in cols) + " |")
    print("| infer/s (c=32) | " + " | ".join(f"{m['infer_per_s']:,.0f}" for _, m, _ in cols) + " |")
    print("| mean batch | " + " | ".join(f"{m['mean_batch']:.1f}" for _, m, _ in cols) + " |")
    print("| server cores busy | " + " | ".join(f"{m['cores']:.2f}" for _, m, _ in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
