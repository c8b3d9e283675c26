"""LiveWorkbench: one worker's merge + evaluation, what the search loop scores trials with.

It loads the base model once into the evaluator's backend, keeps the task vectors resident in
one CandidateMerger and writes every candidate straight into the live weights (no disk per
trial). It wires merge and eval only; the search (Optuna) is run.py's.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.common.device import default_device
from evomerge.common.model_dir import num_layers
from evomerge.errors import CandidateError, ConfigError, EvomergeError
from evomerge.recipe import Recipe
from evomerge.search.baselines import default_params
from evomerge.search.space import SearchSpace
from evomerge.search.stacking import probe as stacking_probe
from evomerge.search.stacking import split_recipe

if TYPE_CHECKING:
    from evomerge.loop.stacking import LiveStack
    from evomerge.merge.candidate import CandidateMerger


class Workbench(Protocol):
    """What the loop needs from merge + eval (LiveWorkbench; tests pass a fake)."""

    task_names: list[str]
    higher_is_better: dict[str, bool]

    def evaluate(self, recipe: Recipe | None, split: str = "search", on_chunk: Any = None) -> Any:
        """Merge `recipe` into the live model (None: the base as loaded), evaluate `split`."""
        ...


# (context, continuation) pairs whose log-probs fingerprint the live weights (any tokenizer)
# (" b", not "b": a BPE tokenizer encodes "ab" as one token, leaving "b" no continuation)
PROBES = [("The answer is", " 42"), ("add 12+30=", "42"), ("a", " b"), ("Once upon", " a time")]


class LiveWorkbench:
    """Real merge + eval: one backend, one CandidateMerger, one Evaluator per process."""

    def __init__(
        self,
        space: SearchSpace,
        backend: str,
        device: str,
        chunks: Any,
        seed: int,
        heldout_fraction: float,
        batch_size: int | str = 64,
        verify_transfer: bool = True,
        tasks: list[Any] | None = None,
    ) -> None:
        from evomerge.eval.backends import load_backend
        from evomerge.eval.evaluator import Evaluator
        from evomerge.eval.tasks import load_tasks
        from evomerge.loop.plan import search_memory
        from evomerge.loop.preflight import engine_options, task_options_of
        from evomerge.merge.candidate import CandidateMerger
        from evomerge.merge.io import open_checkpoint, resolve_model_path
        from evomerge.merge.plan import check_compatible

        spec = space.spec
        # tasks already loaded by the pre-flight checks are not loaded twice
        self.tasks = tasks or load_tasks(
            spec.tasks, heldout_fraction=heldout_fraction, seed=seed,
            options=task_options_of(space),
        )  # fmt: skip
        self.task_names = [t.name for t in self.tasks]
        self.higher_is_better = {t.name: bool(t.higher_is_better) for t in self.tasks}
        # eval.vllm: the engine's arguments (with gpu_memory_utilization from the memory plan
        # when the user left it out), and where the merger's inputs live: loop/plan.py
        extra: dict[str, Any] = {}
        if backend == "vllm":
            extra = {**engine_options(space), "verify_transfer": verify_transfer}
        self.placement, share = search_memory(space, backend, device, extra)
        if self.placement == "host":  # slower per candidate: say so once
            print(
                "merge inputs in host memory, streamed to the device in row chunks per "
                f"candidate (eval.inputs: {spec.eval.get('inputs', 'auto')})",
                file=sys.stderr,
            )
        extra.update(share)
        self.backend = load_backend(
            backend, resolve_model_path(spec.base_model or spec.models[0]),  # hub ids: HF cache
            device=device, batch_size=batch_size,
            **extra,
        )  # fmt: skip
        self.backend_name = backend
        # the merger's layout (inputs, tensors) is the same for every candidate: build it from
        # the defaults of the first method (also the self-check's probe candidate)
        probe = default_params(space, spec.methods[0])
        if spec.stacking is not None:  # a stack that runs every path of loop/stacking.py
            probe.update(stacking_probe(spec.stacking))
        self.probe = space.decode(probe)
        stage, _ = split_recipe(self.probe)  # None: a stacking-only space merges no weights
        self.loaded_ref = str(spec.base_model or spec.models[0])  # what load_backend loaded
        if stage is not None:  # the same model, spelled as the merger keys it
            self.loaded_ref = str(stage.base_model or stage.models[0].model)
        self.merger: CandidateMerger | None = None
        if stage is not None:
            refs = [m.model for m in stage.models] + (
                [stage.base_model] if stage.base_model else []
            )
            sources = {str(r): open_checkpoint(r) for r in refs}
            check_compatible(sources, by_pattern=False)  # unmergeable models: exit 2
            layers = spec.num_layers or num_layers(sources[str(refs[-1])].config) or 1
            self.merger = CandidateMerger(
                stage, sources, num_layers=layers, device=device, placement=self.placement
            )
            pack = getattr(self.backend, "pack_live", None)  # optional: HFBackend.pack_live
            if pack is not None:
                pack(self.merger.tensor_names)
        self.stack = live_stack(space, self.backend, self.loaded_ref, self.merger is None)
        self.evaluator = Evaluator(self.backend, self.tasks, chunks=tuple(chunks), seed=seed)
        self._merged = False
        self._route_settled = False  # vLLM: the update route is settled by the first push

    @classmethod
    def from_space(
        cls,
        space: SearchSpace,
        backend: str | None = None,
        device: str | None = None,
        tasks: list[Any] | None = None,
    ) -> LiveWorkbench:
        """The workbench a space's `eval:` section describes (arguments override it);
        `tasks`: the space's tasks when already loaded (loop/preflight.py)."""
        ecfg = space.spec.eval
        return cls(
            space,
            backend or ecfg.get("backend", "hf"),
            device or ecfg.get("device") or default_device(),
            ecfg.get("chunks", (16, 64, None)),
            int(ecfg.get("seed", 0)),
            float(ecfg.get("heldout_fraction", 0.5)),
            ecfg.get("batch_size", 64),
            bool(ecfg.get("verify_transfer", True)),
            tasks=tasks,
        )

    def first_chunk_docs(self) -> int:
        """Documents (all tasks) in the first evaluation chunk of the search split."""
        size = self.evaluator.chunks[0]
        return sum(len(t.doc_ids("search")[:size]) for t in self.tasks)

    def evaluate(self, recipe: Recipe | None, split: str = "search", on_chunk: Any = None) -> Any:
        if recipe is None and self._merged:
            raise EvomergeError("the base model must be scored before the first merge")
        try:
            if recipe is not None:
                self._push(recipe)
            return self.evaluator.evaluate(split=split, on_chunk=on_chunk)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if "out of memory" in str(exc).lower():
                raise CandidateError(f"out of memory: {str(exc).splitlines()[0]}") from exc
            raise

    def _push(self, recipe: Recipe) -> None:
        """Write the candidate into the live model (in place) or push it to the engine; a
        stacking stage then rebuilds the live layer list (loop/stacking.py)."""
        self._merged = True
        weights, stacked = split_recipe(recipe)
        live = self.backend.live_tensors()
        if weights is not None and self.merger is not None and live is not None:
            self.merger.apply(weights, live)
        elif weights is not None and self.merger is not None:
            if not self._route_settled and hasattr(self.backend, "probe_update_mode"):
                # a streamed candidate cannot be sent twice: settle the engine's update route
                # (in-place load_weights, else reload) with the loaded model's own tensors
                self._write_owned(list(self.merger.source_tensors(self.loaded_ref)))
            self.backend.load_weights(self.merger.merged(weights))
        self._stack(stacked, owned=False)

    def _stack(self, stage: Any, owned: bool) -> None:
        if self.stack is not None:
            self.stack.apply(stage, owned) if stage is not None else self.stack.reset()

    def _write_owned(self, pairs: list[tuple[str, Any]]) -> None:
        """Owned (name, tensor) pairs into the live model: copied in place (HF) or pushed
        (vLLM; the first push also settles the update route: probe_update_mode)."""
        import torch

        live = self.backend.live_tensors()
        if live is not None:
            with torch.no_grad():
                for name, t in pairs:
                    live[name].copy_(t)
            return
        probe = getattr(self.backend, "probe_update_mode", None)
        if probe is not None and not self._route_settled:
            probe(pairs)
            self._route_settled = True
        else:
            self.backend.load_weights(pairs)

    def _push_plain(self, recipe: Recipe) -> None:
        """The plain path the fast one must agree with: every merged tensor copied out of the
        merger's buffers first, then written (HF) or pushed as owned tensors (vLLM)."""
        weights, stacked = split_recipe(recipe)
        if weights is not None and self.merger is not None:
            self._write_owned([(n, t.clone()) for n, t in self.merger.merged(weights)])
        self._stack(stacked, owned=True)

    def restore_base(self) -> None:
        """Put the model the backend loaded back in place, undoing any candidate."""
        self._stack(None, owned=False)
        if self.merger is not None:
            self._write_owned(list(self.merger.source_tensors(self.loaded_ref)))
        self._merged = False

    def self_check(self) -> None:
        """Start-up parity check of this platform's weight path: score the base on the first
        chunk, push a candidate and score it, put the base back, and the base's per-example
        scores must come back identical. A backend or transport that corrupts weights (the
        vLLM path once scored every candidate 0) stops the run here, before any trial."""
        from evomerge.errors import IntegrityError

        first, ll = self._first_chunk(), self.backend.loglikelihood(PROBES)
        self._push(self.probe)
        fast = self.backend.loglikelihood(PROBES)
        self._first_chunk()  # engine state computed from the candidate (caches) must not leak
        self._push_plain(self.probe)
        if self.backend.loglikelihood(PROBES) != fast:
            raise IntegrityError(
                f"self-check failed on backend '{self.backend_name}': a candidate written "
                "through the search's fast path scores differently from the same candidate "
                "copied in tensor by tensor (log-likelihoods of fixed probe texts differ)"
            )
        self.restore_base()
        again = self._first_chunk()
        # log-probs are exact fingerprints of the weights (a task where every candidate
        # scores 0 could not tell the base from a candidate); same bytes, same kernels
        if self.backend.loglikelihood(PROBES) != ll or again.per_example != first.per_example:
            raise IntegrityError(
                f"self-check failed on backend '{self.backend_name}': the base's scores "
                f"changed after a candidate was pushed and the base put back "
                f"({_first_difference(first.per_example, again.per_example)}); "
                f"{self._first_changed_tensor()}"
            )

    def _first_chunk(self) -> Any:
        return self.evaluator.evaluate(split="search", on_chunk=lambda k, r: False)

    def _first_changed_tensor(self) -> str:
        live = self.backend.live_tensors()
        if live is None or self.merger is None:
            return "the live weights cannot be compared tensor by tensor here"
        for name, t in self.merger.source_tensors(self.loaded_ref):
            if not bool((live[name] == t.to(live[name].device, live[name].dtype)).all()):
                return f"first tensor that differs from the loaded model: '{name}'"
        return "every live tensor equals the loaded model's (state outside the weights)"


def live_stack(space: SearchSpace, backend: Any, loaded: str, unchanged: bool) -> LiveStack | None:
    """The live stacked model of a stacking space (None without one); its sources resident.
    `unchanged`: no weights are merged, so the loaded model's own layers serve as its source."""
    from evomerge.loop.stacking import LiveStack
    from evomerge.merge.io import open_checkpoint
    from evomerge.search.stacking import MERGED

    stack = space.spec.stacking
    if stack is None:
        return None
    model = getattr(backend, "model", None)
    if model is None:
        raise ConfigError("layer stacking needs the hf backend (a live transformers model)")
    backend.live_tensors()  # the loaded model's tensor names, taken before any layer swap
    readers = {s: open_checkpoint(s) for s in stack.sources if s != MERGED}
    try:
        return LiveStack(model, readers, loaded if unchanged else None)
    finally:
        for r in readers.values():
            r.close()


def _first_difference(a: dict, b: dict) -> str:
    if a == b:
        return "log-likelihoods of fixed probe texts differ"
    for task in a:
        for doc, score in a[task].items():
            if b.get(task, {}).get(doc) != score:
                return f"task {task}, doc {doc}: {score} before, {b.get(task, {}).get(doc)} after"
    return "different documents scored"
