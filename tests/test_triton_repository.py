"""Triton model repositories served unchanged: config.pbtxt, auto-completed ONNX models,
refused features, the one warning per model, and tritonclient against the live server."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conveyor.config import parse_model_config
from conveyor.errors import ConfigError
from conveyor.protocol.triton_pbtxt import read_config_pbtxt
from conveyor.repository import READY, UNAVAILABLE, ModelRepository
from onnx import TensorProto, helper

# Triton's QA "simple" model: two INT32[16] inputs, their sum and difference.
SIMPLE_PBTXT = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest { num_versions: 1 } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
# Not honoured by Conveyor: listed in one warning.
optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 16 ] zero_data: true } }
  }
]
response_cache { enable: true }
"""


def simple_onnx(path: Path) -> None:
    """INPUT0 + INPUT1 and INPUT0 - INPUT1 over INT32[batch, 16]."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16]) for n in ("INPUT0", "INPUT1")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]  # fmt: skip
    graph = helper.make_graph(nodes, "simple", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def write_model(root: Path, name: str, pbtxt: str | None) -> Path:
    directory = root / name
    simple_onnx(directory / "1" / "model.onnx")
    if pbtxt is not None:
        (directory / "config.pbtxt").write_text(pbtxt.replace('name: "simple"', f'name: "{name}"'))
    return directory


@pytest.fixture
def triton_repo(tmp_path: Path) -> Path:
    root = tmp_path / "triton"
    write_model(root, "simple", SIMPLE_PBTXT)
    write_model(root, "autocomplete", None)  # no config at all, as Triton auto-completes ONNX models
    write_model(root, "stateful", SIMPLE_PBTXT + "\nsequence_batching { max_sequence_idle_microseconds: 5000000 }\n")
    return root


# ---- config.pbtxt -> config ----------------------------------------------------------------


def test_simple_pbtxt_maps_onto_the_config_and_lists_what_is_not_honoured(tmp_path: Path) -> None:
    path = write_model(tmp_path, "simple", SIMPLE_PBTXT) / "config.pbtxt"
    triton = read_config_pbtxt(path, name="simple")
    config = parse_model_config(triton.fields, source=str(path), name="simple")
    assert config.backend == "onnx" and config.max_batch_size == 8
    signature = [(t.name, t.datatype, t.dims) for t in config.inputs]
    assert signature == [("INPUT0", "INT32", [16]), ("INPUT1", "INT32", [16])]
    assert [t.name for t in config.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert config.dynamic_batching.preferred_batch_sizes == [4, 8]
    assert config.dynamic_batching.max_queue_delay_us == 100
    assert config.instance_group.count == 2 and config.instance_group.device == "cpu"
    assert config.onnx.intra_op_threads == 1 and "intra_op_thread_count" not in config.parameters
    assert config.version_policy.latest == 1
    ignored = " ".join(triton.ignored)
    for field in ("optimization", "model_warmup", "response_cache"):
        assert field in ignored, triton.ignored
    assert not any(entry.startswith("model_warmup.") for entry in triton.ignored)  # the outermost field only


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        ("sequence_batching { }", "'sequence_batching': stateful sequence batching"),
        ("ensemble_scheduling { step [ { model_name: \"a\" model_version: -1 } ] }",
         "'ensemble_scheduling': only an ensemble has steps"),
        ("batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: \"N\" data_type: TYPE_INT32 } ]", "'batch_input'"),
        ("model_transaction_policy { decoupled: true }", "'model_transaction_policy.decoupled'"),
        ('default_model_filename: "other.onnx"', "rename 'other.onnx'"),
    ],
)
def test_features_conveyor_cannot_honour_refuse_the_model_with_the_reason(
    tmp_path: Path, addition: str, expected: str
) -> None:
    path = write_model(tmp_path, "m", SIMPLE_PBTXT + "\n" + addition + "\n") / "config.pbtxt"
    with pytest.raises(ConfigError) as caught:
        read_config_pbtxt(path, name="m")
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_a_reshaped_input_is_refused(tmp_path: Path) -> None:
    text = SIMPLE_PBTXT.replace("dims: [ 16 ]\n  },", "dims: [ 16 ]\n    reshape: { shape: [ 4, 4 ] }\n  },", 1)
    path = write_model(tmp_path, "m", text) / "config.pbtxt"
    with pytest.raises(ConfigError, match="input.reshape"):
        read_config_pbtxt(path, name="m")


def test_text_that_is_not_protobuf_text_format_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text("max_batch_size: [ oops")
    with pytest.raises(ConfigError, match="not a Triton model config in protobuf text format"):
        read_config_pbtxt(path, name="m")


def test_a_wrong_value_is_an_error_naming_the_field(tmp_path: Path) -> None:
    text = SIMPLE_PBTXT.replace('string_value: "1"', 'string_value: "many"')
    path = write_model(tmp_path, "m", text) / "config.pbtxt"
    with pytest.raises(ConfigError, match="parameters.intra_op_thread_count"):
        read_config_pbtxt(path, name="m")


# ---- Triton python-backend models ------------------------------------------------------------

PYTHON_PBTXT = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
# Written as Triton's python backend documents a model: requests in, one response each.
ADD_SUB_MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils

ARGS, FINALIZED = [], []


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        ARGS.append(args)
        config = json.loads(args["model_config"])
        self.dtypes = [pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
                       for name in ("OUTPUT0", "OUTPUT1")]

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            if np.isnan(a).any():
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("INPUT0 holds NaN")))
                continue
            if (a < 0).any():  # a call to another model (BLS)
                pb_utils.InferenceRequest(model_name="other", inputs=[], requested_output_names=["y"]).exec()
            outputs = [pb_utils.Tensor("OUTPUT0", (a + b).astype(self.dtypes[0])),
                       pb_utils.Tensor("OUTPUT1", (a - b).astype(self.dtypes[1]))]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self):
        FINALIZED.append(self.args["model_name"])
"""


