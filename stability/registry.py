"""An OpInfo-style registry: every implementation of the Mesa solve, under every choice of
:class:`~solvers.spec.SolverSpec` it accepts, with its sample cases, references and budgets.

The idea is PyTorch's OpInfo (``torch/testing/_internal/opinfo``): instead of each test file picking
its own implementations, options, inputs and tolerances, one table says *what* is implemented and
*how* it is checked, and generic tests iterate the table (``tests/test_registry.py``). An entry
(:class:`OpEntry`) pairs

* an **implementation** (:class:`Implementation`): a library entry point wrapped as
  ``fn(problem, spec, e) -> Outputs``, which runs it on the inputs of ``problem`` as handed to an op
  (q, k, v in the case's input dtype, gates float32: :func:`stability.guard._device_problem`) and,
  given the upstream gradient ``e``, back-propagates ``L = sum_t e_t . o_t``. The entry points:

  - ``solve``: :func:`solvers.solve` with method ``"cg"``, the PyTorch chunkwise CG (forward only;
    it is what the ``"torch"`` backend runs, and the reference solvers' entry point);
  - ``mesa_chunk``, backends ``"torch"`` (the PyTorch CG with the implicit backward of
    :mod:`solvers.implicit`: the autograd path), ``"triton"`` (the kernels; a Triton entry, run
    compiled on CUDA or by the interpreter with ``TRITON_INTERPRET=1``) and ``"auto"`` (the op's
    default dispatch, which is the torch backend for CPU tensors);
  - ``mesa_step``: the one-token decode kernel (Triton), run on the last token of a case from the
    float64 state of the tokens before it (:meth:`MesaProblem.final_state`);

* a **spec**: a :class:`SolverSpec` whose policy, initial guess and preconditioner are taken from the
  library's constants, never listed here: the policies an implementation accepts
  (:data:`solvers.precision.POLICIES`; the kernels' ``KERNEL_POLICIES``, the decode step's
  ``STEP_POLICIES``), :data:`solvers.spec.X0_CHOICES`, :data:`solvers.spec.PRECOND_CHOICES` and
  :data:`solvers.spec.BACKENDS`. A choice added to the library appears here by itself, and a test
  (``test_registry_covers_every_choice_of_the_library``) holds the table to the constants. The specs
  of an implementation cover every choice one factor at a time around the default spec: every
  policy with the default options, and every (x0, precond) pair under the default policy
  (:data:`~solvers.precision.DEFAULT_POLICY`) — a full product would multiply the interpreter's time
  by the number of policies without testing a new code path;

* its **sample cases**: small seeded problems with float64 references (:class:`Sample`): the
  committed golden cases of the guard (:data:`stability.golden.GOLDEN`, T <= 64, D = 16) for the
  PyTorch entries, and one batch entry and head of ``well_conditioned`` (T = 32, D = 16) for the
  Triton ones (the interpreter executes every tile op in numpy; a forward and backward there costs
  1 to 4 s). The reference of a sample is the library's float64 one: the exact solver's x and o and
  the closed-form gradients (:func:`stability.golden.reference`), never one kept by a test;

* its **budget** per quantity, the guard's one rule (:func:`stability.guard.budget_of` on
  ``budgets.toml``: ``factor * u * kappa + rounding * u_out``, dg times its cancellation factor),
  with ``u = policy.u_at(kappa)`` and the sample's kappa. The budgets bound rounding, not truncation,
  so the specs run converged: 100 CG steps, as the guard does (docs/guard.md: 30 steps do not
  converge ``tiny_lambda``).

Two further samples serve the tests that an option takes effect: :data:`OPTIONS_SAMPLE`, one head of
``tiny_lambda`` (lam log-uniform from 1e-3 to 0.25, key standard deviations spread over two decades:
the diagonal of ``H_t + Lambda`` spans decades, so Jacobi preconditioning matters), run at
:data:`OPTION_STEPS` steps, and the initial guess at zero steps. :data:`RANGE_LIMITS` names the pairs
of (input format, sample) whose budgets are known not to hold (fp16's range; docs/guard.md); the
tests expect them to fail (strictly: a fix shows up as an unexpected pass, and the entry here is
then removed).
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mesa_stability import solvers
from mesa_stability.solvers import MesaProblem, precision
from mesa_stability.solvers import spec as spec_mod
from mesa_stability.solvers.certificate import Certificate, CertificateWarning
from mesa_stability.solvers.spec import SolverSpec

from . import golden, guard

# The converged setting of every entry (the guard's step cap, guard.GUARD_SPEC); the budgets bound rounding.
STEPS = guard.GUARD_SPEC.steps
# Steps at which the options' effect is measured on OPTIONS_SAMPLE: far from convergence (plain CG is
# still 0.66 away from x there), where a preconditioner that is ignored shows (measured: Jacobi cuts the
# error 3.4x in the chunkwise CG of every policy and 29x in the decode step)
OPTION_STEPS = 4

_ONE_HEAD = dict(B=1, T=32, H=1, D=16, Dv=16)
# The Triton entries' sample: the guard's well-conditioned golden case, one batch entry and one head.
KERNEL_SAMPLE = golden.GoldenCase("well_conditioned:B1H1", "well_conditioned", 0, _ONE_HEAD)
# Where preconditioning matters: tiny_lambda (seed of its golden case), one head; kappa ~ 1e3.
OPTIONS_SAMPLE = golden.GoldenCase("tiny_lambda:B1H1", "tiny_lambda", 4, _ONE_HEAD)
SAMPLES: dict[str, golden.GoldenCase] = {**golden.BY_NAME, KERNEL_SAMPLE.name: KERNEL_SAMPLE,
                                         OPTIONS_SAMPLE.name: OPTIONS_SAMPLE}

# (input format of the policy, sample) -> what is known to exceed its budget, and why (docs/guard.md,
# "fp16 policies ... fail 12 checks, all range limits of fp16"): the tests mark them xfail(strict).
RANGE_LIMITS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("fp16", "small_upstream_grad"): (("forward", "backward"), "q ~ 1e-6 is subnormal in fp16 (spacing 6e-8): "
                                      "~8% error in q before any solve (docs/guard.md)"),
    ("fp16", "large_values"): (("backward",), "v ~ 1e4: the backward's fp16 operands overflow (docs/guard.md)"),
}


def kernel_device() -> str:
    """Where the Triton entries' inputs live: CPU tensors under the interpreter, else CUDA."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return "cuda" if torch.cuda.is_available() and not interpreted else "cpu"


