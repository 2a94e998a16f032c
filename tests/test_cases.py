"""Named stress cases: reproducible, valid, and stressing what they say."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from mesa_stability.stability import cases
from mesa_stability.stability.metrics import condition_numbers
from mesa_stability.stability.strategies import problems


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_every_case_is_seeded_and_reproducible(name):
    a, b = cases.make(name, seed=3, T=40), cases.make(name, seed=3, T=40)
    c = cases.make(name, seed=4, T=40)
    for field in ("q", "k", "v", "g", "beta", "lam"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.q, c.q)
    assert a.T == 40 and cases.CASES[name].stresses


def test_unknown_case_and_parameter_are_named():
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        cases.make("nope")
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['rank'\]"):
        cases.make("well_conditioned", rank=3)
    with pytest.raises(ValueError, match="key_rank"):
        cases.make("low_rank_keys", rank=99)


def test_cases_stress_what_they_claim():
    kappa_end = [float(condition_numbers(cases.make("no_forgetting_long", T=T))[:, -1].max()) for T in (64, 256)]
    assert kappa_end[1] > 2 * kappa_end[0]  # kappa grows with T without forgetting
    well = float(condition_numbers(cases.make("well_conditioned")).max())
    assert well < 10
    assert float(condition_numbers(cases.make("tiny_lambda")).max()) > 100 * well
    lr = cases.make("low_rank_keys", rank=3, T=30)
    assert int(torch.linalg.matrix_rank(lr.k[0, :, 0])) == 3
    sf = cases.make("strong_forgetting")
    assert float(torch.exp(sf.g).max()) <= 0.1 + 1e-12
    assert cases.make("bf16_inputs").q.dtype == torch.bfloat16
    assert cases.make("bf16_inputs").g.dtype == torch.float32
    lv = cases.make("large_values")
    assert float(lv.final_state()[1].abs().max()) > 65504  # overflows fp16 state storage
    vl = cases.make("varlen", n_seqs=5)
    assert vl.cu_seqlens.numel() == 6 and len(vl.sequences()) == 5
    su = cases.make("small_upstream_grad")
    assert float(su.q.abs().max()) < 1e-4
    e = cases.upstream_gradient(su, scale=1e-8, seed=1)
    assert e.shape == su.v.shape and float(e.abs().max()) < 1e-6


@given(problems(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)))
def test_strategy_draws_valid_problems_of_every_dtype(p):
    assert p.q.dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    assert bool((p.g <= 0).all()) and bool((p.lam > 0).all())
