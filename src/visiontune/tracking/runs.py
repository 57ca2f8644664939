"""Runs without a server: find run directories, summarise them, compare them.

A run directory is read through the files the training job writes (see ``visiontune.run``):
``config.yaml``, ``metrics.jsonl``, ``evaluation.json`` (or ``evaluation-valid.json``),
``model/model.json`` and ``checkpoints/``. Only these small files are read, never checkpoints
or weights, so listing runs on ``s3://`` costs a few small GETs per run.

A run's status:

* ``finished``: ``model/model.json`` exists and every configured epoch ran.
* ``stopped``: it ended before its last epoch: early stopping or a pruned trial (a model was
  written), or a signal, an error or a kill (no model; resumable when a checkpoint exists).
* ``running``: no model yet, and the run wrote ``metrics.jsonl`` or a checkpoint recently:
  within :data:`RUNNING_WINDOW_S`, or three times its longest epoch when epochs are slower.
  A run killed a minute ago therefore shows as ``running`` until that window has passed;
  nothing on disk tells a kill from a slow epoch.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visiontune.errors import UserError

# A run with no model whose files changed within this many seconds is taken to be running.
RUNNING_WINDOW_S = 15 * 60
# Config keys shown in the list's "hyperparameters" column.
KEY_PARAMS = ("lr", "batch_size", "epochs", "optimizer", "schedule", "augment")
# Config keys that differ between any two runs without changing what they compute.
_NOISE_KEYS = {"output", "progress", "resolved", "workers"}
# How deep under DIR to look for run directories (a study puts its trials two levels down).
_MAX_DEPTH = 3


@dataclass
class RunSummary:
    """What ``runs list`` shows for one run, and what ``runs compare`` lines up."""

    path: str
    name: str
    status: str
    data: str | None
    model: str | None
    trainable: str | None
    params: dict[str, Any]
    monitor: str
    best_value: float | None
    best_epoch: int | None
    epochs_done: int
    epochs_total: int | None
    test_split: str | None
    test_accuracy: float | None
    train_time_s: float
    last_activity: float | None  # seconds since the epoch of the newest file read
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not full:
            d.pop("config")
            d.pop("history")
        return d


class _Files:
    """Small files of one run directory, local or remote, through one fsspec filesystem."""

    def __init__(self, fs: Any, root: str):
        self.fs, self.root = fs, root.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def text(self, rel: str) -> str | None:
        try:
            return self.fs.cat_file(self._p(rel)).decode()
        except (FileNotFoundError, IsADirectoryError):
            return None
        except UnicodeDecodeError:
            raise UserError(f"{self._p(rel)} is not a text file") from None

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._p(rel)))

    def mtime(self, rel: str) -> float | None:
        try:
            info = self.fs.info(self._p(rel))
        except FileNotFoundError:
            return None
        value = info.get("mtime", info.get("LastModified"))
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        return float(value) if value is not None else None


def _open(uri: str, endpoint_url: str | None) -> tuple[Any, str]:
    from visiontune.uri import open_fs, storage_errors

    with storage_errors(uri, endpoint_url):
        fs, root = open_fs(uri, endpoint_url)
        if not fs.exists(root):
            raise UserError(f"{uri} does not exist")
    return fs, root


def find_runs(root_uri: str, endpoint_url: str | None = None) -> list[str]:
    """Run directories at or under ``root_uri`` (those holding a ``config.yaml``), sorted.

    Raises:
        UserError: ``root_uri`` does not exist, or storage refuses the listing.
    """
    from visiontune.uri import storage_errors

    fs, root = _open(root_uri, endpoint_url)
    root = root.rstrip("/")
    found: list[str] = []
    with storage_errors(root_uri, endpoint_url):
        for depth in range(_MAX_DEPTH + 1):
            pattern = "/".join([root, *(["*"] * depth), "config.yaml"])
            found += [p.rsplit("/", 1)[0] for p in fs.glob(pattern)]
    # A run's own subfolders (model/) are not runs, even though model/ holds no config.yaml.
    runs = sorted(set(found))
    return [_rejoin(root_uri, root, r) for r in runs]


def _rejoin(root_uri: str, root: str, path: str) -> str:
    """The URI of ``path`` (a filesystem path under ``root``) in the form the user gave."""
    rel = path[len(root) :].lstrip("/")
    if not rel:
        return root_uri.rstrip("/") if "://" in root_uri else root_uri
    return f"{root_uri.rstrip('/')}/{rel}"


def summarize_run(
    uri: str, endpoint_url: str | None = None, *, name: str | None = None, now: float | None = None
) -> RunSummary:
    """Read one run directory into a :class:`RunSummary`.

    Raises:
        UserError: ``uri`` is not a run directory (no ``config.yaml``).
    """
    import yaml

    from visiontune.config import is_minimised

    fs, root = _open(uri, endpoint_url)
    files = _Files(fs, root)
    text = files.text("config.yaml")
    if text is None:
        raise UserError(f"{uri} is not a run directory (it has no config.yaml)")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{uri}/config.yaml is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{uri}/config.yaml is not a run's config (a mapping of config keys)")
    history = epoch_history(_parse_jsonl(files.text("metrics.jsonl") or ""))
    monitor = config.get("monitor", "valid_loss")
    minimise = config.get("monitor_mode", "auto") == "min" or (
        config.get("monitor_mode", "auto") == "auto" and is_minimised(monitor)
    )
    best_value, best_epoch = _best(history, monitor, minimise)
    test_split, test_accuracy = None, None
    for split, rel in (("test", "evaluation.json"), ("valid", "evaluation-valid.json")):
        evaluation = files.text(rel)
        if evaluation is not None:
            try:
                doc = json.loads(evaluation)
            except ValueError:
                raise UserError(f"{uri}/{rel} is not valid JSON") from None
            accuracy = doc.get("accuracy") if isinstance(doc, dict) else None
            test_split = split
            test_accuracy = accuracy if isinstance(accuracy, (int, float)) else None
            break
    has_model = files.exists("model/model.json")
    times = [
        t
        for t in (
            files.mtime("metrics.jsonl"),
            files.mtime("checkpoints/last.pt"),
            files.mtime("model/model.json"),
            files.mtime("config.yaml"),
        )
        if t is not None
    ]
    last_activity = max(times) if times else None
    epochs_total = config.get("epochs")
    status = _status(
        has_model,
        len(history),
        epochs_total,
        last_activity,
        max((h.get("epoch_time", 0.0) for h in history), default=0.0),
        time.time() if now is None else now,
    )
    return RunSummary(
        path=uri,
        name=name or uri.rstrip("/").rsplit("/", 1)[-1],
        status=status,
        data=config.get("data"),
        model=config.get("model"),
        trainable=config.get("trainable"),
        params={k: config.get(k) for k in KEY_PARAMS if k in config},
        monitor=monitor,
        best_value=best_value,
        best_epoch=best_epoch,
        epochs_done=len(history),
        epochs_total=epochs_total,
        test_split=test_split,
        test_accuracy=test_accuracy,
        train_time_s=sum(h.get("epoch_time", 0.0) for h in history),
        last_activity=last_activity,
        config=config,
        history=history,
    )


def _status(
    has_model: bool,
    epochs_done: int,
    epochs_total: int | None,
    last_activity: float | None,
    longest_epoch_s: float,
    now: float,
) -> str:
    if has_model:
        return "finished" if epochs_total is None or epochs_done >= epochs_total else "stopped"
    window = max(RUNNING_WINDOW_S, 3 * longest_epoch_s)
    if last_activity is not None and now - last_activity <= window:
        return "running"
    return "stopped"


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill mid-write; the rest is still good
        if isinstance(row, dict):
            rows.append(row)
    return rows


def epoch_history(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per epoch (``epoch``, ``train_loss``, ``valid_accuracy``, ...) from the records
    of ``metrics.jsonl`` (``{"step", "epoch", "split", name: value}``); a later record of the
    same epoch and split wins (a resumed run logs an interrupted epoch again)."""
    by_epoch: dict[int, dict[str, float]] = {}
    for r in records:
        epoch, split = r.get("epoch"), r.get("split")
        if not isinstance(epoch, int) or split not in ("train", "valid"):
            continue
        row = by_epoch.setdefault(epoch, {"epoch": epoch})
        row["step"] = r.get("step", row.get("step"))
        for k, v in r.items():
            if k in ("epoch", "split", "step") or not isinstance(v, (int, float)):
                continue
            name = k if k in ("lr", "images_per_sec", "epoch_time") else f"{split}_{k}"
            row[name] = v
    return [by_epoch[e] for e in sorted(by_epoch)]


