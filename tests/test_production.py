"""The production grid (stability.production, production_report, the CLI presets) at CPU sizes, and the
adapter of the earlier kernels (benchmarks/before_adapter.py)."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pandas as pd
import pytest
import torch

from mesa_stability import kernels, solvers
from mesa_stability.cli import main
from mesa_stability.solvers.certificate import CertificateWarning
from mesa_stability.stability import production, production_report
from mesa_stability.stability.production import Grid, ProductionCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ["fp32", "bf16-fp32state"]
TORCH = {"backend": "torch"}
CASES = [ProductionCase("low_rank_gamma1", 64, 8, 1, 2), ProductionCase("varlen", 128, 16, 1, 2)]
ONE = ["--families", "low_rank_gamma1", "--T", "64", "--D", "8"]  # one case of the smoke grid


def tiny_grid(cases=CASES) -> Grid:
    return Grid("test", list(cases), backward_max_T=128, reference_T0=16, reference_dims=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reference_cache"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache):
    out = str(tmp_path_factory.mktemp("production"))
    df = production.run(tiny_grid(), out, policies=POLICIES, extra=TORCH, cache_dir=cache, progress=False)
    return out, df


# --- fake ops -------------------------------------------------------------------------------------------------

def off_by_10pct(q, k, v, g, beta, lam, *, policy=None, steps=30, tol=None, backend="torch", cu_seqlens=None,
                 initial_state=None):
    """Our op's output times 1.1; no check, no stats: it never warns."""
    return 1.1 * kernels.mesa_chunk(q, k, v, g, beta, lam, policy=policy, steps=steps, tol=tol, backend=backend,
                                    cu_seqlens=cu_seqlens, initial_state=initial_state, check=None)


def off_by_10pct_warns(q, k, v, g, beta, lam, *, policy=None, steps=30, tol=None, backend="torch", cu_seqlens=None,
                       initial_state=None):
    """The same, but it says so."""
    warnings.warn("accuracy certificate of x: made up for the test", CertificateWarning, stacklevel=2)
    return off_by_10pct(q, k, v, g, beta, lam, policy=policy, steps=steps, tol=tol, backend=backend,
                        cu_seqlens=cu_seqlens, initial_state=initial_state)


def nan_output(q, k, v, g, beta, lam, **kw):
    """A finite-looking call that returns NaN, silently."""
    return torch.full(v.shape, float("nan"), dtype=torch.float32)


@pytest.fixture
def fake_ops(monkeypatch):
    mod = types.ModuleType("_production_fake_ops")
    mod.off_by_10pct, mod.off_by_10pct_warns, mod.nan_output = off_by_10pct, off_by_10pct_warns, nan_output
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


# --- the grid ----------------------------------------------------------------------------------------------------

def test_production_grid_is_the_specified_one():
    grid = production.get_grid("production")
    got = {}
    for c in grid.cases:
        assert (c.B, c.H) == (1, 4)
        got.setdefault((c.family, c.D), set()).add(c.T)
    assert got.pop(("low_rank_gamma1", 64)) == {1024, 4096, 16384, 65536}
    assert got.pop(("low_rank_gamma1", 128)) == {1024, 16384, 65536}
    at_65536 = [k for k, Ts in got.items() if Ts == {65536}]
    assert len(at_65536) == 1 and at_65536[0][1] == 128
    got.pop(at_65536[0])
    assert got == {(f, 64): {4096, 16384} for f in production.FAMILIES if f != "low_rank_gamma1"}
    assert grid.backward_max_T == 16384


