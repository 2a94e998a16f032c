"""Verification at production scale: named problem families x sizes, every kernel policy, against the
float64 reference of :mod:`stability.scale_reference`, with a verdict that separates flagged errors
from silent ones.

**Cases.** A grid (:data:`GRIDS`, data) lists families x head dims x lengths; every case is a seeded
problem of :mod:`stability.cases` (a named stress case through :func:`~stability.cases.make`, or
:func:`~stability.cases.random_problem` with the family's parameters), handed over as it is in
production: q, k, v rounded to bf16, g, beta, lam in fp32, ``B = 1``, ``H = 4`` (packed sequences for
``varlen``), with a seeded upstream gradient ``e = dL/do`` (fp32, scaled by the family's
``grad_scale``). The reference is that of exactly these rounded inputs.

**Reference.** Per case, once: ``x*``, ``o*`` and, for ``T <= backward_max_T``, the float64 gradients
``dq*, dk*, dv*, dg*, dbeta*, dlam*`` of ``L = sum_t e_t . o_t``
(:func:`stability.scale_reference.reference`), the free condition bound
``kappa = max_t (tr H_t + max lam) / min lam`` and dg's cancellation factor
(:func:`stability.golden.dg_amplification`). It is cached in ``cache_dir`` (one ``.pt`` per case,
keyed by family, sizes and seed, checked against a digest of the inputs), so a resumed run (or
another job of a parallel one) reuses it. A ``reference`` row per case checks the float64 reference
itself against 50-digit mpmath on a prefix (:func:`stability.scale_reference.mp_check_prefix`: ``T0``
tokens, batch 0, head 0, the first ``reference_dims`` coordinates), budget ``8 u_64 kappa_prefix``
(the ``o`` budget at ``u = 2^-53``; the prefix bound ``kappa_prefix`` also bounds the cut-down
problem's).

**Measurement.** For every (case, policy) the op runs with ``check="warn"``, ``return_stats=True``,
``return_x=True`` (the options it takes), recording every
:class:`~solvers.certificate.CertificateWarning`; then, below the backward limit, ``o.backward(e)``.
Each quantity ``Q`` in ``o, x, dq, dk, dv, dg, dbeta, dlam`` gives one row with the normwise relative
error ``||Q - Q*||_F / ||Q*||_F`` (:func:`stability.metrics.rel_error`; ``inf`` when not finite) and
the budget of :func:`stability.guard.budget_of`::

    budget(Q) = min(1, factor_Q u kappa [x amp for dg] + rounding_Q u_out(Q)),   u = policy.u_at(kappa)

(``stability/budgets.toml``; ``x`` has ``o``'s budget: one solve, returned in fp32; for ``auto``,
``u_at`` is the policy's promise at the largest bound, its coarser tiers on the chunks of smaller
bound included). A relative error of 1 carries no digit, so no budget exceeds 1: an answer off by
more than its own size is never a pass, whatever ``kappa u`` allows (bf16 policies at T = 65536 have
``8 u kappa`` near 8000).

**Verdict.**

* ``pass``: error <= budget;
* ``flagged``: error > budget (or not finite), and the op said so: for ``o`` and ``x`` the forward's
  certificate failed somewhere or a CertificateWarning was raised; for gradients the adjoint's
  certificate (``stats.adjoint_certificate``) failed, a warning was raised in the backward, or the
  forward was flagged (every gradient but dq is formed from x as well);
* ``FAIL``: error > budget and nothing flagged it: a silent wrong answer;
* ``error``: the op raised (loud, but the check could not be made); ``n/a``: the op does not return
  the quantity (no ``x``, no backward, no packed sequences).

An op without ``check`` / ``return_stats`` is run without them: nothing can flag its rows. Each row
also records the largest certified bound, the worst per-token error of x
``max_t ||x_t - x*_t|| / ||x*_t||``, how many tokens exceed their own certified bound (a rigorous
certificate has none), the certificate tier, the mean CG steps, wall times, the device, the torch
and triton versions and the commit. Rows are tidy (one per case x policy x quantity), appended to
``results.csv`` after every (case, policy); ``resume=True`` skips those already there.

**Parallel jobs.** ``jobs = n`` runs the policies in n processes (spawned; one GPU is shared): the
kernels compile once per policy and head dim, and on a bare machine compiling was nearly half of a
first run (about 200 of 450 s on an H200), so n processes compile n policies at once. They share
``results.csv`` and the reference cache under file locks: one job computes a case's reference while
the others wait for it, and one job (the first) makes the mpmath checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch

from mesa_stability import solvers
from mesa_stability.solvers import MesaProblem
from mesa_stability.solvers.certificate import CertificateWarning
from mesa_stability.solvers.precision import UNIT_ROUNDOFF
from mesa_stability.solvers.spec import SolverSpec, spec_changes
from mesa_stability.solvers.verdict import flush as flush_checks

from . import cases, golden, guard, metrics, scale_reference
from .provenance import PROVENANCE_COLUMNS, git_commit, provenance  # noqa: F401  (git_commit: benchmarks)
from .results_store import append_rows, folder_lock, read_table

QUANTITIES = ("o", "x", "dq", "dk", "dv", "dg", "dbeta", "dlam")
GRADIENTS = ("q", "k", "v", "g", "beta", "lam")
VERDICTS = ("FAIL", "error", "flagged", "pass", "n/a")  # worst first
REFERENCE_VERSION = 2  # bump when the cached reference's content changes
BUDGET_CAP = 1.0  # no budget above a relative error of 1 (module docstring)
DEFAULT_SPEC = guard.GUARD_SPEC  # the grid's solve (100 CG steps, the certificate on); the policy is each run's
# relative compile cost of a policy's kernels (first calls on an H200, forward + backward, D = 64 and
# 128: auto ~63 s, fp32 ~43 s, the others 12 to 21 s): weights of the split into parallel jobs
COMPILE_WEIGHT = {"auto": 3.0, "fp32": 2.0}

# --- the grids (data) ------------------------------------------------------------------------------
# source: a stress case of stability.cases (built by cases.make with its own defaults, "as in" it) or
# "random_problem" (stability.cases.random_problem with params); grad_scale scales the upstream gradient.
FAMILIES: dict[str, dict] = {
    "low_rank_gamma1": {
        "source": "random_problem",
        "params": {"key_rank": 2, "gamma_range": (1.0, 1.0), "beta_range": (1.0, 1.0), "lam_range": (0.25, 0.25)},
        "stresses": "keys from a 2-dim subspace, gamma = beta = 1, lam = 0.25: two eigenvalues grow like T/2 "
                    "over a flat floor, kappa ~ 4T (where the kernels used to return finite garbage)",
    },
    "no_forgetting": {"source": "no_forgetting_long", "params": {},
                      "stresses": "gamma = 1, anisotropic keys (std ratio 1e-2): tr H_t and kappa grow like T"},
    "strong_forgetting": {"source": "strong_forgetting", "params": {},
                          "stresses": "gamma in [0.01, 0.1]: H_t nearly rank one"},
    "tiny_lambda": {"source": "tiny_lambda", "params": {},
                    "stresses": "lam log-uniform down to 1e-3, anisotropic keys: kappa ~ tr H / 1e-3"},
    "large_values": {"source": "large_values", "params": {},
                     "stresses": "v scaled by 1e4 with a mean offset shared with k: G_t grows past fp16's range"},
    "small_upstream_grad": {"source": "small_upstream_grad", "params": {}, "grad_scale": 1e-6,
                            "stresses": "q and the upstream gradient scaled by 1e-6: tiny right-hand sides"},
    "varlen": {"source": "varlen", "params": {"n_seqs": 4},
               "stresses": "4 packed sequences (cu_seqlens): states restart at every sequence start"},
}

GRIDS: dict[str, dict] = {
    "production": {
        "description": "production sizes on one GPU: bf16 q/k/v, fp32 gates, B = 1, H = 4; low_rank_gamma1 to "
                       "T = 65536 at D = 64 and 128, the other families at T = 4096 and 16384 (D = 64), "
                       "no_forgetting also at T = 65536 (D = 128); gradients up to T = 16384",
        "B": 1, "H": 4, "backward_max_T": 16384, "reference_T0": 32, "reference_dims": 16,
        "sizes": [
            {"family": "low_rank_gamma1", "D": 64, "T": [1024, 4096, 16384, 65536]},
            {"family": "low_rank_gamma1", "D": 128, "T": [1024, 16384, 65536]},
            {"family": "no_forgetting", "D": 64, "T": [4096, 16384]},
            {"family": "no_forgetting", "D": 128, "T": [65536]},
            {"family": "strong_forgetting", "D": 64, "T": [4096, 16384]},
            {"family": "tiny_lambda", "D": 64, "T": [4096, 16384]},
            {"family": "large_values", "D": 64, "T": [4096, 16384]},
            {"family": "small_upstream_grad", "D": 64, "T": [4096, 16384]},
            {"family": "varlen", "D": 64, "T": [4096, 16384]},
        ],
    },
    "smoke": {
        "description": "the production families at CPU sizes (seconds): B = 1, H = 2, T = 64 and 128, D = 8 and 16",
        "B": 1, "H": 2, "backward_max_T": 128, "reference_T0": 16, "reference_dims": 8,
        "sizes": [
            {"family": "low_rank_gamma1", "D": 8, "T": [64, 128]},
            {"family": "low_rank_gamma1", "D": 16, "T": [64]},
            {"family": "no_forgetting", "D": 16, "T": [64]},
            {"family": "strong_forgetting", "D": 8, "T": [64]},
            {"family": "tiny_lambda", "D": 8, "T": [64]},
            {"family": "large_values", "D": 8, "T": [64]},
            {"family": "small_upstream_grad", "D": 8, "T": [64]},
            {"family": "varlen", "D": 8, "T": [128]},
        ],
    },
}

COLUMNS = ["kind", "impl", "family", "case", "B", "T", "H", "D", "seed", "policy", "options", "quantity",
           "measured", "budget", "ratio", "derivation", "verdict", "flagged_by", "kappa", "u", "cert_bound",
           "adjoint_bound", "tier", "adjoint_tier", "max_token_err_x", "tokens_over_bound", "warned",
           "adjoint_warned", "mean_steps", "wall_fwd_s", "wall_bwd_s", "reference_s", *PROVENANCE_COLUMNS, "note"]
KEY = ("kind", "impl", "case", "policy", "options")


class UsageError(guard.UsageError):
    """A bad production-grid invocation (exit status 2); the message names the flag."""


@dataclass(frozen=True)
class ProductionCase:
    """One family at one size and seed."""

    family: str
    T: int
    D: int
    B: int = 1
    H: int = 4
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.family}/D{self.D}/T{self.T}"

    @property
    def key(self) -> str:
        """The reference cache's key: family, sizes and seed."""
        return f"{self.family}_B{self.B}_T{self.T}_H{self.H}_D{self.D}_s{self.seed}"

    def build(self) -> tuple[MesaProblem, torch.Tensor]:
        """(problem as handed over: bf16 q/k/v, fp32 gates, on the CPU; upstream gradient e, fp32)."""
        fam = FAMILIES[self.family]
        params = dict(fam.get("params", {}))
        if fam["source"] == "random_problem":
            p = cases.random_problem(self.B, self.T, self.H, self.D, self.D, seed=self.seed, **params)
        else:
            p = cases.make(fam["source"], seed=self.seed, B=self.B, T=self.T, H=self.H, D=self.D, Dv=self.D,
                           **params)
        e = cases.upstream_gradient(p, scale=float(fam.get("grad_scale", 1.0)), seed=self.seed + 101).float()
        init = None if p.initial_state is None else tuple(s.float() for s in p.initial_state)
        rounded = MesaProblem(*(t.to(torch.bfloat16) for t in (p.q, p.k, p.v)),
                              *(t.float() for t in (p.g, p.beta, p.lam)), init, p.cu_seqlens)
        return rounded, e


