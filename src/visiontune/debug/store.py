"""How captured data lies in ``RUN/debug`` (Parquet rows, safetensors raw tensors, JSON meta).

::

    RUN/debug/
      meta.json                  collections, save config, what was not captured and why
      tensors/part-000001.parquet one file per flush, written atomically: a reader (or a killed
      tensors/part-000002.parquet run) only ever sees whole files; pandas, DuckDB and Arrow read
                                  the folder as one table (``pd.read_parquet(RUN/debug/tensors)``)
      raw/TRAIN-000000010.safetensors  raw tensors of a saved step, only when ``save_raw`` asks
      rule_results.json          the rules' verdicts (visiontune.rules format)

One row per tensor and saved step; the columns are :data:`SCHEMA`'s. ``phase`` is ``step``
(captured during a training step), ``epoch`` (an evaluation or the epoch's metrics) or
``features`` (captured while the feature cache ran the frozen backbone once, in mode FEATURES).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DEBUG_DIR = "debug"
TENSORS_DIR = "tensors"
RAW_DIR = "raw"
META = "meta.json"
RULE_RESULTS = "rule_results.json"
FORMAT = 1

_PART = re.compile(r"part-(\d+)\.parquet$")
_RAW = re.compile(r"([A-Z]+)-(\d+)\.safetensors$")


def schema():
    """The Arrow schema of a tensors part file."""
    import pyarrow as pa

    f64, i64 = pa.float64(), pa.int64()
    return pa.schema(
        [
            ("mode", pa.string()),
            ("step", i64),
            ("epoch", i64),
            ("phase", pa.string()),
            ("split", pa.string()),
            ("collection", pa.string()),
            ("name", pa.string()),
            ("kind", pa.string()),
            ("trainable", pa.bool_()),
            ("shape", pa.list_(i64)),
            ("numel", i64),
            ("min", f64),
            ("max", f64),
            ("mean", f64),
            ("std", f64),
            ("l1", f64),
            ("l2", f64),
            ("zero_frac", f64),
            ("nan", i64),
            ("inf", i64),
            ("hist_min", f64),
            ("hist_max", f64),
            ("hist", pa.list_(i64)),
            ("unit_hist", pa.list_(i64)),
            ("update_l2", f64),
            ("channel_mean", pa.list_(f64)),
            ("samples", i64),
            ("values", pa.list_(f64)),
            ("absent", pa.bool_()),
            ("note", pa.string()),
            ("wall_time", f64),
        ]
    )


COLUMNS = [
    "mode", "step", "epoch", "phase", "split", "collection", "name", "kind", "trainable",
    "shape", "numel", "min", "max", "mean", "std", "l1", "l2", "zero_frac", "nan", "inf",
    "hist_min", "hist_max", "hist", "unit_hist", "update_l2", "channel_mean", "samples",
    "values", "absent", "note", "wall_time",
]  # fmt: skip


def part_files(debug_dir: Path) -> list[Path]:
    """The part files in write order."""
    d = debug_dir / TENSORS_DIR
    if not d.is_dir():
        return []
    parts = [(int(m.group(1)), p) for p in d.iterdir() if (m := _PART.search(p.name))]
    return [p for _, p in sorted(parts)]


def next_part_index(debug_dir: Path) -> int:
    files = part_files(debug_dir)
    return int(_PART.search(files[-1].name).group(1)) + 1 if files else 1  # type: ignore[union-attr]


def write_part(debug_dir: Path, index: int, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as part ``index`` atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visiontune.io import atomic_write

    table = pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows], schema=schema())
    path = debug_dir / TENSORS_DIR / f"part-{index:06d}.parquet"
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def read_rows(debug_dir: Path) -> list[dict[str, Any]]:
    """Every row of a local run, in capture order."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for p in part_files(debug_dir):
        rows += pq.read_table(p, schema=schema()).to_pylist()
    return rows


def truncate_for_resume(debug_dir: Path, step: int, epoch: int) -> int:
    """Drop what a resumed run will capture again; return how many rows were dropped.

    A run resumed from a checkpoint taken after ``step`` optimizer steps and ``epoch`` whole
    epochs repeats training steps ``>= step`` and evaluations of epochs ``>= epoch``; rows of
    those (flushed by the killed run after its checkpoint) are removed, so every saved step is
    in ``RUN/debug`` exactly once.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from visiontune.io import atomic_write

    dropped = 0
    for p in part_files(debug_dir):
        t = pq.read_table(p, schema=schema())
        redo = pc.or_(
            pc.and_(pc.equal(t["phase"], "step"), pc.greater_equal(t["step"], step)),
            pc.and_(pc.equal(t["phase"], "epoch"), pc.greater_equal(t["epoch"], epoch)),
        )
        n = pc.sum(redo).as_py() or 0
        if not n:
            continue
        dropped += n
        keep = t.filter(pc.invert(redo))
        if keep.num_rows == 0:
            p.unlink()
        else:
            atomic_write(p, lambda tmp, keep=keep: pq.write_table(keep, tmp, compression="zstd"))
    raw = debug_dir / RAW_DIR
    if raw.is_dir():
        for f in raw.iterdir():
            m = _RAW.search(f.name)
            if m and m.group(1) == "TRAIN" and int(m.group(2)) >= step:
                f.unlink()
    return dropped


def raw_path(debug_dir: Path, mode: str, step: int) -> Path:
    return debug_dir / RAW_DIR / f"{mode}-{step:09d}.safetensors"


def read_meta(debug_dir: Path) -> dict[str, Any]:
    p = debug_dir / META
    return json.loads(p.read_text()) if p.is_file() else {}
