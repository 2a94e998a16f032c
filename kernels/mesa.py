"""Public ops: ``mesa_chunk`` (chunkwise prefill, differentiable) and ``mesa_step`` (one-token decode).

``mesa_chunk`` = :func:`kernels.chunk_state.chunk_states` (chunk-boundary states H_c, G_c,
accumulated in float32, stored per the policy's state dtype) followed by
:mod:`kernels.chunk_cg` (per-chunk CG with early exit, and the output o = G_t x_t). Shapes as in
the peer op: ``q, k: [B,T,H,D]``, ``v: [B,T,H,Dv]``, ``g, beta: [B,T,H]`` (g = log forget gate),
``lam: [H,D]``. Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mesa_stability.solvers import MesaProblem, get_policy, validate_inputs, verdict
from mesa_stability.solvers import certificate as cert
from mesa_stability.solvers.gates import segmented_cumsum_grad
from mesa_stability.solvers.implicit import MesaImplicit, implicit_backward, spec_json
from mesa_stability.solvers.precision import (
    AUTO_TIERS,
    UNIT_ROUNDOFF,
    PrecisionPolicy,
    auto_ops,
)
from mesa_stability.solvers.spec import SolverSpec, solver_spec

from . import chunk_cg, chunk_tier, decode, residual
from .chunk_state import MIN_DOT_BLOCK, chunk_states
from .operands import OP_CODES, is_interpreted, software_rounding

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

# The default precision policy (solvers.precision.DEFAULT_POLICY, shared with the layer and the guard):
# "auto", conditioning-aware operand precision per chunk with fp32 states, covered by the certificate.
KERNEL_POLICIES = ("auto", "fp32", "tf32", "bf16x3", "bf16-fp32state", "bf16-bf16state", "fp16-fp32state",
                   "fp16-fp16state")
# Largest head dims the fused CG kernel holds on chip (H_c is a D x D tile).
MAX_D = 128
# Launch shape of the certificate's kernel (kernels/residual.py), the fastest of 4 / 8 warps and 16 /
# 32 columns of H_c on chip on an H200 at (4, 2048, 16, 128) (benchmarks/certificate_placement.py;
# run at the end of the CG program instead, it raised that kernel's spills ~10x and cost 2 to 8
# times as much: docs/certificate-gpu/).
CERTIFY_WARPS = 4
CERTIFY_BLOCK_J = 32
# The compiled kernels of the latest launches (name -> triton CompiledKernel): a diagnostic hook
# for benchmarks (registers, spills); nothing in the library reads it.
LAST_LAUNCH: dict = {}


@dataclass
class MesaStats:
    """Per-token solver statistics of a ``mesa_chunk`` / ``mesa_step`` call.

    ``certificate`` (:class:`solvers.certificate.Certificate`, when ``check`` is not None): the true
    relative residual, the free condition bound and the certified forward-error bound of every token;
    ``adjoint_certificate`` the same for the backward's adjoint solve, filled in by the backward.
    Reading either waits for the call's verdicts (:mod:`solvers.verdict`: on CUDA they are read
    without a host sync, once computed), so it is final: tier 2 where tier 1 failed."""

    steps: torch.Tensor  # [B,T,H] int32 CG iterations per token
    residual: torch.Tensor  # [B,T,H] float32 final relative residual ||r_k|| / ||r_0|| (the recursive one)
    x: torch.Tensor | None = None  # [B,T,H,D] float32 q-star
    breakdown: torch.Tensor | None = None  # [B,T,H] bool: CG stopped on p.Ap <= 0 or NaN
    backend: str | None = None  # the backend that ran: "triton" or "torch" (what backend="auto" picked)
    _certificate: cert.Certificate | None = field(default=None, repr=False)
    _adjoint_certificate: cert.Certificate | None = field(default=None, repr=False)
    # the certificate's refinement (tier 2, or None), and the verdicts not yet read
    _refine: Callable[[], cert.Certificate | None] | None = field(default=None, repr=False)
    _pending: list = field(default_factory=list, repr=False)
    # packed sequences: the stats of each sequence, whose backward fills in its adjoint certificate
    _parts: list | None = field(default=None, repr=False)

    @property
    def certificate(self) -> cert.Certificate | None:
        verdict.wait(self._pending)
        return self._certificate

    @certificate.setter
    def certificate(self, c: cert.Certificate | None) -> None:
        self._certificate = c

    @property
    def adjoint_certificate(self) -> cert.Certificate | None:
        verdict.wait(self._pending)
        if self._parts is not None and self._adjoint_certificate is None:
            parts = [p.adjoint_certificate for p in self._parts]  # each waits for its own verdicts
            if all(c is not None for c in parts):
                return _merge_certificates(parts)
        return self._adjoint_certificate

    @adjoint_certificate.setter
    def adjoint_certificate(self, c: cert.Certificate | None) -> None:
        self._adjoint_certificate = c

    @property
    def mean_steps(self) -> float:
        return float(self.steps.double().mean())


def _require_triton(module, kernel: str) -> bool:
    """Whether ``module.kernel`` runs in the interpreter; ImportError (with the install command) when
    triton is missing, in which case the kernel modules define no kernels."""
    if triton is None:
        raise ImportError("the Triton kernels need triton (pip install triton==3.6.0; on a CPU, run them with "
                          "TRITON_INTERPRET=1), and it is not installed; backend='torch' runs without it")
    return is_interpreted(getattr(module, kernel))


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


def mesa_chunk(q, k, v, g, beta, lam, spec: SolverSpec | None = None, *, initial_state=None,
               output_final_state: bool = False, cu_seqlens=None, return_stats: bool = False, return_x: bool = False,
               validate: bool = True, num_warps: int | None = None, bwd_contractions: str = "triton", **options):
    """Mesa layer: ``o_t = G_t (H_t + Lambda)^{-1} q_t`` for every token, by chunkwise CG; differentiable.

    Args:
        q, k: ``[B,T,H,D]``; v: ``[B,T,H,Dv]``; g (log forget gate, <= 0), beta (in [0,1]): ``[B,T,H]``;
            lam (> 0): ``[H,D]``. Any float dtype; cast to the policy's input dtype.
        spec: how to solve, a :class:`solvers.spec.SolverSpec` (default ``SolverSpec()``: 30 CG steps,
            policy ``"auto"``, the certificate on); ``options``, its fields, change it:

            * ``steps`` caps CG (a fixed step count when ``tol`` is None; 0 gives x = x0); with ``tol``
              each chunk stops early once all its tokens meet ``||r|| <= tol ||r_0||``;
            * ``x0``: ``"zero"``, ``"jacobi"`` (q / diag(H_t + Lambda)) or, torch backend only, ``"q"``;
              ``precond``: None or ``"jacobi"``;
            * ``policy``: the precision policy (solvers/precision.py); ``"auto"`` picks each chunk's
              operand precision from the free bound on its systems, with fp32 states;
            * ``chunk_size``: tokens per chunk (power-of-two blocks are masked); 32 was faster than 64
              on an H100 at D = 128 (benchmarks/README.md);
            * ``bwd_steps``, ``bwd_tol``: the adjoint solve's (default ``steps``, ``tol``);
            * ``check``: the accuracy certificate (:mod:`solvers.certificate`) of every token's x and,
              in the backward, of the adjoint solve: ``"warn"`` (a ``CertificateWarning`` when a
              certified relative error exceeds ``check_tol``; on CUDA it comes without a host sync,
              :mod:`solvers.verdict`), ``"raise"`` (``CertificateError``) or None (not computed). The
              message names the worst token and head, the bound, kappa and a policy that would pass;
              ``check_tol`` defaults to the policy's sqrt(u). The certificate is in the stats;
            * ``backend``: ``"triton"`` (the kernels: CUDA, or CPU through the interpreter),
              ``"torch"`` (the PyTorch chunkwise CG of :mod:`solvers`, any device and policy, fp64
              included) or ``"auto"``: Triton on CUDA tensors, torch otherwise (CPU tensors run the
              torch backend even with ``TRITON_INTERPRET=1``: pass ``"triton"`` for the kernels
              there); ``stats.backend`` says which ran. Both are differentiable with the implicit
              backward of :mod:`solvers.implicit`.
        initial_state: ``(H0 [N,H,D,D], G0 [N,H,Dv,D])``, N = B (or the number of packed sequences).
            G is ``sum beta v k^T``: the transpose of flash-linear-attention's ``h_kv`` ``[N,H,K,V]``
            (``mesa_stability.compat.fla.chunk_mesa_net`` takes and returns fla's layouts).
        output_final_state: also return ``(H_T, G_T)`` (float32 or the policy's state dtype).
        cu_seqlens: packed variable-length sequences (B = 1), int tensor ``[N+1]``. Without initial or
            final states they run as one sequence with a hard reset (g = -inf) at each sequence's first
            token (:func:`packed_resets`): one launch per kernel, and no host read of ``cu_seqlens``
            with ``validate=False``. With initial or final states, one launch per sequence.
        return_stats: also return a :class:`MesaStats` (per-token steps, residuals).
        return_x: store q-star in the stats (``return_stats`` implied).
        validate: check values too (finiteness, lam > 0, g <= 0, beta in [0, 1]: a few reductions and
            host syncs). Shapes, dtypes and devices are always checked.
        num_warps: warps per program of the CG kernel (default from an H100 sweep at D = 128, C = 32:
            8 for fp32 / tf32 / bf16x3 operands at head dims above 64, whose tiles need the registers
            of 256 threads; 4 otherwise, 1.6x faster than 8 for bf16 / fp16 operands).
        bwd_contractions: Triton backend only: the gradient contractions after the adjoint solve in
            the kernels of :mod:`kernels.chunk_bwd` (``"triton"``, the default: 25-50x faster than
            ``"torch"`` on an H100, benchmarks/README.md) or in PyTorch (``"torch"``: the chunkwise
            formulas of :func:`solvers.implicit.chunked_gradients`, fp32, a cross-check). On a GPU,
            ``"triton"`` falls back to ``"torch"`` with an ``UnverifiedKernelWarning`` at chunk sizes
            outside :func:`kernels.chunk_bwd.contractions_verified` (above 32 for the 16-bit and fp32
            operands: an out-of-bounds shared-memory read was found at chunk 64, D = 128).

    The op computes in the policy's precision whatever ``torch.autocast`` is active. Under
    ``torch.compile`` each backend is one registered operator (``fullgraph=True`` traces it; pass a
    prebuilt spec and no keyword options there, and no stats are returned; packed sequences run
    eagerly, a graph break). ``torch.func.grad`` and ``vmap`` transform the torch backend.

    Returns:
        ``o [B,T,H,Dv]`` (float32), then ``(H_T, G_T)`` if ``output_final_state``, then the stats if
        ``return_stats``.
    """
    spec = solver_spec(spec, **options)
    if spec.method != "cg":
        raise ValueError(f"mesa_chunk solves by CG (SolverSpec.method 'cg'), got {spec.method!r}; the reference "
                         "solvers are solvers.solve's (and MesaLayer's)")
    if traced():
        return _traced_chunk(q, k, v, g, beta, lam, spec, initial_state, output_final_state, cu_seqlens,
                             return_stats or return_x)
    if transformed(q, k, v, g, beta, lam):
        return _transformed_chunk(q, k, v, g, beta, lam, spec, initial_state, output_final_state, cu_seqlens,
                                  return_stats or return_x)
    verdict.poll()  # the warnings of earlier calls whose verdicts the GPU has computed by now
    dev_type = q.device.type if isinstance(q, torch.Tensor) else "cpu"
    where = verdict.call_site() if spec.check is not None else None  # named by the warnings, also the backward's
    with torch.autocast(dev_type, enabled=False):  # the policy decides the precision, not autocast
        out, stats, pol = _mesa_chunk(q, k, v, g, beta, lam, spec, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                      validate=validate, num_warps=num_warps, bwd_contractions=bwd_contractions,
                                      where=where, final_states=output_final_state)
    check = spec.check
    if stats._certificate is not None:
        stats._pending.append(verdict.submit(stats._certificate, check, pol, refine=stats._refine,
                                             store=functools.partial(setattr, stats, "_certificate"), where=where))
        stats._refine = None
    res = [out[0]]
    if output_final_state:
        res.append(out[1])
    if return_stats or return_x:
        if not return_x:
            stats.x = None
        res.append(stats)
    return res[0] if len(res) == 1 else tuple(res)


# the initial guesses the CG kernels implement (the torch backend also has "q", solvers.cg)
KERNEL_X0 = ("zero", "jacobi")


def _check_kernel_x0(spec: SolverSpec) -> None:
    if spec.x0 not in KERNEL_X0:
        raise ValueError(f"x0={spec.x0!r} runs on the torch backend only (backend='torch'); the kernels implement "
                         f"x0 in {KERNEL_X0}")


def transformed(*tensors) -> bool:
    """Whether the op runs under a ``torch.func`` transform (``vmap``, ``grad``, ...)."""
    return any(isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _transformed_chunk(q, k, v, g, beta, lam, spec: SolverSpec, initial_state, output_final_state, cu_seqlens,
                       wants_stats: bool):
    """mesa_chunk under ``torch.func`` transforms: the torch backend's :class:`MesaImplicit` (its
    ``setup_context`` serves grad, its ``vmap`` rule solves each mapped slice as its own problem),
    the values checked by its forward slice by slice. The certificate is not formed there (its
    verdict is a host decision on batched data): a warning says so once; check it eagerly."""
    backend = spec.backend if spec.backend != "auto" else ("triton" if q.is_cuda else "torch")
    if backend != "torch":
        raise ValueError("torch.func transforms (grad, vmap, ...) run the torch backend only: pass backend='torch' "
                         "(the Triton kernels' autograd Function has no functorch rules)")
    if wants_stats or cu_seqlens is not None:
        raise ValueError("return_stats / return_x and cu_seqlens are not available under torch.func transforms; "
                         "call the op eagerly for them")
    validate_inputs(q, k, v, g, beta, lam, initial_state, check_values=False)
    if spec.check is not None:
        warnings.warn("mesa_chunk under torch.func transforms forms no accuracy certificate (check it in an eager "
                      "call); pass check=None to silence this", UserWarning, stacklevel=3)
    H0, G0 = (None, None) if initial_state is None else initial_state
    o, H_T, G_T, *_ = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, spec)
    return (o, (H_T, G_T)) if output_final_state else o


def traced() -> bool:
    """Whether the op is being traced by torch.compile (it then runs as one registered operator)."""
    return torch.compiler.is_compiling()


def _traced_chunk(q, k, v, g, beta, lam, spec: SolverSpec, initial_state, output_final_state, cu_seqlens,
                  wants_stats: bool):
    """mesa_chunk under torch.compile: one registered operator, ``torch.ops.mesa_stability.mesa_torch``
    (the torch backend, :mod:`solvers.implicit`) or ``mesa_triton`` (the kernels,
    :mod:`kernels.registered_op`), whose certificate is decided inside it; packed sequences run
    eagerly (a graph break). Pass a
    :class:`SolverSpec` made outside the compiled code (as ``MesaLayer`` holds one) and no keyword
    options: building a spec is not traceable."""
    if wants_stats:
        raise ValueError("return_stats / return_x are not available under torch.compile (the op is one graph "
                         "node); call the op eagerly for its stats")
    backend = spec.backend if spec.backend != "auto" else ("triton" if q.is_cuda else "torch")
    if cu_seqlens is not None:
        return _eager_chunk(q, k, v, g, beta, lam, spec.replace(backend=backend), initial_state, output_final_state,
                            cu_seqlens)
    validate_inputs(q, k, v, g, beta, lam, initial_state, check_values=False)  # the values: inside the operator
    H0, G0 = (None, None) if initial_state is None else initial_state
    op = torch.ops.mesa_stability.mesa_triton if backend == "triton" else torch.ops.mesa_stability.mesa_torch
    o, H_T, G_T, *_ = op(q, k, v, g, beta, lam, H0, G0, spec_json(spec))  # each op runs its own backend
    return (o, (H_T, G_T)) if output_final_state else o


@torch.compiler.disable
def _eager_chunk(q, k, v, g, beta, lam, spec, initial_state, output_final_state, cu_seqlens):
    return mesa_chunk(q, k, v, g, beta, lam, spec, initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens)


def _mesa_chunk(q, k, v, g, beta, lam, spec: SolverSpec, *, initial_state, cu_seqlens, validate, num_warps,
                bwd_contractions, where=None, final_states: bool = True):
    """mesa_chunk without the final check: ``((o, (H_T, G_T)), stats, policy)``; the stats hold x and,
    when ``spec.check`` is not None, the certificate (and its refinement, ``stats._refine``). The
    backward checks the adjoint's certificate itself, naming the call site ``where``. Packed sequences
    whose ``final_states`` are not wanted (and with no initial state) run as one (:func:`packed_resets`);
    their ``(H_T, G_T)`` is then the last sequence's."""
    backend = spec.backend
    if backend == "auto":
        backend = "triton" if isinstance(q, torch.Tensor) and q.is_cuda else "torch"
    if bwd_contractions not in ("torch", "triton"):
        raise ValueError(f"bwd_contractions must be 'torch' or 'triton', got {bwd_contractions!r}")
    validate_inputs(q, k, v, g, beta, lam, initial_state, cu_seqlens, check_values=validate)
    if backend == "triton":
        pol = _kernel_policy(spec.policy)
        _check_kernel_x0(spec)
        interpreted = _require_triton(chunk_cg, "_chunk_cg_kernel")
        for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("lam", lam)):
            _check_device(name, x, interpreted)
        D, Dv = q.shape[3], v.shape[3]
        if D > MAX_D or Dv > MAX_D:
            raise ValueError(f"head dims up to {MAX_D} are supported (the chunk's D x D state is held on chip); "
                             f"got D = {D}, Dv = {Dv}")
    else:
        pol = spec.policy
    check, threshold = spec.check, spec.threshold
    if cu_seqlens is not None and initial_state is None and not final_states:
        g, cu_seqlens = packed_resets(g, cu_seqlens), None
    if cu_seqlens is not None:
        return _varlen(q, k, v, g, beta, lam, cu_seqlens, initial_state,
                       dict(spec=spec.replace(backend=backend), validate=False, num_warps=num_warps,
                            bwd_contractions=bwd_contractions, where=where))
    cfg = spec
    H0, G0 = (None, None) if initial_state is None else initial_state
    stats = MesaStats(None, None)
    certify = (check, threshold, where) if check is not None else None
    if backend == "torch":
        hook = None
        if certify is not None:
            def hook(y, do):
                verdict.poll()
                c = cert.certify_exact(_problem(q, k, v, g, beta, lam, initial_state), y, pol, threshold=threshold,
                                       e=do, chunk_size=cfg.chunk_size, what="adjoint y")
                stats.adjoint_certificate = c
                stats._pending.append(verdict.submit(c, check, pol, where=where))
        o, H_T, G_T, x, n_steps, res = MesaImplicit.apply(q, k, v, g, beta, lam, H0, G0, cfg, hook)
        brk = None
        if certify is not None:
            c = cert.certify_exact(_problem(q, k, v, g, beta, lam, initial_state), x.detach(), pol,
                                   threshold=threshold, chunk_size=cfg.chunk_size)
            # the certificate bounds x; an output that overflowed fails too
            c.bound = torch.where(torch.isfinite(o.detach()).all(-1), c.bound, math.inf)
            stats.certificate = c
    else:
        o, H_T, G_T, x, n_steps, res, brk8, cert_buf = TritonMesa.apply(q, k, v, g, beta, lam, H0, G0, cfg,
                                                                       num_warps, bwd_contractions, certify, stats)
        brk = brk8 > 0
        if certify is not None:
            # tier 1 from the kernel (an output row that is not finite fails there); tier 2 if it fails
            stats.certificate = _tier1(brk, cert_buf, threshold, "x")
            stats._refine = _refiner((q, k, v, g, beta, lam, initial_state), x, pol, threshold, brk, o=o)
    stats.steps, stats.residual, stats.x, stats.breakdown, stats.backend = n_steps, res, x, brk, backend
    return (o, (H_T, G_T)), stats, pol


