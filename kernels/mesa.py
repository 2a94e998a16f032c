"""Public ops: ``mesa_chunk`` (chunkwise prefill, differentiable) and ``mesa_step`` (one-token decode).

``mesa_chunk`` = :func:`kernels.chunk_state.chunk_states` (chunk-boundary states H_c, G_c,
accumulated in float32, stored per the policy's state dtype) followed by
:mod:`kernels.chunk_cg` (per-chunk CG with early exit, and the output o = G_t x_t). Shapes as in
the peer op: ``q, k: [B,T,H,D]``, ``v: [B,T,H,Dv]``, ``g, beta: [B,T,H]`` (g = log forget gate),
``lam: [H,D]``. Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from solvers import get_policy, validate_inputs
from solvers.cg import PRECOND_CHOICES, check_iteration_options
from solvers.implicit import MesaImplicit, SolveConfig, implicit_backward
from solvers.precision import PrecisionPolicy

from . import chunk_cg, decode
from .chunk_state import MIN_DOT_BLOCK, _is_interpreted, chunk_states

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

# The default precision policy of the kernels (see benchmarks/README.md for the measurements
# that chose it): bf16x3 split-precision products (three bf16 MMAs, ~16 bits) with fp32 states.
DEFAULT_POLICY = "bf16x3"
KERNEL_POLICIES = ("fp32", "tf32", "bf16x3", "bf16-fp32state", "bf16-bf16state", "fp16-fp32state",
                   "fp16-fp16state")
BACKENDS = ("auto", "triton", "torch")
# Largest head dims the fused CG kernel holds on chip (H_c is a D x D tile).
MAX_D = 128
# The compiled kernels of the latest launches (name -> triton CompiledKernel): a diagnostic hook
# for benchmarks (registers, spills); nothing in the library reads it.
LAST_LAUNCH: dict = {}


@dataclass
class MesaStats:
    """Per-token solver statistics of a ``mesa_chunk`` / ``mesa_step`` call."""

    steps: torch.Tensor  # [B,T,H] int32 CG iterations per token
    residual: torch.Tensor  # [B,T,H] float32 final relative residual ||r_k|| / ||r_0||
    x: torch.Tensor | None = None  # [B,T,H,D] float32 q-star

    @property
    def mean_steps(self) -> float:
        return float(self.steps.double().mean())


def _require_triton(fn) -> bool:
    if triton is None:
        raise ImportError("kernels need triton (pip install triton); it is not installed")
    return _is_interpreted(fn)


def _check_device(name: str, x: torch.Tensor, interpreted: bool) -> None:
    if interpreted and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}, but TRITON_INTERPRET=1 runs kernels on CPU tensors")
    if not interpreted and x.device.type != "cuda":
        raise ValueError(f"{name} is on {x.device}: the kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run them on the CPU)")


def _kernel_policy(policy) -> PrecisionPolicy:
    pol = get_policy(policy)
    if pol.name not in KERNEL_POLICIES:
        raise ValueError(f"policy {pol.name!r} is not implemented by the kernels; use one of {KERNEL_POLICIES} "
                         "(fp64 is the reference solvers' job: solvers.solve)")
    return pol


def mesa_chunk(q, k, v, g, beta, lam, *, steps: int = 30, tol: float | None = None, x0: str = "zero",
               precond: str | None = None, policy: str | PrecisionPolicy = DEFAULT_POLICY, chunk_size: int = 32,
               initial_state=None, output_final_state: bool = False, cu_seqlens=None, return_stats: bool = False,
               return_x: bool = False, validate: bool = True, num_warps: int | None = None, backend: str = "auto",
               bwd_steps: int | None = None, bwd_tol: float | None = None, bwd_contractions: str = "triton"):
    """Mesa layer: ``o_t = G_t (H_t + Lambda)^{-1} q_t`` for every token, by chunkwise CG; differentiable.

    Args:
        q, k: ``[B,T,H,D]``; v: ``[B,T,H,Dv]``; g (log forget gate, <= 0), beta (in [0,1]): ``[B,T,H]``;
            lam (> 0): ``[H,D]``. Any float dtype; cast to the policy's input dtype.
        steps: CG step cap (fixed step count when ``tol`` is None). ``steps=0`` gives x = x0.
        tol: relative residual tolerance ``||r|| <= tol ||r_0||``; each chunk stops early when all its
            tokens meet it.
        x0: initial guess, ``"zero"`` or ``"jacobi"`` (q / diag(H_t + Lambda)).
        precond: ``None`` or ``"jacobi"``.
        policy: precision policy name or object (default ``DEFAULT_POLICY``).
        chunk_size: tokens per chunk (any positive int; power-of-two blocks are masked). The default 32
            was faster than 64 on an H100 at D = 128 (benchmarks/README.md).
        initial_state: ``(H0 [N,H,D,D], G0 [N,H,Dv,D])``, N = B (or the number of packed sequences).
        output_final_state: also return ``(H_T, G_T)`` (float32 or the policy's state dtype).
        cu_seqlens: packed variable-length sequences (B = 1), int tensor ``[N+1]``.
        return_stats: also return a :class:`MesaStats` (per-token steps, residuals).
        return_x: store q-star in the stats (``return_stats`` implied).
        validate: check values too (finiteness, lam > 0, g <= 0, beta in [0, 1]: a few reductions and
            host syncs). Shapes, dtypes and devices are always checked.
        num_warps: warps per program of the CG kernel (default from an H100 sweep at D = 128, C = 32:
            8 for fp32 / tf32 / bf16x3 operands at head dims above 64, whose tiles need the registers
            of 256 threads; 4 otherwise, 1.6x faster than 8 for bf16 / fp16 operands).
        backend: ``"triton"`` (the kernels: CUDA, or CPU through the interpreter), ``"torch"`` (the
            PyTorch chunkwise CG of :mod:`solvers`, any device and policy, fp64 included) or
            ``"auto"``: Triton on CUDA tensors, torch otherwise. Both are differentiable with the
            implicit backward of :mod:`solvers.implicit` (an adjoint CG solve per token).
        bwd_steps, bwd_tol: step cap and tolerance of the adjoint solve (default: ``steps``, ``tol``).
        bwd_contractions: Triton backend only: the gradient contractions after the adjoint solve in
            the kernels of :mod:`kernels.chunk_bwd` (``"triton"``, the default: 25-50x faster than
            ``"torch"`` on an H100, benchmarks/README.md) or in PyTorch (``"torch"``: the chunkwise
            formulas of :func:`solvers.implicit.chunked_gradients`, fp32, a cross-check).

    Returns:
        ``o [B,T,H,Dv]`` (float32), then ``(H_T, G_T)`` if ``output_final_state``, then the stats if
        ``return_stats``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if isinstance(q, torch.Tensor) and q.is_cuda else "torch"
    if bwd_contractions not in ("torch", "triton"):
        raise ValueError(f"bwd_contractions must be 'torch' or 'triton', got {bwd_contractions!r}")
    check_iteration_options(steps, tol, x0)
    if precond not in PRECOND_CHOICES:
        raise ValueError(f"precond must be one of {PRECOND_CHOICES}, got {precond!r}")
    validate_inputs(q, k, v, g, beta, lam, initial_state, cu_seqlens, check_values=validate)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if backend == "triton":
        pol = _kernel_policy(policy)
        interpreted = _require_triton(chunk_cg._chunk_cg_kernel)
        for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("lam", lam)):
            _check_device(name, x, interpreted)
        D, Dv = q.shape[3], v.shape[3]
        if D > MAX_D or Dv > MAX_D:
            raise ValueError(f"head dims up to {MAX_D} are supported (the chunk's D x D state is held on chip); "
                             f"got D = {D}, Dv = {Dv}")
    else:
        pol = get_policy(policy)
    return_stats = return_stats or return_x
    if cu_seqlens is not None:
        return _varlen(q, k, v, g, beta, lam, cu_seqlens, initial_state, output_final_state, return_stats,
                       dict(steps=steps, tol=tol, x0=x0, precond=precond, policy=pol, chunk_size=chunk_size,
                            return_x=return_x, validate=False, num_warps=num_warps, backend=backend,
                            bwd_steps=bwd_steps, bwd_tol=bwd_tol, bwd_contractions=bwd_contractions))
    cfg = SolveConfig(pol, steps, tol, x0, precond, chunk_size, bwd_steps, bwd_tol)
    H0, G0 = (None, None) if initial_state is None else initial_state
    if backend == "torch":
        o, H_T, G_T, x, n_steps, res = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, cfg)
    else:
        o, H_T, G_T, x, n_steps, res = TritonMesa.apply(q, k, v, g, beta, lam, H0, G0, cfg, num_warps,
                                                         bwd_contractions)
    out = [o]
    if output_final_state:
        out.append((H_T, G_T))
    if return_stats:
        out.append(MesaStats(n_steps, res, x if return_x else None))
    return out[0] if len(out) == 1 else tuple(out)


