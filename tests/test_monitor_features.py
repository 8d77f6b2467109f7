"""Which values a [monitor] table monitors (features.plan_features) and how the training
file it names is read (training_data.read_training_inputs).

Features: default selection, names, kinds and their overrides, classifier values, the
max_features cap, and every error. Training files: Parquet, CSV and .npy, a column per
input (a list per row) or a column per feature (`x[0]`, ...), and every error, each naming
the model, `monitor.reference`, the file and the column or input at fault.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conveyor.config import MonitorConfig
from conveyor.errors import ConfigError
from conveyor.monitor.features import Feature, plan_features
from conveyor.monitor.training_data import read_training_inputs

WHERE = "model 'm' version 1"

INPUTS = [("x", "FP32", [4]), ("flag", "BOOL", [1]), ("code", "INT64", []), ("text", "BYTES", [1]), ("seq", "FP32", [-1])]
OUTPUTS = [("probs", "FP32", [3]), ("value", "FP64", [1]), ("image", "UINT8", [2, 2]), ("label", "BYTES", [1])]


def plan(model_inputs=INPUTS, model_outputs=OUTPUTS, **settings) -> list[Feature]:
    """The features of `settings` (MonitorConfig fields) over the model's tensors."""
    return plan_features(MonitorConfig(**settings), model_inputs, model_outputs, where=WHERE)


def plan_error(model_inputs=INPUTS, model_outputs=OUTPUTS, **settings) -> str:
    with pytest.raises(ConfigError) as caught:
        plan(model_inputs, model_outputs, **settings)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: "), message
    return message


def names(features: list[Feature]) -> list[str]:
    return [f.name for f in features]


def kinds(features: list[Feature]) -> dict[str, str]:
    return {f.name: f.kind for f in features}


# ---- plan_features: which features ----


def test_default_is_every_numeric_tensor_of_fixed_dims() -> None:
    features = plan()
    # BYTES and variable-dims tensors are left out; a one-element row keeps the bare name.
    assert names(features) == [
        "x[0]", "x[1]", "x[2]", "x[3]", "flag", "code",
        "probs[0]", "probs[1]", "probs[2]", "value", "image[0]", "image[1]", "image[2]", "image[3]",
    ]  # fmt: skip
    assert features[0] == Feature("x[0]", "input", 0, 0, "value", "numeric")
    assert features[5] == Feature("code", "input", 2, 0, "value", "numeric")
    assert features[9] == Feature("value", "output", 1, 0, "value", "numeric")
    # Multi-dimensional rows are flattened in C order; the column is the flat index.
    assert [(f.tensor, f.column) for f in features[10:]] == [(2, 0), (2, 1), (2, 2), (2, 3)]


def test_listed_tensors_only_in_listed_order() -> None:
    features = plan(inputs=["flag", "x"], outputs=["value"])
    assert names(features) == ["flag", "x[0]", "x[1]", "x[2]", "x[3]", "value"]
    assert [(f.source, f.tensor) for f in features] == [("input", 1)] + [("input", 0)] * 4 + [("output", 1)]
    assert names(plan(inputs=[], outputs=["value"])) == ["value"]


def test_classifier_outputs_become_class_and_confidence() -> None:
    classifiers = [{"output": "probs"}, {"output": "image", "scores": "logits"}]
    features = plan(inputs=["flag"], classifier_outputs=classifiers)
    # Classifier outputs leave the default columns; their derived values come last.
    assert names(features) == ["flag", "value", "probs:class", "probs:confidence", "image:class", "image:confidence"]
    assert features[2:] == [
        Feature("probs:class", "output", 0, 0, "predicted_class", "categorical"),
        Feature("probs:confidence", "output", 0, 0, "confidence", "numeric"),
        Feature("image:class", "output", 2, 0, "predicted_class", "categorical"),
        Feature("image:confidence", "output", 2, 0, "confidence_from_logits", "numeric"),
    ]
    # Listed in outputs as well, its columns are monitored too.
    both = plan(inputs=[], outputs=["probs"], classifier_outputs=[{"output": "probs"}])
    assert names(both) == ["probs[0]", "probs[1]", "probs[2]", "probs:class", "probs:confidence"]


