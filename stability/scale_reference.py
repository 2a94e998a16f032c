"""The float64 reference at production sizes: forward, adjoint and every gradient, memory-bounded.

For a problem of any size (T up to 65536, D up to 128, H up to 16 on a GPU; small ones on the CPU),
all in float64 on the problem's device, per (batch, head):

    A_t = H_t + Lambda                              (materialised per token block, MesaProblem.iter_states)
    L_t L_t^T = A_t,   [x_t, y_t] = A_t^{-1} [q_t, G_t^T e_t]   (one Cholesky, two right-hand sides)
    o_t = G_t x_t,     (H_T, G_T) = the states after the last token

which is the factorisation of the exact solver (:mod:`solvers.exact`) with the adjoint's right-hand
side added to the same pass. With the upstream gradients ``e = dL/do`` and, optionally, ``dL/dH_T``,
``dL/dG_T``, the input gradients of ``L`` are the implicit-differentiation closed forms at these exact
``x`` and ``y`` (:func:`solvers.implicit.implicit_backward`, which runs
:func:`solvers.implicit.chunked_gradients`, in float64):

    dq = y,  dlam = -sum_t x_t * y_t,  dk, dv, dbeta, dg, dH_0, dG_0   (closed forms, chunkwise)

Packed sequences (``cu_seqlens``) are referenced sequence by sequence and concatenated (final states
and initial-state gradients stacked along N, dlam summed).

Conditioning comes with it: the free bound ``kappa_t <= (tr H_t + max lam) / min lam`` for every token
(:meth:`MesaProblem.trace_H`), and on request the exact ``kappa_t = lambda_max / lambda_min`` from
float64 eigenvalues of ``A_t`` at every ``kappa_every``-th token and the last one of each sequence.

Memory: besides the float64 inputs and results (``O(B T H (D + Dv))``), the pass holds one block of
``block`` tokens' states and the gradients run on groups of heads whose chunkwise system fits the same
budget (:func:`plan`). Measured on an H200 at B = 1, T = 65536, H = 16, D = Dv = 128 with gradients:
9.5 s and 13.1 GiB peak under the default 2 GiB budget (one head per group), 6.1 s and 21.5 GiB under
16 GiB (four heads per group).

:func:`mp_check_prefix` checks this reference against the 50-digit mpmath reference
(:mod:`stability.reference`) on a prefix of a large problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mesa_stability.solvers import MesaProblem
from mesa_stability.solvers.implicit import implicit_backward
from mesa_stability.solvers.spec import SolverSpec

F64 = torch.float64
GRADIENTS = ("q", "k", "v", "g", "beta", "lam")
MEMORY = 2 << 30  # default working-memory budget (bytes) of one block and of one head group
MAX_BLOCK = 128  # iter_states' per-block intermediates grow like block^2: no gain beyond this


@dataclass
class ScaleReference:
    """The float64 reference of one problem (see the module docstring); tensors on the problem's device.

    ``x [B,T,H,D]``, ``o [B,T,H,Dv]``, ``final_state = (H_T [N,H,D,D], G_T [N,H,Dv,D])``,
    ``kappa_bound [B,T,H]``; with an upstream gradient also ``y [B,T,H,D]`` and ``grads``
    (``q, k, v, g, beta, lam`` in the inputs' shapes, and ``H0, G0`` when there is an initial state);
    with ``kappa_every`` the exact condition numbers ``kappa [B,n,H]`` at the token indices
    ``kappa_tokens [n]``."""

    x: torch.Tensor
    o: torch.Tensor
    final_state: tuple[torch.Tensor, torch.Tensor]
    kappa_bound: torch.Tensor
    y: torch.Tensor | None = None
    grads: dict | None = None
    kappa: torch.Tensor | None = None
    kappa_tokens: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def plan(problem: MesaProblem, memory: int = MEMORY, chunk_size: int = 64) -> tuple[int, int]:
    """(block, heads per gradient group) that keep the working set near ``memory`` bytes.

    Per token of a block: H_t, A_t, its factor and G_t (``8 B H (3 D^2 + Dv D)`` bytes, doubled for
    the intermediates of ``iter_states``). Per head of a gradient group: the chunkwise system and its
    adjoint states, about six ``D x (D + Dv)`` matrices per chunk, ``[C, C]`` decay blocks and a dozen
    token vectors: ``8 B T (6 D (D + Dv) / C + 8 C + 12 (D + Dv))`` bytes."""
    B, H, D, Dv, T = problem.B, problem.H, problem.D, problem.Dv, problem.T
    per_token = 8 * B * H * 2 * (3 * D * D + Dv * D)
    block = max(1, min(MAX_BLOCK, memory // per_token))
    C = min(chunk_size, T)
    per_head = 8 * B * T * (6 * D * (D + Dv) / C + 8 * C + 12 * (D + Dv))
    heads = max(1, min(H, int(memory // per_head)))
    return block, heads


def prefix(problem: MesaProblem, T0: int) -> MesaProblem:
    """The first ``T0`` tokens of an unpacked problem, from the same initial state."""
    if problem.cu_seqlens is not None:
        raise ValueError("prefix() takes one unpacked problem (use problem.sequences())")
    if not 1 <= T0 <= problem.T:
        raise ValueError(f"T0 must be in [1, T={problem.T}], got {T0}")
    return problem.replace(q=problem.q[:, :T0], k=problem.k[:, :T0], v=problem.v[:, :T0], g=problem.g[:, :T0],
                           beta=problem.beta[:, :T0])


def heads(problem: MesaProblem, h0: int, h1: int) -> MesaProblem:
    """Heads ``h0..h1-1`` of a problem as a problem of their own (heads are independent)."""
    init = None if problem.initial_state is None else tuple(s[:, h0:h1] for s in problem.initial_state)
    return MesaProblem(problem.q[:, :, h0:h1], problem.k[:, :, h0:h1], problem.v[:, :, h0:h1],
                       problem.g[:, :, h0:h1], problem.beta[:, :, h0:h1], problem.lam[h0:h1], init,
                       problem.cu_seqlens)


@torch.no_grad()
def reference(problem: MesaProblem, e: torch.Tensor | None = None, dH_T: torch.Tensor | None = None,
              dG_T: torch.Tensor | None = None, *, block: int | None = None, chunk_size: int = 64,
              heads_per_group: int | None = None, kappa_every: int | None = None,
              memory: int = MEMORY) -> ScaleReference:
    """The float64 reference of ``problem`` (module docstring), with gradients when ``e`` is given.

    ``e [B,T,H,Dv]`` is ``dL/do``; ``dH_T [N,H,D,D]``, ``dG_T [N,H,Dv,D]`` (need ``e``; None: zero) are
    the final-state cotangents. ``block`` (tokens per materialised block), ``heads_per_group`` (heads per
    gradient call) and ``chunk_size`` (of the chunkwise gradient contractions) default from
    :func:`plan` under ``memory`` bytes; none of them changes the result beyond rounding.
    ``kappa_every = s`` adds the exact condition number at tokens 0, s, 2s, ... and the last."""
    if not isinstance(problem, MesaProblem):
        raise TypeError(f"problem must be a MesaProblem, got {type(problem).__name__}")
    if e is None and (dH_T is not None or dG_T is not None):
        raise ValueError("final-state cotangents need an upstream gradient e (pass zeros for none)")
    if kappa_every is not None and kappa_every < 1:
        raise ValueError(f"kappa_every must be >= 1, got {kappa_every}")
    p = problem.to(F64)
    if e is not None:
        want = (p.B, p.T, p.H, p.Dv)
        if tuple(e.shape) != want:
            raise ValueError(f"e has shape {tuple(e.shape)}, expected {want} (like o)")
        e = e.to(device=p.device, dtype=F64)
    dH_T, dG_T = (None if t is None else t.to(device=p.device, dtype=F64) for t in (dH_T, dG_T))
    auto_block, auto_heads = plan(p, memory, chunk_size)
    opts = dict(block=block or auto_block, chunk_size=chunk_size, heads_per_group=heads_per_group or auto_heads,
                kappa_every=kappa_every)
    if p.cu_seqlens is None:
        return _reference(p, e, dH_T, dG_T, **opts)
    cs = p.cu_seqlens.tolist()
    parts = []
    for n, (seq, a, b) in enumerate(zip(p.sequences(), cs, cs[1:], strict=False)):
        parts.append(_reference(seq, None if e is None else e[:, a:b],
                                None if dH_T is None else dH_T[n:n + 1], None if dG_T is None else dG_T[n:n + 1],
                                **opts))
        if parts[-1].kappa_tokens is not None:
            parts[-1].kappa_tokens = parts[-1].kappa_tokens + a
    return _concat(parts)


def _reference(p: MesaProblem, e, dH_T, dG_T, *, block: int, chunk_size: int, heads_per_group: int,
               kappa_every: int | None) -> ScaleReference:
    """One unpacked float64 problem: the pass for x, y, o and kappa, then the gradients."""
    B, T, H, D, Dv = p.B, p.T, p.H, p.D, p.Dv
    x = torch.empty(B, T, H, D, dtype=F64, device=p.device)
    o = torch.empty(B, T, H, Dv, dtype=F64, device=p.device)
    y = None if e is None else torch.empty_like(x)
    picked = None
    if kappa_every is not None:
        picked = sorted(set(range(0, T, kappa_every)) | {T - 1})
        kappa = torch.empty(B, len(picked), H, dtype=F64, device=p.device)
        picked_t = torch.tensor(picked, dtype=torch.int64, device=p.device)
    lam = torch.diag_embed(p.lam)
    failures = 0
    Hb = Gb = None
    for s, t, Hb, Gb in p.iter_states(block=block, dtype=F64):
        A = Hb + lam
        rhs = p.q[:, s:t, :, :, None]
        if e is not None:  # the adjoint's right-hand side G_t^T e_t as a second column
            rhs = torch.cat([rhs, Gb.transpose(-1, -2) @ e[:, s:t, :, :, None]], dim=-1)
        L, info = torch.linalg.cholesky_ex(A)
        bad = info > 0
        if bool(bad.any()):  # not numerically SPD (never expected in float64: A >= min(lam) I)
            failures += int(bad.sum())
            sol = torch.linalg.solve(A, rhs)
        else:
            sol = torch.cholesky_solve(rhs, L)
        x[:, s:t] = sol[..., 0]
        o[:, s:t] = (Gb @ sol[..., :1])[..., 0]
        if e is not None:
            y[:, s:t] = sol[..., 1]
        if picked is not None:
            sel = (picked_t >= s) & (picked_t < t)
            if bool(sel.any()):
                ev = torch.linalg.eigvalsh(A[:, picked_t[sel] - s])
                kappa[:, sel] = ev[..., -1] / ev[..., 0]
    lam_max, lam_min = p.lam.max(-1).values, p.lam.min(-1).values
    out = ScaleReference(x, o, (Hb[:, -1], Gb[:, -1]), (p.trace_H(F64) + lam_max) / lam_min, y,
                         info={"block": block, "chunk_size": chunk_size, "heads_per_group": heads_per_group,
                               "cholesky_failures": failures})
    if picked is not None:
        out.kappa, out.kappa_tokens = kappa, picked_t
    if e is not None:
        out.grads = _gradients(p, x, y, e, dH_T, dG_T, chunk_size, heads_per_group)
    return out


def _gradients(p: MesaProblem, x, y, e, dH_T, dG_T, chunk_size: int, group: int) -> dict:
    """The closed-form gradients at the exact x, y, by groups of heads (dlam, dH_0, dG_0 per head)."""
    cfg = SolverSpec(policy="fp64", steps=1, chunk_size=min(chunk_size, p.T), check=None)
    has_init = p.initial_state is not None
    names = GRADIENTS + (("H0", "G0") if has_init else ())
    parts = {n: [] for n in names}
    for h0 in range(0, p.H, group):
        h1 = min(h0 + group, p.H)
        ph = heads(p, h0, h1)
        init = ph.initial_state or (None, None)
        inputs = (ph.q, ph.k, ph.v, ph.g, ph.beta, ph.lam, *init)
        cot = [None if t is None else t[:, h0:h1] for t in (dH_T, dG_T)]
        dq, dk, dv, dg, dbeta, dlam, dH0, dG0 = implicit_backward(
            inputs, [True] * 8, x[:, :, h0:h1], cfg, e[:, :, h0:h1], *cot, y=y[:, :, h0:h1])
        got = dict(q=dq, k=dk, v=dv, g=dg, beta=dbeta, lam=dlam, H0=dH0, G0=dG0)
        for n in names:
            parts[n].append(got[n])
    dims = dict(q=2, k=2, v=2, g=2, beta=2, lam=0, H0=1, G0=1)
    return {n: torch.cat(v, dim=dims[n]) for n, v in parts.items()}


def _concat(parts: list[ScaleReference]) -> ScaleReference:
    """Packed sequences: token tensors along T, final states and dH_0, dG_0 along N, dlam summed."""
    def cat(get, dim):
        vals = [get(r) for r in parts]
        return None if vals[0] is None else torch.cat(vals, dim=dim)

    grads = None
    if parts[0].grads is not None:
        grads = {}
        for n in parts[0].grads:
            vals = [r.grads[n] for r in parts]
            grads[n] = sum(vals) if n == "lam" else torch.cat(vals, dim=0 if n in ("H0", "G0") else 1)
    info = dict(parts[0].info, sequences=len(parts),
                cholesky_failures=sum(r.info["cholesky_failures"] for r in parts))
    return ScaleReference(cat(lambda r: r.x, 1), cat(lambda r: r.o, 1),
                          (cat(lambda r: r.final_state[0], 0), cat(lambda r: r.final_state[1], 0)),
                          cat(lambda r: r.kappa_bound, 1), cat(lambda r: r.y, 1), grads,
                          cat(lambda r: r.kappa, 1), cat(lambda r: r.kappa_tokens, 0), info)


# --- the mpmath check on a prefix ------------------------------------------------------------------

def mp_check_prefix(problem: MesaProblem, T0: int = 32, *, batch: int = 0, head: int = 0, dims: int | None = None,
                    e: torch.Tensor | None = None, gradients: bool = False, dps: int = 50, seed: int = 0) -> dict:
    """Relative errors of this float64 reference against the mpmath reference on a prefix of ``problem``.

    The checked problem is the first ``T0`` tokens of batch entry ``batch`` (the first packed sequence
    of a packed problem), head ``head``, from its initial state; its float64 reference is computed on the
    problem's device (the GPU path is what is checked), mpmath on the CPU. With
    ``dims = d`` only the first d coordinates of q, k, v, lam and the initial state (a smaller problem
    of the same kind, for when mpmath at the full D is too slow: 1.5 to 2.5 s per token at D = 128 and
    50 digits, T0 D^3 / 3 multiplications).

    Returns ``{"x": err, "o": err, ...}``: normwise relative errors of x and o against
    :func:`stability.reference.mp_solve`; with ``gradients=True`` also ``"d<name>"`` for every input: the
    error of the directional derivative ``<grad, d>`` along a seeded random direction d against
    :func:`stability.reference.mp_directional_derivative`, relative to ``||grad|| ||d||`` (two more
    mpmath passes per input). ``e`` is the problem's upstream gradient, cut like the problem (drawn
    from ``seed`` when not given)."""
    from .metrics import rel_error
    from .reference import mp_directional_derivative, mp_solve

    seq = problem.sequences()[0] if problem.cu_seqlens is not None else problem
    T0 = min(T0, seq.T)
    d = seq.D if dims is None else dims
    dv = seq.Dv if dims is None else min(dims, seq.Dv)
    b, h = slice(batch, batch + 1), slice(head, head + 1)
    init = None if seq.initial_state is None else (seq.initial_state[0][b, h, :d, :d],
                                                   seq.initial_state[1][b, h, :dv, :d])
    sub = MesaProblem(seq.q[b, :T0, h, :d], seq.k[b, :T0, h, :d], seq.v[b, :T0, h, :dv], seq.g[b, :T0, h],
                      seq.beta[b, :T0, h], seq.lam[h, :d], init).to(F64)  # on the problem's device
    cpu = sub.to(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    if gradients:
        e = (torch.randn(1, T0, 1, dv, generator=gen, dtype=F64) if e is None
             else e[b, :T0, h, :dv].to(device="cpu", dtype=F64))
    ref = reference(sub, e.to(sub.device) if gradients else None)
    work = T0 * d**3 + 1
    x_mp, o_mp = mp_solve(cpu, dps, max_work=work)
    out = {"x": rel_error(ref.x.cpu(), x_mp), "o": rel_error(ref.o.cpu(), o_mp)}
    for name, grad in (ref.grads or {}).items():
        grad = grad.cpu()
        direction = torch.randn(grad.shape, generator=gen, dtype=F64)
        exact = mp_directional_derivative(cpu, e, {name: direction}, dps, max_work=work)
        scale = float(grad.norm() * direction.norm())
        out[f"d{name}"] = abs(float((grad * direction).sum()) - exact) / scale if scale > 0 else abs(exact)
    return out