def test_cases_are_bf16_inputs_with_fp32_gates_and_the_family_parameters():
    p, e = ProductionCase("low_rank_gamma1", 64, 8, 1, 2).build()
    assert (p.q.dtype, p.k.dtype, p.v.dtype) == (torch.bfloat16,) * 3
    assert (p.g.dtype, p.beta.dtype, p.lam.dtype, e.dtype) == (torch.float32,) * 4
    assert bool((p.g == 0).all()) and bool((p.beta == 1).all()) and bool((p.lam == 0.25).all())
    s = torch.linalg.svdvals(p.k[0, :, 0].double())  # keys of one head: a 2-dim subspace (up to bf16 rounding)
    assert float(s[2] / s[0]) < 1e-2
    p2, e2 = ProductionCase("small_upstream_grad", 64, 8, 1, 2).build()
    assert float(p2.q.abs().max()) < 1e-4 and float(e2.abs().max()) < 1e-4
    p3, _ = ProductionCase("varlen", 128, 8, 1, 2).build()
    assert p3.cu_seqlens.tolist()[0] == 0 and len(p3.cu_seqlens) == 5


def test_budgets_are_capped_at_a_relative_error_of_one():
    assert production.capped((3.0, "8*u*kappa^1")) == (1.0, "8*u*kappa^1, capped at 1")
    assert production.capped((0.5, "x")) == (0.5, "x")


def test_split_policies_balances_compile_cost():
    groups = production.split_policies(list(kernels.mesa.KERNEL_POLICIES), 4)
    assert len(groups) == 4 and sorted(p for g in groups for p in g) == sorted(kernels.mesa.KERNEL_POLICIES)
    assert ["auto"] in [g[:1] for g in groups] and all(len(g) <= 3 for g in groups)
    assert production.split_policies(["fp32"], 4) == [["fp32"]]


def test_verdict_logic():
    assert production.verdict(1e-3, 1e-2, False) == "pass"
    assert production.verdict(1e-1, 1e-2, True) == "flagged"
    assert production.verdict(1e-1, 1e-2, False) == "FAIL"
    assert production.verdict(float("inf"), 1e-2, False) == "FAIL"
    assert production.verdict(float("nan"), 1e-2, True) == "flagged"


# --- the runner ----------------------------------------------------------------------------------------------

def test_runner_writes_a_row_per_case_policy_and_quantity(first_run, cache):
    out, df = first_run
    prod = df[df.kind == "production"]
    assert len(prod) == len(CASES) * len(POLICIES) * len(production.QUANTITIES)
    assert set(prod.quantity) == set(production.QUANTITIES)
    assert (df.verdict == "pass").all(), df[df.verdict != "pass"].to_string()
    assert len(df[df.kind == "reference"]) == 2 * len(CASES)
    assert (df[df.kind == "reference"].measured < 1e-12).all()
    for col in ("device", "torch", "triton", "commit", "kappa", "u", "cert_bound", "max_token_err_x", "mean_steps"):
        assert prod[col].notna().all(), col
    assert (prod.tokens_over_bound == 0).all()
    x = prod[prod.quantity == "x"]
    assert (x.max_token_err_x <= x.cert_bound).all()  # the certificate bounds the measured error
    assert sorted(f for f in os.listdir(cache) if f.endswith(".pt")) == sorted(f"{c.key}.pt" for c in CASES)
    on_disk = production.read_results(os.path.join(out, "results.csv"))  # rows that pass their hash
    assert len(on_disk) == len(df) and list(on_disk.columns) == production.COLUMNS


def test_resume_adds_nothing_and_the_reference_comes_from_the_cache(first_run, cache, monkeypatch):
    out, df = first_run
    csv = os.path.join(out, "results.csv")
    before = open(csv).read()

    def no_op(*a, **kw):
        raise AssertionError("a resumed run must not run the op again")

    monkeypatch.setattr(production, "run_op", no_op)
    again = production.run(tiny_grid(), out, policies=POLICIES, extra=TORCH, cache_dir=cache, resume=True,
                           progress=False)
    assert open(csv).read() == before and len(again) == len(df)
    monkeypatch.undo()

    def no_reference(*a, **kw):
        raise AssertionError("the cached reference must be reused")

    monkeypatch.setattr(production.scale_reference, "reference", no_reference)
    fresh = production.run(tiny_grid(CASES[:1]), out + "-fresh", policies=POLICIES[:1], extra=TORCH, cache_dir=cache,
                           reference_check=False, progress=False)
    assert (fresh.verdict == "pass").all()


