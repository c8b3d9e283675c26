"""LiveWorkbench: one worker's merge + evaluation, what the search loop scores trials with.

It loads the base model once into the evaluator's backend, keeps the task vectors resident in
one CandidateMerger and writes every candidate straight into the live weights (no disk per
trial). It wires merge and eval only; the search (Optuna) is run.py's.
"""

from __future__ import annotations

from typing import Any, Protocol

from evomerge.common.device import default_device
from evomerge.common.model_dir import num_layers
from evomerge.errors import CandidateError, EvomergeError
from evomerge.recipe import Recipe
from evomerge.search.baselines import default_params
from evomerge.search.space import SearchSpace


class Workbench(Protocol):
    """What the loop needs from merge + eval (LiveWorkbench; tests pass a fake)."""

    task_names: list[str]
    higher_is_better: dict[str, bool]

    def evaluate(self, recipe: Recipe | None, split: str = "search", on_chunk: Any = None) -> Any:
        """Merge `recipe` into the live model (None: the base as loaded), evaluate `split`."""
        ...


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
    ) -> None:
        from evomerge.eval.backends import load_backend
        from evomerge.eval.evaluator import Evaluator
        from evomerge.eval.tasks import load_tasks
        from evomerge.merge.candidate import CandidateMerger
        from evomerge.merge.io import open_checkpoint

        spec = space.spec
        self.tasks = load_tasks(spec.tasks, heldout_fraction=heldout_fraction, seed=seed)
        self.task_names = [t.name for t in self.tasks]
        self.higher_is_better = {t.name: bool(t.higher_is_better) for t in self.tasks}
        self.backend = load_backend(
            backend, spec.base_model or spec.models[0], device=device, batch_size=batch_size
        )
        # the merger's layout (inputs, tensors) is the same for every candidate: build it from
        # the defaults of the first method
        stage = space.decode(default_params(space, spec.methods[0])).final
        refs = [m.model for m in stage.models] + ([stage.base_model] if stage.base_model else [])
        sources = {str(r): open_checkpoint(r) for r in refs}
        layers = spec.num_layers or num_layers(sources[str(refs[-1])].config) or 1
        self.merger = CandidateMerger(stage, sources, num_layers=layers, device=device)
        pack = getattr(self.backend, "pack_live", None)  # optional: see HFBackend.pack_live
        if pack is not None:
            pack(self.merger.tensor_names)
        self.evaluator = Evaluator(self.backend, self.tasks, chunks=tuple(chunks), seed=seed)
        self._merged = False

    @classmethod
    def from_space(
        cls, space: SearchSpace, backend: str | None = None, device: str | None = None
    ) -> LiveWorkbench:
        """The workbench a space's `eval:` section describes (arguments override it)."""
        ecfg = space.spec.eval
        return cls(
            space,
            backend or ecfg.get("backend", "hf"),
            device or ecfg.get("device") or default_device(),
            ecfg.get("chunks", (16, 64, None)),
            int(ecfg.get("seed", 0)),
            float(ecfg.get("heldout_fraction", 0.5)),
            ecfg.get("batch_size", 64),
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
                self._merged = True
                live = self.backend.live_tensors()
                if live is not None:
                    self.merger.apply(recipe.final, live)
                else:
                    self.backend.load_weights(self.merger.merged(recipe.final))
            return self.evaluator.evaluate(split=split, on_chunk=on_chunk)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if "out of memory" in str(exc).lower():
                raise CandidateError(f"out of memory: {str(exc).splitlines()[0]}") from exc
            raise
