"""`visiontune data check`: counts, every kind of problem, JSON and --strict."""

from __future__ import annotations

import io
import json
import sys

import pytest
from helpers import make_image, write_dataset

from visiontune.data.check import check_dataset


@pytest.fixture
def messy(tmp_path):
    root = write_dataset(
        tmp_path / "messy", classes=("cat", "dog", "fox"),
        per_class={"train": 8, "valid": 2, "test": 2}, size=24,
    )  # fmt: skip
    for f in (root / "valid" / "fox").iterdir():
        f.unlink()
    (root / "valid" / "fox").rmdir()  # fox missing from valid
    for f in sorted((root / "train" / "dog").iterdir())[2:]:
        f.unlink()  # train: cat 8+, dog 2 -> imbalanced
    cat = sorted((root / "train" / "cat").iterdir())
    good = cat[0].read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "train" / "cat" / "zero.jpg").write_bytes(b"")
    (root / "train" / "cat" / "copy.jpg").write_bytes(good)  # duplicate within train
    (root / "test" / "dog" / "leak.jpg").write_bytes(cat[1].read_bytes())  # train -> test leak
    buf = io.BytesIO()
    make_image(0, 7, 24).save(buf, "PNG")
    (root / "train" / "fox" / "fox.jpg").write_bytes(buf.getvalue())  # PNG named .jpg
    return root


def test_report_finds_every_problem(messy):
    report = check_dataset(str(messy))
    assert report.counts["train"] == {"cat": 11, "dog": 2, "fox": 9}
    assert report.counts["valid"] == {"cat": 2, "dog": 2}
    assert report.imbalance_ratio["train"] == 5.5
    by_kind: dict[str, list[str]] = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p.message)
    assert sorted(by_kind) == [
        "duplicate", "extension_mismatch", "imbalance", "leakage", "missing_class", "unreadable",
    ]  # fmt: skip
    assert sorted(by_kind["unreadable"]) == [
        "train/cat/truncated.jpg: truncated file",
        "train/cat/zero.jpg: empty file (0 bytes)",
    ]
    assert by_kind["extension_mismatch"] == [
        "train/fox/fox.jpg: the extension says .jpg but the content is PNG"
    ]
    assert by_kind["missing_class"] == ["class 'fox' is missing from split valid"]
    assert "test and train" in by_kind["leakage"][0]
    assert report.image_size["width"] == {"min": 24, "median": 24.0, "mean": 24.0, "max": 24}


def test_clean_dataset_has_no_problems_and_strict_passes(cli, image_dataset, monkeypatch, capsys):
    code, out, _ = cli("data", "check", str(image_dataset), "--strict")
    assert code == 0
    assert "no problems found" in out
    assert check_dataset(str(image_dataset)).ok


def test_cli_json_and_strict_exit_code(cli, messy, monkeypatch, capsys):
    code, out, _ = cli("data", "check", str(messy), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["problem_counts"]["unreadable"] == 2 and data["ok"] is False
    code, out, _ = cli("data", "check", str(messy), "--strict")
    assert code == 1
    assert "train/cat/truncated.jpg: truncated file" in out


def test_cli_bad_path_is_one_line_exit_2(cli, tmp_path, monkeypatch, capsys):
    code, _out, err = cli("data", "check", str(tmp_path / "missing"))
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 'missing'} does not exist"


def test_unreadable_folder_is_reported_not_crashing(tmp_path):
    import os
    import subprocess

    root = write_dataset(tmp_path / "perm", per_class=2, splits=("train",), size=8)
    locked = root / "train" / "cat"
    locked.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(Exception, match="permission denied"):
                check_dataset(str(root))
            return
        # root reads everything: run the CLI as an unprivileged user to see the real error.
        tmp_path.chmod(0o755)
        tmp_path.parent.chmod(0o755)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", "from visiontune.cli import main; main()",
                 "data", "check", str(root)],
                capture_output=True, text=True, user=65534, check=False,
                env={**os.environ, "HOME": "/tmp"},
            )  # fmt: skip
        except PermissionError:
            pytest.skip("running as root and the unprivileged user cannot run this Python")
        if "ModuleNotFoundError" in proc.stderr or "Permission denied: '/" in proc.stderr:
            pytest.skip("running as root and the unprivileged user cannot run this virtualenv")
        assert proc.returncode == 2, proc.stderr
        assert (
            proc.stderr.strip()
            == f"error: permission denied reading {locked}; check its permissions"
        )
    finally:
        locked.chmod(0o755)
