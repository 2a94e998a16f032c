"""Implicit differentiation of the Mesa layer through its linear solves (docs/design.md section 2).

Forward: ``x_t = A_t^{-1} q_t`` (``A_t = H_t + Lambda``) by chunkwise CG, ``o_t = G_t x_t``.
Backward, with ``e_t = dL/do_t``: one more SPD solve per token, the adjoint

    y_t = A_t^{-1} G_t^T e_t        (CG with its own step cap and tolerance),

and then every input gradient equals the gradient of the scalar surrogate

    s(theta) = sum_t e_t . G_t(theta) x_t + sum_t y_t . (q_t - A_t(theta) x_t)
               + <dL/dH_T, H_T(theta)> + <dL/dG_T, G_T(theta)>

at fixed (detached) x and y, taken by autograd through the chunkwise operators of
:class:`~solvers.chunk_state.ChunkedSystem`. Differentiating s gives exactly the closed forms of
docs/design.md (``dq_t = y_t``, ``dlam = -sum_t x_t * y_t``, ``dv_s``, ``dk_s``, ``dbeta_s``,
``dg_s = gamma_s dgamma_s``) and the initial-state gradients, without writing each by hand.

The contractions are written out chunkwise in :func:`chunked_gradients` (batched products and one
reverse scan over chunks, no autograd graph), checked against that surrogate's autograd, the
closed forms of :mod:`stability.gradients`, gradcheck and mpmath. Both solves are scale invariant
(relative tolerances, ratio step lengths), so upstream gradients of any magnitude give gradients of
proportional magnitude. With a truncated forward solver, x is
not the exact solution and the result is the implicit gradient *at the computed x*: the gap to
the true gradient of the truncated computation is measured by the tests, not hidden.
"""

from __future__ import annotations

import dataclasses

import torch

from .cg import cg_iterate
from .chunk_state import ChunkedSystem
from .gates import decay_to_end, pairwise_decay, segmented_cumsum_grad
from .precision import PrecisionPolicy
from .problem import MesaProblem
from .spec import SolverSpec


