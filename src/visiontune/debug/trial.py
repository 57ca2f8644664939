"""Query what a run captured, shaped like smdebug's trial so analysis notebooks port easily.

::

    from visiontune.debug import Trial, modes

    trial = Trial("runs/latest")            # or "s3://bucket/runs/latest"; in progress is fine
    trial.tensor_names(regex="gradient/.*")
    loss = trial.tensor("loss")
    loss.values(mode=modes.TRAIN)           # {step: array}
    trial.tensor("head.1.weight").reduction_value(100, "l2")

Reductions of every saved tensor are always there; ``values()`` returns arrays for scalars,
small derived tensors (confusion matrix, label counts) and tensors saved raw (``save_raw``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.debug import store
from visiontune.errors import UserError
from visiontune.rules import RuleResult


class modes:
    """Capture modes, as smdebug's ``ModeKeys``."""

    TRAIN = "TRAIN"
    EVAL = "EVAL"
    FEATURES = "FEATURES"  # captured while the feature cache ran the frozen backbone once
    ALL = ("TRAIN", "EVAL", "FEATURES")


ModeKeys = modes


class TensorUnavailable(KeyError):
    """The tensor, or its value at that step, was not saved."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "tensor unavailable"


def _mode(mode: Any) -> str | None:
    if mode is None:
        return None
    name = getattr(mode, "name", mode)
    m = str(name).upper()
    if m not in modes.ALL:
        raise UserError(f"unknown mode {mode!r}; use TRAIN, EVAL or FEATURES")
    return m


class Tensor:
    """One captured tensor across steps and modes."""

    def __init__(self, trial: Trial, name: str, rows: dict[tuple[str, int], dict[str, Any]]):
        self.trial = trial
        self.name = name
        self._rows = rows  # (mode, step) -> row

    def __repr__(self) -> str:
        return f"<Tensor {self.name!r} {len(self._rows)} saved steps>"

    @property
    def collection(self) -> str:
        return next(iter(self._rows.values()))["collection"]

    @property
    def absent(self) -> str | None:
        """Why the tensor was not captured (e.g. a frozen layer's gradient), else ``None``."""
        for r in self._rows.values():
            if r.get("absent"):
                return r.get("note") or "absent"
        return None

    def _select(self, mode: Any) -> dict[int, dict[str, Any]]:
        m = _mode(mode)
        out: dict[int, dict[str, Any]] = {}
        for (rm, step), row in sorted(self._rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if row.get("absent"):
                continue
            if m is None or rm == m:
                out.setdefault(step, row)
        return out

    def steps(self, mode: Any = None) -> list[int]:
        """Steps where this tensor was saved (in ``mode``, or any mode)."""
        return sorted(self._select(mode))

    def _row(self, step: int, mode: Any) -> dict[str, Any]:
        sel = self._select(mode)
        if step not in sel:
            if self.absent:
                raise TensorUnavailable(f"{self.name} is absent: {self.absent}")
            raise TensorUnavailable(f"{self.name} was not saved at step {step} (mode {mode})")
        return sel[step]

    def reduction_value(
        self, step: int, reduction_name: str, mode: Any = None, abs: bool = False
    ) -> Any:
        """One reduction at ``step``: min, max, mean, std, variance, l1, l2, zero_frac, nan,
        inf, numel, histogram (counts), hist_min, hist_max; ``abs=True`` with mean gives the
        mean absolute value (l1 / numel)."""
        row = self._row(step, mode)
        name = reduction_name.lower()
        if abs:
            if name != "mean":
                raise UserError("abs=True is available for the mean only (mean |x| = l1 / numel)")
            return row["l1"] / row["numel"] if row["numel"] else float("nan")
        if name == "variance":
            return None if row["std"] is None else row["std"] ** 2
        if name in ("histogram", "hist"):
            return row["hist"]
        if name not in row:
            raise UserError(f"unknown reduction {reduction_name!r}")
        return row[name]

    def reduction_values(self, step: int, mode: Any = None) -> dict[str, Any]:
        """All reductions saved at ``step``."""
        row = self._row(step, mode)
        keys = ("min", "max", "mean", "std", "l1", "l2", "zero_frac", "nan", "inf", "numel")
        return {k: row[k] for k in keys}

    def value(self, step: int, mode: Any = None) -> np.ndarray:
        """The tensor's value at ``step``: raw (when saved raw), a scalar, or a small tensor."""
        row = self._row(step, mode)
        raw = self.trial._raw_value(row["mode"], step, self.name)
        if raw is not None:
            return raw
        if row.get("values") is not None:
            return np.asarray(row["values"], dtype=np.float64).reshape(row.get("shape") or [])
        raise TensorUnavailable(
            f"only reductions of {self.name} were saved at step {step}; use "
            "reduction_value(step, 'mean'), or set debugger.save_raw to a regex matching it"
        )

    def values(self, mode: Any = None) -> dict[int, np.ndarray]:
        """``{step: value}`` for every step whose value is available (see :meth:`value`)."""
        out = {}
        for step in self.steps(mode):
            try:
                out[step] = self.value(step, mode)
            except TensorUnavailable:
                continue
        if not out and self._rows and self.steps(mode):
            raise TensorUnavailable(
                f"only reductions of {self.name} were saved; use reduction_value(step, name), "
                "or set debugger.save_raw to a regex matching it"
            )
        return out


class Trial:
    """What a run's debugger captured: local path or ``s3://``, finished or in progress.

    Args:
        path: the run directory (the one holding ``debug/``), or its ``debug`` folder.
        endpoint_url: S3-compatible endpoint for ``s3://`` runs.

    Raises:
        UserError: nothing was captured there.
    """

    def __init__(self, path: str | Path, endpoint_url: str | None = None):
        from visiontune.uri import is_remote, open_fs, storage_errors

        self.path = str(path).rstrip("/")
        self.endpoint_url = endpoint_url
        # Missing credentials, an unreachable endpoint: one line, not a botocore traceback.
        with storage_errors(self.path, endpoint_url):
            if is_remote(self.path):
                self._fs, root = open_fs(self.path, endpoint_url)
            else:
                import fsspec

                self._fs, root = fsspec.filesystem("file"), str(Path(self.path).resolve())
            self._debug = (
                root
                if root.rstrip("/").endswith("/" + store.DEBUG_DIR)
                else (f"{root.rstrip('/')}/{store.DEBUG_DIR}")
            )
            self._seen: dict[str, Any] = {}
            self._rows: list[dict[str, Any]] = []
            self.meta: dict[str, Any] = {}
            self.refresh()
        if not self.meta and not self._rows:
            raise UserError(
                f"no debugger data in {self.path} (train with --debug, or a debugger: section)"
            )

    # ---------------------------------------------------------------- loading

    def refresh(self) -> None:
        """Read what was written since the last call (a run in progress keeps writing)."""
        from visiontune.io import read_parquet

        fs = self._fs
        meta = f"{self._debug}/{store.META}"
        try:
            with fs.open(meta, "rb") as f:
                self.meta = json.loads(f.read())
        except (FileNotFoundError, OSError):
            self.meta = {}
        except ValueError:  # written atomically, so a copy cut short (rsync, a download)
            raise UserError(f"{meta} is not valid JSON (a copy cut short?)") from None
        try:
            files = sorted(fs.glob(f"{self._debug}/{store.TENSORS_DIR}/part-*.parquet"))
        except (FileNotFoundError, OSError):
            files = []
        sizes = {}
        for f in files:
            try:
                sizes[f] = fs.info(f).get("size")
            except FileNotFoundError:
                continue
        changed = any(f in self._seen and self._seen[f] != s for f, s in sizes.items())
        gone = any(f not in sizes for f in self._seen)
        if changed or gone:  # a resumed run rewrote parts: read everything again
            self._seen, self._rows = {}, []
        for f in sorted(sizes):
            if f in self._seen:
                continue
            try:
                with fs.open(f, "rb") as fh:
                    self._rows += read_parquet(fh, store.schema()).to_pylist()
            except ValueError as e:  # pyarrow's ArrowInvalid: parts are written atomically
                first = str(e).strip().splitlines()[0]
                raise UserError(f"cannot read {f} (a copy cut short?): {first}") from None
            self._seen[f] = sizes[f]
        self._index()

    def _index(self) -> None:
        by_name: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
        for r in self._rows:
            by_name.setdefault(r["name"], {})[(r["mode"], r["step"])] = r
        self._by_name = by_name

    def _raw_value(self, mode: str, step: int, name: str) -> np.ndarray | None:
        path = f"{self._debug}/{store.RAW_DIR}/{mode}-{step:09d}.safetensors"
        try:
            with self._fs.open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, OSError):
            return None
        from safetensors.torch import load

        tensors = load(data)
        t = tensors.get(name)
        if t is None:
            return None
        import torch

        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    # ---------------------------------------------------------------- queries

    def tensor_names(
        self, regex: str | None = None, mode: Any = None, collection: str | None = None
    ) -> list[str]:
        """Names of captured tensors, filtered by regex (search), mode and collection."""
        m = _mode(mode)
        try:
            pat = re.compile(regex) if regex else None
        except re.error as e:
            raise UserError(f"not a valid regular expression ({e}): {regex!r}") from None
        out = []
        for name, rows in self._by_name.items():
            if pat and not pat.search(name):
                continue
            if m and not any(k[0] == m for k in rows):
                continue
            if collection and next(iter(rows.values()))["collection"] != collection:
                continue
            out.append(name)
        return sorted(out)

    def steps(self, mode: Any = None) -> list[int]:
        """Every step at which something was saved (in ``mode``, or any mode)."""
        m = _mode(mode)
        return sorted({r["step"] for r in self._rows if (m is None or r["mode"] == m)})

    def tensor(self, name: str) -> Tensor:
        """One tensor by exact name (see :meth:`tensor_names`)."""
        if name not in self._by_name:
            import difflib

            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TensorUnavailable(f"no tensor {name!r} was captured{hint}")
        return Tensor(self, name, self._by_name[name])

    def has_tensor(self, name: str) -> bool:
        return name in self._by_name

    def collections(self) -> dict[str, list[str]]:
        """Collection name -> tensor names."""
        out: dict[str, list[str]] = {}
        for name, rows in self._by_name.items():
            out.setdefault(next(iter(rows.values()))["collection"], []).append(name)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def rows(self) -> list[dict[str, Any]]:
        """Every captured row (one per tensor and saved step), in capture order."""
        return list(self._rows)

    def to_table(self):
        """The rows as a ``pyarrow.Table`` (``.to_pandas()`` when pandas is installed)."""
        import pyarrow as pa

        return pa.Table.from_pylist(
            [{k: r.get(k) for k in store.COLUMNS} for r in self._rows], schema=store.schema()
        )

    def rule_results(self) -> list[RuleResult]:
        """The verdicts the rules wrote while the run trained."""
        try:
            with self._fs.open(f"{self._debug}/{store.RULE_RESULTS}", "rb") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, OSError):
            return []
        return [RuleResult.from_dict(r) for r in data.get("rules", [])]

    @property
    def finished(self) -> bool:
        """True once the run ended (no more data will come)."""
        return bool(self.meta.get("finished"))

    def loaded_all_steps(self) -> bool:  # smdebug's name
        return self.finished


def create_trial(path: str | Path, endpoint_url: str | None = None) -> Trial:
    """smdebug's ``create_trial``."""
    return Trial(path, endpoint_url)


def run_rules(
    trial: Trial, specs: list[Any] | None = None, now: float | None = None
) -> list[RuleResult]:
    """Run rules after the fact over what ``trial`` holds (SageMaker's rule job, locally).

    Args:
        trial: the captured data.
        specs: rule specs or names; default: the rules the run used (or the default set).
        now: the time to judge StalledTraining against (default: now).
    """
    from visiontune.debug.config import DEFAULT_RULES, RuleSpec
    from visiontune.debug.rules import RuleSet

    if specs is None:
        specs = [RuleSpec(**r) for r in trial.meta.get("rules", [])] or list(DEFAULT_RULES)
    rules = RuleSet.from_specs(specs)
    rules.feed(trial.rows())
    rules.finish(now, finished=trial.finished)
    return rules.results(trial.meta.get("collections") or sorted(trial.collections()))
