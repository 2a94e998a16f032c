"""Seeded, reproducible Mesa problems: a generic generator and the named stress cases.

:func:`random_problem` draws a problem with controlled gates and regulariser:

    k_t ~ N(0, S^2) normalised to unit length, S = diag(a^(i/(D-1))), a = ``key_anisotropy``
          (isotropic for a = 1), or drawn in a random ``key_rank``-dimensional subspace,
    q_t ~ N(0, q_scale^2 I),  v_t ~ v_scale (N(0, I) + m 1),
    (k_t and v_t share the offset m = ``mean_offset`` along the all-ones direction before k is
    normalised: a common direction in every token, as in real activations, which makes G_t grow
    linearly in t instead of like sqrt(t)),
    gamma_t ~ U(gamma_range) -> g_t = log gamma_t,   beta_t ~ U(beta_range),
    lam ~ U(lam_range) (log-uniform with ``lam_log=True``)

Everything is drawn in float64 from a private ``torch.Generator`` seeded with ``seed`` (the
global RNG is never touched), then cast to ``dtype``.

:func:`make` builds a named stress case (docs/design.md section 6); :data:`CASES` lists them with
what each stresses and its default sizes. Every case accepts the sizes ``B, T, H, D, Dv`` and
its own parameters; a case's output depends only on (name, seed, sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mesa_stability.solvers import MesaProblem


def random_problem(B: int = 1, T: int = 32, H: int = 2, D: int = 8, Dv: int | None = None, *, seed: int = 0,
                   gamma_range: tuple[float, float] = (0.9, 1.0), beta_range: tuple[float, float] = (0.0, 1.0),
                   lam_range: tuple[float, float] = (0.25, 1.25), lam_log: bool = False, unit_keys: bool = True,
                   key_rank: int | None = None, key_anisotropy: float = 1.0, q_scale: float = 1.0,
                   v_scale: float = 1.0, mean_offset: float = 0.0,
                   initial_state: bool = False, dtype: torch.dtype = torch.float64,
                   gate_dtype: torch.dtype | None = None) -> MesaProblem:
    """A seeded problem; see the module docstring. ``gate_dtype`` (default ``dtype``) is the dtype
    of g, beta and lam, so that e.g. bf16 q/k/v can come with fp32 gates."""
    Dv = D if Dv is None else Dv
    if not (0 < gamma_range[0] <= gamma_range[1] <= 1):
        raise ValueError(f"gamma_range must satisfy 0 < lo <= hi <= 1, got {gamma_range}")
    if not (0 <= beta_range[0] <= beta_range[1] <= 1):
        raise ValueError(f"beta_range must satisfy 0 <= lo <= hi <= 1, got {beta_range}")
    if not (0 < lam_range[0] <= lam_range[1]):
        raise ValueError(f"lam_range must satisfy 0 < lo <= hi, got {lam_range}")
    if key_rank is not None and not (1 <= key_rank <= D):
        raise ValueError(f"key_rank must be in [1, D={D}], got {key_rank}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=f64)

    q = q_scale * torch.randn(B, T, H, D, generator=gen, dtype=f64)
    if not 0 < key_anisotropy <= 1:
        raise ValueError(f"key_anisotropy must be in (0, 1], got {key_anisotropy}")
    if key_rank is None:
        # per-coordinate std a^(i/(D-1)): anisotropic keys make H_t ill-conditioned as it grows
        std = key_anisotropy ** (torch.arange(D, dtype=f64) / max(D - 1, 1))
        k = torch.randn(B, T, H, D, generator=gen, dtype=f64) * std
    else:  # keys in a random key_rank-dimensional subspace per head
        basis = torch.linalg.qr(torch.randn(H, D, key_rank, generator=gen, dtype=f64)).Q  # [H,D,r]
        k = torch.einsum("bthr,hdr->bthd", torch.randn(B, T, H, key_rank, generator=gen, dtype=f64), basis)
    k = k + mean_offset
    k = k / k.norm(dim=-1, keepdim=True) if unit_keys else k / math.sqrt(D)
    v = v_scale * (torch.randn(B, T, H, Dv, generator=gen, dtype=f64) + mean_offset)
    g = torch.log(uniform((B, T, H), *gamma_range)).clamp_max(0.0)
    beta = uniform((B, T, H), *beta_range)
    if lam_log:
        lam = torch.exp(uniform((H, D), math.log(lam_range[0]), math.log(lam_range[1])))
    else:
        lam = uniform((H, D), *lam_range)
    init = None
    if initial_state:
        # a PSD H0 as the state after D random unit keys, and a matching G0
        kk = torch.randn(B, H, D, D, generator=gen, dtype=f64)
        kk = kk / kk.norm(dim=-1, keepdim=True)
        H0 = kk.transpose(-1, -2) @ kk
        G0 = v_scale * torch.randn(B, H, Dv, D, generator=gen, dtype=f64) @ kk
        init = (H0.to(dtype), G0.to(dtype))
    gd = dtype if gate_dtype is None else gate_dtype
    return MesaProblem(q.to(dtype), k.to(dtype), v.to(dtype), g.to(gd), beta.to(gd), lam.to(gd), init)


def upstream_gradient(problem: MesaProblem, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A seeded upstream gradient ``dL/do`` of shape ``[B,T,H,Dv]`` and magnitude ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(problem.B, problem.T, problem.H, problem.Dv, generator=gen, dtype=torch.float64)
    return (scale * e).to(problem.dtype)


# named stress cases ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A named stress case: what it stresses, its default sizes and parameters, its builder."""

    name: str
    stresses: str
    defaults: dict
    build: Callable[..., MesaProblem] = field(repr=False)


