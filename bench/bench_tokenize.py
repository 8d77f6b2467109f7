"""The tokenize step against a Python model that tokenizes its rows itself.

    PYTHONPATH=python python -m pytest bench/bench_tokenize.py --benchmark-enable

Both serve the example text_classifier (examples/models/text_classifier) through the
Runtime at 64 concurrent callers, one string per request, with the same batching,
instance count (1, then 2), softmax step and public output (probs; the example's "topic"
label strings are left out, as the baseline makes none):
- candidate: the config's tokenize step (one `encode_batch_fast` per batch, GIL released
  while it encodes, ids written into the batch's int64 arrays), then backend "onnx";
- baseline: backend "python", whose model calls `tokenizer.encode` per row, pads the
  ids with numpy and runs the same model.onnx in an onnxruntime session of its own.
The encoding is the same work on both sides (some 20 us a string here); what differs is
that encode_batch runs without the GIL, so two instances encode on two cores at once,
where per-row encode calls contend for the GIL. The ratios are printed at the end;
nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import pytest

import conveyor

pytest.importorskip("tokenizers")

REQUESTS = 4096
CALLERS = 64
INSTANCES = [1, 2]
EXAMPLE = conveyor.example_repository() / "text_classifier"

# The baseline: what a user writes without the step (same tokenizer, same graph).
PER_ROW_MODEL = '''
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


class Model:
    def initialize(self, config):
        self.tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
        self.tokenizer.enable_truncation(128)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(HERE / "text_classifier.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def execute(self, inputs):
        rows = [self.tokenizer.encode(item.decode("utf-8")).ids for item in inputs["text"].reshape(-1)]
        width = max(1, max(len(ids) for ids in rows))
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return {"logits": logits}
'''

BASELINE_CONFIG = """
backend = "python"
max_batch_size = 64
[[inputs]]
name = "text"
datatype = "BYTES"
dims = [1]
[[outputs]]
name = "probs"
datatype = "FP32"
dims = [3]
[[postprocess]]
kind = "softmax"
output = "logits"
outputs = ["probs"]
[dynamic_batching]
max_queue_delay_us = 0
[instance_group]
count = {count}
"""


def comparison(instances: int) -> str:
    return f"text_classifier: {REQUESTS} one-string requests, {CALLERS} callers, {instances} instance(s)"


@pytest.fixture(scope="module")
def texts() -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from make_text_model import sentences

    import numpy as np

    out = []
    for text, _ in sentences():
        array = np.empty((1, 1), dtype=object)
        array[0, 0] = text.encode("utf-8")
        out.append(array)
    return out


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """(side, instances) -> a repository holding that side's model."""
    out = {}
    for count in INSTANCES:
        root = tmp_path_factory.mktemp(f"step_{count}")
        shutil.copytree(EXAMPLE, root / "text_classifier")
        config = root / "text_classifier" / "config.toml"
        text = re.sub(r"(?m)^count = \d+$", f"count = {count}", config.read_text())
        # The same public outputs as the baseline: probs only (no "topic" label strings).
        text = re.sub(r'(?ms)^\[\[outputs\]\]\nname = "topic".*?(?=^\[)', "", text)
        text = re.sub(r'(?ms)^\[\[postprocess\]\]\nkind = "classification".*?(?=^\[)', "", text)
        config.write_text(text)
        out[("step", count)] = root
        root = tmp_path_factory.mktemp(f"per_row_{count}")
        version = root / "text_per_row" / "1"
        version.mkdir(parents=True)
        (root / "text_per_row" / "config.toml").write_text(BASELINE_CONFIG.format(count=count))
        (version / "model.py").write_text(PER_ROW_MODEL)
        shutil.copy(EXAMPLE / "1" / "tokenizer.json", version / "tokenizer.json")
        shutil.copy(EXAMPLE / "1" / "model.onnx", version / "text_classifier.onnx")
        out[("per_row", count)] = root
    return out


def _serve(benchmark, loop, repository: Path, model: str, texts: list, instances: int) -> None:
    with conveyor.Runtime.from_repository(repository, models=[model]) as runtime:
        handle = runtime.model(model)
        assert handle.config.instance_group.count == instances

        async def run() -> None:
            async def caller(k: int) -> None:
                for i in range(REQUESTS // CALLERS):
                    await runtime.infer_async(handle, {"text": texts[(k * 31 + i) % len(texts)]})

            await asyncio.gather(*(caller(k) for k in range(CALLERS)))

        benchmark.group = comparison(instances)
        benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=5, warmup_rounds=1)
        mean_batch = runtime.model_stats(model)["mean_batch_size"]
    benchmark.extra_info["mean_batch_size"] = mean_batch
    print(f"\n{model}, {instances} instance(s), {CALLERS} callers: mean batch {mean_batch:.1f}")


@pytest.mark.parametrize("instances", INSTANCES)
def test_tokenize_step(benchmark, ratio_report, loop, texts, repositories, instances) -> None:
    _serve(benchmark, loop, repositories[("step", instances)], "text_classifier", texts, instances)
    ratio_report.candidate(comparison(instances), benchmark, label="tokenize step", goal_speedup=2.0)


@pytest.mark.parametrize("instances", INSTANCES)
def test_python_model_tokenizing_per_row(benchmark, ratio_report, loop, texts, repositories, instances) -> None:
    _serve(benchmark, loop, repositories[("per_row", instances)], "text_per_row", texts, instances)
    ratio_report.baseline(comparison(instances), benchmark, label="python model, encode per row")
