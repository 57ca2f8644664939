"""What every benchmark shares: the machine banner and the interleaved side-by-side loop.

A claim is a ratio of two (or more) variants measured in one run. Running the variants in
turn, round after round, lets drift in the machine's load (other users, thermal throttling)
hit every variant alike; each benchmark then compares the best or the median of each
variant's rounds.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """One line naming the machine a figure was measured on: CPU, core count, Python."""
    return (
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores, {platform.machine()}), "
        f"Python {platform.python_version()}"
    )


def wall_time(fn: Callable[[], object]) -> Callable[[int], float]:
    """A variant for :func:`side_by_side` measuring how many seconds ``fn()`` takes."""

    def timed(_round: int) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def side_by_side(
    variants: Mapping[K, Callable[[int], float]], rounds: int, *, warmup: bool = False
) -> dict[K, list[float]]:
    """Measure every variant once per round, in turn, for ``rounds`` rounds.

    Args:
        variants: name -> ``measure(round)``, which runs the variant once and returns its
            figure (seconds, seconds per step, images per second...).
        rounds: how many times each variant is measured.
        warmup: run every variant once first, unrecorded (imports, page cache, JIT).

    Returns:
        name -> the figures of its rounds, in round order.
    """
    if warmup:
        for measure in variants.values():
            measure(-1)
    figures: dict[K, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, measure in variants.items():
            figures[name].append(measure(r))
    return figures
