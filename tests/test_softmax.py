"""The softmax temperature study (ablations/softmax.py, softmax_report.py): the temperature in the
loss and the evaluation, the measurements against independent computations, resuming, merging, the
CLI and the report's rules."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from mesa_stability.ablations import data, softmax
from mesa_stability.ablations.model import MesaLM, loss_per_token
from mesa_stability.ablations.probe import char_class, ridge_probe
from mesa_stability.ablations.softmax_report import effect, findings, matched_loss, write_report
from mesa_stability.ablations.spectra import SWEEP_THRESHOLDS, max_softmax_probability, numerical_rank
from mesa_stability.ablations.stats import mean_ci
from mesa_stability.ablations.train import TrainConfig, evaluate, train
from mesa_stability.cli import main


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(max_bytes=60_000)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("softmax") / "smoke")
    study = softmax.load_study("smoke")
    df = softmax.run_study(study, out, progress=False, log=lambda *_: None)
    return study, out, df


@pytest.mark.parametrize("t", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive_and_finite(t):
    with pytest.raises(ValueError, match="temperature"):
        TrainConfig(temperature=t)
    with pytest.raises(softmax.StudyError, match="temperatures"):
        softmax.Study(temperatures=(1.0, t))


def test_loss_is_cross_entropy_of_logits_over_t():
    torch.manual_seed(0)
    z, y = torch.randn(3, 5, 256, dtype=torch.float64) * 4, torch.randint(0, 256, (3, 5))
    for t in (0.1, 1.0, 30.0):
        ref = -torch.log_softmax(z / t, -1).gather(-1, y[..., None])[..., 0]
        assert torch.allclose(loss_per_token(z, y, t), ref, rtol=1e-12, atol=0)


def test_training_and_evaluation_use_the_temperature(corpus, tmp_path):
    t = 10.0
    cfg = TrainConfig(steps=2, batch_size=2, warmup=1, temperature=t)
    torch.manual_seed(0)
    model = MesaLM("tiny")
    x, y = data.WindowSampler(corpus["train"], model.size.seq_len, 2, cfg.seed).batch(0)
    with torch.no_grad():
        first = float(loss_per_token(model(x), y, t).mean())
    ck = str(tmp_path / "m.pt")
    res = train(model, corpus["train"], cfg, ckpt_path=ck)
    assert res.losses[0] == pytest.approx(first, rel=1e-6)
    # the checkpoint remembers T: continuing it at another temperature is refused
    with pytest.raises(ValueError, match="temperature"):
        train(MesaLM("tiny"), corpus["train"], TrainConfig(steps=3, batch_size=2, warmup=1, temperature=1.0),
              ckpt_path=ck)
    ex, ey = data.eval_windows(corpus["validation"], model.size.seq_len, 2)
    with torch.no_grad():
        ref = float(loss_per_token(model(ex), ey, t).double().mean()) / math.log(2)
    got = evaluate(model, corpus["validation"], model.solver, max_windows=2, temperature=t)["bits_per_byte"]
    assert got == pytest.approx(ref, rel=1e-6)


def test_rank_metrics_match_numpy_on_the_models_own_matrices(corpus):
    study = softmax.load_study("smoke")
    torch.manual_seed(1)
    model = MesaLM("tiny")
    x, y = data.eval_windows(corpus["validation"], model.size.seq_len, 2)
    with torch.no_grad():
        assert torch.allclose(model.unembed(model.hidden(x)), model(x))
    # make the logits low-rank on purpose: a rank-3 embedding
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(model.embed.weight, full_matrices=False)
        model.embed.weight.copy_(u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    m, sv = softmax.rank_metrics(model, x, y, study, temperature=3.0)
    with torch.no_grad():
        h = model.hidden(x).reshape(-1, 64).double()
    z = (h @ model.embed.weight.detach().double().t()).numpy()
    assert m["logits_rank"] == np.linalg.matrix_rank(z, tol=1e-3 * np.linalg.norm(z, 2)) == 3
    assert m["hidden_rank"] == np.linalg.matrix_rank(h.numpy(), tol=1e-3 * np.linalg.norm(h.numpy(), 2))
    assert 1 <= m["logits_erank"] <= 3 and m["logits_rank"] <= m["hidden_rank"] <= 64
    ce = -torch.log_softmax(torch.from_numpy(z) / 3.0, -1).gather(-1, y.reshape(-1, 1)).mean()
    assert m["rows_loss"] == pytest.approx(float(ce), rel=1e-10)
    assert sv["logits"].dtype == torch.float64 and sv["logits"].numel() == 256
    # restricted to the classes among the targets and row-centred, against numpy's rank of the same matrix
    used = np.unique(y.numpy())
    zc = z[:, used] - z[:, used].mean(1, keepdims=True)
    top = np.linalg.norm(zc, 2)
    assert m["logits_used_rank"] == np.linalg.matrix_rank(zc, tol=1e-3 * top) <= min(3, used.size - 1)
    assert m["logits_used_rank_ratio"] == m["logits_used_rank"] / (used.size - 1)
    for tau in SWEEP_THRESHOLDS:
        assert m[softmax.sweep_column("logits", tau)] == np.linalg.matrix_rank(z, tol=tau * np.linalg.norm(z, 2))
        assert m[softmax.sweep_column("logits_used", tau)] == np.linalg.matrix_rank(zc, tol=tau * top)
    assert sv["logits_used"].numel() == used.size


def test_residual_streams_end_in_the_hidden_representations(corpus):
    torch.manual_seed(2)
    model = MesaLM("tiny")
    x, _ = data.eval_windows(corpus["validation"], 32, 2)
    with torch.no_grad():
        hs = model.residual_streams(x)
        assert len(hs) == model.size.n_layers + 2 and len(softmax.layer_names(model.size.n_layers)) == len(hs)
        torch.testing.assert_close(hs[0], model.embed(x))
        torch.testing.assert_close(hs[-1], model.hidden(x), rtol=0, atol=0)
        torch.testing.assert_close(hs[-1], model.norm(hs[-2]), rtol=0, atol=0)


def test_probe_metrics_columns_on_a_tiny_model(corpus):
    study = softmax.load_study("smoke")
    torch.manual_seed(3)
    model = MesaLM("tiny")
    row = softmax.probe_metrics(model, corpus["ood"], study)
    n = study.probe_windows * model.size.seq_len
    assert row["probe_rows_train"] == row["probe_rows_test"] == n // 2
    for task in softmax.PROBE_TASKS:
        for name in softmax.layer_names(model.size.n_layers):
            assert 0 <= row[f"probe_{task}_acc_{name}"] <= 1 and row[f"probe_{task}_loss_{name}"] >= 0
        assert 0 < row[f"probe_{task}_chance"] <= 1
    # the same probe on features taken directly from the model, in float64 from the start
    x, y = data.eval_windows(corpus["ood"], model.size.seq_len, study.probe_windows)
    with torch.no_grad():
        feats = model.residual_streams(x)
    for name, f in zip(softmax.layer_names(model.size.n_layers), feats, strict=True):
        r = ridge_probe(f.reshape(-1, 64).double(), char_class(y.reshape(-1)), n // 2, 5)
        assert row[f"probe_class_acc_{name}"] == pytest.approx(r.accuracy, abs=2 / n)  # float32 vs float64 ties


def _brute_auroc(pos, neg) -> float:
    p, q = pos[:, None], neg[None, :]
    return float(((p > q).double() + 0.5 * (p == q).double()).mean())


def test_short_window_auroc_on_a_tiny_model(corpus):
    study = softmax.load_study("smoke", short_window=64)
    torch.manual_seed(4)
    model = MesaLM("tiny")
    t = 3.0
    got = softmax.short_window_auroc(model, corpus, study, t)
    n = study.eval_windows * model.size.seq_len // 64
    assert got["short_window"] == 64 and got["short_windows"] == n
    # independently: each 64-byte window through the model on its own, mean MSP per window, all pairs
    means = {}
    for split in ("test", "ood"):
        x = corpus[split][: n * 64 + 1]
        w = torch.stack([x[i * 64:(i + 1) * 64] for i in range(n)]).long()
        with torch.no_grad():
            means[split] = max_softmax_probability(model(w).double(), t).mean(1)
    assert got["auroc_msp_short"] == pytest.approx(_brute_auroc(means["test"], means["ood"]), abs=1e-12)
    assert 0 <= got["auroc_energy_short"] <= 1
    with pytest.raises(softmax.StudyError, match="short_window"):
        softmax.load_study("smoke", short_window=129)
    with pytest.raises(softmax.StudyError, match="probe_windows"):
        softmax.load_study("smoke", probe_windows=1)


def test_snapshot_steps():
    assert softmax.snapshot_steps(1) == [1]
    s = softmax.snapshot_steps(300)
    assert s[0] == 1 and s[-1] == 300 and s == sorted(set(s)) and len(s) <= softmax.TRAJECTORY_POINTS
    assert all(b / a < 2.5 for a, b in zip(s[3:], s[4:], strict=False))  # log-spaced


@pytest.mark.parametrize("kw, msg", [({"size": "huge"}, "size"), ({"temperatures": (1.0, 1.0)}, "repeat"),
                                     ({"seeds": (-1,)}, "seeds"), ({"rank_threshold": 1.0}, "rank_threshold"),
                                     ({"loss_band": 0.0}, "loss_band"), ({"train_steps": 0}, "steps")])
def test_bad_study_settings_say_what_is_wrong(kw, msg):
    with pytest.raises(softmax.StudyError, match=msg):
        softmax.Study(**kw)


def test_presets_and_overrides():
    for name in softmax.PRESETS:
        softmax.load_study(name)
    cpu = softmax.load_study("cpu")
    assert cpu.temperatures == softmax.TEMPERATURES and len(cpu.seeds) >= 2 and cpu.size == "tiny"
    assert softmax.load_study("cpu", seeds=[3], train_steps=None).seeds == (3,)
    with pytest.raises(softmax.StudyError, match="unknown preset"):
        softmax.load_study("nope")


def test_smoke_study_rows_and_files(smoke_study):
    study, out, df = smoke_study
    assert sorted(zip(df.temperature, df.seed, strict=True)) == [(t, 0) for t in study.temperatures]
    assert not df.diverged.any() and (df.steps_done == study.train_steps).all()
    for col in ("bpb_validation", "bpb_test", "bpb_ood", "auroc_msp", "auroc_energy", "logits_rank", "hidden_rank",
                "logits_used_rank", "logits_used_rank_ratio", "auroc_msp_short", "auroc_energy_short",
                "probe_next_acc_last", "probe_class_acc_h0", *(softmax.sweep_column(w, t) for t in SWEEP_THRESHOLDS
                                                               for w in ("logits", "logits_used"))):
        assert df[col].notna().all(), col
    assert (df.logits_used_rank <= df.byte_classes - 1).all()
    assert ((df.auroc_msp >= 0) & (df.auroc_msp <= 1)).all()
    assert (df.logits_rank <= df.hidden_rank).all() and (df.hidden_rank <= 64).all()
    for t in study.temperatures:
        name = softmax.run_name(t, 0)
        sv = pd.read_csv(os.path.join(out, "spectra", name + ".csv"))
        row = df[df.temperature == t].iloc[0]
        logits_sv = torch.tensor(sv[sv.matrix == "logits"].singular_value.to_numpy())
        assert numerical_rank(logits_sv, 1e-3) == row.logits_rank
        used_sv = torch.tensor(sv[sv.matrix == "logits_used"].singular_value.to_numpy())
        assert numerical_rank(used_sv, 1e-3) == row.logits_used_rank
        traj = pd.read_csv(os.path.join(out, "trajectory", name + ".csv"))
        assert list(traj.step) == softmax.snapshot_steps(study.train_steps)
        assert traj.rows_loss.iloc[-1] == pytest.approx(row.rows_loss, rel=1e-9)
        assert len(pd.read_csv(os.path.join(out, "curves", name + ".csv"))) == study.train_steps
    meta = json.load(open(os.path.join(out, "study.json")))
    assert meta["temperatures"] == sorted(study.temperatures) and meta["settings"] == json.loads(
        json.dumps(study.settings()))
    assert meta["format"] == softmax.STUDY_FORMAT


def _as_format_1(src: str, dst: str) -> None:
    """A copy of a study folder as an earlier version wrote it: no format in study.json, no new settings
    or columns."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plots", "report.md", ".mesa-lock"))
    meta = json.load(open(os.path.join(dst, "study.json")))
    del meta["format"]
    for k in ("probe_windows", "short_window"):
        del meta["settings"][k]
    json.dump(meta, open(os.path.join(dst, "study.json"), "w"))
    df = pd.read_csv(os.path.join(dst, "results.csv"))
    new = [c for c in df.columns if c.startswith(("logits_used", "probe_", "auroc_msp_short", "auroc_energy_short",
                                                  "short_window")) or "_rank_at_" in c]
    df.drop(columns=new).to_csv(os.path.join(dst, "results.csv"), index=False)


