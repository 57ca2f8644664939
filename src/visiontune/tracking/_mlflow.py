"""What the tracking modules share about MLflow itself (imported lazily by each)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

# MLflow's fluent API keeps one tracking URI per process and mirrors it into
# $MLFLOW_TRACKING_URI; two threads switching it at once would leave the wrong one behind.
_SWITCH = threading.RLock()


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``) reads one global URI; point it at ``uri`` for
    the duration, then put back both MLflow's global and ``$MLFLOW_TRACKING_URI`` exactly as
    they were (MLflow sets the variable for subprocesses; a notebook or a later training run
    in the same process must not inherit it)."""
    import mlflow

    with _SWITCH:
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            try:
                from mlflow.tracking._tracking_service.utils import _use_tracking_uri
            except ImportError:  # a later MLflow moved it: set it, restore it below
                before = mlflow.get_tracking_uri()
                mlflow.set_tracking_uri(uri)
                try:
                    yield
                finally:
                    mlflow.set_tracking_uri(before)
                return
            with _use_tracking_uri(uri):
                yield
        finally:
            if env_before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before
