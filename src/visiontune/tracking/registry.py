"""MLflow model URIs to a local visiontune model directory.

``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` and ``runs:/RUN_ID/model`` name a model
logged by a tracked training run (an MLflow pyfunc whose artifact is the run's model
directory). :func:`resolve_model_uri` downloads it through the tracking server and returns the
model directory inside it, so ``serve``, ``predict`` and ``evaluate`` work on it unchanged.
Anything else (a folder, ``s3://``) is returned as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from visiontune.errors import UserError

MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(uri: str) -> bool:
    """True for ``models:/...`` and ``runs:/...``."""
    return str(uri).startswith(MLFLOW_SCHEMES)


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """A local model directory for ``uri``: MLflow URIs are downloaded (fresh each time: an
    alias may have moved) into ``$VISIONTUNE_HOME/models/mlflow/``; other URIs pass through.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``, or a
            model directory / ``s3://`` URI (returned unchanged).
        tracking_uri: the MLflow server or store; default ``$MLFLOW_TRACKING_URI``.

    Raises:
        UserError: MLflow is not installed, no tracking URI, the server is unreachable, or the
            model, version, alias or run does not exist (one line each).
    """
    uri = str(uri)
    if not is_mlflow_uri(uri):
        return uri
    try:
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise UserError(
            f"{uri} is an MLflow model URI; install the extra: pip install 'visiontune[mlflow]'"
        ) from None
    from visiontune.tracking.mlflow_callback import use_tracking_uri
    from visiontune.uri import visiontune_home

    tracking = _registry_store(uri, tracking_uri)
    key = hashlib.sha1(f"{tracking}\n{uri}".encode()).hexdigest()[:16]
    dest = visiontune_home() / "models" / "mlflow" / key
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        # Model-registry URIs are resolved through the global URI, artifacts through the arg.
        with use_tracking_uri(tracking):
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(partial), tracking_uri=tracking
            )
    except MlflowException as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"cannot fetch {uri} from {tracking}: {_first_line(e)}") from None
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"cannot fetch {uri} from {tracking}: {e}") from None
    shutil.rmtree(dest, ignore_errors=True)
    partial.replace(dest)
    return str(_find_model_dir(dest, uri))


def _registry_store(uri: str, tracking_uri: str | None) -> str:
    """The tracking URI to read ``uri`` from, checked to exist without creating anything.

    Reading must not make a store: MLflow opened a mistyped ``sqlite:///`` path (or
    ``$MLFLOW_TRACKING_URI`` folder) as a new empty database and then said the model was not
    registered. And the training command's advice (``--tracking``, ``--tracking-optional``)
    does not apply to ``serve``, which takes the URI from ``$MLFLOW_TRACKING_URI``.

    Raises:
        UserError: no tracking URI, an unreachable server, or no database at a local path.
    """
    from visiontune.tracking.mlflow_callback import (
        TrackingUnreachable,
        check_server,
        resolve_tracking_uri,
    )

    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UserError(
            f"{uri} is read from an MLflow tracking server: set MLFLOW_TRACKING_URI "
            "(http://host:port, sqlite:///file.db or a folder)"
        )
    tracking = resolve_tracking_uri(tracking_uri, create=False)
    try:
        check_server(tracking)
    except TrackingUnreachable as e:
        raise UserError(f"cannot fetch {uri}: {e.short}; is MLFLOW_TRACKING_URI right?") from None
    if tracking.startswith("sqlite:///"):
        database = Path(tracking.removeprefix("sqlite:///"))
        if not database.is_file():
            raise UserError(
                f"cannot fetch {uri}: there is no MLflow database at {database} "
                f"(from the tracking URI {tracking_uri or os.environ['MLFLOW_TRACKING_URI']})"
            )
    return tracking


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _find_model_dir(root: Path, uri: str) -> Path:
    """The visiontune model directory inside a downloaded MLflow model."""
    from visiontune.models.artifact import FORMAT, META_FILE

    for meta in sorted(root.rglob(META_FILE)):
        try:
            if json.loads(meta.read_text()).get("format") == FORMAT:
                return meta.parent
        except (OSError, ValueError):
            continue
    raise UserError(
        f"{uri} is not a visiontune model (no {META_FILE} inside); log models with "
        "`visiontune train --tracking URI`"
    )
