"""FeedbackStore: every label outcome, expiry and eviction, the realized metric, the sink
rows, validation messages, and exact accounting under many threads. Clocks are injected."""

from __future__ import annotations

import math
import threading

import pytest

from conveyor.errors import ConfigError, InvalidInput
from conveyor.monitor.feedback import MAX_ERRORS, FeedbackStore


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _store(**options) -> tuple[FeedbackStore, FakeClock, list[dict]]:
    clock = FakeClock()
    rows: list[dict] = []
    defaults = {"kind": "classification", "clock": clock, "sink": rows.extend, "wall_clock_ns": lambda: 5_000}
    return FeedbackStore(**{**defaults, **options}), clock, rows


def _outcome(joined=0, duplicates=0, late=0, unknown=0, invalid=0) -> dict:
    return {"joined": joined, "duplicates": duplicates, "late": late, "unknown": unknown, "invalid": invalid}


def _counts(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "errors"}


def test_join_produces_a_sink_row_and_counts():
    store, _, rows = _store(labels=["cat", "dog", "bird"])
    store.record("a", 1.0, 3, 111)
    store.record("b", 2.0, 3, 222)

    result = store.add_labels([{"id": "a", "label": 1}, {"id": "b", "label": "dog"}])

    assert result == {**_outcome(joined=2), "errors": []}
    assert rows == [
        {"request_id": "a", "version": 3, "prediction": 1.0, "label": 1, "correct": True,
         "request_timestamp_ns": 111, "label_timestamp_ns": 5_000},
        {"request_id": "b", "version": 3, "prediction": 2.0, "label": 1, "correct": False,
         "request_timestamp_ns": 222, "label_timestamp_ns": 5_000},
    ]  # fmt: skip
    assert store.labeled_rows_total == 2
    snapshot = store.snapshot()
    assert snapshot["pending"] == 0 and snapshot["joined"] == 2
    assert snapshot["value"] == 0.5 and snapshot["window_labels"] == 2


def test_a_single_object_is_one_item():
    store, _, rows = _store()
    store.record("a", 0.0, 1, 0)
    assert _counts(store.add_labels({"id": "a", "label": 0})) == _outcome(joined=1)
    assert rows[0]["correct"] is True


def test_regression_rows_carry_the_absolute_error_and_the_metric_is_mae():
    store, _, rows = _store(kind="regression")
    store.record("a", 2.5, 1, 0)
    store.record("b", -1.0, 1, 0)

    store.add_labels([{"id": "a", "label": 3}, {"id": "b", "label": 0.5}])

    assert [row["abs_error"] for row in rows] == [0.5, 1.5]
    assert "correct" not in rows[0]
    snapshot = store.snapshot()
    assert snapshot["metric"] == "mae" and snapshot["value"] == 1.0 and snapshot["kind"] == "regression"


def test_duplicate_late_and_unknown_are_told_apart():
    store, clock, _ = _store(ttl_s=10.0)
    store.record("labeled", 0.0, 1, 0)
    store.record("expires", 0.0, 1, 0)
    store.add_labels([{"id": "labeled", "label": 0}])
    clock.now += 10.0  # the ttl has passed exactly: expired

    result = store.add_labels(
        [{"id": "labeled", "label": 0}, {"id": "expires", "label": 0}, {"id": "never", "label": 0}]
    )

    assert _counts(result) == _outcome(duplicates=1, late=1, unknown=1)
    snapshot = store.snapshot()
    assert (snapshot["duplicates"], snapshot["late"], snapshot["unknown"], snapshot["expired"]) == (1, 1, 1, 1)
    assert snapshot["joined"] == 1 and snapshot["pending"] == 0


def test_the_same_id_twice_in_one_body_joins_once():
    store, _, rows = _store()
    store.record("a", 0.0, 1, 0)
    assert _counts(store.add_labels([{"id": "a", "label": 0}] * 2)) == _outcome(joined=1, duplicates=1)
    assert len(rows) == 1


