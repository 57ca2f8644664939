"""The ``tracking:`` section of a training config (light: no MLflow import here)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TrackingConfig(BaseModel):
    """Where and how a training run is logged to MLflow."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    uri: str | None = Field(
        None,
        description="MLflow tracking URI: http(s)://host:port, sqlite:///file.db, or a path "
        "(a .db file, or a folder that gets mlflow.db); default $MLFLOW_TRACKING_URI",
    )
    experiment: str = Field("visiontune", description="MLflow experiment name")
    register_model: str | None = Field(
        None, description="register the exported model under this name (a new version per run)"
    )
    optional: bool = Field(
        False, description="train anyway (with a warning) when the server is unreachable at start"
    )
    log_every_steps: int | None = Field(
        50, ge=1, description="also log the training loss every N steps (None: per epoch only)"
    )


def with_tracking_flags(
    cfg: Any, uri: str | None, register_model: str | None, optional: bool
) -> Any:
    """``cfg`` with the train command's ``--tracking``, ``--register-model`` and
    ``--tracking-optional`` applied over its ``tracking:`` section. ``$MLFLOW_TRACKING_URI``
    turns tracking on when neither the flags nor the config mention it."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if not (uri or register_model or optional) and (cfg.tracking is not None or not env):
        return cfg
    update: dict[str, Any] = {"enabled": True}
    if uri:
        update["uri"] = uri
    if register_model:
        update["register_model"] = register_model
    if optional:
        update["optional"] = True
    base = cfg.tracking or TrackingConfig()
    return cfg.model_copy(update={"tracking": base.model_copy(update=update)})
