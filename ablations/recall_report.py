"""The recall study's report: ``report.md`` and ``plots/`` from ``results.csv`` and ``diagnostics.csv``
(:mod:`ablations.recall`).

Every number of a finding is a mean over seeds with its 95% Student-t interval
(:func:`ablations.stats.mean_ci`). Contrasts between arms are paired by seed (the same seed trains
both arms on the same batches and they are scored on the same evaluation sequences); a contrast is
worded by :func:`ablations.stats.wording`: "resolved" only when its interval excludes 0.
"""

from __future__ import annotations

import math
import os

from .stats import mean_ci, wording


def _fmt_ci(m, lo, hi, n, digits=3) -> str:
    if n == 0 or math.isnan(m):
        return "–"
    if n < 2:
        return f"{m:.{digits}f} (1 seed)"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def contrasts(df, baseline: str, level: float = 0.95):
    """Per (Mesa arm, T): accuracy of the arm minus ``baseline``'s at the arms' own settings, paired by
    seed; rows ``(arm, T, mean, low, high, n, wording)``."""
    own = df[df["eval"] == "trained"]
    base = own[own.arm == baseline].set_index(["seed", "T"]).accuracy
    out = []
    for arm in sorted(a for a in own.arm.unique() if a.startswith("mesa")):
        mine = own[own.arm == arm].set_index(["seed", "T"]).accuracy
        for T in sorted(own["T"].unique()):
            d = [mine[s, T] - base[s, T] for s in own.seed.unique() if (s, T) in mine.index and (s, T) in base.index]
            m, lo, hi, n = mean_ci(d, level)
            out.append((arm, int(T), m, lo, hi, n, wording(lo, hi, n)))
    return out