# --- samples --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Sample:
    """A sample case with its float64 references: ``ref`` (o, the closed-form gradients, kappa, dg's
    cancellation factor; :func:`stability.golden.reference`) and ``x`` = q-star of the exact solver."""

    case: golden.GoldenCase
    ref: golden.GoldenReference = field(repr=False)
    x: torch.Tensor = field(repr=False)

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def kappa(self) -> float:
        return self.ref.kappa

    def problem(self, device: str = "cpu") -> MesaProblem:
        """The inputs as handed to an implementation (the guard's: q, k, v in the input dtype, gates float32)."""
        return guard._device_problem(self.ref, device)


@functools.cache
def sample(name: str) -> Sample:
    """The sample case ``name`` of :data:`SAMPLES` with its references (computed once)."""
    ref = golden.reference(SAMPLES[name])
    return Sample(SAMPLES[name], ref, solvers.solve(ref.problem, "exact").x)


def x0_reference(problem: MesaProblem, x0: str) -> torch.Tensor:
    """The initial guess ``x0`` of CG in float64 from its definition (docs/design.md section 3): 0, or
    ``q_t / diag(H_t + Lambda)`` with ``diag(H_t)`` of :meth:`MesaProblem.diag_H`, or q itself. A new choice of
    :data:`solvers.spec.X0_CHOICES` needs its definition here (the x0 test says so)."""
    q = problem.q.double()
    if x0 == "zero":
        return torch.zeros_like(q)
    if x0 == "jacobi":
        return q / (problem.diag_H() + problem.lam.double())
    if x0 == "q":
        return q.clone()
    raise NotImplementedError(f"no float64 reference for the initial guess x0={x0!r}: add it to x0_reference")


