"""The split policy (visiontune.data.splits): one home for aliases, ratios, records, hold-outs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from helpers import write_dataset

from visiontune.data.folder import discover
from visiontune.data.splits import (
    canonical_split,
    check_ratios,
    resolve_splits,
    split_ratio_error,
)
from visiontune.errors import UserError


def _record(tmp_path):
    root = write_dataset(tmp_path / "d", classes=("a", "b"), per_class=10, splits=None)
    run = tmp_path / "run"
    run.mkdir()
    index = discover(str(root), record_dir=run)
    return root, run, index


def test_a_record_listing_a_file_under_the_wrong_class_is_refused(tmp_path):
    root, run, _ = _record(tmp_path)
    record = json.loads((run / "split.json").read_text())
    # Swap one file from class a into class b's list: training would learn a wrong label.
    moved = record["splits"]["train"]["a"].pop(0)
    record["splits"]["train"]["b"].append(moved)
    (run / "split.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as e:
        discover(str(root), record_dir=run)
    message = str(e.value)
    assert "\n" not in message
    assert f"{moved} is in a/ but recorded as b" in message
    assert "delete" in message and "split.json" in message


def test_a_file_moved_to_another_class_folder_is_named(tmp_path):
    root, run, _ = _record(tmp_path)
    (root / "a" / "a_0003.jpg").rename(root / "b" / "a_0003.jpg")
    with pytest.raises(UserError, match=r"changed class \(a/a_0003\.jpg moved to b/a_0003\.jpg\)"):
        discover(str(root), record_dir=run)


def test_an_unchanged_record_is_reused_whatever_the_seed(tmp_path):
    root, run, index = _record(tmp_path)
    assert discover(str(root), split_seed=99, record_dir=run).splits == index.splits


def test_valid_is_carved_out_of_train_once_with_one_note(tmp_path, capsys):
    root = write_dataset(
        tmp_path / "d",
        classes=("a", "b"),
        per_class={"train": 20, "test": 2},
        splits=("train", "test"),
    )
    index = discover(str(root))
    splits = resolve_splits(index, seed=4)
    assert (
        capsys.readouterr().err
        == "note: no valid split; holding out 4 training images for validation\n"
    )
    train, valid = splits["train"], splits["valid"]
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(index.splits["train"])
    assert Counter(label for _, label in valid) == {0: 2, 1: 2}  # 10% of each class
    assert splits["test"] == index.splits["test"]
    # Same seed, same hold-out, and a quiet caller (tune's check) prints nothing.
    assert resolve_splits(index, seed=4, announce=False)["valid"] == valid
    assert capsys.readouterr().err == ""
    assert resolve_splits(index, seed=5, announce=False)["valid"] != valid


def test_a_dataset_with_its_own_valid_split_is_used_as_is(image_dataset):
    index = discover(str(image_dataset))
    assert resolve_splits(index, seed=0) == index.splits


def test_split_names_and_ratios_have_one_definition():
    assert [canonical_split(n) for n in ("val", "Validation", "VALID", "test")] == [
        "valid",
        "valid",
        "valid",
        "test",
    ]
    assert check_ratios((0.9, 0.1)) == (0.9, 0.1, 0.0)
    assert split_ratio_error((0.8, 0.1, 0.1)) is None
    for bad in (
        (0.5, 0.1, 0.1),
        (0, 0.5, 0.5),
        (1.2, -0.1, -0.1),
        (1.0,),
        (float("nan"), 0.5, 0.5),
    ):
        assert "adding up to 1" in split_ratio_error(bad)
        with pytest.raises(UserError):
            check_ratios(bad)


def test_the_layout_scan_does_not_pull_in_the_catalog():
    # The catalog uses the scan; the scan must not import the catalog back (no cycle).
    code = (
        "import sys, visiontune.data.layout, visiontune.data.splits;"
        "print('visiontune.data.catalog' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
