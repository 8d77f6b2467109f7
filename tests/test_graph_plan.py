from __future__ import annotations

from typing import Any

import pytest

from conveyor.config import ModelConfig, parse_model_config
from conveyor.errors import ConfigError, ModelNotFound
from conveyor.graph_plan import GraphPlan, StepModel, merge_dims, plan_graph

IMAGE = ("image", "UINT8", [32, 32, 3])
PROBABILITIES = ("probabilities", "FP32", [10])


def model(
    name: str,
    inputs: list[tuple[str, str, list[int]]] | None = None,
    outputs: list[tuple[str, str, list[int]]] | None = None,
    max_batch_size: int = 64,
    **flags: bool,
) -> StepModel:
    return StepModel(
        name=name,
        version=1,
        inputs=[IMAGE] if inputs is None else inputs,
        outputs=[PROBABILITIES] if outputs is None else outputs,
        max_batch_size=max_batch_size,
        is_graph=flags.get("is_graph", False),
        python_finish=flags.get("python_finish", False),
    )


MODELS = {
    "classifier_small": model("classifier_small", max_batch_size=32),
    "classifier_large": model("classifier_large"),
}


def lookup(models: dict[str, StepModel]):
    asked: list[tuple[str, int | None]] = []

    def step_model(name: str, version: int | None) -> StepModel:
        asked.append((name, version))
        if name not in models:
            raise ModelNotFound(f"model '{name}' is not loaded")
        return models[name]

    step_model.asked = asked  # type: ignore[attr-defined]
    return step_model


def config(graph: dict[str, Any], **fields: Any) -> ModelConfig:
    return parse_model_config({"graph": graph, **fields}, source="config.toml", name="cascade")


def plan(graph: dict[str, Any], models: dict[str, StepModel] | None = None, **fields: Any) -> GraphPlan:
    return plan_graph(config(graph, **fields), lookup(MODELS if models is None else models))


