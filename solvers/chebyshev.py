"""Chebyshev semi-iteration with free spectral bounds.

The spectrum of ``A_t = H_t + Lambda`` lies in ``[a, b_t]`` with, at no cost,

    a   = min(lam)                   (H_t is PSD)
    b_t = tr H_t + max(lam)          (lambda_max(H_t) <= tr H_t; tr H_t is a cumulative sum)

With ``theta = (b+a)/2``, ``delta = (b-a)/2``, ``sigma = theta/delta`` the iteration (Saad,
*Iterative Methods for Sparse Linear Systems*, Alg. 12.1) is

    r_0 = q - A x_0,  rho_0 = 1/sigma,  d_0 = r_0 / theta
    x_{k+1} = x_k + d_k,   r_{k+1} = r_k - A d_k
    rho_{k+1} = 1 / (2 sigma - rho_k),   d_{k+1} = rho_{k+1} rho_k d_k + (2 rho_{k+1} / delta) r_{k+1}

No inner products: nothing to reduce per step, which is why it is attractive in low precision.
With ``kappa_b = b/a`` and ``c = (sqrt(kappa_b) - 1)/(sqrt(kappa_b) + 1)`` it guarantees (exact
arithmetic) ``||e_k||_A <= 2 c^k ||e_0||_A`` and hence ``||r_k|| / ||r_0|| <= 2 sqrt(kappa_b) c^k``.
With ``tol`` each token runs the a-priori count :func:`steps_for_tolerance` (capped by ``steps``),
so stopping needs no reduction either. ``delta = 0`` (A = a I) is solved exactly by one step.
``steps=0`` returns x_0. Reported ``residual`` is ``||r_k|| / ||r_0||`` computed once at the end.
"""

from __future__ import annotations

import math

import torch

from .cg import check_iteration_options, dot, initial_guess
from .chunk_state import ChunkedSystem
from .precision import PrecisionPolicy
from .problem import MesaProblem
from .result import SolveResult


def contraction(kappa_b: torch.Tensor) -> torch.Tensor:
    """c = (sqrt(kappa_b) - 1) / (sqrt(kappa_b) + 1), the per-step error contraction."""
    s = torch.sqrt(kappa_b)
    return (s - 1) / (s + 1)


def steps_for_tolerance(kappa_b: torch.Tensor, tol: float) -> torch.Tensor:
    """Smallest k with ``2 sqrt(kappa_b) c^k <= tol``: steps that guarantee relative residual tol."""
    c = contraction(kappa_b)
    need = torch.log(2 * torch.sqrt(kappa_b) / tol) / torch.log(1 / torch.where(c > 0, c, 0.5))
    return torch.where(c > 0, torch.ceil(need).clamp_min(1), 1).to(torch.int64)


def spectral_bounds(S: ChunkedSystem) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b_t): ``a = min lam`` per head, ``b_t = tr H_t + max lam``, both ``[B,H,N,C]``."""
    tr = S.diag_H().sum(-1)
    a = S.lam.amin(-1).expand_as(tr)
    b = tr + S.lam.amax(-1)
    return a, b


def solve_chebyshev(problem: MesaProblem, policy: PrecisionPolicy, *, steps: int = 30, tol: float | None = None,
                    x0: str = "zero", precond: str | None = None, chunk_size: int = 64) -> SolveResult:
    check_iteration_options(steps, tol, x0)
    if precond not in (None, "none"):
        raise ValueError(f"precond={precond!r} is not supported by chebyshev (its bounds are for A itself)")
    S = ChunkedSystem.build(problem, policy, chunk_size)
    a, b = spectral_bounds(S)
    theta, delta = (b + a) / 2, (b - a) / 2
    flat = delta > 0
    sigma = torch.where(flat, theta / torch.where(flat, delta, 1), math.inf)
    n = torch.full_like(a, steps, dtype=torch.int64)
    if tol is not None:
        n = torch.minimum(n, steps_for_tolerance(b / a, tol))
    diag = S.diag_H() + S.lam
    x = initial_guess(S, x0, diag)
    r = S.Q - S.matvec(x) if x0 != "zero" else S.Q.clone()
    r0 = torch.sqrt(dot(r, r, policy))
    n = torch.where(S.valid.expand_as(n) & (r0 > 0), n, 0)
    rho = 1 / sigma
    d = r / theta[..., None]
    count = torch.zeros_like(n)
    for k in range(int(n.max()) if n.numel() else 0):
        active = (k < n)[..., None]
        x = torch.where(active, x + d, x)
        r = torch.where(active, r - S.matvec(d), r)
        rho_new = 1 / (2 * sigma - rho)
        coef = torch.where(flat, 2 * rho_new / torch.where(flat, delta, 1), 0)
        d = rho_new[..., None] * rho[..., None] * d + coef[..., None] * r
        rho = rho_new
        count += active[..., 0]
    rn = torch.sqrt(dot(r, r, policy))
    rel = torch.where(r0 > 0, rn / torch.where(r0 > 0, r0, 1), 0)
    return SolveResult(
        "chebyshev", policy, S.to_tokens(x), S.to_tokens(S.output(x)), (S.H_final, S.G_final),
        steps=S.to_tokens(count), residual=S.to_tokens(rel),
        breakdown=S.to_tokens(torch.zeros_like(n, dtype=torch.bool)),
        info={"tol": tol, "steps_cap": steps, "x0": x0, "chunk_size": S.C,
              "kappa_bound_max": float((b / a).max())},
    )
