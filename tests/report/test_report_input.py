"""`visiontune report` on what a user points it at: an -o path holding something else, a run
whose files a crash left as garbage. Through the console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def visiontune(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def a_run(root: Path) -> Path:
    """The files an epoch of training leaves: config and metrics (enough for a report)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("data: somewhere\nbatch_size: 8\nepochs: 1\n")
    rows = [
        {"step": 1, "epoch": 1, "split": "train", "train_loss": 0.7, "train_accuracy": 0.5},
        {"step": 1, "epoch": 1, "split": "valid", "valid_loss": 0.6, "valid_accuracy": 0.75},
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_an_output_that_is_not_a_report_is_left_unchanged(tmp_path):
    run = a_run(tmp_path / "run")
    config = (run / "config.yaml").read_text()
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>\n")
    for target, line in (
        # a tab-completed -o that would have replaced the run's own config
        (run / "config.yaml", f"{run / 'config.yaml'} exists and is not a page visiontune wrote"),
        (notes, f"{notes} exists and is not a page visiontune wrote"),
        (run, f"{run} is a directory; give the path of the .html file to write"),
    ):
        out = visiontune("report", str(run), "-o", str(target))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        [said] = out.stderr.strip().splitlines()
        assert said.startswith(f"error: {line}")
    assert (run / "config.yaml").read_text() == config
    assert notes.read_text() == "<p>my notes</p>\n"
    # A report is replaced by the next one, as re-running the command should.
    page = tmp_path / "page.html"
    for _ in range(2):
        out = visiontune("report", str(run), "-o", str(page))
        assert out.returncode == 0 and out.stdout.strip() == str(page), out.stderr


def test_a_metrics_file_with_garbage_bytes_still_gives_a_report(tmp_path):
    run = a_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:  # what a crash mid-write can leave
        f.write(b"\xff\xfe\x00garbage\n")
    out = visiontune("report", str(run))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "0.75" in (run / "report.html").read_text()
