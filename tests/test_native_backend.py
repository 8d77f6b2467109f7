"""The native backend against onnxruntime on generated graphs, its planner, fallback and runtime use."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import conveyor
from conveyor.backends import NativeBackend, OnnxBackend, create_backend
from conveyor.config import parse_model_config
from conveyor.errors import ConfigError, InvalidInput, Unavailable

EXAMPLE_MLP = Path(__file__).resolve().parents[1] / "examples" / "models" / "mlp" / "1"
RNG = np.random.default_rng(7)


def weights(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def write_model(
    directory: Path,
    nodes: list,
    initializers: dict[str, np.ndarray],
    inputs: dict[str, list],
    outputs: dict[str, list],
    *,
    opset: int = 17,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        initializer=[numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 9
    version_dir = directory / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(model.SerializeToString())
    return version_dir


def native_config(max_batch_size: int = 16, **fields: Any):
    return parse_model_config(
        {"backend": "native", "max_batch_size": max_batch_size, **fields}, source="test", name="m"
    )


def assert_matches_onnxruntime(version_dir: Path, feeds: dict[str, np.ndarray], **config: Any) -> NativeBackend:
    backend = create_backend(native_config(**config), version_dir)
    assert isinstance(backend, NativeBackend)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(backend.output_names, feeds)
    got = backend.execute([feeds[name] for name in backend.input_names])
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=2e-5)
    return backend


def steps(backend: NativeBackend) -> list[str]:
    return [line.split(" ")[0] for line in backend.native_executor.describe().splitlines()]


def x_of(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_example_mlp_matches_onnxruntime_and_fuses_into_three_dense_steps() -> None:
    backend = assert_matches_onnxruntime(EXAMPLE_MLP, {"x": x_of(9, 64)})
    assert steps(backend) == ["dense(relu)", "dense(relu)", "dense(none)", "softmax"]


def test_gemm_with_trans_b_alpha_beta_and_activations(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"], transB=1, alpha=0.5, beta=2.0, name="fc1"),
        helper.make_node("Tanh", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Sigmoid", ["h2"], ["y"]),
    ]
    init = {"W1": weights(24, 16), "B1": weights(1, 24), "W2": weights(24, 5)}
    backend = assert_matches_onnxruntime(
        write_model(tmp_path, nodes, init, {"x": ["b", 16]}, {"y": ["b", 5]}), {"x": x_of(6, 16)}
    )
    assert steps(backend) == ["dense(tanh)", "dense(sigmoid)"]


def test_matmul_add_relu_chain_on_rank_three_input(tmp_path: Path) -> None:
    nodes, init, last = [], {}, "x"
    for i, (k, n) in enumerate([(8, 32), (32, 32), (32, 4)]):
        init[f"W{i}"], init[f"B{i}"] = weights(k, n), weights(n)
        nodes += [
            helper.make_node("MatMul", [last, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"B{i}", f"m{i}"], [f"s{i}"]),  # bias first: still fused
            helper.make_node("Relu", [f"s{i}"], [f"r{i}"]),
        ]
        last = f"r{i}"
    nodes.append(helper.make_node("Dropout", [last], ["y"], name="drop"))  # inference: passes through
    backend = assert_matches_onnxruntime(
        write_model(tmp_path, nodes, init, {"x": ["b", 3, 8]}, {"y": ["b", 3, 4]}), {"x": x_of(5, 3, 8)}
    )
    assert steps(backend) == ["dense(relu)"] * 3


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_op(tmp_path: Path, approximate: str) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Gelu", ["h"], ["g"], approximate=approximate),
        helper.make_node("Gelu", ["g"], ["y"], approximate=approximate),  # not after a dense: standalone
    ]
    version_dir = write_model(
        tmp_path, nodes, {"W": weights(8, 8, scale=1.0)}, {"x": ["b", 8]}, {"y": ["b", 8]}, opset=20
    )
    backend = assert_matches_onnxruntime(version_dir, {"x": x_of(4, 8) * 3})
    gelu = "gelu_erf" if approximate == "none" else "gelu_tanh"
    assert steps(backend) == [f"dense({gelu})", f"activation({gelu})"]


def _erf_gelu_nodes(order: str) -> list:
    scaled = (
        helper.make_node("Div", ["h", "sqrt2"], ["t"])
        if order != "half_first"
        else helper.make_node("Mul", ["inv_sqrt2", "h"], ["t"])
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        scaled,
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
    ]
    if order == "x_first":  # (h * (1 + erf)) * 0.5, as PyTorch exports it
        nodes += [helper.make_node("Mul", ["h", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    elif order == "half_first":  # (h * 0.5) * (1 + erf)
        nodes += [helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Mul", ["hh", "a"], ["y"])]
    else:  # h * ((1 + erf) * 0.5)
        nodes += [helper.make_node("Mul", ["a", "half"], ["m"]), helper.make_node("Mul", ["h", "m"], ["y"])]
    return nodes


@pytest.mark.parametrize("order", ["x_first", "half_first", "half_last"])
def test_erf_gelu_pattern_becomes_one_fused_dense(tmp_path: Path, order: str) -> None:
    init = {
        "W": weights(8, 8, scale=1.0),
        "sqrt2": np.array(math.sqrt(2), np.float32),
        "inv_sqrt2": np.array(1 / math.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    version_dir = write_model(tmp_path, _erf_gelu_nodes(order), init, {"x": ["b", 8]}, {"y": ["b", 8]})
    backend = assert_matches_onnxruntime(version_dir, {"x": x_of(4, 8) * 3})
    assert steps(backend) == ["dense(gelu_erf)"]


def test_layer_norm_with_and_without_bias_and_softmax(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n1"], epsilon=1e-3),
        helper.make_node("LayerNormalization", ["n1", "gamma"], ["n2"]),
        helper.make_node("Softmax", ["n2"], ["y"], axis=-1),
    ]
    init = {"gamma": weights(12, scale=1.0), "beta": weights(12)}
    version_dir = write_model(tmp_path, nodes, init, {"x": ["b", 12]}, {"y": ["b", 12]})
    backend = assert_matches_onnxruntime(version_dir, {"x": x_of(7, 12) * 5})
    assert steps(backend) == ["layer_norm", "layer_norm", "softmax"]


def test_softmax_before_opset_13_on_the_last_axis(tmp_path: Path) -> None:
    nodes = [helper.make_node("Softmax", ["x"], ["y"])]  # axis 1 by default in opset 11
    version_dir = write_model(tmp_path, nodes, {}, {"x": ["b", 6]}, {"y": ["b", 6]}, opset=11)
    assert_matches_onnxruntime(version_dir, {"x": x_of(3, 6)})


def test_reshape_and_transpose_of_constants_fold_and_views_of_computed_tensors(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),  # weights stored [N, K]
        helper.make_node("Reshape", ["b_flat", "bias_shape"], ["b"]),
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),  # [b, 2, 4] -> [b, 8]
        helper.make_node("MatMul", ["flat", "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Reshape", ["hb", "out_shape"], ["y"]),  # [b, 6] -> [b, 2, 3]
    ]
    init = {
        "Wt": weights(6, 8),
        "b_flat": weights(6),
        "bias_shape": np.array([1, 6], np.int64),
        "out_shape": np.array([0, 2, -1], np.int64),
    }
    version_dir = write_model(tmp_path, nodes, init, {"x": ["b", 2, 4]}, {"y": ["b", 2, 3]})
    backend = assert_matches_onnxruntime(version_dir, {"x": x_of(5, 2, 4)})
    assert steps(backend) == ["flatten", "dense(none)", "reshape"]


def test_elementwise_with_constants_on_either_side_and_between_tensors(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Add", ["x", "vec"], ["a"]),
        helper.make_node("Mul", ["two", "a"], ["b"]),
        helper.make_node("Sub", ["one", "b"], ["c"]),  # constant first: 1 - b
        helper.make_node("Div", ["c", "vec_row"], ["d"]),
        helper.make_node("Div", ["three", "d"], ["e"]),  # constant first: 3 / d
        helper.make_node("Sub", ["e", "x"], ["f"]),  # two computed tensors
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    init = {
        "vec": weights(5),
        "vec_row": weights(1, 5) + 2.0,
        "two": np.array(2.0, np.float32),
        "one": np.array([1.0], np.float32),
        "three": np.array(3.0, np.float32),
    }
    version_dir = write_model(tmp_path, nodes, init, {"x": ["b", 5]}, {"y": ["b", 5]})
    feeds = {"x": x_of(4, 5)}
    before = feeds["x"].copy()
    assert_matches_onnxruntime(version_dir, feeds)
    np.testing.assert_array_equal(feeds["x"], before)  # steps never write into the inputs


def test_several_outputs_in_config_order_and_an_input_passed_through(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),  # read by two: not fused
        helper.make_node("Softmax", ["r"], ["probs"]),
        helper.make_node("Identity", ["x"], ["echo"]),
    ]
    version_dir = write_model(
        tmp_path, nodes, {"W": weights(4, 3)}, {"x": ["b", 4]}, {"r": ["b", 3], "probs": ["b", 3], "echo": ["b", 4]}
    )
    outputs = [{"name": n, "datatype": "FP32", "dims": [d]} for n, d in (("echo", 4), ("probs", 3), ("r", 3))]
    inputs = [{"name": "x", "datatype": "FP32", "dims": [4]}]
    x = x_of(3, 4)
    backend = assert_matches_onnxruntime(version_dir, {"x": x}, inputs=inputs, outputs=outputs)
    assert backend.output_names == ["echo", "probs", "r"]
    echo = backend.execute([x])[0]
    assert not np.shares_memory(echo, x)


def test_threads_setting_gives_the_same_results(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    version_dir = write_model(tmp_path, nodes, {"W": weights(64, 300)}, {"x": ["b", 64]}, {"y": ["b", 300]})
    backend = assert_matches_onnxruntime(version_dir, {"x": x_of(64, 64)}, native={"threads": 2})
    assert backend.native_executor.threads == 2


def test_a_batch_with_the_wrong_width_is_an_invalid_input(tmp_path: Path) -> None:
    backend = create_backend(native_config(), EXAMPLE_MLP)
    with pytest.raises(InvalidInput, match=r"dense expects \[\.\.\., 64\]"):
        backend.native_executor.run([x_of(2, 63)])


def unsupported_model(tmp_path: Path) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Exp", ["h"], ["y"], name="the_exp")]
    return write_model(tmp_path, nodes, {"W": weights(4, 4)}, {"x": ["b", 4]}, {"y": ["b", 4]})


def test_an_unsupported_node_fails_loading_naming_the_node_and_its_op(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node 'the_exp' \(Exp\) is not supported by the native backend.*fallback"):
        create_backend(native_config(), unsupported_model(tmp_path))


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (helper.make_node("Erf", ["x"], ["y"], name="lonely"), r"node 'lonely' \(Erf\).*outside the Gelu pattern"),
        (helper.make_node("Softmax", ["x"], ["y"], axis=0, name="sm"), r"node 'sm' \(Softmax\).*only the last axis"),
        (helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0], name="tr"), r"node 'tr' \(Transpose\).*computed"),
        (helper.make_node("Add", ["x", "col"], ["y"], name="col_add"), r"node 'col_add' \(Add\).*broadcast"),
    ],
)
def test_unsupported_forms_of_supported_ops(tmp_path: Path, node, message: str) -> None:
    version_dir = write_model(tmp_path, [node], {"col": weights(4, 1)}, {"x": [4, 4]}, {"y": [4, 4]})
    with pytest.raises(ConfigError, match=message):
        create_backend(native_config(max_batch_size=0), version_dir)


def test_fallback_onnx_serves_the_model_with_onnxruntime_and_warns(tmp_path: Path, caplog) -> None:
    version_dir = unsupported_model(tmp_path)
    with caplog.at_level(logging.WARNING, logger="conveyor.backends"):
        backend = create_backend(native_config(fallback="onnx"), version_dir)
    assert isinstance(backend, OnnxBackend)
    assert getattr(backend, "native_executor", None) is None
    assert any("fallback" in r.getMessage() and "'the_exp' (Exp)" in r.getMessage() for r in caplog.records)
    x = x_of(2, 4)
    assert backend.execute([x])[0].shape == (2, 4)


def test_fallback_is_only_for_the_native_backend() -> None:
    with pytest.raises(ConfigError, match=r"field 'fallback': expected no fallback"):
        parse_model_config({"backend": "onnx", "fallback": "onnx"}, source="test", name="m")
    with pytest.raises(ConfigError, match=r"field 'fallback'"):
        native_config(fallback="python")


def test_native_threads_are_validated_and_oversubscription_warns(caplog) -> None:
    with pytest.raises(ConfigError, match=r"field 'native.threads': expected an integer >= 1, got 0"):
        native_config(native={"threads": 0})
    with caplog.at_level(logging.WARNING, logger="conveyor.config"):
        native_config(native={"threads": 512})
    assert any("native.threads (512)" in r.getMessage() for r in caplog.records)


def test_native_runs_only_on_the_cpu() -> None:
    with pytest.raises(ConfigError, match=r"field 'instance_group.device': expected 'cpu'"):
        native_config(instance_group={"device": "cuda"})


def test_runtime_runs_batches_in_cpp_without_calling_python(monkeypatch) -> None:
    calls: list[int] = []
    execute = NativeBackend.execute

    def counted(self, inputs):
        calls.append(threading.get_ident())
        return execute(self, inputs)

    monkeypatch.setattr(NativeBackend, "execute", counted)
    session = ort.InferenceSession(str(EXAMPLE_MLP / "model.onnx"), providers=["CPUExecutionProvider"])
    config = native_config(max_batch_size=64, instance_group={"count": 2})
    results: dict[int, np.ndarray] = {}
    inputs = {i: x_of(1 + i % 3, 64) for i in range(64)}
    with conveyor.Runtime() as runtime:
        runtime.add_model("m", config, model_dir=EXAMPLE_MLP)

        def call(i: int) -> None:
            results[i] = runtime.infer("m", {"x": inputs[i]})["probs"]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # Backend.execute ran once, on this thread: the probe batch at load. The batches ran in C++.
    assert calls == [threading.get_ident()]
    assert sorted(results) == list(range(64))
    for i, got in results.items():
        np.testing.assert_allclose(got, session.run(None, {"x": inputs[i]})[0], rtol=1e-4, atol=2e-6)


def test_repository_model_with_backend_native(tmp_path: Path) -> None:
    model_dir = tmp_path / "mlp"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes((EXAMPLE_MLP / "model.onnx").read_bytes())
    (model_dir / "config.toml").write_text('backend = "native"\nmax_batch_size = 8\n[native]\nthreads = 1\n')
    x = x_of(2, 64)
    with conveyor.Runtime.from_repository(tmp_path) as runtime:
        handle = runtime.model("mlp")
        assert handle.config.inputs[0].name == "x"  # filled from the graph, as for onnx
        got = runtime.infer("mlp", {"x": x})["probs"]
    session = ort.InferenceSession(str(EXAMPLE_MLP / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-4, atol=2e-6)


def test_transformer_mlp_block_with_residual(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"]),
        helper.make_node("MatMul", ["n", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Div", ["hb", "sqrt2"], ["t"]),
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["a"]),
        helper.make_node("Mul", ["hb", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "W2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["ob"]),
        helper.make_node("Add", ["x", "ob"], ["y"]),  # the residual: two computed tensors
    ]
    init = {
        "gamma": weights(16, scale=1.0), "beta": weights(16), "W1": weights(16, 64), "b1": weights(64),
        "W2": weights(64, 16), "b2": weights(16), "sqrt2": np.array(math.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32),
    }  # fmt: skip
    version_dir = write_model(tmp_path, nodes, init, {"x": ["b", 5, 16]}, {"y": ["b", 5, 16]})
    backend = assert_matches_onnxruntime(version_dir, {"x": x_of(3, 5, 16)})
    assert steps(backend) == ["layer_norm", "dense(gelu_erf)", "dense(none)", "add"]


def test_execute_reports_a_bad_batch_as_invalid_input() -> None:
    backend = create_backend(native_config(), EXAMPLE_MLP)
    with pytest.raises(InvalidInput, match=r"\[native\] dense expects"):
        backend.execute([x_of(2, 63)])
    backend.close()
    with pytest.raises(Unavailable):
        backend.execute([x_of(2, 64)])
