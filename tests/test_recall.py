"""The recall study (ablations/recall.py, recall_report.py, stats.py): the task's sequences, the arms,
the evaluation settings against independent computations, the diagnostics' bound against the exact
condition numbers, resuming, merging, the CLI and the report's wording rules."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest
import torch

from mesa_stability.ablations import recall, stats
from mesa_stability.ablations.recall_report import contrasts
from mesa_stability.cli import main
from mesa_stability.solvers import MesaProblem
from mesa_stability.solvers.spec import SolverSpec
from mesa_stability.stability.metrics import condition_numbers


def test_sequences_hold_pairs_filler_and_queries():
    task = recall.RecallTask(seq_len=95, pairs=8, queries=5)
    x, y, mask, pidx = recall.make_batch(task, 3, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == mask.shape == (3, 95) and torch.equal(x[:, 1:], y[:, :-1])
    seq = torch.cat([x, y[:, -1:]], 1)
    for b in range(3):
        trip = seq[b, :24].view(8, 3)
        keys = trip[:, 0] * recall.KEY_SYMBOLS + trip[:, 1]
        assert len(set(keys.tolist())) == 8  # distinct keys
        assert (trip[:, :2] < recall.KEY_SYMBOLS).all() and ((trip[:, 2] >= 64) & (trip[:, 2] < 128)).all()
        assert (seq[b, 24:96 - 15] >= recall.NOISE_BASE).all()  # filler
        assert int(mask[b].sum()) == 5
        for t in mask[b].nonzero().flatten().tolist():
            j = int(pidx[b, t])
            # the two inputs before the target are the queried key, the target its value
            assert x[b, t - 1] == trip[j, 0] and x[b, t] == trip[j, 1] and y[b, t] == trip[j, 2]
        assert len(set(pidx[b][mask[b]].tolist())) == 5  # distinct queried pairs


@pytest.mark.parametrize("kw", [dict(seq_len=20, pairs=4), dict(seq_len=100, pairs=0), dict(seq_len=100, pairs=4,
                                                                                          queries=5)])
def test_bad_tasks_are_errors(kw):
    with pytest.raises(recall.RecallError):
        recall.RecallTask(**kw)


def test_training_batches_are_a_function_of_seed_and_step():
    s1, s2 = recall.RecallSampler(recall.RecallTask(48, 4), 2, 3), recall.RecallSampler(recall.RecallTask(48, 4), 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(s1.batch(7), s2.batch(7), strict=True))
    assert not torch.equal(s1.batch(7)[0], s1.batch(8)[0])


def test_zero_steps_from_q_is_the_gla_readout_of_the_same_model():
    """A Mesa model evaluated with 0 CG steps from x0 = q scores exactly as the same weights with the
    gla method (o_t = G_t q_t), and 0 steps from zero gives q* = 0: the Mesa layer then outputs 0."""
    preset = recall.PRESETS["smoke"]
    torch.manual_seed(0)
    model = recall.build_model(recall.arms("fp32")["mesa-k2"], preset)
    task = preset.eval_tasks[0]
    gla_spec = SolverSpec(method="gla", policy="fp32")
    a, _ = recall.evaluate_recall(model, task, SolverSpec(steps=0, x0="q", policy="fp32"), 4)
    b, _ = recall.evaluate_recall(model, task, gla_spec, 4)
    assert a["accuracy"] == b["accuracy"] and math.isclose(a["bits_per_answer"], b["bits_per_answer"], rel_tol=1e-5)
    assert model.solver.steps == 2  # restored after the evaluation
    labels = [lab for lab, _ in recall.eval_specs(recall.arms()["mesa-k2"], preset)]
    assert labels[0] == "trained" and "steps=0,x0=q" in labels and "tol=0.01" in labels


def test_the_condition_bound_is_above_the_exact_condition_numbers():
    preset = recall.PRESETS["smoke"]
    torch.manual_seed(1)
    model = recall.build_model(recall.arms("fp32")["mesa-k2"], preset)
    task = recall.RecallTask(48, 4)
    _, rows = recall.evaluate_recall(model, task, None, 2, batch_size=2, diagnostics=True)
    diag = pd.DataFrame(rows)
    assert set(diag["layer"]) == {0, 1} and set(diag["head"]) == {0, 1}
    assert sorted(set(zip(diag.pos_lo, diag.pos_hi, strict=True))) == recall.position_buckets(48)
    x = recall.eval_batches(task, 2)[0]
    inputs = {}
    hook = model.blocks[0].mixer.register_forward_pre_hook(lambda m, a: inputs.setdefault("u", a[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    layer = model.blocks[0].mixer
    q, k, v, g, beta, _, _ = layer._inputs(inputs["u"], None)
    kappa = condition_numbers(MesaProblem(*(t.double() for t in (q, k, v, g, beta, layer.lam.detach()))))
    d0 = diag[diag.layer == 0]
    for (lo, hi), _ in d0.groupby(["pos_lo", "pos_hi"]):
        true_max = kappa[:, lo:hi].amax(dim=(0, 1))  # per head
        bound = torch.tensor(d0[(d0.pos_lo == lo)].sort_values("head").kappa_bound_max.values, dtype=torch.float64)
        assert (bound >= true_max * (1 - 1e-5)).all(), (lo, bound, true_max)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("recall") / "smoke")
    assert main(["recall", "--preset", "smoke", "--out", out, "--no-progress"]) == 0
    return out


def test_the_study_writes_every_run_and_setting(smoke_out):
    df = pd.read_csv(os.path.join(smoke_out, "results.csv"))
    preset = recall.PRESETS["smoke"]
    assert set(df.arm) == set(preset.arms)
    for arm in preset.arms:
        n_settings = len(recall.eval_specs(recall.arms()[arm], preset))
        assert len(df[df.arm == arm]) == n_settings * len(preset.eval_tasks)
    assert df.accuracy.between(0, 1).all() and (df.answers > 0).all()
    assert {"device", "torch", "commit"} <= set(df.columns)
    diag = pd.read_csv(os.path.join(smoke_out, "diagnostics.csv"))
    assert set(diag.arm) == {"mesa-k2", "gla"}  # the Mesa-layer arms
    assert (diag[diag.arm == "mesa-k2"].steps_mean == 2).all()
    report = open(os.path.join(smoke_out, "report.md")).read()
    assert "one seed: no interval" in report and "resolved" not in report.replace("not resolved", "")
    for png in ("accuracy_vs_length.png", "accuracy_vs_eval_steps.png", "kappa_along_positions.png"):
        assert os.path.getsize(os.path.join(smoke_out, "plots", png)) > 0


def test_a_second_run_needs_resume_and_resume_skips_finished_runs(smoke_out, capsys):
    assert main(["recall", "--preset", "smoke", "--out", smoke_out, "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    before = os.path.getmtime(os.path.join(smoke_out, "evals", "gla_s0.csv"))
    assert main(["recall", "--preset", "smoke", "--out", smoke_out, "--resume", "--no-progress"]) == 0
    assert os.path.getmtime(os.path.join(smoke_out, "evals", "gla_s0.csv")) == before


def test_parts_trained_and_evaluated_apart_merge(tmp_path, smoke_out):
    part = str(tmp_path / "seed1")
    args = ["recall", "--preset", "smoke", "--arms", "gla", "--seeds", "1", "--no-progress", "--out", part]
    assert main(args + ["--only-train"]) == 0
    assert os.path.exists(os.path.join(part, "runs", "gla_s1.pt")) and not os.listdir(os.path.join(part, "evals"))
    assert main(args + ["--resume"]) == 0  # evaluates from the checkpoint
    merged = str(tmp_path / "merged")
    assert main(["recall", "--merge", smoke_out, part, "--out", merged]) == 0
    df = pd.read_csv(os.path.join(merged, "results.csv"))
    assert set(zip(df.arm, df.seed, strict=True)) >= {("gla", 0), ("gla", 1), ("attention", 0)}
    assert main(["recall", "--merge", part, part + "_missing", "--out", merged]) == 2


def test_contrasts_are_paired_by_seed_and_worded_by_their_interval():
    rows = []
    for seed, (base, up, same) in enumerate([(0.20, 0.50, 0.21), (0.30, 0.62, 0.29), (0.25, 0.55, 0.27)]):
        for arm, acc in (("gla", base), ("mesa-k30", up), ("mesa-k1", same)):
            rows.append(dict(arm=arm, seed=seed, T=64, accuracy=acc, **{"eval": "trained"}))
    out = {r[0]: r for r in contrasts(pd.DataFrame(rows), "gla")}
    m, lo, hi, n = stats.mean_ci([0.50 - 0.20, 0.62 - 0.30, 0.55 - 0.25])  # the per-seed differences
    assert out["mesa-k30"][2:6] == pytest.approx((m, lo, hi, n), rel=1e-12)
    assert out["mesa-k30"][6] == "resolved: positive"
    assert out["mesa-k1"][6] == "not resolved at this scale"


def test_t_quantiles_match_the_closed_forms():
    p = 0.975
    assert math.isclose(stats.t_quantile(p, 1), math.tan(math.pi * (p - 0.5)), rel_tol=1e-9)  # Cauchy
    a = 2 * p - 1
    assert math.isclose(stats.t_quantile(p, 2), a * math.sqrt(2 / (1 - a * a)), rel_tol=1e-9)
    assert stats.mean_ci([1.0])[1:] == (pytest.approx(math.nan, nan_ok=True),) * 2 + (1,)