def test_kinds_default_and_overrides() -> None:
    assert kinds(plan(inputs=["x", "flag", "code"], outputs=[])) == {
        "x[0]": "numeric", "x[1]": "numeric", "x[2]": "numeric", "x[3]": "numeric",
        "flag": "categorical", "code": "numeric",
    }  # fmt: skip
    overridden = plan(inputs=["x", "flag", "code"], outputs=[], categorical=["code", "x[2]"], numeric=["flag"])
    assert kinds(overridden) == {
        "x[0]": "numeric", "x[1]": "numeric", "x[2]": "categorical", "x[3]": "numeric",
        "flag": "numeric", "code": "categorical",
    }  # fmt: skip


def test_a_listed_feature_beats_its_listed_tensor() -> None:
    features = plan(inputs=["x"], outputs=["image"], categorical=["x", "image[1]"], numeric=["x[0]", "image"])
    assert kinds(features) == {
        "x[0]": "numeric", "x[1]": "categorical", "x[2]": "categorical", "x[3]": "categorical",
        "image[0]": "numeric", "image[1]": "categorical", "image[2]": "numeric", "image[3]": "numeric",
    }  # fmt: skip


def test_a_classifier_value_may_be_listed_with_its_own_kind() -> None:
    features = plan(inputs=["flag"], outputs=[], classifier_outputs=[{"output": "probs"}],
                    categorical=["probs:class"], numeric=["probs:confidence"])  # fmt: skip
    assert kinds(features) == {"flag": "categorical", "probs:class": "categorical", "probs:confidence": "numeric"}


# ---- plan_features: the max_features cap ----


def test_cap_cuts_columns_from_the_end_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.features"):
        features = plan(max_features=5)
    assert names(features) == ["x[0]", "x[1]", "x[2]", "x[3]", "flag"]
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{WHERE}: monitoring 5 of 14 features (monitor.max_features = 5); list monitor.inputs/outputs "
        "or raise max_features to choose others"
    )


def test_cap_keeps_classifier_values(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.features"):
        features = plan(max_features=3, classifier_outputs=[{"output": "probs"}])
    assert names(features) == ["x[0]", "probs:class", "probs:confidence"]
    assert "monitoring 3 of 13 features" in caplog.text


def test_cap_holds_even_when_classifier_values_exceed_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.features"):
        features = plan(inputs=["flag"], outputs=[], max_features=1, classifier_outputs=[{"output": "probs"}])
    assert names(features) == ["probs:class"]
    assert "monitoring 1 of 3 features" in caplog.text


def test_no_warning_at_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor.monitor.features"):
        assert len(plan(max_features=14)) == 14
    assert caplog.records == []


def test_kind_lists_are_checked_before_the_cap() -> None:
    # x[3] is cut by the cap, but it is a feature of the model: naming it is no error.
    assert names(plan(inputs=["x"], outputs=[], max_features=2, categorical=["x[3]"])) == ["x[0]", "x[1]"]


# ---- plan_features: errors ----


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"inputs": ["x", "nope"]}, "monitor.inputs[1]: no input named 'nope' (inputs: x, flag, code, text, seq)"),
        ({"outputs": ["probs", "x"]}, "monitor.outputs[1]: no output named 'x' (outputs: probs, value, image, label)"),
        (
            {"classifier_outputs": [{"output": "scores"}]},
            "monitor.classifier_outputs[0].output: no output named 'scores' (outputs: probs, value, image, label)",
        ),
        ({"inputs": ["x", "flag", "x"]}, "monitor.inputs[2]: 'x' is listed twice"),
        ({"outputs": ["value", "value"]}, "monitor.outputs[1]: 'value' is listed twice"),
        (
            {"classifier_outputs": [{"output": "probs"}, {"output": "probs", "scores": "logits"}]},
            "monitor.classifier_outputs[1].output: 'probs' is listed twice",
        ),
        ({"inputs": ["text"]}, "monitor.inputs: input 'text' is BYTES; only numeric tensors can be monitored"),
        ({"outputs": ["label"]}, "monitor.outputs: output 'label' is BYTES; only numeric tensors can be monitored"),
        (
            {"inputs": ["seq"]},
            (
                "monitor.inputs: input 'seq' has variable dims [-1]; only fixed-size rows can be monitored "
                "(give fixed dims or leave it out of the list)"
            ),
        ),
        (
            {"classifier_outputs": [{"output": "label"}]},
            (
                "monitor.classifier_outputs[0].output: output 'label' is BYTES [1]; class scores must be a numeric "
                "tensor of fixed dims"
            ),
        ),
        (
            {"categorical": ["x[9]", "nope"]},
            (
                "monitor.categorical: 'nope', 'x[9]' not among the monitored features or their tensors "
                "(features: x[0], x[1], x[2], x[3], flag, code, ...)"
            ),
        ),
        (
            {"inputs": ["x"], "outputs": [], "numeric": ["value"]},
            "monitor.numeric: 'value' not among the monitored features or their tensors (features: x[0], x[1], x[2], x[3])",
        ),
        (
            # a classifier's output is monitored through its derived values, not as a tensor
            {"inputs": ["x"], "outputs": [], "classifier_outputs": [{"output": "probs"}], "categorical": ["probs"]},
            "monitor.categorical: 'probs' not among the monitored features or their tensors",
        ),
        (
            {"classifier_outputs": [{"output": "probs"}], "numeric": ["probs:class"]},
            (
                "monitor.numeric: 'probs:class' is a classifier value whose kind is fixed (':class' is categorical, "
                "':confidence' numeric); remove it from the list"
            ),
        ),
        (
            {"classifier_outputs": [{"output": "probs"}], "categorical": ["probs:confidence"]},
            "monitor.categorical: 'probs:confidence' is a classifier value whose kind is fixed",
        ),
        (
            {"inputs": [], "outputs": []},
            (
                "[monitor] finds nothing to monitor: monitor.inputs and monitor.outputs select no numeric tensor of "
                "fixed dims, and there are no classifier_outputs"
            ),
        ),
    ],
)
def test_plan_errors_name_the_field(settings: dict, expected: str) -> None:
    assert expected in plan_error(**settings)


