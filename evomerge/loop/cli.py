"""The `evomerge search` and `evomerge status` command handlers (argparse lives in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.loop.run import run_search
from evomerge.search.results import load_study_outcome, status_text


def cli_search(args: argparse.Namespace) -> int:
    run_search(
        args.space,
        study=args.study,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        sampler=args.sampler,
        seed=args.seed,
        results=args.results,
        device=args.device,
        backend=args.backend,
        prune=not args.no_prune,
    )
    return 0


def cli_status(args: argparse.Namespace) -> int:
    if not Path(args.study_dir).is_dir():
        raise ConfigError(f"study folder '{args.study_dir}' not found")
    print(status_text(load_study_outcome(args.study_dir, args.storage), top=args.top))
    return 0
