"""The one solver spec (solvers/spec.py): validation that names the field, sugar that builds it, and
the same spec reaching every entry point."""

from __future__ import annotations

import pytest
import torch

from mesa_stability.solvers import get_policy
from mesa_stability.solvers.precision import DEFAULT_POLICY
from mesa_stability.solvers.spec import SPEC_FIELDS, SolverSpec, solver_spec


@pytest.mark.parametrize("field,bad", [
    ("method", "newton"), ("steps", -1), ("steps", 2.5), ("steps", True), ("tol", 5), ("tol", 0.0),
    ("x0", "random"), ("precond", "ilu"), ("policy", "fp8"), ("chunk_size", 0), ("bwd_steps", -2),
    ("bwd_tol", 1.0), ("check", "loud"), ("check_tol", -1e-3), ("backend", "cuda"),
])
def test_a_bad_field_is_an_error_that_names_it(field, bad):
    with pytest.raises(ValueError, match=rf"SolverSpec\.{field}"):
        SolverSpec(**{field: bad})


def test_defaults_normalisation_and_round_trip():
    s = SolverSpec()
    assert s.policy is get_policy(DEFAULT_POLICY) and s.check == "warn" and s.method == "cg"
    assert SolverSpec(precond="none").precond is None  # the CLI's spelling
    t = SolverSpec(steps=7, tol=1e-3, policy="bf16x3", bwd_steps=40, check=None, chunk_size=16)
    assert SolverSpec.from_dict(t.to_dict()) == t
    assert t.to_dict()["policy"] == "bf16x3" and set(t.to_dict()) == set(SPEC_FIELDS)
    assert (t.adjoint_steps, t.adjoint_tol, SolverSpec(steps=9).adjoint_steps) == (40, 1e-3, 9)
    assert t.threshold == get_policy("bf16x3").check_tol and SolverSpec(check_tol=1e-2).threshold == 1e-2
    with pytest.raises(TypeError, match=r"unknown solver option\(s\) \['stepz'\]"):
        solver_spec(None, stepz=3)
    with pytest.raises(TypeError, match="SolverSpec or None"):
        solver_spec({"steps": 3})
    assert solver_spec(t, steps=8) == t.replace(steps=8) and t.replace(steps=8).tol == 1e-3


def test_the_label_is_stable_and_tells_specs_apart():
    assert SolverSpec(steps=30, policy="fp32").label == "cg/steps=30/fp32"
    assert SolverSpec(method="exact", policy="fp32").label == "exact/fp32"
    assert SolverSpec(steps=5, x0="jacobi", precond="jacobi", policy="fp32").label == \
        "cg/steps=5/fp32/x0=jacobi/precond=jacobi"
    labels = {SolverSpec(**{f: v}).label for f, v in [("chunk_size", 64), ("bwd_steps", 3), ("check", None),
                                                     ("backend", "torch"), ("check_tol", 0.01), ("bwd_tol", 1e-3)]}
    assert len(labels) == 6 and SolverSpec().label not in labels


def test_every_entry_point_takes_the_spec():
    from mesa_stability.ablations.grid import parse_grid
    from mesa_stability.ablations.model import MesaLM
    from mesa_stability.kernels import MesaLayer, mesa_chunk
    from mesa_stability.stability import cases

    spec = SolverSpec(steps=12, tol=1e-6, policy="fp64", backend="torch", check=None)
    p = cases.make("well_conditioned", T=20, H=2, D=8)
    args = (p.q, p.k, p.v, p.g, p.beta, p.lam)
    o1, st1 = mesa_chunk(*args, spec, return_stats=True)
    o2, st2 = mesa_chunk(*args, return_stats=True, **spec.to_dict())  # the keyword sugar: the same solve
    assert torch.equal(o1, o2) and torch.equal(st1.steps, st2.steps) and st1.certificate is None
    with pytest.raises(ValueError, match="solves by CG"):
        mesa_chunk(*args, spec.replace(method="exact"))
    with pytest.raises(TypeError, match="unknown solver option"):
        mesa_chunk(*args, steps=3, toll=1e-3)
    assert MesaLayer(16, 2, solver=spec).solver == spec == MesaLayer(16, 2, **spec.to_dict()).solver
    model = MesaLM("tiny", spec)
    assert all(b.mixer.solver == spec.replace(backend="auto") for b in model.blocks)  # certificate off anyway
    grid = parse_grid({"train": [{"steps": 12, "policy": "fp64"}], "eval": [{"method": "exact", "policy": "fp64"}]})
    assert grid.train == [SolverSpec(steps=12, policy="fp64")] and grid.eval[0].method == "exact"
    # the reference solvers: solve(problem, spec) is the named call with the spec's options
    from mesa_stability import solvers

    r1 = solvers.solve(p, spec.replace(chunk_size=8))
    r2 = solvers.solve(p, "cg", "fp64", steps=12, tol=1e-6, chunk_size=8)
    assert torch.equal(r1.x, r2.x) and torch.equal(r1.steps, r2.steps)
    assert torch.equal(solvers.solve(p, spec.replace(method="exact")).x, solvers.solve(p, "exact").x)
    with pytest.raises(TypeError, match="fields of the spec"):
        solvers.solve(p, spec, "fp32")
    with pytest.raises(ValueError, match="not supported by chebyshev"):
        solvers.solve(p, spec.replace(method="chebyshev", precond="jacobi"))
    # the guard and the production grid run the spec they are given (the policy per grid run)
    from mesa_stability.stability import guard, production, report

    t = guard.resolve(None, spec, "cpu", {"x0": "jacobi", "chunk_size": 8})
    assert t.options == {"spec": spec.replace(x0="jacobi", chunk_size=8)} and t.policy is spec.policy
    assert t.spec is t.options["spec"]
    with pytest.raises(guard.UsageError, match=r"SolverSpec\.precond"):
        guard.resolve(None, spec, "cpu", {"precond": "ilu"})
    [t32] = production.targets(None, ["fp32"], "cpu", spec, None)
    assert t32.spec == spec.replace(policy="fp32") and production._options_label(t32.options) == \
        "backend=torch,check=None,steps=12,tol=1e-06"
    # the stability report: each grid setting is a spec (tol "u" is the policy's unit roundoff)
    s = report.setting_spec("cg", get_policy("fp32"), {"steps": 500, "tol": "u"})
    assert (s.method, s.steps, s.tol, s.check) == ("cg", 500, get_policy("fp32").u, None)