def chunked_gradients(S: ChunkedSystem, x: torch.Tensor, y: torch.Tensor, E: torch.Tensor,
                      dH_T: torch.Tensor | None = None, dG_T: torch.Tensor | None = None) -> dict:
    """The closed-form gradients of docs/design.md, chunkwise (layout ``[B,H,N,C,.]``, accumulation dtype).

    With the chunk's reset-aware decays (:mod:`solvers.gates`, zero across a reset):
    ``Mz_ts = exp(Gam_t - Gam_s)`` (t >= s in one segment of a chunk, else 0), ``M = Mz beta_s``,
    ``zeta_t`` from the chunk start (``S.zeta``), ``ez_s = exp(Gam_C - Gam_s)`` to the chunk end (0 if a
    reset follows s in the chunk), the adjoint states at chunk ends
    ``DG_c = sum_{t after chunk c} zeta_{t,end_c} e_t x_t^T`` and
    ``DH_c = -sum_{t after chunk c} zeta_{t,end_c} y_t x_t^T`` (a reverse scan over chunks, started
    from the final-state gradients; ``zeta_{t,end_c} = 0`` once a reset lies between), and
    ``w_s = beta_s ez_s``:

        dv   = (M * X K^T)^T E + w (K DG^T)
        dk   = (M * E V^T)^T X - (M * X K^T)^T Y - (M * Y K^T)^T X + w (V DG + K (DH + DH^T))
        dbeta_s = sum_t Mz (x_t.k_s)(e_t.v_s - y_t.k_s) + ez_s (v_s^T DG k_s + k_s^T DH k_s)
        dq = y,   dlam = -sum x * y,   dH_0 = DH_{-1},  dG_0 = DG_{-1}
        a_t  = e_t.o_t - y_t.(H_t x_t) - beta_t dbeta_t  (+ <dH_T, H_T> + <dG_T, G_T> at the last token)
        dg_s = sum_{t >= s, no reset in (s, t]} a_t,  0 at a reset          (:func:`implicit_backward`)

    ``a_t`` is the derivative through the cumulative log-decay c_t = sum_{i<=t, i not a reset} g_i:
    dL/dc_t = <D_t, S_t> - <Dbar_t, u_t> with D_t the direct adjoint of the states and u_t = beta_t (k k^T,
    v k^T) the update, whose second term is beta_t dbeta_t. These are the Triton backward's formulas.
    """
    B, Hh, N, C, D = x.shape
    Mz = pairwise_decay(S.Gam, S.seg)  # [.., t, s]
    M = S.M
    K, V = S.K, S.V
    XK = x @ K.transpose(-1, -2)
    EV = E @ V.transpose(-1, -2)
    YK = y @ K.transpose(-1, -2)
    # reverse scan: adjoint states at the end of every chunk
    eG = S.zeta  # zeta from the chunk start
    decay_end = S.zeta[..., -1]  # [B,H,N]
    acc_G = torch.zeros(B, Hh, V.shape[-1], D, dtype=x.dtype, device=x.device) if dG_T is None else dG_T.to(x.dtype)
    acc_H = torch.zeros(B, Hh, D, D, dtype=x.dtype, device=x.device) if dH_T is None else dH_T.to(x.dtype)
    DG, DH = [None] * N, [None] * N
    for c in range(N - 1, -1, -1):
        DG[c], DH[c] = acc_G, acc_H
        we = eG[:, :, c, :, None]
        acc_G = decay_end[:, :, c, None, None] * acc_G + (we * E[:, :, c]).transpose(-1, -2) @ x[:, :, c]
        acc_H = decay_end[:, :, c, None, None] * acc_H - (we * y[:, :, c]).transpose(-1, -2) @ x[:, :, c]
    DG, DH = torch.stack(DG, 2), torch.stack(DH, 2)  # [B,H,N,Dv,D], [B,H,N,D,D]
    ez = decay_to_end(S.Gam, S.seg)  # exp(Gam_C - Gam_s), 0 if a reset follows s in the chunk
    beta = S.M.diagonal(dim1=-2, dim2=-1)  # M_ss = exp(0) beta_s
    w = (beta * ez)[..., None]
    DGk = K @ DG.transpose(-1, -2)  # rows (DG k_s)^T, [.., C, Dv]
    DHs = DH + DH.transpose(-1, -2)
    dv = (M * XK).transpose(-1, -2) @ E + w * DGk
    dk = ((M * EV).transpose(-1, -2) @ x - (M * XK).transpose(-1, -2) @ y - (M * YK).transpose(-1, -2) @ x
          + w * (V @ DG + K @ DHs))
    dbeta = ((Mz * XK * (EV - YK)).sum(-2)
             + ez * ((V * DGk).sum(-1) + (K * (K @ DH.transpose(-1, -2))).sum(-1)))
    o = S.output(x)
    Hx = S.matvec(x) - S.lam * x
    a0 = (E * o).sum(-1) - (y * Hx).sum(-1)
    a = a0 - beta * dbeta
    out = {"q": y, "k": dk, "v": dv, "beta": dbeta, "a": a, "a0": a0, "lam": -(x * y).sum(dim=(0, 2, 3)),
           "H0": acc_H, "G0": acc_G}
    final = 0.0
    if dH_T is not None:
        final = final + (dH_T * S.H_final).sum((-1, -2))
    if dG_T is not None:
        final = final + (dG_T * S.G_final).sum((-1, -2))
    out["final"] = final
    return out


