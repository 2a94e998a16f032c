"""The accuracy certificate (solvers/certificate.py) and the trust rules it serves: no silent garbage.

Generic tests iterate a registry of (backend, policy) x stress case: the certified bound must lie
above the measured error of x against the float64 exact solver (the bound is rigorous), a token
above the threshold must warn / raise, and the adjoint solve is certified in the backward. Edge
inputs (overflow, tiny lam, CG ending worse than it started) must be flagged or NaN, never finite
and silent. Triton cases run through the interpreter on the CPU (``TRITON_INTERPRET=1``) or on CUDA.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from mesa_stability import solvers
from mesa_stability.kernels import flush_checks, mesa_chunk
from mesa_stability.solvers import get_policy
from mesa_stability.solvers.certificate import Certificate, CertificateError, CertificateWarning
from mesa_stability.stability import cases
from mesa_stability.stability.metrics import rel_error

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"

# (backend, policy) pairs: the torch backend emulates every policy, the kernels implement them natively
# (the interpreter is slow: three kernel policies, one per kind of state and product precision)
IMPLS = [("torch", "fp32"), ("torch", "bf16-fp32state"), ("torch", "fp16-fp16state"),
         pytest.param("triton", "fp32", marks=pytest.mark.triton),
         pytest.param("triton", "auto", marks=pytest.mark.triton),
         pytest.param("triton", "bf16-bf16state", marks=pytest.mark.triton)]
CASES = {"low_rank_keys": dict(T=80, H=2, D=16), "tiny_lambda": dict(T=64, H=2, D=16),
         "strong_forgetting": dict(T=64, H=2, D=16), "well_conditioned": dict(T=48, H=2, D=16)}


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _inputs(p, device, dtype=torch.float32):
    return [t.to(device=device, dtype=dtype) for t in (p.q, p.k, p.v)] + [
        t.to(device=device, dtype=torch.float32) for t in (p.g, p.beta, p.lam)]


def _x_errors(x, ref_x):
    return ((x.double().cpu() - ref_x).norm(dim=-1) / ref_x.norm(dim=-1)).clamp_min(0)


@pytest.mark.parametrize("backend,policy", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_bound_lies_above_the_measured_error(backend, policy, case):
    p = cases.make(case, seed=1, **CASES[case])
    ref = solvers.solve(p, "exact")
    inp = _inputs(p, _device(backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CertificateWarning)
        _, st = mesa_chunk(*inp, steps=60, policy=policy, backend=backend, return_stats=True, return_x=True)
    c = st.certificate
    err = _x_errors(st.x, ref.x)
    assert c.bound.shape == err.shape and c.kappa.shape == err.shape
    # every token's bound (relative to the exact x of the rounded inputs, which are exact here: fp32
    # inputs of a float64 problem are rounded once, at u_fp32, far below these errors) covers its error
    slack = 2 * 2.0**-24 * c.kappa.cpu()
    assert bool((err <= c.bound.cpu() + slack).all()), float((err - c.bound.cpu()).max())
    # the free bound really bounds kappa from above
    assert float(c.kappa.min()) >= 1.0


@pytest.mark.parametrize("backend,policy", [("torch", "bf16-bf16state"),
                                            pytest.param("triton", "bf16-bf16state", marks=pytest.mark.triton)])
def test_a_failing_token_warns_or_raises_with_the_worst_token_and_a_suggestion(backend, policy):
    # repeated keys, no forgetting: kappa grows with t and bf16 state storage cannot resolve it
    p = cases.random_problem(1, 128, 1, 16, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                             lam_range=(0.25, 0.25), key_rank=2)
    inp = _inputs(p, _device(backend))
    with pytest.warns(CertificateWarning, match=r"worst token \d+ \(batch 0, head \d\).*would meet it|No kernel"):
        mesa_chunk(*inp, steps=30, policy=policy, backend=backend)
        flush_checks()  # on CUDA the verdict is read without a sync: here, at the latest
    with pytest.raises(CertificateError, match="certified relative error"):
        mesa_chunk(*inp, steps=30, policy=policy, backend=backend, check="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)
        _, st = mesa_chunk(*inp, steps=30, policy=policy, backend=backend, check=None, return_stats=True)
    assert st.certificate is None
    with pytest.raises(ValueError, match="check must be one of"):
        mesa_chunk(*inp, policy=policy, backend=backend, check="loud")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_well_conditioned_fp32_passes_silently(backend):
    p = cases.make("well_conditioned", T=40, H=2, D=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)
        _, st = mesa_chunk(*_inputs(p, _device(backend)), steps=40, policy="fp32", backend=backend,
                           return_stats=True, check="raise")
    assert st.certificate.ok and st.certificate.max_bound < 1e-4


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_the_adjoint_solve_is_certified_in_the_backward(backend):
    p = cases.random_problem(1, 96, 1, 16, seed=2, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                             lam_range=(0.25, 0.25), key_rank=2)
    leaves = [t.requires_grad_() for t in _inputs(p, _device(backend))]
    o, st = mesa_chunk(*leaves, steps=40, policy="fp32", backend=backend, return_stats=True)
    assert st.adjoint_certificate is None
    o.backward(torch.ones_like(o))
    a = st.adjoint_certificate
    assert a is not None and a.what == "adjoint y" and a.bound.shape == st.certificate.bound.shape
    assert math.isfinite(a.max_bound)
    # bf16 state storage fails the adjoint too, and says so in the backward
    leaves = [t.detach().requires_grad_() for t in leaves]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CertificateWarning)
        o, st = mesa_chunk(*leaves, steps=40, policy="bf16-bf16state", backend=backend, return_stats=True)
    with pytest.warns(CertificateWarning, match="adjoint y"):
        o.backward(torch.ones_like(o))
        flush_checks()


@pytest.mark.parametrize("backend,policy", [("torch", "fp32"), pytest.param("triton", "fp32", marks=pytest.mark.triton),
                                            pytest.param("triton", "bf16-fp32state", marks=pytest.mark.triton)])
def test_overflowing_keys_are_not_a_silent_zero(backend, policy):
    p = cases.make("well_conditioned", T=32, H=1, D=16)
    q, k, v, g, beta, lam = _inputs(p, _device(backend))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = mesa_chunk(q, k * 1e20, v, g, beta, lam, steps=20, policy=policy, backend=backend)
        flush_checks()
    flagged = any(issubclass(x.category, CertificateWarning) for x in w)
    assert flagged or not bool(torch.isfinite(o).all())


@pytest.mark.triton
@pytest.mark.parametrize("policy", ["fp16-fp32state", "fp16-fp16state"])
def test_fp16_with_tiny_lam_is_flagged(policy):
    p = cases.random_problem(1, 32, 1, 16, seed=0, lam_range=(1e-6, 1e-6))
    with pytest.raises(CertificateError):
        mesa_chunk(*_inputs(p, TRITON_DEVICE), steps=20, policy=policy, backend="triton", check="raise")


@pytest.mark.triton
def test_cg_that_ends_worse_than_it_started_is_flagged():
    # lam = 1e-6 with rank-2 keys: kappa ~ 1e8, far beyond fp32's reach
    p = cases.random_problem(1, 64, 1, 16, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                             lam_range=(1e-6, 1e-6), key_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CertificateWarning)
        _, st = mesa_chunk(*_inputs(p, TRITON_DEVICE), steps=60, policy="fp32", backend="triton",
                           return_stats=True, return_x=True)
    assert st.breakdown is not None and st.breakdown.dtype == torch.bool
    err = _x_errors(st.x, solvers.solve(p, "exact").x)
    bad = err > 1e-2
    assert bool(bad.any())  # the case does break fp32
    assert bool(st.certificate.failed.cpu()[bad].all())


@pytest.mark.triton
def test_decode_step_with_a_huge_state_is_flagged():
    from mesa_stability.kernels import mesa_step

    p = cases.make("well_conditioned", T=16, H=2, D=16)
    q, k, v, g, beta, lam = _inputs(p, TRITON_DEVICE)
    _, (H_T, G_T) = mesa_chunk(q, k, v, g, beta, lam, steps=30, policy="fp32", backend="triton",
                               output_final_state=True)
    with pytest.raises(CertificateError):
        mesa_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], beta[:, -1], lam, (H_T * 1e38, G_T), check="raise")
    o, _, st = mesa_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], beta[:, -1], lam, (H_T, G_T), return_stats=True)
    assert st.certificate.ok
    # the verdict with the token check (decided at its host read) and without it (deferred on CUDA)
    for validate in (True, False):
        with pytest.warns(CertificateWarning, match="decode step"):
            mesa_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], beta[:, -1], lam, (H_T * 1e38, G_T),
                      validate=validate)
            flush_checks()


@pytest.mark.triton
@pytest.mark.parametrize("case", ["well_conditioned", "tiny_lambda", "low_rank_keys"])
def test_decode_step_certificate_is_the_float64_one(case):
    """The decode kernel's in-kernel certificate (float64 residual from the given state) against
    solvers.certificate.certify_exact on the same one-token problem: the same rho, kappa and bound."""
    from mesa_stability.kernels import mesa_step
    from mesa_stability.solvers import certificate as cert

    p = cases.make(case, B=2, T=24, H=2, D=16).to(torch.float32)  # the caller's system: fp32, as the kernel reads it
    state = tuple(s.float() for s in p.tokens(0, p.T - 1).final_state(torch.float64))
    last = [t[:, -1:] for t in (p.q, p.k, p.v, p.g, p.beta)]
    dev = [t.to(TRITON_DEVICE) for t in (*last, p.lam)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CertificateWarning)
        _, _, st = mesa_step(*dev, tuple(s.to(TRITON_DEVICE) for s in state), steps=8, return_stats=True)
        c = st.certificate
    one = solvers.MesaProblem(*last, p.lam, state)
    ref = cert.certify_exact(one, st.x.double().cpu()[:, None], get_policy("fp32"), chunk_size=1)
    assert c.tier == 2 and ref.tier == 2
    assert c.residual.dtype == torch.float64
    assert rel_error(c.residual.cpu(), ref.residual) <= 1e-6, (c.residual, ref.residual)
    assert rel_error(c.kappa.cpu(), ref.kappa) <= 1e-12
    assert rel_error(c.bound.cpu(), ref.bound) <= 1e-6
    # 8 steps leave a measurable error, and the bound holds it
    err = _x_errors(st.x.cpu()[:, None], solvers.solve(one, "exact").x)
    assert bool((err <= c.bound.cpu()).all()) and float(err.max()) > 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_autocast_does_not_change_the_policy(backend):
    """The op computes in its policy's precision whatever autocast is active (torch's fp32 matmuls
    would otherwise run in bf16 under autocast)."""
    p = cases.make("low_rank_keys", T=48, H=2, D=16)
    inp = _inputs(p, _device(backend))
    plain = mesa_chunk(*inp, steps=40, policy="fp32", backend=backend)
    dev = _device(backend)
    with torch.autocast(dev, dtype=torch.bfloat16):
        inside = mesa_chunk(*inp, steps=40, policy="fp32", backend=backend)
    assert inside.dtype == plain.dtype
    assert rel_error(inside.double(), plain.double()) < 1e-6


def test_one_default_policy():
    from mesa_stability import cli, kernels
    from mesa_stability.solvers.precision import DEFAULT_POLICY

    assert DEFAULT_POLICY == "auto"
    from mesa_stability.solvers.spec import SolverSpec

    assert SolverSpec().policy.name == DEFAULT_POLICY  # the op's default spec
    assert kernels.layer.MesaLayer(16, 2).solver.policy.name == DEFAULT_POLICY
    # the guard: no --policy means the default (the golden preset checks one policy)
    assert cli.build_parser().parse_args(["guard"]).policy is None
    assert cli.golden_policy(None) == DEFAULT_POLICY


def test_layer_rms_norm_survives_huge_values_and_propagates_nan():
    from mesa_stability.kernels.layer import _rms_norm

    o = torch.randn(2, 3, 8)
    ref = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
    # at 1e20 the eps term is negligible: the norm of o itself
    big = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True))
    assert rel_error(_rms_norm(o * 1e20, 1e-5).double(), big.double()) < 1e-6
    assert rel_error(_rms_norm(o, 1e-5).double(), ref.double()) < 1e-6
    bad = o.clone()
    bad[0, 0, 0] = float("inf")
    assert bool(torch.isnan(_rms_norm(bad, 1e-5)[0, 0]).all())
    assert bool((_rms_norm(torch.zeros(1, 1, 4), 1e-5) == 0).all())


@pytest.mark.triton
@pytest.mark.parametrize("policy", ["fp16-fp32state", "fp16-fp16state"])
def test_an_overflowing_output_is_flagged(policy):
    """v ~ 1e4 sharing a mean direction with k: G_t passes 65504 and o = G x overflows in the output's
    fp16 products, while x itself is fine. The certificate bounds x, so the op flags the output too."""
    p = cases.make("large_values", T=96, H=1, D=16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = mesa_chunk(*_inputs(p, TRITON_DEVICE), steps=30, policy=policy, backend="triton")
        flush_checks()
    assert not bool(torch.isfinite(o).all())  # the case does overflow
    assert any(issubclass(x.category, CertificateWarning) for x in w)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiny_q_rounded_to_fp16_subnormals_is_flagged(dtype):
    """q ~ 1e-6 is subnormal in fp16 (spacing 6e-8): rounding it costs ~8%, far more than 2^-11; the
    certificate measures each token's rounding instead of assuming u. bf16 inputs too: fp16's finer
    mantissa does not hold bf16's exponent range (the residual is that of the caller's q)."""
    p = cases.make("small_upstream_grad", T=48, H=1, D=16)
    p = p.replace(**{n: getattr(p, n).to(dtype).double() for n in ("q", "k", "v")})
    ref = solvers.solve(p, "exact")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, st = mesa_chunk(*_inputs(p, TRITON_DEVICE, dtype), steps=30, policy="fp16-fp32state",
                           backend="triton", return_stats=True, return_x=True)
        flush_checks()
    err = _x_errors(st.x, ref.x)
    assert float(err.max()) > 1e-2
    assert bool((err <= st.certificate.bound.cpu()).all())
    assert any(issubclass(x.category, CertificateWarning) for x in w)


@pytest.mark.triton
@pytest.mark.parametrize("policy", ["bf16-fp32state", "bf16-bf16state", "fp16-fp32state", "fp16-fp16state"])
def test_the_16bit_policies_certify_ordinary_inputs_at_tier_1(policy):
    """On a trained layer's inputs (unit q and k, gamma = sigmoid(N(3, 1)), kappa ~ 18) the 16-bit
    policies' own states would put eps_S tr H nu / min lam (~ kappa u_bf16 ~ 0.07) above the check
    threshold and send every call to the float64 tier 2 (~40x the forward on an H200); the residual
    against states formed with bf16x3 products certifies them at tier 1, with a bound that holds."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 256, 1, 32
    unit = [torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1) for _ in range(2)]
    v = torch.randn(B, T, H, D, generator=gen)
    g = torch.nn.functional.logsigmoid(3 + torch.randn(B, T, H, generator=gen))
    beta = torch.sigmoid(torch.rand(B, T, H, generator=gen))
    lam = 0.25 + torch.nn.functional.softplus(torch.rand(H, D, generator=gen))
    q, k, v = (t.bfloat16() for t in (*unit, v))
    ref = solvers.solve(solvers.MesaProblem(*(t.double() for t in (q, k, v, g, beta, lam))), "exact")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, st = mesa_chunk(*(t.to(TRITON_DEVICE) for t in (q, k, v, g, beta, lam)), steps=30, policy=policy,
                           backend="triton", return_stats=True, return_x=True)
        flush_checks()
    assert st.certificate.tier == 1
    assert not any(issubclass(x.category, CertificateWarning) for x in w)
    assert bool((_x_errors(st.x, ref.x) <= st.certificate.bound.cpu()).all())


