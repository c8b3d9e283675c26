"""lm-eval task options (`eval.lm_eval:` in a space, the flags of `evomerge eval` and
`evomerge leaderboard`): the same names and meanings as `lm_eval.simple_evaluate`'s keyword
arguments, applied to the tasks the way simple_evaluate applies them (see ProxyTask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError, check_keys

# the simple_evaluate keyword arguments a task option maps to (tests check the signature)
LM_EVAL_OPTIONS = (
    "num_fewshot",
    "apply_chat_template",
    "system_instruction",
    "fewshot_as_multiturn",
    "gen_kwargs",
)


@dataclass(frozen=True)
class TaskOptions:
    """None: the task's own YAML decides (as simple_evaluate without the argument)."""

    num_fewshot: int | None = None
    apply_chat_template: bool | None = None
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = True  # simple_evaluate's default (used with a chat template)
    gen_kwargs: dict[str, Any] = field(default_factory=dict)

    def simple_evaluate_kwargs(self) -> dict[str, Any]:
        """The same options as `lm_eval.simple_evaluate` keyword arguments."""
        out: dict[str, Any] = {
            "num_fewshot": self.num_fewshot,
            "system_instruction": self.system_instruction,
            "apply_chat_template": bool(self.apply_chat_template),
            "fewshot_as_multiturn": self.fewshot_as_multiturn and bool(self.apply_chat_template),
        }
        if self.gen_kwargs:
            out["gen_kwargs"] = dict(self.gen_kwargs)
        return out


def parse_gen_kwargs(value: Any, where: str) -> dict[str, Any]:
    """A mapping, or lm-eval's command-line form `key=val,key2=val2` (its own parser)."""
    if value is None:
        return {}
    if isinstance(value, str):
        from lm_eval.utils import simple_parse_args_string

        try:
            value = simple_parse_args_string(value)
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"{where}: expected key=value,key2=value2, but got {value!r}") from (
                exc
            )
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where}: expected a mapping of generation arguments, but got {value!r}")
    return dict(value)


def task_options(data: Any, where: str) -> TaskOptions:
    """Validate an `eval.lm_eval:` mapping (or the CLI flags gathered into one)."""
    if data is None:
        return TaskOptions()
    check_keys(data, LM_EVAL_OPTIONS, where, "lm-eval option")
    n = data.get("num_fewshot")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"{where}.num_fewshot: expected an integer >= 0, but got {n!r}")
    for key in ("apply_chat_template", "fewshot_as_multiturn"):
        v = data.get(key)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"{where}.{key}: expected true or false, but got {v!r}")
    system = data.get("system_instruction")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"{where}.system_instruction: expected a string, but got {system!r}")
    return TaskOptions(
        num_fewshot=n,
        apply_chat_template=data.get("apply_chat_template"),
        system_instruction=system,
        fewshot_as_multiturn=data.get("fewshot_as_multiturn", True) is not False,
        gen_kwargs=parse_gen_kwargs(data.get("gen_kwargs"), f"{where}.gen_kwargs"),
    )


def parse_vllm_args(pairs: list[str] | None, where: str = "--vllm-arg") -> dict[str, Any]:
    """`KEY=VALUE` strings (values read as YAML scalars: 0.5, true, 4096) -> a mapping."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: expected KEY=VALUE, but got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[key.strip()] = text
    return out
