"""Hyperparameter tuning: an Optuna study whose every trial is a ``train`` run.

Tuning wraps training. A trial builds a ``TrainConfig`` from the study's fixed options plus the
point the sampler drew, calls :func:`visiontune.train.train` with a callback that reports the
objective every epoch (and asks training to stop when the pruner says so), and returns the best
epoch's objective. Each trial writes its own run directory, ``STUDY_DIR/trials/0007/``.

Everything a worker needs (fixed training options, the space, objective, direction, strategy,
budget) is stored in the study itself (the ``visiontune`` study user attribute), so
``visiontune tune worker --study NAME --storage URL`` on any machine joins the study with only
the name and the storage. There is no coordinator: workers share the storage, and each one
stops when the study holds ``max_trials`` finished (complete or pruned) trials.

Storages:

* default: Optuna's ``JournalStorage`` over a ``JournalFileBackend`` at
  ``STUDY_DIR/journal.log``. It takes concurrent writers from several processes (SQLite does
  not: "database is locked"), needs no server, and every finished trial is on disk the moment
  it finishes, so a ``kill -9`` loses at most the running trials.
* ``postgresql://`` (or any SQLAlchemy URL): Optuna's ``RDBStorage``, for many machines.

Both run a heartbeat: a running trial records one every ``heartbeat`` seconds; a trial whose
last heartbeat is older than three intervals (its worker was killed, or its machine died) is
failed by the next worker that looks, and re-queued with the same parameters by Optuna's
``RetryHeartbeatStaleTrialCallback`` (at most ``max_retry`` times). Optuna 5 has heartbeats for
``RDBStorage`` only, so :class:`HeartbeatJournalStorage` adds the same protocol to the journal
storage (the heartbeat is a trial system attribute, so it works across processes and NFS).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visiontune.callbacks import Callback
from visiontune.errors import UserError
from visiontune.tuning.space import RESERVED, SearchSpace, parse_space

ATTR = "visiontune"  # the study user attribute that holds the study's config
FORMAT = 1
METRICS = (
    "valid_loss",
    "valid_accuracy",
    "valid_top5",
    "train_loss",
    "train_accuracy",
    "lr",
    "images_per_sec",
    "epoch_time",
)
COUNTED = ("COMPLETE", "PRUNED")  # trial states that use up the budget


class TuneSettings(BaseModel):
    """How a tuning job runs (the training options live in the fixed ``TrainConfig``)."""

    model_config = ConfigDict(extra="forbid")

    study: str = Field("visiontune", description="study name")
    study_dir: str | None = Field(None, description="default: studies/STUDY")
    storage: str | None = Field(None, description="default: STUDY_DIR/journal.log")
    objective: str = "valid_loss"
    direction: Literal["auto", "minimize", "maximize"] = "auto"
    max_trials: int = Field(10, ge=1)
    parallel: int = Field(1, ge=1)
    strategy: Literal["bayesian", "random", "grid", "hyperband"] = "bayesian"
    early_stopping: Literal["off", "auto"] = "off"
    timeout: float | None = Field(None, gt=0)
    max_retry: int = Field(2, ge=0)
    heartbeat: int = Field(10, ge=1, description="seconds between trial heartbeats")
    seed: int | None = Field(None, description="sampler seed; default the training seed")
    warm_start: list[str] = Field(default_factory=list)
    train_best: bool = False
    report: bool = True

    def resolved_study_dir(self) -> Path:
        return Path(self.study_dir) if self.study_dir else Path("studies") / self.study


@dataclass
class TuneResult:
    """What a tuning job left behind."""

    study: str
    study_dir: Path
    storage: str
    counts: dict[str, int]
    best: dict[str, Any] | None
    report: Path | None = None
    best_run: Path | None = None


class TrialFailed(Exception):
    """A trial failed for a reason recorded on it (out of memory, a diverged loss); the study
    goes on."""


# --------------------------------------------------------------------------------------------
# Samplers and pruners, by name


def _tpe(space: SearchSpace, seed: int | None):
    import optuna

    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=min(10, max(2, len(space.params) + 1))
    )


def _random(space: SearchSpace, seed: int | None):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _grid(space: SearchSpace, seed: int | None):
    import optuna

    return optuna.samplers.GridSampler(space.grid(), seed=seed)


SAMPLERS = {"bayesian": _tpe, "random": _random, "grid": _grid, "hyperband": _tpe}


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


def direction_for(objective: str, direction: str) -> str:
    if direction != "auto":
        return direction
    return "minimize" if "loss" in objective else "maximize"


# --------------------------------------------------------------------------------------------
# Storage


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna marks heartbeats experimental and warns on every use; the warning tells a user
    nothing they can act on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _journal_storage_class():
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        """``JournalStorage`` with the heartbeat protocol Optuna gives ``RDBStorage``."""

        def __init__(self, backend, interval: int, grace: int, callback) -> None:
            super().__init__(backend)
            self._interval, self._grace, self._callback = interval, grace, callback

        def record_heartbeat(self, trial_id: int) -> None:
            # A heartbeat for a trial another worker already failed must not crash the thread.
            with contextlib.suppress(Exception):
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            stale = []
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                # A retried trial inherits its predecessor's heartbeat attribute; its own start
                # time is the floor.
                started = t.datetime_start.timestamp() if t.datetime_start else now
                beat = max(float(t.system_attrs.get("heartbeat", 0.0)), started)
                if now - beat > self._grace:
                    stale.append(t._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int | None:
            return self._interval

        def get_heartbeat_stale_trial_callback(self):
            return self._callback

    return HeartbeatJournalStorage


def is_rdb_url(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "sqlite")


def default_storage(study_dir: Path) -> str:
    return str((study_dir / "journal.log").resolve())


def open_storage(url: str, *, heartbeat: int = 10, max_retry: int = 2):
    """Open an Optuna storage: an SQLAlchemy URL (RDB) or a journal file path.

    Raises:
        UserError: the storage cannot be reached or opened.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with _quiet_optuna():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        if is_rdb_url(url):
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.startswith("postgres"):
                kwargs["connect_args"] = {"connect_timeout": 10}
            shown = _redact(url)
            if url.startswith("postgres://"):
                url = "postgresql://" + url.removeprefix("postgres://")
            url = _with_installed_driver(url)
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=retry,
                )
            except Exception as e:  # sqlalchemy errors, a missing driver: all the user's to fix
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot open storage {shown}: {first}") from e
        path = Path(url.removeprefix("journal:").removeprefix("file://"))
        if path.is_dir():
            path = path / "journal.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except OSError as e:
            raise UserError(f"cannot open storage {path}: {e.strerror or e}") from e
        return _journal_storage_class()(backend, heartbeat, 3 * heartbeat, retry)


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 picks psycopg (3) for ``postgresql://``; the ``tune`` extra installs
    psycopg2, so name it when psycopg is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _redact(url: str) -> str:
    """Hide a password in a storage URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def load_study(name: str, storage_url: str, *, heartbeat: int = 10, max_retry: int = 2):
    """Load an existing study and its visiontune config.

    Raises:
        UserError: no such study in the storage, or it was not created by visiontune.
    """
    import optuna

    storage = open_storage(storage_url, heartbeat=heartbeat, max_retry=max_retry)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        hint = f" (studies there: {', '.join(names)})" if names else ""
        raise UserError(f"no study {name!r} in {_redact(storage_url)}{hint}") from None
    if ATTR not in study.user_attrs:
        raise UserError(f"study {name!r} was not created by visiontune tune")
    return study


def study_config(study) -> dict[str, Any]:
    return dict(study.user_attrs[ATTR])


# --------------------------------------------------------------------------------------------
# Trial bookkeeping


def _state(t) -> str:
    return t.state.name


def counted_trials(study) -> list:
    """Finished trials that use up the budget (warm-start seeds do not)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if _state(t) in COUNTED and "warm_start" not in t.user_attrs
    ]


