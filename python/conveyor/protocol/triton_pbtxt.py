"""A Triton repository's config.pbtxt, read into Conveyor's config.

`conveyor serve TRITON_REPO` serves a repository laid out for Triton: a model directory
with config.pbtxt (protobuf text format of Triton's ModelConfig) instead of config.toml.
The text is parsed with the protobuf package into the ModelConfig subset the gRPC
stubs carry (grpc/inference.proto, Triton's field names and numbers), then mapped by
`read_triton_config` (config_override.py) onto config.toml's keys.

Three kinds of field:
- honoured: name, backend/platform (onnxruntime, python, and fil: Triton FIL's tree
  models run on the trees backend, output__0 as FIL gives it), max_batch_size, input,
  output (label_filename), dynamic_batching (preferred sizes, queue delay, priority
  levels, default queue policy), one instance_group, version_policy, parameters, and
  an ensemble's ensemble_scheduling (platform "ensemble"): it is served as a model graph
  (config_graph.py), each step a [[graph.step]] whose input_map and output_map become
  the step's inputs and output aliases, the ensemble's outputs the graph's;
- refused: fields that change what the model computes or how a request maps onto it
  (sequence batching, reshape, ragged batches, batch inputs/outputs, decoupled models,
  another model file name, an ensemble step's model_namespace). The model does not load, with a message
  saying why; the other models serve;
- not honoured: everything else the file sets (optimization, model_warmup,
  response_cache, ...). The model loads and one warning per model lists them all.

A model directory with neither config.toml nor config.pbtxt whose versions hold
model.onnx is served as Triton auto-completes it: backend onnx, its signature read
from the graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from conveyor.errors import ConfigError
from conveyor.protocol.config_override import read_triton_config
from conveyor.protocol.grpc import inference_pb2 as pb

__all__ = ["TRITON_CONFIG_FILE_NAME", "TritonModelConfig", "read_config_pbtxt"]

TRITON_CONFIG_FILE_NAME = "config.pbtxt"

# Top-level or nested fields a model cannot be served correctly with, and why.
_REFUSED_FIELDS = {
    "sequence_batching": "stateful sequence batching (correlation ids, implicit state) is not served by Conveyor",
    "batch_input": "batch inputs (values the server computes per batch) are not provided by Conveyor",
    "batch_output": "batch outputs are not handled by Conveyor",
    "input.reshape": "Conveyor hands the model the shape the client sends: export the model with that shape",
    "output.reshape": "Conveyor returns the shape the model produces: export the model with that shape",
}
# Boolean fields refused only when true.
_REFUSED_WHEN_TRUE = {
    "input.allow_ragged_batch": "ragged batches are not formed by Conveyor: pad the inputs to one shape",
    "model_transaction_policy.decoupled": "decoupled (streaming) models are not served by Conveyor",
}
# Triton's onnxruntime backend parameters -> [onnx] options. Its 0 means "onnxruntime's
# default" (a thread per core); Conveyor's counts start at 1, so 0 is refused by the schema.
_ONNXRUNTIME_PARAMETERS = {"intra_op_thread_count": "intra_op_threads", "inter_op_thread_count": "inter_op_threads"}
# The model files each backend reads in a version directory.
_MODEL_FILES = {
    "onnx": ("model.onnx",),
    "trees": ("model.json", "model.ubj", "model.txt", "model.tl", "xgboost.json", "xgboost.ubj", "xgboost.model",
              "checkpoint.tl"),
}  # fmt: skip
# Triton FIL's model_type values (the trees backend tells the format by the file name).
_FIL_MODEL_TYPES = ("xgboost", "xgboost_json", "xgboost_ubj", "lightgbm", "treelite_checkpoint")
# FIL parameters that tune its GPU/CPU kernels: Conveyor's evaluator has no use for them.
_FIL_TUNING = ("algo", "storage_type", "blocks_per_sm", "threads_per_tree", "use_experimental_optimizations",
               "transfer_threshold", "cpu_nthread", "xgboost_allow_unknown_field", "layout", "chunk_size")  # fmt: skip


class TritonModelConfig:
    """What a config.pbtxt says, as config.toml's keys (`fields`), and what Conveyor does not honour (`ignored`)."""

    def __init__(self, fields: dict[str, Any], ignored: list[str]) -> None:
        self.fields = fields
        self.ignored = ignored


