"""What a loaded transformers model is set up with: batch size, dtype, maximum length, the
ids that end a generation (each resolved the way lm-eval's HFLM resolves it)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.errors import ConfigError, did_you_mean

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
_TOKENIZER_INFINITY = 1_000_000_000_000_000_019_884_624_838_656  # transformers' "no limit"


def parse_batch_size(value: int | str) -> int | None:
    """An integer >= 1, or None for "auto" (batches sized by a token budget)."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch size must be an integer >= 1 or 'auto', got {value!r}")
    return value


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """A dtype name (or None / "auto": float32 on CPU, bfloat16 elsewhere) as a torch dtype."""
    if dtype is None or dtype == "auto":
        # bf16 matmuls are orders of magnitude slower on CPUs without bf16 units
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if dtype not in _DTYPES:
        raise ConfigError(did_you_mean(dtype, [*_DTYPES, "auto"], "dtype"))
    return _DTYPES[dtype]


def model_max_length(config: Any, tokenizer: Any) -> int:
    """lm-eval's resolve_max_length: config length fields, then the tokenizer's, then 2048."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return _DEFAULT_MAX_LENGTH


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Ids that end a generation, as transformers' generate() takes them."""
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