def test_expiry_is_lazy_on_every_call_and_explicit():
    store, clock, _ = _store(ttl_s=10.0)
    store.record("old", 0.0, 1, 0)
    clock.now += 5.0
    store.record("new", 0.0, 1, 0)
    assert store.snapshot()["pending"] == 2

    clock.now += 5.0  # "old" is due, "new" is not
    store.record("newest", 0.0, 1, 0)  # the lazy check on the request path
    snapshot = store.snapshot()
    assert snapshot["pending"] == 2 and snapshot["expired"] == 1

    assert store.expire(clock.now + 4.9) == 0
    assert store.expire(clock.now + 5.0) == 1  # "new"
    assert store.expire() == 0  # the clock's own now
    assert store.snapshot()["expired"] == 2


def test_recording_an_id_again_restarts_its_ttl():
    store, clock, rows = _store(ttl_s=10.0)
    store.record("a", 0.0, 1, 0)
    store.record("b", 0.0, 1, 0)
    clock.now += 5.0
    store.record("a", 1.0, 2, 7)  # replaces the prediction, moves behind "b"
    clock.now += 5.0  # "b" is due; "a" now has 5 s left

    assert _counts(store.add_labels([{"id": "a", "label": 1}, {"id": "b", "label": 0}])) == _outcome(joined=1, late=1)
    assert rows[0]["version"] == 2 and rows[0]["correct"] is True


def test_max_pending_evicts_the_oldest_and_counts_it_expired():
    store, _, _ = _store(max_pending=2)
    for request_id in ("a", "b", "c"):
        store.record(request_id, 0.0, 1, 0)

    snapshot = store.snapshot()
    assert snapshot["pending"] == 2 and snapshot["expired"] == 1
    result = store.add_labels([{"id": request_id, "label": 0} for request_id in ("a", "b", "c")])
    assert _counts(result) == _outcome(joined=2, late=1)


def test_recent_id_memory_is_bounded():
    store, clock, _ = _store(max_pending=2, ttl_s=1.0)
    for request_id in ("a", "b", "c"):
        store.record(request_id, 0.0, 1, 0)
        store.add_labels({"id": request_id, "label": 0})
    for request_id in ("x", "y", "z"):
        store.record(request_id, 0.0, 1, 0)
    clock.now += 1.0

    result = store.add_labels([{"id": request_id, "label": 0} for request_id in ("a", "c", "x", "z")])

    # "a" and "x" fell out of the two most recent labeled / expired ids: unknown now.
    assert _counts(result) == _outcome(duplicates=1, late=1, unknown=2)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (["id", "a"], "items[0]: expected an object with 'id' and 'label', got a list of 2 items"),
        ({"label": 0}, "items[0]: 'id' is missing"),
        ({"id": 7, "label": 0}, "items[0]: 'id' must be a non-empty string (a request id), got 7"),
        ({"id": "", "label": 0}, "items[0]: 'id' must be a non-empty string (a request id), got ''"),
        ({"id": "a"}, "items[0]: 'label' is missing"),
        ({"id": "a", "label": True}, "items[0]: 'label' must be a class index or class name, got true"),
        ({"id": "a", "label": 1.5}, "items[0]: 'label' must be a class index or class name, got 1.5"),
        ({"id": "a", "label": None}, "items[0]: 'label' must be a class index or class name, got null"),
        ({"id": "a", "label": 3}, "items[0]: 'label' 3 is not a class index (valid: 0..2)"),
        ({"id": "a", "label": -1}, "items[0]: 'label' -1 is not a class index (valid: 0..2)"),
        ({"id": "a", "label": "zebra"},
         "items[0]: 'label' 'zebra' is not a class name (known: 'cat', 'dog', 'bird'); or send the class index"),
    ],
)  # fmt: skip
def test_invalid_classification_items_name_index_and_problem(item, message):
    store, _, rows = _store(labels=["cat", "dog", "bird"])
    store.record("a", 0.0, 1, 0)
    result = store.add_labels([item])
    assert _counts(result) == _outcome(invalid=1)
    assert result["errors"][0].startswith(message)
    assert rows == [] and store.snapshot()["invalid"] == 1 and store.snapshot()["pending"] == 1


