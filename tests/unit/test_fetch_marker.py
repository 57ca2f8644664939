"""A dataset folder whose completion marker is damaged: one line for ``data fetch`` (the folder
may be the user's), a fresh extraction for an archive visiontune extracted into its own cache."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import make_image

from visiontune.data.catalog import MARKER
from visiontune.uri import extract_archive

ROOT = Path(__file__).resolve().parents[2]


def test_fetch_into_a_folder_with_a_damaged_marker_is_one_line(tmp_path):
    dest = tmp_path / "fashion"
    (dest / "train" / "0.T-shirt_top").mkdir(parents=True)
    (dest / MARKER).write_text('{"dataset": "fashion-mn')  # torn by a copy tool

    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "data", "fetch", "fashion-mnist", "--dest", str(dest)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "VISIONTUNE_HOME": str(tmp_path / "home")},
    )  # fmt: skip

    # Before: a json.JSONDecodeError traceback.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {dest / MARKER} is damaged, so whether {dest} is complete is unknown; "
        f"delete {dest} and fetch again"
    )
    assert (dest / "train" / "0.T-shirt_top").is_dir()  # nothing of the user's removed


def test_an_extraction_with_a_damaged_marker_is_done_again(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for label, name in enumerate(("ant", "bee")):
            picture = tmp_path / f"{name}.png"
            make_image(label, 0).save(picture)
            z.write(picture, f"photos/train/{name}/0.png")
    dest = tmp_path / "extracted"
    root = extract_archive(archive, dest)
    (dest / ".visiontune-complete.json").write_text("\0\0\0")

    assert extract_archive(archive, dest) == root == dest / "photos"
    assert sorted(p.name for p in (root / "train").iterdir()) == ["ant", "bee"]
