"""Triton kernel: chunk-boundary states of the Mesa recurrence (docs/design.md sections 2 and 7).

Per batch entry b and head h, the sequence of T tokens is split into N = ceil(T / C) chunks of C
tokens (the last chunk partial: its missing tokens are masked in the kernel, never padded in
memory). Within chunk c, with the local inclusive cumulative log-decay in float32

    Gam_i = sum_{j<=i} g_j                         (i = 1..C, g = log forget gate <= 0)
    w_j   = exp(Gam_C - Gam_j) * beta_j            (exponent of a non-positive difference only)

the states at the chunk boundaries are

    H_{c+1} = exp(Gam_C) H_c + K^T diag(w) K       (D x D)
    G_{c+1} = exp(Gam_C) G_c + V^T diag(w) K       (Dv x D)

with K: [C, D] and V: [C, Dv] the chunk's keys and values and ``(H_0, G_0)`` the initial state
(zeros when none is given). Both updates have the form ``S_{c+1} = exp(Gam_C) S_c + L^T diag(w) K``
with ``L = K`` (for H) or ``L = V`` (for G), so one kernel, :func:`_chunk_state_kernel`, computes
one of them per launch and the wrapper launches it twice.

Precision (the same policy as :class:`solvers.chunk_state.ChunkedSystem`): gates, cumulative sums
and the running state are float32; the update is accumulated in float32 and the result is rounded
to ``state_dtype`` after every chunk, i.e. the running state compounds the rounding of the stored
state exactly as the emulation's ``policy.store`` does (a no-op for float32 states). The matmul
operands are rounded to the input dtype, with ``diag(w)`` applied (in fp32, before that rounding) to
the same factor as in the emulation: ``(diag(w) K)^T K`` for H and ``V^T (diag(w) K)`` for G, so
low-precision results match :class:`~solvers.chunk_state.ChunkedSystem` up to summation order.

The products' operand precision is one of the codes of :mod:`kernels.operands`:

* fp32 inputs: ``fp32``, i.e. true IEEE fp32 products. The GPU default would be TF32 (10 mantissa
  bits), which is a different precision policy ("tf32").
* bf16/fp16 inputs: ``bf16`` / ``fp16``, a native low-precision MMA with float32 accumulation (the
  "bf16-*"/"fp16-*" policies). Products of two bf16/fp16 values are exact in fp32, so only the
  accumulation rounds.
* ``split=True``: ``bf16x3`` whatever the input dtype (the bf16x3 and auto policies).

Layout: one program per (row tile of S, column tile of S, batch*head); it loops over the chunks
sequentially and keeps the running state tile in registers. Returned shapes are ``[B,H,N,D,D]``,
``[B,H,N,Dv,D]`` for the states *before* each chunk and ``[B,H,D,D]``, ``[B,H,Dv,D]`` for the
state after the last token, all in ``state_dtype``.

Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter when the environment
variable ``TRITON_INTERPRET=1`` is set *before* this module (and triton) is imported: ``triton.jit``
decides at decoration time whether a function is compiled or interpreted.
"""

from __future__ import annotations

import torch

from mesa_stability.solvers.problem import validate_recurrence

from .operands import OP_CODES, is_interpreted, software_rounding

try:  # importing the package must work without triton; calling the kernel needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# Input dtypes the kernel reads for k and v (docs/design.md section 4: fp32, bf16 or fp16 inputs).
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The operand precision of the update's products for each input dtype (split=False).
_INPUT_OPS = {torch.float32: OP_CODES["fp32"], torch.bfloat16: OP_CODES["bf16"], torch.float16: OP_CODES["fp16"]}
# Dtypes the states may be stored in (fp32 by default; bf16/fp16 for the low-precision-state policies).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# On the GPU tl.dot needs every block dimension >= 16 (the smallest MMA tile).
MIN_DOT_BLOCK = 16
# The compiled kernels of the latest launches ("H", "G"): a diagnostic hook for benchmarks (registers,
# the IR); nothing in the library reads it.
LAST_LAUNCH: dict = {}
# Compiled kernels loop over the chunks with range(), which the compiler software-pipelines (a while
# loop, which the interpreter needs, made the scan 28-43% slower on an H200: benchmarks/
# bench_chunk_states.py); False runs the while loop compiled too (for that benchmark).
FOR_LOOP = True
# Largest row/column tile of a state per program: a 64 x 64 float32 tile is 16 KiB of registers,
# 32 registers per thread at 4 warps, which leaves room for the chunk's operand tiles.
MAX_STATE_BLOCK = 64