def test_nothing_numeric_to_monitor() -> None:
    message = plan_error(model_inputs=[("text", "BYTES", [1])], model_outputs=[("seq", "FP32", [-1])])
    assert "[monitor] finds nothing to monitor" in message


def test_a_model_without_tensors() -> None:
    assert "monitor.inputs[0]: no input named 'x' (inputs: none)" in plan_error(model_inputs=[], model_outputs=[], inputs=["x"])


# ---- read_training_inputs ----

SPECS = [("x", "FP32", [3]), ("code", "INT64", [1])]
ROWS = 6


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((ROWS, 3)).astype(np.float32)
    code = rng.integers(0, 5, (ROWS, 1)).astype(np.int64)
    return {"x": x, "code": code}


def read(path: Path, specs=SPECS, max_rows: int = 1000) -> dict[str, np.ndarray]:
    return read_training_inputs(path, specs, where=WHERE, max_rows=max_rows)


def read_error(path: Path, specs=SPECS) -> str:
    with pytest.raises(ConfigError) as caught:
        read(path, specs)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: monitor.reference: {path}"), message
    return message


def assert_read(result: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(result) == list(expected)
    for name, array in expected.items():
        assert result[name].dtype == array.dtype and result[name].flags.c_contiguous
        np.testing.assert_array_equal(result[name], array)


def per_feature_table(data: dict[str, np.ndarray]) -> pa.Table:
    columns = {f"x[{i}]": data["x"][:, i] for i in range(3)}
    columns["code"] = data["code"][:, 0]
    return pa.table(columns)


@pytest.mark.parametrize("layout", ["list", "large_list", "fixed_size_list", "per_feature"])
def test_parquet_layouts(tmp_path: Path, data: dict[str, np.ndarray], layout: str) -> None:
    path = tmp_path / "train.parquet"
    if layout == "per_feature":
        table = per_feature_table(data)
    else:
        flat = pa.array(data["x"].ravel())
        x = {
            "list": pa.array(data["x"].tolist(), pa.list_(pa.float32())),
            "large_list": pa.array(data["x"].tolist(), pa.large_list(pa.float64())),
            "fixed_size_list": pa.FixedSizeListArray.from_arrays(flat, 3),
        }[layout]
        table = pa.table({"code": pa.array(data["code"].tolist()), "x": x})  # `code` as a list of one
    pq.write_table(table, path, row_group_size=4)  # two row groups: chunked columns
    assert_read(read(path), data)


def test_parquet_mixed_layouts_and_multidimensional_rows(tmp_path: Path) -> None:
    image = np.arange(ROWS * 4, dtype=np.float64).reshape(ROWS, 2, 2)
    flags = np.array([True, False] * 3)
    table = pa.table({"image": pa.array(image.reshape(ROWS, 4).tolist()), "flag": flags, "extra": np.zeros(ROWS)})
    pq.write_table(table, tmp_path / "t.parquet")
    specs = [("image", "FP16", [2, 2]), ("flag", "BOOL", [])]
    result = read(tmp_path / "t.parquet", specs)
    assert_read(result, {"image": image.astype(np.float16), "flag": flags})

    columns = {f"image[{i}]": image.reshape(ROWS, 4)[:, i] for i in range(4)} | {"flag": flags}
    pq.write_table(pa.table(columns), tmp_path / "cols.parquet")
    assert_read(read(tmp_path / "cols.parquet", specs), {"image": image.astype(np.float16), "flag": flags})


def test_max_rows_keeps_the_first_rows(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    pq.write_table(per_feature_table(data), tmp_path / "t.parquet")
    assert_read(read(tmp_path / "t.parquet", max_rows=4), {name: array[:4] for name, array in data.items()})


def test_nulls_read_as_nan_in_floating_inputs(tmp_path: Path) -> None:
    table = pa.table({"x": pa.array([[1.0, None, 3.0], [4.0, 5.0, 6.0]]), "code": pa.array([1.5, None])})
    pq.write_table(table, tmp_path / "t.parquet")
    result = read(tmp_path / "t.parquet", [("x", "FP32", [3]), ("code", "FP64", [1])])
    np.testing.assert_array_equal(result["x"], np.array([[1, np.nan, 3], [4, 5, 6]], np.float32))
    np.testing.assert_array_equal(result["code"], np.array([[1.5], [np.nan]]))


def test_csv_a_column_per_feature(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    pacsv.write_csv(per_feature_table(data), tmp_path / "t.csv")
    assert_read(read(tmp_path / "t.csv"), data)


def test_csv_a_list_cell_per_input(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    lines = ["x,code"] + [f'"[{", ".join(repr(float(v)) for v in row)}]",{c}' for row, c in zip(data["x"], data["code"][:, 0])]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    assert_read(read(tmp_path / "t.csv"), data)
    # space-separated cells, and a one-element input as a one-element list
    (tmp_path / "s.csv").write_text('code,x\n[1],"1 2 3"\n[2],[4 5 6]\n')
    result = read(tmp_path / "s.csv")
    assert_read(result, {"x": np.array([[1, 2, 3], [4, 5, 6]], np.float32), "code": np.array([[1], [2]])})


def test_csv_empty_cells_read_as_nan(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("x[0],x[1],x[2],code\n1,,3,1\n4,5,6,2\n")
    result = read(tmp_path / "t.csv")
    np.testing.assert_array_equal(result["x"], np.array([[1, np.nan, 3], [4, 5, 6]], np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_npy_inputs_side_by_side(tmp_path: Path, data: dict[str, np.ndarray], dtype: type) -> None:
    matrix = np.column_stack([data["x"], data["code"]]).astype(dtype)
    np.save(tmp_path / "t.npy", matrix)
    expected = {"x": matrix[:, :3].astype(np.float32), "code": matrix[:, 3:].astype(np.int64)}
    assert_read(read(tmp_path / "t.npy"), expected)


def test_npy_one_input(tmp_path: Path) -> None:
    image = np.arange(ROWS * 6, dtype=np.float32).reshape(ROWS, 2, 3)
    spec = [("image", "FP32", [2, 3])]
    np.save(tmp_path / "shaped.npy", image)
    assert_read(read(tmp_path / "shaped.npy", spec), {"image": image})
    np.save(tmp_path / "flat.npy", image.reshape(ROWS, 6))
    assert_read(read(tmp_path / "flat.npy", spec), {"image": image})
    np.save(tmp_path / "column.npy", np.arange(5.0))  # 1-D when every row holds one value
    assert_read(read(tmp_path / "column.npy", [("v", "FP64", [1])]), {"v": np.arange(5.0).reshape(5, 1)})


# ---- read_training_inputs: errors ----


def test_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text("{}")
    assert read_error(tmp_path / "t.json").endswith("unknown format '.json'; use one of .parquet, .npy, .csv")
    assert read_error(tmp_path / "train").endswith("unknown format 'train'; use one of .parquet, .npy, .csv")


@pytest.mark.parametrize("name", ["absent.parquet", "absent.csv", "absent.npy"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    assert read_error(tmp_path / name).endswith(f"{name}: cannot read it: no such file")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("t.parquet", b"not parquet", r"t\.parquet: not a readable parquet file: "),
        ("t.csv", b"", r"t\.csv: not a readable csv file: Empty CSV file"),
        ("t.npy", b"not npy", r"t\.npy: not a numeric \.npy array: no \.npy header \(write it with numpy\.save\)"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    (tmp_path / name).write_bytes(content)
    assert re.search(expected, read_error(tmp_path / name))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (("text", "BYTES", [1]), "input 'text' (BYTES [1]) cannot be read from a training file"),
        (("seq", "FP32", [-1]), "input 'seq' (FP32 [-1]) cannot be read from a training file"),
    ],
)
def test_inputs_a_file_cannot_hold(tmp_path: Path, spec: tuple, expected: str) -> None:
    message = read_error(tmp_path / "t.parquet", [*SPECS, spec])
    assert message.endswith(f"{expected}: only numeric inputs of fixed dims can")


def test_a_model_without_inputs(tmp_path: Path) -> None:
    assert read_error(tmp_path / "t.parquet", []).endswith("the model has no inputs to read from the file")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"x": pa.array([[1.0, 2.0, 3.0], [4.0, 5.0]]), "code": [1, 2]},
            "column 'x' row 1 holds 2 values, expected 3 (input 'x' dims [3])",
        ),
        (
            {"x": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8)), 4), "code": [1, 2]},
            "column 'x' holds lists of 4 values, expected 3 (input 'x' dims [3])",
        ),
        (
            {"x": [1.0, 2.0], "code": [1, 2]},
            (
                "column 'x' holds one double per row, but input 'x' has 3 values per row (dims [3]): store a list per "
                "row, or columns x[0] .. x[2]"
            ),
        ),
        (
            {"x[0]": [1.0, 2.0], "x[2]": [1.0, 2.0], "code": [1, 2]},
            (
                "no column for input 'x': expected a column 'x' holding a list of 3 values per row, or the columns "
                "x[0] .. x[2] (missing: 'x[1]'); the file has 'x[0]', 'x[2]', 'code'"
            ),
        ),
        (
            {"x": pa.array([[1.0, 2.0, 3.0]] * 2), "codes": [1, 2]},
            "no column for input 'code': expected a column 'code'; the file has 'x', 'codes'",
        ),
        (
            {"x": pa.array([[1.0, 2.0, 3.0]] * 2), "code": ["a", "b"]},
            "column 'code' holds string values, expected numbers",
        ),
        (
            {"x": pa.array([["a", "b", "c"]] * 2), "code": [1, 2]},
            "column 'x' holds lists of string, expected numbers",
        ),
        (
            {"x": pa.array([[[1.0, 2.0, 3.0]]] * 2), "code": [1, 2]},
            "column 'x' holds lists of list<",  # the item's name varies with the writer: `item`, `element`
        ),
        (
            {"x": pa.array([[1.0, 2.0, 3.0], None, None]), "code": [1, 2, 3]},
            "column 'x' has 2 empty rows (row 1 first); fill or drop them",
        ),
        ({"x": pa.array([[1.0, 2.0, 3.0]]), "code": [1]}, "holds 1 row; a reference needs at least 2 (ideally thousands)"),
    ],
)
def test_parquet_errors(tmp_path: Path, table: dict, expected: str) -> None:
    pq.write_table(pa.table(table), tmp_path / "t.parquet")
    message = read_error(tmp_path / "t.parquet")
    assert f"t.parquet: {expected}" in message
    if "list<" in expected:
        assert message.endswith(">, expected numbers (a flat list of numbers per row, in C order)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x[0],x[1],x[2],code\n", "holds 0 rows; a reference needs at least 2 (ideally thousands)"),
        (
            "x[0],x[1],x[2],code\n1,2,3,a\n4,5,6,b\n",
            "column 'code' holds cells that are neither numbers nor lists of numbers like \"[1.0, 2.0]\": ",
        ),
        ("x[0],x[1],x[2],code\n1,2,a,1\n4,5,b,2\n", "column 'x[2]' holds string values, expected numbers"),
        ("x[0],x[1],code\n1,2,3\n4,5,6\n", "no column for input 'x': expected a column 'x' holding a list"),
        ('x,code\n"[1, 2]",1\n"[3, 4, 5]",2\n', "column 'x' row 0 holds 2 values, expected 3 (input 'x' dims [3])"),
        (
            'x,code\n"[1, 2, a]",1\n"[3, 4, 5]",2\n',
            "column 'x' holds cells that are neither numbers nor lists of numbers like \"[1.0, 2.0]\": ",
        ),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "t.csv").write_text(text)
    assert expected in read_error(tmp_path / "t.csv")


