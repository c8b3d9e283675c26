"""Shared fixtures: tiny random Hugging Face checkpoints written to disk, with a real tokenizer.

`tiny_model(arch="llama", seed=0, num_layers=2, ...)` writes a folder with config.json,
model.safetensors (or shards), tokenizer.json + tokenizer_config.json and generation_config.json,
and returns its Path. The tensors are built by name (no transformers import), so the fixture is
fast; the folders load with `AutoModelForCausalLM.from_pretrained` for llama, mistral and qwen2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,+=?!-")
ARCHS = {
    "llama": ("LlamaForCausalLM", False),  # (architecture class, qkv biases)
    "mistral": ("MistralForCausalLM", False),
    "qwen2": ("Qwen2ForCausalLM", True),
}


def tiny_vocab(vocab_size: int) -> list[str]:
    """Specials, then characters, then `<tN>` fillers up to vocab_size tokens."""
    base = SPECIALS + CHARS
    fillers = [f"<t{i}>" for i in range(max(0, vocab_size - len(base)))]
    return (base + fillers)[:vocab_size]


def write_tokenizer(out: Path, vocab: Sequence[str], extra_tokens: Sequence[str] = ()) -> None:
    """A character-level WordLevel tokenizer.json; extra_tokens are added tokens (matched whole)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens([t for t in SPECIALS if t in vocab])
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 64,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def tiny_config(arch: str, num_layers: int, vocab_size: int, hidden: int, tie: bool) -> dict:
    cls, _ = ARCHS[arch]
    cfg = {
        "architectures": [cls],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        cfg["layer_types"] = ["full_attention"] * num_layers
        cfg["use_sliding_window"] = False
        cfg["max_window_layers"] = num_layers
    return cfg


def tiny_state_dict(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights named as transformers names them (std 0.05, norms around 1)."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    bias = ARCHS[cfg["model_type"]][1]

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"model.embed_tokens.weight": rnd(v, h, scale=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1 + rnd(h)).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + rnd(h)).to(dtype)
        for name, rows in (("q", h), ("k", kv), ("v", kv)):
            sd[p + f"self_attn.{name}_proj.weight"] = rnd(rows, h)
            if bias:
                sd[p + f"self_attn.{name}_proj.bias"] = rnd(rows)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, h)
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, inter)
    sd["model.norm.weight"] = (1 + rnd(h)).to(dtype)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(v, h)
    return sd


def write_tiny_model(
    out: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    num_layers: int = 2,
    vocab_size: int = 64,
    extra_tokens: Sequence[str] = (),
    hidden: int = 32,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Path:
    """Write a tiny random checkpoint; the embedding has vocab_size + len(extra_tokens) rows."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab(vocab_size)
    n_rows = vocab_size + len(extra_tokens)
    cfg = tiny_config(arch, num_layers, n_rows, hidden, tie)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    sd = tiny_state_dict(cfg, seed, dtype)
    if shards == 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(sd)
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: sd[n] for n in part}, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_tokenizer(out, vocab, extra_tokens)
    return out


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """Factory: tiny_model(name="m0", arch="llama", seed=0, num_layers=2, vocab_size=64, ...)."""

    def make(name: str | None = None, **kwargs) -> Path:
        if name is None:
            name = f"{kwargs.get('arch', 'llama')}-{kwargs.get('seed', 0)}"
        return write_tiny_model(tmp_path / "models" / name, **kwargs)

    return make


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single or sharded safetensors), read eagerly."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def read_tensors() -> Callable[[Path], dict[str, torch.Tensor]]:
    return load_tensors


def needs_compiler() -> pytest.MarkDecorator:
    """Mark for the compiled-kernel tests: skipped where no C++ compiler is present (or
    EVOMERGE_COMPILE=0), but failed under CI (env CI set): searches use the compiled path, so
    CI must install a compiler rather than let these tests vanish."""
    import os

    from evomerge.merge.kernel import compile_available

    if compile_available("cpu"):
        return pytest.mark.compiled
    if os.environ.get("CI"):
        return pytest.mark.usefixtures("_compiler_missing_on_ci")
    return pytest.mark.skip(reason="no C++ compiler for inductor, or EVOMERGE_COMPILE=0")


@pytest.fixture
def _compiler_missing_on_ci() -> None:
    pytest.fail(
        "CI is set but torch.compile has no C++ compiler (or EVOMERGE_COMPILE=0): install one "
        "(e.g. apt-get install g++) so the compiled kernels the search uses are tested"
    )


def write_sparse_checkpoint(
    folder: Path, shapes: dict[str, list[int]], cfg: dict, shard_bytes: int | None = None
) -> None:
    """config.json + bf16 safetensors files whose headers list every tensor, truncated to their
    full size: sparse files that header readers see at full scale and reads return zeros from
    (planning and streaming tests at 7B-14B scale with no weights on disk).

    shard_bytes: None, one model.safetensors; else shards of at most that many tensor bytes (a
    larger tensor alone) named and indexed as save_pretrained names them (hub releases of
    7B-14B models are sharded at 5 GB; one 29.5 GB file is more than some readers can mmap)."""
    import math
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    shards: list[dict[str, list[int]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        if shard_bytes is not None and shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    names = (
        ["model.safetensors"]
        if shard_bytes is None
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards, strict=True):
        header, offset = {}, 0
        for name, shape in shard.items():
            n = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
    if shard_bytes is not None:
        total = sum(math.prod(shape) * 2 for shape in shapes.values())
        pairs = zip(names, shards, strict=True)
        weight_map = {name: file for file, shard in pairs for name in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
