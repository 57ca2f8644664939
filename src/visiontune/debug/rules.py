"""SageMaker Debugger's built-in rules, with SageMaker's names, parameters and defaults.

A rule reads the rows the capture writes (one row per tensor and saved step: its reductions,
see :mod:`visiontune.debug.store`) in the order they were captured. The same code runs beside
training (rows arrive at save steps and epoch ends) and after the fact (rows read back from
``RUN/debug``), so a rule re-run with ``visiontune debug RUN`` sees exactly what the live one saw.

Every rule is cheap: it keeps a few numbers per tensor, never a tensor.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

from visiontune.errors import UserError
from visiontune.rules import RuleResult

Row = dict[str, Any]

# Reductions compared by UnchangedTensor (all of them must be unchanged).
_COMPARED = ("min", "max", "mean", "std", "l1", "l2")
UNIT_BINS = 100  # per-unit activity histogram: bin i holds units active in [i%, (i+1)%) of samples


class BuiltinRule:
    """Base class: parameters with defaults, violation bookkeeping, one :class:`RuleResult`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # Collections the rule reads; the debugger captures them when the rule is on.
    requires: ClassVar[tuple[str, ...]] = ()
    recommendation: ClassVar[str] = ""

    def __init__(self, parameters: dict[str, Any] | None = None, action: str = "log"):
        parameters = dict(parameters or {})
        unknown = sorted(set(parameters) - set(self.defaults))
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise UserError(f"{self.name} has no parameter {unknown[0]!r} (parameters: {known})")
        typed = {k: _param_value(self.name, k, v, self.defaults[k]) for k, v in parameters.items()}
        self.p = {**self.defaults, **typed}
        self.action = action
        self.violations = 0
        self.datapoints = 0
        self.steps: list[int] = []
        self.finding = ""  # the first violation, in words
        self.note = ""  # a caveat about the data (shown when nothing fired)

    # -- feeding
    def update(self, row: Row) -> None:
        """Look at one captured row."""

    def flush(self) -> None:
        """The data of the last saved step is complete (epoch end, end of data)."""

    def finish(self, now: float | None = None, finished: bool = True) -> None:
        """No more rows will come (``finished``: the run ended; otherwise it may go on)."""
        self.flush()

    # -- verdict
    def check(self, ok: bool, step: int, finding: str) -> None:
        self.datapoints += 1
        if not ok:
            self.violations += 1
            if step not in self.steps:
                self.steps.append(step)
            if not self.finding:
                self.finding = finding

    @property
    def triggered(self) -> bool:
        return self.violations > 0

    def applicable(self, collections: Iterable[str]) -> tuple[bool, str]:
        missing = [c for c in self.requires if c not in set(collections)]
        if missing:
            return False, f"not applicable: the {', '.join(missing)} collection was not captured"
        return True, ""

    def result(self, collections: Iterable[str] | None = None) -> RuleResult:
        params = {k: v for k, v in self.p.items()}
        ok, why = self.applicable(collections) if collections is not None else (True, "")
        if not ok:
            return RuleResult(
                self.name, False, why, "", 0, 0, params, [], applicable=False, action=self.action
            )
        if self.triggered:
            msg = f"{self.finding} ({self.violations} of {self.datapoints} datapoints)"
            rec = self.recommendation
        elif self.datapoints == 0:
            msg = self.note or "no data to judge yet"
            rec = ""
        else:
            msg = f"no issue in {self.datapoints} datapoints" + (
                f"; {self.note}" if self.note else ""
            )
            rec = ""
        return RuleResult(
            rule=self.name,
            triggered=self.triggered,
            message=msg,
            recommendation=rec,
            violations=self.violations,
            datapoints=self.datapoints,
            parameters=params,
            steps=sorted(self.steps)[:1000],
            applicable=True,
            action=self.action,
        )

    # -- helpers
    def selected(self, row: Row, default_collections: Iterable[str] | None = None) -> bool:
        """Whether ``row`` is one of the tensors this rule looks at (collection_names /
        tensor_regex parameters, else ``default_collections``, else every tensor)."""
        if row.get("absent"):
            return False
        names = self.p.get("collection_names")
        regex = self.p.get("tensor_regex")
        if regex and re.fullmatch(regex, row["name"]):
            return True
        if names:
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",")]
            return row["collection"] in names
        if regex:
            return False
        return default_collections is None or row["collection"] in default_collections


