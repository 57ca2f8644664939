"""Drive a small real model through the callback API exactly as the training loop does.

Used where a fault is easier to build as a module than as a training config (a dead-ReLU net,
raw-pixel inputs, a stall); end-to-end tests go through ``visiontune.train.train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from helpers import TINY_TRAIN as FAST
from torch import nn

from visiontune.callbacks import Callback, TrainState
from visiontune.config import TrainConfig, build_config
from visiontune.evaluate import classification_metrics


def cfg_for(data: Path, out: Path, **kw: Any) -> TrainConfig:
    return build_config(TrainConfig, None, {**FAST, "data": str(data), "output": str(out), **kw})


def run_train(cfg: TrainConfig, callbacks: list[Callback] | None = None, **kw: Any):
    """``train(cfg)``: the loop attaches the debugger from ``cfg.debugger`` itself."""
    from visiontune.train import train

    return train(cfg, list(callbacks or []), **kw)


def make_state(tmp_path: Path, model: nn.Module, num_classes: int = 2) -> TrainState:
    cfg = build_config(TrainConfig, None, {**FAST, "data": str(tmp_path), "output": str(tmp_path)})
    return TrainState(
        config=cfg,
        run_dir=tmp_path / "run",
        model=model,
        step_model=model,
        num_classes=num_classes,
    )


def drive(
    cb: Callback,
    state: TrainState,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 1,
    lr: float = 0.05,
    valid: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Run ``epochs`` over ``batches`` firing every loop event in order."""
    model = state.model
    assert model is not None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    state.optimizer = opt
    names = class_names or [str(i) for i in range(state.num_classes)]
    loss_fn = nn.CrossEntropyLoss()
    cb.on_train_start(state)
    for _ in range(epochs):
        state.phase = "train"
        cb.on_epoch_start(state)
        total, n = 0.0, 0
        for x, y in batches:
            cb.on_batch_start(state)
            cb.on_step_start(state, (x, y))
            out = model(x)
            loss = loss_fn(out, y)
            cb.on_before_backward(state, out, loss)
            opt.zero_grad()
            loss.backward()
            cb.on_after_backward(state, model)
            opt.step()
            state.step += 1
            cb.on_step_end(state, (x, y), out, loss)
            total += float(loss.detach()) * len(y)
            n += len(y)
        metrics = {"train_loss": total / n, "lr": lr}
        if valid is not None:
            state.phase = "eval"
            cb.on_evaluation_start(state, "valid")
            with torch.no_grad():
                logits = torch.cat([model(x) for x, _ in valid])
            labels = torch.cat([y for _, y in valid])
            m = classification_metrics(logits, labels, names)
            cb.on_evaluation_end(state, "valid", m)
            metrics["valid_loss"] = m["loss"]
        cb.on_epoch_end(state, metrics)
        state.epoch += 1
        cb.on_checkpoint_start(state)
        cb.on_checkpoint(state, str(state.run_dir / "checkpoints" / "last.pt"))
    state.phase = "done"
    cb.on_train_end(state, object())


def results(run_dir: Path) -> dict[str, Any]:
    """Rule name -> RuleResult written under ``run_dir/debug``."""
    from visiontune.rules import read_results

    return {r.rule: r for r in read_results(run_dir / "debug" / "rule_results.json")}
