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
    python benchmarks/train_throughput.py --device cuda --batch 64 --steps 20   # one GPU

On a GPU both loops move the model and every batch to it, the peak is the GPU's own matmul
peak, and every step's timestamp is taken after a CUDA synchronise, so queued kernels count.
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
from _timing import machine
from torch import nn

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.models.registry import build_model, get_spec
from visiontune.train import train

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"
GFLOP_FWD = {"resnet50": 8.2, "efficientnet_lite0": 0.4}  # per 224 px image


DEVICE = torch.device("cpu")  # --device sets it


def sync() -> None:
    """Wait for queued GPU work, so a timestamp means the step is done."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    """Achieved GFLOP/s of a large square matmul: the device's practical compute ceiling."""
    if DEVICE.type == "cuda":
        n, reps = 8192, 20
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def rate(stamps: list[tuple[float, int, int]], warmup: int) -> float:
    """Images/s from per-step (time, batch size, epoch) stamps, after ``warmup`` steps.

    Only steps that follow a step of the same epoch count: the gap across an epoch's end holds
    visiontune's validation and checkpoint, which the naive loop does not do.
    """
    pairs = [
        (b[0] - a[0], b[1])
        for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)
        if a[2] == b[2]
    ]
    return sum(n for _, n in pairs) / sum(t for t, _ in pairs)


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
    model.to(DEVICE)
    for name, p in model.named_parameters():
        p.requires_grad = not frozen or name.startswith("head.")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    stamps = []
    epoch = 0
    while len(stamps) < steps:
        epoch += 1
        for x, y in loader:
            x, y = x.to(DEVICE), y.to(DEVICE)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()
            stamps.append((time.perf_counter(), len(y), epoch))
            if len(stamps) == steps:
                break
    return stamps


class StepClock(Callback):
    def __init__(self):
        self.stamps: list[tuple[float, int, int]] = []

    def on_step_end(self, state, batch, outputs, loss):
        sync()
        self.stamps.append((time.perf_counter(), int(batch[1].shape[0]), state.epoch))


def visiontune_loop(
    data: Path, model_name: str, frozen: bool, batch: int, steps: int, out: Path, **kw
) -> list:
    clock = StepClock()
    per_epoch = max(1, sum(1 for f in (data / "train").rglob("*") if f.is_file()) // batch)
    values = {
        "data": str(data),
        "model": model_name,
        "weights": "none" if model_name != "efficientnet_lite0" else "imagenet",
        "trainable": "head" if frozen else "all",
        "augment": "light",
        "batch_size": batch,
        "epochs": -(-steps // per_epoch) + 1,  # enough epochs for ``steps`` steps
        "max_steps_per_epoch": steps,
        "output": str(out),
        "progress": False,
        "device": DEVICE.type,
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
            "device": DEVICE.type,
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
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if not (args.data / "train").is_dir():
        sys.exit(f"benchmark data not found: {args.data} (needs train/<class>/ images)")

    tmp = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    os.environ.setdefault("VISIONTUNE_HOME", str(tmp / "home"))
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"machine: {machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if DEVICE.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(DEVICE)}")
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