def _param_value(rule: str, key: str, value: Any, default: Any) -> Any:
    """A rule parameter as its rule uses it (the type of its default), checked when the rule
    is built: ``num_steps: abc`` or a bad regex otherwise failed inside the first update, which
    beside training only warns, so the rule silently judged nothing.

    SageMaker passes rule parameters as strings, so ``"10"`` and ``"true"`` are read as the
    number and the flag they spell.

    Raises:
        UserError: a value of the wrong kind, or a regex that does not compile.
    """
    what = f"{rule}.{key}"
    if key.endswith("regex"):
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise UserError(f"{what} must be a regular expression (text), got {value!r}")
        try:
            re.compile(value)
        except re.error as e:
            raise UserError(f"{what} is not a valid regular expression ({e}): {value!r}") from None
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise UserError(f"{what} must be true or false, got {value!r}")
        return value
    numeric = isinstance(default, int | float) or key.endswith("threshold")
    if numeric and not (default is None and value is None):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise UserError(f"{what} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise UserError(f"{what} must be a finite number, got {value!r}")
        if isinstance(default, int) and float(number).is_integer():
            return int(number)  # counts (steps, patience) stay whole numbers
        return number
    if isinstance(default, str) and not isinstance(value, str):
        raise UserError(f"{what} must be text, got {value!r}")
    return value


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)


# --------------------------------------------------------------------------------------------
# Gradients, weights, any tensor


class VanishingGradient(BuiltinRule):
    name = "VanishingGradient"
    defaults: ClassVar = {"threshold": 1e-7}
    requires = ("gradients",)
    recommendation = (
        "Gradients this small stop learning: check for saturated or dead activations, use "
        "normalisation layers or a different initialisation, or raise the learning rate."
    )

    def update(self, row: Row) -> None:
        if row["collection"] != "gradients" or row.get("absent") or not row["numel"]:
            return
        mean_abs = _f(row["l1"]) / row["numel"]
        self.check(
            not mean_abs < self.p["threshold"],
            row["step"],
            f"mean |gradient| of {row['name']} is {mean_abs:.2e} < {self.p['threshold']:g} "
            f"at step {row['step']}",
        )


class ExplodingTensor(BuiltinRule):
    name = "ExplodingTensor"
    defaults: ClassVar = {"collection_names": None, "tensor_regex": None, "only_nan": False}
    recommendation = (
        "A NaN or infinity appeared: lower the learning rate, clip gradients (grad_clip), or "
        "check the inputs for NaNs; the stop action ends such a run at the epoch end."
    )

    def update(self, row: Row) -> None:
        if not self.selected(row):
            return
        bad = (row.get("nan") or 0) > 0
        if not self.p["only_nan"]:
            bad = bad or (row.get("inf") or 0) > 0
        what = "NaN" if (row.get("nan") or 0) else "infinite value"
        self.check(not bad, row["step"], f"{row['name']} has a {what} at step {row['step']}")


