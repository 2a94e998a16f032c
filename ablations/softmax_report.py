"""The softmax temperature study's report (:mod:`ablations.softmax`): Markdown and PNG plots from
``results.csv``, ``trajectory/``, ``spectra/`` and ``curves/`` of a study folder.

**Intervals.** Every effect a finding states is a comparison with ``T = 1`` paired by seed (the same
seed gives both runs the same initialisation and data stream):
``d_s = m(T, s) - m(1, s)`` over the seeds ``s`` that have both runs, stated as the mean of ``d_s``
with its 95% Student-t interval and the number of seeds (:func:`ablations.stats.mean_ci`), and worded
by :func:`ablations.stats.wording`: an interval that includes 0 is "not resolved at this scale";
with one seed there is no interval. The table "Effects against T = 1" gives them for every T.

The findings it states are computed from the table, with these rules:

* **rank deficit** (all 256 logit columns): the seed-mean numerical rank of the logits at the largest
  T is at most a third of the one at T = 1, the Spearman correlation of rank with T over all (T, seed)
  runs is negative, and (with 2 or more seeds) the rank difference to T = 1 is resolved negative;
* **rank among the classes that occur**: the numerical rank of the restricted, row-centred logits
  ``Z_U^c`` against its maximum ``C_used - 1`` (``logits_used_rank_ratio``), at T = 1 and the
  largest T; the temperatures whose ratio difference to T = 1 is resolved negative;
* **threshold dependence**: the ranks of ``Z`` and ``Z_U^c`` at each threshold of the sweep
  (1e-4, 1e-3, 1e-2, 1e-1) at T = 1 and the largest T, and at which thresholds the difference is
  resolved;
* **parity** (:func:`ablations.softmax.parity`): the seed-mean final training loss ``L_T`` is within
  ``loss_band`` of ``L_1`` (relative); the temperatures inside and outside the band are named (those
  outside as failed to train to parity), with the per-seed relative gap's interval at the in-band T
  farthest from T = 1. The band is the study's ``loss_band``: docs/design.md states no tolerance of
  the paper, so parity at the paper's tolerance is not stated;
* **matched-loss control**: a model that has not trained far has low-rank logits at any T (a unigram
  predictor has rank-1 logits up to a constant). For every run with a lower logits rank and a higher
  final held-out loss (``rows_loss``, on the rank rows) than the T = 1 run of its seed, that run is looked up along its
  trajectory at the first measured step where its held-out loss was at most as low; a deficit beyond
  under-training shows as a rank below that matched T = 1 rank;
* **short-window OOD detection**: MSP and energy AUROC of ``short_window``-byte windows, at the
  largest T within the parity band and at the largest T, against T = 1;
* **OOD proxies** (the paper: detection improves and generalisation worsens as T grows), over the
  runs within the parity band: detection improves if the Spearman correlations with T of the per-token
  AUROCs from MSP and from energy are both positive (per token: the per-window AUROCs saturate near 1
  when the OOD text is easy to tell apart; they are reported too); generalisation worsens if the
  Spearman correlation of the OOD gap ``bpb_ood - bpb_test`` with T is positive;
* **representation transfer** (the paper's claim that representations generalise worse out of
  distribution as T grows: the compressed, low-rank features transfer less), from
  the linear probes on OOD text (:func:`ablations.softmax.probe_metrics`): the probe accuracy of every
  (task, layer) at the largest T > 1 within the parity band against T = 1. *Supported* if every
  difference is resolved negative, *contradicted* if every one is resolved positive, *not resolved at
  this scale* if none is resolved, otherwise *mixed* (the counts are stated). Above the band a
  difference is confounded with under-training, so it is reported but not used for the verdict.

A study folder of an earlier format (:data:`ablations.softmax.STUDY_FORMAT`) lacks some columns: its
report leaves out the findings, tables and plots of those and says so.
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
from .probe import CHAR_CLASSES
from .report import markdown_table
from .softmax import PROBE_TASKS, STUDY_FORMAT, parity, rank_trend, run_name, sweep_column
from .stats import mean_ci, wording

PROBE_TASK_NAMES = {"next": "next byte (256 classes)",
                    "class": f"character class of the next byte ({', '.join(CHAR_CLASSES)})"}


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
    cols = [c for c in ("final_train_loss", "bpb_validation", "bpb_test", "bpb_ood", "logits_rank", "logits_erank",
                        "logits_used_rank", "logits_used_rank_ratio", "hidden_rank", "hidden_erank", "auroc_msp",
                        "auroc_energy", "auroc_msp_token", "auroc_energy_token", "auroc_msp_short",
                        "auroc_energy_short", "logits_rms") if c in df]
    g = df.groupby("temperature")
    tab = g[cols].mean()
    tab["logits_rank_range"] = g.logits_rank.agg(lambda v: f"{v.min():g}-{v.max():g}")
    tab["seeds"] = g.seed.nunique()
    par = parity(df, loss_band).set_index("temperature")
    tab["loss_gap"] = par.rel_gap
    tab["in_band"] = par.within_band
    return tab.reset_index()


def effect(df: pd.DataFrame, col: str, t: float, ref: float = 1.0) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of ``m(t, s) - m(ref, s)`` of column ``col`` over the seeds with both runs
    (:func:`ablations.stats.mean_ci`, 95%)."""
    a = df[df.temperature == t].set_index("seed")[col]
    b = df[df.temperature == ref].set_index("seed")[col]
    return mean_ci([float(a[s]) - float(b[s]) for s in sorted(set(a.index) & set(b.index))])