def surrogate_gradients(inputs, x: torch.Tensor, y: torch.Tensor, do, policy: PrecisionPolicy, chunk_size: int,
                        dH_T=None, dG_T=None) -> tuple:
    """The same gradients by autograd of the surrogate s(theta) of the module docstring, at fixed x and
    y (``[B,T,H,D]``): an independent route to :func:`chunked_gradients`, for tests."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    with torch.enable_grad():
        init = None if leaves[6] is None else (leaves[6], leaves[7])
        S = ChunkedSystem.build(MesaProblem(*leaves[:6], init), policy, chunk_size)
        xc, yc, E = S.from_tokens(x.detach()), S.from_tokens(y.detach()), S.from_tokens(do)
        surrogate = (E * S.output(xc)).sum() + (yc * (S.Q - S.matvec(xc))).sum()
        if dH_T is not None:
            surrogate = surrogate + (dH_T * S.H_final).sum()
        if dG_T is not None:
            surrogate = surrogate + (dG_T * S.G_final).sum()
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(surrogate, wanted, allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in leaves)


def implicit_backward(inputs, needs, x: torch.Tensor, cfg: SolverSpec, do, dH_T=None, dG_T=None,
                      y: torch.Tensor | None = None, on_adjoint=None):
    """Input gradients ``(dq, dk, dv, dg, dbeta, dlam, dH0, dG0)`` (None where not needed) for the
    upstream gradients ``do`` (and ``dH_T``, ``dG_T``) at the forward solution ``x`` (``[B,T,H,D]``).

    ``inputs``: ``(q, k, v, g, beta, lam, H0, G0)`` (H0, G0 may be None); ``needs``: which of them
    need a gradient. The adjoint solve is the module docstring's; a caller that solved it already
    (the Triton kernel) passes ``y`` (``[B,T,H,D]``). The contractions are :func:`chunked_gradients`.
    ``on_adjoint(y, do)``, if given, is called with the adjoint solution (tokens layout): the hook of
    the accuracy certificate of the adjoint solve."""
    q, k, v, g, beta, lam, H0, G0 = (t.detach() if t is not None else None for t in inputs)
    init = None if H0 is None else (H0, G0)
    with torch.no_grad():
        # auto: the whole backward in the adjoint's tier products (solvers.precision.auto_ops), as the kernels
        S = dataclasses.replace(ChunkedSystem.build(MesaProblem(q, k, v, g, beta, lam, init), cfg.policy,
                                                    cfg.chunk_size), adjoint=True)
        xc = S.from_tokens(x)
        E = S.from_tokens(do)
        if y is None:
            y, *_ = cg_iterate(S, S.output_adjoint(E), cfg.policy,
                               steps=cfg.bwd_steps if cfg.bwd_steps is not None else cfg.steps,
                               tol=cfg.bwd_tol if cfg.bwd_tol is not None else cfg.tol, x0=cfg.x0,
                               precond=cfg.precond)
        else:
            y = S.from_tokens(y)
        if on_adjoint is not None:
            on_adjoint(S.to_tokens(y), do)
        gr = chunked_gradients(S, xc, y, E, dH_T, dG_T)
        a = S.to_tokens(gr["a"][..., None])[..., 0]  # [B,T,H]
        a[:, -1] = a[:, -1] + gr["final"]
        # dg_s = sum_{t >= s} a_t, restarted at resets. L depends on the gates only through the states'
        # decays, functions of the reset-aware cumulative log-decay c_t = sum_{i <= t, i not a reset} g_i
        # (solvers.gates), and a_t = dL/dc_t. After a reset r (gamma_r = 0) no state depends on a gate
        # before r: every decay within the segment [r, next reset) is a difference c_t - c_j of two of its
        # tokens, so adding a constant to c over the segment leaves L unchanged and the segment's a_t sum
        # to 0 in exact arithmetic. So for s < r the terms t >= r cancel segment by segment, and
        # dg_s = sum_{s <= t < r} a_t (summing them anyway would add only their rounding); at the reset,
        # dg_r = gamma_r dgamma_r = 0 in the working precision.
        dg = segmented_cumsum_grad(a, g.to(cfg.policy.accum_dtype), dim=1)
        out = [S.to_tokens(gr["q"]), S.to_tokens(gr["k"]), S.to_tokens(gr["v"]), dg,
               S.to_tokens(gr["beta"][..., None])[..., 0], gr["lam"], gr["H0"], gr["G0"]]
    return tuple(o if need and t is not None else None for o, need, t in zip(out, needs, inputs, strict=True))


def slice_by_slice(op):
    """A vmap rule for ``op`` (an operator's ``register_vmap``, an autograd Function's ``vmap``): one
    call of ``op`` per index of the mapped dimension, the outputs stacked along dim 0. The solver's
    value checks and early exits are host decisions, which vmap cannot batch; each slice is a
    problem of its own."""

    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            part = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims, strict=True)]
            outs.append(op(*part))
        stacked = [torch.stack([o[j] for o in outs]) for j in range(len(outs[0]))]
        if isinstance(outs[0], list):
            return stacked, [0] * len(stacked)
        return tuple(stacked), (0,) * len(stacked)

    return rule


class MesaImplicit(torch.autograd.Function):
    """``(o, H_T, G_T, x, steps, residual) = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, cfg[, on_adjoint])``:
    the forward by the PyTorch chunkwise CG, the backward by :func:`implicit_backward` (``on_adjoint``:
    its hook, called with the adjoint solution)."""

    @staticmethod
    def forward(q, k, v, g, beta, lam, H0, G0, cfg: SolverSpec, on_adjoint=None):
        init = None if H0 is None else (H0, G0)
        problem = MesaProblem(q, k, v, g, beta, lam, init)
        S = ChunkedSystem.build(problem, cfg.policy, cfg.chunk_size)
        x, count, rel, _ = cg_iterate(S, S.Q, cfg.policy, steps=cfg.steps, tol=cfg.tol, x0=cfg.x0,
                                      precond=cfg.precond)
        o = S.to_tokens(S.output(x))
        return o, S.H_final, S.G_final, S.to_tokens(x), S.to_tokens(count), S.to_tokens(rel)

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: torch.func transforms need it
        q, k, v, g, beta, lam, H0, G0, cfg, *hook = inputs
        x, count, rel = output[3:]
        ctx.cfg, ctx.on_adjoint = cfg, (hook[0] if hook else None)
        ctx.save_for_backward(q, k, v, g, beta, lam, H0, G0, x)
        ctx.mark_non_differentiable(x, count, rel)

    @staticmethod
    def backward(ctx, do, dH_T, dG_T, _dx, _d_steps, _d_res):
        *inputs, x = ctx.saved_tensors
        return (*implicit_backward(inputs, ctx.needs_input_grad[:8], x, ctx.cfg, do, dH_T, dG_T,
                                   on_adjoint=ctx.on_adjoint), None, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        """torch.vmap: one solve per index of the mapped dimension (:func:`slice_by_slice`)."""
        return slice_by_slice(MesaImplicit.apply)(info, in_dims, *args)


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
    cfg = SolverSpec(policy=policy, steps=steps, tol=tol, x0=x0, precond=precond, chunk_size=chunk_size,
                     bwd_steps=bwd_steps, bwd_tol=bwd_tol, check=None)
    H0, G0 = (None, None) if init is None else init
    o, H_T, G_T, x, count, rel = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, cfg)
    return o, (H_T, G_T), x, count, rel


# --- the same op, registered with torch.library ------------------------------------------------------
#
# torch.compile and torch.func cannot trace MesaImplicit (a Python autograd Function whose forward
# validates its inputs and branches on the data). The op below is the same forward (CG) and the same
# backward (implicit_backward), registered as two custom operators with a fake (shape) implementation
# and an autograd formula, so that a compiled graph holds it as one node and torch.func.grad
# differentiates it. The spec travels as JSON (SolverSpec.to_dict); the certificate, when the spec
# asks for one, is formed and decided inside the operators (solvers.certificate, tier 2).

def _spec_of(spec_json: str) -> SolverSpec:
    import json

    return SolverSpec.from_dict(json.loads(spec_json))


def spec_json(spec: SolverSpec) -> str:
    """The spec as the registered operators take it (a constant of the traced graph): its JSON, formed
    when the spec was made (:class:`SolverSpec`)."""
    return spec._json


@torch.library.custom_op("mesa_stability::mesa_torch", mutates_args=())
def mesa_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               lam: torch.Tensor, H0: torch.Tensor | None, G0: torch.Tensor | None, spec: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, H_T, G_T, x, steps, residual)`` of :class:`MesaImplicit`'s forward, as a registered operator."""
    from . import verdict
    from .certificate import certify_exact

    cfg = _spec_of(spec)
    init = None if H0 is None else (H0, G0)
    problem = MesaProblem(q, k, v, g, beta, lam, init)
    S = ChunkedSystem.build(problem, cfg.policy, cfg.chunk_size)
    x, count, rel, _ = cg_iterate(S, S.Q, cfg.policy, steps=cfg.steps, tol=cfg.tol, x0=cfg.x0, precond=cfg.precond)
    o, x = S.to_tokens(S.output(x)), S.to_tokens(x)
    if cfg.check is not None:
        c = certify_exact(problem, x, cfg.policy, threshold=cfg.threshold, chunk_size=cfg.chunk_size)
        c.bound = torch.where(torch.isfinite(o).all(-1), c.bound, torch.inf)
        verdict.submit(c, cfg.check, cfg.policy)
    outs = (o, S.H_final, S.G_final, x, S.to_tokens(count), S.to_tokens(rel))
    return tuple(t.contiguous().clone() if t._base is not None or not t.is_contiguous() else t.clone() for t in outs)


