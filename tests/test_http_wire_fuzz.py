"""A bounded boofuzz wire campaign against a real `conveyor serve` (the full one: bench/http_fuzz.py).

Every route's request line, Host, Content-Length, Transfer-Encoding, Content-Encoding and
Inference-Header-Content-Length headers and its JSON or binary body are fuzzed one field at
a time (tests/wire_fuzz.py); here every EVERY-th of boofuzz's mutations of each field, the
same deterministic cases on every run. No case may crash or hang the server or get a 5xx,
/v2/health/live must answer after every case, and resident memory must grow by under 32 MiB.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conveyor.server import routes
from processes import ServeProcess, fuzz_server
from wire_fuzz import (
    ROUTES,
    RSS_GROWTH_LIMIT_BYTES,
    build_requests,
    mutation_count,
    run_campaign,
)

EVERY = 32  # of each field's mutations, fuzz every 32nd: some 15,000 cases


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with fuzz_server(tmp_path_factory.mktemp("wire-fuzz")) as served:
        yield served


def test_the_campaign_reaches_every_route() -> None:
    reached = set()
    for route in ROUTES:
        matched = routes.match_route(route.method.encode(), route.path.partition("?")[0])
        assert isinstance(matched, routes.Route), route
        reached.add("rollout_start" if (matched.name, route.method) == ("rollout", "POST") else matched.name)
    control = {"index", "load", "unload", "rollout_start", "rollout_action"}
    assert reached == set(routes.OPEN_ROUTES) | control


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_no_fuzzed_request_crashes_hangs_or_gets_a_5xx(server: ServeProcess, tmp_path: Path) -> None:
    requests = build_requests(EVERY)
    campaign = run_campaign(server.port, server.process.pid, tmp_path, every=EVERY, requests=requests)
    assert campaign.failures == [], "\n".join(campaign.failures[:20])
    assert campaign.cases == mutation_count(requests)  # boofuzz skips the rest of a field that keeps failing
    assert campaign.db_failures == 0  # boofuzz's own record agrees
    assert campaign.rss_growth < RSS_GROWTH_LIMIT_BYTES, f"RSS grew by {campaign.rss_growth / 2**20:.1f} MiB"
    # The cases reached the handlers, not only the parser: some were served, some refused for their content.
    assert {200, 400, 404, 405, 413} <= set(campaign.statuses), campaign.statuses