def plan_error(graph: dict[str, Any], models: dict[str, StepModel] | None = None, **fields: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        plan(graph, models, **fields)
    return str(caught.value)


SMALL = {"name": "small", "model": "classifier_small", "inputs": {"image": "image"}, "outputs": {"probabilities": "small_probs"}}
LARGE = {"name": "large", "model": "classifier_large", "inputs": {"image": "image"}, "when": "max(small_probs) < 0.9"}
CASCADE = {
    "inputs": ["image"],
    "outputs": {"probabilities": ["large.probabilities", "small.probabilities"]},
    "step": [LARGE, SMALL],  # listed out of order on purpose: the plan orders them
}


def test_the_cascade_plan_is_what_the_engine_takes() -> None:
    result = plan(CASCADE, dynamic_batching={"max_queue_size": 16, "default_timeout_us": 5000})
    small_step = {
        "name": "small", "model": "classifier_small", "inputs": [0], "outputs": [PROBABILITIES], "when": None,
        "optional": False, "defaults": [None], "timeout_us": 0,
    }  # fmt: skip
    large_step = {**small_step, "name": "large", "model": "classifier_large", "when": ([(1, "max", 0, "<", [0.9])], [0])}
    assert result.core == {
        "name": "cascade",
        "inputs": [IMAGE],
        "outputs": [PROBABILITIES],
        "output_sources": [[2, 1]],  # large's output is slot 2, small's slot 1
        "steps": [small_step, large_step],
        "max_batch_size": 32,
        "max_in_flight": 16,
        "default_timeout_us": 5000,
    }
    assert result.steps == [("small", "classifier_small", None), ("large", "classifier_large", None)]
    assert [(t.name, t.datatype, t.dims) for t in result.inputs] == [IMAGE]
    assert [(t.name, t.datatype, t.dims) for t in result.outputs] == [PROBABILITIES]
    assert result.max_batch_size == 32
    assert result.copies == [
        "step 'large' reads rows of 'image' selected by its when: gathered into the step's request",
        "output 'probabilities': rows scattered from large.probabilities, small.probabilities",
    ]


def test_slots_follow_the_step_order_and_each_model_s_output_order() -> None:
    two = model("two", outputs=[("a", "FP32", [1]), ("b", "INT64", [2])])
    reader = model("reader", inputs=[("p", "INT64", [2]), ("q", "FP32", [1])])
    graph = {
        "inputs": ["image"],
        "outputs": {"out": "r.probabilities"},
        "step": [
            {"name": "r", "model": "reader", "inputs": {"q": "t.a", "p": "t.b"}},
            {"name": "t", "model": "two", "inputs": {"image": "image"}, "version": 3},
        ],
    }
    models = {"two": two, "reader": reader}
    step_model = lookup(models)
    result = plan_graph(config(graph), step_model)
    assert [step["name"] for step in result.core["steps"]] == ["t", "r"]
    # slot 0 image; t's a, b are 1, 2; r's probabilities is 3. r's inputs follow ITS order (p, q).
    assert result.core["steps"][1]["inputs"] == [2, 1]
    assert result.core["output_sources"] == [[3]]
    assert result.steps == [("t", "two", 3), ("r", "reader", None)]
    assert sorted(step_model.asked) == [("reader", None), ("two", 3)]


def test_ready_steps_keep_the_file_order() -> None:
    steps = [{"name": name, "model": "classifier_large", "inputs": {"image": "image"}} for name in ("c", "a", "b")]
    result = plan({"inputs": ["image"], "outputs": {"o": "a.probabilities"}, "step": steps})
    assert [name for name, _, _ in result.steps] == ["c", "a", "b"]
    assert result.copies == []


def test_a_cycle_names_its_steps_and_the_tensors_they_read() -> None:
    tail = model("tail", inputs=[PROBABILITIES])
    steps = [
        {"name": "first", "model": "classifier_large", "inputs": {"image": "image"}},
        {"name": "a", "model": "tail", "inputs": {"probabilities": "b.probabilities"}},
        {"name": "b", "model": "tail", "inputs": {"probabilities": "a.probabilities"}},
    ]
    message = plan_error({"inputs": ["image"], "outputs": {"o": "a.probabilities"}, "step": steps}, {**MODELS, "tail": tail})
    assert message == (
        "graph 'cascade': step 'a': the steps a -> b -> a form a cycle ('a' reads 'b.probabilities', 'b' reads "
        "'a.probabilities'): a step may read only graph inputs and the outputs of steps that do not read it back"
    )


def test_a_step_whose_when_reads_its_own_output_is_a_cycle() -> None:
    graph = {**CASCADE, "step": [SMALL, {**LARGE, "when": "max(large.probabilities) < 0.5"}]}
    assert "step 'large': the steps large -> large form a cycle ('large' reads 'large.probabilities')" in plan_error(graph)


def step_error(step: dict[str, Any], graph: dict[str, Any] | None = None, models: dict | None = None) -> str:
    base = {"inputs": ["image"], "outputs": {"o": "small.probabilities"}, "step": [SMALL, step]}
    return plan_error({**base, **(graph or {})}, models)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            {**LARGE, "inputs": {"image": "picture"}},
            ("step 'large': input 'image' reads 'picture', which is no graph input and no step output (known: image, "
            "large.probabilities, small.probabilities, small_probs)"),
        ),
        (
            {**LARGE, "inputs": {}},
            ("step 'large': input 'image' of model 'classifier_large' is not mapped: add it to the step's inputs, "
            'e.g. inputs = { image = "<tensor>" }'),
        ),
        (
            {**LARGE, "inputs": {"image": "image", "mask": "image"}},
            "step 'large': inputs maps 'mask', which model 'classifier_large' does not take (its inputs: image)",
        ),
        (
            {**LARGE, "outputs": {"logits": "l"}},
            ("step 'large': outputs maps 'logits', which model 'classifier_large' does not produce (its outputs: "
            "probabilities)"),
        ),
        (
            {**LARGE, "outputs": {"probabilities": "image"}},
            ("step 'large': alias 'image' for output 'probabilities' names a graph input (each name is produced once, "
            "and '<step>.<output>' names belong to step outputs): choose another alias"),
        ),
        ({**LARGE, "outputs": {"probabilities": "small_probs"}}, "alias 'small_probs' for output 'probabilities' names another tensor"),
        (
            {**LARGE, "outputs": {"probabilities": "small.probabilities"}},
            "alias 'small.probabilities' for output 'probabilities' names another tensor",
        ),
        ({**LARGE, "outputs": {"probabilities": "small.other"}}, "alias 'small.other' for output 'probabilities' names another"),
        ({**LARGE, "when": "max(nothing) < 1"}, "step 'large': when reads 'nothing', which is no graph input and no step"),
        (
            {**LARGE, "when": "small_probs < 0.5"},
            ("step 'large': when compares 'small_probs' as one value, but its rows hold 10 elements (FP32 [10]): use "
            "small_probs[k], max(small_probs), min(small_probs) or argmax(small_probs)"),
        ),
        (
            {**LARGE, "when": "small_probs[10] > 0.5"},
            "step 'large': when reads element 10 of 'small_probs' (FP32 [10]: 10 elements a row): use an index below 10",
        ),
        (
            {**LARGE, "optional": True, "default": {"logits": 0.0}},
            ("step 'large': default names 'logits', which model 'classifier_large' does not produce (its outputs: "
            "probabilities)"),
        ),
    ],
)
def test_step_errors_name_the_graph_the_step_and_the_fix(step: dict[str, Any], message: str) -> None:
    assert message in step_error(step)
    assert step_error(step).startswith("graph 'cascade': step '")


