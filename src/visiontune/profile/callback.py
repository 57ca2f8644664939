"""The profiler as a training callback: ``callbacks: [profiler]`` or the config's ``profiler:``.

It writes, under ``RUN/profile/``:

* ``system/``  system usage every ``sample_interval_ms`` (see :mod:`visiontune.profile.sampler`)
* ``steps/``   one row per optimizer step: data_wait, forward, backward, optimizer, step_time
  (seconds), loss, lr
* ``phases.jsonl``  one line per evaluation, checkpoint, export and feature pass
* ``meta.json``  device, precision, workers, batch size, cores, start / first step / end times
* ``trace.json`` and ``top_ops.json`` when ``profile_steps`` asks for a ``torch.profiler`` window
* ``rule_results.json``  the profiler rules, at the end of the run
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontune.callbacks import Callback, TrainState
from visiontune.io import append_jsonl, atomic_write_json

if TYPE_CHECKING:
    from visiontune.config import TrainConfig
    from visiontune.profile.config import ProfilerConfig

META_FORMAT = 1


def from_config(cfg: TrainConfig) -> Callback | None:
    """The profiler for this config, or ``None`` when ``profiler.enabled`` is false."""
    pc = getattr(cfg, "profiler", None)
    if pc is None:
        from visiontune.profile.config import ProfilerConfig

        pc = ProfilerConfig()
    return ProfilerCallback(pc) if pc.enabled else None


class ProfilerCallback(Callback):
    """Samples the system in a thread and times every step phase; see the module docstring."""

    def __init__(self, config: ProfilerConfig):
        self.config = config
        self.created = time.time()  # the job's start as far as the profiler can see
        self.dir: Path | None = None
        self.sampler: Any = None
        self.timer: Any = None
        self.phases: Any = None
        self.steps_writer: Any = None
        self.meta: dict[str, Any] = {}
        self._last_flush = 0.0
        self._torch_prof: Any = None
        self._window = config.step_window
        self._window_checked = False
        self._step = 0
        self._epoch = 0  # 0: before the first epoch (the feature cache)

    # ------------------------------------------------------------------ run bounds

    def on_train_start(self, state: TrainState) -> None:
        from visiontune.device import available_cores
        from visiontune.profile.sampler import SystemSampler
        from visiontune.profile.store import SeriesWriter
        from visiontune.profile.timers import PhaseTimer, StepTimer

        cuda = state.device is not None and state.device.type == "cuda"
        self.timer = StepTimer(cuda=cuda)
        self.phases = PhaseTimer()
        if state.rank != 0:
            # One profile per run: rank 0 samples the machine (every GPU on it) and times its
            # steps; other ranks keep their hooks cheap and write nothing.
            return
        self.dir = Path(state.run_dir) / "profile"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.steps_writer = SeriesWriter(self.dir / "steps", key="step")
        self.sampler = SystemSampler(
            self.dir / "system",
            interval=self.config.sample_interval_ms / 1000,
            flush_seconds=self.config.flush_seconds,
            gpus=cuda,
        )
        self.sampler.start()
        cfg = state.config
        self.meta = {
            "format": META_FORMAT,
            "status": "running",
            "pid": os.getpid(),
            "start": self.created,
            "train_start": time.time(),
            "first_step": None,
            "end": None,
            "device": str(state.device) if state.device is not None else "cpu",
            "precision": state.precision,
            "workers": state.workers,
            "batch_size": getattr(cfg, "batch_size", None),
            "cores": available_cores(),
            "logical_cpus": os.cpu_count(),
            "gpu_count": self.sampler.gpu_count,
            "uses_feature_cache": state.uses_feature_cache,
            "resumed": state.resumed,
            "sample_interval_ms": self.config.sample_interval_ms,
            "steps_per_epoch": state.steps_per_epoch,
            "steps": state.step,
        }
        self._write_meta()
        self._last_flush = time.perf_counter()

    def on_train_end(self, state: TrainState, result: Any) -> None:
        if self.dir is None:
            return
        try:
            self._stop_torch_profiler()
        finally:
            # The sampler thread stops on every exit, whatever fails after this.
            if self.sampler is not None:
                self.sampler.stop()
                self.meta["max_child_processes"] = self.sampler.max_workers
                self.sampler = None
        self._flush_steps()
        self.steps_writer.close()
        if result is not None:
            status = "finished"
        elif state.error:
            status = "error"
        else:
            status = "stopped"
        self.meta.update(
            status=status,
            end=time.time(),
            steps=state.step,
            stop_reason=state.stop_reason,
            error=state.error,
        )
        self._write_meta()
        from visiontune.profile.rules import evaluate_rules
        from visiontune.rules import write_results

        write_results(self.dir / "rule_results.json", evaluate_rules(Path(state.run_dir)))

    # ------------------------------------------------------------------ steps

    def on_batch_start(self, state: TrainState) -> None:
        if self._window and state.step + 1 == self._window[0] and self._torch_prof is None:
            self._start_torch_profiler(state)
        self.timer.batch_start()

    def on_step_start(self, state: TrainState, batch: Any) -> None:
        self.timer.step_start()
        if self.meta.get("first_step") is None:
            self.meta["first_step"] = self.timer.first_step_time
            self._write_meta()

    def on_before_backward(self, state: TrainState, outputs: Any, loss: Any) -> None:
        self.timer.before_backward()

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        self.timer.after_backward()

    def on_step_end(self, state: TrainState, batch: Any, outputs: Any, loss: Any) -> None:
        opt = state.optimizer
        lr = opt.param_groups[-1]["lr"] if opt is not None and opt.param_groups else None
        self.timer.step_end(state.step, state.epoch + 1, loss, lr)
        self._step = state.step
        if self._torch_prof is not None and self._window and state.step >= self._window[1]:
            self._stop_torch_profiler()
        if time.perf_counter() - self._last_flush >= self.config.flush_seconds:
            self._flush_steps()

    def on_epoch_start(self, state: TrainState) -> None:
        # Phases belong to the epoch that ran last: the loop advances state.epoch before its
        # checkpoint, and the final evaluation and export come after the last epoch.
        self._epoch = state.epoch + 1
        # The loop fires on_train_start before it builds its loaders: what they chose is
        # known from the first epoch on.
        self.meta.update(
            workers=state.workers,
            precision=state.precision,
            uses_feature_cache=state.uses_feature_cache,
            steps_per_epoch=state.steps_per_epoch,
            device=str(state.device) if state.device is not None else self.meta.get("device"),
        )
        self._check_window(state)

    def _check_window(self, state: TrainState) -> None:
        """Say once, when the run's length is first known, that ``profile_steps`` lies where
        no step will run (past the last step, or before where a resumed run starts): the
        window was otherwise skipped without a word, and the run ended without its trace."""
        if self._window is None or self._window_checked or self.dir is None:
            return
        self._window_checked = True
        first, last = self._window
        window = f"profile_steps {first}-{last}"
        end = state.steps_per_epoch * int(getattr(state.config, "epochs", 0) or 0)
        if end and first > end:
            said = f"{window} starts after the run's last step ({end}): nothing is traced"
        elif state.step >= first:
            said = f"{window}: the run resumed after step {state.step}, so nothing is traced"
        else:
            return
        print(f"warning: {said}", file=sys.stderr, flush=True)
        self.meta["profile_steps_note"] = said
        self._write_meta()

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._flush_steps()
        self.meta["steps"] = state.step
        self._write_meta()

    # ------------------------------------------------------------------ phases

    def on_features_start(self, state: TrainState, split: str, backbone: Any) -> None:
        self.phases.start(f"features:{split}")

    def on_features_end(self, state: TrainState, split: str) -> None:
        self._phase_done(state, f"features:{split}", "features", split)

    def on_evaluation_start(self, state: TrainState, split: str) -> None:
        self.phases.start(f"eval:{split}")

    def on_evaluation_end(self, state: TrainState, split: str, metrics: dict[str, Any]) -> None:
        self._phase_done(state, f"eval:{split}", "eval", split)

    def on_checkpoint_start(self, state: TrainState) -> None:
        self.phases.start("checkpoint")

    def on_checkpoint(self, state: TrainState, path: str) -> None:
        self._phase_done(state, "checkpoint", "checkpoint")

    def on_export_start(self, state: TrainState) -> None:
        self.phases.start("export")

    def on_export_end(self, state: TrainState, model_dir: Path) -> None:
        self._phase_done(state, "export", "export")

    def _phase_done(self, state: TrainState, key: str, phase: str, split: str | None = None):
        span = self.phases.stop(key)
        if span is None or self.dir is None:
            return  # an older loop fires only the end event: nothing to time
        start, seconds = span
        append_jsonl(
            self.dir / "phases.jsonl",
            {
                "phase": phase,
                "split": split,
                "epoch": self._epoch,
                "step": state.step,
                "start": start,
                "seconds": seconds,
            },
        )

    # ------------------------------------------------------------------ output

    def _flush_steps(self) -> None:
        self._last_flush = time.perf_counter()
        if self.timer is None:
            return
        rows = self.timer.drain()
        if rows and self.steps_writer is not None:
            self.steps_writer.extend(rows)
            self.steps_writer.flush()

    def _write_meta(self) -> None:
        if self.dir is not None:
            atomic_write_json(self.dir / "meta.json", self.meta)

    # ------------------------------------------------------------------ torch.profiler window

    def _start_torch_profiler(self, state: TrainState) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if state.device is not None and state.device.type == "cuda" and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._torch_prof = profile(activities=activities, record_shapes=False)
        self._torch_prof.start()
        self.meta["torch_profiler"] = {"first_step": state.step + 1, "last_step": None}

    def _stop_torch_profiler(self) -> None:
        prof, self._torch_prof = self._torch_prof, None
        if prof is None or self.dir is None:
            return
        prof.stop()
        self.meta["torch_profiler"]["last_step"] = self._step
        trace = self.dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        atomic_write_json(self.dir / "top_ops.json", top_operators(prof))
        self.meta["torch_profiler"].update(trace=trace.name, top_ops="top_ops.json")
        print(
            f"torch.profiler trace written to {trace} (open it in https://ui.perfetto.dev "
            "or chrome://tracing)",
            file=sys.stderr,
        )


def top_operators(prof: Any, n: int = 25) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self time (CPU plus device), as plain rows."""
    rows = []
    for e in prof.key_averages():
        device_self = getattr(e, "self_device_time_total", 0) or 0
        rows.append(
            {
                "name": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1000,
                "cpu_total_ms": e.cpu_time_total / 1000,
                "self_device_ms": device_self / 1000,
            }
        )
    rows.sort(key=lambda r: r["self_cpu_ms"] + r["self_device_ms"], reverse=True)
    return [r for r in rows[:n] if not math.isnan(r["self_cpu_ms"])]
