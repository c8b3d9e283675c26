"""Pre-flight: the whole search checked before any weights load and before results/NAME exists.

A broken space must fail in seconds with one line, not after the models loaded behind progress
bars, and never leave a half-made study folder. What can be known from the YAML, the model
configs, the safetensors headers and the tokenizer files is checked here, by calling the checks
that already guard each room (the space's, the evaluator's chunks, the sampler and pruner
constructors, `evomerge merge`'s model compatibility); nothing here reads a tensor.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.search.baselines import baseline_trials
from evomerge.search.catalog import DEFAULT_PRUNER
from evomerge.search.codec import Codec
from evomerge.search.objective import Objectives
from evomerge.search.samplers import make_pruner, make_sampler, options_for
from evomerge.search.space import SearchSpace

if TYPE_CHECKING:
    from evomerge.merge.io import CheckpointReader

# what the search says instead of `evomerge merge`'s "set tokenizer_source": a space has no
# tokenizer rule, so a candidate's embedding rows are merged as they are
SEARCH_VOCAB_HINT = (
    "a search merges embedding rows as they are (it has no tokenizer rule): search models "
    "that share one tokenizer, or align their vocabularies first with `evomerge merge` "
    "(tokenizer_source: union)"
)


@dataclass
class Preflight:
    """What the checks produced that the run goes on with."""

    codec: Codec
    tasks: list[Any] | None  # the loaded ProxyTasks (None: the caller's workbench has its own)
    objectives: Objectives | None  # None until the tasks' directions are known


def preflight(
    space: SearchSpace, sampler: str, seed: int, prune: bool, *, backend: str | None,
    resources: bool,
) -> Preflight:  # fmt: skip
    """Check the space with the run's sampler and seed. `resources` False (a workbench given
    by the caller, e.g. a test's fake) skips the models and tasks, which that workbench
    stands in for."""
    spec = space.spec
    codec = space.codec(sampler)
    check_eval(space, backend)
    pname = spec.search.get("pruner", DEFAULT_PRUNER)
    try:  # unknown or ill-typed constructor options: ConfigError
        make_sampler(sampler, spec, seed, options_for(spec.search, "sampler", sampler))
        make_pruner(pname, len(spec.objectives), prune, options_for(spec.search, "pruner", pname))
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: search: {exc}") from None
    for _, params in baseline_trials(space, codec.parameterization):
        space.decode(params)  # each baseline is a valid recipe (bounds, model counts, dtype)
    if not resources:
        return Preflight(codec, None, None)
    check_models(space)
    tasks = load_space_tasks(space)
    hib = {t.name: bool(t.higher_is_better) for t in tasks}
    objectives = Objectives.build(spec.objectives, hib, spec.max_drop)
    return Preflight(codec, tasks, objectives)


def check_eval(space: SearchSpace, backend: str | None) -> None:
    """The `eval:` values the evaluator and the backend would refuse after loading."""
    from evomerge.eval.backends import BACKENDS
    from evomerge.eval.evaluator import check_chunks
    from evomerge.loop.memory import check_placement

    src, cfg = space.spec.source, space.spec.eval
    chunks = cfg.get("chunks", (16, 64, None))
    if not isinstance(chunks, (list, tuple)) or any(isinstance(c, bool) for c in chunks):
        raise ConfigError(
            f"{src}: eval.chunks: expected a list of increasing sizes (null last: all "
            f"documents), but got {chunks!r}"
        )
    try:
        check_chunks(chunks)
    except ConfigError as exc:
        raise ConfigError(f"{src}: eval.chunks: {exc}") from None
    name = backend or cfg.get("backend", "hf")
    if name not in BACKENDS:
        raise ConfigError(f"{src}: eval.backend: {did_you_mean(str(name), BACKENDS, 'backend')}")
    if space.spec.stacking is not None and name == "vllm":
        raise ConfigError(
            f"{src}: eval.backend: layer stacking needs backend hf, but got vllm (a vLLM "
            "engine fixes its layer count at start; a new engine per candidate costs seconds)"
        )
    # batch_size 'auto' is valid for vllm too: its scheduler batches (issue #18)
    check_placement(cfg.get("inputs", "auto"), f"{src}: eval.inputs")
    engine_options(space)
    task_options_of(space)


def engine_options(space: SearchSpace) -> dict[str, Any]:
    """`eval.vllm:` checked against vllm.EngineArgs' fields ({} when absent)."""
    from evomerge.eval.vllm.engine_args import check_engine_args

    cfg = space.spec.eval.get("vllm")
    return {} if cfg is None else check_engine_args(cfg, f"{space.spec.source}: eval.vllm")


