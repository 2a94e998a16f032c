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

**Two-level scan.** The recursion is sequential over the chunks, and the sequential scan has only
B·H·(state tiles) programs, 64 at B = 1, H = 16, D = 128. When that leaves the GPU idle, the
N chunks are split into S segments of M = ceil(N / S) chunks, segment s holding chunks
[sM, (s+1)M), and scanned in three launches:

    1. local pass, all segments in parallel:  E_s = the state after segment s from a zero state,
                                              d_s = prod_{c in s} exp(Gam_C^(c))  (its decay);
    2. boundary scan over s:                   F_0 = S_0 (the initial state),  F_{s+1} = d_s F_s + E_s;
    3. the sequential step again, all segments in parallel, segment s started from F_s, storing
       the states before every chunk and (last segment) the final state.

By linearity F_s is the true state before segment s, so step 3 is the sequential scan of each
segment from its exact first state. Rounding: E_s and F_s are formed with compensated fp32
arithmetic and stored once in fp32 (one rounding of size u·||F_s|| per segment, against one per
chunk without compensation); d_s is the product of the same rounded chunk decays the sequential
scan applies. 16-bit states round the running state after every chunk in step 1 as in step 3,
and F_s is rounded to the state dtype when step 3 loads it. The cost is the chunk step twice
(step 1 stores nothing but E_s) in exchange for S times the programs (:func:`scan_segments`).

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