def read_config_pbtxt(path: Path, *, name: str) -> TritonModelConfig:
    """Read model `name`'s config.pbtxt at `path`; ConfigError naming the file and field
    when it does not parse, names a refused feature, or has a wrong value."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    message = pb.ModelConfig()
    try:
        paths, declared = _walk(text)
        text_format.Parse(declared, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: not a Triton model config in protobuf text format: {exc}") from None
    paths = sorted(set(paths))
    _refuse(paths, message, source)
    ensemble = message.platform == _ENSEMBLE_PLATFORM
    if "ensemble_scheduling" in paths and not ensemble:
        raise ConfigError(
            f"{source}: field 'ensemble_scheduling': only an ensemble has steps; set platform: \"ensemble\" "
            "(and no backend) or drop the field; the model is not loaded"
        )
    if ensemble:
        paths = [path for path in paths if path.split(".")[0] != "ensemble_scheduling"]
    unknown = [path for path in paths if not _known(pb.ModelConfig.DESCRIPTOR, path)]
    unknown = [path for path in unknown if not any(path.startswith(outer + ".") for outer in unknown)]
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if ensemble:
        if document.get("backend"):
            raise ConfigError(
                f"{source}: field 'backend': an ensemble (platform \"ensemble\") runs no backend of its own, "
                f"got {document['backend']!r}; the model is not loaded"
            )
        document.pop("platform")  # not a backend: the config becomes a graph's
    fields, ignored = read_triton_config(document, source=source)
    if ensemble:
        fields["backend"] = "graph"
        fields["graph"] = _ensemble_graph(text, source)
        _ensemble_tensors(fields["graph"], fields, source)
    backend = fields.get("backend")
    if backend is None:
        backend = _backend_from_files(Path(path).parent, source)
        fields["backend"] = backend
    filename = document.get("default_model_filename", "")
    if filename and filename not in _MODEL_FILES.get(backend, (filename,)):
        raise ConfigError(
            f"{source}: field 'default_model_filename': Conveyor reads <version>/"
            f"{' or '.join(_MODEL_FILES[backend])}; "
            f"rename {filename!r} in each version directory and drop the field"
        )
    if backend == "onnx":
        _onnxruntime_parameters(fields, source)
    if backend == "trees":
        ignored = ignored + _fil_parameters(fields, source)
    fields.setdefault("name", name)
    return TritonModelConfig(fields, sorted(set(ignored) | {f"{path} (unknown or unsupported)" for path in unknown}))


# ---- ensembles: ensemble_scheduling as a [graph] table ----------------------------------------
#
# The ModelConfig subset of the gRPC stubs has no EnsembleScheduling, so the walker blanks
# it; the block is parsed on its own, by protobuf's text format, into the message Triton
# declares (its field numbers), built here at run time.

_ENSEMBLE_PLATFORM = "ensemble"
_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ensemble_type: type[Message] | None = None


def _ensemble_message() -> Message:
    """A message holding Triton's `ensemble_scheduling` field (ModelConfig's field 15)."""
    global _ensemble_type
    if _ensemble_type is None:
        F = descriptor_pb2.FieldDescriptorProto
        file = descriptor_pb2.FileDescriptorProto(name="conveyor_triton_ensemble.proto",
                                                  package="conveyor_triton_ensemble", syntax="proto3")  # fmt: skip

        def field(message: Any, name: str, number: int, kind: int, label: int = F.LABEL_OPTIONAL,
                  type_name: str = "") -> None:  # fmt: skip
            added = message.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                added.type_name = type_name

        scheduling = file.message_type.add(name="EnsembleScheduling")
        field(scheduling, "step", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED,
              ".conveyor_triton_ensemble.EnsembleScheduling.Step")  # fmt: skip
        step = scheduling.nested_type.add(name="Step")
        field(step, "model_name", 1, F.TYPE_STRING)
        field(step, "model_version", 2, F.TYPE_INT64)
        for number, map_name, entry_name in ((3, "input_map", "InputMapEntry"), (4, "output_map", "OutputMapEntry")):
            entry = step.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            field(entry, "key", 1, F.TYPE_STRING)
            field(entry, "value", 2, F.TYPE_STRING)
            field(step, map_name, number, F.TYPE_MESSAGE, F.LABEL_REPEATED,
                  f".conveyor_triton_ensemble.EnsembleScheduling.Step.{entry_name}")  # fmt: skip
        field(step, "model_namespace", 5, F.TYPE_STRING)
        holder = file.message_type.add(name="Holder")
        field(holder, "ensemble_scheduling", 15, F.TYPE_MESSAGE,
              type_name=".conveyor_triton_ensemble.EnsembleScheduling")  # fmt: skip
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        holder_type = pool.FindMessageTypeByName("conveyor_triton_ensemble.Holder")
        _ensemble_type = message_factory.GetMessageClass(holder_type)
    return _ensemble_type()


def _ensemble_graph(text: str, source: str) -> dict[str, Any]:
    """The [graph] table of an ensemble's config.pbtxt, from its ensemble_scheduling block."""
    walker = _Walker(text)
    walker.message([], pb.ModelConfig.DESCRIPTOR, None)
    blocks = [field for field in walker.fields if field.path == "ensemble_scheduling"]
    if not blocks:
        raise ConfigError(
            f"{source}: platform \"ensemble\" without 'ensemble_scheduling': an ensemble needs its steps"
        )
    kept = "".join(
        char if char == "\n" or any(b.start <= i < b.end for b in blocks) else " " for i, char in enumerate(text)
    )  # line:column of a parse error still point into the file
    holder = _ensemble_message()
    try:
        text_format.Parse(kept, holder)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: field 'ensemble_scheduling': not Triton's EnsembleScheduling: {exc}") from None
    scheduling = holder.ensemble_scheduling  # type: ignore[attr-defined]
    if not scheduling.step:
        raise ConfigError(f"{source}: field 'ensemble_scheduling.step': an ensemble needs at least one step")
    steps: list[dict[str, Any]] = []
    used: set[str] = set()
    for index, step in enumerate(scheduling.step):
        where = f"{source}: field 'ensemble_scheduling.step[{index}]'"
        if not step.model_name:
            raise ConfigError(f"{where}: model_name is empty: name the model the step runs")
        label = f"{where} (model '{step.model_name}')"
        if step.model_namespace:
            raise ConfigError(
                f"{label}: model_namespace {step.model_namespace!r} is not served by Conveyor (one repository, "
                "one namespace): drop it and give the model a name of its own; the model is not loaded"
            )
        if step.model_version == 0 or step.model_version < -1:
            raise ConfigError(
                f"{label}: model_version must be -1 (the newest) or a version >= 1, got {step.model_version}"
            )
        base = re.sub(r"[^A-Za-z0-9_]", "_", step.model_name)
        if not _STEP_NAME.fullmatch(base):
            base = f"_{base}"
        name, count = base, 1
        while name in used:
            count += 1
            name = f"{base}_{count}"
        used.add(name)
        entry: dict[str, Any] = {"name": name, "model": step.model_name}
        if step.model_version > 0:
            entry["version"] = step.model_version
        entry["inputs"] = dict(sorted(step.input_map.items()))
        if step.output_map:
            entry["outputs"] = dict(sorted(step.output_map.items()))
        steps.append(entry)
    return {"inputs": [], "outputs": {}, "step": steps}


