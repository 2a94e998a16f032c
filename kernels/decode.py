"""Triton kernel: one decode step of the Mesa layer (state update, CG solve, output, certificate).

One program per (batch entry b, head h), for one new token (docs/design.md section 2):

    H' = gamma H + beta k k^T,   G' = gamma G + beta v k^T          (float32)
    x  = (H' + Lambda)^{-1} q    by CG on one vector with the same iteration code as
         :mod:`kernels.chunk_cg` (``_cg_init``, ``_cg_step``: relative tolerance, breakdown flagged)
    o  = G' x

The state tile H' stays in registers for the solve: ``H' p`` is ``sum_j H'_ij p_j`` (a broadcast
product and a row sum, no tensor cores, which suits a single vector). G is read only after the
solve, so that the two D x D tiles are never live together. Everything is float32; the new state is
written back in float32.

With a certificate buffer (``CERTIFY``), the program then forms the residual of the caller's system
in float64 (:mod:`solvers.certificate`, the tier-2 quantities): H read again from the given state
``BLOCK_J`` columns at a time (it is still in L2),

    r = q - gamma (H x) - beta k (k . x) - lam * x,    rho = ||r|| / ||q||,   nu = ||x|| / ||q||,
    tr H' = gamma tr H + beta ||k||^2,   kappa = (tr H' + max lam) / min lam,
    bound = E / max(nu - E, 1 / lmax),   E = (rho + gamma_c (1 + lmax nu)) / min lam,  lmax = tr H' + max lam

with ``gamma_c`` from the host (``2 u_fp64 sqrt(D)``) and ``bound = inf`` where x or o is not finite.
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
    def _step_certificate(q, x, k, lam, m_d, o_d, log_gamma, beta, H_ptr, h_base, x_ptr, x_base, gamma_c, o_ok,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
        """(rho, kappa, bound) of the module docstring, in float64 from the given state H (read again
        ``BLOCK_J`` columns at a time) and the stored x."""
        q64, x64, k64, lam64 = q.to(tl.float64), x.to(tl.float64), k.to(tl.float64), lam.to(tl.float64)
        g64, b64 = tl.exp(log_gamma.to(tl.float64)), beta.to(tl.float64)  # the decay of the caller's g, in fp64
        Hx = tl.zeros([BLOCK_D], dtype=tl.float64)
        trH = tl.zeros([BLOCK_D], dtype=tl.float64)
        o_j = tl.arange(0, BLOCK_J)
        for j0 in range(0, D, BLOCK_J):
            jj = j0 + o_j
            m_j = jj < D
            Hj = tl.load(H_ptr + h_base + o_d[:, None] * D + jj[None, :], mask=m_d[:, None] & m_j[None, :],
                         other=0.0).to(tl.float64)  # H[:, j-block] of the given state
            xj = tl.load(x_ptr + x_base + jj, mask=m_j, other=0.0).to(tl.float64)
            Hx += tl.sum(Hj * xj[None, :], axis=1)
            trH += tl.sum(tl.where(o_d[:, None] == jj[None, :], Hj, 0.0), axis=1)
        r = q64 - g64 * Hx - b64 * k64 * tl.sum(k64 * x64, axis=0) - lam64 * x64
        r = tl.where(m_d, r, 0.0)
        qq = tl.sum(q64 * q64, axis=0)
        qq = tl.where(qq > 0, qq, 1.0)
        rho = tl.sqrt(tl.sum(r * r, axis=0) / qq)
        nu = tl.sqrt(tl.sum(x64 * x64, axis=0) / qq)
        trHn = g64 * tl.sum(trH, axis=0) + b64 * tl.sum(k64 * k64, axis=0)
        lam_min = tl.min(tl.where(m_d, lam64, float("inf")), axis=0)
        lam_max = tl.max(tl.where(m_d, lam64, 0.0), axis=0)
        lmax = trHn + lam_max
        E = (rho + gamma_c * (1.0 + lmax * nu)) / lam_min
        bound = tl.where(o_ok, E / tl.maximum(nu - E, 1.0 / lmax), float("inf"))
        return rho, lmax / lam_min, bound

    @triton.heuristics({"CERTIFY": lambda a: a["cert_ptr"] is not None})
    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr,  # [B, H, D], [B, H, D], [B, H, Dv] (any float dtype, read as fp32)
        g_ptr, beta_ptr,  # [B, H]
        lam_ptr,  # [H, D]
        H_ptr, G_ptr,  # [B, H, D, D], [B, H, Dv, D] state in (float32)
        Hn_ptr, Gn_ptr,  # [B, H, D, D], [B, H, Dv, D] state out (float32)
        o_ptr,  # [B, H, Dv] float32
        out_ptr,  # [B, H, D + 1] float32: x and the final relative residual of each (b, h)
        steps_ptr, brk_ptr, bad_ptr,  # [B, H] int32, int8 (CG breakdown), int8 (bad input)
        fail_ptr,  # [B, H] int8: the certificate failed (bound above threshold, or not finite); CERTIFY only
        cert_ptr,  # optional (sets CERTIFY): [B, H, 3] float64 rho, kappa, bound
        tol, steps, gamma_c, threshold,
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_J: tl.constexpr,
        X0_JACOBI: tl.constexpr, PRECOND: tl.constexpr, HAS_TOL: tl.constexpr, CERTIFY: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_h = i_bh % H
        o_d = tl.arange(0, BLOCK_D)
        o_v = tl.arange(0, BLOCK_DV)
        m_d = o_d < D
        m_v = o_v < Dv
        m_dd = m_d[:, None] & m_d[None, :]
        m_vd = m_v[:, None] & m_d[None, :]
        log_gamma = tl.load(g_ptr + i_bh).to(tl.float32)
        gamma = tl.exp(log_gamma)
        beta = tl.load(beta_ptr + i_bh).to(tl.float32)
        k = tl.load(k_ptr + i_bh * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        q_in = tl.load(q_ptr + i_bh * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        # padded coordinates: lam = 1 keeps the diagonal positive; their r, p, x stay 0
        lam = tl.load(lam_ptr + i_h * D + o_d, mask=m_d, other=1.0).to(tl.float32)
        # the token's values, checked on the way (mesa_step raises on a flag): q, k, v, lam finite,
        # lam > 0, g <= 0 (-inf, a hard reset, allowed; NaN not), 0 <= beta <= 1 (v once it is read)
        bad = tl.sum((~(tl.abs(q_in) < float("inf"))).to(tl.int32), axis=0) \
            + tl.sum((~(tl.abs(k) < float("inf"))).to(tl.int32), axis=0) \
            + tl.sum((~((lam > 0) & (lam < float("inf")))).to(tl.int32), axis=0) \
            + (~(log_gamma <= 0)).to(tl.int32) + (~((beta >= 0) & (beta <= 1))).to(tl.int32)
        h_base = i_bh * D * D
        Hs = tl.load(H_ptr + h_base + o_d[:, None] * D + o_d[None, :], mask=m_dd, other=0.0)
        Hs = gamma * Hs.to(tl.float32) + beta * k[:, None] * k[None, :]
        tl.store(Hn_ptr + h_base + o_d[:, None] * D + o_d[None, :], Hs, mask=m_dd)

        # diag(H' + Lambda), by selecting the diagonal (no strided gather). The CG vectors are
        # [1, BLOCK_D] tiles so that the chunk kernel's row-wise CG update serves here too.
        eye = o_d[:, None] == o_d[None, :]
        diag = (tl.sum(tl.where(eye, Hs, 0.0), axis=1) + lam)[None, :]
        q = q_in[None, :]
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
        # the value state, read after the solve: G' = gamma G + beta v k^T, o = G' x
        g_base = i_bh * Dv * D
        v = tl.load(v_ptr + i_bh * Dv + o_v, mask=m_v, other=0.0).to(tl.float32)
        bad += tl.sum((~(tl.abs(v) < float("inf"))).to(tl.int32), axis=0)
        tl.store(bad_ptr + i_bh, (bad > 0).to(tl.int8))
        Gs = tl.load(G_ptr + g_base + o_v[:, None] * D + o_d[None, :], mask=m_vd, other=0.0)
        Gs = gamma * Gs.to(tl.float32) + beta * v[:, None] * k[None, :]
        tl.store(Gn_ptr + g_base + o_v[:, None] * D + o_d[None, :], Gs, mask=m_vd)
        o = tl.sum(Gs * x[None, :], axis=1)
        out_base = i_bh * (D + 1)
        tl.store(o_ptr + i_bh * Dv + o_v, o, mask=m_v)
        tl.store(out_ptr + out_base + o_d, x, mask=m_d)
        tl.store(steps_ptr + i_bh + tl.arange(0, 1), count)
        tl.store(out_ptr + out_base + D + tl.arange(0, 1), tl.where(r0 > 0, rn / tl.where(r0 > 0, r0, 1.0), 0.0))
        tl.store(brk_ptr + i_bh + tl.arange(0, 1), broke.to(tl.int8))
        if CERTIFY:
            tl.debug_barrier()  # x, stored above by other threads of this program, is read back by column block
            finite = tl.sum((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=0) \
                + tl.sum((~(tl.abs(o) < float("inf")) & m_v).to(tl.int32), axis=0)
            rho, kappa, bound = _step_certificate(q_in, x, k, lam, m_d, o_d, log_gamma, beta, H_ptr, h_base, out_ptr,
                                                  out_base, gamma_c, finite == 0, D, BLOCK_D, BLOCK_J)
            tl.store(cert_ptr + i_bh * 3, rho)
            tl.store(cert_ptr + i_bh * 3 + 1, kappa)
            tl.store(cert_ptr + i_bh * 3 + 2, bound)
            tl.store(fail_ptr + i_bh, (~(bound <= threshold)).to(tl.int8))
