"""Proxy tasks: lm-eval tasks whose requests are built once and scored one document at a time.

lm-eval builds the prompts (few-shot, delimiters, chat template) and computes the metric
(filters, process_results), so a proxy score is exactly lm-eval's. What is added here: stable
document ids (the record's integer `id` when it has one, else its position), a search /
held-out split (the record's `split` field, else a seeded split), and per-document scoring so
the evaluator can grow its sample in chunks and report paired per-example scores.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

from evomerge.errors import ConfigError
from evomerge.eval.early_exit import ExactAnswers, early_exit_blocker, exact_answers
from evomerge.eval.lm_compat import filter_ensembles
from evomerge.eval.protocol import GenerationSpec
from evomerge.eval.task_options import TaskOptions

SPLITS = ("search", "heldout")
# the held-out split's two disjoint parts: "select" chooses the winner among the re-scored
# trials, "test" reports it (a score that chose a trial is optimistic for that trial)
HELDOUT_PARTS = ("select", "test")
HELDOUT_PARTS_SEED = 20240601  # fixed: which held-out documents test is no search's choice
LL_TYPES = ("loglikelihood", "multiple_choice")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed: same few-shot draws as simple_evaluate
Request = tuple[str, str] | tuple[str, GenerationSpec]


class ProxyTask:
    """One lm-eval task, ready to be scored per document.

    name, metric (the task's first metric), higher_is_better, request_type ("loglikelihood"
    or "generate_until"), doc_ids(split), requests(doc_id), answers(doc_id) (early-exit
    hints for a backend), score(doc_id, responses).
    """

    def __init__(
        self,
        task: Any,
        *,
        heldout_fraction: float = 0.5,
        seed: int = 0,
        apply_chat_template: bool | None = None,
        options: TaskOptions | None = None,
    ) -> None:
        self._task = task
        options = options or TaskOptions()
        if options.apply_chat_template is not None:
            apply_chat_template = options.apply_chat_template
        self.name: str = task.task_name
        output_type = task.get_config("output_type")
        if output_type not in (*LL_TYPES, "generate_until"):
            raise ConfigError(
                f"task '{self.name}': output_type must be multiple_choice, loglikelihood or "
                f"generate_until for proxy evaluation, got '{output_type}'"
            )
        if (task.get_config("repeats") or 1) != 1:
            raise ConfigError(
                f"task '{self.name}': repeats must be 1, got {task.get_config('repeats')}"
            )
        _apply_options(task, options, output_type)  # before anything reads the config
        self.request_type: Literal["loglikelihood", "generate_until"] = (
            "loglikelihood" if output_type in LL_TYPES else "generate_until"
        )
        self.metric, self.higher_is_better = _primary_metric(task, self.name)
        # why this task's generations must run in full (None: they may stop early)
        self.early_exit_blocker = early_exit_blocker(task)
        self._system_instruction = options.system_instruction
        self._multiturn = options.fewshot_as_multiturn
        meta = task.get_config("metadata") or {}
        wants = bool(meta.get("apply_chat_template", False)) if isinstance(meta, dict) else False
        self.wants_chat_template = wants if apply_chat_template is None else apply_chat_template

        _render_once(task, ("doc_to_target", "doc_to_choice"))
        docs = list(task.eval_docs)
        self._positions = _doc_ids(docs, self.name)  # doc id -> position in eval_docs
        self._docs = {i: docs[p] for i, p in self._positions.items()}
        self._splits = _assign_splits(self._docs, self.name, heldout_fraction, seed)
        self._instances: dict[int, list[Any]] | None = None
        self._requests: dict[int, list[Request]] = {}
        self._answers: dict[int, list[ExactAnswers | None]] = {}
        self._chat_template: Callable | None = None
        if not self.wants_chat_template:
            self._build()

    # ------------------------------------------------------------------ documents
    def doc_ids(self, split: str = "search") -> list[int]:
        """Doc ids of "search", "heldout" or "all", in document order."""
        if split == "all":
            return list(self._positions)
        if split in HELDOUT_PARTS:
            held = self._splits["heldout"]
            parts = heldout_parts(self.name, held)
            keep = set(parts[split]) if parts else set(held)
            return [i for i in held if i in keep]
        if split not in SPLITS:
            raise ConfigError(
                f"split must be one of search, heldout, select, test, all; got '{split}'"
            )
        return list(self._splits[split])

    def doc(self, doc_id: int) -> dict:
        return self._docs[doc_id]

    def position(self, doc_id: int) -> int:
        """Index of the document in the task's eval docs (lm-eval's doc_id / `samples` index)."""
        return self._positions[doc_id]

    def __len__(self) -> int:
        return len(self._positions)

    # ------------------------------------------------------------------ requests
    def set_chat_template(self, chat_template: Callable, tokenizer_name: str = "") -> None:
        """Build the requests through a model's chat template (HFLM.apply_chat_template's call)."""
        if self._instances is None or chat_template is not self._chat_template:
            self._chat_template = chat_template
            self._build(tokenizer_name)

    def requests(self, doc_id: int) -> list[Request]:
        if self._instances is None:
            raise ConfigError(
                f"task '{self.name}' asks for a chat template: evaluate it through an "
                "Evaluator (it applies the backend's template) or call set_chat_template()"
            )
        return self._requests[doc_id]

    def answers(self, doc_id: int) -> list[ExactAnswers | None]:
        """For each request of the document, the final texts that can score, or None: a
        backend may stop a generation that can no longer become one (see early_exit)."""
        hints = self._answers.get(doc_id)
        if hints is None:
            hint = None
            if self.early_exit_blocker is None:
                hint = exact_answers(self._task, self._docs[doc_id])
            hints = self._answers[doc_id] = [hint] * len(self.requests(doc_id))
        return hints

    def _build(self, tokenizer_name: str = "") -> None:
        task, chat = self._task, self._chat_template is not None
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        task.build_all_requests(
            rank=0,
            world_size=1,
            cache_requests=False,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat and self._multiturn,
            system_instruction=self._system_instruction,
            chat_template=self._chat_template,
            tokenizer_name=tokenizer_name if chat else "",
        )
        by_position: dict[int, list[Any]] = {}
        for inst in task.instances:
            by_position.setdefault(inst.doc_id, []).append(inst)
        self._instances = {}
        for doc_id, pos in self._positions.items():
            insts = sorted(by_position[pos], key=lambda x: x.idx)
            self._instances[doc_id] = insts
            self._requests[doc_id] = [self._request(inst) for inst in insts]

    def _request(self, inst: Any) -> Request:
        if self.request_type == "loglikelihood":
            ctx, cont = inst.args[:2]
            return (ctx, cont)
        ctx, kwargs = inst.args[:2]
        return (ctx, generation_spec(kwargs))

    # ------------------------------------------------------------------ scoring
    def score(self, doc_id: int, responses: Sequence[Any]) -> float:
        """The task's metric for one document, from the backend's responses to its requests
        (through the task's filters and process_results, as lm-eval's evaluate does)."""
        insts = (self._instances or {}).get(doc_id)
        if insts is None:
            raise KeyError(f"task '{self.name}' has no document with id {doc_id} (or no requests)")
        if len(responses) != len(insts):
            raise ValueError(f"doc {doc_id}: {len(insts)} requests but {len(responses)} responses")
        for inst, resp in zip(insts, responses, strict=True):
            inst.resps = [resp]
            inst.filtered_resps = {}
        filters = filter_ensembles(self._task)
        for ensemble in filters:
            ensemble.apply(insts)
        key = filters[0].name if filters else None
        outs = [inst.filtered_resps[key] if key else inst.resps[0] for inst in insts]
        value = self._task.process_results(insts[0].doc, outs)[self.metric]
        return float(value)


def _apply_options(task: Any, options: TaskOptions, output_type: str) -> None:
    """The overrides lm_eval.simple_evaluate applies to a loaded task, in its order and with
    its rules: gen_kwargs update a generation task's generation_kwargs; num_fewshot replaces
    the YAML's unless the YAML pins 0; no number at all means 0 shots."""
    if output_type == "generate_until" and options.gen_kwargs:
        task.set_config(key="generation_kwargs", value=dict(options.gen_kwargs), update=True)
    if options.num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=options.num_fewshot)
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)


