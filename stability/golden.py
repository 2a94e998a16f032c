"""Golden cases of the regression guard: small, seeded problems covering every stress case, with
their float64 references, regenerated on demand and checked against committed fingerprints.

A golden case is a stress case of :mod:`stability.cases` at small sizes, a seed, an upstream
gradient e (:func:`stability.cases.upstream_gradient`) and the dtype its inputs are handed to an
implementation in (float32, or bf16 for ``bf16_inputs``). Its references are computed in float64
from exactly those rounded inputs:

* the output ``o_t = G_t (H_t + Lambda)^{-1} q_t`` of the float64 exact solver, checked against
  the mpmath solution (50 digits): they agree to ~1e-15, far below any budget;
* the input gradients of ``L = sum_t e_t . o_t``: the closed forms of docs/design.md section 2
  (:func:`stability.gradients.closed_form_gradients`, validated against mpmath in the tests);
* ``kappa``, the largest condition number of ``H_t + Lambda`` over tokens (fp64 eigenvalues),
  which scales the error budgets (``budgets.toml``), and dg's cancellation factor
  (:func:`dg_amplification`), which scales dg's.

Nothing large is committed: ``golden.json`` next to this module holds, per case, the SHA-256 of the
regenerated inputs (exact bytes: a change in generation is caught) and *fingerprints* of each
reference (its norm, its sum and its dot product with a fixed +-1 pattern, float64; compared to
relative 1e-9: a change of the reference is caught while last-bit differences between BLAS builds
are not). ``mesa golden`` checks them and ``mesa golden --write`` regenerates the file (after a
deliberate change).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from mesa_stability.solvers import MesaProblem

from . import cases
from .gradients import closed_form_gradients

GOLDEN_FILE = os.path.join(os.path.dirname(__file__), "golden.json")
# fingerprints of a regenerated reference must match the committed ones to this relative tolerance:
# the references are float64 computations accurate to ~1e-13 (agreement with mpmath), so 1e-9 only
# tolerates reordered sums, while any change of inputs or formulas moves them by far more
FINGERPRINT_RTOL = 1e-9
GRADIENTS = ("q", "k", "v", "g", "beta", "lam")


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: a stress case, its seed and sizes, and the dtype of the inputs handed over."""

    name: str
    case: str
    seed: int = 0
    sizes: dict = field(default_factory=dict)
    input_dtype: str = "float32"  # q, k, v (gates and lam are float32)

    def problem(self) -> MesaProblem:
        """The inputs as handed to an implementation (rounded to the input dtype), held in float64."""
        p = cases.make(self.case, seed=self.seed, **self.sizes)
        dt = getattr(torch, self.input_dtype)
        rnd = [t.to(dt).double() for t in (p.q, p.k, p.v)] + [t.float().double() for t in (p.g, p.beta, p.lam)]
        init = None if p.initial_state is None else tuple(s.float().double() for s in p.initial_state)
        return MesaProblem(*rnd, init, p.cu_seqlens)

    def upstream(self, p: MesaProblem) -> torch.Tensor:
        """The upstream gradient e = dL/do (float32 values, held in float64)."""
        return cases.upstream_gradient(p, seed=self.seed + 101).float().double()


_SMALL = dict(B=1, T=32, H=2, D=16, Dv=16)  # D = 16: the smallest tensor-core tile (kernels pad below it)
GOLDEN: tuple[GoldenCase, ...] = (
    GoldenCase("well_conditioned", "well_conditioned", 0, dict(_SMALL, B=2)),
    GoldenCase("no_forgetting_long", "no_forgetting_long", 1, dict(_SMALL, T=64)),
    GoldenCase("low_rank_keys", "low_rank_keys", 2, _SMALL),
    GoldenCase("strong_forgetting", "strong_forgetting", 3, _SMALL),
    GoldenCase("tiny_lambda", "tiny_lambda", 4, _SMALL),
    GoldenCase("bf16_inputs", "bf16_inputs", 5, _SMALL, input_dtype="bfloat16"),
    GoldenCase("large_values", "large_values", 6, _SMALL),
    GoldenCase("small_upstream_grad", "small_upstream_grad", 7, _SMALL),
    GoldenCase("varlen", "varlen", 8, dict(T=48, H=2, D=16, Dv=16)),
)
BY_NAME = {g.name: g for g in GOLDEN}


@dataclass
class GoldenReference:
    """A regenerated golden case: the problem (float64), e, and the float64 references."""

    case: GoldenCase
    problem: MesaProblem
    e: torch.Tensor
    o: torch.Tensor
    grads: dict
    kappa: float
    dg_amplification: float = 1.0


def dg_amplification(p: MesaProblem, dg: torch.Tensor) -> float:
    """How much the reverse cumulative sum dg_s = sum_{t >= s} a_t cancels: ||sum_{t >= s} |a_t| || / ||dg||.

    The per-token terms are recovered from the reference, a_t = dg_t - dg_{t+1} within a sequence
    (a_T = dg_T at its end). An error of relative size eps in every a_t gives an error up to
    eps times this factor in dg, so it multiplies dg's budget (1 when nothing cancels)."""
    cs = p.cu_seqlens.tolist() if p.cu_seqlens is not None else [0, p.T]
    bound = torch.zeros_like(dg)
    for a, b in zip(cs, cs[1:], strict=False):
        seg = dg[:, a:b]
        terms = seg - torch.cat([seg[:, 1:], torch.zeros_like(seg[:, :1])], dim=1)
        bound[:, a:b] = torch.flip(torch.cumsum(torch.flip(terms.abs(), [1]), 1), [1])
    den = float(dg.norm())
    return float(bound.norm()) / den if den > 0 else 1.0


