"""The learning-loop tables of config.toml: [monitor], [capture], [feedback], [retraining].

Defaults as documented in examples/README.md, every field's bounds, and the cross-table
rules (named tensors exist, retraining rules have what they watch). Each error names the
file, the dotted field, what was expected and what was found.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.config import (
    CaptureConfig,
    FeedbackConfig,
    MonitorConfig,
    RetrainingConfig,
    load_model_config,
    parse_model_config,
)
from config_files import config_error, write_config

MODEL = """
backend = "python"
max_batch_size = 8

[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]

[[inputs]]
name = "flag"
datatype = "BOOL"
dims = [1]

[[outputs]]
name = "probs"
datatype = "FP32"
dims = [3]

[[outputs]]
name = "value"
datatype = "FP32"
dims = [1]
"""


# ---- defaults and a full configuration ----


def test_tables_are_absent_by_default(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, MODEL))
    assert (config.monitor, config.capture, config.feedback, config.retraining) == (None, None, None, None)


def test_monitor_defaults_match_the_reference(tmp_path: Path) -> None:
    monitor = load_model_config(write_config(tmp_path, MODEL + "\n[monitor]\n")).monitor
    assert monitor == MonitorConfig()
    assert monitor.enabled is True
    assert monitor.reference is None and monitor.reference_rows == 10_000
    assert monitor.inputs is None and monitor.outputs is None
    assert monitor.classifier_outputs == [] and monitor.categorical == [] and monitor.numeric == []
    assert (monitor.max_features, monitor.bins, monitor.max_categories) == (50, 20, 50)
    assert (monitor.window_rows, monitor.window_seconds, monitor.sub_windows) == (1000, 10.0, 10)
    assert (monitor.evaluate_interval_s, monitor.history) == (1.0, 360)
    assert (monitor.psi_warn, monitor.psi_alert, monitor.alpha) == (0.1, 0.25, 0.05)
    assert monitor.correction == "benjamini-hochberg"
    assert (monitor.mahalanobis, monitor.outlier_quantile) == (True, 0.999)
    assert monitor.webhook_url is None and monitor.webhook_headers == {}


def test_capture_feedback_retraining_defaults() -> None:
    capture = CaptureConfig()
    assert capture.directory is None and capture.sample_rate == 0.01 and capture.capture == "both"
    assert (capture.anomalies, capture.alerting) == (True, True)
    assert (capture.max_queue_rows, capture.flush_interval_s, capture.fsync) == (65_536, 0.1, "interval")
    assert (capture.rotate_mb, capture.rotate_seconds) == (64, 3600)
    feedback = FeedbackConfig(kind="classification", output="probs")
    assert (feedback.ttl_s, feedback.max_pending, feedback.window, feedback.reference_value) == (3600, 100_000, 1000, None)
    retraining = RetrainingConfig(labeled_rows=10)
    assert (retraining.drift_minutes, retraining.metric_drop, retraining.cooldown_s) == (None, None, 3600)


FULL = MODEL + """
[monitor]
reference = "train.parquet"
reference_rows = 500
inputs = ["x"]
outputs = ["value"]
classifier_outputs = [{ output = "probs", scores = "logits" }]
categorical = ["x[3]"]
numeric = ["flag"]
max_features = 12
bins = 8
max_categories = 5
window_rows = 200
window_seconds = 2.5
sub_windows = 4
evaluate_interval_s = 0.5
history = 30
psi_warn = 0.2
psi_alert = 0.2
alpha = 0.01
correction = "bonferroni"
mahalanobis = false
outlier_quantile = 0.99
webhook_url = "https://hooks.example/drift"
webhook_headers = { Authorization = "Bearer t" }

[capture]
directory = "/data/captures"
sample_rate = 1.0
capture = "inputs"
anomalies = false
alerting = false
max_queue_rows = 10
flush_interval_s = 10
fsync = "always"
rotate_mb = 0.5
rotate_seconds = 60

[feedback]
kind = "classification"
output = "probs"
ttl_s = 60
max_pending = 5
window = 50
reference_value = 0.9

