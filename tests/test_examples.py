from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.backends import create_backend
from conveyor.repository import ModelRepository, RepositoryEntry

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def repository() -> ModelRepository:
    return ModelRepository(EXAMPLES_DIR / "models")


def test_committed_models_match_the_build() -> None:
    check = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / "make_models.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_committed_text_model_matches_the_build() -> None:
    pytest.importorskip("tokenizers")
    check = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / "make_text_model.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    sizes = [path.stat().st_size for path in (EXAMPLES_DIR / "models" / "text_classifier").rglob("*") if path.is_file()]
    assert sum(sizes) < 100_000


def test_check_fails_on_a_stale_model(tmp_path: Path) -> None:
    stale = tmp_path / "mlp" / "1" / "model.onnx"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    check = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / "make_models.py"), "--check", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1
    assert "stale:" in check.stderr and str(stale) in check.stderr


def test_example_repository_loads(repository: ModelRepository) -> None:
    graphs = ["image_cascade"]
    models = ["churn", "classifier_large", "classifier_small", "image_classifier", "mlp", "rollout_demo", "scaler",
              "text_classifier", "tiny"]  # fmt: skip
    assert repository.list_models() == sorted(models + graphs)
    versions = {"rollout_demo": [1, 2]}  # the rollout example serves both of its versions
    expected = [
        RepositoryEntry(name, version, "READY") for name in sorted(models + graphs) for version in versions.get(name, [1])
    ]  # a graph is version 1
    assert repository.index() == expected
    tiny = repository.load_model("tiny").config  # its tensors come from the graph
    assert [(t.name, t.datatype, t.dims) for t in tiny.inputs] == [("x", "FP32", [16])]
    assert [(t.name, t.datatype, t.dims) for t in tiny.outputs] == [("y", "FP32", [16])]


def run_example(repository: ModelRepository, name: str, batch: np.ndarray) -> np.ndarray:
    source = repository.load_model(name)
    with create_backend(source.config, source.versions[1]) as backend:
        (output,) = backend.execute([batch])
    return output


def test_mlp_rows_are_probabilities(repository: ModelRepository) -> None:
    batch = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    probs = run_example(repository, "mlp", batch)
    assert probs.shape == (64, 10) and probs.dtype == np.float32
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_tiny_adds_one(repository: ModelRepository) -> None:
    batch = np.arange(32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(run_example(repository, "tiny", batch), batch + 1)


def test_scaler_standardizes_with_config_parameters(repository: ModelRepository) -> None:
    parameters = repository.load_model("scaler").config.parameters
    batch = np.linspace(-3, 3, 48, dtype=np.float32).reshape(3, 16)
    expected = (batch - np.float32(parameters["mean"])) / np.float32(parameters["std"])
    scaled = run_example(repository, "scaler", batch)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


def test_the_rollout_example_versions_agree_on_most_rows_and_its_canary_is_valid(repository: ModelRepository) -> None:
    from conveyor.deploy.judge import parse_checks
    from conveyor.rollout_config import resolve_versions

    source = repository.load_model("rollout_demo")
    batch = np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32) * 4
    answers = []
    for version in (1, 2):
        with create_backend(source.config, source.versions[version]) as backend:
            (probs,) = backend.execute([batch])
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        answers.append(probs.argmax(axis=1))
    agreement = float((answers[0] == answers[1]).mean())
    assert 0.8 < agreement < 1.0  # a retrained version: mostly the same answers, not all
    rollout = source.config.rollout
    assert rollout is not None and rollout.strategy == "canary" and rollout.steps[0].manual_gate
    assert resolve_versions(rollout, [1, 2], source="example").champion == 1
    assert [check.name for check in parse_checks(rollout.checks)] == ["errors", "p99"]


def test_the_cascade_answers_each_row_as_its_step_would_and_sends_a_minority_of_rows_on() -> None:
    import tomllib

    from conveyor import Runtime

    graph = tomllib.loads((EXAMPLES_DIR / "models" / "image_cascade" / "config.toml").read_text())["graph"]
    assert [step["model"] for step in graph["step"]] == ["classifier_small", "classifier_large"]
    assert graph["step"][1]["when"] == "max(small.probabilities) < 0.22"
    # The seeded random images of examples/README.md, "Model graphs".
    images = np.random.default_rng(0).integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
    with Runtime.from_repository(EXAMPLES_DIR / "models", models=["image_cascade"]) as runtime:
        answers = {
            model: np.concatenate([runtime.infer(model, {"image": images[i : i + 64]})["probabilities"]
                                   for i in range(0, len(images), 64)])
            for model in ("classifier_small", "classifier_large", "image_cascade")
        }  # fmt: skip
        steps = runtime.model_stats("image_cascade")["steps"]
    for probabilities in answers.values():
        assert probabilities.shape == (1024, 10) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    sent_on = answers["classifier_small"].max(axis=1) < 0.22
    assert 0.1 < sent_on.mean() < 0.3, sent_on.mean()  # about 17% on 10,000 images
    assert list(sent_on[:8]) == [False] * 6 + [True, False]  # the README's 8 images: row 6 goes on
    # Row for row, the graph answers what the step that ran for the row answers.
    expected = np.where(sent_on[:, None], answers["classifier_large"], answers["classifier_small"])
    np.testing.assert_array_equal(answers["image_cascade"], expected)
    assert [(s["step"], s["rows"]) for s in steps] == [("small", 1024), ("large", int(sent_on.sum()))]
