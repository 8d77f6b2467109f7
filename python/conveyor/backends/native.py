"""Run model.onnx on Conveyor's own CPU kernels: no onnxruntime, no Python per batch.

The graph is read with the `onnx` package and planned once at load (native_plan.py:
constants folded, Gelu patterns matched, dense layers fused with their bias and
activation); the plan becomes a C++ NativeGraph with the weights packed. The runtime
hands that graph to the batcher as its executor (`native_executor`), so every batch
runs on the instance thread without taking the GIL. `execute` runs the same graph
from Python, for callers outside the batcher.

A graph with a node the kernels cannot run fails to load with an UnsupportedGraph
(a ConfigError) naming the node and its op type; `fallback = "onnx"` in the config
makes create_backend serve it with onnxruntime instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from conveyor import _core
from conveyor.backends.base import CoreExecutorBackend
from conveyor.backends.native_plan import GraphPlan, UnsupportedGraph, plan_graph
from conveyor.backends.onnx import GraphTensor, _check_tensors, _complete_config
from conveyor.config import ModelConfig
from conveyor.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["NativeBackend", "UnsupportedGraph", "build_native_graph"]

# onnx element types as onnxruntime spells them, so config checks read the same as the onnx backend's.
_ORT_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.STRING: "string", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "double", onnx.TensorProto.UINT32: "uint32",
    onnx.TensorProto.UINT64: "uint64", onnx.TensorProto.BFLOAT16: "bfloat16",
}  # fmt: skip


class NativeBackend(CoreExecutorBackend):
    kind = "native"
    # NativeGraph.run keeps no state between calls: one graph serves every instance.
    thread_safe = True

    def __init__(self, config: ModelConfig, model_path: Path, *, version: int | None = None) -> None:
        model_path = Path(model_path)
        source = str(model_path)
        model = _load(model_path)
        inputs, outputs = _graph_signature(model.graph)
        config = _complete_config(config, inputs, outputs, source=source)
        _check_tensors(config, "input", config.inputs, inputs, source=source, all_required=True)
        _check_tensors(config, "output", config.outputs, outputs, source=source, all_required=False)
        plan = plan_graph(model, source)
        super().__init__(config, version)
        self.model_path = model_path
        self.plan = plan
        # The batcher's executor: run in C++ on the instance threads.
        self.native_executor: Any = build_native_graph(
            plan, self.input_names, self.output_names, threads=config.native.threads
        )
        logger.debug("%s: planned %s into %d native steps", self.label, model_path, len(plan.steps))



def build_native_graph(plan: GraphPlan, input_names: list[str], output_names: list[str], *, threads: int = 1) -> Any:
    """The C++ NativeGraph for `plan`, taking inputs and giving outputs in the orders named."""
    graph = _core.NativeGraph(input_count=len(input_names), threads=threads)
    slots = {name: index for index, name in enumerate(input_names)}
    for step in plan.steps:
        out = len(slots)
        ins = [slots[name] for name in step.inputs]
        p = step.params
        if step.kind == "dense":
            bias = None if p["bias"] is None else np.ascontiguousarray(p["bias"], dtype=np.float32)
            graph.add_dense(ins[0], out, p["weight"], bias, p["activation"])
        elif step.kind == "activation":
            graph.add_activation(ins[0], out, p["activation"])
        elif step.kind == "softmax":
            graph.add_softmax(ins[0], out)
        elif step.kind == "layer_norm":
            graph.add_layer_norm(ins[0], out, p["gamma"], p["beta"], p["epsilon"])
        elif step.kind == "binary_constant":
            graph.add_binary_constant(ins[0], out, p["op"], p["constant"], p["constant_first"])
        elif step.kind == "binary":
            graph.add_binary(ins[0], ins[1], out, p["op"])
        elif step.kind == "reshape":
            graph.add_reshape(ins[0], out, p["dims"])
        elif step.kind == "flatten":
            graph.add_flatten(ins[0], out, p["axis"])
        else:
            raise AssertionError(f"unplanned step kind {step.kind}")
        slots[step.output] = out
    graph.finalize([slots[plan.outputs[name]] for name in output_names])
    return graph


def _load(model_path: Path) -> onnx.ModelProto:
    if not model_path.is_file():
        raise ConfigError(f"{model_path}: no such model file")
    try:
        return onnx.load(str(model_path))
    except Exception as exc:  # protobuf's DecodeError and friends share no useful base
        raise ConfigError(f"{model_path}: not a readable ONNX model: {exc}") from exc


def _graph_signature(graph: onnx.GraphProto) -> tuple[list[GraphTensor], list[GraphTensor]]:
    initializers = {t.name for t in graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> GraphTensor:
        tensor_type = value.type.tensor_type
        ort_type = f"tensor({_ORT_TYPE_NAMES.get(tensor_type.elem_type, 'unknown')})"
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        return GraphTensor(value.name, ort_type, shape)

    inputs = [describe(v) for v in graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in graph.output]
