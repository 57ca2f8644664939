"""Log a training run to MLflow: params, metric curves, tags, artifacts and the model.

One MLflow run per training run. Its id is kept in ``RUN/mlflow.json``, so a resumed run
continues the same MLflow run (and skips metric steps MLflow already holds: no duplicates).

Nothing here runs on the training thread but putting records on a queue: a background thread
sends them (consecutive metric records batched into one request), retrying a failed request a
few times. If the server stays unreachable, tracking is declared lost once, in one line on
stderr; training goes on, and what could not be sent is written to ``RUN/mlflow-unsent.jsonl``
(every metric is in ``RUN/metrics.jsonl`` anyway).

At start, an unreachable server is one line and a non-zero exit before any training
(``UserError``), unless ``tracking.optional`` (``--tracking-optional``) is set: then a warning
and no tracking.

System metrics come from the profiler's sampler, never from a second sampler: at the end of
the run its series (``RUN/profile/system/``) is logged as ``system/<column>`` metrics (step =
sample index, timestamp = sample time). Were the profiler to share its latest sample live as
``state.system_metrics`` (a ``{name: number}`` dict), it would also be logged at each logging
point with the same prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontune.callbacks import Callback
from visiontune.errors import UserError
from visiontune.tracking._mlflow import use_tracking_uri

__all__ = ["MlflowCallback", "from_config", "resolve_tracking_uri", "use_tracking_uri"]

if TYPE_CHECKING:
    from visiontune.callbacks import TrainState
    from visiontune.config import TrainConfig

# Where a run directory keeps its MLflow run id, and what could not be sent.
STATE_FILE = "mlflow.json"
UNSENT_FILE = "mlflow-unsent.jsonl"
# The MLflow artifact path of the logged model (so runs:/ID/model names it).
MODEL_ARTIFACT = "model"
# How long metric records are gathered before they are sent together.
FLUSH_INTERVAL_S = 2.0
# Attempts per request before tracking is declared lost, and the pause before each retry.
RETRY_DELAYS_S = (1.0, 3.0)
# MLflow's own HTTP retries, unless the user set them: bounded, so a dead server is noticed
# in seconds, not after MLflow's default of minutes of backoff.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no progress bars in training logs
}
# Run files logged as artifacts when present: (path in RUN, artifact folder).
RUN_ARTIFACTS = (
    ("config.yaml", ""),
    ("metrics.jsonl", ""),
    ("evaluation.json", ""),
    ("evaluation-valid.json", ""),
    ("report.html", ""),
    ("profile/rule_results.json", "profile"),
    ("debug/rule_results.json", "debug"),
)
# Folders logged whole when present (the profiler's system-metrics parquet files).
RUN_ARTIFACT_DIRS = ("profile",)
# MLflow's limit on a param value's length.
_PARAM_MAX = 6000


# --------------------------------------------------------------------------------------------
# URIs and the connection check


def resolve_tracking_uri(uri: str | None, *, create: bool = True) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``. A plain path becomes
    a SQLite database (MLflow 3 refuses the old file store without an override): a ``.db`` /
    ``.sqlite`` file as it is, any other path as a folder holding ``mlflow.db``.

    Args:
        uri: the URI or path given, or ``None`` for ``$MLFLOW_TRACKING_URI``.
        create: make a plain path's folder (a training run logs there); ``False`` for readers,
            which must not make an empty store out of a mistyped path.

    Raises:
        UserError: no URI at all.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(
            "no MLflow tracking URI: pass --tracking URI (http://host:port, sqlite:///file.db "
            "or a folder) or set MLFLOW_TRACKING_URI"
        )
    if "://" in uri or uri.startswith(("databricks", "sqlite:", "postgresql", "mysql")):
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix not in (".db", ".sqlite"):
        path = path / "mlflow.db"
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database, not into ``./mlruns`` of
    whatever folder training was started from."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class TrackingUnreachable(UserError):
    """The tracking store did not answer at start; ``short`` says so without the advice."""

    def __init__(self, short: str):
        self.short = short
        super().__init__(
            f"{short}; start it (see docs/tracking.md) or add --tracking-optional to train "
            "without tracking"
        )


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise a one-line UserError unless the HTTP tracking server at ``uri`` answers
    ``/health`` (non-HTTP stores are checked by opening them)."""
    if not _is_http(uri):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            r.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} is unreachable ({reason})"
        ) from None


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def connect(uri: str, experiment: str) -> str:
    """Check the store answers and return the id of ``experiment`` (created if new).

    Raises:
        UserError: the server is unreachable or refuses the request (one line).
    """
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_server(uri)
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(experiment, _local_artifact_root(uri))
        except MlflowException:
            # Another run created it between the two calls.
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return found.experiment_id
    except MlflowException as e:
        raise UserError(f"MLflow at {uri} refused: {str(e).splitlines()[0]}") from None


