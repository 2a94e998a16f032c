"""Precision policies: lookup, rounding emulation and the error each policy yields."""

from __future__ import annotations

import pytest
import torch

from mesa_stability.solvers import POLICIES, get_policy, solve
from mesa_stability.solvers.precision import UNIT_ROUNDOFF, round_tf32, round_to
from mesa_stability.stability.cases import random_problem
from mesa_stability.stability.metrics import condition_numbers, rel_error


def test_named_policies_and_aliases():
    for name in ("fp64", "fp32", "tf32", "bf16x3", "auto", "bf16-fp32state", "bf16-bf16state", "fp16-fp32state",
                 "fp16-fp16state"):
        assert get_policy(name).name == name
    assert get_policy("bf16").name == "bf16-fp32state"
    assert get_policy(POLICIES["fp32"]) is POLICIES["fp32"]
    with pytest.raises(ValueError, match="unknown policy"):
        get_policy("int8")
    with pytest.raises(ValueError, match="operand"):
        type(POLICIES["fp32"])("bad", operand="fp8")


def test_unit_roundoff_is_that_of_the_least_precise_part():
    assert get_policy("fp64").u == 2.0**-53
    assert get_policy("fp32").u == 2.0**-24
    assert get_policy("tf32").u == 2.0**-11
    assert get_policy("bf16").u == 2.0**-8


def test_round_tf32_keeps_10_mantissa_bits_round_to_nearest_even():
    x = torch.tensor([1.0 + 2.0**-10, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-11 + 2.0**-20,
                      float("inf"), -2.5], dtype=torch.float32)
    got = round_tf32(x)
    want = torch.tensor([1.0 + 2.0**-10, 1.0, 1.0 + 2.0**-9, 1.0 + 2.0**-10, float("inf"), -2.5])
    assert torch.equal(got, want)
    r = torch.randn(10000, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    rel = ((round_tf32(r) - r).abs() / r.abs()).max()
    assert float(rel) <= UNIT_ROUNDOFF["tf32"]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32", "fp32"])
def test_round_to_error_is_at_most_unit_roundoff(precision):
    # magnitudes 1e-3..1e3 stay inside every format's normal range (fp16: 6.1e-5..65504)
    gen = torch.Generator().manual_seed(0)
    r = 10 ** (6 * torch.rand(10000, generator=gen, dtype=torch.float64) - 3)
    r = r * torch.where(torch.rand(10000, generator=gen) < 0.5, -1.0, 1.0).double()
    rel = ((round_to(r, precision) - r).abs() / r.abs()).max()
    assert float(rel) <= UNIT_ROUNDOFF[precision]
    assert float(rel) > UNIT_ROUNDOFF[precision] / 4  # it really rounds to that precision


def test_policy_errors_follow_unit_roundoff():
    """Converged CG under each policy: error within kappa * u * growth, and ordered by u."""
    p = random_problem(B=1, T=64, H=2, D=16, seed=3, gamma_range=(0.9, 1.0))
    ref = solve(p, "exact")
    kappa = float(condition_numbers(p).max())
    errs = {}
    for name in ("fp64", "fp32", "bf16x3", "auto", "tf32", "fp16-fp32state", "bf16-fp32state"):
        pol = get_policy(name)
        res = solve(p, "cg", pol, steps=60)
        assert res.x.dtype == pol.accum_dtype
        errs[name] = rel_error(res.x, ref.x)
        # growth factor 10 * sqrt(D) for the accumulated rounding of a D-term inner product; auto's
        # u is that of the tier its kappa selects (u_at)
        assert errs[name] <= 10 * 4 * kappa * pol.u_at(kappa), (name, errs[name], kappa)
    assert errs["fp64"] < 1e-3 * errs["fp32"] < 1e-3 * errs["tf32"]
    # bf16x3 (~16 bits) sits between fp32 (24) and tf32 (11)
    assert errs["fp32"] < errs["bf16x3"] < errs["tf32"]
    assert errs["tf32"] < errs["bf16-fp32state"] and errs["fp16-fp32state"] < errs["bf16-fp32state"]


def test_low_precision_state_storage_costs_accuracy_on_long_sequences():
    p = random_problem(B=1, T=256, H=1, D=16, seed=5, gamma_range=(0.999, 1.0))
    ref = solve(p, "exact")
    e32 = rel_error(solve(p, "cg", "bf16-fp32state", steps=40).x, ref.x)
    e16 = rel_error(solve(p, "cg", "bf16-bf16state", steps=40).x, ref.x)
    assert e16 > e32