def test_class_names_without_labels_and_indices_without_an_upper_bound():
    store, _, _ = _store()
    store.record("a", 12.0, 1, 0)
    result = store.add_labels([{"id": "a", "label": "cat"}, {"id": "a", "label": -2}, {"id": "a", "label": 12.0}])
    assert _counts(result) == _outcome(joined=1, invalid=2)
    assert result["errors"] == [
        "items[0]: 'label' 'cat' is a class name, but the model has no class names; send the class index",
        "items[1]: 'label' -2 is not a class index (valid: 0 or more)",
    ]


def test_long_class_name_lists_are_shortened():
    store, _, _ = _store(labels=[f"c{index}" for index in range(12)])
    message = store.add_labels({"id": "a", "label": "nope"})["errors"][0]
    assert "'c9', ..." in message and "'c10'" not in message


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("3", "items[0]: 'label' must be a number for a regression model, got '3'"),
        (False, "items[0]: 'label' must be a number for a regression model, got false"),
        ({"v": 1}, "items[0]: 'label' must be a number for a regression model, got an object"),
        (math.inf, "items[0]: 'label' must be a finite number, got inf"),
        (math.nan, "items[0]: 'label' must be a finite number, got nan"),
    ],
)
def test_invalid_regression_labels(label, message):
    store, _, _ = _store(kind="regression")
    result = store.add_labels({"id": "a", "label": label})
    assert result["errors"] == [message]


def test_values_in_messages_are_short_and_typed():
    store, _, _ = _store()
    regression, _, _ = _store(kind="regression")
    errors = store.add_labels([{"id": object(), "label": 0}, {"id": "a", "label": (1,)}])["errors"]
    assert errors == [
        "items[0]: 'id' must be a non-empty string (a request id), got a value of type object",
        "items[1]: 'label' must be a class index or class name, got a list of 1 items",
    ]
    assert regression.add_labels({"id": "a", "label": "y" * 50})["errors"] == [
        "items[0]: 'label' must be a number for a regression model, got a string of 50 characters"
    ]


def test_errors_are_capped_and_the_rest_counted():
    store, _, _ = _store()
    result = store.add_labels([{"label": 0}] * (MAX_ERRORS + 5))
    assert result["invalid"] == MAX_ERRORS + 5
    assert len(result["errors"]) == MAX_ERRORS + 1
    assert result["errors"][-1] == "... and 5 more invalid items"


@pytest.mark.parametrize(
    ("body", "got"),
    [("labels", "got 'labels'"), (b"[]", "got a value of type bytes"), (42, "got 42"), (None, "got null")],
)
def test_a_body_that_is_not_a_list_of_objects_raises_invalid_input(body, got):
    store, _, _ = _store()
    with pytest.raises(InvalidInput, match="expected a list of objects") as caught:
        store.add_labels(body)
    assert got in str(caught.value)


def test_any_iterable_of_items_is_accepted():
    store, _, _ = _store()
    store.record("a", 0.0, 1, 0)
    assert store.add_labels(item for item in [{"id": "a", "label": 0}])["joined"] == 1


def test_reference_value_is_the_first_full_window_unless_given():
    store, _, _ = _store(window=4)
    predictions = [0, 0, 0, 0, 1, 1]  # labels are all 0: correct, correct, ..., wrong, wrong
    for index, prediction in enumerate(predictions):
        store.record(f"r{index}", float(prediction), 1, 0)
    store.add_labels([{"id": f"r{index}", "label": 0} for index in range(3)])
    assert store.snapshot()["reference_value"] is None
    store.add_labels({"id": "r3", "label": 0})
    assert store.snapshot()["reference_value"] == 1.0

    store.add_labels([{"id": "r4", "label": 0}, {"id": "r5", "label": 0}])

    snapshot = store.snapshot()
    assert snapshot["value"] == 0.5 and snapshot["window_labels"] == 4 and snapshot["reference_value"] == 1.0
    given, _, _ = _store(reference_value=0.93, window=1)
    given.record("a", 0.0, 1, 0)
    given.add_labels({"id": "a", "label": 1})
    assert given.snapshot()["reference_value"] == 0.93 and given.snapshot()["value"] == 0.0


