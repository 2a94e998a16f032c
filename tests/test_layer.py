"""kernels.MesaLayer: shapes, gates, decode = prefill, gradients, clear errors (torch backend on CPU)."""

from __future__ import annotations

import pytest
import torch

from mesa_stability.kernels import MesaLayer
from mesa_stability.stability.metrics import rel_error


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return MesaLayer(32, 4, steps=80, tol=1e-13, policy="fp64", backend="torch").double()


def test_shapes_gates_and_initial_lambda(layer):
    u = torch.randn(2, 11, 32, dtype=torch.float64)
    y = layer(u)
    assert y.shape == (2, 11, 32) and y.dtype == torch.float64
    assert torch.allclose(layer.lam, torch.ones(4, 8, dtype=layer.lam.dtype))
    q, k, v, g, beta, *_ = layer._inputs(u, None)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2, 11, 4, dtype=q.dtype))
    assert bool((g <= 0).all()) and bool(((beta >= 0) & (beta <= 1)).all())
    # the cap: gamma <= 1 - 0.0025 beta^2 < 1 whenever beta > 0
    assert bool((torch.exp(g) <= 1 - 0.0025 * beta**2 + 1e-12).all())


def test_decode_equals_prefill(layer):
    u = torch.randn(2, 13, 32, dtype=torch.float64)
    full = layer(u)
    y_pre, cache = layer(u[:, :9], use_cache=True)
    outs = [y_pre]
    for t in range(9, 13):
        y_t, cache = layer.step(u[:, t], cache)
        outs.append(y_t)
    assert rel_error(torch.cat(outs, dim=1), full) <= 1e-10