@mesa_torch.register_fake
def _(q, k, v, g, beta, lam, H0, G0, spec):
    cfg = _spec_of(spec)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    dt = cfg.policy.accum_dtype
    new = q.new_empty
    return (new(B, T, H, Dv, dtype=dt), new(B, H, D, D, dtype=dt), new(B, H, Dv, D, dtype=dt),
            new(B, T, H, D, dtype=dt), new(B, T, H, dtype=torch.int64), new(B, T, H, dtype=dt))


@torch.library.custom_op("mesa_stability::mesa_torch_backward", mutates_args=())
def mesa_torch_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        lam: torch.Tensor, H0: torch.Tensor | None, G0: torch.Tensor | None, x: torch.Tensor,
                        do: torch.Tensor, dH_T: torch.Tensor | None, dG_T: torch.Tensor | None, spec: str
                        ) -> list[torch.Tensor]:
    """The input gradients of :func:`implicit_backward`, each in its input's dtype (an empty tensor for an
    initial state not given)."""
    from . import verdict
    from .certificate import certify_exact

    cfg = _spec_of(spec)
    inputs = (q, k, v, g, beta, lam, H0, G0)
    hook = None
    if cfg.check is not None:
        def hook(y, e):
            init = None if H0 is None else (H0, G0)
            c = certify_exact(MesaProblem(q, k, v, g, beta, lam, init), y, cfg.policy, threshold=cfg.threshold,
                              e=e, chunk_size=cfg.chunk_size, what="adjoint y")
            verdict.submit(c, cfg.check, cfg.policy)
    grads = implicit_backward(inputs, [True] * 6 + [H0 is not None] * 2, x, cfg, do, dH_T, dG_T, on_adjoint=hook)
    # each gradient in its input's dtype and contiguous, as the fake implementation says
    return [q.new_empty(0) if d is None else d.to(t.dtype).contiguous().clone()
            for t, d in zip(inputs, grads, strict=True)]


