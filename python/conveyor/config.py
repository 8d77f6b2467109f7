"""The validated model configuration (`<repository>/<name>/config.toml`).

The schema follows Triton's model configuration where the two overlap, so a Triton
user reads it the same way: shapes exclude the batch dimension when
`max_batch_size > 0`, and the dynamic-batching knobs keep Triton's names and meaning.
Every failure is a `ConfigError` naming the file, the field (a dotted path such as
`inputs[1].dims`), what was expected and what was found.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conveyor.config_errors import describe, describe_missing, describe_pattern, format_error, rule_error
from conveyor.config_graph import GraphConfig, check_graph_model, fill_graph_backend
from conveyor.config_ray import RayConfig, check_ray_model
from conveyor.config_steps import (
    MODEL_NAME_PATTERN,
    POSTPROCESS_OUTPUT_TYPES,
    TENSOR_NAME_PATTERN,
    PostprocessStep,
    PreprocessStep,
)
from conveyor.errors import ConfigError
from conveyor.rollout_config import RolloutConfig

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.toml"

DEVICE_PATTERN = r"^(cpu|cuda|cuda:[0-9]+)$"

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
]  # fmt: skip

# BF16 is absent on purpose: numpy has no bfloat16.
NUMPY_DTYPE_BY_DATATYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

PositiveInt = Annotated[int, Field(ge=1)]
ParameterValue = str | int | float | bool


class _Strict(BaseModel):
    # strict: TOML values are typed, so "5" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


class TensorConfig(_Strict):
    """One input or output tensor: its name, v2 datatype and dims."""

    name: str = Field(min_length=1, pattern=TENSOR_NAME_PATTERN)
    datatype: Datatype
    # Without the batch dimension when max_batch_size > 0; -1 marks a variable dim.
    dims: list[int]
    # Outputs only: a file in the model's directory with one class label per line, used
    # by the classification extension ("score:index:label").
    labels: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

    @field_validator("dims")
    @classmethod
    def _dims_positive_or_variable(cls, dims: list[int]) -> list[int]:
        if any(dim <= 0 and dim != -1 for dim in dims):
            raise rule_error("each dim > 0 or -1 (variable)", dims)
        return dims

    @property
    def numpy_dtype(self) -> np.dtype:
        dtype = NUMPY_DTYPE_BY_DATATYPE.get(self.datatype)
        if dtype is None:
            raise ConfigError(f"tensor '{self.name}': datatype {self.datatype} has no numpy equivalent")
        return dtype


class DynamicBatchingConfig(_Strict):
    """Triton's dynamic-batching knobs; the C++ batcher applies them."""

    max_queue_delay_us: int = Field(default=0, ge=0)
    preferred_batch_sizes: list[PositiveInt] = []
    max_queue_size: int = Field(default=1024, ge=1)
    priority_levels: int = Field(default=0, ge=0)
    # Level 1 is the highest priority; 0 in the file means "the lowest level".
    default_priority_level: int = Field(default=0, ge=0)
    default_timeout_us: int = Field(default=0, ge=0)

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _sorted_unique(cls, sizes: list[int]) -> list[int]:
        return sorted(set(sizes))

    @model_validator(mode="after")
    def _resolve_default_priority(self) -> DynamicBatchingConfig:
        level, levels = self.default_priority_level, self.priority_levels
        if levels == 0 and level != 0:
            raise rule_error("0 (priority_levels is 0)", level, field="default_priority_level")
        if levels > 0 and level > levels:
            raise rule_error(f"a level in [1, {levels}] (0: the lowest)", level, field="default_priority_level")
        if levels > 0 and level == 0:
            self.default_priority_level = levels
        return self


class InstanceGroupConfig(_Strict):
    """How many execution instances run the model, and where."""

    count: int = Field(default=1, ge=1)
    device: str = Field(default="cpu", pattern=DEVICE_PATTERN)
    # "cores": instance i's thread runs on the i-th CPU the server may use (round robin), so
    # instances do not migrate; with one compute thread per instance (onnx intra_op_threads,
    # native threads, torch intra_op_threads = 1) the model's compute runs there too.
    cpu_pinning: Literal["none", "cores"] = "none"


