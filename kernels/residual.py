"""Triton kernel: the accuracy certificate of a solve (tier 1 of :mod:`solvers.certificate`).

:func:`_certify_kernel` runs after the CG kernel (:mod:`kernels.chunk_cg`), one program per chunk c
(one batch entry b, head h), and :func:`certify_chunk` forms, for the solution X of the chunk's C
systems, per token

    R = Q - A(X),  A(X) = diag(zeta) X H_c + ((X K^T) * M) K + X diag(lam)
    rho_t = ||r_t|| / ||q_t||,   nu_t = ||x_t|| / ||q_t||,
    tr H_t = zeta_t tr H_c + sum_j M_tj ||k_j||^2,   kappa_t = (tr H_t + max lam) / min lam,
    bound_t = E_t / max(nu_t - E_t, 1 / lmax_t),
    E_t = (rho_t + gamma_c (1 + lmax_t nu_t) + eps_S tr H_t nu_t) / min lam,  lmax_t = tr H_t + max lam

(the formulas of :mod:`solvers.certificate`; ``gamma_c`` and ``eps_S`` come from the host), and
``bound_t = inf`` where the token's output row is not finite. It checks the caller's system: q, k
and v as the caller gave them (any float dtype, read as fp32), not the policy's rounding of them, so
the input rounding is measured in rho (a tiny q rounded into fp16's subnormals loses far more than
2^-11); and states ``H_c``, ``G_c`` whose products are at least as accurate as bf16x3, stored in fp32
(the solve's own, or for the 16-bit policies states formed again: ``kernels.mesa._certificate_states``).
The right-hand side Q is q, or for the adjoint ``G_t^T e_t = diag(zeta) E G_c + ((E V^T) * M) K``,
formed again here. The residual is formed ``BLOCK_J`` columns at a time (a ``[D, BLOCK_J]`` slice of
H_c on chip, never the whole ``D x D`` state with its split parts), and only its row norms are kept.
Products are in precision ``OP`` (:mod:`kernels.operands`: ``bf16x3`` for solves made with bf16 /
fp16 / bf16x3 products, IEEE ``fp32`` for fp32 / tf32 products), accumulated in fp32; rows are
divided by the power of two of q (for the adjoint, of e) first (exact), so that squares neither
overflow nor underflow.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:
    from .chunk_tile import _chunk_tile, _gates, _pow2_row_scale
    from .gates import pair_decay, start_decay
    from .operands import mm, split

    @triton.jit
    def certify_chunk(
        X,  # [BLOCK_C, BLOCK_D] float32 solution of the chunk, also at x_ptr (read by column block)
        q_scale,  # [BLOCK_C] the power of two of each row's right-hand side
        o_ok,  # [BLOCK_C] whether each token's output row is finite
        qg_ptr,  # forward: [B*T, H, D] the caller's q
        e_ptr, scale_ptr,  # ADJOINT: [B*T, H, Dv] upstream gradient, read times scale_ptr[0]
        kg_ptr, vg_ptr,  # [B*T, H, D], [B*T, H, Dv] the caller's k and v (v: ADJOINT only)
        Hs_ptr, Gs_ptr,  # [B, H, N, D, D], [B, H, N, Dv, D] the certificate's states (fp32)
        x_ptr,  # [B*T, H, D] float32 solution
        cert_ptr,  # [B*T, H, 3] float32 output: rho, kappa, bound
        row, m_t, m_d, m_v, o_d, o_v, s_base, g_base, eG, M, lam_ptr, i_h, gamma_c, eps_S,
        D: tl.constexpr, Dv: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, OP: tl.constexpr,
        KG_EXACT: tl.constexpr, SOFT: tl.constexpr, ADJOINT: tl.constexpr,
    ):
        m_td = m_t[:, None] & m_d[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        lam = tl.load(lam_ptr + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        lam_min = tl.min(tl.where(m_d, lam, float("inf")), axis=0)
        lam_max = tl.max(tl.where(m_d, lam, 0.0), axis=0)
        K = tl.load(kg_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        Kt_hi, Kt_lo = split(tl.trans(K), OP, SOFT)
        SX = mm(X, Kt_hi, Kt_lo, OP, SOFT, KG_EXACT) * M  # (X K^T) * M, [C, C]
        if ADJOINT:
            E = tl.load(e_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            E = E * tl.load(scale_ptr)
            Vt = tl.load(vg_ptr + row[None, :] * Dv + o_v[:, None], mask=m_v[:, None] & m_t[None, :],
                         other=0.0).to(tl.float32)
            Vt_hi, Vt_lo = split(Vt, OP, SOFT)
            SE = mm(E, Vt_hi, Vt_lo, OP, SOFT, KG_EXACT) * M  # (E V^T) * M, [C, C]
        inv = 1.0 / q_scale
        rr = tl.zeros([BLOCK_C], dtype=tl.float32)
        qq = tl.zeros([BLOCK_C], dtype=tl.float32)
        xx = tl.sum(X * X * (inv * inv)[:, None], axis=1)
        kk = tl.sum(K * K, axis=1)
        o_j = tl.arange(0, BLOCK_J)
        for j0 in range(0, D, BLOCK_J):
            jj = j0 + o_j
            m_j = jj < D
            m_tj = m_t[:, None] & m_j[None, :]
            Hj = tl.load(Hs_ptr + s_base + o_d[:, None] * D + jj[None, :], mask=m_d[:, None] & m_j[None, :],
                         other=0.0).to(tl.float32)  # H_c[:, j-block]
            H_hi, H_lo = split(Hj, OP, SOFT)
            Kj = tl.load(kg_ptr + row[:, None] * D + jj[None, :], mask=m_tj, other=0.0).to(tl.float32)
            Kj_hi, Kj_lo = split(Kj, OP, SOFT)
            Xj = tl.load(x_ptr + row[:, None] * D + jj[None, :], mask=m_tj, other=0.0)
            lam_j = tl.load(lam_ptr + i_h * D + jj, mask=m_j, other=0.0).to(tl.float32)
            AX = eG[:, None] * mm(X, H_hi, H_lo, OP, SOFT, False)
            AX += mm(SX, Kj_hi, Kj_lo, OP, SOFT, KG_EXACT) + Xj * lam_j[None, :]
            if ADJOINT:
                Gj = tl.load(Gs_ptr + g_base + o_v[:, None] * D + jj[None, :], mask=m_v[:, None] & m_j[None, :],
                             other=0.0).to(tl.float32)  # G_c[:, j-block]
                G_hi, G_lo = split(Gj, OP, SOFT)
                Qj = eG[:, None] * mm(E, G_hi, G_lo, OP, SOFT, False)
                Qj += mm(SE, Kj_hi, Kj_lo, OP, SOFT, KG_EXACT)
            else:
                Qj = tl.load(qg_ptr + row[:, None] * D + jj[None, :], mask=m_tj, other=0.0).to(tl.float32)
            Rj = (Qj - AX) * inv[:, None]
            Qj = Qj * inv[:, None]
            rr += tl.sum(Rj * Rj, axis=1)
            qq += tl.sum(Qj * Qj, axis=1)
        qq = tl.where(qq > 0, qq, 1.0)
        rho = tl.sqrt(rr / qq)
        nu = tl.sqrt(xx / qq)
        trHc = tl.sum(tl.load(Hs_ptr + s_base + o_d * (D + 1), mask=m_d, other=0.0).to(tl.float32), axis=0)
        trH = eG * trHc + tl.sum(M * kk[None, :], axis=1)
        lmax = trH + lam_max
        E_t = (rho + gamma_c * (1.0 + lmax * nu) + eps_S * trH * nu) / lam_min
        bound = tl.where(o_ok, E_t / tl.maximum(nu - E_t, 1.0 / lmax), float("inf"))
        base = row * 3
        tl.store(cert_ptr + base, rho, mask=m_t)
        tl.store(cert_ptr + base + 1, lmax / lam_min, mask=m_t)
        tl.store(cert_ptr + base + 2, bound, mask=m_t)

    @triton.heuristics({
        "ADJOINT": lambda a: a["e_ptr"] is not None,
        "HAS_CLASS": lambda a: a["cls_ptr"] is not None,
    })
    @triton.jit
    def _certify_kernel(
        qg_ptr,  # forward: [B*T, H, D] the caller's q
        e_ptr, scale_ptr,  # optional (sets ADJOINT): [B*T, H, Dv] upstream gradient, read times scale_ptr[0]
        kg_ptr, vg_ptr,  # [B*T, H, D], [B*T, H, Dv] the caller's k and v
        g_ptr, beta_ptr, lam_ptr,  # [B*T, H] float32, [B*T, H] float32, [H, D] float32
        Hs_ptr, Gs_ptr,  # the certificate's states [B, H, N, D, D], [B, H, N, Dv, D] (fp32)
        x_ptr,  # [B*T, H, D] float32 solution
        o_ptr,  # forward: [B*T, H, Dv] float32 output (a row that is not finite fails)
        cls_ptr,  # optional (sets HAS_CLASS): [B*H*N] int8 tier of each chunk (auto policy)
        cert_ptr,  # [B*T, H, 3] float32 output: rho, kappa, bound
        T, N, gamma_c, eps_S,
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_J: tl.constexpr,
        OP: tl.constexpr, MY_CLASS: tl.constexpr, KG_EXACT: tl.constexpr, SOFT: tl.constexpr,
        ADJOINT: tl.constexpr, HAS_CLASS: tl.constexpr,
    ):
        """:func:`certify_chunk` for the chunk of this program (rows scaled by the power of two of q, or
        for the adjoint of e)."""
        i_c, i_bh, i_h, o_c, o_d, o_v, m_d, m_v, m_t, row = _chunk_tile(T, H, D, Dv, C, BLOCK_C, BLOCK_D, BLOCK_DV)
        if HAS_CLASS:
            if tl.load(cls_ptr + i_bh.to(tl.int64) * N + i_c) != MY_CLASS:
                return
        gam, seg, beta = _gates(g_ptr, beta_ptr, row, m_t)
        eG = start_decay(gam, seg)
        M = pair_decay(gam, seg, o_c[:, None] >= o_c[None, :]) * beta[None, :]
        X = tl.load(x_ptr + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        m_tv = m_t[:, None] & m_v[None, :]
        if ADJOINT:
            E = tl.load(e_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            q_scale = _pow2_row_scale(E * tl.load(scale_ptr))
            o_ok = m_t | True
        else:
            q_scale = _pow2_row_scale(tl.load(qg_ptr + row[:, None] * D + o_d[None, :],
                                              mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32))
            O = tl.load(o_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0)
            o_ok = tl.sum((~(tl.abs(O) < float("inf"))).to(tl.int32), axis=1) == 0
        s_base = (i_bh.to(tl.int64) * N + i_c) * D * D
        g_base = (i_bh.to(tl.int64) * N + i_c) * Dv * D
        certify_chunk(X, q_scale, o_ok, qg_ptr, e_ptr, scale_ptr, kg_ptr, vg_ptr, Hs_ptr, Gs_ptr, x_ptr, cert_ptr,
                      row, m_t, m_d, m_v, o_d, o_v, s_base, g_base, eG, M, lam_ptr, i_h, gamma_c, eps_S, D, Dv,
                      BLOCK_C, BLOCK_J, OP, KG_EXACT, SOFT, ADJOINT)
