"""The softmax temperature study's report (:mod:`ablations.softmax`): Markdown and PNG plots from
``results.csv``, ``trajectory/``, ``spectra/`` and ``curves/`` of a study folder.

The findings it states are computed from the table, with these rules:

* **rank deficit**: the seed-mean numerical rank of the logits at the largest T is at most a third of
  the one at T = 1, and the Spearman correlation of rank with T over all (T, seed) runs is negative;
* **parity** (:func:`ablations.softmax.parity`): the seed-mean final training loss ``L_T`` is within
  ``loss_band`` of ``L_1`` (relative); the temperatures outside it are named as failed to train;
* **matched-loss control**: a model that has not trained far has low-rank logits at any T (a unigram
  predictor has rank-1 logits up to a constant). For every run with a lower logits rank and a higher
  final held-out loss (``rows_loss``, on the rank rows) than the T = 1 run of its seed, that run is looked up along its
  trajectory at the first measured step where its held-out loss was at most as low; a deficit beyond
  under-training shows as a rank below that matched T = 1 rank;
* **OOD trade-off** (the paper: detection improves and generalisation worsens as T grows), over the
  runs within the parity band: detection improves if the Spearman correlations with T of the per-token
  AUROCs from MSP and from energy are both positive (per token: the per-window AUROCs saturate near 1
  when the OOD text is easy to tell apart; they are reported too); generalisation worsens if the
  Spearman correlation of the OOD gap ``bpb_ood - bpb_test`` with T is positive.
"""

from __future__ import annotations

import glob
import json
import math
import os

import pandas as pd

from mesa_stability.stability.provenance import provenance_of_table

from . import spectra
from .model import SIZES
from .report import markdown_table
from .softmax import parity, rank_trend, run_name


def _rho(x: float) -> str:
    return "undefined (a constant)" if x != x else f"{x:.3f}"


def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:
            return "-"
        if x == int(x) and abs(x) < 1e6:
            return f"{x:g}"
        return f"{x:.4f}" if abs(x) >= 1e-2 else f"{x:.2e}"
    return str(x)


def _table(df: pd.DataFrame) -> str:
    return markdown_table(df, _fmt)