class VersionPolicy(_Strict):
    """Which version directories are served: exactly one of latest, all, specific."""

    latest: int | None = Field(default=None, ge=1)
    all: bool | None = None
    specific: list[PositiveInt] | None = None

    @field_validator("all")
    @classmethod
    def _all_is_true(cls, serve_all: bool | None) -> bool | None:
        if serve_all is False:
            raise rule_error("true (to choose another policy, give 'latest' or 'specific' instead)", serve_all)
        return serve_all

    @field_validator("specific")
    @classmethod
    def _specific_sorted_unique(cls, versions: list[int] | None) -> list[int] | None:
        if versions is not None and not versions:
            raise rule_error("at least one version", versions)
        return None if versions is None else sorted(set(versions))

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [key for key in ("latest", "all", "specific") if getattr(self, key) is not None]
        if len(chosen) != 1:
            got = " and ".join(repr(key) for key in chosen) if chosen else "none"
            raise PydanticCustomError(
                "config_rule",
                "expected {expected}, got {got}",
                {"expected": "exactly one of 'latest', 'all' or 'specific'", "got": got, "field": ""},
            )
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of `available`, ascending."""
        ordered = sorted(set(available))
        if self.latest is not None:
            return ordered[-self.latest :]
        if self.all:
            return ordered
        wanted = set(self.specific or ())
        return [version for version in ordered if version in wanted]


class OnnxOptions(_Strict):
    """onnxruntime session options (backend onnx only)."""

    # One thread per instance measured 2x the throughput of onnxruntime's default
    # (one thread per core) at batch 64 on 2 cores: instances already run in parallel.
    intra_op_threads: int = Field(default=1, ge=1)
    inter_op_threads: int = Field(default=1, ge=1)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


class TorchOptions(_Strict):
    """The torch backend's options (backend torch only)."""

    # OpenMP threads each instance's model copy may use; instances already run side by
    # side, so one per instance is the default, as for onnx.
    intra_op_threads: int = Field(default=1, ge=1)


class NativeOptions(_Strict):
    """The native backend's options (backend native only)."""

    # Compute threads each instance's kernels may use; instances already run side by
    # side, so one per instance is the default, as for onnx.
    threads: int = Field(default=1, ge=1)


# What a trees model's output may hold (conveyor/trees.h): the default signature's
# outputs by their own names, and Triton FIL's output__0 forms.
TreeOutputRole = Literal[
    "probabilities", "label", "raw_margin", "leaf_ids", "prediction", "class_index", "prediction_column"
]


class TreesOptions(_Strict):
    """The trees backend's options (backend trees only)."""

    # An output named otherwise than what it holds: output name -> role. "class_index"
    # (FP32 [1], a classifier's argmax) and "prediction_column" (FP32 [1]) are Triton FIL's
    # output__0 forms; outputs not listed hold what their names say.
    outputs: dict[Annotated[str, Field(pattern=TENSOR_NAME_PATTERN)], TreeOutputRole] = {}


FEATURE_NAME_PATTERN = r"^[A-Za-z0-9_.:/-]+(\[[0-9]+\])?$"
WEBHOOK_URL_PATTERN = r"^https?://"
FeatureName = Annotated[str, Field(pattern=FEATURE_NAME_PATTERN)]


class ClassifierOutput(_Strict):
    """An output holding class scores: monitored as predicted class and confidence."""

    output: str = Field(pattern=TENSOR_NAME_PATTERN)
    # "probabilities": confidence is the row's largest value; "logits": its largest softmax.
    scores: Literal["probabilities", "logits"] = "probabilities"


