"""Triton kernels of the backward contractions (the formulas of :func:`solvers.implicit.chunked_gradients`).

Given the forward solution x, the adjoint y and the upstream gradient e (all ``[B,T,H,.]``, fp32):

1. :func:`reverse_states` scans the chunks from last to first and returns the adjoint states at
   every chunk end,

       DG_c = sum_{t after chunk c} zeta_{t,end_c} e_t x_t^T,   DH_c = -sum_{t after chunk c} zeta_{t,end_c} y_t x_t^T,

   with the recursion ``S_{c-1} = exp(Gam_C) S_c + L^T diag(exp(Gam)) X`` (L = E or -Y over chunk c),
   started from the final-state gradients, plus the states before the first token (dH_0, dG_0).
   The rows of a state are independent, so each program scans one block of rows (``BLOCK_R``):
   B x H x ceil(D / BLOCK_R) programs instead of B x H.
2. :func:`chunk_contractions` forms, per chunk, with ``Mz_ts = exp(Gam_t - Gam_s)`` (t >= s),
   ``M = Mz beta_s``, ``w_s = beta_s exp(Gam_C - Gam_s)``:

       dv = (M * X K^T)^T E + w (K DG^T)
       dk = (M * (E V^T - Y K^T))^T X - (M * X K^T)^T Y + w (V DG + K (DH + DH^T))
       dbeta_s = sum_t Mz (x_t.k_s)(e_t.v_s - y_t.k_s) + exp(Gam_C - Gam_s)(v_s^T DG k_s + k_s^T DH k_s)
       a_t = a0_t - beta_t dbeta_t

   (``a0_t = e_t.o_t - y_t.(H_t x_t)`` comes from the adjoint CG kernel, :mod:`kernels.chunk_cg`,
   and ``dg`` is the reverse cumulative sum of a). The D x D states are read in blocks of rows
   (``BLOCK_J``) so that only a slice of them is on chip at a time: dv is formed and stored by column
   blocks (those of ``K DG^T``), ``V DG`` and ``K (DH + DH^T)`` are accumulated over row blocks.

Precision: gates, vectors and accumulators are float32; the products round their operands to the
policy's operand precision ``OP`` (the codes and the split-bf16 scheme of :mod:`kernels.operands`:
``fp32`` = IEEE products, ``bf16x3`` ~16 bits, ``tf32``, ``bf16``, ``fp16``), accumulating in fp32.
The kernels read e (and the final-state gradients) divided by a power of two s that brings the
largest entry into [1, 2) (``scale = [1/s, s]``, :func:`kernels.mesa._upstream_scale`) and store
the gradients times s: low-precision operands then neither underflow for tiny upstream gradients
nor overflow for large ones, and the gradients scale exactly with e, at no extra pass over memory.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

from .chunk_state import MIN_DOT_BLOCK, segment_layout, segment_scan

if triton is not None:
    from .chunk_state import decay_add
    from .chunk_tile import _chunk_tile, _gates
    from .gates import chunk_log_decay, end_decays, pair_decay, start_decay
    from .operands import dot, mm, operand, split

    @triton.jit
    def _mmp(a, b, OP: tl.constexpr, SOFT: tl.constexpr, B_EXACT: tl.constexpr, A_EXACT: tl.constexpr = False):
        """a @ b for fp32 tiles, operands rounded (or split) to precision OP, fp32 accumulation.

        bf16x3 (see :func:`kernels.operands.mm`): a factor that is exactly bf16 (A_EXACT, B_EXACT:
        bf16 keys and values) has no lo part, and its products with lo parts are skipped."""
        b_hi, b_lo = split(b, OP, SOFT)
        if OP == 4 and A_EXACT:
            a_hi = operand(a, 2, SOFT)
            c = dot(a_hi, b_hi, 2, SOFT)
            if not B_EXACT:
                c += dot(a_hi, b_lo, 2, SOFT)
        else:
            c = mm(a, b_hi, b_lo, OP, SOFT, B_EXACT)
        return c

    @triton.jit
    def _reverse_state_kernel(
        l_ptr,  # [B*T, H, DL] left factor (e for DG, y for DH), float32
        x_ptr,  # [B*T, H, D] forward solution, float32
        g_ptr,  # [B*T, H] log forget gate
        s_ptr,  # [B, H, N, DL, D] adjoint state at the end of each chunk (output, the policy's state dtype)
        s0_ptr,  # [B, H, DL, D] adjoint state before the first token (output; END_ALL: [B, H, S, DL, D] float32)
        sT_ptr,  # [B, H, DL, D] final-state gradient (HAS_FINAL), or [B, H, S, DL, D] state at each segment end
        dseg_ptr,  # [B, H, S] float32: each segment's decay (END_ALL)
        scale_ptr,  # [1/s, s] float32: the upstream scale (kernels.mesa._upstream_scale)
        T, N, S, M, SIGN,  # tokens per sequence, chunks, segments, chunks per segment, +1 (DG) or -1 (DH)
        H: tl.constexpr, DL: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_FINAL: tl.constexpr,  # sT_ptr holds the final-state gradient (read divided by s)
        SEGMENT_INIT: tl.constexpr,  # sT_ptr holds each segment's end state (the two-level scan's step 3)
        END_ALL: tl.constexpr,  # the local pass: store each segment's start state and decay, no chunk states
        SCALE_L: tl.constexpr,  # L is an upstream gradient (e): read as L / s (y already is)
        OP: tl.constexpr, SOFT: tl.constexpr,
    ):
        # the chunk states are kept in units of 1/s (the final-state gradient is read divided by s);
        # the state before the first token is stored times s: a true gradient
        inv_s = tl.load(scale_ptr)
        i_p = tl.program_id(0)  # (batch*head, segment)
        i_r = tl.program_id(1)  # block of state rows
        i_bh = i_p // S
        i_s = i_p % S
        i_b = i_bh // H
        i_h = i_bh % H
        o_c = tl.arange(0, BLOCK_C)
        o_l = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
        o_d = tl.arange(0, BLOCK_D)
        m_l = o_l < DL
        m_d = o_d < D
        m_s = m_l[:, None] & m_d[None, :]
        o_s = o_l[:, None] * D + o_d[None, :]
        bh64 = i_bh.to(tl.int64)
        p64 = i_p.to(tl.int64)
        if HAS_FINAL:
            hi = tl.load(sT_ptr + bh64 * DL * D + o_s, mask=m_s, other=0.0).to(tl.float32) * inv_s  # (S = 1)
        elif SEGMENT_INIT:
            hi = tl.load(sT_ptr + p64 * DL * D + o_s, mask=m_s, other=0.0)
        else:
            hi = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        lo = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # compensation of the running fp32 sum
        decay = tl.full([], 1.0, tl.float32)  # the segment's decay, the product of its chunks' exp(Gam_C)
        c0 = i_s * M
        i_c = tl.minimum(c0 + M, N) - 1
        while i_c >= c0:  # a while loop: the interpreter cannot range() over a runtime bound
            if not END_ALL:
                tl.store(s_ptr + (bh64 * N + i_c) * DL * D + o_s, (hi + lo).to(s_ptr.dtype.element_ty), mask=m_s)
            t = i_c * C + o_c
            m_t = (o_c < C) & (t < T)
            row = (i_b.to(tl.int64) * T + t) * H + i_h
            gam, seg = chunk_log_decay(g_ptr, row, m_t)
            _, d = end_decays(gam, seg)  # decay over the whole chunk (0 across a reset)
            # L^T as a [BLOCK_R, BLOCK_C] tile (rows of the state block), scaled by SIGN zeta_{t, chunk start}
            Lt = tl.load(l_ptr + row[None, :] * DL + o_l[:, None], mask=m_l[:, None] & m_t[None, :], other=0.0)
            Lt = Lt.to(tl.float32) * (SIGN * start_decay(gam, seg))[None, :]
            if SCALE_L:
                Lt = Lt * inv_s
            X = tl.load(x_ptr + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
            hi, lo = decay_add(hi, lo, d, _mmp(Lt, X.to(tl.float32), OP, SOFT, False), True)
            decay *= d
            i_c -= 1
        # the per-program conditions as block masks, as in kernels.chunk_state
        if END_ALL:
            tl.store(s0_ptr + p64 * DL * D + o_s, hi + lo, mask=m_s)
            o1 = tl.arange(0, 1)
            tl.store(dseg_ptr + p64 + o1, decay + tl.zeros([1], tl.float32), mask=(o1 * 0 + i_r) == 0)
        else:  # the first segment ends at the first token
            first = (tl.zeros([BLOCK_R, BLOCK_D], tl.int32) + i_s) == 0
            tl.store(s0_ptr + bh64 * DL * D + o_s, (hi + lo) * tl.load(scale_ptr + 1), mask=m_s & first)

    @triton.jit
    def _contract_kernel(
        k_ptr, v_ptr, x_ptr, y_ptr, e_ptr,  # [B*T, H, D|Dv] (k, v: input dtype; x, y, e: float32)
        g_ptr, beta_ptr, a0_ptr,  # [B*T, H] float32
        DG_ptr, DH_ptr,  # [B, H, N, Dv, D], [B, H, N, D, D] adjoint states at chunk ends (state dtype)
        dk_ptr, dv_ptr, dbeta_ptr, a_ptr,  # outputs [B*T, H, D], [B*T, H, Dv] (the gradients' dtype), [B*T, H] x 2
        scale_ptr,  # [1/s, s] float32: e and a0 are read in units of 1/s, the outputs stored times s
        T, N,
        H: tl.constexpr, D: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_J: tl.constexpr,
        OP: tl.constexpr, SOFT: tl.constexpr, K_EXACT: tl.constexpr,
    ):
        i_c, i_bh, i_h, o_c, o_d, o_v, m_d, m_v, m_t, row = _chunk_tile(T, H, D, Dv, C, BLOCK_C, BLOCK_D, BLOCK_DV)
        m_td = m_t[:, None] & m_d[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        gam, seg, beta = _gates(g_ptr, beta_ptr, row, m_t)
        causal = o_c[:, None] >= o_c[None, :]
        Mz = pair_decay(gam, seg, causal)  # [t, s] = zeta_ts (0 across a reset)
        M = Mz * beta[None, :]
        ez, _ = end_decays(gam, seg)  # zeta_{C,s}: from token s to the chunk end
        w = beta * ez

        K = tl.load(k_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        X = tl.load(x_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        Y = tl.load(y_ptr + row[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        V = tl.load(v_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        inv_s = tl.load(scale_ptr)
        s = tl.load(scale_ptr + 1)
        E = tl.load(e_ptr + row[:, None] * Dv + o_v[None, :], mask=m_tv, other=0.0) * inv_s
        Kt = tl.trans(K)
        XK = _mmp(X, Kt, OP, SOFT, K_EXACT)  # [t, s] = x_t . k_s
        YK = _mmp(Y, Kt, OP, SOFT, K_EXACT)
        EVmYK = _mmp(E, tl.trans(V), OP, SOFT, K_EXACT) - YK  # e_t . v_s - y_t . k_s
        MXKt = tl.trans(M * XK)  # [s, t]
        dk = _mmp(tl.trans(M * EVmYK), X, OP, SOFT, False) - _mmp(MXKt, Y, OP, SOFT, False)
        dbeta = tl.sum(Mz * XK * EVmYK, axis=0)

        # the states, BLOCK_J rows at a time
        base = i_bh.to(tl.int64) * N + i_c
        o_j = tl.arange(0, BLOCK_J)
        dgk = tl.zeros([BLOCK_C], dtype=tl.float32)  # v_s^T DG k_s
        for j0 in range(0, Dv, BLOCK_J):
            # DG rows j: (K DG^T)[:, j] is the column block j of K DG^T, and V DG = sum_j V[:, j] DG[j, :]
            jj = j0 + o_j
            m_j = jj < Dv
            DGj = tl.load(DG_ptr + base * Dv * D + jj[:, None] * D + o_d[None, :], mask=m_j[:, None] & m_d[None, :],
                          other=0.0).to(tl.float32)  # [BLOCK_J, BLOCK_D]
            Vj = tl.load(v_ptr + row[:, None] * Dv + jj[None, :], mask=m_t[:, None] & m_j[None, :],
                         other=0.0).to(tl.float32)
            DGk_j = _mmp(K, tl.trans(DGj), OP, SOFT, False, K_EXACT)  # [C, BLOCK_J]
            dgk += tl.sum(Vj * DGk_j, axis=1)
            dk += w[:, None] * _mmp(Vj, DGj, OP, SOFT, False, K_EXACT)
            # dv[:, j] = (M * X K^T)^T E[:, j] + w (K DG^T)[:, j]
            m_tj = m_t[:, None] & m_j[None, :]
            Ej = tl.load(e_ptr + row[:, None] * Dv + jj[None, :], mask=m_tj, other=0.0) * inv_s
            dv_j = _mmp(MXKt, Ej, OP, SOFT, False) + w[:, None] * DGk_j
            tl.store(dv_ptr + row[:, None] * Dv + jj[None, :], (dv_j * s).to(dv_ptr.dtype.element_ty), mask=m_tj)
        khk = tl.zeros([BLOCK_C], dtype=tl.float32)  # k_s^T DH k_s
        for i0 in range(0, D, BLOCK_J):
            # rows i of DH + DH^T: K (DH + DH^T) = sum_i K[:, i] (DH + DH^T)[i, :]
            ii = i0 + o_j
            m_i = ii < D
            m_id = m_i[:, None] & m_d[None, :]
            DH_i = tl.load(DH_ptr + base * D * D + ii[:, None] * D + o_d[None, :], mask=m_id, other=0.0)
            DHt_i = tl.load(DH_ptr + base * D * D + o_d[None, :] * D + ii[:, None], mask=m_id, other=0.0)
            Si = DH_i.to(tl.float32) + DHt_i.to(tl.float32)
            Ki = tl.load(k_ptr + row[:, None] * D + ii[None, :], mask=m_t[:, None] & m_i[None, :],
                         other=0.0).to(tl.float32)
            KSi = _mmp(Ki, Si, OP, SOFT, False, K_EXACT)  # [C, BLOCK_D]
            dk += w[:, None] * KSi
            khk += 0.5 * tl.sum(K * KSi, axis=1)  # k^T DH k = k^T (DH + DH^T) k / 2
        dbeta += ez * (dgk + khk)
        a = tl.load(a0_ptr + row, mask=m_t, other=0.0) - beta * dbeta
        tl.store(dk_ptr + row[:, None] * D + o_d[None, :], (dk * s).to(dk_ptr.dtype.element_ty), mask=m_td)
        tl.store(dbeta_ptr + row, dbeta * s, mask=m_t)
        tl.store(a_ptr + row, a * s, mask=m_t)


# The compiled kernels of the latest launches (a diagnostic for benchmarks: registers, spills).
LAST_LAUNCH: dict = {}

# Rows of a state per program / per step: 32 keeps a [32, 128] fp32 slice (16 registers a thread at
# 8 warps) on chip and gives the reverse scan 4x the programs at D = 128.
BLOCK_ROWS = 32


def _geometry(x: torch.Tensor, Dv: int, chunk_size: int):
    """``(B, T, H, D, C, N, BLOCK_C, BLOCK_D, BLOCK_DV)`` of a backward call (x: ``[B,T,H,D]``)."""
    if triton is None:
        raise ImportError("kernels.chunk_bwd needs triton (pip install triton); it is not installed")
    B, T, H, D = x.shape
    C = min(chunk_size, T)
    p2 = triton.next_power_of_2
    return (B, T, H, D, C, triton.cdiv(T, C), max(MIN_DOT_BLOCK, p2(C)), max(MIN_DOT_BLOCK, p2(D)),
            max(MIN_DOT_BLOCK, p2(Dv)))


def _op_code(policy, kernel) -> tuple[int, bool]:
    """(operand precision code, SOFT) of a launch of ``kernel`` for a policy (name or object)."""
    from mesa_stability.solvers import get_policy

    from .operands import OP_CODES, software_rounding

    return OP_CODES[get_policy(policy).operand], software_rounding(kernel)


def _scale_or_one(scale, device) -> torch.Tensor:
    """``[1/s, s]`` as a float32 tensor (``scale`` None: s = 1)."""
    if scale is None:
        return torch.ones(2, dtype=torch.float32, device=device)
    return scale.to(device=device, dtype=torch.float32).contiguous()


def reverse_states(e, y, x, g, *, chunk_size: int, dH_T=None, dG_T=None, policy="fp32", scale=None,
                   segments: int | None = None):
    """``(DG [B,H,N,Dv,D], DH [B,H,N,D,D], dG_0, dH_0)``: adjoint states at chunk ends, with the
    products in the operand precision of ``policy``, accumulated in float32 and stored in its state
    dtype (as the forward's chunk states; half the bytes for the 16-bit state policies); dG_0 and
    dH_0 are float32.

    ``scale = [1/s, s]`` (a float32 tensor, s a power of two): e, dG_T and dH_T are read divided
    by s and y is taken as already divided (the adjoint of e / s); DG and DH are then in units of
    1/s, and dG_0, dH_0 are returned times s (true gradients).

    ``segments``: the chunks are scanned in this many segments in parallel (the two-level scan of
    :mod:`kernels.chunk_state`, backwards; 1: sequential); None picks
    :func:`kernels.chunk_state.scan_segments`."""
    from mesa_stability.solvers import get_policy

    Dv = e.shape[3]
    B, T, H, D, C, N, BLOCK_C, BLOCK_D, BLOCK_DV = _geometry(x, Dv, chunk_size)
    op, soft = _op_code(policy, _reverse_state_kernel)
    state_dtype = get_policy(policy).state_dtype
    dev = x.device
    xf, gf = x.to(torch.float32).contiguous(), g.to(torch.float32).contiguous()
    sc = _scale_or_one(scale, dev)
    out = []
    for L, DL, final, sign, scale_l in ((e, Dv, dG_T, 1.0, True), (y, D, dH_T, -1.0, False)):
        s = torch.empty(B, H, N, DL, D, dtype=state_dtype, device=dev)
        s0 = torch.empty(B, H, DL, D, dtype=torch.float32, device=dev)
        fin = None if final is None else final.to(torch.float32).contiguous()
        L = L.to(torch.float32).contiguous()
        BLOCK_R = min(BLOCK_ROWS, max(MIN_DOT_BLOCK, triton.next_power_of_2(DL)))
        rows = triton.cdiv(DL, BLOCK_R)
        S, M = segment_layout(N, B * H * rows, dev, segments)
        common = dict(H=H, DL=DL, D=D, C=C, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, SCALE_L=scale_l,
                      OP=op, SOFT=soft, num_warps=4)
        if S > 1:
            # the two-level scan (kernels.chunk_state), run backwards: each segment from a zero state at
            # its end, the scan over the segment boundaries from the last, then each segment again
            E = torch.empty(B, H, S, DL, D, dtype=torch.float32, device=dev)
            dseg = torch.empty(B, H, S, dtype=torch.float32, device=dev)
            LAST_LAUNCH["reverse_states_local"] = _reverse_state_kernel[(B * H * S, rows)](
                L, xf, gf, s, E, None, dseg, sc, T, N, S, M, sign, HAS_FINAL=False, SEGMENT_INIT=False,
                END_ALL=True, **common)
            ends = torch.empty_like(E)
            segment_scan(fin, E, dseg, ends, reverse=True, scale=sc if fin is not None else None)
            fin = ends
        LAST_LAUNCH["reverse_states"] = _reverse_state_kernel[(B * H * S, rows)](
            L, xf, gf, s, s0, fin, None, sc, T, N, S, M, sign, HAS_FINAL=fin is not None and S == 1,
            SEGMENT_INIT=S > 1, END_ALL=False, **common)
        out.append((s, s0))
    (DG, dG0), (DH, dH0) = out
    return DG, DH, dG0, dH0


# Largest chunk tile (BLOCK_C) of the contraction kernel checked on a GPU for every operand code:
# compute-sanitizer's memcheck on an H200 (Triton 3.6, benchmarks/diagnose_fault.py) reports an
# out-of-bounds shared-memory read inside the kernel's 16-bit MMA (kernels.operands.dot) at
# BLOCK_C = 64, BLOCK_D = 128 (bf16x3, 4 and 8 warps), which faults at production shapes; at
# BLOCK_C = 32 (the op's default chunk) memcheck and initcheck report no error at every D and policy,
# and the tf32 code at BLOCK_C = 64, D = 128 none either (benchmarks/sanitize_gpu.py).
VERIFIED_CONTRACT_BLOCK_C = 32


class UnverifiedKernelWarning(UserWarning):
    """A kernel configuration not verified on the GPU was replaced by a verified (slower) path."""


def contractions_verified(chunk_size: int, policy, device: torch.device) -> bool:
    """Whether :func:`chunk_contractions` runs a configuration checked under compute-sanitizer on a
    GPU (:data:`VERIFIED_CONTRACT_BLOCK_C`): always off the GPU (the interpreter has no shared memory),
    on it a chunk tile of at most that size, or the tf32 operand code. Callers run the contractions in
    PyTorch otherwise (:func:`solvers.implicit.implicit_backward`)."""
    if device.type != "cuda":
        return True
    block_c = max(MIN_DOT_BLOCK, triton.next_power_of_2(chunk_size))
    return block_c <= VERIFIED_CONTRACT_BLOCK_C or _op_code(policy, _contract_kernel)[0] == 1


def chunk_contractions(k, v, x, y, e, g, beta, DG, DH, a0, *, chunk_size: int, policy="fp32",
                       num_warps: int | None = None, scale=None, grad_dtypes=(torch.float32, torch.float32)):
    """``(dk [B,T,H,D], dv [B,T,H,Dv], dbeta [B,T,H], a [B,T,H])``, with the products in the operand
    precision of ``policy``; ``a0`` (``[B,T,H]``) is the adjoint kernel's ``e.o - y.(H x)`` and
    ``a = a0 - beta dbeta`` the per-token log-decay term (``dg`` is its reverse cumulative sum).

    ``k`` and ``v`` are read in their own dtype (bf16 keys are exact bf16x3 operands). With
    ``scale = [1/s, s]`` (see :func:`reverse_states`) e is read divided by s, y, a0, DG and DH are
    taken in units of 1/s, and the outputs are true gradients (times s). dk and dv are stored in
    ``grad_dtypes`` (those of the inputs k, v: no cast pass afterwards), dbeta and a in float32."""
    Dv = v.shape[3]
    B, T, H, D, C, N, BLOCK_C, BLOCK_D, BLOCK_DV = _geometry(x, Dv, chunk_size)
    op, soft = _op_code(policy, _contract_kernel)
    f32 = [t.to(torch.float32).contiguous() for t in (x, y, e, g, beta, a0)]
    dk = torch.empty(B, T, H, D, dtype=grad_dtypes[0], device=x.device)
    dv = torch.empty(B, T, H, Dv, dtype=grad_dtypes[1], device=x.device)
    dbeta = torch.empty(B, T, H, dtype=torch.float32, device=x.device)
    a = torch.empty(B, T, H, dtype=torch.float32, device=x.device)
    k_exact = k.dtype == v.dtype == torch.bfloat16
    if not k_exact:
        k, v = k.to(torch.float32), v.to(torch.float32)
    LAST_LAUNCH["contractions"] = _contract_kernel[(N, B * H)](
        k.contiguous(), v.contiguous(), *f32, DG.contiguous(), DH.contiguous(), dk, dv, dbeta, a,
        _scale_or_one(scale, x.device), T, N,
        H=H, D=D, Dv=Dv, C=C, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        BLOCK_J=min(BLOCK_ROWS, BLOCK_D, BLOCK_DV), OP=op, SOFT=soft, K_EXACT=k_exact,
        num_warps=num_warps or 4)
    return dk, dv, dbeta, a
