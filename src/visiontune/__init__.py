"""visiontune: local-first fine-tuning, tuning, debugging and serving of image classifiers.

The Python API, for notebooks and scripts::

    from visiontune import train, evaluate, tune, Predictor, TrainConfig

Each name is imported on first use, so ``import visiontune`` (and ``visiontune --help``) stays
light: torch and optuna load only when a function needs them.

``train`` and ``evaluate`` are also the names of submodules. The package keeps them bound
to the functions, whatever was imported before: ``from visiontune import train`` always gives
the function; write ``from visiontune.train import ...`` (not ``import visiontune.train as
m``) to reach the module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute): the documented Python API.
_API = {
    "train": ("visiontune.train", "train"),
    "evaluate": ("visiontune.evaluate", "evaluate"),
    "tune": ("visiontune.tuning.study", "tune"),
    "Predictor": ("visiontune.evaluate", "Predictor"),
    "TrainConfig": ("visiontune.config", "TrainConfig"),
}

__all__ = ["Predictor", "TrainConfig", "__version__", "evaluate", "train", "tune"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """The package module, keeping API names bound to functions, not same-named submodules.

    Importing the submodule ``visiontune.train`` makes Python set the package attribute
    ``train`` to that module, which would turn ``from visiontune import train`` into a module
    depending on what happened to be imported first. The submodule stays in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
