"""`evomerge moe CONFIG.yaml OUT_DIR`: a mixture of experts built from dense experts.

Attention, norms and embeddings come from the base model; each expert's MLP becomes one expert;
the router rows come from evomerge.moe.router. Qwen2 experts give a Qwen2MoeForCausalLM, Llama
and Mistral experts a MixtralForCausalLM. Tensors are written under the names of the Hugging
Face checkpoints of those models (per-expert MLPs, which transformers fuses on load and vLLM
reads directly), through CheckpointWriter: sharded, and moved into place only when complete.

Qwen2-MoE always has a shared expert. With no `shared_experts` in the config we give it width 1
and all-zero weights: it adds exactly nothing, so the MoE is the experts and nothing else. Width 0
would say the same more directly, but vLLM then builds no shared expert and refuses the
zero-size tensors ("There is no module or parameter named 'model.layers.0.mlp.shared_expert'"),
while transformers always builds one and, with the tensors left out, reports them missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.moe.config import MoeConfig, load_moe_config

if TYPE_CHECKING:
    import torch

    from evomerge.merge.io import CheckpointReader

DENSE_TYPES = ("llama", "mistral", "qwen2")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
NULL_SHARED_WIDTH = 1  # Qwen2-MoE shared expert when none is configured: all zeros (see above)


def _check_compatible(base: CheckpointReader, others: dict[str, CheckpointReader]) -> str:
    """All models share model_type and shapes; returns the model_type."""
    mtype = base.config.get("model_type")
    if mtype not in DENSE_TYPES:
        raise ConfigError(
            f"base_model {base.path}: expected model_type one of {', '.join(DENSE_TYPES)}, "
            f"but got {mtype!r}"
        )
    for src, r in others.items():
        if r.config.get("model_type") != mtype:
            raise ConfigError(
                f"expert {src}: expected model_type {mtype!r} like the base model, "
                f"but got {r.config.get('model_type')!r}"
            )
        for key in SHAPE_KEYS:
            if r.config.get(key) != base.config.get(key):
                raise ConfigError(
                    f"expert {src}: expected {key}={base.config.get(key)} like the base model, "
                    f"but got {r.config.get(key)}"
                )
    if base.config.get("mlp_bias"):
        raise ConfigError(f"base_model {base.path}: MLPs with biases (mlp_bias) are not supported")
    return mtype


def _arch(cfg: MoeConfig, mtype: str) -> str:
    arch = cfg.architecture or ("qwen" if mtype == "qwen2" else "mixtral")
    if arch == "mixtral" and mtype == "qwen2":
        raise ConfigError(
            "architecture: expected qwen for Qwen2 experts (Mixtral has no attention biases), "
            "but got mixtral"
        )
    if arch == "mixtral" and cfg.shared_experts:
        raise ConfigError("shared_experts: expected none for a Mixtral output, but got 1")
    return arch


def _rope(base_path: Path) -> dict[str, Any] | None:
    """The base's RoPE parameters as transformers resolves them, defaults included: Mixtral's
    default rope_theta (1e6) is not Llama's (1e4), so leaving them implicit would change them."""
    from transformers import AutoConfig

    rope = getattr(AutoConfig.from_pretrained(base_path), "rope_parameters", None)
    return dict(rope) if rope else None


def out_config(
    base_cfg: dict[str, Any], cfg: MoeConfig, arch: str, dtype: str, rope: dict[str, Any] | None
) -> dict[str, Any]:
    """The output config.json: the base's, turned into Qwen2-MoE or Mixtral."""
    out = {k: v for k, v in base_cfg.items() if not k.startswith("_")}
    out.pop("torch_dtype", None)
    if rope:
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = rope
    out["dtype"] = dtype
    out["num_experts_per_tok"] = cfg.experts_per_token
    if arch == "qwen":
        inter = base_cfg["intermediate_size"]
        out.update(
            architectures=["Qwen2MoeForCausalLM"],
            model_type="qwen2_moe",
            num_experts=len(cfg.experts),
            moe_intermediate_size=inter,
            shared_expert_intermediate_size=inter if cfg.shared_experts else NULL_SHARED_WIDTH,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            qkv_bias=True,
            output_router_logits=False,
        )
    else:
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=len(cfg.experts),
            output_router_logits=False,
        )
        out.pop("mlp_bias", None)
        out.pop("attention_bias", None)
    return out


def _base_tensors(base: CheckpointReader, arch: str, cfg_out: dict[str, Any]) -> dict[str, Any]:
    """Output name -> (shape, loader) for everything taken from the base model."""
    specs: dict[str, Any] = {}
    for name in base.keys():
        if ".mlp." in name or "rotary_emb" in name:
            continue
        specs[name] = (base.shape(name), lambda n=name: base.get_tensor(n))
    if arch == "qwen":  # Qwen2-MoE always has q/k/v biases: zeros where the base has none
        import torch

        head = cfg_out.get("head_dim") or cfg_out["hidden_size"] // cfg_out["num_attention_heads"]
        for i in range(cfg_out["num_hidden_layers"]):
            for proj, heads in (("q", "num_attention_heads"), ("k", "num_key_value_heads"),
                                ("v", "num_key_value_heads")):  # fmt: skip
                name = f"model.layers.{i}.self_attn.{proj}_proj.bias"
                if name not in specs:
                    n = cfg_out[heads] * head
                    specs[name] = ((n,), lambda n=n: torch.zeros(n))
    return specs


