"""Per-step phase times from the loop's events, at the cost of a clock read per event.

On the CPU the phases are host times (``time.perf_counter``). On a GPU the host only queues
kernels, so forward, backward and the optimizer step are timed with CUDA events recorded in the
stream (no synchronisation); they are read back only when rows are flushed, once per flush
interval. Data wait is always a host time: it is the time the loop sat waiting for a batch.
The loss is kept as a detached tensor and copied to the host at the same flush.
"""

from __future__ import annotations

import math
import time
from typing import Any

NAN = math.nan


class StepTimer:
    """Collects one row per optimizer step; :meth:`drain` turns pending rows into dicts."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self._pending: list[dict[str, Any]] = []
        self._row: dict[str, Any] | None = None
        self._t_batch = 0.0
        self._t_step = 0.0
        self._t_fwd_end: float | None = None
        self._t_bwd_end: float | None = None
        self._events: list[Any] | None = None
        self.first_step_time: float | None = None  # wall clock of the first step's start
        self.steps = 0

    # ------------------------------------------------------------------ events

    def batch_start(self) -> None:
        self._t_batch = time.perf_counter()

    def step_start(self) -> None:
        now = time.perf_counter()
        if self.first_step_time is None:
            self.first_step_time = time.time()
        self._data_wait = now - self._t_batch if self._t_batch else NAN
        self._t_step = now
        self._t_fwd_end = self._t_bwd_end = None
        if self.cuda:
            import torch

            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            self._events[0].record()

    def before_backward(self) -> None:
        self._t_fwd_end = time.perf_counter()
        if self._events is not None:
            self._events[1].record()

    def after_backward(self) -> None:
        self._t_bwd_end = time.perf_counter()
        if self._events is not None:
            self._events[2].record()

    def step_end(self, step: int, epoch: int, loss: Any = None, lr: float | None = None) -> None:
        now = time.perf_counter()
        if not self._t_step:
            return  # a step whose start we did not see (the profiler attached mid-step)
        fwd, bwd = self._t_fwd_end, self._t_bwd_end
        row: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "time": time.time(),
            "data_wait": self._data_wait,
            "step_time": now - self._t_batch if self._t_batch else now - self._t_step,
            "forward": (fwd - self._t_step) if fwd is not None else NAN,
            "backward": (bwd - (fwd if fwd is not None else self._t_step))
            if bwd is not None
            else NAN,
            "optimizer": (now - bwd) if bwd is not None else NAN,
            "forward_backward": NAN,
            "loss": NAN,
            "lr": NAN if lr is None else float(lr),
        }
        if fwd is None and bwd is not None:
            # A loop without on_before_backward: forward and backward are one span.
            row["backward"] = NAN
            row["forward_backward"] = bwd - self._t_step
        if self._events is not None:
            self._events[3].record()
            row["_events"] = self._events
            self._events = None
        if hasattr(loss, "detach"):
            if loss.numel() == 1:  # a custom loop's per-sample losses are not one number
                row["_loss"] = loss.detach()
        elif isinstance(loss, (int, float)):
            row["loss"] = float(loss)
        self._pending.append(row)
        self._t_batch = 0.0
        self._t_step = 0.0
        self.steps += 1

    # ------------------------------------------------------------------ output

    def drain(self) -> list[dict[str, Any]]:
        """The rows since the last drain, with device times and losses resolved (one sync)."""
        rows, self._pending = self._pending, []
        if not rows:
            return rows
        with_loss = [r for r in rows if "_loss" in r]
        if with_loss:
            import torch

            values = torch.stack([r.pop("_loss").float().reshape(()) for r in with_loss])
            for r, v in zip(with_loss, values.cpu().tolist(), strict=True):
                r["loss"] = v
        for r in rows:
            events = r.pop("_events", None)
            if events is None:
                continue
            try:
                events[3].synchronize()
                # Device times replace host times for the GPU's part of the step.
                if r["forward"] == r["forward"]:  # not NaN: the loop fired before_backward
                    r["forward"] = events[0].elapsed_time(events[1]) / 1000
                    r["backward"] = events[1].elapsed_time(events[2]) / 1000
                else:
                    r["forward_backward"] = events[0].elapsed_time(events[2]) / 1000
                r["optimizer"] = events[2].elapsed_time(events[3]) / 1000
            except RuntimeError:
                pass  # an event a custom loop never recorded: the host times stay
        return rows


class PhaseTimer:
    """Spans of the per-epoch phases: evaluation, checkpoint, export, feature computation."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[float, float]] = {}

    def start(self, name: str) -> None:
        self._open[name] = (time.perf_counter(), time.time())

    def stop(self, name: str) -> tuple[float, float] | None:
        """``(wall-clock start, seconds)`` of the span ``name``, or ``None`` if never started."""
        began = self._open.pop(name, None)
        if began is None:
            return None
        return began[1], time.perf_counter() - began[0]
