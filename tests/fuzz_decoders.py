"""Coverage-guided fuzzing of the inference request decoders and the C++ core behind them.

    python tests/fuzz_decoders.py CORPUS_DIR [libFuzzer flags, e.g. -runs=20000 -seed=1]

Each input is one request as a front end receives it, taken the whole way a server
takes it: decoded (HTTP JSON, HTTP JSON + binary tensors, HTTP raw binary, or a gRPC
ModelInferRequest), handed to the data plane, whose arrays cross into the compiled core
(Batcher.submit borrows them, the batch is gathered, a Python, BYTES or native-kernel
model runs it), and the response encoded for the wire. An input is laid out as

    byte 0          the front end (byte % 4: JSON, binary, raw, gRPC) and the model
                    ((byte // 4) % 3: echo, mixed, mlp; a gRPC message names its own)
    bytes 1-4       binary form only: Inference-Header-Content-Length, int32 little-endian
    the rest        the request body (HTTP) or the serialized message (gRPC)

A request may fail only as a client's fault: InvalidInput, ModelNotFound or
DeadlineExceeded, whose error body must encode too. Any other exception is a finding
(the server would answer 500), and so is a sanitizer report when conveyor._core is the
AddressSanitizer build (tests/test_fuzz_decoders.py runs it so). CORPUS_DIR is filled
with seed requests (valid ones of each form and model) when it is empty.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import tempfile
import textwrap
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["conveyor"]):
    import conveyor
    import conveyor._core
    from conveyor.errors import DeadlineExceeded, InvalidInput, ModelNotFound
    from conveyor.protocol.grpc import codec
    from conveyor.protocol.grpc import inference_pb2 as pb
    from conveyor.protocol.http_codec import decode_infer_request, encode_infer_response
    from conveyor.protocol.model_config import input_specs
    from conveyor.repository import ModelRepository
    from conveyor.server.dataplane import DataPlane
    from conveyor.server.http_connection import HttpLimits
    from conveyor.server.models import ModelManager
    from conveyor.server.responses import error_response
    from google.protobuf.message import DecodeError

from echo_model import write_echo_model

EXAMPLE_MLP = conveyor.example_repository() / "mlp" / "1" / "model.onnx"
FORMS = ("json", "binary", "raw", "grpc")
MODELS = ("echo", "mixed", "mlp")
# Errors that are the client's fault (4xx, or 504 for the client's own timeout).
CLIENT_ERRORS = (InvalidInput, ModelNotFound, DeadlineExceeded)
MAX_BATCH = 8  # the echo model's

# One input of each element size and kind the core converts, with variable dimensions;
# the model returns each as an output.
MIXED_TENSORS = {
    "i8": ("INT8", [-1]),
    "h": ("FP16", [2]),
    "u16": ("UINT16", [2]),
    "flag": ("BOOL", [1]),
    "u64": ("UINT64", [1]),
    "words": ("BYTES", [-1]),
}
MIXED_MODEL = """\
    class Model:
        def execute(self, inputs):
            return {"out_" + name: array for name, array in inputs.items()}
"""
MLP_CONFIG = f"""\
    backend = "native"
    max_batch_size = {MAX_BATCH}
    [native]
    threads = 1
