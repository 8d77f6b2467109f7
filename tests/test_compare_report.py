"""conveyor.profile.compare_report: the Markdown and HTML reports of a comparison, and the page in Chromium.

The bundles are simulated machines (tests/test_compare.py's `make_bundle`): a one-core
and a two-core box, priced. No timing thresholds: the render time is reported by the CLI,
not asserted.
"""

from __future__ import annotations

import importlib.util

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare import make_bundle

from conveyor.profile.bundle import read_bundle
from conveyor.profile.compare import CompareResult, Price, compare_bundles
from conveyor.profile.compare_report import (
    PlottingUnavailable,
    dollars,
    render_html,
    render_markdown,
    render_text,
    svg_count,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PRICES = {"small-box": Price("small-box", 0.0893, "2025-06", "public on-demand list price", "us-east-1"),
          "big-box": Price("big-box", 0.1785, "2025-06")}  # fmt: skip

NEEDS_MATPLOTLIB = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the HTML report draws with matplotlib: pip install '.[profile]'",
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> CompareResult:
    root = tmp_path_factory.mktemp("bundles")
    base = make_bundle(root / "one-core", service_rate_qps=400.0, seed=1, system_name="small-box", cpu_quota_cores=1.0)
    cand = make_bundle(root / "two-cores", service_rate_qps=600.0, seed=2, system_name="big-box", cpu_quota_cores=2.0)
    return compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))], prices=PRICES)


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_markdown_holds_the_bundles_the_verdicts_the_fingerprint_and_the_traces(result: CompareResult) -> None:
    text = render_markdown(result)
    assert text.startswith("# Comparison against one-core")
    assert "| two-cores | capacity (queries/s at the objective) |" in text and "| better |" in text
    assert "| cgroup CPU quota (cores) | 1 | 2 | machine.cgroup.cpu_quota_cores |" in text
    assert "one-core/bundle.json: peak.capacity_qps_per_repetition" in text
    assert "price table entry 'big-box' (dated 2025-06)" in text
    cost = result.views[0].cost_per_1000
    assert dollars(cost.value) in text and f"seed {result.seed}" in text


def test_terminal_text_gives_each_value_and_verdict(result: CompareResult) -> None:
    text = render_text(result)
    assert "baseline  one-core: capacity" in text and "candidate two-cores: capacity" in text
    assert re.search(r"two-cores capacity .*x the baseline, better", text)
    assert re.search(r"two-cores p99 latency .*x the baseline, better, at server runs offered 100", text)


def test_dollars_are_fixed_point_with_three_significant_digits() -> None:
    assert [dollars(v) for v in (0.0000804, 0.0123, 1.5, 12.345, 1234.5)] == [
        "$0.0000804", "$0.0123", "$1.50", "$12.35", "$1234"]  # fmt: skip


@NEEDS_MATPLOTLIB
def test_html_page_has_every_plot_as_inline_svg_and_no_external_assets(result: CompareResult) -> None:
    page = render_html(result)
    sections = re.findall(r'<section id="([^"]+)">', page)
    assert sections == ["bundles", "comparisons", "plot-capacity", "plot-cost", "plot-throughput", "plot-cdf",
                        "plot-batches", "plot-utilisation", "machines", "method", "trace"]  # fmt: skip
    for key in ("capacity", "cost", "throughput", "cdf", "batches", "utilisation"):
        section = re.search(rf'<section id="plot-{key}">(.*?)</section>', page, re.S).group(1)
        assert section.count("<svg") == 1, key
    assert svg_count(page) == 6
    assert "<script" not in page and "<img" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"""(href|src)\s*=\s*["']?(https?:|//)|url\(\s*["']?(https?:|//)""", page)  # nothing fetched
    assert 'class="good"' in page  # the candidate's better rows are marked
    assert "two-cores vs one-core" in _text(page)  # the CDF panel's title


@NEEDS_MATPLOTLIB
def test_html_without_prices_or_latencies_says_what_is_missing(tmp_path: Path) -> None:
    base = make_bundle(tmp_path / "a", service_rate_qps=400.0, scenario="offline", find_peak=False)
    cand = make_bundle(tmp_path / "b", service_rate_qps=500.0, scenario="offline", find_peak=False)
    result = compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))])
    page = render_html(result)
    assert "No price table given (--prices)" in page
    assert "No load both bundles ran" in page and "No find-peak trials or server runs recorded" in page
    assert "latency measures the backlog" in _text(page)
    assert svg_count(page) == 3  # throughput per bundle, batch sizes, utilisation


@NEEDS_MATPLOTLIB
def test_every_value_from_a_bundle_is_escaped(tmp_path: Path) -> None:
    odd = "<script>alert(1)</script>"
    base = make_bundle(tmp_path / "a&b", service_rate_qps=400.0, system_name=odd)
    cand = make_bundle(tmp_path / "c", service_rate_qps=500.0, settings={"max_batch_size": odd})
    page = render_html(compare_bundles([(str(base), read_bundle(base)), (str(cand), read_bundle(cand))]))
    assert odd not in page and "&lt;script&gt;" in page and "a&amp;b" in page


def test_a_missing_matplotlib_is_a_clear_error_naming_the_extra(result: CompareResult,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    with pytest.raises(PlottingUnavailable, match=r"pip install 'conveyor-serve\[profile\]'"):
        render_html(result)
    assert render_markdown(result)  # the Markdown report needs nothing


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@NEEDS_MATPLOTLIB
def test_the_page_renders_in_headless_chromium(result: CompareResult, tmp_path: Path) -> None:
    page = tmp_path / "compare.html"
    page.write_text(render_html(result), encoding="utf-8")
    png = tmp_path / "compare.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3800",
               f"--screenshot={png}", page.as_uri()]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100_000  # a real picture with plots, not a blank page
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 3800)
    _assert_plots_are_drawn(png)
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p2'}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert dom.returncode == 0 and svg_count(dom.stdout) == 6  # every plot survives Chromium's parser


def _assert_plots_are_drawn(png: Path) -> None:
    """The series colours of both bundles cover a visible area of the screenshot (where Pillow is installed)."""
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(png) as image:
        colors = dict((color, count) for count, color in image.convert("RGB").getcolors(1 << 24))
    counts = [colors.get(color, 0) for color in ((0x4C, 0x78, 0xA8), (0xF5, 0x85, 0x18))]
    assert all(count > 5_000 for count in counts), counts
