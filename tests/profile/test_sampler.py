"""The system sampler: rows on disk while the run lives, children counted, thread stopped."""

from __future__ import annotations

import subprocess
import sys

from helpers import wait_for

from visiontune.profile.sampler import SystemSampler
from visiontune.profile.store import SeriesWriter, read_series


def test_samples_reach_disk_while_running_and_children_are_counted(tmp_path):
    folder = tmp_path / "system"
    sampler = SystemSampler(folder, interval=0.1, flush_seconds=0.2)
    # A busy child stands in for a DataLoader worker.
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sampler.start()
        # Readable before stop: what a SIGKILLed run leaves behind.
        table = wait_for(
            lambda: (
                (t := read_series(folder)) is not None
                and t.num_rows >= 3
                and max(t.column("workers").to_pylist()) >= 1
                and t
            ),
            "flushed samples that see the child process",
        )
    finally:
        child.kill()
        child.wait()
        sampler.stop()
    cols = set(table.column_names)
    assert {"time", "cpu", "iowait", "memory", "disk_read_bps", "net_recv_bps"} <= cols
    assert {"proc_cpu", "proc_rss", "workers", "workers_cpu"} <= cols
    assert any(c.startswith("cpu_core_") for c in cols)
    assert all(0.0 <= v <= 100.0 for v in table.column("cpu").to_pylist())
    assert sampler._thread is None  # stopped and joined
    # A finished run keeps one compacted file, with every row.
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["data.parquet"]
    assert read_series(folder).num_rows >= table.num_rows


def test_reader_drops_rows_left_twice_by_a_kill_during_compaction(tmp_path):
    w = SeriesWriter(tmp_path / "s", key="step")
    w.extend([{"step": 1, "v": 1.0}, {"step": 2, "v": 2.0}])
    w.flush()
    w.append({"step": 3, "v": 3.0})
    w.flush()
    # Simulate a kill after data.parquet was written but before the parts were removed.
    import pyarrow.parquet as pq

    pq.write_table(read_series(tmp_path / "s"), tmp_path / "s" / "data.parquet")
    t = read_series(tmp_path / "s")
    assert t.column("step").to_pylist() == [1, 2, 3]
    # pandas users can read the folder as one table too (pyarrow's dataset reader).
    assert pq.read_table(tmp_path / "s").num_rows == 6
