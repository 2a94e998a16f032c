"""Hard resets: a log gate g <= RESET_LOG_GATE (g = -inf included) is gamma = 0, exactly, everywhere.

Checked against the mpmath reference (x, o, directional derivatives), the float64 closed-form
gradients, the same sequence cut into two problems at the reset, and the definitions of
:mod:`solvers.gates`; plus validation (-inf accepted, NaN / +inf / indefinite H0 rejected) and
Sherman-Morrison's refusal.
"""

from __future__ import annotations

import pytest
import torch

from mesa_stability import solvers
from mesa_stability.solvers.chunk_state import ChunkedSystem
from mesa_stability.solvers.gates import (
    RESET_LOG_GATE,
    decay_from_start,
    decay_to_end,
    pairwise_decay,
    reset_mask,
    reset_threshold,
    segmented_cumsum,
    segmented_cumsum_grad,
)
from mesa_stability.solvers.implicit import mesa_implicit, surrogate_gradients
from mesa_stability.stability import cases
from mesa_stability.stability.gradients import closed_form_gradients
from mesa_stability.stability.metrics import rel_error
from mesa_stability.stability.reference import mp_directional_derivative, mp_solve

RESETS = (-1e4, -1e6, -1e8, -1e16, float("-inf"))
NAMES = ("q", "k", "v", "g", "beta", "lam")
T, D, Dv, H = 24, 5, 3, 2
# (token, head) of the resets: token 0, a chunk start for C = 8 (token 8), a chunk end (15), mid-chunk
PLACES = {"start": [(0, 0)], "chunk-boundary": [(8, 0), (15, 1)], "two": [(5, 1), (13, 1)]}


def _problem(value, places, *, seed=0, initial_state=True, **sizes) -> solvers.MesaProblem:
    sizes = dict(B=1, T=T, H=H, D=D, Dv=Dv) | sizes
    p = cases.random_problem(seed=seed, initial_state=initial_state, **sizes)
    g = p.g.clone()
    for t, h in places:
        g[:, t, h] = value
    return p.replace(g=g)


# the gates -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reset_threshold_is_where_exp_rounds_to_zero(dtype):
    th = RESET_LOG_GATE[dtype]
    assert reset_threshold(dtype) == th
    assert float(torch.exp(torch.tensor(th, dtype=dtype))) == 0.0
    assert float(torch.exp(torch.tensor(th + 1, dtype=dtype))) > 0.0
    g = torch.tensor([0.0, th + 1, th, -1e30, float("-inf"), float("nan")], dtype=dtype)
    assert reset_mask(g).tolist() == [False, False, True, True, True, False]


def test_half_precision_gates_are_fp32():
    for dt in (torch.bfloat16, torch.float16):
        assert reset_threshold(dt) == RESET_LOG_GATE[torch.float32]
        Gam, _ = segmented_cumsum(torch.tensor([-0.5, -200.0, -0.25], dtype=dt))
        assert Gam.dtype == torch.float32 and Gam.tolist() == [-0.5, -0.5, -0.75]
    with pytest.raises(ValueError, match="floating dtype"):
        reset_threshold(torch.int32)


