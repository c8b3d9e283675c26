"""YAML text to Python data, with the one error message format every loader shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


def yaml_error(exc: Exception, label: str) -> ConfigError:
    """A one-line ConfigError for a YAML parse error: where (line, column) and what."""
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{label}: invalid YAML{at}: {problem}")


def parse_yaml(text: str, label: str, loader: Any = None) -> Any:
    """One YAML document parsed with `loader` (default: yaml.SafeLoader)."""
    import yaml

    try:
        return yaml.load(text, Loader=loader or yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, label) from None


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The parsed YAML file `path`; ConfigError naming `what` when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file '{path}' not found")
    return parse_yaml(path.read_text(), str(path))
