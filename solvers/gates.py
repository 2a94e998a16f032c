"""Cumulative log-decay with exact hard resets.

The decay from token j to token i >= j is ``zeta_{i,j} = prod_{j<l<=i} gamma_l = exp(sum_{j<l<=i} g_l)``.
Evaluated blockwise from the inclusive cumulative sum ``Gam_i = sum_{l<=i} g_l`` as
``exp(Gam_i - Gam_j)``, a very negative gate absorbs the gates after it (``-1e16 + g == -1e16`` in
float64), and the decay between two later tokens comes out as ``exp(0) = 1``.

A gate whose decay is exactly zero in the precision of the cumulative sums is a *reset*:

    r_l = [g_l <= RESET_LOG_GATE[dtype]]     (g = -inf included)

Treating it as ``gamma_l = 0`` is exact in that precision, and it splits the sequence into
segments. A reset adds nothing to the cumulative sum and starts a new segment:

    Gam_i = sum_{l<=i} (0 if r_l else g_l),    seg_i = sum_{l<=i} r_l

and the decays are (L the last token of the block):

    W_ij       = exp(Gam_i - Gam_j)   if i >= j and seg_i == seg_j, else 0     (pairwise)
    zeta_{i,0} = exp(Gam_i)           if seg_i == 0, else 0                    (from the block start)
    zeta_{L,j} = exp(Gam_L - Gam_j)   if seg_j == seg_L, else 0                (to the block end)

For i >= j in one segment there is no reset in (j, i], so ``Gam_i - Gam_j`` is exactly the sum of
the gates in (j, i]: a reset's magnitude never enters a sum. Exponents of positive numbers (pairs
i < j, or pairs across a reset) are never formed: the exponent is selected to 0 first, then the
value to 0, which also keeps autograd free of ``inf * 0``.

The gradient through ``Gam``: a loss that depends on ``Gam`` only through these decays (differences
within a segment, and ``Gam_i`` itself in segment 0) does not change when a constant is added to
``Gam`` over a whole segment k >= 1, so its ``dGam_t`` sum to zero over every such segment. The
plain adjoint of the cumulative sum, ``dg_s = sum_{t >= s} dGam_t`` (0 at a reset), therefore equals
in exact arithmetic

    dg_s = 0                                    if r_s
    dg_s = sum_{t >= s, seg_t == seg_s} dGam_t  otherwise

a reverse cumulative sum that restarts at every reset (:func:`segmented_cumsum_grad`), which adds
nothing from after the next reset (where the plain one would add terms that only cancel, leaving
their rounding).

Gates are always at least fp32: bf16 / fp16 gates are summed, and thresholded, as fp32.
"""

from __future__ import annotations

import torch

# exp(g) rounds to exactly 0 in the dtype for g <= these (round to nearest: below half the smallest
# subnormal). fp32: exp(-104) = 6.8e-46 < 2^-150 = 7.0e-46; fp64: exp(-746) = 1.0e-324 < 2^-1075 = 2.5e-324.
# One unit above, exp(-103) = 1.8e-45 and exp(-745) = 2.8e-324 still round up to the smallest subnormal.
RESET_LOG_GATE = {torch.float32: -104.0, torch.float64: -746.0}

_AT_LEAST_FP32 = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gates are summed in: ``dtype``, or fp32 for bf16 / fp16."""
    dtype = _AT_LEAST_FP32.get(dtype, dtype)
    if dtype not in RESET_LOG_GATE:
        raise ValueError(f"gates must be a floating dtype (fp16, bf16, fp32, fp64), got {dtype}")
    return dtype


def reset_threshold(dtype: torch.dtype) -> float:
    """``RESET_LOG_GATE`` of the dtype the cumulative sums are formed in (fp32 for bf16 / fp16)."""
    return RESET_LOG_GATE[_sum_dtype(dtype)]


def reset_mask(g: torch.Tensor) -> torch.Tensor:
    """``g <= reset_threshold(g.dtype)``: where the gate is a reset (-inf included; NaN is not)."""
    return g <= reset_threshold(g.dtype)


def segmented_cumsum(g: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Gam, seg)``: the cumulative log-decay along ``dim`` with resets removed, and the number of
    resets at positions <= i (int64), both of ``g``'s shape; ``Gam`` in ``g``'s dtype (fp32 for
    bf16 / fp16). See the module docstring."""
    g = g.to(_sum_dtype(g.dtype))
    reset = reset_mask(g)
    Gam = torch.cumsum(torch.where(reset, 0.0, g), dim=dim)
    seg = torch.cumsum(reset.to(torch.int64), dim=dim)
    return Gam, seg


def pairwise_decay(Gam: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``W [..., L, L]``: ``W_ij = exp(Gam_i - Gam_j)`` for ``i >= j`` in one segment, else 0 (the
    last dim of ``Gam``, ``seg`` ``[..., L]`` is the token axis of a block)."""
    L = Gam.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=Gam.device).tril()
    keep = causal & (seg[..., :, None] == seg[..., None, :])
    diff = Gam[..., :, None] - Gam[..., None, :]
    return torch.where(keep, torch.exp(torch.where(keep, diff, 0.0)), 0.0)


def decay_from_start(Gam: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``zeta_{i,0} = exp(Gam_i)`` if no reset at or before i (``seg_i == 0``), else 0 (elementwise: any layout)."""
    keep = seg == 0
    return torch.where(keep, torch.exp(torch.where(keep, Gam, 0.0)), 0.0)


def decay_to_end(Gam: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``zeta_{L,j} = exp(Gam_L - Gam_j)`` if no reset in (j, L] (``seg_j == seg_L``), else 0; ``[..., L]``."""
    keep = seg == seg[..., -1:]
    return torch.where(keep, torch.exp(torch.where(keep, Gam[..., -1:] - Gam, 0.0)), 0.0)


def segmented_cumsum_grad(dGam: torch.Tensor, g: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``dg = dL/dg`` from ``dGam = dL/dGam`` for a loss that depends on ``Gam`` through the decays only
    (module docstring): ``dg_s = sum_{t >= s, seg_t == seg_s} dGam_t`` along ``dim``, 0 at a reset
    (``g`` gives the resets, thresholded as in :func:`segmented_cumsum`).

    Each ``dg_s`` is a sum of exactly the terms of its segment, formed by a segmented reverse scan in
    ceil(log2 L) doubling steps: with ``n(s)`` the first reset after s (or L), step w holds
    ``sum_{s <= t < min(s+w, n(s))} dGam_t`` and whether ``s + w < n(s)``, and the next step adds the
    partial sum at ``s + w`` where it is."""
    a = dGam.movedim(dim, -1)
    reset = reset_mask(g.to(_sum_dtype(g.dtype))).movedim(dim, -1)
    L = a.shape[-1]
    no = torch.zeros_like(reset[..., :1])
    # linked_s: the window [s, s + w] lies inside one segment (no reset in (s, s + w], s + w < L)
    linked = torch.cat([~reset[..., 1:], no], dim=-1)
    out = a
    w = 1
    while w < L:
        ahead = torch.cat([out[..., w:], torch.zeros_like(out[..., :w])], dim=-1)
        out = out + torch.where(linked, ahead, 0.0)
        linked = linked & torch.cat([linked[..., w:], no.expand_as(linked[..., :w])], dim=-1)
        w *= 2
    return torch.where(reset, 0.0, out).movedim(-1, dim)