if triton is not None:
    from .gates import chunk_log_decay, end_decays
    from .operands import mm_parts, round_to, split

    @triton.jit
    def decay_add(hi, lo, d, upd, COMPENSATE: tl.constexpr):
        """``S <- d S + upd`` for a running state held as ``S = hi + lo`` (fp32 tiles).

        COMPENSATE (fp32 states): the product ``d hi`` and the sum with ``upd`` are split into their
        rounded values and exact errors (``fma(d, hi, -p)`` and the TwoSum
        ``s = p + u, e = (p - (s - b)) + (u - b), b = s - p``), and the errors go to ``lo``: the state
        then carries no accumulated rounding, only the final rounding of ``hi + lo`` when stored.
        Without it the running state rounds once per chunk, i.e. its error grows like
        ``sqrt(chunks) u ||S||``; worse, Triton folds ``dot(a, b) + S`` into a dot accumulating into
        S, which on the FMA (ieee fp32) path rounds once per *token* at the size of the large state
        (the fp32 policy's long-sequence defect). ``upd`` is used twice here, so it is never folded.
        Without COMPENSATE (16-bit states) ``lo`` stays 0 and the caller rounds hi to the state dtype."""
        if COMPENSATE:
            p = d * hi
            ep = tl.fma(d, hi, -p)
            s = p + upd
            b = s - p
            es = (p - (s - b)) + (upd - b)
            lo = tl.fma(d, lo, ep + es)
            hi = s
        else:
            hi = tl.fma(d, hi, upd)
        return hi, lo

    @triton.jit
    def _chunk_step(l_ptr, k_ptr, g_ptr, beta_ptr, s_ptr, hi, lo, i_c, bh64, tok0, i_h, o_c, o_l, o_k, m_l, m_k,
                    m_s, o_s, T, N, H: tl.constexpr, DL: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                    W_LEFT: tl.constexpr, OP: tl.constexpr, K_EXACT: tl.constexpr, SOFT: tl.constexpr,
                    COMPENSATE: tl.constexpr):
        """Store the state before chunk ``i_c`` and return the state after it (``hi + lo``, fp32 tiles)."""
        tl.store(s_ptr + (bh64 * N + i_c) * DL * D + o_s, (hi + lo).to(s_ptr.dtype.element_ty), mask=m_s)
        t = i_c * C + o_c  # token index of each row of the chunk block
        m_t = (o_c < C) & (t < T)  # inside the chunk and inside the sequence
        row = (tok0 + t) * H + i_h  # [B, T, H] row of each token
        # masked tokens read g = 0 and beta = 0: they leave Gam and the state unchanged
        gam, seg = chunk_log_decay(g_ptr, row, m_t)
        beta = tl.load(beta_ptr + row, mask=m_t, other=0.0).to(tl.float32)
        to_end, d = end_decays(gam, seg)
        w = to_end * beta
        lt = tl.load(l_ptr + row[:, None] * DL + o_l[None, :], mask=m_t[:, None] & m_l[None, :], other=0.0)
        kt = tl.load(k_ptr + row[:, None] * D + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        # diag(w) goes on the factor the emulation puts it on (K^T diag(w) K = (w K)^T K for H,
        # V^T (w K) for G); it is formed in fp32 and rounded to the input dtype (the operand precision)
        if W_LEFT:
            lt = lt.to(tl.float32) * w[:, None]
        else:
            kt = kt.to(tl.float32) * w[:, None]
        # L^T diag(w) K in operand precision OP (kernels.operands), accumulated in fp32. The operands
        # are rounded before L is transposed (16-bit tiles to move, not fp32); the raw bf16 factor of
        # an update (k for H, v for G) is an exact bf16x3 operand (lo = 0: two MMAs instead of three)
        l_hi, l_lo = split(lt.to(tl.float32), OP, SOFT)
        k_hi, k_lo = split(kt.to(tl.float32), OP, SOFT)
        upd = mm_parts(tl.trans(l_hi), tl.trans(l_lo), k_hi, k_lo, OP, SOFT, K_EXACT and not W_LEFT,
                       K_EXACT and W_LEFT)
        hi, lo = decay_add(hi, lo, d, upd, COMPENSATE)
        if not COMPENSATE:
            # accumulated in fp32, rounded to the state dtype as stored: a 16-bit state compounds its rounding
            hi = round_to(hi, s_ptr.dtype.element_ty, SOFT)
        return hi, lo

    @triton.jit
    def _chunk_state_kernel(
        l_ptr,  # [B, T, H, DL] left factor L (k for H, v for G), contiguous
        k_ptr,  # [B, T, H, D]  keys, contiguous
        g_ptr,  # [B, T, H]     log forget gate, float32, contiguous
        beta_ptr,  # [B, T, H]  input gate, contiguous
        s0_ptr,  # [B, H, DL, D] initial state (HAS_INIT; None otherwise)
        s_ptr,  # [B, H, N, DL, D] state before each chunk (output, state dtype)
        sT_ptr,  # [B, H, DL, D] state after the last token (output, state dtype)
        T,  # tokens per sequence
        H: tl.constexpr,  # heads
        DL: tl.constexpr,  # rows of the state (D for H, Dv for G)
        D: tl.constexpr,  # columns of the state (key dim)
        C: tl.constexpr,  # chunk size (tokens); any positive int, masked up to BLOCK_C
        N,  # number of chunks, ceil(T / C)
        BLOCK_C: tl.constexpr,  # max(16, next_pow2(C)): token block of one chunk
        BLOCK_L: tl.constexpr,  # row tile of the state, >= 16, power of two
        BLOCK_K: tl.constexpr,  # column tile of the state, >= 16, power of two
        HAS_INIT: tl.constexpr,  # an initial state is given
        W_LEFT: tl.constexpr,  # diag(w) multiplies L (the H update) rather than K (the G update)
        OP: tl.constexpr,  # operand precision of the update's products (kernels.operands.OP_CODES)
        K_EXACT: tl.constexpr,  # k and v are bfloat16: their bf16x3 parts are (k, 0), (v, 0)
        SOFT: tl.constexpr,  # software rounding (kernels.operands: the interpreter)
        COMPENSATE: tl.constexpr,  # fp32 states: carry the rounding errors in a second tile (decay_add)
        FOR_LOOP: tl.constexpr,  # loop over the chunks with range() (compiled) or while (interpreter)
    ):
        i_l = tl.program_id(0)
        i_k = tl.program_id(1)
        i_bh = tl.program_id(2)
        i_b = i_bh // H
        i_h = i_bh % H
        o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        o_c = tl.arange(0, BLOCK_C)
        m_l = o_l < DL
        m_k = o_k < D
        m_s = m_l[:, None] & m_k[None, :]
        # offsets of this program's state tile inside one [DL, D] state
        o_s = o_l[:, None] * D + o_k[None, :]
        # int64 bases: B*T*H*D and B*H*N*DL*D can exceed 2^31 elements for long sequences
        bh64 = i_bh.to(tl.int64)
        tok0 = i_b.to(tl.int64) * T  # first token of this sequence in the [B*T] token index
        if HAS_INIT:
            hi = tl.load(s0_ptr + bh64 * DL * D + o_s, mask=m_s, other=0.0).to(tl.float32)
        else:
            hi = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
        # round to the state dtype, as every stored state is (no-op for float32 states)
        hi = round_to(hi, s_ptr.dtype.element_ty, SOFT)
        lo = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)

        # The same step over the chunks either way. A for loop lets the compiler pipeline the next
        # chunk's loads behind this chunk's products; the interpreter passes runtime ints as 1-element
        # numpy arrays, which range() refuses (numpy >= 2.4), so it runs a while loop.
        if FOR_LOOP:
            for i_c in range(N):
                hi, lo = _chunk_step(l_ptr, k_ptr, g_ptr, beta_ptr, s_ptr, hi, lo, i_c, bh64, tok0, i_h, o_c, o_l,
                                     o_k, m_l, m_k, m_s, o_s, T, N, H, DL, D, C, W_LEFT, OP, K_EXACT, SOFT,
                                     COMPENSATE)
        else:
            i_c = 0
            while i_c < N:
                hi, lo = _chunk_step(l_ptr, k_ptr, g_ptr, beta_ptr, s_ptr, hi, lo, i_c, bh64, tok0, i_h, o_c, o_l,
                                     o_k, m_l, m_k, m_s, o_s, T, N, H, DL, D, C, W_LEFT, OP, K_EXACT, SOFT,
                                     COMPENSATE)
                i_c += 1

        tl.store(sT_ptr + bh64 * DL * D + o_s, (hi + lo).to(sT_ptr.dtype.element_ty), mask=m_s)


