"""Rendering of the stability grid: Markdown tables and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os

import pandas as pd

POLICY_COLORS = {"fp64": "#1b9e77", "fp32": "#d95f02", "tf32": "#7570b3", "bf16-fp32state": "#e7298a",
                 "bf16-bf16state": "#66a61e", "fp16-fp32state": "#e6ab02", "fp16-fp16state": "#a6761d"}


def fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        return f"{x:.3g}" if (x == 0 or 1e-3 <= abs(x) < 1e4) else f"{x:.2e}"
    return str(x)


def to_markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (numbers with 3 significant digits)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax, **kw) -> None:
    """A legend, only when something was drawn (subsets of the grid may leave a plot empty)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _finite_max(*series) -> float:
    vals = [v for s in series for v in s if math.isfinite(v)]
    return max(vals) if vals else 1.0


def _plot_with_overflow(ax, x, y, ceiling, fmt, color, label):
    """A line of finite values; non-finite ones (overflow) drawn as x markers at ``ceiling``."""
    x, y = list(x), list(y)
    fin = [(a, b) for a, b in zip(x, y, strict=False) if math.isfinite(b)]
    if fin:
        ax.plot(*zip(*fin, strict=False), fmt, color=color, label=label)
    over = [a for a, b in zip(x, y, strict=False) if not math.isfinite(b)]
    if over:
        ax.scatter(over, [ceiling] * len(over), marker="x", s=60, color=color,
                   label=None if fin else label)


