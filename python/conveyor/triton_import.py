"""`conveyor import-triton`: a Triton model repository rewritten as Conveyor's.

`conveyor serve` already serves a Triton repository as it is (protocol/triton_pbtxt.py);
importing writes the equivalent config.toml per model, so the repository can then be
edited with Conveyor's own fields ([monitor], [rollout], ...). Each model's version
directories and other files (label files) are copied beside it; its config.pbtxt is
not; an ensemble's config.toml is a model graph ([graph], its steps as [[graph.step]]).
The fields Conveyor does not honour head the config.toml as a comment, and a model
that cannot be served (a refused feature, a bad value) is reported and skipped while
the others are written.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.cli_values import env
from conveyor.config import CONFIG_FILE_NAME, MODEL_NAME_PATTERN, parse_model_config
from conveyor.errors import ConfigError
from conveyor.protocol.triton_pbtxt import TRITON_CONFIG_FILE_NAME, read_config_pbtxt
from conveyor.toml_text import toml_text

__all__ = ["ImportReport", "import_triton_repository", "register_import_triton_command"]

EXIT_OK, EXIT_SOME_REFUSED, EXIT_USAGE = 0, 1, 2


@dataclass
class ImportReport:
    """What an import wrote (`written`: model names) and refused (model name -> why)."""

    written: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # model -> fields not honoured


def import_triton_repository(source: Path, out: Path) -> ImportReport:
    """Write every model of the Triton repository `source` into `out` with a config.toml.

    ConfigError when `source` is not a directory or `out` already holds one of the models
    (nothing is overwritten). A model that cannot be served is skipped and named in the
    report's `refused`; the others are written.
    """
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ConfigError(f"{source}: expected a Triton model repository directory, found none")
    names = sorted(p.name for p in source.iterdir() if p.is_dir() and re.fullmatch(MODEL_NAME_PATTERN, p.name))
    clashes = [name for name in names if (out / name).exists()]
    if clashes:
        raise ConfigError(f"{out}: already holds {', '.join(clashes)}: choose an empty --out directory")
    report = ImportReport()
    for name in names:
        try:
            fields, ignored = _config_fields(source / name, name)
        except ConfigError as exc:
            report.refused[name] = str(exc)
            continue
        text = _config_text(fields, ignored, source / name)
        parse_model_config(tomllib.loads(text), source=f"{out / name / CONFIG_FILE_NAME}", name=name)
        shutil.copytree(source / name, out / name, ignore=shutil.ignore_patterns(TRITON_CONFIG_FILE_NAME))
        (out / name / CONFIG_FILE_NAME).write_text(text, encoding="utf-8")
        report.written.append(name)
        if ignored:
            report.ignored[name] = ignored
    return report


def _config_fields(directory: Path, name: str) -> tuple[dict[str, Any], list[str]]:
    if (directory / CONFIG_FILE_NAME).is_file():
        raise ConfigError(f"{directory}: already has a {CONFIG_FILE_NAME}; nothing to import")
    pbtxt = directory / TRITON_CONFIG_FILE_NAME
    if pbtxt.is_file():
        triton = read_config_pbtxt(pbtxt, name=name)
        parse_model_config(triton.fields, source=str(pbtxt), name=name)  # a bad value refuses the model here
        fields = {key: value for key, value in triton.fields.items() if key != "name"}
        return fields, triton.ignored
    if any(version.is_dir() and (version / "model.onnx").is_file() for version in directory.iterdir()):
        return {"backend": "onnx"}, []  # the signature is read from the graph at load, as Triton auto-completes
    raise ConfigError(f"{directory}: neither {TRITON_CONFIG_FILE_NAME} nor a version directory holding model.onnx")


def _config_text(fields: dict[str, Any], ignored: list[str], directory: Path) -> str:
    header = [f"# Imported from the Triton model config {directory / TRITON_CONFIG_FILE_NAME}."]
    if not (directory / TRITON_CONFIG_FILE_NAME).is_file():
        header = [f"# Imported from {directory}: no config.pbtxt; inputs and outputs are read from model.onnx."]
    if ignored:
        header.append("# Fields Conveyor does not honour, left out:")
        header += [f"#   {entry}" for entry in ignored]
    return "\n".join(header) + "\n\n" + toml_text(fields)


# ---- the command -----------------------------------------------------------------------------


def register_import_triton_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import-triton",
        help="rewrite a Triton model repository with config.toml files",
        description="Copy every model of TRITON_REPO into --out with a config.toml equivalent to its "
        "config.pbtxt (or, without one, an ONNX model whose signature is read from the graph at load). "
        "`conveyor serve TRITON_REPO` serves the repository unchanged; import it to add Conveyor's own "
        "fields. An ensemble becomes a model graph ([graph] with a [[graph.step]] per ensemble step). "
        "Fields Conveyor does not honour are listed at the top of each config.toml; a model with a "
        "feature Conveyor cannot serve (sequence batching, reshape, ragged or decoupled models, an ensemble "
        "step's model_namespace) is reported and skipped.",
        epilog="Exit status: 0 when every model was written, 1 when some were refused (the others are "
        "written), 2 on a usage error (the message says what to fix).",
    )
    p.add_argument("source", type=Path, metavar="TRITON_REPO", help="the Triton model repository to read")
    p.add_argument("--out", type=Path, metavar="REPO", default=env("out", None, Path),
                   required=env("out", None) is None,
                   help="where to write the Conveyor repository (created; models already there are not "
                   "overwritten) (env CONVEYOR_OUT)")  # fmt: skip
    p.set_defaults(run=_run_import_triton)


def _run_import_triton(args: argparse.Namespace) -> int:
    try:
        report = import_triton_repository(args.source, args.out)
    except ConfigError as exc:
        print(f"conveyor import-triton: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name in report.written:
        ignored = report.ignored.get(name)
        note = f" ({len(ignored)} fields not honoured, listed in its config.toml)" if ignored else ""
        print(f"wrote {args.out / name / CONFIG_FILE_NAME}{note}")
    for name, why in report.refused.items():
        print(f"conveyor import-triton: model '{name}' not imported: {why}", file=sys.stderr)
    return EXIT_SOME_REFUSED if report.refused else EXIT_OK
