"""A version rolled out beneath a graph: the graph's step requests follow the rollout's split.

The rollout controller tells RolloutTraffic of every new route table; the traffic layer
hands it to the runtime, which binds the graph steps running the model to its versions with
the table's arm bounds, and the core draws an arm per step request. Shares are checked
against the binomial 99.9% band their weight implies (a failure is a real fault, at a rate
of 1 in 1000 per check at most, never a timing).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from conveyor import Runtime
from conveyor.deploy.checks import parse_checks
from conveyor.deploy.controller import RolloutController
from conveyor.deploy.traffic import RolloutTraffic
from conveyor.rollout_config import parse_rollout_config, resolve_versions

STEP = {
    "backend": "python", "max_batch_size": 8,
    "inputs": [{"name": "x", "datatype": "FP32", "dims": [1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "dims": [1]}],
}  # fmt: skip
GRAPH = {
    "graph": {
        "inputs": ["x"], "outputs": {"y": "m.y"},
        "step": [{"name": "m", "model": "scorer", "inputs": {"x": "x"}}],
    }
}  # fmt: skip
REQUESTS = 2000


def _version(marker: float):
    """A version of `scorer` whose answer says which version ran: y = marker."""
    return lambda inputs: {"y": np.full_like(inputs["x"], marker)}


@pytest.fixture
def runtime():
    rt = Runtime()
    rt.add_model("scorer", STEP, _version(1.0), version=1)
    rt.add_model("scorer", STEP, _version(2.0), version=2)
    rt.add_model("pipeline", GRAPH)
    yield rt
    rt.close()


def _controller(weight: float) -> RolloutController:
    config = parse_rollout_config(
        {"strategy": "canary", "champion": 1, "challenger": 2,
         "steps": [{"weight": weight, "duration_s": 60.0, "min_requests": 10}, {"weight": 100.0, "duration_s": 60.0}],
         "checks": [{"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.02}]},
        source="test",
    )  # fmt: skip
    versions = resolve_versions(config, [1, 2], source="test")
    return RolloutController("scorer", config, versions, parse_checks(config.checks), 0.0, router_seed=5)


def _answers(runtime: Runtime) -> np.ndarray:
    x = np.zeros((1, 1), np.float32)
    return np.array([runtime.infer("pipeline", {"x": x})["y"][0, 0] for _ in range(REQUESTS)])


def test_a_graph_step_follows_the_canary_split_and_the_newest_version_after_detach(runtime) -> None:
    assert set(_answers(runtime)) == {2.0}  # no rollout: the newest version
    traffic = RolloutTraffic(runtime)
    controller = _controller(25.0)
    traffic.attach(controller)
    answers = _answers(runtime)
    low, high = binom.interval(0.999, REQUESTS, 0.25)
    assert set(answers) <= {1.0, 2.0} and low <= (answers == 2.0).sum() <= high
    # Counted where the rollout's judge reads them: the versions' own batchers.
    steps = runtime.model_stats("pipeline")["steps"]
    assert steps[0]["requests"] == 2 * REQUESTS
    # Promoted: the challenger answers every step request.
    controller.promote(full=True, now=1.0)
    assert set(_answers(runtime)) == {2.0}
    traffic.detach("scorer")
    assert set(_answers(runtime)) == {2.0}


def test_a_rollout_rolled_back_sends_the_graph_back_to_the_champion(runtime) -> None:
    traffic = RolloutTraffic(runtime)
    controller = _controller(50.0)
    traffic.attach(controller)
    answers = _answers(runtime)
    low, high = binom.interval(0.999, REQUESTS, 0.5)
    assert low <= (answers == 2.0).sum() <= high
    controller.rollback(now=1.0)
    assert set(_answers(runtime)) == {1.0}
    # The challenger unloaded under the (ended) rollout: the champion still answers.
    runtime.unload_model("scorer", 2)
    assert set(_answers(runtime)) == {1.0}
