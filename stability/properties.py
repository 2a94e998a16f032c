"""Metamorphic properties every Mesa implementation must satisfy (docs/design.md section 6).

An *implementation* is any callable with the op signature of ``kernels.mesa_chunk``::

    f(q, k, v, g, beta, lam, *, chunk_size=..., initial_state=None, output_final_state=False,
      cu_seqlens=None, **options) -> o            (or (o, (H_T, G_T)) with output_final_state)

Each check runs ``f`` on transformed inputs and returns a :class:`PropertyResult` with the
*measured discrepancy* (a relative error, float64); callers compare it with a bound derived from
their precision. The transformations are exact in floating point where possible (scales are
powers of two, permutations and slices copy values), so the discrepancy measures the
implementation alone:

* ``scale_q``:      o is linear in q:   f(s q) = s f(q)
* ``scale_v``:      o is linear in v:   f(s v) = s f(v)
* ``chunk_size``:   the chunking is an implementation detail: f(C = c) = f(C = c0)
* ``continuation``: f(q[:t]) followed by f(q[t:], initial_state = final state) = f(q)
* ``independence``: permuting batch entries and heads permutes outputs, and changing one batch
                    entry / head leaves the others unchanged
* ``varlen``:       packed sequences (cu_seqlens) = each sequence run on its own
* ``scale_grad``:   the backward is linear in the upstream gradient: grad(s e) = s grad(e)

:func:`solver_op` wraps a :func:`solvers.solve` configuration into such a callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mesa_stability import solvers
from mesa_stability.solvers import MesaProblem

from .metrics import rel_error

Impl = Callable[..., object]
# Powers of two from 2^-20 (~1e-6) to 2^20 (~1e6): multiplying by them is exact.
POW2_SCALES = (2.0**-20, 2.0**-10, 2.0**10, 2.0**20)


@dataclass
class PropertyResult:
    name: str
    discrepancy: float
    detail: dict = field(default_factory=dict)

    def holds(self, bound: float) -> bool:
        return self.discrepancy <= bound


def solver_op(method: str = "cg", policy: str = "fp64", **solver_options) -> Impl:
    """A :func:`solvers.solve` configuration as an op-shaped callable (for the checks below)."""
    def op(q, k, v, g, beta, lam, *, initial_state=None, output_final_state=False, cu_seqlens=None, **options):
        p = MesaProblem(q, k, v, g, beta, lam, initial_state, cu_seqlens)
        res = solvers.solve(p, method, policy, **{**solver_options, **options})
        return (res.o, res.final_state) if output_final_state else res.o

    op.__name__ = f"solve[{method},{policy}]"
    return op


def _args(p: MesaProblem, **changes) -> dict:
    a = dict(q=p.q, k=p.k, v=p.v, g=p.g, beta=p.beta, lam=p.lam)
    a.update(changes)
    return a


def _o(out):
    return out[0] if isinstance(out, tuple) else out


def scale_q(f: Impl, p: MesaProblem, scales=POW2_SCALES, **options) -> PropertyResult:
    """max_s ||f(s q) / s - f(q)|| / ||f(q)||."""
    base = _o(f(**_args(p), **options)).double()
    errs = {s: rel_error(_o(f(**_args(p, q=p.q * s), **options)).double() / s, base) for s in scales}
    return PropertyResult("scale_q", max(errs.values()), {"per_scale": errs})


def scale_v(f: Impl, p: MesaProblem, scales=POW2_SCALES, **options) -> PropertyResult:
    """max_s ||f(s v) / s - f(v)|| / ||f(v)||."""
    base = _o(f(**_args(p), **options)).double()
    errs = {s: rel_error(_o(f(**_args(p, v=p.v * s), **options)).double() / s, base) for s in scales}
    return PropertyResult("scale_v", max(errs.values()), {"per_scale": errs})


def chunk_size(f: Impl, p: MesaProblem, chunk_sizes=(16, 32, 64), **options) -> PropertyResult:
    """max_c ||f(chunk_size=c) - f(chunk_size=c0)|| / ||f(c0)||, c0 the first chunk size."""
    outs = {c: _o(f(**_args(p), chunk_size=c, **options)).double() for c in chunk_sizes}
    c0 = chunk_sizes[0]
    errs = {c: rel_error(o, outs[c0]) for c, o in outs.items() if c != c0}
    return PropertyResult("chunk_size", max(errs.values(), default=0.0), {"per_chunk_size": errs})


def continuation(f: Impl, p: MesaProblem, split: int | None = None, **options) -> PropertyResult:
    """f on tokens [0, t) then on [t, T) from the final state, against f on [0, T)."""
    t = p.T // 2 if split is None else split
    if not 0 < t < p.T:
        raise ValueError(f"split must be inside (0, T={p.T}), got {t}")
    whole = _o(f(**_args(p), initial_state=p.initial_state, **options)).double()
    first = p.tokens(0, t)
    o1, state = f(**_args(first), initial_state=p.initial_state, output_final_state=True, **options)
    second = p.tokens(t, p.T)
    o2 = _o(f(**_args(second), initial_state=state, **options))
    joined = torch.cat([o1.double(), o2.double()], dim=1)
    return PropertyResult("continuation", rel_error(joined, whole), {"split": t})


def independence(f: Impl, p: MesaProblem, **options) -> PropertyResult:
    """Batch/head permutation equivariance, and locality of a change to one batch entry and head."""
    if p.initial_state is not None or p.cu_seqlens is not None:
        raise ValueError("independence takes a problem without initial_state or cu_seqlens")
    base = _o(f(**_args(p), **options)).double()
    bperm = torch.arange(p.B - 1, -1, -1, device=p.q.device)
    hperm = torch.roll(torch.arange(p.H, device=p.q.device), 1)

    def perm(x, head_dim=2):
        x = x[bperm.to(x.device)]
        return x.index_select(head_dim, hperm.to(x.device))

    permuted = _args(p, q=perm(p.q), k=perm(p.k), v=perm(p.v), g=perm(p.g), beta=perm(p.beta),
                     lam=p.lam[hperm])
    err_perm = rel_error(_o(f(**permuted, **options)).double(), perm(base))
    # change batch entry 0 / head 0 only (new q, v and gates there); everything else must not move
    q, v, beta = p.q.clone(), p.v.clone(), p.beta.clone()
    q[0, :, 0] = -2 * q[0, :, 0]
    v[0, :, 0] = v[0, :, 0].flip(0)
    beta[0, :, 0] = 1 - beta[0, :, 0]
    other = _o(f(**_args(p, q=q, v=v, beta=beta), **options)).double()
    keep = torch.ones(p.B, p.H, dtype=torch.bool, device=base.device)
    keep[0, 0] = False
    mask = keep[:, None, :, None].expand_as(base)
    err_local = rel_error(other[mask], base[mask]) if bool(mask.any()) else 0.0
    return PropertyResult("independence", max(err_perm, err_local), {"permutation": err_perm, "locality": err_local})


def varlen(f: Impl, p: MesaProblem, **options) -> PropertyResult:
    """Packed sequences (``p.cu_seqlens``) against each sequence run on its own."""
    if p.cu_seqlens is None:
        raise ValueError("varlen needs a packed problem (cu_seqlens set), e.g. stability.cases.make('varlen')")
    packed = _o(f(**_args(p), initial_state=p.initial_state, cu_seqlens=p.cu_seqlens, **options)).double()
    separate = torch.cat([_o(f(**_args(s), initial_state=s.initial_state, **options)).double()
                          for s in p.sequences()], dim=1)
    return PropertyResult("varlen", rel_error(packed, separate), {"sequences": p.cu_seqlens.numel() - 1})


def input_gradients(f: Impl, p: MesaProblem, e: torch.Tensor, **options) -> list:
    """The gradients of ``L = sum o . e`` with respect to (q, k, v, g, beta, lam), by autograd through f
    (inputs in their own dtype; a gradient f does not produce is None)."""
    leaves = [t.detach().clone().requires_grad_() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    o = _o(f(*leaves, initial_state=p.initial_state, cu_seqlens=p.cu_seqlens, **options))
    o.backward(e.to(device=o.device, dtype=o.dtype))
    return [t.grad for t in leaves]


def scale_grad(f: Impl, p: MesaProblem, e: torch.Tensor, scales=POW2_SCALES, **options) -> PropertyResult:
    """The backward is linear in the upstream gradient e: max over s and inputs of
    ||grad(s e) / s - grad(e)|| / ||grad(e)|| (docs/design.md section 6: scale equivariance in the upstream
    gradient)."""
    base = input_gradients(f, p, e, **options)
    errs = {}
    for s in scales:
        got = input_gradients(f, p, e * s, **options)
        errs[s] = max(rel_error(a.double() / s, b.double()) for a, b in zip(got, base, strict=True)
                      if a is not None and b is not None)
    return PropertyResult("scale_grad", max(errs.values()), {"per_scale": errs})


ALL = {"scale_q": scale_q, "scale_v": scale_v, "chunk_size": chunk_size, "continuation": continuation,
       "independence": independence, "varlen": varlen, "scale_grad": scale_grad}
