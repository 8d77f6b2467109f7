"""Pre- and post-processing steps of a model config, run in C++ around the backend.

`[[preprocess]]` and `[[postprocess]]` steps make the config's inputs and outputs the
PUBLIC tensors (what clients send and receive); the backend's own tensors are derived:

- backend inputs: the public inputs in order; one that normalize_image reads keeps its
  name and becomes FP32 or FP16 (the step's dtype), [C, H, W] for layout NCHW or
  [H, W, C] for NHWC, from the public UINT8 [H, W, C]; one that tokenize reads (BYTES,
  one string per row) is replaced by the INT64 [tokens] inputs the step produces
  (input_ids, attention_mask[, token_type_ids]), in that place;
- backend outputs: the public outputs no step produces (passed through unchanged), then
  each backend output a postprocess step reads (its `output`), once: FP32, with the dims
  model.onnx gives it (backends onnx and native) or [-1] (one vector per row, python).

The steps are one C++ Pipeline (_core.Pipeline) the batcher composes with the backend's
executor, so they run on the instance threads without the GIL. Tokenize is the one step
that runs in Python (conveyor.tokenize_step: the tokenizers library has no C API): the
executor calls it on the instance thread after the C++ preprocess steps and before the
backend (`backend_inputs`). Classification is the one step that ends in Python: the C++
top_k step returns each row's k best scores and their indices, and "score:index:label"
byte strings are made from them once per batch at completion. Python bytes objects can
only be made under the GIL, and labels and the text format belong with the protocol's
other strings; the core stays numeric.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conveyor import _core
from conveyor.backends import fill_config_from_onnx
from conveyor.config import ModelConfig, PostprocessStep, TensorConfig
from conveyor.errors import ConfigError
from conveyor.tokenize_step import TokenizeStep

__all__ = ["ModelSteps", "format_classes", "read_labels"]

_CORE_KINDS = {"softmax": "softmax", "softmax_topk": "softmax_topk", "argmax": "argmax", "classification": "top_k"}


class ModelSteps:
    """The steps of one model version: the derived backend config and the C++ pipeline.

    Use `for_config` (None when the config has no steps), create the backend with
    `backend_config()`, then `bind(backend.config)`; after that `core`, `core_outputs`
    and `finish` are what the batcher and the runtime need.
    """

    def __init__(self, config: ModelConfig, model_dir: Path | None, *, version_dir: Path | None = None) -> None:
        self.config = config
        # The steps that run in Python on the instance thread, by the public input they read.
        self.tokenize: dict[int, TokenizeStep] = {}
        for index, step in enumerate(config.preprocess):
            if step.kind == "tokenize":
                tokenize = TokenizeStep(config, index, [d for d in (version_dir, model_dir) if d is not None])
                self.tokenize[tokenize.input_index] = tokenize
        self.labels: dict[int, list[str] | None] = {}
        for index, step in enumerate(config.postprocess):
            self.labels[index] = None if step.labels is None else read_labels(config, step, model_dir)
        self.core: Any = None
        self.core_outputs: list[tuple[str, str, list[int]]] = []
        # Turns the core outputs of a batch (or of rows offset:offset+rows) into the public
        # outputs; None when they already are (no classification step).
        self.finish: Callable[..., tuple[np.ndarray, ...]] | None = None

    @classmethod
    def for_config(cls, config: ModelConfig, version_dir: Path | None) -> ModelSteps | None:
        if not (config.preprocess or config.postprocess):
            return None
        if version_dir is None:
            return cls(config, None)
        return cls(config, Path(version_dir).parent, version_dir=Path(version_dir))

    def backend_config(self, model_file: Path | None) -> ModelConfig:
        """The config the backend is created with: derived tensors, no steps."""
        config = self.config
        inputs = [new for tensor in config.inputs for new in self._backend_inputs(tensor)]
        self._check_produced_inputs(model_file)
        produced = {name for step in config.postprocess for name in step.outputs}
        outputs = [tensor for tensor in config.outputs if tensor.name not in produced]
        sources = list(dict.fromkeys(step.output for step in config.postprocess))
        sources = [name for name in sources if name not in {t.name for t in outputs}]
        graph_outputs: dict[str, TensorConfig] = {}
        if sources and config.backend in ("onnx", "native") and model_file is not None and model_file.is_file():
            probe = config.model_copy(update={"inputs": inputs, "outputs": [], "preprocess": [], "postprocess": []})
            graph_outputs = {t.name: t for t in fill_config_from_onnx(probe, model_file).outputs}
        for name in sources:
            if graph_outputs and name not in graph_outputs:
                index = next(i for i, step in enumerate(config.postprocess) if step.output == name)
                raise ConfigError(
                    f"{model_file}: field 'postprocess[{index}].output': expected one of the model's outputs "
                    f"({', '.join(graph_outputs)}), got {name!r}"
                )
            outputs.append(graph_outputs.get(name) or TensorConfig(name=name, datatype="FP32", dims=[-1]))
        return config.model_copy(update={"inputs": inputs, "outputs": outputs, "preprocess": [], "postprocess": []})

    def _backend_inputs(self, tensor: TensorConfig) -> list[TensorConfig]:
        step = next((s for s in self.config.preprocess if s.input == tensor.name), None)
        if step is None:
            return [tensor]
        if step.kind == "tokenize":
            return next(t for t in self.tokenize.values() if t.input_name == tensor.name).backend_inputs()
        height, width, channels = tensor.dims
        dims = [channels, height, width] if step.layout == "NCHW" else [height, width, channels]
        return [TensorConfig(name=tensor.name, datatype=str(step.dtype), dims=dims)]

    def _check_produced_inputs(self, model_file: Path | None) -> None:
        """Each input a tokenize step produces must be one the model file takes."""
        config = self.config
        if not self.tokenize or config.backend not in ("onnx", "native") or model_file is None or not model_file.is_file():
            return
        probe = config.model_copy(update={"inputs": [], "outputs": [], "preprocess": [], "postprocess": []})
        graph_inputs = [t.name for t in fill_config_from_onnx(probe, model_file).inputs]
        for index, step in enumerate(config.preprocess):
            for key, name in zip(("input_ids", "attention_mask", "token_type_ids"), step.produced_inputs):
                if step.kind == "tokenize" and name not in graph_inputs:
                    raise ConfigError(
                        f"{model_file}: field 'preprocess[{index}].{key}': expected one of the model's inputs "
                        f"({', '.join(graph_inputs)}), got {name!r}"
                    )

    @property
    def runs_python(self) -> bool:
        """True when a step runs in Python: the batch then goes through `backend_inputs`."""
        return bool(self.tokenize)

    def check_request(self, arrays: tuple[np.ndarray, ...]) -> None:
        """Refuses (InvalidInput) a request whose inputs a Python step cannot take."""
        for index, step in self.tokenize.items():
            step.check_request(arrays[index])

    def backend_inputs(self, inputs: tuple[np.ndarray, ...] | list[np.ndarray], instance: int) -> list[np.ndarray]:
        """The backend's inputs for a batch (after the C++ preprocess steps), on instance `instance`."""
        out: list[np.ndarray] = []
        for index, array in enumerate(inputs):
            step = self.tokenize.get(index)
            if step is None:
                out.append(array)
            else:
                out.extend(step.encode(array, instance))
        return out

    def bind(self, backend_config: ModelConfig) -> None:
        """Builds the C++ pipeline against the backend's (completed) tensors."""
        config = self.config
        backend_outputs = [t.name for t in backend_config.outputs]
        # The native backend's thread budget covers its steps too; other backends' steps use one.
        core = _core.Pipeline(threads=config.native.threads if config.backend == "native" else 1)
        input_names = [t.name for t in config.inputs]
        for step in config.preprocess:
            if step.kind != "normalize_image":
                continue
            core.add_normalize_image(
                input=input_names.index(step.input),
                mean=list(step.mean or ()),
                std=list(step.std or ()),
                scale=step.scale,
                layout=step.layout,
                dtype=step.dtype,
            )
        producer: dict[str, tuple[int, int, PostprocessStep]] = {}
        for index, step in enumerate(config.postprocess):
            if step.output not in backend_outputs:
                raise ConfigError(
                    f"model '{config.name}': postprocess[{index}] reads '{step.output}', which the "
                    f"backend does not return ({', '.join(backend_outputs)})"
                )
            core.add_postprocess(kind=_CORE_KINDS[step.kind], source=backend_outputs.index(step.output), k=step.k or 0)
            for position, name in enumerate(step.outputs):
                producer[name] = (index, position, step)
        sources: list[tuple[int, int]] = []
        makers: list[Callable[[tuple[np.ndarray, ...], int], np.ndarray] | None] = []
        for tensor in config.outputs:
            spec = (tensor.name, tensor.datatype, list(tensor.dims))
            if tensor.name not in producer:
                sources.append((-1, backend_outputs.index(tensor.name)))
                self.core_outputs.append(spec)
                makers.append(None)
                continue
            index, position, step = producer[tensor.name]
            if step.kind != "classification":
                sources.append((index, position))
                self.core_outputs.append(spec)
                makers.append(None)
                continue
            # Two core outputs (scores, indices) become one public BYTES output.
            sources += [(index, 0), (index, 1)]
            self.core_outputs += [
                (tensor.name, "FP32", list(tensor.dims)),
                (f"{tensor.name}:index", "INT64", list(tensor.dims)),
            ]
            makers.append(_class_maker(self.labels[index]))
        core.set_outputs(sources)
        self.core = core
        if any(maker is not None for maker in makers):
            self.finish = _finisher(makers)


