"""The `evomerge moe` config: mergekit-moe's YAML format, validated with one-line errors.

```yaml
base_model: zoo/base            # attention, norms, embeddings (and the router's hidden states)
gate_mode: hidden               # hidden | cheap_embed | random | uniform | logistic
dtype: float32                  # output dtype (default: the base model's)
experts_per_token: 2            # top-k (zoo: top-2 beats top-1 by 2.6 points; 3, 4 add nothing)
experts:
  - source_model: zoo/add       # its MLP becomes one expert
    positive_prompts: ["add 12+34="]  # logistic: give 100+ texts (zoo: 10 lose 17 points)
    negative_prompts: ["rev abc="]    # optional
shared_experts:                 # optional, Qwen2-MoE only: at most one, an always-on MLP
  - source_model: zoo/base
    positive_prompts: [...]
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.common.yaml_file import parse_yaml
from evomerge.errors import ConfigError, check_keys, did_you_mean

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform", "logistic")
PROMPT_MODES = ("hidden", "cheap_embed", "logistic")  # the modes that read positive_prompts
DTYPES = ("float32", "float16", "bfloat16")
TOP_KEYS = (
    "base_model",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "experts",
    "shared_experts",
    "architecture",
)
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts")
ARCHITECTURES = ("mixtral", "qwen")


@dataclass
class Expert:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)


@dataclass
class MoeConfig:
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None  # None: from the experts' model_type


def _prompts(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{where}: expected a list of non-empty strings, but got {value!r}")
    return list(value)


def _expert(raw: Any, where: str, need_prompts: bool) -> Expert:
    if isinstance(raw, str):
        raw = {"source_model": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with source_model, but got {raw!r}")
    check_keys(raw, EXPERT_KEYS, where, "key")
    src = raw.get("source_model")
    if not isinstance(src, str) or not src:
        raise ConfigError(f"{where}.source_model: expected a model path, but got {src!r}")
    pos = _prompts(raw.get("positive_prompts"), f"{where}.positive_prompts")
    neg = _prompts(raw.get("negative_prompts"), f"{where}.negative_prompts")
    if need_prompts and not pos:
        raise ConfigError(
            f"{where}.positive_prompts: gate modes {', '.join(PROMPT_MODES)} need at least "
            f"one positive prompt per expert, but {src} has none"
        )
    return Expert(src, pos, neg)


def _experts(raw: Any, where: str, need_prompts: bool) -> list[Expert]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of experts, but got {type(raw).__name__}")
    return [_expert(e, f"{where}[{i}]", need_prompts) for i, e in enumerate(raw)]


def _choice(data: dict[str, Any], key: str, allowed: tuple[str, ...], default: Any) -> Any:
    value = data.get(key, default)
    if value is not None and value not in allowed:
        raise ConfigError(f"{key}: {did_you_mean(str(value), allowed, key)}")
    return value


def parse_moe_config(data: Any) -> MoeConfig:
    """A parsed YAML document -> MoeConfig; ConfigError (one line) on anything wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"moe config: expected a mapping, but got {type(data).__name__}")
    check_keys(data, TOP_KEYS, "moe config", "key")
    base = data.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base_model: expected a model path, but got {base!r}")
    gate_mode = _choice(data, "gate_mode", GATE_MODES, "hidden")
    need_prompts = gate_mode in PROMPT_MODES
    experts = _experts(data.get("experts"), "experts", need_prompts)
    if gate_mode == "logistic" and any(e.negative_prompts for e in experts):
        raise ConfigError(
            "negative_prompts: expected none with gate_mode logistic (each expert's positive "
            "prompts are the negatives of the others), but got some"
        )
    if len(experts) < 2:
        raise ConfigError(f"experts: expected at least 2 experts, but got {len(experts)}")
    shared = _experts(data.get("shared_experts"), "shared_experts", need_prompts)
    if len(shared) > 1:
        raise ConfigError(f"shared_experts: expected at most 1, but got {len(shared)}")
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(experts):
        raise ConfigError(
            f"experts_per_token: expected an integer from 1 to the number of experts "
            f"({len(experts)}), but got {k!r}"
        )
    return MoeConfig(
        base_model=base,
        experts=experts,
        gate_mode=gate_mode,
        dtype=_choice(data, "dtype", DTYPES, None),
        experts_per_token=k,
        shared_experts=shared,
        architecture=_choice(data, "architecture", ARCHITECTURES, None),
    )


def load_moe_config(path: str | Path) -> MoeConfig:
    """Read and validate a mergekit-moe YAML file; relative model paths stay as written."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"moe config: expected a YAML file, but {path} does not exist")
    return parse_moe_config(parse_yaml(path.read_text(), str(path)))