def write_python_model(root: Path, name: str = "add_sub") -> Path:
    directory = root / name
    (directory / "1").mkdir(parents=True)
    (directory / "config.pbtxt").write_text(PYTHON_PBTXT)
    (directory / "1" / "model.py").write_text(ADD_SUB_MODEL)
    return directory


def test_a_triton_python_model_runs_its_initialize_execute_and_finalize(tmp_path: Path) -> None:
    from conveyor.errors import ModelExecutionError
    from conveyor.runtime import Runtime

    write_python_model(tmp_path)
    runtime = Runtime.from_repository(tmp_path, models=["add_sub"])
    try:
        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        b = np.ones((3, 4), np.float32)
        outputs = runtime.infer("add_sub", {"INPUT0": a, "INPUT1": b})
        np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
        np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)
        with pytest.raises(ModelExecutionError, match="INPUT0 holds NaN"):
            runtime.infer("add_sub", {"INPUT0": np.full((1, 4), np.nan, np.float32), "INPUT1": b[:1]})
        with pytest.raises(ModelExecutionError, match="BLS"):
            runtime.infer("add_sub", {"INPUT0": -a[:1], "INPUT1": b[:1]})
        np.testing.assert_array_equal(runtime.infer("add_sub", {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)
        module = next(m for name, m in sys.modules.items() if name.startswith("_conveyor_model_add_sub"))
    finally:
        runtime.close()
    assert module.FINALIZED == ["add_sub"]
    (args,) = module.ARGS
    assert args["model_name"] == "add_sub" and args["model_version"] == "1"
    assert args["model_repository"] == str(tmp_path / "add_sub")
    assert json.loads(args["model_config"])["max_batch_size"] == 8


# ---- the repository --------------------------------------------------------------------------


def test_repository_serves_pbtxt_and_autocompleted_models_beside_a_refused_one(triton_repo: Path) -> None:
    repository = ModelRepository(triton_repo)
    states = {(entry.name, entry.version): (entry.state, entry.reason) for entry in repository.index()}
    assert states[("simple", 1)][0] == READY
    assert states[("autocomplete", 1)][0] == READY
    state, reason = states[("stateful", None)]
    assert state == UNAVAILABLE and "sequence_batching" in reason
    source = repository.load_model("autocomplete")
    assert source.config.backend == "onnx"
    assert [t.name for t in source.config.inputs] == ["INPUT0", "INPUT1"]  # from the graph
    # Every graph tensor starts with a variable dim and nothing set max_batch_size: it batches.
    assert source.config.max_batch_size == 32 and source.config.inputs[0].dims == [16]


def test_a_config_that_sets_max_batch_size_0_keeps_the_batch_dim_in_its_tensors(tmp_path: Path) -> None:
    write_model(tmp_path, "unbatched", None)
    (tmp_path / "unbatched" / "config.toml").write_text('backend = "onnx"\nmax_batch_size = 0\n')
    config = ModelRepository(tmp_path).load_model("unbatched").config
    assert config.max_batch_size == 0 and config.inputs[0].dims == [-1, 16]


def test_loading_warns_once_listing_every_field_not_honoured(
    triton_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor.repository"):
        ModelRepository(triton_repo).load_model("simple")
    warnings = [record.getMessage() for record in caplog.records if "does not honour" in record.getMessage()]
    assert len(warnings) == 1
    assert all(field in warnings[0] for field in ("optimization", "model_warmup", "response_cache"))


def test_an_edited_pbtxt_changes_the_fingerprint(triton_repo: Path) -> None:
    repository = ModelRepository(triton_repo)
    before = repository.scan_model("simple")
    edited = SIMPLE_PBTXT.replace("max_batch_size: 8", "max_batch_size: 4  ")
    (triton_repo / "simple" / "config.pbtxt").write_text(edited)
    assert repository.scan_model("simple") != before


# ---- conveyor import-triton ------------------------------------------------------------------


def test_import_triton_writes_equivalent_config_toml_and_skips_a_refused_model(
    triton_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conveyor.cli import main

    (triton_repo / "simple" / "labels.txt").write_text("a\nb\n")
    out = tmp_path / "imported"
    assert main(["import-triton", str(triton_repo), "--out", str(out)]) == 1  # 'stateful' refused
    captured = capsys.readouterr()
    assert "model 'stateful' not imported" in captured.err and "sequence_batching" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["autocomplete", "simple"]
    assert not (out / "simple" / "config.pbtxt").exists() and (out / "simple" / "labels.txt").is_file()
    text = (out / "simple" / "config.toml").read_text()
    assert "#   model_warmup" in text  # what is not honoured heads the file
    imported = ModelRepository(out).load_model("simple").config
    served = ModelRepository(triton_repo).load_model("simple").config
    assert imported.model_dump(exclude={"name"}) == served.model_dump(exclude={"name"})
    assert ModelRepository(out).load_model("autocomplete").config.backend == "onnx"
    # Nothing is overwritten: a second import into the same place is refused as a whole.
    assert main(["import-triton", str(triton_repo), "--out", str(out)]) == 2
    assert "already holds autocomplete, simple" in capsys.readouterr().err


# ---- unmodified tritonclient against the live server ------------------------------------------


def test_tritonclient_infers_a_triton_repository_model_over_http_and_grpc(
    triton_repo: Path, tmp_path: Path
) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from test_clients_live import LiveServer

    shutil.rmtree(triton_repo / "stateful")  # readiness waits for every model (tested above without a server)
    write_python_model(triton_repo)
    server = LiveServer(triton_repo, tmp_path)
    try:
        server.wait_ready()
        a = np.arange(32, dtype=np.int32).reshape(2, 16)
        b = np.full((2, 16), 3, dtype=np.int32)
        for module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
            client = module.InferenceServerClient(url)
            inputs = [module.InferInput("INPUT0", [2, 16], "INT32"), module.InferInput("INPUT1", [2, 16], "INT32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            for model in ("simple", "autocomplete"):
                result = client.infer(model, inputs)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
            metadata = client.get_model_metadata("simple")
            names = [tensor["name"] if isinstance(tensor, dict) else tensor.name for tensor in
                     (metadata["inputs"] if isinstance(metadata, dict) else metadata.inputs)]  # fmt: skip
            assert names == ["INPUT0", "INPUT1"]
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            floats = [module.InferInput("INPUT0", [2, 4], "FP32"), module.InferInput("INPUT1", [2, 4], "FP32")]
            floats[0].set_data_from_numpy(x)
            floats[1].set_data_from_numpy(x)
            np.testing.assert_array_equal(client.infer("add_sub", floats).as_numpy("OUTPUT0"), 2 * x)
            floats[0].set_data_from_numpy(-x - 1)
            with pytest.raises(Exception, match="BLS"):
                client.infer("add_sub", floats)
            client.close()
        assert "does not honour" in server.log()
    finally:
        server.stop()


def test_a_labels_file_whose_count_differs_from_the_classes_is_served_with_a_warning(
    triton_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from conveyor.runtime import Runtime
    from conveyor.server.models import ModelManager

    text = SIMPLE_PBTXT.replace('{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }',
                                '{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] label_filename: "labels.txt" }')
    (triton_repo / "simple" / "config.pbtxt").write_text(text)
    (triton_repo / "simple" / "labels.txt").write_text("a\nb\n")
    with Runtime() as runtime, caplog.at_level(logging.WARNING, logger="conveyor.server.models"):
        manager = ModelManager(ModelRepository(triton_repo), runtime, "explicit")
        manager.load("simple")
        assert manager.labels("simple", "OUTPUT0") == ["a", "b"]
    assert any("has 16 classes but its labels file labels.txt has 2 lines" in r.getMessage() for r in caplog.records)
