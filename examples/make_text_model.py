#!/usr/bin/env python3
"""Build the text_classifier example, byte for byte the same on every run.

  text_classifier/1/tokenizer.json: a BPE tokenizer trained with `tokenizers`'
      BpeTrainer on sentences this script writes (no downloads): lowercasing,
      "[CLS] ... [SEP]" around each text, [PAD] = id 0. (BPE, not WordPiece: the
      WordPiece trainer breaks ties between equally frequent merges differently from
      run to run, so its vocabulary is not reproducible.)
  text_classifier/1/model.onnx: input_ids INT64 [-1, -1], attention_mask INT64 [-1, -1]
      -> Gather(embedding) -> mean over the tokens the mask keeps -> Gemm -> logits FP32 [-1, 3]
      The embedding's first three columns are each token's naive-Bayes log-probability
      under the three topics (sport, weather, food), counted on the generated sentences,
      so the classifier is right on most sentences of its topics; the rest are small
      seeded noise, as an embedding would carry.

Its config.toml (written by hand) makes the public input a BYTES string per row: the
tokenize step turns it into the two INT64 inputs inside the batch.

With --pt2, it also builds text_classifier_pt2: the same network and weights as a
PyTorch module, exported with conveyor.export_torch to a .pt2 package served by the
torch backend (its parity with eager PyTorch checked), with the same tokenizer and
labels and a config that pads every batch to 32 tokens (the package's token dim is
fixed). A compiled package is built for the machine it is made on and differs from
build to build, so it is not kept in the repository and --check leaves it out: make it
where it is served (needs torch and a C++ compiler: pip install conveyor-serve[torch]).

Usage: make_text_model.py [--check] [--pt2] [--models-dir DIR]   (needs `tokenizers`:
pip install conveyor-serve[text])
  --check  exit 1 unless the files on disk are exactly what this script builds.
  --pt2    also build text_classifier_pt2 (see above).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import MODELS_DIR, SEED, serialize  # noqa: E402

NAME = "text_classifier"
TOPICS = ("sport", "weather", "food")
TOPIC_WORDS = {
    "sport": "match goal team player score football tennis coach league striker referee stadium race runner win".split(),
    "weather": "rain snow storm sunny cloud wind forecast cold warm temperature humid fog thunder breeze frost".split(),
    "food": "pasta bread cheese soup salad recipe bake dinner sauce spicy dessert café crème brûlée noodle".split(),
}
COMMON_WORDS = "the a today was very really quite and but with after before this that we they it is".split()
SENTENCES_PER_TOPIC = 200
VOCAB_SIZE = 300
EMBEDDING_DIM = 8
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def sentences() -> list[tuple[str, int]]:
    """(sentence, topic index) pairs: topic words among common ones, seeded."""
    rng = np.random.default_rng(SEED)
    out = []
    for topic, name in enumerate(TOPICS):
        for _ in range(SENTENCES_PER_TOPIC):
            words = list(rng.choice(TOPIC_WORDS[name], size=int(rng.integers(2, 5))))
            words += list(rng.choice(COMMON_WORDS, size=int(rng.integers(2, 6))))
            rng.shuffle(words)
            out.append((" ".join(str(word) for word in words).capitalize() + ".", topic))
    return out


def build_tokenizer() -> object:
    """A BPE tokenizer trained on the generated sentences."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator([text for text, _ in sentences()], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return tokenizer


def tokenizer_bytes() -> bytes:
    return build_tokenizer().to_str(pretty=True).encode("utf-8")  # type: ignore[attr-defined]


def build_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embedding [vocab, EMBEDDING_DIM], classifier weight [EMBEDDING_DIM, topics], bias [topics])."""
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab_size()  # type: ignore[attr-defined]
    counts = np.ones((vocab, len(TOPICS)))  # add-one smoothing
    for text, topic in sentences():
        np.add.at(counts[:, topic], tokenizer.encode(text).ids, 1.0)  # type: ignore[attr-defined]
    log_probs = np.log(counts / counts.sum(axis=0, keepdims=True))
    noise = np.random.default_rng(SEED + 1).standard_normal((vocab, EMBEDDING_DIM - len(TOPICS))) * 0.01
    embedding = np.concatenate([log_probs, noise], axis=1).astype(np.float32)
    weight = np.zeros((EMBEDDING_DIM, len(TOPICS)), dtype=np.float32)
    weight[: len(TOPICS)] = np.eye(len(TOPICS), dtype=np.float32)
    return embedding, weight, np.zeros(len(TOPICS), dtype=np.float32)


def build_graph() -> object:
    """The ONNX graph, its embedding counted from the tokenized sentences."""
    embedding, weight, bias = build_weights()
    initializers = [
        numpy_helper.from_array(embedding, "embedding"),
        numpy_helper.from_array(weight, "classifier_W"),
        numpy_helper.from_array(bias, "classifier_B"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "token_axis"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["token_vectors"], axis=0, name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT, name="mask_float"),
        helper.make_node("Unsqueeze", ["mask", "last_axis"], ["mask_3d"], name="mask_3d"),
        helper.make_node("Mul", ["token_vectors", "mask_3d"], ["kept"], name="keep"),
        helper.make_node("ReduceSum", ["kept", "token_axis"], ["summed"], keepdims=0, name="sum_tokens"),
        helper.make_node("ReduceSum", ["mask", "token_axis"], ["token_count"], keepdims=1, name="count_tokens"),
        # An all-padding row divides by one, not zero.
        helper.make_node("Max", ["token_count", "one"], ["divisor"], name="at_least_one"),
        helper.make_node("Div", ["summed", "divisor"], ["mean"], name="mean"),
        helper.make_node("Gemm", ["mean", "classifier_W", "classifier_B"], ["logits"], name="classifier"),
    ]
    return helper.make_graph(
        nodes,
        NAME,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(TOPICS)])],
        initializer=initializers,
    )


def files(models_dir: Path) -> list[tuple[Path, Callable[[], bytes]]]:
    """Each file the script writes, with what builds its bytes."""
    version_dir = models_dir / NAME / "1"
    return [
        (version_dir / "tokenizer.json", tokenizer_bytes),
        (version_dir / "model.onnx", lambda: serialize(build_graph())),  # type: ignore[arg-type]
        (models_dir / NAME / "labels.txt", lambda: "".join(f"{topic}\n" for topic in TOPICS).encode()),
    ]


PT2_NAME = "text_classifier_pt2"
PT2_TOKENS = 32
PT2_CONFIG = f"""# The text_classifier example's network as a PyTorch .pt2 package (backend torch), with
# the same tokenizer, labels and answers. The package's token dim is fixed at {PT2_TOKENS}, so
# the tokenize step pads every row to {PT2_TOKENS} tokens (and truncates longer ones).
# Built by examples/make_text_model.py --pt2 on the machine that serves it.
backend = "torch"
max_batch_size = 64