def _problem(q, k, v, g, beta, lam, initial_state, cu_seqlens=None) -> MesaProblem:
    """The inputs as a :class:`MesaProblem` (detached), for the float64 certificate."""
    init = None if initial_state is None else tuple(t.detach() for t in initial_state)
    return MesaProblem(q.detach(), k.detach(), v.detach(), g.detach(), beta.detach(), lam.detach(), init, cu_seqlens)


def _tier1(brk, buf, threshold: float, what: str, y=None) -> cert.Certificate:
    """The kernels' tier-1 certificate: ``buf`` ``[B,T,H,3]`` (rho, kappa, bound) and the breakdown
    flags ``brk``; ``y``: the adjoint's solution, whose norms make its verdict normwise."""
    return cert.Certificate(buf[..., 0], buf[..., 1], buf[..., 2], brk > 0, threshold, 1, what,
                            None if y is None else y.detach().norm(dim=-1))


def _refiner(inputs, x, pol: PrecisionPolicy, threshold: float, brk, e=None, what: str = "x", o=None, watch=()):
    """The tier-2 refinement of a failed tier 1 (solvers/certificate.py: float64 residual from the
    inputs), as a closure for :func:`solvers.verdict.submit`; it gives None (the verdict stays tier 1)
    when one of the inputs, x or ``e`` was modified in place since (version counters), as it may have
    been by the time a deferred verdict is read (also ``watch``). ``e``: a callable giving the upstream
    gradient the adjoint solved for; ``o``: the forward's output, whose non-finite rows fail tier 2 too."""
    q, k, v, g, beta, lam, init = inputs
    tensors = [t for t in (q, k, v, g, beta, lam, x, o, *(init or ()), *watch) if t is not None]
    versions = [t._version for t in tensors]

    def refine():
        if [t._version for t in tensors] != versions:
            return None
        c = cert.certify_exact(_problem(q, k, v, g, beta, lam, init), x.detach(), pol, threshold=threshold,
                               e=None if e is None else e(), breakdown=brk > 0, chunk_size=64, what=what)
        if o is not None:
            c.bound = torch.where(torch.isfinite(o.detach()).all(-1), c.bound, math.inf)
        return c

    return refine


