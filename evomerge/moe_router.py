"""Router (gate) rows for a mixture of dense experts: one row per expert per layer.

Modes (mergekit-moe's, with `uniform` added):
- hidden: the base model's mean hidden state at each layer's MLP input (what the router sees:
  the post-attention-norm output) over an expert's positive prompts, minus the same over its
  negative prompts, normalized to unit length. mergekit takes the residual stream entering each
  layer (and by default the last token only); we average over every prompt token at the exact
  point where the router sits, so a token that looks like the prompts scores highest.
- cheap_embed: the same from raw token embeddings, one vector repeated for every layer.
- random: standard normal rows (seeded, so a rebuild gives the same bytes).
- uniform: zero rows, so every expert gets the same router probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.moe_config import Expert

if TYPE_CHECKING:
    import torch


def _encode(tok: object, prompt: str) -> list[int]:
    """Token ids of one prompt, with the BOS token in front when the tokenizer has one."""
    bos = getattr(tok, "bos_token", None) or ""
    return tok(bos + prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]


def mlp_input_means(model: object, tok: object, prompts: list[str]) -> torch.Tensor:
    """Mean over prompts of each prompt's mean MLP input per layer -> (n_layers, hidden)."""
    import torch

    layers = model.model.layers  # type: ignore[attr-defined]
    seen: list[torch.Tensor | None] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):

        def grab(_mod: object, args: tuple, i: int = i) -> None:
            seen[i] = args[0].detach()[0].float().mean(dim=0)  # (hidden,)

        hooks.append(layer.mlp.register_forward_pre_hook(grab))
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    total = None
    try:
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([_encode(tok, p)], device=device)
                model(input_ids=ids, use_cache=False)  # type: ignore[operator]
                step = torch.stack([s for s in seen if s is not None])  # (n_layers, hidden)
                total = step if total is None else total + step
    finally:
        for h in hooks:
            h.remove()
    return total / len(prompts)  # type: ignore[operator]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def hidden_rows(base_path: Path, experts: list[Expert], device: str) -> torch.Tensor:
    """gate_mode hidden -> (n_layers, n_experts, hidden), float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
    model.eval()
    rows = []
    for e in experts:
        v = mlp_input_means(model, tok, e.positive_prompts)
        if e.negative_prompts:
            v = v - mlp_input_means(model, tok, e.negative_prompts)
        rows.append(_unit(v).cpu())
    return torch.stack(rows, dim=1)  # (n_layers, n_experts, hidden)


def cheap_embed_rows(
    base_path: Path, embed: torch.Tensor, experts: list[Expert], n_layers: int
) -> torch.Tensor:
    """gate_mode cheap_embed: normalized mean token embedding, the same for every layer."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    embed = embed.float()

    def mean_embed(prompts: list[str]) -> torch.Tensor:
        ids = [i for p in prompts for i in _encode(tok, p)]
        return _unit(embed[torch.tensor(ids)].mean(dim=0))  # (hidden,)

    rows = []
    for e in experts:
        v = mean_embed(e.positive_prompts)
        if e.negative_prompts:
            v = _unit(v - mean_embed(e.negative_prompts))
        rows.append(v)
    return torch.stack(rows).expand(n_layers, -1, -1).clone()  # (n_layers, n_experts, hidden)


def gate_rows(
    mode: str,
    experts: list[Expert],
    *,
    base_path: Path,
    n_layers: int,
    hidden: int,
    embed: torch.Tensor | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> torch.Tensor:
    """Router weights for every layer -> (n_layers, n_experts, hidden), float32."""
    import torch

    if mode == "hidden":
        return hidden_rows(base_path, experts, device)
    if mode == "cheap_embed":
        assert embed is not None  # internal: the caller reads it from the base checkpoint
        return cheap_embed_rows(base_path, embed, experts, n_layers)
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n_layers, len(experts), hidden, generator=g)
    return torch.zeros(n_layers, len(experts), hidden)  # uniform


def top1_counts(model: object, tok: object, prompts: list[str]) -> torch.Tensor:
    """How many prompt tokens each layer's router sends top-1 to each expert.

    Works for any loaded MoE whose layers have `mlp.gate.weight` (n_experts, hidden): Qwen2-MoE
    and Mixtral in transformers 5. Returns (n_layers, n_experts) token counts.
    """
    import torch

    layers = model.model.layers  # type: ignore[attr-defined]
    n_exp = layers[0].mlp.gate.weight.shape[0]
    counts = torch.zeros(len(layers), n_exp, dtype=torch.long)
    hooks = []
    for i, layer in enumerate(layers):

        def count(mod: object, args: tuple, i: int = i) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, hidden)
            top = (x @ mod.gate.weight.float().T).argmax(dim=-1)  # type: ignore[attr-defined]
            counts[i] += torch.bincount(top, minlength=n_exp).cpu()

        hooks.append(layer.mlp.register_forward_pre_hook(count))
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    try:
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([_encode(tok, p)], device=device)
                model(input_ids=ids, use_cache=False)  # type: ignore[operator]
    finally:
        for h in hooks:
            h.remove()
    return counts
