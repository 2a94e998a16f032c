"""Accuracy certificate: a bound on every token's forward error, checked after the solve.

For token t (one batch entry and head) with ``A_t = H_t + Lambda`` and the computed ``x_t``:

    rho_t   = ||q_t - A_t x_t|| / ||q_t||              the true relative residual
    kappa_t = (tr H_t + max lam) / min lam  >= cond(A_t)  the free conditioning bound (tr H_t is a
                                                        cumulative sum: H_t is PSD, lambda_max <= tr H_t + max lam)
    nu_t    = ||x_t|| / ||q_t||

The residual is formed either by the kernel after its CG loop, with products of precision ``u_c``
on the states *as stored* (tier 1, cheap), or here in float64 from states rebuilt from the inputs
(tier 2, :func:`exact_residual`). Tier 1 misses two perturbations, which the bound adds:

* the rounding of the residual itself, ``|fl(A x) - A x| <= gamma_c (||q|| + ||A|| ||x||)`` with
  ``gamma_c = 2 u_c + sqrt(D + C) u_acc`` (operands rounded once each; fp32 accumulation over D + C
  terms, counted with the square-root growth of probabilistic rounding analysis, Higham and Mary,
  SIAM J. Sci. Comput. 41, 2019);
* the deviation of the stored states from the exact ones, ``||H^stored_t - H_t|| <= eps_S tr H_t``,
  with ``eps_S = u_prod + u_store``: the states' products (each term ``beta k k^T`` rounded to
  ``u_prod`` relative; the terms are PSD, so their sum is off by at most ``u_prod tr H_t``) and
  their storage (one rounding ``u`` for compensated fp32 states; ``sqrt(chunks) u_state`` for 16-bit
  states, which compound their rounding from chunk to chunk). The residual is that of the caller's
  system (its q, k, v, not the policy's rounding of them), and its states are the solve's only
  where their products and storage are at least bf16x3 / fp32; the 16-bit policies' states are
  formed once more for it (``kernels.mesa._residual``), so that their rounding shows in rho.

With ``lambda_min >= min lam`` and ``e_t = x_t - x*_t = A_t^{-1} (residual)``:

    ||e_t|| / ||q_t|| <= E_t = (rho_t + gamma_c (1 + lmax_t nu_t) + eps_S tr H_t nu_t) / min lam,
    lmax_t = tr H_t + max lam,
    ||e_t|| / ||x*_t|| <= bound_t = E_t / max(nu_t - E_t, 1 / lmax_t)      (||x*|| >= ||x|| - ||e||, ||q|| / lmax)

Tier 2 has ``gamma_c ~ 2^-50`` and ``eps_S = 0``, so its bound is ``||A^-1 r|| <= ||r|| / lambda_min``
at face value: tight when the error lies along the small eigenvalues, where rounding puts it.

**The adjoint solve is checked normwise.** The backward's ``y_t = A_t^{-1} G_t^T e_t`` has a
right-hand side that can cancel (``G_0^T e_0 = beta_0 k_0 (v_0 . e_0)`` is tiny when ``v_0`` and
``e_0`` are nearly orthogonal): forming it in 16-bit products leaves an error ~ ``u ||G_t|| ||e_t||``
that is large *relative to that token's y*, although it is negligible in the gradients, whose
accuracy is judged normwise over a tensor (``stability/budgets.toml``, the peer's relative RMS). The
adjoint's verdict is therefore the normwise relative error of each sequence's ``Y = (y_t)_t``, one
per (batch, head), from the per-token bounds (which stay in the stats):

    ||y_t - y*_t|| <= a_t = bound_t ||y_t|| / (1 - bound_t)      (||y*_t|| <= ||y_t|| / (1 - bound_t))
    ||Y - Y*||_F / ||Y*||_F <= beta / (||Y||_F - beta),  beta = sqrt(sum_t a_t^2)

(infinite if some ``bound_t >= 1``). dq is ``s y``, so this also bounds dq's normwise error.

``check`` (the ops' option): ``"warn"`` (default) issues a :class:`CertificateWarning`, ``"raise"``
raises :class:`CertificateError`, ``None`` skips the certificate; either names the worst token and
head, the bound, kappa, and the cheapest policy whose ``kappa u`` would pass. The verdict is
delivered by :mod:`solvers.verdict` (on CUDA, without a host sync). A NaN or inf bound
(non-finite output, a breakdown of the iteration) always fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .precision import POLICIES, UNIT_ROUNDOFF, PrecisionPolicy

CHECK_MODES = ("warn", "raise", None)
# Kernel policies in order of cost (cheapest first): the suggestion of a failed check is the first
# whose modeled error kappa u meets the threshold.
_BY_COST = ("bf16-fp32state", "fp16-fp32state", "bf16x3", "auto", "fp32")


class CertificateWarning(UserWarning):
    """A solve whose certified forward error exceeds the check threshold."""


class CertificateError(ArithmeticError):
    """Raised by ``check="raise"`` when the certified forward error exceeds the threshold."""


@dataclass
class Certificate:
    """Per-token accuracy certificate of one solve, ``[B,T,H]`` tensors (float64 on the solve's device).

    ``residual`` rho_t, ``kappa`` the free bound, ``bound`` the certified relative error of x_t
    (module docstring), ``breakdown`` where the iteration stopped on ``p.Ap <= 0`` or NaN,
    ``tier`` 1 (kernel residual on stored states) or 2 (float64 residual from the inputs),
    ``threshold`` the check threshold, ``what`` the solve it certifies (``"x"`` or ``"adjoint y"``).
    ``solution_norms`` (``||y_t||``, the adjoint's): the verdict is normwise per (batch, head)
    (:attr:`sequence_bound`, module docstring) instead of per token."""

    residual: torch.Tensor
    kappa: torch.Tensor
    bound: torch.Tensor
    breakdown: torch.Tensor
    threshold: float
    tier: int
    what: str = "x"
    solution_norms: torch.Tensor | None = None

    @property
    def sequence_bound(self) -> torch.Tensor | None:
        """``[B,H]`` certified normwise relative error of each sequence's solution (module docstring),
        or None for a per-token verdict."""
        if self.solution_norms is None:
            return None
        b = self.bound.double()
        w = self.solution_norms.to(device=b.device, dtype=torch.float64)
        a = torch.where(b < 1, b * w / (1 - b), math.inf).nan_to_num(nan=math.inf)  # >= ||y_t - y*_t||
        beta, norm = a.square().sum(1).sqrt(), w.square().sum(1).sqrt()
        return torch.where(norm > beta, beta / (norm - beta), torch.where(beta == 0, 0.0, math.inf))

    @property
    def failed(self) -> torch.Tensor:
        """Tokens whose bound exceeds the threshold or is not finite (normwise verdict: every token of a
        failing sequence)."""
        seq = self.sequence_bound
        if seq is None:
            return ~(self.bound <= self.threshold)
        return (~(seq <= self.threshold))[:, None, :].expand_as(self.bound)

    @property
    def ok(self) -> bool:
        return not bool(self.failed.any())

    @property
    def max_bound(self) -> float:
        return float(self.bound.nan_to_num(nan=math.inf).max()) if self.bound.numel() else 0.0

    def worst(self) -> tuple[int, int, int]:
        """(batch, token, head) of the largest bound (NaN counts as the largest)."""
        flat = int(self.bound.nan_to_num(nan=math.inf).flatten().argmax())
        B, T, H = self.bound.shape
        return flat // (T * H), (flat // H) % T, flat % H

    def message(self, policy: PrecisionPolicy) -> str:
        seq = self.sequence_bound
        if seq is None:
            b, t, h = self.worst()
            head = (f"{int(self.failed.sum())} of {self.bound.numel()} tokens exceed the threshold "
                    f"{self.threshold:.3g}; worst token {t} (batch {b}, head {h}): certified relative error "
                    f"{float(self.bound[b, t, h]):.3g}")
        else:
            flat = int(seq.nan_to_num(nan=math.inf).flatten().argmax())
            b, h = flat // seq.shape[1], flat % seq.shape[1]
            t = int(self.bound[b, :, h].nan_to_num(nan=math.inf).argmax())
            head = (f"{int((~(seq <= self.threshold)).sum())} of {seq.numel()} sequences (batch, head) exceed the "
                    f"threshold {self.threshold:.3g} in normwise relative error; worst batch {b}, head {h}: "
                    f"certified {float(seq[b, h]):.3g}, its worst token {t}: {float(self.bound[b, t, h]):.3g}")
        bound, kappa = float(self.bound[b, t, h]), float(self.kappa[b, t, h])
        why = "a breakdown of CG (p.Ap <= 0)" if bool(self.breakdown[b, t, h]) else (
            "a non-finite value" if not math.isfinite(bound) else f"kappa <= {kappa:.3g}")
        return (f"accuracy certificate of {self.what}: {head} ({why}, relative residual "
                f"{float(self.residual[b, t, h]):.3g}, tier {self.tier}) under policy {policy.name!r}. "
                f"{suggest(kappa, self.threshold, policy)}")


def suggest(kappa: float, threshold: float, policy: PrecisionPolicy) -> str:
    """The cheapest kernel policy whose modeled error ``kappa u_at(kappa)`` meets ``threshold``."""
    for name in _BY_COST:
        p = POLICIES[name]
        if name != policy.name and kappa * p.u_at(kappa) <= threshold:
            return f"Policy {name!r} would meet it (kappa u = {kappa * p.u_at(kappa):.2g})."
    floor = kappa * UNIT_ROUNDOFF["fp32"]
    return (f"No kernel policy is expected to: fp32 state storage alone limits the error to about kappa 2^-24 = "
            f"{floor:.2g}; use backend='torch' with policy='fp64', or check=None to accept it.")


def state_error(policy: PrecisionPolicy, chunks: int, compensated: bool) -> float:
    """``eps_S`` of the module docstring: the states' product precision (bf16x3 for ``auto``, whose
    states use it; the input dtype's for the 16-bit policies) plus their storage rounding (one
    rounding per chunk, or one in all when the running state is ``compensated``)."""
    prod = {"fp32": "fp32", "tf32": "fp32", "bf16x3": "bf16x3", "auto": "bf16x3"}.get(policy.operand, policy.input)
    store = UNIT_ROUNDOFF[policy.state] * (1.0 if compensated else math.sqrt(max(chunks, 1)))
    return UNIT_ROUNDOFF[prod] + store


def cert_operand(policy: PrecisionPolicy) -> str:
    """Product precision of a named policy's tier-1 residual: fp32 for fp32 / tf32 products, bf16x3
    otherwise (enough to resolve a solve made with bf16 / fp16 products). ``auto`` picks per tier."""
    return "fp32" if policy.operand in ("fp32", "tf32") else "bf16x3"


def bound_from(rho, nu, trH, lam_min, lam_max, gamma_c, eps_S) -> torch.Tensor:
    """``bound_t`` of the module docstring, elementwise in float64 (``lam_*`` broadcast over heads)."""
    rho, nu, trH = (t.double() for t in (rho, nu, trH))
    lmax = trH + lam_max
    E = (rho + gamma_c * (1 + lmax * nu) + eps_S * trH * nu) / lam_min
    return E / torch.maximum(nu - E, 1.0 / lmax)


def exact_residual(problem, x: torch.Tensor, e: torch.Tensor | None = None, chunk_size: int = 64):
    """Tier 2: ``(rho, nu, trH)`` ``[B,T,H]`` in float64 for ``x`` ``[B,T,H,D]``, the residual of
    ``(H_t + Lambda) x_t = q_t`` (or, with the upstream gradient ``e`` ``[B,T,H,Dv]``, of the adjoint
    system ``= G_t^T e_t``) with states rebuilt in float64 from the inputs."""
    from .chunk_state import ChunkedSystem

    if problem.cu_seqlens is not None:
        parts = []
        for off, seq in zip(problem.cu_seqlens.tolist(), problem.sequences(), strict=False):
            sl = slice(off, off + seq.T)
            parts.append(exact_residual(seq, x[:, sl], None if e is None else e[:, sl], chunk_size))
        return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))
    p64 = problem.to(torch.float64)
    S = ChunkedSystem.build(p64, POLICIES["fp64"], chunk_size)
    X = S.from_tokens(x.double())
    Q = S.Q if e is None else S.output_adjoint(S.from_tokens(e.double()))
    R = Q - S.matvec(X)
    qn = Q.norm(dim=-1)
    qn1 = torch.where(qn > 0, qn, 1.0)
    rho = S.to_tokens((R.norm(dim=-1) / qn1)[..., None])[..., 0]
    nu = S.to_tokens((X.norm(dim=-1) / qn1)[..., None])[..., 0]
    return rho, nu, p64.trace_H()


def certify_exact(problem, x: torch.Tensor, policy: PrecisionPolicy, *, threshold: float | None = None,
                  e: torch.Tensor | None = None, breakdown: torch.Tensor | None = None, chunk_size: int = 64,
                  what: str = "x") -> Certificate:
    """Tier-2 certificate of ``x`` (or of the adjoint ``y`` with the upstream gradient ``e``), any
    backend: float64 residual from the inputs, rounding terms ~2^-50."""
    rho, nu, trH = exact_residual(problem, x, e, chunk_size)
    lam = problem.lam.double()
    lam_min, lam_max = lam.min(-1).values, lam.max(-1).values  # [H]
    kappa = (trH + lam_max) / lam_min
    gamma = 2 * UNIT_ROUNDOFF["fp64"] * math.sqrt(problem.D + chunk_size)
    bound = bound_from(rho, nu, trH, lam_min, lam_max, gamma, 0.0)
    bad_x = ~torch.isfinite(x).all(-1)
    bound = torch.where(bad_x, math.inf, bound)
    brk = torch.zeros_like(bound, dtype=torch.bool) if breakdown is None else breakdown.to(bound.device).bool()
    return Certificate(rho, kappa, bound, brk, policy.check_tol if threshold is None else threshold, 2, what,
                       None if e is None else x.detach().double().norm(dim=-1).to(bound.device))


__all__ = ["CHECK_MODES", "Certificate", "CertificateError", "CertificateWarning", "bound_from", "cert_operand",
           "certify_exact", "exact_residual", "state_error", "suggest"]