def test_an_alias_equal_to_its_own_name_is_allowed() -> None:
    result = plan({**CASCADE, "step": [SMALL, {**LARGE, "outputs": {"probabilities": "large.probabilities"}}]})
    assert result.core["output_sources"] == [[2, 1]]


def test_a_graph_input_with_the_name_of_a_step_output_is_refused() -> None:
    graph = {"inputs": ["image", "small.probabilities"], "outputs": {"o": "small.probabilities"}, "step": [SMALL]}
    message = plan_error(graph)
    assert message == (
        "graph 'cascade': step 'small': output 'small.probabilities' has the name of a graph input: rename the input"
    )


@pytest.mark.parametrize(
    ("upstream", "reader_input", "message"),
    [
        (("probabilities", "FP64", [10]), ("x", "FP32", [10]), "is FP32 [10], but it reads 'u.probabilities', which is FP64 [10]"),
        (("probabilities", "FP32", [10]), ("x", "FP32", [5]), "is FP32 [5], but it reads 'u.probabilities', which is FP32 [10]"),
        (("probabilities", "FP32", [10]), ("x", "FP32", [10, 1]), "is FP32 [10, 1]"),
    ],
)
def test_step_to_step_datatype_and_dims_must_agree(upstream: tuple, reader_input: tuple, message: str) -> None:
    models = {"up": model("up", outputs=[upstream]), "reader": model("reader", inputs=[reader_input])}
    steps = [
        {"name": "u", "model": "up", "inputs": {"image": "image"}},
        {"name": "r", "model": "reader", "inputs": {"x": "u.probabilities"}},
    ]
    error = plan_error({"inputs": ["image"], "outputs": {"o": "r.probabilities"}, "step": steps}, models)
    assert error.startswith("graph 'cascade': step 'r': input 'x' of model 'reader' ")
    assert message in error and error.endswith(": map a tensor of the same datatype and dims")


def test_variable_dims_match_anything_and_graph_inputs_take_the_most_specific() -> None:
    models = {
        "a": model("a", inputs=[("image", "UINT8", [-1, 32, 3])], outputs=[("p", "FP32", [-1])]),
        "b": model("b", inputs=[("image", "UINT8", [32, -1, 3]), ("p", "FP32", [10])]),
    }
    steps = [
        {"name": "a", "model": "a", "inputs": {"image": "image"}},
        {"name": "b", "model": "b", "inputs": {"image": "image", "p": "a.p"}},
    ]
    result = plan({"inputs": ["image"], "outputs": {"o": ["b.probabilities"]}, "step": steps}, models)
    assert result.core["inputs"] == [("image", "UINT8", [32, 32, 3])]
    assert merge_dims([-1, 2], [3, -1]) == [3, 2] and merge_dims([1], [1, 1]) is None and merge_dims([2], [3]) is None


def test_graph_input_readers_must_agree() -> None:
    models = {**MODELS, "wide": model("wide", inputs=[("image", "FP32", [32, 32, 3])])}
    steps = [SMALL, {"name": "w", "model": "wide", "inputs": {"image": "image"}}]
    message = plan_error({"inputs": ["image"], "outputs": {"o": "w.probabilities"}, "step": steps}, models)
    assert message == (
        "graph 'cascade': input 'image': step 'small' (input 'image') reads it as UINT8 [32, 32, 3] but step 'w' "
        "(input 'image') as FP32 [32, 32, 3]: every reader must agree on datatype and dims"
    )


def test_a_graph_input_no_step_reads_is_refused() -> None:
    message = plan_error({**CASCADE, "inputs": ["image", "extra"]})
    assert message == "graph 'cascade': input 'extra': no step input reads it: map a step input to it or remove it"


