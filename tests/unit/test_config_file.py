"""``--config FILE`` mistakes: a file that is not text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import make_image


ROOT = Path(__file__).resolve().parents[2]


def test_an_image_given_as_config_is_one_line(tmp_path):
    photo = tmp_path / "photo.jpg"
    make_image(0, 0).save(photo, "JPEG")

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "visiontune",
            "train",
            "--config",
            str(photo),
            "--data",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    # Before: a UnicodeDecodeError traceback.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: config file {photo} is not a YAML text file"
