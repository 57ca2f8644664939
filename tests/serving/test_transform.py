"""``visiontune transform``: one line per image, errors recorded, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from visiontune.cli import app
from visiontune.transform import OUTPUT_FILE, transform


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_transform_records_errors_and_resumes_where_it_stopped(
    model_dir, tmp_path, image_bytes, classes
):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    for i in range(5):
        (images / f"img{i}.jpg").write_bytes(image_bytes(i))
    (images / "sub" / "deep.png").write_bytes(image_bytes(9, fmt="PNG"))
    (images / "broken.jpg").write_bytes(image_bytes(1)[:200])
    (images / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"

    first = transform(model_dir, str(images), str(out), batch_size=3, top_k=2)
    assert (first.predicted, first.errors, first.skipped) == (6, 1, 0)
    records = {r["image"]: r for r in lines(out / OUTPUT_FILE)}
    assert set(records) == {f"img{i}.jpg" for i in range(5)} | {"sub/deep.png", "broken.jpg"}
    assert "truncated" in records["broken.jpg"]["error"]
    top = records["sub/deep.png"]["predictions"]
    assert len(top) == 2 and top[0]["label"] in classes

    # A kill mid-write leaves a torn last line; new images arrive meanwhile.
    with open(out / OUTPUT_FILE, "a") as f:
        f.write('{"image": "img9.jpg", "predic')
    (images / "img9.jpg").write_bytes(image_bytes(9))
    (images / "img10.jpg").write_bytes(image_bytes(10))

    result = CliRunner().invoke(
        app,
        [
            "transform",
            str(model_dir),
            "--input",
            str(images),
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--top-k",
            "2",  # as the first run: a resume with another --top-k is refused
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 predicted, 0 errors, 7 already done" in result.output
    final = lines(out / OUTPUT_FILE)
    names = [r["image"] for r in final]
    assert len(names) == len(set(names)) == 9
    # The earlier answers are kept as they were, not recomputed.
    assert {r["image"]: r for r in final}["sub/deep.png"] == records["sub/deep.png"]


def test_transform_missing_input_is_one_line(model_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "transform",
            str(model_dir),
            "--input",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)


def test_transform_shows_progress_in_images(model_dir, tmp_path, image_bytes, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(5):
        (images / f"img{i}.jpg").write_bytes(image_bytes(i))
    transform(model_dir, str(images), str(tmp_path / "out"), batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "transform" in err and "5/5 images" in err
    transform(model_dir, str(images), str(tmp_path / "quiet"), batch_size=2)
    assert capsys.readouterr().err == ""  # the Python API is quiet unless asked
