"""Triton kernel: one decode step of the Mesa layer (state update, CG solve, output).

One program per (batch entry b, head h), for one new token (docs/design.md section 2):

    H' = gamma H + beta k k^T,   G' = gamma G + beta v k^T          (float32)
    x  = (H' + Lambda)^{-1} q    by CG on one vector with the same iteration code as
         :mod:`kernels.chunk_cg` (``_cg_init``, ``_cg_step``: relative tolerance, breakdown flagged)
    o  = G' x

The state tiles stay in registers: ``H' p`` is ``sum_j H'_ij p_j`` (a broadcast product and a row
sum, no tensor cores, which suits a single vector). Everything is float32; the new state is
written back in float32.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:
    from .chunk_cg import _cg_init, _cg_step
    from .chunk_tile import _pow2_row_scale

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr,  # [B, H, D], [B, H, D], [B, H, Dv] (any float dtype, read as fp32)
        g_ptr, beta_ptr,  # [B, H]
        lam_ptr,  # [H, D]
        H_ptr, G_ptr,  # [B, H, D, D], [B, H, Dv, D] state in (float32)
        Hn_ptr, Gn_ptr,  # [B, H, D, D], [B, H, Dv, D] state out (float32)
        o_ptr, x_ptr,  # [B, H, Dv], [B, H, D] float32
        steps_ptr, res_ptr,  # [B, H] int32, float32
        tol, steps,
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        X0_JACOBI: tl.constexpr, PRECOND: tl.constexpr, HAS_TOL: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_h = i_bh % H
        o_d = tl.arange(0, BLOCK_D)
        o_v = tl.arange(0, BLOCK_DV)
        m_d = o_d < D
        m_v = o_v < Dv
        m_dd = m_d[:, None] & m_d[None, :]
        m_vd = m_v[:, None] & m_d[None, :]
        gamma = tl.exp(tl.load(g_ptr + i_bh).to(tl.float32))
        beta = tl.load(beta_ptr + i_bh).to(tl.float32)
        k = tl.load(k_ptr + i_bh * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + i_bh * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + i_bh * Dv + o_v, mask=m_v, other=0.0).to(tl.float32)
        # padded coordinates: lam = 1 keeps the diagonal positive; their r, p, x stay 0
        lam = tl.load(lam_ptr + i_h * D + o_d, mask=m_d, other=1.0).to(tl.float32)
        Hs = tl.load(H_ptr + i_bh * D * D + o_d[:, None] * D + o_d[None, :], mask=m_dd, other=0.0)
        Gs = tl.load(G_ptr + i_bh * Dv * D + o_v[:, None] * D + o_d[None, :], mask=m_vd, other=0.0)
        Hs = gamma * Hs.to(tl.float32) + beta * k[:, None] * k[None, :]
        Gs = gamma * Gs.to(tl.float32) + beta * v[:, None] * k[None, :]
        tl.store(Hn_ptr + i_bh * D * D + o_d[:, None] * D + o_d[None, :], Hs, mask=m_dd)
        tl.store(Gn_ptr + i_bh * Dv * D + o_v[:, None] * D + o_d[None, :], Gs, mask=m_vd)

        # diag(H' + Lambda), by selecting the diagonal (no strided gather). The CG vectors are
        # [1, BLOCK_D] tiles so that the chunk kernel's row-wise CG update serves here too.
        eye = o_d[:, None] == o_d[None, :]
        diag = (tl.sum(tl.where(eye, Hs, 0.0), axis=1) + lam)[None, :]
        q = q[None, :]
        q_scale = _pow2_row_scale(q)  # exact power-of-two scaling of the right-hand side, undone on x
        q = q / q_scale[:, None]
        if X0_JACOBI:
            x = q / diag
            r = q - (tl.sum(Hs * x, axis=1)[None, :] + lam[None, :] * x)
        else:
            x = tl.zeros([1, BLOCK_D], dtype=tl.float32)
            r = q
        valid = tl.full([1], 1, tl.int1)
        p, rz, r0, active = _cg_init(r, diag, valid, tol, PRECOND, HAS_TOL)
        rn = r0
        count = tl.zeros([1], dtype=tl.int32)
        broke = valid & (count < 0)  # all False
        it = 0
        while (it < steps) & (tl.sum(active.to(tl.int32), axis=0) > 0):
            Ap = tl.sum(Hs * p, axis=1)[None, :] + lam[None, :] * p
            x, r, p, rz, rn, active, count, broke = _cg_step(Ap, x, r, p, rz, rn, r0, active, count, broke, diag,
                                                             tol, PRECOND, HAS_TOL)
            it += 1
        x = tl.sum(x * q_scale[:, None], axis=0)  # unscaled, back to a [BLOCK_D] vector
        o = tl.sum(Gs * x[None, :], axis=1)
        tl.store(o_ptr + i_bh * Dv + o_v, o, mask=m_v)
        tl.store(x_ptr + i_bh * D + o_d, x, mask=m_d)
        tl.store(steps_ptr + i_bh + tl.arange(0, 1), count)
        tl.store(res_ptr + i_bh + tl.arange(0, 1), tl.where(r0 > 0, rn / tl.where(r0 > 0, r0, 1.0), 0.0))
