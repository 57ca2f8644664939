"""Assemble the run report from the files of a run directory (see :func:`write_report`)."""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.report import html as H

MAX_POINTS = 2000  # per plotted series: a 10,000-step run stays small and fast to open
MAX_THUMBNAILS = 24


# ------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


class RunFiles:
    """What a run directory holds, each part optional."""

    def __init__(self, run_dir: Path):
        from visiontune.io import read_jsonl
        from visiontune.profile.data import load_profile

        self.dir = run_dir
        self.config = _read_yaml(run_dir / "config.yaml")
        self.metrics = read_jsonl(run_dir / "metrics.jsonl")
        # evaluation-valid.json when the dataset has no test split (see RunDir.evaluation_path)
        self.evaluation = (
            _read_json(run_dir / "evaluation.json")
            or _read_json(run_dir / "evaluation-valid.json")
            or {}
        )
        self.model = _read_json(run_dir / "model" / "model.json") or {}
        try:
            self.profile = load_profile(run_dir)
        except Exception as e:  # a corrupt part must not cost the rest of the report
            print(f"warning: profile of {run_dir} unreadable: {e}", file=sys.stderr)
            from visiontune.profile.data import ProfileData

            self.profile = ProfileData()
        self.profile_rules = self._profile_rules()
        self.debug_rules = self._rules(run_dir / "debug" / "rule_results.json")

    def _rules(self, path: Path) -> list[Any]:
        from visiontune.rules import read_results

        try:
            return read_results(path)
        except (OSError, ValueError, TypeError):
            return []

    def _profile_rules(self) -> list[Any]:
        rules = self._rules(self.dir / "profile" / "rule_results.json")
        if rules or not (self.dir / "profile").is_dir():
            return rules
        # A killed or running job has not judged its profile yet: judge what it wrote.
        from visiontune.profile.rules import evaluate_rules

        return evaluate_rules(data=self.profile)