def _render_once(task: Any, methods: Sequence[str]) -> None:
    """Memoize per document the task's data-only renderings (gold target, choices).

    lm-eval renders these Jinja templates anew, compiling them, on every call, and
    process_results calls them for every document of every candidate: on the zoo that was
    more than half of a candidate's scoring time. The values depend only on the document, so
    each is rendered once; a call with an explicit template (few-shot formatting) passes through.
    """
    for name in methods:
        original = getattr(task, name, None)
        if original is None:
            continue
        cache: dict[int, tuple[Any, Any]] = {}  # id(doc) -> (doc kept alive, value)

        def rendered(doc: Any, *args: Any, _original=original, _cache=cache) -> Any:
            if args and args[0] is not None:
                return _original(doc, *args)
            hit = _cache.get(id(doc))
            if hit is None or hit[0] is not doc:
                hit = _cache[id(doc)] = (doc, _original(doc))
            return hit[1]

        setattr(task, name, rendered)


def load_tasks(
    specs: Sequence[str],
    *,
    heldout_fraction: float = 0.5,
    seed: int = 0,
    apply_chat_template: bool | None = None,
    options: TaskOptions | None = None,
) -> list[ProxyTask]:
    """Load tasks by YAML path, folder, evals/ name or lm-eval registry name (see task_specs).

    `apply_chat_template` None follows each task's `metadata: {apply_chat_template: ...}`;
    `options` (eval.lm_eval / the CLI flags) override the tasks' YAML as simple_evaluate does.
    """
    from evomerge.eval.task_specs import build_lm_eval_tasks

    if not 0.0 <= heldout_fraction <= 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    cleaned = [s.strip() for s in specs if s and s.strip()]
    if not cleaned:
        raise ConfigError("expected at least one task (a name or a YAML path), got none")
    built = build_lm_eval_tasks(cleaned)
    return [
        ProxyTask(
            t,
            heldout_fraction=heldout_fraction,
            seed=seed,
            apply_chat_template=apply_chat_template,
            options=options,
        )
        for t in built.values()
    ]