def plot_error_vs_kappa(df: pd.DataFrame, path: str) -> None:
    plt = _plt()
    sel = df[df.converged_setting.astype(bool) & (df.solver != "sherman_morrison")]
    solver_names = [s for s in ("exact", "cg", "chebyshev") if s in set(sel.solver)]
    fig, axes = plt.subplots(1, max(len(solver_names), 1), figsize=(4.5 * max(len(solver_names), 1), 4),
                             sharey=True, squeeze=False)
    for ax, solver in zip(axes[0], solver_names, strict=False):
        s = sel[sel.solver == solver]
        for pol, g in s.groupby("policy"):
            c = POLICY_COLORS.get(pol)
            ax.scatter(g.kappa_max, g.max_token_err_x.clip(upper=1e30), s=18, color=c, label=pol)
            k = sorted(set(g.kappa_max))
            ax.plot(k, [x * g.u.iloc[0] for x in k], "--", color=c, lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="max condition number kappa(H_t + Lambda)",
               title=f"{solver} (converged settings)")
    axes[0][0].set_ylabel("worst per-token relative error of x")
    _legend(axes[0][-1], fontsize=7, title="policy (dashed: kappa u)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_error_vs_length(df: pd.DataFrame, case: str, path: str) -> None:
    plt = _plt()
    sel = df[df.case == case]
    ceiling = 1e3 * _finite_max(sel.rel_err_x)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol, g in sel.groupby("policy"):
        c = POLICY_COLORS.get(pol)
        sm = g[g.solver == "sherman_morrison"].sort_values("T")
        cg = g[(g.solver == "cg") & g.converged_setting.astype(bool)].sort_values("T")
        _plot_with_overflow(ax, sm["T"], sm.rel_err_x, ceiling, "o-", c, f"Sherman-Morrison {pol}")
        _plot_with_overflow(ax, cg["T"], cg.rel_err_x, ceiling, "s--", c, f"CG (tol = u) {pol}")
    ax.axhline(ceiling, color="grey", lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="relative error of x vs float64 exact",
           title=f"error vs length under forgetting ({case})")
    ax.annotate("x: overflow (inf / NaN)", xy=(0.01, ceiling), xycoords=("axes fraction", "data"), va="bottom",
                fontsize=7, color="grey")
    _legend(ax, fontsize=6, ncol=2, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_error_vs_steps(df: pd.DataFrame, case: str, path: str) -> None:
    plt = _plt()
    sel = df[(df.case == case) & (df.solver == "cg") & df.tol_opt.isna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pol, g in sel.groupby("policy"):
        g = g.sort_values("steps_opt")
        c = POLICY_COLORS.get(pol)
        ax.plot(g.steps_opt, g.rel_err_x, "o-", color=c, label=pol)
        ax.axhline(g.u.iloc[0], color=c, lw=0.7, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="CG steps (fixed)", ylabel="relative error of x",
           title=f"CG error vs steps ({case}); dotted: unit roundoff u")
    _legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_error_vs_tol(df: pd.DataFrame, case: str, path: str) -> None:
    plt = _plt()
    sel = df[(df.case == case) & (df.solver == "cg") & df.tol_opt.notna() & (df.tol_opt.astype(str) != "u")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for pol, g in sel.groupby("policy"):
        g = g.assign(tolf=g.tol_opt.astype(float)).sort_values("tolf")
        c = POLICY_COLORS.get(pol)
        ax.plot(g.tolf, g.rel_err_x, "o-", color=c, label=pol)
        ax2.plot(g.tolf, g.steps_mean, "o-", color=c, label=pol)
    ax.set(xscale="log", yscale="log", xlabel="relative residual tolerance", ylabel="relative error of x",
           title=f"CG error vs tolerance ({case})")
    ax2.set(xscale="log", xlabel="relative residual tolerance", ylabel="mean CG steps per token",
            title="steps needed")
    ax.invert_xaxis()
    ax2.invert_xaxis()
    _legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(df: pd.DataFrame, out_dir: str, length_case: str, floor_case: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fn, args in (("error_vs_kappa.png", plot_error_vs_kappa, ()),
                           ("error_vs_length.png", plot_error_vs_length, (length_case,)),
                           ("error_vs_steps.png", plot_error_vs_steps, (floor_case,)),
                           ("error_vs_tol.png", plot_error_vs_tol, (floor_case,))):
        path = os.path.join(out_dir, name)
        fn(df, *args, path)
        paths.append(path)
    return paths


def write_markdown_report(path: str, df: pd.DataFrame, ref: pd.DataFrame, findings: dict, meta: dict,
                          plots: list[str]) -> None:
    """The Markdown report: provenance, reference check, key findings, per-case tables, plots."""
    L = [f"# Mesa stability report ({meta['preset']} preset)", ""]
    L += [f"{meta['description']}.", "",
          f"Generated {meta['date']} on {meta['machine']} with torch {meta['torch']}, {meta['rows']} rows in "
          f"{meta['wall_s']:.0f} s. Every error is measured against the float64 exact solver (Cholesky per "
          "token), itself checked against a 50-digit mpmath reference below. `converged` settings are the "
          "direct methods and the iterative ones run to `tol = u` (the policy's unit roundoff).", ""]
    if meta.get("provenance"):
        L += [meta["provenance"], ""]
    L += ["## Reference check: float64 exact vs mpmath", "", to_markdown(ref), ""]
    sm = findings.get("sm_vs_cg")
    if sm is not None and len(sm):
        L += ["## Sherman-Morrison vs CG under strong forgetting (fp32)", "",
              "Sherman-Morrison solves `(H_t + zeta_{t,0} Lambda) x = q`: its regulariser decays with the "
              "keys (`rel_err_x_own` in the CSV is its error against that problem), so under forgetting "
              "it drifts away from the Mesa solution, and its inverse is divided by gamma at every step.", "",
              to_markdown(sm), ""]
    fl = findings.get("floors")
    if fl is not None and len(fl):
        L += ["## CG error floor per policy (well_conditioned, fixed-step sweep)", "",
              "The floor follows the unit roundoff u of the policy (`floor_over_u` stays O(kappa)).", "",
              to_markdown(fl), ""]
    sr = findings.get("stability")
    if sr is not None and len(sr):
        L += ["## Maximum stability ratio err / (kappa u) over the cases (converged settings)", "",
              "A backward-stable solve keeps this O(1) up to a modest growth factor.", "", to_markdown(sr), ""]
    conv = df[df.converged_setting.astype(bool)]
    if len(conv):
        pivot = conv.pivot_table(index=["case", "size", "policy"], columns="solver", values="rel_err_x",
                                 aggfunc="first")
        L += ["## Relative error of x, converged settings, per case", "",
              "`exact` under a policy rounds the inputs and the stored states to it and factorises in its "
              "accumulation dtype (products are not rounded to tf32/bf16 operands); Sherman-Morrison's error "
              "against the Mesa solution includes its model mismatch (decayed regulariser).", "",
              to_markdown(pivot.reset_index()), ""]
    L += ["## Plots", ""]
    for p in plots:
        L += [f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(path))})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(L))
