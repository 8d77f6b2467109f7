"""Block-style YAML for Kubernetes manifests, written by PyYAML (the `kubernetes` extra).

Keys keep their order (a manifest reads apiVersion, kind, metadata, spec); strings YAML
could read as something else (`no`, `8080`, `~`) are quoted by PyYAML itself.
"""

from __future__ import annotations

from typing import Any

from conveyor.errors import ConfigError

INSTALL_ADVICE = 'conveyor kserve writes YAML with PyYAML: pip install "conveyor-serve[kubernetes]"'


def to_yaml(document: dict[str, Any], comment: str = "") -> str:
    """`document` as YAML, after `comment` as '#' lines."""
    try:
        import yaml
    except ImportError:
        raise ConfigError(INSTALL_ADVICE) from None
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
    return "\n".join([*lines, body.rstrip("\n")]) + "\n"
