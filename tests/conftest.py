"""Shared pytest set-up: hypothesis profiles and markers for Triton / GPU tests."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# "ci": deterministic example generation (the same examples on every run), no per-example
# deadline (CPU timing varies on shared CI machines), a moderate number of examples.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA, and Triton tests without CUDA or the interpreter."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "triton" in item.keywords:
            if not has_triton:
                item.add_marker(pytest.mark.skip(reason="triton is not installed"))
            elif not (has_cuda or interpret):
                item.add_marker(pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1"))


@pytest.fixture(autouse=True)
def _read_pending_verdicts():
    """Each test's deferred certificate verdicts (solvers.verdict, CUDA only) are read at its end, so a
    warning never lands in a later test."""
    yield
    from mesa_stability.solvers.verdict import flush

    flush()
