"""Distributed trials: one trial's training as a torchrun job (``visiontune tune --trial-nproc N``).

A trial normally trains in the worker's own process. With ``--trial-nproc N`` (N > 1) the
worker runs the trial as ``visiontune train --config TRIAL.yaml --nproc-per-node N`` in a child
process: the very launch ``visiontune train`` uses (``cli/train.py`` -> :func:`visiontune.dist.
launch`), so a distributed trial is data-parallel exactly as a distributed training run is
(gloo on CPU, NCCL on CUDA, rank 0 the one writer, a failing rank reported in one line).

The worker follows the trial through its run directory, the contract between stages:

* **As it grows**, ``metrics.jsonl`` is read every :data:`POLL_S` seconds and each finished
  epoch is reported to Optuna by the objective's own reporter (the same pruning rule as an
  in-process trial). Reading as it grows, not after the run, is what lets the pruner stop a
  bad trial early: that is the point of reporting per epoch.
* **Pruning is exact**: when the study prunes, rank 0 carries the :func:`TrialControl`
  callback, which waits at each epoch end for the worker's verdict on that epoch (a file in a
  private control folder, outside the run directory). A pruned trial therefore stops after
  the very epoch it was pruned at, and exports that run's best model, as in-process.
* **After the run**, the result (best epoch, its metrics, the model, the test metrics) is read
  from ``model/model.json``, ``metrics.jsonl``, ``evaluation.json`` and ``config.yaml``.
* **Failures**: a rank that fails (bad input, killed, out of memory) ends the job; the launcher
  prints one ``error:`` line, which becomes the trial's :class:`TrialFailed` reason, and the
  study goes on. Nothing waits without a bound: the verdict wait has a deadline and collectives
  have the training job's ``collective_timeout``; a worker that dies takes its trial's job with
  it (parent-death signal).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from visiontune.callbacks import Callback
from visiontune.errors import UserError
from visiontune.tuning._base import FAIL_REASON, TrialFailed

# Where rank 0 of a distributed trial finds the worker's per-epoch verdicts.
CONTROL_ENV = "VISIONTUNE_TRIAL_CONTROL"
# The callback a pruning study adds to a distributed trial's config (rank 0 runs it).
CONTROL_CALLBACK = "visiontune.tuning.distributed:TrialControl"
POLL_S = 0.1  # how often the worker reads metrics.jsonl; small next to any real epoch
# How long rank 0 waits for a verdict before training on unpruned (the worker is gone or
# stuck); generous, as a loaded machine may delay the worker, but never forever.
VERDICT_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------------
# Checks before any trial


def check_trial_processes(
    parallel: int, trial_nproc: int, device: str, batch_sizes: list[int]
) -> None:
    """Refuse a number of processes this machine cannot run, before any trial starts.

    ``parallel`` workers each run trials of ``trial_nproc`` processes: on CUDA each process
    takes a GPU of its own, on a CPU a core of its own at least.

    Args:
        parallel: local worker processes (``--parallel``).
        trial_nproc: processes per trial (``--trial-nproc``).
        device: the fixed training device (``auto``, ``cpu`` or ``cuda``).
        batch_sizes: the global batch sizes trials may use (each must split over the ranks).

    Raises:
        UserError: too many processes for the GPUs or cores, or a batch that does not split.
    """
    if trial_nproc < 1:
        raise UserError(f"--trial-nproc must be 1 or more, got {trial_nproc}")
    if trial_nproc == 1:
        return
    from visiontune import dist

    total = parallel * trial_nproc
    what = f"--parallel {parallel} x --trial-nproc {trial_nproc} = {total} training processes"
    if uses_cuda(device):
        gpus = len(visible_gpus())
        if total > gpus:
            raise UserError(
                f"{what}, one GPU each, but {gpus} GPU(s) are visible; lower --parallel or "
                "--trial-nproc"
            )
    else:
        from visiontune.device import available_cores

        cores = available_cores()
        if total > cores:
            raise UserError(
                f"{what} but this machine has {cores} CPU core(s); lower --parallel or "
                "--trial-nproc"
            )
    for b in batch_sizes:
        dist.per_rank_batch(int(b), trial_nproc)


def uses_cuda(device: str) -> bool:
    """Whether trials with this ``device`` setting train on CUDA."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


# --------------------------------------------------------------------------------------------
# The worker's side


