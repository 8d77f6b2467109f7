"""The Dockerfile at the repository root, checked without a container engine (none runs here).

It is parsed with dockerfile-parse and checked for what the image must be: two stages on
python:3.11-slim-bookworm, the wheel built by `pip wheel .` in the first and installed (with
server extras, never the test extra) in the second, a non-root user, the command line
accepted by the real `conveyor serve` argument parser, and the exposed ports and health
check matching its flags. A few of hadolint's rules are checked by hand (hadolint itself is
not packaged for this machine). The .dockerignore is checked to keep what the build needs
and to leave out a development build's extension. The image itself is not built here
(docs/container.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from conveyor.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "python:3.11-slim-bookworm"
# What `pip wheel .` reads: the build configuration, the C++ sources, the Python package,
# the example repository CMake installs into the wheel, and the README (the project's readme).
BUILD_INPUTS = ("pyproject.toml", "CMakeLists.txt", "README.md", "cmake", "cpp", "python", "examples/models")


def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def stages() -> list[list[dict[str, Any]]]:
    """The instructions of each stage, its FROM first (the ARGs before the first FROM dropped)."""
    found: list[list[dict[str, Any]]] = []
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def values(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def exec_form(value: str) -> list[str]:
    document = json.loads(value)  # the exec (JSON) form: no shell between the runtime and the server
    assert isinstance(document, list) and all(isinstance(word, str) for word in document)
    return document


def env_values(stage: list[dict[str, Any]]) -> dict[str, str]:
    found = {}
    for value in values(stage, "ENV"):
        for word in shlex.split(value):
            name, _, setting = word.partition("=")
            found[name] = setting
    return found


def serve_arguments(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Any]:
    """The final stage's ENTRYPOINT + CMD, and what `conveyor serve`'s own parser makes of them."""
    final = stages()[-1]
    (entrypoint,) = values(final, "ENTRYPOINT")
    (cmd,) = values(final, "CMD")
    command = exec_form(entrypoint) + exec_form(cmd)
    assert command[:2] == ["conveyor", "serve"]
    for name in [name for name in os.environ if name.startswith("CONVEYOR_")]:
        monkeypatch.delenv(name)  # the flags' defaults read CONVEYOR_* variables: only the command counts
    return command, build_parser().parse_args(command[1:])


def test_two_stages_on_python_311_slim_bookworm() -> None:
    builder, final = stages()
    assert builder[0]["value"].split() == [BASE_IMAGE, "AS", "builder"]
    assert final[0]["value"].split()[0] == BASE_IMAGE
    builder_runs = " ".join(values(builder, "RUN"))
    for package in ("build-essential", "cmake", "ninja-build"):
        assert re.search(rf"apt-get install\b[^&]*\b{package}\b", builder_runs), f"the builder installs no {package}"


def test_the_builder_builds_the_wheel_and_the_final_stage_installs_it() -> None:
    builder, final = stages()
    assert ". ." in values(builder, "COPY"), "the builder copies the source tree"
    (wheel_run,) = [run for run in values(builder, "RUN") if "pip wheel" in run]
    words = shlex.split(wheel_run)
    assert words[:3] == ["pip", "wheel", "."] and "--no-deps" in words
    wheel_dir = words[words.index("--wheel-dir") + 1]
    assert env_values(builder)["CONVEYOR_CUDA"] == "OFF"  # a CPU image, whatever the build machine has

    (copied,) = [c for c in values(final, "COPY") if c.startswith("--from=builder")]
    source, target = copied.split()[1:]
    assert source == wheel_dir
    (install,) = [run for run in values(final, "RUN") if "pip install" in run]
    assert f"{target}/conveyor_serve-*.whl" in install

    # The extras installed with it: the server's, never the test extra.
    (default,) = [v.split("=", 1)[1] for v in values(final, "ARG") if v.startswith("CONVEYOR_EXTRAS=")]
    assert '"conveyor-serve[${CONVEYOR_EXTRAS}] @ file://${wheel}"' in install
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = default.split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and "test" not in extras
    assert project["scripts"]["conveyor"] == "conveyor.cli:main"  # the ENTRYPOINT's executable


def test_the_final_stage_runs_as_a_non_root_user() -> None:
    final = stages()[-1]
    users = values(final, "USER")
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    created = " ".join(values(final, "RUN"))
    assert re.search(rf"useradd\b.*--uid {user}\b", created), f"no user {user} is created"
    names = [i["instruction"] for i in final]
    last_user = len(names) - 1 - names[::-1].index("USER")
    assert names.index("ENTRYPOINT") > last_user and names.index("CMD") > last_user
    # The data directory (capture files, rollout state) is the user's to write.
    data_dir = env_values(final)["CONVEYOR_DATA_DIR"]
    assert re.search(rf"chown [^&]*{re.escape(data_dir)}", created)


def test_the_command_is_accepted_by_conveyor_serve_and_the_ports_match(monkeypatch: pytest.MonkeyPatch) -> None:
    _, args = serve_arguments(monkeypatch)
    assert args.run.__name__ == "_run_serve"
    assert str(args.repository) == "/mnt/models"  # where KServe's storage initializer puts the model
    assert args.host == "0.0.0.0"
    assert (args.http_port, args.grpc_port) == (8080, 8081)  # KServe's HTTP port is 8080
    assert args.metrics_port == 0  # /metrics on the HTTP port: no third port to expose
    final = stages()[-1]
    exposed = {int(port.split("/")[0]) for value in values(final, "EXPOSE") for port in value.split()}
    assert exposed == {args.http_port, args.grpc_port}
    (healthcheck,) = values(final, "HEALTHCHECK")
    assert f"http://127.0.0.1:{args.http_port}/v2/health/live" in healthcheck


def test_a_bad_flag_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser the command is checked with refuses what `conveyor serve` refuses."""
    serve_arguments(monkeypatch)  # clears the environment
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "/mnt/models", "--http-prot", "8080"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "/mnt/models", "--grpc-port", "eighty"])