def write_report(out: str) -> str:
    """``report.md`` (and ``plots/``) of a study folder; returns the report's path."""
    import pandas as pd

    df = pd.read_csv(os.path.join(out, "results.csv"))
    diag_path = os.path.join(out, "diagnostics.csv")
    diag = pd.read_csv(diag_path) if os.path.exists(diag_path) and os.path.getsize(diag_path) > 1 else None
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    prov = df.iloc[0]
    seeds = sorted(int(s) for s in df.seed.unique())
    lines = [f"# Multi-query associative recall: preset `{prov.preset}`", "",
             f"{prov.device}, torch {prov.torch}, triton {prov.triton}, commit {prov.commit}; seeds {seeds}. "
             f"Trained at T = {prov.train_T} with {prov.train_pairs} pairs for {int(df.train_steps.max())} steps; "
             "accuracy is the fraction of query values predicted (argmax over 256 bytes; chance 1/64 once the "
             "value alphabet is learned). Intervals: 95% Student-t over seeds; contrasts paired by seed.", ""]
    own = df[df["eval"] == "trained"]
    Ts = sorted(df["T"].unique())
    pairs = {T: int(df[df["T"] == T].pairs.iloc[0]) for T in Ts}
    lines += ["## Accuracy at each arm's own setting", "",
              "| arm | " + " | ".join(f"T = {T} ({pairs[T]} pairs)" for T in Ts) + " | diverged runs |",
              "|---|" + "---|" * (len(Ts) + 1)]
    for arm in sorted(own.arm.unique()):
        sub = own[own.arm == arm]
        cells = [_fmt_ci(*mean_ci(sub[sub["T"] == T].accuracy)) for T in Ts]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {int(sub.drop_duplicates('seed').diverged.sum())} |")
    for baseline in ("gla", "attention"):
        if baseline not in set(own.arm):
            continue
        lines += ["", f"## Mesa arms minus `{baseline}` (accuracy, paired by seed)", "",
                  "| arm | T | difference | interval | seeds | finding |", "|---|---|---|---|---|---|"]
        for arm, T, m, lo, hi, n, w in contrasts(df, baseline):
            ci = f"[{lo:+.3f}, {hi:+.3f}]" if n >= 2 else "–"
            lines.append(f"| {arm} | {T} | {m:+.3f} | {ci} | {n} | {w} |")
    mesa = df[df.arm.str.startswith("mesa")]
    if len(mesa):
        lines += ["", "## Evaluation-time solver settings (mean accuracy over seeds)", "",
                  "Rows: the arm and evaluation length; columns: the evaluation setting (`steps=0,x0=q` reads "
                  "out GLA's G_t q_t from the Mesa model's states; `steps=0` gives q* = 0).", ""]
        settings = [e for e in mesa["eval"].unique()]
        lines += ["| arm | T | " + " | ".join(f"`{e}`" for e in settings) + " |",
                  "|---|---|" + "---|" * len(settings)]
        for (arm, T), sub in mesa.groupby(["arm", "T"]):
            acc = sub.groupby("eval").accuracy.mean()
            lines.append(f"| {arm} | {T} | " + " | ".join(f"{acc.get(e, math.nan):.3f}" for e in settings) + " |")
    if diag is not None and len(diag):
        lines += ["", "## Gates, condition bound and CG steps along positions (arm's own setting, longest T)", "",
                  "Per layer and head: mean gamma, the condition bound kappa_t <= (max lam + b_t) / min lam "
                  "(b_t the decayed sum of beta_t ||k_t||^2) in the first and last position bucket, and the CG "
                  "steps there (mean over seeds and sequences).", "",
                  "| arm | layer | head | gamma | kappa bound, first → last bucket | CG steps, first → last |",
                  "|---|---|---|---|---|---|"]
        Tmax = diag["T"].max()
        sub = diag[diag["T"] == Tmax]
        for (arm, layer, head), g in sub.groupby(["arm", "layer", "head"]):
            g = g.groupby("pos_lo").mean(numeric_only=True).sort_index()
            first, last = g.iloc[0], g.iloc[-1]
            steps = ("–" if math.isnan(first.steps_mean) else f"{first.steps_mean:.1f} → {last.steps_mean:.1f}")
            lines.append(f"| {arm} | {layer} | {head} | {g.gamma_mean.mean():.3f} | {first.kappa_bound_mean:.3g} → "
                         f"{last.kappa_bound_mean:.3g} | {steps} |")
    _plots(df, diag, os.path.join(out, "plots"))
    lines += ["", "Plots: `plots/accuracy_vs_length.png`, `plots/accuracy_vs_eval_steps.png`, "
              "`plots/kappa_along_positions.png`.", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _plots(df, diag, folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = df[df["eval"] == "trained"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, sub in own.groupby("arm"):
        Ts = sorted(sub["T"].unique())
        stats = [mean_ci(sub[sub["T"] == T].accuracy) for T in Ts]
        m = [s[0] for s in stats]
        err = [[s[0] - s[1] if s[3] > 1 else 0 for s in stats], [s[2] - s[0] if s[3] > 1 else 0 for s in stats]]
        ax.errorbar(Ts, m, yerr=err, marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="evaluation length T", ylabel="recall accuracy", title="Recall at each arm's setting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "accuracy_vs_length.png"), dpi=120)
    plt.close(fig)

    mesa = df[df.arm.str.startswith("mesa") & df["eval"].str.match(r"^steps=\d+$")]
    if len(mesa):
        Ts = sorted(mesa["T"].unique())
        fig, axes = plt.subplots(1, len(Ts), figsize=(4 * len(Ts), 3.5), squeeze=False)
        for ax, T in zip(axes[0], Ts, strict=True):
            for arm, sub in mesa[mesa["T"] == T].groupby("arm"):
                k = sub["eval"].str.slice(6).astype(int)
                acc = sub.assign(k=k).groupby("k").accuracy.mean()
                ax.plot(acc.index, acc.values, marker="o", label=arm)
            ax.set(xlabel="eval-time CG steps", ylabel="recall accuracy", title=f"T = {T}", xscale="symlog")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "accuracy_vs_eval_steps.png"), dpi=120)
        plt.close(fig)

    if diag is not None and len(diag):
        sub = diag[diag["T"] == diag["T"].max()]
        arms_ = sorted(sub.arm.unique())
        fig, axes = plt.subplots(1, len(arms_), figsize=(4 * len(arms_), 3.5), squeeze=False)
        for ax, arm in zip(axes[0], arms_, strict=True):
            for (layer, head), g in sub[sub.arm == arm].groupby(["layer", "head"]):
                g = g.groupby("pos_hi").kappa_bound_mean.mean()
                ax.plot(g.index, g.values, marker=".", label=f"L{layer} H{head}")
            ax.set(xscale="log", yscale="log", xlabel="position (bucket end)", ylabel="kappa bound (mean)", title=arm)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "kappa_along_positions.png"), dpi=120)
        plt.close(fig)


__all__ = ["contrasts", "write_report"]
