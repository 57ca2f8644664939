"""Samplers and pruners by name, and the rule that a study never runs a configuration twice.

Every worker wraps its sampler in :class:`NoRepeatSampler`: the whole configuration of a trial
is drawn at once, checked against every trial already in the study (any state, warm-start seeds
included) and drawn again when it was tried; after a few draws it falls back to a random untried
point. Workers draw their configurations while they hold the study's claim lock (see
``tuning.storage.claim_lock``), so two workers never pick the same point side by side.

Each worker seeds its sampler from (study seed, worker, trials already in the study), so
parallel workers and a continued study draw differently while a study re-run from scratch
draws the same sequence.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from typing import Any

from visiontune.tuning.space import SearchSpace

# Draws from the strategy's sampler before falling back to a random untried point.
REDRAWS = 5


def worker_seed(seed: int | None, worker: int | None, n_trials: int) -> int | None:
    """The seed of one worker's sampler.

    Args:
        seed: the study's seed (``None``: unseeded).
        worker: the worker's index in a ``--parallel`` job; ``None`` for a worker started by
            hand (``tune worker``), which mixes in its host and process id instead.
        n_trials: how many trials the study held when the worker started, so a continued study
            does not replay the draws of its first run.

    Returns:
        A 32-bit seed, or ``None`` when the study is unseeded.
    """
    if seed is None:
        return None
    who = f"{socket.gethostname()}:{os.getpid()}" if worker is None else str(worker)
    digest = hashlib.sha256(f"{seed}/{who}/{n_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _tpe(space: SearchSpace, seed: int | None):
    import optuna

    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=min(10, max(2, len(space.params) + 1))
    )


def _random(space: SearchSpace, seed: int | None):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _grid(space: SearchSpace, seed: int | None):
    # Every point once, in random order: NoRepeatSampler's untried-point draw is a grid search.
    space.grid()  # only categorical spaces have a grid
    return None


SAMPLERS = {"bayesian": _tpe, "random": _random, "grid": _grid, "hyperband": _tpe}


def make_sampler(strategy: str, space: SearchSpace, seed: int | None):
    """The sampler for ``strategy``, wrapped so that no configuration runs twice."""
    return _no_repeat_class()(space, SAMPLERS[strategy](space, seed), seed)


def make_pruner(strategy: str, early_stopping: str, max_epochs: int):
    """Hyperband for ``--strategy hyperband``; SageMaker's median rule for ``--early-stopping
    auto``; otherwise none."""
    import optuna

    if strategy == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs))
    if early_stopping == "auto":
        # SageMaker's rule: stop a trial whose objective at epoch k is worse than the median of
        # earlier trials at epoch k. A little warm-up keeps the first epoch's noise from
        # deciding alone.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def taken_points(study, space: SearchSpace, exclude: int | None = None) -> set[tuple[Any, ...]]:
    """The keys of every configuration the study holds (all states), but trial ``exclude``."""
    # The storage, not study.get_trials: Hyperband hands samplers a study filtered to a bracket.
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    keys = (space.key(t.params) for t in trials if t.number != exclude)
    return {k for k in keys if k is not None}


def _no_repeat_class():
    from optuna.samplers import BaseSampler

    class NoRepeatSampler(BaseSampler):
        """Draws a trial's whole configuration at once, never one the study already holds."""

        def __init__(self, space: SearchSpace, base, seed: int | None) -> None:
            self.space, self.base = space, base
            self._rng = random.Random(seed)
            self._dists = space.distributions()

        def reseed_rng(self) -> None:
            self._rng.seed()
            if self.base is not None:
                self.base.reseed_rng()

        def before_trial(self, study, trial) -> None:
            if self.base is not None:
                self.base.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
            return dict(self._dists)

        def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
            if not search_space or "fixed_params" in trial.system_attrs:
                return {}  # a retry keeps the parameters of the trial it replaces
            taken = taken_points(study, self.space, exclude=trial.number)
            for _ in range(REDRAWS if self.base is not None else 0):
                point = self._draw(study, trial)
                if self.space.key(point) not in taken:
                    return point
            point = self.space.untried_point(taken, self._rng)
            if point is None:
                # The worker checks for an exhausted space before it claims a trial; a point
                # tried again here is a duplicate, not a crash.
                point = self.space.random_point(self._rng)
            return point

        def _draw(self, study, trial) -> dict[str, Any]:
            relative_space = self.base.infer_relative_search_space(study, trial)
            point = (
                self.base.sample_relative(study, trial, relative_space) if relative_space else {}
            )
            for name, dist in self._dists.items():
                if name not in point:
                    point[name] = self.base.sample_independent(study, trial, name, dist)
            return point

        def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
            # Only a parameter outside the space (none in a visiontune study) lands here.
            if self.base is not None:
                return self.base.sample_independent(study, trial, param_name, param_distribution)
            return self.space.random_point(self._rng).get(param_name)

        def after_trial(self, study, trial, state, values) -> None:
            if self.base is not None:
                self.base.after_trial(study, trial, state, values)

    return NoRepeatSampler
