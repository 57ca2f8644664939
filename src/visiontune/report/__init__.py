"""The run report: one self-contained HTML page per run (``RUN/report.html``).

``write_report(run_dir)`` reads only files in the run directory (config, metrics, evaluation,
profile, debug), so it works for a finished, stopped, killed or still running run alike.
"""

from __future__ import annotations

from pathlib import Path


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``output``) from what the run wrote so far; return its path.

    Never raises for a missing or half-written part: a section without data says so instead.

    Raises:
        UserError: ``output`` is a directory, or a file that is not an earlier visiontune page
            (see :func:`visiontune.io.check_page_output`).
    """
    from visiontune.report.build import write_report as _write

    return _write(Path(run_dir), output)


__all__ = ["write_report"]