def read_labels(config: ModelConfig, step: PostprocessStep, model_dir: Path | None) -> list[str]:
    """One label per line of the step's labels file in the model directory (class i on line i + 1)."""
    if model_dir is None:
        raise ConfigError(f"model '{config.name}': postprocess labels '{step.labels}' need the model's directory")
    return read_labels_file(model_dir / str(step.labels), where=f"model '{config.name}': postprocess labels")


def read_labels_file(path: Path, *, where: str) -> list[str]:
    """Class labels, one per line (class i on line i + 1); trailing blank lines are dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read labels file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def format_classes(scores: np.ndarray, indices: np.ndarray, labels: list[str] | None = None) -> np.ndarray:
    """The strings "score:index:label" ("score:index" past the labels) as an object array of bytes.

    Scores print as C's "%f", as Triton's classification extension does.
    """
    return _class_maker(labels)((scores, indices), 0)


def _class_maker(labels: list[str] | None) -> Callable[[tuple[np.ndarray, ...], int], np.ndarray]:
    suffixes = [b":%d:%s" % (i, label.encode("utf-8")) for i, label in enumerate(labels or [])]
    known = len(suffixes)

    def make(arrays: tuple[np.ndarray, ...], at: int) -> np.ndarray:
        scores, indices = arrays[at], arrays[at + 1]
        texts = [
            b"%f%s" % (score, suffixes[i] if i < known else b":%d" % i)
            for score, i in zip(scores.ravel().tolist(), indices.ravel().tolist())
        ]
        out = np.empty(len(texts), dtype=object)
        out[:] = texts
        return out.reshape(scores.shape)

    return make


def _finisher(
    makers: list[Callable[[tuple[np.ndarray, ...], int], np.ndarray] | None],
) -> Callable[..., tuple[np.ndarray, ...]]:
    def finish(arrays: tuple[np.ndarray, ...], offset: int = 0, rows: int = -1) -> tuple[np.ndarray, ...]:
        if rows >= 0:
            arrays = tuple(array[offset : offset + rows] for array in arrays)
        public, at = [], 0
        for make in makers:
            public.append(arrays[at] if make is None else make(arrays, at))
            at += 1 if make is None else 2
        return tuple(public)

    return finish
