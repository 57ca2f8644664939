"""The one extension point of the training loop.

A :class:`Callback` has a no-op method for every event of the loop. The debugger, the profiler,
the tuner and the metric loggers subscribe by overriding the events they need. The loop calls
them through a :class:`CallbackList`, which

* skips an event entirely when no callback overrides it (instrumentation costs nothing when
  nobody listens: not even a Python call per step), and
* reports a failing callback once and keeps training (a broken logger must never cost a run).

Step events let a profiler separate data-wait time from compute time: ``on_batch_start`` fires
before the loop waits for the next batch, ``on_step_start`` once the batch is in hand, and
``on_step_end`` after the optimizer step.

A callback that wants training to stop sets ``state.stop_reason`` (for example the tuner when a
trial is pruned); the loop stops cleanly at the end of the epoch and ``train`` returns.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

EVENTS = (
    "on_train_start",
    "on_epoch_start",
    "on_batch_start",
    "on_step_start",
    "on_after_backward",
    "on_step_end",
    "on_evaluation_end",
    "on_epoch_end",
    "on_checkpoint",
    "on_train_end",
)


@dataclass
class TrainState:
    """What callbacks can read (and, for ``stop_reason``, write) while training runs."""

    config: Any
    run_dir: Any
    model: Any = None
    optimizer: Any = None
    device: Any = None
    epoch: int = 0
    step: int = 0  # global optimizer steps so far
    batch_in_epoch: int = 0
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    steps_per_epoch: int = 0
    stop_reason: str | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Callback:
    """Base class: every hook is a no-op. Override the ones you need."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_batch_start(self, state: TrainState) -> None:
        """Before the loop waits for the next batch (data-wait time starts)."""

    def on_step_start(self, state: TrainState, batch: Any) -> None:
        """The batch is in hand (data-wait ends, compute starts)."""

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        """Gradients are populated on ``model``'s parameters, before the optimizer step."""

    def on_step_end(self, state: TrainState, batch: Any, outputs: Any, loss: Any) -> None:
        """After the optimizer step. ``loss`` is a tensor: call ``.item()`` only when you log."""

    def on_evaluation_end(
        self, state: TrainState, split: str, metrics: dict[str, float]
    ) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, state: TrainState, path: str) -> None: ...

    def on_train_end(self, state: TrainState, result: Any) -> None: ...


class CallbackList:
    """Dispatches events to the callbacks that override them; isolates their failures."""

    def __init__(self, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> None:
        self.callbacks = list(callbacks)
        self._failed: set[tuple[int, str]] = set()
        self._listeners = {ev: [cb for cb in self.callbacks if _overrides(cb, ev)] for ev in EVENTS}

    def listens(self, event: str) -> bool:
        """True when some callback overrides ``event``; the loop skips the call otherwise."""
        return bool(self._listeners[event])

    def fire(self, event: str, *args: Any) -> None:
        for cb in self._listeners[event]:
            try:
                getattr(cb, event)(*args)
            except Exception as e:  # a broken callback must not cost the run
                key = (id(cb), event)
                if key not in self._failed:
                    self._failed.add(key)
                    print(
                        f"warning: callback {type(cb).__name__}.{event} failed and was skipped: "
                        f"{type(e).__name__}: {e}",
                        file=sys.stderr,
                    )
                    log.debug("callback failure", exc_info=True)


def _overrides(cb: Callback, event: str) -> bool:
    impl = getattr(type(cb), event, None)
    base = getattr(Callback, event)
    return impl is not None and impl is not base
