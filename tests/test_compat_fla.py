"""mesa_stability.compat.fla.chunk_mesa_net: fla's signature, layouts and dtypes on the native op
(torch backend on the CPU; the GPU comparison with fla's own kernels is a benchmark)."""

from __future__ import annotations

import pytest
import torch

from mesa_stability import solvers
from mesa_stability.compat.fla import chunk_mesa_net, l2norm
from mesa_stability.kernels import mesa_chunk
from mesa_stability.stability import cases
from mesa_stability.stability.metrics import rel_error

OPTS = dict(policy="fp64", backend="torch", check=None)


def _inputs(Dv=12, initial=True, seed=3):
    p = cases.random_problem(B=2, T=20, H=2, D=8, Dv=Dv, seed=seed, initial_state=initial)
    return p, [p.q, p.k, p.v, p.g, p.beta, p.lam]


def test_layouts_dtypes_and_the_native_op():
    p, args = _inputs()
    H0, G0 = (s.float() for s in p.initial_state)  # native layouts: [N,H,K,K], [N,H,V,K]
    f32 = [t.float() for t in args]
    o, hkk, hkv = chunk_mesa_net(*f32, h_kk_init=H0, h_kv_init=G0.transpose(-1, -2).contiguous(),
                                 output_final_state=True, max_CG_iteration=40, **OPTS)
    o_n, (H_T, G_T) = mesa_chunk(*f32, initial_state=(H0, G0), output_final_state=True, steps=40, **OPTS)
    assert o.dtype == f32[2].dtype and torch.equal(o, o_n.to(o.dtype))
    assert hkk.shape == (2, 2, 8, 8) and hkv.shape == (2, 2, 8, 12)  # fla's h_kv: [N, H, K, V]
    assert torch.equal(hkk, H_T.float()) and torch.equal(hkv, G_T.float().transpose(-1, -2))
    # no final state asked: None, None; o in v's dtype
    o2, a, b = chunk_mesa_net(*f32[:2], f32[2].bfloat16(), *f32[3:], max_CG_iteration=40, **OPTS)
    assert a is None and b is None and o2.dtype == torch.bfloat16


def test_against_the_float64_reference_with_initial_states():
    p, args = _inputs()
    H0, G0 = (s.float() for s in p.initial_state)
    o, _, _ = chunk_mesa_net(*args, h_kk_init=H0, h_kv_init=G0.transpose(-1, -2), max_CG_iteration=80, tol=1e-13,
                             **OPTS)
    ref = solvers.solve(solvers.MesaProblem(*args, (H0.double(), G0.double())), "exact").o
    assert rel_error(o, ref) <= 1e-10
    # one missing initial state is zero
    o1, _, _ = chunk_mesa_net(*args, h_kk_init=H0, max_CG_iteration=80, tol=1e-13, **OPTS)
    ref1 = solvers.solve(solvers.MesaProblem(*args, (H0.double(), torch.zeros_like(G0).double())), "exact").o
    assert rel_error(o1, ref1) <= 1e-10


def test_wrong_layout_dtype_and_shape_are_errors():
    p, args = _inputs()
    H0, G0 = (s.float() for s in p.initial_state)
    with pytest.raises(ValueError, match="native op's value-state layout"):
        chunk_mesa_net(*args, h_kk_init=H0, h_kv_init=G0, **OPTS)  # [N,H,V,K] given for fla's [N,H,K,V]
    with pytest.raises(ValueError, match="flash-linear-attention's h_kv layout"):  # and to the native op
        mesa_chunk(*args, initial_state=(H0, G0.transpose(-1, -2)), **OPTS)
    with pytest.raises(ValueError, match="float32"):
        chunk_mesa_net(*args, h_kk_init=H0.double(), **OPTS)
    with pytest.raises(ValueError, match=r"h_kk_init has shape .* expected \[N, H, K, K\]"):
        chunk_mesa_net(*args, h_kk_init=H0[:1], **OPTS)
    with pytest.raises(TypeError, match="unknown solver option"):
        chunk_mesa_net(*args, tolerance=1e-3, **OPTS)