def task_options_of(space: SearchSpace) -> Any:
    """`eval.lm_eval:` as a TaskOptions (simple_evaluate's names and rules)."""
    from evomerge.eval.task_options import task_options

    return task_options(space.spec.eval.get("lm_eval"), f"{space.spec.source}: eval.lm_eval")


def load_space_tasks(space: SearchSpace) -> list[Any]:
    """The space's tasks, loaded as the workbench scores them (data read, requests built)."""
    from evomerge.eval.tasks import load_tasks

    cfg = space.spec.eval
    tasks = load_tasks(
        space.spec.tasks,
        heldout_fraction=float(cfg.get("heldout_fraction", 0.5)),
        seed=int(cfg.get("seed", 0)),
        options=task_options_of(space),
    )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{space.spec.source}: tasks: a task is named twice: {names}")
    return tasks


def check_models(space: SearchSpace) -> None:
    """The base and the models can be merged: one architecture, the same tensors and shapes,
    the same vocabulary (`evomerge merge`'s checks, on configs and headers only)."""
    from evomerge.merge.io import open_checkpoint
    from evomerge.merge.plan import check_compatible
    from evomerge.merge.tokenizer import check_vocab_rows, is_vocab_tensor

    spec = space.spec
    refs = list(dict.fromkeys([*([spec.base_model] if spec.base_model else []), *spec.models]))
    readers: dict[str, CheckpointReader] = {}
    try:
        for ref in refs:
            readers[ref] = open_checkpoint(ref)
        try:
            check_compatible(readers, by_pattern=False)
            first = readers[refs[0]]
            for n in (n for n in first.keys() if is_vocab_tensor(n)):
                shapes = {k: r.shape(n) for k, r in readers.items() if n in r.keys()}
                check_vocab_rows(n, shapes, hint=SEARCH_VOCAB_HINT)
            check_tokenizers({k: r.path for k, r in readers.items()})
        except ConfigError as exc:
            raise ConfigError(f"{spec.source}: models: {exc}") from None
    finally:
        for r in readers.values():
            r.close()


def vocab_digest(folder: Path) -> tuple[str, int] | None:
    """(sha256 of the token -> id table, its size) of a model's tokenizer, or None when the
    folder has no tokenizer files (a checkpoint sharing another's tokenizer)."""
    from evomerge.merge.io import TOKENIZER_FILES
    from evomerge.merge.tokenizer import read_vocab

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    vocab = read_vocab(folder)
    text = "\n".join(f"{tok}\t{i}" for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    return hashlib.sha256(text.encode()).hexdigest(), len(vocab)


def check_tokenizers(dirs: dict[str, Path]) -> None:
    """Models whose tokenizers map tokens to other ids cannot be merged row by row, even when
    their embeddings have the same shape: row i would mean a different token in each."""
    from evomerge.merge.tokenizer import read_vocab

    digests = {k: d for k, d in ((k, vocab_digest(p)) for k, p in dirs.items()) if d}
    keys = list(digests)
    for k in keys[1:]:
        if digests[k][0] == digests[keys[0]][0]:
            continue
        a, b = read_vocab(dirs[keys[0]]), read_vocab(dirs[k])
        tok = next((t for t in sorted(a, key=a.__getitem__) if b.get(t) != a[t]), None)
        tok = tok if tok is not None else next(t for t in b if t not in a)
        raise ConfigError(
            f"models '{keys[0]}' and '{k}' have different tokenizers ({len(a)} vs {len(b)} "
            f"tokens; token {tok!r} has id {a.get(tok)} vs {b.get(tok)}); {SEARCH_VOCAB_HINT}"
        )


def summary(codec: Codec, sampler: str) -> str:
    """The start-up line saying what is searched: every dimension with its range."""
    dims: dict[str, Any] = {}
    for method in codec.space.methods:
        dims.update(codec.distributions(method))
    parts = []
    for name, dist in dims.items():
        choices = getattr(dist, "choices", None)
        if choices is not None:
            parts.append(f"{name} in {list(choices)}")
        else:
            parts.append(f"{name} in [{dist.low:g}, {dist.high:g}]{' log' if dist.log else ''}")
    methods = "/".join(codec.space.methods)
    stack = codec.space.stacking
    if stack is not None:
        methods = f"{methods} + layer stacking" if stack.hybrid else "layer stacking"
    return f"searching {len(dims)} dimensions of {methods} with {sampler}: " + ", ".join(parts)


def print_summary(codec: Codec, sampler: str, quiet: bool) -> None:
    if not quiet:
        print(summary(codec, sampler), file=sys.stderr)
