"""Schemathesis drives a real `conveyor serve` with the OpenAPI document the package ships.

Each operation of python/conveyor/server/openapi.yaml gets its examples and a bounded number of
generated requests (valid and schema-breaking ones), the same on every run (derandomized).
Every answer must have a status the document declares for it (no 500 is declared anywhere),
a declared content type, and a body that matches the declared schema; a 5xx fails at once
(`not_a_server_error`) unless the operation declares it (infer's 503/504, load's 503). The
document must also describe exactly the routes the server has.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import resources

import pytest
import schemathesis
from conveyor.server import routes
from hypothesis import HealthCheck, settings
from processes import ServeProcess, fuzz_server
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

SPEC = resources.files("conveyor.server") / "openapi.yaml"
schema = schemathesis.openapi.from_path(str(SPEC))
# 25 in CI; a longer run: OPENAPI_EXAMPLES_PER_OPERATION=500 python -m pytest tests/test_http_openapi.py
EXAMPLES_PER_OPERATION = int(os.environ.get("OPENAPI_EXAMPLES_PER_OPERATION", "25"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with fuzz_server(tmp_path_factory.mktemp("openapi")) as served:
        yield served


def test_the_document_describes_every_route_of_the_server() -> None:
    described = set()
    for path, item in schema.raw_schema["paths"].items():
        concrete = path.format(model_name="tiny", model_version="1", action="pause", region_name="r")
        for method in item.keys() - {"parameters"}:
            route = routes.match_route(method.upper().encode(), concrete)
            assert isinstance(route, routes.Route), (method, path)
            described.add("rollout_start" if (route.name, method) == ("rollout", "post") else route.name)
    shared_memory = {f"{kind}_shared_memory_{action}" for kind in ("system", "cuda")
                     for action in ("status", "register", "unregister")}
    assert described == set(routes.OPEN_ROUTES) | {"index", "load", "unload", "rollout_start", "rollout_action",
                                                   *shared_memory}


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_the_server_answers_as_its_openapi_document_says(case: schemathesis.Case, server: ServeProcess) -> None:
    declared = case.operation.definition.raw["responses"]
    # An operation that declares a 5xx (an expired deadline, a full queue) may answer it;
    # status_code_conformance still fails any 5xx it does not declare.
    excluded = [positive_data_acceptance]  # a valid request for a model that is not served is a 404
    if any(str(status).startswith("5") for status in declared):
        excluded.append(not_a_server_error)
    case.call_and_validate(base_url=server.url, excluded_checks=excluded)
