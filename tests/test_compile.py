"""torch.compile and torch.func on the torch backend: the op is one registered operator
(``torch.ops.mesa_stability.mesa_torch``, solvers/implicit.py) under compile, with its fake
implementation and autograd formula; MesaImplicit works with torch.func.grad."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from mesa_stability.kernels import MesaLayer, mesa_chunk
from mesa_stability.solvers.certificate import CertificateWarning
from mesa_stability.solvers.implicit import spec_json
from mesa_stability.solvers.spec import SolverSpec
from mesa_stability.stability import cases
from mesa_stability.stability.metrics import rel_error


@pytest.mark.parametrize("initial", [False, True])
def test_the_registered_operator_passes_opcheck(initial):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the operator."""
    p = cases.random_problem(B=2, T=20, H=2, D=8, Dv=6, seed=0, initial_state=initial)
    st = p.initial_state or (None, None)
    args = [t.clone().requires_grad_() if t is not None else None for t in (p.q, p.k, p.v, p.g, p.beta, p.lam, *st)]
    spec = SolverSpec(policy="fp64", steps=60, check=None, chunk_size=8)
    torch.library.opcheck(torch.ops.mesa_stability.mesa_torch.default, (*args, spec_json(spec)))


def _transposed_storage(t):
    """The same values with the time and head axes swapped in memory (strides inductor may choose)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _backward_opcheck(op, spec, device="cpu"):
    """The fake implementation of a backward operator against the real one on inputs whose storage is
    not contiguous: shapes, dtypes and strides must agree (opcheck's test_faketensor)."""
    p = cases.random_problem(B=1, T=16, H=2, D=8, Dv=8, seed=0).to(torch.float32, device=device)
    q, k, v = (_transposed_storage(t) for t in (p.q, p.k, p.v))
    g, beta = (_transposed_storage(t.unsqueeze(-1)).squeeze(-1) for t in (p.g, p.beta))
    assert not q.is_contiguous() and not g.is_contiguous()
    fwd = torch.ops.mesa_stability.mesa_torch(q, k, v, g, beta, p.lam, None, None, spec)
    o, x = fwd[0], fwd[3]
    torch.library.opcheck(op, (q, k, v, g, beta, p.lam, None, None, x, torch.ones_like(o), None, None, spec),
                          test_utils=("test_faketensor",))


def test_the_backward_operator_fake_matches_non_contiguous_inputs():
    """The fake gradients are contiguous, as the real ones: a fake that copied a transposed input's
    strides failed inductor's stride assertion at run time on a GPU."""
    _backward_opcheck(torch.ops.mesa_stability.mesa_torch_backward.default,
                      spec_json(SolverSpec(policy="fp64", steps=40, check=None, chunk_size=8)))


def _eager_and_compiled(layer, u):
    """``(eager output, compiled output, eager parameter gradients)`` of ``sum(layer(u)^2)``; the
    compiled (fullgraph, aot_eager) gradients are left in the parameters."""
    eager = layer(u)
    eager.square().sum().backward()
    grads = {n: prm.grad.clone() for n, prm in layer.named_parameters()}
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(u)
    compiled.square().sum().backward()
    return eager.detach(), compiled.detach(), grads


def test_compiled_layer_is_one_graph_with_the_eager_numbers():
    """torch.compile(fullgraph=True) traces MesaLayer without a graph break; forward and parameter
    gradients equal the eager layer's (the same solver; float32 rounding of the compiled graph)."""
    torch.manual_seed(0)
    layer = MesaLayer(32, 2, steps=30, policy="fp32", backend="torch")
    u = torch.randn(2, 16, 32)
    eager, compiled, grads = _eager_and_compiled(layer, u)
    assert rel_error(compiled, eager) <= 1e-6
    for name, prm in layer.named_parameters():
        assert rel_error(prm.grad, grads[name]) <= 1e-5, name


def test_the_certificate_is_decided_inside_the_compiled_operator():
    p = cases.make("well_conditioned", T=24, H=2, D=8).to(torch.float32)
    spec = SolverSpec(steps=1, policy="fp32", backend="torch", check="warn")  # made outside the compiled code

    def f(q):
        return mesa_chunk(q, p.k, p.v, p.g, p.beta, p.lam, spec)

    with pytest.warns(CertificateWarning, match="accuracy certificate"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(p.q)


def test_torch_func_grad_equals_autograd():
    p = cases.random_problem(B=1, T=12, H=2, D=8, seed=1)

    def f(q, lam):
        return mesa_chunk(q, p.k, p.v, p.g, p.beta, lam, policy="fp64", backend="torch", steps=60, check=None).sum()

    gq, glam = torch.func.grad(f, argnums=(0, 1))(p.q, p.lam)
    q, lam = p.q.clone().requires_grad_(), p.lam.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(q, lam).backward()
    assert torch.equal(gq, q.grad) and torch.equal(glam, lam.grad)


def test_the_ablation_lm_compiles_as_one_graph():
    from mesa_stability.ablations.model import MesaLM

    torch.manual_seed(0)
    model = MesaLM("tiny", SolverSpec(steps=5, policy="fp32", backend="torch", check=None))
    x = torch.randint(0, 256, (2, 32))
    assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))