def _fake(impl, cache, tmp_path):
    return production.run(tiny_grid(CASES[:1]), str(tmp_path), policies=["fp32"], impl=impl, extra=TORCH,
                          cache_dir=cache, reference_check=False, progress=False)


def test_an_output_off_by_10_percent_that_never_warns_fails(fake_ops, cache, tmp_path):
    df = _fake(f"{fake_ops}:off_by_10pct", cache, tmp_path).set_index("quantity")
    assert df.loc["o", "verdict"] == "FAIL" and 0.09 < df.loc["o", "measured"] < 0.11
    assert df.loc["x", "verdict"] == "n/a"  # the op returns no x
    assert (df.loc[["dq", "dk", "dv", "dbeta", "dlam"], "verdict"] == "FAIL").all()
    assert production.exit_status(df.reset_index()) == 1


def test_the_same_op_with_a_certificate_warning_is_flagged(fake_ops, cache, tmp_path):
    df = _fake(f"{fake_ops}:off_by_10pct_warns", cache, tmp_path).set_index("quantity")
    assert df.loc["o", "verdict"] == "flagged" and df.loc["o", "flagged_by"] == "warning"
    assert (df.loc[["dq", "dk", "dv", "dbeta", "dlam"], "verdict"] == "flagged").all()
    assert production.exit_status(df.reset_index()) == 0


def test_a_silent_non_finite_output_fails(fake_ops, cache, tmp_path):
    df = _fake(f"{fake_ops}:nan_output", cache, tmp_path).set_index("quantity")
    assert df.loc["o", "verdict"] == "FAIL" and df.loc["o", "measured"] == float("inf")
    assert "non-finite" in df.loc["o", "note"]
    assert (df.loc[["dq", "dk"], "verdict"] == "n/a").all()  # no backward


# --- the CLI ---------------------------------------------------------------------------------------------------

def _guard(tmp_path, cache, *extra):
    return main(["guard", "--preset", "production-smoke", *ONE, "--option", "backend=torch", "--out", str(tmp_path),
                 "--cache", cache, "--no-progress", "--no-reference-check", *extra])


def test_guard_exit_codes(fake_ops, cache, tmp_path, capsys):
    assert _guard(tmp_path / "ours", cache, "--policy", "fp32", "bf16-fp32state") == 0
    assert "low_rank_gamma1/D8/T64" in capsys.readouterr().out
    assert _guard(tmp_path / "fail", cache, "--policy", "fp32", "--impl", f"{fake_ops}:off_by_10pct") == 1
    assert "silent failure" in capsys.readouterr().err
    assert _guard(tmp_path / "flag", cache, "--policy", "fp32", "--impl", f"{fake_ops}:off_by_10pct_warns") == 0
    for bad, flag in ((["--T", "-5"], "--T"), (["--families", "nope"], "--families"), (["--policy", "fp9"], "--policy"),
                      (["--D", "7"], "--D"), (["--cases", "varlen"], "--cases")):
        assert main(["guard", "--preset", "production-smoke", *bad, "--out", str(tmp_path / "bad")]) == 2
        assert flag in capsys.readouterr().err
    assert main(["guard", "--T", "64"]) == 2  # production flags with the golden preset
    assert main(["stability", "--preset", "quick", "--T", "64"]) == 2


def test_stability_gpu_preset_writes_report_and_plots(cache, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["stability", "--preset", "gpu-smoke", *ONE, "--policies", "fp32", "--option", "backend=torch",
                 "--out", str(out), "--cache", cache, "--no-progress"]) == 0
    text = (out / "report.md").read_text()
    assert "Points below y = x" in text and "## The float64 reference against mpmath" in text
    for png in ("error_vs_T.png", "bound_vs_error.png"):
        assert (out / "plots" / png).stat().st_size > 1000


