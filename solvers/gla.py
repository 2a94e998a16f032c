"""Gated linear attention (GLA) on the Mesa layer's states: no solve, ``x_t = q_t``,

    o_t = G_t q_t = sum_{s <= t} zeta_{t,s} beta_s (k_s . q_t) v_s,     G_t = sum_{s <= t} zeta_{t,s} beta_s v_s k_s^T

(zeta_{t,s} the product of the forget gates after s up to t). It is what CG returns after 0 steps
from ``x0 = "q"`` (:mod:`solvers.cg`), computed chunkwise (:meth:`solvers.chunk_state.ChunkedSystem.output`)
and differentiated by autograd: a layer with ``method = "gla"`` trains as a GLA layer with the Mesa
layer's gates. (CG's implicit backward at 0 steps would also differentiate through ``H_t``, on which
GLA's output does not depend.) ``H_t`` and ``Lambda`` are not used, except that the final states
``(H_T, G_T)`` are returned as every method returns them, so that a GLA prefill can be continued.
"""

from __future__ import annotations

from .chunk_state import ChunkedSystem
from .precision import PrecisionPolicy
from .problem import MesaProblem
from .result import SolveResult


def solve_gla(problem: MesaProblem, policy: PrecisionPolicy, *, chunk_size: int = 64) -> SolveResult:
    """``o_t = G_t q_t`` for every token, in the policy's precision (``x = q``, 0 steps)."""
    S = ChunkedSystem.build(problem, policy, chunk_size)  # (validates chunk_size)
    o = S.output(S.Q)
    return SolveResult("gla", policy, S.to_tokens(S.Q), S.to_tokens(o), (S.H_final, S.G_final),
                       info={"chunk_size": S.C})
