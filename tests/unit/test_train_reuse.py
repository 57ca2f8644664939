"""Training into a folder that already holds something: a failed start leaves nothing of its
own behind, and a split recorded with other settings is refused instead of silently reused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_TRAIN, run_cli, write_dataset

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.train import train


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    values = {**TINY_TRAIN, "data": str(data), "output": str(out), "epochs": 1, **kw}
    return build_config(TrainConfig, None, values)


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """Class folders with no split folders: training splits them and records the split."""
    return write_dataset(tmp_path / "flat", per_class=8, splits=None)


def test_a_failed_start_in_an_existing_folder_leaves_no_split_for_the_next_run(
    class_folders, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()  # made by hand (or by a job scheduler) before training
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="batch_size 100 is larger"):
        train(cfg_for(class_folders, out, batch_size=100))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the user's file is kept

    # The fixed retry asks for a bigger test split. Before, it read back the failed start's
    # split.json (80/10/10) and tested on 2 images while its config.yaml said 50/25/25.
    train(cfg_for(class_folders, out, split_ratios=(0.5, 0.25, 0.25)))

    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["count"] == 4  # a quarter of each class of 8 (80/10/10 tests on 2)
    assert json.loads((out / "split.json").read_text())["ratios"] == [0.5, 0.25, 0.25]


def test_a_split_recorded_with_other_settings_is_refused_in_one_line(class_folders, tmp_path):
    first = tmp_path / "first"
    train(cfg_for(class_folders, first))
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(first / "split.json", second / "split.json")
    config = tmp_path / "tiny.json"  # JSON is YAML
    config.write_text(json.dumps(TINY_TRAIN))

    proc = run_cli(
        "train", "--config", str(config), "--data", str(class_folders), "--output", str(second),
        "--epochs", "1", "--set", "split_seed=3",
    )  # fmt: skip

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "records a split made with split_seed 0 (this run: 3)" in lines[0]
    assert sorted(p.name for p in second.iterdir()) == ["split.json"]

    # The same settings reuse it: that is how a split is shared on purpose.
    result = train(cfg_for(class_folders, second))
    assert (
        result.test_metrics["count"] == json.loads((first / "evaluation.json").read_text())["count"]
    )


def test_resume_refuses_a_dataset_whose_contents_changed(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=6)
    run = tmp_path / "run"
    train(cfg_for(data, run))
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()

    # A class folder added in every split. Before: a size-mismatch traceback from the head.
    for split in ("train", "valid", "test"):
        shutil.copytree(data / split / "cat", data / split / "fox")
    proc = run_cli("train", "--resume", str(run), "--epochs", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {run} was training on other data: its classes were cat, dog, now cat, dog, "
        "fox; a resumed run keeps its data, so restore it or start a new run (--output)"
    ]

    # Images added to a class. Before: the run resumed quietly over other images.
    for split in ("train", "valid", "test"):
        shutil.rmtree(data / split / "fox")
    shutil.copy(data / "train" / "dog" / "dog_0000.jpg", data / "train" / "dog" / "extra.jpg")
    with pytest.raises(UserError, match="its train split had 12 images, now 13"):
        train(cfg_for(data, run, epochs=2), resume=True)
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert (run / "metrics.jsonl").read_text() == metrics

    (data / "train" / "dog" / "extra.jpg").unlink()  # the data as it was: the resume goes on
    result = train(cfg_for(data, run, epochs=2), resume=True)
    assert result.best_epoch in (1, 2)
    assert len((run / "metrics.jsonl").read_text().splitlines()) > len(metrics.splitlines())


def test_a_run_killed_before_its_first_checkpoint_says_to_delete_it(image_dataset, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(image_dataset, run))
    # What a SIGKILL in the first epoch leaves: the config and some metrics, no checkpoint.
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "model")

    # Before, each of the two commands pointed at the other: "resume it with --resume" and
    # "nothing to resume".
    with pytest.raises(UserError, match="stopped before its first checkpoint") as fresh:
        train(cfg_for(image_dataset, run))
    assert "--resume" not in str(fresh.value) and "delete it to start over" in str(fresh.value)
    proc = run_cli("train", "--resume", str(run))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: nothing to resume: {run}/checkpoints/last.pt does not exist (the run stopped "
        f"before its first checkpoint); delete {run} to start it over"
    ]
    assert (run / "config.yaml").is_file()  # nothing deleted for the user


def test_an_output_inside_the_dataset_is_refused(class_folders, tmp_path):
    # `cd photos && visiontune train --data . -o run1`: before, run1/ became a class without
    # images and every later run on the folder failed until it was removed.
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_TRAIN))
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", "--config", str(config), "--data", ".",
         "--output", "run1", "--epochs", "1"],
        capture_output=True, text=True, timeout=120, cwd=class_folders,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --output run1 is inside the dataset .: the run's folders would read as classes "
        "there; choose an --output outside the dataset"
    ]
    assert sorted(p.name for p in class_folders.iterdir()) == ["cat", "dog"]

    for inside in (class_folders, class_folders / "cat" / "runs" / "a"):
        with pytest.raises(UserError, match="is inside the dataset"):
            train(cfg_for(class_folders, inside))
    assert sorted(p.name for p in class_folders.iterdir()) == ["cat", "dog"]
    assert not (class_folders / "cat" / "runs").exists()
    # Beside it is fine, and so is a sibling whose name starts the same.
    train(cfg_for(class_folders, tmp_path / "flat-run"))


def test_resume_reads_a_config_file_instead_of_ignoring_it(image_dataset, tmp_path, cli):
    run = tmp_path / "run"
    train(cfg_for(image_dataset, run))
    changed = tmp_path / "changed.yaml"
    changed.write_text("epochs: 2\nlr: 0.5\n")

    # Before, --config was not read on --resume: this said the run was finished.
    proc = run_cli("train", "--resume", str(run), "--config", str(changed))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --resume keeps the run's hyperparameters: lr is 0.5 here but 0.01 in "
        f"{run}/config.yaml; start a new run (--output) to change it"
    ]

    longer = tmp_path / "longer.yaml"
    longer.write_text("epochs: 2\n")
    code, _, err = cli("train", "--resume", run, "--config", longer)
    assert code == 0, err
    assert "extending" in err and "from 1 to 2 epochs" in err
    valid = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in valid if r["split"] == "valid"] == [1, 2]


def test_resume_into_another_output_is_refused_and_the_run_kept(image_dataset, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(image_dataset, run))
    weights = (run / "model" / "model.safetensors").read_bytes()
    other = tmp_path / "branch"

    # Before: --output was ignored, and run itself was extended and its model replaced.
    proc = run_cli("train", "--resume", str(run), "--output", str(other), "--epochs", "2")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --resume continues {run} in place; it cannot write to --output {other}. "
        f"Copy the run directory to {other} and resume the copy to keep {run} as it is"
    ]
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    assert not other.exists()


def test_an_output_that_is_a_file_says_so(image_dataset, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    # Before: "error: [Errno 17] File exists: ..." from the catch-all for OS errors.
    with pytest.raises(UserError, match=r"--output .*notes.txt is a file; give a folder"):
        train(cfg_for(image_dataset, notes))
    with pytest.raises(UserError, match=r"cannot create the run directory .*notes.txt/run"):
        train(cfg_for(image_dataset, notes / "run"))
    assert notes.read_text() == "mine"


def test_an_output_holding_what_a_run_writes_is_refused_and_kept(image_dataset, tmp_path):
    # A tuning study's folder: its journal, trials and report.html, but no run markers. Before,
    # `train -o study/` trained there and replaced the study's report with the run's.
    study = tmp_path / "study"
    (study / "trials").mkdir(parents=True)
    (study / "journal.log").write_text("{}\n")
    (study / "report.html").write_text("<html>the study's report</html>")

    proc = run_cli("train", "--data", str(image_dataset), "--model", "tiny_cnn", "--weights",
                   "none", "--epochs", "1", "--workers", "0", "-o", str(study))  # fmt: skip

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {study} holds report.html, which a training run would replace (is it a tuning "
        "study's folder, or another job's?); choose another --output"
    ]
    assert (study / "report.html").read_text() == "<html>the study's report</html>"
    assert sorted(p.name for p in study.iterdir()) == ["journal.log", "report.html", "trials"]


def test_a_second_run_into_an_output_another_process_is_training_in_is_refused(
    image_dataset, tmp_path
):
    # Before: the check for an existing run finds one only once config.yaml is written, after
    # the data, model and feature cache are ready, so a second `train` started meanwhile into
    # the same --output (runs/latest from two terminals) interleaved its checkpoints with the
    # first's. The first run is this test process, holding the run as train() does.
    from visiontune.run import RunDir

    out = tmp_path / "latest"
    args = ("train", "--data", str(image_dataset), "--model", "tiny_cnn", "--weights", "none",
            "--epochs", "1", "--workers", "0", "-o", str(out))  # fmt: skip
    with RunDir.open(str(out)).only_writer():
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: another visiontune process is training in {out}; let it finish, or "
            "choose another --output"
        ]
        assert not out.exists()
    assert run_cli(*args).returncode == 0  # once the first is done, the run starts
    assert (out / "model" / "model.safetensors").is_file()