def test_torch_func_vmap_solves_each_slice():
    """vmap over a batch of queries (and of gates) equals one eager call per slice; the values are
    checked slice by slice (an invalid slice raises)."""
    p = cases.random_problem(B=1, T=12, H=2, D=8, seed=1)

    def f(q, g):
        return mesa_chunk(q[None], p.k, p.v, g[None], p.beta, p.lam, policy="fp64", backend="torch", steps=60,
                          check=None)[0]

    qs = torch.stack([p.q[0], 2 * p.q[0], -p.q[0]])
    gs = torch.stack([p.g[0], 0.5 * p.g[0], p.g[0]])
    got = torch.func.vmap(f)(qs, gs)
    assert torch.equal(got, torch.stack([f(a, b) for a, b in zip(qs, gs, strict=True)]))
    with pytest.raises(ValueError, match="g"):
        torch.func.vmap(f)(qs, torch.stack([p.g[0], -p.g[0], p.g[0]]))  # g > 0 in one slice
    with pytest.warns(UserWarning, match="no accuracy certificate"):
        torch.func.vmap(lambda q: mesa_chunk(q[None], p.k, p.v, p.g, p.beta, p.lam, policy="fp64",
                                             backend="torch", steps=5)[0])(qs)
    with pytest.raises(ValueError, match="backend='torch'"):
        torch.func.vmap(lambda q: mesa_chunk(q[None], p.k, p.v, p.g, p.beta, p.lam, backend="triton")[0])(qs)


def test_the_vmapped_operator_is_the_per_slice_operator():
    p = cases.random_problem(B=2, T=10, H=2, D=4, seed=2)
    js = spec_json(SolverSpec(policy="fp64", steps=40, check=None, chunk_size=4))
    op = torch.ops.mesa_stability.mesa_torch
    qs = torch.stack([p.q, -p.q])
    got = torch.func.vmap(lambda q: op(q, p.k, p.v, p.g, p.beta, p.lam, None, None, js))(qs)
    for i in range(2):
        want = op(qs[i], p.k, p.v, p.g, p.beta, p.lam, None, None, js)
        assert all(torch.equal(a[i], b) for a, b in zip(got, want, strict=True))


# --- the Triton backend's operator (kernels.registered_op): the interpreter on the CPU, or CUDA ---
_triton = pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                             reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.triton
@_triton
@pytest.mark.parametrize("initial", [False, True])
def test_the_triton_operator_passes_opcheck(initial):
    pytest.importorskip("triton")
    p = cases.random_problem(B=1, T=20, H=2, D=8, Dv=8, seed=0, initial_state=initial).to(torch.float32, device=DEV)
    st = p.initial_state or (None, None)
    args = [t.clone().requires_grad_() if t is not None else None for t in (p.q, p.k, p.v, p.g, p.beta, p.lam, *st)]
    spec = SolverSpec(policy="fp32", steps=30, check="warn", chunk_size=8, backend="triton")
    torch.library.opcheck(torch.ops.mesa_stability.mesa_triton.default, (*args, spec_json(spec)))


@pytest.mark.triton
@_triton
def test_the_triton_backward_operator_fake_matches_non_contiguous_inputs():
    pytest.importorskip("triton")
    import mesa_stability.kernels.registered_op  # noqa: F401  (registers mesa_triton_backward)

    _backward_opcheck(torch.ops.mesa_stability.mesa_triton_backward.default,
                      spec_json(SolverSpec(policy="fp32", steps=30, check=None, chunk_size=8, backend="triton")),
                      device=DEV)


@pytest.mark.triton
@_triton
def test_compiled_layer_on_the_kernels_is_one_graph_with_the_eager_numbers():
    """fullgraph=True through MesaLayer on the Triton backend: the kernels run inside the registered
    operator; forward and parameter gradients equal the eager layer's exactly (the same kernels)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = MesaLayer(16, 2, steps=20, policy="fp32", backend="triton", chunk_size=8).to(DEV)
    u = torch.randn(1, 12, 16, device=DEV)
    eager, compiled, grads = _eager_and_compiled(layer, u)
    assert torch.equal(compiled, eager)
    for name, prm in layer.named_parameters():
        assert rel_error(prm.grad, grads[name]) <= 1e-6, name