[[inputs]]
name = "text"
datatype = "BYTES"
dims = [1]

[[outputs]]
name = "probs"
datatype = "FP32"
dims = [3]

[[outputs]]
name = "topic"
datatype = "BYTES"
dims = [1]

[[preprocess]]
kind = "tokenize"
input = "text"
tokenizer = "tokenizer.json"
max_length = {PT2_TOKENS}
padding = "max_length"
truncation = true
max_bytes = 4096
input_ids = "input_ids"
attention_mask = "attention_mask"

[[postprocess]]
kind = "softmax"
output = "logits"
outputs = ["probs"]

[[postprocess]]
kind = "classification"
output = "logits"
outputs = ["topic"]
k = 1
labels = "labels.txt"

[dynamic_batching]
max_queue_delay_us = 0

[instance_group]
count = 2
"""


def torch_module() -> object:
    """The ONNX graph's network as a torch.nn.Module with the same weights."""
    import torch

    embedding, weight, bias = (torch.from_numpy(array) for array in build_weights())

    class TextClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("embedding", embedding)
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.to(torch.float32)
            summed = (self.embedding[input_ids] * mask.unsqueeze(-1)).sum(dim=1)
            # An all-padding row divides by one, not zero.
            return (summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)) @ self.weight + self.bias

    return TextClassifier()


def write_pt2(models_dir: Path) -> Path:
    """Builds models_dir/text_classifier_pt2 (replacing it); returns its directory."""
    import shutil
    import tempfile

    import conveyor

    vocab = build_tokenizer().get_vocab_size()  # type: ignore[attr-defined]
    model_dir = models_dir / PT2_NAME
    with tempfile.TemporaryDirectory() as scratch:
        # Exported bare (two INT64 inputs) for the parity check, then given the text config.
        result = conveyor.export_torch(
            torch_module(), example_inputs=[f"8x{PT2_TOKENS}:int64:0:{vocab}", f"8x{PT2_TOKENS}:int64:0:2"],
            repository=scratch, name=PT2_NAME, max_batch_size=64,
        )  # fmt: skip
        shutil.rmtree(model_dir, ignore_errors=True)
        (model_dir / "1").mkdir(parents=True)
        shutil.move(result.version_dir / "model.pt2", model_dir / "1" / "model.pt2")
    (model_dir / "1" / "tokenizer.json").write_bytes(tokenizer_bytes())
    (model_dir / "labels.txt").write_text("".join(f"{topic}\n" for topic in TOPICS))
    parameters = f"\n[parameters]\nexport_max_abs_difference = {result.max_abs_difference!r}\n"
    (model_dir / "config.toml").write_text(PT2_CONFIG + parameters)
    print(f"{model_dir}: exported to .pt2, max |difference| from eager PyTorch {result.max_abs_difference:.3g}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify the files on disk instead of writing them")
    parser.add_argument("--pt2", action="store_true",
                        help=f"also build {PT2_NAME}, the same network as a .pt2 package (needs torch)")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="the example model repository")
    args = parser.parse_args(argv)
    stale = []
    for path, build in files(args.models_dir):
        data = build()
        digest = hashlib.sha256(data).hexdigest()
        if args.check:
            on_disk = path.read_bytes() if path.is_file() else None
            if on_disk != data:
                stale.append(str(path))
            print(f"{path}: {'ok' if on_disk == data else 'DIFFERS from the build'} sha256={digest}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{path}: {len(data)} bytes sha256={digest}")
    if stale:
        print(f"stale: {', '.join(stale)}; run examples/make_text_model.py to rebuild", file=sys.stderr)
        return 1
    if args.pt2 and not args.check:
        write_pt2(args.models_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