def _num(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def _eff(df: pd.DataFrame, col: str, t: float, digits: int = 3) -> str:
    """An effect against T = 1 in words: the mean difference, its 95% t-interval, the seeds, the wording."""
    m, lo, hi, n = effect(df, col, t)
    if n == 0:
        return "no paired seeds"
    if n < 2:
        return f"{_num(m, digits)} (one seed: no interval)"
    return f"{_num(m, digits)} (95% CI {_num(lo, digits)} to {_num(hi, digits)}, {n} seeds; {wording(lo, hi, n)})"


def _ts(ts) -> str:
    return ", ".join(f"{t:g}" for t in ts) if len(ts) else "none"


def _layers(df: pd.DataFrame, task: str) -> list[str]:
    """The probed layers present in ``df`` for ``task``, in model order (``h0 .. hL``, ``last``)."""
    pre = f"probe_{task}_acc_"
    names = [c[len(pre):] for c in df.columns if c.startswith(pre)]
    return sorted((n for n in names if n != "last"), key=lambda n: int(n[1:])) + (["last"] if "last" in names else [])


def effect_metrics(df: pd.DataFrame) -> list[tuple[str, str]]:
    """``(column, label)`` of every metric in the effects table that ``df`` has."""
    tau = float(df.rank_threshold.iloc[0]) if "rank_threshold" in df and len(df) else 1e-3
    out = [("logits_rank", f"logits rank (256 columns, {tau:g})"), ("logits_erank", "logits effective rank"),
           ("logits_used_rank", f"restricted centred logits rank ({tau:g})"),
           ("logits_used_rank_ratio", "restricted centred rank / (C_used - 1)"),
           *((sweep_column(w, t), f"{what} rank at {t:g}") for w, what in
             (("logits", "logits"), ("logits_used", "restricted centred")) for t in spectra.SWEEP_THRESHOLDS),
           ("hidden_rank", f"hidden rank ({tau:g})"), ("hidden_erank", "hidden effective rank"),
           ("bpb_test", "test bits/byte"), ("bpb_ood", "OOD bits/byte"),
           ("auroc_msp_short", "AUROC MSP, short windows"), ("auroc_energy_short", "AUROC energy, short windows"),
           ("auroc_msp_token", "AUROC MSP, per token"), ("auroc_energy_token", "AUROC energy, per token"),
           ("auroc_msp", "AUROC MSP, per window"), ("auroc_energy", "AUROC energy, per window")]
    for task in PROBE_TASKS:
        out += [(f"probe_{task}_acc_{n}", f"probe {task}: accuracy at {n}") for n in _layers(df, task)]
    return [(c, lab) for c, lab in out if c in df]


def effects_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per metric (rows) and T != 1 (columns): the paired difference to T = 1, ``mean [low, high]``, bold
    where resolved (the interval excludes 0)."""
    ts = [t for t in sorted(df.temperature.unique()) if t != 1.0]
    rows = []
    for col, lab in effect_metrics(df):
        cells = {"metric": lab}
        for t in ts:
            m, lo, hi, n = effect(df, col, t)
            d = 1 if "rank" in col and "ratio" not in col else 3
            if n < 2:
                cells[f"T={t:g}"] = "-" if n == 0 else f"{_num(m, d)} (1 seed)"
                continue
            cell = f"{_num(m, d)} [{_num(lo, d)}, {_num(hi, d)}]"
            cells[f"T={t:g}"] = f"**{cell}**" if wording(lo, hi, n).startswith("resolved") else cell
        rows.append(cells)
    return pd.DataFrame(rows)


def sweep_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per T: the seed-mean numerical ranks of ``Z`` and ``Z_U^c`` at every threshold of the sweep."""
    cols = [sweep_column(w, t) for w in ("logits", "logits_used") for t in spectra.SWEEP_THRESHOLDS]
    cols = [c for c in cols if c in df]
    tab = df.groupby("temperature")[cols].mean().reset_index()
    return tab.rename(columns={"temperature": "T", **{c: c.replace("_rank_at_", " @ ") for c in cols}})


def probe_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Per T: seed-mean probe accuracy and loss of every layer, and the chance accuracy, for ``task``."""
    names = _layers(df, task)
    cols = ([f"probe_{task}_acc_{n}" for n in names] + [f"probe_{task}_loss_{n}" for n in names]
            + [f"probe_{task}_chance"])
    tab = df.groupby("temperature")[[c for c in cols if c in df]].mean().reset_index()
    ren = {"temperature": "T", f"probe_{task}_chance": "chance"}
    for n in names:
        ren[f"probe_{task}_acc_{n}"] = f"acc {n}"
        ren[f"probe_{task}_loss_{n}"] = f"loss {n}"
    return tab.rename(columns=ren)


def _rank_findings(ok: pd.DataFrame, tab: pd.DataFrame, t_max: float) -> list[str]:
    r1, rmax = tab.loc[1.0, "logits_rank"], tab.loc[t_max, "logits_rank"]
    rho = rank_trend(ok)
    classes = int(ok.byte_classes.max())
    tau = float(ok.rank_threshold.iloc[0]) if "rank_threshold" in ok else 1e-3
    m, lo, hi, n = effect(ok, "logits_rank", t_max)
    if not (rmax <= r1 / 3 and rho["logits_rank"] < 0):
        verdict = "not reproduced"
    elif n >= 2 and wording(lo, hi, n) != "resolved: negative":
        verdict = "not resolved at this scale"
    else:
        verdict = "reproduced" if n >= 2 else "reproduced (one seed: no interval)"
    lines = [f"- **Rank deficit: {verdict}** (all 256 logit columns). Logits numerical rank (threshold {tau:g}, "
             f"seed mean) {r1:g} at T = 1 and {rmax:g} at T = {t_max:g} ({rmax / r1:.2f} of it; difference "
             f"{_eff(ok, 'logits_rank', t_max, 1)}; {classes} byte classes occur in the rank rows); "
             f"Spearman(rank, T) = {_rho(rho['logits_rank'])} (effective rank {_rho(rho['logits_erank'])}; hidden "
             f"representations: numerical {_rho(rho['hidden_rank'])}, effective {_rho(rho['hidden_erank'])}). The "
             "all-256 rank also counts directions in the columns of bytes that never occur"
             + (": the comparison with the classes is the next one." if "logits_used_rank" in ok else
                ", so it is not a count of the classes the model separates.")]
    if "logits_used_rank" in ok:
        cmax = classes - 1
        below = [t for t in tab.index
                 if t != 1.0 and wording(*effect(ok, "logits_used_rank_ratio", t)[1:]) == "resolved: negative"]
        short = [t for t in tab.index if tab.loc[t, "logits_used_rank_ratio"] < 1]
        lines.append(
            f"- **Rank among the classes that occur** (the logits restricted to the {classes} byte classes among "
            f"the rank rows' targets, row-centred; at most C_used - 1 = {cmax}): rank "
            f"{tab.loc[1.0, 'logits_used_rank']:g} at T = 1 ({tab.loc[1.0, 'logits_used_rank_ratio']:.3f} of "
            f"{cmax}) and {tab.loc[t_max, 'logits_used_rank']:g} at T = {t_max:g} "
            f"({tab.loc[t_max, 'logits_used_rank_ratio']:.3f}); ratio difference at T = {t_max:g}: "
            f"{_eff(ok, 'logits_used_rank_ratio', t_max)}. Seed-mean ratio below 1 at T = {_ts(short)}; "
            f"difference to T = 1 resolved negative at T = {_ts(below)}.")
    sweep = [t for t in spectra.SWEEP_THRESHOLDS if sweep_column("logits", t) in ok]
    if sweep:
        parts = []
        for which, what in (("logits", "all-256 logits"), ("logits_used", "restricted centred logits")):
            cols = [sweep_column(which, t) for t in sweep]
            if not all(c in ok for c in cols):
                continue
            at1 = " / ".join(f"{tab.loc[1.0, c]:g}" for c in cols)
            atm = " / ".join(f"{tab.loc[t_max, c]:g}" for c in cols)
            res = [t for t, c in zip(sweep, cols, strict=True)
                   if wording(*effect(ok, c, t_max)[1:]).startswith("resolved")]
            parts.append(f"{what} {at1} at T = 1 and {atm} at T = {t_max:g} (difference resolved at tau = "
                         f"{', '.join(f'{t:g}' for t in res) or 'none'})")
        lines.append(f"- **Threshold dependence** (numerical rank at tau = {' / '.join(f'{t:g}' for t in sweep)}, "
                     "seed means): " + "; ".join(parts) + ". A rank is a count of singular values above a "
                     "threshold, so its value moves with tau; the table \"Threshold sweep\" has every T.")
    return lines


def _parity_findings(ok: pd.DataFrame, tab: pd.DataFrame, loss_band: float) -> list[str]:
    failed = [t for t in tab.index if not tab.loc[t, "in_band"]]
    in_band = [t for t in tab.index if tab.loc[t, "in_band"]]
    l1 = tab.loc[1.0, "final_train_loss"]
    line = (f"- **Parity of the training loss** (band {loss_band:g} x L_1 = {loss_band * l1:.3f} nats/byte around "
            f"L_1 = {l1:.3f}; the band is the study's `loss_band`, docs/design.md states no tolerance of the paper, "
            "so parity at the paper's tolerance is not stated): "
            + ("every T trained to parity." if not failed else
               "failed to train to parity at T = " + ", ".join(f"{t:g}" for t in failed)
               + " (" + ", ".join(f"L = {tab.loc[t, 'final_train_loss']:.3f}" for t in failed) + ").")
            + f" Inside the band: T = {_ts(in_band)}.")
    others = [t for t in in_band if t != 1.0]
    if others:
        t = max(others, key=lambda t: tab.loc[t, "loss_gap"])
        rel = ok.assign(rel=ok.final_train_loss / l1 - 1)  # per-seed relative gap; L_1 seed mean as the scale
        m, lo, hi, n = effect(rel, "rel", t)
        inside = n >= 2 and -loss_band <= lo and hi <= loss_band
        line += (f" The in-band T farthest from T = 1 is {t:g}: relative gap (L_T - L_1) / L_1 "
                 f"{_eff(rel, 'rel', t)}; its interval "
                 + (("lies inside" if inside else "reaches outside") + " the band." if n >= 2 else "needs 2 seeds."))
    return [line]


def _probe_findings(ok: pd.DataFrame, tab: pd.DataFrame, in_band: list[float], t_max: float) -> list[str]:
    tasks = [t for t in PROBE_TASKS if _layers(ok, t)]
    if not tasks:
        return []
    hi = [t for t in in_band if t > 1.0]
    t_hi = max(hi) if hi else None
    rows = int(ok.probe_rows_train.iloc[0]) if "probe_rows_train" in ok else 0
    lines = []
    for task in tasks:
        names = _layers(ok, task)
        acc = {n: f"probe_{task}_acc_{n}" for n in names}
        best = max(names, key=lambda n: tab.loc[1.0, acc[n]])
        text = (f"- **Linear probes on OOD text: {PROBE_TASK_NAMES[task]}** (closed-form ridge on frozen features, "
                f"float64, its parameter chosen on a validation part of the training half; {rows} sympy positions "
                f"train, as many test; chance {tab.loc[1.0, f'probe_{task}_chance']:.3f}): at T = 1 accuracy "
                + ", ".join(f"{n} {tab.loc[1.0, acc[n]]:.3f}" for n in names) + f" (best {best}).")
        for t, what in ((t_hi, "the largest T > 1 within the parity band"), (t_max, "the largest T")):
            if t is None or (what == "the largest T" and t == t_hi):
                continue
            text += (f" At T = {t:g} ({what}" + ("; outside the band, confounded with under-training" if
                                                 t not in in_band else "") + "): H_last "
                     f"{tab.loc[t, acc[names[-1]]]:.3f}, difference {_eff(ok, acc[names[-1]], t)}; best layer "
                     f"{best} {_eff(ok, acc[best], t)}.")
        lines.append(text)
    if t_hi is None:
        lines.append("- **Representation transfer: not tested at parity**: no T > 1 is within the parity band, so "
                     "a probe difference would be confounded with under-training.")
        return lines
    words = [wording(*effect(ok, f"probe_{task}_acc_{n}", t_hi)[1:]) for task in tasks for n in _layers(ok, task)]
    pos, neg = words.count("resolved: positive"), words.count("resolved: negative")
    if any(w in ("one seed: no interval", "no data") for w in words):
        verdict = "no interval (one seed)"
    elif neg == len(words):
        verdict = "supported"
    elif pos == len(words):
        verdict = "contradicted"
    elif pos == neg == 0:
        verdict = "not resolved at this scale"
    else:
        verdict = "mixed"
    lines.append(f"- **Representation transfer (the paper: representations transfer worse as T grows): "
                 f"{verdict}.** Probe accuracy at T = {t_hi:g} (the largest T > 1 within the parity band) against "
                 f"T = 1, over {len(words)} (task, layer) pairs: {pos} resolved higher, {neg} resolved lower, "
                 f"{len(words) - pos - neg} not resolved at this scale (table \"Effects against T = 1\").")
    return lines


def findings(df: pd.DataFrame, traj: pd.DataFrame, loss_band: float) -> list[str]:
    """The findings as Markdown bullet lines, every number computed from ``df`` and ``traj``."""
    ok = df[~df.diverged.astype(bool)]
    tab = summary(ok, loss_band).set_index("temperature")
    means = ok.groupby("temperature").mean(numeric_only=True)  # the sweep and probe columns, seed means
    tab = tab.join(means[[c for c in means.columns if c not in tab.columns]])
    t_max = float(tab.index.max())
    r1 = tab.loc[1.0, "logits_rank"]
    lines = _rank_findings(ok, tab, t_max) + _parity_findings(ok, tab, loss_band)
    in_band = [t for t in tab.index if tab.loc[t, "in_band"]]
    hi = [t for t in in_band if t > 1.0]
    if hi:
        t_hi = max(hi)
        lines.append(f"- **At parity**, the largest T within the band is {t_hi:g}: logits rank "
                     f"{tab.loc[t_hi, 'logits_rank']:g} against {r1:g} at T = 1 (difference "
                     f"{_eff(ok, 'logits_rank', t_hi, 1)}), effective rank "
                     f"{tab.loc[t_hi, 'logits_erank']:.1f} against {tab.loc[1.0, 'logits_erank']:.1f}"
                     + (f"; restricted centred rank / (C_used - 1) {tab.loc[t_hi, 'logits_used_rank_ratio']:.3f} "
                        f"against {tab.loc[1.0, 'logits_used_rank_ratio']:.3f} (difference "
                        f"{_eff(ok, 'logits_used_rank_ratio', t_hi)})" if "logits_used_rank_ratio" in ok else "")
                     + ".")
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
    if "auroc_msp_short" in ok:
        w = int(ok.short_window.iloc[0])
        nw = int(ok.short_windows.iloc[0])
        long_lo, long_hi = ok.auroc_msp.min(), ok.auroc_msp.max()
        text = (f"- **OOD detection on {w}-byte windows** ({nw} test against {nw} sympy windows, each run on its "
                f"own; per {SIZES[str(ok['size'].iloc[0])].seq_len}-byte window the MSP AUROC is {long_lo:.4f} to "
                f"{long_hi:.4f} over all runs): at T = 1 MSP {tab.loc[1.0, 'auroc_msp_short']:.3f}, energy "
                f"{tab.loc[1.0, 'auroc_energy_short']:.3f}.")
        for t in ([max(hi)] if hi else []) + ([t_max] if not hi or t_max != max(hi) else []):
            text += (f" At T = {t:g}" + (" (outside the parity band)" if t not in in_band else "") + ": MSP "
                     f"{tab.loc[t, 'auroc_msp_short']:.3f}, difference {_eff(ok, 'auroc_msp_short', t)}; energy "
                     f"{tab.loc[t, 'auroc_energy_short']:.3f}, difference {_eff(ok, 'auroc_energy_short', t)}.")
        lines.append(text)
    par = ok[ok.temperature.isin(in_band)]
    if par.temperature.nunique() >= 3:
        temps = par.temperature.to_numpy(float)
        lo, hi_t = min(in_band), max(in_band)

        def trend(col):
            return spectra.spearman(par[col].to_numpy(float), temps)

        parts = []
        for col, what in (("auroc_msp_token", "MSP"), ("auroc_energy_token", "energy"),
                          ("auroc_msp", "MSP"), ("auroc_energy", "energy")):
            parts.append(f"{what} {_rho(trend(col))} (T = 1: {tab.loc[1.0, col]:.3f}; T = {hi_t:g}: "
                         f"{tab.loc[hi_t, col]:.3f}, difference {_eff(ok, col, hi_t)})")
        rho_d = [trend(c) for c in ("auroc_msp_token", "auroc_energy_token")]
        gap = (par.bpb_ood - par.bpb_test).to_numpy(float)
        rho_gap = spectra.spearman(gap, temps)
        gaps = ok.assign(gap=ok.bpb_ood - ok.bpb_test)
        gap_1 = tab.loc[1.0, "bpb_ood"] - tab.loc[1.0, "bpb_test"]
        gap_hi = tab.loc[hi_t, "bpb_ood"] - tab.loc[hi_t, "bpb_test"]
        detect = ("improves" if min(rho_d) > 0 else "worsens" if max(rho_d) < 0 else "has no common trend")
        general = "worsens" if rho_gap > 0 else "improves" if rho_gap < 0 else "does not change"
        # the output-side proxies only; the representation claim is the probes' finding
        verdict = ("the paper's direction" if detect == "improves" and general == "worsens" else
                   "against the paper's direction" if detect != "improves" and general != "worsens" else "mixed")
        lines.append(
            f"- **OOD proxies: {verdict}** (output-side proxies: detection from the softmax and the LM's own OOD "
            f"loss; runs within the parity band, T = {lo:g} to {hi_t:g}; the paper: detection improves and "
            f"generalisation worsens as T grows). Detection {detect}: Spearman with T of "
            f"the per-token AUROC from " + "; ".join(parts[:2]) + "; per window: " + "; ".join(parts[2:])
            + f". Generalisation {general}: Spearman of the OOD gap bpb_ood - bpb_test with T {_rho(rho_gap)} "
            f"(T = 1: {gap_1:.3f}; T = {hi_t:g}: {gap_hi:.3f} bits/byte, difference {_eff(gaps, 'gap', hi_t)}).")
    else:
        lines.append("- **OOD trade-off**: fewer than 3 temperatures within the parity band, too few to "
                     "measure a trend without the under-training confound.")
    return lines + _probe_findings(ok, tab, in_band, t_max)


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

    tau = float(ok.rank_threshold.iloc[0])
    classes = int(ok.byte_classes.max())
    titles = {"logits": "logits Z = H_last E^T (256 columns)", "hidden": "last hidden representations H_last",
              "logits_used": f"restricted centred logits Z_U^c ({classes} classes)"}
    mats = [w for w in ("logits", "logits_used", "hidden") if f"{w}_rank" in ok]
    fig, axes = plt.subplots(1, len(mats), figsize=(5.5 * len(mats), 4))
    for ax, which in zip(axes, mats, strict=True):
        for col, style, lab in ((f"{which}_rank", "o-", f"numerical rank ({tau:g})"),
                                (f"{which}_erank", "s--", "effective rank")):
            ax.plot(ts, tab[col].mean().loc[ts], style, label=lab)
            ax.plot(ok.temperature, ok[col], ".", color="gray", alpha=0.6)
        if d_model:
            ax.axhline(d_model, color="k", ls=":", lw=1, label=f"d_model = {d_model}")
        if which == "logits":
            ax.axhline(classes, color="r", ls=":", lw=1, label="byte classes occurring")
        if which == "logits_used":
            ax.axhline(classes - 1, color="r", ls=":", lw=1, label=f"C_used - 1 = {classes - 1}")
        ax.set_xscale("log")
        ax.set_xlabel("training temperature T")
        ax.set_ylabel("rank")
        ax.set_title(titles[which], fontsize=10)
        ax.legend(fontsize=7)
    save(fig, "rank_vs_temperature.png")

    sweep = [w for w in ("logits", "logits_used") if all(sweep_column(w, t) in ok for t in spectra.SWEEP_THRESHOLDS)]
    if sweep:
        fig, axes = plt.subplots(1, len(sweep), figsize=(5.5 * len(sweep), 4), squeeze=False)
        tcmap = plt.get_cmap("plasma")
        for ax, which in zip(axes[0], sweep, strict=True):
            for i, thr in enumerate(spectra.SWEEP_THRESHOLDS):
                col = sweep_column(which, thr)
                c = tcmap(i / len(spectra.SWEEP_THRESHOLDS))
                ax.plot(ts, tab[col].mean().loc[ts], "o-", color=c, label=f"tau = {thr:g}")
                ax.plot(ok.temperature, ok[col], ".", color=c, alpha=0.4)
            limit = classes - 1 if which == "logits_used" else d_model
            ax.axhline(limit, color="k", ls=":", lw=1,
                       label=f"C_used - 1 = {limit}" if which == "logits_used" else f"d_model = {limit}")
            ax.set_xscale("log")
            ax.set_xlabel("training temperature T")
            ax.set_ylabel("numerical rank #{i : s_i > tau s_1}")
            ax.set_title(titles[which] + ": threshold sweep", fontsize=10)
            ax.legend(fontsize=7)
        save(fig, "rank_threshold_sweep.png")

    tasks = [t for t in PROBE_TASKS if _layers(ok, t)]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            names = _layers(ok, task)
            lcmap = plt.get_cmap("cividis")
            for i, n in enumerate(names):
                col = f"probe_{task}_acc_{n}"
                c = lcmap(i / max(1, len(names) - 1))
                ax.plot(ts, tab[col].mean().loc[ts], "o-", color=c, label=n + (" (H_last)" if n == "last" else ""))
                ax.plot(ok.temperature, ok[col], ".", color=c, alpha=0.4)
            ax.plot(ts, tab[f"probe_{task}_chance"].mean().loc[ts], "k:", label="chance (majority class)")
            ax.set_xscale("log")
            ax.set_xlabel("training temperature T")
            ax.set_ylabel("probe accuracy, sympy test half")
            ax.set_title("linear probe on sympy source: " + ("next byte" if task == "next" else
                                                               "next byte's character class"), fontsize=10)
            ax.legend(fontsize=7)
        save(fig, "probe_vs_temperature.png")

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
                            ("auroc_energy_token", "s:", "energy, per token"),
                            ("auroc_msp_short", "o--", "MSP, short windows"),
                            ("auroc_energy_short", "s--", "energy, short windows")):
        if col in ok:
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
    fig, axes = plt.subplots(1, len(mats), figsize=(5.5 * len(mats), 4))
    drawn = False
    for ax, which in zip(axes, mats, strict=True):
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
        ax.set_title(f"{titles[which]}, seed {seed0}", fontsize=9)
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
    fmt = meta.get("format", 1)
    if fmt < STUDY_FORMAT:
        parts += [f"This study is of format {fmt} (before format {STUDY_FORMAT}): its rows lack the restricted "
                  "centred ranks, the threshold sweep, the linear probes and the short-window AUROC, so the report "
                  "leaves them out; run the study again to measure them.", ""]
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
              f"{st['eval_windows']} test windows against {st['eval_windows']} sympy windows"
              + (f", and on {st['short_window']}-byte windows of the same bytes" if "short_window" in st else "")
              + (f"; linear probes on {st['probe_windows']} sympy windows (first half trains, second tests)"
                 if "probe_windows" in st else "") + ". Training: "
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
        eff = effects_table(ok)
        if len(eff) and ok.seed.nunique() >= 2:
            n = ok.groupby("temperature").seed.nunique()
            parts += ["## Effects against T = 1", "",
                      f"Each cell: the mean over seeds of m(T, seed) - m(1, seed), and its 95% Student-t interval "
                      f"({n.min() if n.min() == n.max() else f'{n.min()} to {n.max()}'} seeds per T; "
                      "ablations/stats.py). **Bold**: resolved (the interval excludes 0); otherwise not resolved at "
                      "this scale. Ranks and accuracies are discrete: a difference that is the same in every seed "
                      "has an interval of zero width, and counts as resolved on that agreement alone.", "",
                      _table(eff), ""]
        sw = sweep_table(ok)
        if sw.shape[1] > 1:
            sw["T"] = [f"{t:g}" for t in sw["T"]]
            parts += ["## Threshold sweep (seed means)", "",
                      "Numerical rank #{i : s_i > tau s_1} of the all-256 logits Z and of the restricted centred "
                      f"logits Z_U^c (at most C_used - 1 = {int(ok.byte_classes.max()) - 1}) at each tau:", "",
                      _table(sw), ""]
        for task in PROBE_TASKS:
            if _layers(ok, task):
                pt = probe_table(ok, task)
                pt["T"] = [f"{t:g}" for t in pt["T"]]
                parts += [f"## Linear probe: {PROBE_TASK_NAMES[task]} (seed means)", "",
                          "Test-half accuracy and loss (mean squared error of the one-hot target) of a ridge probe "
                          "on each layer's frozen features of sympy source (h0: the byte embedding; hL: after "
                          "block L; last: H_last):", "", _table(pt), ""]
        ml = matched_loss(ok, traj)
        if len(ml):
            parts += ["## Matched-loss control", "",
                      "Each run with a lower logits rank and a higher final held-out loss than its seed's T = 1 "
                      "run, beside the T = 1 run at the first measured step (log-spaced) where its held-out loss "
                      "was at least as low:", "", _table(ml), ""]
    cols = ["temperature", "seed", "final_train_loss", "bpb_validation", "bpb_ood", "logits_rank", "logits_erank",
            "logits_used_rank", "hidden_rank", "hidden_erank", "auroc_msp", "auroc_energy", "auroc_msp_short",
            "auroc_energy_short", "probe_next_acc_last", "probe_class_acc_last", "logits_rms", "train_wall_s"]
    parts += ["## Runs", "", _table(df[[c for c in cols if c in df]].sort_values(["temperature", "seed"])), ""]
    if plots and len(ok) and ok.temperature.nunique() >= 2 and 1.0 in set(ok.temperature):
        made = _plots(df, traj, out, meta, band)
        parts += ["## Plots", ""] + [f"![{m[:-4]}](plots/{m})" for m in made] + [""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))
    return path


__all__ = ["effect", "effects_table", "findings", "matched_loss", "probe_table", "summary", "sweep_table",
           "write_report"]
