"""Tuning across machines: two `visiontune tune worker` processes share a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_two_workers_share_one_study(tiny_data, tmp_path, postgres_url, study_of, vt_env):
    from visiontune.config import TrainConfig, build_config
    from visiontune.tuning.space import parse_space
    from visiontune.tuning.study import TuneSettings, create_study
    from visiontune.tuning.trials import best_summary

    # The study (fixed options + space) lives in the database: workers need name + URL only.
    fixed = build_config(
        TrainConfig,
        None,
        {
            "data": str(tiny_data),
            "model": "tiny_cnn",
            "weights": "none",
            "trainable": "all",
            "workers": 0,
            "epochs": 1,
            "batch_size": 4,
        },
    )
    space = parse_space({"lr": {"type": "continuous", "min": 0.005, "max": 0.05, "scaling": "log"}})
    create_study(TuneSettings(study="shared", storage=postgres_url, max_trials=4), fixed, space)

    cmd = [
        sys.executable,
        "-c",
        "from visiontune.cli import main; main()",
        "tune",
        "worker",
        "--study",
        "shared",
        "--storage",
        postgres_url,
        "--heartbeat",
        "2",
    ]
    workers = []
    for i in range(2):  # separate study dirs, as on separate machines
        (tmp_path / f"m{i}").mkdir()
        workers.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path / f"m{i}",
                env=vt_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]

    study = study_of("shared", postgres_url)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # every trial exactly once
    assert all(t.state.name == "COMPLETE" for t in trials)
    by_machine = {
        i: {p.name for p in (tmp_path / f"m{i}/studies/shared/trials").glob("*")}
        for i in range(2)
        if (tmp_path / f"m{i}/studies/shared/trials").exists()
    }
    assert len(by_machine) == 2 and not (by_machine[0] & by_machine[1])
    assert sorted(by_machine[0] | by_machine[1]) == ["0000", "0001", "0002", "0003"]

    # Both machines see the same best trial.
    bests = []
    for i in range(2):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from visiontune.cli import main; main()",
                "tune",
                "best",
                "shared",
                "--storage",
                postgres_url,
                "--json",
            ],
            cwd=tmp_path / f"m{i}",
            env=vt_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        bests.append(out.stdout)
    assert bests[0] == bests[1]
    assert best_summary(study)["trial"] in range(4)