"""


def _mixed_config() -> str:
    sections = [f"backend = \"python\"\nmax_batch_size = {MAX_BATCH}\n"]
    for kind, prefix in (("inputs", ""), ("outputs", "out_")):
        for name, (datatype, dims) in MIXED_TENSORS.items():
            sections.append(f'[[{kind}]]\nname = "{prefix}{name}"\ndatatype = "{datatype}"\ndims = {dims}\n')
    return "\n".join(sections)


def write_repository(root: Path) -> Path:
    """The three models the fuzzer sends requests to, as a model repository under `root`."""
    write_echo_model(root)
    for name, config, model_text in (("mixed", _mixed_config(), MIXED_MODEL), ("mlp", MLP_CONFIG, None)):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.toml").write_text(textwrap.dedent(config))
        if model_text is None:
            (root / name / "1" / "model.onnx").write_bytes(EXAMPLE_MLP.read_bytes())
        else:
            (root / name / "1" / "model.py").write_text(textwrap.dedent(model_text))
    return root


# -- seed requests ---------------------------------------------------------------------


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _seed_tensors(model: str) -> list[tuple[str, str, list[int], np.ndarray]]:
    """Valid inputs for `model`: (name, datatype, shape, array) with a batch of 2 rows."""
    if model == "echo":
        return [("text", "BYTES", [2, 1], np.array([[b"hello"], [b"\xc3\xa9t\xc3\xa9"]], dtype=object))]
    if model == "mlp":
        return [("x", "FP32", [2, 64], np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64))]
    arrays = {
        "i8": np.array([[1, -2, 3], [4, 5, -6]], dtype=np.int8),
        "h": np.array([[0.5, -1.5], [2.0, 65504.0]], dtype=np.float16),
        "u16": np.array([[0x3F80, 0xC000], [0x0000, 0xFFFF]], dtype=np.uint16),
        "flag": np.array([[True], [False]]),
        "u64": np.array([[2**64 - 1], [7]], dtype=np.uint64),
        "words": np.array([[b"a", b"bc"], [b"", b"def"]], dtype=object),
    }
    return [(name, datatype, list(arrays[name].shape), arrays[name]) for name, (datatype, _) in MIXED_TENSORS.items()]


def _raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    return _bytes_tensor(list(array.ravel())) if datatype == "BYTES" else array.tobytes()


def _json_request(model: str, *, binary: bool) -> tuple[bytes, int | None]:
    """A JSON request for `model`; `binary`: every tensor after the JSON header."""
    inputs, payload = [], b""
    for name, datatype, shape, array in _seed_tensors(model):
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            data = _raw_bytes(datatype, array)
            entry["parameters"] = {"binary_data_size": len(data)}
            payload += data
        else:
            entry["data"] = [item.decode() for item in array.ravel()] if datatype == "BYTES" else array.ravel().tolist()
        inputs.append(entry)
    document = {"id": f"seed-{model}", "inputs": inputs, "parameters": {"binary_data_output": binary}}
    if model == "mlp":
        document["outputs"] = [{"name": "probs", "parameters": {"classification": 3, "binary_data": not binary}}]
    if model == "echo":
        document["parameters"].update(priority=1, timeout=10_000_000)
    header = json.dumps(document).encode()
    return header + payload, (len(header) if payload else None)


def _grpc_request(model: str, *, raw: bool) -> bytes:
    message = pb.ModelInferRequest(model_name=model, id=f"seed-{model}")
    for name, datatype, shape, array in _seed_tensors(model):
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            message.raw_input_contents.append(_raw_bytes(datatype, array))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(array.ravel())
        elif datatype == "FP32":
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            return b""  # FP16 travels raw only
    if model == "mlp":
        message.outputs.add(name="probs").parameters["classification"].int64_param = 2
    return message.SerializeToString()


def seed_inputs() -> list[bytes]:
    """Valid requests of every form for every model that accepts that form."""
    seeds = []
    for model_index, model in enumerate(MODELS):
        for form_index, form in enumerate(FORMS):
            selector = bytes([model_index * len(FORMS) + form_index])
            if form == "json":
                body, _ = _json_request(model, binary=False)
                seeds.append(selector + body)
            elif form == "binary":
                body, header_length = _json_request(model, binary=True)
                seeds.append(selector + struct.pack("<i", header_length or 0) + body)
            elif form == "raw" and model != "mixed":  # raw needs a model with one input
                _, datatype, _, array = _seed_tensors(model)[0]
                seeds.append(selector + (array[0, 0] if datatype == "BYTES" else array[:1].tobytes()))
            elif form == "grpc":
                seeds += [selector + message for message in (_grpc_request(model, raw=True),
                                                              _grpc_request(model, raw=False)) if message]
    return seeds


def write_seeds(corpus: Path) -> None:
    """Fill an empty (or missing) corpus directory with the seed requests."""
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for index, seed in enumerate(seed_inputs()):
        (corpus / f"seed-{index:02d}").write_bytes(seed)


# -- the target ------------------------------------------------------------------------


class Target:
    """A data plane over the fuzzing models, driven one request at a time on one event loop."""

    def __init__(self, root: Path) -> None:
        self.runtime = conveyor.Runtime(data_dir=root / "data")
        self.manager = ModelManager(ModelRepository(write_repository(root / "models")), self.runtime, "explicit")
        self.manager.start(list(MODELS))
        missing = set(MODELS) - set(self.runtime.models())
        if missing:
            raise RuntimeError(f"fuzzing models failed to load: {sorted(missing)} (see the log above)")
        self.dataplane = DataPlane(self.manager, server_version="fuzz")
        self.loop = asyncio.new_event_loop()

    def http(self, model: str, header_length: int | None, body: bytes) -> None:
        """What HttpApp._infer does with a body, then the response body written out."""
        handle = self.dataplane.handle(model, "")
        request = decode_infer_request(
            body, header_length, model_name=model, model_version="",
            input_specs=input_specs(handle.config) if header_length == 0 else None,
            max_batch_size=handle.config.max_batch_size, max_json_depth=HttpLimits.max_json_depth,
        )  # fmt: skip
        response = self.loop.run_until_complete(self.dataplane.infer(request))
        parts, _ = encode_infer_response(response)
        b"".join(parts)

    def grpc(self, message: bytes) -> None:
        """What the gRPC server's ModelInfer does with a message, then the response serialized."""
        try:
            request = pb.ModelInferRequest.FromString(message)
        except DecodeError:
            return  # grpc refuses the message before the server sees it
        response = self.loop.run_until_complete(self.dataplane.infer(codec.infer_request_from_proto(request)))
        codec.infer_response_to_proto(response).SerializeToString()

    def one_input(self, data: bytes, client_errors: tuple[type[Exception], ...] = CLIENT_ERRORS) -> None:
        """Run one fuzz input; raises for a finding (and for any error not in `client_errors`)."""
        provider = atheris.FuzzedDataProvider(data)
        selector = provider.ConsumeBytes(1)[0] if data else 0
        form, model = FORMS[selector % len(FORMS)], MODELS[(selector // len(FORMS)) % len(MODELS)]
        header_length = {"json": None, "raw": 0}.get(form)
        if form == "binary":
            header_length = provider.ConsumeInt(4)
        body = provider.ConsumeBytes(provider.remaining_bytes())
        try:
            if form == "grpc":
                self.grpc(body)
            else:
                self.http(model, header_length, body)
        except client_errors as exc:
            error_response(exc)  # the error answer must be writable too: an exception here is a finding


def check_seeds(target: Target) -> None:
    """Every seed must still be served without error: a seed the protocol has outgrown
    would leave the fuzzer mutating requests that never reach the core."""
    for index, seed in enumerate(seed_inputs()):
        try:
            target.one_input(seed, client_errors=())
        except Exception as exc:
            raise RuntimeError(f"seed {index} is no longer a request the server answers: {exc!r}") from exc


def main() -> None:
    """Fuzz until libFuzzer's flags say stop; the first argument is the corpus directory."""
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    write_seeds(Path(sys.argv[1]))
    print(f"conveyor._core from {Path(conveyor._core.__file__).parent.parent}", file=sys.stderr)
    # libFuzzer ends the process without Python's exit handlers: the repository goes as
    # soon as its models are loaded (none of them reads its files later).
    with tempfile.TemporaryDirectory(prefix="fuzz-decoders-") as scratch:
        target = Target(Path(scratch))
    check_seeds(target)
    atheris.Setup(sys.argv, target.one_input, internal_libfuzzer=True)
    atheris.Fuzz()  # exits the process


if __name__ == "__main__":
    main()