def _ensemble_tensors(graph: dict[str, Any], fields: dict[str, Any], source: str) -> None:
    """The graph's inputs and outputs: the ensemble's, each output the tensor a step's output_map makes."""
    graph["inputs"] = [tensor["name"] for tensor in fields.get("inputs", [])]
    graph["outputs"] = {tensor["name"]: tensor["name"] for tensor in fields.get("outputs", [])}
    if not graph["inputs"] or not graph["outputs"]:
        raise ConfigError(
            f"{source}: an ensemble declares its input and output tensors: add input [...] and output [...]"
        )
    produced = {alias for step in graph["step"] for alias in step.get("outputs", {}).values()}
    for name in graph["outputs"]:
        if name not in produced:
            raise ConfigError(
                f"{source}: ensemble output '{name}': no step's output_map produces it: map a step output to "
                f"'{name}' (tensors the steps produce: {', '.join(sorted(produced)) or 'none'})"
            )


def _refuse(paths: list[str], message: pb.ModelConfig, source: str) -> None:
    reasons = [f"field '{path}': {why}" for path, why in _REFUSED_FIELDS.items() if path in paths]
    for path, why in _REFUSED_WHEN_TRUE.items():
        if path == "input.allow_ragged_batch" and any(tensor.allow_ragged_batch for tensor in message.input):
            reasons.append(f"field '{path}': {why}")
        elif path == "model_transaction_policy.decoupled" and message.model_transaction_policy.decoupled:
            reasons.append(f"field '{path}': {why}")
    if reasons:
        raise ConfigError("\n".join(f"{source}: {reason}; the model is not loaded" for reason in reasons))


