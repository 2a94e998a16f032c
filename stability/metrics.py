"""Error metrics that say how wrong a solution is and why (docs/design.md section 5).

For a computed ``x`` and a reference ``x*`` (float64 exact or mpmath), all in float64:

* normwise relative error      ``||x - x*||_F / ||x*||_F`` over the whole tensor;
* per-token relative error     ``||x_t - x*_t|| / ||x*_t||`` (``[B,T,H]``) and its maximum;
* backward error               ``||q_t - A_t x_t|| / (||A_t||_2 ||x_t|| + ||q_t||)``, A_t = H_t + Lambda:
                               the smallest relative perturbation of (A_t, q_t) that x_t solves exactly;
* condition number             ``kappa_t = lambda_max(A_t) / lambda_min(A_t)`` from float64 eigenvalues;
* stability ratio              ``err / (kappa u)`` with u the policy's unit roundoff: a backward-stable
                               method keeps it O(1) (times a modest growth factor) on every case.

Tokens whose reference is exactly zero contribute their absolute error (q_t = 0 gives x*_t = 0).
A computed value that is not finite (overflow, NaN) has infinite error: errors are ``inf``, never
``nan``, so that "larger is worse" holds in every table and plot.
"""

from __future__ import annotations

import torch

from mesa_stability.solvers import MesaProblem


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ||x - ref||_F / ||ref||_F (absolute error if ref is zero)."""
    x, ref = _f64(x), _f64(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but ref has {tuple(ref.shape)}")
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    den = float(ref.norm())
    num = float((x - ref).norm())
    return num / den if den > 0 else num


def token_rel_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token relative error ``[B,T,H]`` (vectors along the last dim)."""
    x, ref = _f64(x), _f64(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but ref has {tuple(ref.shape)}")
    num = (x - ref).norm(dim=-1)
    den = ref.norm(dim=-1)
    err = torch.where(den > 0, num / torch.where(den > 0, den, 1), num)
    return torch.where(torch.isfinite(x).all(dim=-1), err, torch.inf)


def max_token_rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-token relative error."""
    return float(token_rel_error(x, ref).max())


def systems(problem: MesaProblem, block: int = 64):
    """Yield ``(s, e, A)`` with ``A_t = H_t + Lambda`` for tokens ``s..e-1``, ``[B,e-s,H,D,D]``, float64."""
    lam = torch.diag_embed(problem.lam.to(torch.float64))
    for s, e, Hb, _ in problem.iter_states(block=block, dtype=torch.float64):
        yield s, e, Hb + lam


def backward_error_of(A: torch.Tensor, norm_A: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||q - A x|| / (||A||_2 ||x|| + ||q||)`` per token, for given systems and their 2-norms."""
    x, q = _f64(x), _f64(q)
    res = (q[..., None] - A @ x[..., None])[..., 0].norm(dim=-1)
    err = res / (norm_A * x.norm(dim=-1) + q.norm(dim=-1))
    return torch.where(torch.isfinite(x).all(dim=-1), err, torch.inf)


def backward_error(problem: MesaProblem, x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-token normwise backward error ``[B,T,H]`` of ``x`` for ``(H_t + Lambda) x_t = q_t``."""
    out = torch.empty(problem.B, problem.T, problem.H, dtype=torch.float64, device=x.device)
    for s, e, A in systems(problem, block):
        out[:, s:e] = backward_error_of(A, torch.linalg.eigvalsh(A)[..., -1], problem.q[:, s:e], x[:, s:e])
    return out


def condition_numbers(problem: MesaProblem, block: int = 64) -> torch.Tensor:
    """Per-token 2-norm condition number ``kappa(H_t + Lambda)``, ``[B,T,H]``, from fp64 eigenvalues."""
    out = torch.empty(problem.B, problem.T, problem.H, dtype=torch.float64, device=problem.device)
    for s, e, A in systems(problem, block):
        ev = torch.linalg.eigvalsh(A)
        out[:, s:e] = ev[..., -1] / ev[..., 0]
    return out


def stability_ratio(err: float | torch.Tensor, kappa: float | torch.Tensor, u: float):
    """err / (kappa u): how much worse than a backward-stable solve in precision u."""
    return err / (kappa * u)


def summarize(problem: MesaProblem, x: torch.Tensor, o: torch.Tensor, x_ref: torch.Tensor, o_ref: torch.Tensor,
              u: float, kappa: torch.Tensor | None = None) -> dict:
    """All metrics of one solution as a flat dict (one row of a tidy table)."""
    kappa = condition_numbers(problem) if kappa is None else kappa
    err_x = rel_error(x, x_ref)
    tok = token_rel_error(x, x_ref)
    bwd = backward_error(problem, x)
    return {
        "rel_err_x": err_x,
        "rel_err_o": rel_error(o, o_ref),
        "max_token_err_x": float(tok.max()),
        "max_token_err_o": max_token_rel_error(o, o_ref),
        "backward_err_max": float(bwd.max()),
        "backward_err_mean": float(bwd.mean()),
        "kappa_max": float(kappa.max()),
        "kappa_median": float(kappa.median()),
        # per-token error against per-token conditioning: the worst token of the ratio
        "stability_ratio": float(stability_ratio(tok, kappa, u).max()),
    }


# --- the peer's op-test metric ----------------------------------------------------------------------
# The peer (fla-core) accepts an op's output x against its reference r when
#
#     rms_ratio(x, r) = RMS(x - r) / (RMS(r) + 1e-8) < tol      (RMS over all entries, flattened)
#
# or when the largest absolute difference max |x - r| is at most 1e-6 (then the ratio is not looked at);
# a NaN in either fails. The absolute 1e-8 in the denominator is the peer's (it makes the ratio not
# scale invariant for references of RMS near 1e-8). Here the sums run in float64, and a non-finite x has
# ratio inf. The peer's CI mode, which only warns when the ratio is below 0.01 or the max abs error at
# most 0.3, is not reproduced: a ratio at or above the tolerance fails.

PEER_ABS_PASS = 1e-6  # max |x - r| at or below which the peer passes a comparison outright
PEER_RMS_EPS = 1e-8  # the absolute term of the peer's denominator


def rms_ratio(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The peer's relative RMS error ``RMS(x - ref) / (RMS(ref) + 1e-8)`` (inf for a non-finite x)."""
    x, ref = _f64(x), _f64(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but ref has {tuple(ref.shape)}")
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    err = float((x - ref).square().mean().sqrt())
    return err / (float(ref.square().mean().sqrt()) + PEER_RMS_EPS)


def peer_close(x: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, float, float]:
    """``(passed, rms_ratio, max_abs)``: the peer's acceptance of ``x`` against ``ref`` at tolerance ``tol``."""
    ratio = rms_ratio(x, ref)
    max_abs = float((_f64(x) - _f64(ref)).abs().max()) if ratio != float("inf") else float("inf")
    return bool(max_abs <= PEER_ABS_PASS or ratio < tol), ratio, max_abs
