"""Read back what the profiler wrote in ``RUN/profile/`` (for the rules and the report)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.io import read_jsonl


@dataclass
class ProfileData:
    """The profile of one run as numpy columns; empty parts when nothing was written."""

    system: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[str, np.ndarray] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    top_ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gpu_ids(self) -> list[int]:
        ids = sorted(
            int(k[3:].split("_")[0])
            for k in self.system
            if k.startswith("gpu") and k.endswith("_util")
        )
        return ids

    @property
    def cpu_cores(self) -> list[str]:
        return sorted(
            (k for k in self.system if k.startswith("cpu_core_")), key=lambda k: int(k[9:])
        )

    def col(self, part: str, name: str) -> np.ndarray:
        """A column as float64 with NaN for missing values (empty when absent)."""
        table = getattr(self, part)
        v = table.get(name)
        return np.asarray(v, dtype=np.float64) if v is not None else np.zeros(0)


def _columns(table: Any) -> dict[str, np.ndarray]:
    if table is None:
        return {}
    out = {}
    for name in table.column_names:
        col = table.column(name)
        try:
            out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64)
        except (TypeError, ValueError):
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def load_profile(run_dir: str | Path) -> ProfileData:
    """Everything under ``RUN/profile/`` that can be read; a killed run gives what it flushed."""
    from visiontune.profile.store import read_series

    d = Path(run_dir) / "profile"
    data = ProfileData()
    if not d.is_dir():
        return data
    data.system = _columns(read_series(d / "system", "time"))
    data.steps = _columns(read_series(d / "steps", "step"))
    data.phases = read_jsonl(d / "phases.jsonl")
    for name, attr in (("meta.json", "meta"), ("top_ops.json", "top_ops")):
        try:
            setattr(data, attr, json.loads((d / name).read_text()))
        except (OSError, ValueError):
            pass
    return data
