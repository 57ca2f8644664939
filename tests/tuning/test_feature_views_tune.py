"""Tuning over cached augmented views: ``augment_views`` in the space or fixed, and the views
computed once per study, not once per trial."""

from __future__ import annotations

from pathlib import Path

from visiontune import features
from visiontune.config import TrainConfig, build_config
from visiontune.tuning.space import parse_space
from visiontune.tuning.storage import load_study
from visiontune.tuning.study import TuneSettings, tune

FROZEN = {"model": "tiny_cnn", "weights": "none", "trainable": "head", "workers": 0,
          "progress": False, "batch_size": 4, "epochs": 2, "augment": "light"}  # fmt: skip


def _count_rows(monkeypatch) -> list[int]:
    """Rows of every backbone pass of the study (a pass computes features, a read does not)."""
    rows: list[int] = []
    compute = features.compute

    def counting(*args, **kwargs):
        f, y, bad = compute(*args, **kwargs)
        rows.append(len(y))
        return f, y, bad

    monkeypatch.setattr(features, "compute", counting)
    return rows


def test_views_in_the_space_are_computed_once_per_study(tiny_data: Path, monkeypatch):
    rows = _count_rows(monkeypatch)
    space = parse_space({"augment_views": {"type": "categorical", "values": [2, 3]}})
    fixed = build_config(TrainConfig, None, {"data": str(tiny_data), **FROZEN})
    settings = TuneSettings(study="views", strategy="grid", max_trials=2, report=False)
    result = tune(settings, fixed, space)
    assert result.counts == {"COMPLETE": 2}
    trials = load_study("views", result.storage).get_trials()
    assert sorted(t.params["augment_views"] for t in trials) == [2, 3]
    assert all(t.user_attrs["used_feature_cache"] for t in trials)
    # train (16), valid (8), test (8) once, and each of the 3 views of 16 images once, whichever
    # trial asked first: the other trial read them from the cache.
    assert sum(rows) == 16 + 8 + 8 + 3 * 16


def test_fixed_views_second_trial_reads_the_cache(tiny_data: Path, tmp_path, monkeypatch, cli):
    rows = _count_rows(monkeypatch)  # the CLI runs in this process: its passes are counted
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, values: [0.01, 0.1]}\n")
    args = ["tune", "--data", tiny_data, "--space", space, "--study", "fixed",
            "--strategy", "grid", "--set", "model=tiny_cnn", "--weights", "none",
            "--trainable", "head", "--workers", "0", "--batch-size", "4", "--epochs", "2",
            "--augment", "light", "--augment-views", "3", "--set", "report=false"]  # fmt: skip
    code, _, err = cli(*args, "--max-trials", "1")
    assert code == 0, err
    first = sum(rows)
    # The tiny set's valid split is small, so the study cross-validates (--cv auto): features
    # and views are those of the train+valid pool, once for every fold, plus the test split.
    assert first == (16 + 8) + 8 + 3 * (16 + 8)
    code, _, err = cli(*args, "--max-trials", "2")
    assert code == 0, err
    assert sum(rows) == first  # the second trial computed nothing: it read the cache
    trials = load_study("fixed", str(tmp_path / "studies" / "fixed" / "journal.log")).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["used_feature_cache"] for t in trials)
