"""The ``debugger:`` section of a training config (pydantic only: cheap to import).

Shaped like SageMaker Debugger's ``DebuggerHookConfig``: collections to capture, a save
config (``save_interval``, ``start_step``, ``end_step``, ``save_steps``, per mode), and the
built-in rules to run beside training with their parameters and actions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

COLLECTIONS = (
    "losses",
    "metrics",
    "weights",
    "biases",
    "gradients",
    "activations",
    "inputs",
    "labels",
    "predictions",
)


class SaveConfigMode(BaseModel):
    """When to save in one mode (TRAIN or EVAL), as smdebug's ``SaveConfigMode``."""

    model_config = ConfigDict(extra="forbid")

    save_interval: int | None = Field(None, ge=1, description="save every N steps")
    start_step: int | None = Field(None, ge=0, description="first step to save")
    end_step: int | None = Field(None, ge=0, description="stop saving at this step (exclusive)")
    save_steps: list[int] | None = Field(
        None, description="save exactly these steps (save_interval is then ignored)"
    )


class RuleSpec(BaseModel):
    """One built-in rule to run: SageMaker's name, parameter overrides and the action."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    action: Literal["log", "stop"] = "log"


# What runs when the config names no rules: the rules that need only the cheap default
# collections (losses and metrics), so the default debugger costs next to nothing.
DEFAULT_RULES = (
    "LossNotDecreasing",
    "Overfit",
    "Overtraining",
    "ExplodingTensor",
    "StalledTraining",
)


class DebuggerConfig(BaseModel):
    """What the debugger captures, when, and which rules judge it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="attach the debugger to the training loop")
    collections: list[str] = Field(
        default_factory=lambda: ["losses", "metrics"],
        description="what to capture; losses are always captured",
    )
    # Save config (SageMaker's defaults); `train` / `eval` override it per mode.
    save_interval: int = Field(100, ge=1)
    start_step: int = Field(0, ge=0)
    end_step: int | None = Field(None, ge=0)
    save_steps: list[int] | None = None
    train: SaveConfigMode | None = None
    eval: SaveConfigMode | None = Field(
        None, description="save config over evaluations (default: every evaluation)"
    )
    activations_regex: str = Field(
        r".*relu.*", description="modules (by name or class) whose outputs are activations"
    )
    tensor_regex: str | None = Field(
        None, description="only weights/biases/gradients whose names match"
    )
    save_raw: str | None = Field(
        None, description="also save raw tensors whose names match, as safetensors"
    )
    histogram_bins: int = Field(20, ge=1, le=1000)
    feature_pass_samples: int = Field(
        64, ge=0, description="images of each split captured during the feature-cache pass"
    )
    rules: list[RuleSpec] | None = Field(
        None, description="rules by name or {name, parameters, action}; default: see docs"
    )

    @field_validator("collections")
    @classmethod
    def _known_collections(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in COLLECTIONS]
        if bad:
            raise ValueError(f"unknown collection(s) {bad}; known: {', '.join(COLLECTIONS)}")
        return list(dict.fromkeys(["losses", *v]))

    @field_validator("rules", mode="before")
    @classmethod
    def _rule_names(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if isinstance(v, list):
            return [{"name": r.strip()} if isinstance(r, str) else r for r in v]
        return v

    @field_validator("rules")
    @classmethod
    def _rules_build(cls, v: list[RuleSpec] | None) -> list[RuleSpec] | None:
        # Built once here, so an unknown parameter or a value of the wrong kind fails with the
        # config, before training; beside training a rule that fails only warns.
        from visiontune.debug.rules import make_rule
        from visiontune.errors import UserError

        for spec in v or []:
            try:
                make_rule(spec.name, spec.parameters, spec.action)
            except UserError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("activations_regex", "tensor_regex", "save_raw")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        import re

        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e}): {v!r}") from None
        return v

    def mode_config(self, mode: str) -> SaveConfigMode:
        """The effective save config of ``mode`` ("TRAIN" or "EVAL")."""
        base = SaveConfigMode(
            save_interval=self.save_interval,
            start_step=self.start_step,
            end_step=self.end_step,
            save_steps=self.save_steps,
        )
        if mode == "EVAL":
            base = SaveConfigMode(save_interval=1, start_step=0)
        override = self.train if mode == "TRAIN" else self.eval
        if override is None:
            return base
        return base.model_copy(update=override.model_dump(exclude_none=True))


def should_save(cfg: SaveConfigMode, step: int) -> bool:
    """smdebug's rule: inside [start_step, end_step), then save_steps or every save_interval."""
    if step < (cfg.start_step or 0):
        return False
    if cfg.end_step is not None and step >= cfg.end_step:
        return False
    if cfg.save_steps:
        return step in cfg.save_steps
    return step % (cfg.save_interval or 1) == 0
