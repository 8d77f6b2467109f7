"""The `[graph]` table of a model config: a model made of other models of the repository.

A graph has no backend of its own: each step is a model of the same repository, whose
own batcher runs the step's rows. This module holds the table's schema and the rules a
graph's config obeys on its own (names unique, defaults only on optional steps, `when`
parses, no backend-specific table). What needs the step models (tensor names, datatypes,
dims, batch sizes, the order of the steps) is checked when the graph is planned
(conveyor.graph_plan), once the step models are loaded.

Kept apart from conveyor.config (which imports it), like conveyor.config_steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conveyor.config_errors import describe_pattern, rule_error
from conveyor.config_steps import MODEL_NAME_PATTERN, TENSOR_NAME_PATTERN
from conveyor.graph_predicate import PredicateError, parse_predicate

if TYPE_CHECKING:
    from conveyor.config import ModelConfig

__all__ = ["GraphConfig", "GraphStepConfig", "check_graph_model", "fill_graph_backend"]

STEP_NAME_PATTERN = describe_pattern(
    r"^[A-Za-z_][A-Za-z0-9_]*$", "a step name: letters, digits or '_', not starting with a digit"
)
TensorName = Annotated[str, Field(pattern=TENSOR_NAME_PATTERN)]

# The dynamic-batching keys a graph honours: its own requests queue (max_queue_size)
# and carry a deadline (default_timeout_us); forming batches is the step models' job.
GRAPH_BATCHING_FIELDS = ("max_queue_size", "default_timeout_us")
# Tables that configure a backend or the steps around it: a graph has neither.
BACKEND_TABLES = ("onnx", "native", "trees", "torch")


class _Strict(BaseModel):
    # strict: TOML values are typed, so "5" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


class GraphStepConfig(_Strict):
    """One `[[graph.step]]`: a model of the repository run on (some of) the graph's rows."""

    name: str = Field(pattern=STEP_NAME_PATTERN)
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int | None = Field(default=None, ge=1)  # None: the model's newest loaded version
    # Every input of the step's model -> a graph-wide tensor (checked by the plan).
    inputs: dict[TensorName, TensorName] = {}
    # Aliases: model output -> a new graph-wide tensor name.
    outputs: dict[TensorName, TensorName] = {}
    optional: bool = False
    # Optional steps only: model output -> the value its rows hold when the step fails.
    default: dict[TensorName, float] = {}
    timeout_ms: int | None = Field(default=None, ge=1)
    when: str | None = None

    @field_validator("when")
    @classmethod
    def _when_parses(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                parse_predicate(text)
            except PredicateError as exc:
                raise rule_error(
                    f"{exc.expected} at character {exc.position} of the row predicate",
                    None,
                    got_text=f"{exc.found} in {text!r}",
                ) from None
        return text

    @model_validator(mode="after")
    def _default_needs_optional(self) -> GraphStepConfig:
        if self.default and not self.optional:
            raise rule_error(
                "no default (only an optional step's failed rows are filled: add optional = true)",
                self.default,
                field="default",
            )
        return self


class GraphConfig(_Strict):
    """`[graph]`: the graph's public inputs, its outputs (by source tensor) and its steps."""

    inputs: list[TensorName]
    # Graph output -> a tensor, or tensors by preference (per row, the first that has it).
    outputs: dict[TensorName, TensorName | list[TensorName]]
    step: list[GraphStepConfig]

    @model_validator(mode="after")
    def _names_unique(self) -> GraphConfig:
        for key, what in (("inputs", "graph input"), ("outputs", "graph output"), ("step", "[[graph.step]]")):
            if not getattr(self, key):
                raise rule_error(f"at least one {what}", getattr(self, key), field=key)
        for index, name in enumerate(self.inputs):
            if name in self.inputs[:index]:
                raise rule_error("a name no other graph input uses", name, field=f"inputs[{index}]")
        for output, sources in self.outputs.items():
            if isinstance(sources, list):
                if not sources:
                    raise rule_error("at least one source tensor", sources, field=f"outputs.{output}")
                if len(set(sources)) != len(sources):
                    raise rule_error("each source tensor once", sources, field=f"outputs.{output}")
        names = [step.name for step in self.step]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise rule_error("a name no other step uses", name, field=f"step[{index}].name")
        return self

    def sources(self, output: str) -> list[str]:
        """The source tensors of a graph output, by preference."""
        sources = self.outputs[output]
        return list(sources) if isinstance(sources, list) else [sources]


def fill_graph_backend(data: Any) -> Any:
    """A config with a `[graph]` table and no backend is backend "graph" (the contract's form)."""
    if isinstance(data, Mapping) and "graph" in data and "backend" not in data:
        return {**data, "backend": "graph"}
    return data


def check_graph_model(config: ModelConfig) -> None:
    """The model-table rules of a graph: `[graph]` and backend "graph" go together, and the
    tables that configure a backend of its own are refused, naming the field."""
    if config.graph is None:
        if config.backend == "graph":
            raise rule_error(
                "a [graph] table (backend \"graph\" is a model graph: add [graph] with its inputs, outputs and steps)",
                None,
                field="graph",
                got_text="none",
            )
        return
    if config.backend != "graph":
        raise rule_error(
            "\"graph\" or no backend (a config with a [graph] table is a model graph)", config.backend, field="backend"
        )
    why = "a graph runs no backend of its own: set it in the config of the step's model"
    for table in BACKEND_TABLES:
        _refuse_changed(getattr(config, table), table, why)
    if config.fallback is not None:
        raise rule_error(f"no fallback ({why})", config.fallback, field="fallback")
    for steps in ("preprocess", "postprocess"):
        if getattr(config, steps):
            raise rule_error(
                f"no {steps} steps (a graph's steps are models: put {steps} in the config of a step's model)",
                None,
                field=steps,
                got_text=f"{len(getattr(config, steps))} step(s)",
            )
    _refuse_changed(config.instance_group, "instance_group", "a graph has no instances: its steps' models run the rows")
    batching = config.dynamic_batching
    defaults = type(batching)()
    for key in type(batching).model_fields:
        if key not in GRAPH_BATCHING_FIELDS and getattr(batching, key) != getattr(defaults, key):
            raise rule_error(
                f"{getattr(defaults, key)!r} (a graph does not form batches: each step's model does; "
                f"for a graph only {' and '.join(GRAPH_BATCHING_FIELDS)} apply)",
                getattr(batching, key),
                field=f"dynamic_batching.{key}",
            )
    if config.version_policy.select([1]) != [1]:
        raise rule_error(
            "a policy serving version 1 (a graph has one version, its directory; drop [version_policy])",
            None,
            field="version_policy",
            got_text="a policy that does not serve version 1",
        )


def _refuse_changed(table: BaseModel, name: str, why: str) -> None:
    """Refuses the first field of `table` that differs from its default.

    Compared with the defaults rather than with the keys given, so that a config dumped
    by `to_dict` (which writes every default) reads back.
    """
    defaults = type(table)()
    for key in type(table).model_fields:
        value = getattr(table, key)
        if value != getattr(defaults, key):
            raise rule_error(f"no {name} settings ({why})", value, field=f"{name}.{key}")
