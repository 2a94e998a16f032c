"""The regression guard (stability/guard.py, golden.py, budgets.toml): it passes on our implementation
and fails, naming the right quantity, on deliberately broken ones."""

from __future__ import annotations

import json

import pytest
import torch

from mesa_stability.cli import main
from mesa_stability.solvers import SolverSpec
from mesa_stability.stability import golden, guard

pytestmark = pytest.mark.guard

# a fast subset: the well-conditioned case (tight budgets), the tiny-right-hand-side case, and the
# properties that the broken implementations below violate
CASES = ["well_conditioned", "small_upstream_grad"]
PROPS = ["scale_q", "independence", "scale_grad"]


def ours(**extra):
    return guard.resolve(None, SolverSpec(policy="bf16x3", steps=100), "cpu", {"backend": "torch", **extra})


def _fails(df):
    bad = df[df.verdict == "FAIL"]
    return {(r.case, r.quantity) for r in bad.itertuples()}


def test_committed_golden_references_match_the_regenerated_ones():
    committed = golden.load_committed()
    assert set(committed) == {g.name for g in golden.GOLDEN}
    for gc in golden.GOLDEN:
        ref = golden.reference(gc)
        assert golden.check_reference(ref, committed) == [], gc.name
        # the float64 exact solver against mpmath, as recorded
        assert committed[gc.name]["exact_vs_mpmath"] < 1e-13


def test_a_changed_reference_or_input_generation_is_caught():
    committed = golden.load_committed()
    ref = golden.reference(golden.BY_NAME["well_conditioned"])
    tampered = json.loads(json.dumps(committed))
    tampered["well_conditioned"]["fingerprints"]["dk"][0] *= 1 + 1e-6
    assert any("reference dk changed" in m for m in golden.check_reference(ref, tampered))
    ref.problem = ref.problem.replace(q=ref.problem.q * (1 + 2.0**-40))
    assert any("input SHA-256" in m for m in golden.check_reference(ref, committed))


def test_guard_passes_on_our_implementation():
    df = guard.run(ours(), cases=CASES, props=PROPS, progress=False)
    assert (df.verdict == "pass").all(), df[df.verdict != "pass"].to_string()
    assert set(df.quantity) >= {"o", "dq", "dk", "dv", "dg", "dbeta", "dlam", *PROPS}


def test_guard_fails_an_output_perturbed_by_1e_3():
    base = ours()

    def perturbed(*args, **kw):
        o = base.fn(*args, **kw)
        return o + 1e-3 * o.detach()  # the gradients stay those of the true op

    df = guard.run(guard.Target(perturbed, "perturbed", base.policy, base.options), cases=CASES, props=[],
                   progress=False)
    assert ("well_conditioned", "o") in _fails(df)
    assert not any(q.startswith("d") for _, q in _fails(df))


def test_guard_fails_a_solver_that_ignores_the_tolerance():
    base = ours()
    target = guard.resolve(None, SolverSpec(policy="bf16x3", steps=60, tol=1e-6), "cpu", {"backend": "torch"})

    def sloppy(*args, steps=30, tol=None, **kw):
        return base.fn(*args, steps=2, tol=None, **kw)  # stops after 2 steps whatever it was asked

    df = guard.run(guard.Target(sloppy, "sloppy", target.policy, target.options), cases=CASES, props=[],
                   progress=False)
    assert ("well_conditioned", "o") in _fails(df)


def test_guard_fails_an_implementation_that_is_not_scale_equivariant():
    base = ours()

    def offset(*args, **kw):
        return base.fn(*args, **kw) + 1e-9  # an absolute epsilon: invisible at unit scale

    df = guard.run(guard.Target(offset, "offset", base.policy, base.options), cases=["well_conditioned"],
                   props=["scale_q"], progress=False)
    fails = _fails(df)
    assert ("well_conditioned", "scale_q") in fails
    assert ("well_conditioned", "o") not in fails  # unit-scale outputs are within budget: only the property sees it


def test_guard_fails_a_nan_token():
    base = ours()

    def nan_token(*args, **kw):
        o = base.fn(*args, **kw)
        mask = torch.zeros_like(o, dtype=torch.bool)
        mask[0, 5, 0] = True
        return torch.where(mask, torch.nan, o)

    df = guard.run(guard.Target(nan_token, "nan", base.policy, base.options), cases=["well_conditioned"], props=[],
                   progress=False)
    row = df[(df.case == "well_conditioned") & (df.quantity == "o")].iloc[0]
    assert row.verdict == "FAIL" and row.measured == float("inf")


def test_baseline_limits():
    import pandas as pd

    target = ours()
    u = target.policy.u
    df = pd.DataFrame([guard._row("golden", "c", "o", 3e-5, 1.0, ""), guard._row("golden", "c", "dq", 1e-5, 1.0, "")])
    base = {"rows": [{"kind": "golden", "case": "c", "quantity": "o", "measured": 1e-5},
                     {"kind": "golden", "case": "c", "quantity": "dq", "measured": 1e-5}]}
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(base, fh)
    rows = {r["quantity"]: r for r in guard.compare_baseline(fh.name, df, target, None)}
    assert rows["o"]["budget"] == pytest.approx(2e-5 + 0.25 * u) and rows["o"]["verdict"] == "FAIL"
    assert rows["dq"]["verdict"] == "pass"


