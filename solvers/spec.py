"""How to solve: :class:`SolverSpec`, the one description of a Mesa solve.

Every entry point takes one: the ops ``kernels.mesa_chunk`` and ``kernels.mesa_step``, the layer
``kernels.MesaLayer``, the ablation grid (its TOML entries are SolverSpec fields), the softmax study,
and the implicit backward of :mod:`solvers.implicit`. Keyword arguments to those entry points are
sugar that builds one (:func:`solver_spec`). The fields:

* ``method``: ``"cg"`` (the kernels' and the layer's solver), or a reference solver of
  :func:`solvers.solve` for the layer and the ablations: ``"exact"``, ``"sherman_morrison"``,
  ``"chebyshev"``;
* ``steps`` (>= 0; a fixed step count when ``tol`` is None), ``tol`` (in (0, 1): stop at
  ``||r|| <= tol ||r_0||``), ``x0`` (``"zero"``, ``"jacobi"``, or ``"q"``: x_0 = q, the torch backend
  only; 0 steps then read out GLA's ``G_t q_t``), ``precond`` (None or
  ``"jacobi"``; ``"none"`` reads as None);
* ``policy``: a precision policy (:mod:`solvers.precision`; a name or a :class:`PrecisionPolicy`,
  held as the policy object); default :data:`~solvers.precision.DEFAULT_POLICY`, ``"auto"``, the
  certified one;
* ``chunk_size`` (tokens per chunk, >= 1), ``bwd_steps`` / ``bwd_tol`` (the adjoint solve's step cap
  and tolerance; None: ``steps`` / ``tol``);
* ``check`` (the accuracy certificate: ``"warn"``, ``"raise"`` or None) and ``check_tol`` (its
  threshold; None: the policy's ``sqrt(u)``);
* ``backend``: ``"auto"`` (the Triton kernels on CUDA tensors, PyTorch otherwise), ``"triton"`` or
  ``"torch"``.

A spec is validated once, when it is made, and an error names the field. It is frozen:
``spec.replace(steps=5)`` gives a new one. :meth:`SolverSpec.to_dict` / :meth:`SolverSpec.from_dict`
round-trip it through JSON and TOML (the policy by name).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from . import cg
from .certificate import CHECK_MODES
from .precision import DEFAULT_POLICY, PrecisionPolicy, get_policy

METHODS = ("cg", "exact", "sherman_morrison", "chebyshev", "gla")
X0_CHOICES = cg.X0_CHOICES
PRECOND_CHOICES = tuple(c for c in cg.PRECOND_CHOICES if c != "none")  # "none" is read as None
BACKENDS = ("auto", "triton", "torch")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True, kw_only=True)
class SolverSpec:
    """How to solve ``(H_t + Lambda) x_t = q_t`` for every token (the module docstring lists the fields)."""

    method: str = "cg"
    steps: int = 30
    tol: float | None = None
    x0: str = "zero"
    precond: str | None = None
    policy: PrecisionPolicy = field(default=DEFAULT_POLICY)  # a name is accepted and resolved
    chunk_size: int = 32
    bwd_steps: int | None = None
    bwd_tol: float | None = None
    check: str | None = "warn"
    check_tol: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"SolverSpec.method must be one of {METHODS}, got {self.method!r}")
        for name in ("steps", "bwd_steps"):
            val = getattr(self, name)
            if not (val is None and name == "bwd_steps") and not (_is_int(val) and val >= 0):
                raise ValueError(f"SolverSpec.{name} must be an int >= 0{' or None' if name != 'steps' else ''}, "
                                 f"got {val!r}")
        for name in ("tol", "bwd_tol"):
            val = getattr(self, name)
            if val is not None and not (_is_real(val) and 0 < val < 1):
                raise ValueError(f"SolverSpec.{name} must be None or a float in (0, 1), got {val!r}")
        if self.x0 not in X0_CHOICES:
            raise ValueError(f"SolverSpec.x0 must be one of {X0_CHOICES}, got {self.x0!r}")
        if self.precond == "none":
            object.__setattr__(self, "precond", None)
        if self.precond not in PRECOND_CHOICES:
            raise ValueError(f"SolverSpec.precond must be one of {PRECOND_CHOICES} (or 'none'), got {self.precond!r}")
        try:
            object.__setattr__(self, "policy", get_policy(self.policy))
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"SolverSpec.policy: {err}") from None
        if not (_is_int(self.chunk_size) and self.chunk_size >= 1):
            raise ValueError(f"SolverSpec.chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.check not in CHECK_MODES:
            raise ValueError(f"SolverSpec.check must be one of {CHECK_MODES}, got {self.check!r}")
        if self.check_tol is not None and not (_is_real(self.check_tol) and self.check_tol > 0):
            raise ValueError(f"SolverSpec.check_tol must be a positive float or None, got {self.check_tol!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SolverSpec.backend must be one of {BACKENDS}, got {self.backend!r}")
        # the spec as the registered operators take it (solvers.implicit.spec_json), formed once here:
        # a compiled graph then reads a plain string attribute (torch 2.11's dynamo cannot call a
        # function on a frozen dataclass as a constant)
        object.__setattr__(self, "_json", json.dumps(self.to_dict(), sort_keys=True))

    # --- derived values ----------------------------------------------------------------------------
    @property
    def adjoint_steps(self) -> int:
        """The adjoint solve's step cap (``bwd_steps``, default ``steps``)."""
        return self.steps if self.bwd_steps is None else self.bwd_steps

    @property
    def adjoint_tol(self) -> float | None:
        """The adjoint solve's tolerance (``bwd_tol``, default ``tol``)."""
        return self.tol if self.bwd_tol is None else self.bwd_tol

    @property
    def threshold(self) -> float:
        """The certificate's threshold: ``check_tol``, or the policy's ``sqrt(u)``."""
        return self.policy.check_tol if self.check_tol is None else float(self.check_tol)

    @property
    def label(self) -> str:
        """A short stable name: ``cg/steps=30/fp32``, ``cg/tol=0.0001,cap=30/auto``, ``exact/fp64``;
        fields other than method, stopping rule and policy appear only when not at their default."""
        if self.method in ("exact", "sherman_morrison", "gla"):
            out = f"{self.method}/{self.policy.name}"
        else:
            stop = f"tol={self.tol:g},cap={self.steps}" if self.tol is not None else f"steps={self.steps}"
            out = f"{self.method}/{stop}/{self.policy.name}"
        default = SolverSpec()
        for name in ("x0", "precond", "chunk_size", "bwd_steps", "bwd_tol", "check", "check_tol", "backend"):
            val = getattr(self, name)
            if val != getattr(default, name):
                out += f"/{name}={val:g}" if isinstance(val, float) else f"/{name}={val}"
        return out

    # --- copies and serialisation ------------------------------------------------------------------
    def replace(self, **changes) -> SolverSpec:
        """A copy with ``changes`` (SolverSpec fields), validated."""
        return solver_spec(self, **changes)

    def to_dict(self) -> dict:
        """The fields as plain values (the policy by name)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["policy"] = self.policy.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SolverSpec:
        """A spec from (a subset of) :meth:`to_dict`'s fields; unknown keys are an error that lists them."""
        if not isinstance(d, dict):
            raise TypeError(f"a solver spec is a table of fields, got {type(d).__name__}")
        return solver_spec(None, **d)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(SolverSpec))
