"""Triton kernel: fused per-chunk conjugate gradient for all tokens of a chunk, and the output.

One program per (chunk c, batch entry b, head h). It loads the chunk's start state ``H_c`` (from
:func:`kernels.chunk_state.chunk_states`), its keys K, queries Q, gates, and keeps them on chip
while it runs preconditioned CG (docs/design.md section 3) for the C systems of the chunk together:

    A(P) = diag(exp(Gam)) P H_c + ((P K^T) * M) K + P diag(lam),
    M_ij = exp(Gam_i - Gam_j) beta_j   for i >= j, else 0 (selected away before exp),

    r_0 = q - A x_0,  z = M_J^{-1} r,  p_0 = z_0;   alpha = (r.z) / (p.Ap),  x += alpha p,
    r -= alpha Ap;   p = z + ((r.z)_new / (r.z)) p

on each token's right-hand side divided by a power of two (its largest entry in [1, 2), undone on
x: exact), with the Jacobi preconditioner ``M_J = diag(H_t + Lambda) = exp(Gam_i) diag(H_c) +
M (K*K) + lam`` when ``PRECOND``. Each token leaves the iteration (is frozen with ``where``) when
its relative residual ``||r_k|| <= tol ||r_0||`` (if a tolerance is set), when its residual
reaches the floor ``2^-48 ||r_0||`` (exactly zero included: see :data:`RESIDUAL_FLOOR`), or on
breakdown (``p.Ap <= 0`` or NaN, flagged, never divided through); the loop ends **early** as soon
as no token of the chunk is active, and at ``STEPS`` at the latest. Then

    O = diag(exp(Gam)) X G_c^T + ((X K^T) * M) V

is formed in the same program. Per-token step counts and final relative residuals are written.

Precision (the policy of :mod:`solvers.precision`, natively): cumulative log-gates, M, the vectors
x, r, p and all scalars are float32; the three products of A(P) round their operands to an operand
precision of :mod:`kernels.operands` (``fp32``, ``tf32``, ``bf16``, ``fp16`` or ``bf16x3``),
accumulating in float32. The stored states ``H_c``, ``G_c`` arrive in the policy's state dtype. The
products with the states and those with the chunk's keys may differ in precision (``OP_H``,
``OP_K``: the ``auto`` policy's fp32 tier multiplies the state in IEEE fp32 and the keys in
bf16x3); with ``HAS_CLASS`` a launch solves only the chunks of one precision tier
(:mod:`kernels.chunk_tier`). The accuracy certificate of the result is :mod:`kernels.residual`.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# A row also leaves CG once ||r_k|| <= 2^-48 ||r_0||: the square of fp32's unit roundoff (the
# vectors' accumulation precision), far below any attainable accuracy, so x cannot improve any
# more; iterating on would only work on r.z ~ 2^-96 ||r_0||^2, which reaches fp32's subnormal range
# and whose garbage ratios can blow a converged row up (seen at 100 steps in fp32). The same floor
# as solvers.cg.residual_floor(fp32).
RESIDUAL_FLOOR = 2.0**-48

if triton is not None:
    from .chunk_tile import _chunk_tile, _gates, _pow2_row_scale
    from .gates import pair_decay, start_decay
    from .operands import mm, split

    # jit functions may only read globals that are constexpr
    _FLOOR = tl.constexpr(RESIDUAL_FLOOR)

    @triton.jit
    def _matvec(p, H_hi, H_lo, K_hi, K_lo, Kt_hi, Kt_lo, M, eG, lam, OP_H: tl.constexpr, OP_K: tl.constexpr,
                SOFT: tl.constexpr, K_EXACT: tl.constexpr):
        """A(P) = diag(exp(Gam)) P H_c + ((P K^T) * M) K + P diag(lam) for a [BLOCK_C, BLOCK_D] tile.

        ``OP_H``: the precision of the product with the state (it carries the large norm ||H_c||),
        ``OP_K``: of the two products with the chunk's own keys. The sum is grouped as
        ``inter + (intra + P lam)``: a bare dot added to a tile is folded by Triton into a dot that
        accumulates into that tile, which must not be the large inter-chunk term (its rounding would
        then be paid once per key instead of once)."""
        inter = eG[:, None] * mm(p, H_hi, H_lo, OP_H, SOFT, False)
        s = mm(p, Kt_hi, Kt_lo, OP_K, SOFT, K_EXACT) * M
        intra = mm(s, K_hi, K_lo, OP_K, SOFT, K_EXACT)
        return inter + (intra + p * lam[None, :])

    @triton.jit
    def _cg_init(r, diag, valid, tol, PRECOND: tl.constexpr, HAS_TOL: tl.constexpr):
        """CG start for the rows of a tile: ``z = M_J^{-1} r``, ``p = z``; returns (p, r.z, ||r_0||, active)."""
        if PRECOND:
            z = r / diag
        else:
            z = r
        rz = tl.sum(r * z, axis=1)
        r0 = tl.sqrt(tl.sum(r * r, axis=1))
        active = valid & (r0 > 0)
        if HAS_TOL:
            active = active & (r0 > tol * r0)
        return z, rz, r0, active

    @triton.jit
    def _cg_step(Ap, x, r, p, rz, rn, r0, active, count, broke, diag, tol, PRECOND: tl.constexpr,
                 HAS_TOL: tl.constexpr):
        """One CG update of every active row given ``A p``; frozen rows keep their values.

        Breakdown (``p.Ap <= 0`` or NaN) takes a row out and is recorded in ``broke``; a non-finite
        ``p.Ap`` (an overflowed state or product, NaN input) also sets the row's x to NaN, so that the
        output is NaN rather than a finite stale iterate. A residual at the floor
        (``||r|| <= 2^-48 ||r_0||``, :data:`RESIDUAL_FLOOR`; exactly zero included) takes a row out,
        and with a tolerance so does ``||r|| <= tol ||r_0||``. Returns
        (x, r, p, r.z, ||r||, active, count, broke)."""
        pAp = tl.sum(p * Ap, axis=1)
        ok = pAp > 0
        broke = broke | (active & ~ok)
        overflow = active & ~(tl.abs(pAp) < float("inf"))  # inf or NaN
        x = tl.where(overflow[:, None], float("nan"), x)
        active = active & ok & ~overflow
        alpha = tl.where(active, rz / tl.where(active, pAp, 1.0), 0.0)
        x = tl.where(active[:, None], x + alpha[:, None] * p, x)
        r = tl.where(active[:, None], r - alpha[:, None] * Ap, r)
        count += active.to(tl.int32)
        rn = tl.where(active, tl.sqrt(tl.sum(r * r, axis=1)), rn)
        still = active & (rn > 0) & (rn > _FLOOR * r0)
        if HAS_TOL:
            still = still & (rn > tol * r0)
        if PRECOND:
            z = r / diag
        else:
            z = r
        rz_new = tl.sum(r * z, axis=1)
        b = tl.where(still, rz_new / tl.where(still, rz, 1.0), 0.0)
        p = tl.where(still[:, None], z + b[:, None] * p, p)
        rz = tl.where(still, rz_new, rz)
        return x, r, p, rz, rn, still, count, broke

    @triton.heuristics({
        "ADJOINT": lambda a: a["xf_ptr"] is not None,
        "HAS_CLASS": lambda a: a["cls_ptr"] is not None,
    })
    @triton.jit
    def _chunk_cg_kernel(
        q_ptr, k_ptr, v_ptr,  # [B*T, H, D] (e [B*T, H, Dv] with ADJOINT), [B*T, H, D], [B*T, H, Dv] contiguous
        g_ptr, beta_ptr,  # [B*T, H] float32
        lam_ptr,  # [H, D] float32
        Hc_ptr, Gc_ptr,  # [B, H, N, D, D], [B, H, N, Dv, D] state before each chunk (state dtype)
        o_ptr,  # forward: [B*T, H, Dv] output (float32); ADJOINT: [B*T, H] a0 (float32)
        x_ptr,  # [B*T, H, D] q-star, or y with ADJOINT (float32): kept for the backward
        steps_ptr, res_ptr,  # [B*T, H] int32 step counts, float32 final relative (recursive) residuals
        xf_ptr,  # optional (sets ADJOINT): the forward's q-star [B*T, H, D], read
        scale_ptr,  # ADJOINT only: [1/s, s] float32, e is read as e / s (see kernels.mesa._upstream_scale)
        cls_ptr,  # optional (sets HAS_CLASS): [B*H*N] int8 precision class of every chunk (the auto policy)
        brk_ptr,  # [B*T, H] int8: 1 where CG stopped on a breakdown (p.Ap <= 0 or not finite)
        T, N, tol, steps,  # tokens per sequence, chunks, relative tolerance (<= 0: none), step cap
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        OP_H: tl.constexpr,  # operand precision (OP_CODES) of the products with the states H_c, G_c
        OP_K: tl.constexpr,  # operand precision of the products with the chunk's keys and values
        MY_CLASS: tl.constexpr,  # HAS_CLASS: the class of chunks this launch solves (others return at once)
        K_EXACT: tl.constexpr,  # k and v are bf16 tensors: exact bf16 operands (bf16x3 skips their lo part)
        X0_JACOBI: tl.constexpr, PRECOND: tl.constexpr, HAS_TOL: tl.constexpr,
        SOFT: tl.constexpr,  # interpreter: low-precision rounding and dots in software
        ADJOINT: tl.constexpr, HAS_CLASS: tl.constexpr,  # set by the heuristics
    ):
        i_c, i_bh, i_h, o_c, o_d, o_v, m_d, m_v, m_t, row = _chunk_tile(T, H, D, Dv, C, BLOCK_C, BLOCK_D, BLOCK_DV)
        if HAS_CLASS:
            if tl.load(cls_ptr + i_bh.to(tl.int64) * N + i_c) != MY_CLASS:
                return
        m_td = m_t[:, None] & m_d[None, :]

        # gates: masked tokens read g = 0, beta = 0 (they change nothing and get q = 0)
        gam, seg, beta = _gates(g_ptr, beta_ptr, row, m_t)
        eG = start_decay(gam, seg)
        causal = o_c[:, None] >= o_c[None, :]
        # M_ij = zeta_ij beta_j: the decay from token j to token i (zero across a reset), selected away above
        M = pair_decay(gam, seg, causal) * beta[None, :]
        # padded coordinates get lam = 1: their r, p, x stay exactly 0 and the Jacobi diagonal stays > 0
        lam = tl.load(lam_ptr + i_h * D + o_d, mask=m_d, other=1.0).to(tl.float32)

        K = tl.load(k_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        K_hi, K_lo = split(K, OP_K, SOFT)
        Kt_hi = tl.trans(K_hi)
        Kt_lo = tl.trans(K_lo)
        m_tv = m_t[:, None] & m_v[None, :]
        g_base = (i_bh.to(tl.int64) * N + i_c) * Dv * D
        if ADJOINT:
            # right-hand side of the adjoint: G_t^T e_t = diag(exp(Gam)) E G_c + ((E V^T) * M) K
            E = tl.load(q_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            E = E * tl.load(scale_ptr)  # e / s, a power of two: exact
            Vt = tl.load(v_ptr + row[None, :] * Dv + o_v[:, None], mask=m_v[:, None] & m_t[None, :],
                         other=0.0).to(tl.float32)  # [BLOCK_DV, BLOCK_C] = V^T
            Gc = tl.load(Gc_ptr + g_base + o_v[:, None] * D + o_d[None, :], mask=m_v[:, None] & m_d[None, :],
                         other=0.0).to(tl.float32)  # [BLOCK_DV, BLOCK_D]
            G_hi, G_lo = split(Gc, OP_H, SOFT)
            Vt_hi, Vt_lo = split(Vt, OP_K, SOFT)
            Q = eG[:, None] * mm(E, G_hi, G_lo, OP_H, SOFT, False)
            Q += mm(mm(E, Vt_hi, Vt_lo, OP_K, SOFT, K_EXACT) * M, K_hi, K_lo, OP_K, SOFT, K_EXACT)
        else:
            Q = tl.load(q_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        # per-token power-of-two scaling of the right-hand side (exact; undone on x below)
        q_scale = _pow2_row_scale(Q)
        Q = Q / q_scale[:, None]
        s_base = (i_bh.to(tl.int64) * N + i_c) * D * D
        m_dd = m_d[:, None] & m_d[None, :]
        Hc = tl.load(Hc_ptr + s_base + o_d[:, None] * D + o_d[None, :], mask=m_dd, other=0.0).to(tl.float32)
        H_hi, H_lo = split(Hc, OP_H, SOFT)

        diag = lam[None, :] + tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        if PRECOND or X0_JACOBI:
            dHc = tl.load(Hc_ptr + s_base + o_d * (D + 1), mask=m_d, other=0.0).to(tl.float32)
            diag = diag + eG[:, None] * dHc[None, :] + tl.dot(M, K * K, input_precision="ieee")

        if X0_JACOBI:
            x = Q / diag
            r = Q - _matvec(x, H_hi, H_lo, K_hi, K_lo, Kt_hi, Kt_lo, M, eG, lam, OP_H, OP_K, SOFT, K_EXACT)
        else:
            x = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
            r = Q
        p, rz, r0, active = _cg_init(r, diag, m_t, tol, PRECOND, HAS_TOL)
        rn = r0
        count = tl.zeros([BLOCK_C], dtype=tl.int32)
        broke = m_t & (o_c < 0)  # all False
        it = 0
        n_active = tl.sum(active.to(tl.int32), axis=0)
        # early exit: the chunk stops as soon as none of its tokens is active
        while (it < steps) & (n_active > 0):
            Ap = _matvec(p, H_hi, H_lo, K_hi, K_lo, Kt_hi, Kt_lo, M, eG, lam, OP_H, OP_K, SOFT, K_EXACT)
            x, r, p, rz, rn, active, count, broke = _cg_step(Ap, x, r, p, rz, rn, r0, active, count, broke, diag,
                                                             tol, PRECOND, HAS_TOL)
            n_active = tl.sum(active.to(tl.int32), axis=0)
            it += 1

        x = x * q_scale[:, None]
        tl.store(steps_ptr + row, count, mask=m_t)
        tl.store(brk_ptr + row, broke.to(tl.int8), mask=m_t)
        tl.store(res_ptr + row, tl.where(r0 > 0, rn / tl.where(r0 > 0, r0, 1.0), 0.0), mask=m_t)
        tl.store(x_ptr + row[:, None] * D + o_d[None, :], x, mask=m_td)

        if ADJOINT:
            # the log-decay term a0_t = e_t . o_t - y_t . (H_t x_t) of the backward (kernels.chunk_bwd) with
            # the forward's x, written without its cancellation: with the adjoint residual
            # r_y = G_t^T e_t - A_t y_t, e.o = (G^T e).x = (A y + r_y).x = y.(H x) + y.(lam x) + r_y.x, so
            # a0_t = y_t . (lam x_t) + r_y . x_t: no term of size ||H_t|| ||x|| ||y|| to cancel
            # (r is CG's recursive residual, in units of 1/q_scale)
            Xf = tl.load(xf_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
            tl.store(o_ptr + row, tl.sum((x * lam[None, :] + r * q_scale[:, None]) * Xf, axis=1), mask=m_t)
        else:
            _output(x, v_ptr, Gc_ptr, o_ptr, row, o_v, o_d, m_tv, m_d, m_v, g_base, eG, M, Kt_hi, Kt_lo, D, Dv,
                    OP_H, OP_K, SOFT, K_EXACT)

    @triton.jit
    def _output(x, v_ptr, Gc_ptr, o_ptr, row, o_v, o_d, m_tv, m_d, m_v, g_base, eG, M, Kt_hi, Kt_lo,
                D: tl.constexpr, Dv: tl.constexpr, OP_H: tl.constexpr, OP_K: tl.constexpr, SOFT: tl.constexpr,
                K_EXACT: tl.constexpr):
        """O = diag(exp(Gam)) X G_c^T + ((X K^T) * M) V, stored as float32."""
        V = tl.load(v_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        GcT = tl.load(Gc_ptr + g_base + o_v[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_v[None, :],
                      other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_DV] = G_c^T
        G_hi, G_lo = split(GcT, OP_H, SOFT)
        V_hi, V_lo = split(V, OP_K, SOFT)
        inter = eG[:, None] * mm(x, G_hi, G_lo, OP_H, SOFT, False)
        s = mm(x, Kt_hi, Kt_lo, OP_K, SOFT, K_EXACT) * M
        out = inter + mm(s, V_hi, V_lo, OP_K, SOFT, K_EXACT)
        tl.store(o_ptr + row[:, None] * Dv + o_v[None, :], out, mask=m_tv)