def test_cli_exit_codes_and_baseline(tmp_path, capsys):
    base = str(tmp_path / "baseline.json")
    args = ["guard", "--cases", "well_conditioned", "--properties", "scale_q", "--no-backward", "--device", "cpu",
            "--no-progress", "--option", "backend=torch", "--policy", "bf16x3"]
    assert main(args + ["--write-baseline", base]) == 0
    stored = json.load(open(base))
    assert stored["policy"] == "bf16x3" and {r["quantity"] for r in stored["rows"]} == {"o", "scale_q"}
    assert main(args + ["--baseline", base]) == 0
    # a baseline far better than what we measure now (o error 7.7e-6 = 0.5 u): a regression beyond
    # 2 x baseline + 0.25 u
    for r in stored["rows"]:
        r["measured"] = r["measured"] / 1000
    json.dump(stored, open(base, "w"))
    assert main(args + ["--baseline", base]) == 1
    assert "baseline" in capsys.readouterr().err
    # usage errors
    assert main(["guard", "--impl", "no_such_module:f", "--device", "cpu"]) == 2
    assert main(["guard", "--impl", "kernels", "--device", "cpu"]) == 2
    assert main(["guard", "--baseline", str(tmp_path / "missing.json"), "--cases", "well_conditioned",
                 "--properties", "--no-backward", "--device", "cpu", "--no-progress", "--option", "backend=torch"]) == 2
    assert main(["guard", "--cases", "no_such_case"]) == 2  # named, with the golden cases listed
    assert "the golden cases are" in capsys.readouterr().err


def test_peer_adapter_reads_both_return_shapes_of_the_peer():
    """fla-core 0.6.0 returns (o, kk, kv) although its docstring shows (o, (kk, kv)); the adapter
    reads both (a mix-up made the continuation property fail on the first GPU run)."""
    from mesa_stability.stability.peer import _split

    o, kk, kv = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    for out in ((o, kk, kv), (o, (kk, kv))):
        got_o, (got_kk, got_kv) = _split(out)
        assert got_o is o and got_kk is kk and got_kv is kv
    assert _split(o) == (o, (None, None))
    with pytest.raises(NotImplementedError, match="tolerance"):
        from mesa_stability.stability.peer import chunk_mesa_net

        chunk_mesa_net(*(torch.zeros(1),) * 6, tol=1e-4)


def test_a_missing_dependency_is_a_usage_error_not_a_regression(monkeypatch, capsys):
    """The guard on kernels that cannot run here (no triton) stops with exit 2 and the install hint,
    instead of reporting every check as a budget violation."""
    import mesa_stability.kernels.mesa as km

    if km.triton is not None:
        monkeypatch.setattr(km, "triton", None)
        monkeypatch.delattr(km.chunk_cg, "_chunk_cg_kernel")
    assert main(["guard", "--device", "cpu", "--no-progress", "--cases", "well_conditioned", "--properties",
                 "--option", "backend=triton"]) == 2
    err = capsys.readouterr().err
    assert "cannot run here" in err and "pip install triton" in err
    if torch.cuda.is_available():
        return
    assert main(["guard", "--device", "cuda", "--no-progress"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flags, field", [(["--steps", "-5"], "steps"), (["--tol", "0"], "tol"),
                                          (["--tol", "-1"], "tol"), (["--option", "x0=bogus"], "x0")])
def test_bad_solver_options_are_usage_errors_before_any_check(flags, field, capsys):
    """The guard validates its solver options once, as a SolverSpec, before running anything: a bad
    value is a usage error (exit 2) naming the field, not 16 checks reported as failed."""
    assert main(["guard", *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"SolverSpec.{field}" in err and "budget" not in err


def test_pytest_benchmark_files_are_compared(tmp_path, capsys):
    """A real pytest-benchmark JSON (one CPU benchmark of benchmarks/pytest_bench, run in a subprocess)
    against itself passes; against a baseline twice as fast it fails beyond time_ratio; a benchmark
    in one file only is n/a; --baseline of this kind without --bench is a usage error."""
    pytest.importorskip("pytest_benchmark")
    import os
    import subprocess
    import sys

    new = tmp_path / "new.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "exact and fp64",
                    "--benchmark-min-rounds=3", f"--benchmark-json={new}",
                    os.path.join(root, "benchmarks", "pytest_bench", "test_bench_cpu.py")],
                   check=True, cwd=root, capture_output=True)
    assert guard.is_benchmark_json(str(new))
    same = guard.compare_benchmarks(str(new), str(new))
    assert len(same) == 1 and same[0]["verdict"] == "pass"
    data = json.loads(new.read_text())
    data["benchmarks"][0]["stats"]["median"] /= 2  # the baseline twice as fast: a 2x regression now
    data["benchmarks"].append({**data["benchmarks"][0], "fullname": "gone::test"})
    base = tmp_path / "base.json"
    base.write_text(json.dumps(data))
    rows = {r["case"]: r for r in guard.compare_benchmarks(str(base), str(new))}
    assert rows["gone::test"]["verdict"] == "n/a"
    (slow,) = [r for n, r in rows.items() if n != "gone::test"]
    assert slow["verdict"] == "FAIL" and slow["budget"] == pytest.approx(
        guard.load_budgets()["baseline"]["time_ratio"] * data["benchmarks"][0]["stats"]["median"])
    args = ["guard", "--cases", "well_conditioned", "--properties", "--no-backward", "--device", "cpu",
            "--no-progress", "--option", "backend=torch", "--policy", "bf16x3"]
    assert main(args + ["--baseline", str(base), "--bench", str(new)]) == 1
    assert main(args + ["--baseline", str(new), "--bench", str(new)]) == 0
    assert main(args + ["--baseline", str(base)]) == 2
    assert "--bench NEW.json" in capsys.readouterr().err
    assert main(args + ["--bench", str(new)]) == 2