@pytest.mark.parametrize(
    ("array", "specs", "expected"),
    [
        (np.zeros((4, 5)), SPECS, "has shape [4, 5], expected [rows, 4] (3 of 'x', 1 of 'code', side by side)"),
        (np.zeros((4, 4, 1)), SPECS, "has shape [4, 4, 1], expected [rows, 4] (3 of 'x', 1 of 'code', side by side)"),
        (np.zeros(4), SPECS, "has shape [4], expected [rows, 4] (3 of 'x', 1 of 'code', side by side)"),
        (np.zeros((4, 5)), [("image", "FP32", [2, 3])], "has shape [4, 5], expected [rows, 6] or [rows, 2, 3]"),
        (np.zeros((4, 2)), [("x", "FP32", [3])], "has shape [4, 2], expected [rows, 3]"),
        (np.zeros((1, 4)), SPECS, "holds 1 row; a reference needs at least 2 (ideally thousands)"),
        (np.array([["1", "2", "3", "4"]] * 3), SPECS, "holds text values (<U1), expected numbers"),
        (np.zeros((4, 4), np.complex64), SPECS, "holds complex values (complex64), expected numbers"),
    ],
)
def test_npy_errors(tmp_path: Path, array: np.ndarray, specs: list, expected: str) -> None:
    np.save(tmp_path / "t.npy", array)
    assert read_error(tmp_path / "t.npy", specs).endswith(f"t.npy: {expected}")


