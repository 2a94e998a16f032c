"""Triton kernels of the backward contractions (the formulas of :func:`solvers.implicit.chunked_gradients`).

Given the forward solution x, the adjoint y and the upstream gradient e (all ``[B,T,H,.]``, fp32):

1. :func:`reverse_states` scans the chunks from last to first and returns the adjoint states at
   every chunk end,

       DG_c = sum_{t after chunk c} zeta_{t,end_c} e_t x_t^T,   DH_c = -sum_{t after chunk c} zeta_{t,end_c} y_t x_t^T,

   with the recursion ``S_{c-1} = exp(Gam_C) S_c + L^T diag(exp(Gam)) X`` (L = E or -Y over chunk c),
   started from the final-state gradients, plus the states before the first token (dH_0, dG_0).
2. :func:`chunk_contractions` forms, per chunk, with ``Mz_ts = exp(Gam_t - Gam_s)`` (t >= s),
   ``M = Mz beta_s``, ``w_s = beta_s exp(Gam_C - Gam_s)``:

       dv = (M * X K^T)^T E + w (K DG^T)
       dk = (M * E V^T)^T X - (M * X K^T)^T Y - (M * Y K^T)^T X + w (V DG + K (DH + DH^T))
       dbeta_s = sum_t Mz (x_t.k_s)(e_t.v_s - y_t.k_s) + exp(Gam_C - Gam_s)(v_s^T DG k_s + k_s^T DH k_s)

Everything here is float32 with IEEE products (the gradients' precision is bounded by the solves).
These kernels are checked against the PyTorch contractions in the interpreter; the Triton backend's
backward still uses the PyTorch contractions (validated on the GPU) until these are measured there.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

from .chunk_state import MIN_DOT_BLOCK

if triton is not None:
    from .chunk_cg import _chunk_tile, _cum_log_decay, _gates

    @triton.jit
    def _reverse_state_kernel(
        l_ptr,  # [B*T, H, DL] left factor (e for DG, y for DH), float32
        x_ptr,  # [B*T, H, D] forward solution, float32
        g_ptr,  # [B*T, H] log forget gate
        s_ptr,  # [B, H, N, DL, D] adjoint state at the end of each chunk (output, float32)
        s0_ptr,  # [B, H, DL, D] adjoint state before the first token (output)
        sT_ptr,  # [B, H, DL, D] final-state gradient (read when HAS_FINAL)
        T, N, SIGN,  # tokens per sequence, chunks, +1 (DG) or -1 (DH)
        H: tl.constexpr, DL: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_FINAL: tl.constexpr,
    ):
        i_bh = tl.program_id(0)
        i_b = i_bh // H
        i_h = i_bh % H
        o_c = tl.arange(0, BLOCK_C)
        o_l = tl.arange(0, BLOCK_L)
        o_d = tl.arange(0, BLOCK_D)
        m_l = o_l < DL
        m_d = o_d < D
        m_s = m_l[:, None] & m_d[None, :]
        o_s = o_l[:, None] * D + o_d[None, :]
        bh64 = i_bh.to(tl.int64)
        if HAS_FINAL:
            acc = tl.load(sT_ptr + bh64 * DL * D + o_s, mask=m_s, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        i_c = N - 1
        while i_c >= 0:  # a while loop: the interpreter cannot range() over a runtime bound
            tl.store(s_ptr + (bh64 * N + i_c) * DL * D + o_s, acc, mask=m_s)
            t = i_c * C + o_c
            m_t = (o_c < C) & (t < T)
            row = (i_b.to(tl.int64) * T + t) * H + i_h
            gam = _cum_log_decay(g_ptr, row, m_t)
            # Gam_C: the cumsum is non-increasing and masked tokens add exact zeros (as in chunk_state)
            gam_C = tl.min(gam, axis=0)
            L = tl.load(l_ptr + row[:, None] * DL + o_l[None, :], mask=m_t[:, None] & m_l[None, :], other=0.0)
            X = tl.load(x_ptr + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
            Lw = L.to(tl.float32) * (SIGN * tl.exp(gam))[:, None]
            acc = tl.exp(gam_C) * acc + tl.dot(tl.trans(Lw), X.to(tl.float32), input_precision="ieee")
            i_c -= 1
        tl.store(s0_ptr + bh64 * DL * D + o_s, acc, mask=m_s)

    @triton.jit
    def _contract_kernel(
        k_ptr, v_ptr, x_ptr, y_ptr, e_ptr,  # [B*T, H, D|Dv] float32
        g_ptr, beta_ptr,  # [B*T, H]
        DG_ptr, DH_ptr,  # [B, H, N, Dv, D], [B, H, N, D, D] adjoint states at chunk ends
        dk_ptr, dv_ptr, dbeta_ptr,  # outputs [B*T, H, D], [B*T, H, Dv], [B*T, H]
        Hc_ptr, Gc_ptr, a_ptr,  # forward states before each chunk; output a [B*T, H]
        T, N,
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WITH_A: tl.constexpr,
    ):
        i_c, i_bh, i_h, o_c, o_d, o_v, m_d, m_v, m_t, row = _chunk_tile(T, H, D, Dv, C, BLOCK_C, BLOCK_D, BLOCK_DV)
        m_td = m_t[:, None] & m_d[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        gam, beta = _gates(g_ptr, beta_ptr, row, m_t)
        gam_C = tl.min(gam, axis=0)
        causal = o_c[:, None] >= o_c[None, :]
        Mz = tl.where(causal, tl.exp(tl.where(causal, gam[:, None] - gam[None, :], 0.0)), 0.0)  # [t, s]
        M = Mz * beta[None, :]
        ez = tl.exp(gam_C - gam)  # exp(Gam_C - Gam_s)
        w = beta * ez

        K = tl.load(k_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        X = tl.load(x_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        Y = tl.load(y_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        V = tl.load(v_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        E = tl.load(e_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        base = i_bh.to(tl.int64) * N + i_c
        DG = tl.load(DG_ptr + base * Dv * D + o_v[:, None] * D + o_d[None, :], mask=m_v[:, None] & m_d[None, :],
                     other=0.0)  # [Dv, D]
        DH = tl.load(DH_ptr + base * D * D + o_d[:, None] * D + o_d[None, :], mask=m_d[:, None] & m_d[None, :],
                     other=0.0)  # [D, D]

        XK = tl.dot(X, tl.trans(K), input_precision="ieee")  # [t, s] = x_t . k_s
        EV = tl.dot(E, tl.trans(V), input_precision="ieee")
        YK = tl.dot(Y, tl.trans(K), input_precision="ieee")
        DGk = tl.dot(K, tl.trans(DG), input_precision="ieee")  # rows (DG k_s)^T, [C, Dv]
        DHk = tl.dot(K, tl.trans(DH), input_precision="ieee")  # rows (DH k_s)^T
        DHtk = tl.dot(K, DH, input_precision="ieee")  # rows (DH^T k_s)^T

        dv = tl.dot(tl.trans(M * XK), E, input_precision="ieee") + w[:, None] * DGk
        dk = (tl.dot(tl.trans(M * EV), X, input_precision="ieee") - tl.dot(tl.trans(M * XK), Y, input_precision="ieee")
              - tl.dot(tl.trans(M * YK), X, input_precision="ieee")
              + w[:, None] * (tl.dot(V, DG, input_precision="ieee") + DHk + DHtk))
        dbeta = tl.sum(Mz * XK * (EV - YK), axis=0) + ez * (tl.sum(V * DGk, axis=1) + tl.sum(K * DHk, axis=1))

        if WITH_A:
            # a_t = e_t.o_t - y_t.(H_t x_t) - beta_t dbeta_t (the log-decay term), with the forward
            # operators: H_t x_t = exp(Gam_t) H_c x_t + ((X K^T) * M) K, o_t = exp(Gam_t) G_c x_t + ((X K^T) * M) V
            eG = tl.exp(gam)
            Hc = tl.load(Hc_ptr + base * D * D + o_d[:, None] * D + o_d[None, :], mask=m_d[:, None] & m_d[None, :],
                         other=0.0).to(tl.float32)
            GcT = tl.load(Gc_ptr + base * Dv * D + o_v[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_v[None, :],
                          other=0.0).to(tl.float32)
            XKM = XK * M
            Hx = eG[:, None] * tl.dot(X, tl.trans(Hc), input_precision="ieee") + tl.dot(XKM, K, input_precision="ieee")
            O = eG[:, None] * tl.dot(X, GcT, input_precision="ieee") + tl.dot(XKM, V, input_precision="ieee")
            a = tl.sum(E * O, axis=1) - tl.sum(Y * Hx, axis=1) - beta * dbeta
            tl.store(a_ptr + row, a, mask=m_t)
        tl.store(dk_ptr + row[:, None] * D + o_d[None, :], dk, mask=m_td)
        tl.store(dv_ptr + row[:, None] * Dv + o_v[None, :], dv, mask=m_tv)
        tl.store(dbeta_ptr + row, dbeta, mask=m_t)


def _geometry(x: torch.Tensor, Dv: int, chunk_size: int):
    """``(B, T, H, D, C, N, BLOCK_C, BLOCK_D, BLOCK_DV)`` of a backward call (x: ``[B,T,H,D]``)."""
    if triton is None:
        raise ImportError("kernels.chunk_bwd needs triton (pip install triton); it is not installed")
    B, T, H, D = x.shape
    C = min(chunk_size, T)
    p2 = triton.next_power_of_2
    return (B, T, H, D, C, triton.cdiv(T, C), max(MIN_DOT_BLOCK, p2(C)), max(MIN_DOT_BLOCK, p2(D)),
            max(MIN_DOT_BLOCK, p2(Dv)))


def reverse_states(e, y, x, g, *, chunk_size: int, dH_T=None, dG_T=None):
    """``(DG [B,H,N,Dv,D], DH [B,H,N,D,D], dG_0, dH_0)`` (float32): adjoint states at chunk ends."""
    Dv = e.shape[3]
    B, T, H, D, C, N, BLOCK_C, BLOCK_D, BLOCK_DV = _geometry(x, Dv, chunk_size)
    dev = x.device
    out = []
    for L, DL, BL, final, sign in ((e, Dv, BLOCK_DV, dG_T, 1.0), (y, D, BLOCK_D, dH_T, -1.0)):
        s = torch.empty(B, H, N, DL, D, dtype=torch.float32, device=dev)
        s0 = torch.empty(B, H, DL, D, dtype=torch.float32, device=dev)
        fin = final.to(torch.float32).contiguous() if final is not None else s0
        _reverse_state_kernel[(B * H,)](
            L.to(torch.float32).contiguous(), x.to(torch.float32).contiguous(), g.to(torch.float32).contiguous(),
            s, s0, fin, T, N, sign, H=H, DL=DL, D=D, C=C, BLOCK_C=BLOCK_C, BLOCK_L=BL, BLOCK_D=BLOCK_D,
            HAS_FINAL=final is not None)
        out.append((s, s0))
    (DG, dG0), (DH, dH0) = out
    return DG, DH, dG0, dH0


def chunk_contractions(k, v, x, y, e, g, beta, DG, DH, *, chunk_size: int, states=None):
    """``(dk [B,T,H,D], dv [B,T,H,Dv], dbeta [B,T,H], a [B,T,H] or None)`` in float32.

    With the forward's chunk states ``states = (Hc, Gc)`` it also returns the per-token log-decay
    term ``a_t = e_t.o_t - y_t.(H_t x_t) - beta_t dbeta_t`` (``dg`` is its reverse cumulative sum)."""
    Dv = v.shape[3]
    B, T, H, D, C, N, BLOCK_C, BLOCK_D, BLOCK_DV = _geometry(x, Dv, chunk_size)
    f32 = [t.to(torch.float32).contiguous() for t in (k, v, x, y, e, g, beta)]
    dk = torch.empty(B, T, H, D, dtype=torch.float32, device=x.device)
    dv = torch.empty(B, T, H, Dv, dtype=torch.float32, device=x.device)
    dbeta = torch.empty(B, T, H, dtype=torch.float32, device=x.device)
    with_a = states is not None
    a = torch.empty(B, T, H, dtype=torch.float32, device=x.device) if with_a else dbeta
    Hc, Gc = (s.contiguous() for s in states) if with_a else (DH, DG)
    _contract_kernel[(N, B * H)](*f32, DG.contiguous(), DH.contiguous(), dk, dv, dbeta, Hc, Gc, a, T, N,
                                 H=H, D=D, Dv=Dv, C=C, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                 WITH_A=with_a, num_warps=4 if D <= 64 else 8)
    return dk, dv, dbeta, (a if with_a else None)

