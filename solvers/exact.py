"""Exact solver: Cholesky of ``H_t + Lambda`` for every token.

For each block of tokens the states are materialised (:meth:`MesaProblem.iter_states`) and

    L_t L_t^T = H_t + R_t,   x_t = L_t^{-T} L_t^{-1} q_t,   o_t = G_t x_t,

with ``R_t = Lambda`` (the Mesa problem) or, for ``regularizer="decayed"``,
``R_t = zeta_{t,0} Lambda``, ``zeta_{t,0} = prod_{i<=t} gamma_i`` (the problem that the
Sherman-Morrison recursion solves exactly, docs/design.md section 3). Cost O(T D^3), memory
O(block D^2) per (batch, head). States and decays are those of :meth:`MesaProblem.iter_states`,
exact across hard resets (:mod:`solvers.gates`); after a reset ``zeta_{t,0} = 0``, so the decayed
regulariser vanishes and ``H_t`` alone is singular until the keys since the reset span R^D.

Under a policy other than fp64: q, k, v are rounded to the policy's input precision, the states
to its state precision, and the factorisation runs in its accumulation dtype. Blocks whose
Cholesky fails (a matrix not numerically SPD in that precision) fall back to an LU solve; the
count is reported in ``info["cholesky_failures"]``.
"""

from __future__ import annotations

import torch

from .gates import decay_from_start, segmented_cumsum
from .precision import PrecisionPolicy
from .problem import MesaProblem
from .result import SolveResult


def solve_exact(problem: MesaProblem, policy: PrecisionPolicy, *, block: int = 64,
                regularizer: str = "static") -> SolveResult:
    if regularizer not in ("static", "decayed"):
        raise ValueError(f"regularizer must be 'static' or 'decayed', got {regularizer!r}")
    acc = policy.accum_dtype
    rounded = problem.replace(q=policy.round_input(problem.q), k=policy.round_input(problem.k),
                              v=policy.round_input(problem.v)).to(acc)
    lam = rounded.lam  # [H,D]
    if regularizer == "decayed":
        zeta0 = decay_from_start(*segmented_cumsum(rounded.g, dim=1))  # [B,T,H], 0 from the first reset on
    x = torch.empty(problem.B, problem.T, problem.H, problem.D, dtype=acc, device=problem.device)
    o = torch.empty(problem.B, problem.T, problem.H, problem.Dv, dtype=acc, device=problem.device)
    failures = 0
    Hb = Gb = None
    for s, e, Hb, Gb in rounded.iter_states(block=block, dtype=acc):
        Hs, Gs = policy.store(Hb), policy.store(Gb)
        if regularizer == "static":
            reg = lam.expand(e - s, -1, -1)  # [L,H,D]
        else:
            reg = zeta0[:, s:e, :, None] * lam  # [B,L,H,D]
        A = Hs + torch.diag_embed(reg)
        rhs = rounded.q[:, s:e, :, :, None]
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):
            failures += int((info > 0).sum())
            xb = torch.linalg.solve(A, rhs)
        else:
            xb = torch.cholesky_solve(rhs, L)
        x[:, s:e] = xb[..., 0]
        o[:, s:e] = (Gs @ xb)[..., 0]
    final = (Hb[:, -1], Gb[:, -1])
    return SolveResult("exact", policy, x, o, final, info={"cholesky_failures": failures,
                                                            "regularizer": regularizer})
