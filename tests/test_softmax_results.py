"""The committed CPU-preset run of the softmax temperature study (docs/softmax-cpu, computed by
``mesa softmax --preset cpu``): that it is the current preset's data, internally consistent, and that
the rank deficit effect holds in it (docs/design.md section 9)."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import torch

from mesa_stability.ablations import softmax
from mesa_stability.ablations.softmax_report import write_report
from mesa_stability.ablations.spectra import SWEEP_THRESHOLDS, effective_rank, numerical_rank, spearman

DIR = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "softmax-cpu")


@pytest.fixture(scope="module")
def run():
    df = pd.read_csv(os.path.join(DIR, "results.csv"))
    with open(os.path.join(DIR, "study.json")) as fh:
        meta = json.load(fh)
    return df, meta


def test_data_are_the_current_cpu_preset(run):
    df, meta = run
    preset = softmax.load_study("cpu")
    assert softmax.normalised_settings(meta["settings"]) == json.loads(json.dumps(preset.settings())), \
        "rerun `mesa softmax --preset cpu`"
    assert meta.get("format") == softmax.STUDY_FORMAT, "rerun `mesa softmax --preset cpu`"
    assert meta["temperatures"] == sorted(preset.temperatures) and meta["seeds"] == sorted(preset.seeds)
    assert sorted(zip(df.temperature, df.seed, strict=True)) == sorted(
        (t, s) for t in preset.temperatures for s in preset.seeds)
    assert not df.diverged.any() and (df.steps_done == preset.train_steps).all()


def test_ranks_agree_with_the_stored_spectra(run):
    df, meta = run
    tau = meta["settings"]["rank_threshold"]
    for r in df.itertuples():
        sv = pd.read_csv(os.path.join(DIR, "spectra", softmax.run_name(r.temperature, r.seed) + ".csv"))
        for which in ("logits", "hidden", "logits_used"):
            s = torch.tensor(sv[sv.matrix == which].singular_value.to_numpy())
            assert numerical_rank(s, tau) == getattr(r, f"{which}_rank")
            assert effective_rank(s) == pytest.approx(getattr(r, f"{which}_erank"), rel=1e-9)
            if which != "hidden":
                for t in SWEEP_THRESHOLDS:
                    assert numerical_rank(s, t) == df.loc[r.Index, softmax.sweep_column(which, t)]
        # the restricted centred logits: one column per class that occurs, rank at most C_used - 1
        assert (sv.matrix == "logits_used").sum() == r.byte_classes
        assert r.logits_used_rank <= r.byte_classes - 1
        assert r.logits_used_rank_ratio == pytest.approx(r.logits_used_rank / (r.byte_classes - 1), rel=1e-12)


def test_every_run_has_the_probes_and_the_short_window_auroc(run):
    df, meta = run
    layers = softmax.layer_names(softmax.SIZES[meta["settings"]["size"]].n_layers)
    for task in softmax.PROBE_TASKS:
        for name in layers:
            acc = df[f"probe_{task}_acc_{name}"]
            assert ((acc >= 0) & (acc <= 1)).all() and (df[f"probe_{task}_loss_{name}"] >= 0).all()
    assert (df.short_window == meta["settings"]["short_window"]).all()
    for col in ("auroc_msp_short", "auroc_energy_short"):
        assert ((df[col] >= 0) & (df[col] <= 1)).all()


def test_logits_rank_at_t100_is_at_most_a_third_of_t1_and_below_the_byte_classes(run):
    df, _ = run
    for s, g in df.groupby("seed"):
        r = g.set_index("temperature")
        assert r.loc[100.0, "logits_rank"] <= r.loc[1.0, "logits_rank"] / 3, f"seed {s}"
        assert r.loc[100.0, "logits_rank"] < r.loc[100.0, "byte_classes"], f"seed {s}"


def test_rank_decreases_with_temperature(run):
    df, _ = run
    rho = spearman(df.logits_rank.to_numpy(float), df.temperature.to_numpy(float))
    assert rho < 0
    assert softmax.rank_trend(df)["logits_rank"] == pytest.approx(rho)


def test_loss_parity_or_the_report_names_the_failures(run, tmp_path):
    df, meta = run
    par = softmax.parity(df, meta["settings"]["loss_band"])
    failed = sorted(par[~par.within_band].temperature)
    with open(os.path.join(DIR, "report.md")) as fh:
        report = fh.read()
    if failed:
        assert "failed to train to parity at T = " + ", ".join(f"{t:g}" for t in failed) in report
    else:
        assert "every T trained to parity" in report
    # the committed report is the one the committed data give
    copy = tmp_path / "run"
    shutil.copytree(DIR, copy, ignore=shutil.ignore_patterns("plots"))
    fresh = open(write_report(str(copy), plots=False)).read()
    section = report.split("## Findings (computed)")[1].split("## Runs")[0]
    assert section == fresh.split("## Findings (computed)")[1].split("## Runs")[0]
