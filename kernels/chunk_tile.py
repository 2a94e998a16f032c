"""Triton helpers of the per-chunk programs: a program's tile of tokens and columns, its gates, and the
exact power-of-two scaling of rows.

A program on grid (chunk c, batch * head) covers the chunk's C tokens (masked up to ``BLOCK_C``) and
the D (or Dv) columns (masked up to ``BLOCK_D``, ``BLOCK_DV``); a token's row in the ``[B*T, H]``
layout is int64 (B*T*H*D can exceed 2^31 elements). Dividing a row by the power of two of its
largest entry is exact in binary floating point and brings values of any scale to [1, 2).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:
    from .gates import chunk_log_decay

    @triton.jit
    def _chunk_tile(T, H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Indices of a program on grid (chunk, batch * head): its chunk and head, the offsets and masks
        of the chunk's tokens and of the D and Dv columns, and each token's row in ``[B*T, H]``
        (int64: B*T*H*D can exceed 2^31 elements)."""
        i_c = tl.program_id(0)
        i_bh = tl.program_id(1)
        i_b = i_bh // H
        i_h = i_bh % H
        o_c = tl.arange(0, BLOCK_C)
        o_d = tl.arange(0, BLOCK_D)
        o_v = tl.arange(0, BLOCK_DV)
        t = i_c * C + o_c
        m_t = (o_c < C) & (t < T)
        row = (i_b.to(tl.int64) * T + t) * H + i_h
        return i_c, i_bh, i_h, o_c, o_d, o_v, o_d < D, o_v < Dv, m_t, row

    @triton.jit
    def _gates(g_ptr, beta_ptr, row, m_t):
        """(Gam, seg, beta) of a chunk (:mod:`kernels.gates`); masked tokens read g = 0, beta = 0."""
        gam, seg = chunk_log_decay(g_ptr, row, m_t)
        return gam, seg, tl.load(beta_ptr + row, mask=m_t, other=0.0).to(tl.float32)

    @triton.jit
    def _pow2_row_scale(Q):
        """Per row, the power of two s with max |Q_row| / s in [1, 2) (1 for an all-zero row): CG on
        Q / s then x s is exact in binary floating point and keeps r.z of order 1 at any scale of q."""
        amax = tl.max(tl.abs(Q), axis=1)
        return tl.where(amax > 0, tl.exp2(tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0)))), 1.0)
