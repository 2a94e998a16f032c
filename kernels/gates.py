"""Triton helpers: a chunk's cumulative log-decay with exact hard resets, and the decays it gives.

Within a chunk of C tokens (masked tokens read g = 0: no decay), in float32:

    reset_i = g_i <= RESET_LOG_GATE[fp32]      (exp(g_i) is exactly 0 in fp32; g = -inf included)
    Gam_i   = sum_{j <= i, not reset_j} g_j    (reset gates add 0: no absorption of later gates)
    seg_i   = #{j <= i : reset_j}              (segment of token i inside the chunk)

and, with ``same_ij = (i >= j) and (seg_i == seg_j)`` (no reset in (j, i]):

    pair decay    zeta_ij = exp(Gam_i - Gam_j) if same_ij else 0        [C, C]
    start decay   zeta_i0 = exp(Gam_i)         if seg_i == 0  else 0   (chunk start -> token i)
    end decay     zeta_Cj = exp(Gam_C - Gam_j) if seg_j == seg_C else 0 (token j -> chunk end)
    chunk decay   zeta_C0 = exp(Gam_C)         if seg_C == 0  else 0

For i, j in one segment Gam_i - Gam_j is exactly the sum of the gates in (j, i]; a reset makes the
decays across it exactly zero, as exp of the reset gate is in float32. The same definitions are
:mod:`solvers.gates` (PyTorch, any dtype); every exponent is of a non-positive number, and values
are selected away with ``where`` (never multiplied by a 0/1 mask: inf * 0 = NaN).
"""

from __future__ import annotations

import torch

from mesa_stability.solvers.gates import RESET_LOG_GATE

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:
    _RESET = tl.constexpr(RESET_LOG_GATE[torch.float32])

    @triton.jit
    def chunk_log_decay(g_ptr, row, m_t):
        """(Gam, seg) of a chunk (see the module docstring); masked tokens read g = 0."""
        g = tl.load(g_ptr + row, mask=m_t, other=0.0).to(tl.float32)
        reset = g <= _RESET
        gam = tl.cumsum(tl.where(reset, 0.0, g), axis=0)
        seg = tl.cumsum(reset.to(tl.int32), axis=0)
        return gam, seg

    @triton.jit
    def pair_decay(gam, seg, causal):
        """zeta_ij = exp(Gam_i - Gam_j) for i >= j in one segment, else 0 ([C, C])."""
        same = causal & (seg[:, None] == seg[None, :])
        return tl.where(same, tl.exp(tl.where(same, gam[:, None] - gam[None, :], 0.0)), 0.0)

    @triton.jit
    def start_decay(gam, seg):
        """zeta_i0 = exp(Gam_i) while no reset has occurred in the chunk, else 0 ([C])."""
        return tl.where(seg == 0, tl.exp(gam), 0.0)

    @triton.jit
    def end_decays(gam, seg):
        """(zeta_Cj [C], zeta_C0): decays from each token, and from the chunk start, to the chunk end.

        Gam is non-increasing and masked tokens add exact zeros, so Gam_C is its minimum and seg_C
        its maximum (no gather); taking the minimum also keeps Gam_C - Gam_j <= 0 where a parallel
        scan rounds non-monotonically."""
        gam_C = tl.min(gam, axis=0)
        seg_C = tl.max(seg, axis=0)
        same = seg == seg_C
        to_end = tl.where(same, tl.exp(tl.where(same, gam_C - gam, 0.0)), 0.0)
        return to_end, tl.where(seg_C == 0, tl.exp(gam_C), 0.0)
