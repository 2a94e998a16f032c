"""`mesa stability --preset quick`: outputs, and what the report must show (on its own data)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from mesa_stability.cli import main
from mesa_stability.stability import report


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stability"))
    assert main(["stability", "--preset", "quick", "--out", out, "--no-progress"]) == 0
    return out, pd.read_csv(os.path.join(out, "results.csv"))


def test_quick_preset_writes_csv_report_and_plots(quick):
    out, df = quick
    for name in ("results.csv", "reference_check.csv", "report.md", "plots/error_vs_kappa.png",
                 "plots/error_vs_length.png", "plots/error_vs_steps.png", "plots/error_vs_tol.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    # one row per (solver, policy, case, size, setting), nothing missing, nothing twice
    preset = report.get_preset("quick")
    expected = sum(len(preset.sizes[c]) for c in preset.sizes) * len(preset.policies) * sum(
        len(v) for v in preset.settings.values())
    assert len(df) == expected
    assert not df.duplicated(list(report.KEY)).any()
    text = open(os.path.join(out, "report.md")).read()
    assert "Reference check" in text and "error_vs_length.png" in text


def test_exact_reference_agrees_with_mpmath_on_every_case(quick):
    out, _ = quick
    ref = pd.read_csv(os.path.join(out, "reference_check.csv"))
    assert set(ref.case) == set(report.cases.CASES)
    assert (ref.exact_vs_mp_x <= 1e-12).all() and (ref.exact_vs_mp_o <= 1e-12).all()


def test_sherman_morrison_loses_to_cg_under_strong_forgetting(quick):
    _, df = quick
    t = report.sm_vs_cg(df, "strong_forgetting", "fp32")
    assert len(t) >= 3
    assert (t.ratio >= 100).all(), t
    # SM's error grows with length (up to overflow, which counts as infinite error) ...
    assert t.sm_err.is_monotonic_increasing and t.sm_err.iloc[-1] > t.sm_err.iloc[0], t
    # ... while converged CG's stays flat (within a factor of 10 over a 64x longer sequence)
    assert t.cg_err.max() <= 10 * t.cg_err.min(), t


def test_cg_floor_follows_unit_roundoff(quick):
    _, df = quick
    f = report.cg_floors(df).set_index("policy")
    assert f.loc["fp64", "floor"] < 1e-6 * f.loc["fp32", "floor"]
    assert f.loc["fp32", "floor"] < 1e-3 * f.loc["bf16-fp32state", "floor"]
    # the floor is within kappa * u times a modest growth factor, and not far below u either
    assert (f.floor <= 10 * f.kappa_max * f.u).all(), f
    assert (f.floor >= 0.01 * f.u).all(), f


def test_stability_ratio_of_iterative_solvers_is_bounded(quick):
    _, df = quick
    s = report.max_stability_ratios(df)
    it = s[s.solver.isin(["cg", "chebyshev"])]
    assert set(it.policy) == set(report.get_preset("quick").policies)
    assert (it.cases == len(report.cases.CASES)).all()
    # O(1) for fp64/fp32/tf32/bf16; fp16 reaches ~70 on small_upstream_grad, whose q ~ 1e-6 lies
    # below fp16's smallest normal number (6.1e-5): subnormal inputs carry fewer significant bits.
    assert (it.max_stability_ratio <= 1e3).all(), it
    # the same ratio exposes Sherman-Morrison (not part of the bound): astronomically unstable
    sm = df[(df.solver == "sherman_morrison") & (df.case == "strong_forgetting")]
    assert (sm.stability_ratio > 1e6).all()


def test_resume_skips_finished_rows_and_redoes_missing_ones(quick, tmp_path):
    out, df = quick
    sub = df[df.case == "varlen"]
    part = sub.iloc[: len(sub) // 2]
    os.makedirs(tmp_path / "r", exist_ok=True)
    part.to_csv(tmp_path / "r" / "results.csv", index=False)
    assert main(["stability", "--preset", "quick", "--out", str(tmp_path / "r"), "--cases", "varlen", "--resume",
                 "--no-progress", "--no-plots"]) == 0
    again = pd.read_csv(tmp_path / "r" / "results.csv")
    assert len(again) == len(sub) and not again.duplicated(list(report.KEY)).any()
    merged = again.merge(sub, on=list(report.KEY), suffixes=("", "_ref"))
    assert (merged.rel_err_x == merged.rel_err_x_ref).all()  # deterministic: same numbers


def test_the_grid_backward_error_is_the_metrics_one():
    """A grid row's backward error (``CaseContext.backward_error``, from the A_t blocks and 2-norms the
    context keeps) equals :func:`stability.metrics.backward_error` token by token, on a case of two
    token blocks (T = 80 > 64) and an inexact solution whose backward error varies per token."""
    from mesa_stability import solvers
    from mesa_stability.stability import metrics

    ctx = report.CaseContext.build("well_conditioned", dict(B=1, T=80, H=2, D=8, Dv=8), seed=0)
    x = solvers.solve(ctx.problem, "cg", steps=3).x
    want = metrics.backward_error(ctx.problem, x)
    assert float(want.min()) > 1e3 * 2.0**-53
    assert torch.allclose(ctx.backward_error(x), want, rtol=1e-12, atol=0)


def test_unknown_names_are_clear_errors(tmp_path, capsys):
    assert main(["stability", "--out", str(tmp_path), "--cases", "nope"]) == 2
    assert "unknown case" in capsys.readouterr().err
    assert main(["stability", "--out", str(tmp_path), "--policies", "fp8"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["stability", "--out", str(tmp_path), "--solvers", "gmres"]) == 2
    assert "unknown solver" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stability", "--preset", "huge"])


def test_every_writer_records_the_provenance(tmp_path):
    """The stability grid, the ablation grid and the softmax study write the device, the versions and
    the commit into every row (stability.provenance); the reports say them in one line."""
    import pandas as pd

    from mesa_stability.stability.provenance import PROVENANCE_COLUMNS, provenance, provenance_of_table

    prov = provenance("cpu")
    assert set(prov) == set(PROVENANCE_COLUMNS) and prov["torch"] == __import__("torch").__version__
    line = provenance_of_table(pd.DataFrame([prov, {**prov, "commit": "abc"}]))
    assert line.startswith("Provenance: device cpu") and "/ abc" in line
    assert "not recorded" in provenance_of_table(pd.DataFrame([{"x": 1}]))
    from mesa_stability.stability import report

    df = report.run_grid(report.PRESETS["quick"](), str(tmp_path / "st"), cases_sel=["well_conditioned"],
                         solvers_sel=["exact"], policies_sel=["fp64"], progress=False)
    assert set(PROVENANCE_COLUMNS) <= set(df.columns) and (df.commit == prov["commit"]).all()
