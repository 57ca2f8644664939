"""Search spaces: SageMaker's parameter ranges, written as YAML, checked before any trial runs.

A space file maps training options (``TrainConfig`` fields; ``batch-size`` and ``batch_size``
are the same key) to ranges, mirroring SageMaker's ``ContinuousParameter``,
``IntegerParameter`` and ``CategoricalParameter``::

    lr:         {type: continuous, min: 0.001, max: 0.1, scaling: log}
    batch-size: {type: categorical, values: [32, 64, 128, 256, 512]}
    epochs:     {type: integer, min: 1, max: 100}

Every mistake (an unknown key, ``min > max``, log scaling with ``min <= 0``, an empty
categorical, a value ``TrainConfig`` rejects) ends in one :class:`UserError` line.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from visiontune.errors import UserError

# Finite spaces up to this many points are enumerated to find an untried one.
_ENUMERATE_UP_TO = 100_000

# Options the tuner owns: tuning them would make trials overwrite each other or lose the study.
RESERVED = (
    "data", "output", "monitor", "monitor_mode", "progress", "cv_folds", "cv_fold", "refit"
)  # fmt: skip


@dataclass(frozen=True)
class Param:
    """One tunable training option and its range."""

    name: str
    type: Literal["continuous", "integer", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    values: tuple[Any, ...] = ()

    def corners(self) -> list[Any]:
        """The values that bound this range (checked against ``TrainConfig`` up front)."""
        if self.type == "categorical":
            return list(self.values)
        return [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        """The space-file form of this range (stored in the study so workers can rebuild it)."""
        if self.type == "categorical":
            return {"type": "categorical", "values": list(self.values)}
        out: dict[str, Any] = {"type": self.type, "min": self.low, "max": self.high}
        if self.type == "continuous":
            out["scaling"] = "log" if self.log else "linear"
        return out


@dataclass(frozen=True)
class SearchSpace:
    """The ranges of a tuning job, keyed by ``TrainConfig`` field name."""

    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {p.name: p.to_dict() for p in self.params}

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions, one per parameter."""
        import optuna.distributions as d

        out: dict[str, Any] = {}
        for p in self.params:
            if p.type == "categorical":
                out[p.name] = d.CategoricalDistribution(list(p.values))
            elif p.type == "integer":
                out[p.name] = d.IntDistribution(int(p.low), int(p.high))
            else:
                out[p.name] = d.FloatDistribution(float(p.low), float(p.high), log=p.log)
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one point of the space from an Optuna trial."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.type == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, list(p.values))
            elif p.type == "integer":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high))
            else:
                values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)
        return values

    def grid(self) -> dict[str, list[Any]]:
        """The grid for ``--strategy grid``; only categorical spaces have one."""
        ranged = [p.name for p in self.params if p.type != "categorical"]
        if ranged:
            raise UserError(
                f"--strategy grid needs categorical parameters only; {', '.join(ranged)} "
                "is a range (write it as {type: categorical, values: [...]} or use bayesian)"
            )
        return {p.name: list(p.values) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params)

    def size(self) -> int | None:
        """How many distinct points the space has, or ``None`` when a range is continuous."""
        if any(p.type == "continuous" for p in self.params):
            return None
        return math.prod(
            len(p.values) if p.type == "categorical" else int(p.high) - int(p.low) + 1
            for p in self.params
        )

    def key(self, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """A hashable identity of a point (``None`` when ``params`` is not a point of this space).

        Values are compared in Optuna's internal form, so ``4`` and ``4.0`` of an integer range
        are the same point, and categorical values by their index.
        """
        dists = self.distributions()
        try:
            return tuple(dists[p.name].to_internal_repr(params[p.name]) for p in self.params)
        except (KeyError, ValueError, TypeError):
            return None

    def random_point(self, rng: random.Random) -> dict[str, Any]:
        """One point drawn uniformly (log-uniformly for log ranges)."""
        point: dict[str, Any] = {}
        for p in self.params:
            if p.type == "categorical":
                point[p.name] = rng.choice(p.values)
            elif p.type == "integer":
                point[p.name] = rng.randint(int(p.low), int(p.high))
            elif p.log:
                point[p.name] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                point[p.name] = rng.uniform(float(p.low), float(p.high))
        return point

    def untried_point(self, taken: set[tuple[Any, ...]], rng: random.Random) -> dict | None:
        """A random point whose key is not in ``taken``, or ``None`` when every point is.

        Small finite spaces are enumerated, so the last untried point is always found; in a
        large or continuous space a random draw is new almost surely.
        """
        size = self.size()
        if size is not None and size <= _ENUMERATE_UP_TO:
            points = [
                dict(zip(self.names, values, strict=True))
                for values in itertools.product(*(_values(p) for p in self.params))
            ]
            left = [pt for pt in points if self.key(pt) not in taken]
            return rng.choice(left) if left else None
        for _ in range(1000):
            point = self.random_point(rng)
            if self.key(point) not in taken:
                return point
        return None

    def validate(self, fixed: dict[str, Any]) -> None:
        """Build a ``TrainConfig`` at every corner of the space (with the fixed options).

        Each parameter's min, max and every categorical value is tried with the other
        parameters at their first corner, so a value ``TrainConfig`` rejects (``lr: 0``,
        ``trainable: some``, ...) fails here and not in trial 37.

        Raises:
            UserError: a value is invalid; the message names the parameter.
        """
        from visiontune.config import TrainConfig, build_config

        base = {p.name: p.corners()[0] for p in self.params}
        for p in self.params:
            for value in p.corners():
                try:
                    build_config(TrainConfig, None, {**fixed, **base, p.name: value})
                except UserError as e:
                    raise UserError(f"space: {p.name}={value!r} is not a valid value: {e}") from e


def _values(p: Param) -> list[Any]:
    if p.type == "categorical":
        return list(p.values)
    return list(range(int(p.low), int(p.high) + 1))


def _field_name(key: Any) -> str:
    from visiontune.config import TrainConfig

    name = str(key).strip().replace("-", "_")
    fields = list(TrainConfig.model_fields)
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"space: unknown training option {key!r}{hint}")
    if name in RESERVED:
        raise UserError(f"space: {name!r} is set by the tuner and cannot be tuned")
    return name


