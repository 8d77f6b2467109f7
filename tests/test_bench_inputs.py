"""Bench inputs: samples from a signature or a file, reference outputs and the accuracy check, model clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conveyor.profile.inputs import (
    GrpcClient,
    HttpClient,
    InProcessClient,
    InputError,
    ModelSignature,
    TargetUnreachable,
    TensorSpec,
    check_accuracy,
    generate_samples,
    read_reference,
    read_samples,
    write_reference,
)
from conveyor.runtime import Runtime
from conveyor.server.serve import ServeOptions
from processes import free_port
from server_thread import ServerThread

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"


def signature(*inputs: TensorSpec, batch: int = 8) -> ModelSignature:
    return ModelSignature("m", 1, batch, inputs, (TensorSpec("y", "FP32", (3,)),))


MLP = signature(TensorSpec("x", "FP32", (4,)))
TWO = signature(TensorSpec("ids", "INT64", (-1,)), TensorSpec("mask", "BOOL", (-1,)))


def test_generated_samples_follow_the_signature_and_the_seed() -> None:
    samples = generate_samples(TWO, 3, seed=5, variable_dim=6)
    assert len(samples) == 3 and samples[0]["ids"].shape == (1, 6) and samples[0]["ids"].dtype == np.int64
    assert samples[0]["mask"].dtype == np.bool_ and 0 <= samples[0]["ids"].min() and samples[0]["ids"].max() < 16
    again = generate_samples(TWO, 3, seed=5, variable_dim=6)
    assert all(np.array_equal(a["ids"], b["ids"]) for a, b in zip(samples, again))
    assert not np.array_equal(generate_samples(TWO, 1, seed=6, variable_dim=6)[0]["ids"], samples[0]["ids"])
    unbatched = generate_samples(signature(TensorSpec("img", "UINT8", (2, 2)), batch=0), 1, seed=1)[0]["img"]
    assert unbatched.shape == (2, 2) and unbatched.dtype == np.uint8
    text = generate_samples(signature(TensorSpec("t", "BYTES", (2,))), 1, seed=1)[0]["t"]
    assert text.shape == (1, 2) and isinstance(text[0, 0], bytes) and len(text[0, 0]) == 8
    with pytest.raises(InputError, match="input 'b' is BF16, which numpy cannot generate: pass --inputs"):
        generate_samples(signature(TensorSpec("b", "BF16", (2,))), 1, seed=1)


def test_npy_and_npz_rows_become_requests(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.float64).reshape(3, 4))
    samples = read_samples(tmp_path / "x.npy", MLP)
    assert len(samples) == 3 and samples[1]["x"].shape == (1, 4) and samples[1]["x"].dtype == np.float32
    np.testing.assert_array_equal(samples[1]["x"][0], [4, 5, 6, 7])
    np.savez(tmp_path / "two.npz", ids=np.ones((2, 5), np.int32), mask=np.ones((2, 5), bool))
    two = read_samples(tmp_path / "two.npz", TWO)
    assert two[0]["ids"].dtype == np.int64 and two[0]["mask"].shape == (1, 5)


@pytest.mark.parametrize(
    ("make", "model", "message"),
    [
        (lambda p: np.save(p / "a.npy", np.ones((2, 5), np.float32)), MLP,
         r"row 0: input 'x' has shape \[5\], but the model expects \[4\] per sample \(FP32"),
        (lambda p: np.save(p / "a.npy", np.array([["a"] * 4])), MLP, r"input 'x' holds <U1 values, but the model expects FP32"),
        (lambda p: np.save(p / "a.npy", np.ones((2, 4))), TWO, r"a .npy file holds one array, but model 'm' has inputs"),
        (lambda p: np.savez(p / "a.npz", idz=np.ones((2, 3))), TWO, r"holds \['idz'\], but model 'm' takes inputs \['ids', 'mask'\]"),
        (lambda p: np.savez(p / "a.npz", ids=np.ones((2, 3)), mask=np.ones((3, 3), bool)), TWO, "the same number of rows"),
        (lambda p: (p / "a.csv").write_text("1,2"), MLP, r"unknown file type .csv"),
        (lambda p: (p / "a.npy").write_bytes(b"junk"), MLP, "cannot read .* as numpy data"),
    ],
)  # fmt: skip
def test_a_file_that_does_not_fit_the_model_names_the_input(tmp_path: Path, make, model, message: str) -> None:
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(InputError, match=message):
        read_samples(path, model)


def test_parquet_rows_with_list_cells(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]}), tmp_path / "x.parquet")
    samples = read_samples(tmp_path / "x.parquet", MLP)
    assert [s["x"].tolist() for s in samples] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]
    with pytest.raises(InputError, match="does not exist"):
        read_samples(tmp_path / "absent.parquet", MLP)


def fake_classifier(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = sample["x"].astype(np.float32)
    return {"y": x[..., :3] * 2}


def test_reference_round_trip_and_accuracy(tmp_path: Path) -> None:
    samples = generate_samples(MLP, 5, seed=3)
    path = tmp_path / "ref" / "reference.npz"
    write_reference(path, samples, [fake_classifier(s) for s in samples])
    reference = read_reference(path, MLP)
    assert len(reference.inputs) == 5 and np.array_equal(reference.inputs[2]["x"], samples[2]["x"])
    same = check_accuracy(reference, fake_classifier, reference_path=path)
    assert same["passed"] and same["max_abs_difference"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["outputs_compared"] == 5 and same["reference"] == str(path)
    nudged = check_accuracy(reference, lambda s: {"y": fake_classifier(s)["y"] + 0.01}, reference_path=path)
    assert not nudged["passed"] and nudged["max_abs_difference"] == pytest.approx(0.01, rel=1e-3)
    assert nudged["top1_agreement"] == 1.0
    flipped = check_accuracy(reference, lambda s: {"y": -fake_classifier(s)["y"]}, reference_path=path,
                             tolerance=100.0)  # fmt: skip
    assert not flipped["passed"] and flipped["top1_agreement"] < 0.99
    missing = check_accuracy(reference, lambda s: {}, reference_path=path)
    assert not missing["passed"] and "output 'y': expected shape [1, 3], got nothing" in missing["problems"][0]


def test_classification_strings_compare_by_top_class(tmp_path: Path) -> None:
    model = ModelSignature("c", 1, 8, (TensorSpec("x", "FP32", (4,)),), (TensorSpec("classes", "BYTES", (2,)),))
    samples = generate_samples(model, 2, seed=1)
    answer = np.array([[b"0.9:3:cat", b"0.1:1:dog"]], dtype=object)
    write_reference(tmp_path / "r.npz", samples, [{"classes": answer}] * 2)
    reference = read_reference(tmp_path / "r.npz", model)
    assert reference.outputs[0]["classes"].dtype == object
    close = np.array([[b"0.89:3:cat", b"0.11:1:dog"]], dtype=object)
    assert check_accuracy(reference, lambda s: {"classes": close}, reference_path=tmp_path)["top1_agreement"] == 1.0
    other = np.array([[b"0.6:1:dog", b"0.4:3:cat"]], dtype=object)
    assert not check_accuracy(reference, lambda s: {"classes": other}, reference_path=tmp_path)["passed"]


def test_a_reference_for_another_model_is_refused(tmp_path: Path) -> None:
    write_reference(tmp_path / "r.npz", generate_samples(MLP, 1, seed=1), [{"y": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="the reference was written for another model"):
        read_reference(tmp_path / "r.npz", TWO)
    np.savez(tmp_path / "plain.npz", x=np.ones(3))
    with pytest.raises(InputError, match="is not a bench reference file"):
        read_reference(tmp_path / "plain.npz", MLP)
    with pytest.raises(InputError, match="write one first with --write-reference"):
        read_reference(tmp_path / "none.npz", MLP)


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime.from_repository(EXAMPLES, models=["mlp"]) as loaded:
        yield loaded


def test_in_process_client_reads_the_signature_and_answers(runtime: Runtime) -> None:
    client = InProcessClient(runtime, "mlp")
    found = client.signature()
    assert found.max_batch_size == 64 and found.inputs == (TensorSpec("x", "FP32", (64,)),)
    outputs = client.infer(generate_samples(found, 1, seed=0)[0])
    assert outputs["probs"].shape == (1, 10)


def test_clients_over_http_and_grpc_agree_with_in_process(runtime: Runtime, tmp_path: Path) -> None:
    grpc_port = free_port()
    served = ServerThread(ServeOptions(repository=EXAMPLES, http_port=0, grpc_port=grpc_port,
                                       model_control_mode="explicit", load_models=["mlp"]))  # fmt: skip
    try:
        http = HttpClient(f"http://127.0.0.1:{served.port}", "mlp")
        grpc_client = GrpcClient(f"127.0.0.1:{grpc_port}", "mlp")
        local = InProcessClient(runtime, "mlp")
        assert http.signature().inputs == grpc_client.signature().inputs == local.signature().inputs
        assert http.signature().max_batch_size == grpc_client.signature().max_batch_size == 64
        sample = generate_samples(local.signature(), 1, seed=2)[0]
        expected = local.infer(sample)["probs"]
        np.testing.assert_allclose(http.infer(sample)["probs"], expected, rtol=1e-6)
        np.testing.assert_allclose(grpc_client.infer(sample)["probs"], expected, rtol=1e-6)
        with pytest.raises(InputError, match="model 'nope' is not served at .*; models there: mlp"):
            HttpClient(f"http://127.0.0.1:{served.port}", "nope").signature()
        with pytest.raises(InputError, match="model 'nope' is not served at .*; models there: mlp"):
            GrpcClient(f"127.0.0.1:{grpc_port}", "nope").signature()
        grpc_client.close()
    finally:
        served.stop()


def test_an_unreachable_server_says_so() -> None:
    port = free_port()
    with pytest.raises(TargetUnreachable, match=f"not reachable at http://127.0.0.1:{port}"):
        HttpClient(f"http://127.0.0.1:{port}", "mlp").signature()
    with pytest.raises(InputError, match="is not an HTTP address"):
        HttpClient("127.0.0.1:1", "mlp")
    with pytest.raises(TargetUnreachable, match="no gRPC server answers"):
        GrpcClient(f"127.0.0.1:{port}", "mlp", timeout_s=0.5)
