"""Hyperparameter tuning: Optuna studies whose trials are ``train`` runs.

The modules, lowest first (none imports one above it):

* ``_base``: names they all share (trial attributes, ``TrialFailed``, the default study dir,
  which way a metric is optimised);
* ``space``: the ranges of a space file; ``storage``: journal/RDB storages, heartbeat and the
  claim lock; ``trials``: counts, the best trial, the rows that status and the report show;
* ``samplers`` (by name, never a configuration twice); ``objective`` (one trial = one training
  run); ``workers`` (the claim loop, local worker processes);
* ``study``: settings, create/continue, warm start, ``tune`` and ``train_best``; ``report``.

Importing this package pulls in neither optuna nor torch.
"""
