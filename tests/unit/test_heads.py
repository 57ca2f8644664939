"""Heads for small data: the mlp head, the L-BFGS probe, and EMA/SWA weight averaging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_dataset
from safetensors.torch import load_file

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.heads import fit_probe, probe_c
from visiontune.train import train

FAST = {
    "model": "tiny_cnn",
    "weights": "none",
    "batch_size": 8,
    "lr": 0.01,
    "workers": 0,
    "progress": False,
    "report": False,
}
# A frozen random tiny_cnn without augmentation: the head trains on cached features.
CACHED = {**FAST, "trainable": "head", "augment": "none"}


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    return build_config(TrainConfig, None, {**FAST, "data": str(data), "output": str(out), **kw})


def vt(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real console entry point, environment inherited."""
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------------------------
# mlp head: recorded in model.json, loaded back by evaluate and export


def test_mlp_head_round_trips_through_evaluate_and_onnx_export(image_dataset, tmp_path, cli):
    import onnxruntime as ort

    from visiontune.models.artifact import load_model_dir

    run = tmp_path / "run"
    result = train(cfg_for(image_dataset, run, trainable="all", head="mlp", head_hidden=24, epochs=3, dropout=0.1))  # fmt: skip
    model_dir = run / "model"
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["head"] == {"type": "mlp", "hidden": 24}
    weights = load_file(str(model_dir / "model.safetensors"))
    assert weights["head.0.weight"].shape[0] == 24 and weights["head.3.weight"].shape == (2, 24)

    code, out, err = cli("evaluate", model_dir, "--data", image_dataset, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == result.test_metrics["accuracy"]

    onnx_path = tmp_path / "model.onnx"
    code, _, err = cli("export", model_dir, "--format", "onnx", "--output", onnx_path)
    assert code == 0, err
    loaded = load_model_dir(model_dir)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = loaded.model(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_model_json_with_an_unknown_head_is_refused_in_one_line(image_dataset, tmp_path, cli):
    from visiontune.models.artifact import save_model_dir
    from visiontune.models.registry import build_model

    model, spec = build_model("tiny_cnn", 2, weights="none")
    model_dir = save_model_dir(tmp_path / "model", model, architecture="tiny_cnn", class_ids=["cat", "dog"], class_names=["cat", "dog"], preprocess=spec.preprocess)  # fmt: skip
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["head"] == {"type": "linear"}
    meta["head"] = {"type": "transformer"}
    (model_dir / "model.json").write_text(json.dumps(meta))
    code, _, err = cli("evaluate", model_dir, "--data", image_dataset)
    assert code != 0
    assert '"head" must be' in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# probe head: the same minimiser as scikit-learn's LogisticRegression(C=1/(n*weight_decay))


def _clusters(n: int, generator: torch.Generator, means: torch.Tensor):
    """Overlapping Gaussian classes with a few uninformative, scaled-up dimensions: not
    separable, so the L2 term decides the answer."""
    y = torch.randint(0, means.shape[0], (n,), generator=generator)
    x = means[y] + torch.randn(n, means.shape[1], generator=generator)
    x[:, :4] *= 3.0
    return x, y


@pytest.fixture
def one_thread():
    """A 300 x 48 problem is all synchronisation overhead across threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("classes", "weight_decay"), [(5, 1e-1), (5, 1e-3), (2, 1e-2)])
def test_probe_fit_matches_sklearn_logistic_regression(classes, weight_decay, one_thread):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    means = torch.randn(classes, 48, generator=g) * 0.5
    x, y = _clusters(300, g, means)
    x_test, y_test = _clusters(1000, g, means)
    head = torch.nn.Linear(48, classes)
    # A tight tolerance: the same optimum as scikit-learn's to 1e-4 (training uses 1e-5).
    fit = fit_probe(head, x, y, weight_decay, tolerance_grad=1e-7)
    assert fit.converged

    c = probe_c(len(y), weight_decay, num_classes=classes)
    sk = LogisticRegression(C=c, tol=1e-10, max_iter=20_000)
    sk.fit(x.double().numpy(), y.numpy())
    w = head.weight.detach().double().numpy()
    b = head.bias.detach().double().numpy()
    if classes == 2:  # scikit-learn keeps one vector: the difference of the softmax rows
        w, b = (w[1:] - w[:1]), (b[1:] - b[:1])
    else:  # intercepts are defined up to a common shift (softmax ignores it)
        b, sk.intercept_ = b - b.mean(), sk.intercept_ - sk.intercept_.mean()
    np.testing.assert_allclose(w, sk.coef_, atol=1e-4 * max(1.0, np.abs(sk.coef_).max()))
    np.testing.assert_allclose(b, sk.intercept_, atol=1e-3)

    ours = (head(x_test).argmax(1) == y_test).sum().item()
    theirs = (sk.predict(x_test.double().numpy()) == y_test.numpy()).sum()
    assert ours >= theirs - 1
    assert 0.4 < ours / len(y_test) < 0.99  # non-trivial: neither chance nor separable

    again = fit_probe(
        head, x, y, weight_decay, tolerance_grad=1e-7
    )  # warm start from the optimum: nothing to do
    assert again.converged and again.iterations <= 1


def test_probe_head_trains_in_the_loop_and_exports(tmp_path, cli):
    data = write_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class={"train": 10, "valid": 4, "test": 4})  # fmt: skip
    seen: list[int] = []

    class Epochs(Callback):
        def on_epoch_end(self, state, metrics):
            seen.append(state.step)

    run = tmp_path / "run"
    result = train(cfg_for(data, run, **CACHED, head="probe", weight_decay=1e-2, epochs=2), [Epochs()])  # fmt: skip
    assert result.used_feature_cache
    assert seen == [1, 2]  # one full-batch fit per epoch
    assert result.test_metrics["accuracy"] == 1.0
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["head"] == {"type": "probe"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines] == [(1, "train"), (1, "valid"), (2, "train"), (2, "valid")]  # fmt: skip
    # A converged convex fit warm-started again does not move: both epochs validate the same.
    assert result.history[0]["valid_loss"] == pytest.approx(result.history[1]["valid_loss"])
    code, out, err = cli("evaluate", run / "model", "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"trainable": "all"}, "head=probe fits on cached backbone features"),
        ({"trainable": "head", "augment": "light"}, "augment=light"),
        ({**CACHED, "weight_decay": 0}, "needs weight_decay > 0"),
    ],
)
def test_probe_without_cached_features_fails_in_one_line(image_dataset, tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        cfg_for(image_dataset, tmp_path / "run", **{**kw, "head": "probe"})


def test_cli_flags_set_the_head_and_averaging(image_dataset, tmp_path, cli):
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", image_dataset, "--output", run, "--set", "model=tiny_cnn",
           "--weights", "none", "--augment", "none", "--workers", "0", "--epochs", "2",
           "--batch-size", "8", "--head", "mlp", "--head-hidden", "8",
           "--weight-averaging", "swa", "--swa-start", "0.5", "--ema-decay", "0.5",
           "--set", "report=false")  # fmt: skip
    assert code == 0, err
    saved = (run / "config.yaml").read_text()
    for line in ("head: mlp", "head_hidden: 8", "weight_averaging: swa", "swa_start: 0.5", "ema_decay: 0.5"):  # fmt: skip
        assert line in saved
    assert json.loads((run / "model" / "model.json").read_text())["head"]["hidden"] == 8


def test_probe_asked_for_alone_fits_the_plain_features(image_dataset, tmp_path, cli):
    # `--head probe` with nothing said about augmentation: a probe on the plain cached
    # features (the default light augmentation would refuse the probe), recorded as such.
    tiny = ("--set", "model=tiny_cnn", "--weights", "none", "--workers", "0", "--epochs", "1",
            "--set", "report=false", "--head", "probe")  # fmt: skip
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", image_dataset, "--output", run, *tiny)
    assert code == 0, err
    assert "augment: none" in (run / "config.yaml").read_text()
    # Augmentation asked for without cached views: refused in one line that names both ways out.
    proc = vt("train", "--data", image_dataset, "--output", tmp_path / "x", *tiny, "--augment", "light")  # fmt: skip
    code, err = proc.returncode, proc.stderr
    assert code != 0 and "Traceback" not in err
    assert "head=probe fits on cached backbone features" in err
    assert "augment=none (plain features) or augment_views >= 1" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli("train", "--data", image_dataset, "--output", tmp_path / "views", *tiny, "--augment", "light", "--augment-views", "2")  # fmt: skip
    assert code == 0, err


# --------------------------------------------------------------------------------------------
# weight averaging


def test_swa_validates_and_exports_the_average_of_the_epochs(tmp_path):
    data = write_dataset(tmp_path / "d", per_class={"train": 12, "valid": 6}, splits=("train", "valid"))  # fmt: skip
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(Callback):
        def on_epoch_end(self, state, metrics):
            snapshots.append(
                {k: v.detach().cpu().clone() for k, v in state.step_model.state_dict().items()}
            )

    run = tmp_path / "run"
    # monitor=epoch: the last epoch is the best, so the export is the average of all three.
    cfg = cfg_for(data, run, **CACHED, weight_averaging="swa", swa_start=0.0, epochs=3, dropout=0.3, monitor="epoch")  # fmt: skip
    result = train(cfg, [Snapshot()])
    exported = load_file(str(run / "model" / "model.safetensors"))
    mean = {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in snapshots[0]}
    for k in ("1.weight", "1.bias"):
        torch.testing.assert_close(exported[f"head.{k}"], mean[k])
        assert not torch.allclose(snapshots[-1][k], mean[k])  # the average is not the last
    # The last epoch's validation was of the averaged weights: the export evaluates the same.
    assert result.test_metrics["split"] == "valid"
    assert result.test_metrics["loss"] == pytest.approx(result.history[-1]["valid_loss"])


def test_epochs_before_averaging_are_not_exported(image_dataset, tmp_path):
    cfg = cfg_for(image_dataset, tmp_path / "run", **CACHED, weight_averaging="ema", swa_start=0.5, epochs=4)  # fmt: skip
    result = train(cfg)
    assert result.best_epoch in (3, 4)  # averaging starts with the third epoch


_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    from visiontune.callbacks import Callback
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train

    values = json.loads(sys.argv[1]); kill_at = int(sys.argv[2])

    class Killer(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            if state.step == kill_at:
                os.kill(os.getpid(), 9)

    train(build_config(TrainConfig, None, values), [Killer()])
    """
)


def test_sigkill_then_resume_gives_the_same_averaged_weights(tmp_path):
    # EMA: the running average changes every step, so a checkpoint mid-epoch must carry it
    # (SWA shares the same checkpoint entry and changes only at epoch ends).
    averaging = "ema"
    data = write_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class={"train": 12, "valid": 4, "test": 4})  # fmt: skip
    # Cached features keep it fast; head dropout makes the result depend on the RNG stream.
    common = {**FAST, **CACHED, "data": str(data), "epochs": 3, "dropout": 0.3,
              "checkpoint_every_steps": 2, "precision": "fp32",
              "weight_averaging": averaging, "ema_decay": 0.7, "swa_start": 0.34}  # fmt: skip
    reference = train(build_config(TrainConfig, None, {**common, "output": str(tmp_path / "ref")}))

    run = tmp_path / "killed"
    # 36 images / batch 8 = 5 steps an epoch; averaging starts with epoch 2 (steps 6-10): step
    # 9 is mid-epoch 2, after the step-8 checkpoint that holds the running average.
    p = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps({**common, "output": str(run)}), "9"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["batch_in_epoch"]) == (1, 3)
    assert int(ck["averaged"]["n_averaged"]) == 3  # steps 6, 7 and 8

    p = vt("train", "--resume", run)
    assert p.returncode == 0, p.stderr
    got = load_file(str(run / "model" / "model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert reference.best_epoch in (2, 3)  # only averaged epochs are exported
