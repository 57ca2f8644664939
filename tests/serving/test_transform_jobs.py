"""``visiontune transform`` into an output that already holds answers: a resume continues the
same job (same model, input, TTA and top-k) and anything else is refused, never skipped."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import run_cli

from visiontune.errors import UserError
from visiontune.transform import OUTPUT_FILE, transform


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def folder(path: Path, image_bytes, first: int, count: int = 3) -> Path:
    """``count`` images named like a camera names them, the same names in every folder."""
    path.mkdir(parents=True)
    for i in range(count):
        (path / f"IMG_{i:04d}.jpg").write_bytes(image_bytes(first + i))
    return path


def test_a_second_folder_with_the_same_file_names_is_refused_not_skipped(
    model_dir, tmp_path, image_bytes
):
    monday = folder(tmp_path / "monday", image_bytes, first=0)
    tuesday = folder(tmp_path / "tuesday", image_bytes, first=10)
    out = tmp_path / "predictions"
    transform(model_dir, str(monday), str(out), batch_size=2)
    written = (out / OUTPUT_FILE).read_text()

    # Before, tuesday's images were reported "3 already done" and never predicted: the file
    # kept monday's answers under the names tuesday's photos have.
    proc = run_cli(
        "transform", str(model_dir), "--input", str(tuesday), "--output", str(out), "--no-progress"
    )
    line = one_line_error(proc)
    assert f"images of {monday}, not of {tuesday}" in line and "--overwrite" in line
    assert (out / OUTPUT_FILE).read_text() == written

    redone = transform(model_dir, str(tuesday), str(out), overwrite=True)
    assert (redone.predicted, redone.skipped) == (3, 0)
    records = [json.loads(x) for x in (out / OUTPUT_FILE).read_text().splitlines()]
    assert [r["input"] for r in records] == [str(tuesday)] * 3


def test_the_same_folder_named_another_way_resumes(model_dir, tmp_path, image_bytes):
    photos = folder(tmp_path / "photos", image_bytes, first=0)
    out = tmp_path / "predictions"
    transform(model_dir, str(photos), str(out))
    (photos / "IMG_0003.jpg").write_bytes(image_bytes(3))

    again = transform(model_dir, f"{tmp_path}/x/../photos/", str(out))

    assert (again.predicted, again.skipped) == (1, 3)


def test_another_top_k_is_refused(model_dir, tmp_path, image_bytes):
    photos = folder(tmp_path / "photos", image_bytes, first=0)
    out = tmp_path / "predictions"
    transform(model_dir, str(photos), str(out), top_k=2)
    (photos / "IMG_0003.jpg").write_bytes(image_bytes(3))

    with pytest.raises(
        UserError, match=r"2 predictions per image, this run asks for 1 \(--top-k\)"
    ):
        transform(model_dir, str(photos), str(out), top_k=1)

    records = [json.loads(x) for x in (out / OUTPUT_FILE).read_text().splitlines()]
    assert len(records) == 3  # nothing appended with one answer among lines of two


def test_already_done_counts_only_images_still_in_the_input(model_dir, tmp_path, image_bytes):
    photos = folder(tmp_path / "photos", image_bytes, first=0, count=4)
    out = tmp_path / "predictions"
    transform(model_dir, str(photos), str(out))
    for name in ("IMG_0000.jpg", "IMG_0001.jpg", "IMG_0002.jpg"):
        (photos / name).unlink()
    (photos / "IMG_0009.jpg").write_bytes(image_bytes(9))

    again = transform(model_dir, str(photos), str(out))

    # Before: "4 already done" for a folder of 2 images.
    assert (again.predicted, again.skipped) == (1, 1)


def test_a_second_transform_into_an_output_being_written_is_refused(
    model_dir, tmp_path, image_bytes
):
    import fcntl

    photos = folder(tmp_path / "photos", image_bytes, first=0)
    out = tmp_path / "predictions"
    transform(model_dir, str(photos), str(out))
    written = (out / OUTPUT_FILE).read_text()
    (photos / "IMG_0003.jpg").write_bytes(image_bytes(3))

    # This test process stands for a first transform still running (it holds the output).
    # Before, a second one predicted the same images again, its lines among the first's.
    with open(out / f".{OUTPUT_FILE}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_cli(
            "transform", str(model_dir), "--input", str(photos), "--output", str(out),
            "--overwrite", "--no-progress",
        )  # fmt: skip
        line = one_line_error(proc)
        assert line == (
            f"error: another visiontune transform is writing {out / OUTPUT_FILE}; let it "
            "finish (a rerun then predicts only what it left) or choose another --output"
        )
        assert (out / OUTPUT_FILE).read_text() == written  # not even --overwrite touched it

    again = transform(model_dir, str(photos), str(out))  # released: the rerun goes on
    assert (again.predicted, again.skipped) == (1, 3)
