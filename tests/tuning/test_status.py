"""`tune status` piped into a file or another program: whole rows, never cut to 80 columns."""

from __future__ import annotations

import json
import subprocess
import sys

from visiontune.config import TrainConfig, build_config
from visiontune.tuning.space import parse_space
from visiontune.tuning.study import TuneSettings, create_study
from visiontune.tuning.trials import fmt_params

SPACE = {
    "lr": {"type": "continuous", "min": 0.001, "max": 0.1, "scaling": "log"},
    "weight_decay": {"type": "continuous", "min": 1e-6, "max": 1e-2, "scaling": "log"},
    "label_smoothing": {"type": "continuous", "min": 0.0, "max": 0.2},
    "optimizer": {"type": "categorical", "values": ["sgd", "adamw"]},
}
NOTE = "out of memory: tried to allocate 2.00 GiB on a device with 1.5 GiB free"


def test_status_piped_prints_whole_rows_and_json(tiny_data, tmp_path, vt_env):
    import optuna

    space = parse_space(SPACE)
    fixed = build_config(
        TrainConfig, None, {"data": str(tiny_data), "model": "tiny_cnn", "batch_size": 4}
    )
    study, _, _ = create_study(TuneSettings(study="wide"), fixed, space)
    params = {"lr": 0.0123456, "weight_decay": 0.000123456, "label_smoothing": 0.1234567}
    params["optimizer"] = "adamw"
    # Finished trials written straight into the study: this is about printing, not training.
    study.add_trial(
        optuna.trial.create_trial(
            params=params, distributions=space.distributions(), value=0.25,
            user_attrs={"fail_reason": NOTE},
        )
    )  # fmt: skip

    def status(*extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "visiontune", "tune", "status", "wide", *extra],
            cwd=tmp_path, env=vt_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = status()
    rows = [line for line in table.splitlines() if fmt_params(params) in line]
    assert len(rows) == 1, table
    row = rows[0]
    assert NOTE in row and "0.25" in row  # the whole row on one line, nothing cut
    assert "…" not in table and len(row) > 80

    rows = json.loads(status("--json"))
    assert [(r["number"], r["state"], r["params"], r["fail_reason"]) for r in rows] == [
        (0, "COMPLETE", params, NOTE)
    ]