def _best(
    history: list[dict[str, float]], monitor: str, minimise: bool
) -> tuple[float | None, int | None]:
    scored = [
        (h[monitor], h["epoch"])
        for h in history
        if isinstance(h.get(monitor), (int, float)) and not math.isnan(h[monitor])
    ]
    if not scored:
        return None, None
    # The first epoch reaching the best value wins, as in training.
    value, epoch = min(scored, key=lambda t: (t[0] if minimise else -t[0], t[1]))
    return value, epoch


def list_runs(
    root_uri: str, endpoint_url: str | None = None, unreadable: list[str] | None = None
) -> list[RunSummary]:
    """Summaries of every run at or under ``root_uri``, named by their path below it.

    Args:
        root_uri: a folder (or ``s3://`` prefix) holding run directories, or one run.
        endpoint_url: S3-compatible endpoint.
        unreadable: when given, a run whose files cannot be read (a config.yaml that is not
            YAML, say) is left out and the reason appended here, so one broken folder does
            not hide every other run; without it such a run raises.

    Raises:
        UserError: ``root_uri`` does not exist, or (without ``unreadable``) a run's files
            cannot be read.
    """
    runs = find_runs(root_uri, endpoint_url)
    base = root_uri.rstrip("/")
    out = []
    for uri in runs:
        rel = uri[len(base) :].lstrip("/") or uri.rstrip("/").rsplit("/", 1)[-1]
        try:
            out.append(summarize_run(uri, endpoint_url, name=rel))
        except UserError as e:
            if unreadable is None:
                raise
            unreadable.append(str(e))
    return out


