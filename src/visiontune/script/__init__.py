"""Script mode: run and tune a user's own SageMaker training script locally, unchanged.

* :mod:`~visiontune.script.environment`: the SageMaker training environment (``SM_*``, the
  ``input/config/*.json`` files, ``--name value`` arguments) rooted in a run directory.
* :mod:`~visiontune.script.channels`: input channels, local folders in place or ``s3://`` copies.
* :mod:`~visiontune.script.metrics`: ``metric_definitions`` regexes -> ``metrics.jsonl``.
* :mod:`~visiontune.script.job`: one training job: run, stream, record, pack ``model.tar.gz``.
"""