def trial_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if "warm_start" in t.user_attrs:
            counts["WARM_START"] = counts.get("WARM_START", 0) + 1
        else:
            counts[_state(t)] = counts.get(_state(t), 0) + 1
    return counts


def best_trial(study):
    """The best complete trial run by this study (not a warm-start seed), or ``None``."""
    minimize = study.direction.name == "MINIMIZE"
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if _state(t) == "COMPLETE"
        and "warm_start" not in t.user_attrs
        and t.value is not None
        and math.isfinite(t.value)
    ]
    if not done:
        return None
    return (min if minimize else max)(done, key=lambda t: (t.value, t.number))


def best_summary(study) -> dict[str, Any] | None:
    """The best trial as plain data: parameters, objective value, and where its model is."""
    t = best_trial(study)
    if t is None:
        return None
    cfg = study_config(study)
    return {
        "study": study.study_name,
        "trial": t.number,
        "objective": cfg["objective"],
        "direction": study.direction.name.lower(),
        "value": t.value,
        "params": dict(t.params),
        "epochs_run": t.user_attrs.get("epochs_run"),
        "run_dir": t.user_attrs.get("run_dir"),
        "model_dir": t.user_attrs.get("model_dir"),
        "host": t.user_attrs.get("host"),
    }


# --------------------------------------------------------------------------------------------
# The objective


