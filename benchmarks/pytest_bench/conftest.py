"""pytest-benchmark helpers: a CUDA-synchronised timer for the GPU benchmarks, and the device and
versions in each benchmark's ``extra_info`` (they land in the ``--benchmark-json`` file, which
``mesa guard --baseline OLD.json --bench NEW.json`` compares)."""

from __future__ import annotations

import platform

import pytest
import torch

pytest.importorskip("pytest_benchmark")


def device_info(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "torch": torch.__version__, "python": platform.python_version()}


@pytest.fixture
def cuda_benchmark(benchmark):
    """``cuda_benchmark(fn, rounds=..., warmup=...)``: pytest-benchmark timing of ``fn()`` followed by
    ``torch.cuda.synchronize()``, so that each round is the GPU's work, not its launch."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    def run(fn, rounds: int = 50, warmup: int = 5):
        benchmark.extra_info.update(device_info("cuda"))

        def synced():
            fn()
            torch.cuda.synchronize()

        return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return run