def _validate(k, v, g, beta, chunk_size, initial_state, state_dtype, interpreted: bool, check_values: bool) -> None:
    """Raise ``ValueError`` naming the argument for any invalid input of :func:`chunk_states`: the
    recurrence's own checks (:func:`solvers.problem.validate_recurrence`, values too with
    ``check_values``), then what the kernel needs: k and v in one of :data:`INPUT_DTYPES`, float32
    log-gates, the chunk size, the state dtype and the device."""
    validate_recurrence(k, v, g, beta, initial_state, check_values=check_values)
    if k.dtype not in INPUT_DTYPES:
        raise ValueError(f"k has dtype {k.dtype}; supported: {list(INPUT_DTYPES)}")
    if v.dtype != k.dtype:
        raise ValueError(f"v has dtype {v.dtype}, expected k's dtype {k.dtype} (one operand precision)")
    if g.dtype != torch.float32:
        raise ValueError(f"g must be float32 (cumulative log-gates are float32), got {g.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}")
    if k.device.type != "cuda" and not interpreted:
        raise ValueError(f"k is on {k.device}: the kernel needs CUDA tensors, or TRITON_INTERPRET=1 set "
                         "before triton is imported to run on the CPU")
    if k.device.type == "cuda" and interpreted:
        raise ValueError("k is on CUDA but TRITON_INTERPRET=1 is set: the interpreter reads CPU tensors")