@dataclass
class Grid:
    """A production grid: its cases and settings (from :data:`GRIDS`)."""

    name: str
    cases: list[ProductionCase]
    backward_max_T: int
    reference_T0: int
    reference_dims: int
    description: str = ""

    @classmethod
    def from_data(cls, name: str, data: dict, seed: int = 0) -> Grid:
        unknown = sorted({s["family"] for s in data["sizes"]} - set(FAMILIES))
        if unknown:
            raise ValueError(f"grid {name!r} names unknown families {unknown}")
        items = [ProductionCase(s["family"], int(T), int(s["D"]), int(data["B"]), int(data["H"]), seed)
                 for s in data["sizes"] for T in s["T"]]
        return cls(name, items, int(data["backward_max_T"]), int(data["reference_T0"]),
                   int(data["reference_dims"]), data.get("description", ""))


def get_grid(name: str, seed: int = 0) -> Grid:
    if name not in GRIDS:
        raise UsageError(f"unknown production grid {name!r}; known: {sorted(GRIDS)}")
    return Grid.from_data(name, GRIDS[name], seed)


def _positive(flag: str, values) -> list[int]:
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise UsageError(f"{flag}: values must be positive integers, got {bad}")
    return list(values)


def select(grid: Grid, families=None, Ts=None, Ds=None) -> list[ProductionCase]:
    """The grid's cases of the chosen families, lengths and head dims (None: all); errors name the flag."""
    if families:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise UsageError(f"--families: unknown family(ies) {unknown}; known: {list(FAMILIES)}")
    Ts = _positive("--T", Ts) if Ts else None
    Ds = _positive("--D", Ds) if Ds else None
    for flag, chosen, have in (("--T", Ts, {c.T for c in grid.cases}), ("--D", Ds, {c.D for c in grid.cases})):
        missing = sorted(set(chosen or ()) - have)
        if missing:
            raise UsageError(f"{flag} {missing}: not in grid {grid.name!r} (it has {sorted(have)})")
    out = [c for c in grid.cases if (not families or c.family in families) and (not Ts or c.T in Ts)
           and (not Ds or c.D in Ds)]
    if not out:
        raise UsageError(f"--families/--T/--D select no case of grid {grid.name!r}")
    return out


