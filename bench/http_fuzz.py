"""The full boofuzz wire campaign against `conveyor serve`: every route, every mutation.

    python bench/http_fuzz.py [--every N] [--requests NAME ...] [--work-dir DIR]

Starts `conveyor serve` on the example `tiny` model (explicit model control, so the
repository routes act), fuzzes each route's request line, headers and JSON or binary body
one field at a time with boofuzz's deterministic mutation lists (tests/wire_fuzz.py), and
after every case checks that the answer is no 5xx and that /v2/health/live answers 200.
Prints the cases, duration, failures, statuses seen, 5xx answers and the growth of the
server's resident memory (bar: under 32 MiB), and exits 1 on any failure.

--every N fuzzes every N-th mutation of each field (1, the default, is all of them: some
530,000 cases, 5 to 10 minutes on 2 cores); --requests limits the run to some request names
(see --list). The CI test tests/test_http_wire_fuzz.py runs a bounded subset.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from processes import FUZZ_SERVE_FLAGS, ServeProcess
from wire_fuzz import (
    RSS_GROWTH_LIMIT_BYTES,
    build_requests,
    mutation_count,
    run_campaign,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=1, help="fuzz every N-th mutation of each field (default 1: all)")
    parser.add_argument("--requests", nargs="*", metavar="NAME", help="only these requests (default: all)")
    parser.add_argument("--list", action="store_true", help="list the requests and their case counts, then exit")
    parser.add_argument("--work-dir", type=Path, help="keep the server log and boofuzz's results database here")
    args = parser.parse_args()
    requests = build_requests(args.every)
    if args.requests:
        unknown = sorted(set(args.requests) - {r.name for r in requests})
        if unknown:
            parser.error(f"unknown requests {unknown}; see --list")
        requests = [r for r in requests if r.name in args.requests]
    if args.list:
        for request in requests:
            print(f"{request.name:28} {request.get_num_mutations():8d}")
        return 0
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="conveyor-http-fuzz-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(requests)} requests, {mutation_count(requests)} cases; results under {work_dir}", flush=True)
    server = ServeProcess(work_dir, ("tiny",), FUZZ_SERVE_FLAGS)
    try:
        server.wait_live()
        campaign = run_campaign(server.port, server.process.pid, work_dir, every=args.every, requests=requests,
                                progress_every=50_000)
    finally:
        log = server.stop()
    tracebacks = log.count("Traceback")
    print(f"cases:             {campaign.cases}")
    print(f"duration:          {campaign.seconds:.0f} s ({campaign.cases / max(campaign.seconds, 1e-9):.0f} cases/s)")
    print(f"failures:          {len(campaign.failures)} (boofuzz database: {campaign.db_failures} fail steps)")
    print(f"5xx answers:       {len(campaign.server_errors)}")
    print(f"statuses:          {dict(sorted(campaign.statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))}")
    print(f"RSS:               {campaign.rss_before / 2**20:.1f} -> {campaign.rss_after / 2**20:.1f} MiB "
          f"(growth {campaign.rss_growth / 2**20:+.1f} MiB, bar < {RSS_GROWTH_LIMIT_BYTES / 2**20:.0f})")
    print(f"server tracebacks: {tracebacks}")
    for line in campaign.failures[:20]:
        print("  FAIL", line)
    ok = not campaign.failures and not tracebacks and campaign.rss_growth < RSS_GROWTH_LIMIT_BYTES
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