def test_configured_inputs_and_outputs_must_agree_with_the_derived_ones() -> None:
    inputs = [{"name": "image", "datatype": "UINT8", "dims": [-1, -1, 3]}]
    outputs = [{"name": "probabilities", "datatype": "FP32", "dims": [10], "labels": "labels.txt"}]
    result = plan(CASCADE, inputs=inputs, outputs=outputs)
    assert result.inputs[0].dims == [32, 32, 3] and result.outputs[0].labels == "labels.txt"
    message = plan_error(CASCADE, inputs=[{**inputs[0], "datatype": "FP32"}])
    assert message == (
        "graph 'cascade': input 'image': step 'large' (input 'image') reads it as UINT8 [32, 32, 3] but the "
        "[[inputs]] table as FP32 [-1, -1, 3]: every reader must agree on datatype and dims"
    )
    message = plan_error(CASCADE, inputs=[{**inputs[0], "name": "picture"}])
    assert message == (
        "graph 'cascade': inputs: the [[inputs]] tables name picture, but graph.inputs lists image: list the same "
        "names, or leave [[inputs]] out (they are derived)"
    )
    message = plan_error(CASCADE, outputs=[{**outputs[0], "dims": [5]}])
    assert message == (
        "graph 'cascade': output 'probabilities': the [[outputs]] table says FP32 [5], but its sources are FP32 [10]: "
        "correct the table or leave it out"
    )
    message = plan_error(CASCADE, outputs=[{**outputs[0], "name": "scores"}])
    assert "graph 'cascade': outputs: the [[outputs]] tables name scores, but graph.outputs has probabilities" in message


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (["nowhere"], "output 'o': source 'nowhere', which is no graph input and no step output (known: image, "),
        (["image"], "output 'o': source 'image' is a graph input: a graph output comes from a step"),
        (
            ["small_probs", "small.probabilities"],
            "output 'o': source 'small.probabilities' is a tensor listed already (an alias and its name): list it once",
        ),
        (
            ["small.probabilities", "t.scores"],
            ("output 'o': source 't.scores' is FP64 [10] but 'small.probabilities' is FP32 [10]: every source of an "
            "output must agree on datatype and dims"),
        ),
    ],
)
def test_output_source_errors(sources: list[str], message: str) -> None:
    models = {**MODELS, "other": model("other", outputs=[("scores", "FP64", [10])])}
    steps = [SMALL, {"name": "t", "model": "other", "inputs": {"image": "image"}}]
    error = plan_error({"inputs": ["image"], "outputs": {"o": sources}, "step": steps}, models)
    assert error.startswith("graph 'cascade': output 'o': ") and message in error


@pytest.mark.parametrize(
    ("datatype", "reads"), [("BYTES", "a BYTES tensor"), ("FP16", "a FP16 tensor"), ("BF16", "a BF16 tensor")]
)
def test_predicates_read_numeric_tensors(datatype: str, reads: str) -> None:
    models = {**MODELS, "text": model("text", outputs=[("label", datatype, [1])])}
    steps = [{"name": "t", "model": "text", "inputs": {"image": "image"}}, {**LARGE, "when": "t.label == 1"}]
    message = plan_error({"inputs": ["image"], "outputs": {"o": "large.probabilities"}, "step": steps}, models)
    assert message == (
        f"graph 'cascade': step 'large': when reads 't.label', {reads}: predicates read numeric tensors "
        "(not BYTES, FP16, BF16)"
    )


def test_predicates_on_variable_dims_are_left_to_the_engine() -> None:
    models = {**MODELS, "v": model("v", outputs=[("score", "FP32", [-1])])}
    steps = [{"name": "v", "model": "v", "inputs": {"image": "image"}}, {**LARGE, "when": "v.score > 0 or v.score[99] > 0"}]
    result = plan({"inputs": ["image"], "outputs": {"o": "large.probabilities"}, "step": steps}, models)
    assert result.core["steps"][1]["when"] == ([(1, "value", 0, ">", [0.0]), (1, "element", 99, ">", [0.0])], [0, 1, "or"])