def select_policies(policies=None) -> list[str]:
    """The chosen policies (default: every kernel policy), canonical names; errors name --policy."""
    from mesa_stability.kernels.mesa import KERNEL_POLICIES

    if not policies:
        return list(KERNEL_POLICIES)
    out = []
    for p in policies:
        try:
            out.append(solvers.get_policy(p).name)
        except (KeyError, ValueError, TypeError) as err:
            raise UsageError(f"--policy: {err}") from err
    return list(dict.fromkeys(out))


# --- the float64 reference (cached) ------------------------------------------------------------------

@dataclass
class Reference:
    """One case's float64 truth on the device: x*, o*, gradients (or None), kappa, dg's amplification."""

    x: torch.Tensor
    o: torch.Tensor
    kappa: float
    grads: dict | None = None
    dg_amplification: float = 1.0
    seconds: float = 0.0
    cached: bool = False
    info: dict = field(default_factory=dict)


def digest(problem: MesaProblem, e: torch.Tensor) -> str:
    """BLAKE2b of the inputs' exact bytes, shapes and dtypes (q, k, v, g, beta, lam, initial state,
    cu_seqlens, e): the cache's check that a stored reference is that of these inputs."""
    h = hashlib.blake2b(digest_size=20)
    init = list(problem.initial_state or ())
    cu = [] if problem.cu_seqlens is None else [problem.cu_seqlens]
    for t in [problem.q, problem.k, problem.v, problem.g, problem.beta, problem.lam, *init, *cu, e]:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock on ``path`` (created if missing) for the jobs of a parallel run (POSIX flock)."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cache_path(cache_dir: str, case: ProductionCase) -> str:
    return os.path.join(cache_dir, f"{case.key}.pt")


