"""`conveyor rollout`: start, watch, steer and report a model's rollout on a running server.

Each verb is one request to the server's rollout endpoints (standard library HTTP only):

    GET  /v2/models/{m}/rollout                      status (404 when the model has none)
    GET  /v2/models/{m}/rollout/decisions            {"decisions": [records, oldest first]}
    POST /v2/models/{m}/rollout                      start: a [rollout] table, or {} for the config's
    POST /v2/models/{m}/rollout/{promote|pause|resume|abort|rollback}   {"reason", "version", "full"}

POSTs carry `Authorization: Bearer KEY` when --api-key (CONVEYOR_API_KEY) is set, as the
repository control endpoints need it. `report` also reads a rollout offline from the
state directory's files (`conveyor.deploy.rollout_state`). cli.py registers the verbs;
every flag also comes from CONVEYOR_<FLAG>, as for the other commands.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.cli_values import DEFAULT_URL, env, positive_float, positive_int

ACTIONS = ("promote", "pause", "resume", "abort", "rollback")
EXIT_FAILED, EXIT_USAGE = 1, 2
ENVIRONMENT_EPILOG = (
    "Every flag can also be set by an environment variable: CONVEYOR_ and the flag's name in capitals with "
    "dashes as underscores (--url: CONVEYOR_URL, --api-key: CONVEYOR_API_KEY, MODEL: CONVEYOR_MODEL). A flag "
    "given on the command line wins. Exit status: 0 on success, 1 when the server refused or could not be "
    "reached (the message says why), 2 for a usage error."
)


class RolloutCommandError(Exception):
    """A verb that could not be done; the message says what was wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- talking to the server


def rollout_path(model: str, action: str | None = None) -> str:
    """The rollout endpoint of `model` (and of one action or "decisions")."""
    path = "/v2/models/" + urllib.parse.quote(model, safe="") + "/rollout"
    return path + "/" + action if action else path


