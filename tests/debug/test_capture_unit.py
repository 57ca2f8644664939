"""Reductions, the save config and the store, without training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visiontune.config import TrainConfig, build_config
from visiontune.debug.capture import REDUCTIONS, reduce_tensor
from visiontune.debug.config import DebuggerConfig, SaveConfigMode, should_save
from visiontune.errors import UserError


def test_reductions_match_numpy_and_count_nan_and_inf():
    x = torch.tensor([[0.0, -2.0, 3.0], [0.0, 5.0, -1.0]])
    v = reduce_tensor(x, bins=4).tolist()
    r = dict(zip(REDUCTIONS, v[: len(REDUCTIONS)], strict=True))
    a = x.numpy()
    assert r["min"] == -2 and r["max"] == 5
    assert r["mean"] == pytest.approx(a.mean())
    assert r["std"] == pytest.approx(a.std())
    assert r["l1"] == pytest.approx(np.abs(a).sum())
    assert r["l2"] == pytest.approx(np.linalg.norm(a))
    assert r["zero_frac"] == pytest.approx(2 / 6)
    assert v[len(REDUCTIONS) :] == list(np.histogram(a, bins=4, range=(-2, 5))[0])

    bad = reduce_tensor(torch.tensor([1.0, float("nan"), float("inf"), 2.0]), bins=2).tolist()
    r = dict(zip(REDUCTIONS, bad[: len(REDUCTIONS)], strict=True))
    assert (r["nan"], r["inf"]) == (1, 1) and math.isnan(r["mean"])
    assert (r["hist_min"], r["hist_max"]) == (1, 2) and sum(bad[len(REDUCTIONS) :]) == 2


def test_save_config_follows_smdebug():
    every = SaveConfigMode(save_interval=100, start_step=0)
    assert [s for s in range(301) if should_save(every, s)] == [0, 100, 200, 300]
    window = SaveConfigMode(save_interval=10, start_step=20, end_step=50)
    assert [s for s in range(100) if should_save(window, s)] == [20, 30, 40]
    listed = SaveConfigMode(save_interval=1, save_steps=[3, 7])
    assert [s for s in range(10) if should_save(listed, s)] == [3, 7]
    cfg = DebuggerConfig(save_interval=5, train={"save_interval": 2})
    assert cfg.mode_config("TRAIN").save_interval == 2
    assert cfg.mode_config("EVAL").save_interval == 1  # every evaluation by default


def test_debugger_section_in_the_training_config():
    cfg = build_config(
        TrainConfig, None,
        {"data": "d", "debugger": {"collections": ["weights"], "rules": "DeadRelu,AllZero"}},
    )  # fmt: skip
    assert cfg.debugger.enabled and cfg.debugger.collections == ["losses", "weights"]
    assert [r.name for r in cfg.debugger.rules] == ["DeadRelu", "AllZero"]
    with pytest.raises(UserError, match="debugger"):
        build_config(TrainConfig, None, {"data": "d", "debugger": {"collections": ["wieghts"]}})
    assert build_config(TrainConfig, None, {"data": "d"}).debugger is None


def test_registry_builds_the_debugger_only_when_enabled():
    from visiontune.callbacks import resolve_callbacks
    from visiontune.debug.callback import Debugger

    on = build_config(TrainConfig, None, {"data": "d", "debugger": {}})
    off = build_config(TrainConfig, None, {"data": "d", "debugger": {"enabled": False}})
    # Other sections (the profiler) may add their own callbacks; count the debugger's.
    assert [type(c) for c in resolve_callbacks(on) if isinstance(c, Debugger)] == [Debugger]
    assert not [c for c in resolve_callbacks(off) if isinstance(c, Debugger)]
