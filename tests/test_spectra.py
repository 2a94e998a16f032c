"""Tests of :mod:`ablations.spectra` against independent references: numpy's ``matrix_rank``, spectra
built from orthogonal factors, direct entropy sums, brute-force pair counts, the no-ties Spearman
formula, pandas' ranks, and direct ``torch.softmax`` / ``torch.logsumexp`` evaluations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mesa_stability.ablations.spectra import (
    SWEEP_THRESHOLDS,
    _ranks,
    auroc,
    effective_rank,
    energy_score,
    max_softmax_probability,
    numerical_rank,
    rank_sweep,
    row_centred,
    singular_values,
    spearman,
)

seeds = st.integers(0, 2**31 - 1)


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``n x k`` matrix with orthonormal columns (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def _with_spectrum(s: list[float], m: int, n: int, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` with random orthonormal ``U`` (m x k), ``V`` (n x k): its spectrum is exactly ``s``."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    return _orthonormal(m, k, gen) @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ _orthonormal(n, k, gen).T


def _numpy_rank(a: torch.Tensor, rel: float = 1e-3) -> int:
    an = a.numpy()
    return int(np.linalg.matrix_rank(an, tol=rel * np.linalg.svd(an, compute_uv=False).max()))


# ---------------------------------------------------------------- singular values / numerical rank


# m, n >= r + 20 keeps the Gaussian factors well conditioned, so the true rank r clears the 1e-3 threshold
@given(seed=seeds, r=st.integers(1, 10), m=st.integers(30, 50), n=st.integers(30, 50),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_numerical_rank_low_rank_products_match_numpy(seed, r, m, n, dtype):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(m, r, generator=gen, dtype=torch.float64)
    v = torch.randn(r, n, generator=gen, dtype=torch.float64)
    a = u @ v
    # noise far below the relative threshold 1e-3 * s_max (s_max >= ~1 for these Gaussian products)
    a = (a + 1e-8 * torch.randn(m, n, generator=gen, dtype=torch.float64)).to(dtype)
    expected = _numpy_rank(a.double())
    assert numerical_rank(a) == expected
    assert numerical_rank(singular_values(a)) == expected
    # the Gaussian factors have full rank r almost surely and are well conditioned at these sizes
    assert expected == r


def test_numerical_rank_known_spectrum():
    s = [10.0, 5.0, 1.0, 0.02, 0.0101, 0.0099, 1e-5, 0.0]
    expected = int((np.array(s) > 1e-3 * max(s)).sum())  # 10, 5, 1, 0.02, 0.0101
    assert expected == 5
    a = _with_spectrum(s, 30, 20, seed=0)
    sv = singular_values(a)  # min(30, 20) values: s, then zeros up to rounding
    expected_sv = torch.zeros(20, dtype=torch.float64)
    expected_sv[: len(s)] = torch.tensor(sorted(s, reverse=True), dtype=torch.float64)
    torch.testing.assert_close(sv, expected_sv, rtol=0, atol=1e-12)
    assert numerical_rank(a) == expected == _numpy_rank(a)
    assert numerical_rank(torch.tensor(s)) == expected  # 1-D input: the spectrum itself, any order
    assert numerical_rank(torch.tensor(s[::-1])) == expected
    for rel in (0.5, 0.05, 1e-2, 1e-7):  # thresholds well away from every s_i
        assert numerical_rank(a, rel_threshold=rel) == int((np.array(s) > rel * max(s)).sum()) == _numpy_rank(a, rel)


def test_singular_values_dtype_and_order():
    a = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    s = singular_values(a)
    assert s.dtype == torch.float64 and s.shape == (5,)
    assert torch.all(s[:-1] >= s[1:])
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(a.double().numpy(), compute_uv=False), rtol=1e-12)


def test_zero_matrix():
    z = torch.zeros(6, 4)
    assert numerical_rank(z) == 0
    assert effective_rank(z) == 0.0
    assert numerical_rank(torch.zeros(3)) == 0
    assert effective_rank(torch.zeros(3)) == 0.0


# ---------------------------------------------------------------- restricted centred rank, threshold sweep


def _logits_of_known_restricted_rank(r: int, n_rows: int, used: torch.Tensor, seed: int) -> torch.Tensor:
    """``N x 256`` logits whose columns ``used`` are a per-row constant plus a rank-``r`` matrix with
    centred rows, and whose other columns are full-rank noise."""
    gen = torch.Generator().manual_seed(seed)
    k = used.numel()
    left = torch.randn(n_rows, r, generator=gen, dtype=torch.float64)
    right = torch.randn(k, r, generator=gen, dtype=torch.float64)
    right -= right.mean(0, keepdim=True)  # 1^T right = 0: every row of left @ right.T sums to 0
    z = 10 * torch.randn(n_rows, 256, generator=gen, dtype=torch.float64)  # the unused columns: full rank
    const = 50 * torch.randn(n_rows, 1, generator=gen, dtype=torch.float64)  # softmax ignores it
    z[:, used] = const + left @ right.T
    return z


@pytest.mark.parametrize("r", [1, 7, 30])
def test_restricted_centred_rank_of_a_constructed_matrix(r):
    gen = torch.Generator().manual_seed(r)
    used = torch.randperm(256, generator=gen)[:57]
    z = _logits_of_known_restricted_rank(r, 400, used, seed=r)
    zc = row_centred(z, used)
    assert zc.shape == (400, 57) and zc.dtype == torch.float64
    # the per-row constant is gone: the centred matrix is exactly the rank-r part
    torch.testing.assert_close(zc, z[:, used] - z[:, used].mean(1, keepdim=True), rtol=0, atol=0)
    assert numerical_rank(zc) == r == _numpy_rank(zc)
    assert numerical_rank(z) > 57  # all 256 columns: the unused ones add rank
    # without centring the constant adds one direction
    assert numerical_rank(z[:, used]) == r + 1 == _numpy_rank(z[:, used])
    # numpy's own projection (I - 1 1^T / k) gives the same matrix
    k = used.numel()
    proj = np.eye(k) - np.ones((k, k)) / k
    np.testing.assert_allclose(zc.numpy(), z[:, used].numpy() @ proj, rtol=0, atol=1e-10)


def test_row_centring_removes_exactly_one_direction():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(300, 256, generator=gen, dtype=torch.float64)
    for k in (2, 10, 57):
        used = torch.arange(k) * 3
        assert numerical_rank(row_centred(z, used)) == k - 1 == _numpy_rank(row_centred(z, used))
        assert torch.allclose(row_centred(z, used).sum(1), torch.zeros(300, dtype=torch.float64), atol=1e-12)
    assert numerical_rank(row_centred(z, [5])) == 0  # one class: nothing to separate
    # lists, numpy arrays and tensors of indices are the same columns
    torch.testing.assert_close(row_centred(z, [1, 4, 9]), row_centred(z, np.array([1, 4, 9])))


def test_rank_sweep_on_a_known_spectrum():
    s = [1.0, 0.5, 5e-2, 5e-3, 5e-4, 5e-5, 3e-7]
    a = _with_spectrum(s, 40, 30, seed=4)
    got = rank_sweep(a)
    assert list(got) == list(SWEEP_THRESHOLDS)
    for tau, r in got.items():
        assert r == int((np.array(s) > tau * max(s)).sum()) == _numpy_rank(a, tau) == numerical_rank(a, tau)
    assert list(got.values()) == sorted(got.values(), reverse=True)  # a higher threshold counts fewer
    assert rank_sweep(torch.tensor(s), (0.3,)) == {0.3: 2}


def test_restricted_rank_and_sweep_errors():
    z = torch.randn(5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="repeat"):
        row_centred(z, [1, 1])
    with pytest.raises(ValueError, match=r"lie in \[0, 8\)"):
        row_centred(z, [0, 8])
    with pytest.raises(ValueError, match="integer indices"):
        row_centred(z, [0.5, 1.0])
    with pytest.raises(ValueError, match="integer indices"):
        row_centred(z, [])
    with pytest.raises(ValueError, match="2-D"):
        row_centred(z[0], [0, 1])
    with pytest.raises(ValueError, match="non-finite"):
        row_centred(z.index_fill(1, torch.tensor([2]), float("nan")), [2, 3])
    with pytest.raises(ValueError, match="non-empty sequence"):
        rank_sweep(z, ())
    with pytest.raises(ValueError, match=r"rel_threshold must be in \(0, 1\)"):
        rank_sweep(z, (1e-3, 1.0))


# ---------------------------------------------------------------- effective rank


@given(r=st.integers(1, 12), extra=st.integers(0, 8), c=st.floats(1e-3, 1e3), seed=seeds)
def test_effective_rank_equal_singular_values(r, extra, c, seed):
    assert effective_rank(torch.tensor([c] * r + [0.0] * extra)) == pytest.approx(r, rel=1e-12)
    a = _with_spectrum([c] * r, r + extra + 3, r + 2, seed)
    assert effective_rank(a) == pytest.approx(r, rel=1e-9)


def test_effective_rank_known_spectrum():
    s = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.0])
    p = s[s > 0] / s.sum()
    expected = math.exp(-sum(pi * math.log(pi) for pi in p))
    assert effective_rank(torch.tensor(s)) == pytest.approx(expected, rel=1e-14)
    a = _with_spectrum(list(s), 12, 9, seed=3)
    assert effective_rank(a) == pytest.approx(expected, rel=1e-10)


@given(seed=seeds, r=st.integers(1, 10), m=st.integers(30, 50), n=st.integers(30, 50))
def test_effective_rank_bounds(seed, r, m, n):
    # well-conditioned rank-r products: the spectrum below the threshold is rounding noise (~1e-15 s_max),
    # so 1 <= erank <= numerical rank = r (in general only erank <= #{s_i > 0} is guaranteed)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen, dtype=torch.float64)
    e = effective_rank(a)
    assert 1.0 - 1e-12 <= e <= numerical_rank(a) + 1e-9
    assert numerical_rank(a) == r


@given(s=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=30))
def test_effective_rank_bounds_on_spectra(s):
    k = sum(v > 0 for v in s)
    assume(k > 0)
    e = effective_rank(torch.tensor(s, dtype=torch.float64))
    assert 1.0 - 1e-12 <= e <= k * (1 + 1e-12)


# ---------------------------------------------------------------- AUROC


def _auroc_pairs(pos: list[float], neg: list[float]) -> float:
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


@given(pos=st.lists(st.integers(-5, 5), min_size=1, max_size=40),
       neg=st.lists(st.integers(-5, 5), min_size=1, max_size=40))
def test_auroc_with_ties_matches_pairs(pos, neg):
    got = auroc(torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32))
    assert got == pytest.approx(_auroc_pairs(pos, neg), rel=0, abs=1e-12)


@given(seed=seeds, n_pos=st.integers(1, 50), n_neg=st.integers(1, 50), shift=st.floats(-2, 2))
def test_auroc_continuous_matches_pairs(seed, n_pos, n_neg, shift):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_pos, generator=gen, dtype=torch.float64) + shift
    neg = torch.randn(n_neg, generator=gen, dtype=torch.float64)
    assert auroc(pos, neg) == pytest.approx(_auroc_pairs(pos.tolist(), neg.tolist()), rel=0, abs=1e-12)
    assert auroc(neg, pos) == pytest.approx(1.0 - auroc(pos, neg), rel=0, abs=1e-12)


def test_auroc_extremes():
    pos, neg = torch.arange(10.0, 20.0), torch.arange(0.0, 7.0)
    assert auroc(pos, neg) == 1.0
    assert auroc(neg, pos) == 0.0
    assert auroc(torch.ones(5), torch.ones(3)) == 0.5


# ---------------------------------------------------------------- ranks and Spearman


@given(xs=st.lists(st.integers(-4, 4), min_size=1, max_size=50))
def test_ranks_match_pandas(xs):
    np.testing.assert_array_equal(_ranks(torch.tensor(xs)).numpy(), pd.Series(xs, dtype=float).rank().to_numpy())


@given(seed=seeds, n=st.integers(2, 60))
def test_spearman_no_ties_closed_form(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randperm(n, generator=gen).double()
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    assume(torch.unique(y).numel() == n)
    d = _ranks(x) - _ranks(y)
    expected = 1.0 - 6.0 * float((d * d).sum()) / (n * (n * n - 1))
    assert spearman(x, y) == pytest.approx(expected, rel=0, abs=1e-12)
    assert spearman(x.tolist(), y.numpy()) == spearman(x, y)  # lists / numpy accepted


@given(xs=st.lists(st.integers(-1000, 1000), min_size=2, max_size=50, unique=True))
def test_spearman_monotone_transforms(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    for y in (3 * x + 1, x**3, torch.exp(x / 100)):
        assert spearman(x, y) == 1.0
    for y in (-x, -(x**3), torch.exp(-x / 100)):
        assert spearman(x, y) == -1.0


@given(xs=st.lists(st.integers(-3, 3), min_size=2, max_size=40), data=st.data())
def test_spearman_ties_vs_pandas_ranks(xs, data):
    ys = data.draw(st.lists(st.integers(-3, 3), min_size=len(xs), max_size=len(xs)))
    sx, sy = pd.Series(xs, dtype=float), pd.Series(ys, dtype=float)
    got = spearman(xs, ys)
    if sx.nunique() == 1 or sy.nunique() == 1:
        assert math.isnan(got)
        return
    # Series.corr(method="spearman") calls scipy.stats.spearmanr; Pearson of pandas' average ranks does not
    assert got == pytest.approx(sx.rank().corr(sy.rank(), method="pearson"), rel=0, abs=1e-12)


def test_spearman_ties_vs_pandas_spearman():
    pytest.importorskip("scipy")  # pandas' method="spearman" needs scipy (an optional dependency of pandas)
    gen = np.random.default_rng(0)
    for _ in range(20):
        xs, ys = gen.integers(-3, 4, size=30).astype(float), gen.integers(-3, 4, size=30).astype(float)
        expected = pd.Series(xs).corr(pd.Series(ys), method="spearman")
        assert spearman(xs, ys) == pytest.approx(expected, rel=0, abs=1e-12)


def test_spearman_constant_is_nan():
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman(torch.arange(4.0), torch.full((4,), 2.0)))


# ---------------------------------------------------------------- MSP and energy


TEMPERATURES = (0.05, 0.5, 1.0, 1.7, 10.0, 1e3)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_msp_and_energy_match_direct(temperature):
    gen = torch.Generator().manual_seed(7)
    z = 5 * torch.randn(3, 8, 256, generator=gen, dtype=torch.float32)
    zd = z.double()
    msp = max_softmax_probability(z, temperature)
    energy = energy_score(z, temperature)
    assert msp.dtype == energy.dtype == torch.float64
    assert msp.shape == energy.shape == (3, 8)
    torch.testing.assert_close(msp, torch.softmax(zd / temperature, dim=-1).max(dim=-1).values, rtol=1e-14, atol=0)
    torch.testing.assert_close(energy, temperature * torch.logsumexp(zd / temperature, dim=-1), rtol=1e-14, atol=0)
    # direct max-shifted sum, not via logsumexp
    m = zd.max(dim=-1, keepdim=True).values
    direct = temperature * torch.log(torch.exp((zd - m) / temperature).sum(-1)) + m.squeeze(-1)
    torch.testing.assert_close(energy, direct, rtol=1e-12, atol=1e-12)
    assert torch.all((msp >= 1 / 256 - 1e-15) & (msp <= 1.0))


@given(seed=seeds, t=st.floats(0.05, 20.0), c=st.floats(-50, 50))
def test_energy_identities(seed, t, c):
    z = 3 * torch.randn(4, 256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(energy_score(t * z, t), t * energy_score(z, 1.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(energy_score(z + c, t), energy_score(z, t) + c, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(max_softmax_probability(t * z, t), max_softmax_probability(z, 1.0), rtol=1e-12,
                               atol=1e-15)
    torch.testing.assert_close(max_softmax_probability(z + c, t), max_softmax_probability(z, t), rtol=1e-12,
                               atol=1e-15)


def test_temperature_limits():
    z = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    # T -> 0: energy -> max logit, MSP -> 1; T -> inf: MSP -> 1 / C
    assert float(energy_score(z, 1e-4)) == pytest.approx(3.0, abs=1e-6)
    assert float(max_softmax_probability(z, 1e-4)) == pytest.approx(1.0, abs=1e-12)
    assert float(max_softmax_probability(z, 1e8)) == pytest.approx(0.25, abs=1e-7)


# ---------------------------------------------------------------- bad input


def test_errors():
    with pytest.raises(ValueError, match="2-D matrix"):
        singular_values(torch.ones(3))
    with pytest.raises(ValueError, match="2-D matrix"):
        singular_values(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        singular_values(torch.ones(0, 3))
    with pytest.raises(ValueError, match="non-finite"):
        singular_values(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        numerical_rank(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    for bad in (0.0, 1.0, -0.5, 2.0, float("nan")):
        with pytest.raises(ValueError, match=r"rel_threshold must be in \(0, 1\)"):
            numerical_rank(torch.eye(3), rel_threshold=bad)
    with pytest.raises(ValueError, match="rel_threshold must be a real number"):
        numerical_rank(torch.eye(3), rel_threshold="0.1")
    with pytest.raises(ValueError, match="1-D tensor of singular values or a 2-D matrix"):
        effective_rank(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -0.1]))
    with pytest.raises(ValueError, match="non-empty"):
        numerical_rank(torch.ones(0))
    with pytest.raises(ValueError, match="non-empty pos and neg"):
        auroc(torch.ones(0), torch.ones(3))
    with pytest.raises(ValueError, match="non-empty pos and neg"):
        auroc(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="pos contains non-finite"):
        auroc(torch.tensor([1.0, float("nan")]), torch.ones(3))
    with pytest.raises(ValueError, match="neg contains non-finite"):
        auroc(torch.ones(3), torch.tensor([float("-inf")]))
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 points"):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1.0, float("nan")], [1.0, 2.0])
    for bad_t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            max_softmax_probability(torch.ones(2, 4), bad_t)
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            energy_score(torch.ones(2, 4), bad_t)
    with pytest.raises(ValueError, match="logits contains non-finite"):
        energy_score(torch.tensor([[0.0, float("nan")]]), 1.0)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., C\]"):
        max_softmax_probability(torch.ones(2, 0), 1.0)
