"""Claim: cached augmented views (``augment_views``) train a frozen backbone with augmentation
at feature-cache speed, and augmentation that way does not cost accuracy against plain cached
features.

Same data (../shared/data/hymenoptera), efficientnet_lite0 (ImageNet weights), frozen backbone,
default optimisation (AdamW, lr 1e-3, batch 32, cosine), in one run, on this machine, with an
empty feature cache at the start:

  1. time to cache K views of every training image (after the plain features are cached);
  2. epoch time over the cached views vs over images with the same augmentation (no cache);
  3. accuracy after --epochs epochs of (augment none, cached) vs (augment light, K cached
     views), for several seeds; mean and spread. hymenoptera has no test split, so the
     reported accuracy is on its val split (153 images), as ``train`` reports it.

    .venv/bin/python benchmarks/feature_views.py [--views 8] [--epochs 15] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _timing import cpu_name

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera"


def run(root: Path, name: str, data: Path, args, **kw) -> dict:
    """One training run; returns its accuracy, epoch times and feature-pass times."""
    from visiontune.callbacks import Callback
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train

    passes: dict[str, float] = {}

    class Timer(Callback):
        def on_features_start(self, state, split, backbone):
            passes[split] = -time.perf_counter()

        def on_features_end(self, state, split):
            passes[split] += time.perf_counter()

    cfg = build_config(
        TrainConfig,
        None,
        {
            "data": str(data),
            "model": args.model,
            "weights": args.weights,
            "trainable": "head",
            "progress": False,
            "report": False,
            "output": str(root / name),
            "batch_size": args.batch_size,
            **({"workers": args.workers} if args.workers is not None else {}),
            **kw,
        },
    )
    t0 = time.perf_counter()
    result = train(cfg, [Timer()])
    return {
        "wall": time.perf_counter() - t0,
        "accuracy": result.test_metrics["accuracy"],
        "split": result.test_metrics["split"],
        "epoch_times": [h["epoch_time"] for h in result.history],
        "passes": passes,
        "cached": result.used_feature_cache,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-epochs", type=int, default=2, help="epochs timed over images")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} is absent (only in the project's CI checkout)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["VISIONTUNE_HOME"] = str(root / "home")  # a cold feature cache
        import torch

        print(
            f"{cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"load average {os.getloadavg()[0]:.1f} at start; {args.data.name}, "
            f"{args.model} frozen, K={args.views} views, {args.epochs} epochs, "
            f"seeds {args.seeds}",
            flush=True,
        )
        plain, views = [], []
        for seed in args.seeds:
            a = run(root, f"plain{seed}", args.data, args, seed=seed, augment="none",
                    epochs=args.epochs)  # fmt: skip
            b = run(root, f"views{seed}", args.data, args, seed=seed, augment="light",
                    augment_views=args.views, epochs=args.epochs)  # fmt: skip
            assert a["cached"] and b["cached"]
            plain.append(a)
            views.append(b)
            print(f"seed {seed}: plain {a['accuracy']:.4f}  views {b['accuracy']:.4f}  "
                  f"(view pass {b['passes'].get('train_views', 0):.1f}s)", flush=True)  # fmt: skip
        images = run(root, "images", args.data, args, seed=args.seeds[0], augment="light",
                     epochs=args.image_epochs)  # fmt: skip
        assert not images["cached"]
    train_pass = plain[0]["passes"]["train"]
    view_pass = statistics.mean(v["passes"]["train_views"] for v in views)
    epoch_views = statistics.median(t for v in views for t in v["epoch_times"])
    epoch_plain = statistics.median(t for a in plain for t in a["epoch_times"])
    epoch_images = statistics.median(images["epoch_times"])
    acc_plain = [a["accuracy"] for a in plain]
    acc_views = [b["accuracy"] for b in views]

    def ms(xs: list[float]) -> str:
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.4f} +- {sd:.4f}  ({', '.join(f'{x:.4f}' for x in xs)})"

    print()
    print(f"plain train features (1 pass):        {train_pass:8.1f} s")
    print(f"caching {args.views} augmented views (mean of seeds): {view_pass:8.1f} s "
          f"({view_pass / train_pass:.1f}x one plain pass)")  # fmt: skip
    print(f"epoch over cached plain features: {epoch_plain * 1000:6.1f} ms")
    print(f"epoch over cached views:      {epoch_views * 1000:10.1f} ms")
    print(f"epoch over images (light):    {epoch_images * 1000:10.1f} ms "
          f"({epoch_images / epoch_views:.0f}x the cached epoch)")  # fmt: skip
    print(f"views pay for themselves after {view_pass / epoch_images:.1f} image epochs")
    print(f"accuracy on {plain[0]['split']}, augment none, cached:      {ms(acc_plain)}")
    print(f"accuracy on {plain[0]['split']}, light, {args.views} cached views: {ms(acc_views)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cpu": cpu_name(),
                    "cpus": os.cpu_count(),
                    "views": args.views,
                    "epochs": args.epochs,
                    "seeds": args.seeds,
                    "plain_train_pass_s": train_pass,
                    "views_pass_s": view_pass,
                    "epoch_cached_plain_s": epoch_plain,
                    "epoch_cached_views_s": epoch_views,
                    "epoch_images_s": epoch_images,
                    "accuracy_plain": acc_plain,
                    "accuracy_views": acc_views,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
