"""The float64 exact solver against the mpmath reference (the root of trust)."""

from __future__ import annotations

import pytest
import torch

from mesa_stability.solvers import get_policy, own_problem_reference, solve
from mesa_stability.stability.cases import random_problem
from mesa_stability.stability.metrics import max_token_rel_error, rel_error
from mesa_stability.stability.reference import mp_solve

# exact (Cholesky in fp64) is backward stable: its error is about kappa * u_fp64 = kappa * 1.1e-16;
# the problems below have kappa < 200, so 1e-12 leaves a factor > 40 for growth.
EXACT_VS_MP = 1e-12

CASES = {
    "mild_forgetting": dict(gamma_range=(0.9, 1.0)),
    "no_forgetting": dict(gamma_range=(1.0, 1.0)),
    "strong_forgetting": dict(gamma_range=(0.01, 0.1)),
    "initial_state": dict(gamma_range=(0.95, 1.0), initial_state=True),
    "small_lam": dict(gamma_range=(1.0, 1.0), lam_range=(0.05, 0.1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_fp64_agrees_with_mpmath(case):
    p = random_problem(B=1, T=40, H=2, D=8, Dv=5, seed=11, **CASES[case])
    x_mp, o_mp = mp_solve(p, dps=50)
    res = solve(p, "exact")
    assert res.x.dtype == torch.float64
    assert max_token_rel_error(res.x, x_mp) <= EXACT_VS_MP
    assert max_token_rel_error(res.o, o_mp) <= EXACT_VS_MP


def test_exact_fp64_agrees_with_mpmath_d16_t64():
    p = random_problem(B=1, T=64, H=1, D=16, seed=5, gamma_range=(0.95, 1.0))
    x_mp, o_mp = mp_solve(p)
    res = solve(p, "exact", block=16)
    assert rel_error(res.x, x_mp) <= EXACT_VS_MP and rel_error(res.o, o_mp) <= EXACT_VS_MP


def test_decayed_regulariser_reference_agrees_with_mpmath():
    p = random_problem(B=1, T=24, H=1, D=6, seed=2, gamma_range=(0.9, 1.0))
    x_mp, o_mp = mp_solve(p, regularizer="decayed")
    own = own_problem_reference(p, get_policy("fp64"))
    assert rel_error(own.x, x_mp) <= EXACT_VS_MP and rel_error(own.o, o_mp) <= EXACT_VS_MP


def test_mp_solve_refuses_large_problems_with_a_clear_message():
    p = random_problem(B=2, T=512, H=4, D=32, seed=0)
    with pytest.raises(ValueError, match="too large for the mpmath reference"):
        mp_solve(p)


def test_mp_solve_rejects_bad_arguments():
    p = random_problem(T=2, D=2)
    with pytest.raises(ValueError, match="dps"):
        mp_solve(p, dps=10)
    with pytest.raises(ValueError, match="regularizer"):
        mp_solve(p, regularizer="bogus")
    with pytest.raises(TypeError, match="MesaProblem"):
        mp_solve(p.q)


def test_backward_error_is_the_normwise_backward_error():
    """``backward_error`` is ||q - A x|| / (||A||_2 ||x|| + ||q||): at the exact solution it is at the
    float64 rounding level; at x = 0 it is exactly 1; it is invariant under scaling q and x by a
    power of two; and for x* + eps v (v the top eigenvector of A_t) it equals
    lambda_max eps / (lambda_max ||x|| + ||q||)."""
    from mesa_stability.stability.metrics import backward_error, systems

    p = random_problem(1, 24, 2, 8, seed=5).to(torch.float64)
    x = solve(p, "exact").x
    assert float(backward_error(p, x).max()) < 64 * 2.0**-53
    assert torch.equal(backward_error(p, torch.zeros_like(x)), torch.ones(1, 24, 2, dtype=torch.float64))
    s = 2.0**20
    assert torch.allclose(backward_error(p.replace(q=p.q * s), x * s), backward_error(p, x), rtol=1e-12, atol=0)
    (_, _, A), = systems(p, block=24)
    ev, vecs = torch.linalg.eigh(A)
    eps = 1e-3
    xp = x + eps * vecs[..., -1]
    want = ev[..., -1] * eps / (ev[..., -1] * xp.norm(dim=-1) + p.q.norm(dim=-1))
    assert torch.allclose(backward_error(p, xp), want, rtol=1e-8)
    bad = x.clone()
    bad[0, 3, 1, 0] = float("nan")  # a non-finite solution is infinitely wrong, the others unchanged
    be = backward_error(p, bad)
    assert torch.isinf(be[0, 3, 1]) and torch.equal(be[0, 3, 0], backward_error(p, x)[0, 3, 0])


def test_backward_error_does_not_depend_on_the_token_blocks():
    """``backward_error`` forms A_t in blocks of tokens (``metrics.systems``), an implementation detail:
    blocks of 5 tokens (five of them, the last partial) give what one block gives, each token's q_t
    and x_t paired with its own A_t, and a non-finite x_t in a later block is infinitely wrong there
    only. The solution is an inexact one (3 CG steps), whose backward errors differ from token to
    token (a single-block problem, as above, cannot see a block misaligned with q or x)."""
    from mesa_stability.stability.metrics import backward_error

    p = random_problem(1, 24, 2, 8, seed=5).to(torch.float64)
    x = solve(p, "cg", steps=3).x
    one = backward_error(p, x, block=64)
    assert float(one.min()) > 1e3 * 2.0**-53  # far above rounding: a mispaired token changes it
    assert torch.allclose(backward_error(p, x, block=5), one, rtol=1e-12, atol=0)
    bad = x.clone()
    bad[0, 17, 0, 2] = float("inf")
    be = backward_error(p, bad, block=5)
    inf = torch.isinf(be)
    assert bool(inf[0, 17, 0]) and int(inf.sum()) == 1
    assert torch.allclose(be[~inf], one[~inf], rtol=1e-12, atol=0)