def _trajectories(out: str) -> pd.DataFrame:
    frames = []
    for f in sorted(glob.glob(os.path.join(out, "trajectory", "*.csv"))):
        stem = os.path.basename(f)[:-4]  # T<T>_seed<s>
        t, s = stem[1:].split("_seed")
        frames.append(pd.read_csv(f).assign(temperature=float(t), seed=int(s)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def matched_loss(df: pd.DataFrame, traj: pd.DataFrame) -> pd.DataFrame:
    """For every finished run with ``T != 1`` whose final logits rank is below and whose final held-out
    loss is above its seed's T = 1 run (a deficit that under-training could explain): the T = 1 run's
    ranks at the first trajectory step where its held-out loss was at most as low."""
    rows = []
    for r in df[(df.temperature != 1.0) & ~df.diverged.astype(bool)].itertuples():
        ref = df[(df.temperature == 1.0) & (df.seed == r.seed)]
        tr = traj[(traj.temperature == 1.0) & (traj.seed == r.seed)].sort_values("step") if len(traj) else traj
        if ref.empty or tr.empty or not (r.rows_loss > float(ref.rows_loss.iloc[0])
                                         and r.logits_rank < int(ref.logits_rank.iloc[0])):
            continue
        hit = tr[tr.rows_loss <= r.rows_loss]
        if hit.empty:
            continue
        m = hit.iloc[0]
        rows.append({"T": r.temperature, "seed": r.seed, "held-out loss": r.rows_loss,
                     "logits rank": r.logits_rank, "T=1 step": int(m.step), "T=1 held-out loss": m.rows_loss,
                     "T=1 logits rank": int(m.logits_rank), "hidden rank": r.hidden_rank,
                     "T=1 hidden rank": int(m.hidden_rank)})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, loss_band: float) -> pd.DataFrame:
    """One row per T: seed means (and the seed spread of the logits rank) of the study's metrics."""
    cols = ["final_train_loss", "bpb_validation", "bpb_test", "bpb_ood", "logits_rank", "logits_erank",
            "hidden_rank", "hidden_erank", "auroc_msp", "auroc_energy", "auroc_msp_token", "auroc_energy_token",
            "logits_rms"]
    g = df.groupby("temperature")
    tab = g[cols].mean()
    tab["logits_rank_range"] = g.logits_rank.agg(lambda v: f"{v.min():g}-{v.max():g}")
    tab["seeds"] = g.seed.nunique()
    par = parity(df, loss_band).set_index("temperature")
    tab["loss_gap"] = par.rel_gap
    tab["in_band"] = par.within_band
    return tab.reset_index()


def findings(df: pd.DataFrame, traj: pd.DataFrame, loss_band: float) -> list[str]:
    """The findings as Markdown bullet lines, every number computed from ``df`` and ``traj``."""
    ok = df[~df.diverged.astype(bool)]
    tab = summary(ok, loss_band).set_index("temperature")
    t_max = float(tab.index.max())
    r1, rmax = tab.loc[1.0, "logits_rank"], tab.loc[t_max, "logits_rank"]
    rho = rank_trend(ok)
    classes = int(ok.byte_classes.max())
    deficit = rmax <= r1 / 3 and rho["logits_rank"] < 0
    lines = [f"- **Rank deficit: {'reproduced' if deficit else 'not reproduced'}.** Logits numerical rank "
             f"(seed mean) {r1:g} at T = 1 and {rmax:g} at T = {t_max:g} ({rmax / r1:.2f} of it; "
             f"{classes} byte classes occur in the rank rows); Spearman(rank, T) = {_rho(rho['logits_rank'])} "
             f"(effective rank {_rho(rho['logits_erank'])}; hidden representations: numerical "
             f"{_rho(rho['hidden_rank'])}, effective {_rho(rho['hidden_erank'])})."]
    failed = [t for t in tab.index if not tab.loc[t, "in_band"]]
    in_band = [t for t in tab.index if tab.loc[t, "in_band"]]
    lines.append(f"- **Parity of the training loss** (band {loss_band:g} x L_1 = "
                 f"{loss_band * tab.loc[1.0, 'final_train_loss']:.3f} nats/byte around L_1 = "
                 f"{tab.loc[1.0, 'final_train_loss']:.3f}): "
                 + ("every T trained to parity." if not failed else
                    "failed to train to parity at T = " + ", ".join(f"{t:g}" for t in failed)
                    + " (" + ", ".join(f"L = {tab.loc[t, 'final_train_loss']:.3f}" for t in failed) + ")."))
    hi = [t for t in in_band if t > 1.0]
    if hi:
        t_hi = max(hi)
        lines.append(f"- **At parity**, the largest T within the band is {t_hi:g}: logits rank "
                     f"{tab.loc[t_hi, 'logits_rank']:g} against {r1:g} at T = 1 "
                     f"({tab.loc[t_hi, 'logits_rank'] / r1:.2f}), effective rank "
                     f"{tab.loc[t_hi, 'logits_erank']:.1f} against {tab.loc[1.0, 'logits_erank']:.1f}.")
    else:
        lines.append("- **At parity** no T > 1 is within the band, so no rank comparison at equal training "
                     "loss exists above T = 1 in this study.")
    ml = matched_loss(ok, traj)
    if len(ml):
        below = ml[ml["logits rank"] < ml["T=1 logits rank"]]
        lines.append(f"- **Matched-loss control**: {len(ml)} runs have a lower logits rank than their seed's T = 1 "
                     f"run and ended with a higher held-out loss; {len(below)} of them are below the T = 1 run's "
                     f"rank at the step where it had the same loss (table below): "
                     + ("the deficit is more than under-training." if len(below) == len(ml) else
                        "the deficit is explained by under-training." if len(below) == 0 else
                        "under-training explains part of it."))
    par = ok[ok.temperature.isin(in_band)]
    if par.temperature.nunique() >= 3:
        temps = par.temperature.to_numpy(float)
        lo, hi_t = min(in_band), max(in_band)

        def trend(col):
            return spectra.spearman(par[col].to_numpy(float), temps), tab.loc[lo, col], tab.loc[hi_t, col]

        parts = []
        for col, what in (("auroc_msp_token", "MSP"), ("auroc_energy_token", "energy"),
                          ("auroc_msp", "MSP"), ("auroc_energy", "energy")):
            rho_c, a, b = trend(col)
            parts.append(f"{what} {_rho(rho_c)} ({a:.3f} -> {b:.3f})")
        rho_d = [trend(c)[0] for c in ("auroc_msp_token", "auroc_energy_token")]
        gap = (par.bpb_ood - par.bpb_test).to_numpy(float)
        rho_gap = spectra.spearman(gap, temps)
        gap_lo = tab.loc[lo, "bpb_ood"] - tab.loc[lo, "bpb_test"]
        gap_hi = tab.loc[hi_t, "bpb_ood"] - tab.loc[hi_t, "bpb_test"]
        detect = ("improves" if min(rho_d) > 0 else "worsens" if max(rho_d) < 0 else "has no common trend")
        general = "worsens" if rho_gap > 0 else "improves" if rho_gap < 0 else "does not change"
        # the paper's claim is about transferred representations, which this study does not measure: the
        # verdict is only whether these proxies move the paper's way
        verdict = ("the paper's direction" if detect == "improves" and general == "worsens" else
                   "against the paper's direction" if detect != "improves" and general != "worsens" else "mixed")
        lines.append(
            f"- **OOD proxies: {verdict}** (the paper's OOD claim, representation transfer, is not measured "
            f"here; runs within the parity band, T = {lo:g} to {hi_t:g}; the paper: detection improves and "
            f"generalisation worsens as T grows). Detection {detect}: Spearman with T of "
            f"the per-token AUROC from " + "; ".join(parts[:2]) + "; per window: " + "; ".join(parts[2:])
            + f". Generalisation {general}: Spearman of the OOD gap bpb_ood - bpb_test with T {_rho(rho_gap)} "
            f"({gap_lo:.3f} -> {gap_hi:.3f} bits/byte).")
    else:
        lines.append("- **OOD trade-off**: fewer than 3 temperatures within the parity band, too few to "
                     "measure a trend without the under-training confound.")
    return lines


def _plots(df: pd.DataFrame, traj: pd.DataFrame, out: str, meta: dict, loss_band: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    made = []
    ok = df[~df.diverged.astype(bool)]
    tab = ok.groupby("temperature")
    ts = sorted(ok.temperature.unique())
    d_model = SIZES[str(ok["size"].iloc[0])].d_model
    cmap = plt.get_cmap("viridis")
    color = {t: cmap(i / max(1, len(ts) - 1)) for i, t in enumerate(ts)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(pdir, name), dpi=110)
        plt.close(fig)
        made.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, which in zip(axes, ("logits", "hidden"), strict=True):
        for col, style, lab in ((f"{which}_rank", "o-", "numerical rank (1e-3)"),
                                (f"{which}_erank", "s--", "effective rank")):
            ax.plot(ts, tab[col].mean().loc[ts], style, label=lab)
            ax.plot(ok.temperature, ok[col], ".", color="gray", alpha=0.6)
        if d_model:
            ax.axhline(d_model, color="k", ls=":", lw=1, label=f"d_model = {d_model}")
        if which == "logits":
            ax.axhline(int(ok.byte_classes.max()), color="r", ls=":", lw=1, label="byte classes occurring")
        ax.set_xscale("log")
        ax.set_xlabel("training temperature T")
        ax.set_ylabel("rank")
        ax.set_title("logits Z = H_last E^T" if which == "logits" else "last hidden representations H_last")
        ax.legend(fontsize=7)
    save(fig, "rank_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("validation", "test", "ood"):
        ax.plot(ts, tab[f"bpb_{split}"].mean().loc[ts], "o-", label=split)
        ax.plot(ok.temperature, ok[f"bpb_{split}"], ".", color="gray", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training temperature T")
    ax.set_ylabel("bits / byte of softmax(z / T)")
    ax.legend(fontsize=8)
    ax.set_title("bits / byte by training temperature")
    save(fig, "bpb_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for col, style, lab in (("auroc_msp", "o-", "MSP, per window"), ("auroc_energy", "s-", "energy, per window"),
                            ("auroc_msp_token", "o:", "MSP, per token"),
                            ("auroc_energy_token", "s:", "energy, per token")):
        ax.plot(ts, tab[col].mean().loc[ts], style, label=lab)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training temperature T")
    ax.set_ylabel("AUROC, in-distribution (test) vs sympy source")
    ax.legend(fontsize=7)
    ax.set_title("OOD detection (AUROC) by training temperature")
    save(fig, "auroc_vs_temperature.png")

    # losses are kept in nats / byte (the training objective); the plots show bits / byte, as the report
    bits = 1 / math.log(2)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    l1 = tab.final_train_loss.mean().loc[1.0] * bits
    ax.axhspan(l1 * (1 - loss_band), l1 * (1 + loss_band), color="g", alpha=0.15, label=f"parity band +-{loss_band:g}")
    ax.plot(ts, tab.final_train_loss.mean().loc[ts] * bits, "o-", label="final training loss (seed mean)")
    ax.plot(ok.temperature, ok.final_train_loss * bits, ".", color="gray", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training temperature T")
    ax.set_ylabel("bits / byte of softmax(z / T)")
    ax.set_title("final training loss")
    ax.legend(fontsize=7)
    for t in ts:
        f = os.path.join(out, "curves", run_name(t, int(ok.seed.min())) + ".csv")
        if os.path.exists(f):
            c = pd.read_csv(f)
            w = max(1, len(c) // 50)
            ax2.plot(c.step, c.loss.rolling(w, min_periods=1).mean() * bits, color=color[t], label=f"T = {t:g}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (bits / byte, running mean)")
    ax2.set_yscale("log")  # T = 0.1 starts near 40 bits / byte
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.set_title(f"training curves, seed {int(ok.seed.min())}")
    ax2.legend(fontsize=7)
    save(fig, "train_loss_vs_temperature.png")

    if len(traj):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for t in ts:
            for s, g in traj[traj.temperature == t].groupby("seed"):
                g = g.sort_values("step")
                first = s == ok.seed.min()
                ax.plot(g.rows_loss * bits, g.logits_rank, "o-", ms=3, color=color[t], alpha=0.9 if first else 0.4,
                        label=f"T = {t:g}" if first else None)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("held-out loss (bits / byte, log scale; training moves right)")
        # labels at 1, 2, 5 x 10^k in plain numbers (matplotlib's minor labels overlap here)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("logits numerical rank")
        ax.set_title("rank at matched loss")
        ax.legend(fontsize=7)
        save(fig, "rank_vs_loss.png")

    seed0 = int(ok.seed.min())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for ax, which in zip(axes, ("logits", "hidden"), strict=True):
        for t in ts:
            f = os.path.join(out, "spectra", run_name(t, seed0) + ".csv")
            if not os.path.exists(f):
                continue
            sv = pd.read_csv(f)
            sv = sv[sv.matrix == which]
            ax.semilogy(sv["index"], sv.singular_value / sv.singular_value.max(), color=color[t], label=f"T = {t:g}")
            drawn = True
        thr = float(ok.rank_threshold.iloc[0])
        ax.axhline(thr, color="k", ls=":", lw=1, label=f"threshold {thr:g}")
        ax.set_ylim(1e-8, 2)
        ax.set_xlabel("index i")
        ax.set_ylabel("s_i / s_1")
        ax.set_title(f"{which} spectrum, seed {seed0}")
        ax.legend(fontsize=7)
    if drawn:
        save(fig, "spectra.png")
    else:
        plt.close(fig)
    return made


def write_report(out: str, plots: bool = True) -> str:
    """Write ``out/report.md`` (and ``out/plots/*.png``) for the study in ``out``; returns its path."""
    df = pd.read_csv(os.path.join(out, "results.csv"))
    with open(os.path.join(out, "study.json")) as fh:
        meta = json.load(fh)
    st = meta["settings"]
    band = float(st["loss_band"])
    traj = _trajectories(out)
    ok = df[~df.diverged.astype(bool)]
    parts = [f"# Softmax temperature study: {meta['name']}", "", provenance_of_table(df), ""]
    fnd = os.path.join(out, "findings.md")
    if os.path.exists(fnd):
        with open(fnd) as fh:
            parts += [fh.read().strip(), ""]
    solver = st["solver"]
    temps = ", ".join(f"{t:g}" for t in sorted(df.temperature.unique()))
    seeds = ", ".join(str(s) for s in sorted(df.seed.unique()))
    rows = int(ok.rank_rows.iloc[0]) if len(ok) else "-"
    parts += [f"Model `{st['size']}`, {st['train_steps']} AdamW steps of batch {st['batch_size']}, peak lr "
              f"{st['lr']:g}, Mesa solver {solver['method']} (steps {solver['steps']}, tol {solver['tol']}, "
              f"policy {solver['policy']}); temperatures {temps}; seeds {seeds}. Ranks of {rows} held-out "
              f"positions (validation), float64, threshold {st['rank_threshold']:g}; OOD detection on "
              f"{st['eval_windows']} test windows against {st['eval_windows']} sympy windows. Training: "
              f"{df.train_wall_s.sum() / 60:.1f} min in all ({df.train_tokens_per_s.median():,.0f} tokens/s "
              "median).", ""]
    if df.diverged.astype(bool).any():
        bad = df[df.diverged.astype(bool)]
        parts += ["Diverged (non-finite loss): " + ", ".join(f"T = {r.temperature:g} seed {r.seed} at step "
                                                             f"{r.steps_done}" for r in bad.itertuples()), ""]
    if ok.temperature.nunique() >= 2 and 1.0 in set(ok.temperature):
        parts += ["## Findings (computed)", ""] + findings(df, traj, band) + [""]
        tab = summary(ok, band).rename(columns={"temperature": "T"})
        tab["T"] = [f"{t:g}" for t in tab["T"]]
        parts += ["## By temperature (seed means)", "", _table(tab), ""]
        ml = matched_loss(ok, traj)
        if len(ml):
            parts += ["## Matched-loss control", "",
                      "Each run with a lower logits rank and a higher final held-out loss than its seed's T = 1 "
                      "run, beside the T = 1 run at the first measured step (log-spaced) where its held-out loss "
                      "was at least as low:", "", _table(ml), ""]
    cols = ["temperature", "seed", "final_train_loss", "bpb_validation", "bpb_ood", "logits_rank", "logits_erank",
            "hidden_rank", "hidden_erank", "auroc_msp", "auroc_energy", "logits_rms", "train_wall_s"]
    parts += ["## Runs", "", _table(df[[c for c in cols if c in df]].sort_values(["temperature", "seed"])), ""]
    if plots and len(ok) and ok.temperature.nunique() >= 2 and 1.0 in set(ok.temperature):
        made = _plots(df, traj, out, meta, band)
        parts += ["## Plots", ""] + [f"![{m[:-4]}](plots/{m})" for m in made] + [""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))
    return path


__all__ = ["write_report", "findings", "matched_loss", "summary"]