def test_a_default_cannot_fill_a_bytes_output() -> None:
    models = {**MODELS, "text": model("text", outputs=[("label", "BYTES", [1])])}
    step = {"name": "t", "model": "text", "inputs": {"image": "image"}, "optional": True, "default": {"label": 0.0}}
    message = plan_error({"inputs": ["image"], "outputs": {"o": "t.label"}, "step": [step]}, models)
    assert message == "graph 'cascade': step 't': default for 'label', a BYTES output: defaults fill numeric outputs"


def test_optional_steps_defaults_and_timeouts_reach_the_engine() -> None:
    two = model("two", outputs=[("a", "FP32", [1]), ("b", "FP32", [2])])
    step = {"name": "t", "model": "two", "inputs": {"image": "image"}, "optional": True, "default": {"b": -1}, "timeout_ms": 50}
    result = plan({"inputs": ["image"], "outputs": {"o": "t.b"}, "step": [step]}, {"two": two})
    core_step = result.core["steps"][0]
    assert (core_step["optional"], core_step["defaults"], core_step["timeout_us"]) == (True, [None, -1.0], 50_000)


def test_a_step_reading_rows_only_some_steps_produce_gathers_them() -> None:
    tail = model("tail", inputs=[PROBABILITIES, ("extra", "FP32", [1])])
    two = model("two", outputs=[PROBABILITIES, ("extra", "FP32", [1])])
    steps = [
        {"name": "maybe", "model": "two", "inputs": {"image": "image"}, "optional": True, "default": {"probabilities": 0}},
        {"name": "after", "model": "tail", "inputs": {"probabilities": "maybe.probabilities", "extra": "maybe.extra"}},
        {"name": "sure", "model": "tail", "inputs": {"probabilities": "maybe.probabilities", "extra": "maybe.extra"}},
    ]
    steps[2] = {**steps[2], "inputs": {"probabilities": "after.probabilities", "extra": "maybe.extra"}}
    models = {"two": two, "tail": tail}
    result = plan({"inputs": ["image"], "outputs": {"o": "sure.probabilities"}, "step": steps}, models)
    # maybe.extra has no default: its rows are only where maybe ran; after's outputs inherit that.
    assert result.copies == [
        "step 'after' reads rows of 'maybe.extra' present only where step 'maybe' ran: gathered into the step's request",
        ("step 'sure' reads rows of 'after.probabilities', 'maybe.extra' present only where steps 'after', 'maybe' "
        "ran: gathered into the step's request"),
    ]


def test_max_batch_size_is_the_smallest_step_s_and_may_be_lower() -> None:
    assert plan(CASCADE).max_batch_size == 32
    assert plan(CASCADE, max_batch_size=8).core["max_batch_size"] == 8
    message = plan_error(CASCADE, max_batch_size=48)
    assert message == (
        "graph 'cascade': step 'small': model 'classifier_small' batches at most 32 rows, but the graph's "
        "max_batch_size is 48: lower it to 32 or less, or leave it out (the default is the smallest of the steps')"
    )


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        (
            model("classifier_small", max_batch_size=0),
            ("model 'classifier_small' has max_batch_size 0 (it does not batch): a graph batches rows, so each step's "
            "model needs max_batch_size >= 1"),
        ),
        (
            model("classifier_small", is_graph=True),
            "model 'classifier_small' is a graph: graphs cannot be steps yet; use its steps here",
        ),
        (
            model("classifier_small", python_finish=True),
            ("model 'classifier_small' makes its outputs in Python (a classification postprocess): a graph step's "
            "outputs must come from its batcher; use a step model without that postprocess"),
        ),
    ],
)
def test_step_models_a_graph_cannot_run_are_refused(replacement: StepModel, message: str) -> None:
    assert plan_error(CASCADE, {**MODELS, "classifier_small": replacement}) == f"graph 'cascade': step 'small': {message}"


def test_a_step_model_that_is_not_loaded_is_named() -> None:
    graph = {**CASCADE, "step": [{**SMALL, "version": 4}, LARGE]}
    message = plan_error(graph, {"classifier_large": MODELS["classifier_large"]})
    assert message == (
        "graph 'cascade': step 'small': model 'classifier_small' version 4 is not loaded (model 'classifier_small' "
        "is not loaded): load it first"
    )


def test_a_model_that_is_not_a_graph_has_no_plan() -> None:
    onnx = parse_model_config({"backend": "onnx"}, source="dict", name="m")
    with pytest.raises(ConfigError, match=r"^model 'm': not a graph \(its config has no \[graph\] table\)$"):
        plan_graph(onnx, lookup(MODELS))