def _decays_by_products(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W, zeta_{i,0}, zeta_{L,j} from the definition: products of gamma = exp(g) (0 at a reset)."""
    gamma = torch.where(reset_mask(g), 0.0, torch.exp(g))
    L = g.shape[-1]
    W = torch.zeros(L, L, dtype=g.dtype)
    for i in range(L):
        for j in range(i + 1):
            W[i, j] = torch.prod(gamma[j + 1:i + 1])
    return W, torch.cumprod(gamma, 0), W[-1]


@pytest.mark.parametrize("value", RESETS)
def test_decays_are_exact_across_resets(value):
    gen = torch.Generator().manual_seed(0)
    g = torch.log(torch.rand(12, generator=gen, dtype=torch.float64) * 0.5 + 0.5)
    g[[0, 4, 5, 9]] = value
    Gam, seg = segmented_cumsum(g)
    assert seg.tolist() == [1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4]
    W, z0, zL = _decays_by_products(g)
    for got, ref in ((pairwise_decay(Gam, seg), W), (decay_from_start(Gam, seg), z0), (decay_to_end(Gam, seg), zL)):
        assert torch.equal(got == 0, ref == 0)  # zero exactly across every reset
        assert torch.allclose(got, ref, rtol=1e-14, atol=0)


def test_segmented_cumsum_grad_sums_exactly_its_segment():
    gen = torch.Generator().manual_seed(1)
    for L in (1, 2, 7, 16, 33):
        for _ in range(5):
            g = -torch.rand(3, L, generator=gen, dtype=torch.float64)
            g[torch.rand(3, L, generator=gen) < 0.3] = float("-inf")
            a = torch.randint(-50, 50, (3, L), generator=gen).to(torch.float64)  # integers: sums are exact
            got = segmented_cumsum_grad(a.transpose(0, 1), g.transpose(0, 1), dim=0).transpose(0, 1)
            ref = torch.zeros_like(a)
            for b in range(3):
                for s in range(L):
                    if not reset_mask(g[b, s]):
                        t = s
                        while t < L and (t == s or not reset_mask(g[b, t])):
                            ref[b, s] += a[b, t]
                            t += 1
            assert torch.equal(got, ref), (L, g, a)


def test_segmented_cumsum_grad_is_the_gradient_of_a_function_of_the_decays():
    gen = torch.Generator().manual_seed(2)
    g = -torch.rand(2, 10, generator=gen, dtype=torch.float64)
    g[0, 3], g[1, 0], g[1, 7] = -1e16, float("-inf"), -800.0
    c1 = torch.randn(2, 10, 10, generator=gen, dtype=torch.float64)
    c2, c3 = torch.randn(2, 2, 10, generator=gen, dtype=torch.float64)
    leaf = g.clone().requires_grad_()
    Gam, seg = segmented_cumsum(leaf)
    Gam.retain_grad()
    loss = ((c1 * pairwise_decay(Gam, seg)).sum() + (c2 * decay_from_start(Gam, seg)).sum()
            + (c3 * decay_to_end(Gam, seg)).sum())
    loss.backward()
    dg = segmented_cumsum_grad(Gam.grad, g)
    assert torch.allclose(dg, leaf.grad, rtol=0, atol=1e-13)
    assert dg[0, 3] == 0 and dg[1, 0] == 0 and dg[1, 7] == 0


# forward against mpmath -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", RESETS)
@pytest.mark.parametrize("where", list(PLACES))
def test_exact_and_cg_match_mpmath(value, where):
    p = _problem(value, PLACES[where])
    x_mp, o_mp = mp_solve(p)
    ex = solvers.solve(p, "exact", block=8)
    assert rel_error(ex.x, x_mp) <= 1e-12 and rel_error(ex.o, o_mp) <= 1e-12
    for C in (1, 3, 8, T):
        cg = solvers.solve(p, "cg", steps=80, tol=1e-13, chunk_size=C)
        assert rel_error(cg.x, x_mp) <= 1e-10 and rel_error(cg.o, o_mp) <= 1e-10, C
    cheb = solvers.solve(p, "chebyshev", steps=400, tol=1e-13, chunk_size=8)
    assert rel_error(cheb.x, x_mp) <= 1e-10


def test_mpmath_reset_is_gamma_zero():
    """Every float64 reset gate gives mpmath the same x and o as g = -inf (exp(-inf) = 0 exactly)."""
    ref = mp_solve(_problem(float("-inf"), PLACES["two"]))
    for value in (-746.0, -1e4, -1e16):
        got = mp_solve(_problem(value, PLACES["two"]))
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), value


def test_fp32_solvers_are_exact_across_resets():
    """In fp32 a gate of -200 is a reset too (exp(-200) = 0 in fp32); fp32 CG stays at its rounding level."""
    for value in (-200.0, -1e16, float("-inf")):
        p = _problem(value, PLACES["chunk-boundary"])
        x_mp, o_mp = mp_solve(p)
        cg = solvers.solve(p.to(torch.float32), "cg", "fp32", steps=60, tol=1e-7, chunk_size=8)
        assert rel_error(cg.x, x_mp) <= 1e-5 and rel_error(cg.o, o_mp) <= 1e-5, value


@pytest.mark.parametrize("value", [-1e16, float("-inf")])
def test_a_reset_splits_the_problem_in_two(value):
    """Tokens from a reset on are a fresh problem (no initial state); tokens before it, a problem of their own."""
    r = 9
    p = _problem(value, [(r, 0), (r, 1)], B=2)
    whole = solvers.solve(p, "exact", block=4)
    first = solvers.solve(p.tokens(0, r).replace(initial_state=p.initial_state), "exact")
    second = solvers.solve(p.tokens(r, T), "exact")
    for got, ref in ((whole.x[:, :r], first.x), (whole.o[:, :r], first.o), (whole.x[:, r:], second.x),
                     (whole.o[:, r:], second.o)):
        assert rel_error(got, ref) <= 1e-14
    for a, b in zip(whole.final_state, second.final_state, strict=True):
        assert rel_error(a, b) <= 1e-14
    for C in (1, 4, 8):
        cg = solvers.solve(p, "cg", steps=80, tol=1e-13, chunk_size=C)
        assert rel_error(cg.o[:, r:], second.o) <= 1e-12 and rel_error(cg.o[:, :r], first.o) <= 1e-12


def test_reset_at_token_zero_ignores_the_initial_state():
    p = _problem(float("-inf"), [(0, 0), (0, 1)])
    fresh = solvers.solve(p.replace(initial_state=None), "exact")
    ex = solvers.solve(p, "exact")
    assert torch.equal(ex.x, fresh.x) and torch.equal(ex.o, fresh.o)


# gradients --------------------------------------------------------------------------------------------

def _implicit_grads(p, e, chunk_size):
    leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    init = tuple(s.clone().requires_grad_() for s in p.initial_state)
    o, *_ = mesa_implicit((*leaves, init), policy="fp64", steps=100, tol=1e-14, chunk_size=chunk_size)
    (o * e).sum().backward()
    out = {n: t.grad for n, t in zip(NAMES, leaves, strict=True)}
    out["H0"], out["G0"] = init[0].grad, init[1].grad
    return out


@pytest.mark.parametrize("value", RESETS)
@pytest.mark.parametrize("where", list(PLACES))
def test_gradients_match_the_closed_forms(value, where):
    p = _problem(value, PLACES[where])
    e = cases.upstream_gradient(p, seed=3)
    ref = closed_form_gradients(p, e)
    resets = reset_mask(p.g)
    assert bool((ref["g"][resets] == 0).all())
    for C in (1, 3, 8, T):
        got = _implicit_grads(p, e, C)
        for name in (*NAMES, "H0", "G0"):
            assert rel_error(got[name], ref[name]) <= 1e-10, (C, name)
        assert bool((got["g"][resets] == 0).all()), C


def test_gradients_match_mpmath():
    p = _problem(float("-inf"), PLACES["chunk-boundary"], T=16, D=4)
    e = cases.upstream_gradient(p, seed=1)
    ref = closed_form_gradients(p, e)
    got = _implicit_grads(p, e, 4)
    gen = torch.Generator().manual_seed(5)
    for name in NAMES:
        d = torch.randn(got[name].shape, generator=gen, dtype=torch.float64)
        exact = mp_directional_derivative(p, e, {name: d})
        for grads in (got, ref):
            assert abs(float((grads[name] * d).sum()) - exact) <= 1e-11 * max(1.0, abs(exact)), name
    # along a finite reset gate (gamma = exp(-1e16), not 0 in mpmath), the derivative is 0 too
    q = p.replace(g=torch.where(reset_mask(p.g), -1e16, p.g))
    assert mp_directional_derivative(q, e, {"g": reset_mask(q.g).to(torch.float64)}) == 0.0


def test_dg_before_a_reset_only_sees_tokens_before_it():
    """dg_s for s < r equals dg of the problem cut at r: the loss after the reset does not depend on g_s.

    The upstream gradient after the reset is 1e10 times larger: a reverse sum over all t >= s would
    carry the rounding of those terms (~1e-6 here) into dg_s, the restarted one has none of it."""
    r = 11
    p = _problem(-1e16, [(r, 0), (r, 1)])
    e = cases.upstream_gradient(p, seed=4)
    e[:, r:] *= 1e10
    first = p.tokens(0, r).replace(initial_state=p.initial_state)
    ref = closed_form_gradients(first, e[:, :r])["g"]
    for C in (1, 4, 8, T):
        got = _implicit_grads(p, e, C)["g"]
        assert rel_error(got[:, :r], ref) <= 1e-11, C
    assert rel_error(closed_form_gradients(p, e)["g"][:, :r], ref) <= 1e-12


def test_surrogate_autograd_agrees_across_resets():
    """The independent route: autograd of the implicit surrogate through the reset-aware chunked operators."""
    p = _problem(float("-inf"), PLACES["two"])
    e = cases.upstream_gradient(p, seed=2)
    ref = closed_form_gradients(p, e)
    x = solvers.solve(p, "exact").x
    grads = surrogate_gradients((p.q, p.k, p.v, p.g, p.beta, p.lam, *p.initial_state), x, ref["q"], e,
                                solvers.get_policy("fp64"), 8)
    for name, got in zip((*NAMES, "H0", "G0"), grads, strict=True):
        assert rel_error(got, ref[name]) <= 1e-10, name
    assert bool((grads[3][reset_mask(p.g)] == 0).all())


# validation and Sherman-Morrison ------------------------------------------------------------------------

def test_validation_accepts_minus_inf_and_rejects_nan_and_plus_inf():
    p = _problem(float("-inf"), PLACES["two"])
    assert bool(torch.isneginf(p.g).any())
    for bad in (float("nan"), float("inf")):
        g = p.g.clone()
        g[0, 2, 0] = bad
        with pytest.raises(ValueError, match=r"^g has 1 non-finite"):
            p.replace(g=g)
    for name in ("q", "k", "v", "beta", "lam"):
        x = getattr(p, name).clone()
        x.view(-1)[0] = float("-inf")
        with pytest.raises(ValueError, match=rf"^{name} has 1 non-finite"):
            p.replace(**{name: x})
    solvers.validate_inputs(p.q, p.k, p.v, torch.full_like(p.g, float("nan")), p.beta, p.lam, check_values=False)


def test_validation_rejects_an_indefinite_initial_state():
    p = _problem(-1.0, [], B=2)
    H0, G0 = p.initial_state
    with pytest.raises(ValueError, match=r"^initial_state\[0\] \(H0\) must be positive semidefinite; batch 0, head 0"):
        p.replace(initial_state=(-H0, G0))
    bad = H0.clone()
    bad[1, 1] -= 0.5 * torch.linalg.matrix_norm(bad[1, 1]) * torch.eye(D, dtype=bad.dtype)
    with pytest.raises(ValueError, match=r"batch 1, head 1 has eigenvalue -"):
        p.replace(initial_state=(bad, G0))
    p.replace(initial_state=(torch.zeros_like(H0), G0))  # zero is PSD
    solvers.validate_inputs(p.q, p.k, p.v, p.g, p.beta, p.lam, (-H0, G0), check_values=False)


def test_validation_accepts_low_precision_states():
    """A final state stored in bf16 (eigenvalues near zero pushed to about -1e-3 of the largest) is a valid H0."""
    p = cases.make("low_rank_keys", B=1, T=8, H=2, D=16, Dv=4, seed=0)
    S = ChunkedSystem.build(p, solvers.get_policy("bf16-bf16state"), 4)
    H0 = (S.H_final + S.H_final.transpose(-1, -2)) / 2
    ev = torch.linalg.eigvalsh(H0.double())
    assert float((ev[..., 0] / ev[..., -1]).min()) < -2 * torch.finfo(torch.float32).eps ** 0.5
    p.replace(initial_state=(H0, S.G_final))


@pytest.mark.parametrize("value", [-1e16, float("-inf")])
def test_sherman_morrison_refuses_a_reset(value):
    p = _problem(value, [(7, 1)])
    for run in (lambda: solvers.solve(p, "sherman_morrison"),
                lambda: solvers.own_problem_reference(p, solvers.get_policy("fp64"))):
        with pytest.raises(ValueError, match=r"Sherman-Morrison cannot represent a hard reset \(gamma = 0\) at "
                                             r"token t = 7 \(batch 0, head 1"):
            run()
    solvers.solve(_problem(-1.0, [(7, 1)]), "sherman_morrison")  # an ordinary gate is fine


# the kernels -----------------------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("value", [-1e8, float("-inf")])
@pytest.mark.parametrize("where", list(PLACES))
def test_kernels_are_exact_across_resets(value, where):
    """The Triton forward and backward (fp32 policy, chunk size 8: resets at a chunk start, at a chunk
    end, inside a chunk) against the float64 closed forms: x and o at fp32 accuracy, dg exactly 0 at
    every reset."""
    import os
    import warnings

    from mesa_stability.kernels import mesa_chunk
    from mesa_stability.solvers.certificate import CertificateWarning

    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    p = _problem(value, PLACES[where], D=16, Dv=16)
    e = cases.upstream_gradient(p, seed=3)
    ref = closed_form_gradients(p, e)
    ex = solvers.solve(p, "exact")
    leaves = [getattr(p, n).float().to(dev).requires_grad_() for n in NAMES]
    init = tuple(s.float().to(dev) for s in p.initial_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CertificateWarning)
        o, st = mesa_chunk(*leaves, steps=60, policy="fp32", chunk_size=8, initial_state=init, backend="triton",
                           return_stats=True, return_x=True)
        o.backward(e.float().to(dev))
    assert rel_error(st.x.double().cpu(), ex.x) < 1e-5
    assert rel_error(o.detach().double().cpu(), ex.o) < 1e-5
    for n, t in zip(NAMES, leaves, strict=True):
        assert rel_error(t.grad.double().cpu(), ref[n]) < 1e-4, n
    dg = leaves[3].grad.cpu()
    for t, h in PLACES[where]:
        assert float(dg[0, t, h]) == 0.0


@pytest.mark.triton
@pytest.mark.parametrize("block_t", [None, 16])
def test_the_reverse_cumsum_kernel_sums_exactly_its_segment(monkeypatch, block_t):
    """kernels.reverse_cumsum against solvers.gates.segmented_cumsum_grad: integer terms make every
    float32 segment sum exact, so the two agree bit for bit whatever their summation orders; rows of
    one block, several blocks (BLOCK_T = 16), a reset at the first and last token, strided inputs."""
    from mesa_stability.kernels import reverse_cumsum

    if block_t is not None:
        monkeypatch.setattr(reverse_cumsum, "MAX_BLOCK_T", block_t)
    gen = torch.Generator().manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for B, L, H in ((1, 1, 1), (2, 7, 3), (1, 16, 2), (2, 33, 2), (1, 100, 1)):
        g = torch.nn.functional.logsigmoid(3 + torch.randn(B, L, H, generator=gen))
        g[torch.rand(B, L, H, generator=gen) < 0.2] = float("-inf")
        g[0, 0, 0] = g[-1, -1, -1] = float("-inf")
        a = torch.randint(-50, 50, (B, L, H), generator=gen).to(torch.float32)
        ref = segmented_cumsum_grad(a.transpose(1, 2), g.transpose(1, 2)).transpose(1, 2)
        a_strided = a.transpose(0, 1).contiguous().transpose(0, 1)  # another memory order, same values
        got = reverse_cumsum.segmented_reverse_cumsum(a_strided.to(dev), g.to(dev)).cpu()
        assert torch.equal(got, ref), (B, L, H)
    with pytest.raises(ValueError, match="float32"):
        reverse_cumsum.segmented_reverse_cumsum(a.double(), g)
