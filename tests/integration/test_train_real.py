"""Real photos and real ImageNet weights: the EfficientNet-Lite mappings and a frozen run."""

from __future__ import annotations

import json

import pytest
import torch

from visiontune.config import TrainConfig, build_config
from visiontune.data.folder import load_image
from visiontune.inference import preprocess_batch
from visiontune.models.registry import build_model
from visiontune.train import train

pytestmark = pytest.mark.integration

ANT, BEE = 310, 309  # ImageNet-1k class indices


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_head_recognises_ants_and_bees(hymenoptera, name):
    """Each package's weights, mapped onto timm, label real photos with the right ImageNet class.

    A wrong mapping (shifted tensors, wrong normalisation or input size) gives near-random
    labels over 1000 classes, so a clear majority proves every layer loaded where it belongs.
    Every third val/ photo (24 ants, 28 bees) keeps three backbones within seconds on 2 cores.
    """
    model, spec = build_model(name, 1000, weights="imagenet", keep_pretrained_head=True)
    model.eval()
    for folder, want in (("ants", ANT), ("bees", BEE)):
        files = sorted((hymenoptera / "val" / folder).iterdir())[::3]
        images = [load_image(f, decode_size=spec.preprocess.resize_size) for f in files]
        with torch.inference_mode():
            pred = model(preprocess_batch(images, spec.preprocess)).argmax(1)
        share = (pred == want).float().mean().item()
        assert share > 0.7, f"{name}: only {share:.0%} of val/{folder} labelled as ImageNet {want}"


def test_frozen_backbone_reaches_90_percent_on_hymenoptera(hymenoptera, tmp_path, cli):
    cfg = build_config(
        TrainConfig,
        None,
        {
            "data": str(hymenoptera),
            "model": "efficientnet_lite0",
            "trainable": "head",
            "augment": "none",
            "epochs": 12,
            "batch_size": 32,
            "lr": 0.003,
            "output": str(tmp_path / "run"),
            "progress": False,
        },
    )
    result = train(cfg)
    assert result.used_feature_cache
    assert max(h["valid_accuracy"] for h in result.history) >= 0.90
    assert result.test_metrics["accuracy"] >= 0.90  # the exported (best) epoch, on val/
    # The placeholder GIF in train/ants is a real image (not an ant): it trains, not skipped.
    assert result.bad_images == 0
    code, out, _ = cli("evaluate", tmp_path / "run" / "model", "--data", hymenoptera,
                       "--split", "val", "--json")  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["count"] == 153
