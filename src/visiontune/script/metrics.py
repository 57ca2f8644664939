"""Metric definitions: SageMaker's ``metric_definitions``, regexes over the script's log lines.

As in SageMaker, each definition is ``{"Name": ..., "Regex": ...}``; every log line (stdout and
stderr, which SageMaker both sends to CloudWatch) is searched with every regex and the first
capture group (the whole match when there is none) is the value. A match that is not a number
is skipped. Values go to ``metrics.jsonl`` as a time series, one line per value:
``{"step": 3, "time": 1732567890.1, "elapsed_s": 12.4, "average test loss": 0.51}``, where
``step`` counts that metric's values from 0.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.errors import UserError
from visiontune.io import append_jsonl


@dataclass(frozen=True)
class MetricDefinition:
    """One metric: its name and the regex whose first group is its value."""

    name: str
    regex: str

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex)

    def to_dict(self) -> dict[str, str]:
        """The estimator's form, ``{"Name": ..., "Regex": ...}``."""
        return {"Name": self.name, "Regex": self.regex}


def metric_definition(name: Any, regex: Any) -> MetricDefinition:
    """A checked definition.

    Raises:
        UserError: an empty name, or a regex that does not compile.
    """
    name, regex = str(name or "").strip(), str(regex or "")
    if not name:
        raise UserError("a metric definition needs a Name")
    if not regex:
        raise UserError(f"metric {name!r} needs a Regex")
    try:
        re.compile(regex)
    except re.error as e:
        raise UserError(f"metric {name!r}: the regex {regex!r} does not compile ({e})") from None
    return MetricDefinition(name, regex)


def definitions_from_list(items: Any, where: str = "metric_definitions") -> list[MetricDefinition]:
    """Definitions from the estimator's list, ``[{"Name": ..., "Regex": ...}, ...]``.

    Lower-case ``name``/``regex`` keys are accepted too.

    Raises:
        UserError: not a list of such mappings, or a name given twice.
    """
    if not isinstance(items, list):
        raise UserError(f"{where} must be a list of {{Name: ..., Regex: ...}}")
    out: list[MetricDefinition] = []
    for item in items:
        if not isinstance(item, dict):
            raise UserError(f"{where}: each entry must be a mapping {{Name: ..., Regex: ...}}")
        keys = {str(k).lower(): v for k, v in item.items()}
        unknown = set(keys) - {"name", "regex"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        out.append(metric_definition(keys.get("name"), keys.get("regex")))
    return _unique(out)


def _unique(defs: list[MetricDefinition]) -> list[MetricDefinition]:
    seen: set[str] = set()
    for d in defs:
        if d.name in seen:
            raise UserError(f"metric {d.name!r} is defined twice")
        seen.add(d.name)
    return defs


def load_definitions_file(path: str | Path) -> list[MetricDefinition]:
    """Definitions from a YAML or JSON file: the estimator's list, or a mapping holding it
    under ``metric_definitions``.

    Raises:
        UserError: a missing or malformed file.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"metric definitions file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{p} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p} is not a YAML/JSON file (not UTF-8 text)") from None
    if isinstance(data, dict) and "metric_definitions" in data:
        data = data["metric_definitions"]
    return definitions_from_list(data, str(p))


def parse_metric_options(
    specs: list[str], files: list[str] | None = None
) -> list[MetricDefinition]:
    """``--metric NAME=REGEX`` options (the regex may itself hold ``=``) plus definition files.

    Raises:
        UserError: a malformed option, a bad regex or a name defined twice.
    """
    out: list[MetricDefinition] = []
    for f in files or []:
        out += load_definitions_file(f)
    for spec in specs:
        name, sep, regex = spec.partition("=")
        if not sep:
            raise UserError(f"--metric {spec!r}: use NAME=REGEX, e.g. 'loss=loss: ([0-9.]+)'")
        out.append(metric_definition(name, regex))
    return _unique(out)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class MetricExtractor:
    """Applies the definitions to log lines and records every value.

    Thread-safe: stdout and stderr are read by two threads.

    Args:
        definitions: the metrics to look for.
        path: ``metrics.jsonl`` to append to (``None``: keep in memory only).
        on_value: called with ``(name, value, step)`` for every value, in order.
    """

    definitions: list[MetricDefinition]
    path: Path | None = None
    on_value: Callable[[str, float, int], None] | None = None
    series: dict[str, list[float]] = field(default_factory=dict)
    start: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._compiled = [(d.name, d.pattern) for d in self.definitions]
        self._lock = threading.Lock()
        self.series = {d.name: [] for d in self.definitions}

    def feed(self, line: str) -> None:
        """Look for every metric in one log line."""
        for name, pattern in self._compiled:
            match = pattern.search(line)
            if match is None:
                continue
            value = _number(match.group(1) if pattern.groups else match.group(0))
            if value is None:
                continue
            with self._lock:
                values = self.series[name]
                step = len(values)
                values.append(value)
                now = time.time()
                if self.path is not None:
                    record = {"step": step, "time": round(now, 3)}
                    record["elapsed_s"] = round(now - self.start, 3)
                    record[name] = value if math.isfinite(value) else json.dumps(value)
                    append_jsonl(self.path, record)
                if self.on_value is not None:
                    self.on_value(name, value, step)

    def last(self) -> dict[str, float]:
        """The last value of every metric that printed at least one."""
        return {k: v[-1] for k, v in self.series.items() if v}