class MonitorConfig(_Strict):
    """[monitor]: live statistics and drift detection, computed in C++ inside the batch."""

    enabled: bool = True
    # A training-data file (.parquet, .npy or .csv), relative to the version directory,
    # then the model directory. Without it the first `reference_rows` live rows become the
    # reference, frozen and saved beside the version as monitor_reference.npz.
    reference: str | None = Field(default=None, min_length=1)
    reference_rows: int = Field(default=10_000, ge=100)
    # Inputs and outputs whose flattened columns are monitored (default: every numeric one).
    inputs: list[Annotated[str, Field(pattern=TENSOR_NAME_PATTERN)]] | None = None
    outputs: list[Annotated[str, Field(pattern=TENSOR_NAME_PATTERN)]] | None = None
    classifier_outputs: list[ClassifierOutput] = []
    # Feature names ("x[3]") or whole tensors ("x") whose values are categories; BOOL
    # inputs are categorical unless listed in `numeric`, every other column numeric.
    categorical: list[FeatureName] = []
    numeric: list[FeatureName] = []
    # 50 features x 2 windows x 8 gauges keeps a model near 800 drift series in Prometheus.
    max_features: int = Field(default=50, ge=1, le=1024)
    bins: int = Field(default=20, ge=2, le=256)
    max_categories: int = Field(default=50, ge=1, le=1024)
    window_rows: int = Field(default=1000, ge=10)
    window_seconds: float = Field(default=10.0, gt=0)
    sub_windows: int = Field(default=10, ge=1, le=1000)
    evaluate_interval_s: float = Field(default=1.0, gt=0)
    history: int = Field(default=360, ge=1, le=100_000)
    psi_warn: float = Field(default=0.1, gt=0)
    psi_alert: float = Field(default=0.25, gt=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    correction: Literal["benjamini-hochberg", "bonferroni", "none"] = "benjamini-hochberg"
    mahalanobis: bool = True
    outlier_quantile: float = Field(default=0.999, gt=0.5, lt=1)
    webhook_url: str | None = Field(default=None, pattern=WEBHOOK_URL_PATTERN)
    webhook_headers: dict[str, str] = {}

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> MonitorConfig:
        if self.psi_alert < self.psi_warn:
            raise rule_error(f"a value >= psi_warn ({self.psi_warn})", self.psi_alert, field="psi_alert")
        if self.window_rows < self.sub_windows:
            raise rule_error(f"at least sub_windows ({self.sub_windows}) rows", self.window_rows, field="window_rows")
        overlap = sorted(set(self.categorical) & set(self.numeric))
        if overlap:
            raise rule_error(
                "each name in categorical or in numeric, not in both",
                None,
                field="numeric",
                got_text=f"{', '.join(map(repr, overlap))} in both",
            )
        return self


class CaptureConfig(_Strict):
    """[capture]: live rows kept in Parquet files for retraining, written off the request path."""

    # Absolute, or relative to the server's data directory (--data-dir); default <model>.
    directory: str | None = Field(default=None, min_length=1)
    # The share of requests kept, chosen by a hash of the request id (so it is repeatable).
    sample_rate: float = Field(default=0.01, ge=0, le=1)
    capture: Literal["both", "inputs", "outputs"] = "both"
    anomalies: bool = True  # always keep requests the monitor flags (needs [monitor])
    alerting: bool = True  # always keep requests while the model's drift alert is on
    max_queue_rows: int = Field(default=65_536, ge=1)
    flush_interval_s: float = Field(default=0.1, gt=0, le=10)
    fsync: Literal["always", "interval", "never"] = "interval"
    rotate_mb: float = Field(default=64, gt=0)
    rotate_seconds: float = Field(default=3600, gt=0)


class FeedbackConfig(_Strict):
    """[feedback]: delayed ground truth joined to predictions by request id."""

    kind: Literal["classification", "regression"]
    # The output compared with the label: classification takes the row's argmax (or the
    # value of an integer output), regression the value of a one-element row.
    output: str = Field(pattern=TENSOR_NAME_PATTERN)
    ttl_s: float = Field(default=3600, gt=0)
    max_pending: int = Field(default=100_000, ge=1)
    window: int = Field(default=1000, ge=1)
    reference_value: float | None = None


class RetrainingConfig(_Strict):
    """[retraining]: when to ask for a new model (any rule that is set can fire)."""

    drift_minutes: float | None = Field(default=None, gt=0)
    metric_drop: float | None = Field(default=None, gt=0)
    labeled_rows: int | None = Field(default=None, ge=1)
    cooldown_s: float = Field(default=3600, ge=0)

    @model_validator(mode="after")
    def _some_rule(self) -> RetrainingConfig:
        if self.drift_minutes is None and self.metric_drop is None and self.labeled_rows is None:
            raise rule_error("at least one of drift_minutes, metric_drop, labeled_rows", None, got_text="none")
        return self


class ModelConfig(_Strict):
    """A model's whole configuration, as read from its config.toml.

    Build one with `load_model_config` or `parse_model_config`: they report every
    problem as a ConfigError, where calling the class directly raises pydantic's
    ValidationError.
    """

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    # "graph": the model is a graph of other models (the [graph] table); a config with
    # [graph] may leave backend out.
    backend: Literal["onnx", "python", "native", "trees", "torch", "graph"]
    max_batch_size: int = Field(default=0, ge=0)
    # An onnx, native or trees model may omit these; they are filled from the model file.
    inputs: list[TensorConfig] = []
    outputs: list[TensorConfig] = []
    dynamic_batching: DynamicBatchingConfig = Field(default_factory=DynamicBatchingConfig)
    instance_group: InstanceGroupConfig = Field(default_factory=InstanceGroupConfig)
    version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(latest=1))
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    native: NativeOptions = Field(default_factory=NativeOptions)
    trees: TreesOptions = Field(default_factory=TreesOptions)
    torch: TorchOptions = Field(default_factory=TorchOptions)
    # backend native only: serve the model with onnxruntime when its graph holds an op
    # the native kernels cannot run (a warning says which), instead of failing to load.
    fallback: Literal["onnx"] | None = None
    parameters: dict[str, ParameterValue] = {}
    # Steps around the backend; inputs and outputs then describe the public tensors.
    preprocess: list[PreprocessStep] = []
    postprocess: list[PostprocessStep] = []
    # Monitoring and the learning loop (examples/README.md, "Monitoring").
    monitor: MonitorConfig | None = None
    capture: CaptureConfig | None = None
    feedback: FeedbackConfig | None = None
    retraining: RetrainingConfig | None = None
    # Rolling a new version out: canary, A/B/n, shadow, blue-green (examples/README.md, "Rollouts").
    rollout: RolloutConfig | None = None
    # A graph of other models of the repository (conveyor.config_graph, conveyor.graph_plan).
    graph: GraphConfig | None = None
    # Placement on Ray Serve (`conveyor ray serve`; conveyor.config_ray). The engine ignores it.
    ray: RayConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _graph_backend(cls, data: Any) -> Any:
        return fill_graph_backend(data)

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters_are_scalars(cls, parameters: Any) -> Any:
        # Checked up front: pydantic would report one error per member of the union.
        if isinstance(parameters, Mapping):
            for key, value in parameters.items():
                if not isinstance(value, (str, int, float, bool)):
                    raise rule_error("a string, integer, float or boolean", value, field=str(key))
        return parameters

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ModelConfig:
        check_graph_model(self)
        check_ray_model(self)
        self._check_batching_knobs()
        if self.fallback is not None and self.backend != "native":
            raise rule_error("no fallback (only backend \"native\" falls back)", self.fallback, field="fallback")
        if self.trees.outputs and self.backend != "trees":
            raise rule_error("no output roles (only backend \"trees\" has them)", self.trees.outputs, field="trees.outputs")
        if self.backend in ("native", "trees", "torch") and self.instance_group.device != "cpu":
            raise rule_error(
                f"'cpu' (the {self.backend} backend runs on the CPU)",
                self.instance_group.device,
                field="instance_group.device",
            )
        for field in ("inputs", "outputs"):
            tensors: list[TensorConfig] = getattr(self, field)
            if self.backend == "python" and not tensors:
                raise rule_error("at least one tensor (only onnx, native and trees models may omit them)", [], field=field)
            seen: set[str] = set()
            for index, tensor in enumerate(tensors):
                if tensor.name in seen:
                    raise rule_error(
                        f"a name no other entry of '{field}' uses", tensor.name, field=f"{field}[{index}].name"
                    )
                seen.add(tensor.name)
                if field == "inputs" and tensor.labels is not None:
                    raise rule_error("no labels (labels belong to outputs)", tensor.labels, field=f"inputs[{index}].labels")
        if self.preprocess or self.postprocess:
            self._check_steps()
        self._check_monitoring()
        return self

    def _check_monitoring(self) -> None:
        """The learning-loop tables name tensors of this model and lean on each other."""
        monitor = self.monitor
        inputs = {t.name: t for t in self.inputs}
        outputs = {t.name: t for t in self.outputs}
        if monitor is not None:
            for field, known in (("inputs", inputs), ("outputs", outputs)):
                for index, name in enumerate(getattr(monitor, field) or ()):
                    if known and name not in known:
                        raise rule_error(f"one of the {field} ({', '.join(known)})", name, field=f"monitor.{field}[{index}]")
            for index, entry in enumerate(monitor.classifier_outputs):
                if outputs and entry.output not in outputs:
                    raise rule_error(
                        f"one of the outputs ({', '.join(outputs)})", entry.output, field=f"monitor.classifier_outputs[{index}].output"
                    )
        if self.feedback is not None and outputs and self.feedback.output not in outputs:
            raise rule_error(f"one of the outputs ({', '.join(outputs)})", self.feedback.output, field="feedback.output")
        if self.retraining is not None:
            if self.retraining.drift_minutes is not None and (monitor is None or not monitor.enabled):
                raise rule_error(
                    "an enabled [monitor] table (drift_minutes watches its alert)",
                    None,
                    field="retraining.drift_minutes",
                    got_text="no [monitor] table" if monitor is None else "[monitor] enabled = false",
                )
            for rule in ("metric_drop", "labeled_rows"):
                if getattr(self.retraining, rule) is not None and self.feedback is None:
                    raise rule_error(
                        f"a [feedback] table ({rule} counts the labels it brings)",
                        None,
                        field=f"retraining.{rule}",
                        got_text="no [feedback] table",
                    )

    def _check_steps(self) -> None:
        """Steps read and write the public tensors: names, datatypes and dims must fit."""
        for field in ("inputs", "outputs"):
            if not getattr(self, field):
                raise rule_error("the public tensors listed (a model with steps cannot omit them)", [], field=field)
        inputs = {tensor.name: tensor for tensor in self.inputs}
        seen: set[str] = set()
        for index, step in enumerate(self.preprocess):
            where = f"preprocess[{index}]"
            tensor = inputs.get(step.input)
            if tensor is None or step.input in seen:
                known = f"one of the inputs ({', '.join(inputs)})"
                expected = "an input no other step reads" if tensor else known
                raise rule_error(expected, step.input, field=f"{where}.input")
            seen.add(step.input)
            if step.kind == "tokenize":
                self._check_tokenize(index, step, tensor, inputs)
                continue
            channels = len(step.mean or ())
            if tensor.datatype != "UINT8" or len(tensor.dims) != 3 or tensor.dims[2] not in (-1, channels):
                raise rule_error(
                    f"input '{tensor.name}' to be UINT8 [height, width, {channels}] (NHWC images)",
                    None,
                    field=f"{where}.input",
                    got_text=f"{tensor.datatype} {tensor.dims}",
                )
        outputs = {tensor.name: tensor for tensor in self.outputs}
        produced: set[str] = set()
        for index, step in enumerate(self.postprocess):
            where = f"postprocess[{index}]"
            for name, datatype in zip(step.outputs, POSTPROCESS_OUTPUT_TYPES[step.kind]):
                tensor = outputs.get(name)
                if tensor is None or name in produced:
                    known = f"one of the outputs ({', '.join(outputs)})"
                    expected = "an output no other step produces" if tensor else known
                    raise rule_error(expected, name, field=f"{where}.outputs")
                produced.add(name)
                last = step.last_dim
                if tensor.datatype != datatype or not tensor.dims or (last is not None and tensor.dims[-1] != last):
                    dims = "[..., " + (str(last) if last is not None else "classes") + "]"
                    raise rule_error(
                        f"output '{name}' to be {datatype} {dims} ({step.kind})",
                        None,
                        field=f"{where}.outputs",
                        got_text=f"{tensor.datatype} {tensor.dims}",
                    )

    def _check_tokenize(
        self, index: int, step: PreprocessStep, tensor: TensorConfig, inputs: dict[str, TensorConfig]
    ) -> None:
        """A tokenize step reads one string per row and adds backend inputs of its own."""
        where = f"preprocess[{index}]"
        if self.max_batch_size < 1:
            raise rule_error(
                "max_batch_size >= 1 (tokenize produces [batch, tokens] tensors)", self.max_batch_size, field="max_batch_size"
            )
        if tensor.datatype != "BYTES" or tensor.dims not in ([1], []):
            raise rule_error(
                f"input '{tensor.name}' to be BYTES [1] (one string per row)",
                None,
                field=f"{where}.input",
                got_text=f"{tensor.datatype} {tensor.dims}",
            )
        earlier = {name for other in self.preprocess[:index] for name in other.produced_inputs}
        for key, name in zip(("input_ids", "attention_mask", "token_type_ids"), step.produced_inputs):
            if name in inputs or name in earlier:
                raise rule_error(
                    "a name no public input and no other step uses (the step produces it for the backend)",
                    name,
                    field=f"{where}.{key}",
                )

    def _check_batching_knobs(self) -> None:
        batching = self.dynamic_batching
        sizes = batching.preferred_batch_sizes
        if self.max_batch_size == 0:
            if sizes:
                raise rule_error(
                    "no preferred sizes (max_batch_size is 0: the model does not batch)",
                    sizes,
                    field="dynamic_batching.preferred_batch_sizes",
                )
            if batching.max_queue_delay_us > 0:
                raise rule_error(
                    "0 (max_batch_size is 0: waiting to form a batch would only add latency)",
                    batching.max_queue_delay_us,
                    field="dynamic_batching.max_queue_delay_us",
                )
        elif sizes and sizes[-1] > self.max_batch_size:
            raise rule_error(
                f"sizes in [1, max_batch_size = {self.max_batch_size}]",
                sizes,
                field="dynamic_batching.preferred_batch_sizes",
            )

    def to_dict(self) -> dict[str, Any]:
        """The plain (TOML-shaped) form; `parse_model_config` reads it back unchanged."""
        return self.model_dump(mode="python", exclude_none=True)