def test_a_study_of_the_earlier_format_is_refused_for_resume_and_merge_but_reported(smoke_study, tmp_path):
    _, out, _ = smoke_study
    old = str(tmp_path / "old")
    _as_format_1(out, old)
    with pytest.raises(softmax.StudyError, match="format 1.*run the study again"):
        softmax.run_study(softmax.load_study("smoke"), old, resume=True, progress=False, log=lambda *_: None)
    with pytest.raises(softmax.StudyError, match="format 1.*run the study again"):
        softmax.merge_studies([out, old], str(tmp_path / "merged"))
    text = open(write_report(old, plots=True)).read()
    assert "This study is of format 1" in text and "## Findings (computed)" in text
    assert "Threshold sweep" not in text and "Linear probe" not in text
    assert not os.path.exists(os.path.join(old, "plots", "probe_vs_temperature.png"))


def test_resume_runs_only_what_is_missing_and_refuses_other_settings(smoke_study, tmp_path):
    study, _, full = smoke_study
    out = str(tmp_path / "s")
    first = softmax.load_study("smoke", temperatures=(1.0,))
    softmax.run_study(first, out, progress=False, log=lambda *_: None)
    with pytest.raises(softmax.StudyError, match="--resume"):
        softmax.run_study(study, out, progress=False, log=lambda *_: None)
    with pytest.raises(softmax.StudyError, match="train_steps"):
        softmax.run_study(softmax.load_study("smoke", train_steps=9), out, resume=True, progress=False)
    msgs = []
    df = softmax.run_study(study, out, resume=True, progress=False, log=msgs.append)
    assert "1 of 2" in msgs[0]
    # the same seeds and data give the same rows as the uninterrupted study
    a = df.sort_values("temperature").reset_index(drop=True)
    b = full.sort_values("temperature").reset_index(drop=True)
    for col in ("final_train_loss", "bpb_validation", "logits_rank", "hidden_erank", "auroc_msp"):
        assert np.allclose(a[col].astype(float), b[col].astype(float), rtol=1e-5), col


