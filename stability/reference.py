"""High-precision reference: the Mesa recurrence and solves in mpmath (the root of trust).

For every batch entry and head, in ``dps`` decimal digits, directly from the definitions of
docs/design.md section 2 (no chunking, no closed forms, nothing shared with the float solvers):

    gamma_t = exp(g_t)
    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,   G_t = gamma_t G_{t-1} + beta_t v_t k_t^T
    x_t = (H_t + R_t)^{-1} q_t  (Cholesky in mpmath),   o_t = G_t x_t

with ``R_t = Lambda`` or, for ``regularizer="decayed"``, ``R_t = zeta_{t,0} Lambda`` (the problem
Sherman-Morrison solves). Every float input is converted exactly (a binary float is a rational
number). Results come back as float64 tensors, correctly rounded from ``dps`` digits.

A hard reset needs no special case here: ``g = -inf`` gives ``gamma = exp(-inf) = 0`` exactly, and a
finite reset gate its true gamma (mpmath's exponent range is unbounded: ``exp(-1e16)`` is about
``10^-4.3e15``), whose contribution vanishes at ``dps`` digits. Every reset gate of float64 (``g <=
-746``, ``exp(g) < 1e-323``) thus gives the same float64 x and o as ``g = -inf``, and a derivative
along the reset gate of 0 (the tests check both).

The cost is about ``B H T D^3 / 3`` multiplications at ``dps`` digits; :func:`mp_solve` refuses
problems above ``max_work`` with a clear message instead of running for hours.
"""

from __future__ import annotations

import mpmath
import torch

from mesa_stability.solvers import MesaProblem

# B*H*T*D^3 above which mp_solve refuses. Measured: B*H*T*D^3 = 5.2e5 (T=64, D=16, B*H=2) takes
# 1.4 s at 50 digits on one CPU core, so the cap is about 6 s of work.
MAX_WORK = 2_000_000


def mp_solve(problem: MesaProblem, dps: int = 50, *, regularizer: str = "static",
             max_work: int = MAX_WORK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B,T,H,D], o [B,T,H,Dv])`` as float64, computed in mpmath with ``dps`` digits."""
    if not isinstance(problem, MesaProblem):
        raise TypeError(f"problem must be a MesaProblem, got {type(problem).__name__}")
    if regularizer not in ("static", "decayed"):
        raise ValueError(f"regularizer must be 'static' or 'decayed', got {regularizer!r}")
    if dps < 20:
        raise ValueError(f"dps={dps} is too few digits for a reference (use >= 20, default 50)")
    if problem.cu_seqlens is not None:  # packed: every sequence from its own start state
        parts = [mp_solve(seq, dps, regularizer=regularizer, max_work=max_work) for seq in problem.sequences()]
        return torch.cat([x for x, _ in parts], dim=1), torch.cat([o for _, o in parts], dim=1)
    B, T, H, D, Dv = problem.B, problem.T, problem.H, problem.D, problem.Dv
    work = B * H * T * D**3
    if work > max_work:
        raise ValueError(
            f"{problem!r} is too large for the mpmath reference: B*H*T*D^3 = {work:.3g} > max_work = {max_work:.3g} "
            f"(a few minutes at most). Use the float64 exact solver (validated against mpmath on small problems) "
            f"or pass a smaller slice (problem.tokens(t0, t1), fewer heads)."
        )
    x_out = torch.empty(B, T, H, D, dtype=torch.float64)
    o_out = torch.empty(B, T, H, Dv, dtype=torch.float64)
    with mpmath.workdps(dps):
        for b, h, t, x, o in _mp_tokens(problem, regularizer):
            x_out[b, t, h] = torch.tensor([float(x[i]) for i in range(D)], dtype=torch.float64)
            o_out[b, t, h] = torch.tensor([float(o[i]) for i in range(Dv)], dtype=torch.float64)
    return x_out.to(problem.device), o_out.to(problem.device)


def _mp_tokens(problem: MesaProblem, regularizer: str = "static", delta: dict | None = None, step=0):
    """Yield ``(b, h, t, x_t, o_t)`` (mpmath vectors) of the recurrence at the current precision.

    ``delta`` (input name -> tensor of the input's shape) and the mpf ``step`` perturb every input
    exactly: ``input + step * delta`` is formed in mpmath, so steps far below float64 resolution work."""
    B, T, H, D = problem.B, problem.T, problem.H, problem.D
    delta = delta or {}
    step = mpmath.mpf(step)

    def val(name, tensor, idx):
        x = mpmath.mpf(float(tensor[idx]))
        return x + step * mpmath.mpf(float(delta[name][idx])) if name in delta else x

    def vec(name, tensor, idx):
        n = tensor.shape[-1]
        return mpmath.matrix([val(name, tensor, idx + (i,)) for i in range(n)])

    def mat(name, tensor, idx):
        r, c = tensor.shape[-2:]
        return mpmath.matrix([[val(name, tensor, idx + (i, j)) for j in range(c)] for i in range(r)])

    for b in range(B):
        for h in range(H):
            lam = vec("lam", problem.lam, (h,))
            if problem.initial_state is None:
                Hs, Gs = mpmath.zeros(D, D), mpmath.zeros(problem.Dv, D)
            else:
                Hs = mat("H0", problem.initial_state[0], (b, h))
                Gs = mat("G0", problem.initial_state[1], (b, h))
            zeta0 = mpmath.mpf(1)
            for t in range(T):
                gamma = mpmath.exp(val("g", problem.g, (b, t, h)))
                beta = val("beta", problem.beta, (b, t, h))
                k, v, q = (vec(n, getattr(problem, n), (b, t, h)) for n in ("k", "v", "q"))
                zeta0 *= gamma
                # matrix * scalar, not scalar * matrix: mpf.__mul__ first tries to convert the matrix
                # (through its repr) before deferring to the matrix, a third of the time
                Hs = Hs * gamma + (k * k.T) * beta
                Gs = Gs * gamma + (v * k.T) * beta
                A = Hs.copy()
                scale = zeta0 if regularizer == "decayed" else 1
                for i in range(D):
                    A[i, i] += scale * lam[i]
                # LU, not Cholesky: a perturbed H0 need not be symmetric
                x = mpmath.lu_solve(A, q) if "H0" in delta else mpmath.cholesky_solve(A, q)
                yield b, h, t, x, Gs * x


def mp_directional_derivative(problem: MesaProblem, e: torch.Tensor, direction: dict, dps: int = 50,
                              step: float = 1e-20, max_work: int = 200_000) -> float:
    """d/dh of ``L = sum_t e_t . o_t`` along ``direction`` (input name -> tensor), by a central
    difference in mpmath: error O(step^2) plus 10^-dps / step, about 1e-30 at the defaults."""
    work = problem.B * problem.H * problem.T * problem.D**3
    if work > max_work:
        raise ValueError(f"{problem!r} is too large for the mpmath derivative (B*H*T*D^3 = {work} > {max_work})")
    unknown = set(direction) - {"q", "k", "v", "g", "beta", "lam", "H0", "G0"}
    if unknown:
        raise ValueError(f"direction names unknown inputs {sorted(unknown)}")
    with mpmath.workdps(dps):
        def loss(sign):
            total = mpmath.mpf(0)
            for b, h, t, _, o in _mp_tokens(problem, "static", direction, sign * mpmath.mpf(step)):
                for i in range(problem.Dv):
                    total += mpmath.mpf(float(e[b, t, h, i])) * o[i]
            return total

        return float((loss(1) - loss(-1)) / (2 * mpmath.mpf(step)))