def test_hadolint_rules_checked_by_hand() -> None:
    """DL3000 absolute WORKDIR, DL3002 last USER not root, DL3006/DL3007 tagged images, not
    latest, DL3009 apt lists removed, DL3015 --no-install-recommends, DL3020 COPY not ADD,
    DL3025 JSON CMD and ENTRYPOINT, DL3042 no pip cache, DL4006 pipefail before pipes."""
    every = instructions()
    for stage in stages():
        image = stage[0]["value"].split()[0]
        assert ":" in image and not image.endswith(":latest"), image
        pip_cache_off = env_values(stage).get("PIP_NO_CACHE_DIR") == "1"
        for run in values(stage, "RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run
            if "pip install" in run or "pip wheel" in run:
                assert pip_cache_off or "--no-cache-dir" in run, run
            if re.search(r"[^|]\|[^|]", run):
                assert "pipefail" in " ".join(values(stage, "SHELL")), run
    assert not [i for i in every if i["instruction"] == "ADD"]
    for workdir in [i["value"] for i in every if i["instruction"] == "WORKDIR"]:
        assert workdir.startswith("/"), workdir
    for instruction in every:
        if instruction["instruction"] in {"CMD", "ENTRYPOINT"}:
            exec_form(instruction["value"])


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_the_dockerignore_keeps_what_the_build_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    needed = [f for f in tracked if any(f == top or f.startswith(top + "/") for top in BUILD_INPUTS)]
    assert any(f.startswith("cpp/") for f in needed) and any(f.startswith("examples/models/") for f in needed)
    left_out = [f for f in needed if dockerignored(f, patterns)]
    assert not left_out, f"the build context lacks {left_out[:10]}"
    # A development build's extension must not slip into the wheel in place of the image's own.
    assert dockerignored("python/conveyor/_core.cpython-311-x86_64-linux-gnu.so", patterns)
    assert dockerignored("python/conveyor/monitor/__pycache__/metrics.cpython-311.pyc", patterns)
    assert dockerignored("examples/README.md", patterns) and not dockerignored("examples/models/tiny/config.toml", patterns)
    assert dockerignored("tests/test_dockerfile.py", patterns) and dockerignored(".git/HEAD", patterns)


def test_the_helm_chart_runs_the_image_as_its_user() -> None:
    """The chart's pod security context names the Dockerfile's USER id (a read-only root
    filesystem with another uid could not write the data directory the image prepared)."""
    user, _, group = values(stages()[-1], "USER")[-1].partition(":")
    chart_values = (Path(__file__).resolve().parents[1] / "python" / "conveyor" / "scaleout" / "chart"
                    / "values.yaml.template").read_text()  # fmt: skip
    assert re.search(rf"^\s*runAsUser: {user}\s*$", chart_values, re.M)
    assert re.search(rf"^\s*runAsGroup: {group or user}\s*$", chart_values, re.M)