def test_report_lists_silent_failures_and_points_below_the_line(fake_ops, cache, tmp_path):
    df = _fake(f"{fake_ops}:off_by_10pct", cache, tmp_path)
    fake_x = df[df.quantity == "o"].assign(quantity="x", max_token_err_x=0.5, cert_bound=0.1, tokens_over_bound=3)
    path = production_report.write_report(str(tmp_path), pd.concat([df, fake_x], ignore_index=True))
    text = open(path).read()
    assert "## Silent failures (FAIL)" in text and "None: every error" not in text
    assert "Points below y = x (worst-token error above the largest certified bound): **1**" in text


# --- the earlier kernels ---------------------------------------------------------------------------------------

def test_before_adapter_loads_the_old_op_beside_the_new_packages(monkeypatch, cache, tmp_path):
    monkeypatch.syspath_prepend(ROOT)
    public = {n: m for n, m in sys.modules.items() if n.partition(".")[0] in ("solvers", "kernels")}
    from benchmarks import before_adapter

    old = before_adapter.load(reload=True)
    assert {n: m for n, m in sys.modules.items() if n.partition(".")[0] in ("solvers", "kernels")} == public
    assert all(sys.modules[n] is m for n, m in public.items())
    assert old["kernels.mesa"].__name__ == "_mesa_before.kernels.mesa" and old["kernels.mesa"] is not kernels.mesa
    assert old["solvers.precision"].PrecisionPolicy is not solvers.PrecisionPolicy
    assert "auto" not in old["kernels.mesa"].KERNEL_POLICIES

    from benchmarks.before_adapter import mesa_chunk_before

    p, e = ProductionCase("strong_forgetting", 64, 8, 1, 2).build()
    args = [t.clone() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    o, stats = mesa_chunk_before(*args, policy=solvers.get_policy("auto"), check="warn", check_tol=1e-3,
                                 backend="torch", steps=50, return_stats=True, return_x=True)
    new = kernels.mesa_chunk(*args, policy="bf16x3", backend="torch", steps=50, check=None)
    assert float((o - new).abs().max()) <= 1e-4 * float(new.abs().max())
    assert stats.x is not None and not hasattr(stats, "certificate")
    assert kernels.mesa_chunk.__module__ == "mesa_stability.kernels.mesa"

    df = production.run(tiny_grid(CASES[:1]), str(tmp_path), policies=["fp32"],
                        impl="benchmarks.before_adapter:mesa_chunk_before", extra=TORCH, cache_dir=cache,
                        reference_check=False, progress=False)
    assert df.cert_bound.isna().all() and (df.verdict == "pass").all()


def test_parallel_jobs_give_the_rows_of_one_job(first_run, cache, tmp_path):
    out, df = first_run
    par = production.run(tiny_grid(), str(tmp_path), policies=POLICIES, extra=TORCH, cache_dir=cache,
                         progress=False, jobs=2)
    assert par.attrs["missing"] == 0 and sorted(os.listdir(tmp_path)) == ["results.csv"]
    cols = ["kind", "case", "policy", "quantity"]
    a = df.sort_values(cols).reset_index(drop=True)
    b = par.sort_values(cols).reset_index(drop=True)
    assert a[cols].equals(b[cols])
    assert (a.measured - b.measured).abs().max() == 0  # the same deterministic runs
    assert len(par[par.kind == "reference"]) == 2 * len(CASES)  # the mpmath check made once


@pytest.mark.triton
def test_runner_on_the_triton_kernels(cache, tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    df = production.run(tiny_grid([ProductionCase("low_rank_gamma1", 64, 16, 1, 2)]), str(tmp_path),
                        policies=["fp32", "auto"], device=device, extra={"backend": "triton"},
                        cache_dir=None if device == "cuda" else cache, reference_check=False, progress=False)
    assert (df.verdict == "pass").all(), df[df.verdict != "pass"].to_string()
    assert df.adjoint_bound.notna().all() and df.tier.notna().all()