class TritonMesa(torch.autograd.Function):
    """The Triton forward with the implicit backward: the adjoint CG solve in the Triton kernel, the
    gradient contractions in the kernels of :mod:`kernels.chunk_bwd` (or by
    :func:`solvers.implicit.implicit_backward` in PyTorch, ``bwd_contractions="torch"``). The upstream
    gradients are scaled by a power of two first (:func:`_upstream_scale`). With ``certify =
    (mode, threshold)`` both solves write the certificate buffer; the adjoint's certificate goes to
    ``stats.adjoint_certificate`` and is checked in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, lam, H0, G0, cfg: SolverSpec, num_warps, bwd_contractions, certify, stats):
        init = None if H0 is None else (H0, G0)
        o, (H_T, G_T), n_steps, res, x, (brk, buf) = _triton_forward(q, k, v, g, beta, lam, init, cfg, num_warps,
                                                                     certify=certify is not None)
        ctx.cfg, ctx.num_warps, ctx.bwd_contractions = cfg, num_warps, bwd_contractions
        ctx.certify, ctx.stats = certify, stats
        ctx.save_for_backward(q, k, v, g, beta, lam, H0, G0, x)
        ctx.mark_non_differentiable(x, n_steps, res, brk)
        if buf is not None:
            ctx.mark_non_differentiable(buf)
        return o, H_T, G_T, x, n_steps, res, brk, buf

    @staticmethod
    def backward(ctx, do, dH_T, dG_T, _dx, _d_steps, _d_res, _d_brk, _d_buf):
        *inputs, x = ctx.saved_tensors
        grads = _triton_grads(inputs, ctx.needs_input_grad[:8], x, ctx.cfg, ctx.num_warps, ctx.bwd_contractions,
                              ctx.certify, ctx.stats, do, dH_T, dG_T)
        return (*grads, *(None,) * 5)


def _triton_grads(inputs, needs, x, cfg: SolverSpec, num_warps, bwd_contractions, certify, stats, do, dH_T, dG_T):
    """The implicit backward on the kernels (:class:`TritonMesa`): the gradients of the 8 inputs
    ``(q, k, v, g, beta, lam, H0, G0)`` (None where not needed), the adjoint's certificate put in
    ``stats`` and checked when ``certify = (mode, threshold, where)``."""
    q, k, v, g, beta, lam, H0, G0 = inputs
    init = None if H0 is None else (H0, G0)
    do = do.contiguous()
    # the adjoint solve y_t = A_t^{-1} G_t^T e_t runs in the Triton CG kernel (ADJOINT mode), on e / s;
    # it also forms a0 = e.o - y.(H x) of the log-decay gradient
    verdict.poll()
    sc = _upstream_scale(do, dH_T, dG_T)
    a0, final, _, _, y, buf = _triton_forward(q, k, v, g, beta, lam, init, cfg, num_warps, adjoint=do, x_fwd=x,
                                              scale=sc, certify=certify is not None)
    if certify is not None:
        mode, threshold, where = certify
        brk, out = buf
        stats.adjoint_certificate = _tier1(brk, out, threshold, "adjoint y", y=y)
        refine = _refiner((q, k, v, g, beta, lam, init), y, cfg.policy, threshold, brk,
                          e=lambda: do.to(torch.float32) * sc[0], what="adjoint y", watch=(do,))
        stats._pending.append(verdict.submit(stats._adjoint_certificate, mode, cfg.policy, refine=refine,
                                             store=functools.partial(setattr, stats, "_adjoint_certificate"),
                                             where=where))
    if bwd_contractions == "triton":
        from .chunk_bwd import VERIFIED_CONTRACT_BLOCK_C, UnverifiedKernelWarning, contractions_verified

        C, bpol = _contraction_setup(cfg, q.shape[1])
        if contractions_verified(C, bpol, q.device):
            return _triton_backward(inputs, needs, x, y, a0, final, sc, cfg, do, dH_T, dG_T)
        warnings.warn(f"chunk_size {C} with the {bpol.name} operands: the Triton contraction kernel of the "
                      "backward is not verified on the GPU at this chunk size (an out-of-bounds shared-memory "
                      "read at chunk 64, D = 128, see kernels.chunk_bwd.VERIFIED_CONTRACT_BLOCK_C); the "
                      "contractions run in PyTorch instead (the same gradients, slower). chunk_size <= "
                      f"{VERIFIED_CONTRACT_BLOCK_C} keeps them in the kernel.", UnverifiedKernelWarning, stacklevel=2)
    dH_T, dG_T = (None if t is None else t.to(torch.float32) * sc[0] for t in (dH_T, dG_T))
    grads = implicit_backward(inputs, needs, x, cfg, do.to(torch.float32) * sc[0], dH_T, dG_T, y=y)
    return tuple(None if t is None else t * sc[1] for t in grads)


def _launch_classes(pol: PrecisionPolicy, adjoint: bool = False):
    """``[(class, (OP_H, OP_K, OP_CERT))]`` kernel codes of a policy's products: named policies have one
    class (None: every chunk in one launch); ``auto`` one per tier of AUTO_TIERS, with the tier's
    products (:func:`solvers.precision.auto_ops`: the adjoint solve at least bf16x3) and the
    certificate in fp32 for the fp32 tier, bf16x3 otherwise."""
    codes = OP_CODES
    if pol.operand == "auto":
        return [(c, (*(codes[op] for op in auto_ops(t, adjoint)), codes["fp32" if t == "fp32" else "bf16x3"]))
                for c, t in enumerate(AUTO_TIERS)]
    op = codes[pol.operand]
    return [(None, (op, op, codes[cert.cert_operand(pol)]))]


def _triton_forward(q, k, v, g, beta, lam, initial_state, cfg: SolverSpec, num_warps, adjoint=None,
                    x_fwd=None, scale=None, certify: bool = False):
    """The kernels: chunk states, then the fused CG and output. Returns (o, final, steps, residual, x,
    (breakdown [B,T,H] int8, certificate [B,T,H,3] float32 rho / kappa / bound, or None)).

    With ``adjoint = e`` (``[B,T,H,Dv]``, the upstream gradient) and the forward's ``x_fwd`` the same
    kernel solves the adjoint systems ``A_t y_t = G_t^T e_t`` instead (its right-hand side formed in
    the kernel), with the backward's step cap and tolerance, and returns y in place of x and, in place
    of the output, the per-token ``a0_t = e_t.o_t - y_t.(H_t x_t)`` ``[B,T,H]`` of the log-decay
    gradient. With ``scale = [1/s, s]`` (:func:`_upstream_scale`) it reads e / s: y and a0 are then
    those of e / s. The ``auto`` policy launches the CG kernel once per tier; each program whose
    chunk (:mod:`kernels.chunk_tier`) is of another tier returns at once. With ``certify`` each
    program ends with its chunk's certificate (:mod:`kernels.residual`): the residual of the caller's
    system ``given = (q, k, v)``, not the policy's rounding of it."""
    soft = software_rounding(chunk_cg._chunk_cg_kernel)
    pol = cfg.policy
    D, Dv = q.shape[3], v.shape[3]
    in_dt = pol.input_dtype
    # the caller's system, which the certificate checks (the policy may round it to its input dtype)
    given = (q, k, v)
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
    # the states' products follow the policy: bf16x3 splits (whatever the input dtype; also auto's
    # states), otherwise the policy's input dtype (fp32 inputs -> ieee products)
    split = pol.operand in ("bf16x3", "auto")
    ks, vs = (k, v) if split else (k.to(in_dt), v.to(in_dt))
    Hc, Gc, final = chunk_states(ks, vs, g, beta, chunk_size=C, initial_state=initial_state,
                                 state_dtype=pol.state_dtype, check_values=False, split=split)
    N = Hc.shape[2]
    dev = q.device
    x = torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
    n_steps = torch.empty(B, T, H, dtype=torch.int32, device=dev)
    res = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    brk = torch.empty(B, T, H, dtype=torch.int8, device=dev)
    # the output o [B,T,H,Dv], or with the adjoint a0 [B,T,H]
    o = torch.empty(B, T, H, *(() if adjoint is not None else (Dv,)), dtype=torch.float32, device=dev)
    BLOCK_C = max(MIN_DOT_BLOCK, triton.next_power_of_2(C))
    BLOCK_D = max(MIN_DOT_BLOCK, triton.next_power_of_2(D))
    BLOCK_DV = max(MIN_DOT_BLOCK, triton.next_power_of_2(Dv))
    tol, steps, rhs, xf, sc = cfg.tol, cfg.steps, q, None, None
    if adjoint is not None:
        sc = (torch.ones(2, dtype=torch.float32, device=dev) if scale is None
              else scale.to(device=dev, dtype=torch.float32).contiguous())
        tol = cfg.bwd_tol if cfg.bwd_tol is not None else cfg.tol
        steps = cfg.bwd_steps if cfg.bwd_steps is not None else cfg.steps
        rhs = adjoint.to(torch.float32).contiguous()
        xf = x_fwd.to(torch.float32).contiguous()
    classes = _launch_classes(pol, adjoint is not None)
    cls = chunk_tier.chunk_tiers(Hc, k, g, beta, lam, C) if classes[0][0] is not None else None
    cert_out, qg, kg, vg, Hs, Gs, eps_S = None, None, None, None, None, None, 0.0
    if certify:
        qg, kg, vg = (t.contiguous() for t in given)
        Hs, Gs, eps_S = _certificate_states(pol, kg, vg, g, beta, Hc, Gc, initial_state, C, adjoint is not None)
        cert_out = torch.empty(B, T, H, 3, dtype=torch.float32, device=dev)
    for my_class, (op_h, op_k, _) in classes:
        wide = BLOCK_D >= 128 and OP_CODES["bf16"] not in (op_h, op_k)
        kernel = chunk_cg._chunk_cg_kernel[(N, B * H)](
            rhs, k, v, g, beta, lam, Hc, Gc, o, x, n_steps, res, xf, sc, cls, brk,
            T, N, float(tol) if tol is not None else -1.0, steps,
            H=H, D=D, Dv=Dv, C=C, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            OP_H=op_h, OP_K=op_k, MY_CLASS=my_class or 0, K_EXACT=k.dtype == torch.bfloat16,
            X0_JACOBI=cfg.x0 == "jacobi", PRECOND=cfg.precond == "jacobi", HAS_TOL=tol is not None,
            SOFT=soft, num_warps=num_warps or (8 if wide else 4),
        )
        name = "chunk_cg" if adjoint is None else "chunk_cg_adjoint"
        LAST_LAUNCH[name if my_class is None else f"{name}_{AUTO_TIERS[my_class]}"] = kernel
    if cert_out is not None:
        for my_class, (_, _, op_cert) in classes:
            LAST_LAUNCH["certify" if my_class is None else f"certify_{AUTO_TIERS[my_class]}"] = \
                residual._certify_kernel[(N, B * H)](
                    None if adjoint is not None else qg, None if adjoint is None else rhs, sc, kg, vg, g, beta, lam,
                    Hs, Gs, x, o, cls, cert_out, T, N, _residual_rounding(op_cert, D, C), eps_S,
                    H=H, D=D, Dv=Dv, C=C, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                    BLOCK_J=min(CERTIFY_BLOCK_J, BLOCK_D), OP=op_cert, MY_CLASS=my_class or 0,
                    KG_EXACT=kg.dtype == vg.dtype == torch.bfloat16, SOFT=soft, num_warps=CERTIFY_WARPS)
    return o, final, n_steps, res, x, (brk, cert_out)


