"""evaluate on the split training used, its table output, Predictor and the Python API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_dataset
from test_train import FAST

from visiontune.config import TrainConfig, build_config
from visiontune.data.splits import export_split_record
from visiontune.evaluate import Predictor, evaluation_split
from visiontune.evaluate import evaluate as run_evaluate
from visiontune.models.artifact import read_meta
from visiontune.train import train

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run on a root of class folders, split with a non-default seed."""
    base = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISIONTUNE_HOME", str(base / "home"))
        data = write_dataset(
            base / "data", classes=("cat", "dog", "owl"), per_class=10, splits=None
        )
        cfg = build_config(
            TrainConfig,
            None,
            {**FAST, "data": str(data), "output": str(base / "run"), "epochs": 1, "split_seed": 3},
        )
        train(cfg)
    return data, base / "run"


def _recorded(run: Path, data: Path, split: str) -> list[str]:
    record = json.loads((run / "split.json").read_text())
    return sorted(str(data / rel) for rels in record["splits"][split].values() for rel in rels)


def test_evaluate_uses_exactly_the_recorded_test_images(trained):
    data, run = trained
    model = run / "model"
    chosen = evaluation_split(read_meta(model), model, str(data), "test")
    assert sorted(path for path, _ in chosen.items) == _recorded(run, data, "test")
    # train copies the record into the model dir, so the model alone knows its split.
    assert chosen.source == f"recorded in {run / 'model' / 'split.json'}"
    metrics = run_evaluate(model, str(data), "test", workers=0, progress=False)
    # The same images as training's own test evaluation, so the same confusions.
    assert (
        metrics["confusion_matrix"]
        == json.loads((run / "evaluation.json").read_text())["confusion_matrix"]
    )
    assert metrics["count"] == len(chosen.items) and metrics["split"] == "test"


def test_a_model_dir_copied_elsewhere_keeps_its_split(trained, tmp_path):
    data, run = trained
    moved = tmp_path / "model"
    shutil.copytree(run / "model", moved)
    (moved / "split.json").unlink()  # as a model dir from before splits were exported
    # Without a record: the seeded split of the training config, the same images.
    chosen = evaluation_split(read_meta(moved), moved, str(data), "val")
    assert sorted(p for p, _ in chosen.items) == _recorded(run, data, "valid")
    assert "split_seed 3" in chosen.source
    # With the record exported into the model dir, that record is used.
    assert export_split_record(run, moved) == moved / "split.json"
    chosen = evaluation_split(read_meta(moved), moved, str(data), "test")
    assert sorted(p for p, _ in chosen.items) == _recorded(run, data, "test")
    assert str(moved / "split.json") in chosen.source


def test_another_dataset_is_not_held_to_the_training_record(trained, tmp_path):
    _, run = trained
    other = write_dataset(
        tmp_path / "other", classes=("cat", "dog", "owl"), per_class=5, splits=None
    )
    chosen = evaluation_split(read_meta(run / "model"), run / "model", str(other), "test")
    assert all(p.startswith(str(other)) for p, _ in chosen.items) and chosen.items


def test_a_held_out_valid_split_is_the_one_training_carved(tmp_path):
    data = write_dataset(
        tmp_path / "d", per_class={"train": 20, "test": 2}, splits=("train", "test")
    )
    meta = {"config": {"data": str(data), "split_seed": 7}}
    from visiontune.data.folder import discover
    from visiontune.data.splits import carve_valid

    expected = carve_valid(discover(str(data)).splits["train"], 7)[1]
    chosen = evaluation_split(meta, tmp_path / "nomodel", str(data), "validation")
    assert chosen.split == "valid" and chosen.items == expected
    assert "held out of train" in chosen.source
    train_items = evaluation_split(meta, tmp_path / "nomodel", str(data), "train").items
    assert not set(train_items) & set(expected) and len(train_items) + len(expected) == 40


def test_cli_table_shows_the_split_source_and_confusions(trained, cli):
    data, run = trained
    code, out, err = cli("evaluate", run / "model", "--data", data)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("test (recorded in ")
    assert "confusion matrix" in out and "true \\ predicted" in out
    assert ("top confusions" in out) != ("no confusions" in out)


def test_evaluate_progress_bar_on_request(trained):
    data, run = trained
    r = subprocess.run(
        [sys.executable, "-m", "visiontune", "evaluate", run / "model", "--data", data, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VISIONTUNE_PROGRESS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "evaluating test" in r.stderr
    assert json.loads(r.stdout)["split"] == "test"  # stdout stays clean JSON


def test_predictor_labels_paths_and_pil_images(trained):
    from PIL import Image

    data, run = trained
    predictor = Predictor(run / "model", device="cpu")
    images = sorted((data / "owl").iterdir())[:2]
    labels = predictor.predict(images)
    assert len(labels) == 2 and set(labels) <= {"cat", "dog", "owl"}
    assert predictor.predict(Image.open(images[0])) == labels[:1]
    probs = predictor.predict_proba(images)
    assert probs.shape == (2, 3) and abs(float(probs.sum(1).min()) - 1) < 1e-4
    top = predictor.top_k(images[:1], k=2)[0]
    assert top[0]["label"] == labels[0] and len(top) == 2


def test_readme_python_example_runs(tmp_path):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert block.startswith("from visiontune import train, evaluate, tune, Predictor, TrainConfig")
    write_dataset(tmp_path / "data")
    (tmp_path / "data" / "test" / "dog" / "dog_2000.jpg").rename(tmp_path / "photo.jpg")
    # The README's example as written, with a tiny model so it runs in seconds.
    fast = ", ".join(f"{k}={v!r}" for k, v in FAST.items())
    script = block.replace("epochs=3", f"epochs=1, {fast}")
    assert script != block
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    accuracy, labels = r.stdout.splitlines()[-2:]
    assert 0.0 <= float(accuracy) <= 1.0
    assert labels in ("['cat']", "['dog']")


def test_import_stays_light_and_api_names_stay_functions():
    code = (
        "import sys, visiontune; light = 'torch' not in sys.modules;"
        "import visiontune.train, visiontune.evaluate;"
        "from visiontune import train, evaluate, tune, Predictor, TrainConfig;"
        "import inspect;"
        "print(light, all(inspect.isfunction(f) for f in (train, evaluate, tune)),"
        " inspect.isclass(Predictor) and inspect.isclass(TrainConfig))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "True", "True"], r.stderr
