"""Values as the HTML reports show them: escaped text, finite numbers, table cells, UTC times.

Shared by the monitoring report (conveyor.monitor.report) and the rollout report
(conveyor.deploy.report), which read the same kinds of JSON documents.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def esc(value: Any) -> str:
    """`value` as text safe inside HTML (attributes included)."""
    return html.escape(str(value), quote=True)


def finite(value: Any) -> float | None:
    """`value` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value) if math.isfinite(value) else None
    except OverflowError:  # an integer beyond float range
        return None


def get(mapping: Any, key: str) -> Any:
    """`mapping[key]` when `mapping` is a mapping that has it, else None (documents may be odd)."""
    return mapping.get(key) if isinstance(mapping, Mapping) else None


def cell(value: Any, digits: int = 4) -> str:
    """A cell's text, escaped: floats to `digits` significant digits, null as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def utc_time(value: Any) -> str:
    """Seconds since the epoch as "YYYY-mm-dd HH:MM:SS UTC"; anything else as its cell text."""
    number = finite(value)
    if number is None:
        return cell(value)
    try:
        return datetime.fromtimestamp(number, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return cell(value)
