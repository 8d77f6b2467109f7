"""The rollout report: content checks on rollouts driven through the real controller, and a render in Chromium.

The inputs are generated, not hand-written: a RolloutController run on a fake clock with
simulated batchers (seeded), so the status, the decision log and the saved state have
exactly the shapes the server serves and saves. No sleeps, no timing thresholds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.deploy.controller import RolloutController
from conveyor.deploy.evidence import BUCKETS, bucket_of, bucket_upper_bounds
from conveyor.deploy.judge import parse_checks
from conveyor.deploy.report import render_rollout_report, status_from_saved_state
from conveyor.deploy.rollout_state import audit_path, load_state, read_audit, state_path
from conveyor.rollout_config import parse_rollout_config, resolve_versions

MODEL = "classifier"
START = 1_700_000_000.0
INTERVAL_S = 60.0
UPPER_BOUNDS_NS = bucket_upper_bounds()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class SimulatedBatcher:
    """Cumulative counters of one version, shaped like `Batcher.stats()`; latencies lognormal."""

    def __init__(self) -> None:
        self.counters = {"requests": 0, "succeeded": 0, "failed": 0, "rejected": 0, "expired": 0, "cancelled": 0}
        self.request_time = np.zeros(BUCKETS, dtype=np.int64)
        self.queue_time = np.zeros(BUCKETS, dtype=np.int64)

    def serve(self, rng: np.random.Generator, requests: int, error_rate: float, median_ms: float) -> None:
        errors = int(rng.binomial(requests, error_rate))
        self.counters["requests"] += requests
        self.counters["succeeded"] += requests - errors
        self.counters["failed"] += errors
        total_ns = rng.lognormal(np.log(median_ms * 1e6), 0.4, requests)
        self.request_time += np.bincount(bucket_of(total_ns.astype(np.uint64)), minlength=BUCKETS)
        self.queue_time += np.bincount(bucket_of((total_ns / 8).astype(np.uint64)), minlength=BUCKETS)

    def stats(self) -> dict[str, Any]:
        def buckets(counts: np.ndarray) -> list[tuple[int, int]]:
            return [(int(UPPER_BOUNDS_NS[i]), int(counts[i])) for i in np.flatnonzero(counts)]

        return {**self.counters, "total": {"buckets": buckets(self.request_time)}, "queue": {"buckets": buckets(self.queue_time)}}


def _start(table: dict[str, Any], directory: Path) -> RolloutController:
    config = parse_rollout_config({"interval_s": INTERVAL_S, **table}, source="test")
    versions = resolve_versions(config, (1, 2), source="test")
    idle = SimulatedBatcher().stats()
    return RolloutController(MODEL, config, versions, parse_checks(config.checks), START, directory,
                             champion_stats=idle, challenger_stats=idle, router_seed=3)  # fmt: skip


def _report_inputs(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    body = load_state(state_path(directory, MODEL))
    assert body is not None
    return body, read_audit(audit_path(directory, MODEL)), body["statistics"]


def canary_that_advanced_and_rolled_back(directory: Path) -> RolloutController:
    """Steps pass on an equal challenger; from the third step on it errs more, is slower, and is rolled back."""
    steps = [{"weight": w, "duration_s": 600.0, "min_requests": 200} for w in (10.0, 25.0, 50.0, 100.0)]
    checks = [
        {"name": "errors", "metric": "error_rate", "compare": "champion", "tolerance": 0.01, "min_samples": 200},
        {"name": "p99", "metric": "latency", "quantile": 0.99, "tolerance": 0.2, "min_samples": 200},
    ]
    controller = _start({"strategy": "canary", "champion": 1, "challenger": 2, "steps": steps, "checks": checks}, directory)
    rng, champion, challenger = np.random.default_rng(11), SimulatedBatcher(), SimulatedBatcher()
    now = START
    for _ in range(80):
        if not controller.active:
            break
        now += INTERVAL_S
        broken = controller.step_index >= 2
        share = controller.weights()[2] / 100.0
        to_challenger = int(rng.binomial(3000, share))
        challenger.serve(rng, to_challenger, 0.03 if broken else 0.01, 26.0 if broken else 20.0)
        champion.serve(rng, 3000 - to_challenger, 0.01, 20.0)
        controller.tick(now, champion.stats(), challenger.stats())
    assert controller.state == "rolled_back", controller.status()
    return controller


def shadow_with_flips(directory: Path) -> RolloutController:
    """A shadow whose challenger agrees on ~96% of requests; report-only, so it waits for the operator."""
    checks = [
        {"name": "agreement", "metric": "agreement", "threshold": 0.9, "min_samples": 200, "report_only": True},
        {"name": "paired latency", "metric": "latency_paired", "tolerance": 0.1, "min_samples": 200, "report_only": True},
    ]
    controller = _start({"strategy": "shadow", "champion": 1, "challenger": 2, "checks": checks}, directory)
    rng, champion = np.random.default_rng(5), SimulatedBatcher()
    now = START
    for _ in range(12):
        now += INTERVAL_S
        classes = rng.integers(0, 10, 800)
        moved = rng.random(800) < 0.04
        shifted = np.where(classes < 5, classes + 1, classes - 3)  # flips go to a few neighbours
        controller.statistics.paired.record_classes(classes, np.where(moved, shifted, classes))
        base = rng.lognormal(np.log(0.02), 0.3, 800)
        controller.statistics.paired.record_latencies(base, base * rng.lognormal(0.02, 0.05, 800))
        champion.serve(rng, 800, 0.005, 20.0)
        controller.tick(now, champion.stats(), None)
    controller.pause(now=now + 5.0)
    return controller


@pytest.fixture
def canary(tmp_path: Path) -> tuple[RolloutController, Path]:
    return canary_that_advanced_and_rolled_back(tmp_path), tmp_path


@pytest.fixture
def shadow(tmp_path: Path) -> tuple[RolloutController, Path]:
    return shadow_with_flips(tmp_path), tmp_path


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_canary_report_shows_the_steps_the_rollback_and_every_check(canary: tuple[RolloutController, Path]) -> None:
    controller, directory = canary
    body, decisions, statistics = _report_inputs(directory)
    page = render_rollout_report(controller.status(), decisions, statistics)
    text = _text(page)
    assert "Rollout report: classifier (classifier-canary)" in text
    assert "rolled_back" in text and "the judge rolled back: failed: errors" in text
    actions = [d["action"] for d in decisions]
    advances = actions.count("advance")
    assert advances >= 2 and actions[-1] == "rollback"
    # the weights chart: one step line per version, and markers for the advances and the rollback
    weights = re.search(r'<section id="weights">(.*?)</section>', page).group(1)
    assert weights.count("<polygon") == 2 and "v1" in weights and "v2" in weights  # one stacked band per version
    assert weights.count('stroke="#d62728" stroke-width="2" stroke-dasharray="3 3"') == 1  # the rollback
    assert weights.count('stroke="#222222" stroke-width="2" stroke-dasharray="3 3"') == advances
    # one chart per check, with its band, limit and estimate
    checks = re.search(r'<section id="checks">(.*?)</section>', page).group(1)
    assert checks.count("<svg") == 2 and "<h3>errors: fail</h3>" in checks and "<h3>p99:" in checks
    assert checks.count("<polygon") >= 2 and "confidence sequence" in checks
    # latency distributions of both versions from the status's per-version histograms
    latency = re.search(r'<section id="latency">(.*?)</section>', page).group(1)
    assert "v1 (champion)" in latency and "v2 (challenger)" in latency and latency.count("<tr>") == 5
    assert "<svg" in latency and "since the rollout started" in latency
    # the decisions: holds folded, the rollback row marked
    table = re.search(r'<section id="decisions">(.*?)</section>', page).group(1)
    assert f"{len(decisions)} decisions" in table and '<tr class="bad">' in table
    # the controller logs an unchanged hold once per REPEATED_HOLD_RECORD_S, so here each
    # decision has its row (folding runs of alike holds is tested on a long log below)
    assert table.count("<tr") <= len(decisions) + 1
    assert 'id="flips"' not in page  # no agreement check: no matrix


def test_shadow_report_has_the_flip_matrix_from_the_saved_statistics(shadow: tuple[RolloutController, Path]) -> None:
    controller, directory = shadow
    body, decisions, statistics = _report_inputs(directory)
    paired = statistics["paired"]
    page = render_rollout_report(controller.status(), decisions, statistics)
    matrix = re.search(r'<section id="flips">(.*?)</section>', page).group(1)
    agreed, compared = paired["agreed_classes"], paired["compared_classes"]
    assert f"{agreed} of {compared} paired requests" in matrix and "from the saved statistics" in matrix
    shown = {(int(s), int(t), int(n)) for s, t, n in re.findall(r'title="(\d+) → (\d+): (\d+)"', matrix)}
    assert {(s, t, n) for s, t, n in paired["flips"]} <= shown  # every recorded flip is in a cell
    assert "paused" in _text(page) and "(report only)" in page
    assert "100% of requests is copied to the challenger" in _text(page)


def test_the_status_holds_each_versions_latency_since_the_start_and_survives_a_save(
    canary: tuple[RolloutController, Path],
) -> None:
    controller, directory = canary
    status = controller.status()
    per_version = status["per_version"]
    assert set(per_version) == {"1", "2"}
    assert per_version["1"]["requests"] == status["counts"]["champion_requests"]
    assert per_version["2"]["requests"] == status["counts"]["challenger_requests"]  # the only challenger: its arm
    arm = controller.statistics.challenger.request_time.to_dict()
    assert per_version["2"]["request_time"] == arm and per_version["2"]["queue_time"]["buckets"]
    json.dumps(status)  # plain JSON, as the server sends it
    body, decisions, _ = _report_inputs(directory)
    assert status_from_saved_state(body, decisions)["per_version"]["2"]["request_time"] == arm


def test_from_the_server_documents_alone_latency_is_per_version_and_the_matrix_from_the_checks(
    canary: tuple[RolloutController, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    controller, directory = canary
    decisions = read_audit(audit_path(directory, MODEL))
    page = render_rollout_report({**controller.status(), "traffic": {"champion": 1, "challenger": 2}}, decisions)
    latency = re.search(r'<section id="latency">(.*?)</section>', page).group(1)
    assert "<svg" in latency and "v1 (champion)" in latency and "v2 (challenger)" in latency
    # A status without per-version histograms (an older server) falls back to the checks' quantiles.
    older = {key: value for key, value in controller.status().items() if key != "per_version"}
    latency = re.search(r'<section id="latency">(.*?)</section>', render_rollout_report(older, decisions)).group(1)
    assert "<td>p99</td>" in latency and "<svg" not in latency and "No latency histogram yet" in latency
    shadow_dir = tmp_path_factory.mktemp("shadow")
    shadow = shadow_with_flips(shadow_dir)
    page = render_rollout_report(shadow.status(), read_audit(audit_path(shadow_dir, MODEL)))
    assert "from the latest agreement check" in page and 'title="' in page


def test_a_saved_state_alone_gives_the_summary(canary: tuple[RolloutController, Path]) -> None:
    controller, directory = canary
    body, decisions, statistics = _report_inputs(directory)
    status = status_from_saved_state(body, decisions)
    live = controller.status()
    for key in ("model", "rollout", "strategy", "state", "champion", "challengers", "serving_version", "weights"):
        assert status[key] == live[key], key
    assert status["step"]["index"] == live["step"]["index"] and status["counts"]["looks"] == live["counts"]["looks"]
    page = render_rollout_report(status, decisions, statistics)
    assert "rolled_back" in page and page.count("<svg") == 4


def test_empty_and_odd_inputs_render_without_errors_and_escape_everything() -> None:
    empty = render_rollout_report({}, [])
    assert "No decision records yet" in empty and "The judge has not looked yet" in empty
    odd_decisions = [
        {"time": "soon", "action": "<b>x</b>", "judgement": {"decisions": "none"}},
        {"time": START, "action": "start", "weights": {"1": 100.0, "2": None}, "judgement": None, "reason": "<script>"},
        {"time": START + 60, "action": "hold", "weights": {"1": 100.0}, "judgement": {"decisions": [
            {"check": "<c>", "estimate": None, "lower": None, "upper": None, "limit": float("nan"), "verdict": "?"}]}},
    ]  # fmt: skip
    page = render_rollout_report({"model": "<m>", "step": {"index": "x"}, "last_judgement": [1]}, odd_decisions, {"x": 1})
    assert "<script>" not in page.split("<style>")[1] and "&lt;m&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "No estimate yet" in page


def test_no_scripts_and_no_external_assets(canary: tuple[RolloutController, Path]) -> None:
    controller, directory = canary
    page = render_rollout_report(controller.status(), *_report_inputs(directory)[1:])
    assert "<script" not in page and "src=" not in page and "<link" not in page
    assert not re.search(r"(href|url)\s*[=(]\s*[\"']?https?:", page)
    json.dumps(controller.status())  # the inputs are plain JSON, as the server sends them


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.parametrize("scenario", ["canary", "shadow"])
def test_the_page_renders_in_headless_chromium(scenario: str, tmp_path: Path) -> None:
    build = canary_that_advanced_and_rolled_back if scenario == "canary" else shadow_with_flips
    controller = build(tmp_path)
    body, decisions, statistics = _report_inputs(tmp_path)
    if scenario == "canary":  # as `conveyor rollout report --url` renders it: the server's documents alone
        statistics = None
    page = tmp_path / "report.html"
    page.write_text(render_rollout_report(controller.status(), decisions, statistics))
    png = tmp_path / "report.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3200",
               f"--screenshot={png}", page.as_uri()]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real, non-blank picture
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 3200)
    # Chromium also parses the page into a DOM: every chart survives it as an SVG element.
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p2'}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert dom.returncode == 0 and dom.stdout.count("<svg") == page.read_text().count("<svg") >= 3
    latency = re.search(r'<section id="latency">(.*?)</section>', dom.stdout, re.S).group(1)
    assert latency.count("<svg") == 1 and "v1 (champion)" in latency  # the distributions, per version


def test_a_run_of_alike_holds_is_one_row_of_the_decisions() -> None:
    def hold(minute: int, reason: str) -> dict[str, Any]:
        return {"time": START + 60 * minute, "action": "hold", "state": "paused", "step": 1, "reason": reason,
                "weights": {"1": 50.0, "2": 50.0}, "judgement": {"verdict": "pass", "decisions": []}}  # fmt: skip

    start = {"time": START, "action": "start", "state": "running", "step": 0, "weights": {"1": 90.0, "2": 10.0}}
    heartbeats = [hold(10 * k, f"waiting at the gate, look {k}") for k in range(1, 6)]
    page = render_rollout_report({"model": "m"}, [start, *heartbeats])
    table = re.search(r'<section id="decisions">(.*?)</section>', page).group(1)
    assert "6 decisions" in table
    assert table.count("<tr") == 1 + 2  # the header, the start, one row for the five holds
    assert "look 5" in table and "look 1" not in table  # the run shows its last reason

