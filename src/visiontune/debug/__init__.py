"""The training debugger: capture tensors at save steps, run SageMaker's built-in rules,
query what was captured (``Trial``), and plot it.

Turn it on with ``visiontune train --debug`` or a ``debugger:`` section in the config; see
docs/debugging.md. Importing this package is cheap (torch and pyarrow load on use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModeKeys", "Trial", "create_trial", "modes"]


def __getattr__(name: str) -> Any:
    # Lazy: `visiontune.debug.config` is imported by the config module and must stay light.
    if name in __all__:
        from visiontune.debug import trial

        return getattr(trial, name)
    raise AttributeError(name)
