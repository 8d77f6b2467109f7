"""The `[[preprocess]]` and `[[postprocess]]` tables of a model config.

Kept apart from conveyor.config (which imports and re-exports them) so the model
table's module stays readable; the rules that tie a step to the model's tensors
live on ModelConfig, which sees both.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from conveyor.config_errors import describe_pattern, rule_error

TENSOR_NAME_PATTERN = r"^[A-Za-z0-9_.:/-]+$"
# Also the repository's guard against path traversal: a name is one directory level.
# Here rather than in conveyor.config because a graph step names a model too.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A file in the model's version or model directory: one path level, no leading dot.
FILE_NAME_PATTERN = describe_pattern(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", "a file name: letters, digits, '_', '.' or '-', not starting with '.'"
)
TensorName = Annotated[str, Field(pattern=TENSOR_NAME_PATTERN)]

# Per preprocess kind: the fields it takes and the defaults it fills in. Fields of the
# other kind are None and refused when given, so a step dumps back (to_dict) unchanged.
_NORMALIZE_DEFAULTS: dict[str, Any] = {"scale": 1.0 / 255.0, "layout": "NCHW", "dtype": "FP32"}
_TOKENIZE_DEFAULTS: dict[str, Any] = {
    "tokenizer": "tokenizer.json",
    "max_length": 512,
    "padding": "longest",
    "truncation": True,
    # 64 KiB: far above what max_length = 512 tokens needs, small enough that one
    # request cannot make an instance tokenize megabytes it will truncate anyway.
    "max_bytes": 65_536,
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
}
_KIND_FIELDS = {
    "normalize_image": {"mean", "std", *_NORMALIZE_DEFAULTS},
    "tokenize": {"token_type_ids", *_TOKENIZE_DEFAULTS},
}


class _Strict(BaseModel):
    # strict: TOML values are typed, so "5" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


class PreprocessStep(_Strict):
    """A step on one public input before the backend sees it (examples/README.md).

    normalize_image runs in C++ (UINT8 images -> FP32/FP16); tokenize runs in Python
    on the instance thread (BYTES text -> INT64 token ids and attention mask).
    """

    kind: Literal["normalize_image", "tokenize"]
    input: str = Field(pattern=TENSOR_NAME_PATTERN)
    # normalize_image
    mean: list[float] | None = Field(default=None, min_length=1)
    std: list[float] | None = Field(default=None, min_length=1)
    scale: float | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    dtype: Literal["FP32", "FP16"] | None = None
    # tokenize: a Hugging Face tokenizers file, looked up in the version directory, then
    # the model directory.
    tokenizer: str | None = Field(default=None, pattern=FILE_NAME_PATTERN)
    max_length: int | None = Field(default=None, ge=1)
    padding: Literal["longest", "max_length"] | None = None
    truncation: bool | None = None
    max_bytes: int | None = Field(default=None, ge=1)
    # The backend inputs it produces (INT64 [batch, seq]); token_type_ids only when named.
    input_ids: TensorName | None = None
    attention_mask: TensorName | None = None
    token_type_ids: TensorName | None = None

    @model_validator(mode="after")
    def _kind_rules(self) -> PreprocessStep:
        foreign = sorted((self.model_fields_set - {"kind", "input"}) - _KIND_FIELDS[self.kind])
        if foreign:
            raise rule_error(f"no {foreign[0]} (a {self.kind} step does not use it)", getattr(self, foreign[0]), field=foreign[0])
        defaults = _NORMALIZE_DEFAULTS if self.kind == "normalize_image" else _TOKENIZE_DEFAULTS
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.kind == "normalize_image":
            self._check_normalize()
        else:
            self._check_tokenize()
        return self

    def _check_normalize(self) -> None:
        for key in ("mean", "std"):
            if getattr(self, key) is None:
                raise rule_error("one value per channel (normalize_image needs it)", None, field=key, got_text="none")
        assert self.mean is not None and self.std is not None
        if len(self.std) != len(self.mean):
            raise rule_error(f"{len(self.mean)} values (one per channel, as mean)", self.std, field="std")
        if any(value == 0 or not np.isfinite(value) for value in self.std):
            raise rule_error("finite, non-zero values", self.std, field="std")

    def _check_tokenize(self) -> None:
        seen = {self.input}
        for key, name in zip(("input_ids", "attention_mask", "token_type_ids"), self.produced_inputs):
            if name in seen:
                raise rule_error("a name no other tensor of the step uses", name, field=key)
            seen.add(name)

    @property
    def produced_inputs(self) -> list[str]:
        """tokenize: the backend inputs it produces, in order (ids, mask[, token types])."""
        names = [self.input_ids, self.attention_mask, self.token_type_ids]
        return [name for name in names if name is not None]


# Per postprocess kind: the datatypes of the public outputs it produces.
POSTPROCESS_OUTPUT_TYPES = {
    "softmax": ("FP32",),
    "softmax_topk": ("FP32", "INT64"),
    "argmax": ("INT64",),
    "classification": ("BYTES",),
}


class PostprocessStep(_Strict):
    """A step run in C++ on one backend output before the client sees it (examples/README.md)."""

    kind: Literal["softmax", "softmax_topk", "argmax", "classification"]
    output: str = Field(pattern=TENSOR_NAME_PATTERN)  # the backend's output it reads
    # The public outputs it produces; default: one, named as `output`.
    outputs: list[TensorName] = []
    k: int | None = Field(default=None, ge=1)
    labels: str | None = Field(default=None, pattern=FILE_NAME_PATTERN)

    @model_validator(mode="after")
    def _kind_rules(self) -> PostprocessStep:
        needs_k = self.kind in ("softmax_topk", "classification")
        if needs_k and self.k is None:
            raise rule_error(f"k: how many classes {self.kind} keeps", None, field="k", got_text="none")
        if not needs_k and self.k is not None:
            raise rule_error(f"no k ({self.kind} keeps every class)", self.k, field="k")
        if self.labels is not None and self.kind != "classification":
            raise rule_error("no labels (only classification uses them)", self.labels, field="labels")
        count = len(POSTPROCESS_OUTPUT_TYPES[self.kind])
        if not self.outputs and count == 1:
            self.outputs = [self.output]
        if len(self.outputs) != count:
            raise rule_error(f"{count} output names", self.outputs, field="outputs")
        return self

    @property
    def last_dim(self) -> int | None:
        """The last dim of what it produces: k, 1 (argmax), or None (softmax keeps the shape)."""
        return self.k if self.k is not None else (1 if self.kind == "argmax" else None)
