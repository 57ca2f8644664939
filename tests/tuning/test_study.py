"""Tuning on tiny data: each strategy, pruning, the report, best/status, and bad input."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.tuning.space import parse_space
from visiontune.tuning.study import TuneSettings, tune

TINY = {"model": "tiny_cnn", "weights": "none", "trainable": "all", "workers": 0, "progress": False}


def fixed(data: Path, **kw):
    return build_config(TrainConfig, None, {"data": str(data), **TINY, **kw})


def run(data, space, **settings):
    fixed_kw = settings.pop("fixed", {})
    s = TuneSettings(heartbeat=1, report=settings.pop("report", False), **settings)
    return tune(s, fixed(data, **fixed_kw), parse_space(space))


def trials_of(result):
    from visiontune.tuning.storage import load_study

    return load_study(result.study, result.storage).get_trials()


@pytest.mark.parametrize("strategy", ["bayesian", "random", "hyperband"])
def test_strategies_run_trials_as_training_runs(tiny_data, strategy):
    space = {
        "lr": {"type": "continuous", "min": 0.003, "max": 0.1, "scaling": "log"},
        "batch-size": {"type": "categorical", "values": [4, 8]},
    }
    result = run(
        tiny_data, space, study=strategy, strategy=strategy, max_trials=3, fixed={"epochs": 2}
    )
    trials = trials_of(result)
    assert len(trials) == 3
    assert sum(result.counts.get(k, 0) for k in ("COMPLETE", "PRUNED")) == 3
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        # each trial is a full training run in its own directory under the study directory
        assert run_dir == (Path("studies") / strategy / "trials" / f"{t.number:04d}").resolve()
        assert (run_dir / "config.yaml").is_file() and (run_dir / "model" / "model.json").is_file()
        assert set(t.intermediate_values) <= {1, 2} and t.intermediate_values
    best = result.best
    assert best is not None and Path(best["model_dir"]).is_dir()
    assert set(best["params"]) == {"lr", "batch_size"}


def test_grid_visits_every_point_once_then_stops(tiny_data):
    space = {
        "batch-size": {"type": "categorical", "values": [4, 8]},
        "optimizer": {"type": "categorical", "values": ["sgd", "adamw"]},
    }
    result = run(
        tiny_data,
        space,
        study="grid",
        strategy="grid",
        max_trials=10,
        fixed={"epochs": 1, "lr": 0.01},
    )
    points = sorted((t.params["batch_size"], t.params["optimizer"]) for t in trials_of(result))
    assert points == [(4, "adamw"), (4, "sgd"), (8, "adamw"), (8, "sgd")]


def test_median_rule_prunes_bad_trials_early(tiny_data):
    # Two learning rates: one learns, one (1e-7) stays at chance; the median rule stops
    # trials that are behind after an epoch once two trials have finished.
    space = {
        "lr": {"type": "categorical", "values": [0.02, 1e-7]},
        "seed": {"type": "integer", "min": 0, "max": 1000},
    }
    result = run(
        tiny_data,
        space,
        study="prune",
        objective="valid_loss",  # named: on this small set the default would be accuracy
        strategy="random",
        early_stopping="auto",
        max_trials=8,
        seed=3,
        fixed={"epochs": 3, "batch_size": 4},
        report=True,
    )
    trials = trials_of(result)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, [(t.params, t.state.name) for t in trials]
    for t in pruned:
        assert t.user_attrs["epochs_run"] < 3
        assert t.user_attrs["pruned_at_epoch"] == t.user_attrs["epochs_run"]
        # pruned because its best objective so far was worse than the median, at that epoch,
        # of the trials that had completed before it (Optuna's MedianPruner)
        k = t.user_attrs["epochs_run"]
        earlier = [
            o.intermediate_values[k]
            for o in trials
            if o.state.name == "COMPLETE" and o.datetime_complete < t.datetime_complete
        ]
        value = min(v for step, v in t.intermediate_values.items() if step <= k)
        assert len(earlier) >= 2 and value > statistics.median(earlier)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert all(t.user_attrs["epochs_run"] == 3 for t in complete)
    assert result.best["params"]["lr"] == 0.02

    # The report: self-contained (plotly inline, nothing fetched), plots and the trial table.
    html = result.report.read_text()
    assert "Optimisation history" in html and "Parallel coordinates" in html
    assert "Parameter importance" in html
    assert "plotly" in html.lower() and len(html) > 1_000_000  # plotly.js is inline
    assert not re.search(r"<(script|link)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert "pruned" in html


def test_bad_input_fails_before_any_trial(tiny_data):
    space = {"batch-size": {"type": "categorical", "values": [4, 64]}}
    with pytest.raises(UserError, match=r"batch size 64 is larger than the training split .*16"):
        run(tiny_data, space, study="big", max_trials=2)
    with pytest.raises(UserError, match=r"unknown objective 'valid_acc' \(did you mean"):
        run(
            tiny_data,
            {"lr": {"type": "continuous", "min": 0.01, "max": 0.1}},
            study="obj",
            objective="valid_acc",
        )
    with pytest.raises(UserError, match=r"cannot (open|use) storage postgresql://") as e:
        run(
            tiny_data,
            {"lr": {"type": "continuous", "min": 0.01, "max": 0.1}},
            study="pg",
            storage="postgresql://u:secret@127.0.0.1:9/none",
            fixed={"batch_size": 4},
        )
    assert "secret" not in str(e.value) and "\n" not in str(e.value)
    assert not Path("studies/big/trials").exists()
    assert not Path("studies/obj/trials").exists()


def test_cli_tune_status_best_report(tiny_data, tmp_path, vt):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.005, max: 0.05, scaling: log}\n")
    args = [
        "tune",
        "--data",
        str(tiny_data),
        "--space",
        str(space),
        "--study",
        "s1",
        "--max-trials",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--set",
        "model=tiny_cnn",
        "--weights",
        "none",
        "--trainable",
        "all",
        "--workers",
        "0",
        "--heartbeat",
        "1",
        "--json",
    ]
    out = vt(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["trials"] == {"COMPLETE": 2}
    assert Path(tmp_path / summary["report"]).is_file()

    # Re-running the same command tops up to --max-trials: nothing runs again.
    again = vt(*args, cwd=tmp_path)
    assert json.loads(again.stdout)["trials"] == {"COMPLETE": 2}
    # ...and a larger budget adds exactly the difference.
    more = vt(*[a if a != "2" else "3" for a in args], cwd=tmp_path)
    assert json.loads(more.stdout)["trials"] == {"COMPLETE": 3}

    best = vt("tune", "best", "s1", "--json", cwd=tmp_path)
    b = json.loads(best.stdout)
    assert set(b["params"]) == {"lr"} and Path(b["model_dir"], "model.json").is_file()
    status = vt("tune", "status", "s1", cwd=tmp_path)
    assert status.returncode == 0 and "complete" in status.stdout and "lr=" in status.stdout
    rep = vt("tune", "report", "s1", "-o", str(tmp_path / "r.html"), cwd=tmp_path)
    assert rep.returncode == 0 and (tmp_path / "r.html").stat().st_size > 1_000_000

    # A changed fixed option is a different study: refuse instead of mixing results.
    changed = vt(*[a if a != "4" else "8" for a in args], cwd=tmp_path)
    assert changed.returncode == 2
    assert changed.stderr.strip().startswith(
        "error: study 's1' already exists with a different fixed: batch_size (4 then, 8 now); "
    )  # which option of dozens changed

    # A new study where trial runs it does not own are (here: its storage was removed) would
    # fail its trial 0, the untuned default, on trials/0000: refused before any trial instead.
    trials = tmp_path / "studies" / "s1" / "trials"
    before = sorted(p.name for p in trials.iterdir())
    (tmp_path / "studies" / "s1" / "journal.log").unlink()
    fresh = vt(*args, cwd=tmp_path)
    assert fresh.returncode == 2 and "Traceback" not in fresh.stderr
    [line] = fresh.stderr.strip().splitlines()
    assert line.startswith(f"error: {Path('studies/s1/trials')} holds 3 trial runs (0000...) ")
    assert line.endswith("choose another --study-dir, or move them away")
    assert sorted(p.name for p in trials.iterdir()) == before

    bad = vt(
        "tune",
        "--data",
        str(tiny_data),
        "--space",
        str(space),
        "--set",
        "lerning_rate=1",
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: unknown config key 'lerning_rate'"]


def test_warm_start_seeds_the_sampler_without_using_the_budget(tiny_data):
    space = {"lr": {"type": "continuous", "min": 0.005, "max": 0.05, "scaling": "log"}}
    first = run(tiny_data, space, study="first", max_trials=2, fixed={"epochs": 1, "batch_size": 4})
    second = run(
        tiny_data,
        space,
        study="second",
        max_trials=1,
        warm_start=[str(first.study_dir)],
        fixed={"epochs": 1, "batch_size": 4},
    )
    assert second.counts == {"WARM_START": 2, "COMPLETE": 1}
    # the best of the new study is a trial it ran (it has a model), not a seed
    assert Path(second.best["model_dir"]).is_dir()


def test_warm_start_seeds_a_continued_study_once(tiny_data):
    space = {"lr": {"type": "continuous", "min": 0.005, "max": 0.05, "scaling": "log"}}
    kw = {"fixed": {"epochs": 1, "batch_size": 4}, "baseline": False}
    first = run(tiny_data, space, study="first", max_trials=2, **kw)
    # A mistyped source is refused before the study exists: the corrected command must not
    # find a study already created, which it would continue without ever seeding it.
    with pytest.raises(UserError, match="--warm-start nosuch: no such study"):
        run(tiny_data, space, study="second", max_trials=1, warm_start=["nosuch"], **kw)
    assert not Path("studies/second/trials").exists()
    with pytest.raises(UserError, match="no study 'second'"):
        trials_of(replace(first, study="second", storage=str(Path("studies/second/journal.log"))))

    started = run(tiny_data, space, study="second", max_trials=1, **kw)
    assert started.counts == {"COMPLETE": 1}
    # --warm-start on the continued study (it was silently ignored): seeded, and only once.
    for _ in range(2):
        second = run(
            tiny_data, space, study="second", max_trials=1, warm_start=[str(first.study_dir)], **kw
        )
        assert second.counts == {"WARM_START": 2, "COMPLETE": 1}
    with pytest.raises(UserError, match="--warm-start second: that is this study itself"):
        run(tiny_data, space, study="second", max_trials=1, warm_start=["second"], **kw)


def test_a_continued_study_takes_the_new_max_retry(tiny_data):
    from visiontune.tuning.storage import load_study, study_config

    space = {"lr": {"type": "continuous", "min": 0.005, "max": 0.05, "scaling": "log"}}
    kw = {"fixed": {"epochs": 1, "batch_size": 4}, "max_trials": 1}
    run(tiny_data, space, study="r", max_retry=2, **kw)
    again = run(tiny_data, space, study="r", max_retry=5, **kw)
    # Workers read the retries of a dead worker's trial from the study: the new value was
    # accepted and ignored.
    assert study_config(load_study("r", again.storage))["max_retry"] == 5


def test_train_best_trains_the_final_model_with_the_best_params(tiny_data):
    import yaml

    from visiontune.tuning.storage import load_study
    from visiontune.tuning.study import train_best

    space = {"lr": {"type": "continuous", "min": 0.003, "max": 0.1, "scaling": "log"}}
    result = run(
        tiny_data, space, study="final", max_trials=2, fixed={"epochs": 1, "batch_size": 4}
    )
    out = train_best(load_study(result.study, result.storage), Path("studies/final/best"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == pytest.approx(result.best["params"]["lr"])
    assert saved["batch_size"] == 4 and saved["model"] == "tiny_cnn"
    assert (out / "model" / "model.json").is_file()


def test_timeout_stops_starting_new_trials(tiny_data):
    space = {"lr": {"type": "continuous", "min": 0.003, "max": 0.1, "scaling": "log"}}
    # The first trial outlasts the timeout, so no second one starts, though the budget is 50.
    result = run(
        tiny_data, space, study="timed", max_trials=50, timeout=0.01,
        fixed={"epochs": 1, "batch_size": 4},
    )  # fmt: skip
    assert len(trials_of(result)) == 1
