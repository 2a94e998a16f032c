"""Property tests over random shapes, gates, regularisers and initial states."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mesa_stability.solvers import solve
from mesa_stability.stability.metrics import condition_numbers, rel_error
from mesa_stability.stability.strategies import problems


@given(problems(), st.sampled_from([1, 3, 8, 64]))
def test_cg_converged_matches_exact(p, chunk_size):
    ref = solve(p, "exact")
    res = solve(p, "cg", tol=1e-12, steps=3 * p.D + 20, chunk_size=chunk_size)
    kappa = float(condition_numbers(p).max())
    # relative residual <= 1e-12 bounds the error by kappa * 1e-12 (plus fp64 rounding)
    assert rel_error(res.x, ref.x) <= kappa * 1e-12 + 1e-13
    assert rel_error(res.o, ref.o) <= kappa * 1e-12 + 1e-13
    assert int(res.steps.max()) <= 3 * p.D + 20 and not bool(res.breakdown.any())


@given(problems(), st.sampled_from([1, 4, 16]), st.integers(0, 6))
def test_chunk_size_does_not_change_the_iteration(p, chunk_size, steps):
    a = solve(p, "cg", steps=steps, chunk_size=chunk_size)
    b = solve(p, "cg", steps=steps, chunk_size=64)
    assert rel_error(a.x, b.x) <= 1e-9
    # the same step counts, except where a token's residual reached exactly zero in one
    # chunking and rounding-level in the other (exact termination, e.g. D = 1)
    differ = a.steps != b.steps
    assert bool((a.residual[differ] <= 1e-12).all() and (b.residual[differ] <= 1e-12).all())
    c = solve(p, "chebyshev", steps=steps, chunk_size=chunk_size)
    d = solve(p, "chebyshev", steps=steps, chunk_size=64)
    assert rel_error(c.x, d.x) <= 1e-9


@given(problems(), st.sampled_from([1e-2, 1e-5]))
def test_chebyshev_meets_its_tolerance(p, tol):
    ref = solve(p, "exact")
    res = solve(p, "chebyshev", tol=tol, steps=100_000)
    assert float(res.residual.max()) <= tol * (1 + 1e-6)
    # the a-priori count bounds the 2-norm error of x by tol as well (x0 = 0)
    assert rel_error(res.x, ref.x) <= tol * (1 + 1e-6) + 1e-12


@given(problems(max_T=24, max_D=6))
def test_every_method_returns_the_final_state_of_the_recurrence(p):
    Hf, Gf = p.final_state()
    for method in ("exact", "cg", "chebyshev", "sherman_morrison"):
        H_T, G_T = solve(p, method).final_state
        assert torch.allclose(H_T, Hf, rtol=1e-10, atol=1e-12), method
        assert torch.allclose(G_T, Gf, rtol=1e-10, atol=1e-12), method


@given(problems(max_T=30, max_D=6))
def test_sherman_morrison_matches_its_own_problem(p):
    from mesa_stability.solvers import get_policy, own_problem_reference

    own = own_problem_reference(p, get_policy("fp64"))
    sm = solve(p, "sherman_morrison")
    # wind-up: P_t grows like 1 / zeta_{t,0}; the recursion's error grows with it (and with kappa
    # of its own system). Compare on tokens where the decayed regulariser is still >= 1e-3 Lambda.
    zeta0 = torch.exp(torch.cumsum(p.g, dim=1))
    ok = zeta0 >= 1e-3
    if bool(ok.any()):
        err = (sm.x - own.x).norm(dim=-1)[ok] / own.x.norm(dim=-1)[ok].clamp_min(1e-300)
        assert float(err.max()) <= 1e-6
