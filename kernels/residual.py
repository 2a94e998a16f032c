"""Triton kernel: the accuracy certificate of a solve (tier 1 of :mod:`solvers.certificate`).

One program per (chunk c, batch entry b, head h) reads the solution X of the chunk's C systems
(written by :mod:`kernels.chunk_cg`), the start state H_c, the keys and gates, and forms per token

    R = Q - A(X),  A(X) = diag(zeta) X H_c + ((X K^T) * M) K + X diag(lam)
    rho_t = ||r_t|| / ||q_t||,   nu_t = ||x_t|| / ||q_t||,
    tr H_t = zeta_t tr H_c + sum_j M_tj ||k_j||^2,   kappa_t = (tr H_t + max lam) / min lam,
    bound_t = E_t / max(nu_t - E_t, 1 / lmax_t),
    E_t = (rho_t + gamma_c (1 + lmax_t nu_t) + eps_S tr H_t nu_t) / min lam,  lmax_t = tr H_t + max lam

(the formulas of :mod:`solvers.certificate`; ``gamma_c`` and ``eps_S`` come from the host). It checks
the caller's system: q, k and v as the caller gave them (any float dtype, read as fp32), not the
policy's rounding of them, so the input rounding is measured in rho (a tiny q rounded into fp16's
subnormals loses far more than 2^-11).
The right-hand side Q is q, or for the adjoint ``G_t^T e_t = diag(zeta) E G_c + ((E V^T) * M) K``,
recomputed here. The residual is formed ``BLOCK_J`` columns at a time (a
``[D, BLOCK_J]`` slice of H_c on chip, never the whole ``D x D`` state with its split parts), and
only its row norms are kept. Products are in precision ``OP`` (the codes of :mod:`kernels.chunk_cg`:
``bf16x3`` for solves made with bf16 / fp16 / bf16x3 products, IEEE ``fp32`` for fp32 / tf32
products), accumulated in fp32; rows are divided by a power of two first (exact), so that squares
neither overflow nor underflow.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:
    from .chunk_cg import _chunk_tile, _gates, _mm, _pow2_row_scale, _split
    from .gates import pair_decay, start_decay

    @triton.heuristics({
        "ADJOINT": lambda a: a["e_ptr"] is not None,
        "HAS_CLASS": lambda a: a["cls_ptr"] is not None,
    })
    @triton.jit
    def _residual_kernel(
        q_ptr,  # [B*T, H, D] right-hand side q (forward)
        e_ptr,  # optional (sets ADJOINT): [B*T, H, Dv] upstream gradient, read times scale_ptr[0]
        k_ptr, v_ptr,  # [B*T, H, D], [B*T, H, Dv]
        g_ptr, beta_ptr, lam_ptr,  # [B*T, H] float32, [B*T, H] float32, [H, D] float32
        Hc_ptr, Gc_ptr,  # [B, H, N, D, D], [B, H, N, Dv, D] state before each chunk (state dtype)
        x_ptr,  # [B*T, H, D] float32 solution
        scale_ptr,  # ADJOINT: [1/s, s] float32
        cls_ptr,  # optional (sets HAS_CLASS): [B*H*N] int8 tier of each chunk (auto policy)
        out_ptr,  # [B*T, H, 3] float32: rho, kappa, bound
        T, N, gamma_c, eps_S,
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_J: tl.constexpr,
        OP: tl.constexpr, MY_CLASS: tl.constexpr, K_EXACT: tl.constexpr, SOFT: tl.constexpr,
        ADJOINT: tl.constexpr, HAS_CLASS: tl.constexpr,
    ):
        i_c, i_bh, i_h, o_c, o_d, o_v, m_d, m_v, m_t, row = _chunk_tile(T, H, D, Dv, C, BLOCK_C, BLOCK_D, BLOCK_DV)
        if HAS_CLASS:
            if tl.load(cls_ptr + i_bh.to(tl.int64) * N + i_c) != MY_CLASS:
                return
        m_td = m_t[:, None] & m_d[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        gam, seg, beta = _gates(g_ptr, beta_ptr, row, m_t)
        eG = start_decay(gam, seg)
        M = pair_decay(gam, seg, o_c[:, None] >= o_c[None, :]) * beta[None, :]
        lam = tl.load(lam_ptr + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        lam_min = tl.min(tl.where(m_d, lam, float("inf")), axis=0)
        lam_max = tl.max(tl.where(m_d, lam, 0.0), axis=0)

        K = tl.load(k_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        X = tl.load(x_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        Kt_hi, Kt_lo = _split(tl.trans(K), OP, SOFT)
        SX = _mm(X, Kt_hi, Kt_lo, OP, SOFT, K_EXACT) * M  # (X K^T) * M, [C, C]
        s_base = (i_bh.to(tl.int64) * N + i_c) * D * D
        g_base = (i_bh.to(tl.int64) * N + i_c) * Dv * D
        if ADJOINT:
            E = tl.load(e_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            E = E * tl.load(scale_ptr)
            Vt = tl.load(v_ptr + row[None, :] * Dv + o_v[:, None], mask=m_v[:, None] & m_t[None, :],
                         other=0.0).to(tl.float32)
            Vt_hi, Vt_lo = _split(Vt, OP, SOFT)
            SE = _mm(E, Vt_hi, Vt_lo, OP, SOFT, K_EXACT) * M  # (E V^T) * M, [C, C]
            # rows scaled by a power of two of max |e_t| (exact): b_t = G_t^T e_t is linear in e_t
            r_scale = _pow2_row_scale(E)
        else:
            r_scale = _pow2_row_scale(tl.load(q_ptr + row[:, None] * D + o_d[None, :], mask=m_td,
                                              other=0.0).to(tl.float32))
        inv = 1.0 / r_scale
        rr = tl.zeros([BLOCK_C], dtype=tl.float32)
        qq = tl.zeros([BLOCK_C], dtype=tl.float32)
        xx = tl.sum(X * X * (inv * inv)[:, None], axis=1)
        kk = tl.sum(K * K, axis=1)
        o_j = tl.arange(0, BLOCK_J)
        for j0 in range(0, D, BLOCK_J):
            jj = j0 + o_j
            m_j = jj < D
            m_tj = m_t[:, None] & m_j[None, :]
            Hj = tl.load(Hc_ptr + s_base + o_d[:, None] * D + jj[None, :], mask=m_d[:, None] & m_j[None, :],
                         other=0.0).to(tl.float32)  # H_c[:, j-block]
            H_hi, H_lo = _split(Hj, OP, SOFT)
            Kj = tl.load(k_ptr + row[:, None] * D + jj[None, :], mask=m_tj, other=0.0).to(tl.float32)
            Kj_hi, Kj_lo = _split(Kj, OP, SOFT)
            Xj = tl.load(x_ptr + row[:, None] * D + jj[None, :], mask=m_tj, other=0.0)
            lam_j = tl.load(lam_ptr + i_h * D + jj, mask=m_j, other=0.0).to(tl.float32)
            AX = eG[:, None] * _mm(X, H_hi, H_lo, OP, SOFT, False)
            AX += _mm(SX, Kj_hi, Kj_lo, OP, SOFT, K_EXACT) + Xj * lam_j[None, :]
            if ADJOINT:
                Gj = tl.load(Gc_ptr + g_base + o_v[:, None] * D + jj[None, :], mask=m_v[:, None] & m_j[None, :],
                             other=0.0).to(tl.float32)  # G_c[:, j-block]
                G_hi, G_lo = _split(Gj, OP, SOFT)
                Qj = eG[:, None] * _mm(E, G_hi, G_lo, OP, SOFT, False)
                Qj += _mm(SE, Kj_hi, Kj_lo, OP, SOFT, K_EXACT)
            else:
                Qj = tl.load(q_ptr + row[:, None] * D + jj[None, :], mask=m_tj, other=0.0).to(tl.float32)
            Rj = (Qj - AX) * inv[:, None]
            Qj = Qj * inv[:, None]
            rr += tl.sum(Rj * Rj, axis=1)
            qq += tl.sum(Qj * Qj, axis=1)
        qq = tl.where(qq > 0, qq, 1.0)
        rho = tl.sqrt(rr / qq)
        nu = tl.sqrt(xx / qq)
        trHc = tl.sum(tl.load(Hc_ptr + s_base + o_d * (D + 1), mask=m_d, other=0.0).to(tl.float32), axis=0)
        trH = eG * trHc + tl.sum(M * kk[None, :], axis=1)
        lmax = trH + lam_max
        E_t = (rho + gamma_c * (1.0 + lmax * nu) + eps_S * trH * nu) / lam_min
        bound = E_t / tl.maximum(nu - E_t, 1.0 / lmax)
        base = row * 3
        tl.store(out_ptr + base, rho, mask=m_t)
        tl.store(out_ptr + base + 1, lmax / lam_min, mask=m_t)
        tl.store(out_ptr + base + 2, bound, mask=m_t)
