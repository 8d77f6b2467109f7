"""Plan an ONNX graph for the native backend: fold constants, match patterns, fuse layers.

The result is a list of `Step`s over named values that maps one to one onto the C++
NativeGraph's add_* calls. Anything the kernels cannot run raises UnsupportedGraph
naming the node and its op type, so the caller can fail or fall back to onnxruntime.

Planning, in order:
1. Constants: initializers, Constant nodes, and every supported node whose inputs are
   all constants, computed here with numpy (Reshape/Transpose of weights vanish).
2. Each remaining node becomes a step; shapes are tracked (None: unknown, e.g. batch).
3. Gelu written out as x * 0.5 * (1 + Erf(x / sqrt(2))) becomes one gelu_erf step.
4. A dense step (Gemm, MatMul) absorbs a following constant Add/Sub into its bias and
   then an activation, when nothing else reads the value in between.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from conveyor.errors import ConfigError

SUPPORTED_OPS = (
    "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Sigmoid", "Tanh", "Softmax",
    "LayerNormalization", "Flatten", "Reshape", "Identity", "Dropout (inference)", "Constant",
    "Transpose (of constants)", "Erf (in the Gelu pattern)",
)  # fmt: skip

_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
_ELEMENTWISE = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
_FOLDABLE = {"Constant", "Identity", "Reshape", "Transpose", "Flatten", "Add", "Sub", "Mul", "Div"}

Shape = tuple[int | None, ...]


class UnsupportedGraph(ConfigError):
    """The graph holds something the native backend cannot run (fallback = "onnx" runs it on onnxruntime)."""


@dataclass
class Step:
    """One NativeGraph step: `kind` names the add_* call, `params` its extra arguments."""

    kind: str  # dense, activation, softmax, layer_norm, binary_constant, binary, reshape, flatten, erf
    inputs: list[str]
    output: str
    node: str  # how messages name the ONNX node it came from
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class GraphPlan:
    inputs: list[str]  # the graph's inputs (initializers excluded), in graph order
    outputs: dict[str, str]  # graph output name -> the step output (or graph input) holding it
    steps: list[Step]


def describe_node(node: onnx.NodeProto, index: int) -> str:
    name = node.name or f"#{index}"
    return f"node '{name}' ({node.op_type})"


class _Planner:
    def __init__(self, graph: onnx.GraphProto, opset: int, source: str) -> None:
        self.source = source
        self.opset = opset
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.shapes: dict[str, Shape] = {}
        self.aliases: dict[str, str] = {}
        self.steps: list[Step] = []
        self.graph_outputs = [o.name for o in graph.output]
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        for value in graph.input:
            if value.name in self.constants:
                continue
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type != onnx.TensorProto.FLOAT:
                dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
                raise UnsupportedGraph(
                    f"{source}: input '{value.name}' is {dtype}; the native backend runs FP32 graphs"
                )
            dims = tensor_type.shape.dim
            self.shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        for value in graph.output:
            elem_type = value.type.tensor_type.elem_type
            if elem_type != onnx.TensorProto.FLOAT:
                dtype = onnx.TensorProto.DataType.Name(elem_type)
                raise UnsupportedGraph(
                    f"{source}: output '{value.name}' is {dtype}; the native backend runs FP32 graphs"
                )

    # ---- helpers ----
    def unsupported(self, where: str, why: str) -> UnsupportedGraph:
        return UnsupportedGraph(
            f"{self.source}: {where} is not supported by the native backend: {why} "
            f'(supported: {", ".join(SUPPORTED_OPS)}); set fallback = "onnx" to run this model on onnxruntime'
        )

    def resolve(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(self.resolve(name)) if name else None

    def dynamic(self, name: str, where: str) -> Shape:
        resolved = self.resolve(name)
        if resolved not in self.shapes:
            raise self.unsupported(where, f"its input '{name}' is neither a graph input nor computed before it")
        return self.shapes[resolved]

    def emit(self, kind: str, inputs: list[str], output: str, shape: Shape, where: str, **params: Any) -> None:
        self.steps.append(Step(kind, [self.resolve(i) for i in inputs], output, where, params))
        self.shapes[output] = shape

    # ---- nodes ----
    def add_node(self, node: onnx.NodeProto, index: int) -> None:
        where = describe_node(node, index)
        if node.domain not in ("", "ai.onnx"):
            raise self.unsupported(where, f"operators of domain '{node.domain}'")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        present = [name for name in node.input if name]
        if node.op_type in _FOLDABLE and all(self.constant(name) is not None for name in present):
            self.constants[node.output[0]] = _fold(node.op_type, [self.constant(n) for n in present], attrs, where)
            return
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            raise self.unsupported(where, f"op type {node.op_type}")
        handler(node, attrs, where)

    def _op_Identity(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        self.dynamic(node.input[0], where)
        self.aliases[node.output[0]] = node.input[0]

    def _op_Dropout(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        # Serving is inference: Dropout passes its input through, unless asked to train.
        training = self.constant(node.input[2]) if len(node.input) > 2 else None
        if len(node.input) > 2 and node.input[2] and (training is None or bool(training.reshape(-1)[0])):
            raise self.unsupported(where, "training_mode that is not a constant false")
        if len(node.output) > 1 and node.output[1]:
            raise self.unsupported(where, "the mask output")
        self._op_Identity(node, attrs, where)

    def _op_Gemm(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        weight = self.constant(node.input[1])
        if weight is None or weight.ndim != 2:
            raise self.unsupported(where, "B must be a constant matrix")
        if attrs.get("transA", 0):
            raise self.unsupported(where, "transA = 1")
        weight = (weight.T if attrs.get("transB", 0) else weight).astype(np.float32) * np.float32(
            attrs.get("alpha", 1.0)
        )
        bias = self.constant(node.input[2]) if len(node.input) > 2 else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            raise self.unsupported(where, "C must be a constant")
        n = weight.shape[1]
        if bias is not None:
            bias = _as_row_vector(bias, n)
            if bias is None:
                raise self.unsupported(where, f"C must broadcast to [{n}] (one value per output column)")
            bias = bias * np.float32(attrs.get("beta", 1.0))
        self._dense(node, shape, weight, bias, where)

    def _op_MatMul(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        if self.constant(node.input[0]) is not None:
            raise self.unsupported(where, "a constant first operand (only x @ W with a constant W runs natively)")
        shape = self.dynamic(node.input[0], where)
        weight = self.constant(node.input[1])
        if weight is None or weight.ndim != 2:
            raise self.unsupported(where, "the second operand must be a constant matrix")
        if len(shape) < 2:
            raise self.unsupported(where, f"a first operand of rank {len(shape)} (expected >= 2)")
        self._dense(node, shape, weight.astype(np.float32), None, where)

    def _dense(
        self, node: onnx.NodeProto, shape: Shape, weight: np.ndarray, bias: np.ndarray | None, where: str
    ) -> None:
        k, n = weight.shape
        if shape and shape[-1] is not None and shape[-1] != k:
            raise self.unsupported(where, f"input has {shape[-1]} columns but the weight has {k} rows")
        self.emit(
            "dense",
            [node.input[0]],
            node.output[0],
            shape[:-1] + (n,),
            where,
            weight=np.ascontiguousarray(weight),
            bias=bias,
            activation="none",
        )

    def _elementwise(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        op = _ELEMENTWISE[node.op_type]
        a, b = node.input[0], node.input[1]
        const_a, const_b = self.constant(a), self.constant(b)
        if const_a is None and const_b is None:
            shape_a, shape_b = self.dynamic(a, where), self.dynamic(b, where)
            if shape_a != shape_b:
                raise self.unsupported(
                    where, f"broadcasting between computed tensors ({_text(shape_a)} and {_text(shape_b)})"
                )
            self.emit("binary", [a, b], node.output[0], shape_a, where, op=op)
            return
        dynamic_name, constant = (b, const_a) if const_a is not None else (a, const_b)
        shape = self.dynamic(dynamic_name, where)
        values = _broadcast_constant(constant, shape)
        if values is None:
            raise self.unsupported(
                where,
                f"a constant of shape {list(constant.shape)} against {_text(shape)}: "
                "only scalars and one value per element of the last axis broadcast natively",
            )
        self.emit(
            "binary_constant",
            [dynamic_name],
            node.output[0],
            shape,
            where,
            op=op,
            constant=values,
            constant_first=const_a is not None,
        )

    _op_Add = _op_Sub = _op_Mul = _op_Div = _elementwise

    def _activation(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        self.emit("activation", [node.input[0]], node.output[0], shape, where, activation=_ACTIVATIONS[node.op_type])

    _op_Relu = _op_Sigmoid = _op_Tanh = _activation

    def _op_Gelu(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        approximate = attrs.get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        if approximate not in ("none", "tanh"):
            raise self.unsupported(where, f"approximate = '{approximate}'")
        shape = self.dynamic(node.input[0], where)
        activation = "gelu_erf" if approximate == "none" else "gelu_tanh"
        self.emit("activation", [node.input[0]], node.output[0], shape, where, activation=activation)

    def _op_Erf(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        # Only as part of the Gelu pattern; _fuse_gelu removes it or reports it.
        self.emit("erf", [node.input[0]], node.output[0], self.dynamic(node.input[0], where), where)

    def _op_Softmax(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        # Before opset 13 Softmax flattened the dims from `axis` on (default 1): the same
        # as the last axis only when axis is the last one.
        axis = attrs.get("axis", -1 if self.opset >= 13 else 1)
        if axis % max(len(shape), 1) != len(shape) - 1:
            raise self.unsupported(
                where, f"softmax over axis {axis} of a rank-{len(shape)} tensor (only the last axis)"
            )
        self.emit("softmax", [node.input[0]], node.output[0], shape, where)

    def _op_LayerNormalization(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        axis = attrs.get("axis", -1)
        if axis % max(len(shape), 1) != len(shape) - 1:
            raise self.unsupported(
                where, f"normalizing from axis {axis} of a rank-{len(shape)} tensor (only the last axis)"
            )
        if any(node.output[1:]):
            raise self.unsupported(where, "the Mean and InvStdDev outputs")
        cols = shape[-1] if shape else None
        params = {}
        for key, position in (("gamma", 1), ("beta", 2)):
            name = node.input[position] if len(node.input) > position else ""
            value = self.constant(name)
            if name and value is None:
                raise self.unsupported(
                    where, f"a computed {'scale' if position == 1 else 'bias'} (it must be a constant)"
                )
            vector = None if value is None else _as_row_vector(value, cols if cols is not None else value.size)
            if value is not None and vector is None:
                raise self.unsupported(where, f"a {key} of shape {list(value.shape)} for rows of {cols}")
            params[key] = [] if vector is None else vector.tolist()
        self.emit(
            "layer_norm",
            [node.input[0]],
            node.output[0],
            shape,
            where,
            epsilon=float(attrs.get("epsilon", 1e-5)),
            **params,
        )

    def _op_Flatten(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        axis = attrs.get("axis", 1)
        axis = axis + len(shape) if axis < 0 else axis
        out = (_product(shape[:axis]), _product(shape[axis:]))
        self.emit("flatten", [node.input[0]], node.output[0], out, where, axis=axis)

    def _op_Reshape(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        target = self.constant(node.input[1])
        if target is None:
            raise self.unsupported(where, "a computed target shape (it must be a constant)")
        dims = [int(d) for d in target.reshape(-1)]
        if attrs.get("allowzero", 0) and 0 in dims:
            raise self.unsupported(where, "allowzero = 1 with a zero dim")
        out = tuple(shape[i] if d == 0 and i < len(shape) else (None if d == -1 else d) for i, d in enumerate(dims))
        total = _product(shape)
        if -1 in dims and total is not None:
            known = _product(tuple(d for d in out if d is not None))
            out = tuple(total // known if d is None else d for d in out) if known else out
        self.emit("reshape", [node.input[0]], node.output[0], out, where, dims=dims)

    def _op_Transpose(self, node: onnx.NodeProto, attrs: dict, where: str) -> None:
        shape = self.dynamic(node.input[0], where)
        perm = list(attrs.get("perm", range(len(shape) - 1, -1, -1)))
        if perm != list(range(len(shape))):
            raise self.unsupported(where, "transposing a computed tensor (only constants are transposed, at load)")
        self.aliases[node.output[0]] = node.input[0]

    # ---- passes ----
    def consumers(self) -> Counter[str]:
        counts = Counter(name for step in self.steps for name in step.inputs)
        counts.update(self.resolve(name) for name in self.graph_outputs)
        return counts

    def fuse_gelu(self) -> None:
        """x * 0.5 * (1 + Erf(x / sqrt(2))), in the orders exporters write it, becomes gelu_erf."""
        for erf in [step for step in self.steps if step.kind == "erf"]:
            match = _match_gelu(erf, self.steps, self.consumers(), set(map(self.resolve, self.graph_outputs)))
            if match is None:
                continue
            x, last, removed = match
            position = self.steps.index(last)
            self.steps[position] = Step(
                "activation", [x], last.output, f"Gelu pattern ending at {last.node}", {"activation": "gelu_erf"}
            )
            self.steps = [step for step in self.steps if not any(step is r for r in removed)]
        for step in self.steps:
            if step.kind == "erf":
                raise self.unsupported(step.node, "Erf outside the Gelu pattern x * 0.5 * (1 + Erf(x / sqrt(2)))")

    def fuse_dense(self) -> None:
        """dense -> Add/Sub(constant) -> activation becomes one dense with a bias and an epilogue."""
        outputs = set(map(self.resolve, self.graph_outputs))
        changed = True
        while changed:
            changed = False
            counts = self.consumers()
            by_input = {step.inputs[0]: step for step in self.steps if step.inputs}
            for dense in [step for step in self.steps if step.kind == "dense"]:
                value = dense.output
                after = by_input.get(value)
                if after is None or counts[value] != 1 or value in outputs or dense.params["activation"] != "none":
                    continue
                n = dense.params["weight"].shape[1]
                if (
                    after.kind == "binary_constant"
                    and after.params["op"] in ("add", "sub")
                    and not (after.params["op"] == "sub" and after.params["constant_first"])
                ):
                    addend = np.broadcast_to(np.asarray(after.params["constant"], np.float32), (n,))
                    bias = dense.params["bias"]
                    sign = np.float32(-1.0 if after.params["op"] == "sub" else 1.0)
                    dense.params["bias"] = (np.zeros(n, np.float32) if bias is None else bias) + sign * addend
                elif after.kind == "activation":
                    dense.params["activation"] = after.params["activation"]
                else:
                    continue
                dense.output = after.output
                self.steps.remove(after)
                changed = True
                break


def plan_graph(model: onnx.ModelProto, source: str) -> GraphPlan:
    """The steps that run `model` on the native kernels; UnsupportedGraph if any node cannot."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    planner = _Planner(model.graph, opset, source)
    for index, node in enumerate(model.graph.node):
        planner.add_node(node, index)
    planner.fuse_gelu()
    planner.fuse_dense()
    outputs = {}
    for name in planner.graph_outputs:
        resolved = planner.resolve(name)
        if resolved in planner.constants:
            raise UnsupportedGraph(f"{source}: output '{name}' is a constant; the native backend computes outputs only")
        outputs[name] = resolved
    return GraphPlan(planner.inputs, outputs, planner.steps)


