"""The live stacked model: a frankenmerge candidate built in the HF backend's model, no disk.

Every source model's decoder layers (and embeddings, final norm, lm_head) are made resident
once; a candidate rebuilds `model.model.layers` as a ModuleList of those modules following the
recipe's layer plan (merge/stack.py, the rules the disk merge follows). A layer is a shallow
module copy sharing the source's parameter tensors (views, not copies) with its own
`layer_idx`, so the KV cache indexes each position apart even where one layer is used twice;
a scaled layer gets its own scaled tensors (the exported recipe scales weights, so scored and
exported tensors are equal). `merged` is the live model's own modules, which the weight
candidate is written into in place. `reset()` puts the loaded model's modules back.
"""

from __future__ import annotations

import copy
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge.stack import Position, outer_keys, stack_plan
from evomerge.recipe import MergeStage
from evomerge.search.stacking import MERGED

Shell = dict[str, Any]  # {"layers", "embed", "norm", "head"}: one source's modules
# checkpoint name prefix of each shell part (the Llama family's names, as merge/arch.py)
PREFIXES = (
    ("model.layers.", "layers"), ("model.embed_tokens.", "embed"), ("model.norm.", "norm"),
    ("lm_head.", "head"),
)  # fmt: skip


def _shell(model: Any) -> Shell:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ConfigError(
            f"layer stacking needs a decoder with model.layers and model.norm "
            f"(Llama, Mistral, Qwen2...), but got {type(model).__name__}"
        )
    return {
        "layers": inner.layers,
        "embed": model.get_input_embeddings(),
        "norm": inner.norm,
        "head": model.get_output_embeddings(),
    }


class LiveStack:
    """Stacked candidates in one live HF model. `sources`: ref -> TensorSource (a checkpoint
    reader), for every stacking source but `merged`; `loaded`: the ref the live model holds
    unchanged (a stacking-only search), whose modules are used instead of a copy."""

    def __init__(self, model: Any, sources: dict[str, Any], loaded: str | None) -> None:
        import torch

        self.model = model
        self.own = _shell(model)
        cfg = model.config
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.saved = (cfg.num_hidden_layers, copy.copy(getattr(cfg, "layer_types", None)))
        self.shells: dict[str, Shell] = {MERGED: self.own}
        with torch.no_grad():
            for ref, reader in sources.items():
                if ref == loaded:
                    self.shells[ref] = self.own
                    continue
                shell = copy.deepcopy(self.own)  # deepcopy keeps a tied head tied
                for prefix, key in PREFIXES:
                    for name, p in shell[key].named_parameters():
                        if prefix + name in reader.keys():
                            p.copy_(reader.get_tensor(prefix + name))
                self.shells[ref] = shell

    def apply(self, stage: MergeStage, owned: bool = False) -> None:
        """Make the live model the stacked candidate of `stage`; `owned`: every tensor a fresh
        copy (the self-check's plain path) instead of views of the resident layers."""
        from torch import nn

        plan = stack_plan(stage)
        for pos in plan:
            if pos.key not in self.shells:
                raise ConfigError(f"stacking source '{pos.key}' is not resident")
        layers = [self._layer(pos, k, owned) for k, pos in enumerate(plan)]
        embed, norm, head = (self.shells[k] for k in outer_keys(plan, self.tied))
        self._install(nn.ModuleList(layers), embed["embed"], norm["norm"], head["head"], owned)
        types = self.saved[1]
        cfg = self.model.config
        cfg.num_hidden_layers = len(plan)
        if isinstance(types, list):
            cfg.layer_types = [types[min(pos.layer, len(types) - 1)] for pos in plan]

    def reset(self) -> None:
        o = self.own
        self._install(o["layers"], o["embed"], o["norm"], o["head"], False)
        cfg = self.model.config
        cfg.num_hidden_layers = self.saved[0]
        if self.saved[1] is not None:
            cfg.layer_types = copy.copy(self.saved[1])

    def _install(self, layers: Any, embed: Any, norm: Any, head: Any, owned: bool) -> None:
        if owned:  # one deepcopy: a tied head stays tied to the copied embeddings
            embed, norm, head = copy.deepcopy((embed, norm, head))
        inner = self.model.model
        inner.layers, inner.norm = layers, norm
        self.model.set_input_embeddings(embed)
        if head is not None:
            self.model.set_output_embeddings(head)

    def _layer(self, pos: Position, index: int, owned: bool) -> Any:
        src = self.shells[pos.key]["layers"][pos.layer]
        prefix = f"model.layers.{pos.layer}."
        return _view(src, index, prefix, pos, owned)


def _view(mod: Any, index: int, prefix: str, pos: Position, owned: bool) -> Any:
    """A shallow copy of `mod` and its submodules: shared parameters (copies when `owned`),
    scaled ones replaced, `layer_idx` set to the output position."""
    from torch import nn

    new = copy.copy(mod)
    new._modules = {
        k: None if m is None else _view(m, index, f"{prefix}{k}.", pos, owned)
        for k, m in mod._modules.items()
    }
    params = {}
    for k, p in mod._parameters.items():
        s = None if p is None else pos.scale_of(f"{prefix}{k}")
        if p is not None and (s is not None or owned):
            # scaled in float32 and rounded once, as the disk merge writes a scaled tensor
            t = (p.detach().float() * s).to(p.dtype) if s is not None else p.detach().clone()
            p = nn.Parameter(t, requires_grad=False)
        params[k] = p
    new._parameters = params
    if hasattr(new, "layer_idx"):
        new.layer_idx = index
    return new