_OP_NAMES = {code: name for name, code in OP_CODES.items()}


def _residual_rounding(op_cert: int, D: int, C: int) -> float:
    """``gamma_c`` of :mod:`solvers.certificate` for the kernel's residual: operands of precision
    ``op_cert`` rounded once each, fp32 accumulation over D + C terms."""
    return 2 * UNIT_ROUNDOFF[_OP_NAMES[op_cert]] + math.sqrt(D + C) * UNIT_ROUNDOFF["fp32"]


def _certificate_states(pol, k, v, g, beta, Hc, Gc, initial_state, C, values: bool):
    """``(H_c, G_c, eps_S)`` that the tier-1 certificate (:mod:`kernels.residual`) reads: states with
    products at least as accurate as bf16x3 and fp32 storage, and the rounding ``eps_S`` they carry
    (:func:`solvers.certificate.state_error`). The solve's own under the fp32-input policies; the
    16-bit policies' states (16-bit products, or 16-bit storage) are formed again from the caller's k,
    v with bf16x3 products (:func:`chunk_states`; G only for the adjoint, ``values``, whose right-hand
    side needs it), so that their rounding shows in the measured residual rather than in the a-priori
    term eps_S, which would exceed the check threshold on ordinary inputs (kappa u_bf16 ~ 0.07 at
    kappa ~ 18)."""
    if pol.state != "fp32" or pol.input in ("bf16", "fp16"):
        kk, vv = (k, v) if k.dtype == v.dtype else (k.float(), v.float())
        Hs, Gs, _ = chunk_states(kk, vv, g, beta, chunk_size=C, initial_state=initial_state,
                                 state_dtype=torch.float32, check_values=False, split=True, values=values)
        return Hs, Gs, cert.state_error(get_policy("bf16x3"), Hc.shape[2], compensated=True)
    return Hc, Gc, cert.state_error(pol, Hc.shape[2], compensated=pol.state == "fp32")