def train_on_torchrun(
    cfg, trial, reporter, nproc: int, *, worker: int | None = None, prune: bool = False
):
    """Run one trial's training as a torchrun job of ``nproc`` processes; follow and report it.

    Args:
        cfg: the trial's validated ``TrainConfig`` (its ``output`` is the trial's run dir).
        trial: the Optuna trial (for the failure reason).
        reporter: the objective's epoch-end reporter; it is fed every epoch read from
            ``metrics.jsonl`` and decides pruning as it does in-process.
        nproc: processes for this trial.
        worker: this worker's index among ``--parallel`` workers: worker ``w`` takes GPUs
            ``w*nproc .. (w+1)*nproc - 1``.
        prune: whether the study prunes (then rank 0 waits for a verdict every epoch).

    Returns:
        A ``TrainResult`` read back from the run directory.

    Raises:
        TrialFailed: the job failed (its one-line reason is recorded on the trial).
    """
    from visiontune.config import save_config

    run_dir = Path(cfg.output)
    with tempfile.TemporaryDirectory(prefix="visiontune-trial-") as tmp:
        control = Path(tmp)
        if prune:
            cfg = cfg.model_copy(update={"callbacks": [*cfg.callbacks, CONTROL_CALLBACK]})
        config_file = control / "trial.yaml"
        save_config(cfg, config_file)
        cmd = [sys.executable, "-m", "visiontune", "train", "--config", str(config_file),
               "--nproc-per-node", str(nproc)]  # fmt: skip
        env = _trial_env(cfg.device, nproc, worker, control)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the summary line; the worker prints its own
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        errors: list[str] = []
        echo = threading.Thread(target=_echo_stderr, args=(proc.stderr, errors), daemon=True)
        echo.start()
        follower = MetricsFollower(run_dir / "metrics.jsonl")
        stopped_by = None
        try:
            with _signals_raise():
                try:
                    while True:
                        finished = proc.poll() is not None  # read after: the last lines are in
                        for metrics in follower.new_epochs():
                            pruned = report_epoch(reporter, cfg, metrics)
                            if prune:
                                _write_verdict(control, int(metrics["epoch"]), pruned)
                        if finished:
                            break
                        time.sleep(POLL_S)
                except _Signalled as e:
                    stopped_by = e.signum
                except KeyboardInterrupt:
                    stopped_by = signal.SIGINT
        except BaseException:  # a bug: the job must not outlive it
            _stop(proc)
            raise
        finally:
            if stopped_by is not None:
                _stop(proc)  # its ranks checkpoint and exit, as an in-process trial does
            echo.join(timeout=30)
    if stopped_by is not None:
        from visiontune.train import TrainingInterrupted

        raise TrainingInterrupted(run_dir, stopped_by)
    if proc.returncode != 0:
        reason = failure_reason(proc.returncode, errors)
        trial.set_user_attr(FAIL_REASON, reason[:500])
        raise TrialFailed(reason)
    stop_reason = "pruned" if reporter.pruned_at is not None else None
    return read_result(run_dir, cfg.monitor, cfg.monitor_mode, stop_reason)


def report_epoch(reporter, cfg, metrics: dict[str, Any]) -> bool:
    """Feed one epoch's metrics to the objective's reporter; True when the trial is pruned.

    The reporter is the in-process trial's own callback, given what it reads from the state
    (the config and the stop reason), so both kinds of trial follow one pruning rule.
    """
    state = SimpleNamespace(config=cfg, stop_reason=None)
    reporter.on_epoch_end(state, metrics)
    return state.stop_reason == "pruned"


class MetricsFollower:
    """Reads a growing ``metrics.jsonl`` and yields each epoch once it is complete.

    An epoch is complete when its ``valid`` line is there (training logs it after the
    ``train`` line). A line still being written (no newline yet) is read on the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[int] = set()

    def new_epochs(self) -> list[dict[str, Any]]:
        """The epochs completed since the last call, in order, as ``train()`` names them."""
        epochs = read_epochs(self.path)
        fresh = [m for e, m in sorted(epochs.items()) if e not in self.done and "valid_loss" in m]
        self.done.update(int(m["epoch"]) for m in fresh)
        return fresh


def read_epochs(path: Path) -> dict[int, dict[str, Any]]:
    """Epoch metrics from a run's ``metrics.jsonl``, keyed as ``train()``'s history is.

    ``loss``, ``accuracy`` and ``top5`` are per split (``valid_loss``); the rest (``lr``,
    ``images_per_sec``, ``epoch_time``) keep their names.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    epochs: dict[int, dict[str, Any]] = {}
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # being written
        row = json.loads(line)
        if "epoch" not in row or "split" not in row:
            continue
        epoch = int(row["epoch"])
        out = epochs.setdefault(epoch, {"epoch": epoch})
        for key, value in row.items():
            if key in ("step", "epoch", "split"):
                continue
            name = f"{row['split']}_{key}" if key in ("loss", "accuracy", "top5") else key
            out[name] = value
    return epochs


