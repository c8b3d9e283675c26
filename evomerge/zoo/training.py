"""Training of the zoo's models: batches, the optimizer loop, and the curricula.

The base learns every prompt format on the easy version of every task; an expert learns the
hard version of one task with replay of the base mix (so it stays in the base's basin and its
task vector merges). Everything here is deterministic for a fixed seed: `deterministic()` fixes
the thread count and the kernels, and the data order depends on the seed only.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from evomerge.common.device import torch_threads
from evomerge.zoo.tasks import EASY, HARD, TASKS, Example, eval_prompts
from evomerge.zoo.tokenizer import EOS

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

THREADS = 1  # fixed: reductions (hence weights) depend on it; 1 is fastest on a shared CPU


@contextlib.contextmanager
def deterministic(threads: int = THREADS) -> Iterator[None]:
    """Fixed thread count + deterministic kernels (and no nested transformers bars) for a build."""
    import torch
    from transformers.utils import logging as hf_logging

    old_det = torch.are_deterministic_algorithms_enabled()
    old_bars = hf_logging.is_progress_bar_enabled()
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        if old_bars:
            hf_logging.enable_progress_bar()


def make_batch(
    tok: Tokenizer, examples: list[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, labels); the loss sees answer tokens only."""
    import torch

    rows, masks = [], []
    for prompt, answer in examples:
        p = tok.encode(prompt, add_special_tokens=False).ids
        a = tok.encode(answer + "\n", add_special_tokens=False).ids
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (batch, width)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(m) == 1, torch.tensor(row), -100)
    return ids, attn, labels


def train(
    model: Any,
    tok: Tokenizer,
    sample: Callable[[random.Random], Example],
    *,
    steps: int,
    batch: int,
    lr: float,
    warmup: float,
    data_seed: str,
    on_step: Callable[[float], None] = lambda loss: None,
) -> float:
    """AdamW with linear warmup then cosine decay on the parameters that require a gradient;
    returns the mean loss of the last 10 steps."""
    import torch

    rng = random.Random(data_seed)  # the data order depends on the seed only
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    n_warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    pad_id = tok.token_to_id(EOS)
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        ids, attn, labels = make_batch(tok, [sample(rng) for _ in range(batch)], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        on_step(losses[-1])
    model.eval()
    tail = losses[-10:]
    return sum(tail) / max(1, len(tail))


def freeze_all_but(model: Any, fragments: tuple[str, ...]) -> None:
    """Only parameters whose name contains one of `fragments` keep requires_grad (".mlp.":
    the MLP weights; "model.layers.3.": one decoder layer)."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(f in name for f in fragments))


def base_mix(rng: random.Random) -> Example:
    """The base's curriculum: every format, easy versions only."""
    return EASY[rng.choice(TASKS)](rng)


def expert_mix(task: str, replay: float) -> Callable[[random.Random], Example]:
    """Hard versions of one task (never an eval prompt) plus replay of the base mix."""
    banned = eval_prompts(task)

    def sample(rng: random.Random) -> Example:
        if rng.random() < replay:
            return base_mix(rng)
        while True:
            ex = HARD[task](rng)
            if ex[0] not in banned:
                return ex

    return sample