def call_server(url: str, method: str, path: str, *, body: Any = None, api_key: str | None = None,
                timeout_s: float = 10.0) -> Any:  # fmt: skip
    """Sends one request to the server at `url` and returns its JSON answer.

    Raises RolloutCommandError with the server's own message for an error status, and a
    message naming `url` when the server cannot be reached, does not answer in time, or
    answers something that is not JSON.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise RolloutCommandError(f"--url {url!r} is not an HTTP address: pass one like {DEFAULT_URL}", EXIT_USAGE)
    endpoint = url.rstrip("/") + path
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        raise _refused(exc, method, endpoint, api_key) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _timed_out(url, timeout_s) from None
        raise RolloutCommandError(f"the server is not reachable at {url} ({exc.reason}); start it with "
                                  "'conveyor serve' or pass --url with the server's address") from None
    except TimeoutError:
        raise _timed_out(url, timeout_s) from None
    except (http.client.InvalidURL, ValueError) as exc:
        raise RolloutCommandError(f"--url {url!r} is not a valid address ({exc}); pass one like {DEFAULT_URL}",
                                  EXIT_USAGE) from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise RolloutCommandError(f"the server at {url} broke off its answer to {method} {endpoint} ({exc}); "
                                  f"check that {url} is a conveyor server") from None
    try:
        return json.loads(answer)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RolloutCommandError(f"the server at {url} answered {method} {endpoint} with a body that is not JSON "
                                  f"({exc}); check that {url} is a conveyor server") from None


def _timed_out(url: str, timeout_s: float) -> RolloutCommandError:
    return RolloutCommandError(f"the server at {url} did not answer within {timeout_s:g} s; "
                               "pass a larger --timeout-s, or check the server")


def _refused(exc: urllib.error.HTTPError, method: str, endpoint: str, api_key: str | None) -> RolloutCommandError:
    try:
        text = exc.read(4000).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        text = ""
    try:
        message = str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        message = text or exc.reason
    hint = ""
    if exc.code in (401, 403):
        hint = ("; pass the server's key with --api-key (or CONVEYOR_API_KEY)" if not api_key
                else "; the key given with --api-key (or CONVEYOR_API_KEY) was not accepted")
    return RolloutCommandError(f"{method} {endpoint} answered {exc.code}: {message}{hint}")


# ---------------------------------------------------------------- what the verbs print


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def describe_status(status: Mapping[str, Any]) -> str:
    """A rollout status as a few readable lines: strategy, state, step, weights, each check's last verdict."""
    name, model = status.get("rollout", "?"), status.get("model", "?")
    state = str(status.get("state", "?"))
    if status.get("paused_by"):
        state += f" ({status['paused_by']})"
    challengers = ", ".join(f"v{v}" for v in status.get("challengers") or []) or "—"
    lines = [f"rollout {name} of model {model}: {status.get('strategy', '?')}, {state}",
             f"  champion v{status.get('champion', '?')}, challenger {challengers}; "
             f"serving v{status.get('serving_version', '?')}"]  # fmt: skip
    if status.get("reason"):
        lines.append(f"  reason: {status['reason']}")
    if status.get("state") == "paused":
        then = ("'conveyor rollout promote' passes the gate" if status.get("paused_by") == "manual_gate"
                else "'conveyor rollout resume' continues")
        lines.append(f"  next: {then}; 'conveyor rollout abort' ends the rollout")
    step = status.get("step")
    if isinstance(step, Mapping):
        index, count = step.get("index"), step.get("count")
        position = f"{index + 1} of {count}" if isinstance(index, int) and isinstance(count, int) else "?"
        gate = ", manual gate" if step.get("manual_gate") else ""
        lines.append(f"  step {position}: {_number(step.get('weight'))}%{gate}; challenger answered "
                     f"{step.get('challenger_requests', '?')} of {step.get('min_requests', '?')} requests needed, "
                     f"bakes {_number(step.get('duration_s'))} s")
    weights = status.get("weights")
    if isinstance(weights, Mapping) and weights:
        lines.append("  weights: " + ", ".join(f"v{v} {_number(w)}%" for v, w in weights.items()))
    shadow = status.get("shadow")
    if isinstance(shadow, Mapping):
        lines.append(f"  shadow: {_number(shadow.get('percent'))}% of requests copied to v{shadow.get('version', '?')}")
    judgement = status.get("last_judgement")
    if isinstance(judgement, Mapping):
        lines.append(f"  last look: {judgement.get('verdict', '?')} -> {judgement.get('action', '?')} "
                     f"({judgement.get('reason', '')})")
        for decision in judgement.get("decisions") or []:
            if isinstance(decision, Mapping):
                only = " (report only)" if decision.get("report_only") else ""
                lines.append(f"    {decision.get('check', '?')}{only}: {decision.get('verdict', '?')}, "
                             f"{decision.get('statistic', '')} = {_number(decision.get('estimate'))} "
                             f"[{_number(decision.get('lower'))}, {_number(decision.get('upper'))}] "
                             f"vs {_number(decision.get('limit'))}")
    else:
        lines.append("  last look: none yet")
    traffic = status.get("traffic")
    if isinstance(traffic, Mapping) and traffic:
        lines.append("  traffic: " + json.dumps(traffic, sort_keys=True))
    return "\n".join(lines)


# ---------------------------------------------------------------- verbs


