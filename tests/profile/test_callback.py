"""The profiler callback driven event by event with a real TrainState, as the loop drives it."""

from __future__ import annotations

import json

import pytest
import torch

from visiontune.callbacks import CallbackList, TrainState, resolve_callbacks
from visiontune.config import TrainConfig, build_config
from visiontune.profile.callback import ProfilerCallback, from_config
from visiontune.profile.data import load_profile
from visiontune.rules import read_results


def make_state(tmp_path, workers: int = 0, **profiler) -> TrainState:
    cfg = build_config(
        TrainConfig,
        None,
        {"data": "x", "output": str(tmp_path), "batch_size": 4, "profiler": profiler},
    )
    model = torch.nn.Linear(8, 3)
    return TrainState(
        config=cfg,
        run_dir=tmp_path,
        model=model,
        step_model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        device=torch.device("cpu"),
        workers=workers,
    )


def run_steps(cbs: CallbackList, state: TrainState, epochs: int = 2, steps: int = 6) -> None:
    """The event sequence of the loop, with real forward/backward/optimizer work between."""
    model, opt = state.model, state.optimizer
    cbs.fire("on_train_start", state)
    for epoch in range(epochs):
        state.epoch, state.phase = epoch, "train"
        cbs.fire("on_epoch_start", state)
        for _ in range(steps):
            cbs.fire("on_batch_start", state)
            batch = (torch.randn(4, 8), torch.randint(0, 3, (4,)))
            cbs.fire("on_step_start", state, batch)
            out = model(batch[0])
            loss = torch.nn.functional.cross_entropy(out, batch[1])
            cbs.fire("on_before_backward", state, out, loss)
            opt.zero_grad()
            loss.backward()
            cbs.fire("on_after_backward", state, model)
            opt.step()
            state.step += 1
            cbs.fire("on_step_end", state, batch, out, loss)
        state.phase = "eval"
        cbs.fire("on_evaluation_start", state, "valid")
        cbs.fire("on_evaluation_end", state, "valid", {"accuracy": 0.5})
        cbs.fire("on_epoch_end", state, {"epoch": epoch + 1})
        state.epoch = epoch + 1  # as the loop does: epochs completed, before the checkpoint
        state.phase = "checkpoint"
        cbs.fire("on_checkpoint_start", state)
        cbs.fire("on_checkpoint", state, str(state.run_dir / "checkpoints" / "last.pt"))
    state.phase = "export"
    cbs.fire("on_export_start", state)
    cbs.fire("on_export_end", state, state.run_dir / "model")


def test_profiler_is_on_by_default_and_off_when_disabled(tmp_path):
    on = build_config(TrainConfig, None, {"data": "x"})
    assert any(isinstance(cb, ProfilerCallback) for cb in resolve_callbacks(on))
    off = build_config(TrainConfig, None, {"data": "x", "profiler": {"enabled": False}})
    assert from_config(off) is None
    assert not any(isinstance(cb, ProfilerCallback) for cb in resolve_callbacks(off))


@pytest.mark.parametrize(
    "bad", [{"sample_interval_ms": 50}, {"sample_interval_ms": 61_000}, {"profile_steps": "10-5"}]
)
def test_profiler_settings_out_of_range_are_rejected_up_front(bad):
    from visiontune.errors import UserError

    with pytest.raises(UserError, match="profiler"):
        build_config(TrainConfig, None, {"data": "x", "profiler": bad})


def test_every_phase_is_timed_and_rules_are_written(tmp_path):
    state = make_state(tmp_path, sample_interval_ms=100)
    prof = from_config(state.config)
    cbs = CallbackList([prof])
    run_steps(cbs, state)
    cbs.fire("on_train_end", state, object())

    data = load_profile(tmp_path)
    assert data.steps["step"].tolist() == list(range(1, 13))
    assert data.steps["epoch"].tolist() == [1] * 6 + [2] * 6
    for phase in ("data_wait", "forward", "backward", "optimizer", "step_time", "loss", "lr"):
        v = data.steps[phase]
        assert (v >= 0).all(), phase
    total = data.steps["step_time"]
    parts = (
        data.steps["data_wait"]
        + data.steps["forward"]
        + data.steps["backward"]
        + data.steps["optimizer"]
    )
    assert (parts <= total + 1e-9).all()  # the phases are disjoint slices of the step
    assert data.steps["lr"][0] == pytest.approx(0.1)
    phases = [(p["phase"], p["epoch"]) for p in data.phases]
    assert phases == [("eval", 1), ("checkpoint", 1), ("eval", 2), ("checkpoint", 2), ("export", 2)]
    meta = data.meta
    assert meta["status"] == "finished"
    assert meta["start"] <= meta["first_step"] <= meta["end"]
    assert meta["workers"] == 0 and meta["batch_size"] == 4
    rules = {r.rule: r for r in read_results(tmp_path / "profile" / "rule_results.json")}
    assert {"LowGPUUtilization", "Dataloader", "StepOutlier", "DataWaitShare"} <= set(rules)
    # No GPU was sampled: GPU rules say so and never fire.
    for name in (
        "LowGPUUtilization",
        "CPUBottleneck",
        "BatchSize",
        "GPUMemoryIncrease",
        "LoadBalancing",
    ):
        assert not rules[name].applicable and not rules[name].triggered
        assert "not applicable" in rules[name].message


def test_sampler_thread_stops_when_the_run_fails(tmp_path):
    import threading

    state = make_state(tmp_path, sample_interval_ms=100)
    prof = from_config(state.config)
    cbs = CallbackList([prof])
    cbs.fire("on_train_start", state)
    assert any(t.name == "visiontune-sampler" for t in threading.enumerate())
    state.error = "RuntimeError: boom"
    cbs.fire("on_train_end", state, None)
    assert not any(t.name == "visiontune-sampler" for t in threading.enumerate())
    meta = json.loads((tmp_path / "profile" / "meta.json").read_text())
    assert meta["status"] == "error" and meta["error"] == "RuntimeError: boom"
    assert (tmp_path / "profile" / "rule_results.json").is_file()


def test_torch_profiler_window_writes_a_trace_and_top_operators(tmp_path):
    state = make_state(tmp_path, profile_steps="2-3")
    cbs = CallbackList([from_config(state.config)])
    run_steps(cbs, state, epochs=1, steps=5)
    cbs.fire("on_train_end", state, object())
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]  # what Perfetto and chrome://tracing open
    ops = json.loads((tmp_path / "profile" / "top_ops.json").read_text())
    assert any("addmm" in o["name"] or "linear" in o["name"] for o in ops)
    meta = json.loads((tmp_path / "profile" / "meta.json").read_text())
    assert meta["torch_profiler"]["first_step"] == 2 and meta["torch_profiler"]["last_step"] == 3


def test_only_rank_zero_writes_the_profile(tmp_path):
    state = make_state(tmp_path, sample_interval_ms=100)
    state.rank, state.world_size = 1, 2
    cbs = CallbackList([from_config(state.config)])
    run_steps(cbs, state, epochs=1, steps=3)
    cbs.fire("on_train_end", state, object())
    assert not (tmp_path / "profile").exists()
