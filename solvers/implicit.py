"""Implicit differentiation of the Mesa layer through its linear solves (DESIGN.md section 2).

Forward: ``x_t = A_t^{-1} q_t`` (``A_t = H_t + Lambda``) by chunkwise CG, ``o_t = G_t x_t``.
Backward, with ``e_t = dL/do_t``: one more SPD solve per token, the adjoint

    y_t = A_t^{-1} G_t^T e_t        (CG with its own step cap and tolerance),

and then every input gradient is the gradient of the scalar surrogate

    s(theta) = sum_t e_t . G_t(theta) x_t + sum_t y_t . (q_t - A_t(theta) x_t)
               + <dL/dH_T, H_T(theta)> + <dL/dG_T, G_T(theta)>

at fixed (detached) x and y, taken by autograd through the chunkwise operators of
:class:`~solvers.chunk_state.ChunkedSystem`. Differentiating s gives exactly the closed forms of
DESIGN.md (``dq_t = y_t``, ``dlam = -sum_t x_t * y_t``, ``dv_s``, ``dk_s``, ``dbeta_s``,
``dg_s = gamma_s dgamma_s``) and the initial-state gradients, without writing each by hand.

Both solves are scale invariant (relative tolerances, ratio step lengths), so upstream gradients
of any magnitude give gradients of proportional magnitude. With a truncated forward solver, x is
not the exact solution and the result is the implicit gradient *at the computed x*: the gap to
the true gradient of the truncated computation is measured by the tests, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cg import cg_iterate, check_iteration_options, check_precond
from .chunk_state import ChunkedSystem
from .precision import PrecisionPolicy, get_policy
from .problem import MesaProblem


@dataclass(frozen=True)
class SolveConfig:
    """CG options of the forward and of the adjoint solve."""

    policy: PrecisionPolicy
    steps: int = 30
    tol: float | None = None
    x0: str = "zero"
    precond: str | None = None
    chunk_size: int = 64
    bwd_steps: int | None = None  # default: steps
    bwd_tol: float | None = None  # default: tol

    def __post_init__(self) -> None:
        check_iteration_options(self.steps, self.tol, self.x0)
        check_iteration_options(self.bwd_steps if self.bwd_steps is not None else self.steps,
                                self.bwd_tol, self.x0)
        check_precond(self.precond)


def implicit_backward(inputs, needs, x: torch.Tensor, cfg: SolveConfig, do, dH_T=None, dG_T=None,
                      y: torch.Tensor | None = None):
    """Input gradients ``(dq, dk, dv, dg, dbeta, dlam, dH0, dG0)`` (None where not needed) for the
    upstream gradients ``do`` (and ``dH_T``, ``dG_T``) at the forward solution ``x`` (``[B,T,H,D]``).

    ``inputs``: ``(q, k, v, g, beta, lam, H0, G0)`` (H0, G0 may be None); ``needs``: which of them
    need a gradient. The adjoint solve and the surrogate are those of the module docstring; a caller
    that solved the adjoint already (the Triton kernel) passes ``y`` (``[B,T,H,D]``)."""
    leaves = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip(inputs, needs, strict=True)]
    with torch.enable_grad():
        init = None if leaves[6] is None else (leaves[6], leaves[7])
        S = ChunkedSystem.build(MesaProblem(*leaves[:6], init), cfg.policy, cfg.chunk_size)
        xc = S.from_tokens(x.detach())
        with torch.no_grad():
            E = S.from_tokens(do)
            if y is None:
                y, *_ = cg_iterate(S, S.output_adjoint(E), cfg.policy,
                                   steps=cfg.bwd_steps if cfg.bwd_steps is not None else cfg.steps,
                                   tol=cfg.bwd_tol if cfg.bwd_tol is not None else cfg.tol, x0=cfg.x0,
                                   precond=cfg.precond)
            else:
                y = S.from_tokens(y)
        surrogate = (E * S.output(xc)).sum() + (y * (S.Q - S.matvec(xc))).sum()
        if dH_T is not None:
            surrogate = surrogate + (dH_T * S.H_final).sum()
        if dG_T is not None:
            surrogate = surrogate + (dG_T * S.G_final).sum()
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(surrogate, wanted, allow_unused=True) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


class MesaImplicit(torch.autograd.Function):
    """``(o, H_T, G_T, x, steps, residual) = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, cfg)``:
    the forward by the PyTorch chunkwise CG, the backward by :func:`implicit_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lam, H0, G0, cfg: SolveConfig):
        init = None if H0 is None else (H0, G0)
        problem = MesaProblem(q, k, v, g, beta, lam, init)
        S = ChunkedSystem.build(problem, cfg.policy, cfg.chunk_size)
        x, count, rel, _ = cg_iterate(S, S.Q, cfg.policy, steps=cfg.steps, tol=cfg.tol, x0=cfg.x0,
                                      precond=cfg.precond)
        o = S.to_tokens(S.output(x))
        x = S.to_tokens(x)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, g, beta, lam, H0, G0, x)
        ctx.mark_non_differentiable(x, count, rel)
        return o, S.H_final, S.G_final, x, S.to_tokens(count), S.to_tokens(rel)

    @staticmethod
    def backward(ctx, do, dH_T, dG_T, _dx, _d_steps, _d_res):
        *inputs, x = ctx.saved_tensors
        return (*implicit_backward(inputs, ctx.needs_input_grad[:8], x, ctx.cfg, do, dH_T, dG_T), None)


def mesa_implicit(problem_or_inputs, *, policy="fp64", steps: int = 30, tol: float | None = None, x0: str = "zero",
                  precond: str | None = None, chunk_size: int = 64, bwd_steps: int | None = None,
                  bwd_tol: float | None = None):
    """Differentiable Mesa forward (CG) with the implicit backward; returns (o, (H_T, G_T), x, steps, residual).

    ``problem_or_inputs``: a :class:`MesaProblem` (inputs may require grad) or the tuple
    ``(q, k, v, g, beta, lam[, initial_state])``."""
    if isinstance(problem_or_inputs, MesaProblem):
        p = problem_or_inputs
        q, k, v, g, beta, lam, init = p.q, p.k, p.v, p.g, p.beta, p.lam, p.initial_state
    else:
        q, k, v, g, beta, lam, *rest = problem_or_inputs
        init = rest[0] if rest else None
    cfg = SolveConfig(get_policy(policy), steps, tol, x0, precond, chunk_size, bwd_steps, bwd_tol)
    H0, G0 = (None, None) if init is None else init
    o, H_T, G_T, x, count, rel = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, cfg)
    return o, (H_T, G_T), x, count, rel
