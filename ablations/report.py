"""The ablation report: Markdown tables and PNG plots from ``results.csv`` and the training curves.

Tables: bits per byte on validation / test / out-of-distribution per (training config, evaluation
config), with mean and max CG steps. Plots: bits per byte against evaluation CG steps, against the
tolerance, per precision policy; bits per byte by position bucket (early vs late tokens); training
curves.

Effects (:func:`effects`), stated with 95 % Student-t intervals over the replicates
(:mod:`ablations.stats`) and worded by the interval alone ("not resolved at this scale" when it
includes 0):

* an evaluation setting E against the reference evaluation R (30 CG steps in fp32): the paired
  difference ``bpb(m, s, E) - bpb(m, s, R)`` of validation bits per byte over every trained CG model
  m and seed s (the same weights and text, only the solver differs);
* a training setting A against the reference training B (the CG arm with the most steps), both
  evaluated with the reference solver for training effects (the exact solver where present):
  ``bpb(A, s) - bpb(B, s)`` paired by seed (a seed fixes the initialisation and the data order).
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pandas as pd

from mesa_stability.stability.provenance import provenance_of_table

from .stats import mean_ci, wording


def _fmt(x) -> str:
    if isinstance(x, float):
        return "-" if x != x else "0" if x == 0 else f"{x:.4f}" if abs(x) >= 1e-3 else f"{x:.2e}"
    return str(x)


def markdown_table(df: pd.DataFrame, fmt=_fmt) -> str:
    """``df`` as a Markdown table, every cell through ``fmt``."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def _plots(df: pd.DataFrame, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    made = []
    cg = df[df.eval_method == "cg"]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(pdir, name), dpi=110)
        plt.close(fig)
        made.append(name)

    fixed = cg[cg.eval_tol.isna() & (cg.eval_policy == "fp32")]
    if fixed.eval_steps.nunique() > 1:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for t, g in fixed.groupby("train"):
            g = g.sort_values("eval_steps")
            ax.plot(g.eval_steps, g.bpb_validation, "o-", label=f"trained {t}")
            # excess over the best evaluation of the same model (log scale: the small differences)
            best = df[df.train == t].bpb_validation.min()
            pos = g[g.bpb_validation > best]
            ax2.semilogy(pos.eval_steps, pos.bpb_validation - best, "o-", label=f"trained {t}")
        ax.set_xlabel("CG steps at evaluation")
        ax.set_ylabel("validation bits / byte")
        ax.legend(fontsize=7)
        ax.set_title("Solver quality at evaluation")
        ax2.set_xlabel("CG steps at evaluation")
        ax2.set_ylabel("excess over the model's best evaluation (bits / byte)")
        ax2.set_title("Excess (log scale)")
        save(fig, "bpb_vs_eval_steps.png")
    tol = cg[cg.eval_tol.notna()]
    if tol.eval_tol.nunique() > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for t, g in tol.groupby("train"):
            g = g.sort_values("eval_tol")
            ax.semilogx(g.eval_tol, g.bpb_validation, "o-", label=f"trained {t}")
            for _, r in g.iterrows():
                ax.annotate(f"{r.mean_steps:.1f}", (r.eval_tol, r.bpb_validation), fontsize=8,
                            textcoords="offset points", xytext=(3, 3))
        ax.ticklabel_format(axis="y", useOffset=False)  # the values themselves, not an offset
        ax.set_xlabel("CG tolerance at evaluation (labels: mean CG steps)", fontsize=10)
        ax.set_ylabel("validation bits / byte", fontsize=10)
        ax.set_title("Early-exit tolerance at evaluation", fontsize=11)
        ax.legend(fontsize=8)
        save(fig, "bpb_vs_tolerance.png")
    if cg.eval_policy.nunique() > 1:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        piv = cg[cg.eval_tol.isna()].groupby(["eval_policy", "train"]).bpb_validation.min().unstack()
        piv.plot.bar(ax=ax)
        ax.legend(fontsize=8, title="trained with", loc="upper left", bbox_to_anchor=(1.01, 1))
        lo, hi = float(piv.min().min()), float(piv.max().max())
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))  # the differences, not the bars' base
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel("validation bits / byte (best over step counts)", fontsize=10)
        ax.set_xlabel("precision policy at evaluation", fontsize=10)
        ax.set_title("Precision policy at evaluation", fontsize=11)
        ax.tick_params(axis="x", labelrotation=20)
        save(fig, "bpb_vs_policy.png")
    pos_cols = [c for c in df.columns if c.startswith("bpb_pos")]
    if pos_cols:
        # small multiples: one panel per evaluation configuration, every configuration shown, a line per
        # trained model; the shared y-axis shows where along the window each one costs
        evals = list(dict.fromkeys(df["eval"]))
        ncol = min(4, len(evals))
        nrow = -(-len(evals) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), sharex=True, sharey=True,
                                 squeeze=False)
        labels = [c.removeprefix("bpb_pos") for c in pos_cols]
        for ax, ev in zip(axes.flat, evals, strict=False):
            sub = df[df["eval"] == ev]
            for t, g in sub.groupby("train"):
                ax.plot(range(len(pos_cols)), g[pos_cols].mean().to_numpy(), "o-", ms=3, label=f"trained {t}")
            if not np.isfinite(sub[pos_cols].to_numpy(float)).any():
                ax.text(0.5, 0.5, "no finite values\n(diverged)", transform=ax.transAxes, ha="center", fontsize=8)
            ax.set_title(ev, fontsize=8)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(evals):]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xticks(range(len(pos_cols)), labels, fontsize=7, rotation=45)
            ax.set_xlabel("token positions", fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel("bits / byte", fontsize=8)
        axes.flat[0].legend(fontsize=6)
        fig.suptitle("Validation bits / byte by position in the window, per evaluation configuration", fontsize=10)
        save(fig, "bpb_by_position.png")
    curves = sorted(glob.glob(os.path.join(out, "curves", "*.csv")))
    if curves:
        # left: the curves (log scale); right: each run minus the mean of all finite runs, where runs that
        # overlap on the left are told apart
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        runs = {}
        for c in curves:
            cur = pd.read_csv(c)
            bits = cur.set_index("step").loss / math.log(2)  # the curves hold nats/byte; the report speaks bits/byte
            runs[os.path.basename(c)[:-4]] = bits.rolling(10, min_periods=1).mean()
        finite = {n: r for n, r in runs.items() if np.isfinite(r.to_numpy()).any()}
        for name, r in runs.items():
            ax.plot(r.index, r, label=name if name in finite else f"{name} (no finite loss: diverged)")
        ax.set_yscale("log")
        ax.set_xlabel("training step", fontsize=10)
        ax.set_ylabel("training loss (bits / byte, 10-step mean)", fontsize=10)
        ax.set_title("Training curves", fontsize=11)
        ax.legend(fontsize=7)
        if len(finite) > 1:
            mean = pd.concat(finite, axis=1).mean(axis=1)
            for name, r in finite.items():
                ax2.plot(r.index, (r - mean).rolling(50, min_periods=1).mean(), label=name, lw=1)
            ax2.axhline(0, color="k", lw=0.5)
            ax2.set_xlabel("training step", fontsize=10)
            ax2.set_ylabel("minus the mean of the runs (bits / byte, 50-step mean)", fontsize=10)
            ax2.set_title("Differences between runs", fontsize=11)
            ax2.legend(fontsize=7)
        else:
            ax2.set_visible(False)
        save(fig, "training_curves.png")
    return made


METRICS = ["bpb_validation", "bpb_test", "bpb_ood", "mean_steps", "max_steps", "tokens_per_s", "final_train_loss",
           "train_tokens_per_s", "train_wall_s", "train_steps_done"]


def seed_mean(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (train, eval): metrics averaged over seed replicates, with ``seeds`` (their number)
    and ``bpb_validation_spread`` (max - min over seeds; 0 for one seed). Rows keep the grid's order."""
    if "seed" not in df:
        df = df.assign(seed=0)
    df = df.assign(diverged=df.diverged.astype(bool))
    num = [c for c in df.columns if c in METRICS or c.startswith("bpb_pos")]
    keys = ["train", "eval"]
    first = df.drop_duplicates(keys).drop(columns=num + ["seed"])
    agg = df.groupby(keys, sort=False).agg(**{c: (c, "mean") for c in num},
                                          seeds=("seed", "nunique"),
                                          bpb_validation_spread=("bpb_validation", lambda x: x.max() - x.min()),
                                          any_diverged=("diverged", "any")).reset_index()
    return first.merge(agg, on=keys, how="left")


def _fmt_effect(x) -> str:
    return ("-" if math.isnan(x) else f"{x:.3g}") if isinstance(x, float) else str(x)


def _reference(labels, preferred: list[str]) -> str | None:
    return next((p for p in preferred if p in set(labels)), None)


def effects(raw: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per effect (module docstring): ``kind`` ("eval" / "train"), ``setting``, ``against``,
    ``mean``, ``low``, ``high``, ``n`` (pairs) and ``wording``; empty when nothing pairs."""
    df = raw.assign(seed=raw["seed"] if "seed" in raw else 0, diverged=raw.diverged.astype(bool))
    df = df[~df.diverged & np.isfinite(df.bpb_validation)]
    rows = []
    cg_trained = df[df.train.str.startswith("cg/")]
    ref_eval = _reference(cg_trained["eval"], ["cg/steps=30/fp32", "exact/fp32"])
    if ref_eval is not None:
        wide = cg_trained.pivot_table(index=["train", "seed"], columns="eval", values="bpb_validation")
        for e in [c for c in dict.fromkeys(cg_trained["eval"]) if c != ref_eval]:
            d = (wide[e] - wide[ref_eval]).dropna()
            m, lo, hi, n = mean_ci(d.tolist(), level)
            rows.append(dict(kind="eval", setting=e, against=ref_eval, mean=m, low=lo, high=hi, n=n,
                             wording=wording(lo, hi, n)))
    steps = {t: float(t.split("steps=")[1].split("/")[0]) for t in dict.fromkeys(df.train) if "steps=" in t}
    train_eval = _reference(df["eval"], ["exact/fp32", "cg/steps=30/fp32"])
    if steps and train_eval is not None:
        ref_train = max(steps, key=steps.get)
        at = df[df["eval"] == train_eval].pivot_table(index="seed", columns="train", values="bpb_validation")
        for t in [c for c in dict.fromkeys(df.train) if c != ref_train and c in at]:
            d = (at[t] - at[ref_train]).dropna()
            m, lo, hi, n = mean_ci(d.tolist(), level)
            rows.append(dict(kind="train", setting=t, against=f"{ref_train} (eval {train_eval})", mean=m, low=lo,
                             high=hi, n=n, wording=wording(lo, hi, n)))
    return pd.DataFrame(rows, columns=["kind", "setting", "against", "mean", "low", "high", "n", "wording"])


def write_report(out: str, plots: bool = True) -> str:
    """Write ``out/report.md`` (and ``out/plots/``) from ``out/results.csv``; returns the path. With seed
    replicates the tables and plots show means over seeds (and the spread). A hand-written
    ``out/findings.md`` (conclusions with their numbers) is included at the top when present."""
    raw = pd.read_csv(os.path.join(out, "results.csv"))
    df = seed_mean(raw)
    n_seeds = int(df.seeds.max())
    cols = ["train", "eval", "bpb_validation", "bpb_test", "bpb_ood", "mean_steps", "max_steps", "tokens_per_s"]
    parts = [f"# Ablation report: {df.grid.iloc[0]}", "",
             f"{df.train.nunique()} training configuration(s) x {df['eval'].nunique()} evaluation configuration(s); "
             "bits per byte on the validation, test and out-of-distribution (sympy sources) splits; mean / max CG "
             "steps per token and evaluation throughput on validation."
             + (f" Means over {n_seeds} seeds; `spread` is the max - min of validation bits/byte over seeds."
                if n_seeds > 1 else ""), ""]
    parts += [provenance_of_table(raw), ""]
    findings = os.path.join(out, "findings.md")
    if os.path.exists(findings):
        with open(findings) as fh:
            parts += [fh.read().strip(), "", "## All results", ""]
    if n_seeds > 1:
        cols.insert(3, "bpb_validation_spread")
    parts += [markdown_table(df[[c for c in cols if c in df.columns]])]
    eff = effects(raw)
    if len(eff):
        parts += ["", "## Effects on validation bits per byte (95 % t-intervals)", "",
                  "Paired differences (module docstring of `ablations/report.py`): evaluation settings over "
                  "every (CG-trained model, seed), training settings by seed. An interval that includes 0 is "
                  "not resolved at this scale; with one pair there is no interval.", "",
                  markdown_table(eff, fmt=_fmt_effect)]
    div = df[df.any_diverged]
    if len(div):
        parts += ["", "Diverged (non-finite training loss): " + ", ".join(sorted(set(div.train)))]
    train_cols = ["train", "seed", "train_steps_done", "final_train_loss", "train_tokens_per_s", "train_wall_s"]
    per_run = raw.assign(seed=raw.get("seed", 0)).drop_duplicates(["train", "seed"])
    parts += ["", "## Training", "", markdown_table(per_run[train_cols])]
    pos_cols = [c for c in df.columns if c.startswith("bpb_pos")]
    if pos_cols:
        parts += ["", "## Bits per byte by position (validation)", "", markdown_table(df[["train", "eval", *pos_cols]])]
    if plots:
        made = _plots(df, out)
        parts += ["", "## Plots", ""] + [f"![{m}](plots/{m})" for m in made]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(parts) + "\n")
    return path
