"""Each rule fires on a model made to have its fault and stays quiet on the same model without
it. The model runs through the callback API as the training loop runs it (loop_harness)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from helpers import write_dataset
from loop_harness import drive, make_state, results
from PIL import Image
from torch import nn

from visiontune.debug.callback import Debugger
from visiontune.debug.config import DebuggerConfig
from visiontune.debug.rules import RULES, make_rule
from visiontune.errors import UserError


def debugger(*rules: str | dict, **kw) -> Debugger:
    return Debugger(DebuggerConfig(save_interval=1, rules=list(rules), **kw))


def blobs(n_batches: int = 4, batch: int = 16, dim: int = 8, seed: int = 0, labels=None):
    """Two separable Gaussian blobs as (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        y = (
            torch.tensor(labels[b * batch : (b + 1) * batch])
            if labels is not None
            else torch.arange(batch) % 2
        )
        x = torch.randn(batch, dim, generator=g) + (y[:, None].float() * 2 - 1)
        out.append((x, y))
    return out


class Net(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear; ``dead`` sets the second layer's bias very negative."""

    def __init__(self, dead: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.relu1 = nn.Linear(8, 32), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(32, 32), nn.ReLU()
        self.out = nn.Linear(32, 2)
        if dead:
            with torch.no_grad():
                self.fc2.bias.fill_(-100.0)

    def forward(self, x):
        return self.out(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


ACTIVATION_RULES = ("DeadRelu", "AllZero", "VanishingGradient", "PoorWeightInitialization")


@pytest.mark.parametrize("dead", [True, False])
def test_negative_bias_relu_net(tmp_path, dead):
    state = make_state(tmp_path, Net(dead=dead))
    cb = debugger(*ACTIVATION_RULES)
    drive(cb, state, blobs())
    res = results(state.run_dir)
    for name in ACTIVATION_RULES:
        assert res[name].triggered is dead, (name, res[name].message)
        assert res[name].datapoints > 0
    if dead:
        assert "relu2_output_0" in res["DeadRelu"].message
        assert res["DeadRelu"].steps == [0, 1, 2, 3]
        assert "gradient/fc1.weight" in res["VanishingGradient"].message
        assert res["DeadRelu"].recommendation


class TanhNet(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.act, self.out = nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)
        with torch.no_grad():
            self.fc.weight.mul_(scale)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


@pytest.mark.parametrize("scale", [100.0, 0.1])
def test_saturated_tanh(tmp_path, scale):
    state = make_state(tmp_path, TanhNet(scale))
    drive(debugger("SaturatedActivation"), state, blobs(), lr=0.0)
    res = results(state.run_dir)["SaturatedActivation"]
    assert res.triggered is (scale > 1), res.message
    assert res.datapoints == 4


def _image_batches(tmp_path, normalise: bool):
    root = write_dataset(tmp_path / "data", per_class=8, splits=None, size=32)
    xs, ys = [], []
    for label, cls in enumerate(("cat", "dog")):
        for p in sorted((root / cls).iterdir()):
            arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
            xs.append(torch.from_numpy(arr).permute(2, 0, 1))
            ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys)
    if normalise:  # what a correct pipeline does: per-channel mean 0, std 1
        mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / std
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(y), 8)]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@pytest.mark.parametrize("normalise", [False, True])
def test_check_input_images_catches_raw_pixels(tmp_path, normalise):
    state = make_state(tmp_path, SmallCNN())
    drive(debugger("CheckInputImages"), state, _image_batches(tmp_path, normalise))
    res = results(state.run_dir)["CheckInputImages"]
    assert res.triggered is (not normalise), res.message
    if not normalise:
        assert "input images have mean" in res.message and "16 images" in res.message


@pytest.mark.parametrize("imbalanced", [True, False])
def test_class_imbalance(tmp_path, imbalanced):
    labels = [0] * 60 + [1] * 4 if imbalanced else [0, 1] * 32
    rng = np.random.default_rng(0)
    labels = list(rng.permutation(labels))
    state = make_state(tmp_path, Net())
    rule = {"name": "ClassImbalance", "parameters": {"samples": 64}}
    drive(debugger(rule), state, blobs(labels=labels), epochs=2)
    res = results(state.run_dir)["ClassImbalance"]
    assert res.triggered is imbalanced, res.message
    if imbalanced:
        assert "15x" in res.message  # 60 vs 4


class Constant(nn.Module):
    """Predicts class 0 for everything (a confused classifier), or the true blob side."""

    def __init__(self, confused: bool):
        super().__init__()
        self.confused = confused
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        side = x.mean(1, keepdim=True)
        logits = torch.cat([-side, side], 1) * 10 + self.w
        if self.confused:
            logits = torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1) + self.w
        return logits