# ------------------------------------------------------------------------------ helpers


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def downsample(x: np.ndarray, y: np.ndarray, n: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points: the mean of equal buckets (a step series keeps its shape)."""
    if len(x) <= n:
        return x, y
    starts = np.linspace(0, len(x), n + 1).astype(int)[:-1]
    counts = np.diff(np.append(starts, len(x)))
    xs = np.add.reduceat(x, starts) / counts
    valid = ~np.isnan(y)
    sums = np.add.reduceat(np.where(valid, y, 0.0), starts)
    seen = np.add.reduceat(valid.astype(np.int64), starts)
    ys = np.divide(sums, seen, out=np.full(len(sums), np.nan), where=seen > 0)
    return xs, ys


def _clean(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 6) for v in values]


# ------------------------------------------------------------------------------ sections


def _summary(run: RunFiles) -> str:
    meta, cfg, p = run.profile.meta, run.config, run.profile
    t = p.col("system", "time")
    step_t = p.col("steps", "time")
    start = meta.get("start")
    end = meta.get("end")
    last_seen = max([float(v[-1]) for v in (t, step_t) if len(v)], default=None)
    first = meta.get("first_step")
    loop_end = float(step_t[-1]) if len(step_t) else None
    status = meta.get("status")
    if status == "running" or (status is None and end is None):
        status = "no end recorded: still running, or killed (the report shows what was written)"
    init = (first - start) if first and start else None
    loop = (loop_end - first) if loop_end and first else None
    final_end = end or last_seen
    final = (final_end - loop_end) if final_end and loop_end else None
    test = run.evaluation
    rows = [
        ("run directory", str(run.dir)),
        ("status", status or ("finished" if run.model else "unknown")),
        ("start", _when(start)),
        ("end", _when(end) if end else f"last record {_when(last_seen)}"),
        ("initialisation (until the first step)", _seconds(init)),
        ("training loop", _seconds(loop)),
        ("finalisation (last step to end)", _seconds(final)),
        ("data", cfg.get("data")),
        ("model", f"{cfg.get('model', '—')} (trainable: {cfg.get('trainable', '—')})"),
        ("device", meta.get("device", cfg.get("device"))),
        ("precision", meta.get("precision", cfg.get("precision"))),
        ("DataLoader workers", meta.get("workers", cfg.get("workers"))),
        ("CPU cores", meta.get("cores")),
        ("GPUs sampled", meta.get("gpu_count")),
        ("batch size", cfg.get("batch_size")),
        ("epochs (configured)", cfg.get("epochs")),
        (
            "optimizer steps",
            meta.get("steps") or (int(p.col("steps", "step")[-1]) if len(step_t) else None),
        ),
        ("cached backbone features", meta.get("uses_feature_cache")),
        ("best epoch", (run.model.get("metrics") or {}).get("best_epoch")),
    ]
    if test.get("accuracy") is not None:
        rows.append((f"{test.get('split', 'test')} accuracy", test.get("accuracy")))
    if meta.get("stop_reason"):
        rows.append(("stop reason", meta["stop_reason"]))
    if meta.get("error"):
        rows.append(("error", meta["error"]))
    return H.section("summary", "Job summary", H.key_values(rows))


def _curves(run: RunFiles) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    body = []
    if run.metrics:
        fig = make_subplots(
            rows=2, cols=2, subplot_titles=("loss", "accuracy", "top-5", "learning rate")
        )
        for split, dash in (("train", None), ("valid", "dash")):
            rows = [m for m in run.metrics if m.get("split") == split]
            if not rows:
                continue
            ep = [m.get("epoch") for m in rows]
            for (r, c), key in (
                ((1, 1), "loss"),
                ((1, 2), "accuracy"),
                ((2, 1), "top5"),
                ((2, 2), "lr"),
            ):
                ys = [m.get(key) for m in rows]
                if any(v is not None for v in ys):
                    fig.add_trace(
                        go.Scatter(
                            x=ep,
                            y=ys,
                            name=f"{split} {key}",
                            mode="lines+markers",
                            line=dict(dash=dash),
                        ),
                        row=r,
                        col=c,
                    )
        fig.update_xaxes(title_text="epoch")
        fig.update_layout(title="Per epoch")
        body.append(H.figure_html(fig, 560))
    else:
        body.append(H.note("no epoch has finished yet: RUN/metrics.jsonl is empty or absent"))
    steps = run.profile.col("steps", "step")
    if len(steps):
        fig = make_subplots(
            rows=1, cols=2, subplot_titles=("training loss per step", "learning rate per step")
        )
        for col, key in ((1, "loss"), (2, "lr")):
            y = run.profile.col("steps", key)
            if len(y) and not np.isnan(y).all():
                xs, ys = downsample(steps, y)
                fig.add_trace(
                    go.Scatter(x=_clean(xs), y=_clean(ys), name=key, mode="lines"), row=1, col=col
                )
        fig.update_xaxes(title_text="step")
        note = (
            f" (mean of {len(steps) // MAX_POINTS + 1}-step buckets)"
            if len(steps) > MAX_POINTS
            else ""
        )
        fig.update_layout(title="Per step" + note, showlegend=False)
        body.append(H.figure_html(fig, 340))
    return H.section("curves", "Training curves", "".join(body))


def _debugger(run: RunFiles) -> str:
    debug_dir = run.dir / "debug"
    if not debug_dir.is_dir():
        return H.section("debugger", "Debugger", H.note("the debugger did not run (no RUN/debug/)"))
    body = [
        _rules_table(run.debug_rules) if run.debug_rules else H.note("no debugger rule results yet")
    ]
    try:
        from visiontune.debug.plots import figures
    except ImportError:
        body.append(H.note("debugger curves need visiontune.debug, which this installation lacks"))
    else:
        try:
            for fig in figures(run.dir):
                body.append(H.figure_html(fig, 360))
        except Exception as e:  # a debugger plotting bug must not cost the report
            body.append(H.note(f"debugger curves could not be drawn: {type(e).__name__}: {e}"))
    return H.section("debugger", "Debugger", "".join(body))


def _rules_table(rules: list[Any]) -> str:
    rows, classes = [], []
    for r in rules:
        if not r.applicable:
            verdict, cls = '<span class="badge na">n/a</span>', "na"
        elif r.triggered:
            verdict, cls = '<span class="badge fired">fired</span>', "fired"
        else:
            verdict, cls = '<span class="badge ok">ok</span>', ""
        rows.append(
            (
                r.rule,
                verdict,
                r.message,
                r.recommendation or "—",
                f"{r.violations} / {r.datapoints}",
                ", ".join(f"{k}={v}" for k, v in r.parameters.items()) or "—",
            )
        )
        classes.append(cls)
    return H.table(
        ("rule", "verdict", "finding", "recommendation", "violations / datapoints", "parameters"),
        rows,
        classes,
        raw_columns=(1,),
    )


def _profiler_rules(run: RunFiles) -> str:
    if not run.profile_rules:
        return H.section(
            "profiler-rules", "Profiler rules", H.note("the profiler did not run (no RUN/profile/)")
        )
    fired = [r.rule for r in run.profile_rules if r.triggered]
    head = (
        f"<p><b>{len(fired)} rule(s) fired:</b> {H.esc(', '.join(fired))}</p>"
        if fired
        else "<p>No rule fired.</p>"
    )
    return H.section("profiler-rules", "Profiler rules", head + _rules_table(run.profile_rules))


def _system(run: RunFiles) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from visiontune.profile.rules import percentiles

    p = run.profile
    t = p.col("system", "time")
    if not len(t):
        return H.section("system", "System usage", H.note("no system samples were written"))
    t0 = p.meta.get("start") or float(t[0])
    x = t - t0
    gpus = p.gpu_ids
    panels = ["CPU (%)", "memory (%)", "disk and network (MB/s)", "processes (CPU % of one core)"]
    if gpus:
        panels += ["GPU utilisation and memory (%)", "GPU power (W)"]
    fig = make_subplots(
        rows=len(panels), cols=1, subplot_titles=panels, shared_xaxes=True, vertical_spacing=0.05
    )

    def line(name: str, y: np.ndarray, row: int, scale: float = 1.0, width: float = 1.6):
        if not len(y) or np.isnan(y).all():
            return
        xs, ys = downsample(x, y * scale)
        fig.add_trace(
            go.Scatter(x=_clean(xs), y=_clean(ys), name=name, mode="lines", line=dict(width=width)),
            row=row,
            col=1,
        )

    cores = p.cpu_cores
    if len(cores) <= 16:
        for c in cores:
            line(f"core {c[9:]}", p.col("system", c), 1, width=0.8)
    line("CPU total", p.col("system", "cpu"), 1, width=2.5)
    line("I/O wait", p.col("system", "iowait"), 1)
    line("memory", p.col("system", "memory"), 2)
    mb = 1 / 1e6
    for name in ("disk_read_bps", "disk_write_bps", "net_recv_bps", "net_sent_bps"):
        line(name.removesuffix("_bps").replace("_", " "), p.col("system", name), 3, mb)
    line("main process CPU", p.col("system", "proc_cpu"), 4)
    line("child processes CPU", p.col("system", "workers_cpu"), 4)
    for g in gpus:
        line(f"GPU {g} util", p.col("system", f"gpu{g}_util"), 5)
        line(f"GPU {g} memory", p.col("system", f"gpu{g}_memory"), 5)
        line(f"GPU {g} power", p.col("system", f"gpu{g}_power"), 6)
    fig.update_xaxes(title_text="seconds since start", row=len(panels), col=1)
    fig.update_layout(title=f"{len(t)} samples every {p.meta.get('sample_interval_ms', '?')} ms")
    names = {
        "cpu": "CPU total (%)",
        "iowait": "I/O wait (%)",
        "memory": "memory (%)",
        "proc_cpu": "main process CPU (% of one core)",
        "workers_cpu": "child processes CPU (% of one core)",
        "workers": "child processes",
        "disk_read_bps": "disk read (MB/s)",
        "disk_write_bps": "disk write (MB/s)",
        "net_recv_bps": "network in (MB/s)",
        "net_sent_bps": "network out (MB/s)",
    }
    for g in gpus:
        names.update(
            {
                f"gpu{g}_util": f"GPU {g} utilisation (%)",
                f"gpu{g}_memory": f"GPU {g} memory (%)",
                f"gpu{g}_power": f"GPU {g} power (W)",
            }
        )
    rows = []
    for key, label in names.items():
        v = p.col("system", key)
        if key.endswith("_bps"):
            v = v / 1e6
        s = percentiles(v)
        if s:
            rows.append((label, s["p50"], s["p95"], s["p99"], s["max"]))
    body = H.table(("metric", "p50", "p95", "p99", "max"), rows) + H.figure_html(
        fig, 260 * len(panels)
    )
    return H.section("system", "System usage", body)


def _steps(run: RunFiles) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    p = run.profile
    times = p.col("steps", "step_time") * 1000
    steps = p.col("steps", "step")
    ok = ~np.isnan(times)
    times, steps = times[ok], steps[ok]
    if not len(times):
        return H.section("steps", "Step durations", H.note("no training step was timed"))
    std_n = next(
        (r.parameters.get("stddev", 3) for r in run.profile_rules if r.rule == "StepOutlier"), 3
    )
    limit = float(times.mean() + std_n * times.std())
    outliers = times > limit
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("histogram (ms)", "step duration over steps (ms)")
    )
    counts, edges = np.histogram(times, bins=min(60, max(5, int(np.sqrt(len(times))))))
    centers = (edges[:-1] + edges[1:]) / 2
    colors = ["#cf222e" if c > limit else "#0969da" for c in centers]
    fig.add_trace(
        go.Bar(x=_clean(centers), y=counts.tolist(), marker_color=colors, name="steps"),
        row=1,
        col=1,
    )
    fig.add_vline(x=limit, line_dash="dash", line_color="#cf222e", row=1, col=1)
    xs, ys = downsample(steps, times)
    fig.add_trace(
        go.Scatter(x=_clean(xs), y=_clean(ys), mode="lines", name="step time"), row=1, col=2
    )
    if outliers.any():
        idx = np.flatnonzero(outliers)[:500]
        fig.add_trace(
            go.Scatter(
                x=_clean(steps[idx]),
                y=_clean(times[idx]),
                mode="markers",
                name="outliers",
                marker=dict(color="#cf222e", size=7),
            ),
            row=1,
            col=2,
        )
    fig.update_layout(showlegend=False)
    stats = H.table(
        (
            "steps",
            "mean (ms)",
            "p50",
            "p95",
            "p99",
            "max",
            f"outliers (> mean + {std_n} std = {limit:.1f} ms)",
        ),
        [
            (
                len(times),
                float(times.mean()),
                *np.percentile(times, [50, 95, 99]).tolist(),
                float(times.max()),
                int(outliers.sum()),
            )
        ],
    )
    return H.section("steps", "Step durations", stats + H.figure_html(fig, 380))


def _phases(run: RunFiles) -> str:
    import plotly.graph_objects as go

    p = run.profile
    parts: dict[str, float] = {}
    meta = p.meta
    if meta.get("start") and meta.get("first_step"):
        parts["initialisation"] = meta["first_step"] - meta["start"]
    for name, label in (
        ("data_wait", "data wait"),
        ("forward", "forward"),
        ("backward", "backward"),
        ("forward_backward", "forward + backward"),
        ("optimizer", "optimizer"),
    ):
        v = p.col("steps", name)
        if len(v) and not np.isnan(v).all():
            parts[label] = float(np.nansum(v))
    for ph in p.phases:
        label = {"eval": "evaluation", "features": "feature cache"}.get(
            ph.get("phase"), ph.get("phase")
        )
        parts[label] = parts.get(label, 0.0) + float(ph.get("seconds", 0.0))
    if not parts:
        return H.section("phases", "Phase breakdown", H.note("no phase was timed"))
    total = sum(parts.values())
    fig = go.Figure(
        go.Bar(
            x=list(parts.values()), y=list(parts.keys()), orientation="h", marker_color="#0969da"
        )
    )
    fig.update_layout(
        title="seconds spent per phase", xaxis_title="seconds", yaxis=dict(autorange="reversed")
    )
    rows = [(k, v, 100 * v / total if total else 0.0) for k, v in parts.items()]
    per_epoch: dict[tuple[int, str], float] = {}
    for ph in p.phases:
        key = (
            int(ph.get("epoch", 0)),
            f"{ph.get('phase')}{':' + ph['split'] if ph.get('split') else ''}",
        )
        per_epoch[key] = per_epoch.get(key, 0.0) + float(ph.get("seconds", 0.0))
    body = H.table(("phase", "seconds", "% of timed"), rows) + H.figure_html(fig, 320)
    if per_epoch:
        body += "<h3>Per epoch</h3>" + H.table(
            ("epoch", "phase", "seconds"), [(e, n, s) for (e, n), s in sorted(per_epoch.items())]
        )
    if p.top_ops:
        tp = meta.get("torch_profiler") or {}
        body += (
            f"<h3>torch.profiler: top operators (steps {H.esc(tp.get('first_step'))}-"
            f"{H.esc(tp.get('last_step'))}; trace in profile/{H.esc(tp.get('trace', 'trace.json'))}, "
            "open it in ui.perfetto.dev)</h3>"
        )
        body += H.table(
            ("operator", "calls", "self CPU (ms)", "CPU total (ms)", "self device (ms)"),
            [
                (o["name"], o["calls"], o["self_cpu_ms"], o["cpu_total_ms"], o["self_device_ms"])
                for o in p.top_ops
            ],
        )
    return H.section("phases", "Phase breakdown", body)


def _data_loading(run: RunFiles) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    p, meta = run.profile, run.profile.meta
    wait = p.col("steps", "data_wait") * 1000
    total = p.col("steps", "step_time") * 1000
    steps = p.col("steps", "step")
    rows = [
        ("DataLoader workers (configured)", meta.get("workers")),
        ("CPU cores available", meta.get("cores")),
        ("most child processes seen", meta.get("max_child_processes")),
        ("batch size", run.config.get("batch_size")),
        ("steps read cached backbone features", meta.get("uses_feature_cache")),
    ]
    if len(wait) and not np.isnan(wait).all():
        share = 100 * np.nansum(wait) / max(np.nansum(total), 1e-12)
        rows += [
            ("share of step time waiting for data", f"{share:.1f}%"),
            (
                "data wait per step p50 / p95 / max (ms)",
                f"{np.nanpercentile(wait, 50):.2f} / {np.nanpercentile(wait, 95):.2f} / {np.nanmax(wait):.2f}",
            ),
        ]
    body = H.key_values(rows)
    for r in run.profile_rules:
        if r.rule in ("Dataloader", "DataWaitShare", "IOBottleneck") and r.triggered:
            body += f"<p><b>{H.esc(r.rule)}:</b> {H.esc(r.message)}. {H.esc(r.recommendation)}</p>"
    if len(wait) and not np.isnan(wait).all():
        fig = make_subplots(
            rows=1, cols=2, subplot_titles=("data wait per step (ms)", "loader processes over time")
        )
        xs, ys = downsample(steps, wait)
        fig.add_trace(
            go.Scatter(x=_clean(xs), y=_clean(ys), mode="lines", name="data wait"), row=1, col=1
        )
        t = p.col("system", "time")
        w = p.col("system", "workers")
        if len(t) and len(w):
            xs, ys = downsample(t - (meta.get("start") or t[0]), w)
            fig.add_trace(
                go.Scatter(x=_clean(xs), y=_clean(ys), mode="lines", name="child processes"),
                row=1,
                col=2,
            )
        fig.update_xaxes(title_text="step", row=1, col=1)
        fig.update_xaxes(title_text="seconds since start", row=1, col=2)
        fig.update_layout(showlegend=False)
        body += H.figure_html(fig, 340)
    return H.section("data-loading", "Data loading", body)


def _test_metrics(run: RunFiles) -> str:
    import plotly.graph_objects as go

    ev = run.evaluation
    if not ev or "accuracy" not in ev:
        return H.section(
            "test-metrics",
            "Test metrics",
            H.note("no RUN/evaluation.json yet: the run did not reach its final evaluation"),
        )
    split = ev.get("split", "test")
    body = H.key_values(
        [
            ("split", split),
            ("images", ev.get("count")),
            ("accuracy", ev.get("accuracy")),
            ("top-5", ev.get("top5")),
            ("loss", ev.get("loss")),
            ("macro F1", ev.get("macro_f1")),
        ]
    )
    per_class = ev.get("per_class") or {}
    names = list(per_class)
    if per_class:
        body += "<h3>Per class</h3>" + H.table(
            ("class", "precision", "recall", "F1", "support"),
            [
                (n, c.get("precision"), c.get("recall"), c.get("f1"), c.get("support"))
                for n, c in per_class.items()
            ],
        )
    cm = ev.get("confusion_matrix")
    if cm:
        labels = names if len(names) == len(cm) else [str(i) for i in range(len(cm))]
        fig = go.Figure(
            go.Heatmap(
                z=cm,
                x=labels,
                y=labels,
                colorscale="Blues",
                text=cm,
                texttemplate="%{text}" if len(cm) <= 20 else None,
                hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>",
            )
        )
        fig.update_layout(
            title="confusion matrix",
            xaxis_title="predicted",
            yaxis_title="true",
            yaxis=dict(autorange="reversed"),
        )
        size = min(900, 260 + 28 * len(cm))
        body += H.figure_html(fig, size)
    return H.section("test-metrics", f"Test metrics ({split})", body)


def _misclassified(run: RunFiles) -> str:
    items = run.evaluation.get("misclassified") if run.evaluation else None
    if not items:
        return H.section(
            "misclassified",
            "Misclassified images",
            H.note(
                "RUN/evaluation.json lists no misclassified images (none, or not recorded by this version)"
            ),
        )
    figs = []
    for item in items[:MAX_THUMBNAILS]:
        path = item.get("image") or item.get("path")
        uri = H.thumbnail_data_uri(path) if path else None
        if uri is None:
            continue
        conf = item.get("probability")
        caption = (
            H.esc(f"true: {item.get('true', '?')}")
            + "<br>"
            + H.esc(f"predicted: {item.get('predicted', item.get('pred', '?'))}")
        )
        if conf is not None:
            caption += H.esc(f" ({conf:.2f})")
        figs.append(
            f'<figure><img src="{uri}" alt="{H.esc(Path(path).name)}"><figcaption>{caption}</figcaption></figure>'
        )
    if not figs:
        return H.section(
            "misclassified",
            "Misclassified images",
            H.note("the misclassified images listed could not be read"),
        )
    more = f" (first {MAX_THUMBNAILS} of {len(items)})" if len(items) > MAX_THUMBNAILS else ""
    return H.section(
        "misclassified", f"Misclassified images{more}", f'<div class="thumbs">{"".join(figs)}</div>'
    )


SECTIONS = (
    ("summary", "Summary", _summary),
    ("curves", "Curves", _curves),
    ("debugger", "Debugger", _debugger),
    ("profiler-rules", "Profiler rules", _profiler_rules),
    ("system", "System", _system),
    ("steps", "Steps", _steps),
    ("phases", "Phases", _phases),
    ("data-loading", "Data loading", _data_loading),
    ("test-metrics", "Test metrics", _test_metrics),
    ("misclassified", "Misclassified", _misclassified),
)


def render(run_dir: Path) -> str:
    """The report of ``run_dir`` as one HTML string."""
    run = RunFiles(run_dir)
    parts = []
    for sid, title, build in SECTIONS:
        try:
            parts.append(build(run))
        except Exception as e:  # one broken section must not cost the report
            print(
                f"warning: report section {sid!r} failed: {type(e).__name__}: {e}", file=sys.stderr
            )
            parts.append(
                H.section(
                    sid, title, H.note(f"this section could not be built: {type(e).__name__}: {e}")
                )
            )
    name = run.model.get("name") or run_dir.name
    return H.page(
        f"visiontune run report: {name}", [(s, t) for s, t, _ in SECTIONS], "".join(parts)
    )


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Render and atomically write the report; see :func:`visiontune.report.write_report`."""
    from visiontune.io import atomic_write_text, check_page_output

    out = Path(output) if output is not None else run_dir / "report.html"
    check_page_output(out)
    atomic_write_text(out, render(run_dir))
    return out
