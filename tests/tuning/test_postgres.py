"""Tuning across machines: two `visiontune tune worker` processes share a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg_user(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root: run the server as the package's unprivileged user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL 15 server on 127.0.0.1 (Debian's `postgresql` package)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (apt install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start postgres unprivileged")
    root = Path(tempfile.mkdtemp(prefix="vt-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(
        _as_pg_user(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "tuner", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_pg_user(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {root}",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://tuner@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study(tiny_data, tmp_path, postgres_url, study_of, vt_env):
    from visiontune.config import TrainConfig, build_config
    from visiontune.tuning.space import parse_space
    from visiontune.tuning.study import TuneSettings, best_summary, create_study

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
