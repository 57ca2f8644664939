"""The ``profiler:`` section of the training config (imports nothing heavy)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def parse_step_window(value: str) -> tuple[int, int]:
    """``"5-10"`` -> ``(5, 10)``: the global steps (inclusive, 1-based) ``torch.profiler`` records.

    Raises:
        ValueError: not ``A-B`` with ``1 <= A <= B``.
    """
    first, sep, last = value.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"profile_steps must look like 5-10, got {value!r}")
    a, b = int(first), int(last)
    if not 1 <= a <= b:
        raise ValueError(f"profile_steps must be A-B with 1 <= A <= B, got {value!r}")
    return a, b


class ProfilerConfig(BaseModel):
    """What the profiler records. On by default: it costs well under 2% of step time."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="sample system usage and time every step phase")
    sample_interval_ms: int = Field(
        500, ge=100, le=60_000, description="system sampling period (SageMaker's 100 ms - 60 s)"
    )
    profile_steps: str | None = Field(
        None,
        description="A-B: record steps A..B with torch.profiler (chrome trace + top operators)",
    )
    flush_seconds: float = Field(
        10.0, gt=0, le=600, description="how often samples are written to RUN/profile/"
    )

    @field_validator("profile_steps")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is not None:
            parse_step_window(v)
        return v

    @model_validator(mode="after")
    def _window_needs_the_profiler(self) -> ProfilerConfig:
        # With the profiler off nothing records the window: the run trained without the trace
        # it was asked for, and said nothing.
        if self.profile_steps and not self.enabled:
            raise ValueError(
                f"profile_steps {self.profile_steps} needs the profiler, which enabled: false "
                "turns off"
            )
        return self

    @property
    def step_window(self) -> tuple[int, int] | None:
        return parse_step_window(self.profile_steps) if self.profile_steps else None
