"""Implicit-differentiation backward (solvers.implicit, the torch backend of kernels.mesa_chunk)."""

from __future__ import annotations

import pytest
import torch

from mesa_stability import solvers
from mesa_stability.kernels import mesa_chunk
from mesa_stability.solvers.implicit import mesa_implicit
from mesa_stability.stability import cases
from mesa_stability.stability.gradients import closed_form_gradients
from mesa_stability.stability.metrics import rel_error
from mesa_stability.stability.reference import mp_directional_derivative

NAMES = ("q", "k", "v", "g", "beta", "lam", "H0", "G0")


def _grads(p, e, **opts):
    """Gradients of sum(e * o) for every input (and the initial state) by the implicit backward."""
    leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    init = None if p.initial_state is None else tuple(s.clone().requires_grad_() for s in p.initial_state)
    o, *_ = mesa_implicit((*leaves, init), **opts)
    (o * e).sum().backward()
    out = {n: t.grad for n, t in zip(NAMES, leaves, strict=False)}
    if init is not None:
        out["H0"], out["G0"] = init[0].grad, init[1].grad
    return out


@pytest.mark.parametrize("case", ["well_conditioned", "strong_forgetting", "low_rank_keys"])
def test_implicit_gradients_match_the_closed_forms(case):
    p = cases.make(case, B=2, T=37, H=2, D=6, Dv=4, seed=1)
    p = p.replace(initial_state=cases.random_problem(B=2, T=1, H=2, D=6, Dv=4, seed=2, initial_state=True)
                  .initial_state)
    e = cases.upstream_gradient(p, seed=3)
    ref = closed_form_gradients(p, e)
    got = _grads(p, e, policy="fp64", steps=200, tol=1e-14, chunk_size=8)
    for name in NAMES:
        # converged fp64 solves: rounding of O(T) terms times kappa (< 60 here)
        assert rel_error(got[name], ref[name]) <= 1e-11, name


def test_gradcheck_float64():
    p = cases.random_problem(B=1, T=7, H=1, D=3, Dv=2, seed=3, initial_state=True)
    ins = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam, *p.initial_state)]

    def f(q, k, v, g, beta, lam, H0, G0):
        o, (H_T, G_T), *_ = mesa_implicit((q, k, v, g, beta, lam, (H0, G0)), policy="fp64", steps=30, chunk_size=4)
        return o, H_T, G_T

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_directional_derivatives_agree_with_mpmath():
    p = cases.random_problem(B=1, T=6, H=1, D=3, Dv=2, seed=4, initial_state=True)
    e = cases.upstream_gradient(p, seed=1)
    got = _grads(p, e, policy="fp64", steps=50, tol=1e-15, chunk_size=4)
    gen = torch.Generator().manual_seed(9)
    for name in NAMES:
        d = torch.randn(got[name].shape, generator=gen, dtype=torch.float64)
        exact = mp_directional_derivative(p, e, {name: d})
        assert abs(float((got[name] * d).sum()) - exact) <= 1e-12 * max(1.0, abs(exact)), name


def test_gradients_scale_with_the_upstream_gradient():
    """e scaled by s from 1e-8 to 1e2: every gradient scales by s, its error stays within the fp32 bound."""
    p = cases.make("small_upstream_grad", B=1, T=40, H=2, D=8, seed=5, q_scale=1.0)
    e1 = cases.upstream_gradient(p, seed=6)
    ref = closed_form_gradients(p, e1)
    p32 = p.to(torch.float32)
    for s in (1e-8, 1e-6, 1e-3, 1.0, 1e2):
        got = _grads(p32, (s * e1).float(), policy="fp32", steps=60, tol=1e-6, chunk_size=16)
        for name in ("q", "k", "v", "g", "beta", "lam"):
            # relative residual 1e-6 of both solves, kappa < 10: 1e-5 relative
            assert rel_error(got[name].double() / s, ref[name]) <= 1e-4, (s, name)