# --- what an implementation returns -------------------------------------------------------------

@dataclass
class Outputs:
    """What one run returned, for the tokens the implementation computes (all T, or the decode step's
    last one): ``o [B,T',H,Dv]``, ``x [B,T',H,D]`` (q-star), per-token ``steps``, ``residual`` (the
    iteration's relative residual) and ``breakdown`` ``[B,T',H]``; ``grads`` (input name -> gradient of
    ``sum(e * o)``) when run backward; the accuracy ``certificate`` (and the backward's
    ``adjoint_certificate``) of the implementations that certify; the messages of the
    :class:`CertificateWarning` s the run issued."""

    o: torch.Tensor
    x: torch.Tensor
    steps: torch.Tensor
    residual: torch.Tensor
    breakdown: torch.Tensor | None
    grads: dict | None = None
    certificate: Certificate | None = None
    adjoint_certificate: Certificate | None = None
    warnings: tuple[str, ...] = ()


class _Caught:
    """Records the CertificateWarnings of a block (every one, not once per call site); others pass on."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always", CertificateWarning)
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        self.messages = tuple(str(w.message) for w in self.records if issubclass(w.category, CertificateWarning))
        for w in self.records:
            if not issubclass(w.category, CertificateWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


def _leaves(p: MesaProblem, grad: bool):
    return [t.detach().clone().requires_grad_(grad) for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]


def _backward(o: torch.Tensor, e: torch.Tensor, leaves) -> dict:
    o.backward(e.to(device=o.device, dtype=o.dtype))
    return {n: t.grad for n, t in zip(golden.GRADIENTS, leaves, strict=True)}


def run_solve(p: MesaProblem, spec: SolverSpec, e: torch.Tensor | None = None) -> Outputs:
    """:func:`solvers.solve` under the spec (forward only)."""
    res = solvers.solve(p, spec)
    return Outputs(res.o, res.x, res.steps, res.residual, res.breakdown)


def run_chunk(p: MesaProblem, spec: SolverSpec, e: torch.Tensor | None = None) -> Outputs:
    """:func:`kernels.mesa_chunk` under ``spec`` (its backend included), with the backward when ``e`` is given."""
    from mesa_stability.kernels import mesa_chunk

    leaves = _leaves(p, e is not None)
    with _Caught() as caught:
        o, st = mesa_chunk(*leaves, spec, initial_state=p.initial_state, cu_seqlens=p.cu_seqlens, return_x=True)
        grads = None if e is None else _backward(o, e, leaves)
        cert, adj = st.certificate, st.adjoint_certificate  # reading them waits for their verdicts
    stats = (None if t is None else t.detach() for t in (st.x, st.steps, st.residual, st.breakdown))
    return Outputs(o.detach(), *stats, grads, cert, adj, caught.messages)


def run_step(p: MesaProblem, spec: SolverSpec, e: torch.Tensor | None = None) -> Outputs:
    """:func:`kernels.mesa_step` on the last token of ``p``, from the float64 state of the tokens before it."""
    from mesa_stability.kernels import mesa_step

    if p.cu_seqlens is not None or p.initial_state is not None:
        raise ValueError("the decode step's samples are single sequences without an initial state")
    state = p.tokens(0, p.T - 1).final_state(torch.float64)
    last = [t[:, -1:] for t in (p.q, p.k, p.v, p.g, p.beta)]
    with _Caught() as caught:
        o, _, st = mesa_step(*last, p.lam, state, spec, return_stats=True)
        cert = st.certificate
    tok = [None if t is None else t[:, None] for t in (st.x, st.steps, st.residual)]  # [B,H,.] -> [B,1,H,.]
    return Outputs(o, *tok, None, None, cert, None, caught.messages)


@dataclass(frozen=True)
class Implementation:
    """A library entry point as the registry runs it.

    ``fn(problem, spec, e) -> Outputs``; ``policies()``: the names of the policies it accepts, read from
    the library's constant at call time; ``backend``: the SolverSpec backend of its entries;
    ``samples``: its sample cases (names of :data:`SAMPLES`); ``backward``: whether it is
    differentiable; ``certifies``: whether it returns an accuracy certificate; ``x0_choices()``: the initial guesses
    it implements (default every one of :data:`solvers.spec.X0_CHOICES`); ``triton``: it runs a
    Triton kernel (its tests carry the ``triton`` mark); ``last_token``: it computes only the last
    token (the decode step); ``default_only``: its entries are the default spec only (the dispatch of
    ``backend="auto"``, whose paths the other backends' entries cover)."""

    name: str
    fn: Callable[[MesaProblem, SolverSpec, torch.Tensor | None], Outputs] = field(repr=False)
    policies: Callable[[], Iterable[str]] = field(repr=False)
    backend: str
    samples: tuple[str, ...]
    backward: bool = False
    certifies: bool = False
    triton: bool = False
    last_token: bool = False
    default_only: bool = False
    x0_choices: Callable[[], Iterable[str]] = field(default=lambda: spec_mod.X0_CHOICES, repr=False)

    @property
    def device(self) -> str:
        return kernel_device() if self.triton else "cpu"


def _kernel_policies():
    from mesa_stability.kernels import mesa

    return mesa.KERNEL_POLICIES


def _step_policies():
    from mesa_stability.kernels import mesa

    return mesa.STEP_POLICIES


def _kernel_x0():
    from mesa_stability.kernels import mesa

    return mesa.KERNEL_X0


_GOLDEN = tuple(g.name for g in golden.GOLDEN)
IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("solve", run_solve, lambda: precision.POLICIES, "torch", _GOLDEN),
    Implementation("mesa_chunk", run_chunk, lambda: precision.POLICIES, "torch", _GOLDEN, backward=True,
                   certifies=True),
    Implementation("mesa_chunk", run_chunk, lambda: precision.POLICIES, "auto", _GOLDEN, backward=True,
                   certifies=True, default_only=True),
    Implementation("mesa_chunk", run_chunk, _kernel_policies, "triton", (KERNEL_SAMPLE.name,), backward=True,
                   certifies=True, triton=True, x0_choices=_kernel_x0),
    Implementation("mesa_step", run_step, _step_policies, "triton", (KERNEL_SAMPLE.name,), certifies=True,
                   triton=True, last_token=True, x0_choices=_kernel_x0),
)


