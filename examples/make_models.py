#!/usr/bin/env python3
"""Build the example ONNX models, byte for byte the same on every run.

  mlp : x FP32 [-1, 64] -> Gemm(64->256)+Relu -> Gemm(256->256)+Relu -> Gemm(256->10)
        -> Softmax -> probs FP32 [-1, 10]
  tiny: x FP32 [-1, 16] -> Add(1.0) -> y FP32 [-1, 16]   (measures serving overhead alone)
  image_classifier: image FP32 [-1, 3, 32, 32] -> Flatten -> Gemm(3072->32)+Relu -> Gemm(32->10)
        -> logits FP32 [-1, 10]   (its config normalizes uint8 images before and
        classifies after, in C++: see examples/models/image_classifier/config.toml)
  churn: features FP32 [-1, 12] -> Gemm(12->16)+Relu -> Gemm(16->2) -> Softmax -> probs FP32 [-1, 2]
        (the monitored example; churn/train.npy is its training data, the monitor's reference)
  rollout_demo: x FP32 [-1, 8] -> Gemm(8->16)+Relu -> Gemm(16->3) -> Softmax -> probs FP32 [-1, 3]
        in two versions (the rollout example): version 2 is version 1 with every weight moved
        by a small seeded step, as a retrained model would be; they agree on most rows.
  classifier_small: image FP32 [-1, 3, 32, 32] -> Flatten -> Gemm(3072->16)+Relu -> Gemm(16->10)
        -> logits FP32 [-1, 10]   (seed 1237)
  classifier_large: image FP32 [-1, 3, 32, 32] -> Flatten -> Gemm(3072->64)+Relu -> Gemm(64->32)+Relu
        -> Gemm(32->10) -> logits FP32 [-1, 10]   (seed 1238)
        the two steps of the image_cascade graph: the large one sees only the rows the small
        one is unsure of (examples/models/image_cascade/config.toml).

The weights come from numpy's default generator seeded with 1234 (the cascade's two
classifiers: 1237 and 1238), layer by layer, so the peer servers in the benchmark
harness serve the identical mlp.

Usage: make_models.py [--check] [--models-dir DIR]
  --check  exit 1 unless the files on disk are exactly what this script builds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 1234
OPSET = 17
# Old enough for the onnxruntime every peer server bundles.
IR_VERSION = 8
MODELS_DIR = Path(__file__).resolve().parent / "models"


def _gemm_layer(
    rng: np.random.Generator, name: str, fan_in: int, fan_out: int, input_name: str, output_name: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    # Scaled by 1/sqrt(fan_in) so activations keep unit variance through the layers.
    weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
    bias = (rng.standard_normal((fan_out,)) * 0.01).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, f"{name}_W"), numpy_helper.from_array(bias, f"{name}_B")]
    node = helper.make_node("Gemm", [input_name, f"{name}_W", f"{name}_B"], [output_name], name=name)
    return node, initializers


def build_mlp() -> onnx.GraphProto:
    rng = np.random.default_rng(SEED)
    fc1, fc1_weights = _gemm_layer(rng, "fc1", 64, 256, "x", "h1")
    fc2, fc2_weights = _gemm_layer(rng, "fc2", 256, 256, "a1", "h2")
    fc3, fc3_weights = _gemm_layer(rng, "fc3", 256, 10, "a2", "logits")
    nodes = [
        fc1,
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        fc2,
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        fc3,
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    return helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=fc1_weights + fc2_weights + fc3_weights,
    )


def build_tiny() -> onnx.GraphProto:
    one = numpy_helper.from_array(np.ones((1, 16), dtype=np.float32), "one")
    return helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"], name="add1")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[one],
    )


def build_image_classifier() -> onnx.GraphProto:
    rng = np.random.default_rng(SEED)
    fc1, fc1_weights = _gemm_layer(rng, "fc1", 3 * 32 * 32, 32, "flat", "h1")
    fc2, fc2_weights = _gemm_layer(rng, "fc2", 32, 10, "a1", "logits")
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1, name="flatten"),
        fc1,
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        fc2,
    ]
    return helper.make_graph(
        nodes,
        "image_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=fc1_weights + fc2_weights,
    )


# Each classifier of the cascade has its own seed: two different networks, as two trained ones would be.
CLASSIFIER_SMALL_SEED = SEED + 3
CLASSIFIER_LARGE_SEED = SEED + 4


def build_image_mlp(name: str, seed: int, hidden: list[int]) -> onnx.GraphProto:
    """image FP32 [-1, 3, 32, 32] -> Flatten -> (Gemm+Relu per hidden width) -> Gemm(->10) -> logits."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Flatten", ["image"], ["a0"], axis=1, name="flatten")]
    initializers: list[onnx.TensorProto] = []
    widths = [3 * 32 * 32, *hidden, 10]
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
        last = layer == len(widths) - 1
        gemm, weights = _gemm_layer(rng, f"fc{layer}", fan_in, fan_out, f"a{layer - 1}", "logits" if last else f"h{layer}")
        nodes.append(gemm)
        initializers += weights
        if not last:
            nodes.append(helper.make_node("Relu", [f"h{layer}"], [f"a{layer}"], name=f"relu{layer}"))
    return helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )


# The churn model's 12 customer features: (mean, standard deviation) of each in its
# training data, e.g. tenure in months, monthly charges, support calls, ...
CHURN_FEATURES = [
    (32.0, 24.0), (65.0, 30.0), (2.0, 1.5), (0.3, 0.45), (1200.0, 900.0), (0.5, 0.5),
    (3.0, 2.0), (45.0, 15.0), (0.1, 0.3), (12.0, 8.0), (0.7, 0.2), (5.0, 3.0),
]  # fmt: skip
CHURN_TRAINING_ROWS = 2000


def churn_training_data() -> np.ndarray:
    """[2000, 12] FP32 rows drawn around CHURN_FEATURES (seed 1235)."""
    rng = np.random.default_rng(SEED + 1)
    mean = np.array([m for m, _ in CHURN_FEATURES])
    std = np.array([s for _, s in CHURN_FEATURES])
    return (mean + std * rng.standard_normal((CHURN_TRAINING_ROWS, len(CHURN_FEATURES)))).astype(np.float32)


def build_churn() -> onnx.GraphProto:
    # The first layer standardizes the features (so the random weights see unit-scale inputs).
    rng = np.random.default_rng(SEED)
    mean = np.array([m for m, _ in CHURN_FEATURES], dtype=np.float32)
    std = np.array([s for _, s in CHURN_FEATURES], dtype=np.float32)
    fc1, fc1_weights = _gemm_layer(rng, "fc1", 12, 16, "scaled", "h1")
    fc2, fc2_weights = _gemm_layer(rng, "fc2", 16, 2, "a1", "logits")
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"], name="center"),
        helper.make_node("Div", ["centered", "std"], ["scaled"], name="scale"),
        fc1,
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        fc2,
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    constants = [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std, "std")]
    return helper.make_graph(
        nodes,
        "churn",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        initializer=constants + fc1_weights + fc2_weights,
    )


ROLLOUT_DEMO_RETRAIN_STEP = 0.15  # version 2's weights: version 1's plus this times N(0, 1) noise (seed 1236)


def build_rollout_demo(version: int) -> onnx.GraphProto:
    rng = np.random.default_rng(SEED)
    fc1, fc1_weights = _gemm_layer(rng, "fc1", 8, 16, "x", "h1")
    fc2, fc2_weights = _gemm_layer(rng, "fc2", 16, 3, "a1", "logits")
    initializers = fc1_weights + fc2_weights
    if version > 1:
        retrain = np.random.default_rng(SEED + 2)
        initializers = [
            numpy_helper.from_array(
                (array + ROLLOUT_DEMO_RETRAIN_STEP * np.abs(array).mean() * retrain.standard_normal(array.shape)).astype(np.float32),
                tensor.name,
            )
            for tensor in initializers
            for array in [numpy_helper.to_array(tensor)]
        ]
    nodes = [
        fc1,
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        fc2,
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    return helper.make_graph(
        nodes,
        "rollout_demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=initializers,
    )


GRAPH_BUILDERS: dict[str, Callable[[], onnx.GraphProto]] = {
    "mlp": build_mlp,
    "tiny": build_tiny,
    "image_classifier": build_image_classifier,
    "churn": build_churn,
    "rollout_demo": lambda: build_rollout_demo(1),
    "classifier_small": lambda: build_image_mlp("classifier_small", CLASSIFIER_SMALL_SEED, [16]),
    "classifier_large": lambda: build_image_mlp("classifier_large", CLASSIFIER_LARGE_SEED, [64, 32]),
}
# Versions after the first, by (model, version).
LATER_VERSION_BUILDERS: dict[tuple[str, int], Callable[[], onnx.GraphProto]] = {
    ("rollout_demo", 2): lambda: build_rollout_demo(2),
}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# Data files beside the models: path under the repository -> bytes.
DATA_BUILDERS: dict[str, Callable[[], bytes]] = {
    "churn/train.npy": lambda: _npy_bytes(churn_training_data()),
}


def serialize(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="conveyor-examples")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def model_path(models_dir: Path, name: str, version: int = 1) -> Path:
    return models_dir / name / str(version) / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify the files on disk instead of writing them")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="the example model repository")
    args = parser.parse_args(argv)
    stale = []
    files = [(model_path(args.models_dir, name), lambda build=build: serialize(build())) for name, build in GRAPH_BUILDERS.items()]
    files += [(model_path(args.models_dir, name, version), lambda build=build: serialize(build()))
              for (name, version), build in LATER_VERSION_BUILDERS.items()]
    files += [(args.models_dir / relative, build) for relative, build in DATA_BUILDERS.items()]
    for path, build in files:
        data = build()
        digest = hashlib.sha256(data).hexdigest()
        if args.check:
            on_disk = path.read_bytes() if path.is_file() else None
            if on_disk != data:
                stale.append(str(path))
            print(f"{path}: {'ok' if on_disk == data else 'DIFFERS from the build'} sha256={digest}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{path}: {len(data)} bytes sha256={digest}")
    if stale:
        print(f"stale: {', '.join(stale)}; run examples/make_models.py to rebuild", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
