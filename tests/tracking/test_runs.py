"""`visiontune runs list` / `runs compare` on three real (tiny) runs, local and on S3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from visiontune.tracking.runs import RUNNING_WINDOW_S, summarize_run


def test_list_shows_each_run_with_its_values_and_status(three_runs, cli):
    code, out, err = cli("runs", "list", three_runs, "--json")
    assert code == 0, err
    runs = {r["name"]: r for r in json.loads(out)}
    assert set(runs) == {"finished", "stopped", "killed"}
    finished, stopped, killed = runs["finished"], runs["stopped"], runs["killed"]
    assert finished["status"] == "finished"
    assert (finished["epochs_done"], finished["epochs_total"]) == (2, 2)
    assert finished["model"] == "tiny_cnn" and finished["trainable"] == "all"
    assert finished["params"]["lr"] == 0.01 and stopped["params"]["lr"] == 0.05
    assert finished["test_split"] == "test" and finished["test_accuracy"] == 1.0
    assert finished["monitor"] == "valid_loss" and finished["best_epoch"] in (1, 2)
    metrics = [
        json.loads(x) for x in (three_runs / "finished/metrics.jsonl").read_text().splitlines()
    ]
    best_loss = min(m["loss"] for m in metrics if m["split"] == "valid")
    assert finished["best_value"] == pytest.approx(best_loss)
    assert finished["train_time_s"] > 0
    # Stopped by the pruner after epoch 1: a model, but not every epoch.
    assert stopped["status"] == "stopped" and stopped["epochs_done"] == 1
    # Killed after epoch 1: a checkpoint and fresh metrics, no model, no test accuracy.
    assert killed["status"] == "running"
    assert killed["epochs_done"] == 1 and killed["test_accuracy"] is None


def test_an_abandoned_run_is_stopped_once_its_files_are_old(three_runs):
    later = time.time() + RUNNING_WINDOW_S + 60
    assert summarize_run(str(three_runs / "killed"), now=later).status == "stopped"
    assert summarize_run(str(three_runs / "finished"), now=later).status == "finished"


def test_list_table_names_every_run(three_runs, cli):
    code, out, _ = cli("runs", "list", three_runs)
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "running" in lines["killed"] and "finished" in lines["finished"]
    assert "1.0000" in lines["finished"] and "lr=0.01" in lines["finished"]


def test_list_of_a_missing_folder_is_one_line(tmp_path, cli):
    code, _, err = cli("runs", "list", tmp_path / "nope")
    assert code != 0
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1


def test_compare_shows_differences_and_writes_overlaid_curves(three_runs, tmp_path, cli):
    page = tmp_path / "cmp.html"
    code, out, err = cli(
        "runs", "compare", three_runs / "finished", three_runs / "killed", "--html", page,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["config_differences"]["lr"] == [0.01, 0.02]
    assert "output" not in result["config_differences"]
    assert [r["status"] for r in result["runs"]] == ["finished", "running"]
    assert [len(r["history"]) for r in result["runs"]] == [2, 1]
    html = page.read_text()
    # plotly.js itself is in the page: no <script src=...> to fetch from a CDN.
    assert "plotly.js v" in html and "<script src" not in html
    assert '"name":"finished"' in html and '"name":"killed"' in html
    code, out, _ = cli("runs", "compare", three_runs / "finished", three_runs / "stopped",
                       "--html", page)  # fmt: skip
    assert code == 0
    assert "config differences" in out and "0.05" in out and "stopped" in out


def test_compare_refuses_a_folder_that_is_not_a_run(three_runs, tmp_path, cli):
    code, _, err = cli("runs", "compare", three_runs / "finished", tmp_path)
    assert code != 0 and "is not a run directory" in err


@pytest.mark.integration
def test_list_and_compare_runs_on_s3(three_runs, s3_env, tmp_path, cli):
    import boto3

    from visiontune.uri import upload_tree

    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint_url)
    s3.create_bucket(Bucket="runs")
    for name in ("finished", "killed"):
        upload_tree(three_runs / name, f"s3://runs/team/{name}", s3_env.endpoint_url)
    code, out, err = cli(
        "runs", "list", "s3://runs/team", "--endpoint-url", s3_env.endpoint_url, "--json"
    )
    assert code == 0, err
    runs = {r["name"]: r for r in json.loads(out)}
    assert runs["finished"]["status"] == "finished" and runs["finished"]["test_accuracy"] == 1.0
    assert runs["killed"]["status"] == "running"
    code, out, err = cli(
        "runs", "compare", "s3://runs/team/finished", "s3://runs/team/killed",
        "--endpoint-url", s3_env.endpoint_url, "--html", tmp_path / "c.html", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["config_differences"]["lr"] == [0.01, 0.02]


def _visiontune(*args) -> subprocess.CompletedProcess:
    """The real console entry point, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_one_unreadable_run_does_not_hide_the_others(three_runs, tmp_path):
    # A config.yaml that is not YAML made `runs list` a traceback listing nothing at all.
    root = tmp_path / "runs"
    shutil.copytree(three_runs / "finished", root / "good")
    for name, rel, text in (
        ("broken", "config.yaml", "{model: tiny_cnn"),
        ("listy", "config.yaml", "- lr\n- epochs\n"),
        ("badeval", "evaluation.json", '{"accuracy": 0.9'),
    ):
        shutil.copytree(three_runs / "finished", root / name)
        (root / name / rel).write_text(text)
    proc = _visiontune("runs", "list", root, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["name"] for r in json.loads(proc.stdout)] == ["good"]
    assert "Traceback" not in proc.stderr
    warnings = sorted(proc.stderr.strip().splitlines())
    assert len(warnings) == 3 and all(w.startswith("warning: left out: ") for w in warnings)
    assert "badeval/evaluation.json is not valid JSON" in warnings[0]
    assert "broken/config.yaml is not valid YAML" in warnings[1]
    assert "listy/config.yaml is not a run's config" in warnings[2]
    proc = _visiontune("runs", "compare", root / "good", root / "broken", "--html",
                       tmp_path / "c.html")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {root / 'broken'}/config.yaml is not valid YAML (while parsing a flow mapping)"
    )
