"""Conjugate gradient for all T systems at once, in chunkwise form.

Preconditioned CG (M_J = diag(H_t + Lambda) when ``precond="jacobi"``, identity otherwise), per
token t, on ``A_t = H_t + Lambda`` (applied chunkwise by :class:`ChunkedSystem.matvec`):

    r_0 = q - A x_0,  z_0 = M_J^{-1} r_0,  p_0 = z_0
    alpha_k = (r_k . z_k) / (p_k . A p_k)
    x_{k+1} = x_k + alpha_k p_k,   r_{k+1} = r_k - alpha_k A p_k
    z_{k+1} = M_J^{-1} r_{k+1},    p_{k+1} = z_{k+1} + ((r_{k+1} . z_{k+1}) / (r_k . z_k)) p_k

Initial guess ``x0="zero"`` (x_0 = 0), ``"jacobi"`` (x_0 = q / diag(H_t + Lambda); diag(H_t)
is a cumulative sum) or ``"q"`` (x_0 = q: after 0 steps ``o_t = G_t q_t``, gated linear attention,
:mod:`solvers.gla`). Stopping: ``steps`` iterations, or with ``tol`` the relative residual test
``||r_k|| <= tol ||r_0||`` with ``steps`` as the cap. The test is relative and the step lengths
are ratios, so solving with ``s q`` gives ``s x`` for any s > 0: there is no additive epsilon
anywhere (each token's right-hand side is also divided by a power of two, exactly, and x scaled
back). A token leaves the iteration (is frozen with ``where``) when it converges, when its
residual reaches the floor ``u_acc^2 ||r_0||`` (:func:`residual_floor`; exactly zero included), or
on breakdown: ``p.Ap <= 0`` (or NaN), which rounding can cause; it
is flagged in ``result.breakdown``, never divided through.

``steps=0`` returns x_0 (zero, or the Jacobi guess) and its output. Vectors x, r, p live in the
policy's accumulation dtype, the scalars in its scalar dtype, and products round their operands
to its operand precision.
"""

from __future__ import annotations

import torch

from .chunk_state import ChunkedSystem
from .precision import PrecisionPolicy
from .problem import MesaProblem
from .result import SolveResult

X0_CHOICES = ("zero", "jacobi", "q")  # "q": x_0 = the right-hand side (0 steps: GLA, solvers.gla)
PRECOND_CHOICES = (None, "none", "jacobi")


def dot(a: torch.Tensor, b: torch.Tensor, policy: PrecisionPolicy) -> torch.Tensor:
    """Per-token inner product over the last dim, accumulated in ``accum``, held in ``scalar``."""
    return policy.to_scalar((a * b).sum(-1))


def check_iteration_options(steps, tol, x0) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be None or a float in (0, 1), got {tol!r}")
    if x0 not in X0_CHOICES:
        raise ValueError(f"x0 must be one of {X0_CHOICES}, got {x0!r}")


def initial_guess(S: ChunkedSystem, x0: str, diag: torch.Tensor, rhs: torch.Tensor | None = None) -> torch.Tensor:
    """x_0 = 0 (``"zero"``), rhs / diag(H_t + Lambda) (``"jacobi"``, ``diag`` [B,H,N,C,D]) or rhs itself
    (``"q"``); rhs defaults to q."""
    rhs = S.Q if rhs is None else rhs
    if x0 == "zero":
        return torch.zeros_like(rhs)
    return rhs.clone() if x0 == "q" else rhs / diag