def test_trajectory_keeps_one_row_per_step(corpus, tmp_path):
    study = softmax.load_study("smoke")
    torch.manual_seed(0)
    model = MesaLM("tiny")
    path = str(tmp_path / "t.csv")
    tr = softmax.Trajectory(model, corpus, study, 1.0, path)
    tr(1, 5.0)
    tr(6, 5.0)  # not a snapshot step of 8 steps
    tr(1, 4.0)  # a resumed run measures step 1 again
    t = pd.read_csv(path)
    assert list(t.step) == [1] and t.train_loss.iloc[0] == 4.0


def test_merge_and_cli(smoke_study, tmp_path, capsys):
    study, out, df = smoke_study
    part = str(tmp_path / "seed1")
    assert main(["softmax", "--preset", "smoke", "--temperatures", "1", "--seeds", "1", "--out", part,
                 "--no-progress", "--no-plots"]) == 0
    merged = str(tmp_path / "merged")
    assert main(["softmax", "--merge", out, part, "--out", merged, "--no-plots"]) == 0
    m = pd.read_csv(os.path.join(merged, "results.csv"))
    assert sorted(zip(m.temperature, m.seed, strict=True)) == [(1.0, 0), (1.0, 1), (10.0, 0)]
    assert json.load(open(os.path.join(merged, "study.json")))["seeds"] == [0, 1]
    assert os.path.exists(os.path.join(merged, "trajectory", "T1_seed1.csv"))
    other = str(tmp_path / "other")
    assert main(["softmax", "--preset", "smoke", "--temperatures", "1", "--train-steps", "4", "--out", other,
                 "--no-progress", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["softmax", "--merge", out, other, "--out", str(tmp_path / "bad")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["softmax", "--preset", "smoke", "--temperatures", "0", "--out", str(tmp_path / "x")]) == 2
    assert "temperatures" in capsys.readouterr().err
    assert main(["softmax", "--merge", out]) == 2


def _fake(ranks: dict, losses: dict, seeds=(0,)) -> pd.DataFrame:
    rows = []
    for s in seeds:
        for t, r in ranks.items():
            rows.append({"temperature": t, "seed": s, "diverged": False, "final_train_loss": losses[t],
                         "rows_loss": losses[t], "bpb_validation": 1.0, "bpb_test": 1.0, "bpb_ood": 2.0 + t / 100,
                         "logits_rank": r, "logits_erank": r / 2, "hidden_rank": 64, "hidden_erank": 30.0,
                         "auroc_msp": 0.5 + t / 300, "auroc_energy": 0.5 + t / 400, "auroc_msp_token": 0.5 + t / 500,
                         "auroc_energy_token": 0.5 + t / 600, "logits_rms": 1.0,
                         "byte_classes": 80})
    return pd.DataFrame(rows)


def test_findings_rules_on_constructed_tables():
    ranks = {1.0: 60, 3.0: 40, 10.0: 30, 100.0: 10}
    same = {t: 1.5 for t in ranks}
    text = "\n".join(findings(_fake(ranks, same), pd.DataFrame(), 0.15))
    assert "Rank deficit: reproduced" in text and "every T trained to parity" in text
    assert "OOD proxies: the paper's direction" in text
    assert "Detection improves" in text and "Generalisation worsens" in text
    # a rank at T = 100 above a third of T = 1's is not a reproduction; a loss outside the band is named
    text = "\n".join(findings(_fake({1.0: 60, 10.0: 50, 100.0: 25}, {1.0: 1.5, 10.0: 1.6, 100.0: 3.0}),
                              pd.DataFrame(), 0.15))
    assert "Rank deficit: not reproduced" in text and "failed to train to parity at T = 100 (L = 3.000)" in text
    assert "fewer than 3 temperatures within the parity band" in text


def _fake_new(probe: dict, seeds=(0, 1)) -> pd.DataFrame:
    """A two-seed table with today's columns; ``probe[t]`` = (seed-0 accuracy, seed-1 accuracy) of every probe."""
    ranks = {1.0: 60, 3.0: 40, 10.0: 30, 100.0: 10}
    df = _fake(ranks, {1.0: 1.5, 3.0: 1.6, 10.0: 3.0, 100.0: 4.0}, seeds)  # T = 10, 100 outside the band
    df["rank_threshold"], df["size"] = 1e-3, "tiny"
    df["logits_used_rank"] = [min(79, r) for r in df.logits_rank]
    df["logits_used_rank_ratio"] = df.logits_used_rank / 79
    for tau in SWEEP_THRESHOLDS:
        for w in ("logits", "logits_used"):
            df[softmax.sweep_column(w, tau)] = df[f"{w}_rank"] + (df.seed if tau == 1e-4 else 0)
    df["short_window"], df["short_windows"] = 64, 16
    df["auroc_msp_short"] = df.auroc_msp
    df["auroc_energy_short"] = df.auroc_energy + 0.01 * df.seed
    df["probe_rows_train"] = 100
    for task in softmax.PROBE_TASKS:
        df[f"probe_{task}_chance"] = 0.2
        for name in ("h0", "h1", "last"):
            df[f"probe_{task}_acc_{name}"] = [probe[t][s] for t, s in zip(df.temperature, df.seed, strict=True)]
            df[f"probe_{task}_loss_{name}"] = 1 - df[f"probe_{task}_acc_{name}"]
    return df


def test_effects_are_paired_by_seed_with_t_intervals():
    df = _fake_new({1.0: (0.5, 0.6), 3.0: (0.7, 0.9), 10.0: (0.5, 0.6), 100.0: (0.4, 0.6)})
    m, lo, hi, n = effect(df, "probe_next_acc_last", 3.0)
    assert (m, lo, hi, n) == pytest.approx(mean_ci([0.2, 0.3]))
    assert effect(df, "probe_next_acc_last", 10.0)[:2] == pytest.approx((0.0, 0.0))


def test_findings_with_seeds_and_the_new_measurements():
    # probe accuracy higher at T = 3 in both seeds by different amounts: resolved positive in every
    # (task, layer), against the paper
    text = "\n".join(findings(_fake_new({1.0: (0.5, 0.6), 3.0: (0.7, 0.81), 10.0: (0.5, 0.6), 100.0: (0.4, 0.6)}),
                               pd.DataFrame(), 0.15))
    assert "Representation transfer (the paper: representations transfer worse as T grows): contradicted" in text
    assert "6 resolved higher, 0 resolved lower" in text
    assert "Rank among the classes that occur" in text and "Threshold dependence" in text
    assert "OOD detection on 64-byte windows" in text and "Inside the band: T = 1, 3." in text
    assert "docs/design.md states no tolerance of the paper" in text
    # the rank difference is the same in both seeds (a zero-width interval) and resolved
    assert "Rank deficit: reproduced" in text
    # higher in one seed and lower in the other: not resolved
    text = "\n".join(findings(_fake_new({1.0: (0.5, 0.6), 3.0: (0.7, 0.4), 10.0: (0.5, 0.6), 100.0: (0.4, 0.6)}),
                               pd.DataFrame(), 0.15))
    assert "transfer worse as T grows): not resolved at this scale" in text
    # lower in both seeds: supported
    text = "\n".join(findings(_fake_new({1.0: (0.5, 0.6), 3.0: (0.3, 0.39), 10.0: (0.5, 0.6), 100.0: (0.4, 0.6)}),
                               pd.DataFrame(), 0.15))
    assert "transfer worse as T grows): supported" in text


def test_matched_loss_picks_the_first_step_at_least_as_good():
    df = _fake({1.0: 60, 100.0: 6}, {1.0: 1.4, 100.0: 4.7})
    traj = pd.DataFrame({"temperature": 1.0, "seed": 0, "step": [1, 10, 20, 300], "rows_loss": [5.5, 4.8, 4.2, 1.4],
                         "logits_rank": [64, 62, 58, 60], "hidden_rank": [64, 64, 63, 64]})
    ml = matched_loss(df, traj)
    assert len(ml) == 1 and ml["T=1 step"].iloc[0] == 20 and ml["T=1 logits rank"].iloc[0] == 58


def test_report_is_written(smoke_study):
    _, out, _ = smoke_study
    path = write_report(out, plots=True)
    text = open(path).read()
    assert "## Findings (computed)" in text and "## Runs" in text
    assert "## Threshold sweep" in text and "## Linear probe: next byte" in text and "64-byte windows" in text
    for png in ("rank_vs_temperature", "bpb_vs_temperature", "auroc_vs_temperature", "train_loss_vs_temperature",
                "rank_vs_loss", "spectra", "rank_threshold_sweep", "probe_vs_temperature"):
        assert os.path.exists(os.path.join(out, "plots", png + ".png")), png