[retraining]
drift_minutes = 15
metric_drop = 0.05
labeled_rows = 1000
cooldown_s = 0
"""


def test_full_tables_read_every_field(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, FULL))
    monitor = config.monitor
    assert monitor.reference == "train.parquet" and monitor.reference_rows == 500
    assert (monitor.inputs, monitor.outputs) == (["x"], ["value"])
    assert [(c.output, c.scores) for c in monitor.classifier_outputs] == [("probs", "logits")]
    assert (monitor.categorical, monitor.numeric) == (["x[3]"], ["flag"])
    assert (monitor.max_features, monitor.bins, monitor.max_categories) == (12, 8, 5)
    assert (monitor.window_rows, monitor.window_seconds, monitor.sub_windows) == (200, 2.5, 4)
    assert (monitor.evaluate_interval_s, monitor.history) == (0.5, 30)
    assert (monitor.psi_warn, monitor.psi_alert, monitor.alpha, monitor.correction) == (0.2, 0.2, 0.01, "bonferroni")
    assert (monitor.mahalanobis, monitor.outlier_quantile) == (False, 0.99)
    assert monitor.webhook_url == "https://hooks.example/drift"
    assert monitor.webhook_headers == {"Authorization": "Bearer t"}
    capture = config.capture
    assert (capture.directory, capture.sample_rate, capture.capture) == ("/data/captures", 1.0, "inputs")
    assert (capture.anomalies, capture.alerting, capture.max_queue_rows) == (False, False, 10)
    assert (capture.flush_interval_s, capture.fsync, capture.rotate_mb, capture.rotate_seconds) == (10, "always", 0.5, 60)
    feedback = config.feedback
    assert (feedback.kind, feedback.output, feedback.ttl_s) == ("classification", "probs", 60)
    assert (feedback.max_pending, feedback.window, feedback.reference_value) == (5, 50, 0.9)
    retraining = config.retraining
    assert (retraining.drift_minutes, retraining.metric_drop, retraining.labeled_rows) == (15, 0.05, 1000)
    assert retraining.cooldown_s == 0


def test_round_trip_through_dict(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, FULL))
    assert parse_model_config(config.to_dict(), source="dict", name="m") == config


def test_scores_default_to_probabilities(tmp_path: Path) -> None:
    text = MODEL + '\n[monitor]\nclassifier_outputs = [{ output = "probs" }]\n'
    assert load_model_config(write_config(tmp_path, text)).monitor.classifier_outputs[0].scores == "probabilities"


# ---- one field at a time ----


@pytest.mark.parametrize(
    ("snippet", "field", "expected", "got"),
    [
        # [monitor]
        ('[monitor]\nenabled = "yes"', "monitor.enabled", "true or false", "'yes'"),
        ('[monitor]\nreference = ""', "monitor.reference", "a non-empty string", "''"),
        ("[monitor]\nreference_rows = 99", "monitor.reference_rows", "an integer >= 100", "99"),
        ('[monitor]\ninputs = "x"', "monitor.inputs", "an array", "'x'"),
        ('[monitor]\ninputs = ["a b"]', "monitor.inputs[0]", "a tensor name", "'a b'"),
        ('[monitor]\noutputs = ["probs", "?"]', "monitor.outputs[1]", "a tensor name", "'?'"),
        ("[monitor]\nclassifier_outputs = [3]", "monitor.classifier_outputs[0]", "a table", "3"),
        (
            '[monitor]\nclassifier_outputs = [{ output = "a b" }]',
            "monitor.classifier_outputs[0].output",
            "a tensor name",
            "'a b'",
        ),
        (
            '[monitor]\nclassifier_outputs = [{ output = "probs", scores = "softmax" }]',
            "monitor.classifier_outputs[0].scores",
            "'probabilities' or 'logits'",
            "'softmax'",
        ),
        ('[monitor]\ncategorical = ["x[a]"]', "monitor.categorical[0]", "a feature name: a tensor name, optionally", "'x[a]'"),
        ('[monitor]\nnumeric = ["x[0]", 3]', "monitor.numeric[1]", "a string", "3"),
        ("[monitor]\nmax_features = 0", "monitor.max_features", "an integer >= 1", "0"),
        ("[monitor]\nmax_features = 1025", "monitor.max_features", "an integer <= 1024", "1025"),
        ("[monitor]\nbins = 1", "monitor.bins", "an integer >= 2", "1"),
        ("[monitor]\nbins = 257", "monitor.bins", "an integer <= 256", "257"),
        ("[monitor]\nbins = 2.5", "monitor.bins", "an integer", "2.5"),
        ("[monitor]\nmax_categories = 0", "monitor.max_categories", "an integer >= 1", "0"),
        ("[monitor]\nmax_categories = 1025", "monitor.max_categories", "an integer <= 1024", "1025"),
        ("[monitor]\nwindow_rows = 9", "monitor.window_rows", "an integer >= 10", "9"),
        ("[monitor]\nwindow_seconds = 0", "monitor.window_seconds", "a number > 0", "0"),
        ('[monitor]\nwindow_seconds = "10"', "monitor.window_seconds", "a number", "'10'"),
        ("[monitor]\nsub_windows = 0", "monitor.sub_windows", "an integer >= 1", "0"),
        ("[monitor]\nsub_windows = 1001\nwindow_rows = 5000", "monitor.sub_windows", "an integer <= 1000", "1001"),
        ("[monitor]\nevaluate_interval_s = -1.0", "monitor.evaluate_interval_s", "a number > 0", "-1.0"),
        ("[monitor]\nhistory = 0", "monitor.history", "an integer >= 1", "0"),
        ("[monitor]\nhistory = 100001", "monitor.history", "an integer <= 100000", "100001"),
        ("[monitor]\npsi_warn = 0\npsi_alert = 0.5", "monitor.psi_warn", "a number > 0", "0"),
        ("[monitor]\npsi_alert = 0", "monitor.psi_alert", "a number > 0", "0"),
        ("[monitor]\nalpha = 0", "monitor.alpha", "a number > 0", "0"),
        ("[monitor]\nalpha = 1", "monitor.alpha", "a number < 1", "1"),
        (
            '[monitor]\ncorrection = "holm"',
            "monitor.correction",
            "'benjamini-hochberg', 'bonferroni' or 'none'",
            "'holm'",
        ),
        ("[monitor]\nmahalanobis = 1", "monitor.mahalanobis", "true or false", "1"),
        ("[monitor]\noutlier_quantile = 0.5", "monitor.outlier_quantile", "a number > 0.5", "0.5"),
        ("[monitor]\noutlier_quantile = 1", "monitor.outlier_quantile", "a number < 1", "1"),
        ('[monitor]\nwebhook_url = "ftp://hooks"', "monitor.webhook_url", "an http:// or https:// URL", "'ftp://hooks'"),
        ("[monitor]\nwebhook_headers = { a = 1 }", "monitor.webhook_headers.a", "a string", "1"),
        # [capture]
        ('[capture]\ndirectory = ""', "capture.directory", "a non-empty string", "''"),
        ("[capture]\nsample_rate = -0.5", "capture.sample_rate", "a number >= 0", "-0.5"),
        ("[capture]\nsample_rate = 2", "capture.sample_rate", "a number <= 1", "2"),
        ('[capture]\ncapture = "all"', "capture.capture", "'both', 'inputs' or 'outputs'", "'all'"),
        ('[capture]\nanomalies = "no"', "capture.anomalies", "true or false", "'no'"),
        ("[capture]\nalerting = 0", "capture.alerting", "true or false", "0"),
        ("[capture]\nmax_queue_rows = 0", "capture.max_queue_rows", "an integer >= 1", "0"),
        ("[capture]\nflush_interval_s = 0", "capture.flush_interval_s", "a number > 0", "0"),
        ("[capture]\nflush_interval_s = 10.5", "capture.flush_interval_s", "a number <= 10", "10.5"),
        ('[capture]\nfsync = "sometimes"', "capture.fsync", "'always', 'interval' or 'never'", "'sometimes'"),
        ("[capture]\nrotate_mb = 0", "capture.rotate_mb", "a number > 0", "0"),
        ("[capture]\nrotate_seconds = -1", "capture.rotate_seconds", "a number > 0", "-1"),
        # [feedback]
        ('[feedback]\nkind = "ranking"\noutput = "probs"', "feedback.kind", "'classification' or 'regression'", "'ranking'"),
        ('[feedback]\nkind = "regression"\noutput = "a b"', "feedback.output", "a tensor name", "'a b'"),
        ('[feedback]\nkind = "regression"\noutput = "value"\nttl_s = 0', "feedback.ttl_s", "a number > 0", "0"),
        ('[feedback]\nkind = "regression"\noutput = "value"\nmax_pending = 0', "feedback.max_pending", "an integer >= 1", "0"),
        ('[feedback]\nkind = "regression"\noutput = "value"\nwindow = 0', "feedback.window", "an integer >= 1", "0"),
        (
            '[feedback]\nkind = "regression"\noutput = "value"\nreference_value = "high"',
            "feedback.reference_value",
            "a number",
            "'high'",
        ),
        # [retraining] (with the tables its rules lean on)
        ("[monitor]\n[retraining]\ndrift_minutes = 0", "retraining.drift_minutes", "a number > 0", "0"),
        ("[retraining]\nmetric_drop = -0.1", "retraining.metric_drop", "a number > 0", "-0.1"),
        ("[retraining]\nlabeled_rows = 0", "retraining.labeled_rows", "an integer >= 1", "0"),
        ("[retraining]\nlabeled_rows = 1.5", "retraining.labeled_rows", "an integer", "1.5"),
        ("[monitor]\n[retraining]\ndrift_minutes = 5\ncooldown_s = -1", "retraining.cooldown_s", "a number >= 0", "-1"),
        # tables themselves
        ("monitor = 3", "monitor", "a table", "3"),
        ("[[capture]]\nsample_rate = 1.0", "capture", "a table", "[a table]"),
    ],
)
def test_field_errors_name_file_field_expected_and_got(
    tmp_path: Path, snippet: str, field: str, expected: str, got: str
) -> None:
    # Top-level keys go before the model's tables, tables after them.
    text = snippet + "\n" + MODEL if not snippet.startswith("[") else MODEL + "\n" + snippet
    message = config_error(tmp_path, text)
    assert len(message.splitlines()) == 1, message
    assert f"field '{field}': expected {expected}" in message
    assert message.endswith(f", got {got}")


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        ('[feedback]\noutput = "probs"', "feedback.kind"),
        ('[feedback]\nkind = "classification"', "feedback.output"),
        ('[monitor]\nclassifier_outputs = [{ scores = "logits" }]', "monitor.classifier_outputs[0].output"),
    ],
)
def test_required_fields(tmp_path: Path, snippet: str, field: str) -> None:
    assert f"field '{field}': required, but missing" in config_error(tmp_path, MODEL + "\n" + snippet)


@pytest.mark.parametrize(
    ("snippet", "field", "known"),
    [
        ("[monitor]\nwindow = 3", "monitor.window", "enabled, reference, reference_rows, inputs, outputs,"),
        (
            '[monitor]\nclassifier_outputs = [{ output = "probs", kind = "x" }]',
            "monitor.classifier_outputs[0].kind",
            "output, scores",
        ),
        ("[capture]\nrate = 0.5", "capture.rate", "directory, sample_rate, capture, anomalies, alerting,"),
        ('[feedback]\nkind = "regression"\noutput = "value"\nttl = 5', "feedback.ttl", "kind, output, ttl_s,"),
        ("[retraining]\nlabeled_rows = 5\ncooldown = 5", "retraining.cooldown", "drift_minutes, metric_drop, labeled_rows"),
    ],
)
def test_unknown_fields_list_known_ones(tmp_path: Path, snippet: str, field: str, known: str) -> None:
    message = config_error(tmp_path, MODEL + "\n" + snippet)
    assert f"unknown field '{field}' (known fields: {known}" in message


def test_every_error_is_listed(tmp_path: Path) -> None:
    text = MODEL + '\n[monitor]\nbins = 1\nalpha = 2.0\n[capture]\nfsync = "no"\n'
    lines = config_error(tmp_path, text).splitlines()
    assert len(lines) == 3
    for field, line in zip(("monitor.bins", "monitor.alpha", "capture.fsync"), lines):
        assert f"field '{field}': expected" in line


# ---- rules within [monitor] and [retraining] ----


def test_psi_alert_at_least_psi_warn(tmp_path: Path) -> None:
    message = config_error(tmp_path, MODEL + "\n[monitor]\npsi_warn = 0.3\n")
    assert message.endswith("field 'monitor.psi_alert': expected a value >= psi_warn (0.3), got 0.25")
    equal = MODEL + "\n[monitor]\npsi_warn = 0.3\npsi_alert = 0.3\n"
    assert load_model_config(write_config(tmp_path, equal)).monitor.psi_alert == 0.3


def test_window_rows_at_least_sub_windows(tmp_path: Path) -> None:
    message = config_error(tmp_path, MODEL + "\n[monitor]\nwindow_rows = 10\nsub_windows = 20\n")
    assert message.endswith("field 'monitor.window_rows': expected at least sub_windows (20) rows, got 10")
    equal = MODEL + "\n[monitor]\nwindow_rows = 20\nsub_windows = 20\n"
    assert load_model_config(write_config(tmp_path, equal)).monitor.sub_windows == 20


def test_a_name_is_categorical_or_numeric_not_both(tmp_path: Path) -> None:
    text = MODEL + '\n[monitor]\ncategorical = ["x[1]", "x", "flag"]\nnumeric = ["flag", "x"]\n'
    message = config_error(tmp_path, text)
    assert message.endswith("field 'monitor.numeric': expected each name in categorical or in numeric, not in both, "
                            "got 'flag', 'x' in both")  # fmt: skip


def test_retraining_needs_a_rule(tmp_path: Path) -> None:
    message = config_error(tmp_path, MODEL + "\n[retraining]\ncooldown_s = 5\n")
    assert message.endswith("field 'retraining': expected at least one of drift_minutes, metric_drop, labeled_rows, got none")


# ---- rules across tables (ModelConfig._check_monitoring) ----


@pytest.mark.parametrize(
    ("snippet", "field", "expected", "got"),
    [
        ('[monitor]\ninputs = ["x", "z"]', "monitor.inputs[1]", "one of the inputs (x, flag)", "'z'"),
        ('[monitor]\noutputs = ["x"]', "monitor.outputs[0]", "one of the outputs (probs, value)", "'x'"),
        (
            '[monitor]\nclassifier_outputs = [{ output = "probs" }, { output = "logits" }]',
            "monitor.classifier_outputs[1].output",
            "one of the outputs (probs, value)",
            "'logits'",
        ),
        (
            '[feedback]\nkind = "classification"\noutput = "label"',
            "feedback.output",
            "one of the outputs (probs, value)",
            "'label'",
        ),
        (
            "[retraining]\ndrift_minutes = 5",
            "retraining.drift_minutes",
            "an enabled [monitor] table (drift_minutes watches its alert)",
            "no [monitor] table",
        ),
        (
            "[monitor]\nenabled = false\n[retraining]\ndrift_minutes = 5",
            "retraining.drift_minutes",
            "an enabled [monitor] table (drift_minutes watches its alert)",
            "[monitor] enabled = false",
        ),
        (
            "[monitor]\n[retraining]\ndrift_minutes = 5\nmetric_drop = 0.1",
            "retraining.metric_drop",
            "a [feedback] table (metric_drop counts the labels it brings)",
            "no [feedback] table",
        ),
        (
            "[retraining]\nlabeled_rows = 100",
            "retraining.labeled_rows",
            "a [feedback] table (labeled_rows counts the labels it brings)",
            "no [feedback] table",
        ),
    ],
)
def test_cross_table_rules(tmp_path: Path, snippet: str, field: str, expected: str, got: str) -> None:
    message = config_error(tmp_path, MODEL + "\n" + snippet)
    assert message.endswith(f"field '{field}': expected {expected}, got {got}"), message


def test_rules_that_hold(tmp_path: Path) -> None:
    text = MODEL + """
