"""The metamorphic properties hold for the reference solvers, and catch broken implementations."""

from __future__ import annotations

import pytest
import torch

from mesa_stability.stability import cases, properties
from mesa_stability.stability.properties import solver_op

# fp64: every transformation is exact, so the discrepancy is rounding of a few operations
# (u = 1.1e-16) times kappa < 10: 1e-12 leaves room. fp32 (u = 6e-8): 1e-5.
BOUND = {"fp64": 1e-12, "fp32": 1e-5}
CONFIGS = [("exact", {}), ("cg", {"steps": 20}), ("cg", {"steps": 100, "tol": 1e-6}), ("chebyshev", {"steps": 30}),
           ("sherman_morrison", {})]


@pytest.fixture(scope="module")
def problem():
    return cases.make("well_conditioned", B=2, T=50, H=3, D=8)


@pytest.mark.parametrize("policy", sorted(BOUND))
@pytest.mark.parametrize("method,opts", CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)])
def test_solvers_satisfy_the_properties(problem, method, opts, policy):
    f = solver_op(method, policy, **opts)
    checks = [properties.scale_q(f, problem), properties.scale_v(f, problem),
              properties.independence(f, problem), properties.varlen(f, cases.make("varlen", T=60, D=8))]
    if method != "sherman_morrison":
        checks.append(properties.continuation(f, problem))
    if method in ("cg", "chebyshev"):
        checks.append(properties.chunk_size(f, problem, chunk_sizes=(16, 5, 64)))
    for r in checks:
        assert r.holds(BOUND[policy]), (r.name, r.discrepancy, r.detail)


def test_sherman_morrison_cannot_continue_from_mesa_states(problem):
    """Its state is P_t = (H_t + zeta_{t,0} Lambda)^{-1}: restarting from (H_t, G_t) restores the full
    regulariser, so continuation fails by design when gamma < 1 (and holds when gamma = 1)."""
    f = solver_op("sherman_morrison", "fp64")
    assert not properties.continuation(f, problem).holds(1e-3)
    no_forget = cases.make("no_forgetting_long", B=2, T=50, H=3, D=8)
    assert properties.continuation(f, no_forget).holds(1e-10)


def test_properties_detect_broken_implementations(problem):
    good = solver_op("cg", "fp64", steps=20)

    def not_scale_equivariant(q, k, v, g, beta, lam, **kw):
        return good(q + 1e-3, k, v, g, beta, lam, **kw)  # an additive epsilon on q

    def leaks_across_batch(q, k, v, g, beta, lam, **kw):
        o = good(q, k, v, g, beta, lam, **kw)
        return o + 1e-3 * o.mean(dim=0, keepdim=True)

    def ignores_initial_state(q, k, v, g, beta, lam, *, initial_state=None, output_final_state=False, **kw):
        return good(q, k, v, g, beta, lam, output_final_state=output_final_state, **kw)

    def chunk_dependent(q, k, v, g, beta, lam, *, chunk_size=64, **kw):
        return good(q, k, v, g, beta, lam, **kw) * (1 + 1e-4 * (chunk_size != 16))

    def varlen_ignored(q, k, v, g, beta, lam, *, cu_seqlens=None, **kw):
        return good(q, k, v, g, beta, lam, **kw)

    assert not properties.scale_q(not_scale_equivariant, problem).holds(1e-6)
    assert not properties.independence(leaks_across_batch, problem).holds(1e-6)
    assert not properties.continuation(ignores_initial_state, problem).holds(1e-6)
    assert not properties.chunk_size(chunk_dependent, problem).holds(1e-6)
    assert not properties.varlen(varlen_ignored, cases.make("varlen", T=60, D=8)).holds(1e-6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        properties.varlen(good, problem)


def test_scale_v_detects_nonlinearity(problem):
    good = solver_op("exact", "fp64")

    def saturating(q, k, v, g, beta, lam, **kw):
        return good(q, k, torch.tanh(v), g, beta, lam, **kw)

    assert not properties.scale_v(saturating, problem).holds(1e-3)