Layout: one program per (row tile of S, column tile of S, batch*head*segment); it loops over its
chunks sequentially and keeps the running state tile in registers. Returned shapes are ``[B,H,N,D,D]``,
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
# The two-level scan (chunk_states(segments=...)): below SCAN_PROGRAMS_PER_SM programs per SM the
# chunks are split into segments until there are that many (the sequential scan keeps one program
# per state tile, B*H*4 programs at D = 128: 64 on 132 SMs at B = 1, H = 16), each segment at
# least MIN_SEGMENT_CHUNKS long, since the segments are scanned twice (a local pass and the pass
# that stores the states).
SCAN_PROGRAMS_PER_SM = 4
MIN_SEGMENT_CHUNKS = 8
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
                    COMPENSATE: tl.constexpr, STORE: tl.constexpr):
        """Store the state before chunk ``i_c`` (STORE) and return the state after it (``hi + lo``, fp32
        tiles) and the chunk's decay ``exp(Gam_C)``."""
        if STORE:
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
        return hi, lo, d

    @triton.jit
    def _chunk_state_kernel(
        l_ptr,  # [B, T, H, DL] left factor L (k for H, v for G), contiguous
        k_ptr,  # [B, T, H, D]  keys, contiguous
        g_ptr,  # [B, T, H]     log forget gate, float32, contiguous
        beta_ptr,  # [B, T, H]  input gate, contiguous
        s0_ptr,  # [B, H, S, DL, D] state before each segment (HAS_INIT; None otherwise: zeros)
        s_ptr,  # [B, H, N, DL, D] state before each chunk (output, state dtype; only with STORE_CHUNKS)
        sT_ptr,  # [B, H, S, DL, D] state after each segment (END_ALL), else [B, H, DL, D] after the last token
        dseg_ptr,  # [B, H, S] float32: decay over each segment, prod of the chunks' exp(Gam_C) (END_ALL)
        T,  # tokens per sequence
        H: tl.constexpr,  # heads
        DL: tl.constexpr,  # rows of the state (D for H, Dv for G)
        D: tl.constexpr,  # columns of the state (key dim)
        C: tl.constexpr,  # chunk size (tokens); any positive int, masked up to BLOCK_C
        N,  # number of chunks, ceil(T / C)
        S,  # number of segments (1: the sequential scan)
        M,  # chunks per segment, ceil(N / S)
        BLOCK_C: tl.constexpr,  # max(16, next_pow2(C)): token block of one chunk
        BLOCK_L: tl.constexpr,  # row tile of the state, >= 16, power of two
        BLOCK_K: tl.constexpr,  # column tile of the state, >= 16, power of two
        HAS_INIT: tl.constexpr,  # an initial state is given
        STORE_CHUNKS: tl.constexpr,  # store the state before every chunk (False: the local pass)
        END_ALL: tl.constexpr,  # store every segment's end state and decay (the local pass)
        W_LEFT: tl.constexpr,  # diag(w) multiplies L (the H update) rather than K (the G update)
        OP: tl.constexpr,  # operand precision of the update's products (kernels.operands.OP_CODES)
        K_EXACT: tl.constexpr,  # k and v are bfloat16: their bf16x3 parts are (k, 0), (v, 0)
        SOFT: tl.constexpr,  # software rounding (kernels.operands: the interpreter)
        COMPENSATE: tl.constexpr,  # fp32 states: carry the rounding errors in a second tile (decay_add)
        FOR_LOOP: tl.constexpr,  # loop over the chunks with range() (compiled) or while (interpreter)
    ):
        i_l = tl.program_id(0)
        i_k = tl.program_id(1)
        i_p = tl.program_id(2)  # (batch*head, segment)
        i_bh = i_p // S
        i_s = i_p % S
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
        p64 = i_p.to(tl.int64)
        tok0 = i_b.to(tl.int64) * T  # first token of this sequence in the [B*T] token index
        if HAS_INIT:
            hi = tl.load(s0_ptr + p64 * DL * D + o_s, mask=m_s, other=0.0).to(tl.float32)
        else:
            hi = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
        # round to the state dtype, as every stored state is (no-op for float32 states)
        hi = round_to(hi, s_ptr.dtype.element_ty, SOFT)
        lo = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
        c0 = i_s * M
        c1 = tl.minimum(c0 + M, N)
        decay = tl.full([], 1.0, tl.float32)  # this segment's decay, the product of its chunks' exp(Gam_C) (fp32)

        # The same step over the chunks either way. A for loop lets the compiler pipeline the next
        # chunk's loads behind this chunk's products; the interpreter passes runtime ints as 1-element
        # numpy arrays, which range() refuses (numpy >= 2.4), so it runs a while loop.
        if FOR_LOOP:
            for i_c in range(c0, c1):
                hi, lo, d = _chunk_step(l_ptr, k_ptr, g_ptr, beta_ptr, s_ptr, hi, lo, i_c, bh64, tok0, i_h, o_c,
                                        o_l, o_k, m_l, m_k, m_s, o_s, T, N, H, DL, D, C, W_LEFT, OP, K_EXACT, SOFT,
                                        COMPENSATE, STORE_CHUNKS)
                decay *= d
        else:
            i_c = c0
            while i_c < c1:
                hi, lo, d = _chunk_step(l_ptr, k_ptr, g_ptr, beta_ptr, s_ptr, hi, lo, i_c, bh64, tok0, i_h, o_c,
                                        o_l, o_k, m_l, m_k, m_s, o_s, T, N, H, DL, D, C, W_LEFT, OP, K_EXACT, SOFT,
                                        COMPENSATE, STORE_CHUNKS)
                decay *= d
                i_c += 1

        # the per-program conditions as block masks (broadcast explicitly: the same stores compiled
        # and interpreted, on every Triton version)
        if END_ALL:
            tl.store(sT_ptr + p64 * DL * D + o_s, (hi + lo).to(sT_ptr.dtype.element_ty), mask=m_s)
            o1 = tl.arange(0, 1)
            first_tile = (o1 * 0 + i_l + i_k) == 0  # one program per segment stores its decay
            tl.store(dseg_ptr + p64 + o1, decay + tl.zeros([1], tl.float32), mask=first_tile)
        else:  # the last segment ends at the last token
            last = (tl.zeros([BLOCK_L, BLOCK_K], tl.int32) + i_s) == S - 1
            tl.store(sT_ptr + bh64 * DL * D + o_s, (hi + lo).to(sT_ptr.dtype.element_ty), mask=m_s & last)

    @triton.jit
    def _segment_scan_kernel(
        s0_ptr,  # [B, H, DL, D] initial state (HAS_INIT; None otherwise: zeros)
        scale_ptr,  # [1/s, s] float32: the initial state is read times 1/s (HAS_SCALE)
        e_ptr,  # [B, H, S, DL, D] float32: each segment's local end state (from a zero state)
        dseg_ptr,  # [B, H, S] float32: each segment's decay
        out_ptr,  # [B, H, S, DL, D] float32: the state each segment starts from (output)
        S,  # segments
        DL: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_INIT: tl.constexpr, HAS_SCALE: tl.constexpr, REVERSE: tl.constexpr, STATE_DTYPE: tl.constexpr,
        SOFT: tl.constexpr,
    ):
        """``F = S_0``, then per segment s (in order, or last to first with REVERSE): store ``F`` as
        segment s's start, ``F <- d_s F + E_s`` (compensated fp32, :func:`decay_add`)."""
        i_l = tl.program_id(0)
        i_k = tl.program_id(1)
        i_bh = tl.program_id(2)
        o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_s = (o_l < DL)[:, None] & (o_k < D)[None, :]
        o_s = o_l[:, None] * D + o_k[None, :]
        bh64 = i_bh.to(tl.int64)
        if HAS_INIT:
            hi = tl.load(s0_ptr + bh64 * DL * D + o_s, mask=m_s, other=0.0).to(tl.float32)
            if HAS_SCALE:
                hi = hi * tl.load(scale_ptr)
        else:
            hi = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
        hi = round_to(hi, STATE_DTYPE, SOFT)  # the sequential scan's first state is rounded so too
        lo = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
        n = 0
        while n < S:  # S is small (tens): no pipelining to gain
            if REVERSE:
                i_s = S - 1 - n
            else:
                i_s = n
            base = (bh64 * S + i_s) * DL * D
            tl.store(out_ptr + base + o_s, hi + lo, mask=m_s)
            e = tl.load(e_ptr + base + o_s, mask=m_s, other=0.0)
            hi, lo = decay_add(hi, lo, tl.load(dseg_ptr + bh64 * S + i_s), e, True)
            n += 1


