"""CPU benchmarks (pytest-benchmark; the tox env ``bench``): the reference solvers on one problem, the
mpmath reference on a small one, and one slice of the stability grid (a case's float64 truth and
every solver of the quick preset in one policy).

    tox -e bench            # or: pytest benchmarks/pytest_bench/test_bench_cpu.py --benchmark-json=cpu.json
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.pytest_bench.conftest import device_info
from mesa_stability import solvers
from mesa_stability.stability import cases, report
from mesa_stability.stability.reference import mp_solve

PROBLEM = dict(B=1, T=256, H=2, D=16)
SETTINGS = {"exact": {}, "sherman_morrison": {}, "cg": dict(steps=30), "chebyshev": dict(steps=32)}


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    return cases.make("well_conditioned", **PROBLEM)


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.parametrize("policy", ["fp64", "fp32"])
def test_reference_solver(benchmark, problem, method, policy):
    benchmark.extra_info.update(device_info("cpu"), shape=str(PROBLEM), **SETTINGS[method])
    res = benchmark(solvers.solve, problem, method, policy, **SETTINGS[method])
    assert torch.isfinite(res.o).all()


def test_mpmath_reference(benchmark):
    small = cases.make("well_conditioned", B=1, T=8, H=1, D=4)
    benchmark.extra_info.update(device_info("cpu"), shape="B=1, T=8, H=1, D=4", dps=50)
    x = benchmark.pedantic(mp_solve, args=(small,), kwargs=dict(dps=50), rounds=3, iterations=1)
    assert x is not None


def test_stability_grid_slice(benchmark):
    """One (case, size) of the quick preset: its float64 truth, then every solver setting in fp32."""
    preset = report.get_preset("quick")
    size = preset.sizes["low_rank_keys"][0]
    jobs = [(s, o) for s in report.SOLVERS for o in preset.settings[s]]
    benchmark.extra_info.update(device_info("cpu"), case="low_rank_keys", size=str(size), rows=len(jobs))

    def grid_slice():
        ctx = report.CaseContext.build("low_rank_keys", size, 0)
        return [report.measure(ctx, s, solvers.get_policy("fp32"), o) for s, o in jobs]

    rows = benchmark.pedantic(grid_slice, rounds=3, iterations=1)
    assert len(rows) == len(jobs)