# --- entries --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def budgets() -> dict:
    """``budgets.toml``, read once (:func:`stability.guard.load_budgets`)."""
    return guard.load_budgets()


@dataclass(frozen=True)
class OpEntry:
    """One implementation under one spec, with its sample cases (the module docstring)."""

    impl: Implementation
    spec: SolverSpec
    samples: tuple[str, ...]

    @property
    def name(self) -> str:
        """``mesa_chunk:cg/steps=100/fp32/backend=triton``: the implementation and the spec's label."""
        return f"{self.impl.name}:{self.spec.label}"

    @property
    def window(self) -> slice:
        """The tokens the implementation returns (all, or the decode step's last)."""
        return slice(-1, None) if self.impl.last_token else slice(None)

    def budget(self, s: Sample, quantity: str, dtype: torch.dtype) -> tuple[float, str]:
        """(budget, derivation) of ``quantity`` (``"o"``, ``"dq"``, ...) on sample ``s`` for a value
        returned in ``dtype``: the guard's rule (:func:`stability.guard.budget_of`)."""
        u = self.spec.policy.u_at(s.kappa)
        return guard.budget_of(budgets(), "quantities", quantity, u, s.kappa, guard.output_roundoff(dtype),
                               s.ref.dg_amplification)

    def call(self, s: Sample, *, backward: bool = False, **changes) -> Outputs:
        """Run on sample ``s`` under the spec with ``changes`` (SolverSpec fields), backward if asked."""
        spec = self.spec.replace(**changes) if changes else self.spec
        e = s.ref.e if backward and self.impl.backward else None
        return self.impl.fn(s.problem(self.impl.device), spec, e)

    def outputs(self, sample_name: str) -> Outputs:
        """The run on a sample case under the entry's spec, forward and (where supported) backward,
        computed once and shared by the tests that read it."""
        return _outputs(self, sample_name)


