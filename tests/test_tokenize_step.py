"""The tokenize preprocess step: ids and masks as tokenizers makes them, errors per request."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from conveyor.config import parse_model_config  # noqa: E402
from conveyor.errors import ConfigError, InvalidInput  # noqa: E402
from conveyor.runtime import Runtime  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "models" / "text_classifier"
TOKENIZER_FILE = EXAMPLE / "1" / "tokenizer.json"
TEXTS = [
    "The match ended with a late goal",
    "",
    "Crème brûlée, café and naïve snow ☃ — 日本語のテキスト",
    "rain " * 60,  # 120+ tokens: truncated at small max_length
    "emoji 🙂🙃 and tabs\tand\nnew lines",
    "x",
]

# A python model that returns what the step hands it, so the test sees the batch tensors.
ECHO_MODEL = """
class Model:
    def execute(self, inputs):
        return {"ids": inputs["input_ids"], "mask": inputs["attention_mask"], "types": inputs["token_type_ids"]}
"""


def echo_config(**step: object) -> str:
    options = "\n".join(f"{key} = {value!r}".replace("True", "true").replace("False", "false") for key, value in step.items())
    return f"""
backend = "python"
max_batch_size = 64
[[inputs]]
name = "text"
datatype = "BYTES"
dims = [1]
[[outputs]]
name = "ids"
datatype = "INT64"
dims = [-1]
[[outputs]]
name = "mask"
datatype = "INT64"
dims = [-1]
[[outputs]]
name = "types"
datatype = "INT64"
dims = [-1]
[[preprocess]]
kind = "tokenize"
input = "text"
token_type_ids = "token_type_ids"
{options}
[instance_group]
count = 2
"""


def write_echo_model(root: Path, name: str = "echo", **step: object) -> Path:
    version = root / name / "1"
    version.mkdir(parents=True)
    (root / name / "config.toml").write_text(echo_config(**step))
    (version / "model.py").write_text(ECHO_MODEL)
    shutil.copy(TOKENIZER_FILE, version / "tokenizer.json")
    return root


def column(texts: list[str] | list[bytes]) -> np.ndarray:
    array = np.empty((len(texts), 1), dtype=object)
    array[:, 0] = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
    return array


def reference(max_length: int, truncation: bool) -> object:
    tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER_FILE))
    if truncation:
        tokenizer.enable_truncation(max_length)
    return tokenizer


@pytest.mark.parametrize("padding", ["longest", "max_length"])
@pytest.mark.parametrize("truncation, max_length", [(True, 8), (True, 200), (False, 200)])
def test_ids_and_masks_are_what_tokenizers_makes(tmp_path: Path, padding: str, truncation: bool, max_length: int) -> None:
    repository = write_echo_model(tmp_path, padding=padding, truncation=truncation, max_length=max_length)
    with Runtime.from_repository(repository, models=["echo"]) as runtime:
        result = runtime.infer("echo", {"text": column(TEXTS)})
    expected = [reference(max_length, truncation).encode(text) for text in TEXTS]  # type: ignore[attr-defined]
    width = max_length if padding == "max_length" else max(1, max(len(e.ids) for e in expected))
    for name in ("ids", "mask", "types"):
        assert result[name].dtype == np.int64 and result[name].shape == (len(TEXTS), width)
    for row, encoding in enumerate(expected):
        count = len(encoding.ids)
        assert count <= max_length
        assert result["ids"][row, :count].tolist() == encoding.ids, row
        assert result["types"][row, :count].tolist() == encoding.type_ids, row
        assert result["mask"][row].tolist() == [1] * count + [0] * (width - count), row
        assert result["ids"][row, count:].tolist() == [0] * (width - count), row  # [PAD] is id 0
    assert len(expected[3].ids) == min(62, max_length)  # [CLS] + 60 words + [SEP], or truncated


def test_a_batch_of_empty_strings_gets_one_padding_column(tmp_path: Path) -> None:
    tokenizer_json = TOKENIZER_FILE.read_text()
    bare = tokenizers.Tokenizer.from_str(tokenizer_json)
    assert bare.encode("").ids == [2, 3]  # [CLS] [SEP]: the example never yields an empty row
    bare.post_processor = tokenizers.processors.TemplateProcessing(single="$A")
    repository = write_echo_model(tmp_path)
    (repository / "echo" / "1" / "tokenizer.json").write_text(bare.to_str())
    with Runtime.from_repository(repository, models=["echo"]) as runtime:
        result = runtime.infer("echo", {"text": column(["", ""])})
    assert result["ids"].tolist() == [[0], [0]] and result["mask"].tolist() == [[0], [0]]


def test_a_row_over_max_length_without_truncation_is_refused(tmp_path: Path) -> None:
    repository = write_echo_model(tmp_path, truncation=False, max_length=16)
    with Runtime.from_repository(repository, models=["echo"]) as runtime:
        with pytest.raises(InvalidInput, match=r"input 'text' row 1: \d+ tokens, over max_length = 16"):
            runtime.infer("echo", {"text": column(["short", "rain " * 20])})
        assert runtime.infer("echo", {"text": column(["short"])})["ids"].shape[0] == 1


BAD_REQUESTS = [
    (column([b"fine", b"\xff\xfe broken"]), r"input 'text' row 1: not UTF-8 text \(invalid start byte at byte 0\)"),
    (column([b"a" * 4097]), r"input 'text' row 0: 4097 bytes, over the step's max_bytes = 4096"),
    (column([b"caf\xc3"]), r"input 'text' row 0: not UTF-8 text \(unexpected end of data at byte 3\)"),
    (np.empty((0, 1), dtype=object), r"input 'text' holds no strings"),
    (np.array([[b"ok"], [7]], dtype=object), r"input 'text' row 1: expected a byte string, got int"),
]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_a_bad_string_fails_its_request_and_the_model_goes_on(bad: np.ndarray, message: str) -> None:
    with Runtime.from_repository(EXAMPLE.parent, models=["text_classifier"]) as runtime:
        with pytest.raises(InvalidInput, match=message):
            runtime.infer("text_classifier", {"text": bad})
        probs = runtime.infer("text_classifier", {"text": column(["sunny and warm"])})["probs"]
        assert probs.shape == (1, 3) and int(probs.argmax()) == 1  # weather


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_a_bad_string_among_async_callers_fails_only_its_own_request(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    """Requests submitted in one loop turn form one batch: a request the step cannot encode
    is refused when it is submitted, not in the batch, where it would fail the others."""
    write_echo_model(tmp_path, max_bytes=4096)
    good = [column([text]) for text in ("sunny", "rain " * 3, "goal")]

    async def callers(runtime: Runtime) -> list:
        requests = [runtime.infer_async("echo", {"text": array}) for array in good[:2] + [bad] + good[2:]]
        return await asyncio.gather(*requests, return_exceptions=True)

    with Runtime.from_repository(tmp_path, models=["echo"]) as runtime:
        answers = asyncio.run(callers(runtime))
        assert isinstance(answers[2], InvalidInput) and re.search(message, str(answers[2]))
        for answer, array in zip(answers[:2] + answers[3:], good):
            assert answer["ids"].shape[0] == 1, answer
            assert answer["ids"][0, : int(answer["mask"].sum())].tolist() == reference(64, False).encode(array[0, 0].decode()).ids
        assert runtime.model_stats("echo")["failed"] == 0


def test_the_example_classifies_and_answers_each_thread_its_own_rows() -> None:
    texts = ["The striker scored a goal", "Storm and snow in the forecast", "Pasta with cheese sauce", "crème brûlée"]
    topics = [0, 1, 2, 2]
    with Runtime.from_repository(EXAMPLE.parent, models=["text_classifier"]) as runtime:
        alone = [runtime.infer("text_classifier", {"text": column([text])}) for text in texts]
        assert [int(result["probs"].argmax()) for result in alone] == topics
        assert alone[0]["topic"][0, 0].decode().endswith(":0:sport")
        answers: dict[tuple[int, int], np.ndarray] = {}
        lock = threading.Lock()

        def client(thread: int) -> None:
            for i in range(40):
                index = (thread + i) % len(texts)
                probs = runtime.infer("text_classifier", {"text": column([texts[index]])})["probs"]
                with lock:
                    answers[(thread, i)] = probs

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(answers) == 16 * 40
        for (thread, i), probs in answers.items():
            np.testing.assert_allclose(probs, alone[(thread + i) % len(texts)]["probs"], rtol=1e-5, atol=1e-6)
        stats = runtime.model_stats("text_classifier")
        assert stats["succeeded"] == 16 * 40 + len(texts) and stats["failed"] == 0


def test_over_http_with_tritonclient(tmp_path: Path) -> None:
    triton_http = pytest.importorskip("tritonclient.http")
    from conveyor.server.serve import ServeOptions
    from server_thread import ServerThread

    options = ServeOptions(repository=EXAMPLE.parent, http_port=0, grpc_port=0, model_control_mode="explicit",
                           load_models=["text_classifier"], data_dir=tmp_path / "data")  # fmt: skip
    served = ServerThread(options)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.port}")
    try:
        metadata = client.get_model_metadata("text_classifier")
        assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [("text", "BYTES", [-1, 1])]

        def infer(texts: np.ndarray, binary: bool = True) -> object:
            tensor = triton_http.InferInput("text", list(texts.shape), "BYTES")
            tensor.set_data_from_numpy(texts, binary_data=binary)
            return client.infer("text_classifier", [tensor])

        result = infer(column(["Rain and a cold wind", "The team won the league"]))
        assert result.as_numpy("probs").argmax(axis=1).tolist() == [1, 0]
        assert infer(column(["spicy noodle soup"]), binary=False).as_numpy("probs").argmax() == 2
        for bad, message in [
            (column([b"ok", b"ok", b"\xc3\x28"]), "input 'text' row 2: not UTF-8 text"),
            (column([b"b" * 5000]), "input 'text' row 0: 5000 bytes, over the step's max_bytes = 4096"),
        ]:
            with pytest.raises(triton_http.InferenceServerException) as caught:
                infer(bad)
            assert caught.value.status() == "400" and message in caught.value.message()
        assert infer(column(["football match"])).as_numpy("probs").argmax() == 0
    finally:
        client.close()
        served.stop()


def tokenize_config(**step: object) -> dict:
    return {
        "backend": "onnx",
        "max_batch_size": 8,
        "inputs": [{"name": "text", "datatype": "BYTES", "dims": [1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "dims": [3]}],
        "preprocess": [{"kind": "tokenize", "input": "text", **step}],
    }


@pytest.mark.parametrize(
    "step, config, message",
    [
        ({"padding": "left"}, {}, r"field 'preprocess\[0\]\.padding': expected 'longest' or 'max_length', got 'left'"),
        ({"mean": [0.5]}, {}, r"field 'preprocess\[0\]\.mean': expected no mean \(a tokenize step does not use it\)"),
        ({"max_bytes": 0}, {}, r"field 'preprocess\[0\]\.max_bytes': expected an integer >= 1, got 0"),
        ({"attention_mask": "input_ids"}, {}, r"field 'preprocess\[0\]\.attention_mask': expected a name no other"),
        ({}, {"max_batch_size": 0}, r"field 'max_batch_size': expected max_batch_size >= 1"),
        ({}, {"inputs": [{"name": "text", "datatype": "FP32", "dims": [1]}]},
         r"field 'preprocess\[0\]\.input': expected input 'text' to be BYTES \[1\] \(one string per row\), got FP32"),
        ({"input_ids": "text"}, {}, r"field 'preprocess\[0\]\.input_ids': expected a name no other tensor"),
        ({}, {"inputs": [{"name": "text", "datatype": "BYTES", "dims": [1]}, {"name": "input_ids", "datatype": "INT64", "dims": [-1]}]},
         r"field 'preprocess\[0\]\.input_ids': expected a name no public input and no other step uses"),
        ({}, {"inputs": [{"name": "text", "datatype": "BYTES", "dims": [1]}, {"name": "title", "datatype": "BYTES", "dims": [1]}],
              "preprocess": [{"kind": "tokenize", "input": "text"}, {"kind": "tokenize", "input": "title"}]},
         r"field 'preprocess\[1\]\.input_ids': expected a name no public input and no other step uses"),
    ],
)
def test_config_errors_name_the_field(step: dict, config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_model_config({**tokenize_config(**step), **config}, source="config.toml", name="m")


def copy_example(tmp_path: Path, **step: object) -> Path:
    target = tmp_path / "text_classifier"
    shutil.copytree(EXAMPLE, target)
    config = (target / "config.toml").read_text()
    for key, value in step.items():
        config = config.replace(f'{key} = "{key}"', f"{key} = {value!r}".replace("'", '"'))
    (target / "config.toml").write_text(config)
    return tmp_path


def test_loading_fails_on_a_produced_name_the_model_does_not_take(tmp_path: Path) -> None:
    repository = copy_example(tmp_path, input_ids="token_ids")
    with pytest.raises(ConfigError, match=r"field 'preprocess\[0\]\.input_ids': expected one of the model's inputs "
                                          r"\(input_ids, attention_mask\), got 'token_ids'"):
        Runtime.from_repository(repository, models=["text_classifier"])


def test_loading_fails_on_a_missing_or_corrupt_tokenizer_file(tmp_path: Path) -> None:
    repository = copy_example(tmp_path)
    tokenizer = repository / "text_classifier" / "1" / "tokenizer.json"
    tokenizer.write_text('{"model": "not a tokenizer"}')
    with pytest.raises(ConfigError, match=rf"{tokenizer}: not a Hugging Face tokenizers file"):
        Runtime.from_repository(repository, models=["text_classifier"])
    tokenizer.unlink()
    with pytest.raises(ConfigError, match=r"field 'preprocess\[0\]\.tokenizer': no file 'tokenizer.json' in "):
        Runtime.from_repository(repository, models=["text_classifier"])
    shutil.copy(TOKENIZER_FILE, repository / "text_classifier" / "tokenizer.json")  # the model directory's
    with Runtime.from_repository(repository, models=["text_classifier"]) as runtime:
        assert runtime.infer("text_classifier", {"text": column(["snow"])})["probs"].argmax() == 1


def test_loading_without_tokenizers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"needs the 'tokenizers' package.*pip install conveyor-serve\[text\]"):
        Runtime.from_repository(EXAMPLE.parent, models=["text_classifier"])


def test_the_config_dumps_back_unchanged() -> None:
    from conveyor.config import load_model_config

    config = load_model_config(EXAMPLE / "config.toml")
    assert parse_model_config(config.to_dict(), source="dump", name="text_classifier") == config
    assert "mean" not in config.to_dict()["preprocess"][0]