# A number in exponent form without a dot, which YAML 1.1 (PyYAML) reads as text: 1e-4, 5E3.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(value: Any) -> Any:
    """``"1e-4"`` as the number it spells (as ``--set lr=1e-4`` reads it); anything else as is.

    ``lr: {min: 1e-5, ...}`` was refused as text, and ``values: [1e-4, 1e-3]`` became strings,
    so the default ``lr`` 0.001 lay outside the space and the study lost its untuned default.
    """
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


def _number(name: str, spec: dict[str, Any], key: str, integer: bool) -> float | int:
    if key not in spec:
        raise UserError(f"space: {name} needs {key}")
    value = _yaml_number(spec[key])
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"space: {name}.{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        # YAML reads .inf and .nan as floats; a sampler cannot draw from an unbounded range.
        raise UserError(f"space: {name}.{key} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise UserError(f"space: {name}.{key} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def parse_param(key: Any, spec: Any) -> Param:
    """Parse one ``name: {type: ..., ...}`` entry of a space file.

    Raises:
        UserError: the entry is malformed.
    """
    name = _field_name(key)
    if not isinstance(spec, dict):
        raise UserError(
            f"space: {key} must be a mapping like {{type: continuous, min: ..., max: ...}}"
        )
    kind = str(spec.get("type", "")).lower()
    allowed = {
        "continuous": {"type", "min", "max", "scaling"},
        "integer": {"type", "min", "max", "scaling"},
        "categorical": {"type", "values"},
    }
    if kind not in allowed:
        raise UserError(
            f"space: {key}.type must be continuous, integer or categorical, got {spec.get('type')!r}"
        )
    extra = set(spec) - allowed[kind]
    if extra:
        raise UserError(f"space: {key} ({kind}) has unknown field(s) {', '.join(sorted(extra))}")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"space: {key}.values must be a non-empty list")
        values = [_yaml_number(v) for v in values]
        if len({repr(v) for v in values}) != len(values):
            raise UserError(f"space: {key}.values has duplicates")
        bad = [v for v in values if not isinstance(v, str | int | float | bool) and v is not None]
        if bad:
            raise UserError(f"space: {key}.values must be plain values, got {bad[0]!r}")
        odd = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if odd:
            raise UserError(f"space: {key}.values must be finite numbers, got {odd[0]!r}")
        return Param(name, "categorical", values=tuple(values))
    integer = kind == "integer"
    low = _number(str(key), spec, "min", integer)
    high = _number(str(key), spec, "max", integer)
    if low > high:
        raise UserError(f"space: {key} has min {low} > max {high}")
    scaling = str(spec.get("scaling", "linear")).lower()
    if scaling not in ("linear", "log"):
        raise UserError(f"space: {key}.scaling must be linear or log, got {scaling!r}")
    log = scaling == "log"
    if log and integer:
        # Not drawn log-uniformly, so refused rather than ignored (as script mode refuses a
        # Logarithmic IntegerParameter).
        raise UserError(
            f"space: {key} is an integer range: log scaling is not supported; use linear"
        )
    if log and low <= 0:
        raise UserError(f"space: {key} uses log scaling, so min must be > 0 (got {low})")
    return Param(name, kind, low=low, high=high, log=log)  # type: ignore[arg-type]


def parse_space(spec: Any) -> SearchSpace:
    """Parse a space mapping (already loaded from YAML).

    Raises:
        UserError: the mapping is empty or an entry is malformed.
    """
    if not isinstance(spec, dict) or not spec:
        raise UserError("space: expected a non-empty mapping of training options to ranges")
    params = [parse_param(k, v) for k, v in spec.items()]
    seen: set[str] = set()
    for p in params:
        if p.name in seen:
            raise UserError(f"space: {p.name} is given twice")
        seen.add(p.name)
    return SearchSpace(tuple(params))


def load_space(path: str | Path) -> SearchSpace:
    """Read and parse a space YAML file.

    Raises:
        UserError: the file is missing, not YAML, or not a valid space.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"space file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # an image or archive given as --space
        raise UserError(f"space file {path} is not a YAML text file (not UTF-8)") from e
    except OSError as e:
        raise UserError(f"cannot read space file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise UserError(f"space file {path} is not valid YAML: {e}".splitlines()[0]) from e
    return parse_space(spec)
