"""Print the zoo's table: every zoo model and some merges x every zoo task (held-out split).

    python scripts/zoo_report.py [ZOO_DIR] [--trials 30] [--seed 0] [--limit N]

Rows: the base, each expert, uniform merges (task arithmetic with equal weights, lambda 1 and
lambda tuned on the search split; TIES density 0.5), and the best of a random search over
per-expert task-arithmetic weights chosen on the search split. The merges are plain state-dict
arithmetic written here (a yardstick independent of evomerge.merge). Scores: exact match
(add, rev, fmt) and multiple-choice accuracy (cap), in percent. The same numbers come from
`evomerge eval ZOO_DIR/<model> --tasks evals/zoo.yaml --split heldout`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evomerge.zoo.evaluate import load, score_all
from evomerge.zoo.tasks import TASKS

State = dict[str, torch.Tensor]


def task_arithmetic(base: State, tvs: list[State], weights: list[float]) -> State:
    """base + sum_i w_i * (expert_i - base)."""
    out = {}
    for k, b in base.items():
        delta = torch.zeros_like(b)
        for w, tv in zip(weights, tvs, strict=True):
            delta += w * tv[k]
        out[k] = b + delta
    return out


def ties(base: State, tvs: list[State], weights: list[float], density: float = 0.5) -> State:
    """TIES: keep the top `density` magnitudes of each task vector, elect a sign per entry by the
    weighted sum, average the agreeing entries (normalised by their weights), add to the base."""
    out = {}
    for k, b in base.items():
        trimmed = []
        for tv in tvs:
            t = tv[k]
            n_keep = max(1, round(density * t.numel()))
            thresh = t.abs().flatten().kthvalue(t.numel() - n_keep + 1).values
            trimmed.append(torch.where(t.abs() >= thresh, t, torch.zeros_like(t)))
        stacked = torch.stack([w * t for w, t in zip(weights, trimmed, strict=True)])  # (n, *shape)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        w = torch.tensor(weights).view(-1, *([1] * b.dim())) * agree
        out[k] = b + (stacked * agree).sum(0) / w.sum(0).clamp_min(1e-8)
    return out


def row(name: str, scores: dict[str, float]) -> str:
    cells = " ".join(f"{100 * scores[t]:6.1f}" for t in TASKS)
    mean = 100 * sum(scores.values()) / len(scores)
    return f"{name:<34} {cells} {mean:6.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", nargs="?", default="zoo")
    ap.add_argument("--trials", type=int, default=30, help="random-search candidates")
    ap.add_argument("--seed", type=int, default=0, help="random-search seed")
    ap.add_argument("--limit", type=int, default=None, help="examples per task and split")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    t0 = time.time()
    model, tok = load(zoo / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [load(zoo / t)[0].state_dict() for t in TASKS]
    tvs = [{k: e[k] - base[k] for k in base} for e in experts]

    def evaluate(state: State, split: str = "heldout") -> dict[str, float]:
        model.load_state_dict(state)
        return score_all(model, tok, split, args.limit)

    print(f"{'held-out (%)':<34} " + " ".join(f"{t:>6}" for t in TASKS) + "   mean")
    print(row("base", evaluate(base)))
    singles = []
    for t, e in zip(TASKS, experts, strict=True):
        singles.append((evaluate(e, "search"), evaluate(e)))
        print(row(f"expert {t}", singles[-1][1]))
    n = len(TASKS)
    print(row("task arithmetic w=1 (lambda 1)", evaluate(task_arithmetic(base, tvs, [1.0] * n))))
    print(
        row(f"task arithmetic w=1/{n} (average)", evaluate(task_arithmetic(base, tvs, [1 / n] * n)))
    )
    lam = max(
        (0.25, 0.5, 0.75, 1.0),
        key=lambda c: sum(evaluate(task_arithmetic(base, tvs, [c] * n), "search").values()),
    )
    print(row(f"task arithmetic w={lam} (tuned)", evaluate(task_arithmetic(base, tvs, [lam] * n))))
    print(row("ties w=1 density 0.5", evaluate(ties(base, tvs, [1.0] * n))))

    rng = random.Random(args.seed)
    best: tuple[float, list[float]] = (-1.0, [])
    for _ in range(args.trials):
        w = [round(rng.uniform(0.0, 1.5), 3) for _ in range(n)]
        s = sum(evaluate(task_arithmetic(base, tvs, w), "search").values())
        best = max(best, (s, w))
    held = evaluate(task_arithmetic(base, tvs, best[1]))
    print(row(f"random search best ({args.trials})", held) + f"   w={best[1]}")
    i_best = max(range(n), key=lambda i: sum(singles[i][0].values()))
    print(row(f"best single expert (search): {TASKS[i_best]}", singles[i_best][1]))
    print(f"# {time.time() - t0:.0f} s, {args.limit or 'all'} examples per task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
