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
- logistic (ours): per layer, a bias-free multinomial logistic regression that tells apart the
  experts' positive prompts token by token. Each expert's prompts run through the base with that
  expert's MLPs in place, which is exactly what the MoE's router sees when it routes them to that
  expert. The mean-based modes send most tokens right but nearly never every token of a sequence
  (each misrouted token of a prompt is a chance to lose the answer); see the README's MoE table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.moe.config import Expert

if TYPE_CHECKING:
    import torch

    from evomerge.merge.io import CheckpointReader

FIT_STEPS = 300  # full-batch Adam steps of the logistic router (deterministic: zero init)
FIT_LR = 0.05
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


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


def token_mlp_inputs(model: object, tok: object, prompts: list[str]) -> torch.Tensor:
    """Every prompt token's MLP input at every layer -> (n_layers, n_tokens, hidden).

    One right-padded batch: with causal attention, padding after a prompt never changes it."""
    import torch

    rows = [_encode(tok, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (prompts, width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    layers = model.model.layers  # type: ignore[attr-defined]
    seen: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().float()))
        for layer in layers
    ]
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)  # type: ignore[operator]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([x.cpu()[mask] for x in seen])  # (n_layers, n_tokens, hidden)


def _load_mlps(model: object, reader: CheckpointReader) -> None:
    """Copy one expert's MLP weights into the (base) model, in place."""
    import torch

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):  # type: ignore[attr-defined]
            for proj in MLP_PROJ:
                w = reader.get_tensor(f"model.layers.{i}.mlp.{proj}.weight")
                getattr(layer.mlp, proj).weight.copy_(w)


def fit_logistic(feats: list[torch.Tensor]) -> torch.Tensor:
    """Bias-free softmax regression per layer: feats[j] (n_layers, n_j, hidden) are expert j's
    tokens -> rows (n_layers, n_experts, hidden). Classes are weighted equally."""
    import torch

    x = torch.cat(feats, dim=1)  # (n_layers, n_tokens, hidden)
    n_layers, _, hidden = x.shape
    y = torch.cat([torch.full((f.shape[1],), j) for j, f in enumerate(feats)])
    balance = torch.tensor([x.shape[1] / (len(feats) * f.shape[1]) for f in feats])
    w = torch.zeros(n_layers, len(feats), hidden, requires_grad=True)
    opt = torch.optim.Adam([w], lr=FIT_LR)
    for _ in range(FIT_STEPS):
        logits = torch.einsum("lnh,leh->lne", x, w)  # (n_layers, n_tokens, n_experts)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, len(feats)), y.repeat(n_layers), weight=balance
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach()


def logistic_rows(
    base_path: Path, experts: list[Expert], readers: list[CheckpointReader], device: str
) -> torch.Tensor:
    """gate_mode logistic -> (n_layers, n_experts, hidden), float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
    model.eval()
    feats = []
    for e, r in zip(experts, readers, strict=True):
        _load_mlps(model, r)
        feats.append(token_mlp_inputs(model, tok, e.positive_prompts))
    return fit_logistic(feats)


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
    readers: list[CheckpointReader] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> torch.Tensor:
    """Router weights for every layer -> (n_layers, n_experts, hidden), float32."""
    import torch

    if mode == "hidden":
        return hidden_rows(base_path, experts, device)
    if mode == "logistic":
        assert readers is not None  # internal: the caller passes the experts' checkpoints
        return logistic_rows(base_path, experts, readers, device)
    if mode == "cheap_embed":
        assert embed is not None  # internal: the caller reads it from the base checkpoint
        return cheap_embed_rows(base_path, embed, experts, n_layers)
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n_layers, len(experts), hidden, generator=g)
    return torch.zeros(n_layers, len(experts), hidden)  # uniform


def top1_choices(model: object, tok: object, prompts: list[str]) -> list[torch.Tensor]:
    """Which expert each layer's router ranks first for every token of each prompt.

    Works for any loaded MoE whose layers have `mlp.gate.weight` (n_experts, hidden): Qwen2-MoE
    and Mixtral in transformers 5. Returns one (n_layers, n_tokens) tensor per prompt.
    """
    import torch

    layers = model.model.layers  # type: ignore[attr-defined]
    seen: list[torch.Tensor] = []
    hooks = []
    for layer in layers:

        def choose(mod: object, args: tuple) -> None:
            x = args[0].detach()[0].float()  # (tokens, hidden)
            seen.append((x @ mod.gate.weight.float().T).argmax(dim=-1).cpu())  # type: ignore[attr-defined]

        hooks.append(layer.mlp.register_forward_pre_hook(choose))
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    out = []
    try:
        with torch.no_grad():
            for p in prompts:
                seen.clear()
                model(input_ids=torch.tensor([_encode(tok, p)], device=device), use_cache=False)  # type: ignore[operator]
                out.append(torch.stack(seen))
    finally:
        for h in hooks:
            h.remove()
    return out
