"""Cached augmented views under torchrun: each rank computes its share of the views, and the
views, the cache entries and the training match the one-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_dataset
from safetensors.torch import load_file
from test_torchrun import epochs, one_process, torchrun_train


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    # 24 training images, so 3 views are 72 images: batches of 64, one batch on each rank.
    return write_dataset(
        tmp_path / "data", classes=("a", "b", "c"), per_class={"train": 8, "valid": 4, "test": 4}
    )


def _entries(home: Path) -> dict[str, torch.Tensor]:
    folder = home / "cache" / "features"
    return {p.name: load_file(str(p))["features"] for p in folder.glob("*.safetensors")}


def test_two_processes_compute_the_same_views_as_one(dataset, tmp_path, monkeypatch):
    views = {"augment": "light", "augment_views": 3}
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "one-home"))
    one_process(dataset, tmp_path / "one", **views)
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "two-home"))  # a cold cache: sharded
    p = torchrun_train(dataset, tmp_path / "two", **views)
    assert p.returncode == 0, p.stderr
    assert "3 augmented views (light)" in p.stderr

    one, two = _entries(tmp_path / "one-home"), _entries(tmp_path / "two-home")
    assert len(one) == 3 + 3  # train, valid, test and 3 views, each written once
    assert two.keys() == one.keys()
    for k in one:
        assert torch.allclose(two[k], one[k], atol=1e-5), k
    for g, w in zip(epochs(tmp_path / "two"), epochs(tmp_path / "one"), strict=True):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-4)
        assert g["accuracy"] == pytest.approx(w["accuracy"], abs=1e-4)