class _Objective:
    """One trial = one training run with an epoch-end report hook."""

    def __init__(self, cfg: dict[str, Any], study_dir: Path) -> None:
        self.cfg = cfg
        self.space = parse_space(cfg["space"])
        self.study_dir = study_dir
        self.prune = cfg["strategy"] == "hyperband" or cfg["early_stopping"] == "auto"

    def __call__(self, trial) -> float:
        import optuna

        from visiontune.config import TrainConfig, build_config
        from visiontune.train import train

        params = self.space.suggest(trial)
        objective = self.cfg["objective"]
        mode = "min" if self.cfg["direction"] == "minimize" else "max"
        run_dir = (self.study_dir / "trials" / f"{trial.number:04d}").resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        cfg = build_config(
            TrainConfig,
            None,
            {
                **self.cfg["fixed"],
                **params,
                "output": str(run_dir),
                "monitor": objective,  # the best epoch of a trial is its best objective
                "monitor_mode": mode,
                "progress": False,
            },
        )
        reporter = _Reporter(trial, objective, self.prune)
        t0 = time.perf_counter()
        try:
            result = train(cfg, [reporter])
        except (RuntimeError, MemoryError) as e:
            if isinstance(e, MemoryError) or _is_oom(str(e)):
                reason = f"out of memory: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                trial.set_user_attr("fail_reason", reason[:500])
                raise TrialFailed(reason) from e
            raise
        except UserError as e:
            # A combination only this point of the space hits (checked options pass alone).
            trial.set_user_attr("fail_reason", str(e)[:500])
            raise TrialFailed(str(e)) from e
        duration = time.perf_counter() - t0
        trial.set_user_attr("epochs_run", len(result.history))
        trial.set_user_attr("duration_s", round(duration, 3))
        trial.set_user_attr("used_feature_cache", bool(result.used_feature_cache))
        trial.set_user_attr("model_dir", str(result.model_dir) if result.model_dir else None)
        trial.set_user_attr("best_epoch", result.best_epoch)
        if result.best_metrics:
            for key in ("valid_loss", "valid_accuracy"):
                if key in result.best_metrics:
                    trial.set_user_attr(key, float(result.best_metrics[key]))
        if result.stop_reason == "pruned":
            trial.set_user_attr("pruned_at_epoch", reporter.pruned_at)
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        value = result.best_metrics.get(objective) if result.best_metrics else None
        if value is None or not math.isfinite(float(value)):
            trial.set_user_attr("fail_reason", f"objective {objective} is {value} (diverged?)")
            raise TrialFailed(f"objective {objective} is {value}")
        return float(value)


def _is_oom(message: str) -> bool:
    """CUDA says "out of memory"; the CPU allocator says "not enough memory"."""
    m = message.lower()
    return any(s in m for s in ("out of memory", "not enough memory", "can't allocate memory"))


class _Reporter(Callback):
    """Reports the objective after every epoch and stops training when the pruner says so."""

    def __init__(self, trial, objective: str, prune: bool) -> None:
        self.trial, self.objective, self.prune = trial, objective, prune
        self.pruned_at: int | None = None

    def on_epoch_end(self, state, metrics) -> None:
        value = metrics.get(self.objective)
        if value is None or not math.isfinite(float(value)):
            return
        epoch = int(metrics["epoch"])
        self.trial.report(float(value), epoch)
        # A trial at its last epoch has spent its budget: let it complete rather than prune.
        last = epoch >= state.config.epochs
        if self.prune and not last and self.trial.should_prune():
            self.pruned_at = epoch
            state.stop_reason = "pruned"


