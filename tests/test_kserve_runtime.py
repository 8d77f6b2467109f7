"""`conveyor kserve runtime|chart`: contract tests, as far as one machine without a cluster goes.

- The manifests are checked against the `kserve` SDK's and the `kubernetes` client's model
  classes (tests/kube_schema.py) and against the rules KServe's webhook adds.
- The server is started exactly as the runtime's container says, over a /mnt/models-like
  directory, and answers tritonclient over HTTP and gRPC, on the probes' paths and on the
  Prometheus annotations' port and path.
- The Helm chart is not rendered (no helm here): its files parse, every .Values reference
  exists in values.yaml, and the values that templates paste verbatim are valid objects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conveyor
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from conveyor.cli import main
from conveyor.scaleout import (
    CONTAINER_NAME,
    HTTP_PORT,
    MODEL_DIR,
    inference_service,
    serving_runtime,
)
from conveyor.scaleout.chart import DASHBOARD_IN_CHART, DASHBOARD_SOURCE, split_image
from conveyor.scaleout.kserve import DATA_DIR, kubernetes_name
from kube_schema import check_in_subprocess
from processes import DEADLINE_S, EXAMPLE_MODELS, free_port, wait_for

# What KServe's API accepts in protocolVersions (kserve pkg/constants; the SDK's PredictorProtocol
# enum names three of them, but the SDK cannot be imported here: see tests/kube_schema.py).
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
TINY_X = np.arange(32, dtype=np.float32).reshape(2, 16)


def _write_runtime(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path / "kserve"
    assert main(["kserve", "runtime", "--repository", str(EXAMPLE_MODELS), "--out", str(out), *flags]) == 0
    runtimes = [path for path in out.iterdir() if path.name != "inferenceservice.yaml"]
    assert len(runtimes) == 1, runtimes
    return yaml.safe_load(runtimes[0].read_text()), yaml.safe_load((out / "inferenceservice.yaml").read_text())


@pytest.mark.parametrize(("flags", "kind"), [((), "ClusterServingRuntime"), (("--namespaced",), "ServingRuntime")])
def test_runtime_validates_against_the_kserve_models(tmp_path: Path, flags: tuple[str, ...], kind: str) -> None:
    runtime, service = _write_runtime(tmp_path, *flags)
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == kind
    checks = [(runtime, f"V1alpha1{kind}"), (service, "V1beta1InferenceService")]
    assert check_in_subprocess(checks, tmp_path) == ["", ""]
    spec = runtime["spec"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"} <= KSERVE_PROTOCOLS
    [container] = spec["containers"]
    assert container["name"] == CONTAINER_NAME == "kserve-container"  # the container KServe merges into
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": HTTP_PORT}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": HTTP_PORT}
    assert spec["annotations"] == {"prometheus.kserve.io/port": str(HTTP_PORT), "prometheus.kserve.io/path": "/metrics"}
    # KServe's webhook: a priority only with autoSelect, and > 0.
    formats = {entry["name"]: entry for entry in spec["supportedModelFormats"]}
    assert {"conveyor", "onnx", "pytorch", "xgboost", "lightgbm", "sklearn"} == set(formats)
    assert all(entry["autoSelect"] and entry["priority"] > 0 for entry in formats.values() if "priority" in entry)
    assert [name for name, entry in formats.items() if entry["autoSelect"]] == ["conveyor"]
    predictor = service["spec"]["predictor"]["model"]
    assert predictor["runtime"] == runtime["metadata"]["name"]
    assert predictor["modelFormat"]["name"] in formats


def test_the_schema_check_refuses_what_kserve_would_not_read(tmp_path: Path) -> None:
    misspelt, unnamed, mistyped = serving_runtime(), serving_runtime(), serving_runtime()
    misspelt["spec"]["protocolVersion"] = ["v2"]  # the CRD would prune it
    del unnamed["spec"]["containers"][0]["name"]
    mistyped["spec"]["multiModel"] = "false"
    problems = check_in_subprocess([(document, "V1alpha1ClusterServingRuntime")
                                    for document in (misspelt, unnamed, mistyped)], tmp_path)  # fmt: skip
    assert problems[0] == "$.spec: V1alpha1ServingRuntimeSpec has no field protocolVersion"
    assert re.match(r"\$\.spec\.containers\[0\]: V1Container: .*\bname\b", problems[1], re.DOTALL), problems[1]
    assert problems[2].startswith("$.spec.multiModel: expected bool"), problems[2]


def test_inference_service_names_are_kubernetes_names() -> None:
    assert kubernetes_name("text_classifier") == "text-classifier"
    assert kubernetes_name("2fast.Model") == "m-2fast-model"
    assert inference_service("text_classifier")["metadata"]["name"] == "text-classifier"


def test_cli_errors_exit_non_zero_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["kserve", "runtime", "--repository", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing: expected a model repository directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["kserve", "chart", "--repository", str(empty), "--out", str(out)]) == 2
    assert "no model directories" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "bad" / "1").mkdir(parents=True)
    (broken / "bad" / "config.toml").write_text('backend = "onnx"\n')
    assert main(["kserve", "runtime", "--repository", str(broken), "--out", str(out)]) == 2
    assert "model 'bad' cannot be served" in capsys.readouterr().err
    assert main(["kserve", "runtime", "--repository", str(EXAMPLE_MODELS), "--out", str(out), "--model", "nope"]) == 2
    assert "model 'nope' is not in the repository; it holds: churn," in capsys.readouterr().err
    assert main(["kserve", "chart", "--name", "My_Chart", "--out", str(out)]) == 2
    assert "--name 'My_Chart' is not a Kubernetes name" in capsys.readouterr().err
    assert not out.exists()


# --- the server, started as the runtime's container says ------------------------------------


@pytest.fixture(scope="module")
def container_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """`conveyor serve` with the container's command line; only paths and ports are replaced, through its flags."""
    workdir = tmp_path_factory.mktemp("kserve-container")
    models = workdir / "mnt" / "models"
    shutil.copytree(EXAMPLE_MODELS / "tiny", models / "tiny")
    [container] = serving_runtime()["spec"]["containers"]
    command = [*container["command"], *container["args"]]
    assert command[:8] == ["conveyor", "serve", MODEL_DIR, "--http-port", "8080", "--grpc-port", "8081", "--host"]
    http_port, grpc_port = free_port(), free_port()
    swaps = {MODEL_DIR: str(models), DATA_DIR: str(workdir / "data")}
    command = [swaps.get(word, word) for word in command]
    command[command.index("--http-port") + 1] = str(http_port)
    command[command.index("--grpc-port") + 1] = str(grpc_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(Path(conveyor.__file__).resolve().parents[1])
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log:  # `conveyor` is this interpreter's `python -m conveyor`
        process = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _status(http_port, "/v2/health/ready") == 200, "readiness", process=process)
        yield http_port, grpc_port
    finally:
        process.terminate()
        process.wait(DEADLINE_S)
    assert "Traceback" not in log_path.read_text(errors="replace")


