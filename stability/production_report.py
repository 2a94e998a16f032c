"""The report of the production grid (:mod:`stability.production`): report.md with tables, and PNG plots.

* ``plots/error_vs_T.png``: the relative error of o against T per policy, one panel per family and
  head dim, log-log; flagged rows hollow, silent failures (FAIL) as red crosses, non-finite errors as
  triangles at the top of the panel;
* ``plots/bound_vs_error.png``: per (case, policy), the certified bound (largest over tokens) against
  the measured worst-token relative error of x, log-log, with the line y = x. Every token's bound
  bounds its own error if the certificate is rigorous, so every point must lie on or above the line;
  the report counts those below it, and the tokens whose error exceeds their own bound.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from . import production
from .render import POLICY_COLORS, _legend, _plt, fmt, to_markdown

MARK = {"pass": "", "flagged": " (flagged)", "FAIL": " FAIL", "error": " error", "n/a": " n/a"}
_EXTRA_COLORS = {"auto": "#000000", "bf16x3": "#1f78b4"}


def _color(policy: str) -> str:
    return POLICY_COLORS.get(policy, _EXTRA_COLORS.get(policy, "#999999"))


def _num(s: pd.Series) -> pd.Series:
    """Numbers; values past 1e300 (a non-finite bound reported as the largest float) become inf."""
    v = pd.to_numeric(s, errors="coerce")
    return v.where(~(v.abs() >= 1e300), math.inf)


def _flag(s: pd.Series) -> pd.Series:
    return s.astype(str).str.lower().isin(["true", "1", "1.0"])


def certificate_points(df: pd.DataFrame) -> pd.DataFrame:
    """The (case, policy) rows with a certificate and a measured x: ``err`` (worst token), ``bound``,
    ``below`` (err > bound: the bound did not hold), ``tokens_over_bound``."""
    x = df[(df.kind == "production") & (df.quantity == "x")].copy()
    x["err"], x["bound"] = _num(x.max_token_err_x), _num(x.cert_bound)
    x = x[x.err.notna() & x.bound.notna()]
    x["below"] = x.err > x.bound
    x["tokens_over_bound"] = _num(x.tokens_over_bound).fillna(0).astype(int)
    return x


def plot_error_vs_T(df: pd.DataFrame, path: str) -> None:
    plt = _plt()
    o = df[(df.kind == "production") & (df.quantity == "o")].copy()
    o["measured"] = _num(o.measured)
    panels = list(dict.fromkeys(zip(o.family, o.D, strict=True)))
    n = max(len(panels), 1)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    finite = o.measured[o.measured.map(math.isfinite) & (o.measured > 0)]
    ceiling = float(finite.max()) * 10 if len(finite) else 1.0
    floor = float(finite.min()) / 10 if len(finite) else 1e-8
    for ax, (fam, D) in zip(axes.flat, panels, strict=False):
        sel = o[(o.family == fam) & (o.D == D)]
        for pol, g in sel.groupby("policy", sort=False):
            g = g.sort_values("T")
            y = g.measured.map(lambda v: ceiling if not math.isfinite(v) else max(v, floor))
            c = _color(pol)
            ax.plot(g["T"], y, "-", color=c, lw=1, label=pol)
            for T, v, raw, verdict in zip(g["T"], y, g.measured, g.verdict, strict=True):
                if not math.isfinite(raw):
                    ax.plot(T, v, "^", color=c, ms=8)
                if verdict == "FAIL":
                    ax.plot(T, v, "X", color="red", ms=11, mec="black")
                elif verdict == "flagged":
                    ax.plot(T, v, "o", mfc="none", mec=c, ms=9, mew=1.6)
                else:
                    ax.plot(T, v, "o", color=c, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{fam}, D = {D}", fontsize=10)
        ax.set_xlabel("T")
        ax.set_ylabel("relative error of o")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(panels)]:  # every policy once, whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.suptitle("relative error of o vs T (hollow: flagged by the certificate; red X: silent FAIL; "
                 "triangle: non-finite)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bound_vs_error(df: pd.DataFrame, path: str) -> tuple[int, int]:
    """The scatter; returns (points, points below y = x)."""
    plt = _plt()
    pts = certificate_points(df)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    vals = [v for v in list(pts.err) + list(pts.bound) if math.isfinite(v) and v > 0]
    lo = min(vals) / 10 if vals else 1e-10
    hi = max(vals) * 10 if vals else 1.0
    for pol, g in pts.groupby("policy", sort=False):
        xs = g.err.map(lambda v: hi if not math.isfinite(v) else max(v, lo))
        ys = g.bound.map(lambda v: hi if not math.isfinite(v) else max(v, lo))
        ax.scatter(xs, ys, s=22, color=_color(pol), label=pol, alpha=0.85)
        bad = g.below.to_numpy()
        if bad.any():
            ax.scatter(xs[bad], ys[bad], s=90, facecolors="none", edgecolors="red", lw=1.5)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi * 1.5)
    ax.set_ylim(lo, hi * 1.5)
    ax.set_xlabel("measured worst-token relative error of x")
    ax.set_ylabel("certified bound (max over tokens)")
    below = int(pts.below.sum())
    ax.set_title(f"certificate vs measured: {below} of {len(pts)} points below y = x\n"
                 "(red rings: below; non-finite values on the top / right edge)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(pts), below


def write_plots(df: pd.DataFrame, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    a, b = os.path.join(out_dir, "error_vs_T.png"), os.path.join(out_dir, "bound_vs_error.png")
    plot_error_vs_T(df, a)
    plot_bound_vs_error(df, b)
    return [a, b]


def o_tables(df: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per (family, D): T x policy, the relative error of o with its verdict."""
    o = df[(df.kind == "production") & (df.quantity == "o")]
    out = {}
    for (fam, D), g in o.groupby(["family", "D"], sort=False):
        pols = production.policy_order(g.policy)
        rows = []
        for T, gt in g.groupby("T"):
            row = {"T": int(T)}
            for r in gt.itertuples():
                row[r.policy] = fmt(float(r.measured)) + MARK.get(r.verdict, "")
            rows.append(row)
        out[(fam, int(D))] = pd.DataFrame(rows, columns=["T", *pols])
    return out


