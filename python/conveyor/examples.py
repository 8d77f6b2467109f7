"""Where the bundled example model repository lives."""

from __future__ import annotations

from pathlib import Path

from conveyor.errors import ConfigError


def example_repository() -> Path:
    """The example model repository: installed with the package, or in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "example_models", here.parents[1] / "examples" / "models"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"the bundled example models were not found under {here / 'example_models'}: "
        "reinstall the package (pip install .) or pass a repository path"
    )
