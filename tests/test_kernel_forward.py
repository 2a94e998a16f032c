"""Triton forward kernels (`kernels.mesa_chunk`, `kernels.mesa_step`) against the references.

Runs on CUDA, or on the CPU through the Triton interpreter (``TRITON_INTERPRET=1`` set before the
test session); skips otherwise. Sizes are small: the interpreter executes every tile op in numpy.
The metamorphic properties of the kernels (scale equivariance, chunk-size invariance, independence,
continuation, varlen) are checked by the tox ``guard`` env, whose ``mesa guard`` runs every one of
them on the kernels through the interpreter against its budgets.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import functools  # noqa: E402

from mesa_stability import kernels, solvers  # noqa: E402
from mesa_stability.kernels import mesa_step  # noqa: E402
from mesa_stability.stability import cases  # noqa: E402
from mesa_stability.stability.metrics import condition_numbers, max_token_rel_error, rel_error  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
pytestmark = pytest.mark.triton
# the Triton backend explicitly: "auto" would pick the torch backend for CPU tensors
mesa_chunk = functools.partial(kernels.mesa_chunk, backend="triton")


def _dev(p):
    return p.to(torch.float32, device=DEVICE)


def _args(p):
    return dict(q=p.q, k=p.k, v=p.v, g=p.g, beta=p.beta, lam=p.lam)


@pytest.fixture(scope="module")
def prob():
    return cases.make("well_conditioned", B=2, T=45, H=2, D=16, Dv=12)


@pytest.mark.parametrize("policy", ["fp32", "tf32", "bf16x3", "bf16-fp32state", "fp16-fp32state"])
def test_matches_the_torch_cg_of_the_same_policy(prob, policy):
    """Same algorithm, same policy: agreement at the policy's rounding level (summation order and
    the points where fp32 intermediates round to the operand precision differ)."""
    pol = solvers.get_policy(policy)
    p = _dev(prob)
    o, st = mesa_chunk(**_args(p), steps=20, policy=pol, chunk_size=16, return_x=True)
    emu = solvers.solve(p, "cg", pol, steps=20, chunk_size=16)
    # fp32: 10 u (u = 6e-8); low precision: a few u of the operand format, kappa < 5 here
    bound = 1e-6 if policy == "fp32" else 8 * pol.u
    assert rel_error(st.x.cpu(), emu.x.cpu()) <= bound
    assert rel_error(o.cpu(), emu.o.cpu()) <= bound
    # the same step counts, except where a row reaches the residual floor 2^-48 ||r_0|| (D = 16
    # converges in ~18 steps here): there rounding decides the step, within 2
    diff = (st.steps.cpu().long() - emu.steps.cpu()).abs()
    assert int(diff.max()) <= 2 and float(diff.double().mean()) < 0.5


@pytest.mark.parametrize("opts", [dict(x0="jacobi"), dict(precond="jacobi"), dict(x0="jacobi", precond="jacobi")])
def test_jacobi_guess_and_preconditioner_match_the_torch_cg(opts):
    """x0 / precond reach the kernel. With small keys and lam spread over decades, A_t is nearly
    diagonal. The kernel's CG with these options agrees with the torch CG of the same options (fp32,
    8 steps, before convergence, so that a dropped option shows: plain CG is 0.15 away), and with
    the preconditioner it needs far fewer steps to a tolerance."""
    base = cases.make("well_conditioned", B=1, T=40, H=2, D=16)

    def spread(decades):  # lam from 10^(-decades/2) to 10^(decades/2): kappa ~ 10^decades
        lam = torch.logspace(-decades / 2, decades / 2, 16, dtype=base.lam.dtype).expand(2, 16).contiguous()
        return _dev(base.replace(k=base.k * 0.1, lam=lam))

    p, pol = spread(2), solvers.get_policy("fp32")
    _, st = mesa_chunk(**_args(p), steps=8, policy=pol, chunk_size=16, return_stats=True, return_x=True,
                       check=None, **opts)
    emu = solvers.solve(p, "cg", pol, steps=8, chunk_size=16, **opts)
    plain = solvers.solve(p, "cg", pol, steps=8, chunk_size=16)
    # fp32 CG of the same options at kappa ~ 100: a few u times kappa (measured 5e-8 to 8e-8)
    assert rel_error(st.x.cpu(), emu.x.cpu()) <= 100 * 16 * pol.u < 1e-2 < rel_error(st.x.cpu(), plain.x.cpu())
    if "precond" in opts:
        p = spread(4)
        _, st_tol = mesa_chunk(**_args(p), steps=200, tol=1e-6, policy=pol, chunk_size=16, return_stats=True,
                               check=None, **opts)
        _, st_plain = mesa_chunk(**_args(p), steps=200, tol=1e-6, policy=pol, chunk_size=16, return_stats=True,
                                 check=None)
        assert 3 * float(st_tol.steps.double().mean()) < float(st_plain.steps.double().mean())


@pytest.mark.parametrize("case", ["well_conditioned", "low_rank_keys", "strong_forgetting", "tiny_lambda"])
def test_error_vs_float64_exact_within_kappa_u(case):
    p64 = cases.make(case, B=1, T=40, H=2, D=16)
    ref = solvers.solve(p64, "exact")
    kappa = float(condition_numbers(p64).max())
    o, st = mesa_chunk(**_args(_dev(p64)), steps=200, tol=1e-7, policy="fp32", chunk_size=16, return_x=True)
    # converged fp32 CG: error <= c kappa u with u = 6e-8 (c = 50: D-term sums, states, recursion)
    assert max_token_rel_error(st.x.cpu(), ref.x) <= 50 * kappa * 2.0**-24
    assert rel_error(o.cpu(), ref.o) <= 50 * kappa * 2.0**-24


def test_shapes_non_power_of_two_dims_partial_chunk_and_dtypes():
    p = cases.make("well_conditioned", B=1, T=23, H=3, D=20, Dv=9)
    ref = solvers.solve(p, "exact")
    for dtype in (torch.float32, torch.bfloat16):
        q = p.to(dtype, DEVICE)
        o = mesa_chunk(**_args(q), steps=60, tol=1e-6, policy="fp32", chunk_size=16)
        assert o.shape == (1, 23, 3, 9) and o.dtype == torch.float32
        bound = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 inputs: the problem itself moves by u_bf16
        assert rel_error(o.cpu(), ref.o) <= bound


def test_early_exit_lowers_steps_and_keeps_the_tolerance_promise(prob):
    p = _dev(prob)
    o_fix, st_fix = mesa_chunk(**_args(p), steps=40, policy="fp32", return_stats=True)
    o_tol, st_tol = mesa_chunk(**_args(p), steps=40, tol=1e-4, policy="fp32", return_stats=True)
    assert st_tol.mean_steps < 0.5 * st_fix.mean_steps
    assert float(st_tol.residual.max()) <= 1e-4
    ref = solvers.solve(prob, "exact")
    kappa = float(condition_numbers(prob).max())
    # relative residual 1e-4 bounds the relative error of x by kappa * 1e-4
    x_tol = mesa_chunk(**_args(p), steps=40, tol=1e-4, policy="fp32", return_x=True)[1].x
    assert max_token_rel_error(x_tol.cpu(), ref.x) <= kappa * 1e-4


def test_final_state_and_initial_state(prob):
    p = _dev(prob)
    _, (H_T, G_T) = mesa_chunk(**_args(p), steps=5, policy="fp32", output_final_state=True)
    Hf, Gf = prob.final_state()
    assert rel_error(H_T.cpu(), Hf) <= 1e-6 and rel_error(G_T.cpu(), Gf) <= 1e-6
    p_init = cases.random_problem(B=2, T=20, H=2, D=16, seed=3, initial_state=True)
    o = mesa_chunk(**_args(_dev(p_init)), steps=60, tol=1e-7, policy="fp32",
                   initial_state=tuple(s.to(device=DEVICE, dtype=torch.float32) for s in p_init.initial_state))
    assert rel_error(o.cpu(), solvers.solve(p_init, "exact").o) <= 1e-5


def test_decode_after_prefill_matches_one_longer_prefill(prob):
    p = _dev(prob)
    T = p.T
    o_pre, state = mesa_chunk(**{k_: v_[:, : T - 2] if v_.dim() > 2 else v_ for k_, v_ in _args(p).items()},
                              steps=50, tol=1e-7, policy="fp32", output_final_state=True)
    outs = []
    for t in (T - 2, T - 1):
        o_t, state = mesa_step(p.q[:, t], p.k[:, t], p.v[:, t], p.g[:, t], p.beta[:, t], p.lam, state,
                               steps=50, tol=1e-7)
        outs.append(o_t)
    full = mesa_chunk(**_args(p), steps=50, tol=1e-7, policy="fp32")
    assert rel_error(torch.stack(outs, 1).cpu(), full[:, T - 2:].cpu()) <= 1e-5
    ref_H, _ = prob.final_state()
    assert rel_error(state[0].cpu(), ref_H) <= 1e-6


@pytest.mark.parametrize("field,bad,msg", [
    ("q", lambda a: a["q"][..., :8], "k"),
    ("lam", lambda a: -a["lam"], "lam"),
    ("g", lambda a: a["g"] + 1, "g"),
    ("beta", lambda a: a["beta"] * 3, "beta"),
    ("v", lambda a: a["v"].clone().fill_(float("nan")), "v"),
    ("q", lambda a: a["q"].to(torch.int32), "q"),
])
def test_bad_inputs_name_the_argument(prob, field, bad, msg):
    a = _args(_dev(prob))
    a[field] = bad(a)
    with pytest.raises(ValueError) as err:
        mesa_chunk(**a)
    assert str(err.value).split()[0] == msg


@pytest.mark.parametrize("field,bad,msg", [
    ("q", lambda x: x.clone().fill_(float("inf")), "q"),
    ("v", lambda x: x.clone().fill_(float("nan")), "v"),
    ("lam", lambda x: -x, "lam"),
    ("g", lambda x: x + 1, "g"),
    ("g", lambda x: x.clone().fill_(float("nan")), "g"),
    ("beta", lambda x: x * 3, "beta"),
])
def test_decode_step_names_a_bad_token_value(prob, field, bad, msg):
    """The decode kernel flags an invalid token value as it reads it; mesa_step raises naming the
    argument, and with validate=False trusts the values (no raise). A hard reset (g = -inf) is valid."""
    p = _dev(prob)
    state = tuple(s.to(device=DEVICE, dtype=torch.float32) for s in prob.tokens(0, 20).final_state())
    a = {n: (t[:, 20] if n != "lam" else t) for n, t in _args(p).items()}
    good = dict(a)
    a[field] = bad(a[field])
    with pytest.raises(ValueError) as err:
        mesa_step(**a, state=state)
    assert str(err.value).split()[0] == msg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mesa_step(**a, state=state, validate=False)
    reset = dict(good, g=torch.full_like(good["g"], float("-inf")))
    o, _ = mesa_step(**reset, state=state)
    fresh, _ = mesa_step(**dict(good, g=torch.zeros_like(good["g"])), state=tuple(torch.zeros_like(s) for s in state))
    assert rel_error(o.cpu(), fresh.cpu()) <= 1e-6  # a reset forgets the state


def test_bad_options_and_devices(prob):
    a = _args(_dev(prob))
    with pytest.raises(ValueError, match="policy 'fp64'"):
        mesa_chunk(**a, policy="fp64")
    with pytest.raises(ValueError, match="tol"):
        mesa_chunk(**a, tol=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        mesa_chunk(**a, chunk_size=0)
    with pytest.raises(ValueError, match="head dims"):
        big = cases.make("well_conditioned", T=4, D=160, H=1)
        mesa_chunk(**_args(_dev(big)))
    other = torch.device("meta")
    with pytest.raises(ValueError, match="different devices|is on"):
        mesa_chunk(**dict(a, lam=a["lam"].to(other)))
    with pytest.raises(ValueError, match="one token"):
        mesa_step(a["q"], a["k"], a["v"], a["g"], a["beta"], a["lam"], (None, None))


def test_non_contiguous_inputs_and_varlen_with_initial_states():
    p = cases.make("well_conditioned", B=1, T=30, H=2, D=16)
    a = _args(_dev(p))
    # non-contiguous views (a transposed copy transposed back) give the same result
    nc = {k_: (v_.transpose(1, 2).contiguous().transpose(1, 2) if v_.dim() == 4 else v_) for k_, v_ in a.items()}
    assert not nc["q"].is_contiguous()
    base = mesa_chunk(**a, steps=10, policy="fp32")
    assert torch.equal(mesa_chunk(**nc, steps=10, policy="fp32"), base)
    # packed sequences, each from its own initial state, against separate runs
    vl = cases.make("varlen", T=40, D=16, n_seqs=3)
    init = cases.random_problem(B=3, T=1, H=2, D=16, seed=5, initial_state=True).initial_state
    init = tuple(s.to(device=DEVICE, dtype=torch.float32) for s in init)
    q = _dev(vl)
    o, (H_T, G_T) = mesa_chunk(**_args(q), steps=40, tol=1e-6, policy="fp32", initial_state=init,
                               cu_seqlens=vl.cu_seqlens, output_final_state=True)
    cs = vl.cu_seqlens.tolist()
    for n, (s0, s1) in enumerate(zip(cs, cs[1:], strict=False)):
        part = {k_: (v_[:, s0:s1] if v_.dim() > 2 else v_) for k_, v_ in _args(q).items()}
        o_n, (H_n, _) = mesa_chunk(**part, steps=40, tol=1e-6, policy="fp32",
                                   initial_state=tuple(s[n:n + 1] for s in init), output_final_state=True)
        assert rel_error(o[:, s0:s1].cpu(), o_n.cpu()) <= 1e-6
        assert rel_error(H_T[n:n + 1].cpu(), H_n.cpu()) <= 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_sequences_run_as_one_with_resets(backend, monkeypatch):
    """Packed sequences without initial or final states run as one sequence with a hard reset at each
    start (kernels.mesa.packed_resets), never through the per-sequence loop, and read no value of
    cu_seqlens with validate=False: o and the gradients of every input equal those of each sequence
    run alone (fp32, fixed steps: the same CG per token, the chunk states cut elsewhere, so fp32
    rounding of kappa ~ 10 systems apart)."""
    vl = _dev(cases.make("varlen", T=40, D=16, n_seqs=4))  # cuts inside chunks of 16 and at token 1..39
    cs = vl.cu_seqlens.tolist()
    e = torch.randn(1, 40, vl.H, vl.Dv, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    opts = dict(steps=30, policy="fp32", chunk_size=16, backend=backend, check=None)

    def grads(p, e, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in _args(p).values()]
        o = kernels.mesa_chunk(*leaves, **opts, **kw)
        o.backward(e)
        return [o.detach()] + [t.grad for t in leaves]

    def no_loop(*a, **kw):
        raise AssertionError("the per-sequence loop ran")

    monkeypatch.setattr("mesa_stability.kernels.mesa._varlen", no_loop)
    cu = vl.cu_seqlens.to(DEVICE)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: no_loop())  # no host read of cu_seqlens
    packed = grads(vl, e, cu_seqlens=cu, validate=False)
    monkeypatch.undo()
    parts = [grads(s, e[:, a:b]) for s, a, b in zip(vl.sequences(), cs[:-1], cs[1:], strict=True)]
    for i, got in enumerate(packed):
        want = torch.cat([p[i] for p in parts], dim=0 if i == 6 else 1) if i < 6 else sum(p[6] for p in parts)
        assert rel_error(got.cpu(), want.cpu()) <= 1e-5, ("o", "q", "k", "v", "g", "beta", "lam")[i]


def test_triton_forward_with_implicit_backward_matches_the_torch_backend(prob):
    p = _dev(prob)
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
        o = kernels.mesa_chunk(*leaves, steps=60, tol=1e-6, policy="fp32", backend=backend, chunk_size=16)
        (o * torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape)).sum().backward()
        grads[backend] = [t.grad.cpu() for t in leaves]
    for name, a, b in zip("q k v g beta lam".split(), grads["triton"], grads["torch"], strict=True):
        # both solve to relative residual 1e-6 in fp32 (kappa < 5): 1e-5 relative, with margin
        assert rel_error(a, b) <= 1e-4, name


@pytest.mark.parametrize("policy", ["fp32", "bf16x3"])
def test_adjoint_solve_in_the_kernel_matches_the_torch_adjoint(prob, policy):
    from mesa_stability.kernels.mesa import _triton_forward
    from mesa_stability.solvers.cg import cg_iterate
    from mesa_stability.solvers.chunk_state import ChunkedSystem
    from mesa_stability.solvers.spec import SolverSpec

    p = _dev(prob)
    pol = solvers.get_policy(policy)
    e = cases.upstream_gradient(prob, scale=1e-3, seed=4).to(device=DEVICE, dtype=torch.float32)
    cfg = SolverSpec(policy=pol, steps=5, tol=None, chunk_size=16, bwd_steps=40, bwd_tol=1e-6)
    *_, x, _ = _triton_forward(p.q, p.k, p.v, p.g, p.beta, p.lam, None, cfg, None)
    *_, n_steps, _, y, _ = _triton_forward(p.q, p.k, p.v, p.g, p.beta, p.lam, None, cfg, None, adjoint=e, x_fwd=x)
    S = ChunkedSystem.build(p, pol, 16)
    y_ref, count, *_ = cg_iterate(S, S.output_adjoint(S.from_tokens(e)), pol, steps=40, tol=1e-6, x0="zero",
                                  precond=None)
    assert rel_error(y.cpu(), S.to_tokens(y_ref).cpu()) <= (1e-5 if policy == "fp32" else 1e-4)
    assert int(n_steps.max()) <= 40 and float(n_steps.double().mean()) < 40  # the backward's own cap and tolerance


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cg_far_past_convergence_stays_converged(backend):
    """100 fixed steps in fp32 on a D = 16 problem that converges in ~20: rows leave CG at the residual
    floor 2^-48 ||r_0|| instead of iterating on r.z values near fp32's subnormal range (which blew
    one token of this problem up to an 18% error at 100 steps before the floor existed)."""
    from mesa_stability.stability import golden

    ref = golden.reference(golden.BY_NAME["well_conditioned"])
    p = ref.problem
    args = [t.float().to(DEVICE) for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    for steps in (30, 100):
        o, stats = kernels.mesa_chunk(*args, steps=steps, policy="fp32", backend=backend, return_stats=True)
        # fp32, kappa < 4: the 30-step error is ~2e-7; allow 1e-6
        assert rel_error(o.cpu(), ref.o) <= 1e-6, (steps, rel_error(o.cpu(), ref.o))
        assert int(stats.steps.max()) < 30


def test_the_auto_tier_of_every_chunk_matches_the_emulation():
    """kernels.chunk_tier against solvers.chunk_state.chunk_tier: the same tier for every chunk, on a
    case whose kappa grows through all three tiers (gamma near 1, one head with small lam, a reset)."""
    from mesa_stability.kernels.chunk_state import chunk_states
    from mesa_stability.kernels.chunk_tier import chunk_tiers
    from mesa_stability.solvers.chunk_state import ChunkedSystem

    p = cases.random_problem(2, 1500, 2, 8, seed=3, gamma_range=(0.999, 1.0), beta_range=(0.2, 0.4),
                             lam_range=(1.0, 1.5))
    g, lam = p.g.clone(), p.lam.clone()
    g[0, 700, 1] = float("-inf")  # a reset: the trace restarts inside a chunk
    lam[1] *= 0.02  # head 1: kappa past 4096 (the fp32 tier); head 0 starts below 16 (bf16)
    p = _dev(p.replace(g=g, lam=lam))
    Hc, _, _ = chunk_states(p.k, p.v, p.g, p.beta, chunk_size=32, split=True, check_values=False)
    got = chunk_tiers(Hc, p.k, p.g, p.beta, p.lam, 32).cpu()
    want = ChunkedSystem.build(p.to(torch.float32, device="cpu"), solvers.get_policy("auto"), 32).tier.reshape(-1)
    assert set(want.tolist()) == {0, 1, 2}
    assert torch.equal(got, want.to(got.dtype))


def test_stats_say_which_backend_ran(prob):
    """backend="auto" picks the kernels for CUDA tensors and the torch backend otherwise (CPU tensors,
    the interpreter included); the stats name the one that ran."""
    p = _dev(prob)
    _, st = kernels.mesa_chunk(**_args(p), steps=5, policy="fp32", backend="auto", return_stats=True)
    assert st.backend == ("triton" if DEVICE.type == "cuda" else "torch")
    _, st = mesa_chunk(**_args(p), steps=5, policy="fp32", return_stats=True)
    assert st.backend == "triton"
