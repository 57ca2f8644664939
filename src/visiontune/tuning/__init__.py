"""Hyperparameter tuning: Optuna studies whose trials are ``train`` runs.

Import the parts from their modules (``visiontune.tuning.space``, ``.study``, ``.report``);
importing this package pulls in neither optuna nor torch.
"""
