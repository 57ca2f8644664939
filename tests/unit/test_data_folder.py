"""Layout discovery, recorded splits, the training dataset, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import write_dataset

from visiontune.data.folder import (
    ImageDataset,
    collate_skip_bad,
    discover,
    display_name,
    split_stratified,
)
from visiontune.errors import UserError


def test_split_folders_with_val_alias_and_numeric_prefixes(tmp_path):
    root = write_dataset(
        tmp_path / "d", classes=("002.Beagle", "001.Affenpinscher"), per_class=2,
        splits=("train", "val"), size=16,
    )  # fmt: skip
    (root / "train" / "002.Beagle" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"junk")
    index = discover(str(root))
    assert index.class_ids == ["001.Affenpinscher", "002.Beagle"]
    assert index.class_names == ["Affenpinscher", "Beagle"]
    assert list(index.splits) == ["train", "valid"]
    assert index.counts() == {"train": [2, 2], "valid": [2, 2]}
    assert index.splits["train"][0] == (
        str(root / "train/001.Affenpinscher/001.Affenpinscher_0000.jpg"),
        0,
    )


def test_display_name_keeps_names_without_prefix():
    assert display_name("001.Affenpinscher") == "Affenpinscher"
    assert display_name("7_cats") == "cats"
    assert display_name("2001") == "2001"
    assert display_name("cat") == "cat"


def test_class_folder_root_is_split_stratified_seeded_and_recorded(tmp_path):
    root = write_dataset(
        tmp_path / "d", classes=("a", "b"), per_class=20, splits=None, size=8, fmt="PNG"
    )
    run = tmp_path / "run"
    index = discover(str(root), record_dir=run)
    assert index.counts() == {"train": [16, 16], "valid": [2, 2], "test": [2, 2]}
    record = json.loads((run / "split.json").read_text())
    assert record["seed"] == 0 and sorted(record["splits"]) == ["test", "train", "valid"]

    # Another seed splits differently; the recorded split is reused whatever the seed says.
    other = discover(str(root), split_seed=1)
    assert other.splits["valid"] != index.splits["valid"]
    again = discover(str(root), split_seed=1, record_dir=run)
    assert again.splits == index.splits

    # Files added after the split was recorded: refuse rather than silently re-split.
    (root / "a" / "new.png").write_bytes((root / "a" / "a_0000.png").read_bytes())
    with pytest.raises(UserError, match="changed since its split was recorded"):
        discover(str(root), record_dir=run)


def test_stratified_split_keeps_every_class_in_every_split():
    files = {"big": [f"big/{i}.jpg" for i in range(50)], "small": ["s/1.jpg", "s/2.jpg", "s/3.jpg"]}
    splits = split_stratified(files, (0.8, 0.1, 0.1), seed=0)
    assert {s: len(c["small"]) for s, c in splits.items()} == {"train": 1, "valid": 1, "test": 1}
    assert {s: len(c["big"]) for s, c in splits.items()} == {"train": 40, "valid": 5, "test": 5}
    with pytest.raises(UserError, match="adding up to 1"):
        split_stratified(files, (0.5, 0.1, 0.1), seed=0)


def test_limit_per_class_is_per_split_and_deterministic(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=6, size=8)
    first = discover(str(root), limit_per_class=4)
    assert first.counts() == {"train": [4, 4], "valid": [4, 4], "test": [4, 4]}
    assert discover(str(root), limit_per_class=4).splits == first.splits


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=2, size=8)
    before = discover(str(root))
    assert before.fingerprint() == discover(str(root)).fingerprint()
    target = root / "valid" / "cat" / os.listdir(root / "valid" / "cat")[0]
    target.write_bytes(target.read_bytes() + b"\0")
    after = discover(str(root))
    assert after.fingerprint() != before.fingerprint()
    assert after.fingerprint("train") == before.fingerprint("train")


def _bad_inputs(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "empty").mkdir()
    (tmp / "file.jpg").write_bytes(b"x")
    write_dataset(tmp / "noclasses", per_class=1, splits=("train",), size=8)
    for f in (tmp / "noclasses" / "train").rglob("*"):
        if f.is_file():
            f.rename(tmp / "noclasses" / "train" / f.name)
    for d in (tmp / "noclasses" / "train").iterdir():
        if d.is_dir():
            d.rmdir()
    write_dataset(tmp / "emptyclass", per_class=1, splits=("train",), size=8)
    (tmp / "emptyclass" / "train" / "horse").mkdir()
    (tmp / "emptyclass" / "train" / "horse" / "readme.txt").write_text("todo")
    write_dataset(tmp / "oneclass", classes=("cat",), per_class=2, splits=None, size=8)
    write_dataset(tmp / "flatimages", classes=("x",), per_class=1, splits=None, size=8)
    (tmp / "flatimages" / "x" / "x_0000.jpg").rename(tmp / "flatimages" / "x.jpg")
    (tmp / "flatimages" / "x").rmdir()
    return {
        "missing": (str(tmp / "nope"), "does not exist"),
        "empty": (str(tmp / "empty"), "is empty"),
        "file": (str(tmp / "file.jpg"), "is a file; expected a dataset folder"),
        "split-no-classes": (str(tmp / "noclasses"), "split train .* has no class folders"),
        "class-no-images": (str(tmp / "emptyclass"), "class 'horse' has no images .*readme.txt"),
        "one-class": (str(tmp / "oneclass"), "only 1 class"),
        "images-no-classes": (str(tmp / "flatimages"), "holds files but no class folders"),
        "unknown-name": ("imagenet-42", "neither an existing path nor a dataset name"),
        "unknown-scheme": ("gs://bucket/data", "unknown URI scheme 'gs'"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "file", "split-no-classes", "class-no-images", "one-class",
     "images-no-classes", "unknown-name", "unknown-scheme"],
)  # fmt: skip
def test_bad_input_is_one_clear_line(tmp_path, case):
    uri, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(UserError, match=message) as e:
        discover(uri)
    assert "\n" not in str(e.value)


def test_dataset_returns_none_for_bad_images_and_collate_drops_them(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=2, splits=("train",), size=16)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    index = discover(str(root))
    ds = ImageDataset(index, "train", lambda im: torch.zeros(3, 8, 8))
    items = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in items) == 1
    images, labels, dropped = collate_skip_bad(items)
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1] and dropped == 1
    empty_images, _empty_labels, all_dropped = collate_skip_bad([None, None])
    assert empty_images.shape[0] == 0 and all_dropped == 2
    with pytest.raises(UserError, match="has no 'test' split"):
        ImageDataset(index, "test", None)


def test_dataset_decodes_large_jpegs_at_reduced_size(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=1, splits=("train",), size=1024)
    index = discover(str(root))
    full = ImageDataset(index, "train", None)[0][0]
    small = ImageDataset(index, "train", None, decode_size=200)[0][0]
    assert full.size == (1024, 1024) and small.size == (256, 256)
