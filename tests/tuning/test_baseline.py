"""A study's first trial is the untuned default, and the study keeps it unless a trial beats
it by more than the objective's noise (visiontune.tuning.baseline)."""

from __future__ import annotations

import html
import json

import optuna
import pytest
from helpers import write_dataset
from test_cv_tune import FROZEN as CV_FROZEN

from visiontune.config import TrainConfig, build_config
from visiontune.tuning._base import ATTR, BASELINE, CV_VALUES
from visiontune.tuning.baseline import choose
from visiontune.tuning.space import parse_space
from visiontune.tuning.storage import load_study
from visiontune.tuning.study import TuneSettings, tune
from visiontune.tuning.trials import best_summary, best_trial

LR = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)


def study_of(objective: str, trials: list[tuple[float, list[float] | None, bool]], **stored):
    """An in-memory study of finished trials ``(value, fold values, is the baseline)``."""
    direction = "minimize" if objective.endswith("loss") else "maximize"
    study = optuna.create_study(direction=direction)
    study.set_user_attr(ATTR, {"objective": objective, **stored})
    for i, (value, folds, base) in enumerate(trials):
        attrs = {BASELINE: True} if base else {}
        if folds is not None:
            attrs[CV_VALUES] = folds
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 0.01 * (i + 1)},
                distributions={"lr": LR},
                value=value,
                user_attrs=attrs,
            )
        )
    return study


def selection_note(study):
    return choose(study)[1]


def mean(xs):
    return sum(xs) / len(xs)


def test_a_cv_gain_within_the_fold_noise_keeps_the_default():
    base = [0.80, 0.90, 0.85, 0.90, 0.80]
    lucky = [0.85, 0.90, 0.85, 0.90, 0.80]  # one fold better by one image
    study = study_of("valid_accuracy", [(mean(base), base, True), (mean(lucky), lucky, False)])
    assert best_trial(study).number == 0
    assert "within its noise" in selection_note(study) and "default is kept" in selection_note(
        study
    )
    summary = best_summary(study)
    assert summary["trial"] == 0 and summary["baseline"] is True


def test_a_gain_in_every_fold_replaces_the_default():
    base = [0.80, 0.90, 0.85, 0.90, 0.80]
    better = [x + 0.1 for x in base]
    study = study_of("valid_accuracy", [(mean(base), base, True), (mean(better), better, False)])
    assert best_trial(study).number == 1
    assert "trial 1 is chosen" in selection_note(study)


def test_losses_are_compared_the_right_way_round():
    base = [0.50, 0.60, 0.55, 0.52, 0.58]
    lower = [x - 0.2 for x in base]
    study = study_of("valid_loss", [(mean(base), base, True), (mean(lower), lower, False)])
    assert best_trial(study).number == 1
    higher = [x + 0.2 for x in base]
    study = study_of("valid_loss", [(mean(base), base, True), (mean(higher), higher, False)])
    assert best_trial(study).number == 0 and "is the best trial" in selection_note(study)


@pytest.mark.parametrize(("valid_images", "chosen"), [(20, 0), (5000, 1)])
def test_plain_validation_weighs_accuracy_by_the_size_of_valid(valid_images, chosen):
    # 0.80 -> 0.85 is one image in 20 (noise ~0.12), but 250 images in 5000 (noise ~0.008)
    study = study_of(
        "valid_accuracy", [(0.80, None, True), (0.85, None, False)], valid_images=valid_images
    )
    assert best_trial(study).number == chosen


def test_a_tie_at_the_top_keeps_the_default():
    folds = [1.0, 1.0, 0.75, 1.0, 1.0]
    study = study_of("valid_accuracy", [(mean(folds), folds, True), (mean(folds), folds, False)])
    assert best_trial(study).number == 0
    assert (
        selection_note(study) == "trial 1 ties the untuned default (trial 0): the default is kept"
    )


def test_without_a_baseline_or_a_noise_estimate_the_top_trial_is_chosen():
    study = study_of("valid_accuracy", [(0.80, None, False), (0.85, None, False)])
    assert best_trial(study).number == 1 and selection_note(study) is None
    study = study_of("valid_loss", [(0.5, None, True), (0.4, None, False)])  # no noise known
    assert best_trial(study).number == 1


FROZEN = {**CV_FROZEN, "lr": 0.05}  # a frozen tiny_cnn on cached features, lr named


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline") / "data"
    return write_dataset(root, classes=("a", "b"), per_class={"train": 6, "valid": 2, "test": 2})


