"""What a study keeps on disk (--keep-checkpoints), and --train-best after more trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from visiontune.config import TrainConfig, build_config
from visiontune.tuning.space import parse_space
from visiontune.tuning.storage import load_study
from visiontune.tuning.study import TuneSettings, create_study, train_best, tune

TINY = {"model": "tiny_cnn", "weights": "none", "trainable": "all", "workers": 0, "progress": False}


def fixed(data: Path, **kw):
    return build_config(
        TrainConfig, None, {"data": str(data), **TINY, "batch_size": 4, "epochs": 1, **kw}
    )


LR = parse_space({"lr": {"type": "continuous", "min": 0.003, "max": 0.1, "scaling": "log"}})


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("keep", ["models", "best", "all", "none"])
def test_finished_trials_keep_what_was_asked(tiny_data, keep):
    settings = {"keep_checkpoints": keep} if keep != "models" else {}  # models is the default
    result = tune(
        TuneSettings(study=keep, max_trials=2, heartbeat=1, report=False, **settings),
        fixed(tiny_data),
        LR,
    )
    study = load_study(keep, result.storage)
    runs = {t.number: Path(t.user_attrs["run_dir"]) for t in study.get_trials()}
    assert len(runs) == 2 and all((r / "config.yaml").is_file() for r in runs.values())
    has_model = {n for n, r in runs.items() if (r / "model" / "model.json").is_file()}
    has_ckpt = {n for n, r in runs.items() if (r / "checkpoints").exists()}
    expected_models = {"models": {0, 1}, "best": {result.best["trial"]}, "all": {0, 1}}
    assert has_model == expected_models.get(keep, set())
    assert has_ckpt == ({0, 1} if keep == "all" else set())


def test_default_keeps_less_on_disk_than_all(tiny_data):
    sizes = {}
    for keep in ("all", "models"):
        result = tune(
            TuneSettings(study=f"size-{keep}", max_trials=2, heartbeat=1, report=False,
                         keep_checkpoints=keep),
            fixed(tiny_data),
            LR,
        )  # fmt: skip
        sizes[keep] = _size(result.study_dir / "trials")
    # checkpoints hold the model, optimizer state and RNG: dropping them at least halves it
    assert sizes["models"] * 2 < sizes["all"], sizes


def test_train_best_again_after_more_trials_trains_the_new_best(tiny_data, capsys):
    space = parse_space({"lr": {"type": "categorical", "values": [1e-7, 0.05]}})
    settings = {"study": "again", "heartbeat": 1, "report": False, "train_best": True}
    study, _, _ = create_study(TuneSettings(max_trials=1, **settings), fixed(tiny_data), space)
    study.enqueue_trial({"lr": 1e-7})  # first a rate that learns nothing
    first = tune(TuneSettings(max_trials=1, **settings), fixed(tiny_data), space)
    best_dir = first.study_dir / "best"
    assert first.best_run == best_dir
    assert yaml.safe_load((best_dir / "config.yaml").read_text())["lr"] == 1e-7

    study.enqueue_trial({"lr": 0.05})  # then one that learns: the best changes
    second = tune(TuneSettings(max_trials=2, **settings), fixed(tiny_data), space)
    assert second.best["trial"] == 1 and second.best["params"] == {"lr": 0.05}
    assert second.best_run == best_dir
    assert yaml.safe_load((best_dir / "config.yaml").read_text())["lr"] == 0.05
    assert json.loads((best_dir / "trained_from.json").read_text())["trial"] == 1
    assert (best_dir / "model" / "model.json").is_file()
    assert "retrained" in capsys.readouterr().err

    # Asked again with the same best: nothing is trained, and it says why.
    stamp = (best_dir / "model" / "model.json").stat().st_mtime_ns
    out = train_best(load_study("again", second.storage), best_dir)
    assert out == best_dir and (best_dir / "model" / "model.json").stat().st_mtime_ns == stamp
    assert "already trained from trial 1" in capsys.readouterr().err