def _match_gelu(
    erf: Step, steps: list[Step], counts: Counter[str], outputs: set[str]
) -> tuple[str, Step, list[Step]] | None:
    """(x, the step producing the result, the steps replaced) when `erf` is in a Gelu pattern."""
    producers = {step.output: step for step in steps}
    readers: dict[str, list[Step]] = {}
    for step in steps:
        for name in step.inputs:
            readers.setdefault(name, []).append(step)

    def only_reader(value: str) -> Step | None:
        found = readers.get(value, [])
        return found[0] if len(found) == 1 and counts[value] == 1 and value not in outputs else None

    def is_constant(step: Step | None, op: str, value: float) -> bool:
        # x op c; for add and mul also c op x.
        return (
            step is not None
            and step.kind == "binary_constant"
            and step.params["op"] == op
            and (op in ("add", "mul") or not step.params["constant_first"])
            and len(step.params["constant"]) == 1
            and math.isclose(step.params["constant"][0], value, rel_tol=1e-5)
        )

    scaled = producers.get(erf.inputs[0])
    if not (is_constant(scaled, "div", math.sqrt(2)) or is_constant(scaled, "mul", 1 / math.sqrt(2))):
        return None
    if only_reader(scaled.output) is not erf:
        return None
    x = scaled.inputs[0]
    plus_one = only_reader(erf.output)
    if not is_constant(plus_one, "add", 1.0):
        return None
    first = only_reader(plus_one.output)
    if first is None or first.kind not in ("binary", "binary_constant") or first.params["op"] != "mul":
        return None
    if first.kind == "binary_constant":  # (1 + erf) * 0.5, then * x
        if not is_constant(first, "mul", 0.5):
            return None
        last = only_reader(first.output)
        if (
            last is None
            or last.kind != "binary"
            or last.params["op"] != "mul"
            or sorted(last.inputs) != sorted([x, first.output])
        ):
            return None
        return x, last, [scaled, erf, plus_one, first]
    other = first.inputs[1] if first.inputs[0] == plus_one.output else first.inputs[0]
    if other == x:  # x * (1 + erf), then * 0.5
        last = only_reader(first.output)
        return (x, last, [scaled, erf, plus_one, first]) if is_constant(last, "mul", 0.5) else None
    half = producers.get(other)  # (x * 0.5) * (1 + erf)
    if is_constant(half, "mul", 0.5) and half.inputs[0] == x and only_reader(other) is first:
        return x, first, [scaled, erf, plus_one, half]
    return None