# ---------------------------------------------------------------------------- compare


def config_differences(runs: list[RunSummary]) -> dict[str, list[Any]]:
    """Config keys whose values differ between the runs: ``{key: [value per run]}``."""
    keys = sorted({k for r in runs for k in r.config} - _NOISE_KEYS)
    diffs = {}
    for k in keys:
        values = [r.config.get(k) for r in runs]
        if any(v != values[0] for v in values[1:]):
            diffs[k] = values
    return diffs


def compare_runs(uris: list[str], endpoint_url: str | None = None) -> list[RunSummary]:
    """Summaries of several runs for side-by-side display, each with a distinct name.

    Raises:
        UserError: fewer than two runs, or one is not a run directory.
    """
    if len(uris) < 2:
        raise UserError("compare needs at least two runs")
    runs = [summarize_run(u, endpoint_url) for u in uris]
    _unique_names(runs)
    return runs


def _unique_names(runs: list[RunSummary]) -> None:
    """Runs with the same folder name (a/run, b/run) are told apart by their parent."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            parts = r.path.rstrip("/").rsplit("/", 2)
            r.name = "/".join(parts[-2:])


# Curves drawn in the comparison page, one panel each: (title, metric key).
CURVES = (
    ("valid loss", "valid_loss"),
    ("valid accuracy", "valid_accuracy"),
    ("train loss", "train_loss"),
    ("train accuracy", "train_accuracy"),
)


def write_compare_html(runs: list[RunSummary], path: str | Path) -> Path:
    """One self-contained HTML page: the runs' curves overlaid (plotly.js inlined, no CDN),
    the config differences and the headline metrics.

    Raises:
        UserError: plotly is not installed.
    """
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as e:
        raise UserError("the comparison page needs plotly: pip install 'visiontune[tune]'") from e
    import html

    from visiontune.io import atomic_write_text

    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for t, _ in CURVES])
    palette = (
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    )  # fmt: skip
    for i, run in enumerate(runs):
        colour = palette[i % len(palette)]
        for j, (_, key) in enumerate(CURVES):
            xs = [h["epoch"] for h in run.history if key in h]
            ys = [h[key] for h in run.history if key in h]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers",
                    name=run.name,
                    legendgroup=run.name,
                    showlegend=j == 0,
                    line={"color": colour},
                ),
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=720, title="visiontune runs compared")
    plot = fig.to_html(include_plotlyjs=True, full_html=False)

    def cell(v: Any) -> str:
        return html.escape("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))

    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    metric_rows = "".join(
        f"<tr><td>{label}</td>{''.join(f'<td>{cell(get(r))}</td>' for r in runs)}</tr>"
        for label, get in _HEADLINE
    )
    diffs = config_differences(runs)
    diff_rows = (
        "".join(
            f"<tr><td>{html.escape(k)}</td>{''.join(f'<td>{cell(v)}</td>' for v in vals)}</tr>"
            for k, vals in diffs.items()
        )
        or f"<tr><td colspan={len(runs) + 1}>the configs are the same</td></tr>"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>visiontune: runs compared</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>
<body><h1>Runs compared</h1>
<h2>Metrics</h2><table><tr><th></th>{head}</tr>{metric_rows}</table>
<h2>Config differences</h2><table><tr><th>key</th>{head}</tr>{diff_rows}</table>
<h2>Curves</h2>{plot}
</body></html>
"""
    out = Path(path)
    atomic_write_text(out, page)
    return out


def _fmt_best(r: RunSummary) -> str | None:
    if r.best_value is None:
        return None
    return f"{r.monitor} {r.best_value:.4g} (epoch {r.best_epoch})"


def _fmt_test(r: RunSummary) -> str | None:
    if r.test_accuracy is None:
        return None
    return f"{r.test_accuracy:.4f}" + ("" if r.test_split == "test" else f" ({r.test_split})")


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12.3s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


# Rows of the metrics table in ``compare`` (the CLI's and the HTML page's).
_HEADLINE = (
    ("status", lambda r: r.status),
    ("model", lambda r: r.model),
    ("epochs", lambda r: f"{r.epochs_done}/{r.epochs_total}"),
    ("best", _fmt_best),
    ("test accuracy", _fmt_test),
    ("train time", lambda r: format_duration(r.train_time_s)),
)


def headline_rows() -> tuple[tuple[str, Any], ...]:
    """``(label, run -> value)`` pairs shown for each run by ``compare``."""
    return _HEADLINE
