"""The debugger as a training-loop callback: capture at save steps, rules beside training.

Cost model: a step that is not a save step costs a few attribute reads (and, when labels or
predictions are captured, one on-device bincount). A save step computes every requested
tensor's reductions on its device and copies them to the host once; the rules then look at
those few numbers. Files are written at checkpoints, epoch ends and the end of the run.

No hook is ever put on a parameter's gradient: gradients are read from ``param.grad`` after
backward, so frozen layers (which have none) are simply reported absent, never an error.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontune.callbacks import Callback, TrainState
from visiontune.debug import store
from visiontune.debug.config import DEFAULT_RULES, DebuggerConfig, should_save
from visiontune.debug.rules import BuiltinRule, RuleSet

if TYPE_CHECKING:
    import torch

    from visiontune.config import TrainConfig

_FROZEN = "frozen (requires_grad=False): no gradient to capture"


def from_config(cfg: TrainConfig) -> Debugger | None:
    """The callback registry's factory: a :class:`Debugger` when ``cfg.debugger`` enables it."""
    section = getattr(cfg, "debugger", None)
    if section is None or not section.enabled:
        return None
    return Debugger(section)


def _uses_feature_cache(state: TrainState) -> bool:
    cfg = state.config
    return bool(
        state.uses_feature_cache
        or (cfg.frozen_backbone and cfg.augment == "none" and cfg.feature_cache)
    )