@pytest.mark.triton
def test_step_runs_the_decode_kernel(monkeypatch):
    """On the Triton backend, MesaLayer.step (without autograd) is one mesa_step call per token, and
    decoding matches the prefill of the whole sequence within fp32 rounding."""
    import os

    from mesa_stability.kernels import layer as layer_mod

    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    torch.manual_seed(0)
    lay = MesaLayer(32, 2, steps=60, tol=1e-7, policy="fp32", backend="triton").to(dev)
    u = torch.randn(2, 10, 32, device=dev)
    calls = []
    real = layer_mod.mesa_step
    monkeypatch.setattr(layer_mod, "mesa_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        full = lay(u)
        y_pre, cache = lay(u[:, :7], use_cache=True)
        outs = [y_pre]
        for t in range(7, 10):
            y_t, cache = lay.step(u[:, t], cache)
            outs.append(y_t)
    assert len(calls) == 3 and lay.last_steps.shape == (2, 1, 2)
    assert rel_error(torch.cat(outs, dim=1).cpu(), full.cpu()) <= 1e-5


def test_causal_and_differentiable(layer):
    u = torch.randn(1, 10, 32, dtype=torch.float64, requires_grad=True)
    y = layer(u)
    y[:, 4].sum().backward()
    assert float(u.grad[:, 5:].abs().max()) == 0.0  # no token sees the future
    assert float(u.grad[:, :5].abs().max()) > 0
    for name, prm in layer.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    layer.zero_grad()


def test_bad_inputs_give_clear_errors(layer):
    with pytest.raises(ValueError, match="d_model = 16"):
        layer(torch.randn(1, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B,T,d_model\]"):
        layer(torch.randn(4, 32, dtype=torch.float64))
    _, cache = layer(torch.randn(2, 3, 32, dtype=torch.float64), use_cache=True)
    with pytest.raises(ValueError, match="batch size 2"):
        layer.step(torch.randn(3, 32, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="one token"):
        layer.step(torch.randn(2, 2, 32, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="divisible"):
        MesaLayer(30, 4)


def _twin(method, **solver):
    torch.manual_seed(1)
    cg = MesaLayer(32, 4, steps=80, tol=1e-13, policy="fp64", backend="torch").double()
    other = MesaLayer(32, 4, method=method, policy="fp64", **solver).double()
    other.load_state_dict(cg.state_dict())
    return cg, other


def test_exact_solver_layer_equals_converged_cg():
    cg, exact = _twin("exact")
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    assert rel_error(exact(u), cg(u)) <= 1e-9


def test_sherman_morrison_layer_solves_the_decayed_problem():
    """Sherman-Morrison decays Lambda with the keys (R_t = H_t + zeta_t Lambda): with gamma near 1 it is
    close to Mesa's problem but not equal; with the default gates (gamma ~ 0.5) it is far off."""
    cg, sm = _twin("sherman_morrison")
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    far = rel_error(sm(u), cg(u))
    with torch.no_grad():
        for m in (cg, sm):
            m.a_proj.bias.fill_(40.0)  # sigmoid(40) = 1: gamma = the cap 1 - 0.0025 beta^2
    near = rel_error(sm(u), cg(u))
    assert 0 < near < 1e-2 < far


def test_non_finite_input_propagates_nan_instead_of_raising(layer):
    u = torch.randn(1, 5, 32, dtype=torch.float64)
    u[0, 2, 3] = float("nan")
    assert bool(torch.isnan(layer(u)).all())
    with pytest.raises(ValueError, match="non-finite"):
        layer(u, use_cache=True)


def test_sherman_morrison_overflows_under_forgetting_in_fp32():
    """With the initial gates (gamma ~ 0.5) Sherman-Morrison's P_t ~ 1 / zeta_t grows by 1 / gamma per
    token and its rank-one term u u^T ~ P^2 passes float32's 2^128 once zeta_t < ~2^-64: the output
    turns non-finite after ~65 tokens, while the exact solve of Mesa's problem stays finite."""
    import math

    from mesa_stability import solvers

    torch.manual_seed(0)
    layer = MesaLayer(64, 1, method="sherman_morrison").double()
    q, k, v, g, beta, *_ = layer._inputs(torch.randn(1, 160, 64, dtype=torch.float64), None)
    p = solvers.MesaProblem(*(t.detach() for t in (q, k, v, g, beta, layer.lam)))
    sm = solvers.solve(p, "sherman_morrison", "fp32").o
    bad = ~torch.isfinite(sm).all(-1)[0, :, 0]
    assert bool(bad.any())
    first = int(bad.nonzero()[0])
    log2_zeta = float(g.detach()[0, : first + 1, 0].sum()) / math.log(2)
    assert 40 < first < 120 and -80 < log2_zeta < -60
    assert bool(torch.isfinite(solvers.solve(p, "exact", "fp32").o).all())
    assert bool(torch.isfinite(solvers.solve(p, "sherman_morrison", "fp64").o).all())


def test_the_kernels_without_triton_say_how_to_get_it(monkeypatch):
    """Without triton the kernel modules define no kernels; mesa_step and backend='triton' raise an
    ImportError with the install command (not an AttributeError). Where triton is installed, its
    absence is simulated."""
    import mesa_stability.kernels.mesa as km
    from mesa_stability.stability import cases

    if km.triton is not None:
        monkeypatch.setattr(km, "triton", None)
        monkeypatch.delattr(km.decode, "_decode_kernel")
        monkeypatch.delattr(km.chunk_cg, "_chunk_cg_kernel")
    p = cases.make("well_conditioned", T=8, H=1, D=4).to(torch.float32)
    state = (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ImportError, match="pip install triton"):
        km.mesa_step(p.q[:, 0], p.k[:, 0], p.v[:, 0], p.g[:, 0], p.beta[:, 0], p.lam, state)
    with pytest.raises(ImportError, match="pip install triton"):
        km.mesa_chunk(p.q, p.k, p.v, p.g, p.beta, p.lam, backend="triton")


def test_gate_init_spreads_the_heads_initial_forget_gates():
    """gamma_h = sigmoid(bias_h) runs from low to high with 1 - gamma log-spaced (at zero input the
    gate is that, before the cap); bad ranges are errors."""
    import math

    layer = MesaLayer(32, 4, gate_init=(0.9, 0.999))
    gam = torch.sigmoid(layer.a_proj.bias.detach().double())
    assert torch.allclose(gam[[0, -1]], torch.tensor([0.9, 0.999], dtype=torch.float64), atol=1e-6)
    steps = torch.log(1 - gam).diff()
    assert torch.allclose(steps, torch.full_like(steps, math.log(0.01) / 3), rtol=1e-4)
    default = MesaLayer(32, 4)
    assert (torch.sigmoid(default.a_proj.bias) < 0.8).all()
    for bad in ((0.999, 0.9), (0.0, 0.5), (0.5, 1.0), (0.9,)):
        with pytest.raises(ValueError, match="gate_init"):
            MesaLayer(32, 4, gate_init=bad)
