"""Real data: the hymenoptera photos from ../shared and the Debian Fashion-MNIST package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from visiontune.data.catalog import DATASETS
from visiontune.data.check import check_dataset
from visiontune.data.folder import discover

pytestmark = pytest.mark.integration


def test_check_hymenoptera(hymenoptera):
    report = check_dataset(str(hymenoptera))
    assert report.counts == {
        "train": {"ants": 124, "bees": 121},
        "valid": {"ants": 70, "bees": 83},
    }
    assert not [p for p in report.problems if p.kind == "unreadable"]
    # The placeholder GIF is a valid image, so not a problem, but it is pointed out.
    assert report.formats == {"JPEG": 397, "GIF": 1}
    assert any("train/ants/imageNotFound.gif" in n for n in report.notes)


def test_discover_hymenoptera_uses_val_as_valid(hymenoptera):
    index = discover(str(hymenoptera))
    assert index.class_names == ["ants", "bees"]
    assert index.counts() == {"train": [124, 121], "valid": [70, 83]}


FASHION = Path(DATASETS["fashion-mnist"].local_dirs[0])


@pytest.mark.skipif(
    not FASHION.is_dir(), reason=f"Debian package dataset-fashion-mnist absent ({FASHION})"
)
def test_fetch_fashion_mnist_offline_from_the_debian_package(tmp_path, monkeypatch, capsys):
    from visiontune.cli import main

    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "home"))
    dest = tmp_path / "fmnist"
    monkeypatch.setattr(
        sys, "argv",
        ["visiontune", "data", "fetch", "fashion-mnist", "--limit-per-class", "100",
         "--dest", str(dest)],
    )  # fmt: skip
    main()
    assert capsys.readouterr().out.strip() == str(dest)
    index = discover(str(dest))
    assert index.class_names[0] == "T-shirt_top" and index.class_names[9] == "Ankle_boot"
    assert index.counts() == {s: [100] * 10 for s in ("train", "valid", "test")}
    assert not (tmp_path / "home" / "downloads").exists()  # nothing was downloaded