def _contraction_setup(cfg: SolverSpec, T: int):
    """``(chunk size, policy)`` of the backward's contractions for a sequence of T tokens: ``auto``'s
    products are those of its middle tier, bf16x3."""
    return min(cfg.chunk_size, T), get_policy("bf16x3") if cfg.policy.operand == "auto" else cfg.policy


def _triton_backward(inputs, needs, x, y, a0, final, sc, cfg: SolverSpec, do, dH_T, dG_T):
    """The backward contractions in kernels, after the adjoint solve (y, and a0 = e.o - y.(H x), from
    the CG kernel in ADJOINT mode, read e / s): the reverse scan of the adjoint states and the
    per-chunk contractions (:mod:`kernels.chunk_bwd`); dq = s y, dlam = -s sum x * y and dg = the
    reverse cumulative sum of the per-token log-decay term, restarting at every hard reset
    (:func:`_log_decay_grad`), are PyTorch operations. The kernels read the
    upstream gradients divided by the power of two s of :func:`_upstream_scale` and return true
    gradients."""
    from .chunk_bwd import chunk_contractions, reverse_states

    q, k, v, g, beta, lam, H0, G0 = inputs
    pol = cfg.policy
    C, bpol = _contraction_setup(cfg, q.shape[1])
    DG, DH, dG0, dH0 = reverse_states(do, y, x, g, chunk_size=C, dH_T=dH_T, dG_T=dG_T, policy=bpol, scale=sc)
    # k and v as the CG kernel read them: bf16 / fp16 inputs as they are (exact operands), else the
    # policy's input dtype
    kk, vv = (k, v) if k.dtype == v.dtype and k.dtype in (torch.bfloat16, torch.float16) else (
        k.to(pol.input_dtype), v.to(pol.input_dtype))
    dk, dv, dbeta, a = chunk_contractions(kk, vv, x, y, do, g, beta, DG, DH, a0, chunk_size=C, policy=bpol,
                                          scale=sc, grad_dtypes=(k.dtype, v.dtype))
    if dH_T is not None:
        a[:, -1] += (dH_T * final[0]).sum((-1, -2))
    if dG_T is not None:
        a[:, -1] += (dG_T * final[1]).sum((-1, -2))
    dg = _log_decay_grad(a, g)
    s = sc[1]
    dq = torch.mul(y, s, out=torch.empty(y.shape, dtype=q.dtype, device=y.device))  # in q's dtype: one pass
    out = (dq, dk, dv, dg, dbeta, -(x * y).sum(dim=(0, 1)) * s, dH0, dG0)
    return tuple(o if need and t is not None else None for o, need, t in zip(out, needs, inputs, strict=True))