def test_the_adjoint_verdict_is_normwise_per_sequence():
    """One token of tiny y with a large relative bound does not fail a sequence whose normwise error
    is small; the sequence bound follows sqrt(sum a_t^2) / (||Y|| - beta), a_t = b_t ||y_t|| / (1 - b_t)."""
    B, T, H = 1, 4, 2
    bound = torch.full((B, T, H), 1e-3, dtype=torch.float64)
    norms = torch.ones(B, T, H, dtype=torch.float64)
    bound[0, 0, 0], norms[0, 0, 0] = 0.5, 1e-3  # head 0: a tiny y_0, off by up to 50% of itself
    bound[0, 2, 1] = 0.5  # head 1: a full-size y_2 off by 50%
    c = Certificate(bound, torch.ones_like(bound), bound, torch.zeros_like(bound, dtype=torch.bool), 0.0625, 1,
                    "adjoint y", norms)
    a = bound * norms / (1 - bound)
    beta, norm = a.square().sum(1).sqrt(), norms.square().sum(1).sqrt()
    assert torch.allclose(c.sequence_bound, beta / (norm - beta))
    assert float(c.sequence_bound[0, 0]) < 0.0625 < float(c.sequence_bound[0, 1])
    assert not c.ok and bool(c.failed[0, :, 1].all()) and not bool(c.failed[0, :, 0].any())
    assert "1 of 2 sequences" in c.message(get_policy("bf16-fp32state"))
    token = Certificate(bound, torch.ones_like(bound), bound, torch.zeros_like(bound, dtype=torch.bool), 0.0625, 1)
    assert int(token.failed.sum()) == 2  # the per-token verdict (x) fails both tokens
    bound[0, 1, 0] = math.inf
    assert math.isinf(float(c.sequence_bound[0, 0]))