def segment_scan(init, E, dseg, out, *, reverse: bool = False, scale=None, state_dtype=torch.float32) -> None:
    """Step 2 of the two-level scan (module docstring): ``out[:, :, s]`` = the state segment s starts
    from, given the initial state ``init`` (``[B,H,DL,D]`` or None: zeros; read times ``scale[0]``
    when ``scale = [1/s, s]`` is given), the local end states ``E`` (``[B,H,S,DL,D]`` float32) and the
    segment decays ``dseg`` (``[B,H,S]``). ``reverse``: segments from last to first (the adjoint
    scan). The initial state is rounded to ``state_dtype`` first, as the sequential scan's is."""
    B, Hh, S, DL, D = E.shape
    BLOCK_L = max(MIN_DOT_BLOCK, min(MAX_STATE_BLOCK, triton.next_power_of_2(DL)))
    BLOCK_K = max(MIN_DOT_BLOCK, min(MAX_STATE_BLOCK, triton.next_power_of_2(D)))
    _segment_scan_kernel[(triton.cdiv(DL, BLOCK_L), triton.cdiv(D, BLOCK_K), B * Hh)](
        init, scale, E, dseg, out, S, DL=DL, D=D, BLOCK_L=BLOCK_L, BLOCK_K=BLOCK_K, HAS_INIT=init is not None,
        HAS_SCALE=scale is not None, REVERSE=reverse, STATE_DTYPE=_TL_STATE[state_dtype],
        SOFT=software_rounding(_segment_scan_kernel))


