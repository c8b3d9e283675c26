"""A model folder on disk: is it one, what its config.json says, how many layers it has."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


def has_config(path: str | Path) -> bool:
    """True if `path` is a folder holding a config.json (a transformers model folder)."""
    return (Path(path) / "config.json").is_file()


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of the model folder `path`; ConfigError if it has none."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"'{path}' is not a model folder: expected a config.json in it")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, but got {type(data).__name__}")
    return data


def num_layers(config: dict[str, Any]) -> int | None:
    """The decoder layer count of a config (multimodal configs nest it under text_config);
    None when the config does not say, so each caller states its own fallback."""
    inner = config.get("text_config") or config
    n = inner.get("num_hidden_layers", inner.get("n_layer"))
    return None if n is None else int(n)