def reference_for(case: ProductionCase, problem: MesaProblem, e: torch.Tensor, device: str, cache_dir: str | None,
                  backward: bool) -> Reference:
    """The case's reference, from ``cache_dir`` when there (same inputs, gradients if ``backward``), else
    computed on ``device`` by :func:`stability.scale_reference.reference` and stored there."""
    if not cache_dir:
        return _compute_reference(case, problem, e, device, None, backward, digest(problem, e))
    os.makedirs(cache_dir, exist_ok=True)
    path = cache_path(cache_dir, case)
    with locked(path + ".lock"):  # one job computes, the others wait and read it
        key = digest(problem, e)
        if os.path.exists(path):
            try:
                data = torch.load(path, map_location=device, weights_only=True)
            except Exception:  # unreadable (interrupted write, other torch): recompute
                data = None
            if (data and data.get("version") == REFERENCE_VERSION and data.get("digest") == key
                    and (data["grads"] is not None or not backward)):
                return Reference(data["x"], data["o"], data["kappa"], data["grads"], data["dg_amplification"],
                                 data["seconds"], True, data["info"])
        return _compute_reference(case, problem, e, device, path, backward, key)


def _compute_reference(case: ProductionCase, problem: MesaProblem, e: torch.Tensor, device: str, path: str | None,
                       backward: bool, key: str) -> Reference:
    dev = problem.to(device=device)
    _sync(device)
    t0 = time.perf_counter()
    ref = scale_reference.reference(dev, e.to(device) if backward else None)
    _sync(device)
    seconds = time.perf_counter() - t0
    grads = None if ref.grads is None else {n: ref.grads[n] for n in GRADIENTS}
    amp = golden.dg_amplification(dev.to(torch.float64), grads["g"]) if grads else 1.0
    out = Reference(ref.x, ref.o, float(ref.kappa_bound.max()), grads, amp, seconds, False, dict(ref.info))
    if path:
        cpu = {"version": REFERENCE_VERSION, "key": case.key, "digest": key, "x": out.x.cpu(), "o": out.o.cpu(),
               "kappa": out.kappa, "grads": None if grads is None else {n: t.cpu() for n, t in grads.items()},
               "dg_amplification": amp, "seconds": seconds, "info": out.info}
        torch.save(cpu, path + ".tmp")
        os.replace(path + ".tmp", path)
    return out


def reference_rows(case: ProductionCase, problem: MesaProblem, device: str, grid: Grid, cfg: dict,
                   meta: dict) -> list[dict]:
    """The float64 reference against 50-digit mpmath on a prefix (batch 0, head 0): rows of kind
    ``reference`` for x and o, budget ``8 u_64 kappa_prefix``."""
    dims = min(grid.reference_dims, problem.D)
    seq = problem.sequences()[0] if problem.cu_seqlens is not None else problem
    T0 = min(grid.reference_T0, seq.T)
    pre = scale_reference.prefix(seq, T0)
    lam = pre.lam[0].double()
    kappa = float(((pre.trace_H()[0, :, 0] + lam.max()) / lam.min()).max())
    t0 = time.perf_counter()
    try:
        errs = scale_reference.mp_check_prefix(problem.to(device=device), T0=T0, dims=dims)
        note = f"prefix T0={T0}, batch 0, head 0, first {dims} of D={problem.D} coordinates, 50 digits"
    except Exception as err:
        errs, note = {"x": float("nan"), "o": float("nan")}, f"raised {err!r}"[:200]
    wall = time.perf_counter() - t0
    rows = []
    for q in ("x", "o"):
        b, how = guard.budget_of(cfg, "quantities", "o", UNIT_ROUNDOFF["fp64"], kappa)
        verdict = "error" if note.startswith("raised") else ("pass" if errs[q] <= b else "FAIL")
        rows.append(_row(meta, kind="reference", impl="scale_reference", case=case, policy="fp64", options="-",
                         quantity=q, measured=errs[q], budget=b, derivation=how + " (fp64 vs mpmath)", verdict=verdict,
                         kappa=kappa, u=UNIT_ROUNDOFF["fp64"], wall_fwd_s=wall, note=note))
    return rows


