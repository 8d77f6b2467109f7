"""A graph's plan: its `[graph]` table checked against the loaded step models, laid out
as the C++ engine (`_core.Graph`) takes it.

The engine runs rows and never reports a config mistake well, so everything that can be
known before the first request is checked here, once, with messages that name the graph,
the step or output, the tensor, and the fix: every tensor name resolves to exactly one
producer, every step-model input is mapped, datatypes agree and dims are compatible
(-1 matches anything), predicates read numeric tensors, and the steps form no cycle.
The plan also says where rows are copied (`copies`): a step that runs on a subset of the
rows gathers them into its own request, and an output with several sources scatters rows
back; both cost a copy per row, which a reader of the config may not expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

from conveyor.config import ModelConfig, TensorConfig
from conveyor.config_graph import GraphStepConfig
from conveyor.errors import ConfigError, ModelNotFound
from conveyor.graph_predicate import Predicate, parse_predicate

__all__ = ["GraphPlan", "StepModel", "graph_dependencies", "plan_graph"]

Signature = tuple[str, str, list[int]]  # (name, datatype, dims without the batch dim)
# Datatypes a predicate cannot read: the engine compares rows as doubles and reads neither
# strings nor the half-precision formats.
NOT_PREDICATE_TYPES = ("BYTES", "FP16", "BF16")


@dataclass(frozen=True)
class StepModel:
    """What the plan needs of a loaded model that a step runs."""

    name: str
    version: int
    inputs: list[Signature]  # the step's batcher inputs, in the batcher's order
    outputs: list[Signature]  # its batcher outputs, no monitor flags
    max_batch_size: int
    is_graph: bool  # graphs are not steps: nesting is refused
    python_finish: bool  # its public outputs are made in Python (classification): refused


@dataclass(frozen=True)
class GraphPlan:
    """The checked graph: `core` is `_core.Graph`'s keyword arguments but pool and monitor."""

    core: dict
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    max_batch_size: int
    steps: list[tuple[str, str, int | None]]  # (step, model, configured version) in core order
    copies: list[str]  # where rows are gathered or scattered, one readable line each

    def public_config(self, config: ModelConfig) -> ModelConfig:
        """The graph's config as clients see it (metadata, /config, its monitor): the tensors
        and batch size derived from the steps."""
        return config.model_copy(
            update={"inputs": self.inputs, "outputs": self.outputs, "max_batch_size": self.max_batch_size}
        )


StepModelLookup = Callable[[str, int | None], StepModel]


def graph_dependencies(config: ModelConfig) -> set[str]:
    """Names of the models a graph's steps run (none for a model that is not a graph): they
    must be loaded before the graph is planned."""
    return set() if config.graph is None else {step.model for step in config.graph.step}


def plan_graph(config: ModelConfig, step_model: StepModelLookup) -> GraphPlan:
    """The plan of graph `config`; `step_model(model, version_or_None)` describes a loaded
    model (ModelNotFound when it is not loaded). Every mistake is a ConfigError."""
    if config.graph is None:
        raise ConfigError(f"model '{config.name}': not a graph (its config has no [graph] table)")
    return _Planner(config, step_model).plan()


def merge_dims(first: list[int], second: list[int]) -> list[int] | None:
    """The most specific dims both describe (-1 matches anything), or None when they disagree."""
    if len(first) != len(second):
        return None
    merged = []
    for a, b in zip(first, second):
        if a != b and -1 not in (a, b):
            return None
        merged.append(b if a == -1 else a)
    return merged


def _show(datatype: str, dims: list[int]) -> str:
    return f"{datatype} {list(dims)}"


@dataclass
class _Tensor:
    """A graph-wide tensor: who produces it and (once known) its datatype and dims."""

    step: int  # index into the file's steps; -1 for a graph input
    index: int  # the graph input's index, or the output's index in the step model's outputs
    datatype: str = ""
    dims: list[int] = field(default_factory=list)


