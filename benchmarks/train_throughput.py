"""Training throughput: visiontune against the seed's naive loop, side by side in one run.

The naive loop is what the SageMaker seed script does: torchvision ``ImageFolder``, a default
``DataLoader`` (no workers), fp32 eager, NCHW, frozen layers via ``requires_grad=False`` only
(batch norm still in train mode, autograd still recording the backbone's forward).

visiontune runs its real ``train()`` on the same images, model, augmentation and batch size;
a callback timestamps every optimizer step, and both sides are measured over the same steps
after the same warm-up. It prints images/s, the ratio, and the share of the machine's
FLOP-bound limit (matmul peak measured in this run; ResNet50 ~8.2 GFLOP per 224 px image
forward, ~3x that to train).

A second part checks accuracy: a frozen efficientnet_lite0 trained with mixed precision ends
within a point of the same run in fp32.

    .venv/bin/python benchmarks/train_throughput.py            # all, ~10 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --models efficientnet_lite0 --steps 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.models.registry import build_model, get_spec
from visiontune.train import train

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"
GFLOP_FWD = {"resnet50": 8.2, "efficientnet_lite0": 0.4}  # per 224 px image


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    """Achieved GFLOP/s of a large square matmul: the machine's practical compute ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def rate(stamps: list[tuple[float, int]], warmup: int) -> float:
    """Images/s from per-step (time, batch size) stamps, after ``warmup`` steps."""
    (t0, _), rest = stamps[warmup - 1], stamps[warmup:]
    return sum(n for _, n in rest) / (rest[-1][0] - t0)


def naive_loop(data: Path, model_name: str, frozen: bool, batch: int, steps: int) -> list:
    """The seed's loop, as written in typical SageMaker fine-tuning scripts."""
    from torchvision import datasets, transforms

    spec = get_spec(model_name)
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(spec.preprocess.mean, spec.preprocess.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(data / "train"), tf), batch_size=batch, shuffle=True
    )
    torch.manual_seed(0)
    model, _ = build_model(model_name, 2, weights="none")
    for name, p in model.named_parameters():
        p.requires_grad = not frozen or name.startswith("head.")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    stamps = []
    while len(stamps) < steps:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            stamps.append((time.perf_counter(), len(y)))
            if len(stamps) == steps:
                break
    return stamps


class StepClock(Callback):
    def __init__(self):
        self.stamps: list[tuple[float, int]] = []

    def on_step_end(self, state, batch, outputs, loss):
        self.stamps.append((time.perf_counter(), int(batch[1].shape[0])))


def visiontune_loop(
    data: Path, model_name: str, frozen: bool, batch: int, steps: int, out: Path, **kw
) -> list:
    clock = StepClock()
    values = {
        "data": str(data),
        "model": model_name,
        "weights": "none" if model_name != "efficientnet_lite0" else "imagenet",
        "trainable": "head" if frozen else "all",
        "augment": "light",
        "batch_size": batch,
        "epochs": 1,
        "max_steps_per_epoch": steps,
        "output": str(out),
        "progress": False,
        **kw,
    }
    train(build_config(TrainConfig, None, values), [clock])
    return clock.stamps


def multi_epoch(data: Path, model_name: str, batch: int, epochs: int, tmp: Path) -> None:
    """A frozen backbone over several epochs: naive recomputes the backbone every epoch;
    visiontune (no augmentation) computes features once, from a cold cache, timed whole."""
    n_train = sum(1 for p in (data / "train").rglob("*") if p.is_file())
    steps = epochs * -(-n_train // batch)
    t = time.perf_counter()
    naive_loop(data, model_name, True, batch, steps)
    naive = time.perf_counter() - t
    os.environ["VISIONTUNE_HOME"] = str(tmp / f"cold-{model_name}")  # no cached features
    t = time.perf_counter()
    visiontune_loop(data, model_name, True, batch, 10**6, tmp / f"{model_name}-cached",
                    epochs=epochs, augment="none", max_steps_per_epoch=None)  # fmt: skip
    vt = time.perf_counter() - t
    print(
        f"{model_name:<18} frozen, {epochs} epochs of {n_train} images: naive {naive:.1f} s, "
        f"visiontune (feature cache, whole job incl. eval and export) {vt:.1f} s: "
        f"{naive / vt:.2f}x",
        flush=True,
    )


def accuracy_parity(data: Path, tmp: Path) -> None:
    """Frozen efficientnet_lite0: mixed precision vs fp32, same seed, same epochs."""
    accs = {}
    for precision in ("auto", "fp32"):
        values = {
            "data": str(data),
            "model": "efficientnet_lite0",
            "trainable": "head",
            "augment": "none",
            "epochs": 10,
            "lr": 0.003,
            "batch_size": 32,
            "precision": precision,
            "output": str(tmp / f"acc-{precision}"),
            "progress": False,
        }
        r = train(build_config(TrainConfig, None, values))
        accs[precision] = r.best_metrics["valid_accuracy"]
    diff = abs(accs["auto"] - accs["fp32"]) * 100
    print(
        f"\naccuracy (frozen efficientnet_lite0, hymenoptera val): mixed precision "
        f"{accs['auto']:.4f}, fp32 {accs['fp32']:.4f}, difference {diff:.2f} points"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="measured steps after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", type=Path, default=HYMENOPTERA)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the whole-job comparison")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        sys.exit(f"benchmark data not found: {args.data} (needs train/<class>/ images)")

    tmp = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    os.environ.setdefault("VISIONTUNE_HOME", str(tmp / "home"))
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"batch {args.batch}, {args.steps} measured steps after {args.warmup} warm-up\n")
    header = f"{'model':<18} {'mode':<7} {'naive img/s':>11} {'visiontune':>11} {'ratio':>6}"
    print(header + f" {'naive %peak':>11} {'vt %peak':>9}")
    total = args.steps + args.warmup
    for model_name in args.models:
        for frozen in (False, True):
            mode = "frozen" if frozen else "full"
            naive = rate(naive_loop(args.data, model_name, frozen, args.batch, total), args.warmup)
            out = tmp / f"{model_name}-{mode}"
            vt = rate(
                visiontune_loop(args.data, model_name, frozen, args.batch, total, out),
                args.warmup,
            )
            flop = GFLOP_FWD[model_name] * (1 if frozen else 3)
            best_peak = max(peak32, peak16)
            print(
                f"{model_name:<18} {mode:<7} {naive:>11.2f} {vt:>11.2f} {vt / naive:>5.2f}x"
                f" {100 * naive * flop / best_peak:>10.1f}% {100 * vt * flop / best_peak:>8.1f}%",
                flush=True,
            )
    print("\nwhole jobs, frozen backbone, no augmentation for visiontune (features cached):")
    for model_name in args.models:
        multi_epoch(args.data, model_name, args.batch, args.epochs, tmp)
    if not args.skip_accuracy:
        accuracy_parity(args.data, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