def _log_decay_grad(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dg [B,T,H]``: ``dg_s = sum_{t >= s in s's segment} a_t``, zero at a reset
    (:func:`solvers.gates.segmented_cumsum_grad`), scanned along a contiguous time axis ([B,H,T]: a
    scan over an outer dimension is ~30x slower on the GPU). :func:`kernels.reverse_cumsum.
    segmented_reverse_cumsum` computes the same sums in one launch; it replaces this scan once the
    production guard has run on it (``benchmarks/bench_dg_scan.py`` times both)."""
    at = a.transpose(1, 2).contiguous()
    return segmented_cumsum_grad(at, g.transpose(1, 2).to(torch.float32)).transpose(1, 2)


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


def _merge_certificates(certs: list) -> cert.Certificate:
    """The certificates of packed sequences as one: tokens concatenated, the highest tier. An adjoint's
    normwise verdict (``solution_norms``) then covers the packed tokens together, per head."""
    norms = None if certs[0].solution_norms is None else torch.cat([c.solution_norms for c in certs], 1)
    return cert.Certificate(
        *(torch.cat([getattr(c, f) for c in certs], 1) for f in ("residual", "kappa", "bound", "breakdown")),
        certs[0].threshold, max(c.tier for c in certs), certs[0].what, norms)


def packed_resets(g: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``g [1,T,H]`` with a hard reset, ``g = -inf`` (gamma = 0 exactly, :mod:`kernels.gates`), at the
    first token of every packed sequence after the first: ``H_t = gamma_t H_{t-1} + beta_t k_t k_t^T``
    then restarts from the zero state there, so the packed run is each sequence run from zero. The
    gradient of g at a reset is 0, as that of a sequence's first gate (it multiplies the zero
    state). Built on g's device with no host read (starts outside [0, T) are clamped: validated
    values never are)."""
    T = g.shape[1]
    starts = cu_seqlens[1:-1].to(device=g.device, dtype=torch.long).clamp(0, T - 1)
    reset = torch.zeros(T, dtype=torch.bool, device=g.device).index_fill_(0, starts, True)
    return torch.where(reset[None, :, None], float("-inf"), g)


def _varlen(q, k, v, g, beta, lam, cu_seqlens, initial_state, opts):
    """Packed sequences with initial or final states: each sequence runs from its own start state (one
    launch per sequence); the outputs, final states and stats (certificates included) are
    concatenated. The adjoint certificates, which each sequence's backward fills in, are merged when
    read."""
    cs = cu_seqlens.tolist()
    outs, finals, stats = [], [], []
    for n, (a, b) in enumerate(zip(cs, cs[1:], strict=False)):
        init = None if initial_state is None else tuple(s[n:n + 1] for s in initial_state)
        (o, fin), st, pol = _mesa_chunk(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], lam,
                                        initial_state=init, cu_seqlens=None, **opts)
        outs.append(o)
        finals.append(fin)
        stats.append(st)

    def cat(field):
        vals = [getattr(s, field) for s in stats]
        return None if vals[0] is None else torch.cat(vals, 1)

    certs = [s._certificate for s in stats]
    merged = MesaStats(cat("steps"), cat("residual"), cat("x"), cat("breakdown"), stats[0].backend, _parts=stats)
    if certs[0] is not None:
        merged.certificate = _merge_certificates(certs)
        refines = [s._refine for s in stats]
        if all(r is not None for r in refines):
            def refine():  # tier 2 of every sequence, or None if one cannot be formed
                parts = [r() for r in refines]
                return None if any(c is None for c in parts) else _merge_certificates(parts)

            merged._refine = refine
    final = tuple(torch.cat([f[i] for f in finals]) for i in range(2))
    return (torch.cat(outs, dim=1), final), merged, pol


# Policies the decode kernel meets: it computes in fp32, which is auto's promise at any kappa it
# certifies (its fp32 tier); the other named policies' arithmetic it does not implement.
STEP_POLICIES = ("auto", "fp32")


def mesa_step(q, k, v, g, beta, lam, state, spec: SolverSpec | None = None, *, return_stats: bool = False,
              validate: bool = True, **options):
    """One decode step for one new token per sequence.

    Args:
        q, k: ``[B,H,D]`` (or ``[B,1,H,D]``); v: ``[B,H,Dv]``; g, beta: ``[B,H]``; lam: ``[H,D]``;
        state: ``(H [B,H,D,D], G [B,H,Dv,D])``, e.g. the final state of ``mesa_chunk``.
        spec, options: how to solve, as in :func:`mesa_chunk` (``steps``, ``tol``, ``x0``,
            ``precond``, ``check``, ``check_tol``); the policy must be one of :data:`STEP_POLICIES`
            (the kernel computes in fp32).
        validate: raise ``ValueError`` (naming the argument) for invalid token values: q, k, v, lam
            not finite, ``lam <= 0``, ``g > 0`` or NaN, ``beta`` outside [0, 1]. The kernel checks
            them as it reads them; reading its flags is the step's one host synchronisation, which
            ``validate=False`` skips (the values are then trusted). Shapes, dtypes and devices are
            always checked. The state's values are not checked at every step (a float64 Cholesky per
            head would cost the step many times over): a state that is not finite gives a
            non-finite x, which fails the certificate; check a state made by hand once with
            :func:`solvers.validate_inputs`.

    Returns:
        ``(o [B,H,Dv], new_state)`` in float32 (and the stats if ``return_stats``). The update is
        ``H' = gamma H + beta k k^T``, ``G' = gamma G + beta v k^T`` in float32, then CG on
        ``(H' + Lambda) x = q`` and ``o = G' x``.

    The accuracy certificate is formed by the kernel after the solve: the residual
    ``q - (H' + Lambda) x`` in float64 from the given state (:mod:`kernels.decode`), so its bound is
    that of the float64 tier (tier 2), with no extra launch and no host sync; the threshold is that
    of the fp32 policy.
    """
    spec = solver_spec(spec, **options)
    interpreted = _require_triton(decode, "_decode_kernel")
    verdict.poll()
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise ValueError("state must be a pair (H [B,H,D,D], G [B,H,Dv,D])")
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError(f"mesa_step takes one token: q has T = {q.shape[1]}; use mesa_chunk for prefill")
        q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]
    plan = _step_plan(q, k, v, g, beta, lam, state, spec, interpreted)
    B, H, D, Dv = plan.shape
    dev = q.device
    f32 = torch.float32
    Hs, Gs = (s.to(f32).contiguous() for s in state)
    Hn, Gn = torch.empty_like(Hs), torch.empty_like(Gs)
    # the small outputs in few allocations (at B = 1 the host's work is the step's time,
    # docs/decode-gpu/): x and the residual in one float32 buffer; the breakdown, bad-input and
    # failed-certificate flags (0 / 1, read as bool) in one int8 buffer
    o = torch.empty(B, H, Dv, dtype=f32, device=dev)
    out32 = torch.empty(B, H, D + 1, dtype=f32, device=dev)
    n_steps = torch.empty(B, H, dtype=torch.int32, device=dev)
    flags = torch.empty(3, B, H, dtype=torch.int8, device=dev)
    check = spec.check
    cert_buf = torch.empty(B, H, 3, dtype=torch.float64, device=dev) if check is not None else None
    LAST_LAUNCH["decode"] = decode._decode_kernel[(B * H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.to(f32).contiguous(), beta.to(f32).contiguous(),
        lam.to(f32).contiguous(), Hs, Gs, Hn, Gn, o, out32, n_steps, flags[0], flags[1], flags[2], cert_buf,
        *plan.scalars, **plan.constexprs)

    def stats() -> MesaStats:  # formed only when asked for, or for a failed verdict's message
        brk = flags[0].view(torch.bool)
        st = MesaStats(n_steps, out32[..., D], out32[..., :D], brk, "triton")
        if check is not None:
            st.certificate = cert.Certificate(*(t[:, None] for t in (cert_buf[..., 0], cert_buf[..., 1],
                                                                     cert_buf[..., 2], brk)),
                                              plan.threshold, 2, "x (decode step)")
        return st

    # With the value check (or a verdict that must be decided now) the flags are read at once, in one
    # host synchronisation that also decides the certificate's verdict; otherwise the verdict is deferred.
    now = validate or (check is not None and (check == "raise" or not flags.is_cuda))
    st = stats() if return_stats else None
    if now:
        read = (flags[1:3] if check is not None else flags[1:2]).flatten(1).any(1).tolist()
        bad, failed = read[0], check is not None and read[1]
        if validate and bad:  # the message from the inputs
            token = (q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], lam)
            validate_inputs(*token, check_values=True)
            raise ValueError("mesa_step: the kernel found an invalid token value (not finite, lam <= 0, g > 0 or "
                             "beta outside [0, 1])")  # pragma: no cover - the host check above names it first
        if failed:
            verdict.report((st or stats())._certificate, check, plan.fp32, verdict.call_site())
    elif check is not None:
        pending = verdict.submit(st._certificate if st else lambda: stats()._certificate, check, plan.fp32,
                                 failed=flags[2].any())
        if st is not None:
            st._pending.append(pending)
    if squeeze:
        o = o[:, None]
    out = (o, (Hn, Gn))
    if return_stats:
        out = out + (st,)
    return out


