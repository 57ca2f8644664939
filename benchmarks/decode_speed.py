"""JPEG decoding with vs without Pillow draft() (reduced-size DCT decode), to the 224 input.

Claim: when the photo is much larger than the size training needs, decoding with
``decode_size`` (``Image.draft``) is several times faster, and it costs nothing otherwise.
Both variants run side by side in one process, interleaved over several rounds, on the real
hymenoptera photos (skips cleanly when ../shared is absent), through the real eval transform
(resize the shorter side to 256, centre-crop 224).

Run: .venv/bin/python benchmarks/decode_speed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from visiontune.data.images import decode_image, load_image
from visiontune.data.transforms import Preprocess, decode_size_hint, eval_transform

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"


def images_per_second(blobs: list[bytes], transform, decode_size: int | None) -> float:
    start = time.perf_counter()
    for blob in blobs:
        transform(load_image(blob, decode_size))
    return len(blobs) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skip: real data not present at {DATA}")
        return 0
    torch.set_num_threads(1)  # measure decoding, not how many cores the resize can grab
    preprocess = Preprocess()  # 224 input, shorter side resized to 256
    transform = eval_transform(preprocess)
    hint = decode_size_hint(preprocess)

    paths = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    blobs = [p.read_bytes() for p in paths]  # in memory: time decoding, not the disk
    large = [b for b in blobs if min(decode_image(b)[2]) >= 2 * hint]
    print(f"{len(blobs)} JPEGs from {DATA}; {len(large)} have a shorter side >= {2 * hint} px")
    print(f"target: eval transform to {preprocess.input_size} px (decode_size={hint})\n")

    for label, subset in (("all photos", blobs), (f"photos >= {2 * hint} px", large)):
        if not subset:
            continue
        full, draft = [], []
        for _ in range(args.rounds):  # interleaved so drift in machine load hits both alike
            full.append(images_per_second(subset, transform, None))
            draft.append(images_per_second(subset, transform, hint))
        f, d = max(full), max(draft)
        print(
            f"{label:22} full decode {f:7.1f} img/s | draft() {d:7.1f} img/s | "
            f"ratio {d / f:4.2f}x  (best of {args.rounds})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