def test_npy_of_text_in_the_shape_of_one_input_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.array([["1", "2", "3"]] * 3))
    assert read_error(tmp_path / "t.npy", [("x", "FP32", [3])]).endswith("holds text values (<U1), expected numbers")


def test_npy_objects_and_archives_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    message = read_error(tmp_path / "objects.npy")
    assert "objects.npy: not a numeric .npy array: Object arrays cannot be loaded when allow_pickle=False" in message
    with (tmp_path / "archive.npy").open("wb") as file:
        np.savez(file, a=np.zeros((4, 4)))
    message = read_error(tmp_path / "archive.npy")
    assert message.endswith("archive.npy: not a .npy array but an archive of several (.npz); save one array with numpy.save")


@pytest.mark.parametrize(
    ("values", "spec", "expected"),
    [
        (
            [1.0, float("nan")],
            ("code", "INT64", [1]),
            (
                "input 'code' is INT64, but 1 of its values are empty, NaN or infinite (only a floating-point input can "
                "hold them); fill or drop those rows"
            ),
        ),
        ([1.0, None], ("code", "BOOL", [1]), "input 'code' is BOOL, but 1 of its values are empty, NaN or infinite"),
        ([1.0, 2.5], ("code", "INT32", [1]), "input 'code' is INT32, but the file holds values with a fraction"),
        ([1, 300], ("code", "UINT8", [1]), "input 'code' is UINT8, range [0, 255], but the file's values span [1, 300]"),
        ([-1, 3], ("code", "UINT16", [1]), "input 'code' is UINT16, range [0, 65535], but the file's values span [-1, 3]"),
    ],
)
def test_values_an_input_cannot_hold(tmp_path: Path, values: list, spec: tuple, expected: str) -> None:
    pq.write_table(pa.table({"code": values}), tmp_path / "t.parquet")
    assert f"t.parquet: {expected}" in read_error(tmp_path / "t.parquet", [spec])
