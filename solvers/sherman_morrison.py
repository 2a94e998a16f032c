"""Sherman-Morrison: the original recurrent Mesa layer (recursive least squares).

It propagates the inverse ``P_t = R_t^{-1}`` of

    R_t = gamma_t R_{t-1} + beta_t k_t k_t^T,   R_0 = Lambda (+ H_0 with an initial state),

by the rank-one update (Sherman-Morrison on ``R_t = gamma_t (R_{t-1} + (beta_t/gamma_t) k k^T)``)

    u_t = P_{t-1} k_t,   P_t = ( P_{t-1} - beta_t u_t u_t^T / (gamma_t + beta_t k_t^T u_t) ) / gamma_t,
    x_t = P_t q_t,       o_t = G_t x_t.

Because the regulariser is decayed with the keys, ``R_t = H_t + zeta_{t,0} Lambda`` with
``zeta_{t,0} = prod_{i<=t} gamma_i``: for gamma < 1 this is a *different* problem from Mesa's
``H_t + Lambda`` (model mismatch), and ``P_t`` is divided by gamma at every step (covariance
wind-up, which amplifies rounding). :func:`own_problem_reference` solves its own problem exactly,
so the two error sources can be told apart. O(T D^2) sequential; P stored per the policy's
state precision, products per its operand precision.

A hard reset (``g_t <= RESET_LOG_GATE`` of the accumulation dtype, ``g_t = -inf`` included:
gamma_t = 0, :mod:`solvers.gates`) cannot be represented: the update divides by gamma_t, and the
problem it solves loses its regulariser (``zeta_{t,0} = 0``), so ``R_t = H_t`` is singular (rank at
most the number of tokens since the reset). Both functions raise ``ValueError`` naming the reset
token rather than return inf / NaN.
"""

from __future__ import annotations

import torch

from .exact import solve_exact
from .gates import reset_mask, reset_threshold
from .precision import PrecisionPolicy
from .problem import MesaProblem
from .result import SolveResult


def refuse_resets(problem: MesaProblem, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` at the first hard reset of ``problem`` (gates thresholded in ``dtype``)."""
    reset = reset_mask(problem.g.to(dtype))  # [B,T,H]
    if bool(reset.any()):
        b, t, h = (int(i) for i in reset.nonzero()[0])
        raise ValueError(
            f"Sherman-Morrison cannot represent a hard reset (gamma = 0) at token t = {t} (batch {b}, head {h}: "
            f"g = {float(problem.g[b, t, h]):.3g} <= {reset_threshold(dtype):g}): its update divides by gamma, and "
            f"the problem it solves, (H_t + zeta_{{t,0}} Lambda) x_t = q_t, loses its regulariser there "
            f"(zeta_{{t,0}} = 0) and is singular; use the exact, cg or chebyshev solver")


def solve_sherman_morrison(problem: MesaProblem, policy: PrecisionPolicy) -> SolveResult:
    acc = policy.accum_dtype
    refuse_resets(problem, acc)
    q = policy.round_input(problem.q).transpose(1, 2)  # [B,H,T,D]
    k = policy.round_input(problem.k).transpose(1, 2)
    v = policy.round_input(problem.v).transpose(1, 2)
    gamma = torch.exp(problem.g.to(acc)).transpose(1, 2)  # [B,H,T]
    beta = problem.beta.to(acc).transpose(1, 2)
    B, H, T, D, Dv = problem.B, problem.H, problem.T, problem.D, problem.Dv
    lam = problem.lam.to(acc)
    R0 = torch.diag_embed(lam).expand(B, H, D, D)
    if problem.initial_state is None:
        P = torch.linalg.inv(R0)
        Hs = torch.zeros(B, H, D, D, dtype=acc, device=problem.device)
        Gs = torch.zeros(B, H, Dv, D, dtype=acc, device=problem.device)
    else:
        Hs, Gs = (s.to(acc) for s in problem.initial_state)
        P = torch.linalg.inv(R0 + Hs)
    P = policy.store(P)
    mm = policy.mm
    x = torch.empty(B, H, T, D, dtype=acc, device=problem.device)
    o = torch.empty(B, H, T, Dv, dtype=acc, device=problem.device)
    for t in range(T):
        kt, gt, bt = k[:, :, t, :, None], gamma[:, :, t, None, None], beta[:, :, t, None, None]
        u = mm(P, kt)  # [B,H,D,1]
        denom = gt + bt * mm(kt.transpose(-1, -2), u)
        P = policy.store((P - bt * mm(u, u.transpose(-1, -2)) / denom) / gt)
        Hs = policy.store(gt * Hs + bt * mm(kt, kt.transpose(-1, -2)))
        Gs = policy.store(gt * Gs + bt * mm(v[:, :, t, :, None], kt.transpose(-1, -2)))
        xt = mm(P, q[:, :, t, :, None])
        x[:, :, t] = xt[..., 0]
        o[:, :, t] = mm(Gs, xt)[..., 0]
    return SolveResult("sherman_morrison", policy, x.transpose(1, 2), o.transpose(1, 2), (Hs, Gs),
                       info={"solves": "R_t = H_t + zeta_{t,0} Lambda"})


def own_problem_reference(problem: MesaProblem, policy: PrecisionPolicy, block: int = 64) -> SolveResult:
    """Exact solution of the problem Sherman-Morrison solves: ``(H_t + zeta_{t,0} Lambda) x_t = q_t``."""
    refuse_resets(problem, policy.accum_dtype)
    return solve_exact(problem, policy, block=block, regularizer="decayed")
