"""PEFT LoRA adapters as merge inputs: `BASE+ADAPTER` read as W + scale * B @ A, lazily.

An adapter folder holds adapter_config.json and adapter_model.safetensors, whose keys are
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (linear layers),
`.lora_embedding_A` / `.lora_embedding_B` (embeddings, stored transposed), `.lora_B.bias`
(lora_bias) and `<module>.weight` for modules_to_save (a full replacement). The delta is
computed as peft's `merge_and_unload` does (`transpose(B @ A, fan_in_fan_out) * scaling`, with
scaling alpha / r or alpha / sqrt(r) under rsLoRA, per-module r and alpha from rank_pattern /
alpha_pattern), one tensor at a time: the adapter's factors stay on disk until a tensor is read,
and no dense copy of the whole adapter ever exists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, MergeError, did_you_mean

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json options whose adapters are not a plain W + scale * B @ A
_REFUSED = {
    "use_dora": "DoRA adapters (use_dora) rescale W by a learned magnitude",
    "layer_replication": "layer_replication changes the model's layer count",
    "target_parameters": "LoRA on parameters (target_parameters) is not a per-module delta",
    "trainable_token_indices": "trainable_token_indices edits single embedding rows",
}


@dataclass(frozen=True)
class LoraFactor:
    """The low-rank delta of one base tensor: scale * B @ A (transposed when `transpose`)."""

    a_key: str
    b_key: str
    scale: float
    transpose: bool
    bias: bool = False  # a lora_bias entry: delta = scale * B.bias


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern matching the module's name (or a suffix)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """One PEFT LoRA folder: which base tensors it changes and how, read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        cfg_file = self.path / ADAPTER_CONFIG
        if not cfg_file.is_file():
            raise ConfigError(
                f"expected a PEFT LoRA adapter folder with {ADAPTER_CONFIG}, but {self.path} "
                "has none"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except ValueError as exc:
            raise ConfigError(f"{cfg_file}: not valid JSON ({exc})") from None
        self._check_config(cfg_file)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ConfigError(
                f"expected the adapter's weights in {weights} (safetensors), but it is missing"
            )
        from safetensors import safe_open

        try:
            self._file = safe_open(str(weights), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise MergeError(f"{weights}: not a valid safetensors file ({exc})") from None
        self.factors: dict[str, LoraFactor] = {}
        self.replaced: dict[str, str] = {}  # base tensor -> adapter key (modules_to_save)
        self._index(list(self._file.keys()))

    def _check_config(self, cfg_file: Path) -> None:
        cfg = self.config
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(
                f"{cfg_file}: expected a LoRA adapter (peft_type LORA), but got "
                f"peft_type {cfg.get('peft_type')!r}"
            )
        for key, why in _REFUSED.items():
            if cfg.get(key):
                raise ConfigError(
                    f"{cfg_file}: {key} is set, which evomerge cannot merge ({why}); expected "
                    "a plain LoRA adapter, or merge it into its model with peft first"
                )
        for key in ("r", "lora_alpha"):
            if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
                raise ConfigError(f"{cfg_file}: expected a positive '{key}', got {cfg.get(key)!r}")

    def _scale(self, module: str) -> float:
        cfg = self.config
        r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _index(self, keys: list[str]) -> None:
        fan = bool(self.config.get("fan_in_fan_out"))
        suffixes = {  # key suffix -> (partner suffix, tensor suffix, transpose, bias)
            ".lora_A.weight": (".lora_B.weight", ".weight", fan, False),
            ".lora_embedding_A": (".lora_embedding_B", ".weight", True, False),
            ".lora_B.bias": (".lora_B.bias", ".bias", False, True),
        }
        for key in keys:
            name = key.removeprefix(PREFIX)
            if ".lora_magnitude_vector" in name:
                raise ConfigError(f"{self.path}: '{key}' is a DoRA weight; expected plain LoRA")
            hit = next((s for s in suffixes if name.endswith(s)), None)
            if hit is not None:
                partner, tsuffix, transpose, bias = suffixes[hit]
                module = name[: -len(hit)]
                b_key = key[: -len(hit)] + partner
                if b_key not in keys:
                    raise MergeError(f"{self.path}: '{key}' has no partner '{b_key}'")
                self.factors[module + tsuffix] = LoraFactor(
                    key, b_key, self._scale(module), transpose, bias
                )
            elif re.search(r"\.lora_(B\.weight|embedding_B)$", name) or ".base_layer." in name:
                continue  # the B half (indexed with its A) or a saved copy of the base weight
            elif ".lora_" in name:
                raise ConfigError(f"{self.path}: '{key}' is no LoRA weight evomerge knows")
            else:  # modules_to_save: the adapter's full copy replaces the base tensor
                self.replaced[name.replace(".modules_to_save.default", "")] = key

    def touched(self) -> list[str]:
        """Every base tensor this adapter changes."""
        return [*self.factors, *self.replaced]

    def check_base(self, base: Any) -> None:
        """Every tensor the adapter changes exists in the base with the delta's shape."""
        names = set(base.keys())
        for name in self.touched():
            if name not in names:
                raise ConfigError(
                    f"adapter {self.path} changes tensor '{name}', but base model {base.path} "
                    f"has no such tensor; {did_you_mean(name, names, 'tensor')}"
                )
            want = tuple(base.shape(name))
            got = self.delta_shape(name)
            if got != want:
                raise ConfigError(
                    f"adapter {self.path} gives tensor '{name}' shape {got}, but base model "
                    f"{base.path} has {want}: expected an adapter trained on this base"
                )

    def delta_shape(self, name: str) -> tuple[int, ...]:
        if name in self.replaced:
            return tuple(self._file.get_slice(self.replaced[name]).get_shape())
        f = self.factors[name]
        b = tuple(self._file.get_slice(f.b_key).get_shape())
        if f.bias:
            return b
        a = tuple(self._file.get_slice(f.a_key).get_shape())
        return (a[1], b[0]) if f.transpose else (b[0], a[1])

    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A for one base tensor, float32, computed as peft's merge does."""
        f = self.factors[name]
        b = self._file.get_tensor(f.b_key).float()
        if f.bias:
            return b * f.scale
        out = b @ self._file.get_tensor(f.a_key).float()
        return (out.T if f.transpose else out) * f.scale

    def replacement(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self.replaced[name])


class LoraReader:
    """A base checkpoint reader seen through a LoRA adapter: tensors the adapter changes read
    as W + scale * B @ A (or the adapter's modules_to_save copy); all others pass through,
    and everything else (keys, shapes, config, path) is the base reader's.

    It wraps rather than subclasses io.CheckpointReader: io opens it, so lora must not
    import io (no import cycles, even inside functions)."""

    def __init__(self, base: Any, adapter_path: Path):
        self.base = base
        try:
            self.adapter = LoraAdapter(adapter_path)
            self.adapter.check_base(base)
        except BaseException:
            base.close()
            raise

    def __getattr__(self, attr: str) -> Any:  # keys, shape, dtype, config, path, close...
        return getattr(self.base, attr)

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.base.close()

    def _changes(self, name: str) -> bool:
        return name in self.adapter.factors or name in self.adapter.replaced

    def _apply(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The adapted tensor (float32) from the base tensor."""
        if name in self.adapter.replaced:
            return self.adapter.replacement(name).float()
        return base.float() + self.adapter.delta(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        import torch

        self.base.read_into(name, out)
        if not self._changes(name):
            return out
        if out.dtype == torch.float32 and name in self.adapter.factors:
            out.add_(self.adapter.delta(name).to(out.device))  # in place: no second copy
        else:
            out.copy_(self._apply(name, out))
        self.base._check_finite(name, out)
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.base.get_tensor(name)
        if not self._changes(name):
            return t
        out = self._apply(name, t).to(t.dtype)
        self.base._check_finite(name, out)
        return out