def _status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE_S) as response:
            return response.status
    except OSError:
        return None


def test_container_answers_tritonclient_over_http_and_grpc(container_server: tuple[int, int]) -> None:
    http_port, grpc_port = container_server
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=DEADLINE_S)
    try:
        tensor = httpclient.InferInput("x", list(TINY_X.shape), "FP32")
        tensor.set_data_from_numpy(TINY_X, binary_data=True)
        np.testing.assert_array_equal(http.infer("tiny", [tensor]).as_numpy("y"), TINY_X + 1)
    finally:
        http.close()
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        assert grpc.is_server_live() and grpc.is_model_ready("tiny")
        tensor = grpcclient.InferInput("x", list(TINY_X.shape), "FP32")
        tensor.set_data_from_numpy(TINY_X)
        np.testing.assert_array_equal(grpc.infer("tiny", [tensor]).as_numpy("y"), TINY_X + 1)
    finally:
        grpc.close()


def test_container_probes_and_metrics_answer_where_the_manifest_says(container_server: tuple[int, int]) -> None:
    http_port, _ = container_server
    runtime = serving_runtime()
    [container] = runtime["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == HTTP_PORT  # the port the test replaced
        assert _status(http_port, container[probe]["httpGet"]["path"]) == 200
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(HTTP_PORT)
    path = annotations["prometheus.kserve.io/path"]
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=DEADLINE_S) as response:
        exposition = response.read().decode()
    # The chart's HPA scales on this gauge: the server really exports it, per model.
    chart_values = yaml.safe_load(_chart_file("values.yaml.template").read_text().replace("$models", "[]"))
    metric = chart_values["autoscaling"]["metricName"]
    assert re.search(rf'^{metric}\{{model="tiny",version="1"\}} ', exposition, re.MULTILINE), exposition[:2000]


# --- the Helm chart ---------------------------------------------------------------------------


def _chart_file(name: str) -> Path:
    return Path(conveyor.__file__).resolve().parent / "scaleout" / "chart" / name


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chart") / "conveyor"
    assert main(["kserve", "chart", "--repository", str(EXAMPLE_MODELS), "--out", str(out),
                 "--image", "registry.example:5000/team/conveyor-serve:1.2.3"]) == 0  # fmt: skip
    return out