@pytest.mark.parametrize("confused", [True, False])
def test_confusion(tmp_path, confused):
    state = make_state(tmp_path, Constant(confused))
    drive(debugger("Confusion"), state, blobs(), valid=blobs(seed=1), lr=0.0)
    res = results(state.run_dir)["Confusion"]
    assert res.triggered is confused, res.message
    if confused:
        assert "class 1" in res.message


def test_stalled_training_fires_while_a_step_hangs_and_stops_the_run(tmp_path):
    state = make_state(tmp_path, Net())
    cb = debugger({"name": "StalledTraining", "parameters": {"threshold": 0.2}, "action": "stop"})
    stall = cb.rules.get("StalledTraining")
    batches = blobs(n_batches=2)

    class Hang(nn.Module):  # the second step's forward waits until the rule has fired
        def __init__(self):
            super().__init__()
            self.net, self.calls = Net(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                deadline = time.monotonic() + 60
                while not stall.triggered and time.monotonic() < deadline:
                    threading.Event().wait(0.01)
            return self.net(x)

    state.model = Hang()
    drive(cb, state, batches)
    assert stall.triggered
    assert "StalledTraining" in (state.stop_reason or "")
    assert results(state.run_dir)["StalledTraining"].triggered


def test_stalled_training_quiet_on_a_brisk_run(tmp_path):
    state = make_state(tmp_path, Net())
    drive(debugger("StalledTraining"), state, blobs())
    res = results(state.run_dir)["StalledTraining"]
    assert not res.triggered and res.datapoints > 0


def test_rules_have_sagemakers_names_and_defaults():
    assert len(RULES) == 16
    assert make_rule("VanishingGradient").p == {"threshold": 1e-7}
    assert make_rule("WeightUpdateRatio").p["large_threshold"] == 10.0
    assert make_rule("WeightUpdateRatio").p["small_threshold"] == 1e-8
    p = make_rule("UnchangedTensor").p
    assert (p["num_steps"], p["rtol"], p["atol"]) == (3, 1e-5, 1e-8)
    p = make_rule("LossNotDecreasing").p
    assert (p["num_steps"], p["diff_percent"]) == (10, 0.1)
    p = make_rule("Overfit").p
    assert (p["ratio_threshold"], p["patience"]) == (0.1, 1)
    p = make_rule("Overtraining").p
    assert (p["patience_train"], p["patience_validation"], p["delta"]) == (5, 10, 0.01)
    assert make_rule("PoorWeightInitialization").p["threshold"] == 10.0
    assert make_rule("DeadRelu").p["threshold_inactivity"] == 1.0
    assert make_rule("DeadRelu").p["threshold_layer"] == 50.0
    assert make_rule("ClassImbalance").p["threshold_imbalance"] == 10
    assert make_rule("CheckInputImages").p["threshold_mean"] == 0.2
    p = make_rule("Confusion").p
    assert (p["min_diag"], p["max_off_diag"]) == (0.9, 0.1)
    assert make_rule("StalledTraining").p["threshold"] == 1800
    with pytest.raises(UserError, match="did you mean DeadRelu"):
        make_rule("DeadReLu")
    with pytest.raises(UserError, match="no parameter 'treshold'"):
        make_rule("VanishingGradient", {"treshold": 1})
