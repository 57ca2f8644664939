"""Worker processes: the loop every worker runs, and the local ``--parallel`` workers.

Everything a worker needs (fixed training options, the space, objective, direction, strategy,
budget) is stored in the study itself, so ``visiontune tune worker --study NAME --storage URL``
on any machine joins the study with only the name and the storage. There is no coordinator:
workers share the storage and each one claims trials, under the study's claim lock, until the
study holds ``max_trials`` finished (complete or pruned) trials or every point of a finite space
has been tried.

A claim is atomic: under the lock a worker fails stale trials (which re-queues them), counts
finished and running trials against the budget, creates the trial (or takes a re-queued one)
and draws its configuration; only then does another worker count. Training happens outside the
lock, with Optuna's heartbeat thread running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.tuning._base import (
    BASELINE,
    EPOCHS_RUN,
    FAIL_REASON,
    TRIAL_NPROC,
    WORKER,
    TrialFailed,
    default_study_dir,
    quiet_optuna,
)
from visiontune.tuning.objective import study_kind, tidy_trial_dirs
from visiontune.tuning.samplers import make_pruner, make_sampler, taken_points, worker_seed
from visiontune.tuning.space import SearchSpace
from visiontune.tuning.storage import claim_lock, load_study, open_storage, study_config
from visiontune.tuning.trials import counted_trials, fmt_params, state_of


@dataclass
class Claim:
    """What a worker got when it asked for a trial: a trial, or why not."""

    trial: Any = None
    wait: bool = False  # the rest of the budget is running elsewhere: look again later
    reason: str | None = None  # why the study needs no more trials from this worker


def claim_trial(study, space: SearchSpace, lock) -> Claim:
    """Claim the next trial of ``study`` atomically, with its configuration drawn.

    Args:
        study: the study, loaded with this worker's sampler.
        space: the study's space.
        lock: the study's claim lock (:func:`visiontune.tuning.storage.claim_lock`).

    Returns:
        A :class:`Claim` holding the running trial, or saying to wait or to stop.
    """
    from optuna.storages import fail_stale_trials

    with lock:
        with quiet_optuna():
            # Stale trials are failed and re-queued (WAITING) here, under the lock, so the
            # re-queued trial is claimed below before another worker counts.
            fail_stale_trials(study)
        budget = int(study_config(study)["max_trials"])
        trials = study.get_trials(deepcopy=False)
        done = len(counted_trials(study))
        running = sum(1 for t in trials if state_of(t) == "RUNNING")
        waiting = sum(1 for t in trials if state_of(t) == "WAITING")
        if done >= budget:
            return Claim(reason=f"the study holds its {budget} finished trials")
        if done + running >= budget:
            # The rest of the budget is running elsewhere: wait until it finishes, or until its
            # heartbeat goes stale and it comes back as a waiting retry.
            return Claim(wait=True)
        size = space.size()
        if not waiting and size is not None and len(taken_points(study, space)) >= size:
            if running:
                return Claim(wait=True)  # a running trial may die and come back as a retry
            return Claim(
                reason=f"all {size} points of the space have been tried "
                f"({done} of --max-trials {budget} finished); widen the space to run more"
            )
        with quiet_optuna():
            trial = study.ask()
            space.suggest(trial)  # draw (and store) the configuration while holding the lock
        return Claim(trial=trial)


def run_trial(study, trial, objective: Callable[[Any], float]) -> None:
    """Run the objective on a claimed trial with a heartbeat, and record how it ended.

    A :class:`TrialFailed` (out of memory, a diverged loss) fails the trial and the study goes
    on; any other exception (a bug, an interrupt) fails it and is raised. An interrupted trial
    (Ctrl-C, SIGTERM) is also queued again with the same parameters (:func:`requeue`), so the
    continued study runs it.
    """
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread
    from optuna.trial import TrialState

    state, value, error = None, None, None
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except TrialFailed:
            state = TrialState.FAIL
        except BaseException as e:  # recorded as FAIL, then raised
            state, error = TrialState.FAIL, e
    interrupted = error is not None and is_interrupt(error)
    with quiet_optuna():
        if interrupted:
            trial.set_user_attr(FAIL_REASON, "interrupted; queued again")
        study.tell(trial, None if state is not None else value, state=state)
        if interrupted:
            requeue(study, trial._trial_id)
    if error is not None:
        raise error


def is_interrupt(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, however the trial surfaced it (a training run stops at a step
    boundary with ``TrainingInterrupted``; a script trial raises ``KeyboardInterrupt``)."""
    if isinstance(error, KeyboardInterrupt):
        return True
    from visiontune.train import TrainingInterrupted  # loaded already: the trial trained

    return isinstance(error, TrainingInterrupted)