# --- the op ---------------------------------------------------------------------------------------------

def _takes(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def targets(impl: str | None, policies: list[str], device: str, spec: SolverSpec,
            extra: dict | None = None) -> list[guard.Target]:
    """One :class:`stability.guard.Target` per policy: ``spec`` with that policy
    (:func:`stability.guard.resolve`)."""
    out = []
    for pol in policies:
        try:
            pspec = spec.replace(policy=pol)
        except ValueError as err:
            raise UsageError(f"--policies: {err}") from err
        out.append(guard.resolve(impl, pspec, device, extra))
    return out


def _sync(device: str) -> None:
    """Wait for the device, and deliver the certificate verdicts still pending (solvers.verdict), so
    that their warnings land in the caller's capture."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    flush_checks()


def _stats_of(out):
    """(o, stats or None) of an op's return value: o, or a tuple whose first element is o and whose last,
    when it is not a tensor / pair of states, the stats."""
    if not isinstance(out, tuple):
        return out, None
    last = out[-1] if len(out) > 1 else None
    return out[0], (None if last is None or isinstance(last, (torch.Tensor, tuple, list)) else last)


def _cert_failed(c) -> bool | None:
    return None if c is None else not bool(c.ok)


def _warned(records) -> bool:
    return any(issubclass(w.category, CertificateWarning) for w in records)


@dataclass
class OpRun:
    """What one call (forward and, optionally, backward) produced."""

    o: torch.Tensor | None = None
    stats: object = None
    grads: dict | None = None
    warned: bool = False
    adjoint_warned: bool = False
    wall_fwd: float = float("nan")
    wall_bwd: float = float("nan")
    error: str = ""
    bwd_error: str = ""
    bwd_na: str = ""
    other_warnings: list = field(default_factory=list)


def run_op(target: guard.Target, problem: MesaProblem, e: torch.Tensor, backward: bool) -> OpRun:
    """Forward (and backward with ``e``) of ``target`` on ``problem`` (already on the device), warnings captured."""
    fn, dev = target.fn, target.device
    opts = dict(target.options)
    for name, val in (("check", "warn"), ("return_stats", True), ("return_x", True)):
        if _takes(fn, name):
            opts.setdefault(name, val)
    if problem.cu_seqlens is not None:
        if not _takes(fn, "cu_seqlens"):
            return OpRun(error="n/a: the op takes no cu_seqlens (packed sequences)")
        opts["cu_seqlens"] = problem.cu_seqlens
    if problem.initial_state is not None:
        opts["initial_state"] = problem.initial_state
    leaves = [t.detach().clone().requires_grad_(backward)
              for t in (problem.q, problem.k, problem.v, problem.g, problem.beta, problem.lam)]
    res = OpRun()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _sync(dev)
        t0 = time.perf_counter()
        try:
            with torch.set_grad_enabled(backward):
                out = fn(*leaves, **opts)
            _sync(dev)
        except NotImplementedError as err:
            return OpRun(error=f"n/a: unsupported: {err}"[:200])
        except Exception as err:  # loud: recorded as verdict "error"
            return OpRun(error=f"raised {err!r}"[:200])
        res.wall_fwd = time.perf_counter() - t0
    res.o, res.stats = _stats_of(out)
    res.warned = _warned(rec)
    res.other_warnings = [str(w.message)[:100] for w in rec if not issubclass(w.category, CertificateWarning)]
    if not backward:
        return res
    if not (isinstance(res.o, torch.Tensor) and res.o.requires_grad):
        res.bwd_na = "no backward (o does not require grad)"
        return res
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            res.o.backward(e.to(device=res.o.device, dtype=res.o.dtype))
            _sync(dev)
        except NotImplementedError as err:
            res.bwd_na = f"no backward: {err}"[:200]
            return res
        except Exception as err:
            res.bwd_error = f"backward raised {err!r}"[:200]
            return res
        res.wall_bwd = time.perf_counter() - t0
    res.adjoint_warned = _warned(rec)
    res.grads = {n: t.grad for n, t in zip(GRADIENTS, leaves, strict=True)}
    return res


def verdict(measured: float, budget: float, flagged: bool) -> str:
    """``pass`` if measured <= budget (NaN and inf do not), else ``flagged`` or ``FAIL`` (silent)."""
    if measured <= budget:
        return "pass"
    return "flagged" if flagged else "FAIL"


def measure(case: ProductionCase, target: guard.Target, ref: Reference, run: OpRun, cfg: dict, meta: dict,
            backward: bool) -> list[dict]:
    """The rows of one (case, policy): every quantity against the reference, with its verdict."""
    kappa = ref.kappa
    u = target.policy.u_at(kappa)
    base = dict(kind="production", impl=target.name, case=case, policy=target.policy.name,
                options=_options_label(target.options), kappa=kappa, u=u, reference_s=ref.seconds,
                wall_fwd_s=run.wall_fwd, wall_bwd_s=run.wall_bwd)
    wanted = QUANTITIES if backward else QUANTITIES[:2]
    if run.error:
        na = run.error.startswith("n/a")
        return [_row(meta, **base, quantity=q, measured=float("nan"), verdict="n/a" if na else "error",
                     note=run.error) for q in wanted]
    stats = run.stats
    cert = getattr(stats, "certificate", None)
    adj = getattr(stats, "adjoint_certificate", None)
    x = getattr(stats, "x", None)
    steps = getattr(stats, "steps", None)
    fwd_by = [s for s, on in (("certificate", _cert_failed(cert)), ("warning", run.warned)) if on]
    bwd_by = [s for s, on in (("adjoint certificate", _cert_failed(adj)), ("backward warning", run.adjoint_warned))
              if on] + [f"forward {s}" for s in fwd_by]
    common = dict(base, cert_bound=cert.max_bound if cert is not None else float("nan"),
                  adjoint_bound=adj.max_bound if adj is not None else float("nan"),
                  tier=cert.tier if cert is not None else None, adjoint_tier=adj.tier if adj is not None else None,
                  warned=run.warned, adjoint_warned=run.adjoint_warned,
                  mean_steps=float(steps.double().mean()) if isinstance(steps, torch.Tensor) else float("nan"))
    if isinstance(x, torch.Tensor) and tuple(x.shape) == tuple(ref.x.shape):
        tok = metrics.token_rel_error(x, ref.x)
        common["max_token_err_x"] = float(tok.max())
        if cert is not None:
            common["tokens_over_bound"] = int((tok > cert.bound.to(tok.device)).sum())
    values = {"o": (run.o, ref.o), "x": (x, ref.x)}
    for n in GRADIENTS:
        values[f"d{n}"] = (None if run.grads is None else run.grads[n], None if ref.grads is None else ref.grads[n])
    rows = []
    for q in wanted:
        got, want = values[q]
        grad = q.startswith("d")
        by = bwd_by if grad else fwd_by
        if grad and (run.bwd_error or run.bwd_na):
            rows.append(_row(meta, **common, quantity=q, measured=float("nan"),
                             verdict="error" if run.bwd_error else "n/a", note=run.bwd_error or run.bwd_na))
            continue
        if not isinstance(got, torch.Tensor):
            rows.append(_row(meta, **common, quantity=q, measured=float("nan"), verdict="n/a",
                             note=f"the op returns no {q}"))
            continue
        if tuple(got.shape) != tuple(want.shape):
            rows.append(_row(meta, **common, quantity=q, measured=float("inf"), verdict="FAIL",
                             note=f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"))
            continue
        amp = ref.dg_amplification if q == "dg" else 1.0
        b, how = capped(guard.budget_of(cfg, "quantities", q if q in cfg["quantities"] else "o", u, kappa,
                                        guard.output_roundoff(got.dtype), amp))
        err = metrics.rel_error(got, want)
        v = verdict(err, b, bool(by))
        bad = int((~torch.isfinite(got)).sum())
        note = f"{bad} of {got.numel()} values non-finite" if bad else ""
        rows.append(_row(meta, **common, quantity=q, measured=err, budget=b, derivation=how, verdict=v,
                         flagged_by="; ".join(by) if v == "flagged" else "", note=note))
    return rows


def capped(budget: tuple[float, str]) -> tuple[float, str]:
    """``(min(budget, BUDGET_CAP), derivation)``, the derivation saying when the cap applies."""
    b, how = budget
    return (BUDGET_CAP, f"{how}, capped at {BUDGET_CAP:g}") if b > BUDGET_CAP else (b, how)


def _options_label(opts: dict) -> str:
    """The options of a run, without the policy (a column of its own): a spec by its fields that differ
    from ``SolverSpec()`` (``backend=triton,steps=100``), other keyword arguments as given."""
    keep = {k: getattr(v, "name", v) for k, v in opts.items() if k not in ("policy", "spec")}
    if isinstance(opts.get("spec"), SolverSpec):
        keep = {**spec_changes(opts["spec"], exclude=("policy",)), **keep}
    return ",".join(f"{k}={v}" for k, v in sorted(keep.items())) or "-"


def _row(meta: dict, *, case: ProductionCase, **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(meta)
    row.update(family=case.family, case=case.label, B=case.B, T=case.T, H=case.H, D=case.D, seed=case.seed)
    row.update(values)
    m, b = row.get("measured"), row.get("budget")
    if m is not None and b is not None and b == b and b > 0:
        row["ratio"] = m / b
    return row


# --- provenance -------------------------------------------------------------------------------------------

# --- the runner ---------------------------------------------------------------------------------------------

def read_results(csv: str) -> pd.DataFrame:
    """A results.csv as written (the verdict ``n/a`` kept as a string; empty cells NaN)."""
    if not os.path.exists(csv):
        return pd.DataFrame(columns=COLUMNS)
    return read_table(csv, keep_default_na=False, na_values=[""])  # rows that pass their hash


def _read_done(csv: str) -> pd.DataFrame:
    """results.csv while jobs may be appending to it."""
    if not os.path.exists(csv):
        return pd.DataFrame(columns=COLUMNS)
    with locked(csv + ".lock"):
        return read_results(csv)


def _unit_key(kind, impl, case, policy, options) -> tuple:
    return tuple(str(v) for v in (kind, impl, case, policy, options))


def _append(csv: str, rows: list[dict]) -> None:
    """Append rows (the header first in a new file), under the file's lock (parallel jobs share it)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    with locked(csv + ".lock"):
        append_rows(df, csv)  # each row with its hash, fsync-ed (stability/results_store.py)


def split_policies(policies: list[str], jobs: int) -> list[list[str]]:
    """The policies in ``jobs`` groups of about equal compile cost (:data:`COMPILE_WEIGHT`, longest first)."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(policies)))]
    load = [0.0] * len(groups)
    for p in sorted(policies, key=lambda p: -COMPILE_WEIGHT.get(p, 1.0)):
        i = load.index(min(load))
        groups[i].append(p)
        load[i] += COMPILE_WEIGHT.get(p, 1.0)
    return [g for g in groups if g]


_IN_JOB = False  # set in the processes of a parallel run: the parent cleans up after them


def _job(kwargs: dict) -> None:
    """One job of a parallel run (a spawned process)."""
    global _IN_JOB
    _IN_JOB = True
    jobs = kwargs.pop("_jobs")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    run(**kwargs)


def run(grid: Grid, out_dir: str, **kw) -> pd.DataFrame:
    """:func:`_run` holding ``out_dir``'s writer lock (:func:`stability.results_store.folder_lock`; the
    parallel jobs of one run share it through the parent, and append under a file lock)."""
    if _IN_JOB:
        return _run(grid, out_dir, **kw)
    os.makedirs(out_dir, exist_ok=True)
    with folder_lock(out_dir, "production grid"):
        return _run(grid, out_dir, **kw)


def _run(grid: Grid, out_dir: str, *, families=None, Ts=None, Ds=None, policies=None, impl: str | None = None,
         device: str = "cpu", spec: SolverSpec | None = None, extra: dict | None = None,
         resume: bool = False, cache_dir: str | None = None, backward_max_T: int | None = None,
         reference_check: bool = True, progress: bool = True, jobs: int = 1, log: str | None = None) -> pd.DataFrame:
    """Run the selected cases x policies, appending rows to ``out_dir/results.csv``; returns the
    selection's rows (those kept from a resumed file included). Each policy runs ``spec`` (default
    :data:`DEFAULT_SPEC`) with that policy; ``extra``: more options of the op. ``cache_dir`` (default
    ``out_dir/reference_cache``) holds the float64 references; ``jobs > 1`` splits the policies over that
    many processes (:func:`split_policies`); ``log`` (a prefix) prints a line per finished run instead of
    the progress bar. A job that dies leaves its runs out: ``df.attrs["missing"]`` counts them."""
    chosen = select(grid, families, Ts, Ds)
    pols = select_policies(policies)
    limit = grid.backward_max_T if backward_max_T is None else backward_max_T
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UsageError(f"--backward-max-T must be a non-negative integer, got {limit!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be a positive integer, got {jobs!r}")
    spec = DEFAULT_SPEC if spec is None else spec
    tgts = targets(impl, pols, device, spec, extra)
    os.makedirs(out_dir, exist_ok=True)
    cache_dir = os.path.join(out_dir, "reference_cache") if cache_dir is None else cache_dir
    csv = os.path.join(out_dir, "results.csv")
    if not resume and os.path.exists(csv):
        os.remove(csv)
    wanted = set()
    units = []  # (case, target or None for the reference rows)
    for c in chosen:
        if reference_check:
            units.append((c, None))
            wanted.add(_unit_key("reference", "scale_reference", c.label, "fp64", "-"))
        for t in tgts:
            units.append((c, t))
            wanted.add(_unit_key("production", t.name, c.label, t.policy.name, _options_label(t.options)))
    if jobs > 1 and len(pols) > 1:
        _run_jobs(split_policies(pols, jobs), jobs, reference_check, dict(
            grid=grid, out_dir=out_dir, families=families, Ts=Ts, Ds=Ds, impl=impl, device=device, spec=spec,
            extra=extra, resume=True, cache_dir=cache_dir, backward_max_T=limit, progress=False))
    else:
        _run_units(units, grid, csv, cache_dir, device, limit, progress, log)
    df = _read_done(csv)
    if not _IN_JOB and os.path.exists(csv + ".lock"):
        os.remove(csv + ".lock")
    keys = [_unit_key(*r) for r in df[list(KEY)].itertuples(index=False)]
    df = df[[k in wanted for k in keys]].reset_index(drop=True)
    df.attrs["missing"] = len(wanted - set(keys))
    return df


def _run_jobs(groups: list[list[str]], jobs: int, reference_check: bool, common: dict) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA needs a fresh process
    procs = []
    for i, group in enumerate(groups):
        kw = dict(common, policies=group, reference_check=reference_check and i == 0,
                  log=f"[job {i}: {', '.join(group)}]",
                  _jobs=jobs)
        procs.append(ctx.Process(target=_job, args=(kw,), name=f"mesa-production-{i}"))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    for i, p in enumerate(procs):
        if p.exitcode:
            print(f"production grid: job {i} ({', '.join(groups[i])}) exited with status {p.exitcode}; "
                  "its remaining runs are missing", file=sys.stderr)


def _run_units(units: list, grid: Grid, csv: str, cache_dir: str, device: str, limit: int, progress: bool,
               log: str | None) -> None:
    """The units not yet in ``csv``, case by case (one reference per case)."""
    from tqdm.auto import tqdm

    done = _read_done(csv)
    have = {_unit_key(*r) for r in done[list(KEY)].itertuples(index=False)}

    def key(c, t):
        return (_unit_key("reference", "scale_reference", c.label, "fp64", "-") if t is None else
                _unit_key("production", t.name, c.label, t.policy.name, _options_label(t.options)))

    todo = [(c, t) for c, t in units if key(c, t) not in have]
    if not todo:
        return
    cfg = guard.load_budgets()
    meta = provenance(device)
    bar = tqdm(total=len(todo), desc="production grid", unit="run", file=sys.stderr,
               disable=True if not progress or log is not None else None)
    by_case: dict[ProductionCase, list] = {}
    for c, t in todo:
        by_case.setdefault(c, []).append(t)
    for c, group in by_case.items():
        backward = c.T <= limit
        bar.set_postfix_str(f"{c.label} reference", refresh=True)
        t0 = time.perf_counter()
        problem, e = c.build()
        if any(t is None for t in group):
            _append(csv, reference_rows(c, problem, device, grid, cfg, meta))
            bar.update()
            _log(log, f"{c.label} mpmath check", t0)
        group = [t for t in group if t is not None]
        if not group:
            continue
        t0 = time.perf_counter()
        ref = reference_for(c, problem, e, device, cache_dir, backward)
        _log(log, f"{c.label} reference ({'cached' if ref.cached else f'{ref.seconds:.1f} s'})", t0)
        dev_problem = problem.to(device=device)
        e_dev = e.to(device)
        for t in group:
            bar.set_postfix_str(f"{c.label} {t.policy.name}", refresh=True)
            t0 = time.perf_counter()
            res = run_op(t, dev_problem, e_dev, backward)
            _append(csv, measure(c, t, ref, res, cfg, meta, backward))
            del res
            bar.update()
            _log(log, f"{c.label} {t.policy.name}", t0)
        del ref, dev_problem, e_dev
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    bar.close()


def _log(prefix: str | None, what: str, t0: float) -> None:
    if prefix is not None:
        print(f"{prefix} {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


# --- summaries ----------------------------------------------------------------------------------------------

def worst_verdict(verdicts) -> str:
    vs = set(verdicts)
    return next((v for v in VERDICTS if v in vs), "n/a")


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per case, one column per policy: the worst verdict of its quantities and o's error."""
    prod = df[df.kind == "production"]
    if prod.empty:
        return pd.DataFrame()
    cells = {}
    for (case, pol), g in prod.groupby(["case", "policy"], sort=False):
        o = g[g.quantity == "o"].measured
        err = f" {float(o.iloc[0]):.2g}" if len(o) and pd.notna(o.iloc[0]) else ""
        cells.setdefault(case, {})[pol] = worst_verdict(g.verdict) + err
    pols = policy_order(prod.policy)
    rows = [{"case": case, **{p: row.get(p, "") for p in pols}} for case, row in cells.items()]
    return pd.DataFrame(rows, columns=["case", *pols])


def policy_order(policies) -> list[str]:
    """The distinct policies, kernel policies first in their order (kernels.mesa.KERNEL_POLICIES)."""
    from mesa_stability.kernels.mesa import KERNEL_POLICIES

    seen = list(dict.fromkeys(policies))
    return sorted(seen, key=lambda p: (KERNEL_POLICIES.index(p) if p in KERNEL_POLICIES else len(KERNEL_POLICIES),
                                       seen.index(p)))


def exit_status(df: pd.DataFrame) -> int:
    """1 if any row is FAIL (a silent wrong answer) or error (the op raised), or runs are missing (a
    parallel job died), else 0."""
    return int(bool(df.verdict.isin(["FAIL", "error"]).any()) or bool(df.attrs.get("missing", 0)))


def counts(df: pd.DataFrame) -> dict:
    return {v: int((df.verdict == v).sum()) for v in VERDICTS}
