"""Delayed ground truth: join labels that arrive later to the predictions they judge.

The request path calls `FeedbackStore.record` once per prediction (O(1), no I/O); a
client later posts labels by request id (`add_labels`). A joined pair becomes a row
for the sink (the capture writer, to train on) and a point of the realized metric:
accuracy for classifiers, mean absolute error for regressors, over the last `window`
joined labels. Every label is accounted for exactly once:

| outcome   | when                                                                     |
|-----------|--------------------------------------------------------------------------|
| joined    | the id was pending: its prediction is now labeled                        |
| duplicate | the id already got a label (remembered among the recent labeled ids)    |
| late      | the id expired before its label came (remembered among recent expiries) |
| unknown   | the id was never recorded, or was forgotten long ago                    |
| invalid   | the item itself is malformed; `errors` says which item and what is wrong |

Pending predictions expire `ttl_s` after they were recorded, checked lazily on every
call (and by `expire`); beyond `max_pending` the oldest are evicted and counted as
expired too. The recent labeled and recent expired ids are each bounded by
`max_pending` as well, so memory stays bounded whatever clients send.

Under a rollout several versions of a model answer, each recording into its own store:
`add_labels(items, then=[other versions' stores])` hands each label to the store that
recorded its id, still counting every label exactly once, and `on_joined` hands the
joined rows to a caller that wants them (the rollout's judge: accuracy or MAE per version).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from conveyor.errors import ConfigError, InvalidInput

logger = logging.getLogger(__name__)

__all__ = ["FeedbackStore"]

KINDS = ("classification", "regression")
METRIC_BY_KIND = {"classification": "accuracy", "regression": "mae"}

# An add_labels answer lists at most this many per-item errors (and says how many more),
# so a large malformed body cannot produce a larger response.
MAX_ERRORS = 100


# A pending prediction: (deadline in clock() seconds, prediction, version, timestamp_ns).
# A plain tuple: a NamedTuple's constructor costs more than the rest of record().
_Pending = tuple[float, Any, int, int]


class _RecentIds:
    """An insertion-ordered set of at most `capacity` ids: adding beyond it forgets the oldest."""

    __slots__ = ("_capacity", "_ids")

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids


class FeedbackStore:
    """Pending predictions of one model, joined to labels that arrive later.

    Thread-safe: one lock guards the state; `record` holds it for a few dict operations,
    `add_labels` for the lookups of its items. The sink is called outside the lock from
    the thread that called `add_labels` (so possibly from several threads at once).
    """

    def __init__(
        self,
        *,
        kind: str,
        labels: Sequence[str] | None = None,
        ttl_s: float = 3600.0,
        max_pending: int = 100_000,
        window: int = 1000,
        reference_value: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sink: Callable[[list[dict]], None] | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        """`kind`: "classification" (predictions and labels are class indices; `labels`
        names the classes so a label may also be a name) or "regression" (numbers).
        `clock` times expiry (seconds, monotonic); `wall_clock_ns` stamps the joined rows.
        `reference_value`: the expected metric; without it, the first full window's value.
        Raises ConfigError for a bad argument."""
        if kind not in KINDS:
            raise ConfigError(f"feedback kind must be 'classification' or 'regression', got {kind!r}")
        if labels is not None:
            if kind != "classification":
                raise ConfigError("feedback labels (class names) apply to kind 'classification' only")
            labels = [str(name) for name in labels]
            repeated = sorted(name for name, count in Counter(labels).items() if count > 1)
            if repeated:
                raise ConfigError(f"feedback labels must be unique class names; repeated: {repeated}")
        if not ttl_s > 0:
            raise ConfigError(f"feedback ttl_s must be > 0 seconds, got {ttl_s!r}")
        if max_pending < 1:
            raise ConfigError(f"feedback max_pending must be >= 1, got {max_pending!r}")
        if window < 1:
            raise ConfigError(f"feedback window must be >= 1 label, got {window!r}")
        self.kind = kind
        self.metric = METRIC_BY_KIND[kind]
        self._labels = labels
        self._index_by_name = {name: index for index, name in enumerate(labels or ())}
        self._ttl_s = float(ttl_s)
        self._max_pending = max_pending
        self._window = window
        self._clock = clock
        self._wall_clock_ns = wall_clock_ns
        self._sink = sink
        self._lock = threading.Lock()
        # Insertion order is expiry order: every entry gets the same ttl from a monotonic clock.
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._labeled = _RecentIds(max_pending)
        self._expired = _RecentIds(max_pending)
        # Per joined label: 1.0/0.0 (correct) or the absolute error; only finite values.
        self._scores: deque[float] = deque(maxlen=window)
        self._reference_value = None if reference_value is None else float(reference_value)
        self._counts = dict.fromkeys(("joined", "duplicates", "late", "unknown", "invalid", "expired"), 0)
        self._sink_errors = 0

    # -- request path -------------------------------------------------------------------

    def record(self, request_id: str, prediction: float, version: int, timestamp_ns: int) -> None:
        """Remember one prediction until its label comes or it expires.

        `prediction`: the predicted class index (classification) or value (regression).
        Recording an id again replaces the earlier prediction and restarts its ttl.
        """
        now = self._clock()
        entry = (now + self._ttl_s, prediction, version, timestamp_ns)
        with self._lock:
            pending = self._pending
            if pending and next(iter(pending.values()))[0] <= now:
                self._expire_locked(now)
            size = len(pending)
            pending[request_id] = entry
            if len(pending) == size:  # an existing id keeps its place unless moved
                pending.move_to_end(request_id)
            elif size == self._max_pending:
                evicted_id, _ = pending.popitem(last=False)
                self._expired.add(evicted_id)
                self._counts["expired"] += 1

    # -- labels ---------------------------------------------------------------------------

    def add_labels(
        self,
        items: Iterable[Mapping[str, Any]] | Mapping[str, Any],
        *,
        then: Sequence[FeedbackStore] = (),
        on_joined: Callable[[list[dict]], None] | None = None,
    ) -> dict:
        """Join labels ({"id": request id, "label": class index or name, or a number}).

        `items`: a list of such objects, or one object. Returns the count of each outcome
        and `errors`, one message per invalid item (its index and what is wrong). Raises
        InvalidInput when `items` is neither a list nor an object.

        `then`: the stores of other versions of the model (under a rollout several answer),
        tried in order for the labels whose id this store never saw (not pending, labeled
        or expired here): each label is joined by the first store that knows its id (when
        two recorded it, as a shadow copy does, the first), and a label none knows is
        unknown, so every item is counted exactly once over all the stores. Each store
        parses the items it is handed: one a later store cannot parse (its version names
        the classes differently) is counted invalid there.

        `on_joined`: called by each store with the rows it joined (as the sink gets them),
        after the sink, outside the lock; its failure is logged, never raised (the labels
        are joined already, and an error would make the client send them again).
        """
        stores = [self, *then]
        remaining = list(enumerate(_as_list(items)))
        total = {"joined": 0, "duplicates": 0, "late": 0, "unknown": 0, "invalid": 0}
        errors: list[tuple[int, str]] = []
        for position, store in enumerate(stores):
            last = position == len(stores) - 1
            outcome, found, remaining = store._add_indexed(remaining, pass_unknown=not last, on_joined=on_joined)
            for key, count in outcome.items():
                total[key] += count
            errors += found
            if not remaining:
                break
        return {**total, "errors": _listed_errors(sorted(errors))}

    def join_known(
        self, items: Any, *, indexed: bool = False
    ) -> tuple[dict[str, int], list[tuple[int, str]], list[tuple[int, Any]]]:
        """Join the labels whose id this store knows (pending, labeled or expired here) and
        hand back the others, for stores in other processes to try (the replicas of a
        deployment): (outcome counts, (index, error) of each invalid item, the (index,
        item) pairs this store never saw). `items` as for add_labels, or (index, item)
        pairs with `indexed`. Finish with `settle` once the others have answered."""
        pairs = list(items) if indexed else list(enumerate(_as_list(items)))
        return self._add_indexed(pairs, pass_unknown=True)

    def settle(self, outcome: dict[str, int], errors: list[tuple[int, str]], *, unknown: int) -> dict:
        """The add_labels answer for labels joined here and elsewhere (`outcome` summed over
        the stores); `unknown` labels no store knew are counted here."""
        with self._lock:
            self._counts["unknown"] += unknown
        return {**outcome, "unknown": outcome.get("unknown", 0) + unknown, "errors": _listed_errors(sorted(errors))}

    def _add_indexed(
        self,
        indexed: list[tuple[int, Any]],
        *,
        pass_unknown: bool = False,
        on_joined: Callable[[list[dict]], None] | None = None,
    ) -> tuple[dict[str, int], list[tuple[int, str]], list[tuple[int, Any]]]:
        """Joins (index in the caller's body, item) pairs: (outcome counts, (index, error)
        of each invalid item, the items whose id this store never saw).

        `pass_unknown`: an id this store does not know is handed back instead of counted
        as unknown, for the next version's store to try (`add_labels(..., then=...)`).
        """
        parsed: list[tuple[int, Any, str, float | int]] = []
        errors: list[tuple[int, str]] = []
        for index, item in indexed:
            result = self._parse_item(index, item)
            if isinstance(result, str):
                errors.append((index, result))
            else:
                parsed.append((index, item, *result))
        outcome = {"joined": 0, "duplicates": 0, "late": 0, "unknown": 0, "invalid": len(errors)}
        rows: list[dict] = []
        passed: list[tuple[int, Any]] = []
        now = self._clock()
        label_timestamp_ns = self._wall_clock_ns()
        with self._lock:
            self._expire_locked(now)
            for index, item, request_id, label in parsed:
                entry = self._pending.pop(request_id, None)
                if entry is not None:
                    rows.append(self._join_locked(request_id, entry, label, label_timestamp_ns))
                    outcome["joined"] += 1
                elif request_id in self._labeled:
                    outcome["duplicates"] += 1
                elif request_id in self._expired:
                    outcome["late"] += 1
                elif pass_unknown:
                    passed.append((index, item))
                else:
                    outcome["unknown"] += 1
            for key, count in outcome.items():
                self._counts[key] += count
        if rows and self._sink is not None:
            self._deliver(rows)
        if rows and on_joined is not None:
            try:
                on_joined(rows)
            except Exception:  # as for the sink: the labels are joined, a retry would only duplicate them
                logger.exception("feedback listener failed on %d joined rows", len(rows))
        return outcome, errors, passed

    def _parse_item(self, index: int, item: Any) -> tuple[str, float | int] | str:
        """(request id, label as class index or float), or the error message for the item."""
        where = f"items[{index}]"
        if not isinstance(item, Mapping):
            return f"{where}: expected an object with 'id' and 'label', got {_describe(item)}"
        if "id" not in item:
            return f"{where}: 'id' is missing (the request id of the labeled prediction)"
        request_id = item["id"]
        if not isinstance(request_id, str) or not request_id:
            return f"{where}: 'id' must be a non-empty string (a request id), got {_describe(request_id)}"
        if "label" not in item:
            return f"{where}: 'label' is missing"
        label = item["label"]
        if self.kind == "regression":
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                return f"{where}: 'label' must be a number for a regression model, got {_describe(label)}"
            if not math.isfinite(label):
                return f"{where}: 'label' must be a finite number, got {_describe(label)}"
            return request_id, float(label)
        class_index = self._class_index(label)
        if isinstance(class_index, str):
            return f"{where}: {class_index}"
        return request_id, class_index

    def _class_index(self, label: Any) -> int | str:
        """The class index a classification label means, or what is wrong with it."""
        if isinstance(label, str):
            if label in self._index_by_name:
                return self._index_by_name[label]
            if self._labels is None:
                return f"'label' {label!r} is a class name, but the model has no class names; send the class index"
            known = ", ".join(repr(name) for name in self._labels[:10])
            more = ", ..." if len(self._labels) > 10 else ""
            return f"'label' {label!r} is not a class name (known: {known}{more}); or send the class index"
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            return f"'label' must be a class index or class name, got {_describe(label)}"
        if label < 0 or (self._labels is not None and label >= len(self._labels)):
            valid = "0 or more" if self._labels is None else f"0..{len(self._labels) - 1}"
            return f"'label' {label} is not a class index (valid: {valid})"
        return label

    def _join_locked(self, request_id: str, entry: _Pending, label: float, label_timestamp_ns: int) -> dict:
        """The sink row of a joined label; updates the realized metric. Lock held."""
        self._labeled.add(request_id)
        _, prediction, version, timestamp_ns = entry
        row = {
            "request_id": request_id,
            "version": version,
            "prediction": prediction,
            "label": label,
            "request_timestamp_ns": timestamp_ns,
            "label_timestamp_ns": label_timestamp_ns,
        }
        if self.kind == "classification":
            correct = bool(prediction == label)
            row["correct"] = correct
            score = 1.0 if correct else 0.0
        else:
            score = float(abs(prediction - label))
            row["abs_error"] = score
        # A non-finite prediction is joined (the row is evidence) but kept out of the metric.
        if math.isfinite(score):
            self._scores.append(score)
            if self._reference_value is None and len(self._scores) == self._window:
                self._reference_value = math.fsum(self._scores) / self._window
        return row

    def _deliver(self, rows: list[dict]) -> None:
        """Hand rows to the sink; its failure is logged and counted, never raised: the
        labels are joined already, and an error would make the client send them again."""
        try:
            self._sink(rows)
        except Exception:
            with self._lock:
                self._sink_errors += 1
            logger.exception("feedback sink failed on %d joined rows; they are not captured", len(rows))

    # -- expiry and state -----------------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Expire the predictions whose ttl has passed at `now` (default: the clock); returns how many."""
        with self._lock:
            return self._expire_locked(self._clock() if now is None else now)

    def _expire_locked(self, now: float) -> int:
        pending = self._pending
        expired = 0
        while pending:
            request_id, entry = next(iter(pending.items()))
            if entry[0] > now:
                break
            pending.popitem(last=False)
            self._expired.add(request_id)
            expired += 1
        self._counts["expired"] += expired
        return expired

    @property
    def labeled_rows_total(self) -> int:
        """Joined labels since the store was made (the retraining policy's counter)."""
        return self._counts["joined"]

    @property
    def sink_errors(self) -> int:
        """Times the sink raised (its rows were not captured)."""
        return self._sink_errors

    def snapshot(self) -> dict:
        """The "feedback" object of the monitor document; `value` is null before any label."""
        with self._lock:
            self._expire_locked(self._clock())
            count = len(self._scores)
            value = math.fsum(self._scores) / count if count else None
            return {
                "kind": self.kind,
                "pending": len(self._pending),
                **self._counts,
                "metric": self.metric,
                "value": value,
                "window_labels": count,
                "reference_value": self._reference_value,
            }


def _listed_errors(errors: list[tuple[int, str]]) -> list[str]:
    """The answer's error messages, at most MAX_ERRORS of them and a line saying how many more."""
    messages = [message for _, message in errors]
    if len(messages) > MAX_ERRORS:
        return messages[:MAX_ERRORS] + [f"... and {len(messages) - MAX_ERRORS} more invalid items"]
    return messages


def _as_list(items: Any) -> list:
    """The items of a labels body: a list (or other iterable) of objects, or one object."""
    if isinstance(items, Mapping):
        return [items]
    if isinstance(items, (str, bytes, bytearray)) or not isinstance(items, Iterable):
        raise InvalidInput(
            f"feedback: expected a list of objects like {{\"id\": \"<request id>\", \"label\": ...}} "
            f"(or one such object), got {_describe(items)}"
        )
    return list(items)


def _describe(value: Any) -> str:
    """A short, JSON-flavoured rendering of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    return f"a value of type {type(value).__name__}"
