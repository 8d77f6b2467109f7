"""`conveyor compare` on the command line: reports written, the CI gate's exit status, bad input as exit 2.

The bundles are simulated machines (tests/test_compare.py's `make_bundle`), written once
per module; every call goes through `compare_cli.main`.
"""

from __future__ import annotations

import importlib.util

import json
from pathlib import Path

import pytest
from test_compare import make_bundle

from conveyor.profile.compare_cli import main

EXAMPLE_PRICES = Path(__file__).resolve().parent.parent / "examples" / "prices" / "cloud_prices_2026.toml"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bundles")
    made = {
        "base": make_bundle(root / "base", service_rate_qps=500.0, seed=1),
        "same": make_bundle(root / "same", service_rate_qps=500.0, seed=2),
        "slower": make_bundle(root / "slower", service_rate_qps=350.0, seed=3),
        "other_model": make_bundle(root / "other-model", service_rate_qps=500.0, seed=4, model_sha256="7" * 64),
        "single_stream": make_bundle(root / "single-stream", service_rate_qps=500.0, seed=5, scenario="single-stream",
                                     find_peak=False),  # fmt: skip
    }
    return {name: str(path) for name, path in made.items()}


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="the HTML report draws with matplotlib: pip install '.[profile]'")
def test_reports_are_written_and_the_verdicts_printed(bundles: dict[str, str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    markdown, page, data = (tmp_path / "out" / f"compare.{ext}" for ext in ("md", "html", "json"))
    code = main([bundles["base"], bundles["slower"], "--prices", str(EXAMPLE_PRICES),
                 "--machine", f"{bundles['base']}=c7i.xlarge", "--machine", f"{bundles['slower']}=m7i.xlarge",
                 "--markdown", str(markdown), "--html", str(page), "--json", str(data)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "slower capacity (queries/s at the objective):" in out and "worse" in out
    assert "per 1,000 inferences" in out and f"wrote the Markdown report to {markdown}" in out
    assert "wrote the HTML report (6 plots)" in out
    assert "c7i.xlarge" in markdown.read_text() and page.read_text().count("<svg") == 6
    document = json.loads(data.read_text())
    assert [b["price"]["name"] for b in document["bundles"]] == ["c7i.xlarge", "m7i.xlarge"]
    capacity = document["comparisons"][0]["ratios"][0]
    assert capacity["metric"] == "capacity_qps" and capacity["verdict"] == "worse"
    low, high = capacity["ratio"]["ci95"]
    assert low <= capacity["ratio"]["value"] <= high < 1.0


def test_a_regression_beyond_the_tolerance_exits_1(bundles: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([bundles["base"], bundles["slower"], "--fail-on-regression", "5"]) == 1
    assert "regression: slower: capacity" in capsys.readouterr().err
    assert main([bundles["base"], bundles["slower"], "--fail-on-regression", "5", "--metric", "p99"]) == 1
    assert main([bundles["base"], bundles["slower"], "--fail-on-regression", "60"]) == 0  # 0.7x is within 60%


def test_no_regression_between_runs_of_the_same_machine(bundles: dict[str, str]) -> None:
    assert main([bundles["base"], bundles["same"], "--fail-on-regression", "5"]) == 0
    assert main([bundles["base"], bundles["same"], "--fail-on-regression", "5", "--metric", "p99"]) == 0


def test_a_gate_that_cannot_judge_exits_2(bundles: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([bundles["base"], bundles["single_stream"], "--fail-on-regression", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot judge capacity" in err and "single-stream: p90 latency (ms) not compared" in err


def test_different_models_exit_2_unless_allowed(bundles: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([bundles["base"], bundles["other_model"]]) == 2
    assert "different models" in capsys.readouterr().err
    assert main([bundles["base"], bundles["other_model"], "--allow-different-models"]) == 0
    assert "warning: DIFFERENT MODELS compared" in capsys.readouterr().out


def test_not_a_bundle_and_a_newer_format_exit_2(bundles: dict[str, str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main([bundles["base"], str(tmp_path)]) == 2
    assert f"{tmp_path} is not a bundle" in capsys.readouterr().err
    newer = tmp_path / "newer"
    newer.mkdir()
    document = json.loads((Path(bundles["base"]) / "bundle.json").read_text())
    (newer / "bundle.json").write_text(json.dumps({**document, "format_version": 99}))
    assert main([bundles["base"], str(newer)]) == 2
    assert "newer than this conveyor reads" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prices", "PRICES"], "the price table has no machine 'test-machine'"),
        (["--prices", "missing.toml"], "missing.toml does not exist"),
        (["--machine", "no-equals-sign"], "is not BUNDLE=NAME"),
        (["--fail-on-regression", "150"], "expected a percentage"),
        (["--metric", "p50"], "invalid choice: 'p50'"),
    ],
)
def test_bad_flags_exit_2_with_a_message(bundles: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         extra: list[str], message: str) -> None:  # fmt: skip
    extra = [str(EXAMPLE_PRICES) if e == "PRICES" else str(tmp_path / e) if e.endswith(".toml") else e for e in extra]
    with pytest.raises(SystemExit) as raised:
        code = main([bundles["base"], bundles["same"], *extra])
        raise SystemExit(code)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_the_example_price_table_reads_and_every_entry_is_dated() -> None:
    from conveyor.profile.compare import read_price_table

    prices = read_price_table(EXAMPLE_PRICES)
    assert len(prices) >= 10 and all(p.dated and p.region and p.source for p in prices.values())
    assert {"m7i.xlarge", "n2-standard-4", "Standard_D4s_v5", "g4dn.xlarge"} <= set(prices)


def test_flags_from_the_environment_are_checked(bundles: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("CONVEYOR_METRIC", "p50")
    assert main([bundles["base"], bundles["same"]]) == 2
    assert "CONVEYOR_METRIC='p50' is not one of capacity, p99" in capsys.readouterr().err
    monkeypatch.setenv("CONVEYOR_METRIC", "p99")
    monkeypatch.setenv("CONVEYOR_FAIL_ON_REGRESSION", "5")
    assert main([bundles["base"], bundles["slower"]]) == 1  # the p99 gate, from the environment
    monkeypatch.setenv("CONVEYOR_FAIL_ON_REGRESSION", "lots")
    assert main([bundles["base"], bundles["same"]]) == 2
    assert "CONVEYOR_FAIL_ON_REGRESSION='lots' is not valid for --fail-on-regression" in capsys.readouterr().err
