"""Chunkwise form of the T systems ``(H_t + Lambda) x_t = q_t`` under a precision policy.

The sequence is split into N chunks of C tokens (the last one zero-padded: k = v = q = 0,
g = 0, beta = 0, which leaves every state unchanged and gives x = 0 there). For a chunk whose
start state is ``(H_c, G_c)``, with local inclusive cumulative log-decay
``Gam_i = sum_{j<=i} g_j`` (i = 1..C, in the policy's accumulation dtype, fp32 or wider):

    M_ij  = exp(Gam_i - Gam_j) beta_j        for i >= j, else 0 (selected away, never exp'd)
    A(P)  = diag(exp(Gam)) P H_c + ((P K^T) * M) K + P diag(lam)          (P: C x D)
    O(X)  = diag(exp(Gam)) X G_c^T + ((X K^T) * M) V
    diag(H_i + Lambda) = exp(Gam_i) diag(H_c) + (M (K * K))_i + lam

Chunk-boundary states are accumulated in the policy's ``accum`` dtype and stored per its
``state`` precision after every chunk (so a low-precision state compounds its rounding):

    H_{c+1} = exp(Gam_C) H_c + K^T diag(w) K,   G_{c+1} = exp(Gam_C) G_c + V^T diag(w) K,
    w_j = exp(Gam_C - Gam_j) beta_j.

Every product goes through :meth:`PrecisionPolicy.mm` (operands rounded to the policy's operand
precision, accumulated in ``accum``). Layout inside: ``[B, H, N, C, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .precision import PrecisionPolicy
from .problem import MesaProblem


def _chunk(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """``[B,T,H,...]`` -> ``[B,H,N,C,...]``, zero-padding T up to N*C."""
    B, T = x.shape[:2]
    pad = N * C - T
    x = x.transpose(1, 2)  # [B,H,T,...]
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[:2] + (pad,) + x.shape[3:])], dim=2)
    return x.reshape(x.shape[:2] + (N, C) + x.shape[3:])


@dataclass
class ChunkedSystem:
    """All T systems of a problem in chunkwise form; see the module docstring for the math."""

    policy: PrecisionPolicy
    T: int
    C: int
    Q: torch.Tensor  # [B,H,N,C,D]   accum dtype, rounded to policy.input
    K: torch.Tensor  # [B,H,N,C,D]
    V: torch.Tensor  # [B,H,N,C,Dv]
    Gam: torch.Tensor  # [B,H,N,C]   local inclusive cumsum of g
    M: torch.Tensor  # [B,H,N,C,C]
    Hc: torch.Tensor  # [B,H,N,D,D]  start state of each chunk, as stored
    Gc: torch.Tensor  # [B,H,N,Dv,D]
    H_final: torch.Tensor  # [B,H,D,D]  state after the last token, as stored
    G_final: torch.Tensor  # [B,H,Dv,D]
    lam: torch.Tensor  # [1,H,1,1,D]

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
        Gam = torch.cumsum(g, dim=-1)
        causal = torch.ones(C, C, dtype=torch.bool, device=problem.device).tril()
        diff = Gam[..., :, None] - Gam[..., None, :]
        M = torch.where(causal, torch.exp(torch.where(causal, diff, 0.0)), 0.0) * beta[..., None, :]
        # chunk-boundary states: accumulated in accum, stored per policy.state
        if problem.initial_state is None:
            h = torch.zeros(B, H, D, D, dtype=acc, device=problem.device)
            gs = torch.zeros(B, H, Dv, D, dtype=acc, device=problem.device)
        else:
            h, gs = (s.to(acc) for s in problem.initial_state)
        w = torch.exp(Gam[..., -1:] - Gam) * beta  # [B,H,N,C]
        decay_end = torch.exp(Gam[..., -1])  # [B,H,N]
        Hs, Gs = [], []  # lists and a stack (not in-place writes): the build stays differentiable
        h, gs = policy.store(h), policy.store(gs)
        for c in range(N):
            Hs.append(h)
            Gs.append(gs)
            wk = w[:, :, c, :, None] * K[:, :, c]
            # accumulate in accum, store per policy.state: a low-precision state compounds its
            # rounding from chunk to chunk, as a kernel that stores states between chunks does.
            h = policy.store(decay_end[:, :, c, None, None] * h + policy.mm(wk.transpose(-1, -2), K[:, :, c]))
            gs = policy.store(decay_end[:, :, c, None, None] * gs + policy.mm(V[:, :, c].transpose(-1, -2), wk))
        lam = problem.lam.to(acc)[None, :, None, None, :]
        return cls(policy, T, C, Q, K, V, Gam, M, torch.stack(Hs, dim=2), torch.stack(Gs, dim=2), h, gs, lam)

    # operators -----------------------------------------------------------------------------------
    def matvec(self, P: torch.Tensor) -> torch.Tensor:
        """A(P) = diag(exp(Gam)) P H_c^T + ((P K^T) * M) K + P diag(lam), for all chunks at once.

        (Rows of P are vectors: row i is (A_i p_i)^T = p_i^T A_i^T. H_c is symmetric, so H_c^T = H_c
        in value; writing the transpose keeps the derivative with respect to an initial state in the
        convention dL/dH = -y x^T of DESIGN.md.)"""
        mm = self.policy.mm
        inter = torch.exp(self.Gam)[..., None] * mm(P, self.Hc.transpose(-1, -2))
        intra = mm(mm(P, self.K.transpose(-1, -2)) * self.M, self.K)
        return inter + intra + P * self.lam

    def output(self, X: torch.Tensor) -> torch.Tensor:
        """O(X) = diag(exp(Gam)) X G_c^T + ((X K^T) * M) V: the outputs o_t = G_t x_t."""
        mm = self.policy.mm
        inter = torch.exp(self.Gam)[..., None] * mm(X, self.Gc.transpose(-1, -2))
        intra = mm(mm(X, self.K.transpose(-1, -2)) * self.M, self.V)
        return inter + intra

    def output_adjoint(self, E: torch.Tensor) -> torch.Tensor:
        """G_t^T e_t for all tokens: diag(exp(Gam)) E G_c + ((E V^T) * M) K (the adjoint's right-hand side)."""
        mm = self.policy.mm
        inter = torch.exp(self.Gam)[..., None] * mm(E, self.Gc)
        intra = mm(mm(E, self.V.transpose(-1, -2)) * self.M, self.K)
        return inter + intra

    def diag_H(self) -> torch.Tensor:
        """diag(H_t) for every token: exp(Gam_i) diag(H_c) + (M (K*K))_i, ``[B,H,N,C,D]``."""
        dHc = torch.diagonal(self.Hc, dim1=-2, dim2=-1)[..., None, :]
        return torch.exp(self.Gam)[..., None] * dHc + torch.matmul(self.M, self.K * self.K)

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
