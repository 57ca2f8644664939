"""Cached augmented views (``augment_views``): a frozen backbone trains with augmentation at
feature-cache speed, over views that are the same on every run and resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_dataset
from safetensors.torch import load_file
from test_train import FAST, _resume, _run_script

from visiontune import features
from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.train import EpochSampler, train

# A frozen random tiny_cnn: features in about a second, and views that differ per augmentation.
VIEWS = {**FAST, "trainable": "head", "lr": 0.05, "epochs": 2, "augment": "light"}


class FeaturePasses(Callback):
    """Which feature passes ran (none when everything came from the cache)."""

    def __init__(self) -> None:
        self.splits: list[str] = []

    def on_features_start(self, state, split, backbone) -> None:
        self.splits.append(split)


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "home"))  # a cache of this test's own
    # 12 training images, 4 valid and 4 test: a train entry is told apart by its 12 rows.
    return write_dataset(tmp_path / "d", per_class={"train": 6, "valid": 2, "test": 2})


def _train(data: Path, out: Path, **kw):
    passes = FeaturePasses()
    cfg = build_config(TrainConfig, None, {**VIEWS, "data": str(data), "output": str(out), **kw})
    return train(cfg, [passes]), passes.splits


def _entries(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = tmp_path / "home" / "cache" / "features"
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


def test_views_differ_and_are_read_back_from_the_cache(data, tmp_path, capsys):
    plain, passes = _train(data, tmp_path / "plain", augment="none")
    assert passes == ["train", "valid", "test"] and plain.used_feature_cache
    before = _entries(tmp_path)
    (plain_train,) = [e["features"] for e in before.values() if len(e["labels"]) == 12]

    first, passes = _train(data, tmp_path / "a", augment_views=3)
    assert first.used_feature_cache
    assert passes == ["train_views"]  # the plain features came from the cache
    assert "from cached backbone features, 3 augmented views (light)" in capsys.readouterr().err
    after = _entries(tmp_path)
    views = [after[name]["features"] for name in sorted(set(after) - set(before))]
    assert len(views) == 3
    for i, v in enumerate(views):
        assert v.shape == plain_train.shape
        assert not torch.allclose(v, plain_train)
        assert all(not torch.allclose(v, w) for w in views[i + 1 :])

    second, passes = _train(data, tmp_path / "b", augment_views=3)
    assert passes == []  # nothing recomputed
    again = _entries(tmp_path)
    assert again.keys() == after.keys()
    assert all(torch.equal(again[k]["features"], after[k]["features"]) for k in after)
    for key in ("train_loss", "valid_loss"):  # the same views give the same training
        assert [h[key] for h in second.history] == [h[key] for h in first.history]

    # One more view computes only that one: views are the same whatever K is.
    _, passes = _train(data, tmp_path / "c", augment_views=4)
    assert passes == ["train_views"]
    assert len(_entries(tmp_path)) == len(after) + 1


def test_seed_and_preset_key_the_views(data, tmp_path):
    _train(data, tmp_path / "a", augment_views=2)
    n = len(_entries(tmp_path))
    _, passes = _train(data, tmp_path / "b", augment_views=2, augment="strong")
    assert passes == ["train_views"] and len(_entries(tmp_path)) == n + 2
    # Weights none: a random backbone differs per seed, so the plain features are new too.
    _, passes = _train(data, tmp_path / "c", augment_views=2, seed=1)
    assert passes == ["train", "valid", "test", "train_views"]
    assert len(_entries(tmp_path)) == n + 2 + 3 + 2


def test_views_do_not_depend_on_loader_workers(data, tmp_path, monkeypatch):
    _train(data, tmp_path / "a", augment_views=2)
    main = _entries(tmp_path)
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "other"))
    _train(data, tmp_path / "b", augment_views=2, workers=2, batch_size=4)
    folder = tmp_path / "other" / "cache" / "features"
    other = {p.name: load_file(str(p)) for p in folder.glob("*.safetensors")}
    assert other.keys() == main.keys()
    assert all(torch.equal(other[k]["features"], main[k]["features"]) for k in main)


def test_each_epoch_draws_views_again():
    views = torch.arange(4.0 * 10).reshape(4, 10, 1)  # view v of sample i holds 10 v + i
    ds = features.ViewFeatures(views, torch.zeros(10, dtype=torch.long))
    sampler = EpochSampler(10, seed=0)
    chosen = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        chosen.append({i: int(ds[(i, s)][0].item()) // 10 for i, s in sampler})
    assert all(len({c[i] for c in chosen}) > 1 for i in range(10))  # a sample changes views
    assert {v for c in chosen for v in c.values()} == {0, 1, 2, 3}  # and every view is used
    sampler.set_epoch(3)
    assert {i: int(ds[(i, s)][0].item()) // 10 for i, s in sampler} == chosen[3]  # repeatable


def test_augment_views_with_augment_none_or_a_trained_backbone_changes_nothing():
    base = {"data": "x", "trainable": "head"}
    assert build_config(TrainConfig, None, {**base, "augment_views": 4}).uses_feature_views
    none = build_config(TrainConfig, None, {**base, "augment": "none", "augment_views": 4})
    assert none.uses_feature_cache and not none.uses_feature_views
    tuned = build_config(TrainConfig, None, {**base, "trainable": "all", "augment_views": 4})
    assert not tuned.uses_feature_cache and not tuned.uses_feature_views
    light = build_config(TrainConfig, None, base)
    assert not light.uses_feature_cache  # augment_views 0: as before, images every epoch


def test_sigkill_mid_epoch_then_resume_over_views_matches_uninterrupted_run(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class={"train": 12, "valid": 4, "test": 4})  # fmt: skip
    common = {**VIEWS, "data": str(data), "epochs": 3, "augment_views": 4, "dropout": 0.2,
              "checkpoint_every_steps": 2, "precision": "fp32"}  # fmt: skip
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "home"))  # subprocesses inherit it
    reference = train(build_config(TrainConfig, None, {**common, "output": str(tmp_path / "ref")}))
    run = tmp_path / "killed"
    # 36 images / batch 8 = 5 steps an epoch: step 8 is mid-epoch 2, after the step-6 checkpoint
    p = _run_script({**common, "output": str(run)}, kill_at=8, sig=signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["batch_in_epoch"]) == (1, 1)
    p = _resume(run)
    assert p.returncode == 0, p.stderr
    resumed = json.loads((run / "evaluation.json").read_text())
    ref = json.loads((tmp_path / "ref" / "evaluation.json").read_text())
    assert resumed["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_loss = [h["loss"] for h in hist if h["split"] == "train"]
    assert train_loss == pytest.approx([h["train_loss"] for h in reference.history], rel=1e-4)


def test_train_augment_views_from_the_console_entry_point(data, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", "--data", str(data), "--output", str(out),
         "--set", "model=tiny_cnn", "--weights", "none", "--trainable", "head", "--workers", "0",
         "--batch-size", "8", "--epochs", "2", "--augment", "light", "--augment-views", "4"],
        capture_output=True, text=True, timeout=240, env=os.environ.copy(),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "from cached backbone features, 4 augmented views (light) per training image" in p.stderr
    assert "augment_views: 4" in (out / "config.yaml").read_text()
    assert json.loads((out / "model" / "model.json").read_text())["config"]["augment_views"] == 4


def test_too_many_views_are_refused_in_one_line_before_any_compute(data, tmp_path):
    # 65 views: over the bound, refused by the config before the data is read.
    base = [sys.executable, "-m", "visiontune", "train", "--data", str(data),
            "--set", "model=tiny_cnn", "--weights", "none", "--workers", "0"]  # fmt: skip
    p = subprocess.run([*base, "--output", str(tmp_path / "a"), "--augment-views", "65"],
                       capture_output=True, text=True, timeout=240, env=os.environ.copy())  # fmt: skip
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: invalid config value for 'augment_views': Input should be less than or equal to 64"
    ]
    assert not (tmp_path / "a").exists()


def test_views_whose_features_exceed_memory_are_refused():
    # 64 views of 100,000 images 1280 wide: 61 GiB while computed, against 16 GiB free.
    with pytest.raises(UserError, match=r"augment_views 64: .* need about 61.0 GiB .* 16.0 GiB is available: use fewer views"):  # fmt: skip
        features.check_views_fit(64, 100_000, 1280, available=16 * 2**30)
    features.check_views_fit(8, 245, 1280, available=16 * 2**30)  # hymenoptera's 8 views: 20 MB


def test_the_views_memory_check_counts_every_process_on_the_machine():
    # 8 views of 50,000 images 1280 wide: 3.8 GiB while computed, fine in one process of 16 GiB
    # free; under torchrun with 8 processes on the machine, each holds them all: 30.5 GiB.
    features.check_views_fit(8, 50_000, 1280, available=16 * 2**30)
    with pytest.raises(UserError, match=r"1280 wide in each of 8 processes\) need about 30.5 GiB"):
        features.check_views_fit(8, 50_000, 1280, available=16 * 2**30, processes=8)


def test_a_run_short_of_memory_for_its_views_stops_before_the_views_pass(data, tmp_path, monkeypatch):  # fmt: skip
    import psutil

    real = psutil.virtual_memory()
    # 16 KiB available: 4 views of 12 images 64 wide need 24 KiB while computed.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=2**14))
    passes = FeaturePasses()
    cfg = build_config(TrainConfig, None, {**VIEWS, "data": str(data), "output": str(tmp_path / "r"), "augment_views": 4})  # fmt: skip
    with pytest.raises(
        UserError,
        match=r"augment_views 4: the features of 4 views of 12 images \(64 wide\) need about 24 KiB of memory while computed, and 16 KiB is available",
    ):
        train(cfg, [passes])
    assert "train_views" not in passes.splits


def test_seeding_an_augmentation_leaves_the_gpu_dropout_stream_alone(monkeypatch):
    # Found on an H100: torch.manual_seed inside fork_rng(devices=[]) reseeded the GPU's
    # generator (not restored), so a CUDA run that computed its views drew other dropout masks
    # than its resumed copy that read them from the cache. Only the CPU generator is seeded.
    from torch.utils.data import TensorDataset

    from visiontune.train import SeededSamples

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))

    class Draw(TensorDataset):
        def __getitem__(self, i):
            return torch.rand(1)

    base = Draw(torch.zeros(3))
    views = features.AugmentedViews(base, seed=0, views=[0, 1])
    first = [views[j] for j in range(len(views))]
    assert [views[j] for j in range(len(views))] == first  # each view is still seeded
    seeded = SeededSamples(base)
    assert seeded[(1, 7)] == seeded[(1, 7)] and seeded[(1, 7)] != seeded[(1, 8)]
    assert reseeded == []
