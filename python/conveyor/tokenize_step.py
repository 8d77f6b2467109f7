"""The tokenize preprocess step: a BYTES input of text -> INT64 token ids and masks.

`tokenizers` is a Python library (its Rust core has no C API), so this step runs in
Python on the instance thread, inside the batch, just before the backend: the whole
dynamic batch is encoded with one `encode_batch` call (`encode_batch_fast` where the
installed version has it), which releases the GIL while Rust works. A tokenizer
object is borrowed mutably for the length of a call, so sharing one between instance
threads fails ("Already borrowed"): each instance gets its own, configured once at load
(truncation) and never changed after; the step pads the int64 arrays itself.

Strings are checked per request before they are queued (`check_request`), so a bad
string fails its own request only, naming the input and the row in that request; the
batch checks again (rows then count from the start of the batch) for callers that
reach the batcher another way.
"""

from __future__ import annotations

import itertools
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
        self.pad_id = 0
        self.tokenizers = [self._load(self.path) for _ in range(config.instance_group.count)]
        # encode_batch_fast (tokenizers >= 0.20.1) skips the character offsets, which the
        # step never reads; encode_batch gives the same ids.
        self._encode_batch = [getattr(t, "encode_batch_fast", None) or t.encode_batch for t in self.tokenizers]

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
        if self.step.truncation:
            tokenizer.enable_truncation(self.max_length)
        else:
            tokenizer.no_truncation()
        # The step pads the arrays itself (cheaper than padded Encodings); the file's
        # padding settings only lend their pad id.
        self.pad_id = int((tokenizer.padding or {}).get("pad_id", 0))
        tokenizer.no_padding()
        return tokenizer

    def check_request(self, column: np.ndarray) -> None:
        """Raises InvalidInput for a request whose strings the step cannot encode."""
        if column.dtype != object:
            return  # not BYTES: the batcher's own datatype check answers it
        if column.size == 1:  # one string, the common request: checked without building lists
            item = column.item()
            if type(item) is bytes and len(item) <= self.max_bytes and (item.isascii() or _is_utf8(item)):
                return
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
        encodings = self._encode_batch[instance](texts)
        rows = [encoding.ids for encoding in encodings]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        longest = int(lengths.max())
        if longest > self.max_length:
            raise InvalidInput(
                f"{self.model_label}: input '{self.input_name}' row {int(lengths.argmax())}: {longest} tokens, over "
                f"max_length = {self.max_length}; send shorter text or set truncation = true in the step"
            )
        # Padded to the batch's longest row (at least one column, so a batch of empty
        # strings still makes non-empty tensors) or to max_length; the mask hides the padding.
        width = self.max_length if self.step.padding == "max_length" else max(1, longest)
        kept = np.arange(width) < lengths[:, None]
        arrays = [self._scatter(rows, kept, lengths, self.pad_id), kept.astype(np.int64)]
        if self.step.token_type_ids is not None:
            arrays.append(self._scatter([e.type_ids for e in encodings], kept, lengths, 0))
        return arrays

    @staticmethod
    def _scatter(rows: list[list[int]], kept: np.ndarray, lengths: np.ndarray, fill: int) -> np.ndarray:
        """Ragged rows written left-aligned into an INT64 [rows, width] array of `fill`."""
        values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        out = np.full(kept.shape, fill, dtype=np.int64)
        out[kept] = values
        return out


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


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
