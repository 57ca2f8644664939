"""What the tracking modules share about MLflow itself (imported lazily by each)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``) reads one global URI; point it at ``uri`` for
    the duration."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # a later MLflow moved it: set it for the process
        mlflow.set_tracking_uri(uri)
        yield
        return
    with _use_tracking_uri(uri):
        yield