def _pattern(n: int) -> torch.Tensor:
    """A fixed +-1 pattern (a linear congruential sequence; no RNG, the same on every platform)."""
    i = torch.arange(n, dtype=torch.int64)
    return ((i * 1103515245 + 12345) // 65536 % 2 * 2 - 1).double()


def fingerprint(t: torch.Tensor) -> list[float]:
    """(norm, sum, dot with a fixed +-1 pattern) of a tensor, float64."""
    x = t.detach().double().reshape(-1).cpu()
    return [float(x.norm()), float(x.sum()), float(x @ _pattern(x.numel()))]


def input_digest(p: MesaProblem, e: torch.Tensor) -> str:
    """SHA-256 of the inputs' float64 bytes (q, k, v, g, beta, lam, initial state, cu_seqlens, e)."""
    h = hashlib.sha256()
    parts = [p.q, p.k, p.v, p.g, p.beta, p.lam, e]
    if p.initial_state is not None:
        parts += list(p.initial_state)
    for t in parts:
        h.update(t.detach().double().contiguous().cpu().numpy().tobytes())
    if p.cu_seqlens is not None:
        h.update(p.cu_seqlens.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


def reference(gc: GoldenCase) -> GoldenReference:
    """Regenerate a golden case and its float64 references (exact solver, closed-form gradients)."""
    from mesa_stability import solvers

    from .metrics import condition_numbers

    p = gc.problem()
    e = gc.upstream(p)
    o = solvers.solve(p, "exact").o
    grads = closed_form_gradients(p, e) if p.cu_seqlens is None else _varlen_gradients(p, e)
    return GoldenReference(gc, p, e, o, {n: grads[n] for n in GRADIENTS}, float(condition_numbers(p).max()),
                           dg_amplification(p, grads["g"]))


def _varlen_gradients(p: MesaProblem, e: torch.Tensor) -> dict:
    """Closed-form gradients of a packed problem: each sequence on its own, concatenated (lam summed)."""
    out = {n: [] for n in GRADIENTS}
    cs = p.cu_seqlens.tolist()
    for s, a, b in zip(p.sequences(), cs, cs[1:], strict=False):
        gr = closed_form_gradients(s, e[:, a:b])
        for n in GRADIENTS:
            out[n].append(gr[n])
    return {n: (sum(v) if n == "lam" else torch.cat(v, dim=1)) for n, v in out.items()}


def record(ref: GoldenReference) -> dict:
    """The committed entry of a case: input digest, kappa, fingerprints of o and of each gradient,
    and the float64 exact solver's agreement with mpmath."""
    from .metrics import rel_error
    from .reference import mp_solve

    _, o_mp = mp_solve(ref.problem, dps=50)
    return {"input_sha256": input_digest(ref.problem, ref.e), "kappa": ref.kappa,
            "dg_amplification": ref.dg_amplification,
            "exact_vs_mpmath": rel_error(ref.o, o_mp),
            "fingerprints": {"o": fingerprint(ref.o), **{f"d{n}": fingerprint(g) for n, g in ref.grads.items()}}}


def load_committed(path: str = GOLDEN_FILE) -> dict:
    with open(path) as fh:
        return json.load(fh)


def check_reference(ref: GoldenReference, committed: dict) -> list[str]:
    """Problems with a regenerated case against its committed entry (empty list: it matches)."""
    entry = committed.get(ref.case.name)
    if entry is None:
        return [f"{ref.case.name}: no committed entry in {os.path.basename(GOLDEN_FILE)} "
                "(run `mesa golden --write` after adding a case)"]
    bad = []
    if input_digest(ref.problem, ref.e) != entry["input_sha256"]:
        bad.append(f"{ref.case.name}: regenerated inputs differ from the committed ones (input SHA-256): the "
                   "case generator or the seeds changed")
    now = {"o": fingerprint(ref.o), **{f"d{n}": fingerprint(g) for n, g in ref.grads.items()}}
    for q, fp in entry["fingerprints"].items():
        for a, b in zip(now[q], fp, strict=True):
            if abs(a - b) > FINGERPRINT_RTOL * max(abs(b), 1e-300) and abs(a - b) > 1e-14 * abs(now[q][0]):
                bad.append(f"{ref.case.name}: the float64 reference {q} changed (fingerprint {a!r} vs "
                           f"committed {b!r}): the reference solver or gradient formulas changed")
                break
    return bad


def check_or_write(write: bool = False, path: str = GOLDEN_FILE, log=print,
                   refs: list[GoldenReference] | None = None) -> int:
    """``mesa golden``: regenerate the golden cases and compare them with ``path`` (default
    :data:`GOLDEN_FILE`; exit 1 on a difference, each named), or with ``write`` rewrite it (after a
    deliberate change). ``refs``: the regenerated cases, when the caller already has them."""
    if refs is None:
        refs = [reference(gc) for gc in GOLDEN]
    if write:
        data = {r.case.name: record(r) for r in refs}
        with open(path, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        log(f"wrote {len(data)} cases to {path}")
        return 0
    committed = load_committed(path)
    bad = [m for r in refs for m in check_reference(r, committed)]
    log("\n".join(bad) if bad else f"all {len(refs)} golden cases match {path}")
    return 1 if bad else 0