class WeightUpdateRatio(BuiltinRule):
    name = "WeightUpdateRatio"
    defaults: ClassVar = {
        "num_steps": 100,
        "large_threshold": 10.0,
        "small_threshold": 1e-8,
        "epsilon": 1e-6,
    }
    requires = ("weights",)
    recommendation = (
        "Updates far larger than the weights diverge and far smaller ones do not learn: adjust "
        "the learning rate (or the layer's lr scale)."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._last: dict[str, int] = {}

    def update(self, row: Row) -> None:
        if row.get("update_l2") is None or row["collection"] != "weights":
            return
        name, step = row["name"], row["step"]
        if name in self._last and step - self._last[name] < self.p["num_steps"]:
            return
        self._last[name] = step
        ratio = _f(row["update_l2"]) / (_f(row["l2"]) + self.p["epsilon"])
        if ratio > self.p["large_threshold"] or ratio < self.p["small_threshold"]:
            self.check(False, step, f"update/weight ratio of {name} is {ratio:.3g} at step {step}")
        else:
            self.check(True, step, "")


class AllZero(BuiltinRule):
    name = "AllZero"
    defaults: ClassVar = {"collection_names": None, "tensor_regex": None, "threshold_percent": 100}
    recommendation = (
        "A tensor of zeros carries nothing: look for dead ReLUs, a zero-initialised layer or "
        "a blank input pipeline."
    )
    # Biases are left out by default: zero is their usual initial value.
    _DEFAULT = ("losses", "weights", "gradients", "activations", "inputs")

    def update(self, row: Row) -> None:
        if not self.selected(row, self._DEFAULT) or not row["numel"]:
            return
        pct = 100.0 * _f(row["zero_frac"])
        self.check(
            not pct >= self.p["threshold_percent"],
            row["step"],
            f"{pct:.1f}% of {row['name']} is zero at step {row['step']}",
        )


class UnchangedTensor(BuiltinRule):
    name = "UnchangedTensor"
    defaults: ClassVar = {
        "collection_names": None,
        "tensor_regex": None,
        "num_steps": 3,
        "rtol": 1e-5,
        "atol": 1e-8,
        "equal_nan": False,
    }
    requires = ("weights",)
    recommendation = (
        "A trainable tensor that does not change is not learning: check the learning rate, "
        "the optimizer's parameter groups and that the layer is in the graph."
    )
    _DEFAULT = ("weights", "biases", "losses")

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._seen: dict[str, deque] = {}
        self.note = "compares each tensor's reductions (min, max, mean, std, L1, L2)"

    def update(self, row: Row) -> None:
        if row["phase"] != "step" or not self.selected(row, self._DEFAULT):
            return
        if row.get("trainable") is False:
            return  # frozen on purpose
        n = int(self.p["num_steps"])
        q = self._seen.setdefault(row["name"], deque(maxlen=n))
        q.append([_f(row[k]) for k in _COMPARED])
        if len(q) < n:
            return
        first = q[0]
        same = all(all(_close(a, b, self.p) for a, b in zip(first, v, strict=True)) for v in q)
        self.check(
            not same,
            row["step"],
            f"{row['name']} did not change over {n} saved steps (up to step {row['step']})",
        )


def _close(a: float, b: float, p: dict[str, Any]) -> bool:
    if math.isnan(a) or math.isnan(b):
        return bool(p["equal_nan"]) and math.isnan(a) and math.isnan(b)
    return abs(a - b) <= p["atol"] + p["rtol"] * abs(b)


class TensorVariance(BuiltinRule):
    name = "TensorVariance"
    defaults: ClassVar = {
        "collection_names": None,
        "tensor_regex": None,
        "max_threshold": None,
        "min_threshold": None,
    }
    recommendation = (
        "A tensor whose variance leaves the expected range diverges or collapses: check the "
        "learning rate, initialisation and normalisation."
    )
    _DEFAULT = ("weights", "biases", "gradients", "activations")

    def applicable(self, collections: Iterable[str]) -> tuple[bool, str]:
        if self.p["max_threshold"] is None and self.p["min_threshold"] is None:
            return False, (
                "not applicable: set TensorVariance.max_threshold and/or min_threshold "
                "(SageMaker has no defaults for them)"
            )
        return True, ""

    def update(self, row: Row) -> None:
        if not self.selected(row, self._DEFAULT) or not row["numel"]:
            return
        hi, lo = self.p["max_threshold"], self.p["min_threshold"]
        if hi is None and lo is None:
            return
        var = _f(row["std"]) ** 2
        bad = (hi is not None and var > hi) or (lo is not None and var < lo)
        self.check(
            not bad, row["step"], f"variance of {row['name']} is {var:.3g} at step {row['step']}"
        )


# --------------------------------------------------------------------------------------------
# Losses and metrics


class LossNotDecreasing(BuiltinRule):
    name = "LossNotDecreasing"
    defaults: ClassVar = {
        "tensor_regex": None,
        "use_losses_collection": True,
        "num_steps": 10,
        "diff_percent": 0.1,
        "increase_threshold_percent": 5,
        "mode": None,
    }
    requires = ("losses",)
    recommendation = (
        "The loss is flat: raise the learning rate, check the labels match the images, or "
        "unfreeze more layers."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._state: dict[str, dict[str, Any]] = {}
        self.note = (
            "compares the mean saved loss of each window of num_steps steps with the previous"
        )

    def update(self, row: Row) -> None:
        if row["phase"] != "step" or row["mode"] != (self.p["mode"] or "TRAIN"):
            return
        regex = self.p["tensor_regex"]
        mine = (self.p["use_losses_collection"] and row["collection"] == "losses") or (
            regex and re.fullmatch(regex, row["name"])
        )
        if not mine:
            return
        st = self._state.setdefault(row["name"], {"anchor": row["step"], "win": [], "prev": None})
        step, value = row["step"], _f(row["mean"])
        if step - st["anchor"] >= self.p["num_steps"] and st["win"]:
            cur = sum(st["win"]) / len(st["win"])
            prev = st["prev"]
            if prev is not None and math.isfinite(prev) and math.isfinite(cur):
                decrease = 100.0 * (prev - cur) / max(abs(prev), 1e-12)
                self.check(
                    decrease >= self.p["diff_percent"],
                    step,
                    f"{row['name']} went from {prev:.4g} to {cur:.4g} "
                    f"({-decrease:+.2f}%) over {self.p['num_steps']} steps by step {step}",
                )
            st.update(prev=cur, win=[], anchor=step)
        st["win"].append(value)


def _epoch_loss(row: Row) -> float | None:
    """The epoch's train loss (TRAIN) or valid loss (EVAL) from the metrics collection."""
    if row["phase"] != "epoch" or row["name"] != "metrics/loss":
        return None
    if row["mode"] == "EVAL" and row.get("split") not in (None, "", "valid"):
        return None
    return _f(row["mean"])


class Overfit(BuiltinRule):
    name = "Overfit"
    defaults: ClassVar = {"start_step": 0, "patience": 1, "ratio_threshold": 0.1}
    requires = ("metrics",)
    recommendation = (
        "Validation loss runs away from training loss: add augmentation, dropout or weight "
        "decay, use more data, or stop earlier (early_stopping)."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._pending: dict[int, dict[str, float]] = {}
        self._run = 0

    def update(self, row: Row) -> None:
        loss = _epoch_loss(row)
        if loss is None or row["step"] < self.p["start_step"]:
            return
        pair = self._pending.setdefault(row["epoch"], {})
        pair[row["mode"]] = loss
        if len(pair) < 2:
            return
        del self._pending[row["epoch"]]
        train, valid = pair["TRAIN"], pair["EVAL"]
        ratio = (valid - train) / max(abs(train), 1e-12)
        self._run = self._run + 1 if ratio > self.p["ratio_threshold"] else 0
        # SageMaker's patience: how many evaluations may exceed the ratio before it fires.
        self.check(
            self._run <= self.p["patience"],
            row["step"],
            f"valid loss {valid:.4g} is {ratio:.0%} above train loss {train:.4g} "
            f"in epoch {row['epoch'] + 1}",
        )


class Overtraining(BuiltinRule):
    name = "Overtraining"
    defaults: ClassVar = {"patience_train": 5, "patience_validation": 10, "delta": 0.01}
    requires = ("metrics",)
    recommendation = (
        "The losses stopped improving: the extra epochs buy nothing; stop earlier "
        "(early_stopping) or lower the learning rate."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._best: dict[str, float] = {}
        self._stale: dict[str, int] = {}

    def update(self, row: Row) -> None:
        loss = _epoch_loss(row)
        if loss is None:
            return
        mode = row["mode"]
        best = self._best.get(mode)
        if best is None or loss < best - self.p["delta"]:
            self._best[mode], self._stale[mode] = loss, 0
        else:
            self._stale[mode] = self._stale.get(mode, 0) + 1
        patience = self.p["patience_train" if mode == "TRAIN" else "patience_validation"]
        which = "training" if mode == "TRAIN" else "validation"
        self.check(
            self._stale[mode] < patience,
            row["step"],
            f"{which} loss has not improved by {self.p['delta']} for {self._stale[mode]} "
            f"epochs (epoch {row['epoch'] + 1})",
        )


# --------------------------------------------------------------------------------------------
# Activations


class PoorWeightInitialization(BuiltinRule):
    name = "PoorWeightInitialization"
    defaults: ClassVar = {
        "activation_inputs_regex": None,
        "threshold": 10.0,
        "distribution_range": 0.001,
        "patience": 5,
        "steps": 10,
    }
    requires = ("activations",)
    recommendation = (
        "Activation variances differ by orders of magnitude between layers at the start: use "
        "a variance-preserving initialisation (Kaiming/Xavier) or normalisation layers."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._step: int | None = None
        self._vars: dict[str, float] = {}
        self.note = "compares activation variances across layers in the first `steps` steps"

    def update(self, row: Row) -> None:
        if row["collection"] != "activations" or row["phase"] != "step" or row["mode"] != "TRAIN":
            return
        if row["step"] >= self.p["steps"]:
            return
        regex = self.p["activation_inputs_regex"]
        if regex and not re.fullmatch(regex, row["name"]):
            return
        if self._step is not None and row["step"] != self._step:
            self.flush()
        self._step = row["step"]
        self._vars[row["name"]] = _f(row["std"]) ** 2

    def flush(self) -> None:
        if self._step is None or len(self._vars) < 2:
            self._vars, self._step = {}, None
            return
        hi = max(self._vars, key=lambda n: self._vars[n])
        lo = min(self._vars, key=lambda n: self._vars[n])
        ratio = self._vars[hi] / self._vars[lo] if self._vars[lo] > 0 else math.inf
        self.check(
            not ratio > self.p["threshold"],
            self._step,
            f"activation variance of {hi} is {ratio:.3g}x that of {lo} at step {self._step}",
        )
        self._vars, self._step = {}, None


def _inactive_fraction(row: Row, threshold_inactivity: float) -> float | None:
    hist = row.get("unit_hist")
    if not hist:
        return None
    total = sum(hist)
    if not total:
        return None
    k = max(1, min(UNIT_BINS, round(threshold_inactivity)))
    return sum(hist[:k]) / total


class _LayerInactivity(BuiltinRule):
    kinds: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = ""

    def update(self, row: Row) -> None:
        if row["collection"] != "activations" or row.get("kind") not in self.kinds:
            return
        regex = self.p.get("tensor_regex")
        if regex and not re.fullmatch(regex, row["name"]):
            return
        frac = _inactive_fraction(row, self.p["threshold_inactivity"])
        if frac is None:
            return
        self.check(
            not 100.0 * frac > self.p["threshold_layer"],
            row["step"],
            f"{frac:.0%} of the units of {row['name']} are {self.what} "
            f"(active in < {self.p['threshold_inactivity']}% of samples) at step {row['step']}",
        )


class DeadRelu(_LayerInactivity):
    name = "DeadRelu"
    defaults: ClassVar = {
        "tensor_regex": None,
        "threshold_inactivity": 1.0,
        "threshold_layer": 50.0,
    }
    requires = ("activations",)
    kinds = ("relu",)
    what = "dead"
    recommendation = (
        "Most ReLUs of a layer never fire: lower the learning rate, check the bias "
        "initialisation, or use LeakyReLU/GELU."
    )


class SaturatedActivation(_LayerInactivity):
    name = "SaturatedActivation"
    defaults: ClassVar = {
        "collection_names": None,
        "tensor_regex": None,
        "threshold_tanh": 0.97,
        "threshold_sigmoid": 0.97,
        "threshold_inactivity": 1.0,
        "threshold_layer": 50.0,
    }
    requires = ("activations",)
    kinds = ("tanh", "sigmoid")
    what = "saturated"
    recommendation = (
        "tanh/sigmoid units stuck at their limits pass no gradient: normalise the layer's "
        "inputs, lower the learning rate or use ReLU-like activations."
    )


# --------------------------------------------------------------------------------------------
# Labels, predictions, inputs


class ClassImbalance(BuiltinRule):
    name = "ClassImbalance"
    defaults: ClassVar = {
        "threshold_imbalance": 10,
        "threshold_misprediction": 0.7,
        "samples": 500,
        "argmax": True,
        "labels_regex": ".*labels",
        "predictions_regex": ".*predictions",
    }
    requires = ("labels", "predictions")
    recommendation = (
        "Some classes are far rarer (or far more often wrong) than others: collect more of "
        "them, oversample them, or weight the loss by class."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._counts: list[float] = []
        self._recent: deque = deque()  # the latest confusion matrices (flat) and their sizes
        self._ratio_done = False
        self._step = 0

    def update(self, row: Row) -> None:
        if row["mode"] != "TRAIN" or row["phase"] != "step" or not row.get("values"):
            return
        self._step = row["step"]
        if row["name"] == "labels/counts":
            vals = row["values"]
            if len(self._counts) < len(vals):
                self._counts += [0.0] * (len(vals) - len(self._counts))
            for i, v in enumerate(vals):
                self._counts[i] += v
            if not self._ratio_done and sum(self._counts) >= self.p["samples"]:
                self._check_ratio()
        elif row["name"] == "confusion_matrix":
            # Keep just enough recent matrices to cover `samples` labels: mispredictions are
            # judged on the model as it is now, not on its untrained first steps.
            self._recent.append(row["values"])
            while (
                len(self._recent) > 1
                and sum(sum(m) for m in list(self._recent)[1:]) >= (self.p["samples"])
            ):
                self._recent.popleft()

    def finish(self, now: float | None = None, finished: bool = True) -> None:
        if not self._ratio_done and sum(self._counts) > 0:
            self._check_ratio()
        if not self._recent or self._misprediction_done:
            return
        self._misprediction_done = True
        flat = [sum(col) for col in zip(*self._recent, strict=True)]
        c = round(math.sqrt(len(flat)))
        for i in range(c):
            r = flat[i * c : (i + 1) * c]
            total = sum(r)
            if total:
                wrong = 1 - r[i] / total
                self.check(
                    not wrong > self.p["threshold_misprediction"],
                    self._step,
                    f"class {i} is mispredicted in {wrong:.0%} of its latest "
                    f"{int(total)} training samples",
                )

    _misprediction_done = False

    def _check_ratio(self) -> None:
        self._ratio_done = True
        n = sum(self._counts)
        if n < self.p["samples"]:
            self.note = f"judged on {int(n)} labels (fewer than samples={self.p['samples']})"
        hi, lo = max(self._counts), min(self._counts)
        ratio = hi / lo if lo > 0 else math.inf
        self.check(
            not ratio > self.p["threshold_imbalance"],
            self._step,
            f"the most frequent class has {ratio:.3g}x the samples of the rarest "
            f"({int(hi)} vs {int(lo)} in {int(n)} labels)",
        )


class CheckInputImages(BuiltinRule):
    name = "CheckInputImages"
    defaults: ClassVar = {
        "threshold_mean": 0.2,
        "threshold_samples": 500,
        "regex": ".*inputs.*",
        "channel": 1,
    }
    requires = ("inputs",)
    recommendation = (
        "Input images are not normalised (per-channel mean far from 0): subtract the mean and "
        "divide by the std of the backbone's preprocessing."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._sums: list[float] = []
        self._n = 0
        self._done = False
        self._step = 0

    def update(self, row: Row) -> None:
        if row["collection"] != "inputs" or row.get("kind") != "images" or self._done:
            return
        if not re.fullmatch(self.p["regex"], row["name"]) or not row.get("channel_mean"):
            return
        n = int(row.get("samples") or 1)
        means = row["channel_mean"]
        if not self._sums:
            self._sums = [0.0] * len(means)
        for i, m in enumerate(means):
            self._sums[i] += m * n
        self._n += n
        self._step = row["step"]
        if self._n >= self.p["threshold_samples"]:
            self._evaluate()

    def finish(self, now: float | None = None, finished: bool = True) -> None:
        if not self._done and self._n:
            self._evaluate()

    def _evaluate(self) -> None:
        # The mean over all channels and pixels: un-normalised pixels (0..1 or 0..255) are far
        # from 0 whatever the photos; one channel of a normalised set may sit near 0.3 on
        # real data (e.g. little blue), which is no pipeline fault.
        self._done = True
        if self._n < self.p["threshold_samples"]:
            self.note = f"judged on {self._n} images (fewer than threshold_samples)"
        means = [s / self._n for s in self._sums]
        mean = sum(means) / len(means)
        worst = max(range(len(means)), key=lambda c: abs(means[c]))
        self.check(
            not abs(mean) > self.p["threshold_mean"],
            self._step,
            f"input images have mean {mean:.3f} over {self._n} images (|mean| > "
            f"{self.p['threshold_mean']}; channel {worst}: {means[worst]:.3f})",
        )


class Confusion(BuiltinRule):
    name = "Confusion"
    defaults: ClassVar = {
        "category_no": None,
        "labels": None,
        "predictions": None,
        "labels_collection": "labels",
        "predictions_collection": "predictions",
        "min_diag": 0.9,
        "max_off_diag": 0.1,
    }
    requires = ("metrics",)
    recommendation = (
        "Some classes are confused with each other: look at those classes' images and labels, "
        "train longer, or unfreeze more layers."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._latest: Row | None = None
        self.note = "judged on the latest evaluation, at the end of training"

    def update(self, row: Row) -> None:
        # The model as trained is what matters, not its first epochs: keep the latest matrix.
        if row["name"] == "confusion_matrix" and row["mode"] == "EVAL" and row.get("values"):
            self._latest = row

    def finish(self, now: float | None = None, finished: bool = True) -> None:
        row, self._latest = self._latest, None
        if row is None:
            return
        full = round(math.sqrt(len(row["values"])))
        c = min(full, int(self.p["category_no"])) if self.p["category_no"] else full
        for i in range(c):
            r = row["values"][i * full : (i + 1) * full]
            total = sum(r)
            if not total:
                continue
            for j in range(c):
                v = r[j] / total
                if i == j:
                    ok = v >= self.p["min_diag"]
                    what = f"only {v:.0%} of class {i} is predicted right"
                else:
                    ok = v <= self.p["max_off_diag"]
                    what = f"{v:.0%} of class {i} is predicted as class {j}"
                self.check(ok, row["step"], f"{what} (epoch {row['epoch'] + 1})")


class StalledTraining(BuiltinRule):
    name = "StalledTraining"
    defaults: ClassVar = {
        "threshold": 1800,
        "stop_training_on_fire": False,
        "training_job_name_prefix": None,
    }
    recommendation = (
        "No training step for a long time: look for a hung data loader (a dead S3 mount, a "
        "worker deadlock) or a stuck collective."
    )

    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self._last: float | None = None
        self._last_step = 0
        self._fired_at: float | None = None

    def update(self, row: Row) -> None:
        t = row.get("wall_time")
        if t is None:
            return
        if self._last is not None and t - self._last > self.p["threshold"]:
            self.check(
                False,
                row["step"],
                f"no step for {t - self._last:.0f} s before step {row['step']}",
            )
        self._last = max(t, self._last or t)
        self._last_step = row["step"]

    def heartbeat(self, last_step_time: float, step: int, now: float | None = None) -> bool:
        """Live check from the watchdog thread; True when it fired now."""
        now = time.time() if now is None else now
        idle = now - last_step_time
        if idle > self.p["threshold"] and self._fired_at != last_step_time:
            self._fired_at = last_step_time
            self.check(False, step, f"no step for {idle:.0f} s after step {step}")
            return True
        return False

    def finish(self, now: float | None = None, finished: bool = True) -> None:
        if not finished and self._last is not None:
            self.heartbeat(self._last, self._last_step, now)
        self.datapoints = max(self.datapoints, 1 if self._last is not None else 0)


RULES: dict[str, type[BuiltinRule]] = {
    r.name: r
    for r in (
        VanishingGradient,
        ExplodingTensor,
        WeightUpdateRatio,
        AllZero,
        UnchangedTensor,
        LossNotDecreasing,
        Overfit,
        Overtraining,
        PoorWeightInitialization,
        SaturatedActivation,
        DeadRelu,
        ClassImbalance,
        CheckInputImages,
        Confusion,
        TensorVariance,
        StalledTraining,
    )
}


def make_rule(name: str, parameters: dict[str, Any] | None = None, action: str = "log"):
    """Build a built-in rule by SageMaker name.

    Raises:
        UserError: unknown name or parameter.
    """
    cls = RULES.get(name)
    if cls is None:
        import difflib

        close = difflib.get_close_matches(name, list(RULES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown debugger rule {name!r}{hint} (rules: {', '.join(RULES)})")
    return cls(parameters, action)


class RuleSet:
    """The rules of one run, fed the captured rows in order."""

    def __init__(self, rules: list[BuiltinRule]):
        self.rules = rules

    @classmethod
    def from_specs(cls, specs: Iterable[Any]) -> RuleSet:
        """From :class:`~visiontune.debug.config.RuleSpec` objects (or names)."""
        out = []
        for s in specs:
            if isinstance(s, str):
                out.append(make_rule(s))
            else:
                out.append(make_rule(s.name, s.parameters, s.action))
        return cls(out)

    def required_collections(self) -> set[str]:
        return {c for r in self.rules for c in r.requires}

    def get(self, name: str) -> BuiltinRule | None:
        return next((r for r in self.rules if r.name == name), None)

    def feed(self, rows: Iterable[Row]) -> list[BuiltinRule]:
        """Update every rule; return the rules with action ``stop`` that have fired."""
        rows = list(rows)
        for r in self.rules:
            for row in rows:
                r.update(row)
        return [r for r in self.rules if r.action == "stop" and r.triggered]

    def flush(self) -> list[BuiltinRule]:
        for r in self.rules:
            r.flush()
        return [r for r in self.rules if r.action == "stop" and r.triggered]

    def finish(self, now: float | None = None, finished: bool = True) -> None:
        for r in self.rules:
            r.finish(now, finished)

    def results(self, collections: Iterable[str] | None = None) -> list[RuleResult]:
        cols = list(collections) if collections is not None else None
        return [r.result(cols) for r in self.rules]
