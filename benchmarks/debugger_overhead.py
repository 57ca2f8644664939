"""Training step time with the debugger on, against no debugger, side by side in one run.

Claims (issue 10): the default debug config (losses + metrics + the default rules, save
interval 100) costs within 3% of the step time without a debugger; capturing weights and
gradients of every layer every 10 steps costs what this prints.

Each configuration trains the same model from the same start through the callback API exactly
as the training loop fires it (``CallbackList``), on synthetic batches already in memory so
the figure is the debugger's cost, not data loading. Configurations are interleaved over
several rounds so drift in machine load hits all alike; the best round of each is compared.

Run: .venv/bin/python benchmarks/debugger_overhead.py [--model resnet18] [--steps 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _timing import cpu_name, side_by_side
from torch import nn

from visiontune.callbacks import CallbackList, TrainState
from visiontune.config import TrainConfig
from visiontune.debug.callback import Debugger
from visiontune.debug.config import DebuggerConfig
from visiontune.models.registry import build_model


def run(model_name: str, size: int, batch: int, steps: int, debugger: Debugger | None,
        device: torch.device, workdir: Path) -> float:  # fmt: skip
    """Seconds per step over ``steps`` steps (after 5 warm-up steps)."""
    torch.manual_seed(0)
    model, _ = build_model(model_name, 10, weights="none")
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cfg = TrainConfig(data=str(workdir), output=str(workdir / "run"), model=model_name)
    state = TrainState(config=cfg, run_dir=workdir / "run", model=model, step_model=model,
                       num_classes=10, device=device)  # fmt: skip
    cbs = CallbackList([debugger] if debugger else [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    cbs.fire("on_train_start", state)
    state.phase = "train"
    cbs.fire("on_epoch_start", state)

    def step() -> None:
        if cbs.listens("on_step_start"):
            cbs.fire("on_step_start", state, (x, y))
        out = model(x)
        loss = loss_fn(out, y)
        if cbs.listens("on_before_backward"):
            cbs.fire("on_before_backward", state, out, loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cbs.listens("on_after_backward"):
            cbs.fire("on_after_backward", state, model)
        opt.step()
        state.step += 1
        if cbs.listens("on_step_end"):
            cbs.fire("on_step_end", state, (x, y), out, loss)

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    cbs.fire("on_epoch_end", state, {"train_loss": 1.0})
    cbs.fire("on_train_end", state, None)
    return elapsed / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{args.model} {args.size}px batch {args.batch}, {args.steps} steps x "
          f"{args.rounds} rounds on {device} ({where}), {torch.get_num_threads()} threads")  # fmt: skip

    configs = {
        "no debugger": lambda: None,
        "default (losses+metrics+rules, every 100)": lambda: Debugger(DebuggerConfig()),
        "weights+gradients, all layers, every 10": lambda: Debugger(
            DebuggerConfig(collections=["weights", "biases", "gradients"], save_interval=10)
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:

        def variant(i: int, make):
            return lambda r: run(
                args.model,
                args.size,
                args.batch,
                args.steps,
                make(),
                device,
                Path(tmp) / f"{r}-{i}",
            )

        times = side_by_side(
            {name: variant(i, make) for i, (name, make) in enumerate(configs.items())}, args.rounds
        )
    base = min(times["no debugger"])
    for name, ts in times.items():
        best = min(ts)
        print(f"{name:45s} {best * 1000:8.2f} ms/step   x{best / base:.3f} of no debugger")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