class _Planner:
    def __init__(self, config: ModelConfig, step_model: StepModelLookup) -> None:
        assert config.graph is not None
        self.config, self.graph, self.name = config, config.graph, config.name
        self.steps: list[GraphStepConfig] = list(config.graph.step)
        self.models = [self._model(step, step_model) for step in self.steps]
        self.predicates: list[Predicate | None] = [
            None if step.when is None else parse_predicate(step.when) for step in self.steps
        ]
        self.tensors: dict[str, _Tensor] = {}
        self.deps: list[dict[int, str]] = [{} for _ in self.steps]  # step -> {step it reads: a tensor}

    def error(self, what: str, message: str) -> ConfigError:
        return ConfigError(f"graph '{self.name}': {what}: {message}")

    def step_error(self, index: int, message: str) -> ConfigError:
        return self.error(f"step '{self.steps[index].name}'", message)

    def plan(self) -> GraphPlan:
        self._name_tensors()
        uses = self._map_inputs()
        inputs = self._graph_inputs(uses)
        self._check_predicates()
        self._check_defaults()
        order = self._order()
        max_batch_size = self._max_batch_size()
        base, slot = {}, len(inputs)
        for index in order:
            base[index] = slot
            slot += len(self.models[index].outputs)

        def slot_of(name: str) -> int:
            tensor = self.tensors[name]
            return tensor.index if tensor.step < 0 else base[tensor.step] + tensor.index

        outputs, sources = self._graph_outputs(slot_of)
        core = {
            "name": self.name,
            "inputs": [(t.name, t.datatype, list(t.dims)) for t in inputs],
            "outputs": [(t.name, t.datatype, list(t.dims)) for t in outputs],
            "output_sources": sources,
            "steps": [self._core_step(index, slot_of) for index in order],
            "max_batch_size": max_batch_size,
            "max_in_flight": self.config.dynamic_batching.max_queue_size,
            "default_timeout_us": self.config.dynamic_batching.default_timeout_us,
        }
        steps = [(self.steps[i].name, self.steps[i].model, self.steps[i].version) for i in order]
        return GraphPlan(core, inputs, outputs, max_batch_size, steps, self._copies(order))

    def _model(self, step: GraphStepConfig, step_model: StepModelLookup) -> StepModel:
        where = f"step '{step.name}'"
        version = "" if step.version is None else f" version {step.version}"
        try:
            model = step_model(step.model, step.version)
        except ModelNotFound as exc:
            raise self.error(where, f"model '{step.model}'{version} is not loaded ({exc}): load it first") from exc
        if model.is_graph:
            raise self.error(where, f"model '{step.model}' is a graph: graphs cannot be steps yet; use its steps here")
        if model.python_finish:
            raise self.error(
                where,
                f"model '{step.model}' makes its outputs in Python (a classification postprocess): a graph "
                "step's outputs must come from its batcher; use a step model without that postprocess",
            )
        if model.max_batch_size < 1:
            raise self.error(
                where,
                f"model '{step.model}' has max_batch_size 0 (it does not batch): a graph batches rows, so each "
                "step's model needs max_batch_size >= 1",
            )
        return model

    def _name_tensors(self) -> None:
        """Every name produced once: graph inputs, `step.output` names, then aliases."""
        for index, name in enumerate(self.graph.inputs):
            self.tensors[name] = _Tensor(-1, index)
        for index, (step, model) in enumerate(zip(self.steps, self.models)):
            for position, (output, datatype, dims) in enumerate(model.outputs):
                name = f"{step.name}.{output}"
                if name in self.tensors:
                    raise self.step_error(index, f"output '{name}' has the name of a graph input: rename the input")
                self.tensors[name] = _Tensor(index, position, datatype, list(dims))
        step_names = {step.name for step in self.steps}
        for index, (step, model) in enumerate(zip(self.steps, self.models)):
            produced = [output for output, _, _ in model.outputs]
            for output, alias in step.outputs.items():
                if output not in produced:
                    raise self.step_error(
                        index,
                        f"outputs maps '{output}', which model '{step.model}' does not produce "
                        f"(its outputs: {', '.join(produced)})",
                    )
                own = f"{step.name}.{output}"
                existing = self.tensors.get(alias)
                if alias != own and (existing is not None or alias.split(".", 1)[0] in step_names):
                    holder = "a graph input" if existing and existing.step < 0 else "another tensor"
                    raise self.step_error(
                        index,
                        f"alias '{alias}' for output '{output}' names {holder} (each name is produced once, and "
                        "'<step>.<output>' names belong to step outputs): choose another alias",
                    )
                self.tensors[alias] = self.tensors[own]

    def _unknown(self, name: str) -> str:
        return f"'{name}', which is no graph input and no step output (known: {', '.join(sorted(self.tensors))})"

    def _map_inputs(self) -> dict[str, list[tuple[int, Signature]]]:
        """Checks each step's inputs map; returns the uses of each graph input."""
        uses: dict[str, list[tuple[int, Signature]]] = {name: [] for name in self.graph.inputs}
        for index, (step, model) in enumerate(zip(self.steps, self.models)):
            accepted = [name for name, _, _ in model.inputs]
            for key in step.inputs:
                if key not in accepted:
                    raise self.step_error(
                        index, f"inputs maps '{key}', which model '{step.model}' does not take (its inputs: {', '.join(accepted)})"
                    )
            for signature in model.inputs:
                key, datatype, dims = signature
                source = step.inputs.get(key)
                if source is None:
                    raise self.step_error(
                        index, f"input '{key}' of model '{step.model}' is not mapped: add it to the step's inputs, "
                        f"e.g. inputs = {{ {key} = \"<tensor>\" }}",
                    )  # fmt: skip
                tensor = self.tensors.get(source)
                if tensor is None:
                    raise self.step_error(index, f"input '{key}' reads {self._unknown(source)}")
                if tensor.step < 0:
                    uses[source].append((index, signature))
                    continue
                self.deps[index].setdefault(tensor.step, source)
                if tensor.datatype != datatype or merge_dims(tensor.dims, list(dims)) is None:
                    raise self.step_error(
                        index,
                        f"input '{key}' of model '{step.model}' is {_show(datatype, dims)}, but it reads '{source}', "
                        f"which is {_show(tensor.datatype, tensor.dims)}: map a tensor of the same datatype and dims",
                    )
        return uses

    def _graph_inputs(self, uses: dict[str, list[tuple[int, Signature]]]) -> list[TensorConfig]:
        """Datatype and dims of each graph input, from the step inputs mapped to it."""
        configured = {tensor.name: tensor for tensor in self.config.inputs}
        if configured and set(configured) != set(self.graph.inputs):
            raise self.error(
                "inputs", f"the [[inputs]] tables name {', '.join(configured)}, but graph.inputs lists "
                f"{', '.join(self.graph.inputs)}: list the same names, or leave [[inputs]] out (they are derived)",
            )  # fmt: skip
        result = []
        for name in self.graph.inputs:
            if not uses[name]:
                raise self.error(f"input '{name}'", "no step input reads it: map a step input to it or remove it")
            first_step, (key, datatype, dims) = uses[name][0]
            merged: list[int] | None = list(dims)
            readers = [(f"step '{self.steps[first_step].name}' (input '{key}')", datatype, list(dims))]
            if name in configured:
                readers.append(("the [[inputs]] table", configured[name].datatype, list(configured[name].dims)))
            readers += [(f"step '{self.steps[s].name}' (input '{k}')", d, list(m)) for s, (k, d, m) in uses[name][1:]]
            for reader, other_type, other_dims in readers[1:]:
                merged = merge_dims(merged, other_dims) if merged is not None else None
                if other_type != datatype or merged is None:
                    raise self.error(
                        f"input '{name}'",
                        f"{readers[0][0]} reads it as {_show(datatype, dims)} but {reader} as "
                        f"{_show(other_type, other_dims)}: every reader must agree on datatype and dims",
                    )
            assert merged is not None
            self.tensors[name].datatype, self.tensors[name].dims = datatype, merged
            result.append(TensorConfig(name=name, datatype=datatype, dims=merged))
        return result

    def _check_predicates(self) -> None:
        for index, predicate in enumerate(self.predicates):
            for test in predicate.tests if predicate is not None else ():
                tensor = self.tensors.get(test.tensor)
                if tensor is None:
                    raise self.step_error(index, f"when reads {self._unknown(test.tensor)}")
                if tensor.step >= 0:
                    self.deps[index].setdefault(tensor.step, test.tensor)
                if tensor.datatype in NOT_PREDICATE_TYPES:
                    raise self.step_error(
                        index,
                        f"when reads '{test.tensor}', a {tensor.datatype} tensor: predicates read numeric "
                        f"tensors (not {', '.join(NOT_PREDICATE_TYPES)})",
                    )
                size = None if -1 in tensor.dims else prod(tensor.dims)
                shown = _show(tensor.datatype, tensor.dims)
                if test.reduce == "element" and size is not None and test.element >= size:
                    raise self.step_error(
                        index,
                        f"when reads element {test.element} of '{test.tensor}' ({shown}: {size} elements a row): "
                        f"use an index below {size}",
                    )
                if test.reduce == "value" and size is not None and size != 1:
                    raise self.step_error(
                        index,
                        f"when compares '{test.tensor}' as one value, but its rows hold {size} elements ({shown}): "
                        f"use {test.tensor}[k], max({test.tensor}), min({test.tensor}) or argmax({test.tensor})",
                    )

    def _check_defaults(self) -> None:
        for index, (step, model) in enumerate(zip(self.steps, self.models)):
            types = {name: datatype for name, datatype, _ in model.outputs}
            for output in step.default:
                if output not in types:
                    raise self.step_error(
                        index, f"default names '{output}', which model '{step.model}' does not produce "
                        f"(its outputs: {', '.join(types)})",
                    )  # fmt: skip
                if types[output] == "BYTES":
                    raise self.step_error(index, f"default for '{output}', a BYTES output: defaults fill numeric outputs")

    def _order(self) -> list[int]:
        """Steps in a topological order; among ready steps, the file's order."""
        order: list[int] = []
        placed: set[int] = set()
        while len(order) < len(self.steps):
            ready = next((i for i in range(len(self.steps)) if i not in placed and set(self.deps[i]) <= placed), None)
            if ready is None:
                raise self._cycle(placed)
            order.append(ready)
            placed.add(ready)
        return order

    def _cycle(self, placed: set[int]) -> ConfigError:
        # Every unplaced step reads another unplaced one (else it would be ready): walk until a repeat.
        path = [min(set(range(len(self.steps))) - placed)]
        while True:
            following = min(dep for dep in self.deps[path[-1]] if dep not in placed)
            if following in path:
                cycle = path[path.index(following) :]
                break
            path.append(following)
        names = [self.steps[i].name for i in cycle]
        reads = [f"'{self.steps[a].name}' reads '{self.deps[a][b]}'" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        return self.step_error(
            cycle[0],
            f"the steps {' -> '.join([*names, names[0]])} form a cycle ({', '.join(reads)}): a step may read only "
            "graph inputs and the outputs of steps that do not read it back",
        )

    def _max_batch_size(self) -> int:
        smallest = min(model.max_batch_size for model in self.models)
        configured = self.config.max_batch_size
        for index, model in enumerate(self.models):
            if configured > model.max_batch_size:
                raise self.step_error(
                    index,
                    f"model '{model.name}' batches at most {model.max_batch_size} rows, but the graph's "
                    f"max_batch_size is {configured}: lower it to {smallest} or less, or leave it out "
                    "(the default is the smallest of the steps')",
                )
        return configured or smallest

    def _graph_outputs(self, slot_of: Callable[[str], int]) -> tuple[list[TensorConfig], list[list[int]]]:
        configured = {tensor.name: tensor for tensor in self.config.outputs}
        if configured and set(configured) != set(self.graph.outputs):
            raise self.error(
                "outputs", f"the [[outputs]] tables name {', '.join(configured)}, but graph.outputs has "
                f"{', '.join(self.graph.outputs)}: use the same names, or leave [[outputs]] out (they are derived)",
            )  # fmt: skip
        outputs, all_slots = [], []
        for name in self.graph.outputs:
            where = f"output '{name}'"
            sources = self.graph.sources(name)
            slots, datatype, dims = [], "", []
            for source in sources:
                tensor = self.tensors.get(source)
                if tensor is None:
                    raise self.error(where, f"source {self._unknown(source)}")
                if tensor.step < 0:
                    raise self.error(where, f"source '{source}' is a graph input: a graph output comes from a step")
                if slot_of(source) in slots:
                    raise self.error(where, f"source '{source}' is a tensor listed already (an alias and its name): list it once")
                merged = merge_dims(dims, tensor.dims) if slots else list(tensor.dims)
                if slots and (tensor.datatype != datatype or merged is None):
                    raise self.error(
                        where, f"source '{source}' is {_show(tensor.datatype, tensor.dims)} but '{sources[0]}' is "
                        f"{_show(datatype, dims)}: every source of an output must agree on datatype and dims",
                    )  # fmt: skip
                slots.append(slot_of(source))
                datatype, dims = tensor.datatype, merged or []
            labels = None
            if name in configured:
                table = configured[name]
                merged = merge_dims(dims, list(table.dims))
                if table.datatype != datatype or merged is None:
                    raise self.error(
                        where, f"the [[outputs]] table says {_show(table.datatype, table.dims)}, but its sources are "
                        f"{_show(datatype, dims)}: correct the table or leave it out",
                    )  # fmt: skip
                dims, labels = merged, table.labels
            outputs.append(TensorConfig(name=name, datatype=datatype, dims=dims, labels=labels))
            all_slots.append(slots)
        return outputs, all_slots

    def _core_step(self, index: int, slot_of: Callable[[str], int]) -> dict:
        step, model, predicate = self.steps[index], self.models[index], self.predicates[index]
        return {
            "name": step.name,
            "model": step.model,
            "inputs": [slot_of(step.inputs[name]) for name, _, _ in model.inputs],
            "outputs": [(name, datatype, list(dims)) for name, datatype, dims in model.outputs],
            "when": None if predicate is None else predicate.compile(slot_of),
            "optional": step.optional,
            "defaults": [step.default.get(name) for name, _, _ in model.outputs],
            "timeout_us": 0 if step.timeout_ms is None else step.timeout_ms * 1000,
        }

    def _copies(self, order: list[int]) -> list[str]:
        """Where rows are gathered (a step on a subset) or scattered (an output of several sources)."""
        lines: list[str] = []
        partial_steps: set[int] = set()

        def partial(name: str) -> bool:
            tensor = self.tensors[name]
            if tensor.step < 0:
                return False
            step, model = self.steps[tensor.step], self.models[tensor.step]
            no_default = step.default.get(model.outputs[tensor.index][0]) is None
            return tensor.step in partial_steps or (step.optional and no_default)

        for index in order:
            step, predicate = self.steps[index], self.predicates[index]
            read = list(dict.fromkeys([*step.inputs.values(), *(predicate.tensors if predicate else ())]))
            gaps = [name for name in read if partial(name)]
            if predicate is not None:
                shown = ", ".join(f"'{name}'" for name in step.inputs.values())
                lines.append(f"step '{step.name}' reads rows of {shown} selected by its when: gathered into the step's request")
            elif gaps:
                producers = list(dict.fromkeys(f"'{self.steps[self.tensors[n].step].name}'" for n in gaps))
                steps = ("step " if len(producers) == 1 else "steps ") + ", ".join(producers)
                shown = ", ".join(f"'{name}'" for name in gaps)
                lines.append(
                    f"step '{step.name}' reads rows of {shown} present only where {steps} ran: "
                    "gathered into the step's request"
                )
            if predicate is not None or gaps:
                partial_steps.add(index)
        for name in self.graph.outputs:
            sources = self.graph.sources(name)
            if len(sources) > 1:
                lines.append(f"output '{name}': rows scattered from {', '.join(sources)}")
        return lines
