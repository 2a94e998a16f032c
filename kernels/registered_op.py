"""The Triton backend of ``mesa_chunk`` as registered operators (``torch.library``), so that
``torch.compile(fullgraph=True)`` traces a model through it without a graph break.

``torch.ops.mesa_stability.mesa_triton(q, k, v, g, beta, lam, H0, G0, spec) -> (o, H_T, G_T, x)`` is
the forward of :class:`kernels.mesa.TritonMesa` (the chunk-state and CG kernels, the values of the
inputs checked, the certificate decided inside with its verdict deferred as in eager mode);
``mesa_triton_backward`` is its implicit backward (:func:`kernels.mesa._triton_grads`: the adjoint
CG solve and the contraction kernels, the adjoint's certificate checked). Both are opaque to the
compiler, which sees their fake (meta) implementations: o and x in float32, the final states in
the policy's state dtype, the gradients in their inputs' dtypes. ``spec`` is the
:class:`SolverSpec` as JSON (:func:`solvers.implicit.spec_json`), a constant of the graph. The torch
backend's twin is ``torch.ops.mesa_stability.mesa_torch`` (:mod:`solvers.implicit`).

Packed sequences (``cu_seqlens``) are not part of the operator: under compile they run eagerly.
"""

from __future__ import annotations

import torch

from mesa_stability.solvers import verdict
from mesa_stability.solvers.implicit import _spec_of

from .mesa import MesaStats, _kernel_policy, _mesa_chunk, _triton_grads


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """An operator's output may not alias its inputs or another output: a new contiguous tensor."""
    return t.contiguous().clone() if t._base is not None or not t.is_contiguous() else t.clone()


@torch.library.custom_op("mesa_stability::mesa_triton", mutates_args=())
def mesa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                lam: torch.Tensor, H0: torch.Tensor | None, G0: torch.Tensor | None, spec: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, H_T, G_T, x)`` of the Triton forward (module docstring)."""
    cfg = _spec_of(spec).replace(backend="triton")
    init = None if H0 is None else (H0, G0)
    (o, (H_T, G_T)), stats, pol = _mesa_chunk(q, k, v, g, beta, lam, cfg, initial_state=init, cu_seqlens=None,
                                              validate=True, num_warps=None, bwd_contractions="triton")
    if stats._certificate is not None:
        verdict.submit(stats._certificate, cfg.check, pol, refine=stats._refine)
    return tuple(_fresh(t) for t in (o, H_T, G_T, stats.x))


@mesa_triton.register_fake
def _(q, k, v, g, beta, lam, H0, G0, spec):
    state = _kernel_policy(_spec_of(spec).policy).state_dtype
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    new = q.new_empty
    return (new(B, T, H, Dv, dtype=torch.float32), new(B, H, D, D, dtype=state), new(B, H, Dv, D, dtype=state),
            new(B, T, H, D, dtype=torch.float32))


@torch.library.custom_op("mesa_stability::mesa_triton_backward", mutates_args=())
def mesa_triton_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         lam: torch.Tensor, H0: torch.Tensor | None, G0: torch.Tensor | None, x: torch.Tensor,
                         do: torch.Tensor, dH_T: torch.Tensor | None, dG_T: torch.Tensor | None, spec: str
                         ) -> list[torch.Tensor]:
    """The input gradients of the Triton backward, each in its input's dtype (an empty tensor for an
    initial state not given)."""
    cfg = _spec_of(spec)
    inputs = (q, k, v, g, beta, lam, H0, G0)
    certify = None if cfg.check is None else (cfg.check, cfg.threshold, None)
    grads = _triton_grads(inputs, [True] * 6 + [H0 is not None] * 2, x, cfg, None, "triton", certify,
                          MesaStats(None, None), do, dH_T, dG_T)
    return [q.new_empty(0) if t is None else _fresh(d.to(t.dtype)) for t, d in zip(inputs, grads, strict=True)]


@mesa_triton_backward.register_fake
def _(q, k, v, g, beta, lam, H0, G0, x, do, dH_T, dG_T, spec):
    # contiguous, as _fresh makes the real ones (not the strides of the inputs, which may be transposed)
    return [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in (q, k, v, g, beta, lam, H0, G0)]


def _setup(ctx, inputs, output):
    *tensors, spec = inputs
    ctx.spec = spec
    ctx.save_for_backward(*tensors, output[3])


def _backward(ctx, do, dH_T, dG_T, _dx):
    *inputs, x = ctx.saved_tensors
    grads = mesa_triton_backward(*inputs, x, do, dH_T, dG_T, ctx.spec)
    dH0, dG0 = (None if t is None else d for t, d in zip(inputs[6:], grads[6:], strict=True))
    return (*grads[:6], dH0, dG0, None)


mesa_triton.register_autograd(_backward, setup_context=_setup)

__all__ = ["mesa_triton", "mesa_triton_backward"]