def _fold(op_type: str, inputs: list[np.ndarray], attrs: dict, where: str) -> np.ndarray:
    """The value of a node whose inputs are all constants."""
    if op_type == "Constant":
        return _constant_attribute(attrs, where)
    x = inputs[0]
    if op_type == "Identity":
        return x
    if op_type == "Reshape":
        dims = [x.shape[i] if d == 0 and not attrs.get("allowzero", 0) else int(d) for i, d in enumerate(inputs[1])]
        return x.reshape(dims)
    if op_type == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op_type == "Flatten":
        axis = attrs.get("axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    a, b = inputs
    if op_type == "Div" and np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer division truncates
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op_type](a, b).astype(a.dtype)


def _constant_attribute(attrs: dict, where: str) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise UnsupportedGraph(f"{where}: a Constant without a numeric value is not supported by the native backend")


def _as_row_vector(value: np.ndarray, n: int) -> np.ndarray | None:
    """value as float32 [n] when it broadcasts to one value per column ([], [1], [n], [1, n])."""
    if value.size == 1:
        return np.full(n, value.reshape(-1)[0], dtype=np.float32)
    squeezed = value.reshape(value.shape[-1:]) if value.size == value.shape[-1] else None
    return None if squeezed is None or squeezed.shape[0] != n else squeezed.astype(np.float32)


def _broadcast_constant(constant: np.ndarray, shape: Shape) -> list[float] | None:
    """The constant as 1 value or one per element of the last axis; None if it broadcasts otherwise."""
    if constant.ndim > max(len(shape), 1):
        return None
    if constant.size == 1:
        return [float(constant.reshape(-1)[0])]
    last = shape[-1] if shape else None
    if constant.size != constant.shape[-1] or (last is not None and constant.shape[-1] != last):
        return None
    return constant.astype(np.float32).reshape(-1).tolist()


def _product(dims: Shape) -> int | None:
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


def _text(shape: Shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
