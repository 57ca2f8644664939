"""Cross-validation folds of train+valid and the refit: what a fold trains and validates on,
that the pool's backbone features are computed once for every fold, and what a refit saw."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import make_image

from visiontune import features
from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.run import RunDir
from visiontune.train import load_data, train

# A frozen tiny_cnn over cached features: each run trains its head in well under a second.
FROZEN = {
    "model": "tiny_cnn",
    "weights": "none",
    "trainable": "head",
    "augment": "none",
    "batch_size": 4,
    "lr": 0.05,
    "epochs": 2,
    "workers": 0,
    "progress": False,
    "report": False,
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """3 classes with uneven counts: train 7/5/9, valid 2/2/1, test 2 each."""
    root = tmp_path_factory.mktemp("cv") / "data"
    for offset, (split, counts) in enumerate(
        {"train": (7, 5, 9), "valid": (2, 2, 1), "test": (2, 2, 2)}.items()
    ):
        for label, (name, n) in enumerate(zip(("ant", "bee", "fly"), counts, strict=True)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                make_image(label, offset * 100 + i).save(root / split / name / f"{i}.jpg")
    return root


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    return build_config(TrainConfig, None, {**FROZEN, "data": str(data), "output": str(out), **kw})


def folds_of(data: Path, tmp_path: Path, k: int, seed: int = 0):
    out = []
    for fold in range(k):
        cfg = cfg_for(data, tmp_path / f"f{seed}-{fold}", cv_folds=k, cv_fold=fold, split_seed=seed)
        out.append(load_data(cfg, RunDir.open(cfg.output), resume=False).splits)
    return out


def test_folds_are_disjoint_stratified_cover_the_pool_and_repeat(small_data, tmp_path):
    plain = load_data(
        cfg_for(small_data, tmp_path / "plain"), RunDir.open(str(tmp_path / "p")), False
    )
    pool = sorted(plain.splits["train"] + plain.splits["valid"])
    folds = folds_of(small_data, tmp_path, 3)
    held_out = []
    for splits in folds:
        train_set, valid_set = set(splits["train"]), set(splits["valid"])
        assert not train_set & valid_set  # a fold never validates on what it trains on
        assert sorted(splits["train"] + splits["valid"]) == pool
        assert splits["test"] == plain.splits["test"]  # the test split is never pooled
        held_out += splits["valid"]
    assert sorted(held_out) == pool  # every pooled image is validated on exactly once
    # stratified: each class (9, 7 and 10 pooled images) is dealt evenly over the 3 folds
    per_fold = [Counter(label for _, label in s["valid"]) for s in folds]
    for label, n in Counter(label for _, label in pool).items():
        assert {c[label] for c in per_fold} <= {n // 3, n // 3 + 1}
    assert max(len(s["valid"]) for s in folds) - min(len(s["valid"]) for s in folds) <= 1
    # the same folds on a second run; other folds with another split_seed
    assert folds_of(small_data, tmp_path / "again", 3) == folds
    assert folds_of(small_data, tmp_path, 3, seed=1) != folds


def test_too_many_folds_and_half_set_options_fail_in_one_line(small_data, tmp_path):
    cfg = cfg_for(small_data, tmp_path / "run", cv_folds=8, cv_fold=0)
    with pytest.raises(
        UserError,
        match="8-fold cross-validation needs at least 8 images of each class in train\\+valid; class bee has 7",
    ):
        load_data(cfg, RunDir.open(cfg.output), resume=False)
    with pytest.raises(UserError, match="cv_folds and cv_fold go together"):
        cfg_for(small_data, tmp_path / "run", cv_folds=3)
    with pytest.raises(UserError, match="cv_fold must be below cv_folds"):
        cfg_for(small_data, tmp_path / "run", cv_folds=3, cv_fold=3)
    with pytest.raises(UserError, match="refit holds out no valid split"):
        cfg_for(small_data, tmp_path / "run", refit=True, early_stopping=2)


def test_pool_features_are_computed_once_for_every_fold_and_the_refit(
    small_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "home"))  # an empty feature cache
    computed: list[int] = []
    real = features.compute

    def counting(backbone, loader, *args, **kw):
        f, y, bad = real(backbone, loader, *args, **kw)
        computed.append(len(y))
        return f, y, bad

    monkeypatch.setattr(features, "compute", counting)
    results = [
        train(cfg_for(small_data, tmp_path / f"fold-{i}", cv_folds=3, cv_fold=i)) for i in range(3)
    ]
    # fold 0 computed the pool (26 images) and test (6); folds 1 and 2 only read the cache
    assert computed == [26, 6]
    assert all(r.used_feature_cache for r in results)
    for i, r in enumerate(results):
        meta = json.loads((r.run_dir / "model" / "model.json").read_text())["metrics"]
        assert meta["cv_folds"] == 3 and meta["cv_fold"] == i
        assert meta["train_images"] in (17, 18)  # two folds of 26 (8 or 9 held out)

    refit = train(cfg_for(small_data, tmp_path / "refit", refit=True, epochs=3))
    assert computed == [26, 6]  # the refit trains on the same pool: nothing computed again
    meta = json.loads((refit.run_dir / "model" / "model.json").read_text())["metrics"]
    assert meta["train_images"] == 26  # train (21) and valid (5) images: it saw valid
    assert meta["refit"] is True and meta["best_epoch"] == 3  # the last epoch, not a pick
    assert "last" in meta["model_epoch"]
    rows = [json.loads(x) for x in (refit.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train"}  # nothing held out, no valid rows
    assert json.loads((refit.run_dir / "evaluation.json").read_text())["split"] == "test"
