"""The qmc sampler, resumable: a trial's index in the QMC sequence is stored on the trial.

Optuna's QMCSampler takes the next index from a study-wide counter, then the trial stores the
parameters: a worker killed between the two loses that point (the counter moved on, the trial
has no parameters, and its retry draws the next index), so a resumed study skips one proposal of
an uninterrupted run. Here the index is taken as one write on the trial itself (the largest index
any trial holds, plus one), and a retry of a killed trial (Optuna copies the dead trial's system
attributes onto it) draws its index again. A kill before that write leaves nothing drawn; a kill
after it, whole parameters or part, is redrawn to the same point. See search/study.py for the
budget this gives.
"""

from __future__ import annotations

from typing import Any

QMC_INDEX = "evomerge:qmc_index"  # trial system attr: this trial's index in the QMC sequence


def qmc_index(trial: Any) -> int | None:
    return trial.system_attrs.get(QMC_INDEX)


def resumable_qmc_cls() -> type:
    import optuna

    class ResumableQMCSampler(optuna.samplers.QMCSampler):
        """QMCSampler whose sequence index lives on the trial (the module docstring says why).
        Two workers drawing at the same instant may take the same index and score that point
        twice, a race Optuna's own counter has too (its read and write are not one
        transaction); a repeat proposed after the first finished is answered from its twin."""

        def reseed_rng(self) -> None:
            # The points are a function of (seed, index): nothing in memory to replay. The
            # independent sampler draws only the first trial of a fixed space; reseeding it on
            # resume would give a study killed before its first trial stored anything another
            # first trial than an uninterrupted run.
            pass

        def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
            self._drawing = trial  # the trial _find_sample_id takes an index for
            try:
                return super().sample_relative(study, trial, search_space)
            finally:
                self._drawing = None

        def _find_sample_id(self, study: Any, search_space: dict) -> int:
            trial = self._drawing
            own = qmc_index(trial)
            if own is not None:  # the retry of a trial killed after it drew
                return int(own)
            # every trial of the study (a Hyperband bracket's view would hide the others)
            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
            taken = (qmc_index(t) for t in trials)
            index = max((i for i in taken if i is not None), default=-1) + 1
            study._storage.set_trial_system_attr(trial._trial_id, QMC_INDEX, index)
            trial.system_attrs[QMC_INDEX] = index
            return index

    return ResumableQMCSampler