def _read_rollout_file(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RolloutCommandError(f"--file {path} does not exist; pass a TOML file with a [rollout] table", EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RolloutCommandError(f"cannot read --file {path}: {exc}", EXIT_USAGE) from None
    except tomllib.TOMLDecodeError as exc:
        raise RolloutCommandError(f"--file {path} is not valid TOML: {exc}", EXIT_USAGE) from None
    table = document.get("rollout")
    if not isinstance(table, dict):
        raise RolloutCommandError(f"--file {path} has no [rollout] table; write the rollout as in a model's "
                                  "config.toml ([rollout], [[rollout.steps]], [[rollout.checks]])", EXIT_USAGE)
    return table


def _run_start(args: argparse.Namespace) -> str:
    table = _read_rollout_file(args.file) if args.file is not None else {}
    status = call_server(args.url, "POST", rollout_path(args.model), body=table, api_key=args.api_key,
                         timeout_s=args.timeout_s)  # fmt: skip
    return describe_status(status)


def _run_status(args: argparse.Namespace) -> str:
    status = call_server(args.url, "GET", rollout_path(args.model), timeout_s=args.timeout_s)
    return json.dumps(status, indent=2, sort_keys=True) if args.json else describe_status(status)


def _run_action(args: argparse.Namespace) -> str:
    body: dict[str, Any] = {}
    if getattr(args, "version", None) is not None:
        body["version"] = args.version
    if getattr(args, "full", False):
        body["full"] = True
    if getattr(args, "reason", None):
        body["reason"] = args.reason
    status = call_server(args.url, "POST", rollout_path(args.model, args.action), body=body, api_key=args.api_key,
                         timeout_s=args.timeout_s)  # fmt: skip
    return describe_status(status)


def _run_report(args: argparse.Namespace) -> str:
    from conveyor.deploy.report import render_rollout_report

    statistics = None
    if args.state_dir is not None:
        status, decisions, statistics = _read_state_directory(args.state_dir, args.model)
    else:
        status = call_server(args.url, "GET", rollout_path(args.model), timeout_s=args.timeout_s)
        answer = call_server(args.url, "GET", rollout_path(args.model, "decisions"), timeout_s=args.timeout_s)
        decisions = answer.get("decisions") if isinstance(answer, Mapping) else None
        if not isinstance(decisions, list):
            raise RolloutCommandError(f"the server at {args.url} answered GET {rollout_path(args.model, 'decisions')} "
                                      "without a 'decisions' list; check that it is a conveyor server")
    if not isinstance(status, Mapping):
        raise RolloutCommandError(f"the rollout status of {args.model!r} is not a JSON object")
    page = render_rollout_report(status, decisions, statistics)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise RolloutCommandError(f"cannot write the report to {args.out}: {exc.strerror or exc}; pass another --out") from None
    return f"wrote the rollout report of {args.model} ({len(decisions)} decisions) to {args.out}"


def _read_state_directory(directory: Path, model: str) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    from conveyor.deploy.report import status_from_saved_state
    from conveyor.deploy.rollout_state import UntrustedState, audit_path, load_state, read_audit, state_path
    from conveyor.errors import ConfigError

    if not directory.is_dir():
        raise RolloutCommandError(f"--state-dir {directory} is not a directory; pass the server's --data-dir "
                                  "(its rollouts/ directory holds the files)", EXIT_USAGE)
    try:
        state_file, audit_file = state_path(directory, model), audit_path(directory, model)
        if not state_file.exists() and not audit_file.exists() and (directory / "rollouts").is_dir():
            # The server keeps its rollouts in <data dir>/rollouts: the data directory itself will do.
            state_file, audit_file = state_path(directory / "rollouts", model), audit_path(directory / "rollouts", model)
    except ConfigError as exc:
        raise RolloutCommandError(str(exc), EXIT_USAGE) from None
    try:
        body = load_state(state_file)
        decisions = read_audit(audit_file)
    except UntrustedState as exc:
        raise RolloutCommandError(f"cannot use the saved rollout state: {exc}") from None
    except OSError as exc:
        raise RolloutCommandError(f"cannot read {audit_file}: {exc.strerror or exc}") from None
    if body is None and not decisions:
        raise RolloutCommandError(f"no rollout of model {model!r} in {directory}: neither {state_file.name} nor "
                                  f"{audit_file.name} is there; pass the server's --data-dir as --state-dir")
    status = status_from_saved_state(body, decisions) if body is not None else {"model": model}
    return status, decisions, (body or {}).get("statistics")


# ---------------------------------------------------------------- the parser


def _common(p: argparse.ArgumentParser, *, posts: bool, url_group: Any = None) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", default=env("model", None),
                   help="the model whose rollout this is (env CONVEYOR_MODEL)")
    (url_group or p).add_argument("--url", default=env("url", DEFAULT_URL),
                                  help=f"the server's HTTP address (default {DEFAULT_URL}; env CONVEYOR_URL)")
    if posts:
        p.add_argument("--api-key", default=env("api-key", None),
                       help="sent as 'Authorization: Bearer KEY' when the server was started with --api-key "
                       "(env CONVEYOR_API_KEY)")
    p.add_argument("--timeout-s", type=positive_float, default=env("timeout-s", 10.0, positive_float),
                   help="seconds to wait for the server's answer (default 10)")


def register_rollout_commands(subparsers: Any) -> None:
    """Adds `conveyor rollout` and its verbs to the top-level parser's subcommands."""
    p = subparsers.add_parser(
        "rollout",
        help="start, watch, steer and report a rollout of a new model version",
        description="Roll a new version of a model out on a running server: canary steps, A/B/n weights, shadow "
        "copies or a blue-green switch, moved by the server's judge and by these commands. The rollout is the "
        "[rollout] table of the model's config.toml (examples/README.md documents it) or a table given to 'start'.",
        epilog="Run 'conveyor rollout VERB --help' for a verb's flags. " + ENVIRONMENT_EPILOG,
    )
    p.set_defaults(run=lambda args: (p.print_help(sys.stderr), EXIT_USAGE)[1])
    verbs = p.add_subparsers(title="verbs", metavar="VERB")

    start = verbs.add_parser("start", help="start a rollout: the model config's [rollout] table, or --file's",
                             description="Start a rollout of MODEL: POST /v2/models/MODEL/rollout. Without --file the "
                             "server starts the [rollout] table of the model's config.toml; with --file, the "
                             "[rollout] table of that TOML file. Prints the new rollout's status.",
                             epilog=ENVIRONMENT_EPILOG)  # fmt: skip
    _common(start, posts=True)
    start.add_argument("--file", type=Path, metavar="ROLLOUT.TOML", default=env("file", None, Path),
                       help="a TOML file holding a [rollout] table (with its [[rollout.steps]] and [[rollout.checks]])")
    start.set_defaults(run=run_rollout_verb, verb=_run_start)

    status = verbs.add_parser("status", help="print the rollout's state, weights and last verdicts",
                              description="Print the rollout of MODEL (GET /v2/models/MODEL/rollout): strategy, "
                              "state, step and weight, weights per version, and each check's last verdict with its "
                              "statistic, bounds and limit.", epilog=ENVIRONMENT_EPILOG)  # fmt: skip
    _common(status, posts=False)
    status.add_argument("--json", action="store_true", help="print the server's status document as JSON instead")
    status.set_defaults(run=run_rollout_verb, verb=_run_status)

    helps = {
        "promote": ("move the rollout forward now",
                    "canary: pass the manual gate (or with --full promote the challenger to 100% at once); "
                    "shadow: promote the challenger; blue-green: switch to it; A/B/n: end with --version answering."),
        "pause": ("hold the weights where they are", "The judge keeps looking, and a failing check still rolls back."),
        "resume": ("continue a paused rollout", "The canary bakes and advances again."),
        "abort": ("stop the rollout: the champion answers everything", "The decision log records --reason."),
        "rollback": ("return all traffic to the champion", "Also switches a blue-green rollout back within its "
                     "rollback window. The decision log records --reason."),
    }  # fmt: skip
    for action in ACTIONS:
        short, more = helps[action]
        verb = verbs.add_parser(action, help=short, epilog=ENVIRONMENT_EPILOG,
                                description=f"{short[0].upper()}{short[1:]}: POST /v2/models/MODEL/rollout/{action}. "
                                f"{more} Prints the rollout's status.")  # fmt: skip
        _common(verb, posts=True)
        if action == "promote":
            verb.add_argument("--version", type=positive_int, default=env("version", None, positive_int),
                              help="A/B/n: the version that takes all traffic (needed with several challengers)")
            verb.add_argument("--full", action="store_true", help="canary: promote to 100%% now, skipping later steps")
        if action in ("abort", "rollback"):
            verb.add_argument("--reason", default=env("reason", None), help="why, for the decision log")
        verb.set_defaults(run=run_rollout_verb, verb=_run_action, action=action)

    report = verbs.add_parser(
        "report", help="write the rollout's report as one HTML file",
        description="Write the rollout of MODEL as one self-contained HTML page (inline SVG, no scripts, no external "
        "assets): a summary; the weights over time; each check's statistic against its limit over time with its "
        "confidence bounds; the agreement / flip matrix when a check compares classes; latency per version; and "
        "every decision. From the server at --url (GET .../rollout and .../rollout/decisions), or offline from "
        "--state-dir: the server's --data-dir (or its rollouts/ directory, which holds rollout-MODEL.json and "
        "rollout-MODEL.audit.jsonl). Both hold the latency histograms of every version.",
        epilog=ENVIRONMENT_EPILOG,
    )  # fmt: skip
    source = report.add_mutually_exclusive_group()
    _common(report, posts=False, url_group=source)
    report.add_argument("--out", type=Path, metavar="PATH", default=env("out", None, Path),
                        help="where to write the HTML report (required; env CONVEYOR_OUT)")
    source.add_argument("--state-dir", type=Path, metavar="DIR", default=env("state-dir", None, Path),
                        help="read the rollout's saved files from DIR (the server's --data-dir, or its rollouts/ directory) "
                        "instead of asking a server")
    report.set_defaults(run=run_rollout_verb, verb=_run_report)


def run_rollout_verb(args: argparse.Namespace) -> int:
    """Runs the verb the parser chose: prints its output, or the error and how to fix it; returns the exit status."""
    verb = args.verb
    name = f"conveyor rollout {getattr(args, 'action', None) or verb.__name__.removeprefix('_run_')}"
    try:
        if args.model is None:
            raise RolloutCommandError("MODEL is required: pass the model's name (or set CONVEYOR_MODEL)", EXIT_USAGE)
        if verb is _run_report and args.out is None:
            raise RolloutCommandError("--out is required: pass the path of the HTML file to write", EXIT_USAGE)
        print(verb(args))
    except RolloutCommandError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
