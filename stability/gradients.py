"""Closed-form Mesa gradients (docs/design.md section 2), evaluated densely in float64 from exact solves.

For a loss with upstream gradient ``e_t = dL/do_t`` and exact ``x_t = A_t^{-1} q_t``,
``y_t = A_t^{-1} G_t^T e_t`` (Cholesky per token), with ``zeta_{t,s} = prod_{i=s+1..t} gamma_i``
(exactly 0 across a hard reset, gamma_i = 0; :mod:`solvers.gates`):

    dq_t     = y_t
    dlam     = - sum_{b,t} x_t * y_t                                   (per head)
    dv_s     = sum_{t>=s} zeta_{t,s} beta_s (k_s . x_t) e_t
    dk_s     = sum_{t>=s} zeta_{t,s} beta_s [ (e_t . v_s) x_t - (x_t . k_s) y_t - (y_t . k_s) x_t ]
    dbeta_s  = sum_{t>=s} zeta_{t,s} (k_s . x_t) (e_t . v_s - y_t . k_s)
    dgamma_s = sum_{t>=s} zeta_{t,s} ( e_t^T G_{s-1} x_t - y_t^T H_{s-1} x_t ),   dg_s = gamma_s dgamma_s
    dH_0     = - sum_t zeta_{t,0} y_t x_t^T,    dG_0 = sum_t zeta_{t,0} e_t x_t^T

This is an independent, O(T^2) evaluation of the formulas, written term by term: the reference
for the implicit backward of :mod:`solvers.implicit` and of the kernels. Small problems only.
``dg_s = gamma_s dgamma_s`` is a product, not a cumulative sum: it is 0 at a reset, and before one
it has no terms from after it (zeta_{t,s} = 0 there).
"""

from __future__ import annotations

import torch

from mesa_stability import solvers
from mesa_stability.solvers import MesaProblem
from mesa_stability.solvers.gates import decay_from_start, pairwise_decay, segmented_cumsum


def closed_form_gradients(problem: MesaProblem, e: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``L = sum_t e_t . o_t`` for every input, float64, shapes of the inputs."""
    if problem.cu_seqlens is not None:
        raise ValueError("closed_form_gradients takes one unpacked problem (use problem.sequences())")
    p = problem.to(torch.float64)
    e = e.to(torch.float64)
    f = torch.float64
    B, H, D, Dv = p.B, p.H, p.D, p.Dv
    x = solvers.solve(p, "exact").x  # [B,T,H,D]
    lam = torch.diag_embed(p.lam)
    Hs, Gs = [], []
    for _, _, Hb, Gb in p.iter_states(block=64, dtype=f):
        Hs.append(Hb)
        Gs.append(Gb)
    Hs, Gs = torch.cat(Hs, 1), torch.cat(Gs, 1)  # [B,T,H,D,D], [B,T,H,Dv,D]
    rhs = (Gs.transpose(-1, -2) @ e[..., None])[..., 0]
    y = torch.linalg.solve(Hs + lam, rhs[..., None])[..., 0]
    # states before each token: H_{s-1}, G_{s-1}
    if p.initial_state is None:
        H0 = torch.zeros(B, H, D, D, dtype=f, device=p.device)
        G0 = torch.zeros(B, H, Dv, D, dtype=f, device=p.device)
    else:
        H0, G0 = (s.to(f) for s in p.initial_state)
    Hprev = torch.cat([H0[:, None], Hs[:, :-1]], 1)
    Gprev = torch.cat([G0[:, None], Gs[:, :-1]], 1)
    # zeta_{t,s} for t >= s with no reset in (s, t] (zero otherwise): exp of differences of the reset-aware
    # cumulative log-gate (solvers.gates)
    Gam, seg = segmented_cumsum(p.g.transpose(1, 2))  # [B,H,T]
    Z = pairwise_decay(Gam, seg)  # [B,H,t,s]
    zeta0 = decay_from_start(Gam, seg)  # zeta_{t,0}: [B,H,T]
    xk = torch.einsum("bthd,bshd->bhts", x, p.k)  # x_t . k_s
    ev = torch.einsum("bthv,bshv->bhts", e, p.v)  # e_t . v_s
    yk = torch.einsum("bthd,bshd->bhts", y, p.k)  # y_t . k_s
    beta = p.beta.transpose(1, 2)  # [B,H,T]
    W = Z * beta[..., None, :]  # zeta_{t,s} beta_s
    dv = torch.einsum("bhts,bhts,bthv->bshv", W, xk, e)
    dk = (torch.einsum("bhts,bhts,bthd->bshd", W, ev, x) - torch.einsum("bhts,bhts,bthd->bshd", W, xk, y)
          - torch.einsum("bhts,bhts,bthd->bshd", W, yk, x))
    dbeta = torch.einsum("bhts,bhts->bsh", Z, xk * (ev - yk))
    egx = torch.einsum("bthv,bshvd,bthd->bhts", e, Gprev, x)  # e_t^T G_{s-1} x_t
    yhx = torch.einsum("bthd,bshde,bthe->bhts", y, Hprev, x)  # y_t^T H_{s-1} x_t
    dgamma = torch.einsum("bhts->bsh", Z * (egx - yhx))
    dg = torch.exp(p.g) * dgamma  # exactly 0 at a reset: exp(g) = 0 there
    out = {"q": y, "k": dk, "v": dv, "g": dg, "beta": dbeta, "lam": -(x * y).sum(dim=(0, 1))}
    if p.initial_state is not None:
        out["H0"] = -torch.einsum("bht,bthd,bthe->bhde", zeta0, y, x)
        out["G0"] = torch.einsum("bht,bthv,bthd->bhvd", zeta0, e, x)
    return out