def requeue(study, trial_id: int) -> None:
    """Queue a stopped trial again (WAITING, same parameters), as a stale trial's retry is.

    The user stopped the trial, not its configuration: without this the interrupted point
    counts as tried, so a continued study never runs it (a finite space loses it for good,
    and a study stopped in trial 0 loses its untuned default, which it then never weighs the
    other trials against). The retry keeps the trial's ``baseline`` mark and says which trial
    it replaces; it runs in a run directory of its own.
    """
    import optuna
    from optuna.trial import TrialState

    failed = study._storage.get_trial(trial_id)
    # "failed_trial" names the first trial of the chain, as Optuna's stale-trial retry does;
    # "retry_history" is left alone: it counts heartbeat retries against --max-retry, and the
    # user stopping a trial is no sign that it kills its worker.
    first = failed.system_attrs.get("failed_trial", failed.number)
    system_attrs = {**failed.system_attrs, "failed_trial": first}
    system_attrs.pop("heartbeat", None)  # the retry's own start time is its first beat
    user_attrs = {BASELINE: True} if failed.user_attrs.get(BASELINE) else {}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )


def run_worker(
    study_name: str,
    storage_url: str,
    study_dir: str | Path | None = None,
    *,
    heartbeat: int = 10,
    timeout: float | None = None,
    max_new_trials: int | None = None,
    verbose: bool = True,
    worker: int | None = None,
    objective: Callable[[Any], float] | None = None,
    trial_nproc: int = 1,
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
        worker: this worker's index among the ``--parallel`` workers (seeds its sampler);
            ``None`` for a worker started by hand.
        objective: what a trial runs (default: a training run with the study's options).
        trial_nproc: processes per trial: above 1, each trial trains as a torchrun job of
            its own (``visiontune.tuning.distributed``).

    Returns:
        The number of trials this worker ran.

    Raises:
        UserError: a heartbeat under a second or a timeout that is not positive.
    """
    import optuna

    from visiontune.errors import UserError

    # A trial is stale after three heartbeats: at 0 (or less) a worker would find every
    # other worker's running trial stale, fail it and queue it again.
    if heartbeat < 1:
        raise UserError(f"--heartbeat must be at least 1 second, got {heartbeat}")
    if timeout is not None and not timeout > 0:
        raise UserError(f"--timeout must be more than 0 seconds, got {timeout}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = load_study(study_name, storage_url, heartbeat=heartbeat)
    cfg = study_config(probe)
    parse_kind_space, objective_class = study_kind(cfg)
    space = parse_kind_space(cfg["space"])
    if trial_nproc != 1:
        check_distributed_trials(cfg, space, 1, trial_nproc)
        # This machine's choices, handed to the objective (not stored: other workers choose).
        cfg = {**cfg, TRIAL_NPROC: trial_nproc, WORKER: worker}
    max_epochs = int(cfg["fixed"].get("epochs", 1))
    for p in space.params:
        if p.name == "epochs":
            max_epochs = int(max(p.corners()))
    seed = worker_seed(cfg.get("seed"), worker, len(probe.get_trials(deepcopy=False)))
    sampler = make_sampler(cfg["strategy"], space, seed)
    pruner = make_pruner(cfg["strategy"], cfg["early_stopping"], max_epochs)
    storage = open_storage(storage_url, heartbeat=heartbeat, max_retry=cfg.get("max_retry", 2))
    with quiet_optuna():
        study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
    study_dir = Path(study_dir) if study_dir else default_study_dir(study_name)
    objective = objective or objective_class(cfg, study_dir)
    lock = claim_lock(study)
    deadline = time.monotonic() + timeout if timeout else None
    ran = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            break
        if max_new_trials is not None and ran >= max_new_trials:
            break
        claim = claim_trial(study, space, lock)
        if claim.wait:
            time.sleep(min(1.0, heartbeat))
            continue
        if claim.trial is None:
            if verbose and claim.reason and claim.reason.startswith("all "):
                print(f"stopping: {claim.reason}", file=sys.stderr, flush=True)
            break
        try:
            run_trial(study, claim.trial, objective)
        finally:
            tidy_trial_dirs(study, study_dir, study_config(study).get("keep_checkpoints", "models"))
        ran += 1
        if verbose:
            _print_trial(study, claim.trial.number)
    return ran


def check_distributed_trials(cfg: dict[str, Any], space, parallel: int, trial_nproc: int) -> None:
    """Refuse ``--trial-nproc`` where it cannot run, before any trial starts.

    Raises:
        UserError: a script study, more processes than GPUs or cores, or a batch size that
            does not split over ``trial_nproc`` processes.
    """
    from visiontune.errors import UserError
    from visiontune.tuning.distributed import check_trial_processes

    if trial_nproc != 1 and cfg.get("kind", "train") != "train":
        raise UserError("--trial-nproc runs visiontune's own training; a script trial is one job")
    fixed = cfg["fixed"]
    sizes = [int(fixed.get("batch_size", 32))]
    for p in space.params:
        if p.name == "batch_size":
            sizes = [int(v) for v in p.corners()]
    check_trial_processes(parallel, trial_nproc, str(fixed.get("device", "auto")), sizes)


def _print_trial(study, number: int) -> None:
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    value = "" if t.value is None else f" {study_config(study)['objective']}={t.value:.4f}"
    extra = t.user_attrs.get(FAIL_REASON) or ""
    # epochs run, unless the space drew that many (then the parameter says it, once)
    run = t.user_attrs.get(EPOCHS_RUN)
    ran = "" if t.params.get("epochs") == run else f" epochs={run}"
    print(
        f"trial {t.number}: {state_of(t).lower()}{value}{ran} {fmt_params(t.params)} {extra}".rstrip(),
        file=sys.stderr,
        flush=True,
    )


def _set_parent_death_signal() -> None:
    """Linux: a local worker gets SIGTERM when the tune process dies (even by SIGKILL), so no
    orphan keeps training; its running trial is then failed and retried on the next run."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_workers(
    n: int,
    study_name: str,
    storage_url: str,
    study_dir: Path,
    *,
    heartbeat: int,
    timeout,
    trial_nproc: int = 1,
    gpus: list[str] | None = None,
) -> list[subprocess.Popen]:
    """Start ``n`` ``visiontune tune worker`` processes against the same storage (each runs
    trials of ``trial_nproc`` processes).

    ``gpus``: the GPUs (``CUDA_VISIBLE_DEVICES`` names) trials of one process train on; each
    worker gets one of its own (round-robin when there are fewer GPUs than workers). Without
    it every worker trained on the first GPU, whatever the machine had.
    """
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
    if trial_nproc != 1:
        cmd += ["--trial-nproc", str(trial_nproc)]
    envs = worker_envs(n, trial_nproc, gpus)
    return [
        subprocess.Popen(
            [*cmd, "--worker-index", str(i)], env=envs[i], preexec_fn=_set_parent_death_signal
        )
        for i in range(n)
    ]


def worker_envs(n: int, trial_nproc: int = 1, gpus: list[str] | None = None) -> list[dict]:
    """The environment of each of ``n`` local workers: its share of the cores and, for trials
    of one process on CUDA, a GPU of its own (see :func:`spawn_workers`)."""
    env = dict(os.environ)
    # Share the cores instead of each process claiming all of them.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    envs = [dict(env) for _ in range(n)]
    if gpus and trial_nproc == 1:  # a trial of N > 1 processes takes its GPUs by worker index
        for i, worker_env in enumerate(envs):
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    return envs


def wait_workers(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for local worker processes; on Ctrl-C stop them all before re-raising.

    Returns:
        Their exit codes, in order.

    Raises:
        UserError: every worker failed (their own output said why).
        KeyboardInterrupt: Ctrl-C here, or every worker was stopped by a signal.
    """
    from visiontune.errors import UserError

    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    stopped = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
    if procs and all(c in stopped for c in codes):
        # The workers were stopped (Ctrl-C reached them, or a SIGTERM), not broken: their
        # trials are queued again, and the study stops the way Ctrl-C stops it.
        raise KeyboardInterrupt
    if procs and all(c != 0 for c in codes):
        raise UserError(f"all {len(procs)} workers failed (exit codes {codes}); see above")
    return codes
