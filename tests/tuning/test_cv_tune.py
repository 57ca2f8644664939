"""Cross-validated tuning: a trial is the mean over K folds of train+valid, the study says how
noisy plain validation would be, and --train-best refits on train+valid."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_dataset

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.tuning.space import parse_space
from visiontune.tuning.storage import load_study
from visiontune.tuning.study import TuneSettings, tune

# A frozen tiny_cnn over cached features: a fold trains its head in about a second.
FROZEN = {
    "model": "tiny_cnn",
    "weights": "none",
    "trainable": "head",
    "augment": "none",
    "workers": 0,
    "epochs": 2,
    "batch_size": 4,
    "progress": False,
}
SPACE = {"lr": {"type": "continuous", "min": 0.01, "max": 0.3, "scaling": "log"}}


@pytest.fixture(scope="module")
def small_valid(tmp_path_factory) -> Path:
    """3 classes x (train 6, valid 2, test 2): valid is far too small to tune against."""
    root = tmp_path_factory.mktemp("cv-small") / "data"
    return write_dataset(
        root, classes=("a", "b", "c"), per_class={"train": 6, "valid": 2, "test": 2}
    )


def visiontune(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The real console entry point, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def last_valid(run_dir: Path, key: str) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "valid"][-1][key]


@pytest.mark.parametrize("objective", ["valid_loss", "valid_accuracy"])
def test_a_cv_trial_is_the_mean_of_its_folds(small_valid, objective, capsys):
    fixed = build_config(TrainConfig, None, {"data": str(small_valid), **FROZEN})
    report = objective == "valid_loss"  # one report is enough: each costs seconds
    settings = TuneSettings(
        study=objective, objective=objective, cv=3, max_trials=1, heartbeat=1, report=report
    )
    result = tune(settings, fixed, parse_space(SPACE))
    assert "valid has 6 images (2.0 per class)" in capsys.readouterr().err
    (t,) = load_study(result.study, result.storage).get_trials()
    folds = sorted(Path(t.user_attrs["run_dir"]).glob("fold-*"))
    assert [f.name for f in folds] == ["fold-0", "fold-1", "fold-2"]
    values = t.user_attrs["cv_values"]
    # each fold's value is its last epoch's objective on the images it held out
    metric = objective.removeprefix("valid_")
    assert values == pytest.approx([last_valid(f, metric) for f in folds])
    assert t.value == pytest.approx(statistics.fmean(values))
    assert t.user_attrs["cv_std"] == pytest.approx(statistics.stdev(values))
    assert len(set(values)) > 1 or objective == "valid_accuracy"  # the folds differ
    if not report:
        return
    # the report shows the spread next to the objective
    html = result.report.read_text()
    assert f"{t.value:.4g} ± {t.user_attrs['cv_std']:.2g} over 3 folds" in html
    assert "mean over 3 folds of train+valid" in html


def test_cv_options_that_cannot_work_fail_before_any_trial(small_valid):
    fixed = build_config(TrainConfig, None, {"data": str(small_valid), **FROZEN})
    with pytest.raises(UserError, match="--cv 9 needs at least 9 images of each class"):
        tune(TuneSettings(study="k9", cv=9, heartbeat=1), fixed, parse_space(SPACE))
    with pytest.raises(UserError, match="set by the tuner: use --cv K"):
        tune(
            TuneSettings(study="set", heartbeat=1),
            build_config(
                TrainConfig, None, {"data": str(small_valid), **FROZEN, "cv_folds": 3, "cv_fold": 0}
            ),
            parse_space(SPACE),
        )
    assert not Path("studies/k9/trials").exists() and not Path("studies/set/trials").exists()


CLI = [
    "--space", "space.yaml", "--max-trials", "1", "--epochs", "2", "--batch-size", "4",
    "--set", "model=tiny_cnn", "--weights", "none", "--trainable", "head", "--augment", "none",
    "--workers", "0", "--heartbeat", "1", "--json",
]  # fmt: skip


def test_cli_cv_auto_turns_on_for_a_small_valid_split_and_refits_train_best(
    small_valid, tmp_path, vt_env
):
    (tmp_path / "space.yaml").write_text("lr: {type: continuous, min: 0.01, max: 0.3}\n")
    out = visiontune(
        vt_env, tmp_path, "tune", "--data", str(small_valid), "--study", "auto", "--train-best",
        *CLI,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if line.startswith("valid has")]
    assert said == [
        "valid has 6 images (2.0 per class): accuracy SE ~ 0.12 at 90% accuracy, 0.20 at 50%; "
        "using 5-fold CV on 24 train+valid images instead (--cv 0 turns it off)"
    ]
    summary = json.loads(out.stdout)
    (t,) = load_study("auto", summary["storage"]).get_trials()
    assert len(t.user_attrs["cv_values"]) == 5
    # the final model was refit on train and valid (18 + 6 images) and judged on test
    meta = json.loads((Path(summary["best_run"]) / "model" / "model.json").read_text())
    assert meta["metrics"]["train_images"] == 24 and meta["metrics"]["refit"] is True
    assert meta["metrics"]["best_epoch"] == 2 and "test_accuracy" in meta["metrics"]


@pytest.mark.parametrize(
    ("valid", "cv", "said"),
    [
        (20, "auto", "plain validation objective (--cv K cross-validates)"),
        (2, 0, "plain validation objective (--cv 0)"),
    ],
)
def test_cv_stays_off_for_a_large_valid_split_or_when_turned_off(tmp_path, capsys, valid, cv, said):
    from visiontune.tuning.storage import study_config
    from visiontune.tuning.study import create_study

    data = write_dataset(tmp_path / "data", per_class={"train": 4, "valid": valid, "test": 1})
    fixed = build_config(TrainConfig, None, {"data": str(data), **FROZEN})
    study, _, _ = create_study(TuneSettings(study="off", cv=cv), fixed, parse_space(SPACE))
    lines = capsys.readouterr().err.strip().splitlines()
    # (4 training images a class: the small-data lines come first, see visiontune.smalldata)
    lines = [line for line in lines if not line.startswith("small data")]
    assert len(lines) == 1 and lines[0].startswith(f"valid has {2 * valid} images")
    assert lines[0].endswith(said)
    assert study_config(study)["cv"] == 0  # its trials train one run each