def _mlp_tensors(
    readers: list[CheckpointReader], arch: str, n_layers: int, shared: CheckpointReader | None
) -> dict[str, Any]:
    """Output name -> (shape, loader) for the experts' (and shared expert's) MLPs."""
    specs: dict[str, Any] = {}
    for i in range(n_layers):
        for proj in MLP_PROJ:
            src = f"model.layers.{i}.mlp.{proj}.weight"
            for j, r in enumerate(readers):
                if arch == "qwen":
                    name = f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"
                else:
                    name = (
                        f"model.layers.{i}.block_sparse_moe.experts.{j}.{MIXTRAL_PROJ[proj]}.weight"
                    )
                specs[name] = (r.shape(src), lambda r=r, s=src: r.get_tensor(s))
            if arch == "qwen":
                name = f"model.layers.{i}.mlp.shared_expert.{proj}.weight"
                if shared is not None:
                    specs[name] = (shared.shape(src), lambda s=src: shared.get_tensor(s))
                else:  # all zeros: silu(0) * 0 = 0 goes through a zero down_proj
                    rows, cols = readers[0].shape(src)
                    w = NULL_SHARED_WIDTH
                    shape = (w, cols) if proj != "down_proj" else (rows, w)
                    specs[name] = (shape, lambda shape=shape: _zeros(shape))
    return specs


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    return torch.zeros(shape)


def _router_tensors(
    gates: torch.Tensor, shared_gates: torch.Tensor | None, arch: str
) -> dict[str, Any]:
    """gates: (n_layers, n_experts, hidden); shared_gates: (n_layers, 1, hidden) or None."""
    specs: dict[str, Any] = {}
    for i in range(gates.shape[0]):
        prefix = f"model.layers.{i}.{'mlp' if arch == 'qwen' else 'block_sparse_moe'}"
        specs[f"{prefix}.gate.weight"] = (tuple(gates[i].shape), lambda g=gates[i]: g)
        if arch == "qwen":
            sg = shared_gates[i] if shared_gates is not None else gates.new_zeros(1, gates.shape[2])
            specs[f"{prefix}.shared_expert_gate.weight"] = (tuple(sg.shape), lambda g=sg: g)
    return specs


def _open_all(cfg: MoeConfig) -> tuple[CheckpointReader, list[CheckpointReader], Any]:
    from evomerge.merge.io import open_checkpoint

    cache: dict[str, CheckpointReader] = {}

    def get(ref: str) -> CheckpointReader:
        if ref not in cache:
            cache[ref] = open_checkpoint(ref)
        return cache[ref]

    base = get(cfg.base_model)
    experts = [get(e.source_model) for e in cfg.experts]
    shared = get(cfg.shared_experts[0].source_model) if cfg.shared_experts else None
    others = {e.source_model: get(e.source_model) for e in cfg.experts + cfg.shared_experts}
    _check_compatible(base, others)
    for e in cfg.experts + cfg.shared_experts:
        missing = [
            p
            for p in MLP_PROJ
            if f"model.layers.0.mlp.{p}.weight" not in get(e.source_model).keys()
        ]
        if missing:
            raise ConfigError(
                f"expert {e.source_model}: expected dense MLP tensors, missing {missing}"
            )
    return base, experts, shared


def build_moe(
    cfg: MoeConfig, out_dir: str | Path, *, device: str = "cpu", max_shard_bytes: int = 5 * 10**9
) -> Path:
    """Write the MoE checkpoint (config, shards, tokenizer of the base) into out_dir."""
    from evomerge.merge.io import torch_dtype
    from evomerge.merge.writer import CheckpointWriter
    from evomerge.moe.router import gate_rows

    base, experts, shared = _open_all(cfg)
    arch = _arch(cfg, base.config["model_type"])
    dtype = cfg.dtype or base.config.get("torch_dtype") or base.config.get("dtype") or "float32"
    cfg_out = out_config(base.config, cfg, arch, dtype, _rope(base.path))
    n_layers, hidden = cfg_out["num_hidden_layers"], cfg_out["hidden_size"]
    embed = base.get_tensor("model.embed_tokens.weight") if cfg.gate_mode == "cheap_embed" else None
    kw = dict(base_path=base.path, n_layers=n_layers, hidden=hidden, embed=embed, device=device)
    gates = gate_rows(
        cfg.gate_mode, cfg.experts, readers=experts, **kw
    )  # (layers, experts, hidden)
    shared_mode = "hidden" if cfg.gate_mode == "logistic" else cfg.gate_mode  # one row: no classes
    shared_gates = gate_rows(shared_mode, cfg.shared_experts, seed=1, **kw) if shared else None
    specs = {**_base_tensors(base, arch, cfg_out), **_mlp_tensors(experts, arch, n_layers, shared)}
    specs.update(_router_tensors(gates, shared_gates, arch))
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, dtype=torch_dtype(dtype)) as w:
        w.plan([(name, shape) for name, (shape, _) in specs.items()])
        for name, (_, load) in specs.items():
            w.add(name, load())
        return w.finish(cfg_out, copy_from=base.path)


def cli_moe(args: argparse.Namespace) -> int:
    cfg = load_moe_config(args.config)
    out = build_moe(cfg, args.out_dir, device=args.device)
    print(f"wrote {len(cfg.experts)}-expert MoE (top-{cfg.experts_per_token}, "
          f"gate_mode {cfg.gate_mode}) to {out}")  # fmt: skip
    return 0
