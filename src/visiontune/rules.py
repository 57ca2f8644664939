"""What a rule (debugger or profiler) reports, in the form SageMaker users know.

Both the debugger's rules (``visiontune.debug``) and the profiler's (``visiontune.profile``)
produce :class:`RuleResult` objects and write them with :func:`write_results` to
``RUN/debug/rule_results.json`` and ``RUN/profile/rule_results.json``; the run report and the
trackers read them back with :func:`read_results`. A rule that cannot apply (a GPU rule on a
CPU run) says so with ``applicable=False`` and never reports ``triggered=True``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from visiontune.io import atomic_write_json

RESULTS_FORMAT = 1


@dataclass
class RuleResult:
    """One rule's verdict over the data it has seen so far."""

    rule: str  # SageMaker's name, e.g. "VanishingGradient", "LowGPUUtilization"
    triggered: bool
    message: str  # one line: what was found (or why it is fine / not applicable)
    recommendation: str = ""  # one sentence: what to do about it
    violations: int = 0  # datapoints that broke the rule
    datapoints: int = 0  # datapoints examined
    parameters: dict[str, Any] = field(default_factory=dict)  # the thresholds used
    steps: list[int] = field(default_factory=list)  # where it fired
    applicable: bool = True
    action: str = "log"  # log | stop

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleResult:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class Rule(Protocol):
    """A rule has SageMaker's name and parameters with SageMaker's defaults."""

    name: str
    parameters: dict[str, Any]

    def result(self) -> RuleResult:
        """The verdict over everything seen so far."""
        ...


def write_results(path: str | Path, results: list[RuleResult]) -> None:
    """Write rule results atomically (readers never see half a file)."""
    atomic_write_json(
        Path(path), {"format": RESULTS_FORMAT, "rules": [r.to_dict() for r in results]}
    )


def read_results(path: str | Path) -> list[RuleResult]:
    """Rule results written by :func:`write_results`; ``[]`` when there are none."""
    p = Path(path)
    if not p.is_file():
        return []
    data = json.loads(p.read_text())
    return [RuleResult.from_dict(r) for r in data.get("rules", [])]
