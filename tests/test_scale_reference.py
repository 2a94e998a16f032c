"""The float64 reference at scale (stability.scale_reference) against mpmath, the dense closed forms,
autograd of the final state, and itself (causality, block / group / chunk invariance)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mesa_stability import solvers
from mesa_stability.stability import cases
from mesa_stability.stability.gradients import closed_form_gradients
from mesa_stability.stability.metrics import condition_numbers, rel_error
from mesa_stability.stability.reference import mp_directional_derivative, mp_solve
from mesa_stability.stability.scale_reference import MEMORY, plan, prefix, reference

NAMES = ("q", "k", "v", "g", "beta", "lam", "H0", "G0")
SMALL = dict(B=1, T=48, H=2, D=8, Dv=8)
STRESS = ("low_rank_keys", "strong_forgetting", "no_forgetting_long", "tiny_lambda", "well_conditioned")


def _with_init(p: solvers.MesaProblem, seed: int) -> solvers.MesaProblem:
    """The problem from a random PSD initial state (one per batch entry or packed sequence)."""
    N = p.B if p.cu_seqlens is None else p.cu_seqlens.numel() - 1
    init = cases.random_problem(B=N, T=1, H=p.H, D=p.D, Dv=p.Dv, seed=seed, initial_state=True).initial_state
    return p.replace(initial_state=init)


@pytest.mark.parametrize("name", STRESS + ("varlen",))
def test_forward_agrees_with_mpmath(name):
    p = cases.make(name, seed=3, **SMALL) if name != "varlen" else cases.make(name, seed=3, T=48, H=2, D=8, Dv=8)
    ref = reference(p, block=13)
    x_mp, o_mp = mp_solve(p)
    # float64 Cholesky: error ~ kappa u; kappa < 3e3 on these cases
    assert rel_error(ref.x, x_mp) <= 1e-12
    assert rel_error(ref.o, o_mp) <= 1e-12


@pytest.mark.parametrize("name", ("strong_forgetting", "low_rank_keys", "tiny_lambda"))
def test_gradients_agree_with_mpmath(name):
    """<grad, d> against the mpmath central difference of L = sum_t e_t . o_t, for every input."""
    p = _with_init(cases.make(name, seed=4, B=1, T=10, H=1, D=3, Dv=2, **({"rank": 2} if name == "low_rank_keys"
                                                                            else {})), seed=5)
    e = cases.upstream_gradient(p, seed=6)
    ref = reference(p, e, chunk_size=4)
    gen = torch.Generator().manual_seed(7)
    for n in NAMES:
        d = torch.randn(ref.grads[n].shape, generator=gen, dtype=torch.float64)
        exact = mp_directional_derivative(p, e, {n: d})
        assert abs(float((ref.grads[n] * d).sum()) - exact) <= 1e-12 * float(ref.grads[n].norm() * d.norm()), n


@pytest.mark.parametrize("name", STRESS)
@pytest.mark.parametrize("init", (False, True))
def test_gradients_match_the_dense_closed_forms(name, init):
    p = cases.make(name, seed=8, B=2, T=40, H=2, D=6, Dv=5)
    p = _with_init(p, 9) if init else p
    e = cases.upstream_gradient(p, seed=10)
    ref = reference(p, e, block=9, chunk_size=16)
    dense = closed_form_gradients(p, e)
    assert set(ref.grads) == set(dense)
    for n, want in dense.items():
        assert rel_error(ref.grads[n], want) <= 1e-12, n
    # y is the adjoint: dq
    assert rel_error(ref.y, dense["q"]) <= 1e-12


def test_packed_sequences_are_referenced_one_by_one():
    p = _with_init(cases.make("varlen", seed=11, T=48, H=2, D=6, Dv=4, n_seqs=3), 12)
    e = cases.upstream_gradient(p, seed=13)
    ref = reference(p, e, kappa_every=10)
    cs = p.cu_seqlens.tolist()
    for n, (seq, a, b) in enumerate(zip(p.sequences(), cs, cs[1:], strict=False)):
        one = reference(seq, e[:, a:b], kappa_every=10)
        dense = closed_form_gradients(seq, e[:, a:b])
        assert torch.equal(ref.x[:, a:b], one.x) and torch.equal(ref.o[:, a:b], one.o)
        assert torch.equal(ref.final_state[0][n:n + 1], one.final_state[0])
        for name in ("q", "k", "v", "g", "beta"):
            assert rel_error(ref.grads[name][:, a:b], dense[name]) <= 1e-12, name
        for name in ("H0", "G0"):
            assert rel_error(ref.grads[name][n:n + 1], dense[name]) <= 1e-12, name
        assert set((one.kappa_tokens + a).tolist()) <= set(ref.kappa_tokens.tolist())
        assert b - 1 in ref.kappa_tokens.tolist()  # the last token of every sequence
    lam = sum(closed_form_gradients(s, e[:, a:b])["lam"] for s, a, b in zip(p.sequences(), cs, cs[1:], strict=False))
    assert rel_error(ref.grads["lam"], lam) <= 1e-12


def test_final_state_cotangents_add_the_gradient_of_the_final_state():
    """grads(e, dH_T, dG_T) = grads(e) + autograd of <dH_T, H_T(theta)> + <dG_T, G_T(theta)> through the
    dense states (an independent route to the chunkwise adjoint-state scan)."""
    p = cases.random_problem(B=2, T=37, H=3, D=5, Dv=4, seed=14, initial_state=True, gamma_range=(0.7, 1.0))
    e = cases.upstream_gradient(p, seed=15)
    gen = torch.Generator().manual_seed(16)
    dH = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    dG = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    full = reference(p, e, dH, dG, chunk_size=8)
    plain = reference(p, e, chunk_size=8)
    leaves = [t.clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam, *p.initial_state)]
    H_T, G_T = solvers.MesaProblem(*leaves[:6], tuple(leaves[6:])).final_state()
    extra = torch.autograd.grad((dH * H_T).sum() + (dG * G_T).sum(), leaves, allow_unused=True)
    for n, add in zip(NAMES, extra, strict=True):
        want = plain.grads[n] + (0 if add is None else add)
        assert rel_error(full.grads[n], want) <= 1e-12, n
    assert rel_error(full.final_state[0], H_T.detach()) <= 1e-14
    assert rel_error(full.final_state[1], G_T.detach()) <= 1e-14


def test_prefix_is_the_prefix_of_the_reference():
    """Causality: x, o, y and the bound of the first T0 tokens do not depend on later tokens."""
    p = _with_init(cases.make("no_forgetting_long", seed=17, B=2, T=300, H=2, D=8, Dv=6), 18)
    e = cases.upstream_gradient(p, seed=19)
    long = reference(p, e, block=64)
    for T0 in (1, 77, 128):
        short = reference(prefix(p, T0), e[:, :T0], block=10)
        for f in ("x", "o", "y", "kappa_bound"):
            assert rel_error(getattr(short, f), getattr(long, f)[:, :T0]) <= 1e-13, (T0, f)
        _, _, Hb, Gb = next(p.iter_states(block=1, t0=T0 - 1, t1=T0))
        assert rel_error(short.final_state[0], Hb[:, -1]) <= 1e-13
        assert rel_error(short.final_state[1], Gb[:, -1]) <= 1e-13


def test_blocks_head_groups_and_chunks_change_nothing_but_rounding():
    p = _with_init(cases.make("low_rank_keys", seed=20, B=2, T=70, H=3, D=6, Dv=4), 21)
    e = cases.upstream_gradient(p, seed=22)
    base = reference(p, e)
    assert rel_error(base.x, solvers.solve(p, "exact").x) <= 1e-15  # the exact solver's factorisation
    for opts in (dict(block=1), dict(block=7, heads_per_group=1), dict(chunk_size=5), dict(memory=1)):
        other = reference(p, e, **opts)
        for f in ("x", "o", "y"):
            assert rel_error(getattr(other, f), getattr(base, f)) <= 1e-14, (opts, f)
        for n in NAMES:
            assert rel_error(other.grads[n], base.grads[n]) <= 1e-13, (opts, n)


def test_condition_numbers_exact_on_a_subsample_and_the_free_bound():
    p = cases.make("tiny_lambda", seed=23, B=2, T=45, H=2, D=8, Dv=8)
    ref = reference(p, kappa_every=8, block=16)
    assert ref.kappa_tokens.tolist() == [0, 8, 16, 24, 32, 40, 44]
    exact = condition_numbers(p)
    assert rel_error(ref.kappa, exact[:, ref.kappa_tokens]) <= 1e-12
    bound = (p.trace_H() + p.lam.max(-1).values) / p.lam.min(-1).values
    assert torch.equal(ref.kappa_bound, bound)
    assert bool((exact <= ref.kappa_bound * (1 + 1e-12)).all())
    assert reference(p).kappa is None


def test_plan_bounds_memory_at_production_sizes():
    big = SimpleNamespace(B=1, T=65536, H=16, D=128, Dv=128)
    block, group = plan(big, MEMORY)
    assert 1 <= block <= 128 and 1 <= group <= 16
    assert 8 * big.B * block * big.H * 2 * (3 * big.D**2 + big.Dv * big.D) <= MEMORY
    assert plan(big, memory=1) == (1, 1)
    assert plan(SimpleNamespace(B=1, T=48, H=2, D=8, Dv=8)) == (128, 2)


def test_rejects_bad_arguments():
    p = cases.random_problem(B=1, T=5, H=1, D=3, seed=0)
    with pytest.raises(ValueError, match="e has shape"):
        reference(p, torch.zeros(1, 5, 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="upstream gradient"):
        reference(p, dH_T=torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="kappa_every"):
        reference(p, kappa_every=0)
    with pytest.raises(ValueError, match="T0"):
        prefix(p, 6)


def test_float32_inputs_give_the_reference_of_their_values():
    p32 = cases.make("well_conditioned", seed=24, **SMALL).to(torch.float32)
    ref = reference(p32)
    assert ref.x.dtype == torch.float64
    assert rel_error(ref.x, solvers.solve(p32.to(torch.float64), "exact").x) <= 1e-15


def test_mp_check_prefix():
    from mesa_stability.stability.scale_reference import mp_check_prefix

    p = _with_init(cases.make("strong_forgetting", seed=25, B=2, T=500, H=3, D=16, Dv=12), 26)
    errs = mp_check_prefix(p, T0=12, batch=1, head=2)
    assert set(errs) == {"x", "o"} and max(errs.values()) <= 1e-13
    e = cases.upstream_gradient(p, seed=27)
    errs = mp_check_prefix(p, T0=6, dims=4, e=e, gradients=True)
    assert set(errs) == {"x", "o"} | {f"d{n}" for n in NAMES}
    assert max(errs.values()) <= 1e-13, errs


@pytest.mark.gpu
def test_on_cuda_equals_the_cpu():
    p = _with_init(cases.make("low_rank_keys", seed=28, B=2, T=200, H=4, D=32, Dv=16), 29)
    e = cases.upstream_gradient(p, seed=30)
    cpu = reference(p, e, kappa_every=50)
    gpu = reference(p.to(device="cuda"), e.cuda(), kappa_every=50)
    assert gpu.x.is_cuda
    for f in ("x", "o", "y", "kappa", "kappa_bound"):
        assert rel_error(getattr(gpu, f).cpu(), getattr(cpu, f)) <= 1e-13, f
    for n in NAMES:
        assert rel_error(gpu.grads[n].cpu(), cpu.grads[n]) <= 1e-13, n
