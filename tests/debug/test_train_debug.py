"""The debugger through the real training job: faults made by the config, frozen layers,
raw capture against the checkpoint, SIGKILL and resume, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import write_dataset
from loop_harness import cfg_for, results, run_train

from visiontune.callbacks import Callback
from visiontune.debug import Trial, modes


def debug_cfg(data, out, rules=(), debugger=None, **kw):
    dbg = {"save_interval": 1, "rules": list(rules), **(debugger or {})}
    return cfg_for(data, out, debugger=dbg, **kw)


@pytest.fixture
def one_batch_data(tmp_path):
    """16 training images: with batch_size 16 every step sees the same batch."""
    return write_dataset(tmp_path / "data", per_class={"train": 8, "valid": 4, "test": 2})


FLAT_RULES = [
    {"name": "LossNotDecreasing", "parameters": {"num_steps": 2}},
    {"name": "UnchangedTensor"},
    {"name": "WeightUpdateRatio", "parameters": {"num_steps": 1}},
]


@pytest.mark.parametrize("lr", [1e-30, 0.05])
def test_flat_training_fires_loss_unchanged_and_update_ratio(one_batch_data, tmp_path, lr):
    # lr must be > 0 in the config; 1e-30 leaves float32 weights exactly where they are.
    cfg = debug_cfg(
        one_batch_data, tmp_path / "run", FLAT_RULES, batch_size=16, epochs=5, lr=lr,
        optimizer="sgd", augment="none",
    )  # fmt: skip
    run_train(cfg)
    res = results(tmp_path / "run")
    flat = lr < 1e-20
    for name in ("LossNotDecreasing", "UnchangedTensor", "WeightUpdateRatio"):
        assert res[name].triggered is flat, (name, res[name].message)
        assert res[name].datapoints > 0
    if flat:
        assert "did not change over 3 saved steps" in res["UnchangedTensor"].message
        assert res["WeightUpdateRatio"].steps[0] == 0


def test_exploding_loss_stops_the_run_cleanly_with_a_model(image_dataset, tmp_path):
    rules = [{"name": "ExplodingTensor", "action": "stop"}]
    cfg = debug_cfg(
        image_dataset, tmp_path / "run", rules, lr=1e30, optimizer="sgd", epochs=4,
        schedule="constant",
    )  # fmt: skip
    result = run_train(cfg)
    assert "ExplodingTensor" in (result.stop_reason or "")
    assert len(result.history) < 4  # stopped early, at an epoch end
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    res = results(tmp_path / "run")["ExplodingTensor"]
    assert res.triggered and res.action == "stop"
    assert "NaN" in res.message or "infinite" in res.message


def test_tiny_data_many_epochs_overfits_and_overtrains(tmp_path):
    data = write_dataset(tmp_path / "data", per_class={"train": 4, "valid": 6, "test": 2})
    # Label noise: half of each training class moves to the other, so fitting the training
    # set means memorising it, and validation loss grows as training loss falls.
    cats, dogs = (sorted((data / "train" / c).iterdir())[:2] for c in ("cat", "dog"))
    for p in cats:
        p.rename(data / "train" / "dog" / p.name)
    for p in dogs:
        p.rename(data / "train" / "cat" / p.name)
    rules = [
        {"name": "Overfit"},
        {"name": "Overtraining", "parameters": {"patience_train": 3, "patience_validation": 3}},
    ]
    cfg = debug_cfg(data, tmp_path / "run", rules, batch_size=4, epochs=14, lr=0.05, augment="none")
    run_train(cfg)
    res = results(tmp_path / "run")
    assert res["Overfit"].triggered, res["Overfit"].message
    assert "above train loss" in res["Overfit"].message
    assert res["Overtraining"].triggered, res["Overtraining"].message


def test_frozen_backbone_captures_every_layer_and_reports_frozen_gradients_absent(
    image_dataset, tmp_path
):
    # smdebug's hook crashed here: gradients of frozen layers do not exist.
    cfg = debug_cfg(
        image_dataset, tmp_path / "run", [],
        {"collections": ["weights", "biases", "gradients"], "save_interval": 2},
        model="resnet18", weights="none", trainable="head", augment="light", image_size=32,
        epochs=1,
    )  # fmt: skip
    run_train(cfg)
    trial = Trial(tmp_path / "run")
    model = torch.nn.Module()
    from visiontune.models.registry import build_model

    model, _ = build_model("resnet18", 2, weights="none")
    names = [n for n, _ in model.named_parameters()]
    assert set(names) <= set(trial.tensor_names(collection="weights")) | set(
        trial.tensor_names(collection="biases")
    )
    frozen = [n for n in names if not n.startswith("head.")]
    for n in frozen:
        t = trial.tensor(f"gradient/{n}")
        assert t.absent and "frozen" in t.absent
        assert t.steps() == []
    head = trial.tensor("gradient/head.1.weight")
    assert head.absent is None and head.steps(modes.TRAIN) == [0]
    assert trial.tensor("backbone.conv1.weight").steps() == [0]


class _KeepCheckpoint(Callback):
    def __init__(self, step):
        self.step, self.model = step, None

    def on_checkpoint(self, state, path):
        if state.step == self.step:
            self.model = torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_raw_capture_equals_the_checkpoint_at_that_step(image_dataset, tmp_path):
    keep = _KeepCheckpoint(step=2)  # the checkpoint after epoch 1 (2 steps of 8 images)
    cfg = debug_cfg(
        image_dataset, tmp_path / "run", [],
        {"collections": ["weights"], "save_steps": [2, 3], "save_raw": r".*stem\.0\.weight"},
        epochs=2,
    )  # fmt: skip
    run_train(cfg, [keep])
    want = keep.model["backbone.stem.0.weight"].numpy()
    t = Trial(tmp_path / "run").tensor("backbone.stem.0.weight")
    assert t.steps() == [2, 3]
    got = t.value(2, mode=modes.TRAIN)
    assert got.shape == want.shape and (got == want).all()
    assert t.reduction_value(2, "l2") == pytest.approx(float(torch.tensor(want).norm()), 1e-6)
    assert t.reduction_value(2, "mean") == pytest.approx(float(want.mean()), abs=1e-7)
    assert t.reduction_value(2, "max") == pytest.approx(float(want.max()))
    assert not (t.value(3) == want).all()  # one SGD step later it moved
    assert set(t.values()) == {2, 3}


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from visiontune.callbacks import Callback
    sys.path.insert(0, {here!r})
    from loop_harness import cfg_for, run_train

    class Kill(Callback):
        def on_epoch_end(self, state, metrics):  # after the debugger flushed this epoch
            if state.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = cfg_for({data!r}, {out!r}, epochs=3, checkpoint_every_steps=3,
                  debugger={{"save_interval": 1, "collections": ["metrics", "weights"]}})
    run_train(cfg, [Kill()])
    """
)