@functools.cache
def _outputs(entry: OpEntry, sample_name: str) -> Outputs:
    return entry.call(sample(sample_name), backward=True)


def base_spec(impl: Implementation) -> SolverSpec:
    """The default spec, converged (:data:`STEPS` steps), on the implementation's backend."""
    return SolverSpec(steps=STEPS, backend=impl.backend)


def specs(impl: Implementation) -> list[SolverSpec]:
    """The specs of an implementation: every policy it accepts with the default options, and every
    (x0, precond) pair of :mod:`solvers.spec` under the default policy (or the implementation's
    first, if it lacks the default); only the default spec for a ``default_only`` implementation."""
    base = base_spec(impl)
    if impl.default_only:
        return [base]
    names = list(impl.policies())
    pol = precision.DEFAULT_POLICY if precision.DEFAULT_POLICY in names else names[0]
    out = [base.replace(policy=name) for name in names]
    out += [base.replace(policy=pol, x0=x0, precond=pc)
            for x0, pc in itertools.product(impl.x0_choices(), spec_mod.PRECOND_CHOICES)]
    return list(dict.fromkeys(out))  # the default spec appears in both lists


def entries() -> list[OpEntry]:
    """Every entry of the registry, built from the library's constants at call time."""
    return [OpEntry(impl, s, impl.samples) for impl in IMPLEMENTATIONS for s in specs(impl)]


def known_failure(entry: OpEntry, sample_name: str, kind: str) -> str | None:
    """Why the tests of ``kind`` are known to fail for the entry on the sample, or None: ``"forward"`` /
    ``"backward"`` budgets outside fp16's range (:data:`RANGE_LIMITS`)."""
    kinds, why = RANGE_LIMITS.get((entry.spec.policy.input, sample_name), ((), ""))
    return why if kind in kinds else None


# --- pytest parametrisation -----------------------------------------------------------------------

def _marks(entry: OpEntry) -> list:
    import pytest

    return [pytest.mark.triton] if entry.impl.triton else []


def entry_params(select: Callable[[OpEntry], bool] | None = None) -> list:
    """``pytest.param(entry, id=entry.name)`` for every entry (``select``-ed), Triton entries marked."""
    import pytest

    return [pytest.param(e, marks=_marks(e), id=e.name) for e in entries() if select is None or select(e)]


def case_params(kind: str | None = None, select: Callable[[OpEntry], bool] | None = None) -> list:
    """``pytest.param(entry, sample_name, id="entry@sample")`` for every entry (``select``-ed) and each of
    its samples; Triton entries marked ``triton``, and the known failures of the tests of ``kind``
    (:func:`known_failure`) ``xfail(strict=True)``: a fix shows as an unexpected pass."""
    import pytest

    out = []
    for e in entries():
        if select is not None and not select(e):
            continue
        for name in e.samples:
            marks = _marks(e)
            why = known_failure(e, name, kind) if kind else None
            if why:
                marks.append(pytest.mark.xfail(strict=True, reason=why))
            out.append(pytest.param(e, name, marks=marks, id=f"{e.name}@{name}"))
    return out


__all__ = ["IMPLEMENTATIONS", "KERNEL_SAMPLE", "OPTIONS_SAMPLE", "OPTION_STEPS", "RANGE_LIMITS",
           "SAMPLES", "STEPS", "Implementation", "OpEntry", "Outputs", "Sample", "base_spec", "budgets", "case_params",
           "entries", "entry_params", "kernel_device", "known_failure", "sample", "specs", "x0_reference"]