class TritonMesa(torch.autograd.Function):
    """The Triton forward with the implicit backward: the adjoint CG solve in the Triton kernel, the
    gradient contractions in the kernels of :mod:`kernels.chunk_bwd` (or by
    :func:`solvers.implicit.implicit_backward` in PyTorch, ``bwd_contractions="torch"``). The upstream
    gradients are scaled by a power of two first (:func:`_upstream_scale`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lam, H0, G0, cfg: SolveConfig, num_warps, bwd_contractions):
        init = None if H0 is None else (H0, G0)
        o, (H_T, G_T), n_steps, res, x = _triton_forward(q, k, v, g, beta, lam, init, cfg, num_warps)
        ctx.cfg, ctx.num_warps, ctx.bwd_contractions = cfg, num_warps, bwd_contractions
        ctx.save_for_backward(q, k, v, g, beta, lam, H0, G0, x)
        ctx.mark_non_differentiable(x, n_steps, res)
        return o, H_T, G_T, x, n_steps, res

    @staticmethod
    def backward(ctx, do, dH_T, dG_T, _dx, _d_steps, _d_res):
        *inputs, x = ctx.saved_tensors
        q, k, v, g, beta, lam, H0, G0 = inputs
        init = None if H0 is None else (H0, G0)
        needs = ctx.needs_input_grad[:8]
        do = do.contiguous()
        if ctx.bwd_contractions == "triton":
            return (*_triton_backward(inputs, needs, x, ctx.cfg, ctx.num_warps, do, dH_T, dG_T), None, None, None)
        # the adjoint solve y_t = A_t^{-1} G_t^T e_t runs in the Triton CG kernel (ADJOINT mode), on e / s
        sc = _upstream_scale(do, dH_T, dG_T)
        *_, y = _triton_forward(q, k, v, g, beta, lam, init, ctx.cfg, ctx.num_warps, adjoint=do, x_fwd=x, scale=sc)
        dH_T, dG_T = (None if t is None else t.to(torch.float32) * sc[0] for t in (dH_T, dG_T))
        grads = implicit_backward(inputs, needs, x, ctx.cfg, do.to(torch.float32) * sc[0], dH_T, dG_T, y=y)
        return (*(None if t is None else t * sc[1] for t in grads), None, None, None)


def _triton_forward(q, k, v, g, beta, lam, initial_state, cfg: SolveConfig, num_warps, adjoint=None,
                    x_fwd=None, scale=None):
    """The kernels: chunk states, then the fused CG and output. Returns (o, final, steps, residual, x).

    With ``adjoint = e`` (``[B,T,H,Dv]``, the upstream gradient) and the forward's ``x_fwd`` the same
    kernel solves the adjoint systems ``A_t y_t = G_t^T e_t`` instead (its right-hand side formed in
    the kernel), with the backward's step cap and tolerance, and returns y in place of x and, in place
    of the output, the per-token ``a0_t = e_t.o_t - y_t.(H_t x_t)`` ``[B,T,H]`` of the log-decay
    gradient. With ``scale = [1/s, s]`` (:func:`_upstream_scale`) it reads e / s: y and a0 are then
    those of e / s."""
    interpreted = _is_interpreted(chunk_cg._chunk_cg_kernel)
    pol = cfg.policy
    D, Dv = q.shape[3], v.shape[3]
    in_dt = pol.input_dtype
    # inputs already in a format the policy's input dtype holds exactly (bf16 or fp16 under an fp32
    # input policy) stay as they are: the CG kernel reads them without loss and half the bytes
    if not (in_dt == torch.float32 and q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16)):
        q, k, v = (t.to(in_dt) for t in (q, k, v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.to(torch.float32).contiguous()
    beta = beta.to(torch.float32).contiguous()
    lam = lam.to(torch.float32).contiguous()
    B, T, H, _ = q.shape
    C = min(cfg.chunk_size, T)
    # the states' products follow the policy: bf16x3 splits (whatever the input dtype), otherwise the
    # policy's input dtype (fp32 inputs -> ieee products)
    split = pol.operand == "bf16x3"
    ks, vs = (k, v) if split else (k.to(in_dt), v.to(in_dt))
    Hc, Gc, final = chunk_states(ks, vs, g, beta, chunk_size=C, initial_state=initial_state,
                                 state_dtype=pol.state_dtype, check_values=False, split=split)
    N = Hc.shape[2]
    dev = q.device
    x = torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
    n_steps = torch.empty(B, T, H, dtype=torch.int32, device=dev)
    res = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    # the output o [B,T,H,Dv], or with the adjoint a0 [B,T,H]
    o = torch.empty(B, T, H, *(() if adjoint is not None else (Dv,)), dtype=torch.float32, device=dev)
    BLOCK_C = max(MIN_DOT_BLOCK, triton.next_power_of_2(C))
    BLOCK_D = max(MIN_DOT_BLOCK, triton.next_power_of_2(D))
    BLOCK_DV = max(MIN_DOT_BLOCK, triton.next_power_of_2(Dv))
    tol, steps, rhs, xf, sc = cfg.tol, cfg.steps, q, x, res
    if adjoint is not None:
        sc = (torch.ones(2, dtype=torch.float32, device=dev) if scale is None
              else scale.to(device=dev, dtype=torch.float32).contiguous())
        tol = cfg.bwd_tol if cfg.bwd_tol is not None else cfg.tol
        steps = cfg.bwd_steps if cfg.bwd_steps is not None else cfg.steps
        rhs = adjoint.to(torch.float32).contiguous()
        xf = x_fwd.to(torch.float32).contiguous()
    LAST_LAUNCH["chunk_cg" if adjoint is None else "chunk_cg_adjoint"] = chunk_cg._chunk_cg_kernel[(N, B * H)](
        rhs, k, v, g, beta, lam, Hc, Gc, o, x, n_steps, res, xf, o, sc,
        T, N, float(tol) if tol is not None else -1.0, steps,
        H=H, D=D, Dv=Dv, C=C, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        OP=chunk_cg.OP_CODES[pol.operand], K_EXACT=k.dtype == torch.bfloat16,
        X0_JACOBI=cfg.x0 == "jacobi", PRECOND=cfg.precond == "jacobi",
        HAS_TOL=tol is not None, SOFT=interpreted, ADJOINT=adjoint is not None,
        num_warps=num_warps or (8 if BLOCK_D >= 128 and pol.operand in ("fp32", "tf32", "bf16x3") else 4),
    )
    return o, final, n_steps, res, x


def _triton_backward(inputs, needs, x, cfg: SolveConfig, num_warps, do, dH_T, dG_T):
    """The whole backward in kernels: the adjoint solve (CG kernel, ADJOINT mode, which also forms
    a0 = e.o - y.(H x)), the reverse scan of the adjoint states and the per-chunk contractions
    (:mod:`kernels.chunk_bwd`); dq = s y, dlam = -s sum x * y and dg = the reverse cumulative sum of
    the per-token log-decay term are elementwise PyTorch operations. The kernels read the upstream
    gradients divided by the power of two s of :func:`_upstream_scale` and return true gradients."""
    from .chunk_bwd import chunk_contractions, reverse_states

    q, k, v, g, beta, lam, H0, G0 = inputs
    init = None if H0 is None else (H0, G0)
    sc = _upstream_scale(do, dH_T, dG_T)
    a0, final, _, _, y = _triton_forward(q, k, v, g, beta, lam, init, cfg, num_warps, adjoint=do, x_fwd=x, scale=sc)
    C = min(cfg.chunk_size, q.shape[1])
    pol = cfg.policy
    DG, DH, dG0, dH0 = reverse_states(do, y, x, g, chunk_size=C, dH_T=dH_T, dG_T=dG_T, policy=pol, scale=sc)
    # k and v as the CG kernel read them: bf16 / fp16 inputs as they are (exact operands), else the
    # policy's input dtype
    kk, vv = (k, v) if k.dtype == v.dtype and k.dtype in (torch.bfloat16, torch.float16) else (
        k.to(pol.input_dtype), v.to(pol.input_dtype))
    dk, dv, dbeta, a = chunk_contractions(kk, vv, x, y, do, g, beta, DG, DH, a0, chunk_size=C, policy=pol,
                                          scale=sc, grad_dtypes=(k.dtype, v.dtype))
    if dH_T is not None:
        a[:, -1] += (dH_T * final[0]).sum((-1, -2))
    if dG_T is not None:
        a[:, -1] += (dG_T * final[1]).sum((-1, -2))
    # dg_s = sum_{t >= s} a_t, scanned along a contiguous time axis ([B,H,T]: a scan over an outer
    # dimension is ~30x slower on the GPU)
    at = a.transpose(1, 2).contiguous()
    dg = torch.flip(torch.cumsum(torch.flip(at, [-1]), -1), [-1]).transpose(1, 2)
    s = sc[1]
    dq = torch.mul(y, s, out=torch.empty(y.shape, dtype=q.dtype, device=y.device))  # in q's dtype: one pass
    out = (dq, dk, dv, dg, dbeta, -(x * y).sum(dim=(0, 1)) * s, dH0, dG0)
    return tuple(o if need and t is not None else None for o, need, t in zip(out, needs, inputs, strict=True))


def _upstream_scale(*grads) -> torch.Tensor:
    """``[1/s, s]`` (float32 tensor, no host sync): s is the power of two with max |upstream gradient| / s
    in [1, 2).

    The backward reads the upstream gradients divided by s and returns the input gradients times s:
    both exact in binary floating point, so low-precision operands see values of order 1 whatever
    the gradient's scale (no fp16 underflow at 1e-8, no overflow at 1e4) and the gradients scale
    exactly with the upstream gradient. s = 1 when the gradients are all zero or not finite."""
    ext = [torch.stack(torch.aminmax(t.detach())).to(torch.float32) for t in grads if t is not None]
    amax = torch.cat(ext).abs().amax()  # one pass over each gradient (aminmax), no |e| temporary
    ok = (amax > 0) & torch.isfinite(amax)
    s = torch.where(ok, torch.exp2(torch.floor(torch.log2(torch.where(ok, amax, 1.0)))), 1.0)
    return torch.stack([1.0 / s, s])


def _varlen(q, k, v, g, beta, lam, cu_seqlens, initial_state, output_final_state, return_stats, opts):
    """Packed sequences: each sequence runs from its own start state (one launch per sequence)."""
    cs = cu_seqlens.tolist()
    outs, finals, stats = [], [], []
    for n, (a, b) in enumerate(zip(cs, cs[1:], strict=False)):
        init = None if initial_state is None else tuple(s[n:n + 1] for s in initial_state)
        o, fin, st = mesa_chunk(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], lam,
                                initial_state=init, output_final_state=True, return_stats=True, **opts)
        outs.append(o)
        finals.append(fin)
        stats.append(st)
    out = [torch.cat(outs, dim=1)]
    if output_final_state:
        out.append(tuple(torch.cat([f[i] for f in finals]) for i in range(2)))
    if return_stats:
        xs = [s.x for s in stats]
        out.append(MesaStats(torch.cat([s.steps for s in stats], 1), torch.cat([s.residual for s in stats], 1),
                             None if xs[0] is None else torch.cat(xs, 1)))
    return out[0] if len(out) == 1 else tuple(out)


def mesa_step(q, k, v, g, beta, lam, state, *, steps: int = 30, tol: float | None = None, x0: str = "zero",
              precond: str | None = None, return_stats: bool = False):
    """One decode step for one new token per sequence.

    Args:
        q, k: ``[B,H,D]`` (or ``[B,1,H,D]``); v: ``[B,H,Dv]``; g, beta: ``[B,H]``; lam: ``[H,D]``;
        state: ``(H [B,H,D,D], G [B,H,Dv,D])``, e.g. the final state of ``mesa_chunk``.

    Returns:
        ``(o [B,H,Dv], new_state)`` in float32 (and the stats if ``return_stats``). The update is
        ``H' = gamma H + beta k k^T``, ``G' = gamma G + beta v k^T`` in float32, then CG on
        ``(H' + Lambda) x = q`` and ``o = G' x``.
    """
    interpreted = _require_triton(decode._decode_kernel)
    check_iteration_options(steps, tol, x0)
    if precond not in PRECOND_CHOICES:
        raise ValueError(f"precond must be one of {PRECOND_CHOICES}, got {precond!r}")
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError(f"mesa_step takes one token: q has T = {q.shape[1]}; use mesa_chunk for prefill")
        q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise ValueError("state must be a pair (H [B,H,D,D], G [B,H,Dv,D])")
    # validate through the problem definition with T = 1
    validate_inputs(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], lam, tuple(state))
    for name, x in (("q", q), ("k", k), ("v", v), ("state[0]", state[0]), ("state[1]", state[1])):
        _check_device(name, x, interpreted)
    B, H, D = q.shape
    Dv = v.shape[2]
    dev = q.device
    Hs, Gs = (s.to(torch.float32).contiguous() for s in state)
    Hn, Gn = torch.empty_like(Hs), torch.empty_like(Gs)
    o = torch.empty(B, H, Dv, dtype=torch.float32, device=dev)
    x = torch.empty(B, H, D, dtype=torch.float32, device=dev)
    n_steps = torch.empty(B, H, dtype=torch.int32, device=dev)
    res = torch.empty(B, H, dtype=torch.float32, device=dev)
    decode._decode_kernel[(B * H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.to(torch.float32).contiguous(),
        beta.to(torch.float32).contiguous(), lam.to(torch.float32).contiguous(), Hs, Gs, Hn, Gn, o, x, n_steps, res,
        float(tol) if tol is not None else -1.0, steps,
        H=H, D=D, Dv=Dv, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv),
        X0_JACOBI=x0 == "jacobi", PRECOND=precond == "jacobi", HAS_TOL=tol is not None,
    )
    if squeeze:
        o = o[:, None]
    out = (o, (Hn, Gn))
    if return_stats:
        out = out + (MesaStats(n_steps, res, x),)
    return out