def generation_spec(kwargs: dict | None) -> GenerationSpec:
    """lm-eval generation_kwargs -> GenerationSpec (same aliases and defaults as lm-eval)."""
    from lm_eval.models.utils import normalize_gen_kwargs

    norm = normalize_gen_kwargs(dict(kwargs or {}), 256)  # 256: HFLM's max_gen_toks default
    until = norm.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    extra = tuple(sorted((k, _hashable(v)) for k, v in norm.items() if k not in _SPEC_KEYS))
    return GenerationSpec(
        until=tuple(until),
        max_gen_toks=int(norm["max_gen_toks"]),
        do_sample=bool(norm.get("do_sample", False)),
        temperature=float(norm.get("temperature", 0.0) or 0.0),
        extra=extra,
    )


_SPEC_KEYS = ("max_gen_toks", "do_sample", "temperature")


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _primary_metric(task: Any, name: str) -> tuple[str, bool]:
    from lm_eval.api.metrics import mean

    aggregations = task.aggregation()
    if not aggregations:
        raise ConfigError(f"task '{name}' declares no metric")
    metric = next(iter(aggregations))
    if aggregations[metric] is not mean:
        agg = getattr(aggregations[metric], "__name__", "?")
        raise ConfigError(
            f"task '{name}': proxy evaluation needs a per-example metric averaged over documents; "
            f"its first metric '{metric}' aggregates with {agg}"
        )
    return metric, bool(task.higher_is_better().get(metric, True))


def _doc_ids(docs: list[dict], name: str) -> dict[int, int]:
    """doc id -> position: the record's integer `id` when every record has one, else position."""
    has_id = bool(docs) and all(isinstance(d, dict) and "id" in d for d in docs)
    if not has_id:
        return {p: p for p in range(len(docs))}
    ids: dict[int, int] = {}
    for p, d in enumerate(docs):
        v = d["id"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"task '{name}': record {p} has id {v!r}, expected an integer")
        if v in ids:
            raise ConfigError(f"task '{name}': id {v} appears twice (records {ids[v]} and {p})")
        ids[v] = p
    return ids


def _assign_splits(
    docs: dict[int, dict], name: str, heldout_fraction: float, seed: int
) -> dict[str, list[int]]:
    """By each record's `split` field when it has one; the rest by a seeded permutation."""
    import numpy as np

    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    free = []
    for i, d in docs.items():
        s = d.get("split") if isinstance(d, dict) else None
        if s is None:
            free.append(i)
        elif s in splits:
            splits[s].append(i)
        else:
            raise ConfigError(f"task '{name}': doc {i} has split '{s}', expected search or heldout")
    if free:
        # the seed mixes in the task name, so two tasks of equal size split differently
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        order = rng.permutation(len(free))
        n_held = round(heldout_fraction * len(free))
        held = {free[k] for k in order[:n_held]}
        for i in free:
            splits["heldout" if i in held else "search"].append(i)
    position = {i: p for p, i in enumerate(docs)}
    for s in SPLITS:
        splits[s].sort(key=position.__getitem__)
    return splits


def heldout_parts(task: str, ids: Sequence[int]) -> dict[str, list[int]] | None:
    """{"select": ids, "test": ids}: a seeded half of a task's held-out ids and the rest
    (sorted), or None when there are fewer than 2 (no two disjoint parts).

    A pure function of the task name and the ids, so a stored study's per-example held-out
    scores split the same way in every process; the seed is fixed (not the run's), so the test
    documents of one held-out split are the same in every search.
    """
    import numpy as np

    ids = sorted(ids)  # any order in, one partition out (the evaluator permutes its ids)
    if len(ids) < 2:
        return None
    rng = np.random.default_rng([HELDOUT_PARTS_SEED, zlib.crc32(task.encode())])
    chosen = {ids[k] for k in rng.permutation(len(ids))[: len(ids) // 2]}
    return {
        "select": [i for i in ids if i in chosen],
        "test": [i for i in ids if i not in chosen],
    }
