"""Generic tests over the registry of implementations x specs (stability/registry.py).

Each test iterates the registry: every implementation (the torch CG, ``mesa_chunk`` on each backend,
the decode step) under every policy, initial guess and preconditioner the library defines, on its
sample cases, against the library's float64 references and the guard's budgets. The Triton entries
carry the ``triton`` mark (``TRITON_INTERPRET=1 pytest -m triton tests/test_registry.py`` on a CPU).
A forward and backward is run once per (entry, sample) and shared by the tests that read it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mesa_stability.kernels import mesa
from mesa_stability.solvers import precision
from mesa_stability.solvers import spec as spec_mod
from mesa_stability.solvers.certificate import Certificate
from mesa_stability.stability import golden, registry
from mesa_stability.stability.metrics import rel_error, token_rel_error

GRADIENTS = golden.GRADIENTS


def _by_impl(entries):
    out = {}
    for e in entries:
        out.setdefault(e.impl, []).append(e)
    return out


# --- the registry against the library's constants -------------------------------------------------

def test_registry_covers_every_choice_of_the_library():
    """Every policy, initial guess, preconditioner and backend the library defines has entries; each
    implementation covers the policies it accepts (its own constant) and every x0 / precond choice of
    SolverSpec; the decode step is there; ids are unique; every entry has sample cases."""
    es = registry.entries()
    assert len({e.name for e in es}) == len(es)
    assert {e.spec.policy.name for e in es} == set(precision.POLICIES)
    assert {e.spec.backend for e in es} == set(spec_mod.BACKENDS)
    assert precision.DEFAULT_POLICY in {e.spec.policy.name for e in es if e.impl.triton}
    accepts = {("solve", "torch"): set(precision.POLICIES), ("mesa_chunk", "torch"): set(precision.POLICIES),
               ("mesa_chunk", "triton"): set(mesa.KERNEL_POLICIES), ("mesa_step", "triton"): set(mesa.STEP_POLICIES)}
    by_impl = _by_impl(es)
    assert {(i.name, i.backend) for i in by_impl} == set(accepts) | {("mesa_chunk", "auto")}
    for impl, mine in by_impl.items():
        assert all(e.samples and set(e.samples) <= set(registry.SAMPLES) for e in mine)
        if impl.default_only:  # backend="auto": the default spec, the op's default dispatch
            assert [e.spec for e in mine] == [registry.base_spec(impl)]
            assert mine[0].spec.policy.name == precision.DEFAULT_POLICY
            continue
        assert {e.spec.policy.name for e in mine} == accepts[impl.name, impl.backend], impl
        assert {(e.spec.x0, e.spec.precond) for e in mine} == {
            (a, b) for a in (mesa.KERNEL_X0 if impl.triton else spec_mod.X0_CHOICES)
            for b in spec_mod.PRECOND_CHOICES}, impl
    assert any(e.impl.last_token for e in es)  # the decode step
    assert all(e.impl.triton == (e.spec.backend == "triton") for e in es if e.impl.name == "mesa_chunk")


def test_a_choice_added_to_the_library_appears_in_the_registry(monkeypatch):
    """The registry reads the constants when it is built: a new policy, x0 or precond choice of the
    library gets entries without an edit here (and then the generic tests run on it)."""
    new = dataclasses.replace(precision.POLICIES["fp32"], name="fp32-copy")
    monkeypatch.setitem(precision.POLICIES, "fp32-copy", new)
    monkeypatch.setattr(mesa, "KERNEL_POLICIES", (*mesa.KERNEL_POLICIES, "fp32-copy"))
    monkeypatch.setattr(spec_mod, "X0_CHOICES", (*spec_mod.X0_CHOICES, "x0-new"))
    monkeypatch.setattr(mesa, "KERNEL_X0", (*mesa.KERNEL_X0, "x0-new"))  # the kernels' own list
    monkeypatch.setattr(spec_mod, "PRECOND_CHOICES", (*spec_mod.PRECOND_CHOICES, "precond-new"))
    es = registry.entries()
    with_policy = {(e.impl.name, e.impl.backend) for e in es if e.spec.policy.name == "fp32-copy"}
    assert with_policy == {("solve", "torch"), ("mesa_chunk", "torch"), ("mesa_chunk", "triton")}
    for impl, mine in _by_impl(es).items():
        if not impl.default_only:
            assert {"x0-new"} <= {e.spec.x0 for e in mine} and {"precond-new"} <= {e.spec.precond for e in mine}


# --- outputs and gradients within budget against the float64 reference ----------------------------

@pytest.mark.parametrize("entry,name", registry.case_params("forward"))
def test_output_within_budget(entry, name):
    """o against the float64 exact solver's, within the guard's budget (factor u kappa + rounding)."""
    s, out = registry.sample(name), entry.outputs(name)
    ref = s.ref.o[:, entry.window]
    assert out.o.shape == ref.shape
    budget, how = entry.budget(s, "o", out.o.dtype)
    err = rel_error(out.o.cpu(), ref)
    assert err <= budget, f"o: {err:.3g} > {budget:.3g} = {how} (kappa {s.kappa:.3g})"


@pytest.mark.parametrize("entry,name", registry.case_params("backward", select=lambda e: e.impl.backward))
def test_gradients_within_budget(entry, name):
    """Every input gradient of sum(e * o) against the closed forms of docs/design.md (float64), within
    the guard's budgets (dg's times its cancellation factor); a non-finite gradient has error inf."""
    s, out = registry.sample(name), entry.outputs(name)
    assert set(out.grads) == set(GRADIENTS)
    bad = []
    for n in GRADIENTS:
        g = out.grads[n]
        assert g is not None and g.shape == s.ref.grads[n].shape, n
        budget, how = entry.budget(s, f"d{n}", g.dtype)
        err = rel_error(g.cpu(), s.ref.grads[n])
        if not err <= budget:
            bad.append(f"d{n}: {err:.3g} > {budget:.3g} = {how}")
    assert not bad, f"kappa {s.kappa:.3g}, dg amplification {s.ref.dg_amplification:.3g}: " + "; ".join(bad)


# --- what every run returns -----------------------------------------------------------------------

@pytest.mark.parametrize("entry,name", registry.case_params())
def test_outputs_are_finite_and_the_stats_are_returned(entry, name):
    """o and x finite, of the reference's shapes; per-token steps within the spec's cap (at least one
    step for every token: no right-hand side is zero), residuals finite, breakdown flags boolean; the
    certifying implementations return the certificate of x."""
    s, out = registry.sample(name), entry.outputs(name)
    assert out.o.shape == s.ref.o[:, entry.window].shape and out.x.shape == s.x[:, entry.window].shape
    assert bool(torch.isfinite(out.o).all()) and bool(torch.isfinite(out.x).all())
    per_token = out.x.shape[:3]
    assert out.steps.shape == per_token and not out.steps.dtype.is_floating_point
    assert 1 <= int(out.steps.min()) and int(out.steps.max()) <= entry.spec.steps
    assert out.residual.shape == per_token and bool(torch.isfinite(out.residual).all())
    assert float(out.residual.min()) >= 0
    if out.breakdown is not None:
        assert out.breakdown.shape == per_token and out.breakdown.dtype == torch.bool
    if not entry.impl.certifies:
        assert out.certificate is None
        return
    c = out.certificate
    assert isinstance(c, Certificate) and c.what.startswith("x"), c
    for t in (c.residual, c.kappa, c.bound, c.breakdown):
        assert t.shape == per_token


@pytest.mark.parametrize("entry,name", registry.case_params(
    "adjoint", select=lambda e: e.impl.backward and e.impl.certifies))
def test_the_backward_returns_the_adjoint_certificate(entry, name):
    """After a backward, the stats hold the certificate of the adjoint solve y_t = A_t^{-1} G_t^T e_t,
    per token, with the solution norms that make its verdict normwise."""
    out = entry.outputs(name)
    c = out.adjoint_certificate
    assert isinstance(c, Certificate) and c.what == "adjoint y", c
    for t in (c.residual, c.kappa, c.bound, c.breakdown, c.solution_norms):
        assert t.shape == out.x.shape[:3]


@pytest.mark.parametrize("entry,name", registry.case_params(select=lambda e: e.impl.certifies))
def test_the_certificate_bounds_the_error(entry, name):
    """The certificate's promise: no token's relative error of x (against the float64 exact solver)
    exceeds its certified bound; the adjoint's normwise bound per (batch, head) holds for dq = y (plus
    the rounding of dq to its dtype, as in the budgets); and a CertificateWarning was issued exactly
    when a certificate failed its threshold."""
    s, out = registry.sample(name), entry.outputs(name)
    err = token_rel_error(out.x.cpu(), s.x[:, entry.window])
    bound = out.certificate.bound.cpu()
    assert bool((err <= bound).all()), f"token error {float(err.max()):.3g}, bound there " \
        f"{float(bound.flatten()[int(err.argmax())]):.3g}"
    failed = not out.certificate.ok
    adj = out.adjoint_certificate
    if adj is not None:
        dq, ref = out.grads["q"].cpu().double(), s.ref.grads["q"]
        # [B,H], normwise over tokens; a non-finite dq is infinitely wrong (and needs an infinite bound)
        seq_err = ((dq - ref).norm(dim=(1, 3)) / ref.norm(dim=(1, 3))).nan_to_num(nan=float("inf"))
        u_out = 2 * precision.unit_roundoff_of(out.grads["q"].dtype)
        assert bool((seq_err <= adj.sequence_bound.cpu() + u_out).all()), (seq_err, adj.sequence_bound)
        failed = failed or not adj.ok
    assert bool(out.warnings) == failed, out.warnings


# --- the spec's options take effect ---------------------------------------------------------------

@pytest.mark.parametrize("entry", registry.entry_params(lambda e: e.spec.precond is not None))
def test_the_preconditioner_takes_effect(entry):
    """On the anisotropic sample (diag(H_t + Lambda) over decades), OPTION_STEPS steps with the
    entry's preconditioner are at least twice as close to x as the same steps without (measured 3.4x
    for the chunkwise CG, 29x for the decode step): a preconditioner that is dropped on the way to the
    solver gives the same iterates and fails."""
    s = registry.sample(registry.OPTIONS_SAMPLE.name)
    ref = s.x[:, entry.window]
    pre = entry.call(s, steps=registry.OPTION_STEPS, check=None)
    plain = entry.call(s, steps=registry.OPTION_STEPS, check=None, precond=None)
    e_pre, e_plain = rel_error(pre.x.cpu(), ref), rel_error(plain.x.cpu(), ref)
    assert e_pre <= e_plain / 2, (e_pre, e_plain)


@pytest.mark.parametrize("entry", registry.entry_params(
    lambda e: e.spec.precond is None and e.spec.policy.name == precision.DEFAULT_POLICY))
def test_the_initial_guess_takes_effect(entry):
    """Zero steps return the initial guess: x matches the float64 definition of the entry's x0 within
    the budget and is farther than that from every other choice's, with zero steps counted."""
    s = registry.sample(registry.OPTIONS_SAMPLE.name)
    out = entry.call(s, steps=0, check=None)
    budget, how = entry.budget(s, "o", out.x.dtype)
    assert int(out.steps.abs().max()) == 0
    for x0 in spec_mod.X0_CHOICES:
        err = rel_error(out.x.cpu(), registry.x0_reference(s.ref.problem, x0)[:, entry.window])
        if x0 == entry.spec.x0:
            assert err <= budget, f"x0={x0}: {err:.3g} > {budget:.3g} = {how}"
        else:
            assert err > budget, f"x0={entry.spec.x0} is indistinguishable from x0={x0} ({err:.3g})"
