"""Chunkwise form of the T systems ``(H_t + Lambda) x_t = q_t`` under a precision policy.

The sequence is split into N chunks of C tokens (the last one zero-padded: k = v = q = 0,
g = 0, beta = 0, which leaves every state unchanged and gives x = 0 there). For a chunk whose
start state is ``(H_c, G_c)``, with the chunk's cumulative log-decay and resets
(:mod:`solvers.gates`, in the policy's accumulation dtype, fp32 or wider: a gate
``g <= RESET_LOG_GATE`` is a reset, adds 0 to ``Gam_i = sum_{j<=i} g_j`` and starts a new segment,
``seg_i`` = resets at or before i, i = 1..C):

    zeta_i = exp(Gam_i) if seg_i = 0, else 0                   (decay from the chunk start)
    M_ij   = exp(Gam_i - Gam_j) beta_j  for i >= j and seg_i = seg_j, else 0 (selected away, never exp'd)
    A(P)   = diag(zeta) P H_c + ((P K^T) * M) K + P diag(lam)          (P: C x D)
    O(X)   = diag(zeta) X G_c^T + ((X K^T) * M) V
    diag(H_i + Lambda) = zeta_i diag(H_c) + (M (K * K))_i + lam

Chunk-boundary states are accumulated in the policy's ``accum`` dtype and stored per its
``state`` precision after every chunk (so a low-precision state compounds its rounding; fp32
states carry their rounding errors in a compensation term, as the kernels do, so that only the final
rounding of each stored state remains):

    H_{c+1} = zeta_C H_c + K^T diag(w) K,   G_{c+1} = zeta_C G_c + V^T diag(w) K,
    w_j = exp(Gam_C - Gam_j) beta_j if seg_j = seg_C, else 0.

Every decay across a reset is exactly zero (as exp of the reset gate is, in that dtype): the state
restarts there, inside a chunk or at its first token.

Every product goes through :meth:`PrecisionPolicy.mm` (operands rounded to the policy's operand
precision, accumulated in ``accum``). Under the ``auto`` policy each chunk's products are in its tier
(``tier``, from the largest free condition bound of its systems, :func:`chunk_tier`;
:data:`solvers.precision.AUTO_OPS`), its states' products in bf16x3. Layout inside: ``[B, H, N, C, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gates import decay_from_start, decay_to_end, pairwise_decay, segmented_cumsum
from .precision import AUTO_TIERS, PrecisionPolicy, auto_ops, auto_tier_index
from .problem import MesaProblem


def _chunk(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """``[B,T,H,...]`` -> ``[B,H,N,C,...]``, zero-padding T up to N*C."""
    B, T = x.shape[:2]
    pad = N * C - T
    x = x.transpose(1, 2)  # [B,H,T,...]
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[:2] + (pad,) + x.shape[3:])], dim=2)
    return x.reshape(x.shape[:2] + (N, C) + x.shape[3:])


def _decay_add(hi: torch.Tensor, lo: torch.Tensor, d: torch.Tensor, upd: torch.Tensor):
    """``S <- d S + upd`` for ``S = hi + lo`` (fp32), the rounding errors of the product and of the sum
    kept in ``lo`` (TwoProduct through float64, where an fp32 product is exact; TwoSum): the
    emulation of :func:`kernels.chunk_state.decay_add`."""
    p = d * hi
    ep = (d.double() * hi.double() - p.double()).to(hi.dtype)
    s = p + upd
    b = s - p
    es = (p - (s - b)) + (upd - b)
    return s, d * lo + (ep + es)


def chunk_tier(Hc: torch.Tensor, K: torch.Tensor, M: torch.Tensor, zeta: torch.Tensor,
               lam: torch.Tensor) -> torch.Tensor:
    """The ``auto`` policy's tier of every chunk, ``[B,H,N]`` int8 (AUTO_TIERS): that of
    ``kappa_c = max_{t in c} (tr H_t + max lam) / min lam``, the largest free condition bound of the
    chunk's systems, with the per-token trace ``tr H_t = zeta_t tr H_c + sum_j M_tj ||k_j||^2``
    (``M`` includes beta). The same definition as :mod:`kernels.chunk_tier`."""
    kk = (K * K).sum(-1)  # [B,H,N,C]
    trH = zeta * torch.diagonal(Hc, dim1=-2, dim2=-1).sum(-1)[..., None] + (M * kk[..., None, :]).sum(-1)
    kappa = (trH.amax(-1) + lam.amax(-1)[None, :, None]) / lam.amin(-1)[None, :, None]
    return auto_tier_index(kappa.detach())


@dataclass
class ChunkedSystem:
    """All T systems of a problem in chunkwise form; see the module docstring for the math."""

    policy: PrecisionPolicy
    T: int
    C: int
    Q: torch.Tensor  # [B,H,N,C,D]   accum dtype, rounded to policy.input
    K: torch.Tensor  # [B,H,N,C,D]
    V: torch.Tensor  # [B,H,N,C,Dv]
    Gam: torch.Tensor  # [B,H,N,C]   local inclusive cumsum of g, resets removed (solvers.gates)
    seg: torch.Tensor  # [B,H,N,C]   int64: resets in the chunk at or before each token
    zeta: torch.Tensor  # [B,H,N,C]  decay from the chunk start, exp(Gam_i) before the chunk's first reset
    M: torch.Tensor  # [B,H,N,C,C]
    Hc: torch.Tensor  # [B,H,N,D,D]  start state of each chunk, as stored
    Gc: torch.Tensor  # [B,H,N,Dv,D]
    H_final: torch.Tensor  # [B,H,D,D]  state after the last token, as stored
    G_final: torch.Tensor  # [B,H,Dv,D]
    lam: torch.Tensor  # [1,H,1,1,D]
    tier: torch.Tensor | None = None  # [B,H,N] int8: the auto policy's tier of each chunk (AUTO_TIERS)
    adjoint: bool = False  # auto: the tiers' products of the adjoint solve (solvers.precision.auto_ops)
    # the constant right operands of the products, prepared (rounded or split) once per operand
    # precision (PrecisionPolicy.prepare); not an init field, so dataclasses.replace starts afresh
    _prepared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, problem: MesaProblem, policy: PrecisionPolicy, chunk_size: int = 64) -> ChunkedSystem:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        acc = policy.accum_dtype
        B, T, H, D, Dv = problem.B, problem.T, problem.H, problem.D, problem.Dv
        C = min(chunk_size, T)
        N = -(-T // C)
        Q = _chunk(policy.round_input(problem.q), N, C)
        K = _chunk(policy.round_input(problem.k), N, C)
        V = _chunk(policy.round_input(problem.v), N, C)
        g = _chunk(problem.g.to(acc), N, C)
        beta = _chunk(problem.beta.to(acc), N, C)
        Gam, seg = segmented_cumsum(g)
        M = pairwise_decay(Gam, seg) * beta[..., None, :]
        zeta = decay_from_start(Gam, seg)  # [B,H,N,C]
        # chunk-boundary states: accumulated in accum, stored per policy.state
        if problem.initial_state is None:
            h = torch.zeros(B, H, D, D, dtype=acc, device=problem.device)
            gs = torch.zeros(B, H, Dv, D, dtype=acc, device=problem.device)
        else:
            h, gs = (s.to(acc) for s in problem.initial_state)
        w = decay_to_end(Gam, seg) * beta  # [B,H,N,C]
        decay_end = zeta[..., -1]  # [B,H,N]
        Hs, Gs = [], []  # lists and a stack (not in-place writes): the build stays differentiable
        h, gs = policy.store(h), policy.store(gs)
        # the states' products: the policy's operand precision (auto: bf16x3, as the kernels)
        op = "bf16x3" if policy.operand == "auto" else None
        # fp32 states carry their rounding errors in a second term, as the kernels do (kernels.chunk_state
        # decay_add); 16-bit states compound their rounding; fp64 needs neither
        compensate = policy.accum == policy.state == "fp32"
        h_lo, gs_lo = torch.zeros_like(h), torch.zeros_like(gs)
        for c in range(N):
            Hs.append(h + h_lo if compensate else h)
            Gs.append(gs + gs_lo if compensate else gs)
            wk = w[:, :, c, :, None] * K[:, :, c]
            d = decay_end[:, :, c, None, None]
            uh = policy.mm(wk.transpose(-1, -2), K[:, :, c], op)
            ug = policy.mm(V[:, :, c].transpose(-1, -2), wk, op)
            if compensate:
                h, h_lo = _decay_add(h, h_lo, d, uh)
                gs, gs_lo = _decay_add(gs, gs_lo, d, ug)
            else:
                # accumulate in accum, store per policy.state: a low-precision state compounds its
                # rounding from chunk to chunk, as a kernel that stores states between chunks does.
                h = policy.store(d * h + uh)
                gs = policy.store(d * gs + ug)
        if compensate:
            h, gs = h + h_lo, gs + gs_lo
        lam = problem.lam.to(acc)[None, :, None, None, :]
        Hc = torch.stack(Hs, dim=2)
        tier = None
        if policy.operand == "auto":
            tier = chunk_tier(Hc, K, M, zeta, problem.lam.to(acc))
        return cls(policy, T, C, Q, K, V, Gam, seg, zeta, M, Hc, torch.stack(Gs, dim=2), h, gs, lam, tier)

    # operators -----------------------------------------------------------------------------------
    # The constant right operands of the products, by name.
    _OPERANDS = {
        "Hc^T": lambda s: s.Hc.transpose(-1, -2), "Gc^T": lambda s: s.Gc.transpose(-1, -2), "Gc": lambda s: s.Gc,
        "K^T": lambda s: s.K.transpose(-1, -2), "K": lambda s: s.K, "V^T": lambda s: s.V.transpose(-1, -2),
        "V": lambda s: s.V,
    }

    def _mm(self, a: torch.Tensor, name: str, which: int) -> torch.Tensor:
        """``policy.mm(a, b)`` for the constant operand ``b`` called ``name`` (:attr:`_OPERANDS`), which
        is rounded once per operand precision; for ``auto`` in each chunk's tier (``which``: 0 products
        with the states, 1 with the chunk's keys and values; :func:`solvers.precision.auto_ops`, of
        the adjoint solve when ``adjoint``), computed per tier and selected per chunk."""
        if self.tier is None:
            return self.policy.mm_prepared(a, self._operand(name, None))
        out = None
        for i, tier_name in enumerate(AUTO_TIERS):
            sel = (self.tier == i)[..., None, None]
            if not bool(sel.any()):
                continue
            op = auto_ops(tier_name, self.adjoint)[which]
            prod = self.policy.mm_prepared(a, self._operand(name, op), op)
            out = prod if out is None else torch.where(sel, prod, out)
        return out

    def _operand(self, name: str, op: str | None):
        # keyed by grad mode too: an operand prepared under no_grad carries no graph to differentiate
        key = (name, op, torch.is_grad_enabled())
        if key not in self._prepared:
            self._prepared[key] = self.policy.prepare(self._OPERANDS[name](self), op)
        return self._prepared[key]

    def matvec(self, P: torch.Tensor) -> torch.Tensor:
        """A(P) = diag(zeta) P H_c^T + ((P K^T) * M) K + P diag(lam), for all chunks at once.

        (Rows of P are vectors: row i is (A_i p_i)^T = p_i^T A_i^T. H_c is symmetric, so H_c^T = H_c
        in value; writing the transpose keeps the derivative with respect to an initial state in the
        convention dL/dH = -y x^T of docs/design.md.)"""
        mm = self._mm
        inter = self.zeta[..., None] * mm(P, "Hc^T", 0)
        intra = mm(mm(P, "K^T", 1) * self.M, "K", 1)
        return inter + intra + P * self.lam

    def output(self, X: torch.Tensor) -> torch.Tensor:
        """O(X) = diag(zeta) X G_c^T + ((X K^T) * M) V: the outputs o_t = G_t x_t."""
        mm = self._mm
        inter = self.zeta[..., None] * mm(X, "Gc^T", 0)
        intra = mm(mm(X, "K^T", 1) * self.M, "V", 1)
        return inter + intra

    def output_adjoint(self, E: torch.Tensor) -> torch.Tensor:
        """G_t^T e_t for all tokens: diag(zeta) E G_c + ((E V^T) * M) K (the adjoint's right-hand side)."""
        mm = self._mm
        inter = self.zeta[..., None] * mm(E, "Gc", 0)
        intra = mm(mm(E, "V^T", 1) * self.M, "K", 1)
        return inter + intra

    def diag_H(self) -> torch.Tensor:
        """diag(H_t) for every token: zeta_i diag(H_c) + (M (K*K))_i, ``[B,H,N,C,D]``."""
        dHc = torch.diagonal(self.Hc, dim1=-2, dim2=-1)[..., None, :]
        return self.zeta[..., None] * dHc + torch.matmul(self.M, self.K * self.K)

    # layout --------------------------------------------------------------------------------------
    def to_tokens(self, X: torch.Tensor) -> torch.Tensor:
        """``[B,H,N,C,...]`` -> ``[B,T,H,...]`` (drops the padding)."""
        B, H, N, C = X.shape[:4]
        X = X.reshape((B, H, N * C) + X.shape[4:])[:, :, : self.T]
        return X.transpose(1, 2)

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,T,H,...]`` -> ``[B,H,N,C,...]`` in the accumulation dtype."""
        N = self.Q.shape[2]
        return _chunk(x.to(self.policy.accum_dtype), N, self.C)

    @property
    def valid(self) -> torch.Tensor:
        """``[N,C]`` boolean mask of real (non-padding) tokens."""
        N = self.Q.shape[2]
        return (torch.arange(N * self.C, device=self.Q.device) < self.T).reshape(N, self.C)