# --------------------------------------------------------------------------------------------
# Creating a study, and the worker loop every process runs


def _fixed_for_storage(fixed) -> dict[str, Any]:
    """The fixed training options as stored in the study (tuner-owned keys dropped)."""
    values = fixed.model_dump(mode="json")
    for key in RESERVED:
        if key != "data":
            values.pop(key, None)
    data = values["data"]
    if "://" not in data and Path(data).exists():
        values["data"] = str(Path(data).resolve())  # workers may start in another directory
    return values


def check_objective(objective: str) -> None:
    if objective not in METRICS:
        import difflib

        close = difflib.get_close_matches(objective, METRICS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"one of {', '.join(METRICS)}"
        raise UserError(f"unknown objective {objective!r} ({hint})")


def check_batch_sizes(fixed, space: SearchSpace) -> None:
    """Fail before any trial when a batch size exceeds the training split.

    Raises:
        UserError: the largest batch size in play is larger than the training split.
    """
    from visiontune.data.folder import discover

    sizes = [fixed.batch_size]
    for p in space.params:
        if p.name == "batch_size":
            sizes = [int(v) for v in p.corners()]
    limit = fixed.limit_per_class
    index = discover(
        fixed.data,
        endpoint_url=fixed.endpoint_url,
        split_ratios=fixed.split_ratios,
        split_seed=fixed.split_seed,
        limit_per_class=limit,
    )
    train = index.splits.get("train") or []
    n_train = len(train)
    if not index.splits.get("valid"):
        # train() holds out 10% of each class for validation when there is no valid split.
        per_class: dict[int, int] = {}
        for _, y in train:
            per_class[y] = per_class.get(y, 0) + 1
        n_train -= sum(max(1, round(n * 0.1)) if n > 1 else 0 for n in per_class.values())
    too_big = [b for b in sizes if b > n_train]
    if too_big:
        raise UserError(
            f"batch size {max(too_big)} is larger than the training split of {fixed.data} "
            f"({n_train} images); lower it in the space or the fixed options"
        )


def create_study(settings: TuneSettings, fixed, space: SearchSpace):
    """Validate everything, then create the study (or load it to continue).

    Args:
        settings: how to tune.
        fixed: the fixed training options (a validated ``TrainConfig``).
        space: the ranges.

    Returns:
        ``(study, storage_url, study_dir)``.

    Raises:
        UserError: any bad input, before a trial runs.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_objective(settings.objective)
    fixed_values = _fixed_for_storage(fixed)
    space.validate(fixed_values)
    if settings.strategy == "grid":
        space.grid()
    check_batch_sizes(fixed, space)
    study_dir = settings.resolved_study_dir()
    storage_url = settings.storage or default_storage(study_dir)
    storage = open_storage(storage_url, heartbeat=settings.heartbeat, max_retry=settings.max_retry)
    direction = direction_for(settings.objective, settings.direction)
    payload = {
        "format": FORMAT,
        "fixed": fixed_values,
        "space": space.to_dict(),
        "objective": settings.objective,
        "direction": direction,
        "strategy": settings.strategy,
        "early_stopping": settings.early_stopping,
        "max_trials": settings.max_trials,
        "seed": fixed.seed if settings.seed is None else settings.seed,
        "max_retry": settings.max_retry,
    }
    with _quiet_optuna():
        try:
            study = optuna.create_study(
                study_name=settings.study,
                storage=storage,
                direction=direction,
                load_if_exists=True,
            )
        except Exception as e:
            if isinstance(e, UserError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot use storage {_redact(storage_url)}: {first}") from e
    existing = study.user_attrs.get(ATTR)
    if existing is None:
        study.set_user_attr(ATTR, payload)
        _warm_start(study, settings, space, storage_url)
    else:
        for key in ("fixed", "space", "objective", "direction", "strategy", "early_stopping"):
            if existing.get(key) != payload[key]:
                raise UserError(
                    f"study {settings.study!r} already exists with a different {key}; "
                    f"continue it with the same options, or start a new one with --study NAME"
                )
        if existing.get("max_trials") != settings.max_trials:
            study.set_user_attr(ATTR, {**existing, "max_trials": settings.max_trials})
    return study, storage_url, study_dir


def _warm_start(study, settings: TuneSettings, space: SearchSpace, storage_url: str) -> None:
    """Seed the sampler with the finished trials of earlier studies (names in the same storage,
    or study directories)."""
    import optuna

    if not settings.warm_start:
        return
    dists = space.distributions()
    added = 0
    for source in settings.warm_start:
        path = Path(source)
        if path.is_dir() and (path / "journal.log").is_file():
            storage = open_storage(str(path / "journal.log"))
            names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
            name = path.name if path.name in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise UserError(f"--warm-start {source}: cannot tell which study to use ({names})")
        else:
            storage, name = open_storage(storage_url), source
        try:
            other = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise UserError(f"--warm-start {source}: no such study or study directory") from None
        for t in other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if set(t.params) != set(dists) or "warm_start" in t.user_attrs:
                continue
            if not all(
                dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in t.params.items()
            ):
                continue
            study.add_trial(
                optuna.trial.create_trial(
                    params=dict(t.params),
                    distributions=dists,
                    value=t.value,
                    user_attrs={"warm_start": f"{name}#{t.number}"},
                )
            )
            added += 1
    print(f"warm start: seeded the sampler with {added} earlier trial(s)", file=sys.stderr)


def run_worker(
    study_name: str,
    storage_url: str,
    study_dir: str | Path | None = None,
    *,
    heartbeat: int = 10,
    timeout: float | None = None,
    max_new_trials: int | None = None,
    verbose: bool = True,
) -> int:
    """Run trials of a study until it holds its budget of finished trials.

    Workers on any number of processes and machines may run this against the same storage;
    each one reads the study's config from the storage. Stale running trials (a killed worker)
    are failed and re-queued by the heartbeat before new trials start.

    Args:
        study_name: the study.
        storage_url: the shared storage (journal file path or SQLAlchemy URL).
        study_dir: where this machine writes trial run directories (default studies/NAME).
        heartbeat: seconds between heartbeats of a running trial.
        timeout: stop starting new trials after this many seconds.
        max_new_trials: run at most this many trials in this call.
        verbose: print one line per finished trial.

    Returns:
        The number of trials this worker ran.
    """
    import optuna
    from optuna.storages import fail_stale_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = load_study(study_name, storage_url, heartbeat=heartbeat)
    cfg = study_config(probe)
    space = parse_space(cfg["space"])
    max_epochs = int(cfg["fixed"].get("epochs", 1))
    for p in space.params:
        if p.name == "epochs":
            max_epochs = int(max(p.corners()))
    sampler = SAMPLERS[cfg["strategy"]](space, cfg.get("seed"))
    pruner = make_pruner(cfg["strategy"], cfg["early_stopping"], max_epochs)
    storage = open_storage(storage_url, heartbeat=heartbeat, max_retry=cfg.get("max_retry", 2))
    with _quiet_optuna():
        study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
    study_dir = Path(study_dir) if study_dir else Path("studies") / study_name
    objective = _Objective(cfg, study_dir)
    deadline = time.monotonic() + timeout if timeout else None
    ran = 0
    while True:
        with _quiet_optuna():
            fail_stale_trials(study)
        budget = int(study_config(study)["max_trials"])
        if cfg["strategy"] == "grid":
            budget = min(budget, space.grid_size())
        trials = study.get_trials(deepcopy=False)
        done = len(counted_trials(study))
        running = sum(1 for t in trials if _state(t) == "RUNNING")
        waiting = sum(1 for t in trials if _state(t) == "WAITING")
        if done >= budget:
            break
        if deadline is not None and time.monotonic() > deadline:
            break
        if max_new_trials is not None and ran >= max_new_trials:
            break
        if done + running >= budget and not waiting:
            # The rest of the budget is running elsewhere: wait until it finishes, or until its
            # heartbeat goes stale and it comes back as a waiting retry.
            time.sleep(min(2.0, heartbeat))
            continue
        with _quiet_optuna():
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
        ran += 1
        if verbose:
            _print_last(study, os.getpid())
    return ran


def _print_last(study, pid: int) -> None:
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("pid") == pid]
    if not mine:
        return
    t = max(mine, key=lambda t: t.number)
    value = "" if t.value is None else f" {study_config(study)['objective']}={t.value:.4f}"
    extra = t.user_attrs.get("fail_reason") or ""
    print(
        f"trial {t.number}: {_state(t).lower()}{value} epochs={t.user_attrs.get('epochs_run')} "
        f"{_fmt_params(t.params)} {extra}".rstrip(),
        file=sys.stderr,
        flush=True,
    )


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _set_parent_death_signal() -> None:
    """Linux: a local worker gets SIGTERM when the tune process dies (even by SIGKILL), so no
    orphan keeps training; its running trial is then failed and retried on the next run."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_workers(
    n: int, study_name: str, storage_url: str, study_dir: Path, *, heartbeat: int, timeout
) -> list[subprocess.Popen]:
    """Start ``n`` ``visiontune tune worker`` processes against the same storage."""
    env = dict(os.environ)
    # Share the cores instead of each process claiming all of them.
    threads = max(1, (os.cpu_count() or 1) // n)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "-c",
        "from visiontune.cli import main; main()",
        "tune",
        "worker",
        "--study",
        study_name,
        "--storage",
        storage_url,
        "--study-dir",
        str(study_dir),
        "--heartbeat",
        str(heartbeat),
    ]
    if timeout:
        cmd += ["--timeout", str(timeout)]
    return [subprocess.Popen(cmd, env=env, preexec_fn=_set_parent_death_signal) for _ in range(n)]


