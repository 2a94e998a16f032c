"""The stability grid: solver x policy x case x size x setting, measured against float64 exact.

For every (case, size) the float64 exact solution ``x*``, ``o*`` is computed once, together with
the per-token systems ``A_t = H_t + Lambda``, their 2-norms and condition numbers; the float64
exact solver itself is checked against the mpmath reference on a small instance of every case
(:func:`reference_check`). Every (solver, policy, setting) then yields one tidy row with the
metrics of :mod:`stability.metrics`, step statistics and wall time.

A setting's ``tol`` may be the string ``"u"``: the policy's unit roundoff, i.e. "iterate until the
precision is exhausted". Those rows (and the direct methods) are the *converged* rows: their
stability ratio ``err / (kappa u)`` measures rounding alone, not truncation.

Rows are appended to the CSV after every (case, size) group, so an interrupted run loses at most
one group, and ``resume=True`` skips the rows already there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch

from mesa_stability import solvers
from mesa_stability.solvers import MesaProblem, SolverSpec

from . import cases, metrics
from .provenance import provenance
from .reference import mp_solve
from .results_store import folder_lock, read_table, write_table

SOLVERS = ("exact", "sherman_morrison", "cg", "chebyshev")
CG_STEPS = (1, 2, 4, 8, 16, 32, 64)
CG_TOLS = (1e-2, 1e-4, 1e-6, 1e-8)


def _settings(cg_steps, cg_tols, cheb_steps, cheb_tols, cap_cg, cap_cheb) -> dict[str, list[dict]]:
    return {
        "exact": [{}],
        "sherman_morrison": [{}],
        "cg": [{"steps": s} for s in cg_steps] + [{"steps": cap_cg, "tol": t} for t in cg_tols]
        + [{"steps": cap_cg, "tol": "u"}],
        "chebyshev": [{"steps": s} for s in cheb_steps] + [{"steps": cap_cheb, "tol": t} for t in cheb_tols]
        + [{"steps": cap_cheb, "tol": "u"}],
    }


@dataclass
class Preset:
    """A grid: cases with their sizes, policies and per-solver settings."""

    name: str
    sizes: dict[str, list[dict]]
    policies: list[str]
    settings: dict[str, list[dict]]
    # the case whose T sweep feeds the error-vs-length plot (Sherman-Morrison vs CG)
    length_case: str = "strong_forgetting"
    floor_case: str = "well_conditioned"
    description: str = ""
    # a production grid of stability.production.GRIDS: the preset runs that grid (our op, every kernel
    # policy, against the float64 scale reference) instead of the solver grid above
    production: str | None = None


def _quick() -> Preset:
    base = dict(B=1, H=2, D=16)
    sizes = {name: [dict(base)] for name in cases.CASES}
    # Sherman-Morrison's inverse grows like 1 / zeta_{t,0} ~ 10^(1.3 t) here and overflows fp32 after
    # about 30 tokens: the short lengths show the growth, the long ones the overflow.
    sizes["strong_forgetting"] = [dict(base, T=T) for T in (8, 16, 32, 128, 512)]
    return Preset(
        "quick", sizes, ["fp64", "fp32", "tf32", "bf16x3", "bf16-fp32state", "fp16-fp32state"],
        # Chebyshev's cap: the a-priori count for tol = u is at most ~3000 steps on these cases (tiny_lambda, fp64)
        _settings(CG_STEPS, CG_TOLS, (8, 32, 128), (1e-4, 1e-8), 500, 5000),
        description="CPU, about a minute: every case at D = 16, T = 128 (512 without forgetting), "
                    "strong forgetting swept over T = 8 to 512; six policies",
    )


def _full() -> Preset:
    sizes = {}
    for name in cases.CASES:
        sizes[name] = [dict(B=2, H=2, D=D) for D in (16, 64)]
    for name in ("strong_forgetting", "no_forgetting_long", "well_conditioned"):
        sizes[name] = [dict(B=1, H=2, D=D, T=T) for D in (16, 64) for T in (128, 512, 2048)]
    return Preset(
        "full", sizes, sorted(solvers.POLICIES),
        _settings(CG_STEPS + (128,), CG_TOLS + (1e-10,), (8, 32, 128, 512), (1e-4, 1e-8), 1000, 50_000),
        description="every case at D = 16 and 64, T sweeps to 2048 for three cases, all seven policies",
    )


def _gpu() -> Preset:
    return Preset("gpu", {}, [], {}, production="production",
                  description="the production grid on one GPU (stability.production): families x T up to 65536 x "
                              "every kernel policy against the float64 scale reference, certificates checked")


def _gpu_smoke() -> Preset:
    return Preset("gpu-smoke", {}, [], {}, production="smoke",
                  description="the production families at CPU sizes (seconds): a smoke test of the gpu preset")


PRESETS = {"quick": _quick, "full": _full, "gpu": _gpu, "gpu-smoke": _gpu_smoke}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


# The chunk length of the grid's iterative solves (SolverSpec.chunk_size): that of the committed
# results; chunking changes only the rounding of the chunk states, not the systems solved.
CHUNK_SIZE = 64


def setting_spec(solver: str, policy: solvers.PrecisionPolicy, opts: dict) -> SolverSpec:
    """The :class:`SolverSpec` of one grid setting: ``opts`` (steps, tol) with ``tol="u"`` read as the
    policy's unit roundoff; no certificate (the grid measures the errors themselves)."""
    fields = dict(opts)
    if fields.get("tol") == "u":
        fields["tol"] = policy.u
    return SolverSpec(method=solver, policy=policy, chunk_size=CHUNK_SIZE, check=None, backend="torch", **fields)


