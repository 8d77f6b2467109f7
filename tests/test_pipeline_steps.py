"""Pre/post-processing steps: each against numpy, config validation, and end to end through the Runtime."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import conveyor
from conveyor import _core
from conveyor.backends import NativeBackend
from conveyor.config import load_model_config, parse_model_config
from conveyor.errors import ConfigError, InvalidInput, ModelExecutionError
from conveyor.pipeline import ModelSteps, format_classes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
CLASSIFIER = EXAMPLES / "image_classifier"
RNG = np.random.default_rng(11)
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def images(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def numpy_normalize(x: np.ndarray, mean, std, scale: float, layout: str, dtype) -> np.ndarray:
    y = (x.astype(np.float64) * scale - np.asarray(mean)) / np.asarray(std)
    if layout == "NCHW":
        y = np.moveaxis(y, -1, -3)
    return y.astype(dtype)


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]  # ties: lower index first
    return np.take_along_axis(x, order, axis=-1), order


def identity(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return list(arrays)


# ---- each step against numpy (the C++ pipeline alone) ----


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["FP32", "FP16"])
@pytest.mark.parametrize("shape", [(4, 5, 7, 3), (5, 7, 3)])  # batched and a model that does not batch
def test_normalize_image(layout: str, dtype: str, shape: tuple[int, ...]) -> None:
    pipeline = _core.Pipeline()
    pipeline.add_normalize_image(input=1, mean=MEAN, std=STD, scale=1 / 255, layout=layout, dtype=dtype)
    x, other = images(*shape), np.arange(3, dtype=np.float32)
    seen: list[np.ndarray] = []

    def backend(arrays):
        seen.extend(arrays)
        return [arrays[0]]

    pipeline.run([other, x], backend)
    np_dtype = np.float32 if dtype == "FP32" else np.float16
    expected = numpy_normalize(x, MEAN, STD, 1 / 255, layout, np_dtype)
    assert seen[1].dtype == np_dtype and seen[1].shape == expected.shape
    np.testing.assert_allclose(
        seen[1].astype(np.float32), expected.astype(np.float32), rtol=2e-3 if dtype == "FP16" else 1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(seen[0], other)  # inputs without a step pass unchanged


def test_normalize_image_with_another_scale() -> None:
    pipeline = _core.Pipeline()
    pipeline.add_normalize_image(input=0, mean=[0.0], std=[2.0], scale=1.0, layout="NHWC", dtype="FP32")
    x = images(2, 3, 3, 1)
    out = pipeline.run([x], lambda arrays: [arrays[0]])[0]
    np.testing.assert_allclose(out, x.astype(np.float32) / 2.0)


def test_normalize_image_rejects_the_wrong_channel_count() -> None:
    pipeline = _core.Pipeline()
    pipeline.add_normalize_image(input=0, mean=MEAN, std=STD, scale=1 / 255, layout="NCHW", dtype="FP32")
    with pytest.raises(InvalidInput, match=r"\[pipeline\] normalize_image needs UINT8 \[batch, height, width, 3\]"):
        pipeline.run([images(1, 4, 4, 4)], identity)


def postprocess(kind: str, x: np.ndarray, k: int = 0) -> list[np.ndarray]:
    pipeline = _core.Pipeline()
    step = pipeline.add_postprocess(kind=kind, source=0, k=k)
    count = 2 if kind in ("softmax_topk", "top_k") else 1
    pipeline.set_outputs([(step, i) for i in range(count)] + [(-1, 0)])
    outputs = pipeline.run([x], identity)
    assert outputs[-1] is x or np.shares_memory(outputs[-1], x)  # a passed-through output is not copied
    assert not np.shares_memory(outputs[0], x)  # steps never write into the backend's outputs
    return outputs[:-1]


def logits(*shape: int) -> np.ndarray:
    x = RNG.standard_normal(shape).astype(np.float32) * 3
    x[0, :2] = 5.0  # a tie: the lower index ranks first
    return x


def test_softmax() -> None:
    x = logits(6, 10)
    (probs,) = postprocess("softmax", x)
    np.testing.assert_allclose(probs, numpy_softmax(x.astype(np.float64)), rtol=1e-5, atol=1e-7)


def test_softmax_topk() -> None:
    x = logits(6, 10)
    values, indices = postprocess("softmax_topk", x, k=4)
    expected_values, expected_indices = top_k(numpy_softmax(x.astype(np.float64)), 4)
    np.testing.assert_array_equal(indices, expected_indices)
    assert indices.dtype == np.int64 and values.shape == (6, 4)
    np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-7)


def test_argmax_keeps_a_last_dim_of_one() -> None:
    x = logits(6, 10)
    (best,) = postprocess("argmax", x)
    assert best.shape == (6, 1) and best.dtype == np.int64
    np.testing.assert_array_equal(best[:, 0], np.argmax(x, axis=-1))


def test_top_k_returns_raw_scores() -> None:
    x = logits(6, 10)
    scores, indices = postprocess("top_k", x, k=3)
    expected_scores, expected_indices = top_k(x, 3)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(scores, expected_scores)


def test_k_larger_than_the_classes_fails_the_batch() -> None:
    with pytest.raises(ModelExecutionError, match=r"keeps k = 11 classes, but the output has only 10"):
        postprocess("softmax_topk", logits(2, 10), k=11)


def test_a_step_on_a_non_float_output_fails_the_batch() -> None:
    with pytest.raises(ModelExecutionError, match=r"softmax needs an FP32 CPU output"):
        postprocess("softmax", np.zeros((2, 3), np.int64))


def test_format_classes_matches_the_classification_extension() -> None:
    scores = np.array([[0.5, -1.25], [3.0, 2.0]], np.float32)
    indices = np.array([[2, 0], [1, 7]], np.int64)
    out = format_classes(scores, indices, ["cat", "dog", "bird"])
    assert out.dtype == object and out.shape == (2, 2)
    assert out.tolist() == [[b"0.500000:2:bird", b"-1.250000:0:cat"], [b"3.000000:1:dog", b"2.000000:7"]]
    assert format_classes(scores, indices).tolist()[0] == [b"0.500000:2", b"-1.250000:0"]


# ---- config validation ----

IMAGE_IN = {"name": "image", "datatype": "UINT8", "dims": [8, 8, 3]}
NORMALIZE = {"kind": "normalize_image", "input": "image", "mean": MEAN, "std": STD}


def config(**fields: Any):
    data = {
        "backend": "python",
        "max_batch_size": 4,
        "inputs": [IMAGE_IN],
        "outputs": [{"name": "probs", "datatype": "FP32", "dims": [10]}],
        **fields,
    }
    return parse_model_config(data, source="config.toml", name="m")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"preprocess": [{**NORMALIZE, "input": "img"}]},
            "field 'preprocess[0].input': expected one of the inputs (image), got 'img'",
        ),
        (
            {"preprocess": [NORMALIZE, NORMALIZE]},
            "field 'preprocess[1].input': expected an input no other step reads, got 'image'",
        ),
        (
            {"preprocess": [{**NORMALIZE, "mean": [0.5]}]},
            "field 'preprocess[0].std': expected 1 values (one per channel, as mean), got",
        ),
        (
            {"preprocess": [{**NORMALIZE, "std": [0.2, 0.0, 0.2]}]},
            "field 'preprocess[0].std': expected finite, non-zero values, got [0.2, 0.0, 0.2]",
        ),
        (
            {"preprocess": [{**NORMALIZE, "mean": [0.5] * 4, "std": [0.5] * 4}]},
            "field 'preprocess[0].input': expected input 'image' to be UINT8 [height, width, 4] (NHWC images), "
            "got UINT8 [8, 8, 3]",
        ),
        ({"preprocess": [{**NORMALIZE, "layout": "CHW"}]}, "field 'preprocess[0].layout': expected 'NCHW' or 'NHWC'"),
        ({"preprocess": [{**NORMALIZE, "kind": "resize"}]}, "field 'preprocess[0].kind': expected 'normalize_image'"),
        (
            {"postprocess": [{"kind": "softmax_topk", "output": "logits", "outputs": ["a", "b"]}]},
            "field 'postprocess[0].k': expected k: how many classes softmax_topk keeps, got none",
        ),
        (
            {"postprocess": [{"kind": "argmax", "output": "logits", "k": 2}]},
            "field 'postprocess[0].k': expected no k (argmax keeps every class), got 2",
        ),
        (
            {"postprocess": [{"kind": "softmax_topk", "output": "logits", "k": 2}]},
            "field 'postprocess[0].outputs': expected 2 output names, got []",
        ),
        (
            {"postprocess": [{"kind": "softmax", "output": "logits", "labels": "l.txt"}]},
            "field 'postprocess[0].labels': expected no labels (only classification uses them)",
        ),
        (
            {"postprocess": [{"kind": "softmax", "output": "logits"}]},
            "field 'postprocess[0].outputs': expected one of the outputs (probs), got 'logits'",
        ),
        (
            {"postprocess": [{"kind": "argmax", "output": "logits", "outputs": ["probs"]}]},
            "field 'postprocess[0].outputs': expected output 'probs' to be INT64 [..., 1] (argmax), got FP32 [10]",
        ),
        (
            {"postprocess": [{"kind": "classification", "output": "logits", "outputs": ["probs"], "k": 10}]},
            "field 'postprocess[0].outputs': expected output 'probs' to be BYTES [..., 10] (classification), got FP32 [10]",
        ),
        (
            {"postprocess": [{"kind": "sigmoid", "output": "logits"}]},
            "field 'postprocess[0].kind': expected 'softmax', ",
        ),
    ],
)
def test_step_config_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config(**fields)
    assert message in str(error.value)


def test_a_model_with_steps_lists_its_public_tensors() -> None:
    with pytest.raises(ConfigError, match=r"field 'inputs': expected the public tensors listed"):
        parse_model_config({"backend": "onnx", "preprocess": [NORMALIZE]}, source="config.toml", name="m")


def test_a_missing_labels_file_fails_loading(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    cfg = config(
        outputs=[{"name": "classes", "datatype": "BYTES", "dims": [3]}],
        postprocess=[
            {"kind": "classification", "output": "logits", "outputs": ["classes"], "k": 3, "labels": "labels.txt"}
        ],
    )
    with pytest.raises(ConfigError, match=r"postprocess labels: cannot read labels file .*labels.txt"):
        ModelSteps.for_config(cfg, tmp_path / "m" / "1")


def test_the_backend_tensors_are_derived_from_the_public_ones() -> None:
    cfg = config(
        preprocess=[{**NORMALIZE, "dtype": "FP16"}],
        outputs=[
            {"name": "probs", "datatype": "FP32", "dims": [10]},
            {"name": "best", "datatype": "INT64", "dims": [1]},
        ],
        postprocess=[{"kind": "argmax", "output": "probs", "outputs": ["best"]}],
    )
    backend = ModelSteps(cfg, None).backend_config(None)
    assert [(t.name, t.datatype, t.dims) for t in backend.inputs] == [("image", "FP16", [3, 8, 8])]
    # probs passes through and also feeds argmax: the backend returns it once.
    assert [(t.name, t.datatype, t.dims) for t in backend.outputs] == [("probs", "FP32", [10])]
    assert not backend.preprocess and not backend.postprocess


def test_an_onnx_model_without_the_step_output_fails_loading(tmp_path: Path) -> None:
    cfg = load_model_config(CLASSIFIER / "config.toml")
    data = cfg.to_dict()
    data["postprocess"][0]["output"] = "scores"
    broken = parse_model_config(data, source="config.toml", name="image_classifier")
    with pytest.raises(
        ConfigError, match=r"field 'postprocess\[0\].output': expected one of the model's outputs \(logits\)"
    ):
        ModelSteps(broken, CLASSIFIER).backend_config(CLASSIFIER / "1" / "model.onnx")


# ---- end to end through the Runtime ----


def reference_classes(batch: np.ndarray, k: int = 5) -> np.ndarray:
    session = ort.InferenceSession(str(CLASSIFIER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = numpy_normalize(batch, MEAN, STD, 1 / 255, "NCHW", np.float32)
    scores, indices = top_k(session.run(None, {"image": x})[0], k)
    labels = (CLASSIFIER / "labels.txt").read_text().split()
    return np.array(
        [[f"{s:f}:{i}:{labels[i]}".encode() for s, i in zip(row_s, row_i)] for row_s, row_i in zip(scores, indices)],
        dtype=object,
    )


def assert_same_classes(got: np.ndarray, expected: np.ndarray) -> None:
    """Same classes in the same order; scores equal to float32 rounding."""
    assert got.shape == expected.shape and got.dtype == object
    for g, e in zip(got.ravel(), expected.ravel()):
        gs, gi, gl = g.split(b":")
        es, ei, el = e.split(b":")
        assert (gi, gl) == (ei, el)
        assert abs(float(gs) - float(es)) < 2e-5


@pytest.mark.parametrize("backend", ["native", "onnx"])
def test_example_image_classifier_sync_and_async(backend: str, monkeypatch) -> None:
    calls: list[int] = []
    if backend == "native":
        execute = NativeBackend.execute

        def counted(self, inputs):
            calls.append(threading.get_ident())
            return execute(self, inputs)

        monkeypatch.setattr(NativeBackend, "execute", counted)
    cfg = load_model_config(CLASSIFIER / "config.toml").model_copy(update={"backend": backend})
    batch = images(40, 32, 32, 3)
    expected = reference_classes(batch)
    with conveyor.Runtime() as runtime:
        runtime.add_model("image_classifier", cfg, model_dir=CLASSIFIER / "1")
        assert_same_classes(runtime.infer("image_classifier", {"image": batch[:3]})["classes"], expected[:3])

        async def many() -> list[dict]:
            return await asyncio.gather(
                *(runtime.infer_async("image_classifier", {"image": batch[i : i + 1]}) for i in range(40))
            )

        results = asyncio.run(many())
        stats = runtime.model_stats("image_classifier")
    for i, result in enumerate(results):
        assert_same_classes(result["classes"], expected[i : i + 1])
    assert stats["succeeded"] == 41  # the probe batch at load is not a request
    if backend == "native":  # with its steps, the model ran wholly in C++: Python ran only the probe at load
        assert calls == [threading.get_ident()]


def test_example_repository_serves_the_classifier() -> None:
    with conveyor.Runtime.from_repository(EXAMPLES, models=["image_classifier"]) as runtime:
        handle = runtime.model("image_classifier")
        assert [t.name for t in handle.config.inputs] == ["image"] and handle.output_names == ("classes",)
        batch = images(2, 32, 32, 3)
        assert_same_classes(runtime.infer(handle, {"image": batch})["classes"], reference_classes(batch))


def python_steps_config() -> dict:
    return {
        "backend": "python",
        "max_batch_size": 8,
        "inputs": [IMAGE_IN, {"name": "bias", "datatype": "FP32", "dims": [4]}],
        "outputs": [
            {"name": "raw", "datatype": "FP32", "dims": [4]},
            {"name": "probs", "datatype": "FP32", "dims": [4]},
            {"name": "top", "datatype": "FP32", "dims": [2]},
            {"name": "top_index", "datatype": "INT64", "dims": [2]},
            {"name": "best", "datatype": "INT64", "dims": [1]},
        ],
        "preprocess": [{**NORMALIZE, "layout": "NHWC"}],
        "postprocess": [
            {"kind": "softmax", "output": "logits", "outputs": ["probs"]},
            {"kind": "softmax_topk", "output": "logits", "outputs": ["top", "top_index"], "k": 2},
            {"kind": "argmax", "output": "logits", "outputs": ["best"]},
        ],
    }


def test_python_model_sees_the_backend_tensors_and_clients_the_public_ones() -> None:
    seen: list[tuple] = []

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = inputs["image"]
        seen.append((image.dtype, image.shape))
        logits = image.reshape(len(image), -1)[:, :4] + inputs["bias"]
        return {"raw": inputs["bias"] * 2, "logits": logits}

    x, bias = images(3, 8, 8, 3), RNG.standard_normal((3, 4)).astype(np.float32)
    expected_logits = numpy_normalize(x, MEAN, STD, 1 / 255, "NHWC", np.float32).reshape(3, -1)[:, :4] + bias
    with conveyor.Runtime() as runtime:
        runtime.add_model("m", python_steps_config(), model)
        out = runtime.infer("m", {"image": x, "bias": bias})
    assert seen == [(np.float32, (3, 8, 8, 3))]
    assert list(out) == ["raw", "probs", "top", "top_index", "best"]
    np.testing.assert_array_equal(out["raw"], bias * 2)
    np.testing.assert_allclose(out["probs"], numpy_softmax(expected_logits.astype(np.float64)), rtol=1e-4, atol=1e-6)
    values, indices = top_k(numpy_softmax(expected_logits.astype(np.float64)), 2)
    np.testing.assert_array_equal(out["top_index"], indices)
    np.testing.assert_allclose(out["top"], values, rtol=1e-4)
    np.testing.assert_array_equal(out["best"][:, 0], np.argmax(expected_logits, axis=1))


def test_many_threads_each_get_their_own_answer() -> None:
    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"raw": inputs["bias"], "logits": inputs["bias"]}

    answers: dict[int, dict] = {}
    biases = {i: np.eye(4, dtype=np.float32)[i % 4][None] * (i + 1) for i in range(48)}
    with conveyor.Runtime() as runtime:
        runtime.add_model("m", python_steps_config(), model)

        def call(i: int) -> None:
            answers[i] = runtime.infer("m", {"image": images(1, 8, 8, 3), "bias": biases[i]})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(48)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(answers) == list(range(48))
    for i, out in answers.items():
        assert out["best"][0, 0] == i % 4
        np.testing.assert_array_equal(out["raw"], biases[i])


def test_a_backend_output_a_step_cannot_read_fails_that_batch_only() -> None:
    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"raw": inputs["bias"], "logits": inputs["bias"][:, :1]}  # 1 class: top-2 is impossible

    with conveyor.Runtime() as runtime:
        runtime.add_model("m", python_steps_config(), model)
        with pytest.raises(ModelExecutionError, match=r"softmax_topk keeps k = 2 classes, but the output has only 1"):
            runtime.infer("m", {"image": images(1, 8, 8, 3), "bias": np.ones((1, 4), np.float32)})
        assert runtime.model_stats("m")["failed"] == 1
