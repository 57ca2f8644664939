"""Claiming trials: the budget holds with many workers at once, and no configuration runs twice
(parallel workers, continued studies, small finite spaces)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from visiontune.config import TrainConfig, build_config
from visiontune.tuning.space import parse_space
from visiontune.tuning.storage import (
    FileClaimLock,
    SqlClaimLock,
    claim_lock,
    load_study,
    open_storage,
)
from visiontune.tuning.study import TuneSettings, create_study, tune
from visiontune.tuning.workers import run_worker

TINY = {"model": "tiny_cnn", "weights": "none", "trainable": "all", "workers": 0, "progress": False}
LR = {"lr": {"type": "continuous", "min": 0.003, "max": 0.1, "scaling": "log"}}


def fixed(data: Path, **kw):
    return build_config(TrainConfig, None, {"data": str(data), **TINY, "batch_size": 4, **kw})


def configs(study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials()]


def test_many_workers_never_run_more_trials_than_the_budget(tiny_data):
    """Six workers race for a budget of three, several times over: never a fourth trial."""
    for round_ in range(4):
        name = f"race{round_}"
        _, url, _ = create_study(
            TuneSettings(study=name, max_trials=3, strategy="random", heartbeat=1),
            fixed(tiny_data),
            parse_space(LR),
        )
        start = threading.Barrier(6)
        errors: list[BaseException] = []

        def worker(i: int, name=name, url=url, start=start, errors=errors) -> None:
            try:
                start.wait(timeout=60)
                run_worker(name, url, heartbeat=1, verbose=False, worker=i, objective=_quick)
            except BaseException as e:  # surfaced below: a thread cannot fail the test itself
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        study = load_study(name, url)
        states = [t.state.name for t in study.get_trials()]
        assert states == ["COMPLETE"] * 3, f"round {round_}: {states}"
        assert len(set(configs(study))) == 3


def _quick(trial) -> float:
    """A trial that takes no time: the race is in claiming, not in training."""
    return trial.suggest_float("lr", 0.003, 0.1, log=True)


def test_a_continued_study_draws_new_configurations(tiny_data):
    settings = {"study": "cont", "strategy": "random", "heartbeat": 1, "report": False}
    space = parse_space(LR)
    tune(TuneSettings(max_trials=2, **settings), fixed(tiny_data, epochs=1), space)
    result = tune(TuneSettings(max_trials=4, **settings), fixed(tiny_data, epochs=1), space)
    study = load_study("cont", result.storage)
    assert result.counts == {"COMPLETE": 4}
    assert len(set(configs(study))) == 4, configs(study)


def test_a_small_space_runs_each_point_once_then_says_so(tiny_data, capsys):
    space = parse_space({"batch-size": {"type": "categorical", "values": [2, 4, 8]}})
    settings = {"study": "small", "strategy": "random", "heartbeat": 1, "report": False}
    result = tune(TuneSettings(max_trials=5, **settings), fixed(tiny_data, epochs=1), space)
    study = load_study("small", result.storage)
    assert sorted(t.params["batch_size"] for t in study.get_trials()) == [2, 4, 8]
    err = capsys.readouterr().err
    assert "the space has 3 points" in err
    assert "all 3 points of the space have been tried" in err
    # Continuing asks for nothing new: the space is exhausted, and the study says so again.
    again = tune(TuneSettings(max_trials=5, **settings), fixed(tiny_data, epochs=1), space)
    assert again.counts == {"COMPLETE": 3}
    assert "all 3 points of the space have been tried" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The claim lock: one contract, every implementation


def _exclusion_holds(make_lock, tmp_path: Path) -> None:
    """Threads each hold their own lock object and increment a number in a file: with mutual
    exclusion no increment is lost."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    start = threading.Barrier(4)

    def bump() -> None:
        lock = make_lock()
        start.wait(timeout=60)
        for _ in range(25):
            with lock:
                n = int(counter.read_text())
                counter.write_text(str(n + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert int(counter.read_text()) == 100


def test_file_claim_lock_excludes(tmp_path):
    _exclusion_holds(lambda: FileClaimLock(tmp_path / "journal.log"), tmp_path)


@pytest.mark.integration
def test_postgres_claim_lock_excludes(tmp_path, postgres_url):
    study = _study_in(postgres_url)
    assert isinstance(claim_lock(study), SqlClaimLock)
    _exclusion_holds(lambda: claim_lock(study), tmp_path)


def _study_in(url: str):
    import optuna

    return optuna.create_study(study_name="s", storage=open_storage(url))


def test_journal_and_sqlite_studies_lock_a_file_every_process_sees(tmp_path):
    study = _study_in(str(tmp_path / "journal.log"))
    assert isinstance(claim_lock(study), FileClaimLock)
    _exclusion_holds(lambda: claim_lock(study), tmp_path)
    assert isinstance(claim_lock(_study_in(f"sqlite:///{tmp_path / 'db.sqlite'}")), FileClaimLock)