[monitor]
inputs = ["flag", "x"]
outputs = ["probs"]
classifier_outputs = [{ output = "probs" }]

[feedback]
kind = "regression"
output = "value"

[retraining]
drift_minutes = 1
metric_drop = 0.5
labeled_rows = 1
"""
    config = load_model_config(write_config(tmp_path, text))
    assert config.monitor.inputs == ["flag", "x"] and config.feedback.output == "value"
    # capture alone leans on nothing
    assert load_model_config(write_config(tmp_path, MODEL + "\n[capture]\n")).capture == CaptureConfig()


def test_tensor_names_are_checked_only_when_the_config_lists_tensors(tmp_path: Path) -> None:
    # An onnx model may omit its tensors (the graph fills them); the monitor checks them at load.
    text = """
backend = "onnx"

[monitor]
inputs = ["anything"]
classifier_outputs = [{ output = "scores" }]

[feedback]
kind = "classification"
output = "scores"
"""
    config = load_model_config(write_config(tmp_path, text))
    assert config.monitor.inputs == ["anything"] and config.feedback.output == "scores"


def test_classes_built_in_code_are_validated() -> None:
    with pytest.raises(ValueError, match="psi_warn"):
        MonitorConfig(psi_warn=0.5, psi_alert=0.4)
    with pytest.raises(ValueError, match="at least one of drift_minutes"):
        RetrainingConfig()
    with pytest.raises(ValueError, match="kind"):
        FeedbackConfig(output="probs")  # type: ignore[call-arg]