def read_result(run_dir: Path, monitor: str, mode: str, stop_reason: str | None):
    """The ``TrainResult`` of a finished run, read from its run directory."""
    import yaml

    from visiontune.train import TrainResult

    history = [m for _, m in sorted(read_epochs(run_dir / "metrics.jsonl").items())]
    model_dir = run_dir / "model"
    summary: dict[str, Any] = {}
    if (model_dir / "model.json").is_file():
        summary = json.loads((model_dir / "model.json").read_text()).get("metrics") or {}
    else:
        model_dir = None
    best_epoch = summary.get("best_epoch")
    if best_epoch is None:  # no model: the best epoch by the monitor, as train() picks it
        scored = [m for m in history if _finite(m.get(monitor))]
        if scored:
            pick = min if mode == "min" else max
            best_epoch = int(pick(scored, key=lambda m: float(m[monitor]))["epoch"])
    best_metrics = next((m for m in history if m["epoch"] == best_epoch), {})
    test_metrics = None
    for name in ("evaluation.json", "evaluation-valid.json"):
        if (run_dir / name).is_file():
            test_metrics = json.loads((run_dir / name).read_text())
            break
    config = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    resolved = config.get("resolved") or {}
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        history=history,
        test_metrics=test_metrics,
        stop_reason=stop_reason,
        bad_images=int(summary.get("bad_images") or 0),
        used_feature_cache=bool(resolved.get("uses_feature_cache")),
    )


def failure_reason(returncode: int, errors: list[str]) -> str:
    """The one line a failed trial job leaves: the launcher's ``error:`` line if it printed
    one (the failing rank's own error), else how the launcher process ended."""
    if errors:
        return errors[-1]
    if returncode < 0:
        return f"the trial's launcher was killed by {signal.Signals(-returncode).name}"
    return f"the trial's training exited with code {returncode} (its output is above)"


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _trial_env(device: str, nproc: int, worker: int | None, control: Path) -> dict[str, str]:
    """The trial job's environment: its control folder, its share of the cores or GPUs."""
    env = dict(os.environ)
    env[CONTROL_ENV] = str(control)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        # The worker's share of the cores (spawn_workers sets it), split over the ranks; unset,
        # the launcher shares out all the cores itself.
        env["OMP_NUM_THREADS"] = str(max(1, int(threads) // nproc))
    if uses_cuda(device):
        gpus = visible_gpus()
        slot = worker or 0
        mine = gpus[slot * nproc : (slot + 1) * nproc]
        if len(mine) < nproc:
            raise UserError(
                f"worker {slot} needs GPUs {slot * nproc}..{(slot + 1) * nproc - 1} for a trial "
                f"of {nproc} processes, but {len(gpus)} GPU(s) are visible"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


def _die_with_parent() -> None:
    """Linux: the trial's launcher gets SIGTERM when its worker dies (even by SIGKILL), and
    stops its ranks, so no orphan job keeps training."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _echo_stderr(stream, errors: list[str]) -> None:
    """Pass the job's output on to the worker's stderr, keeping its ``error:`` lines apart: the
    last one becomes the trial's failure reason (the worker prints it with the trial). Its
    ``stopped:`` line (resume with ``visiontune train --resume``) is not for a study, which
    says itself how to continue."""
    for line in stream:
        if line.startswith("error: "):
            errors.append(line[len("error: ") :].strip())
        elif not line.startswith("stopped: "):
            sys.stderr.write(line)
    stream.close()


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM to the worker raises here, so it can stop the trial's job the way SIGTERM stops
    an in-process trial (checkpoint, trial failed, ``stopped`` line) instead of dying at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Signalled(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_verdict(control: Path, epoch: int, pruned: bool) -> None:
    from visiontune.io import atomic_write_text

    atomic_write_text(control / f"epoch-{epoch}", "prune" if pruned else "go")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the job (its ranks checkpoint and exit), then SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# Rank 0's side


def TrialControl(cfg) -> Callback | None:
    """The callback (named in a distributed trial's config) by which the worker prunes it.

    Attached by rank 0 only (config-named callbacks are); without a worker's control folder
    (the config re-run by hand) it does nothing.
    """
    path = os.environ.get(CONTROL_ENV)
    return _AwaitVerdict(Path(path)) if path else None


class _AwaitVerdict(Callback):
    """At each epoch end, wait for the worker's verdict on that epoch; stop when pruned.

    Rank 0 sets ``state.stop_reason``; training agrees on it over every rank (``dist.first``)
    at the same epoch end, so the whole job stops after the pruned epoch.
    """

    def __init__(self, control: Path) -> None:
        self.control = control

    def on_epoch_end(self, state, metrics) -> None:
        verdict = self.control / f"epoch-{int(metrics['epoch'])}"
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while not verdict.is_file():
            if time.monotonic() > deadline:
                print(
                    f"warning: no pruning verdict for epoch {metrics['epoch']} after "
                    f"{VERDICT_TIMEOUT_S:.0f} s; training on",
                    file=sys.stderr,
                )
                return
            time.sleep(0.02)
        if verdict.read_text().strip() == "prune":
            state.stop_reason = "pruned"