def test_chart_metadata_and_values(chart: Path, tmp_path: Path) -> None:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "conveyor" and meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+([-+].*)?", meta["version"]) and meta["appVersion"] == conveyor.__version__
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert values["image"] == {"repository": "registry.example:5000/team/conveyor-serve", "tag": "1.2.3",
                               "pullPolicy": "IfNotPresent"}  # fmt: skip
    assert "tiny" in values["models"] and values["repository"]["mountPath"] == MODEL_DIR
    assert values["autoscaling"]["metricName"] == "conveyor_requests_in_flight"
    # What templates paste with toYaml must be valid objects of their kind.
    checks = [({"name": "models", **values["repository"]["volume"]}, "V1Volume"),
              (values["resources"], "V1ResourceRequirements"), (values["podSecurityContext"], "V1PodSecurityContext"),
              (values["containerSecurityContext"], "V1SecurityContext")]  # fmt: skip
    assert check_in_subprocess(checks, tmp_path) == [""] * len(checks)


def _value_paths(values: Any, prefix: str = "") -> set[str]:
    if not isinstance(values, dict):
        return set()
    paths = set()
    for key, value in values.items():
        paths |= {f"{prefix}.{key}", *_value_paths(value, f"{prefix}.{key}")}
    return paths


def test_every_template_reference_exists(chart: Path) -> None:
    values = _value_paths(yaml.safe_load((chart / "values.yaml").read_text()))
    helpers = (chart / "templates" / "_helpers.tpl").read_text()
    defined = set(re.findall(r'{{-? define "([^"]+)"', helpers))
    templates = sorted((chart / "templates").iterdir())
    assert {t.name for t in templates} >= {"deployment.yaml", "service.yaml", "hpa.yaml", "servicemonitor.yaml",
                                           "dashboard-configmap.yaml", "NOTES.txt"}  # fmt: skip
    for template in templates:
        text = template.read_text()
        for reference in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            assert reference in values, f"{template.name}: .Values{reference} is not in values.yaml"
        for name in re.findall(r'(?:include|template) "([^"]+)"', text):
            assert name in defined, f"{template.name}: {name} is not defined in _helpers.tpl"
        for file_name in re.findall(r'\.Files\.Get "([^"]+)"', text):
            assert file_name == str(DASHBOARD_IN_CHART)
        actions = re.findall(r"{{-?\s*(if|with|range|define|end)\b", text)
        opened = sum(action != "end" for action in actions)
        assert opened == actions.count("end"), f"{template.name}: {opened} blocks opened, {actions.count('end')} ended"


API_CLASSES = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
               ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
               ("v1", "ConfigMap"): "V1ConfigMap", ("monitoring.coreos.com/v1", "ServiceMonitor"): None}  # fmt: skip


def test_templates_declare_kinds_kubernetes_knows(chart: Path) -> None:
    import kubernetes.client.models  # the kubernetes client alone registers no protobuf messages

    for template in (chart / "templates").glob("*.yaml"):
        text = template.read_text()
        api = (re.search(r"^apiVersion: (\S+)$", text, re.MULTILINE), re.search(r"^kind: (\S+)$", text, re.MULTILINE))
        assert api[0] and api[1], template.name
        cls = API_CLASSES[(api[0].group(1), api[1].group(1))]  # a KeyError names an unexpected kind
        assert cls is None or hasattr(kubernetes.client.models, cls)


def test_chart_ships_the_dashboard_when_installed(chart: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    if DASHBOARD_SOURCE.is_file():
        assert (chart / DASHBOARD_IN_CHART).read_bytes() == DASHBOARD_SOURCE.read_bytes()
    else:
        assert main(["kserve", "chart", "--out", str(tmp_path / "chart")]) == 0
        assert "dashboard ConfigMap is left out" in capsys.readouterr().err
        assert not (tmp_path / "chart" / DASHBOARD_IN_CHART).exists()


def test_split_image() -> None:
    assert split_image("conveyor-serve") == ("conveyor-serve", conveyor.__version__)
    assert split_image("host:5000/conveyor") == ("host:5000/conveyor", conveyor.__version__)
    assert split_image("host:5000/conveyor:2") == ("host:5000/conveyor", "2")


def test_the_engine_does_not_import_the_scale_out_adapters() -> None:
    """DESIGN.md: scale-out adapters import the engine, never the reverse; only the command line registers them."""
    package = Path(conveyor.__file__).resolve().parent
    importers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                       if "scaleout" in path.read_text() and path.parent.name != "scaleout")  # fmt: skip
    assert importers == ["cli.py"]


def test_yaml_text_reads_back_as_written() -> None:
    from conveyor.scaleout.yaml_text import to_yaml

    document = {"words": ["no", "On", "~", "8080", "1Gi", "a: b", "", "-x", "#c", "null", "plain/ok"],
                "nested": [[1, 2], [{"a": []}], {"b": {}}], "flags": [True, False, None], "n": 0}  # fmt: skip
    text = to_yaml(document, "a comment\nover two lines")
    assert text.startswith("# a comment\n# over two lines\n")
    assert yaml.safe_load(text) == document
