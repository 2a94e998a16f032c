"""kernels.MesaLayer: shapes, gates, decode = prefill, gradients, clear errors (torch backend on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels import MesaLayer
from stability.metrics import rel_error


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
