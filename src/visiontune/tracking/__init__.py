"""Experiment tracking: list and compare run directories, log runs to MLflow, serve from its
model registry.

* :mod:`visiontune.tracking.runs` reads run directories (local or ``s3://``) with no server.
* :mod:`visiontune.tracking.mlflow_callback` is the training callback that logs to MLflow.
* :mod:`visiontune.tracking.registry` turns ``models:/`` and ``runs:/`` URIs into a local
  model directory.

Nothing here imports MLflow at import time: it is an optional extra (``visiontune[mlflow]``).
"""