@mesa_torch_backward.register_fake
def _(q, k, v, g, beta, lam, H0, G0, x, do, dH_T, dG_T, spec):
    # contiguous, as the real outputs are (empty_like would copy the strides of a transposed input,
    # which inductor may pass: a stride mismatch at run time)
    out = [t.new_empty(t.shape) for t in (q, k, v, g, beta, lam)]
    return out + [t.new_empty(t.shape) if t is not None else q.new_empty(0) for t in (H0, G0)]


def _setup(ctx, inputs, output):
    q, k, v, g, beta, lam, H0, G0, spec = inputs
    ctx.spec = spec
    ctx.save_for_backward(q, k, v, g, beta, lam, H0, G0, output[3])


def _backward(ctx, do, dH_T, dG_T, _dx, _dsteps, _dres):
    q, k, v, g, beta, lam, H0, G0, x = ctx.saved_tensors
    grads = mesa_torch_backward(q, k, v, g, beta, lam, H0, G0, x, do, dH_T, dG_T, ctx.spec)
    dH0, dG0 = (None if t is None else d for t, d in zip((H0, G0), grads[6:], strict=True))
    return (*grads[:6], dH0, dG0, None)


mesa_torch.register_autograd(_backward, setup_context=_setup)


mesa_torch.register_vmap(slice_by_slice(mesa_torch))
mesa_torch_backward.register_vmap(slice_by_slice(mesa_torch_backward))