_DEFAULT_SPEC = SolverSpec()  # frozen: shared by every call that passes no spec


def solver_spec(spec: SolverSpec | None = None, **options) -> SolverSpec:
    """``spec`` (default: ``SolverSpec()``) with ``options`` (its fields) changed; an unknown option is a
    TypeError that names it and lists the fields."""
    if spec is not None and not isinstance(spec, SolverSpec):
        raise TypeError(f"spec must be a SolverSpec or None, got {type(spec).__name__}")
    unknown = sorted(set(options) - set(SPEC_FIELDS))
    if unknown:
        raise TypeError(f"unknown solver option(s) {unknown}; the fields of SolverSpec are {list(SPEC_FIELDS)}")
    if spec is None:
        return SolverSpec(**options) if options else _DEFAULT_SPEC
    return dataclasses.replace(spec, **options) if options else spec


def spec_changes(spec: SolverSpec, exclude: tuple[str, ...] = ()) -> dict:
    """The fields of ``spec`` that differ from ``SolverSpec()``, the policy by name (``{"steps": 100}``)."""
    default = SolverSpec()
    out = {}
    for name in SPEC_FIELDS:
        val = getattr(spec, name)
        if name not in exclude and val != getattr(default, name):
            out[name] = val.name if isinstance(val, PrecisionPolicy) else val
    return out


def solve_options(spec: SolverSpec) -> dict:
    """The keyword arguments of :func:`solvers.solve` for ``spec.method`` (the reference solvers take
    only what applies to them: CG and Chebyshev the stopping rule, initial guess, chunking and the
    preconditioner when one is set (Chebyshev refuses one); the direct methods nothing)."""
    if spec.method == "gla":
        return {"chunk_size": spec.chunk_size}
    if spec.method not in ("cg", "chebyshev"):
        return {}
    opts = dict(steps=spec.steps, tol=spec.tol, x0=spec.x0, chunk_size=spec.chunk_size)
    if spec.precond is not None:
        opts["precond"] = spec.precond
    return opts


__all__ = ["BACKENDS", "CHECK_MODES", "METHODS", "PRECOND_CHOICES", "SPEC_FIELDS", "SolverSpec", "X0_CHOICES",
           "solve_options", "solver_spec", "spec_changes"]