def load_model_config(path: Path, *, name: str | None = None) -> ModelConfig:
    """Read and validate a config.toml; `name` defaults to its directory's name."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_model_config(data, source=str(path), name=path.parent.name if name is None else name)


def parse_model_config(data: dict[str, Any], *, source: str, name: str | None = None) -> ModelConfig:
    """Validate a config given as a dict; `source` names it in error messages.

    `name` is the model's directory name: the file may omit `name`, and if it gives
    one it must be the same.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of config fields, got {describe(data)}")
    data = dict(data)
    problems: list[str] = []
    if name is not None:
        if "name" in data and data["name"] != name:
            problems.append(f"field 'name': expected {name!r} (the directory name), got {describe(data['name'])}")
        data["name"] = name
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(format_error(error, ModelConfig) for error in exc.errors())
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
    _warn_if_threads_exceed_cores(config, source)
    return config


def _warn_if_threads_exceed_cores(config: ModelConfig, source: str) -> None:
    if config.backend not in ("onnx", "native", "torch") or config.instance_group.device != "cpu":
        return
    cores = os.cpu_count() or 1
    key, per_instance = {
        "native": ("native.threads", config.native.threads),
        "torch": ("torch.intra_op_threads", config.torch.intra_op_threads),
    }.get(config.backend, ("onnx.intra_op_threads", config.onnx.intra_op_threads))
    threads = config.instance_group.count * per_instance
    if threads > cores:
        logger.warning(
            "%s: compute threads exceed cores: instance_group.count (%d) x %s (%d) = %d "
            "threads on %d cores; they will contend and throughput drops",
            source,
            config.instance_group.count,
            key,
            per_instance,
            threads,
            cores,
        )


# What each pattern's strings are, for error messages.
for _pattern, _description in {
    MODEL_NAME_PATTERN: "a model name: letters, digits, '_', '.' or '-', starting with a letter or digit, "
    "at most 128 characters",
    TENSOR_NAME_PATTERN: "a tensor name: letters, digits, '_', '.', ':', '/' or '-'",
    DEVICE_PATTERN: "'cpu', 'cuda' or 'cuda:N'",
    FEATURE_NAME_PATTERN: "a feature name: a tensor name, optionally with an element index ('x' or 'x[3]')",
    WEBHOOK_URL_PATTERN: "an http:// or https:// URL",
}.items():
    describe_pattern(_pattern, _description)
describe_missing(
    ModelConfig, "backend", "one of 'onnx', 'python', 'native', 'trees' or 'torch'; a model graph gives a [graph] table instead"
)
