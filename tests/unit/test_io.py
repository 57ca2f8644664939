"""File helpers: writes that never leave half a file, and a full disk that is one line."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest
import torch

from visiontune.errors import UserError
from visiontune.io import atomic_write_text, write_safetensors


def _limit_file_size():
    # A file-size limit fails writes with EFBIG, as a full disk fails them with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_safetensors_write_on_a_full_disk_is_one_user_error(tmp_path):
    code = (
        "import torch\n"
        "from visiontune.io import write_safetensors\n"
        f"write_safetensors({str(tmp_path / 'w.safetensors')!r}, {{'w': torch.zeros(100000)}})\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert p.returncode != 0
    assert "UserError: cannot write" in p.stderr and "File too large" in p.stderr
    assert not list(tmp_path.iterdir())  # no half-written file, no temporary left behind


def test_training_on_a_full_disk_ends_in_one_line(image_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(image_dataset), "--output", str(out), "--model", "tiny_cnn",
            "--weights", "none", "--trainable", "all", "--epochs", "1", "--batch-size", "8",
            "--workers", "0"]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", *args],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_limit_file_size,
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "File too large" in last


def test_small_writes_still_work_and_are_atomic(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    write_safetensors(tmp_path / "t.safetensors", {"x": torch.ones(3)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        write_safetensors(tmp_path / "file" / "t.safetensors", {"x": torch.ones(1)})


def test_read_parquet_over_a_python_file_lets_the_process_exit_cleanly(tmp_path):
    # pyarrow's read_table on an fsspec file frees its read-ahead buffers on an Arrow I/O thread;
    # a process exiting then aborted ("terminate called without an active exception") in about
    # half the runs of `visiontune debug RUN` (a CI failure). Each run here is a fresh process.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": list(range(1000)), "b": [str(i) for i in range(1000)]}), path)
    code = (
        "import fsspec, pyarrow as pa\n"
        "from visiontune.io import read_parquet\n"
        "schema = pa.schema([('b', pa.string()), ('a', pa.int64()), ('c', pa.float64())])\n"
        f"with fsspec.filesystem('file').open({str(path)!r}, 'rb') as f:\n"
        "    t = read_parquet(f, schema)\n"
        "print(t.num_rows, t.column_names, t['c'].null_count, flush=True)\n"
        "rows = read_parquet(fsspec.filesystem('file').open(%r, 'rb')).to_pylist()\n" % str(path)
    )
    for _ in range(10):
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr[-1000:]
        assert proc.stdout.split() == ["1000", "['b',", "'a',", "'c']", "1000"]