# each of STATE_DTYPES as the kernels' dtype (STATE_DTYPE of the segment scan); empty without triton
_TL_STATE = {} if tl is None else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def scan_segments(N: int, programs: int, device: torch.device) -> int:
    """Segments of the two-level scan for ``N`` chunks and ``programs`` programs per segment (state
    tiles x batch x heads) on ``device``: 1 (sequential) when the sequential scan fills the GPU or
    off the GPU, else enough segments for :data:`SCAN_PROGRAMS_PER_SM` programs per SM, each of at
    least :data:`MIN_SEGMENT_CHUNKS` chunks."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-SCAN_PROGRAMS_PER_SM * sms // programs)
    return max(1, min(want, N // MIN_SEGMENT_CHUNKS))


def segment_layout(N: int, programs: int, device: torch.device, segments: int | None) -> tuple[int, int]:
    """``(S, M)``: the two-level scan's segments and chunks per segment for ``N`` chunks, from the
    requested ``segments`` (None: :func:`scan_segments`; clipped to ``[1, N]``). M = ceil(N / S) and S
    is then recomputed as ceil(N / M), so that no segment is empty."""
    S = scan_segments(N, programs, device) if segments is None else max(1, min(segments, N))
    M = triton.cdiv(N, S)
    return triton.cdiv(N, M), M


def _validate(k, v, g, beta, chunk_size, initial_state, state_dtype, interpreted: bool, check_values: bool,
              segments=None) -> None:
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
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
        raise ValueError(f"segments must be a positive int or None, got {segments!r}")
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
                 values: bool = True, segments: int | None = None):
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
        segments: chunks are scanned in this many segments in parallel (the two-level scan of the
            module docstring; 1: the sequential scan); None picks :func:`scan_segments`.

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
    _validate(k, v, g, beta, chunk_size, initial_state, state_dtype, interpreted, check_values, segments)
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
    soft = software_rounding(_chunk_state_kernel)
    for left, s0, s, sT, w_left in ((k, H0, Hc, H_T, True), (v, G0, Gc, G_T, False))[:2 if values else 1]:
        DL = left.shape[3]
        BLOCK_L = max(MIN_DOT_BLOCK, min(MAX_STATE_BLOCK, triton.next_power_of_2(DL)))
        tiles = (triton.cdiv(DL, BLOCK_L), triton.cdiv(D, BLOCK_K))
        S, M = segment_layout(N, tiles[0] * tiles[1] * B * Hh, dev, segments)
        common = dict(T=T, H=Hh, DL=DL, D=D, C=C, N=N, S=S, M=M, BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L,
                      BLOCK_K=BLOCK_K, W_LEFT=w_left, OP=op, K_EXACT=k.dtype == torch.bfloat16, SOFT=soft,
                      COMPENSATE=state_dtype == torch.float32, FOR_LOOP=FOR_LOOP and not interpreted)
        grid = (*tiles, B * Hh * S)
        name = "H" if w_left else "G"
        if S > 1:
            # two-level scan: each segment from a zero state (its local end state E_s and decay d_s),
            # the scan over the segments' boundaries, then each segment again from its true first state
            E = torch.empty(B, Hh, S, DL, D, dtype=torch.float32, device=dev)
            dseg = torch.empty(B, Hh, S, dtype=torch.float32, device=dev)
            LAST_LAUNCH[f"{name}_local"] = _chunk_state_kernel[grid](
                left, k, g, beta, None, s, E, dseg, HAS_INIT=False, STORE_CHUNKS=False, END_ALL=True, **common)
            first = torch.empty_like(E)
            segment_scan(s0, E, dseg, first, state_dtype=state_dtype)
            s0 = first
        LAST_LAUNCH[name] = _chunk_state_kernel[grid](
            left, k, g, beta, s0, s, sT, None, HAS_INIT=s0 is not None, STORE_CHUNKS=True, END_ALL=False,
            **common)
    return Hc, Gc, (H_T, G_T)


__all__ = ["chunk_states", "scan_segments", "segment_layout", "segment_scan"]