def gradient_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (case, policy) with gradients: the worst gradient verdict and the largest measured / budget."""
    g = df[(df.kind == "production") & df.quantity.astype(str).str.startswith("d")]
    rows = []
    for (case, pol), gg in g.groupby(["case", "policy"], sort=False):
        ratio = _num(gg.ratio)
        worst = gg.loc[ratio.idxmax()] if ratio.notna().any() else gg.iloc[0]
        rows.append({"case": case, "policy": pol, "verdict": production.worst_verdict(gg.verdict),
                     "worst quantity": worst.quantity, "max error / budget": float(ratio.max()),
                     "adjoint bound": float(_num(gg.adjoint_bound).max())})
    return pd.DataFrame(rows)


def verdict_counts(df: pd.DataFrame) -> pd.DataFrame:
    prod = df[df.kind == "production"]
    rows = [{"policy": pol, **production.counts(prod[prod.policy == pol])}
            for pol in production.policy_order(prod.policy)]
    return pd.DataFrame(rows)


def _rows_table(df: pd.DataFrame, cols: list[str]) -> str:
    return to_markdown(df[cols].reset_index(drop=True))


def write_report(out_dir: str, df: pd.DataFrame | None = None, meta: dict | None = None,
                 plots: bool = True) -> str:
    """Write ``out_dir/report.md`` (and ``out_dir/plots/``) from ``df`` or ``out_dir/results.csv``."""
    if df is None:
        df = production.read_results(os.path.join(out_dir, "results.csv"))
    meta = dict(meta or {})
    prod = df[df.kind == "production"]
    pts = certificate_points(df)
    lines = ["# Production-scale verification of the Mesa op", ""]
    info = {k: meta.get(k) for k in ("grid", "description", "date", "wall_s") if meta.get(k) is not None}
    for col in ("impl", "device", "torch", "triton", "commit", "options"):
        vals = sorted({str(v) for v in prod[col].dropna()}) if col in prod else []
        if vals:
            info[col] = ", ".join(vals)
    for k, v in info.items():
        lines.append(f"- **{k}**: {fmt(v) if isinstance(v, float) else v}")
    n_fail = int((df.verdict == "FAIL").sum())
    lines += ["", f"{len(df)} rows: " + ", ".join(f"{v} {n}" for v, n in production.counts(df).items()), "",
              "Verdicts: **pass** error <= budget (factor u kappa + rounding of the returned dtype, "
              "stability/budgets.toml, u = policy.u_at(kappa), kappa the free bound max_t (tr H_t + max lam) / "
              "min lam); **flagged** above budget and reported by the op (a failed certificate or a "
              "CertificateWarning); **FAIL** above budget (or not finite) and not reported: a silent wrong "
              "answer; **error** the op raised.", ""]
    lines += ["## Verdicts per policy", "", to_markdown(verdict_counts(df)) if len(prod) else "(no rows)", ""]
    lines += ["## Silent failures (FAIL)", ""]
    fails = df[df.verdict == "FAIL"]
    cols = ["case", "policy", "quantity", "measured", "budget", "kappa", "cert_bound", "warned", "note"]
    lines += [_rows_table(fails, cols) if n_fail else "None: every error above its budget was flagged.", ""]
    errs = df[df.verdict == "error"]
    if len(errs):
        lines += ["## Errors (the op raised)", "", _rows_table(errs, ["case", "policy", "quantity", "note"]), ""]
    lines += ["## Relative error of o", "",
              "Per family and head dim: rows T, columns policy; marks: (flagged), FAIL, error.", ""]
    for (fam, D), table in o_tables(df).items():
        lines += [f"### {fam}, D = {D}", "", to_markdown(table), ""]
    gt = gradient_table(df)
    if len(gt):
        lines += ["## Gradients", "", "Per case and policy: the worst verdict over dq, dk, dv, dg, dbeta, dlam and "
                  "the largest error / budget.", "", to_markdown(gt), ""]
    below = pts[pts.below]
    lines += ["## Certified bound against measured error", "",
              f"{len(pts)} (case, policy) rows carry a certificate. Points below y = x (worst-token error above "
              f"the largest certified bound): **{len(below)}**. Tokens whose error exceeds their own bound: "
              f"**{int(pts.tokens_over_bound.sum())}** (a rigorous bound has none).", ""]
    if len(below) or int(pts.tokens_over_bound.sum()):
        bad = pts[pts.below | (pts.tokens_over_bound > 0)]
        lines += [_rows_table(bad, ["case", "policy", "err", "bound", "tokens_over_bound", "tier"]), ""]
    ref = df[df.kind == "reference"]
    if len(ref):
        lines += ["## The float64 reference against mpmath", "",
                  "50 digits on a prefix of every case (batch 0, head 0; the note gives the prefix and coordinates).",
                  "", _rows_table(ref, ["case", "quantity", "measured", "budget", "verdict", "wall_fwd_s"]), ""]
    if plots and len(prod):
        paths = write_plots(df, os.path.join(out_dir, "plots"))
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in paths] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path