@dataclass(frozen=True)
class _StepPlan:
    """What a decode step's inputs' metadata decides (checked once per shape, dtype, device and spec):
    ``shape`` (B, H, D, Dv), the kernel's runtime ``scalars`` (tol, steps, gamma_c, threshold) and
    ``constexprs`` (with the warps), the certificate's ``threshold`` and the fp32 policy it names."""

    shape: tuple[int, int, int, int]
    scalars: tuple
    constexprs: dict
    threshold: float
    fp32: object


_STEP_PLANS: dict = {}
MAX_STEP_PLANS = 256  # distinct (shapes, dtypes, devices, spec) kept; a generation loop uses one


def _step_plan(q, k, v, g, beta, lam, state, spec: SolverSpec, interpreted: bool) -> _StepPlan:
    """The :class:`_StepPlan` of these inputs, after the structural checks of :func:`mesa_step`
    (ValueError naming the argument). The checks read only metadata, so they run once per key."""
    tensors = (q, k, v, g, beta, lam, *state)
    if all(isinstance(t, torch.Tensor) for t in tensors):
        key = (spec, interpreted, *((t.shape, t.dtype, t.device) for t in tensors))
        plan = _STEP_PLANS.get(key)
        if plan is not None:
            return plan
    else:
        key = None
    if spec.method != "cg":
        raise ValueError(f"mesa_step solves by CG (SolverSpec.method 'cg'), got {spec.method!r}")
    _check_kernel_x0(spec)
    if spec.policy.name not in STEP_POLICIES:
        raise ValueError(f"mesa_step computes in fp32: SolverSpec.policy must be one of {STEP_POLICIES}, got "
                         f"{spec.policy.name!r}")
    # validate through the problem definition with T = 1
    validate_inputs(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], lam, tuple(state),
                    check_values=False)
    for name, x in (("q", q), ("k", k), ("v", v), ("state[0]", state[0]), ("state[1]", state[1])):
        _check_device(name, x, interpreted)
    B, H, D = q.shape
    Dv = v.shape[2]
    if D > MAX_D or Dv > MAX_D:
        raise ValueError(f"head dims up to {MAX_D} are supported (the D x D state is held on chip); got D = {D}, "
                         f"Dv = {Dv}")
    fp32 = get_policy("fp32")
    threshold = fp32.check_tol if spec.check_tol is None else float(spec.check_tol)
    BLOCK_D = triton.next_power_of_2(D)
    plan = _StepPlan(
        (B, H, D, Dv),
        (float(spec.tol) if spec.tol is not None else -1.0, spec.steps, STEP_RESIDUAL_ROUNDING * math.sqrt(D),
         threshold),
        dict(H=H, D=D, Dv=Dv, BLOCK_D=BLOCK_D, BLOCK_DV=triton.next_power_of_2(Dv), BLOCK_J=min(BLOCK_D, 32),
             X0_JACOBI=spec.x0 == "jacobi", PRECOND=spec.precond == "jacobi", HAS_TOL=spec.tol is not None,
             num_warps=decode_warps(D, B * H, q.device)),
        threshold, fp32)
    if key is not None:
        if len(_STEP_PLANS) >= MAX_STEP_PLANS:
            _STEP_PLANS.clear()
        _STEP_PLANS[key] = plan
    return plan


# The decode certificate's residual rounding gamma_c = 2 u_fp64 sqrt(D) (solvers.certificate: float64
# operands, sqrt(D) growth of the accumulation), as the float64 tier's
STEP_RESIDUAL_ROUNDING = 2 * UNIT_ROUNDOFF["fp64"]


def decode_warps(D: int, programs: int, device: torch.device) -> int:
    """Warps of the decode kernel, measured on an H200 at D = 128 (docs/decode-gpu/): while the grid
    of ``programs`` (B H) leaves SMs idle the step is latency-bound and more threads per program help
    (8 warps: 64 fp32 values of the D x D tile per thread); once it fills them the step is
    bandwidth-bound and 4 warps (fewer, fuller threads; no spills) moved the states fastest."""
    if programs < _sm_count(device):
        return max(4, min(16, triton.next_power_of_2(D) ** 2 // (64 * 32)))
    return 4


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: any count gives the same numbers
    return torch.cuda.get_device_properties(device).multi_processor_count
