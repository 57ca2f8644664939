"""Typed configuration for the training job.

One :class:`TrainConfig` flows through every stage. It is validated before any compute is spent,
loaded from YAML with ``key=value`` overrides winning, and saved as ``RUN/config.yaml`` so a run
can be repeated or resumed from its directory alone.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visiontune.debug.config import DebuggerConfig
from visiontune.errors import UserError
from visiontune.profile.config import ProfilerConfig
from visiontune.tracking.config import TrackingConfig


class Resolved(BaseModel):
    """What ``auto`` settings became on the machine that ran the job (written by ``train``)."""

    model_config = ConfigDict(extra="forbid")

    device: str
    precision: Literal["fp32", "bf16", "fp16"]
    workers: int
    batch_size: int
    uses_feature_cache: bool = False


class TrainConfig(BaseModel):
    """Everything that decides what a training run does."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    data: str = Field(description="dataset folder, s3:// prefix, http(s) archive or dataset name")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, ...)")
    split_ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/valid/test ratios for a root with no split folders"
    )
    split_seed: int = 0
    s3_cache: Literal["cache", "stream"] = Field(
        "cache", description="cache S3 images on local disk on first read, or stream every read"
    )
    limit_per_class: int | None = Field(None, ge=1, description="use at most N images per class")
    small_data_defaults: bool = Field(
        True,
        description="with < 20 training images per class, change the options left at default "
        "that small data calls for (batch, cached views, label smoothing, epochs), said in one line",
    )
    # cross-validation (issue #16): folds of train+valid pooled; the test split is untouched
    cv_folds: int | None = Field(
        None, ge=2, description="pool train+valid into K stratified folds (seeded by split_seed)"
    )
    cv_fold: int | None = Field(
        None, ge=0, description="with cv_folds: the fold validated on (the rest train)"
    )
    refit: bool = Field(
        False,
        description="train on train+valid with no held-out valid; the model is the last epoch",
    )

    # model
    model: str = "efficientnet_lite0"
    weights: str = Field("imagenet", description="imagenet | none | PATH to a state dict")
    trainable: str = Field("head", description="head | all | last:N")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    backbone_lr_scale: float = Field(
        1.0, gt=0.0, description="learning rate multiplier for trainable backbone layers"
    )
    image_size: int | None = Field(None, description="input size; default from the backbone")
    # heads for small data (issue #16): what sits on the backbone, and how it is fitted
    head: Literal["linear", "mlp", "probe"] = Field(
        "linear",
        description="linear | mlp (Linear-ReLU-Dropout-Linear) | probe (L2-regularised "
        "logistic regression fitted full-batch by L-BFGS on cached features; L2 strength "
        "weight_decay: scikit-learn's C = 1 / (n_train * weight_decay), twice that for 2 classes)",
    )
    head_hidden: int = Field(512, ge=1, description="hidden width of the mlp head")

    # optimisation
    lr: float = Field(1e-3, description="peak learning rate")
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(5, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_size: int = Field(10, ge=1, description="epochs between decays for schedule=step")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    augment: Literal["none", "light", "strong"] = "light"
    # cached augmented views (issue #16): augmentation at feature-cache speed
    augment_views: int = Field(
        0,
        ge=0,
        le=64,
        description="with a frozen backbone and augment light|strong, cache the backbone "
        "features of K augmented views per training image and train on them (0: off; at most "
        "64: each view is a full backbone pass over the training images)",
    )
    grad_clip: float | None = Field(None, gt=0.0)
    # weight averaging of the trainable part over the last epochs (issue #16)
    weight_averaging: Literal["none", "ema", "swa"] = Field(
        "none",
        description="none | ema (every step) | swa (equal weights, every epoch end); the "
        "averaged weights are validated, selected and exported",
    )
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay per optimizer step")
    swa_start: float = Field(
        0.75,
        ge=0.0,
        lt=1.0,
        description="fraction of the epochs after which weight averaging (ema or swa) starts",
    )

    # stopping and selection
    monitor: str = Field("valid_loss", description="metric that picks the best epoch")
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    early_stopping: int | None = Field(
        None, ge=1, description="stop after N epochs without improvement of the monitored metric"
    )

    # test-time augmentation (visiontune/tta.py): the final test evaluation only, not training
    tta: int = Field(
        0,
        ge=0,
        description="views averaged in the final test evaluation, as evaluate --tta-views "
        "(0: off; 2: the image and its mirror)",
    )

    # execution
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    workers: int | None = Field(None, ge=0, description="DataLoader workers; default from CPUs")
    feature_cache: bool = Field(
        True,
        description="with a frozen backbone and no augmentation (or augment_views), compute "
        "backbone features once",
    )
    max_steps_per_epoch: int | None = Field(None, ge=1)
    sync_batchnorm: bool = Field(
        False, description="under torchrun, batch-norm statistics over the global batch (CUDA)"
    )
    collective_timeout: float = Field(
        1800.0, gt=0, description="seconds a torchrun rank waits for the others before failing"
    )
    checkpoint_every_steps: int | None = Field(None, ge=1)
    output: str = Field("runs/latest", description="run directory, local or s3://bucket/prefix")
    progress: bool = True
    report: bool = Field(True, description="write RUN/report.html at the end of the run")
    resolved: Resolved | None = Field(
        None, description="what auto settings resolved to (written by the run, not an input)"
    )
    callbacks: list[str] = Field(
        default_factory=list,
        description="callbacks by name (debugger, profiler, module:Class) to attach to the loop",
    )
    tracking: TrackingConfig | None = Field(
        None, description="log the run to MLflow (see docs/tracking.md)"
    )
    debugger: DebuggerConfig | None = Field(
        None, description="capture tensors and run rules while training (docs/debugging.md)"
    )
    profiler: ProfilerConfig = Field(default_factory=ProfilerConfig)

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"lr must be > 0, got {v}")
        return v

    @field_validator("trainable")
    @classmethod
    def _trainable_form(cls, v: str) -> str:
        if v in ("head", "all"):
            return v
        if v.startswith("last:") and v[5:].isdigit() and int(v[5:]) >= 1:
            return v
        raise ValueError(f"trainable must be head, all or last:N (N >= 1), got {v!r}")

    @field_validator("tta")
    @classmethod
    def _tta_views(cls, v: int) -> int:
        if v:
            from visiontune.tta import MAX_VIEWS  # only when asked for: it imports torch

            if not 2 <= v <= MAX_VIEWS:
                raise ValueError(f"tta must be 0 (off) or 2 to {MAX_VIEWS} views, got {v}")
        return v

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        from visiontune.data.splits import split_ratio_error

        problem = split_ratio_error(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _cross_validation(self) -> TrainConfig:
        if (self.cv_folds is None) != (self.cv_fold is None):
            raise ValueError("cv_folds and cv_fold go together (cv_fold: which fold validates)")
        if self.cv_folds is not None and self.cv_fold >= self.cv_folds:
            raise ValueError(
                f"cv_fold must be below cv_folds ({self.cv_folds}), got {self.cv_fold}"
            )
        if self.refit and self.cv_folds is not None:
            raise ValueError("refit trains on all of train+valid: it takes no cv_folds")
        if self.refit and self.early_stopping is not None:
            raise ValueError("refit holds out no valid split to stop early on")
        return self

    @model_validator(mode="after")
    def _monitor_mode(self) -> TrainConfig:
        if self.monitor_mode == "auto":
            mode = "min" if is_minimised(self.monitor) else "max"
            object.__setattr__(self, "monitor_mode", mode)
        return self

    @model_validator(mode="after")
    def _probe_needs_cached_features(self) -> TrainConfig:
        # The probe is a full-batch fit over every training feature at once: it needs them
        # computed once (frozen backbone, no per-epoch augmentation), and a convex problem.
        if self.head != "probe":
            return self
        if (
            self.frozen_backbone
            and self.feature_cache
            and self.augment_views == 0
            and not {"augment", "augment_views"} & self.model_fields_set
        ):
            # The probe is a logistic regression on the frozen features: asked for without
            # a word about augmentation, it fits on the plain ones (recorded in config.yaml).
            object.__setattr__(self, "augment", "none")
        if not self.uses_feature_cache:
            raise ValueError(
                "head=probe fits on cached backbone features: it needs trainable=head, "
                "feature_cache=true, and augment=none (plain features) or augment_views >= 1 "
                f"(cached augmented views) (here trainable={self.trainable}, "
                f"feature_cache={str(self.feature_cache).lower()}, augment={self.augment}, "
                f"augment_views={self.augment_views})"
            )
        if not self.weight_decay > 0:
            raise ValueError("head=probe needs weight_decay > 0 (its L2 strength)")
        return self

    @property
    def frozen_backbone(self) -> bool:
        return self.trainable == "head"

    @property
    def uses_feature_cache(self) -> bool:
        """The one rule: a frozen backbone, no augmentation or cached augmented views
        (``augment_views``), and the cache not turned off; then backbone features are computed
        once and the head trains on them."""
        return (
            self.frozen_backbone
            and self.feature_cache
            and (self.augment == "none" or self.augment_views > 0)
        )

    @property
    def uses_feature_views(self) -> bool:
        """The head trains on cached augmented views (``augment_views`` of them per image).

        With ``augment: none`` every view would equal the plain features, so none are made.
        """
        return self.uses_feature_cache and self.augment != "none" and self.augment_views > 0


def is_minimised(metric: str) -> bool:
    """The one rule for a metric's direction: losses are minimised, everything else maximised."""
    return "loss" in metric


def _coerce(value: str) -> Any:
    """Parse a ``key=value`` override the way YAML would (numbers, bools, null, lists)."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        # YAML 1.1 reads "1e-3" as a string; users mean a number.
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def _one_line(err: ValidationError, cls: type[BaseModel]) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(where, list(cls.model_fields), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown config key {where!r}{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid config value for {where!r}: {msg}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last of two ``lr:`` lines without a word (the YAML spec forbids
    duplicates), so in a long config file the first one looks set and is not.
    """

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then `key: value` overrides, on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says what is wrong
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def build_config(
    cls: type[BaseModel] = TrainConfig,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> Any:
    """Build a validated config from an optional YAML file and overrides (overrides win).

    Args:
        cls: the pydantic model to build.
        config_file: a YAML mapping of config keys.
        overrides: keys given on the command line; ``None`` values are ignored (a flag not
            given).
        settings: ``--set KEY=VALUE`` pairs (:func:`parse_overrides`), applied last; here
            ``None`` is a value (``--set limit_per_class=null`` unsets what the file set).

    Raises:
        UserError: the file is missing or not a mapping, a key is unknown, or a value is invalid.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(values, key.replace("-", "_"), value)
    for key, value in (settings or {}).items():
        _set_dotted(values, key.replace("-", "_"), value)
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise UserError(_one_line(e, cls)) from e


def read_config_file(config_file: str | os.PathLike) -> dict[str, Any]:
    """The keys of a YAML config file (``-`` in names read as ``_``), not yet validated.

    Raises:
        UserError: the file is missing, unreadable, not YAML text, names a key twice, or is
            not a mapping.
    """
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from e
    except UnicodeDecodeError:
        # An image or a checkpoint passed as --config by mistake.
        raise UserError(f"config file {path} is not a YAML text file") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """``profiler.enabled=false`` sets ``enabled`` inside the ``profiler`` section."""
    head, _, rest = key.partition(".")
    if not rest:
        values[head] = value
        return
    section = values.get(head)
    if isinstance(section, BaseModel):
        section = section.model_dump()
    if not isinstance(section, dict):
        section = {}
    values[head] = section = dict(section)
    _set_dotted(section, rest, value)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["lr=0.01", "epochs=3"]`` into a dict, YAML-typed."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _coerce(value)
    return out


def save_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write the config as YAML atomically."""
    from visiontune.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def load_saved_config(path: str | os.PathLike, cls: type[BaseModel] = TrainConfig) -> Any:
    """Read back a config written by :func:`save_config`."""
    return build_config(cls, config_file=path)
