"""The one extension point of the training loop.

A :class:`Callback` has a no-op method for every event of the loop. The debugger, the profiler,
the tuner and the trackers subscribe by overriding the events they need. The loop calls them
through a :class:`CallbackList`, which

* skips an event entirely when no callback overrides it (instrumentation costs nothing when
  nobody listens: not even a Python call per step), and
* reports a failing callback once and keeps training (a broken logger must never cost a run).

Events, in the order a run sees them::

    on_train_start
      on_features_start / on_features_end        (once per split, when backbone features are
                                                  computed for the feature cache)
      on_epoch_start
        on_batch_start                            (before waiting for data: data-wait starts)
        on_step_start                             (batch in hand: forward starts)
        on_before_backward                        (forward done: backward starts)
        on_after_backward                         (gradients populated, unscaled under fp16)
        on_step_end                               (after the optimizer step)
      on_evaluation_start / on_evaluation_end     (per split evaluated)
      on_epoch_end
      on_checkpoint_start / on_checkpoint
    on_export_start / on_export_end               (the best epoch evaluated and written out)
    on_train_end                                  (every exit: success, stop, signal, error)

``state.phase`` says what the loop is doing (``init``, ``features``, ``train``, ``eval``,
``checkpoint``, ``export``, ``done``), so a forward hook can tell training steps from
evaluation.

A callback that wants training to stop sets ``state.stop_reason`` (for example the tuner when a
trial is pruned, or a debugger rule whose action is ``stop``); the loop stops cleanly at the end
of the epoch and ``train`` returns with the best epoch's model. Callbacks cannot raise into the
loop.

Callbacks are found by name (:func:`register_callback`, :func:`resolve_callbacks`): the CLI's
``--callback NAME``, the config's ``callbacks: [NAME, ...]`` and ``module:Class`` paths for
users' own callbacks. Tuning trials build theirs from the same config, so they get the same ones.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

    from visiontune.config import TrainConfig

log = logging.getLogger(__name__)

EVENTS = (
    "on_train_start",
    "on_features_start",
    "on_features_end",
    "on_epoch_start",
    "on_batch_start",
    "on_step_start",
    "on_before_backward",
    "on_after_backward",
    "on_step_end",
    "on_evaluation_start",
    "on_evaluation_end",
    "on_epoch_end",
    "on_checkpoint_start",
    "on_checkpoint",
    "on_export_start",
    "on_export_end",
    "on_train_end",
)

Phase = Literal["init", "features", "train", "eval", "checkpoint", "export", "done"]


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0}


@dataclass(kw_only=True)
class LoopState:
    """The loop's position and running totals: exactly what a checkpoint holds to resume.

    Its fields are listed once, here; :meth:`state_dict` and :meth:`load_state_dict` carry
    them into and out of ``checkpoints/last.pt``.
    """

    epoch: int = 0  # epochs completed (0-based index of the current epoch while it runs)
    step: int = 0  # global optimizer steps so far
    batch_in_epoch: int = 0
    sums: dict[str, float] = field(default_factory=_zero_sums)  # this epoch's train totals
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    best_value: float | None = None
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs since the monitored metric last improved
    bad_images: int = 0  # training images that could not be decoded

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(LoopState))

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for name in self.field_names():
            setattr(self, name, d[name])
        self.sums = {k: float(v) for k, v in self.sums.items()}
        self.history = list(self.history)


@dataclass(kw_only=True)
class TrainState(LoopState):
    """What callbacks can read (and, for ``stop_reason``, write) while training runs."""

    config: TrainConfig
    run_dir: Path
    model: nn.Module | None = None
    # The module run every step: ``model.head`` when cached features stand in for the backbone.
    step_model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    device: torch.device | None = None
    precision: str = "fp32"  # what autocast runs in: fp32 | bf16 | fp16
    workers: int = 0  # DataLoader worker processes
    phase: Phase = "init"
    uses_feature_cache: bool = False  # the backbone does not run per step
    resumed: bool = False
    rank: int = 0
    world_size: int = 1
    eval_split: str | None = None  # the split being evaluated while phase == "eval"
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    steps_per_epoch: int = 0
    stop_reason: str | None = None
    error: str | None = None  # set when the run ends with an exception (one line)
    last_metrics: dict[str, float] = field(default_factory=dict)


class Callback:
    """Base class: every hook is a no-op. Override the ones you need."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_features_start(self, state: TrainState, split: str, backbone: Any) -> None:
        """Backbone features of ``split`` are about to be computed (not when read from cache)."""

    def on_features_end(self, state: TrainState, split: str) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_batch_start(self, state: TrainState) -> None:
        """Before the loop waits for the next batch (data-wait time starts)."""

    def on_step_start(self, state: TrainState, batch: Any) -> None:
        """The batch ``(inputs, targets)`` is on the device (data-wait ends, forward starts)."""

    def on_before_backward(self, state: TrainState, outputs: Any, loss: Any) -> None:
        """Forward is done (backward starts)."""

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        """Gradients are populated and unscaled on ``model``'s parameters, before the step."""

    def on_step_end(self, state: TrainState, batch: Any, outputs: Any, loss: Any) -> None:
        """After the optimizer step. ``loss`` is a tensor: call ``.item()`` only when you log."""

    def on_evaluation_start(self, state: TrainState, split: str) -> None: ...

    def on_evaluation_end(self, state: TrainState, split: str, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_checkpoint_start(self, state: TrainState) -> None: ...

    def on_checkpoint(self, state: TrainState, path: str) -> None:
        """A checkpoint was written to ``path``."""

    def on_export_start(self, state: TrainState) -> None: ...

    def on_export_end(self, state: TrainState, model_dir: Path) -> None: ...

    def on_train_end(self, state: TrainState, result: Any) -> None:
        """Fires on every exit. ``result`` is the ``TrainResult``, or ``None`` when the run
        stopped on a signal or an error (``state.stop_reason`` / ``state.error`` say which).
        Release threads and files here."""


class CallbackList:
    """Dispatches events to the callbacks that override them; isolates their failures."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
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


# --------------------------------------------------------------------------------------------
# Callbacks by name

CallbackFactory = Callable[["TrainConfig"], Callback | None]

# Built-ins are imported only when asked for, so `visiontune --help` stays fast.
_BUILTIN: dict[str, str] = {
    "debugger": "visiontune.debug.callback:from_config",
    "profiler": "visiontune.profile.callback:from_config",
    "report": "visiontune.report.callback:from_config",
    "tracking": "visiontune.tracking.mlflow_callback:from_config",
}
_REGISTRY: dict[str, CallbackFactory] = {}


def register_callback(name: str) -> Callable[[CallbackFactory], CallbackFactory]:
    """Register ``factory(cfg) -> Callback | None`` under ``name`` (a decorator)."""

    def deco(factory: CallbackFactory) -> CallbackFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def callback_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTRY})


def _factory(name: str) -> CallbackFactory:
    from visiontune.errors import UserError

    if name in _REGISTRY:
        return _REGISTRY[name]
    target = _BUILTIN.get(name, name)
    if ":" not in target:
        raise UserError(
            f"unknown callback {name!r} (one of: {', '.join(callback_names())}, "
            "or module:Class for your own)"
        )
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load callback {name!r}: {e}") from e
    return obj


def resolve_callbacks(cfg: TrainConfig, extra: Iterable[Callback] = ()) -> list[Callback]:
    """The callbacks a run gets: those its config turns on (debugger, profiler, named ones),
    then ``extra`` (the tuner's reporter, a notebook's own)."""
    names = list(dict.fromkeys([*default_callback_names(cfg), *cfg.callbacks]))
    out: list[Callback] = []
    for name in names:
        cb = _factory(name)(cfg)
        if cb is not None:
            out.append(cb)
    return [*out, *extra]


def default_callback_names(cfg: TrainConfig) -> list[str]:
    """Callbacks the config turns on, in the order their ``on_train_end`` must run: the
    debugger and profiler flush what they captured, the report reads it, trackers upload
    all of it."""

    def on(name: str) -> bool:
        section = getattr(cfg, name, None)
        return section is not None and bool(getattr(section, "enabled", False))

    names = [n for n in ("debugger", "profiler") if on(n)]
    if getattr(cfg, "report", False):
        names.append("report")
    if on("tracking"):
        names.append("tracking")
    return names