def test_truncation_gap_between_forward_and_implicit_gradient(capsys):
    """With a truncated forward, the implicit gradient (at the computed x) differs from the true
    gradient of the truncated computation (autograd through the unrolled CG): measured here."""
    p = cases.make("no_forgetting_long", B=1, T=64, H=1, D=16, seed=2)
    e = cases.upstream_gradient(p, seed=4)
    rows = []
    for steps in (2, 5, 10, 20, 30):
        implicit = _grads(p, e, policy="fp64", steps=steps, chunk_size=16)
        leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
        o = solvers.solve(solvers.MesaProblem(*leaves), "cg", steps=steps, chunk_size=16).o
        unrolled = torch.autograd.grad((o * e).sum(), leaves)
        gaps = {n: rel_error(implicit[n], u) for n, u in zip(NAMES, unrolled, strict=False)}
        fwd = rel_error(o.detach(), solvers.solve(p, "exact").o)
        rows.append((steps, fwd, gaps))
    with capsys.disabled():
        print("\nsteps | forward rel. error of o | implicit vs unrolled gradient: q, k, v, g, beta, lam")
        for steps, fwd, gaps in rows:
            print(f"{steps:5d} | {fwd:.2e} | " + ", ".join(f"{gaps[n]:.1e}" for n in NAMES[:6]))
    worst = {steps: max(g.values()) for steps, _, g in rows}
    # truncated (forward error >= 1e-3): the implicit gradient is not the gradient of what was
    # computed, by far more than the forward error (the gap need not fall monotonically)
    assert all(worst[s] > 1e-1 for s in (2, 5, 10))
    # converged (forward error ~ u): the two agree to rounding
    assert worst[20] < 1e-10 and worst[30] < 1e-10


def test_mesa_chunk_torch_backend_is_differentiable_and_auto_picks_it_on_cpu():
    p = cases.make("well_conditioned", B=1, T=20, H=2, D=8, seed=3).to(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    o, st = mesa_chunk(*leaves, policy="fp32", steps=40, tol=1e-6, return_stats=True)  # auto -> torch on CPU
    o.sum().backward()
    ref = closed_form_gradients(p, torch.ones_like(o))
    assert rel_error(leaves[0].grad.double(), ref["q"]) <= 1e-4 and rel_error(leaves[1].grad.double(), ref["k"]) <= 1e-4
    assert st.steps.shape == (1, 20, 2)
    with pytest.raises(ValueError, match="backend"):
        mesa_chunk(*leaves, backend="cuda")
    o64 = mesa_chunk(*(t.detach().double() for t in leaves), policy="fp64", steps=60, tol=1e-12, backend="torch")
    assert rel_error(o64, solvers.solve(p.to(torch.float64), "exact").o) <= 1e-10


def test_chunked_contractions_equal_the_surrogate_autograd():
    """The written-out chunkwise gradients against autograd of the surrogate (same x and y), with an
    initial state and upstream gradients on the final state too."""
    from mesa_stability.solvers.implicit import implicit_backward, surrogate_gradients
    from mesa_stability.solvers.spec import SolverSpec

    p = cases.random_problem(B=2, T=29, H=2, D=5, Dv=3, seed=8, initial_state=True)
    inputs = (p.q, p.k, p.v, p.g, p.beta, p.lam, *p.initial_state)
    cfg = SolverSpec(policy="fp64", steps=7, chunk_size=8)  # truncated on purpose
    x = solvers.solve(p, "cg", steps=7, chunk_size=8).x
    e = cases.upstream_gradient(p, seed=1)
    gen = torch.Generator().manual_seed(2)
    dH_T = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64)
    dG_T = torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64)
    # the identity holds for any fixed (x, y): a random y exercises every y term
    y = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    got = implicit_backward(inputs, [True] * 8, x, cfg, e, dH_T, dG_T, y=y)
    ref = surrogate_gradients(inputs, x, y, e, cfg.policy, 8, dH_T, dG_T)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert rel_error(a, b) <= 1e-12, name
