"""CG, Chebyshev and Sherman-Morrison against the float64 exact solver."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_stability.solvers import get_policy, own_problem_reference, solve
from mesa_stability.solvers.chebyshev import spectral_bounds, steps_for_tolerance
from mesa_stability.solvers.chunk_state import ChunkedSystem
from mesa_stability.stability.cases import random_problem
from mesa_stability.stability.metrics import condition_numbers, max_token_rel_error, rel_error, token_rel_error
from mesa_stability.stability.reference import mp_solve


@pytest.fixture(scope="module")
def well():
    return random_problem(B=2, T=70, H=2, D=16, Dv=8, seed=7, gamma_range=(0.9, 1.0))


def test_cg_tol_1e12_agrees_with_exact(well):
    ref = solve(well, "exact")
    for opts in ({}, {"x0": "jacobi"}, {"precond": "jacobi"}, {"x0": "jacobi", "precond": "jacobi"}):
        res = solve(well, "cg", tol=1e-12, steps=200, chunk_size=16, **opts)
        # relative residual 1e-12 bounds the relative error by kappa * 1e-12 (kappa < 30 here)
        assert rel_error(res.x, ref.x) <= 1e-10, opts
        assert rel_error(res.o, ref.o) <= 1e-10, opts
        assert res.steps.shape == (2, 70, 2) and res.steps.dtype == torch.int64
        assert int(res.steps.min()) >= 1 and int(res.steps.max()) <= 200
        assert float(res.residual.max()) <= 1e-12
        assert not bool(res.breakdown.any())


def test_cg_error_falls_with_steps(well):
    ref = solve(well, "exact")
    errs = [rel_error(solve(well, "cg", steps=s).x, ref.x) for s in (1, 2, 4, 8, 12)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-4 * errs[0], errs
    res = solve(well, "cg", steps=5)
    assert bool((res.steps == 5).all())


def test_cg_reports_fewer_steps_where_tokens_converge_early():
    # with Lambda = I, H_t + Lambda (t = 0-based index) has at most t + 2 distinct eigenvalues, so
    # exact-arithmetic CG terminates in t + 2 steps there; the per-token counts must show it
    p = random_problem(B=1, T=40, H=1, D=16, seed=1, gamma_range=(1.0, 1.0), lam_range=(1.0, 1.0))
    res = solve(p, "cg", tol=1e-10, steps=100)
    for t in range(6):
        assert int(res.steps[0, t, 0]) <= t + 2, (t, res.steps[0, :6, 0])
    assert int(res.steps[0, -1, 0]) > 6


def test_zero_steps_returns_the_initial_guess(well):
    res = solve(well, "cg", steps=0)
    assert bool((res.x == 0).all()) and bool((res.o == 0).all()) and bool((res.steps == 0).all())
    res = solve(well, "cg", steps=0, x0="jacobi")
    S = ChunkedSystem.build(well, get_policy("fp64"), 64)
    jac = S.to_tokens(S.Q / (S.diag_H() + S.lam))
    assert torch.allclose(res.x, jac)
    res = solve(well, "chebyshev", steps=0)
    assert bool((res.x == 0).all())


def test_zero_rhs_gives_zero_without_nan(well):
    p = well.replace(q=torch.zeros_like(well.q))
    for method, opts in (("cg", {"steps": 10}), ("cg", {"tol": 1e-6}), ("chebyshev", {"steps": 10})):
        res = solve(p, method, **opts)
        assert bool((res.x == 0).all()) and int(res.steps.max()) == 0


def test_chunk_size_invariance(well):
    base = solve(well, "cg", steps=12, chunk_size=64)
    for C in (1, 5, 16, 128):
        other = solve(well, "cg", steps=12, chunk_size=C)
        assert rel_error(other.x, base.x) <= 1e-12
        assert torch.allclose(other.final_state[0], base.final_state[0], rtol=1e-12, atol=1e-13)


def test_chebyshev_converges_within_predicted_steps(well):
    ref = solve(well, "exact")
    S = ChunkedSystem.build(well, get_policy("fp64"), 64)
    a, b = spectral_bounds(S)
    kappa_true = condition_numbers(well)
    kappa_b = S.to_tokens(b / a)
    assert bool((kappa_true <= kappa_b * (1 + 1e-12)).all())  # the free bound is a bound
    for tol in (1e-3, 1e-6, 1e-10):
        predicted = S.to_tokens(steps_for_tolerance(b / a, tol))
        res = solve(well, "chebyshev", tol=tol, steps=10_000)
        assert torch.equal(res.steps, predicted)
        # ||e_k|| / ||e_0|| <= 2 sqrt(kappa) c^k <= tol with x0 = 0 (e_0 = x*); plus fp64 rounding
        assert float(token_rel_error(res.x, ref.x).max()) <= tol + 1e-13
        assert float(res.residual.max()) <= tol + 1e-13
    # and the error bound is not vacuous: fewer steps than predicted leave a larger error
    few = solve(well, "chebyshev", steps=int(predicted.min()) // 2)
    assert max_token_rel_error(few.x, ref.x) > 1e-10


def test_chebyshev_exact_in_one_step_when_spectrum_is_a_point():
    p = random_problem(B=1, T=5, H=1, D=4, seed=0, beta_range=(0.0, 0.0), lam_range=(0.5, 0.5))
    res = solve(p, "chebyshev", tol=1e-12)
    assert torch.allclose(res.x, p.q / 0.5) and int(res.steps.max()) == 1


def test_sherman_morrison_equals_exact_without_forgetting():
    p = random_problem(B=2, T=50, H=2, D=8, seed=3, gamma_range=(1.0, 1.0))
    sm, ref = solve(p, "sherman_morrison"), solve(p, "exact")
    assert rel_error(sm.x, ref.x) <= 1e-10 and rel_error(sm.o, ref.o) <= 1e-10


def test_sherman_morrison_solves_its_own_decayed_problem():
    p = random_problem(B=2, T=40, H=2, D=8, seed=4, gamma_range=(0.9, 1.0))
    sm = solve(p, "sherman_morrison")
    own = own_problem_reference(p, get_policy("fp64"))
    assert rel_error(sm.x, own.x) <= 1e-10 and rel_error(sm.o, own.o) <= 1e-10
    # ... which is not the Mesa problem: the model mismatch is large
    assert rel_error(sm.x, solve(p, "exact").x) > 1e-2
    small = random_problem(B=1, T=16, H=1, D=4, seed=4, gamma_range=(0.9, 1.0))
    x_mp, _ = mp_solve(small, regularizer="decayed")
    assert rel_error(solve(small, "sm").x, x_mp) <= 1e-10


def test_sherman_morrison_with_initial_state():
    p = random_problem(B=1, T=20, H=2, D=6, seed=9, gamma_range=(1.0, 1.0), initial_state=True)
    assert rel_error(solve(p, "sm").x, solve(p, "exact").x) <= 1e-10


def test_final_states_agree_across_methods():
    p = random_problem(B=1, T=37, H=2, D=6, Dv=3, seed=2, initial_state=True)
    Hf, Gf = p.final_state()
    for method in ("exact", "cg", "chebyshev", "sherman_morrison"):
        H_T, G_T = solve(p, method).final_state
        assert torch.allclose(H_T, Hf, rtol=1e-12, atol=1e-12), method
        assert torch.allclose(G_T, Gf, rtol=1e-12, atol=1e-12), method


def test_unknown_method_and_options_are_rejected(well):
    with pytest.raises(ValueError, match="unknown method"):
        solve(well, "gmres")
    with pytest.raises(ValueError, match="unknown policy"):
        solve(well, "cg", "fp8")
    with pytest.raises(ValueError, match="steps"):
        solve(well, "cg", steps=-1)
    with pytest.raises(ValueError, match="tol"):
        solve(well, "cg", tol=0.0)
    with pytest.raises(ValueError, match="x0"):
        solve(well, "cg", x0="ones")
    with pytest.raises(ValueError, match="precond"):
        solve(well, "cg", precond="ilu")
    with pytest.raises(ValueError, match="precond"):
        solve(well, "chebyshev", precond="jacobi")
    with pytest.raises(ValueError, match="does not take"):
        solve(well, "exact", steps=3)
    with pytest.raises(ValueError, match="chunk_size"):
        solve(well, "cg", chunk_size=0)


def test_cg_breakdown_is_flagged_not_divided_through():
    # fp16 state storage overflows (|H| > 65504) for keys of norm 1000: A p becomes inf/NaN and
    # p.Ap is not > 0 for some tokens. CG must flag them and keep their last finite iterate.
    p = random_problem(B=1, T=8, H=1, D=4, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0))
    p = p.replace(k=p.k * 1000.0)
    res = solve(p, "cg", "fp16-fp16state", steps=10)
    assert bool(res.breakdown.any())
    assert res.info["breakdowns"] == int(res.breakdown.sum())
    assert bool(torch.isfinite(res.x).all())
    assert math.isfinite(float(res.residual.max()))


def test_jacobi_preconditioning_takes_effect_in_cg():
    """With lam spread over four decades and small keys, A_t is nearly diagonal: Jacobi-preconditioned
    CG reaches the tolerance in a few steps where plain CG needs many (a preconditioner that is
    silently ignored fails this)."""
    p = random_problem(1, 32, 2, 16, seed=3)
    lam = torch.logspace(-2, 2, 16, dtype=torch.float64).expand(2, 16).contiguous()
    p = p.replace(k=p.k * 0.1, lam=lam)
    plain = solve(p, "cg", steps=200, tol=1e-8)
    jac = solve(p, "cg", steps=200, tol=1e-8, precond="jacobi")
    assert float(jac.steps.double().mean()) * 3 < float(plain.steps.double().mean())
    ref = solve(p, "exact")
    assert max_token_rel_error(jac.x, ref.x) < 1e-6



def test_gla_is_the_readout_of_the_query_through_the_value_state():
    """method "gla": x = q and o_t = G_t q_t, with G_t from the problem's own state recursion
    (MesaProblem.iter_states, float64), across chunk boundaries, resets and an initial state; CG and
    Chebyshev from x0 = "q" after 0 steps return the same; autograd reaches every input."""
    p = random_problem(B=1, T=37, H=2, D=6, Dv=3, seed=5, initial_state=True, gamma_range=(0.8, 1.0))
    g = p.g.clone()
    g[:, 20] = -math.inf  # a reset inside the sequence
    p = p.replace(g=g)
    ref = torch.cat([torch.einsum("bthvd,bthd->bthv", G, p.q[:, s:e]) for s, e, _, G in p.iter_states(block=16)], 1)
    res = solve(p, "gla", chunk_size=8)
    assert res.method == "gla" and torch.equal(res.x, p.q)
    assert rel_error(res.o, ref) <= 1e-13
    for method in ("cg", "chebyshev"):
        assert rel_error(solve(p, method, steps=0, x0="q", chunk_size=8).o, ref) <= 1e-13, method
    H_T, G_T = res.final_state
    Hf, Gf = p.final_state()
    assert torch.allclose(H_T, Hf, rtol=1e-12, atol=1e-12) and torch.allclose(G_T, Gf, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g.clamp_min(-30), p.beta)]
    out = solve(p.replace(q=leaves[0], k=leaves[1], v=leaves[2], g=leaves[3], beta=leaves[4]), "gla", chunk_size=8).o
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in leaves)


def test_x0_q_runs_on_the_torch_backend_only():
    from mesa_stability.kernels import mesa_chunk

    p = random_problem(B=1, T=12, H=1, D=4, Dv=4, seed=1)
    args = (p.q.float(), p.k.float(), p.v.float(), p.g.float(), p.beta.float(), p.lam.float())
    gla = solve(p, "gla").o
    o = mesa_chunk(*args, steps=0, x0="q", backend="torch", check=None, policy="fp32")
    assert rel_error(o, gla) <= 1e-6
    with pytest.raises(ValueError, match="x0='q' runs on the torch backend only"):
        mesa_chunk(*args, steps=0, x0="q", backend="triton", check=None, policy="fp32")
