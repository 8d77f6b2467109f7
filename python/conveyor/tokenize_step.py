"""The tokenize preprocess step: a BYTES input of text -> INT64 token ids and masks.

`tokenizers` is a Python library (its Rust core has no C API), so this step runs in
Python on the instance thread, inside the batch, just before the backend: the whole
dynamic batch is encoded with one `encode_batch_fast` call, which releases the GIL
while Rust works. A tokenizer object is borrowed mutably for the length of a call, so
sharing one between instance threads fails ("Already borrowed"): each instance gets
its own, configured once at load (truncation, padding) and never mutated after.

Strings are checked per request before they are queued (`check_request`), so a bad
string fails its own request only, naming the input and the row in that request; the
batch checks again (rows then count from the start of the batch) for callers that
reach the batcher another way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conveyor.config import ModelConfig, PreprocessStep, TensorConfig
from conveyor.errors import ConfigError, InvalidInput

__all__ = ["TokenizeStep", "find_tokenizer_file"]

TEXT_EXTRA_HINT = "pip install conveyor-serve[text]"


class TokenizeStep:
    """One `kind = "tokenize"` step of a model version, with a tokenizer per instance."""

    def __init__(self, config: ModelConfig, index: int, directories: list[Path]) -> None:
        """Loads the step's tokenizer (from the first of `directories` holding it) once per instance."""
        step = config.preprocess[index]
        self.model_label = f"model '{config.name}'"
        self.where = f"{self.model_label}: preprocess[{index}]"
        self.step = step
        self.input_name = step.input
        self.input_index = [t.name for t in config.inputs].index(step.input)
        self.max_length = int(step.max_length or 0)
        self.max_bytes = int(step.max_bytes or 0)
        self.path = find_tokenizer_file(config, index, directories)
        self.tokenizers = [self._load(self.path) for _ in range(config.instance_group.count)]

    def backend_inputs(self) -> list[TensorConfig]:
        """The INT64 [batch, tokens] inputs the step hands the backend, in order."""
        dims = [self.max_length] if self.step.padding == "max_length" else [-1]
        return [TensorConfig(name=name, datatype="INT64", dims=dims) for name in self.step.produced_inputs]

    def _load(self, path: Path) -> Any:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                f"{self.where}: the tokenize step needs the 'tokenizers' package, which is not installed: "
                f"{TEXT_EXTRA_HINT}"
            ) from None
        try:
            text = path.read_text(encoding="utf-8")
            tokenizer = Tokenizer.from_str(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the tokenizer file: {exc}") from exc
        except Exception as exc:  # tokenizers raises plain Exception for a malformed file
            raise ConfigError(
                f"{path}: not a Hugging Face tokenizers file ({exc}); save one with Tokenizer.save()"
            ) from exc
        step = self.step
        if step.truncation:
            tokenizer.enable_truncation(self.max_length)
        else:
            tokenizer.no_truncation()
        # The file's own padding keeps its pad id and token; otherwise id 0, which the
        # attention mask hides from the model anyway.
        padding = tokenizer.padding or {}
        tokenizer.enable_padding(
            direction="right",
            pad_id=padding.get("pad_id", 0),
            pad_type_id=padding.get("pad_type_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
            length=self.max_length if step.padding == "max_length" else None,
        )
        return tokenizer

    def check_request(self, column: np.ndarray) -> None:
        """Raises InvalidInput for a request whose strings the step cannot encode."""
        if column.dtype != object:
            return  # not BYTES: the batcher's own datatype check answers it
        if column.size == 0:
            raise InvalidInput(f"{self.model_label}: input '{self.input_name}' holds no strings; send at least one")
        self.texts(column)

    def texts(self, column: np.ndarray) -> list[str]:
        """The column's strings decoded; InvalidInput names the first bad row."""
        items = column.reshape(-1).tolist()
        try:
            texts = [item.decode("utf-8") for item in items]
        except (AttributeError, UnicodeDecodeError):
            return self._texts_slowly(items)
        if texts and max(map(len, items)) > self.max_bytes:
            return self._texts_slowly(items)
        return texts

    def _texts_slowly(self, items: list[Any]) -> list[str]:
        texts = []
        for row, item in enumerate(items):
            where = f"{self.model_label}: input '{self.input_name}' row {row}"
            if isinstance(item, str):
                data = item.encode("utf-8", "surrogatepass")
            elif isinstance(item, (bytes, bytearray, memoryview)):
                data = bytes(item)
            else:
                raise InvalidInput(f"{where}: expected a byte string, got {type(item).__name__}")
            if len(data) > self.max_bytes:
                raise InvalidInput(
                    f"{where}: {len(data)} bytes, over the step's max_bytes = {self.max_bytes}; send shorter text "
                    "or raise max_bytes in the model's config.toml"
                )
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); send UTF-8 encoded strings"
                ) from None
        return texts

    def encode(self, column: np.ndarray, instance: int) -> list[np.ndarray]:
        """The backend inputs for one batch column: ids, attention mask[, token type ids]."""
        if column.size == 0:
            raise InvalidInput(f"{self.model_label}: input '{self.input_name}' holds no strings (an empty batch)")
        texts = self.texts(column)
        # One call for the whole batch; it releases the GIL while it encodes.
        encodings = self.tokenizers[instance].encode_batch_fast(texts)
        width = len(encodings[0].ids)
        if width > self.max_length:
            row = next(i for i, e in enumerate(encodings) if sum(e.attention_mask) > self.max_length)
            raise InvalidInput(
                f"{self.model_label}: input '{self.input_name}' row {row}: "
                f"{sum(encodings[row].attention_mask)} tokens, over max_length = {self.max_length}; send shorter "
                "text or set truncation = true in the step"
            )
        arrays = [
            np.array([e.ids for e in encodings], dtype=np.int64),
            np.array([e.attention_mask for e in encodings], dtype=np.int64),
        ]
        if self.step.token_type_ids is not None:
            arrays.append(np.array([e.type_ids for e in encodings], dtype=np.int64))
        if width == 0:  # every string empty: one padding column keeps the tensors non-empty
            pad = (self.tokenizers[instance].padding or {}).get("pad_id", 0)
            arrays = [np.full((len(texts), 1), pad if i == 0 else 0, dtype=np.int64) for i in range(len(arrays))]
        return arrays


def find_tokenizer_file(config: ModelConfig, index: int, directories: list[Path]) -> Path:
    """The step's tokenizer file: the first of `directories` (version, then model directory) holding it."""
    step: PreprocessStep = config.preprocess[index]
    name = str(step.tokenizer)
    field = f"model '{config.name}': field 'preprocess[{index}].tokenizer'"
    if not directories:
        raise ConfigError(f"{field}: {name!r} is looked up in the model's version directory; load the model from one")
    for directory in directories:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise ConfigError(f"{field}: no file {name!r} in {' or '.join(str(d) for d in directories)}")