def from_config(cfg: TrainConfig) -> Callback | None:
    """The callback for ``cfg.tracking``; checks the tracking store before training starts.

    Raises:
        UserError: MLflow is not installed, there is no URI, or the store is unreachable
            (unless ``tracking.optional``, which warns and returns ``None``).
    """
    t = cfg.tracking
    if t is None or not t.enabled:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(
            "MLflow tracking needs the mlflow extra: pip install 'visiontune[mlflow]'"
        ) from None
    uri = resolve_tracking_uri(t.uri)
    try:
        experiment_id = connect(uri, t.experiment)
    except UserError as e:
        if not t.optional:
            raise
        print(f"warning: {getattr(e, 'short', e)}; training without tracking", file=sys.stderr)
        return None
    return MlflowCallback(cfg, uri, experiment_id)


# --------------------------------------------------------------------------------------------
# The background sender


@dataclass
class _Op:
    """One thing to send. ``metrics`` ops are merged into one request when they queue up."""

    kind: str  # metrics | call
    send: Callable[[], Any] | None = None
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    what: str = ""


class _Sender:
    """A queue and one daemon thread that sends to MLflow with retries, off the training
    thread. After tracking is lost, ops are written to ``unsent_path`` (metrics) or dropped
    (everything else is in the run directory already)."""

    def __init__(
        self,
        send_metrics: Callable[[list[tuple[str, float, int]]], None],
        unsent_path: Path,
        uri: str,
    ):
        self._send_metrics = send_metrics
        self._unsent_path = unsent_path
        self._uri = uri
        self._q: queue.Queue[_Op | None] = queue.Queue()
        self.lost = False
        self.sent_requests = 0
        self._thread = threading.Thread(target=self._run, name="visiontune-mlflow", daemon=True)
        self._thread.start()

    def put(self, op: _Op) -> None:
        self._q.put(op)

    def close(self, timeout: float) -> bool:
        """Send what is queued (within ``timeout`` s); True when everything was handled."""
        self._q.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        pending: list[_Op | None] = []
        while True:
            op = pending.pop() if pending else self._q.get()
            if op is None:
                return
            if op.kind == "metrics":
                # Gather metric records for up to FLUSH_INTERVAL_S into one request: a request
                # per logged step would take CPU from the training thread. Any other op, or the
                # end of the run, sends what was gathered at once (order is kept).
                deadline = time.monotonic() + FLUSH_INTERVAL_S
                while not pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._q.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if nxt is not None and nxt.kind == "metrics":
                        op.metrics += nxt.metrics
                    else:
                        pending.append(nxt)  # the next op, or the end marker
            self._handle(op)

    def _handle(self, op: _Op) -> None:
        if self.lost:
            self._spill(op)
            return
        error: BaseException | None = None
        for delay in (0.0, *RETRY_DELAYS_S):
            if delay:
                time.sleep(delay)
            try:
                if op.kind == "metrics":
                    self._send_metrics(op.metrics)
                else:
                    op.send()
                self.sent_requests += 1
                return
            except Exception as e:  # any failure of the store: retry, then give up once
                error = e
        self.lost = True
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(
            f"warning: MLflow tracking at {self._uri} lost ({op.what}: {reason[:200]}); "
            f"training goes on, unsent metrics go to {self._unsent_path}",
            file=sys.stderr,
        )
        self._spill(op)

    def _spill(self, op: _Op) -> None:
        if op.kind != "metrics" or not op.metrics:
            return
        from visiontune.io import append_jsonl

        for key, value, step in op.metrics:
            append_jsonl(self._unsent_path, {"key": key, "value": value, "step": step})


# --------------------------------------------------------------------------------------------
# The callback