def test_l2norm_in_kernel_and_gradients():
    p, args = _inputs(initial=False)
    scaled = [args[0] * 3.0, args[1] * 0.5, *args[2:]]
    o, _, _ = chunk_mesa_net(*scaled, use_qk_l2norm_in_kernel=True, max_CG_iteration=60, **OPTS)
    o_ref, _, _ = chunk_mesa_net(l2norm(scaled[0]), l2norm(scaled[1]), *args[2:], max_CG_iteration=60, **OPTS)
    assert torch.equal(o, o_ref)
    assert torch.allclose(l2norm(scaled[1]).norm(dim=-1), torch.ones(2, 20, 2, dtype=torch.float64), atol=1e-6)
    # gradients reach every input and the fla-layout initial state, equal to the native op's (transposed)
    p, args = _inputs()
    H0, G0 = (s.float() for s in p.initial_state)
    e = torch.randn(2, 20, 2, 12, dtype=torch.float64)
    hkv = G0.transpose(-1, -2).contiguous().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in args]
    o, _, _ = chunk_mesa_net(*leaves, h_kk_init=H0, h_kv_init=hkv, max_CG_iteration=60, **OPTS)
    o.backward(e)
    G0n = G0.clone().requires_grad_()
    leaves_n = [t.clone().requires_grad_() for t in args]
    mesa_chunk(*leaves_n, initial_state=(H0, G0n), steps=60, **OPTS).backward(e)
    assert hkv.grad is not None and rel_error(hkv.grad.transpose(-1, -2), G0n.grad) <= 1e-12
    for a, b in zip(leaves, leaves_n, strict=True):
        assert rel_error(a.grad, b.grad) <= 1e-12


def test_l2norm_in_kernel_does_not_round_the_unit_vectors_to_the_input_dtype():
    """bf16 q and k normalised in the op stay float32, as in fla's kernel: o (fp32 policy, converged, v
    in float32) is then within fp32 rounding of the float64 solve on the same normalised inputs. Rounding
    the normalised q and k to bf16 (u = 2^-9) put it at 2.3e-3."""
    p = cases.random_problem(B=1, T=64, H=2, D=16, Dv=16, seed=4)
    q, k = (t.bfloat16() for t in (p.q * 2.0, p.k * 0.7))
    v, g, beta, lam = (t.float() for t in (p.v, p.g, p.beta, p.lam))
    rest = (t.double() for t in (v, g, beta, lam))
    ref = solvers.solve(solvers.MesaProblem(l2norm(q.double()), l2norm(k.double()), *rest), "exact").o
    o, _, _ = chunk_mesa_net(q, k, v, g, beta, lam, use_qk_l2norm_in_kernel=True, max_CG_iteration=100, tol=1e-9,
                             policy="fp32", backend="torch", check=None)
    assert rel_error(o, ref) <= 1e-5  # fp32 (u = 6e-8) at kappa <= ~50; bf16 unit vectors: ~1e-3


@pytest.mark.gpu
def test_matches_fla_on_a_gpu():
    """Against fla-core's own chunk_mesa_net (when installed) on the same inputs and initial states:
    the same dtypes and state layouts (fla's h_kv [N, H, K, V]), final states equal to fla's within its
    fp16 rounding of k, and o at least as close to the float64 reference as fla's."""
    peer = pytest.importorskip("fla.ops.mesa_net").chunk_mesa_net
    F = torch.nn.functional
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, K = 2, 512, 4, 64  # fla requires V = K

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q, k = (F.normalize(rand(B, T, H, K), dim=-1).bfloat16() for _ in range(2))
    v = rand(B, T, H, K).bfloat16()
    g, beta = F.logsigmoid(3 + rand(B, T, H)), torch.sigmoid(rand(B, T, H))
    lamb = 0.25 + F.softplus(rand(H, K))
    kk = F.normalize(rand(B, H, 64, K), dim=-1)
    h_kk0 = torch.einsum("bhtk,bhtj->bhkj", kk, kk).contiguous()
    h_kv0 = torch.einsum("bhtk,bhtv->bhkv", kk, rand(B, H, 64, K)).contiguous()  # fla's layout: sum k v^T
    args = (q, k, v, g, beta, lamb, h_kk0, h_kv0, True, 30)
    o_f, hkk_f, hkv_f = peer(*args)
    o_c, hkk_c, hkv_c = chunk_mesa_net(*args)
    assert o_c.dtype == o_f.dtype and hkk_c.shape == hkk_f.shape and hkv_c.shape == hkv_f.shape
    assert rel_error(hkk_c.double(), hkk_f.double()) <= 1e-2
    assert rel_error(hkv_c.double(), hkv_f.double()) <= 1e-2
    assert rel_error(hkv_c.double(), hkv_f.double().transpose(-1, -2)) >= 0.1  # the layout tells
    p = solvers.MesaProblem(*(t.double() for t in (q, k, v, g, beta, lamb)),
                            (h_kk0.double(), h_kv0.double().transpose(-1, -2)))
    ref = solvers.solve(p, "exact").o
    err_c, err_f = rel_error(o_c.double(), ref), rel_error(o_f.double(), ref)
    assert err_c <= max(err_f, 1e-2), (err_c, err_f)