def _onnxruntime_parameters(fields: dict[str, Any], source: str) -> None:
    """Triton's onnxruntime backend reads its thread counts from `parameters`: they become [onnx]'s."""
    parameters = fields.get("parameters", {})
    onnx: dict[str, int] = {}
    for triton_key, our_key in _ONNXRUNTIME_PARAMETERS.items():
        if triton_key not in parameters:
            continue
        value = parameters.pop(triton_key)
        try:
            onnx[our_key] = int(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: field 'parameters.{triton_key}': expected an integer string_value, got {value!r}"
            ) from None
    if onnx:
        fields["onnx"] = onnx


def _fil_parameters(fields: dict[str, Any], source: str) -> list[str]:
    """Triton FIL's parameters: what output__0 holds becomes the trees backend's output role.

    output_class false: the regression value, FP32 [1]; true: the class index as FP32 [1],
    or with predict_proba true the class probabilities [classes]. Returns the tuning
    parameters it leaves out, for the warning.
    """
    parameters = fields.get("parameters", {})

    def flag(key: str) -> bool:
        value = str(parameters.pop(key, "false")).lower()
        if value not in ("true", "false"):
            raise ConfigError(f"{source}: field 'parameters.{key}': expected \"true\" or \"false\", got {value!r}")
        return value == "true"

    model_type = parameters.pop("model_type", None)
    if model_type is not None and model_type not in _FIL_MODEL_TYPES:
        raise ConfigError(
            f"{source}: field 'parameters.model_type': expected one of {', '.join(_FIL_MODEL_TYPES)}, "
            f"got {model_type!r}"
        )
    classifier, probabilities = flag("output_class"), flag("predict_proba")
    threshold = parameters.pop("threshold", None)
    if threshold is not None and float(threshold) != 0.5:
        raise ConfigError(
            f"{source}: field 'parameters.threshold': only 0.5 is served by Conveyor; set predict_proba \"true\" "
            "and apply the threshold to the probabilities in the client"
        )
    outputs = fields.get("outputs", [])
    if len(outputs) != 1:
        raise ConfigError(
            f"{source}: a FIL model must declare exactly one output (output__0); Conveyor serves no SHAP outputs"
        )
    role = ("probabilities" if probabilities else "class_index") if classifier else "prediction_column"
    fields["trees"] = {"outputs": {outputs[0]["name"]: role}}
    return [f"parameters.{key} (FIL tuning: Conveyor's evaluator has no use for it)" for key in _FIL_TUNING
            if parameters.pop(key, None) is not None]  # fmt: skip


def _backend_from_files(directory: Path, source: str) -> str:
    """The backend Triton would pick from the version directories' files, as it does without backend or platform."""
    for version in directory.iterdir():
        if version.is_dir() and (version / "model.onnx").is_file():
            return "onnx"
    raise ConfigError(
        f"{source}: neither 'backend' nor 'platform' is set and no version directory holds model.onnx; "
        'set backend: "onnxruntime" (the backends Conveyor serves from a Triton repository)'
    )


def _known(descriptor: Descriptor | None, path: str) -> bool:
    """Whether the dotted field path exists in the ModelConfig subset."""
    for part in path.split("."):
        if descriptor is None:
            return False
        field = descriptor.fields_by_name.get(part)
        if field is None:
            return False
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            descriptor = field.message_type
        else:
            descriptor = None  # a scalar: no deeper path
    return True