def tune(settings: TuneSettings, fixed, space: SearchSpace) -> TuneResult:
    """Run (or continue) a tuning job: validate, create the study, run trials, write the report.

    Args:
        settings: how to tune.
        fixed: the fixed training options (a validated ``TrainConfig``).
        space: the ranges.

    Returns:
        The :class:`TuneResult`.

    Raises:
        UserError: bad input (before any trial), or every worker failed.
    """
    study, storage_url, study_dir = create_study(settings, fixed, space)
    study_dir.mkdir(parents=True, exist_ok=True)
    fast = fixed.frozen_backbone and fixed.augment == "none" and fixed.feature_cache
    start = time.monotonic()
    if settings.parallel == 1:
        run_worker(
            settings.study,
            storage_url,
            study_dir,
            heartbeat=settings.heartbeat,
            timeout=settings.timeout,
        )
    else:
        if fast and not counted_trials(study):
            # One trial here first computes the backbone features once; the workers then all
            # read them from the cache instead of computing them side by side.
            run_worker(
                settings.study,
                storage_url,
                study_dir,
                heartbeat=settings.heartbeat,
                max_new_trials=1,
            )
        left = (
            None
            if settings.timeout is None
            else max(1.0, settings.timeout - (time.monotonic() - start))
        )
        procs = spawn_workers(
            settings.parallel,
            settings.study,
            storage_url,
            study_dir,
            heartbeat=settings.heartbeat,
            timeout=left,
        )
        codes = []
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
            raise
        if all(c != 0 for c in codes):
            raise UserError(f"all {len(procs)} workers failed (exit codes {codes}); see above")
    study = load_study(settings.study, storage_url, heartbeat=settings.heartbeat)
    result = TuneResult(
        study=settings.study,
        study_dir=study_dir,
        storage=storage_url,
        counts=trial_counts(study),
        best=best_summary(study),
    )
    if settings.report:
        from visiontune.tuning.report import write_report

        result.report = write_report(study, study_dir / "report.html")
    if settings.train_best:
        result.best_run = train_best(study, study_dir / "best")
    return result


def train_best(study, output: Path) -> Path:
    """Train the final model with the fixed options and the best trial's parameters.

    Raises:
        UserError: the study has no complete trial yet.
    """
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train

    t = best_trial(study)
    if t is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to train from")
    cfg = study_config(study)
    train_cfg = build_config(TrainConfig, None, {**cfg["fixed"], **t.params, "output": str(output)})
    result = train(train_cfg)
    return result.run_dir
