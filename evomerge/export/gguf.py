"""`evomerge export --gguf f16|bf16|q8_0`: the exported checkpoint as one GGUF file for llama.cpp,
Ollama and LM Studio, written with the `gguf` package (llama.cpp's own gguf-py).

What llama.cpp's convert_hf_to_gguf.py does for these architectures, and what transformers'
GGUF loader (modeling_gguf_pytorch_utils.py) undoes: tensors renamed by gguf-py's tensor name
map (token_embd, blk.N.attn_q, ..., output_norm, output); Llama and Mistral are written as arch
`llama` with Q and K rows permuted from HF's rotate-half layout to GGML's interleaved RoPE
layout (transformers reverses it for `llama`); Qwen2 as `qwen2`, unpermuted, with its QKV biases.
1-D tensors (norms, biases) stay float32, as llama.cpp keeps them; q8_0 needs rows that are a
multiple of 32 and falls back to f16 for the others, as llama.cpp does. The tokenizer goes in as
`gpt2` (byte-level BPE: tokens, token types, merges) when tokenizer.json is BPE or WordLevel;
transformers reads it back encoding as tokenizer.json does, except that a WordLevel vocabulary's
out-of-vocabulary characters are dropped instead of becoming <unk>.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

GGUF_TYPES = ("f16", "bf16", "q8_0")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF arch
PERMUTED = {"llama"}  # GGUF archs whose Q/K rows llama.cpp permutes


def check_gguf_arch(config: dict[str, Any], where: str) -> str:
    """The GGUF arch for an HF config; ConfigError naming the supported types otherwise."""
    model_type = str(config.get("model_type"))
    if model_type not in ARCHS:
        raise ConfigError(
            f"--gguf: expected a model of type {', '.join(sorted(ARCHS))}, got '{model_type}' "
            f"({where})"
        )
    return ARCHS[model_type]


def permute_qk(w: Any, n_head: int) -> Any:
    """HF rotate-half rows -> GGML interleaved rows (llama.cpp's LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(cfg, "rope_theta", None) or 10000.0)


def _add_hparams(w: Any, cfg: Any, arch: str) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":  # transformers reads head_dim from it for llama (qwen2 ignores it)
        w.add_rope_dimension_count(head_dim)


def _add_tokenizer(w: Any, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.json -> gguf `gpt2` tokenizer: every id up to the embedding's rows, its type
    (1 normal, 3 control for special added tokens, 4 user-defined), BPE merges."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") not in ("BPE", "WordLevel"):
        return  # Unigram / SentencePiece: llama.cpp's `llama` tokenizer needs tokenizer.model
    tokens = {int(i): t for t, i in model.get("vocab", {}).items()}
    types = dict.fromkeys(tokens, 1)
    for added in tok.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = 3 if added.get("special") else 4
    n = max(vocab_size, max(tokens, default=-1) + 1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(n)])
    w.add_token_types([types.get(i, 5) for i in range(n)])  # 5: unused
    w.add_token_scores([0.0] * n)  # BPE ranks live in the merges; transformers' reader wants them
    merges = model.get("merges") or []
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    unk = model.get("unk_token")
    if unk in model.get("vocab", {}):  # WordLevel's out-of-vocabulary token
        w.add_unk_token_id(int(model["vocab"][unk]))
    for key, setter in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id)):  # fmt: skip
        value = _special_id(model_dir, key)
        if value is not None:
            setter(value)


def _special_id(model_dir: Path, key: str) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = model_dir / name
        if f.is_file():
            value = json.loads(f.read_text()).get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return None


def _tensor(gguf: Any, data: Any, qtype: str) -> tuple[Any, Any]:
    """(array, raw dtype) for add_tensor: float32 for 1-D, else the requested type."""
    import numpy as np

    T = gguf.GGMLQuantizationType
    data = data.astype(np.float32)
    if data.ndim == 1:
        return data, T.F32
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    if qtype == "bf16":
        return gguf.quants.quantize(data, T.BF16), T.BF16
    return data.astype(np.float16), T.F16


def write_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """Write the HF checkpoint in `model_dir` as a GGUF file `out` (llama.cpp's layout)."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"--gguf: expected one of {', '.join(GGUF_TYPES)}, got '{qtype}'")
    model_dir, out = Path(model_dir), Path(out)
    arch = check_gguf_arch(json.loads((model_dir / "config.json").read_text()), str(model_dir))
    cfg = AutoConfig.from_pretrained(model_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    w = gguf.GGUFWriter(out, arch)
    # transformers loads a `llama` GGUF named exactly "mistral" as Mistral, which gguf-py cannot map
    name = model_dir.name
    w.add_name(f"{name}-merge" if name == "mistral" else name)
    w.add_file_type({"f16": 1, "bf16": 32, "q8_0": 7}[qtype])  # llama.cpp's LLAMA_FTYPE values
    _add_hparams(w, cfg, arch)
    _add_tokenizer(w, model_dir, cfg.vocab_size)
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ConfigError(f"--gguf: no GGUF name for tensor '{key}' ({file})")
                data = f.get_tensor(key).float().numpy()
                if arch in PERMUTED and name.endswith(("attn_q.weight", "attn_k.weight")):
                    heads = cfg.num_attention_heads if "attn_q" in name else n_kv
                    data = permute_qk(data, heads)
                array, raw = _tensor(gguf, data, qtype)
                w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
