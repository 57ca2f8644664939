"""Columnar series in ``RUN/profile/NAME/`` that survive a killed run.

A Parquet file is only readable once its footer is written, so one file cannot grow while a
run lives. A :class:`SeriesWriter` instead writes a small ``part-NNNNNN.parquet`` every flush
(atomically: a reader never sees half a part) and, when the run ends normally, compacts them
into one ``data.parquet``. A SIGKILL loses at most one flush interval. ``pandas.read_parquet``
and ``pyarrow.parquet.read_table`` read the folder as one table either way; :func:`read_series`
also drops the rows a kill between compaction and cleanup could leave twice.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from visiontune.io import atomic_write


class SeriesWriter:
    """Append rows (dicts of scalars) and write them out as Parquet parts."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key  # the column that identifies a row (time or step), for de-duplication
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._next = 1 + max((_part_no(p) for p in self.folder.glob("part-*.parquet")), default=0)

    def append(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)

    def extend(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._rows.extend(rows)

    def flush(self) -> None:
        """Write the rows gathered since the last flush as one part file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            rows, self._rows = self._rows, []
            n = self._next
            self._next += 1
        if not rows:
            return
        table = pa.Table.from_pylist(rows)
        atomic_write(self.folder / f"part-{n:06d}.parquet", lambda tmp: pq.write_table(table, tmp))

    def close(self) -> None:
        """Flush, then merge the parts into ``data.parquet`` (one file for a finished run)."""
        import pyarrow.parquet as pq

        self.flush()
        parts = sorted(self.folder.glob("part-*.parquet"))
        if not parts:
            return
        table = read_series(self.folder)
        if table is None:
            return
        # Written before the parts go: a kill in between leaves duplicates read_series drops.
        atomic_write(self.folder / "data.parquet", lambda tmp: pq.write_table(table, tmp))
        for p in parts:
            p.unlink(missing_ok=True)


def _part_no(p: Path) -> int:
    try:
        return int(p.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


def read_series(folder: str | os.PathLike, key: str | None = None) -> Any:
    """All rows under ``folder`` as one ``pyarrow.Table`` sorted by ``key``; ``None`` when empty.

    Parts whose columns differ (a GPU column that appeared later) are unified with nulls.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = Path(folder)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except (OSError, pa.ArrowException):
            continue  # a file being replaced right now; the next read sees it
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    key = key or ("time" if "time" in table.column_names else "step")
    if key in table.column_names and table.num_rows:
        order = pc.sort_indices(table, sort_keys=[(key, "ascending")])
        table = table.take(order)
        values = table.column(key).to_numpy(zero_copy_only=False)
        if len(values) > 1:
            import numpy as np

            keep = np.concatenate([[True], values[1:] != values[:-1]])
            table = table.filter(pa.array(keep))
    return table
