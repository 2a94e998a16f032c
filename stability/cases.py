"""Seeded, reproducible Mesa problems.

:func:`random_problem` draws a problem with controlled gates and regulariser:

    k_t ~ unit sphere (or N(0, I/D) when ``unit_keys=False``),  q_t, v_t ~ N(0, I)
    gamma_t ~ U(gamma_range) -> g_t = log gamma_t,   beta_t ~ U(beta_range),   lam ~ U(lam_range)

Everything is drawn in float64 from a private ``torch.Generator`` seeded with ``seed`` (the
global RNG is never touched), then cast to ``dtype``.
"""

from __future__ import annotations

import math

import torch

from solvers import MesaProblem


def random_problem(B: int = 1, T: int = 32, H: int = 2, D: int = 8, Dv: int | None = None, *, seed: int = 0,
                   gamma_range: tuple[float, float] = (0.9, 1.0), beta_range: tuple[float, float] = (0.0, 1.0),
                   lam_range: tuple[float, float] = (0.25, 1.25), unit_keys: bool = True,
                   initial_state: bool = False, dtype: torch.dtype = torch.float64) -> MesaProblem:
    Dv = D if Dv is None else Dv
    if not (0 < gamma_range[0] <= gamma_range[1] <= 1):
        raise ValueError(f"gamma_range must satisfy 0 < lo <= hi <= 1, got {gamma_range}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=f64)

    q = torch.randn(B, T, H, D, generator=gen, dtype=f64)
    k = torch.randn(B, T, H, D, generator=gen, dtype=f64)
    k = k / k.norm(dim=-1, keepdim=True) if unit_keys else k / math.sqrt(D)
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=f64)
    g = torch.log(uniform((B, T, H), *gamma_range)).clamp_max(0.0)
    beta = uniform((B, T, H), *beta_range)
    lam = uniform((H, D), *lam_range)
    init = None
    if initial_state:
        # a PSD H0 as the state after D random unit keys, and a matching G0
        kk = torch.randn(B, H, D, D, generator=gen, dtype=f64)
        kk = kk / kk.norm(dim=-1, keepdim=True)
        H0 = kk.transpose(-1, -2) @ kk
        G0 = torch.randn(B, H, Dv, D, generator=gen, dtype=f64) @ kk
        init = (H0.to(dtype), G0.to(dtype))
    return MesaProblem(q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype), beta.to(dtype), lam.to(dtype), init)