class Debugger(Callback):
    """Captures collections at save steps into ``RUN/debug`` and runs the built-in rules.

    Args:
        config: what to capture and which rules to run (``TrainConfig.debugger``).
    """

    def __init__(self, config: DebuggerConfig | None = None):
        self.cfg = config or DebuggerConfig()
        specs = self.cfg.rules if self.cfg.rules is not None else list(DEFAULT_RULES)
        self.rules = RuleSet.from_specs(specs)
        self.collections = set(self.cfg.collections) | self.rules.required_collections()
        self.train_save = self.cfg.mode_config("TRAIN")
        self.eval_save = self.cfg.mode_config("EVAL")
        act = [self.cfg.activations_regex]
        sat = self.rules.get("SaturatedActivation")
        if sat is not None:
            act.append(r".*(tanh|sigmoid).*")
        if self.rules.get("DeadRelu") is not None:
            act.append(r".*relu.*")
        self._act_re = re.compile("|".join(f"(?:{a})" for a in act), re.IGNORECASE)
        self._thr_tanh = sat.p["threshold_tanh"] if sat else 0.97
        self._thr_sigmoid = sat.p["threshold_sigmoid"] if sat else 0.97
        cii = self.rules.get("CheckInputImages")
        self._channel = int(cii.p["channel"]) if cii else 1
        self._tensor_re = re.compile(self.cfg.tensor_regex) if self.cfg.tensor_regex else None
        self._raw_re = re.compile(self.cfg.save_raw) if self.cfg.save_raw else None
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.debug_dir: Path | None = None
        self._state: TrainState | None = None
        self._rows: list[dict[str, Any]] = []  # host rows not yet written
        self._pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        self._raw: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        self._calls: dict[str, int] = {}
        self._saving = False  # this step (or feature batch) is captured
        self._step = 0
        self._mode = "TRAIN"
        self._loss_done = False
        self._prev_weights: dict[str, torch.Tensor] = {}
        self._absent_done: set[str] = set()
        self._label_acc: torch.Tensor | None = None
        self._confusion_acc: torch.Tensor | None = None
        self._n_evals = 0
        self._fp: dict[str, Any] | None = None  # the feature pass in progress
        self._fp_seen: set[str] = set()
        self._notes: list[str] = []
        self._part = 1
        self._last_step_time = time.time()
        self._watchdog: threading.Thread | None = None
        self._stop_watchdog = threading.Event()
        self._finished = False
        self._first_step_checked = False
        self._resume_pending = False
        self._exporting = False

    # ---------------------------------------------------------------- run start / resume

    def on_train_start(self, state: TrainState) -> None:
        self._state = state
        self.debug_dir = Path(state.run_dir) / store.DEBUG_DIR
        if state.resumed or state.step > 0 or state.epoch > 0:
            # The loop restores the checkpoint after this event: the step to resume from is
            # known at the first epoch start (see _resume). Until then nothing is written.
            self._resume_pending = True
            self._part = store.next_part_index(self.debug_dir)
            self._notes = list(store.read_meta(self.debug_dir).get("not_captured", []))
            if state.step > 0 or state.epoch > 0:  # a loop that restored it already
                self._resume(state)
        elif self.debug_dir.exists():
            shutil.rmtree(self.debug_dir)  # a fresh run: nothing of an earlier attempt is kept
        self.debug_dir.mkdir(parents=True, exist_ok=True)
        if "activations" in self.collections and state.model is not None:
            for name, m in state.model.named_modules():
                leaf = name and not any(True for _ in m.children())
                if leaf and (
                    self._act_re.fullmatch(name) or self._act_re.fullmatch(type(m).__name__)
                ):
                    self._hooks.append(m.register_forward_hook(self._activation_hook(name, m)))
        self._write_meta()
        if self.rules.get("StalledTraining") is not None:
            self._last_step_time = time.time()
            self._watchdog = threading.Thread(
                target=self._watch, name="visiontune-debugger-stall", daemon=True
            )
            self._watchdog.start()

    def _resume(self, state: TrainState) -> None:
        """Drop what the killed run captured after its checkpoint; rebuild the rules' state."""
        self._resume_pending = False
        dropped = store.truncate_for_resume(self.debug_dir, state.step, state.epoch)  # type: ignore[arg-type]
        if dropped:
            print(
                f"debugger: dropped {dropped} rows captured after the checkpoint "
                "(they are captured again)",
                file=sys.stderr,
            )
        old = store.read_rows(self.debug_dir)  # type: ignore[arg-type]
        with self._lock:
            self.rules.feed(old)
        self._absent_done |= {r["name"] for r in old if r.get("absent")}
        self._fp_seen |= {r["split"] for r in old if r["phase"] == "features"}
        self._part = max(self._part, store.next_part_index(self.debug_dir))  # type: ignore[arg-type]
        self._n_evals = state.epoch

    def on_epoch_start(self, state: TrainState) -> None:
        if self._resume_pending:
            self._resume(state)

    # ---------------------------------------------------------------- feature-cache pass

    def on_features_start(self, state: TrainState, split: str, backbone: Any) -> None:
        wanted = {"activations", "inputs"} & self.collections
        if not wanted or self.cfg.feature_pass_samples <= 0:
            return
        self._fp = {"split": split, "seen": 0, "batch": 0}
        self._fp_seen.add(split)
        self._mode = "FEATURES"
        if backbone is not None and hasattr(backbone, "register_forward_pre_hook"):
            self._fp["hook"] = backbone.register_forward_pre_hook(self._feature_batch_hook)

    def _feature_batch_hook(self, module: Any, args: Any) -> None:
        fp = self._fp
        if fp is None:
            return
        self._materialize()
        x = args[0] if args else None
        n = int(x.shape[0]) if x is not None and hasattr(x, "shape") and x.dim() else 0
        self._saving = fp["seen"] < self.cfg.feature_pass_samples
        self._step = fp["batch"]
        self._calls.clear()
        fp["batch"] += 1
        fp["seen"] += n
        if self._saving and "inputs" in self.collections and x is not None:
            self._capture_inputs(x)

    def on_features_end(self, state: TrainState, split: str) -> None:
        fp, self._fp = self._fp, None
        if fp is None:
            return
        if "hook" in fp:
            fp["hook"].remove()
        self._materialize()
        self._saving = False
        self._mode = "TRAIN"
        self._note(
            f"backbone activations and input images of the {split} split were captured during "
            f"the feature-cache pass (mode FEATURES, first {self.cfg.feature_pass_samples} "
            "images), not per training step: the frozen backbone runs only then"
        )
        self._flush()

    # ---------------------------------------------------------------- training steps

    def on_step_start(self, state: TrainState, batch: Any) -> None:
        if not self._first_step_checked:
            self._first_step_checked = True
            self._check_feature_gap(state)
        self._mode = "TRAIN"
        self._step = state.step
        self._saving = should_save(self.train_save, state.step)
        if not self._saving:
            return
        self._loss_done = False
        self._calls.clear()
        model = state.model
        if model is not None and {"weights", "biases"} & self.collections:
            for name, p in model.named_parameters():
                coll = "biases" if name.endswith("bias") else "weights"
                if coll not in self.collections or not self._tensor_ok(name):
                    continue
                extra = {"trainable": p.requires_grad}
                self._add(coll, name, p, **extra)
                if coll == "weights" and p.requires_grad:
                    self._prev_weights[name] = p.detach().clone()
        if "inputs" in self.collections and isinstance(batch, (tuple, list)) and batch:
            self._capture_inputs(batch[0])

    def _capture_inputs(self, x: torch.Tensor) -> None:
        from visiontune.debug.capture import channel_mean

        images = x.dim() == 4
        extra: dict[str, torch.Tensor] = {}
        if images:
            extra["channel_mean"] = channel_mean(x, self._channel)
        self._add(
            "inputs",
            "inputs",
            x,
            kind="images" if images else "features",
            samples=int(x.shape[0]),
            tensors=extra,
        )

    def _activation_hook(self, name: str, module: Any):
        from visiontune.debug.capture import activation_kind

        kind = activation_kind(module)

        def hook(_m: Any, _inp: Any, out: Any) -> None:
            if not self._saving or self._mode not in ("TRAIN", "FEATURES"):
                return
            if not hasattr(out, "detach"):
                return
            from visiontune.debug.capture import unit_activity

            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            self._add(
                "activations",
                f"{name}_output_{k}",
                out,
                kind=kind,
                tensors={"unit_hist": unit_activity(out, kind, self._thr_tanh, self._thr_sigmoid)},
            )

        return hook

    def on_before_backward(self, state: TrainState, outputs: Any, loss: Any) -> None:
        if self._saving and self._mode == "TRAIN" and not self._loss_done:
            self._loss_done = True
            self._add("losses", "loss", loss)

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        if not self._saving or "gradients" not in self.collections:
            return
        target = state.model if state.model is not None else model
        for name, p in target.named_parameters():
            if not self._tensor_ok(name):
                continue
            gname = f"gradient/{name}"
            if p.grad is None:
                if gname not in self._absent_done:
                    self._absent_done.add(gname)
                    why = _FROZEN if not p.requires_grad else "no gradient reached it"
                    self._rows.append(self._row("gradients", gname, absent=True, note=why))
                continue
            self._add("gradients", gname, p.grad)

    def on_step_end(self, state: TrainState, batch: Any, outputs: Any, loss: Any) -> None:
        self._last_step_time = time.time()
        wants_labels = {"labels", "predictions"} & self.collections
        if wants_labels and isinstance(batch, (tuple, list)) and len(batch) > 1:
            self._accumulate_labels(state, batch[1], outputs)
        if not self._saving or self._mode != "TRAIN":
            return
        if not self._loss_done and loss is not None:
            self._loss_done = True
            self._add("losses", "loss", loss)
        import torch

        for name, p in state.model.named_parameters() if state.model is not None else []:
            prev = self._prev_weights.pop(name, None)
            if prev is not None:
                self._pending.append(
                    (
                        {"update_for": name},
                        {"update_l2": torch.linalg.vector_norm((p.detach() - prev).float())},
                    )
                )
        self._prev_weights.clear()
        if wants_labels and self._label_acc is not None:
            self._add_values("labels", "labels/counts", self._label_acc)
            self._add_values("predictions", "confusion_matrix", self._confusion_acc)
            self._label_acc = self._confusion_acc = None
        self._materialize()
        self._saving = False
        self._after_rows(state)
        if len(self._rows) > 20_000:
            self._flush()

    def _accumulate_labels(self, state: TrainState, targets: Any, outputs: Any) -> None:
        import torch

        c = state.num_classes or int(outputs.shape[-1])
        t = targets.detach().long().reshape(-1)
        if self._label_acc is None:
            self._label_acc = torch.zeros(c, device=t.device)
            self._confusion_acc = torch.zeros(c * c, device=t.device)
        ones = torch.ones_like(t, dtype=torch.float32)
        self._label_acc.scatter_add_(0, t, ones)
        pred = outputs.detach().argmax(-1).reshape(-1)
        self._confusion_acc.scatter_add_(0, t * c + pred, ones)  # type: ignore[union-attr]

    # ---------------------------------------------------------------- evaluation and epochs

    def on_evaluation_start(self, state: TrainState, split: str) -> None:
        self._mode = "EVAL"

    def on_export_start(self, state: TrainState) -> None:
        self._exporting = True

    def on_evaluation_end(self, state: TrainState, split: str, metrics: dict[str, Any]) -> None:
        self._mode = "TRAIN"
        if split != "valid" or self._exporting:
            return  # the final test of the best epoch is in RUN/evaluation*.json
        index = self._n_evals
        self._n_evals += 1
        if not should_save(self.eval_save, index):
            return
        common = {"mode": "EVAL", "phase": "epoch", "split": split}
        if "loss" in metrics:
            self._rows.append(self._scalar_row("losses", "loss", metrics["loss"], **common))
        if "metrics" in self.collections:
            for k in ("loss", "accuracy", "top5", "macro_f1"):
                if isinstance(metrics.get(k), (int, float)):
                    self._rows.append(
                        self._scalar_row("metrics", f"metrics/{k}", metrics[k], **common)
                    )
            cm = metrics.get("confusion_matrix")
            if cm:
                flat = [float(v) for r in cm for v in r]
                self._rows.append(
                    self._row(
                        "metrics",
                        "confusion_matrix",
                        values=flat,
                        shape=[len(cm), len(cm[0])],
                        numel=len(flat),
                        **common,
                    )
                )
        self._after_rows(state)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if "metrics" in self.collections:
            for k, v in metrics.items():
                if k.startswith("train_") and isinstance(v, (int, float)):
                    self._rows.append(
                        self._scalar_row("metrics", f"metrics/{k[6:]}", v, phase="epoch")
                    )
            if isinstance(metrics.get("lr"), (int, float)):
                self._rows.append(
                    self._scalar_row("metrics", "metrics/lr", metrics["lr"], phase="epoch")
                )
        self._after_rows(state)
        with self._lock:
            stops = self.rules.flush()
        self._apply_stops(state, stops)
        self._flush()

    def on_checkpoint_start(self, state: TrainState) -> None:
        self._flush()

    def on_checkpoint(self, state: TrainState, path: str) -> None:
        # Everything up to the checkpoint is on disk before training goes on.
        self._flush()

    def on_train_end(self, state: TrainState, result: Any) -> None:
        try:
            if self._resume_pending:
                self._resume(state)
            self._materialize()
            self._after_rows(state)
            self._finished = result is not None
            with self._lock:
                self.rules.finish(time.time(), finished=True)
            self._flush()
            self._write_meta()
            fired = [r for r in self.rules.rules if r.triggered]
            if fired:
                print(
                    "debugger: rules fired: "
                    + "; ".join(f"{r.name}: {r.finding}" for r in fired)
                    + f" (details: {self.debug_dir / store.RULE_RESULTS})",
                    file=sys.stderr,
                )
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._stop_watchdog.set()
            if self._watchdog is not None:
                self._watchdog.join(timeout=5)

    # ---------------------------------------------------------------- internals

    def _tensor_ok(self, name: str) -> bool:
        return self._tensor_re is None or bool(self._tensor_re.fullmatch(name))

    def _check_feature_gap(self, state: TrainState) -> None:
        """With the feature cache, say in one line what is not captured per step."""
        if not _uses_feature_cache(state):
            return
        wanted = sorted({"activations", "inputs"} & self.collections)
        if not wanted:
            return
        missing = [s for s in ("train",) if s not in self._fp_seen]
        if missing:
            line = (
                f"{' and '.join(wanted)} of the backbone are not captured: its features came "
                "from the feature cache (the frozen backbone did not run in this run); set "
                "feature_cache: false to capture them per step"
            )
        else:
            line = (
                f"per-step {' and '.join(wanted)} are the cached backbone features and the head's; "
                "the backbone's were captured during the feature pass (mode FEATURES)"
            )
        self._note(line)

    def _note(self, line: str) -> None:
        if line not in self._notes:
            self._notes.append(line)
            print(f"debugger: {line}", file=sys.stderr)
            self._write_meta()

    def _row(self, collection: str, name: str, **kw: Any) -> dict[str, Any]:
        st = self._state
        row = {
            "mode": self._mode,
            "step": self._step,
            "epoch": st.epoch if st is not None else 0,
            "phase": "features" if self._mode == "FEATURES" else "step",
            "split": self._fp["split"]
            if self._fp
            else ("train" if self._mode == "TRAIN" else None),
            "collection": collection,
            "name": name,
            "absent": False,
            "wall_time": time.time(),
        }
        row.update(kw)
        if row["phase"] == "epoch" and st is not None:
            row["step"] = st.step
        return row

    def _scalar_row(self, collection: str, name: str, value: float, **kw: Any) -> dict[str, Any]:
        import math

        v = float(value)
        return self._row(
            collection,
            name,
            shape=[],
            numel=1,
            min=v,
            max=v,
            mean=v,
            std=0.0,
            l1=abs(v),
            l2=abs(v),
            zero_frac=float(v == 0),
            nan=int(math.isnan(v)),
            inf=int(math.isinf(v)),
            values=[v],
            **kw,
        )

    def _add(self, collection: str, name: str, x: torch.Tensor, *, tensors=None, **meta: Any):
        """Queue ``x``'s reductions (computed on its device; read back at the step's end)."""
        from visiontune.debug.capture import reduce_tensor

        row = self._row(collection, name, shape=list(x.shape), numel=int(x.numel()), **meta)
        out = {"red": reduce_tensor(x, self.cfg.histogram_bins)}
        if x.numel() == 1:
            out["values"] = x.detach().float().reshape(1)
        out.update(tensors or {})
        self._pending.append((row, out))
        if self._raw_re is not None and self._raw_re.fullmatch(name):
            key = (self._mode, self._step)
            self._raw.setdefault(key, {})[name] = x.detach().to("cpu", copy=True).contiguous()

    def _add_values(self, collection: str, name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        row = self._row(collection, name, shape=list(t.shape), numel=int(t.numel()))
        self._pending.append((row, {"values": t}))

    def _materialize(self) -> None:
        """Copy the queued reductions to the host (one sync) and turn them into rows."""
        if not self._pending and not self._raw:
            return
        import torch

        pending, self._pending = self._pending, []
        if pending:
            flat = [t.detach().float().reshape(-1) for _, d in pending for t in d.values()]
            devs = {t.device for t in flat}
            if len(devs) > 1:
                flat = [t.cpu() for t in flat]
            host = torch.cat(flat).cpu().tolist() if flat else []
            pos = 0
            from visiontune.debug.capture import REDUCTIONS

            by_name: dict[str, dict[str, Any]] = {}
            for row, d in pending:
                vals: dict[str, list[float]] = {}
                for key, t in d.items():
                    n = t.numel()
                    vals[key] = host[pos : pos + n]
                    pos += n
                if "update_for" in row:
                    target = by_name.get(row["update_for"])
                    if target is not None:
                        target["update_l2"] = vals["update_l2"][0]
                    continue
                if "red" in vals:
                    red = vals["red"]
                    for i, k in enumerate(REDUCTIONS):
                        row[k] = red[i]
                    row["nan"], row["inf"] = int(row["nan"]), int(row["inf"])
                    if row["hist_min"] > row["hist_max"]:  # no finite value
                        row["hist_min"] = row["hist_max"] = None
                    row["hist"] = [int(c) for c in red[len(REDUCTIONS) :]]
                if "unit_hist" in vals:
                    row["unit_hist"] = [int(c) for c in vals["unit_hist"]]
                if "channel_mean" in vals:
                    row["channel_mean"] = vals["channel_mean"]
                if "values" in vals:
                    row["values"] = vals["values"]
                self._rows.append(row)
                if row["collection"] == "weights" and row["mode"] == "TRAIN":
                    by_name[row["name"]] = row
        if self._raw:
            from safetensors.torch import save_file

            from visiontune.io import atomic_write

            raw, self._raw = self._raw, {}
            for (mode, step), tensors in raw.items():
                path = store.raw_path(self.debug_dir, mode, step)  # type: ignore[arg-type]
                atomic_write(path, lambda tmp, t=tensors: save_file(t, tmp))

    def _after_rows(self, state: TrainState) -> None:
        """Feed the rows captured since the last call to the rules."""
        new = self._rows[getattr(self, "_fed", 0) :]
        self._fed = len(self._rows)
        if not new:
            return
        with self._lock:
            stops = self.rules.feed(new)
        self._apply_stops(state, stops)

    def _apply_stops(self, state: TrainState, stops: list[BuiltinRule]) -> None:
        if stops and state.stop_reason is None:
            r = stops[0]
            state.stop_reason = f"debugger rule {r.name} fired: {r.finding}"
            print(
                f"debugger: stopping at the end of this epoch: {r.name}: {r.finding}",
                file=sys.stderr,
            )

    def _flush(self) -> None:
        """Write the rows so far as one new part file, and the rule results."""
        if self.debug_dir is None or self._resume_pending:
            return  # a resumed run writes once it knows what to keep
        self._materialize()
        if self._state is not None:
            self._after_rows(self._state)
        if self._rows:
            store.write_part(self.debug_dir, self._part, self._rows)
            self._part += 1
            self._rows = []
            self._fed = 0
        self._write_results()

    def _write_results(self) -> None:
        from visiontune.rules import write_results

        with self._lock:
            results = self.rules.results(sorted(self.collections))
        write_results(self.debug_dir / store.RULE_RESULTS, results)  # type: ignore[operator]

    def _write_meta(self) -> None:
        from visiontune.io import atomic_write_json

        if self.debug_dir is None:
            return
        atomic_write_json(
            self.debug_dir / store.META,
            {
                "format": store.FORMAT,
                "collections": sorted(self.collections),
                "save_config": {
                    "TRAIN": self.train_save.model_dump(),
                    "EVAL": self.eval_save.model_dump(),
                },
                "activations_regex": self._act_re.pattern,
                "histogram_bins": self.cfg.histogram_bins,
                "rules": [
                    {"name": r.name, "parameters": r.p, "action": r.action}
                    for r in self.rules.rules
                ],
                "feature_cache": bool(self._state and _uses_feature_cache(self._state)),
                "not_captured": self._notes,
                "finished": self._finished,
            },
        )

    def _watch(self) -> None:
        rule = self.rules.get("StalledTraining")
        assert rule is not None
        interval = min(max(float(rule.p["threshold"]) / 10, 0.02), 60.0)
        while not self._stop_watchdog.wait(interval):
            st = self._state
            with self._lock:
                fired = rule.heartbeat(self._last_step_time, st.step if st else 0)  # type: ignore[attr-defined]
            if fired:
                print(f"debugger: StalledTraining: {rule.finding}", file=sys.stderr)
                if st is not None:
                    self._apply_stops(st, [rule] if rule.action == "stop" else [])
                    if self.debug_dir is not None:
                        self._write_results()