def test_a_non_finite_prediction_is_joined_but_kept_out_of_the_metric():
    store, _, rows = _store(kind="regression")
    store.record("a", math.nan, 1, 0)
    store.record("b", 1.0, 1, 0)
    store.add_labels([{"id": "a", "label": 1.0}, {"id": "b", "label": 3.0}])
    assert len(rows) == 2 and math.isnan(rows[0]["abs_error"])
    assert store.snapshot()["value"] == 2.0 and store.snapshot()["window_labels"] == 1


def test_snapshot_of_an_empty_store_is_the_documented_shape():
    store, _, _ = _store()
    assert store.snapshot() == {
        "kind": "classification", "pending": 0, "joined": 0, "duplicates": 0, "late": 0, "unknown": 0,
        "invalid": 0, "expired": 0, "metric": "accuracy", "value": None, "window_labels": 0,
        "reference_value": None,
    }  # fmt: skip


def test_without_a_sink_joins_are_only_counted():
    store, _, _ = _store(sink=None)
    store.record("a", 0.0, 1, 0)
    assert store.add_labels({"id": "a", "label": 0})["joined"] == 1


def test_a_failing_sink_is_logged_and_counted_not_raised(caplog):
    def broken_sink(rows: list[dict]) -> None:
        raise RuntimeError("disk full")

    store, _, _ = _store(sink=broken_sink)
    store.record("a", 0.0, 1, 0)
    with caplog.at_level("ERROR", logger="conveyor.monitor.feedback"):
        assert store.add_labels({"id": "a", "label": 0})["joined"] == 1
    assert store.sink_errors == 1
    assert "1 joined rows" in caplog.text and "disk full" in caplog.text


def test_no_sink_call_when_nothing_joined():
    calls: list[list[dict]] = []
    store, _, _ = _store(sink=calls.append)
    store.add_labels({"id": "unknown", "label": 0})
    assert calls == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "ranking"}, "kind must be 'classification' or 'regression', got 'ranking'"),
        ({"kind": "regression", "labels": ["a"]}, "apply to kind 'classification' only"),
        ({"labels": ["a", "b", "a"]}, r"repeated: \['a'\]"),
        ({"ttl_s": 0}, "ttl_s must be > 0 seconds, got 0"),
        ({"max_pending": 0}, "max_pending must be >= 1, got 0"),
        ({"window": 0}, "window must be >= 1 label, got 0"),
    ],
)
def test_bad_arguments_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        FeedbackStore(**{"kind": "classification", **options})


def test_default_clocks_work():
    rows: list[dict] = []
    store = FeedbackStore(kind="regression", sink=rows.extend)
    store.record("a", 1.0, 1, 0)
    assert store.add_labels({"id": "a", "label": 1})["joined"] == 1
    assert rows[0]["label_timestamp_ns"] > 0


def test_many_threads_record_and_label_with_exact_accounting():
    threads_count, per_thread = 8, 500
    rows: list[dict] = []
    rows_lock = threading.Lock()

    def sink(batch: list[dict]) -> None:
        with rows_lock:
            rows.extend(batch)

    store, _, _ = _store(max_pending=threads_count * per_thread, sink=sink)
    start = threading.Barrier(threads_count)

    def worker(thread_index: int) -> None:
        start.wait()
        for index in range(per_thread):
            request_id = f"{thread_index}-{index}"
            store.record(request_id, float(index % 2), 1, index)
            # Every thread also labels the previous id of its neighbour: joined or unknown.
            store.add_labels([{"id": request_id, "label": 0}, {"id": f"{(thread_index + 1) % threads_count}-{index}",
                                                               "label": 0}])

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    snapshot = store.snapshot()
    total = threads_count * per_thread
    assert snapshot["joined"] == total and store.labeled_rows_total == total
    assert snapshot["duplicates"] + snapshot["unknown"] == total  # each neighbour label: before or after its own
    assert snapshot["pending"] == 0 and snapshot["expired"] == 0
    assert sorted(row["request_id"] for row in rows) == sorted(f"{t}-{i}" for t in range(threads_count)
                                                               for i in range(per_thread))
