"""The Mesa problem: inputs of one Mesa layer call, validated, and its dense materialisation.

Per batch entry and head (docs/design.md section 2), for tokens t = 1..T:

    gamma_t = exp(g_t),  g_t <= 0            (forget gate, log-space; -inf allowed)
    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T (D x D, symmetric PSD)
    G_t = gamma_t G_{t-1} + beta_t v_t k_t^T (Dv x D)
    x_t = (H_t + Lambda)^{-1} q_t,  Lambda = diag(lam), lam > 0
    o_t = G_t x_t

with H_0, G_0 = 0 or the given ``initial_state`` (H_0 symmetric positive semidefinite). A gate
``g_t <= RESET_LOG_GATE`` of the working precision (``g_t = -inf`` included) is a hard reset:
gamma_t = 0 exactly, the state restarts at token t, and every decay across t is exactly zero
(:mod:`solvers.gates`). Shapes: ``q, k: [B,T,H,D]``,
``v: [B,T,H,Dv]``, ``g, beta: [B,T,H]``, ``lam: [H,D]``, ``initial_state = (H_0 [B,H,D,D],
G_0 [B,H,Dv,D])``.

Variable-length batches are packed: ``B = 1`` and ``cu_seqlens = [0, T_1, T_1 + T_2, ..., T]``
(int32/int64, on any device: it is read on the host) marks N sequences whose states start afresh
(or from ``initial_state[n]``, now ``[N,H,D,D]`` and ``[N,H,Dv,D]``); :meth:`MesaProblem.sequences`
unpacks them.

:class:`MesaProblem` validates once; every solver, reference and kernel takes one.
:meth:`MesaProblem.iter_states` materialises H_t and G_t for blocks of tokens (for references
and metrics), with memory bounded by the block size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .gates import decay_from_start, pairwise_decay, segmented_cumsum
from .precision import SUPPORTED_DTYPES, UNIT_ROUNDOFF


def _check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {x.dtype}; supported: {list(SUPPORTED_DTYPES)}")
    return x


def _check_shape(name: str, x: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} ({what})")


def _check_bthd(name: str, x: torch.Tensor) -> tuple[int, int, int, int]:
    """``(B, T, H, D)`` of a ``[B,T,H,D]`` tensor with no empty dimension."""
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dims [B,T,H,D], got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    if T < 1 or D < 1 or B < 1 or H < 1:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    return B, T, H, D


def _check_finite(name: str, x: torch.Tensor, *, resets: bool = False) -> None:
    """Reject inf and NaN; with ``resets`` (the log gate g), -inf is allowed: a hard reset."""
    bad = ~torch.isfinite(x)
    if resets:
        bad = bad & ~torch.isneginf(x)
    if bool(bad.any()):
        what = "NaN or +inf; -inf is a hard reset and allowed" if resets else "inf or NaN"
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) ({what})")


def _check_psd(name: str, H0: torch.Tensor) -> None:
    """Reject an initial H0 (``[N,H,D,D]``) that is not positive semidefinite: a state is a decayed sum
    of ``beta k k^T``.

    H0 may be a state as a policy stores it, rounded to as little as bf16 (unit roundoff u = 2^-8),
    which moves the eigenvalues of a PSD matrix by up to ``u ||H0||_F`` (measured: down to about
    -1.5e-3 max|eigenvalue| for the final states of the bf16-state policy). So H0 is rejected when
    its smallest eigenvalue is below ``-u ||H0||_F``: tested, in float64, by one Cholesky of
    ``H0 + u ||H0||_F I``; the eigenvalue for the message is computed only on failure."""
    H = H0.detach().double()
    tol = UNIT_ROUNDOFF["bf16"] * torch.linalg.matrix_norm(H)  # [N,H], Frobenius
    shifted = H + torch.where(tol > 0, tol, 1.0)[..., None, None] * torch.eye(H.shape[-1], dtype=H.dtype,
                                                                              device=H.device)
    bad = torch.linalg.cholesky_ex(shifted).info > 0
    if bool(bad.any()):
        n, h = (int(i) for i in bad.nonzero()[0])
        ev = torch.linalg.eigvalsh(H[n, h])
        raise ValueError(f"{name} must be positive semidefinite; batch {n}, head {h} has eigenvalue "
                         f"{float(ev[0]):.3g} < -{float(tol[n, h]):.3g} (2^-8 ||H0||_F; largest eigenvalue "
                         f"{float(ev[-1]):.3g})")


def validate_recurrence(k, v, g, beta, initial_state=None, cu_seqlens=None, *, check_values: bool = True,
                        check_state: bool = True, _more: dict | None = None) -> dict:
    """Raise ``ValueError`` naming the argument for any invalid input of the state recurrence
    ``H_t = gamma_t H_{t-1} + beta_t k_t k_t^T``, ``G_t = gamma_t G_{t-1} + beta_t v_t k_t^T``: the part of
    :func:`validate_inputs` that the chunk-state kernels (``kernels.chunk_states``) share.

    Checks: tensor type and supported dtype, shapes (``k [B,T,H,D]``, ``v [B,T,H,Dv]``, ``g``, ``beta``
    ``[B,T,H]``, the initial state ``[N,H,D,D]``, ``[N,H,Dv,D]``, N = B or the number of packed
    sequences of ``cu_seqlens``), a common device; with ``check_values`` also finiteness (except
    ``g = -inf``, a hard reset), ``g <= 0``, ``0 <= beta <= 1`` and (with ``check_state``) a finite,
    symmetric positive semidefinite initial H0 and a finite G0. The value checks are reduced on the
    device and read with one host synchronisation; the message is formed only for a failure.
    Returns the checked tensors by name."""
    named = {"k": k, "v": v, "g": g, "beta": beta}
    for name, x in named.items():
        _check_tensor(name, x)
    B, T, H, D = _check_bthd("k", k)
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H) or v.shape[3] < 1:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected [B,T,H,Dv] = [{B},{T},{H},Dv] with Dv >= 1")
    Dv = v.shape[3]
    _check_shape("g", g, (B, T, H), "[B,T,H]")
    _check_shape("beta", beta, (B, T, H), "[B,T,H]")
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be an int32/int64 tensor [N+1] of cumulative sequence lengths")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with B = 1, got B = {B}")
        if check_values:  # its values: a host read, skipped with the other value checks
            cs = cu_seqlens.tolist()
            if cs[0] != 0 or cs[-1] != T or any(b <= a for a, b in zip(cs, cs[1:], strict=False)):
                raise ValueError(f"cu_seqlens must increase strictly from 0 to T = {T}, got {cs}")
        N = cu_seqlens.numel() - 1
    state = {}
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("initial_state must be a pair (H0 [B,H,D,D], G0 [B,H,Dv,D])")
        H0, G0 = initial_state
        _check_tensor("initial_state[0] (H0)", H0)
        _check_tensor("initial_state[1] (G0)", G0)
        lead = "B" if cu_seqlens is None else "N"
        _check_shape("initial_state[0] (H0)", H0, (N, H, D, D), f"[{lead},H,D,D]")
        if Dv != D and tuple(G0.shape) == (N, H, D, Dv):
            raise ValueError(f"initial_state[1] (G0) has shape {tuple(G0.shape)}, expected [{lead},H,Dv,D] = "
                             f"{[N, H, Dv, D]}: this is flash-linear-attention's h_kv layout [N,H,K,V]; G0 is its "
                             "transpose (sum beta v k^T), or use mesa_stability.compat.fla.chunk_mesa_net")
        _check_shape("initial_state[1] (G0)", G0, (N, H, Dv, D), f"[{lead},H,Dv,D]")
        state = {"initial_state[0] (H0)": H0, "initial_state[1] (G0)": G0}
    _check_devices({**(_more or {}), **named, **state})
    if check_values:
        _check_values({**(_more or {}), **named, **(state if check_state else {})})
        if initial_state is not None and check_state:
            H0 = initial_state[0].detach().double()
            asym = float((H0 - H0.transpose(-1, -2)).abs().max())
            scale = float(H0.abs().max()) or 1.0
            if asym > 1e-3 * scale:
                raise ValueError(f"initial_state[0] (H0) must be symmetric; max |H0 - H0^T| = {asym:.3g}")
            _check_psd("initial_state[0] (H0)", initial_state[0])
    return {**named, **state}


# The range of each named input beyond finiteness (a device-side test of the bad values, and the message)
_RANGES = {
    "g": (lambda x: x > 0, lambda x: f"g is the log forget gate and must be <= 0; max is {float(x.max()):.3g}"),
    "beta": (lambda x: (x < 0) | (x > 1),
             lambda x: f"beta must lie in [0, 1]; range is [{float(x.min()):.3g}, {float(x.max()):.3g}]"),
    "lam": (lambda x: x <= 0,
            lambda x: f"lam must be > 0 everywhere (Lambda = diag(lam) is SPD); min is {float(x.min()):.3g}"),
}


def _check_values(named: dict) -> None:
    """Finiteness of every tensor (``g`` may be -inf: a hard reset) and the ranges of :data:`_RANGES`,
    all reduced on the device and read at once; the first failure in the order of ``named``, finiteness
    before range, raises with its message."""
    flags = []
    for name, x in named.items():
        x = x.detach()
        flags.append((~torch.isfinite(x) & ~torch.isneginf(x) if name == "g" else ~torch.isfinite(x)).any())
    for name, (bad, _) in _RANGES.items():
        if name in named:
            flags.append(bad(named[name].detach()).any())
    if not bool(torch.stack(flags).any()):  # the one host synchronisation
        return
    for name, x in named.items():
        _check_finite(name, x, resets=name == "g")
    for name, (bad, message) in _RANGES.items():
        if name in named and bool(bad(named[name]).any()):
            raise ValueError(message(named[name]))


def validate_inputs(q, k, v, g, beta, lam, initial_state=None, cu_seqlens=None, *,
                    check_values: bool = True, check_state: bool = True) -> None:
    """Raise ``ValueError`` naming the argument for any invalid input of a Mesa call: ``q [B,T,H,D]``
    and ``lam [H,D]`` (finite, ``lam > 0``) and everything :func:`validate_recurrence` checks.
    ``check_values=False`` skips the value checks (which read the data) and keeps the cheap
    structural ones; ``check_state=False`` skips those of the initial state (its finiteness, symmetry
    and positive semidefiniteness: a float64 Cholesky per head, the cost of a decode step many times
    over)."""
    for name, x in (("q", q), ("lam", lam)):
        _check_tensor(name, x)
    B, T, H, D = _check_bthd("q", q)
    _check_tensor("k", k)
    _check_shape("k", k, (B, T, H, D), "same as q [B,T,H,D]")
    _check_shape("lam", lam, (H, D), "[H,D]")
    validate_recurrence(k, v, g, beta, initial_state, cu_seqlens, check_values=check_values,
                        check_state=check_state, _more={"q": q, "lam": lam})


def _check_devices(named: dict) -> None:
    devices = {x.device for x in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n}: {x.device}" for n, x in named.items())
        raise ValueError(f"inputs are on different devices ({where})")


@dataclass(frozen=True, eq=False)
class MesaProblem:
    """Validated inputs of one Mesa layer call (see the module docstring for the math)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    lam: torch.Tensor
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None
    cu_seqlens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        validate_inputs(self.q, self.k, self.v, self.g, self.beta, self.lam, self.initial_state, self.cu_seqlens)
        if self.initial_state is not None:
            object.__setattr__(self, "initial_state", tuple(self.initial_state))

    # shape ------------------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def T(self) -> int:
        return self.q.shape[1]

    @property
    def H(self) -> int:
        return self.q.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def __repr__(self) -> str:
        init = "" if self.initial_state is None else ", initial_state"
        packed = "" if self.cu_seqlens is None else f", {self.cu_seqlens.numel() - 1} packed sequences"
        return (f"MesaProblem(B={self.B}, T={self.T}, H={self.H}, D={self.D}, Dv={self.Dv}, dtype={self.dtype}"
                f"{init}{packed})")

    # derived problems -----------------------------------------------------------------------------
    def replace(self, **changes) -> MesaProblem:
        """A new problem with some inputs replaced (validated again)."""
        fields = dict(q=self.q, k=self.k, v=self.v, g=self.g, beta=self.beta, lam=self.lam,
                      initial_state=self.initial_state, cu_seqlens=self.cu_seqlens)
        fields.update(changes)
        return MesaProblem(**fields)

    def to(self, dtype: torch.dtype | None = None, device=None) -> MesaProblem:
        """All inputs (gates and initial state included) cast to ``dtype`` and/or moved."""
        def cast(x):
            return x.to(device=device or x.device, dtype=dtype or x.dtype)
        init = None if self.initial_state is None else tuple(cast(s) for s in self.initial_state)
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device=device or self.cu_seqlens.device)
        return MesaProblem(cast(self.q), cast(self.k), cast(self.v), cast(self.g), cast(self.beta),
                           cast(self.lam), init, cu)

    def tokens(self, t0: int, t1: int) -> MesaProblem:
        """Tokens ``t0..t1-1`` as a problem of their own, without the state carried into ``t0``."""
        if self.cu_seqlens is not None:
            raise ValueError("tokens() slices one sequence; unpack packed sequences with sequences() first")
        return MesaProblem(self.q[:, t0:t1], self.k[:, t0:t1], self.v[:, t0:t1], self.g[:, t0:t1],
                           self.beta[:, t0:t1], self.lam, None)

    def sequences(self) -> list[MesaProblem]:
        """The packed sequences as separate ``B = 1`` problems (``[self]`` when not packed)."""
        if self.cu_seqlens is None:
            return [self]
        cs = self.cu_seqlens.tolist()
        out = []
        for n, (a, b) in enumerate(zip(cs, cs[1:], strict=False)):
            init = None if self.initial_state is None else tuple(s[n:n + 1] for s in self.initial_state)
            out.append(MesaProblem(self.q[:, a:b], self.k[:, a:b], self.v[:, a:b], self.g[:, a:b],
                                   self.beta[:, a:b], self.lam, init))
        return out

    # dense materialisation (references, metrics) --------------------------------------------------
    def iter_states(self, block: int = 64, dtype: torch.dtype = torch.float64,
                    t0: int = 0, t1: int | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield ``(s, e, H, G)`` for consecutive token blocks ``s..e-1`` covering ``t0..t1-1``.

        ``H: [B, e-s, H, D, D]`` holds H_t and ``G: [B, e-s, H, Dv, D]`` holds G_t, computed in
        ``dtype`` from the chunkwise closed form with the block's cumulative log-decay and its
        resets (:mod:`solvers.gates`: ``Gam_i``, ``seg_i``, decays exactly zero across a reset)::

            H_i = zeta_{i,start} H_start + sum_{j<=i} W_ij beta_j k_j k_j^T,
            zeta_{i,start} = exp(Gam_i) [seg_i = 0],   W_ij = exp(Gam_i - Gam_j) [i >= j, seg_i = seg_j]

        Exponents are of non-positive differences only; the upper triangle and pairs across a reset
        are selected away. Memory is O(block * D^2) per (batch, head).
        """
        t1 = self.T if t1 is None else t1
        if not (0 <= t0 <= t1 <= self.T):
            raise ValueError(f"token range [{t0}, {t1}) is outside [0, {self.T}]")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if self.cu_seqlens is not None:  # states restart at every sequence: blocks never straddle one
            for off, seq in zip(self.cu_seqlens.tolist(), self.sequences(), strict=False):
                lo, hi = max(t0 - off, 0), min(t1 - off, seq.T)
                if lo < hi:
                    for s, e, Hb, Gb in seq.iter_states(block, dtype, lo, hi):
                        yield s + off, e + off, Hb, Gb
            return
        k = self.k.to(dtype).transpose(1, 2)  # [B,H,T,D]
        v = self.v.to(dtype).transpose(1, 2)
        g = self.g.to(dtype).transpose(1, 2)  # [B,H,T]
        beta = self.beta.to(dtype).transpose(1, 2)
        B, H, D, Dv = self.B, self.H, self.D, self.Dv
        if self.initial_state is None:
            Hs = torch.zeros(B, H, D, D, dtype=dtype, device=self.device)
            Gs = torch.zeros(B, H, Dv, D, dtype=dtype, device=self.device)
        else:
            Hs, Gs = (s.to(dtype) for s in self.initial_state)
        start = 0
        while start < t1:
            end = min(start + block, t1) if start >= t0 else min(start + block, t0)
            Gam, seg = segmented_cumsum(g[:, :, start:end])  # [B,H,L], fp32 or wider
            W = pairwise_decay(Gam, seg).to(dtype) * beta[:, :, None, start:end]
            kb, vb = k[:, :, start:end], v[:, :, start:end]
            decay = decay_from_start(Gam, seg).to(dtype)[..., None, None]  # [B,H,L,1,1]
            Hb = decay * Hs[:, :, None] + torch.einsum("bhij,bhjd,bhje->bhide", W, kb, kb)
            Gb = decay * Gs[:, :, None] + torch.einsum("bhij,bhjd,bhje->bhide", W, vb, kb)
            Hs, Gs = Hb[:, :, -1], Gb[:, :, -1]
            if start >= t0:
                yield start, end, Hb.transpose(1, 2), Gb.transpose(1, 2)
            start = end

    def final_state(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_T, G_T) as ``[B,H,D,D]`` and ``[B,H,Dv,D]`` (``[N,...]`` for packed sequences)."""
        if self.cu_seqlens is not None:
            finals = [seq.final_state(dtype) for seq in self.sequences()]
            return torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals])
        Hs = Gs = None
        for _, _, Hb, Gb in self.iter_states(block=64, dtype=dtype):
            Hs, Gs = Hb[:, -1], Gb[:, -1]
        return Hs, Gs

    def trace_H(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """tr H_t for every token, ``[B,T,H]``: the cumulative sum that bounds lambda_max.

        tr H_t = gamma_t tr H_{t-1} + beta_t ||k_t||^2, evaluated with the same chunkwise
        closed form as :meth:`iter_states` but on scalars.
        """
        return self.diag_H(dtype).sum(-1)

    def diag_H(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """diag(H_t) for every token, ``[B,T,H,D]`` (Jacobi preconditioner, trace bound)."""
        if self.cu_seqlens is not None:
            return torch.cat([seq.diag_H(dtype) for seq in self.sequences()], dim=1)
        g = self.g.to(dtype).transpose(1, 2)
        w = (self.beta.to(dtype)[..., None] * self.k.to(dtype) ** 2).transpose(1, 2)  # [B,H,T,D]
        d0 = (torch.zeros(self.B, self.H, self.D, dtype=dtype, device=self.device)
              if self.initial_state is None
              else torch.diagonal(self.initial_state[0].to(dtype), dim1=-2, dim2=-1))
        out = torch.empty_like(w)
        # Sequential scan d_t = gamma_t d_{t-1} + beta_t k_t^2 (cheap: O(T D)). No cumulative sum, so
        # nothing to absorb; a reset (g <= RESET_LOG_GATE, -inf included) gives gamma = exp(g) = 0 exactly.
        gamma = torch.exp(g)
        d = d0
        for t in range(self.T):
            d = gamma[:, :, t, None] * d + w[:, :, t]
            out[:, :, t] = d
        return out.transpose(1, 2)

