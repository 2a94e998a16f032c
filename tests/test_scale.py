"""Scale equivariance: solving with s*q gives s*x, for every iterative method and mode."""

from __future__ import annotations

import pytest

from mesa_stability.solvers import ITERATIVE, get_policy, solve
from mesa_stability.stability.cases import random_problem
from mesa_stability.stability.metrics import rel_error

SCALES = (1e-8, 1e-5, 1e-2, 3.0, 1e3, 1e8)
# A relative error of a few hundred u: rounding s*q and the products differs from rounding q by
# O(u) per operation, amplified by at most kappa (< 30 here) over the iteration.
BOUND = {"fp64": 1e-12, "fp32": 1e-4}
MODES = {"cg": [{"steps": 10}, {"steps": 100, "tol": 1e-6}, {"steps": 100, "tol": 1e-6, "precond": "jacobi",
                                                                 "x0": "jacobi"}],
         "chebyshev": [{"steps": 25}, {"steps": 1000, "tol": 1e-6}, {"steps": 25, "x0": "jacobi"}]}


@pytest.fixture(scope="module")
def problem():
    return random_problem(B=1, T=50, H=2, D=12, seed=21, gamma_range=(0.8, 1.0))


@pytest.mark.parametrize("policy", sorted(BOUND))
@pytest.mark.parametrize("method", ITERATIVE)
def test_scale_equivariance_in_q(problem, method, policy):
    for opts in MODES[method]:
        base = solve(problem, method, policy, **opts)
        for s in SCALES:
            scaled = solve(problem.replace(q=problem.q * s), method, policy, **opts)
            assert rel_error(scaled.x.double(), s * base.x.double()) <= BOUND[policy], (opts, s)
            assert rel_error(scaled.o.double(), s * base.o.double()) <= BOUND[policy], (opts, s)
            # the same tokens stop at the same step (at most one step apart where a residual
            # lands within rounding of the tolerance)
            assert int((scaled.steps - base.steps).abs().max()) <= (1 if "tol" in opts else 0), (opts, s)


def test_fixed_steps_scale_equivariance_is_exact_for_powers_of_two(problem):
    """Multiplying by 2^j is exact in floating point, so the iterates scale exactly."""
    pol = get_policy("fp64")
    base = solve(problem, "cg", pol, steps=10)
    for j in (-30, -7, 9, 30):
        scaled = solve(problem.replace(q=problem.q * 2.0**j), "cg", pol, steps=10)
        assert bool((scaled.x == base.x * 2.0**j).all()), j