def test_a_new_study_runs_the_untuned_default_first(small, capsys):
    fixed = build_config(TrainConfig, None, {"data": str(small), **FROZEN})
    space = parse_space({"lr": {"type": "continuous", "min": 0.01, "max": 0.3, "scaling": "log"}})
    result = tune(TuneSettings(study="b", max_trials=3, heartbeat=1), fixed, space)
    err = capsys.readouterr().err
    # (6 images a class: small data puts head [linear, probe] in the space; linear is default)
    assert "trial 0 is the untuned default (lr=0.05 head=linear)" in err
    # no objective named, on small data: accuracy, not the loss that favours overconfidence
    assert "small data: the objective is valid_accuracy" in err
    assert load_study(result.study, result.storage).user_attrs[ATTR]["objective"] == (
        "valid_accuracy"
    )
    trials = load_study(result.study, result.storage).get_trials()
    assert len(trials) == 3
    assert trials[0].params == {"lr": 0.05, "head": "linear"}
    assert trials[0].user_attrs[BASELINE] is True
    assert not any(t.user_attrs.get(BASELINE) for t in trials[1:])
    # the study names its choice, and says how the default was weighed (cross-validated here)
    assert result.best["trial"] == best_trial(load_study(result.study, result.storage)).number
    note = best_summary(load_study(result.study, result.storage))["selection"]
    assert note and note in err  # said at the end of the study...
    assert html.escape(note) in result.report.read_text()  # ...and in its report
    # continued, the study does not run the default again
    tune(TuneSettings(study="b", max_trials=4, heartbeat=1, report=False), fixed, space)
    trials = load_study(result.study, result.storage).get_trials()
    assert sum(bool(t.user_attrs.get(BASELINE)) for t in trials) == 1


def test_a_default_outside_the_space_is_said_and_not_run(small, capsys):
    fixed = build_config(TrainConfig, None, {"data": str(small), **FROZEN})
    space = parse_space({"lr": {"type": "continuous", "min": 0.1, "max": 0.3}})
    result = tune(TuneSettings(study="out", max_trials=1, heartbeat=1, report=False), fixed, space)
    assert (
        "no baseline trial: the default lr=0.05 lies outside the space" in capsys.readouterr().err
    )
    (t,) = load_study(result.study, result.storage).get_trials()
    assert BASELINE not in t.user_attrs and 0.1 <= t.params["lr"] <= 0.3


def test_tune_best_json_shows_the_choice(small, vt, tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {type: continuous, min: 0.01, max: 0.3}\n")
    args = ["--data", str(small), "--study", "cli", "--space", "space.yaml", "--max-trials", "2",
            "--epochs", "2", "--batch-size", "4", "--set", "model=tiny_cnn", "--weights", "none",
            "--trainable", "head", "--augment", "none", "--workers", "0", "--lr", "0.05",
            "--heartbeat", "1"]  # fmt: skip
    out = vt("tune", *args)
    assert out.returncode == 0, out.stderr
    assert "trial 0 is the untuned default (lr=0.05 head=linear)" in out.stderr
    best = vt("tune", "best", "cli", "--json")
    assert best.returncode == 0, best.stderr
    summary = json.loads(best.stdout)
    assert summary["baseline"] == (summary["trial"] == 0)
    assert summary["selection"]
    said = vt("tune", "best", "cli")
    assert said.returncode == 0 and summary["selection"] in said.stdout
    off = vt("tune", *args[:3], "nobase", *args[4:7], "1", *args[8:], "--no-baseline")
    assert off.returncode == 0, off.stderr
    assert "untuned default" not in off.stderr


def test_the_baseline_is_what_train_would_use_small_data_defaults_included(small):
    from visiontune import smalldata
    from visiontune.tuning.baseline import untuned_default

    given = build_config(
        TrainConfig, None, {"data": str(small), "model": "tiny_cnn", "weights": "none",
                            "trainable": "head", "augment": "none", "workers": 0},
    )  # fmt: skip
    space = parse_space(
        {
            "label_smoothing": {"type": "continuous", "min": 0.0, "max": 0.2},
            "epochs": {"type": "integer", "min": 1, "max": 100},
        }
    )
    n_train, classes = smalldata.training_size(given)
    # the study's fixed options leave tuned parameters alone; `train` would not
    fixed, _ = smalldata.apply(given, n_train, classes, tuned=space.names)
    assert fixed.label_smoothing == 0.0
    trained, _ = smalldata.apply(given, n_train, classes)
    assert trained.label_smoothing == 0.1 and trained.epochs != given.epochs
    stored = untuned_default(given, space, n_train, classes)
    assert stored == {"params": {"label_smoothing": 0.1, "epochs": trained.epochs}}