def cg_iterate(S: ChunkedSystem, rhs: torch.Tensor, policy: PrecisionPolicy, *, steps: int, tol: float | None,
               x0: str, precond: str | None):
    """CG on ``A_t x_t = rhs_t`` for every token of a chunked system (the module docstring's iteration).

    ``rhs``: ``[B,H,N,C,D]`` in the accumulation dtype. Returns ``(x, steps, relative residual,
    breakdown)``, all in chunked layout. Used for q-star and for the adjoint solve of backward.
    Written without in-place updates, so that autograd can also differentiate the unrolled
    iteration (the true gradient of a truncated solve, which the tests compare with the implicit one)."""
    jacobi = precond == "jacobi"
    diag = S.diag_H() + S.lam
    # each token's right-hand side divided by a power of two (largest entry in [1, 2)): exact, and
    # undone on x at the end; keeps r.z of order 1 whatever the scale of q
    scale = pow2_row_scale(rhs)
    rhs = rhs / scale
    x = initial_guess(S, x0, diag, rhs)
    r = rhs - S.matvec(x) if x0 != "zero" else rhs.clone()
    z = r / diag if jacobi else r
    p = z
    rz = dot(r, z, policy)
    r0 = torch.sqrt(dot(r, r, policy))
    rn = r0
    valid = S.valid.expand_as(rz)
    active = valid & (rn > 0)
    if tol is not None:
        active = active & ~(rn <= tol * r0)
    breakdown = torch.zeros_like(active)
    count = torch.zeros(rz.shape, dtype=torch.int64, device=rz.device)
    acc = policy.accum_dtype
    floor = residual_floor(policy)
    for _ in range(steps):
        if not bool(active.any()):
            break
        Ap = S.matvec(p)
        pAp = dot(p, Ap, policy)
        broke = active & ~(pAp > 0)
        breakdown = breakdown | broke
        active = active & ~broke
        alpha = torch.where(active, rz / torch.where(active, pAp, 1), 0).to(acc)[..., None]
        sel = active[..., None]
        x = torch.where(sel, x + alpha * p, x)
        r = torch.where(sel, r - alpha * Ap, r)
        count = count + active
        rn = torch.where(active, torch.sqrt(dot(r, r, policy)), rn)
        still = active & (rn > 0) & ~(rn <= floor * r0)
        if tol is not None:
            still = still & ~(rn <= tol * r0)
        z = r / diag if jacobi else r
        rz_new = dot(r, z, policy)
        beta = torch.where(still, rz_new / torch.where(still, rz, 1), 0).to(acc)[..., None]
        p = torch.where(still[..., None], z + beta * p, p)
        rz = torch.where(still, rz_new, rz)
        active = still
    rel = torch.where(r0 > 0, rn / torch.where(r0 > 0, r0, 1), 0)
    return x * scale, count, rel, breakdown


def pow2_row_scale(v: torch.Tensor) -> torch.Tensor:
    """Per vector (last dim), the power of two s with max |v| / s in [1, 2); 1 for a zero vector
    (shape ``v.shape[:-1] + (1,)``, detached: dividing by it is exact)."""
    amax = v.detach().abs().amax(dim=-1, keepdim=True)
    ok = amax > 0
    return torch.where(ok, torch.exp2(torch.floor(torch.log2(torch.where(ok, amax, 1)))), 1).to(v.dtype)


def residual_floor(policy: PrecisionPolicy) -> float:
    """Relative residual at which a row leaves CG whatever ``steps`` and ``tol`` say: the square of
    the accumulation dtype's unit roundoff (2^-48 in fp32, 2^-106 in fp64). Below it x cannot
    improve, and further steps would only work on r.z values near the subnormal range, whose
    garbage ratios can blow a converged row up (the kernels use the same floor)."""
    return float(torch.finfo(policy.accum_dtype).eps / 2) ** 2


def check_precond(precond) -> None:
    if precond not in PRECOND_CHOICES:
        raise ValueError(f"precond must be one of {PRECOND_CHOICES}, got {precond!r}")


def solve_cg(problem: MesaProblem, policy: PrecisionPolicy, *, steps: int = 30, tol: float | None = None,
             x0: str = "zero", precond: str | None = None, chunk_size: int = 64) -> SolveResult:
    check_iteration_options(steps, tol, x0)
    check_precond(precond)
    S = ChunkedSystem.build(problem, policy, chunk_size)
    x, count, rel, breakdown = cg_iterate(S, S.Q, policy, steps=steps, tol=tol, x0=x0, precond=precond)
    o = S.output(x)
    return SolveResult(
        "cg", policy, S.to_tokens(x), S.to_tokens(o), (S.H_final, S.G_final),
        steps=S.to_tokens(count), residual=S.to_tokens(rel), breakdown=S.to_tokens(breakdown),
        info={"tol": tol, "steps_cap": steps, "x0": x0, "precond": precond or "none", "chunk_size": S.C,
              "breakdowns": int(breakdown.sum())},
    )
