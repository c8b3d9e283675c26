"""A quick torch evaluation of zoo models on the zoo tasks (no lm-eval, seconds on CPU).

Scores exactly what the evals/ YAMLs score: greedy generation cut at the first newline compared
by exact match (add, rev, fmt) and the argmax of summed log-likelihoods over the 4 choices (cap).
Used to check that the zoo shows what it must (experts beat the base, merges have headroom)
and by scripts/zoo_report.py; the real evaluator (evomerge.eval) is the lm-eval route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.zoo.tasks import TASKS, eval_records

MAX_NEW_TOKENS = {"add": 6, "rev": 9, "fmt": 12}  # longest answer + "\n", with a margin


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, float32, CPU; tokenizer) through the Auto classes lm-eval uses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    return model, tok


def generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, cut at the first newline (lm-eval's `until: ["\\n"]`)."""
    import torch

    tok.padding_side = "left"  # generation continues from the last real token
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.split("\n", 1)[0] for t in texts]


def choice_loglik(model: Any, tok: Any, prompts: list[str], choices: list[str]) -> list[float]:
    """Summed log-probability of each choice given its prompt (lm-eval's loglikelihood)."""
    import torch

    ctx = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    cont = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
    rows = [a + b for a, b in zip(ctx, cont, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)  # (n, width)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
    scores = []
    for i, (a, b) in enumerate(zip(ctx, cont, strict=True)):
        pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)  # logits that predict the choice
        scores.append(logp[i, pos, torch.tensor(b)].sum().item())
    return scores


def score_task(
    model: Any, tok: Any, task: str, split: str = "heldout", limit: int | None = None
) -> float:
    """Accuracy in [0, 1] of one model on one task's split ("search", "heldout" or "all")."""
    recs = [r for r in eval_records(task) if split == "all" or r["split"] == split][:limit]
    if task == "cap":
        n = len(recs[0]["choices"])
        prompts = [r["prompt"] for r in recs for _ in range(n)]
        choices = [c for r in recs for c in r["choices"]]
        ll = choice_loglik(model, tok, prompts, choices)
        picks = [max(range(n), key=lambda j, i=i: ll[i * n + j]) for i in range(len(recs))]
        return sum(p == r["label"] for p, r in zip(picks, recs, strict=True)) / len(recs)
    outs = generate(model, tok, [r["prompt"] for r in recs], MAX_NEW_TOKENS[task])
    return sum(o == r["answer"] for o, r in zip(outs, recs, strict=True)) / len(recs)


def score_all(
    model: Any, tok: Any, split: str = "heldout", limit: int | None = None
) -> dict[str, float]:
    return {t: score_task(model, tok, t, split, limit) for t in TASKS}