SIZES = dict(B=1, T=128, H=2, D=16, Dv=16)


def _well_conditioned(seed, B, T, H, D, Dv):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.8, 0.95), lam_range=(0.5, 1.5))


def _no_forgetting_long(seed, B, T, H, D, Dv, key_anisotropy):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(1.0, 1.0), beta_range=(0.5, 1.0),
                          lam_range=(0.25, 1.0), key_anisotropy=key_anisotropy)


def _low_rank_keys(seed, B, T, H, D, Dv, rank):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.99, 1.0), key_rank=rank, lam_range=(0.25, 1.0))


def _strong_forgetting(seed, B, T, H, D, Dv):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.01, 0.1), lam_range=(0.25, 1.0))


def _tiny_lambda(seed, B, T, H, D, Dv, lam_min, key_anisotropy):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.95, 1.0), lam_range=(lam_min, 0.25),
                          lam_log=True, key_anisotropy=key_anisotropy)


def _bf16_inputs(seed, B, T, H, D, Dv):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.8, 0.95), lam_range=(0.5, 1.5),
                          dtype=torch.bfloat16, gate_dtype=torch.float32)


def _large_values(seed, B, T, H, D, Dv, v_scale):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.99, 1.0), lam_range=(0.25, 1.0),
                          v_scale=v_scale, mean_offset=1.0)


def _small_upstream_grad(seed, B, T, H, D, Dv, q_scale):
    return random_problem(B, T, H, D, Dv, seed=seed, gamma_range=(0.8, 0.95), lam_range=(0.5, 1.5),
                          q_scale=q_scale)


def _varlen(seed, B, T, H, D, Dv, n_seqs):
    if B != 1:
        raise ValueError(f"varlen packs sequences into B = 1, got B = {B}")
    if not 1 <= n_seqs <= T:
        raise ValueError(f"n_seqs must be in [1, T={T}], got {n_seqs}")
    p = random_problem(1, T, H, D, Dv, seed=seed, gamma_range=(0.9, 1.0))
    gen = torch.Generator().manual_seed(seed + 1)
    cuts = torch.randperm(T - 1, generator=gen)[: n_seqs - 1].sort().values + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([T])])
    return p.replace(cu_seqlens=cu)


CASES: dict[str, Case] = {c.name: c for c in (
    Case("well_conditioned", "baseline: gamma in [0.8, 0.95], lam in [0.5, 1.5], kappa below ~10",
         {}, _well_conditioned),
    Case("no_forgetting_long", "gamma = 1 over a long sequence with anisotropic keys (std ratio 1e-2): "
         "tr H_t and kappa grow linearly with T", {"T": 512, "key_anisotropy": 1e-2}, _no_forgetting_long),
    Case("low_rank_keys", "keys from a rank-r subspace, gamma near 1 (repeated tokens): a few huge eigenvalues "
         "over a flat lam floor, large kappa", {"rank": 4}, _low_rank_keys),
    Case("strong_forgetting", "gamma in [0.01, 0.1]: H_t is nearly rank one; Sherman-Morrison's decayed "
         "regulariser collapses (wind-up)", {}, _strong_forgetting),
    Case("tiny_lambda", "lam log-uniform from lam_min up to the 0.25 floor, anisotropic keys: lambda_min "
         "near lam_min, kappa ~ tr H / lam_min", {"lam_min": 1e-3, "key_anisotropy": 1e-2}, _tiny_lambda),
    Case("bf16_inputs", "q, k, v given in bf16 (gates fp32): the reference is exact for the rounded inputs",
         {}, _bf16_inputs),
    Case("large_values", "unnormalised v (scale 1e4, inside fp16's range) sharing a mean direction with k: "
         "G_t grows past 65504 and overflows fp16 state storage", {"v_scale": 1e4}, _large_values),
    Case("small_upstream_grad", "tiny right-hand sides (q scaled by 1e-6), as in backward with tiny upstream "
         "gradients; use upstream_gradient() for gradient checks over many scales", {"q_scale": 1e-6},
         _small_upstream_grad),
    Case("varlen", "packed variable-length batch (cu_seqlens, B = 1): states restart at sequence starts",
         {"n_seqs": 4}, _varlen),
)}


def make(name: str, seed: int = 0, **sizes) -> MesaProblem:
    """The named stress case with the given seed; ``sizes`` override ``B, T, H, D, Dv`` and the
    case's own parameters (see ``CASES[name].defaults``)."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; known: {sorted(CASES)}")
    case = CASES[name]
    params = {**SIZES, **case.defaults}
    unknown = set(sizes) - set(params)
    if unknown:
        raise ValueError(f"case {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(params)}")
    params.update(sizes)
    return case.build(seed, **params)