def chunk_states(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, chunk_size: int = 64,
                 initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                 state_dtype: torch.dtype = torch.float32, check_values: bool = True, split: bool = False,
                 values: bool = True):
    """Chunk-boundary states of the Mesa recurrence (see the module docstring for the math).

    Args:
        k: keys ``[B,T,H,D]``, float32, bfloat16 or float16.
        v: values ``[B,T,H,Dv]``, same dtype as ``k``.
        g: log forget gate ``[B,T,H]``, float32, ``<= 0``.
        beta: input gate ``[B,T,H]``, any float dtype (read as float32).
        chunk_size: tokens per chunk C, any positive int (the chunk is masked up to a power of two
            >= 16); ``min(chunk_size, T)`` is used, as in :class:`solvers.chunk_state.ChunkedSystem`.
        initial_state: optional ``(H0 [B,H,D,D], G0 [B,H,Dv,D])``, any float dtype.
        state_dtype: dtype the states are stored (and rounded after every chunk) in.
        check_values: check ``g <= 0`` (one reduction and a host sync); callers that validated
            already pass False.
        split: bf16x3 products: every factor (the w-weighted one in fp32) is split into bf16
            ``hi + lo`` parts and three bf16 MMAs replace one product: ~16 significant bits at
            tensor-core speed, whatever the input dtype (the ``bf16x3`` precision policy).
        values: also compute the value states G (False: only H, one launch; G_c and G_T are None).

    Returns:
        ``(Hc [B,H,N,D,D], Gc [B,H,N,Dv,D], (H_T [B,H,D,D], G_T [B,H,Dv,D]))`` in ``state_dtype``,
        where ``Hc[:, :, c]`` is the state before chunk c and ``(H_T, G_T)`` the state after the
        last token.

    Raises:
        ImportError: triton is not installed.
        ValueError: an input is invalid (the message names the argument).
    """
    if triton is None:
        raise ImportError("kernels.chunk_states needs triton (pip install triton); it is not installed")
    interpreted = is_interpreted(_chunk_state_kernel)
    _validate(k, v, g, beta, chunk_size, initial_state, state_dtype, interpreted, check_values)
    B, T, Hh, D = k.shape
    Dv = v.shape[3]
    C = min(chunk_size, T)
    N = triton.cdiv(T, C)
    k, v, g, beta = k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous()
    dev = k.device
    Hc = torch.empty(B, Hh, N, D, D, dtype=state_dtype, device=dev)
    Gc = torch.empty(B, Hh, N, Dv, D, dtype=state_dtype, device=dev) if values else None
    H_T = torch.empty(B, Hh, D, D, dtype=state_dtype, device=dev)
    G_T = torch.empty(B, Hh, Dv, D, dtype=state_dtype, device=dev) if values else None
    if initial_state is None:
        H0 = G0 = None
    else:
        H0, G0 = (s.contiguous() for s in initial_state)
    # the products: bf16x3 when split, else the input dtype's (fp32 inputs: ieee products)
    op = OP_CODES["bf16x3"] if split else _INPUT_OPS[k.dtype]
    BLOCK_C = max(MIN_DOT_BLOCK, triton.next_power_of_2(C))
    BLOCK_K = max(MIN_DOT_BLOCK, min(MAX_STATE_BLOCK, triton.next_power_of_2(D)))
    for left, s0, s, sT, w_left in ((k, H0, Hc, H_T, True), (v, G0, Gc, G_T, False))[:2 if values else 1]:
        DL = left.shape[3]
        BLOCK_L = max(MIN_DOT_BLOCK, min(MAX_STATE_BLOCK, triton.next_power_of_2(DL)))
        grid = (triton.cdiv(DL, BLOCK_L), triton.cdiv(D, BLOCK_K), B * Hh)
        LAST_LAUNCH["H" if w_left else "G"] = _chunk_state_kernel[grid](
            left, k, g, beta, s0, s, sT,
            T, Hh, DL, D, C, N,
            BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, BLOCK_K=BLOCK_K,
            HAS_INIT=s0 is not None, W_LEFT=w_left, OP=op, K_EXACT=k.dtype == torch.bfloat16,
            SOFT=software_rounding(_chunk_state_kernel), COMPENSATE=state_dtype == torch.float32,
            FOR_LOOP=FOR_LOOP and not interpreted,
        )
    return Hc, Gc, (H_T, G_T)


__all__ = ["chunk_states"]