# ---- the text format's fields, at every depth ------------------------------------------------
#
# protobuf's own parser can skip unknown fields, but not every form Triton's configs use
# for them (a list of messages, `model_warmup [ { ... } ]`). So the text is walked here
# first: every field it sets is named by its dotted path with its span, and the fields
# the ModelConfig subset does not declare are blanked out (newlines kept, so the parser's
# line:column in an error still point into the user's file) before the strict parse.

_TOKEN = re.compile(
    r"""(?P<space>\s+|\#[^\n]*)"""
    r"""|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')"""
    r"""|(?P<punct>[{}\[\]<>:,;])"""
    r"""|(?P<word>[^\s{}\[\]<>:,;"'\#]+)"""
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class _Field:
    path: str  # dotted, from the top ("input.reshape")
    start: int  # the span of the whole field: its name, value and separator
    end: int
    known: bool  # declared by the ModelConfig subset


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            line = text.count("\n", 0, position) + 1
            column = position - text.rfind("\n", 0, position)
            raise text_format.ParseError(f"{line}:{column} : unexpected {text[position]!r}")
        if match.lastgroup != "space":
            tokens.append(_Token(match.lastgroup or "", match.group(), match.start(), match.end()))
        position = match.end()
    return tokens


class _Walker:
    """Names every field of a protobuf text-format message, with its span."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.fields: list[_Field] = []

    def peek(self) -> str | None:
        return self.tokens[self.at].text if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> _Token:
        if self.at >= len(self.tokens):
            raise text_format.ParseError(f"unexpected end of text{f', expected {expected!r}' if expected else ''}")
        token = self.tokens[self.at]
        if expected is not None and token.text != expected:
            raise text_format.ParseError(f"expected {expected!r}, got {token.text!r}")
        self.at += 1
        return token

    def message(self, path: list[str], descriptor: Descriptor | None, closing: str | None) -> None:
        while self.peek() is not None and self.peek() != closing:
            first = self.take()
            if first.text == "[":  # an extension or an Any's type URL
                while self.take().text != "]":
                    pass
                name, field = "[extension]", None
            elif first.kind == "word":
                name = first.text
                field = None if descriptor is None else descriptor.fields_by_name.get(name)
            else:
                raise text_format.ParseError(f"expected a field name, got {first.text!r}")
            inner = field.message_type if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE else None
            if self.peek() == ":":
                self.take()
            self.value([*path, name], inner)
            if self.peek() in (",", ";"):
                self.take()
            end = self.tokens[self.at - 1].end
            self.fields.append(_Field(".".join([*path, name]), first.start, end, field is not None))
        if closing is not None:
            self.take(closing)

    def value(self, path: list[str], descriptor: Descriptor | None) -> None:
        opening = self.peek()
        if opening in ("{", "<"):
            self.take()
            self.message(path, descriptor, "}" if opening == "{" else ">")
        elif opening == "[":
            self.take()
            while self.peek() != "]":
                self.value(path, descriptor)
                if self.peek() == ",":
                    self.take()
            self.take("]")
        else:
            token = self.take()
            if token.kind == "string":
                while self.peek() is not None and self.tokens[self.at].kind == "string":
                    self.take()  # adjacent strings concatenate
            elif token.kind != "word":
                raise text_format.ParseError(f"expected a value, got {token.text!r}")


def _walk(text: str) -> tuple[list[str], str]:
    """The dotted paths of every field the text sets, and the text with the fields the
    ModelConfig subset does not declare blanked out."""
    walker = _Walker(text)
    walker.message([], pb.ModelConfig.DESCRIPTOR, None)
    kept = list(text)
    outermost_unknown = []
    for field in sorted(walker.fields, key=lambda f: (f.start, -f.end)):
        if field.known or any(outer.start <= field.start and field.end <= outer.end for outer in outermost_unknown):
            continue
        outermost_unknown.append(field)
        for index in range(field.start, field.end):
            if kept[index] != "\n":
                kept[index] = " "
    return [field.path for field in walker.fields], "".join(kept)