def test_sigkill_and_resume_keep_every_saved_step_exactly_once(image_dataset, tmp_path):
    out = tmp_path / "killed"
    script = _KILLER.format(here=os.path.dirname(__file__), data=str(image_dataset), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    before = Trial(out)
    assert max(before.steps(modes.TRAIN)) >= 3  # it got past the mid-epoch checkpoint

    cfg = cfg_for(image_dataset, out, epochs=3, checkpoint_every_steps=3,
                  debugger={"save_interval": 1, "collections": ["metrics", "weights"]})  # fmt: skip
    run_train(cfg, resume=True)
    straight = tmp_path / "straight"
    run_train(cfg.model_copy(update={"output": str(straight)}))

    def keys(run):
        rows = Trial(run).rows()
        return [(r["mode"], r["phase"], r["step"], r["epoch"], r["name"]) for r in rows]

    resumed, clean = keys(out), keys(straight)
    assert len(resumed) == len(set(resumed)), "a saved step is in RUN/debug twice"
    assert sorted(resumed) == sorted(clean)
    loss_r = Trial(out).tensor("loss").values(mode=modes.TRAIN)
    loss_s = Trial(straight).tensor("loss").values(mode=modes.TRAIN)
    assert list(loss_r) == list(range(6)) and loss_r.keys() == loss_s.keys()
    for step in loss_s:
        assert float(loss_r[step]) == pytest.approx(float(loss_s[step]), rel=1e-5)


def test_cli_lists_tensors_reruns_rules_and_plots(image_dataset, tmp_path, cli):
    run = tmp_path / "run"
    cfg = debug_cfg(image_dataset, run, ["LossNotDecreasing"], {"collections": ["weights"]},
                    epochs=2)  # fmt: skip
    run_train(cfg)
    code, out, err = cli("debug", run, "--tensors", "stem", "--json")
    assert code == 0, err
    items = json.loads(out)
    assert {i["name"] for i in items} == {"backbone.stem.0.weight", "backbone.stem.1.weight"}
    assert items[0]["steps"] == [0, 1, 2, 3] and "l2" in items[0]["last"]

    code, out, err = cli("debug", run, "--rules", "TensorVariance")
    assert code == 0 and "n/a  TensorVariance" in out
    code, out, err = cli(
        "debug", run, "--rules", "TensorVariance", "--set", "TensorVariance.max_threshold=1e-9",
        "--json",
    )  # fmt: skip
    verdict = json.loads(out)[0]
    assert verdict["triggered"] and verdict["parameters"]["max_threshold"] == 1e-9

    code, out, err = cli("debug", run, "--set", "Nope.x=1")
    assert code == 2 and "unknown debugger rule 'Nope'" in err

    code, out, err = cli("debug", run, "--plot", "--plot-tensors", "stem")
    assert code == 0, err
    page = (run / "debug" / "plots.html").read_text()
    assert "Plotly.newPlot" in page and "backbone.stem.0.weight" in page
    assert 'src="http' not in page and "cdn" not in page.lower().split("<body>")[0]


def test_cli_says_when_a_run_has_no_debugger_data(image_dataset, tmp_path, cli):
    code, _, err = cli("debug", tmp_path)
    assert code == 2 and "no debugger data" in err


@pytest.mark.slow
def test_healthy_run_keeps_every_rule_quiet(hymenoptera, tmp_path):
    from visiontune.debug.rules import RULES

    quiet = [r for r in RULES if r not in ("TensorVariance",)]
    cfg = debug_cfg(
        hymenoptera, tmp_path / "run", quiet, {"save_interval": 5},
        model="efficientnet_lite0", weights="imagenet", trainable="head", augment="none",
        batch_size=32, lr=1e-3, epochs=3, workers=0,
    )  # fmt: skip
    result = run_train(cfg)
    assert result.test_metrics["accuracy"] > 0.8
    res = results(tmp_path / "run")
    fired = {k: v.message for k, v in res.items() if v.triggered}
    assert not fired
    assert sum(v.datapoints for v in res.values()) > 20
