"""Bad input to `visiontune tune` and `tune worker`: a space file that is no YAML text or
asks for what it cannot get, a --storage that names no storage, a study name that names no
directory, data changed under a continued study, worker timings out of range. Each is refused
in one line before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY


def tune_with_storage(vt, tiny_data, tmp_path, storage: str):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.001, max: 0.1, scaling: log}\n")
    return vt(
        "tune", "--data", str(tiny_data), "--space", str(space), "--max-trials", "1",
        "--epochs", "1", *TINY, "--storage", storage, cwd=tmp_path,
    )  # fmt: skip


def one_error_line(out) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()
    return line


def test_a_file_that_is_not_a_journal_is_refused_and_left_unchanged(tiny_data, tmp_path, vt):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = tune_with_storage(vt, tiny_data, tmp_path, str(notes))
    # Optuna's journal backend appended the study's first entry to the file, then failed.
    assert notes.read_text() == "my notes\n"
    assert one_error_line(out) == (
        f"error: cannot open storage {notes}: it is not an Optuna journal (left unchanged); "
        "give a study's journal.log, a path that does not exist yet, or a postgresql:// URL"
    )


def test_a_url_of_no_storage_is_refused_not_taken_for_a_local_file(tiny_data, tmp_path, vt):
    # A mistyped scheme ran the whole study in ./postgressql:/tuner@db/studies, a local journal
    # no worker on another machine would ever join.
    out = tune_with_storage(vt, tiny_data, tmp_path, "postgressql://tuner:secret@db/studies")
    assert one_error_line(out) == (
        "error: storage postgressql://tuner:***@db/studies: unknown scheme postgressql://; "
        "give postgresql://..., mysql://..., sqlite:///FILE or a journal file path"
    )
    assert not (tmp_path / "postgressql:").exists() and not (tmp_path / "studies").exists()


def test_a_space_file_that_is_not_text_is_one_error_line(tiny_data, tmp_path, vt):
    image = next((tiny_data / "train" / "cat").iterdir())  # --space given a JPEG by mistake
    out = vt("tune", "--data", str(tiny_data), "--space", str(image), *TINY, cwd=tmp_path)
    assert one_error_line(out) == f"error: space file {image} is not a YAML text file (not UTF-8)"


def test_log_scaling_of_an_integer_range_is_refused_not_ignored(tiny_data, tmp_path, vt):
    space = tmp_path / "space.yaml"
    space.write_text("epochs: {type: integer, min: 1, max: 64, scaling: log}\n")
    out = vt("tune", "--data", str(tiny_data), "--space", str(space), *TINY, cwd=tmp_path)
    assert one_error_line(out) == (
        "error: space: epochs is an integer range: log scaling is not supported; use linear"
    )
    assert not (tmp_path / "studies").exists()


def test_continuing_a_study_on_changed_data_is_refused(tiny_data, tmp_path, vt):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)  # the session's dataset stays as it is
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.001, max: 0.1, scaling: log}\n")
    args = ["tune", "--data", str(data), "--space", str(space), "--epochs", "1", *TINY,
            "--set", "max_steps_per_epoch=1", "--study", "s", "--json"]  # fmt: skip
    first = vt(*args, "--max-trials", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # An image added at the same path: the next trials would be ranked against trial 0 on
    # other images. Continued silently before.
    extra = next((data / "valid" / "cat").iterdir())
    shutil.copy(extra, extra.with_name("added.jpg"))
    more = vt(*args, "--max-trials", "2", cwd=tmp_path)
    assert one_error_line(more) == (
        f"error: the data at {data} changed since study 's' started (32 images then, 33 now): "
        "its trials would be compared on different images; continue it with the data as it "
        "was, or start a new one with --study NAME"
    )
    status = json.loads(vt("tune", "status", "s", "--json", cwd=tmp_path).stdout)
    assert [t["state"] for t in status] == ["COMPLETE"]


@pytest.mark.parametrize(
    ("option", "line"),
    [
        # Every running trial of the other workers would be stale to it: failed and queued
        # again while they still train it.
        (["--heartbeat", "0"], "error: --heartbeat must be at least 1 second, got 0"),
        (["--timeout", "-1"], "error: --timeout must be more than 0 seconds, got -1.0"),
    ],
)
def test_a_worker_refuses_a_heartbeat_or_timeout_out_of_range(tmp_path, vt, option, line):
    journal = tmp_path / "journal.log"
    out = vt("tune", "worker", "--study", "s", "--storage", str(journal), *option, cwd=tmp_path)
    assert one_error_line(out) == line


@pytest.mark.parametrize("name", ["", "../elsewhere"])
def test_a_study_name_that_is_no_directory_name_is_refused(tiny_data, tmp_path, vt, name):
    # "" made studies/ itself the study's directory; ../elsewhere put it outside studies/.
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.001, max: 0.1, scaling: log}\n")
    work = tmp_path / "work"
    work.mkdir()
    args = ["--data", str(tiny_data), "--space", str(space), *TINY, "--study", name]
    out = vt("tune", *args, cwd=work)
    assert one_error_line(out) == (
        f"error: study name {name!r} cannot name its directory under studies/: use letters, "
        "digits, - or _, or give --study-dir DIR"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "work"]
    assert not any(work.iterdir())


def test_a_mistyped_storage_path_creates_nothing(tmp_path, vt):
    # status, best, report and worker read a study: a journal (and its folders) was created
    # for the mistyped path before the study was found missing.
    journal = tmp_path / "stdies" / "s" / "journal.log"
    out = vt("tune", "status", "s", "--storage", str(journal), cwd=tmp_path)
    assert one_error_line(out) == f"error: no study 's': {journal} does not exist"
    assert not (tmp_path / "stdies").exists()