def setting_label(opts: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "direct"


def size_label(case: str, size: dict) -> str:
    """``B1xT128xH2xD16``: the sizes the case really has (its defaults filled in)."""
    full = {**cases.SIZES, **cases.CASES[case].defaults, **size}
    return "x".join(f"{k}{full[k]}" for k in ("B", "T", "H", "D"))


@dataclass
class CaseContext:
    """The float64 truth of one (case, size), computed once and shared by all its rows."""

    case: str
    size: dict
    problem: MesaProblem
    x_ref: torch.Tensor
    o_ref: torch.Tensor
    kappa: torch.Tensor  # [B,T,H]
    blocks: list = field(repr=False)  # (s, e, A_t blocks, ||A_t||_2)
    own_ref: solvers.SolveResult | None = None  # Sherman-Morrison's own (decayed) problem

    @classmethod
    def build(cls, case: str, size: dict, seed: int) -> CaseContext:
        p = cases.make(case, seed=seed, **size)
        ref = solvers.solve(p, "exact")
        blocks, kappa = [], torch.empty(p.B, p.T, p.H, dtype=torch.float64)
        for s, e, A in metrics.systems(p):
            ev = torch.linalg.eigvalsh(A)
            kappa[:, s:e] = ev[..., -1] / ev[..., 0]
            blocks.append((s, e, A, ev[..., -1]))
        own = solvers.solve(p, "exact", regularizer="decayed")
        return cls(case, size, p, ref.x, ref.o, kappa, blocks, own)

    def backward_error(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(self.kappa)
        for s, e, A, nA in self.blocks:
            out[:, s:e] = metrics.backward_error_of(A, nA, self.problem.q[:, s:e], x[:, s:e])
        return out


def measure(ctx: CaseContext, solver: str, policy: solvers.PrecisionPolicy, opts: dict) -> dict:
    """One row: run the solver and measure it against the context's float64 truth."""
    spec = setting_spec(solver, policy, opts)
    t0 = time.perf_counter()
    res = solvers.solve(ctx.problem, spec)
    wall = time.perf_counter() - t0
    tok = metrics.token_rel_error(res.x, ctx.x_ref)
    bwd = ctx.backward_error(res.x)
    row = {
        "solver": solver, "policy": policy.name, "case": ctx.case, "size": size_label(ctx.case, ctx.size),
        "B": ctx.problem.B, "T": ctx.problem.T, "H": ctx.problem.H, "D": ctx.problem.D, "Dv": ctx.problem.Dv,
        "setting": setting_label(opts), "steps_opt": opts.get("steps"), "tol_opt": opts.get("tol"),
        "tol": spec.tol if solver in solvers.ITERATIVE else None,
        "converged_setting": solver in ("exact", "sherman_morrison") or opts.get("tol") == "u",
        "u": policy.u,
        "rel_err_x": metrics.rel_error(res.x, ctx.x_ref),
        "rel_err_o": metrics.rel_error(res.o, ctx.o_ref),
        "max_token_err_x": float(tok.max()),
        "max_token_err_o": metrics.max_token_rel_error(res.o, ctx.o_ref),
        "backward_err_max": float(bwd.max()),
        "backward_err_mean": float(bwd.mean()),
        "kappa_max": float(ctx.kappa.max()),
        "kappa_median": float(ctx.kappa.median()),
        "stability_ratio": float(metrics.stability_ratio(tok, ctx.kappa, policy.u).max()),
        "steps_mean": res.mean_steps,
        "steps_max": res.max_steps,
        "breakdowns": int(res.breakdown.sum()) if res.breakdown is not None else 0,
        "nonfinite": int((~torch.isfinite(res.x)).sum()),
        "wall_s": wall,
    }
    if solver == "sherman_morrison" and ctx.own_ref is not None:
        row["rel_err_x_own"] = metrics.rel_error(res.x, ctx.own_ref.x)
    return row


KEY = ("solver", "policy", "case", "size", "setting")


def reference_check(case_names: Iterable[str], seed: int = 0, dps: int = 50) -> pd.DataFrame:
    """float64 exact vs mpmath on a small instance (T = 32, D = 8, H = 1) of every case."""
    rows = []
    for name in case_names:
        size = dict(T=32, D=8, Dv=8, H=1)
        if name == "no_forgetting_long":
            size["T"] = 64
        p = cases.make(name, seed=seed, **size)
        t0 = time.perf_counter()
        x_mp, o_mp = mp_solve(p, dps=dps)
        ref = solvers.solve(p, "exact")
        rows.append({"case": name, "T": p.T, "D": p.D, "dps": dps,
                     "exact_vs_mp_x": metrics.max_token_rel_error(ref.x, x_mp),
                     "exact_vs_mp_o": metrics.max_token_rel_error(ref.o, o_mp),
                     "kappa_max": float(metrics.condition_numbers(p).max()),
                     "wall_s": time.perf_counter() - t0})
    return pd.DataFrame(rows)


def _write_csv(df: pd.DataFrame, path: str) -> None:
    write_table(df, path)  # atomic, with per-row integrity hashes (stability/results_store.py)


def run_grid(preset: Preset, out_dir: str, *, seed: int = 0, cases_sel=None, solvers_sel=None, policies_sel=None,
             resume: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run the grid, appending rows to ``out_dir/results.csv`` after every (case, size), holding the
    folder's writer lock (:func:`stability.results_store.folder_lock`)."""
    os.makedirs(out_dir, exist_ok=True)
    with folder_lock(out_dir, "mesa stability"):
        return _run_grid(preset, out_dir, seed=seed, cases_sel=cases_sel, solvers_sel=solvers_sel,
                         policies_sel=policies_sel, resume=resume, progress=progress)


def _run_grid(preset: Preset, out_dir: str, *, seed, cases_sel, solvers_sel, policies_sel, resume,
              progress) -> pd.DataFrame:
    from tqdm.auto import tqdm

    case_names = _select("case", cases_sel, list(preset.sizes), cases.CASES)
    solver_names = _select("solver", solvers_sel, list(SOLVERS), solvers.METHODS)
    policy_names = _select("policy", policies_sel, preset.policies, solvers.POLICIES)
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(out_dir, "results.csv")
    done = read_table(csv, columns=list(KEY)) if resume else pd.DataFrame(columns=list(KEY))
    have = set(map(tuple, done[list(KEY)].astype(str).values.tolist()))
    jobs = [(c, size, pol, solver, opts)
            for c in case_names for size in preset.sizes[c] for pol in policy_names
            for solver in solver_names for opts in preset.settings[solver]]
    todo = [j for j in jobs if (j[3], j[2], j[0], size_label(j[0], j[1]), setting_label(j[4])) not in have]
    rows = [done] if len(done) else []
    bar = tqdm(total=len(todo), desc="stability grid", unit="solve", disable=None if progress else True)
    by_group: dict[tuple, list] = {}
    for j in todo:
        by_group.setdefault((j[0], size_label(j[0], j[1])), []).append(j)
    prov = provenance("cpu")  # the reference solvers run on the CPU
    for (case, _), group in by_group.items():
        ctx = CaseContext.build(case, group[0][1], seed)
        new = []
        for _, _, pol, solver, opts in group:
            bar.set_postfix_str(f"{case} {pol} {solver} {setting_label(opts)}", refresh=False)
            new.append({**measure(ctx, solver, solvers.get_policy(pol), opts), **prov})
            bar.update()
        rows.append(pd.DataFrame(new))
        _write_csv(pd.concat(rows, ignore_index=True), csv)
    bar.close()
    df = pd.concat(rows, ignore_index=True) if rows else done
    return df


class UsageError(ValueError):
    """An unknown case, solver or policy name: the caller's mistake (the CLI exits 2)."""


def _select(what: str, chosen, default: list, known) -> list:
    if not chosen:
        return list(default)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise UsageError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return list(chosen)



# findings ----------------------------------------------------------------------------------------

def sm_vs_cg(df: pd.DataFrame, case: str = "strong_forgetting", policy: str = "fp32") -> pd.DataFrame:
    """Per length: Sherman-Morrison's error, converged CG's error and their ratio (one policy)."""
    sel = df[(df.case == case) & (df.policy == policy)]
    sm = sel[sel.solver == "sherman_morrison"].set_index("T")["rel_err_x"]
    cg = sel[(sel.solver == "cg") & sel.converged_setting.astype(bool)].set_index("T")["rel_err_x"]
    out = pd.DataFrame({"sm_err": sm, "cg_err": cg}).dropna().sort_index()
    out["ratio"] = out.sm_err / out.cg_err
    return out.reset_index()


def cg_floors(df: pd.DataFrame, case: str = "well_conditioned") -> pd.DataFrame:
    """Per policy: CG's error floor (the smallest error over the fixed-step sweep) against u."""
    sel = df[(df.case == case) & (df.solver == "cg") & df.tol_opt.isna()]
    if sel.empty:
        return pd.DataFrame()
    rows = []
    for pol, g in sel.groupby("policy"):
        g = g.sort_values("steps_opt")
        rows.append({"policy": pol, "u": g.u.iloc[0], "floor": g.rel_err_x.min(),
                     "floor_over_u": g.rel_err_x.min() / g.u.iloc[0], "kappa_max": g.kappa_max.iloc[0],
                     "err_at_max_steps": g.rel_err_x.iloc[-1], "max_steps": int(g.steps_opt.iloc[-1])})
    return pd.DataFrame(rows).sort_values("u").reset_index(drop=True)


def max_stability_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Per solver and policy: the largest stability ratio over the cases, converged rows only."""
    sel = df[df.converged_setting.astype(bool) & (df.solver != "sherman_morrison")]
    if sel.empty:
        return pd.DataFrame()
    g = sel.groupby(["solver", "policy"])
    out = g.stability_ratio.max().rename("max_stability_ratio").to_frame()
    out["worst_case"] = g.apply(lambda x: x.loc[x.stability_ratio.idxmax(), "case"], include_groups=False)
    out["cases"] = g.case.nunique()
    return out.reset_index()
