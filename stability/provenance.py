"""Where a result came from: the device, the package versions and the git commit, recorded in every
report (one set of columns in each CSV row, one line in each Markdown report)."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

PROVENANCE_COLUMNS = ("device", "python", "torch", "triton", "numpy", "package", "commit")
# Recorded where they apply: the ablations' corpus (ablations.data.Corpus.provenance).
OPTIONAL_COLUMNS = ("corpus",)


def git_commit(repo: str | None = None) -> str:
    """``MESA_GIT_COMMIT`` when set (a copy without .git), else ``git describe --always --dirty``, else unknown."""
    if os.environ.get("MESA_GIT_COMMIT"):
        return os.environ["MESA_GIT_COMMIT"]
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    """The device's name (the CUDA device's, or the CPU's architecture)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()})"


def provenance(device="cpu") -> dict:
    """``{device, python, torch, triton, numpy, package, commit}`` of this process (triton ``-`` when
    not installed)."""
    import numpy

    from mesa_stability import solvers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    return {"device": device_name(device), "python": platform.python_version(), "torch": torch.__version__,
            "triton": tv, "numpy": numpy.__version__, "package": f"mesa-stability {solvers.__version__}",
            "commit": git_commit()}


def provenance_line(prov: dict) -> str:
    """One Markdown line naming the device, versions and commit of ``prov`` (missing keys skipped)."""
    parts = [f"{k} {prov[k]}" for k in PROVENANCE_COLUMNS + OPTIONAL_COLUMNS if k in prov and prov[k] == prov[k]]
    return "Provenance: " + ", ".join(parts) + "."


def provenance_of_table(df) -> str:
    """The provenance line of a results table: each column's distinct values (rows of resumed or merged
    runs may differ), or a note that the table predates these columns."""
    if not any(c in df.columns for c in PROVENANCE_COLUMNS):
        return "Provenance: not recorded (a table written before the provenance columns)."
    have = [c for c in PROVENANCE_COLUMNS + OPTIONAL_COLUMNS if c in df.columns]
    vals = {c: " / ".join(str(v) for v in df[c].dropna().unique()) or "?" for c in have}
    return provenance_line(vals)


__all__ = ["OPTIONAL_COLUMNS", "PROVENANCE_COLUMNS", "device_name", "git_commit", "provenance", "provenance_line",
           "provenance_of_table"]
