"""Reference solvers for the Mesa layer, pure PyTorch, any dtype, float64 by default.

``solve(problem, method, policy="fp64", **options)`` is the one entry point; ``solve(problem, spec)``
takes a :class:`SolverSpec` instead (its method, policy and the options that apply to the method):

* ``"exact"``: Cholesky per token (options: ``block``, ``regularizer``);
* ``"sherman_morrison"``: the recurrent rank-one inverse update (no options);
* ``"cg"``: chunkwise conjugate gradient (``steps``, ``tol``, ``x0``, ``precond``, ``chunk_size``);
* ``"chebyshev"``: Chebyshev semi-iteration (``steps``, ``tol``, ``x0``, ``chunk_size``);
* ``"gla"``: no solve, ``x = q``, ``o_t = G_t q_t``: gated linear attention on the same states
  (``chunk_size``), the baseline of the recall study.
"""

from __future__ import annotations

import torch

from .cg import solve_cg
from .chebyshev import solve_chebyshev
from .exact import solve_exact
from .gla import solve_gla
from .precision import ALIASES as POLICY_ALIASES
from .precision import POLICIES, PrecisionPolicy, get_policy
from .problem import MesaProblem, validate_inputs, validate_recurrence
from .result import SolveResult
from .sherman_morrison import own_problem_reference, solve_sherman_morrison
from .spec import SolverSpec, solve_options, solver_spec

__version__ = "0.1.0"

METHODS = {
    "exact": solve_exact,
    "sherman_morrison": solve_sherman_morrison,
    "cg": solve_cg,
    "chebyshev": solve_chebyshev,
    "gla": solve_gla,
}
METHOD_ALIASES = {"sm": "sherman_morrison", "cholesky": "exact", "cheb": "chebyshev"}
ITERATIVE = ("cg", "chebyshev")


def solve(problem: MesaProblem, method: str | SolverSpec = "exact", policy: str | PrecisionPolicy | None = None,
          **options) -> SolveResult:
    """Solve every token's system ``(H_t + Lambda) x_t = q_t`` of ``problem`` and form ``o_t``.

    ``method``: a name of :data:`METHODS` (``policy`` default ``"fp64"``, ``options`` the method's), or a
    :class:`SolverSpec`, which then says everything (:func:`solvers.spec.solve_options`; giving
    ``policy`` or options as well is a TypeError)."""
    if not isinstance(problem, MesaProblem):
        raise TypeError(f"problem must be a MesaProblem, got {type(problem).__name__}")
    if isinstance(method, SolverSpec):
        if policy is not None or options:
            raise TypeError("solve(problem, spec) takes no policy or options: they are fields of the spec "
                            "(spec.replace(...))")
        return solve(problem, method.method, method.policy, **solve_options(method))
    if policy is None:
        policy = "fp64"
    name = METHOD_ALIASES.get(method, method)
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)} (aliases {sorted(METHOD_ALIASES)})")
    policy = get_policy(policy)
    if problem.cu_seqlens is not None:
        return _cat_results([solve(seq, name, policy, **options) for seq in problem.sequences()])
    try:
        return METHODS[name](problem, policy, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"method {name!r} does not take that option: {err}") from None
        raise


def _cat_results(parts: list[SolveResult]) -> SolveResult:
    """Packed sequences: per-token fields concatenated along T, final states stacked along N."""
    def cat(field):
        vals = [getattr(p, field) for p in parts]
        return None if vals[0] is None else torch.cat(vals, dim=1)

    first = parts[0]
    final = tuple(torch.cat([p.final_state[i] for p in parts]) for i in range(2))
    return SolveResult(first.method, first.policy, cat("x"), cat("o"), final, steps=cat("steps"),
                       residual=cat("residual"), breakdown=cat("breakdown"),
                       info=dict(first.info, sequences=len(parts)))


__all__ = [
    "MesaProblem", "PrecisionPolicy", "POLICIES", "POLICY_ALIASES", "SolveResult", "METHODS", "ITERATIVE",
    "get_policy", "solve", "solve_cg", "solve_chebyshev", "solve_exact", "solve_sherman_morrison",
    "own_problem_reference", "validate_inputs", "validate_recurrence", "SolverSpec", "solver_spec",
]
