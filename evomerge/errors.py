"""Error types. Every error a user can cause is an EvomergeError subclass.

The CLI turns ConfigError into exit code 2 with a one-line message and no traceback;
any other EvomergeError exits 1 with a one-line message.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class EvomergeError(Exception):
    """Base class of evomerge's own errors."""


class ConfigError(EvomergeError):
    """Bad user input: a recipe, search space, CLI argument or file that cannot be used (exit 2)."""


class MergeError(EvomergeError):
    """A merge could not be carried out (incompatible checkpoints, corrupt files...)."""


class CandidateError(EvomergeError):
    """One candidate failed (NaN logits, out of memory): the trial fails, the study goes on."""


class IntegrityError(EvomergeError):
    """A fast path (a backend, a transport, a kernel) disagreed with the plain path: the run
    stops (exit 1) rather than publish numbers computed on corrupted weights."""


class NotBuiltError(EvomergeError):
    """A command whose implementation has not landed yet."""


def did_you_mean(name: str, choices: Iterable[str], what: str = "name") -> str:
    """Return "unknown <what> 'x'. Did you mean 'y'? Available: a, b, c" for an unknown name."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{name}'.{hint} Available: {', '.join(options)}"


def check_keys(data: Any, allowed: Iterable[str], where: str, what: str) -> None:
    """ConfigError unless `data` is a mapping whose keys are all in `allowed` ("did you mean")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, but got {data!r}")
    allowed = tuple(allowed)
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: {did_you_mean(str(key), allowed, what)}")
