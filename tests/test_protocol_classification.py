"""The classification extension against a plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.errors import InvalidInput
from conveyor.protocol import InferOutput, classification_output, classify


def reference(scores: np.ndarray, count: int, labels: list[str] | None = None) -> list[list[str]]:
    """Per row: indices sorted by (-score, index), formatted like C's "%f:%d[:label]"."""
    rows = []
    for row in scores.reshape(scores.shape[0], -1):
        order = sorted(range(row.size), key=lambda index: (-float(row[index]), index))[:count]
        texts = []
        for index in order:
            # C's printf conversions, which Triton's std::to_string applies.
            value = "%f" % float(row[index]) if row.dtype.kind == "f" else "%d" % int(row[index])  # noqa: UP031
            text = f"{value}:{index}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            texts.append(text)
        rows.append(texts)
    return rows


def decoded(array: np.ndarray) -> list:
    return np.vectorize(lambda item: item.decode(), otypes=[object])(array).tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32, np.uint8, np.int64])
def test_batched_classify_match_the_reference(dtype: type) -> None:
    rng = np.random.default_rng(7)
    scores = (rng.random((5, 12)) * 100).astype(dtype)
    scores[0, 3] = scores[0, 8] = scores[0].max()  # a tie: the lower index comes first
    result = classify(scores, 4, batched=True)
    assert result.shape == (5, 4) and result.dtype == object
    assert decoded(result) == reference(scores, 4)


def test_labels_are_appended_where_they_exist() -> None:
    scores = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    result = classify(scores, 3, batched=True, labels=["cat", "dog"])
    assert decoded(result) == [["0.700000:1:dog", "0.200000:2", "0.100000:0:cat"]]


def test_unbatched_output_is_ranked_as_a_whole() -> None:
    scores = np.array([[1.0, 5.0], [3.0, 4.0]], dtype=np.float64)
    result = classify(scores, 3, batched=False)
    assert result.shape == (3,)
    assert decoded(result) == ["5.000000:1", "4.000000:3", "3.000000:2"]


def test_count_beyond_the_classes_gives_them_all() -> None:
    result = classify(np.array([[2, 9]], dtype=np.int64), 10, batched=True)
    assert decoded(result) == [["9:1", "2:0"]]


def test_nan_ranks_below_every_number() -> None:
    result = classify(np.array([[np.nan, -np.inf, 1.0]]), 3, batched=True)
    assert decoded(result) == [["1.000000:2", "nan:0", "-inf:1"]]


def test_extra_dimensions_are_flattened_per_row() -> None:
    scores = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    assert decoded(classify(scores, 1, batched=True)) == [["5.000000:5"], ["11.000000:5"]]


def test_classification_output_replaces_the_tensor() -> None:
    output = InferOutput("probs", "FP32", (1, 3), np.array([[0.2, 0.5, 0.3]], np.float32), binary_data=True)
    classes = classification_output(output, 2, batched=True)
    assert (classes.name, classes.datatype, classes.shape, classes.binary_data) == ("probs", "BYTES", (1, 2), True)
    assert classes.data.tolist() == [[b"0.500000:1", b"0.300000:2"]]


@pytest.mark.parametrize(
    ("scores", "count", "message"),
    [
        (np.zeros((1, 3)), 0, "classification needs a class count >= 1, got 0"),
        (np.array([[True, False]]), 1, "classification needs numeric scores, not numpy dtype 'bool'"),
        (np.array([b"a"], dtype=object), 1, "classification needs numeric scores"),
    ],
)
def test_invalid_classification_requests(scores: np.ndarray, count: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        classify(scores, count, batched=True)
