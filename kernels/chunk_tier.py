"""Triton kernel: the ``auto`` policy's precision tier of every chunk, from its systems' free condition bounds.

One program per (chunk c, batch entry b, head h). With the chunk's decays of :mod:`kernels.gates`
(``M_tj = zeta_tj beta_j``, ``zeta_t0`` from the chunk start) it forms every token's state trace in
float32,

    tr H_t = zeta_t0 tr H_c + sum_{j <= t} M_tj ||k_j||^2,

and from it the largest free condition bound of the chunk's systems

    kappa_c = max_{t in c} (tr H_t + max lam) / min lam   >= cond(H_t + Lambda)   (H_t is PSD),

and writes the cheapest tier of :data:`solvers.precision.AUTO_TIERS` whose ``kappa_c u`` meets
``AUTO_TARGET`` (:func:`solvers.precision.auto_tier`; a NaN bound gets the last tier). The same
definition as :func:`solvers.chunk_state.chunk_tier`. It reads the chunk's keys, gates and the
diagonal of H_c: about a D-th of what the CG kernel reads.
"""

from __future__ import annotations

import torch

from mesa_stability.solvers.precision import AUTO_TARGET, AUTO_TIERS, UNIT_ROUNDOFF

from .chunk_state import MIN_DOT_BLOCK

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# kappa u <= AUTO_TARGET <=> kappa <= AUTO_TARGET / u: the largest kappa of each tier but the last
# (16 for bf16, 4096 for bf16x3; powers of two, so the comparison is exact)
TIER_LIMITS = tuple(AUTO_TARGET / UNIT_ROUNDOFF[t] for t in AUTO_TIERS[:-1])
assert len(TIER_LIMITS) == 2, "the kernel below selects among three tiers"

if triton is not None:
    from .chunk_tile import _chunk_tile, _gates
    from .gates import pair_decay, start_decay

    @triton.jit
    def _chunk_tier_kernel(
        k_ptr,  # [B*T, H, D] keys (any float dtype, read as fp32)
        g_ptr, beta_ptr,  # [B*T, H] float32
        lam_ptr,  # [H, D] float32
        Hc_ptr,  # [B, H, N, D, D] state before each chunk (float32)
        tier_ptr,  # [B*H*N] int8 output
        T, N, limit0, limit1,  # tokens per sequence, chunks, TIER_LIMITS
        H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        i_c, i_bh, i_h, o_c, o_d, _, m_d, _, m_t, row = _chunk_tile(T, H, D, D, C, BLOCK_C, BLOCK_D, BLOCK_D)
        gam, seg, beta = _gates(g_ptr, beta_ptr, row, m_t)
        M = pair_decay(gam, seg, o_c[:, None] >= o_c[None, :]) * beta[None, :]
        K = tl.load(k_ptr + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        K = K.to(tl.float32)
        kk = tl.sum(K * K, axis=1)
        s_base = (i_bh.to(tl.int64) * N + i_c) * D * D
        trHc = tl.sum(tl.load(Hc_ptr + s_base + o_d * (D + 1), mask=m_d, other=0.0).to(tl.float32), axis=0)
        trH = start_decay(gam, seg) * trHc + tl.sum(M * kk[None, :], axis=1)
        lam = tl.load(lam_ptr + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        lam_min = tl.min(tl.where(m_d, lam, float("inf")), axis=0)
        lam_max = tl.max(tl.where(m_d, lam, 0.0), axis=0)
        kappa = (tl.max(tl.where(m_t, trH, 0.0), axis=0) + lam_max) / lam_min
        tier = tl.where(kappa <= limit0, 0, tl.where(kappa <= limit1, 1, 2))  # NaN: 2
        tl.store(tier_ptr + i_bh.to(tl.int64) * N + i_c, tier.to(tl.int8))


def chunk_tiers(Hc: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor,
                C: int) -> torch.Tensor:
    """``[B*H*N]`` int8 tier of every chunk (module docstring): one launch, no host sync. ``k``:
    ``[B,T,H,D]`` contiguous; ``g``, ``beta``: ``[B,T,H]`` float32 contiguous; ``lam``: ``[H,D]``
    float32; ``Hc``: ``[B,H,N,D,D]`` float32 (the chunk states of the solve)."""
    B, T, H, D = k.shape
    N = Hc.shape[2]
    tier = torch.empty(B * H * N, dtype=torch.int8, device=k.device)
    _chunk_tier_kernel[(N, B * H)](
        k, g, beta, lam, Hc, tier, T, N, *TIER_LIMITS, H=H, D=D, C=C,
        BLOCK_C=max(MIN_DOT_BLOCK, triton.next_power_of_2(C)), BLOCK_D=max(MIN_DOT_BLOCK, triton.next_power_of_2(D)))
    return tier