class MlflowCallback(Callback):
    """Logs one training run to one MLflow run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, uri: str, experiment_id: str):
        t = cfg.tracking
        self.uri = uri
        self.experiment_id = experiment_id
        self.register_model = t.register_model if t else None
        self.every = t.log_every_steps if t else None
        self.run_id: str | None = None
        self.registered: dict[str, Any] | None = None
        self._sender: _Sender | None = None
        self._resumed = False
        self._seen_steps: dict[str, set[int]] = {}
        self._logged_resolved = False
        self._run_dir: Path | None = None

    # ---- events
    def on_train_start(self, state: TrainState) -> None:
        self._run_dir = Path(state.run_dir)
        client = _mlflow_client(self.uri)
        run_id = self._saved_run_id() if state.resumed else None
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                self._resumed = True
            except Exception:
                print(
                    f"warning: MLflow run {run_id} of {state.run_dir} is not in {self.uri}; "
                    "logging the resumed run as a new MLflow run",
                    file=sys.stderr,
                )
                run_id = None
        if run_id is None:
            tags = _tags(state)
            name = Path(state.run_dir).name
            study_dir = study_dir_of(Path(state.run_dir))
            if study_dir is not None:
                # A tuning trial: nested under its study's parent run.
                from visiontune.tracking.tuning import study_parent_run

                tags["mlflow.parentRunId"] = study_parent_run(
                    client, self.uri, self.experiment_id, study_dir
                )
                tags["visiontune.trial"] = str(int(name))
                name = f"{study_dir.name}/trial-{int(name)}"
            run = client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
        self.run_id = run_id
        self._save_state()
        self._sender = _Sender(self._send_metrics, self._run_dir / UNSENT_FILE, self.uri)
        if not self._resumed:
            params = _flatten(state.config.model_dump(mode="json", exclude={"resolved"}))
            self._call("params", lambda: _log_params(client, run_id, params))
            self._call("tags", lambda: _log_late_tags(client, run_id, state.config))

    def on_step_end(self, state: TrainState, batch: Any, outputs: Any, loss: Any) -> None:
        if not self.every or state.step % self.every:
            return
        # The one host sync, at the logging interval only.
        metrics = {"train_loss_step": float(loss.detach().float().item())}
        metrics.update(_system_metrics(state))
        self._metrics(metrics, state.step)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        values = {k: v for k, v in metrics.items() if k != "epoch" and _is_number(v)}
        values["epoch"] = metrics.get("epoch", state.epoch + 1)
        values.update(_system_metrics(state))
        self._metrics(values, state.step)
        resolved = state.config.resolved
        if not self._resumed and not self._logged_resolved and resolved is not None:
            self._logged_resolved = True
            params = _flatten({"resolved": resolved.model_dump(mode="json")})
            client, run_id = _mlflow_client(self.uri), self.run_id
            self._call("resolved params", lambda: _log_params(client, run_id, params))

    def on_export_end(self, state: TrainState, model_dir: Path) -> None:
        meta = json.loads((Path(model_dir) / "model.json").read_text())
        # The exported model's numbers: test_* as they are; the best epoch's valid_* as
        # best_valid_* (valid_* at this step would repeat the last epoch's curve point).
        final = {
            (k if k.startswith("test_") or k == "best_epoch" else f"best_{k}"): v
            for k, v in (meta.get("metrics") or {}).items()
            if _is_number(v) and k not in ("bad_images", "train_images", "cv_folds", "cv_fold")
        }
        self._metrics(final, state.step)
        model_dir = Path(model_dir)
        self._call("model", lambda: self._log_model(model_dir, meta))

    def on_train_end(self, state: TrainState, result: Any) -> None:
        if self._sender is None:
            return
        run_dir, client, run_id = Path(state.run_dir), _mlflow_client(self.uri), self.run_id
        self._call("artifacts", lambda: _log_run_artifacts(client, run_id, run_dir))
        self._call("system metrics", lambda: _log_system_series(client, run_id, run_dir))
        if result is not None:
            status = "FINISHED"
        elif state.error and not state.stop_reason:
            status = "FAILED"
        else:
            status = "KILLED"
        end_tags = {"visiontune.status": status.lower()}
        if state.stop_reason:
            end_tags["visiontune.stop_reason"] = state.stop_reason
        if state.error:
            end_tags["visiontune.error"] = state.error[:_PARAM_MAX]

        def finish() -> None:
            for k, v in end_tags.items():
                client.set_tag(run_id, k, v)
            client.set_terminated(run_id, status)

        self._call("end of run", finish)
        if not self._sender.close(timeout=300):
            print(
                f"warning: MLflow at {self.uri} did not take the last records in 5 minutes; "
                f"the run directory {run_dir} has them",
                file=sys.stderr,
            )
        self._save_state()

    # ---- helpers
    def _metrics(self, values: dict[str, float], step: int) -> None:
        if self._sender is not None:
            records = [(k, float(v), int(step)) for k, v in values.items()]
            self._sender.put(_Op("metrics", metrics=records, what="metrics"))

    def _call(self, what: str, send: Callable[[], Any]) -> None:
        if self._sender is not None:
            self._sender.put(_Op("call", send=send, what=what))

    def _send_metrics(self, records: list[tuple[str, float, int]]) -> None:
        """One ``log_batch`` (in chunks of MLflow's limit), minus steps MLflow already has
        from before a resume."""
        from mlflow.entities import Metric

        client = _mlflow_client(self.uri)
        if self._resumed:
            keep = []
            for key, value, step in records:
                if key not in self._seen_steps:
                    history = client.get_metric_history(self.run_id, key)
                    self._seen_steps[key] = {m.step for m in history}
                if step not in self._seen_steps[key]:
                    keep.append((key, value, step))
            records = keep
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in records]
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        for key, _, step in records:
            self._seen_steps.setdefault(key, set()).add(step)

    def _log_model(self, model_dir: Path, meta: dict[str, Any]) -> None:
        from visiontune.tracking.pyfunc import log_pyfunc_model

        info = log_pyfunc_model(
            self.uri, self.run_id, model_dir, meta, registered_model_name=self.register_model
        )
        version = getattr(info, "registered_model_version", None)
        if self.register_model and version is not None:
            self.registered = {"name": self.register_model, "version": str(version)}
            print(
                f"registered model {self.register_model} version {version} "
                f"(serve it with `visiontune serve models:/{self.register_model}/{version}`)",
                file=sys.stderr,
            )

    def _saved_run_id(self) -> str | None:
        path = self._run_dir / STATE_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.uri:
            return None
        return saved.get("run_id")

    def _save_state(self) -> None:
        from visiontune.io import atomic_write_json

        record = {
            "tracking_uri": self.uri,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "model_uri": f"runs:/{self.run_id}/{MODEL_ARTIFACT}",
        }
        if self.registered:
            record["registered_model"] = self.registered
        if self._sender is not None and self._sender.lost:
            record["lost"] = True
        atomic_write_json(self._run_dir / STATE_FILE, record)


def study_dir_of(run_dir: Path) -> Path | None:
    """The study directory when ``run_dir`` is a tuning trial's (``STUDY/trials/0007``)."""
    if run_dir.parent.name == "trials" and run_dir.name.isdigit():
        return run_dir.parent.parent
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _system_metrics(state: TrainState) -> dict[str, float]:
    """The profiler's latest sample, when it shares one on the state (see module docstring)."""
    sample = getattr(state, "system_metrics", None) or {}
    return {f"system/{k}": float(v) for k, v in sample.items() if _is_number(v)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text[:_PARAM_MAX]
    return out


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per request
        client.log_batch(run_id, params=items[i : i + 100])


def _tags(state: TrainState) -> dict[str, str]:
    from visiontune import __version__

    cfg = state.config
    tags = {
        "visiontune.version": __version__,
        "visiontune.model": cfg.model,
        "visiontune.trainable": cfg.trainable,
        "visiontune.data": cfg.data,
        "visiontune.run_dir": str(cfg.output),
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _log_late_tags(client: Any, run_id: str, cfg: TrainConfig) -> None:
    """Tags that cost a dataset scan: computed on the sender thread, not before training."""
    fingerprint = _data_fingerprint(cfg)
    if fingerprint:
        client.set_tag(run_id, "visiontune.data_fingerprint", fingerprint)


def _data_fingerprint(cfg: TrainConfig) -> str | None:
    from visiontune.data.folder import discover

    try:
        index = discover(
            cfg.data,
            endpoint_url=cfg.endpoint_url,
            split_ratios=cfg.split_ratios,
            split_seed=cfg.split_seed,
            limit_per_class=cfg.limit_per_class,
        )
    except Exception:  # the tag is a nicety; the run already read its data
        return None
    return index.fingerprint(None)


def _git_commit() -> str | None:
    """The commit of the git checkout training runs from, when it is one."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if out.returncode == 0:
            return out.stdout.strip() or None
    return None


def _log_system_series(client: Any, run_id: str, run_dir: Path) -> None:
    """The profiler's system samples (``RUN/profile/system/``) as ``system/*`` metrics; after a
    resume, only samples newer than those MLflow has."""
    folder = run_dir / "profile" / "system"
    if not folder.is_dir():
        return
    from mlflow.entities import Metric

    from visiontune.profile.store import read_series

    table = read_series(folder, "time")
    if table is None or not table.num_rows:
        return
    rows = table.to_pylist()
    logged = client.get_metric_history(run_id, "system/cpu")
    newest = max((m.timestamp for m in logged), default=-1)
    first_step = len(logged)
    metrics = []
    step = first_step
    for row in rows:
        ts = int(row["time"] * 1000)
        if ts <= newest:
            continue
        for k, v in row.items():
            if k == "time" or k.startswith("cpu_core_") or not _is_number(v):
                continue
            metrics.append(Metric(f"system/{k}", float(v), ts, step))
        step += 1
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _log_run_artifacts(client: Any, run_id: str, run_dir: Path) -> None:
    for rel, folder in RUN_ARTIFACTS:
        path = run_dir / rel
        if path.is_file():
            client.log_artifact(run_id, str(path), folder or None)
    for rel in RUN_ARTIFACT_DIRS:
        path = run_dir / rel
        if path.is_dir():
            client.log_artifacts(run_id, str(path), rel)
