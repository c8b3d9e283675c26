"""scripts/moe_zoo_report.py: the gate knobs it sets on a loaded MoE (top-k, router temperature)
against a hand-computed MoE layer, and its paired comparison on hand-made scores."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.moe.build import build_moe
from evomerge.moe.config import parse_moe_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import moe_zoo_report as report


def test_compare_is_paired_per_document():
    ref = {"a": {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}, "b": {0: 1.0, 1: 1.0}}
    got = {"a": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, "b": {0: 0.0, 1: 1.0}}
    diff, se, won, lost = report.compare(got, ref)
    # task a: d = 0,1,0,1 (mean 0.5, sample var 1/3); task b: d = -1,0 (mean -0.5, var 0.5)
    assert diff == pytest.approx((0.5 - 0.5) / 2)
    assert se == pytest.approx(math.sqrt((1 / 3 / 4 + 0.5 / 2) / 4))
    assert (won, lost) == (2, 1)
    assert report.compare(ref, ref) == (0.0, 0.0, 0, 0)


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    p = f"model.layers.{layer}.mlp."
    h = torch.nn.functional.silu(x @ sd[p + "gate_proj.weight"].T) * (
        x @ sd[p + "up_proj.weight"].T
    )
    return h @ sd[p + "down_proj.weight"].T


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize(("top_k", "temperature"), [(1, 3.0), (2, 1.0), (2, 4.0), (3, 0.5)])
def test_set_gates_mixes_experts_by_softmax_of_scaled_logits(
    tiny_model, tmp_path, arch, top_k, temperature
):
    """Each token's output is sum over its top_k experts of softmax(logits / T) restricted to
    them, times that expert's MLP: computed here from the experts' own checkpoints."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    base, *experts = (tiny_model(arch=arch, seed=s) for s in range(4))
    cfg = {"base_model": str(base), "gate_mode": "random", "experts": [str(e) for e in experts]}
    out = build_moe(parse_moe_config(cfg), tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rows = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    rows = [r / 8 for r in rows]  # random rows give huge logits: shrink so weights are mixed
    report.set_gates(model, rows, top_k, temperature)
    src = [load_file(e / "model.safetensors") for e in experts]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))  # (tokens, hidden)
    for i, layer in enumerate(model.model.layers):
        logits = x @ rows[i].T / temperature  # (tokens, experts)
        top, idx = logits.topk(top_k, dim=-1)
        w = top.softmax(dim=-1)  # (tokens, top_k)
        want = torch.stack(
            [
                sum(w[t, j] * _mlp(x[t], src[int(idx[t, j])], i) for j in range(top_k))
                for t in range(x.shape[0])
            ]
        )
        with torch.no_grad():
            got = layer.mlp(x[None])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
