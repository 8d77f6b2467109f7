"""Inline SVG charts for the rollout report: axes, lines, step bands and shaded bounds.

`Plot` maps data to pixels over a fixed-width chart and collects SVG elements; the report
(`conveyor.deploy.report`) fills one per chart and takes `svg()`. Every text is escaped.
Time axes are seconds since the rollout started, labelled h:mm:ss at round steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from conveyor.report_values import esc

__all__ = ["BAND_COLOR", "Plot", "elapsed", "esc", "step_band", "ticks", "y_range"]

WIDTH, LEFT, RIGHT = 760, 64, 16  # every chart: its width and margins (px)
TIME_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
BAND_COLOR = "#c6dbef"


def elapsed(seconds: float) -> str:
    """Seconds since the start as h:mm:ss (m:ss under an hour)."""
    whole = int(round(max(seconds, 0.0)))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    span = high - low if high > low else abs(high) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def _tick_text(value: float, step: float) -> str:
    if abs(value) < step * 1e-6:
        return "0"
    return f"{value:.3g}" if abs(value) >= 1e-3 or abs(value) >= step else f"{value:.2e}"


class Plot:
    """One chart's geometry: data (x, y) to pixels over a plot area inside WIDTH x height."""

    def __init__(self, title: str, height: int, x_range: tuple[float, float], y_range: tuple[float, float],
                 top: int = 30, bottom: int = 42) -> None:  # fmt: skip
        self.title, self.height, self.top = title, height, top
        self.plot_w, self.plot_h = WIDTH - LEFT - RIGHT, height - top - bottom
        self.x0, self.x1 = x_range if x_range[1] > x_range[0] else (x_range[0] - 1, x_range[0] + 1)
        self.y0, self.y1 = y_range if y_range[1] > y_range[0] else (y_range[0] - 1, y_range[0] + 1)
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
                      f'viewBox="0 0 {WIDTH} {height}" role="img"><title>{esc(title)}</title>']

    def x(self, value: float) -> float:
        return LEFT + self.plot_w * (value - self.x0) / (self.x1 - self.x0)

    def y(self, value: float) -> float:
        clipped = min(max(value, self.y0), self.y1)
        return self.top + self.plot_h - self.plot_h * (clipped - self.y0) / (self.y1 - self.y0)

    def y_axis(self, ticks: Sequence[float], label: str, text=None) -> None:
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for tick in ticks:
            if self.y0 - 1e-12 <= tick <= self.y1 + 1e-12:
                y = self.y(tick)
                shown = text(tick) if text else _tick_text(tick, step)
                self.parts.append(f'<line x1="{LEFT}" x2="{LEFT + self.plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                                  f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{esc(shown)}</text>')
        middle = self.top + self.plot_h / 2
        if label:
            self.parts.append(f'<text x="12" y="{middle:.1f}" text-anchor="middle" '
                              f'transform="rotate(-90 12 {middle:.1f})">{esc(label)}</text>')

    def x_axis(self, labels: Iterable[tuple[float, str]], caption: str) -> None:
        base = self.top + self.plot_h
        self.parts.append(f'<line x1="{LEFT}" x2="{LEFT + self.plot_w}" y1="{base}" y2="{base}" class="axis"/>')
        for value, text in labels:
            x = self.x(value)
            anchor = "start" if x < LEFT + 20 else "end" if x > LEFT + self.plot_w - 20 else "middle"
            self.parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" class="axis"/>'
                              f'<text x="{x:.1f}" y="{base + 16}" text-anchor="{anchor}">{esc(text)}</text>')
        self.parts.append(f'<text x="{LEFT + self.plot_w / 2:.1f}" y="{base + 34}" text-anchor="middle" class="caption">'
                          f"{esc(caption)}</text>")

    def time_axis(self) -> None:
        """Ticks at round elapsed times (seconds since the start on x)."""
        step = next((s for s in TIME_STEPS_S if self.x1 / s <= 8), TIME_STEPS_S[-1] * math.ceil(self.x1 / 8 / TIME_STEPS_S[-1]))
        ticks = [i * step for i in range(int(self.x1 // step) + 1)]
        self.x_axis(((t, elapsed(t)) for t in ticks), "time since the rollout started (h:mm:ss)")

    def caption(self, text: str) -> None:
        """What the y axis measures, above the plot's top left corner."""
        self.parts.append(f'<text x="{LEFT}" y="{self.top - 8}" class="caption">{esc(text)}</text>')

    def legend(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """Entries of (label, color, kind: "line", "dash", "band" or "dot") in a row above the plot."""
        x = LEFT
        for label, color, kind in entries:
            if kind == "band":
                mark = f'<rect x="{x}" y="8" width="16" height="10" fill="{color}"/>'
            elif kind == "dot":
                mark = f'<circle cx="{x + 8}" cy="13" r="4" fill="{color}"/>'
            else:
                dash = ' stroke-dasharray="5 3"' if kind == "dash" else ""
                mark = f'<line x1="{x}" x2="{x + 16}" y1="13" y2="13" stroke="{color}" stroke-width="2.5"{dash}/>'
            self.parts.append(f'{mark}<text x="{x + 21}" y="17">{esc(label)}</text>')
            x += 34 + 6.5 * len(label)

    def path(self, points: Sequence[tuple[float, float | None]], color: str, *, step: bool = False,
             dash: bool = False, width: float = 2.0) -> None:  # fmt: skip
        """A line through the points (a step line when `step`); None values break it."""
        commands, previous = [], None
        for x_value, y_value in points:
            if y_value is None:
                previous = None
                continue
            x, y = self.x(x_value), self.y(y_value)
            if previous is None:
                commands.append(f"M{x:.1f},{y:.1f}")
            elif step:
                commands.append(f"H{x:.1f}V{y:.1f}")
            else:
                commands.append(f"L{x:.1f},{y:.1f}")
            previous = (x, y)
        if commands:
            dashes = ' stroke-dasharray="6 4"' if dash else ""
            self.parts.append(f'<path d="{"".join(commands)}" fill="none" stroke="{color}" '
                              f'stroke-width="{width}"{dashes}/>')

    def band(self, points: Sequence[tuple[float, float | None, float | None]]) -> None:
        """A shaded area between lower and upper; a missing bound is the plot's edge (unbounded)."""
        run: list[tuple[float, float, float]] = []
        for x_value, lower, upper in [*points, (math.nan, None, None)]:
            if math.isnan(x_value) or (lower is None and upper is None):
                if len(run) > 1:
                    top = " ".join(f"{self.x(x):.1f},{self.y(u):.1f}" for x, _, u in run)
                    under = " ".join(f"{self.x(x):.1f},{self.y(lo):.1f}" for x, lo, _ in reversed(run))
                    self.parts.append(f'<polygon points="{top} {under}" fill="{BAND_COLOR}" fill-opacity="0.7"/>')
                run = []
                continue
            run.append((x_value, self.y0 if lower is None else lower, self.y1 if upper is None else upper))

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def y_range(values: Iterable[float], *, floor: float | None = None, ceiling: float | None = None) -> tuple[float, float]:
    numbers = [v for v in values if v is not None]
    low, high = (min(numbers), max(numbers)) if numbers else (0.0, 1.0)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    low, high = low - pad, high + pad
    if floor is not None:
        low = max(low, floor)
    if ceiling is not None:
        high = min(high, ceiling)
    return low, high


def step_band(plot: Plot, times: list[float], end: float, lower: list[float], upper: list[float], color: str) -> str:
    """A band between two step lines (each value held until the next time), up to `end`."""
    def outline(values: list[float]) -> list[tuple[float, float]]:
        points = []
        for i, value in enumerate(values):
            until = times[i + 1] if i + 1 < len(times) else end
            points += [(times[i], value), (until, value)]
        return points

    edge = outline(upper) + outline(lower)[::-1]
    points = " ".join(f"{plot.x(t):.1f},{plot.y(v):.1f}" for t, v in edge)
    return f'<polygon points="{points}" fill="{color}" fill-opacity="0.85"/>'