def test_tier2_bounds_hold_on_the_adjoint():
    """certify_exact's per-token bounds hold for a perturbed adjoint solution y, against dense float64
    solves of A_t y_t = G_t^T e_t built from the problem's own states, and so does the normwise one."""
    p = cases.make("low_rank_keys", T=48, H=2, D=8)
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(p.B, p.T, p.H, p.Dv, dtype=torch.float64, generator=gen)
    Hs, Gs = zip(*[(H, G) for _, _, H, G in p.iter_states(block=16)], strict=True)
    H, G = torch.cat(Hs, 1), torch.cat(Gs, 1)  # [B,T,H,D,D], [B,T,H,Dv,D]
    A = H + torch.diag_embed(p.lam.double().expand(p.B, p.T, -1, -1))
    y_true = torch.linalg.solve(A, (G.transpose(-1, -2) @ e[..., None]))[..., 0]
    y = y_true * (1 + 1e-3 * torch.randn(y_true.shape, dtype=torch.float64, generator=gen))
    c = solvers.certificate.certify_exact(p, y, get_policy("fp32"), e=e, chunk_size=16, what="adjoint y")
    err = (y - y_true).norm(dim=-1) / y_true.norm(dim=-1)
    assert bool((err <= c.bound).all()) and c.solution_norms is not None
    normwise = (y - y_true).square().sum((1, 3)).sqrt() / y_true.square().sum((1, 3)).sqrt()  # [B, H]
    assert bool((normwise <= c.sequence_bound).all())
    # and it is tight to within kappa (||r|| <= ||A|| ||y - y*||), up to the (1 - bound) terms
    assert float(c.sequence_bound.max()) <= 2 * float(c.kappa.max()) * float(normwise.max())
