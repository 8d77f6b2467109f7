"""Bucket py-spy collapsed stacks (``py-spy record --format raw``) into request-path categories.

Usage:
    python bench/profile/bucket_stacks.py STACKS.txt [--us-per-request US] [--json OUT.json]

Each line of a raw py-spy file is ``frame;frame;...;frame COUNT`` (root first). A sample whose
innermost frames are a blocking wait (epoll_wait, a condition variable, a lock, the GIL) is
counted as idle and dropped, so the shares are of the CPU the sampled threads were busy.
Every other sample is given to the category of its innermost frame that matches a rule below
(walking from the leaf towards the root), so a numpy call made from the codec counts as numpy
and a libpython frame counts for the Python function that called it.

py-spy samples only threads that Python knows (the event loop, the batcher's threads while they
run a Python backend, gRPC's poller thread); native-only threads are left to perf.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

# Innermost frames that mean the thread is waiting, not running.
IDLE = re.compile(
    r"^(epoll_wait|epoll_pwait|epoll_pwait2|pthread_cond_wait|pthread_cond_timedwait|pthread_cond_clockwait|"
    r"PyThread_acquire_lock_timed|PyThread_acquire_lock|take_gil|sem_wait|sem_timedwait|sem_clockwait|"
    r"poll|ppoll|select|pselect|nanosleep|clock_nanosleep|accept|accept4|__futex_abstimed_wait\w*|"
    r"futex_wait|do_futex_wait|__new_sem_wait_slow\w*|uv__io_poll|"
    r"_queue_SimpleQueue_get_impl|lock_PyThread_acquire_lock|time_sleep)\b"
)

# (category, regex on one frame); first category whose regex matches wins at each frame.
RULES: list[tuple[str, re.Pattern[str]]] = [
    ("socket syscalls (read/write/sendmsg)", re.compile(
        r"^(writev|write|read|readv|send|sendto|sendmsg|recv|recvfrom|recvmsg|__libc_\w+|uv__read|uv__write|"
        r"uv__try_write|uv__stream_io|__send|__recv|tcp_\w+)\b")),
    ("model execution (onnxruntime)", re.compile(r"onnxruntime|backends/onnx\.py")),
    ("HTTP parsing (httptools)", re.compile(r"httptools|llhttp")),
    ("protobuf", re.compile(r"google/protobuf|_message\.|upb|protobuf")),
    ("gRPC core (cygrpc, grpc C core)", re.compile(r"cygrpc|grpc/_cython|libgrpc|grpc/aio|grpc/_|grpc_core|"
                                                  r"grpc_event_engine|\bgrpc/")),
    ("numpy conversions", re.compile(r"numpy|_multiarray|multiarray")),
    ("JSON (orjson)", re.compile(r"orjson|json/")),
    ("protocol encode (responses)", re.compile(
        r"^(encode_\w*|_encode\w*|\w*response\w*|[\w.<>]*encode[\w.<>]*) \(conveyor/(protocol|server)/|"
        r"conveyor/server/responses\.py|conveyor/protocol/grpc_encode|encode_infer_response")),
    ("protocol decode (requests)", re.compile(r"conveyor/protocol/")),
    ("batcher submit/completion (conveyor._core, runtime)", re.compile(
        r"conveyor/_core|conveyor::|conveyor/runtime\.py|conveyor/runtime_handle\.py|conveyor/deploy/")),
    ("gRPC servicer (conveyor/server/grpc_server.py)", re.compile(r"conveyor/server/grpc_server\.py")),
    ("HTTP handler (conveyor/server http, routes, dataplane)", re.compile(r"conveyor/server/")),
    ("asyncio/uvloop loop machinery", re.compile(
        r"uvloop|loop\.c|asyncio/|_asynciomodule|task_step|task_wakeup|future_\w+|uv_\w+|uv__\w+|"
        r"Handle__run|Loop__|libuv|contextvars|context_run")),
]
OTHER = "other (interpreter, allocator, rest)"


def frames_of(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    return stack.split(";"), int(count)


def thread_of(frames: list[str]) -> str:
    for f in frames[:3]:
        m = re.match(r"thread \((\d+)\)(?::\s*(.*))?", f)
        if m:
            return m.group(2) or f"tid {m.group(1)}"
    return "?"


def classify(frames: list[str]) -> str | None:
    # The thread header may carry the thread's name; drop it and the process header.
    body = [f for f in frames if not f.startswith(("process ", "thread ("))]
    inner = body[-4:]
    for f in reversed(inner):
        if IDLE.match(f):
            return None
        if not re.match(r"^0x[0-9a-f]+ \(libc", f):
            break
    for f in reversed(body):
        for name, rx in RULES:
            if rx.search(f):
                return name
    return OTHER


def bucket(path: str, threads_rx: str | None = None) -> dict:
    cats: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    idle = 0
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            frames, n = frames_of(line)
            if threads_rx and not re.search(threads_rx, thread_of(frames)):
                continue
            c = classify(frames)
            if c is None:
                idle += n
                continue
            cats[c] += n
            name = thread_of(frames)
            threads[re.sub(r"\d+$", "N", name)] += n
    return {"busy": sum(cats.values()), "idle": idle, "categories": dict(cats), "threads": dict(threads)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stacks")
    ap.add_argument("--us-per-request", type=float, default=None)
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy sampling rate (per thread)")
    ap.add_argument("--seconds", type=float, default=None, help="recording length, for busy cores")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", default=None, help="regex on the thread name: keep only those threads")
    a = ap.parse_args()
    r = bucket(a.stacks, a.threads)
    busy = r["busy"] or 1
    print(f"{a.stacks}: busy samples {r['busy']}, idle samples {r['idle']}")
    if a.seconds:
        print(f"  busy cores seen by py-spy: {r['busy'] / a.rate / a.seconds:.2f}")
    for name, n in sorted(r["categories"].items(), key=lambda kv: -kv[1]):
        us = f"  {n / busy * a.us_per_request:7.1f} us/req" if a.us_per_request else ""
        print(f"  {n / busy * 100:5.1f}%{us}  {name}")
    print("  by thread:", ", ".join(f"{k} {v / busy * 100:.0f}%" for k, v in sorted(r["threads"].items(), key=lambda kv: -kv[1])))
    if a.json:
        r["us_per_request"] = a.us_per_request
        with open(a.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
