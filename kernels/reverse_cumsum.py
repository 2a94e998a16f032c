"""The log-decay gradient's segmented reverse cumulative sum in one launch.

For a per-token term ``a [B, T, H]`` (float32) and the gates ``g [B, T, H]`` the gradient of the
log-gates is (:func:`solvers.gates.segmented_cumsum_grad`, the same definition in PyTorch)

    dg_s = sum_{t >= s, no reset in (s, t]} a_t      (0 where reset_s = g_s <= RESET_LOG_GATE[fp32])

One program per (b, h) row walks the row from its end in blocks of ``BLOCK_T`` tokens. In scan
order ``i = T - 1 - s`` a token links to the one before it in the scan (the token s + 1) unless
s + 1 is a reset, and the block's segmented inclusive scan is ``tl.associative_scan`` of the pairs
``(a_s, cut_s)``, ``cut_s = reset_{s+1}``, with the combine (earlier ``x``, later ``y`` in scan order)

    (x, y) -> (y.a + (0 if y.cut else x.a), x.cut or y.cut)

which is associative (a segmented sum). The sum carried from the previous block (the later tokens)
is added to the block's tokens before their first cut. Every ``dg_s`` is a float32 sum of exactly
the terms of its segment (no differences of prefix sums, so no cancellation across segments), in a
tree within a block and in sequence across blocks: its error is at most about
``(log2 BLOCK_T + T / BLOCK_T) u_fp32 sum |a_t|``, the order of the PyTorch doubling scan's
``log2 T u_fp32 sum |a_t|``. It is to replace that scan's ``8 ceil(log2 T)`` tensor operations (about
100 launches at T = 4096) and the transposes around it in the Triton backward
(``kernels.mesa._log_decay_grad``) once the production guard has run on it; on the H200 a partial
guard (402 of 1176 rows, 45 of them dg) gave the same verdicts and dg errors within 0.4 % of the
PyTorch scan's (``docs/speed-gpu/``).
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

# the block of tokens one program scans at a time: a power of two; 1024 float32 pairs fit the
# registers of 4 warps (8 per thread) and leave T / BLOCK_T small (4 blocks at T = 4096)
MAX_BLOCK_T = 1024

if triton is not None:
    _RESET = tl.constexpr(RESET_LOG_GATE[torch.float32])

    @triton.jit
    def _segmented_sum(xa, xcut, ya, ycut):
        """The combine of the segmented scan (module docstring): x earlier, y later in scan order."""
        return ya + tl.where(ycut, 0.0, xa), xcut | ycut

    @triton.jit
    def _reverse_cumsum_kernel(a_ptr, g_ptr, dg_ptr, T, sa_b, sa_t, sa_h, sg_b, sg_t, sg_h, sd_b, sd_t, sd_h,
                               H: tl.constexpr, BLOCK_T: tl.constexpr):
        row = tl.program_id(0)
        b = row // H
        h = row % H
        a_row = a_ptr + b * sa_b + h * sa_h
        g_row = g_ptr + b * sg_b + h * sg_h
        d_row = dg_ptr + b * sd_b + h * sd_h
        i_blk = tl.arange(0, BLOCK_T)
        carry = tl.full([], 0.0, tl.float32)
        # a while loop (not range): the interpreter passes runtime ints as 1-element arrays, which
        # range() refuses; compiled, the two are the same loop (nothing to pipeline in 1 to T / BLOCK_T
        # iterations of one load each)
        start = 0
        while start < T:
            s = T - 1 - (start + i_blk)  # token index, in scan order (from the end)
            m_s = s >= 0
            a = tl.load(a_row + s * sa_t, mask=m_s, other=0.0).to(tl.float32)
            reset = tl.load(g_row + s * sg_t, mask=m_s, other=0.0).to(tl.float32) <= _RESET
            # cut_s = reset_{s+1}: s does not link to s + 1 (the token before it in scan order)
            nxt = s + 1
            cut = tl.load(g_row + nxt * sg_t, mask=m_s & (nxt < T), other=0.0).to(tl.float32) <= _RESET
            part, cut_seen = tl.associative_scan((a, cut), 0, _segmented_sum)
            out = part + tl.where(cut_seen, 0.0, carry)
            tl.store(d_row + s * sd_t, tl.where(reset, 0.0, out), mask=m_s)
            # the sum that the block's last token (scan order) carries into the next block
            carry = tl.sum(tl.where(i_blk == BLOCK_T - 1, out, 0.0), axis=0)
            start += BLOCK_T


def segmented_reverse_cumsum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dg [B, T, H]`` float32 (module docstring) from ``a`` and ``g`` of shape ``[B, T, H]`` (any
    strides; ``g`` in any float dtype, read as float32)."""
    if a.dim() != 3 or g.shape != a.shape:
        raise ValueError(f"a and g must both be [B, T, H], got {tuple(a.shape)} and {tuple(g.shape)}")
    if a.dtype != torch.float32:
        raise ValueError(f"a must be float32, got {a.dtype}")
    B, T, H = a.shape
    dg = torch.empty(B, T, H, dtype=torch.float32, device=a.device)
    if dg.numel() == 0:
        return dg
    block_t = min(MAX_BLOCK_T, triton.next_power_of_2(T))
    _reverse_cumsum_kernel[(B * H,)](a, g, dg, T, *a.stride(), *g.stride(), *dg.stride(), H=H, BLOCK_T=block_t,
                                     num_warps=4)
    return dg


__all__ = ["MAX_BLOCK_T", "segmented_reverse_cumsum"]
