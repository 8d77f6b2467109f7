"""A model graph as the runtime serves it: a version whose requests flow through its steps.

A graph's config has a `[graph]` table (conveyor.config_graph); conveyor.graph_plan checks
it against the step models loaded now and makes the plan; the plan becomes a C++
`_core.Graph`, which answers in the shapes a batcher does. So `GraphHandle` is a
`ModelHandle` whose "batcher" is the graph: `Runtime.infer`, `infer_async`, the servers,
statistics and monitoring treat it as any model version.

Each step is bound to the batcher of the step model's version (the newest unless the step
names one). When a step model is loaded, reloaded or unloaded, the runtime rebinds every
graph using it (`rebind`): requests submitted after that use the new version; a step whose
model is gone, or whose new version no longer fits the plan, leaves the graph unready
with that reason until a fitting version is loaded again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from conveyor import _core
from conveyor.config import ModelConfig
from conveyor.errors import ConfigError, ConveyorError, ModelNotFound
from conveyor.graph_plan import GraphPlan, StepModel
from conveyor.runtime_handle import ModelHandle

__all__ = ["GraphHandle", "step_model_of"]


def step_model_of(handle: ModelHandle) -> StepModel:
    """What a graph plan needs to know of a loaded model version."""
    return StepModel(
        name=handle.name,
        version=handle.version,
        inputs=[(t.name, t.datatype, list(t.dims)) for t in handle.config.inputs],
        outputs=[(name, datatype, list(dims)) for name, datatype, dims in handle.batch_outputs],
        max_batch_size=handle.config.max_batch_size,
        is_graph=isinstance(handle, GraphHandle),
        python_finish=handle.finish is not None,
    )


class GraphHandle(ModelHandle):
    """One loaded graph version: its plan and the C++ graph that runs it."""

    __slots__ = ("plan",)

    def __init__(
        self, name: str, version: int, config: ModelConfig, plan: GraphPlan, pool: Any,
        lookup: Callable[[str, int | None], ModelHandle], monitor: Any = None,
        routes: Mapping[str, list[tuple[int, int]]] | None = None,
    ) -> None:
        """`config`: the graph's config with its public tensors (`plan.public_config`); `plan`:
        plan_graph's for it; `lookup(model, version)`: a loaded version (ModelNotFound if none)."""
        self.plan: GraphPlan = plan
        self._init_common(name, version, config, [], None, monitor)
        self.batch_outputs = tuple((t.name, t.datatype, list(t.dims)) for t in plan.outputs)
        watched = monitor is not None and monitor.core is not None
        try:
            self.batcher = _core.Graph(
                **plan.core, pool=pool, **({"monitor": monitor.core} if watched else {})
            )
        except ConveyorError as exc:  # the plan and the core disagree: a defect of the plan, said as the config's
            raise ConfigError(f"model '{name}': {exc}") from None
        self.rebind(lookup, routes)

    @property
    def step_models(self) -> set[str]:
        """The models this graph's steps run."""
        return {model for _, model, _ in self.plan.steps}

    def rebind(
        self, lookup: Callable[[str, int | None], ModelHandle], routes: Mapping[str, list[tuple[int, int]]] | None = None
    ) -> None:
        """Binds every step to the version of its model loaded now (or unbinds it, saying why).

        routes: model -> [(version, upper point bound)] for a model under a rollout
        (`Runtime.route_graph_steps`): a step naming no version of it is split across those
        versions. An arm whose version is not loaded, or no longer fits, leaves the step on
        the newest version alone, as a request routed to a missing version goes to another.
        """
        for index, (step, model, version) in enumerate(self.plan.steps):
            arms = (routes or {}).get(model) if version is None else None
            if arms and len(arms) > 1 and self._bind_arms(index, model, arms, lookup):
                continue
            if version is None and arms and len(arms) == 1:
                version = arms[0][0]  # an ended rollout: its outcome's version answers
            try:
                handle = lookup(model, version)
            except ModelNotFound:
                wanted = f"version {version} of model '{model}'" if version is not None else f"model '{model}'"
                self.batcher.bind(index, None, f"{wanted} is not loaded")
                continue
            problem = self._misfit(index, step_model_of(handle))
            if problem:
                self.batcher.bind(
                    index, None,
                    f"model '{model}' version {handle.version} no longer fits: {problem}; load a version that fits, "
                    "or reload the graph to plan it against this one",
                )  # fmt: skip
            else:
                self.batcher.bind(index, handle.batcher)

    def _bind_arms(
        self, index: int, model: str, arms: list[tuple[int, int]], lookup: Callable[[str, int | None], ModelHandle]
    ) -> bool:
        """Binds step `index` across the versions of `arms`; False when one is missing or does not fit."""
        batchers = []
        for version, _ in arms:
            try:
                handle = lookup(model, version)
            except ModelNotFound:
                return False
            if self._misfit(index, step_model_of(handle)):
                return False
            batchers.append(handle.batcher)
        self.batcher.bind_arms(index, batchers, [bound for _, bound in arms])
        return True

    def _misfit(self, index: int, step: StepModel) -> str:
        """Why a step model's loaded version cannot serve the planned step ('' when it can)."""
        planned = self.plan.core["steps"][index]
        if step.is_graph:
            return "it is a graph"
        if step.python_finish:
            return "its outputs are made in Python at completion"
        if len(step.inputs) != len(planned["inputs"]):
            return f"it has {len(step.inputs)} inputs, the graph was planned with {len(planned['inputs'])}"
        outputs = [(name, datatype, list(dims)) for name, datatype, dims in planned["outputs"]]
        if step.outputs[: len(outputs)] != outputs:
            return f"its outputs are {step.outputs}, the graph was planned with {outputs}"
        if step.max_batch_size < self.config.max_batch_size:
            return f"its max_batch_size {step.max_batch_size} is below the graph's {self.config.max_batch_size}"
        return ""

    def ready(self) -> tuple[bool, str]:
        """Whether every step is bound; otherwise the first unbound step and why."""
        return self.batcher.ready()

    def step_stats(self) -> list[dict[str, Any]]:
        """Per step: requests and rows sent, rows skipped, failures, defaults used, time to answer."""
        return self.batcher.step_stats()

    def close(self) -> None:
        self.batcher.stop(drain=True)
        if self.monitor is not None:
            self.monitor.close()
